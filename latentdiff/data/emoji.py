"""emoji: the Noto Color Emoji glyphs on white, captioned with their English names.

Images come from the installed font (Debian: ``apt-get install fonts-noto-color-emoji``;
elsewhere set ``LATENTDIFF_EMOJI_FONT`` to a NotoColorEmoji.ttf). Captions are the ``emoji``
package's English name (":cat_face:" -> "cat face") with its aliases as extra captions.

Kept: fully-qualified emoji that render as one glyph as wide as a single-codepoint emoji
(sequences the font does not know fall apart into several glyphs, emoji newer than the font
render as nothing). Emoji whose images are identical (flags shared by several territories,
skin tones the font ignores) become one item with all their names as captions, so no image
sits in both splits. With Debian 12's font (2.042) and emoji 2.16 that is 3,771 images.

Rendered once per resolution into ``<cache dir>/emoji/`` as one safetensors file (uint8
images + captions in its metadata), written to a temporary name and renamed, so a concurrent
process never reads half a file. Held out (the validation split): every 20th emoji sorted by
its first caption.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import emoji as emoji_names
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, features
from safetensors import safe_open
from safetensors.numpy import save_file

from latentdiff.data.dataset import CaptionedImageDataset
from latentdiff.data.files import atomic_path, default_cache_dir, digest, file_digest

logger = logging.getLogger(__name__)

FONT_ENV = "LATENTDIFF_EMOJI_FONT"
FONT_PATHS = (
    "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf",  # Debian, Ubuntu
    "/usr/share/fonts/noto/NotoColorEmoji.ttf",  # Arch
    "/usr/share/fonts/google-noto-color-emoji-fonts/NotoColorEmoji.ttf",  # Fedora
    "/usr/share/fonts/truetype/noto-color-emoji/NotoColorEmoji.ttf",
)
INSTALL_HINT = "apt-get install fonts-noto-color-emoji"
FONT_SIZE = 109  # the only size of the font's color bitmaps (CBDT); Pillow refuses others
VALIDATION_EVERY = 20
VERSION = 1  # bump when rendering changes


def find_font() -> Path:
    """The Noto Color Emoji font: ``$LATENTDIFF_EMOJI_FONT`` or a system location."""
    candidates = [os.environ[FONT_ENV]] if os.environ.get(FONT_ENV) else list(FONT_PATHS)
    for candidate in candidates:
        if os.path.isfile(candidate):
            return Path(candidate)
    raise FileNotFoundError(
        f"the emoji dataset needs the Noto Color Emoji font, which is not installed (looked in "
        f"{', '.join(candidates)}). Install it with `{INSTALL_HINT}` (Debian/Ubuntu), or set "
        f"{FONT_ENV}=/path/to/NotoColorEmoji.ttf"
    )


def caption_of(name: str) -> str:
    """ ":cat_face:" -> "cat face" """
    return name.strip(":").replace("_", " ")


def _emoji_captions() -> list[tuple[str, list[str]]]:
    """(emoji, [name, *aliases]) for every fully-qualified emoji, in the package's order."""
    table = []
    for char, data in emoji_names.EMOJI_DATA.items():
        if data["status"] != emoji_names.STATUS["fully_qualified"]:
            continue
        captions: list[str] = []
        for i, name in enumerate([data["en"], *data.get("alias", [])]):
            text = caption_of(name)
            # two-letter aliases are country codes ("es"), no use as captions
            if (i == 0 or len(text) > 2) and text.lower() not in (c.lower() for c in captions):
                captions.append(text)
        table.append((char, captions))
    return table


def _layout_engine():
    if features.check("raqm"):
        return ImageFont.Layout.RAQM
    logger.warning(
        "Pillow has no RAQM text layout here, so multi-codepoint emoji (flags, ZWJ sequences, "
        "skin tones) fall apart and are dropped; install libraqm0 and libfribidi0 for all of them"
    )
    return ImageFont.Layout.BASIC


def render_emoji(resolution: int, font_path: str | os.PathLike | None = None) -> tuple[np.ndarray, list[list[str]]]:
    """Render every single-glyph emoji: (N, R, R, 3) uint8 images on white and their captions."""
    font = ImageFont.truetype(str(font_path or find_font()), FONT_SIZE, layout_engine=_layout_engine())
    left, top, right, bottom = font.getbbox("\N{GRINNING FACE}")
    glyph_width, side = right - left, max(right - left, bottom - top)

    groups: dict[bytes, tuple[np.ndarray, list[str]]] = {}
    for char, captions in _emoji_captions():
        left, top, right, bottom = font.getbbox(char)
        if right - left != glyph_width or bottom <= top:
            continue
        glyph = Image.new("RGBA", (side, side), (255, 255, 255, 0))
        ImageDraw.Draw(glyph).text((-left, (side - (bottom - top)) // 2 - top), char, font=font, embedded_color=True)
        if glyph.getbbox() is None:  # newer than the font: renders as nothing
            continue
        image = Image.new("RGB", (side, side), (255, 255, 255))
        image.paste(glyph, mask=glyph.getchannel("A"))
        pixels = np.asarray(image.resize((resolution, resolution), Image.Resampling.LANCZOS))
        key = pixels.tobytes()
        if key in groups:
            groups[key][1].extend(c for c in captions if c not in groups[key][1])
        else:
            groups[key] = (pixels, list(captions))
    items = sorted(groups.values(), key=lambda item: item[1][0].lower())
    if not items:
        raise RuntimeError(f"no emoji rendered from {font_path or find_font()}; is it Noto Color Emoji?")
    return np.stack([pixels for pixels, _ in items]), [captions for _, captions in items]  # (N, R, R, 3)


def load_emoji(resolution: int, cache_dir: str | os.PathLike | None = None) -> tuple[np.ndarray, list[list[str]], str]:
    """The rendered emoji at ``resolution`` and their captions, from the disk cache or rendered and
    cached now; the third value is the cache key (font file, emoji package and code versions)."""
    font = find_font()
    key = digest(VERSION, file_digest(font), emoji_names.__version__, features.check("raqm"))
    path = Path(cache_dir or default_cache_dir()) / "emoji" / f"emoji-{key}-{resolution}px.safetensors"
    if path.exists():
        with safe_open(path, framework="np") as f:
            return f.get_tensor("images"), json.loads(f.metadata()["captions"]), key
    logger.info("rendering the emoji dataset at %d px into %s (once)", resolution, path)
    images, captions = render_emoji(resolution, font)
    with atomic_path(path) as tmp:
        save_file({"images": images}, tmp, metadata={"captions": json.dumps(captions)})
    return images, captions, key


class EmojiDataset(CaptionedImageDataset):
    """The emoji dataset at ``resolution`` px; ``split`` is "train" or "validation" (every 20th)."""

    def __init__(self, resolution: int = 64, split: str = "train", cache_dir: str | os.PathLike | None = None,
                 random_flip: bool = False):
        if split not in ("train", "validation"):
            raise ValueError(f"emoji has the splits 'train' and 'validation', not {split!r}")
        images, captions, key = load_emoji(resolution, cache_dir)
        held_out = np.arange(len(captions)) % VALIDATION_EVERY == VALIDATION_EVERY - 1
        self.images = images
        self.row_captions = captions
        super().__init__(name=f"emoji/{split}", num_rows=len(captions), resolution=resolution,
                         fingerprint=digest("emoji", key, split),
                         random_flip=random_flip)
        self._rows = np.flatnonzero(held_out if split == "validation" else ~held_out)

    def _row_image(self, row: int, flip: bool, generator: torch.Generator | None = None) -> torch.Tensor:
        pixels = self.images[row]  # (R, R, 3)
        if flip:
            pixels = pixels[:, ::-1]
        return torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1).float().div_(127.5).sub_(1.0)

    def _row_captions(self, row: int) -> list[str]:
        return self.row_captions[row]
