"""emoji: the Noto Color Emoji glyphs on white, captioned with their English names; emojione: the same
emoji drawn by EmojiOne, a second style; emoji+emojione: both.

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

EmojiOne (``emojione``) comes from Debian's ``ruby-gemojione`` (``apt-get install ruby-gemojione``;
elsewhere set ``LATENTDIFF_EMOJIONE_DIR`` to a folder with ``config/index.json`` and ``assets/png/``):
1,794 PNGs of 64 px, CC-BY-SA-4.0, put on white. An image is captioned with the ``emoji`` package's
names of its character, as Noto's (so "cat face" names both styles), then EmojiOne's own name when
it differs. Alone, ``emojione`` holds out every 20th of its images sorted by first caption. In
``emoji+emojione`` the split follows the emoji: an EmojiOne image goes to the split of the Noto
emoji of its name (matched by Noto's names first, then by their aliases), and the rest (emoji Noto
lacks) are split every 20th, so a held-out emoji is trained in neither style and
``latentdiff eval --dataset emoji`` stays a held-out measure.
"""

from __future__ import annotations

import glob
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

EMOJIONE_ENV = "LATENTDIFF_EMOJIONE_DIR"
EMOJIONE_PATHS = ("/usr/share/rubygems-integration/all/gems/gemojione-*",)  # Debian, Ubuntu: ruby-gemojione
EMOJIONE_HINT = "apt-get install ruby-gemojione"
EMOJIONE_VERSION = 1  # bump when its preparation changes
# the built-in emoji datasets and the styles each is made of, in order
DATASET_STYLES = {"emoji": ("noto",), "emojione": ("emojione",), "emoji+emojione": ("noto", "emojione")}


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


def find_emojione() -> Path:
    """EmojiOne's folder (``config/index.json``, ``assets/png/``): ``$LATENTDIFF_EMOJIONE_DIR`` or ruby-gemojione's."""
    patterns = [os.environ[EMOJIONE_ENV]] if os.environ.get(EMOJIONE_ENV) else list(EMOJIONE_PATHS)
    for pattern in patterns:
        for candidate in sorted(glob.glob(pattern), reverse=True):  # the newest version first
            if os.path.isfile(os.path.join(candidate, "config", "index.json")):
                return Path(candidate)
    raise FileNotFoundError(
        f"the emojione dataset needs the EmojiOne images, which are not installed (looked for config/index.json "
        f"in {', '.join(patterns)}). Install them with `{EMOJIONE_HINT}` (Debian/Ubuntu), or set "
        f"{EMOJIONE_ENV}=/path/to/gemojione (a folder with config/index.json and assets/png/)"
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
        _add(groups, np.asarray(image.resize((resolution, resolution), Image.Resampling.LANCZOS)), captions)
    return _sorted(groups, f"no emoji rendered from {font_path or find_font()}; is it Noto Color Emoji?")


def _add(groups: dict, pixels: np.ndarray, captions: list[str]) -> None:
    """One image into ``groups``: identical images become one item with all their captions."""
    key = pixels.tobytes()
    if key in groups:
        groups[key][1].extend(c for c in captions if c not in groups[key][1])
    else:
        groups[key] = (pixels, list(captions))


def _sorted(groups: dict, empty: str) -> tuple[np.ndarray, list[list[str]]]:
    """The grouped images (N, R, R, 3) and their captions, sorted by first caption."""
    items = sorted(groups.values(), key=lambda item: item[1][0].lower())
    if not items:
        raise RuntimeError(empty)
    return np.stack([pixels for pixels, _ in items]), [captions for _, captions in items]


def render_emojione(resolution: int, root: str | os.PathLike | None = None) -> tuple[np.ndarray, list[list[str]]]:
    """Every EmojiOne PNG on white at ``resolution`` px (N, R, R, 3) uint8, and its captions."""
    root = Path(root or find_emojione())
    names: dict[str, list[str]] = {}
    for char, captions in _emoji_captions():  # EmojiOne often writes an emoji without its U+FE0F
        names[char] = captions
        names.setdefault(char.replace("\ufe0f", ""), captions)
    groups: dict[bytes, tuple[np.ndarray, list[str]]] = {}
    for entry in json.loads((root / "config" / "index.json").read_text(encoding="utf-8")).values():
        char = entry["moji"]
        captions = list(names.get(char) or names.get(char.replace("\ufe0f", ""), []))
        own = caption_of(entry["name"])
        if own.lower() not in (c.lower() for c in captions):
            captions.append(own)
        path = root / "assets" / "png" / f"{entry['unicode']}.png"
        try:
            with Image.open(path) as png:
                glyph = png.convert("RGBA")
        except (OSError, ValueError) as error:
            raise RuntimeError(f"{path}: not a readable PNG ({error}); reinstall with `{EMOJIONE_HINT}`") from error
        image = Image.new("RGB", glyph.size, (255, 255, 255))
        image.paste(glyph, mask=glyph.getchannel("A"))
        _add(groups, np.asarray(image.resize((resolution, resolution), Image.Resampling.LANCZOS)), captions)
    return _sorted(groups, f"no EmojiOne images in {root / 'assets' / 'png'}")


def load_emoji(resolution: int, cache_dir: str | os.PathLike | None = None,
               style: str = "noto") -> tuple[np.ndarray, list[list[str]], str]:
    """The emoji of ``style`` ("noto" or "emojione") at ``resolution`` and their captions, from the disk cache or
    prepared and cached now; the third value is the cache key (source files, emoji package and code versions)."""
    if style == "noto":
        source = find_font()
        key = digest(VERSION, file_digest(source), emoji_names.__version__, features.check("raqm"))
        name, prepare = "emoji", render_emoji
    elif style == "emojione":
        source = find_emojione()
        key = digest(EMOJIONE_VERSION, file_digest(source / "config" / "index.json"), emoji_names.__version__)
        name, prepare = "emojione", render_emojione
    else:
        raise ValueError(f"emoji styles are 'noto' and 'emojione', not {style!r}")
    path = Path(cache_dir or default_cache_dir()) / "emoji" / f"{name}-{key}-{resolution}px.safetensors"
    if path.exists():
        with safe_open(path, framework="np") as f:
            return f.get_tensor("images"), json.loads(f.metadata()["captions"]), key
    logger.info("preparing the %s dataset at %d px into %s (once)", name, resolution, path)
    images, captions = prepare(resolution, source)
    with atomic_path(path) as tmp:
        save_file({"images": images}, tmp, metadata={"captions": json.dumps(captions)})
    return images, captions, key


def every_20th(captions: list[list[str]]) -> np.ndarray:
    """The held-out rule of one style alone: every 20th item (they are sorted by first caption)."""
    return np.arange(len(captions)) % VALIDATION_EVERY == VALIDATION_EVERY - 1


def held_out_with(captions: list[list[str]], first: list[list[str]], first_held_out: np.ndarray) -> np.ndarray:
    """Which of ``captions``' items to hold out beside the first style's items: an item goes where the first style's
    emoji of its name (first caption) went, matched by that emoji's name or else by one of its other captions; the
    rest (emoji the first style lacks) are split every 20th."""
    split_of = {}
    for item, out in zip(first, first_held_out, strict=True):
        for caption in item[1:]:
            split_of.setdefault(caption.lower(), bool(out))
    split_of.update((item[0].lower(), bool(out)) for item, out in zip(first, first_held_out, strict=True))
    matched = np.array([item[0].lower() in split_of for item in captions], dtype=bool)
    out = np.array([split_of.get(item[0].lower(), False) for item in captions], dtype=bool)
    rest = np.flatnonzero(~matched)
    out[rest[every_20th([captions[i] for i in rest])]] = True
    return out


class EmojiDataset(CaptionedImageDataset):
    """A built-in emoji dataset (``name``: "emoji", "emojione" or "emoji+emojione") at ``resolution`` px;
    ``split`` is "train" or "validation" (every 20th emoji, kept apart across styles: the module's doc)."""

    def __init__(self, resolution: int = 64, split: str = "train", cache_dir: str | os.PathLike | None = None,
                 random_flip: bool = False, name: str = "emoji"):
        if split not in ("train", "validation"):
            raise ValueError(f"{name} has the splits 'train' and 'validation', not {split!r}")
        if name not in DATASET_STYLES:
            raise ValueError(f"the built-in emoji datasets are {', '.join(DATASET_STYLES)}, not {name!r}")
        parts = [load_emoji(resolution, cache_dir, style) for style in DATASET_STYLES[name]]
        images, captions, key = parts[0]
        held_out = every_20th(captions)
        for more_images, more_captions, more_key in parts[1:]:
            more_held_out = held_out_with(more_captions, captions, held_out)
            images, captions = np.concatenate([images, more_images]), captions + more_captions
            held_out, key = np.concatenate([held_out, more_held_out]), digest(key, more_key)
        self.images = images
        self.row_captions = captions
        # for emoji the fingerprint it always had: latent caches and feature nets are keyed by it
        super().__init__(name=f"{name}/{split}", num_rows=len(captions), resolution=resolution,
                         fingerprint=digest(name, key, split), random_flip=random_flip)
        self._rows = np.flatnonzero(held_out if split == "validation" else ~held_out)

    def _row_image(self, row: int, flip: bool, generator: torch.Generator | None = None) -> torch.Tensor:
        pixels = self.images[row]  # (R, R, 3)
        if flip:
            pixels = pixels[:, ::-1]
        return torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1).float().div_(127.5).sub_(1.0)

    def _row_captions(self, row: int) -> list[str]:
        return self.row_captions[row]
