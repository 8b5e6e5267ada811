"""``latentdiff prepare SOURCE OUTPUT_DIR``: a dataset written as WebDataset tar shards with an index of image sizes.

SOURCE is anything ``--dataset_name`` takes for user data (a folder of images with captions, an imagefolder,
a ``save_to_disk`` folder, parquet/arrow files, a datasets name), read through
:func:`~latentdiff.data.loaders.build_dataset` with the same data flags, so the same images are kept and
skipped, with the same captions, as training on SOURCE directly would. Written:

- ``OUTPUT_DIR/shard-00000.tar ...``: one sample per item, keyed by its number: the image file's bytes as
  stored (a JPEG stays that JPEG), ``txt`` its caption, or ``json`` a list when it has several;
- ``OUTPUT_DIR/index.json``: per sample its key, shard, byte offset and upright width and height, per shard
  its name, count and size, and the total count;
- ``OUTPUT_DIR/validation/``: the same for the items build_dataset holds out of SOURCE as its validation
  split (none when SOURCE is too small to hold any out: training and validation are then both all of it).

Every file is written under a temporary name and renamed, ``OUTPUT_DIR/index.json`` last of all: a folder
with it is complete.

Items are written in an order drawn from ``--seed``: a shuffle buffer mixes only nearby samples, so shards
written in a folder's sorted order (often one subject after another) would train badly.

Training then reads ``--train_data_dir OUTPUT_DIR`` (or a brace pattern of its shards, ``--dataset_name``);
see :mod:`latentdiff.data.shards`.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import re
from pathlib import Path

import numpy as np
from PIL import Image
from webdataset import TarWriter

from latentdiff.data.args import BUILTIN_DATASETS
from latentdiff.data.dataset import ImageCaptionDataset
from latentdiff.data.files import atomic_path
from latentdiff.data.shards import INDEX_FILE, INDEX_FORMAT, VALIDATION_DIR

logger = logging.getLogger(__name__)

DEFAULT_SHARD_SIZE = "1000"
_EXIF_ORIENTATION = 0x0112
_SIDEWAYS = {5, 6, 7, 8}  # EXIF orientations that swap width and height
_FORMAT_SUFFIX = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tif"}


def parse_shard_size(text: str) -> tuple[int | None, int | None]:
    """``--shard_size``: ``N`` items a shard, or ``N MB`` / ``N GB`` a shard: (items, bytes), one of them None."""
    match = re.fullmatch(r"\s*(\d+)\s*(MB|GB|M|G)?\s*", text, re.IGNORECASE)
    if not match or int(match.group(1)) < 1:
        raise ValueError(
            f"--shard_size must be a positive number of items (1000) or of megabytes (500MB), got {text!r}"
        )
    number, unit = int(match.group(1)), (match.group(2) or "").upper()[:1]
    if not unit:
        return number, None
    return None, number * (1 << 20 if unit == "M" else 1 << 30)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="latentdiff prepare",
        description="Write a dataset as WebDataset tar shards with an index of image sizes.",
    )
    parser.add_argument(
        "source",
        help="a folder (images + .txt captions, or an imagefolder), a save_to_disk folder, "
        "a parquet/arrow file, or a datasets name",
    )
    parser.add_argument("output_dir", help="an empty or new folder for shard-NNNNN.tar and index.json")
    parser.add_argument(
        "--shard_size",
        default=DEFAULT_SHARD_SIZE,
        help=f"items a shard (default {DEFAULT_SHARD_SIZE}), or megabytes a shard: 500MB",
    )
    parser.add_argument("--dataset_config_name", default=None, help="the configuration of a datasets name")
    parser.add_argument("--image_column", default="image", help="the column holding the images")
    parser.add_argument(
        "--caption_column",
        default="text",
        help="the column holding the captions; '' for images alone (their samples get no caption)",
    )
    parser.add_argument(
        "--max_train_samples", type=int, default=None, help="write a fixed random subset of this many items"
    )
    parser.add_argument(
        "--min_image_size", type=int, default=0, help="leave out images whose shorter side is below this"
    )
    parser.add_argument(
        "--caption_extension",
        default=None,
        help="the extension of the caption file beside each image; default: .txt, else .caption",
    )
    parser.add_argument("--seed", type=int, default=0, help="draws the order items are written in")
    return parser


def prepare(args: argparse.Namespace) -> dict:
    """Write the shards of ``args.source`` into ``args.output_dir`` (see the module docstring); returns
    ``{"train": count, "validation": count}``."""
    from latentdiff.data.loaders import build_dataset

    if args.source in BUILTIN_DATASETS:
        raise ValueError(
            f"{args.source} is built in: train on it directly (--dataset_name {args.source}); "
            "a local folder of that name must be given as a path: ./" + args.source
        )
    items, max_bytes = parse_shard_size(args.shard_size)
    out = Path(args.output_dir).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} exists and is not an empty folder: give a new one")
    data_args = argparse.Namespace(
        **{**vars(args), "dataset_name": args.source, "train_data_dir": None, "resolution": 1}
    )
    captions = bool(args.caption_column)
    train = build_dataset(data_args, "train", captions=captions)
    validation = build_dataset(data_args, "validation", captions=captions)
    for dataset in (train, validation):
        if not isinstance(dataset, ImageCaptionDataset):
            raise ValueError(
                f"{dataset.name} has no stored image files to write; give a folder or a datasets dataset"
            )
    written = {"validation": 0}
    if validation.name != train.name:  # a split of its own, or items held out (a small source holds none)
        written["validation"] = write_shards(
            validation, out / VALIDATION_DIR, items, max_bytes, captions, args.seed
        )
    # the training index last of all: a folder with it is complete, validation/ included
    written["train"] = write_shards(train, out, items, max_bytes, captions, args.seed)
    return written


def write_shards(
    dataset: ImageCaptionDataset,
    folder: Path,
    items: int | None,
    max_bytes: int | None,
    captions: bool,
    seed: int,
) -> int:
    """Write ``dataset``'s items as shards of ``items`` samples (or at most ``max_bytes``, but at least one
    sample) and, last, the index; returns how many were written."""
    folder.mkdir(parents=True, exist_ok=True)
    index = {"key": [], "shard": [], "offset": [], "width": [], "height": []}
    shards = []
    samples = _samples(dataset, np.random.default_rng(seed).permutation(len(dataset)), captions)
    pending = next(samples, None)
    while pending is not None:
        name = f"shard-{len(shards):05d}.tar"
        with atomic_path(folder / name) as tmp, open(tmp, "wb") as file:
            writer, count = TarWriter(file, encoder=False, mtime=0), 0
            while pending is not None and not (
                count == items or (count and max_bytes and writer.tarstream.offset + pending[1] > max_bytes)
            ):
                sample, _, width, height = pending
                for field, value in (("key", sample["__key__"]), ("shard", len(shards)), ("offset", writer.tarstream.offset),
                                     ("width", width), ("height", height)):  # fmt: skip
                    index[field].append(value)
                writer.write(sample)
                count, pending = count + 1, next(samples, None)
            end = writer.tarstream.offset
            writer.close()  # the end-of-archive blocks; the file itself closes, then is renamed into place
        shards.append({"name": name, "count": count, "end": end, "bytes": (folder / name).stat().st_size})
    dataset.skipped.report()
    if not index["key"]:
        raise ValueError(f"{dataset.name}: no item could be written")
    with atomic_path(folder / INDEX_FILE) as tmp:
        tmp.write_text(
            json.dumps(
                {
                    "format": INDEX_FORMAT,
                    "count": len(index["key"]),
                    "captions": captions,
                    "shards": shards,
                    **index,
                }
            )
        )
    logger.info("%s: %d items in %d shards in %s", dataset.name, len(index["key"]), len(shards), folder)
    return len(index["key"])


def _samples(dataset: ImageCaptionDataset, order: np.ndarray, captions: bool):
    """(sample, bytes, width, height) for the items of ``dataset`` in ``order``, numbered in that order."""
    written = 0
    for position in order:
        row = int(dataset._rows[position])
        try:
            data, suffix = _stored_image(dataset.images[row], dataset.root)
            width, height = _upright_size(data)
        # an unreadable cell of a datasets table (a folder's images were checked when it was indexed)
        except Exception as error:
            dataset.skipped.add(
                dataset._describe(row), "unreadable image", f"{type(error).__name__}: {error}"
            )
            continue
        sample = {"__key__": f"{written:09d}", suffix: data}
        if captions:
            texts = dataset.row_captions[row]
            sample.update(
                {"txt": texts[0].encode()} if len(texts) == 1 else {"json": json.dumps(texts).encode()}
            )
        written += 1
        yield sample, len(data), width, height


def _stored_image(source, root: str | None) -> tuple[bytes, str]:
    """The bytes of an image as stored, and the suffix its sample key gets (jpg, png, ...)."""
    path = None
    if isinstance(source, dict):  # a datasets.Image cell
        data, path = source.get("bytes"), source.get("path")
        if data is None:
            source = path
    if isinstance(source, str):
        path = Path(source) if root is None or Path(source).is_absolute() else Path(root) / source
        data = path.read_bytes()
    if not isinstance(data, (bytes, bytearray)):
        raise TypeError(f"cannot write a {type(source).__name__} as an image file")
    suffix = Path(path).suffix.lower().lstrip(".") if path else ""
    if not suffix:
        with Image.open(io.BytesIO(data)) as image:
            suffix = _FORMAT_SUFFIX.get(image.format, (image.format or "img").lower())
    return bytes(data), suffix


def _upright_size(data: bytes) -> tuple[int, int]:
    """(width, height) as training sees the image: after its EXIF orientation (headers only, nothing decoded)."""
    with Image.open(io.BytesIO(data)) as image:
        width, height = image.size
        sideways = image.getexif().get(_EXIF_ORIENTATION, 1) in _SIDEWAYS
    return (height, width) if sideways else (width, height)


def main(argv: list[str] | None = None) -> int:
    """``latentdiff prepare``: raises ValueError / FileNotFoundError for the command to report in one line."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(format="%(message)s", level=logging.WARNING)
    logging.getLogger("latentdiff").setLevel(logging.INFO)
    written = prepare(args)
    print(
        f"{args.output_dir}: {written['train']} training items"
        + (f", {written['validation']} held out in {VALIDATION_DIR}/" if written["validation"] else "")
    )
    return 0
