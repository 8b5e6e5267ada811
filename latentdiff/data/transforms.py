"""Image preprocessing with PIL and torch (torchvision does not import beside this torch).

Every image becomes RGB on white, upright (EXIF orientation applied), its short side resized
to the resolution, a square cropped from the center (or at random), optionally mirrored, and
scaled to [-1, 1] as a (3, R, R) float tensor.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

WHITE = (255, 255, 255)
_EXIF_ORIENTATION = 0x0112
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}


def open_image(source, root: str | os.PathLike | None = None, draft_size: int | None = None) -> Image.Image:
    """Open a path, bytes, ``{"bytes", "path"}`` dict (a ``datasets.Image`` cell), array or PIL image.

    Decodes fully, so that a truncated or corrupt file raises here (``OSError``, ``ValueError``
    or ``SyntaxError`` from PIL) rather than later. ``draft_size`` lets JPEG decode at a reduced
    scale that is still at least that many pixels on each side: much faster for large photos.
    """
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, np.ndarray):
        return Image.fromarray(source)
    if isinstance(source, dict):
        source = source.get("bytes") or source.get("path")
    if isinstance(source, (bytes, bytearray)):
        image = Image.open(io.BytesIO(source))
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if root is not None and not path.is_absolute():
            path = Path(root) / path
        image = Image.open(path)
    else:
        raise TypeError(f"cannot read an image from a {type(source).__name__}")
    if draft_size is not None and image.format == "JPEG":
        image.draft(image.mode, (draft_size, draft_size))
    image.load()
    return image


def exif_upright(image: Image.Image) -> Image.Image:
    """Rotate/mirror as the camera's EXIF orientation tag says (phones store photos sideways)."""
    if image.getexif().get(_EXIF_ORIENTATION, 1) == 1:
        return image
    return ImageOps.exif_transpose(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode to RGB: transparency composited on white, 16-bit and float scaled to 8 bits."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P" and "transparency" in image.info:
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in _ALPHA_MODES:
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, WHITE)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if mode in _SIXTEEN_BIT_MODES or mode in ("I", "F"):
        return Image.fromarray(_to_uint8(np.asarray(image), mode), "L").convert("RGB")
    return image.convert("RGB")


def _to_uint8(array: np.ndarray, mode: str) -> np.ndarray:
    array = array.astype(np.float64)
    # 16-bit data fills 0..65535; a 32-bit "I" image is usually a 16-bit PNG in disguise.
    if mode in _SIXTEEN_BIT_MODES or (mode == "I" and array.max(initial=0) > 255):
        array = array / 257.0
    elif mode == "F" and array.max(initial=0) <= 1.0:
        array = array * 255.0
    return np.clip(np.rint(array), 0, 255).astype(np.uint8)


def resize_and_crop(
    image: Image.Image, resolution: int, random_crop: bool = False, generator: torch.Generator | None = None
) -> Image.Image:
    """Resize the short side to ``resolution`` and cut a ``resolution`` square (center or random)."""
    width, height = image.size
    scale = resolution / min(width, height)
    size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    if size != image.size:
        image = image.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
    spare_x, spare_y = size[0] - resolution, size[1] - resolution
    if random_crop:
        left = int(torch.randint(spare_x + 1, (), generator=generator))
        top = int(torch.randint(spare_y + 1, (), generator=generator))
    else:
        left, top = spare_x // 2, spare_y // 2
    if spare_x or spare_y:
        image = image.crop((left, top, left + resolution, top + resolution))
    return image


def to_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image to a (3, H, W) float tensor in [-1, 1]."""
    array = np.asarray(image, dtype=np.uint8)  # (H, W, 3)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)  # (3, H, W)


def to_pil(pixel_values: torch.Tensor) -> Image.Image:
    """The inverse of :func:`to_tensor`: a (3, H, W) tensor in [-1, 1] to an RGB image."""
    array = ((pixel_values.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return Image.fromarray(array.permute(1, 2, 0).numpy(), "RGB")  # (H, W, 3)


def preprocess(
    image: Image.Image,
    resolution: int,
    random_crop: bool = False,
    flip: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """A decoded image of any mode and size to the model's input: (3, R, R) in [-1, 1]."""
    image = resize_and_crop(to_rgb(exif_upright(image)), resolution, random_crop, generator)
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return to_tensor(image)
