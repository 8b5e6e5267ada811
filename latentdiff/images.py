"""Image grids and PNG files: what training, the demo and `latentdiff generate` write for people to look at."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.PngImagePlugin
import torch

SETTINGS_KEY = "latentdiff"  # the PNG text chunk that holds an image's generation settings, as JSON


def to_pil(images) -> list[PIL.Image.Image]:
    """PIL images from a list of PIL images, an (N, H, W, 3) array in [0, 1] or an (N, 3, H, W) tensor in [-1, 1]."""
    if isinstance(images, torch.Tensor):
        images = ((images.detach().float().cpu().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()  # (N, H, W, 3)
    if isinstance(images, np.ndarray):
        return [PIL.Image.fromarray((image * 255).round().clip(0, 255).astype(np.uint8)) for image in images]
    return list(images)


def image_grid(images, ncols: int | None = None, pad: int = 2) -> PIL.Image.Image:
    """Images laid out row by row, ``ncols`` to a row, on a white background."""
    images = to_pil(images)
    if not images:
        raise ValueError("image_grid needs at least one image")
    ncols = ncols or math.ceil(math.sqrt(len(images)))
    nrows = math.ceil(len(images) / ncols)
    w, h = images[0].size
    grid = PIL.Image.new("RGB", (ncols * (w + pad) + pad, nrows * (h + pad) + pad), "white")
    for i, image in enumerate(images):
        row, col = divmod(i, ncols)
        grid.paste(image.convert("RGB"), (pad + col * (w + pad), pad + row * (h + pad)))
    return grid


def save_png(image: PIL.Image.Image, path: str | Path, metadata: dict | None = None) -> Path:
    """Write a PNG atomically (a reader never sees half a file), with ``metadata`` as text chunks."""
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot write {str(path)!r}: the folder {str(path.parent)!r} does not exist")
    info = PIL.PngImagePlugin.PngInfo()
    for key, value in (metadata or {}).items():
        info.add_text(str(key), str(value))
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format="PNG", pnginfo=info)
    os.replace(tmp, path)
    return path


def settings_text(settings: dict) -> dict[str, str]:
    """The PNG text chunks (``save_png``'s metadata) that carry an image's generation settings: what
    `latentdiff generate` and `latentdiff serve` write, and ``read_settings`` reads back."""
    return {SETTINGS_KEY: json.dumps(settings)}


def read_settings(image: PIL.Image.Image) -> dict | None:
    """The generation settings a PNG carries (``settings_text``), or None when it carries none."""
    text = getattr(image, "text", None) or image.info
    if SETTINGS_KEY not in text:
        return None
    try:
        settings = json.loads(text[SETTINGS_KEY])
    except json.JSONDecodeError as error:
        raise ValueError(f"the image's {SETTINGS_KEY!r} text is not JSON: {error}") from None
    if not isinstance(settings, dict):
        raise ValueError(f"the image's {SETTINGS_KEY!r} text is not a JSON object of settings")
    return settings
