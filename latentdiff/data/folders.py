"""Index a folder of images with captions, checking every image's header once up front.

Two conventions:

- diffusers' imagefolder: images plus ``metadata.jsonl`` (or ``metadata.csv``) whose rows name
  an image in ``file_name`` (relative to the metadata file's folder) and give its caption in
  ``text`` (or the column ``--caption_column`` names); a caption may be a list of captions.
- sd-scripts: ``photo.png`` beside ``photo.txt`` (or the ``--caption_extension`` given, e.g.
  ``.caption``); each non-empty line of the caption file is one caption.

A caption without a tag (only commas and spaces: a tagger that found nothing) is no caption: an
image whose every caption is so is skipped like one with an empty caption file, since training
it on "" would teach the unconditional model that one image (``--proportion_empty_prompts``
already decides how often the empty prompt is trained).

Sub-folders are searched; hidden files and folders are not. Images that cannot be opened or
verified, are smaller than ``min_image_size``, or have no caption are left out and counted in
the index's ``skipped`` (reported once by the caller). Nothing is decoded here but headers, so
indexing is cheap; a file that passes the header check and still fails to decode (a truncated
JPEG) is caught when it is loaded.
"""

from __future__ import annotations

import csv
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from latentdiff.data.captions import tags
from latentdiff.data.dataset import SkipLog
from latentdiff.data.files import digest

IMAGE_EXTENSIONS = frozenset(
    ".png .jpg .jpeg .jpe .jfif .webp .bmp .gif .tif .tiff .ppm .pgm .pbm .pnm .tga".split()
)
CAPTION_EXTENSIONS = (".txt", ".caption")  # the usual ones, named when an image has another than the one asked for
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
MASK_SUFFIX = "_mask"  # photo.png + photo_mask.png: the loss mask of --masked_loss
MASK_EXTENSIONS = (".png", ".webp", ".bmp", ".tif", ".tiff", ".jpg", ".jpeg")
_EXIF_ORIENTATION = 0x0112
_EXIF_SUFFIXES = frozenset(".jpg .jpeg .jpe .jfif .tif .tiff .webp".split())  # where cameras write an orientation
IMAGE_COLUMN = "image"
TEXT_COLUMN = "text"


@dataclass
class FolderIndex:
    root: Path
    kind: str  # "imagefolder" or "captioned images"
    paths: list[str]  # absolute
    captions: list[list[str]]
    skipped: SkipLog
    fingerprint: str
    sizes: list[tuple[int, int]]  # each image's upright (width, height), read from its header
    masks: list[str | None]  # each image's mask file (photo_mask.png beside photo.png), for --masked_loss


def walk(root: Path) -> list[Path]:
    """Every file under ``root``, sorted, hidden ones (and those in hidden folders) left out."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(Path(folder) / f for f in sorted(files) if not f.startswith("."))
    return found


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def has_metadata(root: Path) -> bool:
    return any(path.name in METADATA_FILES for path in walk(root))


def as_captions(value) -> list[str]:
    """A caption cell (str, list of str, None, ...) as a list of captions with at least one tag."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value.strip()] if tags(value) else []
    if isinstance(value, (list, tuple)):
        return [c for item in value for c in as_captions(item)]
    return [str(value)]


def check_image(path: Path, min_image_size: int = 0) -> tuple[tuple[str, str] | None, tuple[int, int] | None]:
    """``(None, (width, height))`` for an image that opens and verifies (its size upright, EXIF orientation
    applied), else ``((reason, detail), None)``. Headers only: ``verify`` checks a PNG's chunk checksums but
    does not decode pixels."""
    try:
        if path.stat().st_size == 0:
            return ("empty file", ""), None
        with Image.open(path) as image:
            size = image.size
            image.verify()
        if path.suffix.lower() in _EXIF_SUFFIXES:  # verify must come first; a second open reads the orientation
            with Image.open(path) as image:
                if image.getexif().get(_EXIF_ORIENTATION, 1) in (5, 6, 7, 8):  # a quarter turn
                    size = size[::-1]
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        return ("unreadable image", f"{type(error).__name__}: {error}"), None
    if min(size) < min_image_size:
        return ("too small", f"{size[0]}x{size[1]} < --min_image_size {min_image_size}"), None
    return None, size


def _check_all(paths: list[Path], min_image_size: int) -> list[tuple[tuple[str, str] | None, tuple[int, int] | None]]:
    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) + 2)) as pool:
        return list(pool.map(lambda p: check_image(p, min_image_size), paths))


def mask_file(path: Path) -> Path | None:
    """The mask beside an image (``photo_mask.png`` for ``photo.jpg``; any image extension), or None."""
    return next((m for m in (path.with_name(f"{path.stem}{MASK_SUFFIX}{e}") for e in MASK_EXTENSIONS) if m.is_file()), None)


def is_mask_file(path: Path) -> bool:
    """``photo_mask.png`` beside an image ``photo.*``: a mask, not a training image."""
    if not path.stem.endswith(MASK_SUFFIX) or not is_image_file(path):
        return False
    stem = path.stem[: -len(MASK_SUFFIX)]
    return any(path.with_name(stem + e).is_file() for e in IMAGE_EXTENSIONS if path.with_name(stem + e) != path)


def _read_metadata(path: Path) -> list[dict]:
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}, line {number}: not valid JSON ({error})") from error
    return rows


def _check_columns(root: Path, kind: str, columns: list[str], image_column: str, caption_column: str | None) -> None:
    for flag, column in (("--image_column", image_column), ("--caption_column", caption_column)):
        if column and column not in columns:
            raise ValueError(
                f"{flag} {column!r} is not a column of {root} ({kind}); its columns are: {', '.join(columns)}"
            )


def index_imagefolder(root: Path, image_column: str = IMAGE_COLUMN, caption_column: str | None = TEXT_COLUMN,
                      min_image_size: int = 0) -> FolderIndex:
    """Index a diffusers imagefolder (images + metadata.jsonl/.csv with ``file_name``)."""
    files = walk(root)
    entries: dict[Path, list] = {}
    columns = [IMAGE_COLUMN]
    skipped = SkipLog(str(root))
    for metadata in (f for f in files if f.name in METADATA_FILES):
        for row in _read_metadata(metadata):
            if "file_name" not in row:
                raise ValueError(f"{metadata}: a row without 'file_name' (it has {', '.join(row)})")
            columns.extend(c for c in row if c not in columns)
            entries.setdefault((metadata.parent / row["file_name"]).resolve(), []).append(row)
    _check_columns(root, "imagefolder", columns, image_column, caption_column)

    images = [f.resolve() for f in files if is_image_file(f) and not is_mask_file(f)]
    listed = [p for p in images if p in entries]
    for path in images:
        if path not in entries:
            skipped.add(str(path), "not in metadata")
    for path in entries:
        if not path.exists():
            skipped.add(str(path), "listed in metadata but missing")
    pairs = [(path, row) for path in listed for row in entries[path]]
    return _finish(root, "imagefolder", pairs, lambda row: row.get(caption_column), caption_column,
                   min_image_size, skipped)


def index_captioned_images(root: Path, image_column: str = IMAGE_COLUMN, caption_column: str | None = TEXT_COLUMN,
                           min_image_size: int = 0, caption_extension: str | None = None) -> FolderIndex:
    """Index images with same-named ``caption_extension`` captions (the sd-scripts convention); without one,
    ``photo.txt``, else ``photo.caption``."""
    # sd-scripts takes "caption" for ".caption" too
    extensions = CAPTION_EXTENSIONS if caption_extension is None else ("." + caption_extension.lstrip("."),)
    extension = " or ".join(extensions)
    _check_columns(root, f"images with {extension} captions", [IMAGE_COLUMN, TEXT_COLUMN], image_column, caption_column)

    def read_caption(path: Path) -> list[str] | None:
        caption_file = next((path.with_suffix(e) for e in extensions if path.with_suffix(e).is_file()), None)
        if caption_file is None:
            return None
        text = caption_file.read_text(encoding="utf-8", errors="replace")
        return [line.strip() for line in text.splitlines() if line.strip()]

    def why_none(path: Path) -> str:
        others = [e for e in CAPTION_EXTENSIONS if e not in extensions and path.with_suffix(e).is_file()]
        return f"no {extension} file" + (f"; found {path.with_suffix(others[0]).name}: "
                                          f"pass --caption_extension {others[0]}" if others else "")

    pairs = [(path, path) for path in walk(root) if is_image_file(path) and not is_mask_file(path)]
    return _finish(root, "captioned images", pairs, read_caption, caption_column, min_image_size, SkipLog(str(root)),
                   why_none)


def _finish(root, kind, pairs, get_caption, caption_column, min_image_size, skipped,
            why_none=lambda source: "") -> FolderIndex:
    paths, captions, stats, sizes, masks = [], [], [], [], []
    checked = _check_all([path for path, _ in pairs], min_image_size)
    for (path, source), (problem, size) in zip(pairs, checked, strict=True):
        if problem is not None:
            skipped.add(str(path), *problem)
            continue
        if caption_column:
            value = get_caption(source)
            texts = as_captions(value)
            if not texts:
                if value is None:
                    skipped.add(str(path), "no caption", why_none(source))
                else:
                    lines = [value] if isinstance(value, str) else value if isinstance(value, (list, tuple)) else []
                    written = any(isinstance(line, str) and line.strip() for line in lines)
                    skipped.add(str(path), "empty caption", "only commas" if written else "")
                continue
        else:
            texts = [""]
        stat = path.stat()
        mask = mask_file(path)
        paths.append(str(path))
        captions.append(texts)
        sizes.append(size)
        masks.append(None if mask is None else str(mask))
        mask_stat = None if mask is None else (mask.name, mask.stat().st_size, mask.stat().st_mtime_ns)
        stats.append((os.path.relpath(path, root), stat.st_size, stat.st_mtime_ns) + ((mask_stat,) if mask else ()))
    fingerprint = digest(kind, str(Path(root).resolve()), stats, captions, min_image_size)
    return FolderIndex(Path(root), kind, paths, captions, skipped, fingerprint, sizes, masks)
