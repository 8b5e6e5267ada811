"""Image preprocessing with PIL and torch (torchvision does not import beside this torch).

Every image becomes RGB on white, upright (EXIF orientation applied), resized to cover the target
(a square of the resolution, or an aspect-ratio bucket's width x height), cut to it from the center
(or at random), optionally mirrored, and scaled to [-1, 1] as a (3, H, W) float tensor; a mask for
``--masked_loss`` (the alpha channel or a mask file) is cut the same way.
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


def open_image(source, root: str | os.PathLike | None = None, draft_size: int | None = None,
               load: bool = True) -> Image.Image:
    """Open a path, bytes, ``{"bytes", "path"}`` dict (a ``datasets.Image`` cell), array or PIL image.

    Decodes fully (unless ``load=False``: the header only), so that a truncated or corrupt file raises here (``OSError``, ``ValueError``
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
    if load:
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


def crop_box(
    image_size: tuple[int, int], size: int | tuple[int, int], random_crop: bool = False,
    generator: torch.Generator | None = None,
) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """Where ``resize_and_crop`` cuts: the size to resize an ``image_size`` image to, so that it covers ``size``
    (a square's side, or (width, height): an aspect-ratio bucket), and the box to cut out of it (center or random)."""
    target_w, target_h = (size, size) if isinstance(size, int) else size
    width, height = image_size
    scale = max(target_w / width, target_h / height)
    resized = (max(target_w, round(width * scale)), max(target_h, round(height * scale)))
    spare_x, spare_y = resized[0] - target_w, resized[1] - target_h
    if random_crop:
        left = int(torch.randint(spare_x + 1, (), generator=generator))
        top = int(torch.randint(spare_y + 1, (), generator=generator))
    else:
        left, top = spare_x // 2, spare_y // 2
    return resized, (left, top, left + target_w, top + target_h)


def resize_and_crop(
    image: Image.Image, size: int | tuple[int, int], random_crop: bool = False, generator: torch.Generator | None = None
) -> Image.Image:
    """Resize to cover ``size`` (a square's side, or (width, height)) and cut it out: the image keeps its aspect,
    and only what sticks out of ``size`` is lost."""
    return _apply(image, *crop_box(image.size, size, random_crop, generator))


def _apply(image: Image.Image, resized: tuple[int, int], box: tuple[int, int, int, int]) -> Image.Image:
    if resized != image.size:
        image = image.resize(resized, Image.Resampling.BICUBIC, reducing_gap=3.0)
    if box != (0, 0, *resized):
        image = image.crop(box)
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
    size: int | tuple[int, int],
    random_crop: bool = False,
    flip: bool = False,
    generator: torch.Generator | None = None,
    mask: Image.Image | str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """A decoded image of any mode and shape to the model's input: (3, H, W) in [-1, 1], H = W = ``size`` or
    (W, H) = ``size``.

    With ``mask`` (a mask image of the same size, or ``"alpha"``: the image's own transparency, all ones for an
    image without), also the mask (1, H, W) in [0, 1], cut and mirrored as the image is (``--masked_loss``).
    """
    image = exif_upright(image)
    if mask == "alpha":  # without an alpha channel every pixel counts, as in sd-scripts
        mask = image.convert("RGBA").getchannel("A") if _has_alpha(image) else Image.new("L", image.size, 255)
    elif mask is not None:
        mask = exif_upright(mask)
        if mask.size != image.size:
            raise MaskSizeError(f"the mask is {mask.size[0]}x{mask.size[1]}, the image {image.size[0]}x{image.size[1]}")
        mask = to_rgb(mask).convert("L")
    resized, box = crop_box(image.size, size, random_crop, generator)
    image = _apply(to_rgb(image), resized, box)
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if mask is None:
        return to_tensor(image)
    mask = _apply(mask, resized, box)
    if flip:
        mask = mask.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return to_tensor(image), torch.from_numpy(np.asarray(mask, dtype=np.float32).copy())[None] / 255.0  # (1, H, W)


class MaskSizeError(ValueError):
    """A mask file whose size is not its image's."""


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in _ALPHA_MODES or (image.mode == "P" and "transparency" in image.info)


def latent_mask(mask: torch.Tensor, latent_size: tuple[int, int]) -> torch.Tensor:
    """A pixel mask (B, 1, H, W) in [0, 1] brought down to the latent grid (B, 1, h, w) by area averaging: a
    latent position weighs as much as the share of its pixels the mask keeps (``--masked_loss``)."""
    return torch.nn.functional.interpolate(mask.float(), size=tuple(latent_size), mode="area")
