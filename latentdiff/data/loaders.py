"""``build_dataset(args, split)``: the one entry point from the data flags to a dataset.

Sources, chosen by ``--dataset_name`` / ``--train_data_dir``:

- a built-in name: ``shapes``, ``emoji``, ``emojione``, ``emoji+emojione``;
- a local folder: a ``save_to_disk`` folder, parquet/arrow files, diffusers' imagefolder
  (images + metadata.jsonl), or images with same-named .txt captions; a parquet/arrow file;
- WebDataset tar shards with the index ``latentdiff prepare`` writes: their folder, or a brace pattern
  (``shards/shard-{00000..00009}.tar``), streamed (:mod:`latentdiff.data.shards`);
- any other name goes to ``datasets.load_dataset`` (needs the Hub unless cached; fails fast
  offline).

Splits: ``"train"`` and ``"validation"``. A source with its own validation split (a
``validation``/``valid``/``val``/``test`` split, or such a sub-folder beside ``train/``) uses
it. Otherwise a fixed 2% of the items (at least 1, at most 1,000, drawn with seed 0) is held
out of ``train`` as ``validation``; a source of fewer than 50 items is too small to spare any,
so both splits are then all of it (a DreamBooth-style fine-tune needs every image).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch
from torch.utils.data import DataLoader

from latentdiff.data.args import BUILTIN_DATASETS, caption_options, resolution_of
from latentdiff.data.buckets import BucketSpec, assign, bucket_batch_sampler, global_batch, log_table
from latentdiff.data.dataset import CaptionedImageDataset, ColumnView, ImageCaptionDataset, SkipLog
from latentdiff.data.files import digest
from latentdiff.data.folders import as_captions, has_metadata, index_captioned_images, index_imagefolder, walk
from latentdiff.data.shards import ShardLoader, ShardStream, is_shard_folder, is_shard_pattern, shard_dataset

logger = logging.getLogger(__name__)

SPLITS = ("train", "validation")
VALIDATION_SPLIT_NAMES = ("validation", "valid", "val", "test")
HOLDOUT_FRACTION = 0.02
HOLDOUT_MAX = 1000
HOLDOUT_MIN_SOURCE = 50
TABLE_SUFFIXES = {".parquet": "parquet", ".arrow": "arrow"}


def build_dataset(
    args: argparse.Namespace, split: str = "train", captions: bool = True, resolution: int | None = None
) -> CaptionedImageDataset:
    """The dataset the data flags describe; items ``{"pixel_values": (3, R, R) in [-1, 1], "text": str}``,
    R = ``resolution`` (default: ``resolution_of(args)``; a fine-tune passes its model's own size).

    Everything that can be checked is checked here, before training: the source exists, the
    named columns exist, something usable is left. Bad items are skipped and reported once.

    ``captions=False`` is for a caller that never uses captions (VAE training): user data is read
    as with ``--caption_column ''``, so an image without a caption is kept, and its items have the
    text ``""``. The built-in datasets keep theirs.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not captions:
        args = argparse.Namespace(**{**vars(args), "caption_column": ""})
    name, folder = _arg(args, "dataset_name"), _arg(args, "train_data_dir")
    if not name and not folder:
        raise ValueError(
            "no data given: pass --dataset_name (a built-in: shapes, emoji, emojione, emoji+emojione; a datasets name; or a "
            "local path) or --train_data_dir (a local folder)"
        )
    resolution = resolution or resolution_of(args)
    if resolution <= 0:
        raise ValueError(f"--resolution must be positive, got {resolution}")
    options = caption_options(args)

    if name in BUILTIN_DATASETS:
        if folder:
            raise ValueError(f"--dataset_name {name} is built in; drop --train_data_dir {folder}")
        dataset = _builtin(name, split, resolution, args)
    elif name and is_shard_pattern(name):  # tar shards: a brace pattern or one .tar (latentdiff.data.shards)
        if folder:
            raise ValueError(f"give either --dataset_name {name} or --train_data_dir {folder}, not both")
        dataset = shard_dataset(name, split, resolution, args)
    elif name and not _is_local(name):
        dataset = _from_datasets(_load_hub(name, _arg(args, "dataset_config_name"), folder), split,
                                 resolution, args, source=name)
    else:
        if name and folder:
            raise ValueError(f"give either --dataset_name {name} or --train_data_dir {folder}, not both")
        flag = "--dataset_name" if name else "--train_data_dir"
        path = Path(name or folder).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"{flag} {path}: no such file or folder")
        dataset = _local(path, split, resolution, args)

    max_samples = _arg(args, "max_train_samples")
    if split == "train" and max_samples is not None:
        if max_samples <= 0:
            raise ValueError(f"--max_train_samples must be positive, got {max_samples}")
        if max_samples < len(dataset):
            keep = np.sort(np.random.default_rng(0).permutation(len(dataset))[:max_samples])
            dataset = dataset.subset(keep)
    if _arg(args, "masked_loss", False):
        if not isinstance(dataset, ImageCaptionDataset):
            raise ValueError(f"--masked_loss needs images with masks (photo.png + photo_mask.png, or an alpha channel); "
                             f"{dataset.name} has none")
        dataset.masked = True
        if dataset.masks is not None:
            with_file = sum(dataset.masks[int(row)] is not None for row in dataset._rows)
            logger.info("--masked_loss: %d of %d images have a mask file (photo_mask.png); the others are weighted by "
                        "their alpha channel, or trained whole without one", with_file, len(dataset))
    if _arg(args, "enable_bucket", False):
        dataset = bucketed(dataset, args, split)
    dataset.skipped.report()
    if len(dataset) == 0:
        raise ValueError(_nothing_left(dataset))
    dataset.seed = _arg(args, "seed", 0)
    if split == "train" and options.changes_captions:  # validation keeps its captions as written, a fixed yardstick
        dataset.caption_options = options
        options.report_short_captions((c for i in range(len(dataset)) for c in dataset.captions(i)), dataset.name)
    logger.info("%s: %d items at %d px%s", dataset.name, len(dataset), dataset.resolution,
                " (area; aspect-ratio buckets)" if dataset.bucket_targets() is not None else "")
    return dataset


def bucket_spec(args: argparse.Namespace, resolution: int) -> BucketSpec:
    return BucketSpec(resolution, _arg(args, "min_bucket_reso", 256), _arg(args, "max_bucket_reso", 1024),
                      _arg(args, "bucket_reso_steps", 64))


def bucketed(dataset: CaptionedImageDataset, args: argparse.Namespace, split: str) -> CaptionedImageDataset:
    """``dataset`` with each item cut to its aspect-ratio bucket (:mod:`latentdiff.data.buckets`); images smaller
    than the smallest bucket left out and counted. In the training split every bucket holds at least one global
    batch (batch x accumulation x processes), merging the smaller ones; the table of counts is logged."""
    spec = bucket_spec(args, dataset.resolution)
    min_count = global_batch(args)[1] if split == "train" else 1
    sizes = dataset.image_sizes()  # from headers or an index: read once
    targets, notes = assign(sizes, spec, min_count)
    small = [i for i, t in enumerate(targets) if t is None]
    if small:
        for i in small:
            dataset.skipped.add(_item_name(dataset, i), "smaller than the smallest bucket",
                                f"{sizes[i][0]}x{sizes[i][1]}: a side below --min_bucket_reso {spec.low}")
        keep = [i for i, t in enumerate(targets) if t is not None]
        name, dataset = dataset.name, dataset.subset(keep)
        dataset.name, targets = name, [targets[i] for i in keep]
    if len(dataset):
        dataset.set_buckets(targets)
        log_table(dataset.name, targets, notes)
    return dataset


def _item_name(dataset: CaptionedImageDataset, position: int) -> str:
    if isinstance(dataset, ImageCaptionDataset):
        return dataset._describe(int(dataset._rows[position]))
    return f"{dataset.name}[{position}]"


def _arg(args: argparse.Namespace, name: str, default=None):
    """Flags may be missing from a namespace a script built by hand: use the flag's default."""
    value = getattr(args, name, default)
    return default if value is None else value


def _nothing_left(dataset: CaptionedImageDataset) -> str:
    message = f"{dataset.name}: no usable items"
    counts = dataset.skipped.counts()
    if counts:
        message += " (skipped: " + ", ".join(f"{n} {reason}" for reason, n in counts.most_common()) + ")"
    hint = next((detail.split("; ")[-1] for _, _, detail in dataset.skipped.entries if "--caption_extension" in detail), None)
    if hint:
        message += f". {hint[0].upper()}{hint[1:]}"
    elif counts.get("no caption"):
        message += (". Give each image a caption (photo.png + photo.txt, or metadata.jsonl with "
                    "file_name and text), or pass --caption_column '' to train on images alone")
    return message


def _is_local(name: str) -> bool:
    return os.path.exists(os.path.expanduser(name)) or name.startswith((".", "/", "~")) or "\\" in name


# --- built-in --------------------------------------------------------------------------------


def _builtin(name: str, split: str, resolution: int, args) -> CaptionedImageDataset:
    if name == "shapes":
        from latentdiff.data.shapes import ShapesDataset

        for flag in ("random_crop", "random_flip"):
            if _arg(args, flag):
                raise ValueError(
                    f"shapes does not take --{flag}: moving or mirroring a shape changes the position its "
                    "caption names (and can make a held-out combination)"
                )
        return ShapesDataset(resolution, split)
    from latentdiff.data.emoji import EmojiDataset

    if _arg(args, "random_crop"):
        raise ValueError(f"{name} images are square already: --random_crop has nothing to crop")
    return EmojiDataset(resolution, split, cache_dir=_arg(args, "data_cache_dir"),
                        random_flip=_arg(args, "random_flip", False), name=name)


# --- local folders and files -----------------------------------------------------------------


def _local(path: Path, split: str, resolution: int, args) -> CaptionedImageDataset:
    import datasets

    if is_shard_folder(path):  # tar shards with their index.json (latentdiff prepare)
        return shard_dataset(path, split, resolution, args)
    if path.is_file():
        if path.suffix not in TABLE_SUFFIXES:
            raise ValueError(f"{path}: a data file must be one of {', '.join(TABLE_SUFFIXES)}; for images give their folder")
        table = datasets.load_dataset(TABLE_SUFFIXES[path.suffix], data_files=str(path))
        return _from_datasets(table, split, resolution, args, source=str(path), root=path.parent)
    if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
        return _from_datasets(datasets.load_from_disk(str(path)), split, resolution, args, source=str(path), root=path)
    files = walk(path)
    if any(f.suffix in TABLE_SUFFIXES for f in files):
        return _from_datasets(datasets.load_dataset(str(path)), split, resolution, args, source=str(path), root=path)

    split_folders = {s: next((path / d for d in names if (path / d).is_dir()), None)
                     for s, names in (("train", ("train",)), ("validation", VALIDATION_SPLIT_NAMES))}
    own_split = all(split_folders.values())
    root = split_folders[split] if own_split else path
    columns = (_arg(args, "image_column", "image"), _arg(args, "caption_column", "text") or None,
               _arg(args, "min_image_size", 0))
    if has_metadata(root):
        index = index_imagefolder(root, *columns)
    else:
        index = index_captioned_images(root, *columns, caption_extension=_arg(args, "caption_extension", None))
    dataset = ImageCaptionDataset(
        index.paths, index.captions, name=str(root), resolution=resolution,
        fingerprint=index.fingerprint, min_image_size=_arg(args, "min_image_size", 0),
        random_crop=_arg(args, "random_crop", False), random_flip=_arg(args, "random_flip", False),
        skipped=index.skipped, sizes=index.sizes, masks=index.masks,
    )
    return dataset if own_split else holdout(dataset, split)


def holdout(dataset: CaptionedImageDataset, split: str) -> CaptionedImageDataset:
    """Split a source without a validation split: see the module docstring for the rule."""
    n = len(dataset)
    if n < HOLDOUT_MIN_SOURCE:
        if split == "validation":
            logger.info("%s: %d items are too few to hold any out; validating on the training items", dataset.name, n)
        return dataset
    k = min(max(1, round(HOLDOUT_FRACTION * n)), HOLDOUT_MAX)
    held = np.zeros(n, dtype=bool)
    held[np.random.default_rng(0).permutation(n)[:k]] = True
    view = dataset.subset(np.flatnonzero(held if split == "validation" else ~held))
    view.name = f"{dataset.name} [{split}]"
    return view


# --- the datasets library --------------------------------------------------------------------


def _from_datasets(data, split: str, resolution: int, args, source: str, root: Path | None = None):
    """Wrap a ``datasets.Dataset`` / ``DatasetDict``: check columns, drop rows without captions."""
    import datasets

    split_name, needs_holdout = None, True
    if isinstance(data, datasets.DatasetDict):
        train_name = "train" if "train" in data else next(iter(data)) if len(data) == 1 else None
        validation_name = next((s for s in VALIDATION_SPLIT_NAMES if s in data), None)
        if train_name is None:
            raise ValueError(f"{source} has the splits {', '.join(data)}; none is 'train'")
        needs_holdout = validation_name is None
        split_name = train_name if split == "train" or needs_holdout else validation_name
        data = data[split_name]
    table = data

    image_column = _arg(args, "image_column", "image")
    caption_column = _arg(args, "caption_column", "text") or None
    for flag, column in (("--image_column", image_column), ("--caption_column", caption_column)):
        if column and column not in table.column_names:
            raise ValueError(f"{flag} {column!r} is not a column of {source}; its columns are: {', '.join(table.column_names)}")
    if isinstance(table.features[image_column], datasets.Image):
        table = table.cast_column(image_column, datasets.Image(decode=False))  # we decode, lazily and forgivingly

    name = f"{source} [{split_name}]" if split_name else source
    skipped = SkipLog(name)
    if caption_column:
        captions = [as_captions(value) for value in table[caption_column]]
        keep = [i for i, texts in enumerate(captions) if texts]
        for i in (i for i, texts in enumerate(captions) if not texts):
            skipped.add(f"{name}[{i}]", "no caption")
        if len(keep) < len(captions):
            table, captions = table.select(keep), [captions[i] for i in keep]
    else:
        captions = [[""]] * len(table)
    dataset = ImageCaptionDataset(
        ColumnView(table, image_column), captions, name=name, resolution=resolution, root=str(root) if root else None,
        fingerprint=digest(source, split_name, table._fingerprint, image_column, caption_column),
        min_image_size=_arg(args, "min_image_size", 0), random_crop=_arg(args, "random_crop", False),
        random_flip=_arg(args, "random_flip", False), skipped=skipped,
    )
    return holdout(dataset, split) if needs_holdout else dataset


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hub answers at all; without this, an offline ``load_dataset`` retries for ~30 s."""
    from huggingface_hub import constants

    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # only the proxy knows
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
    except OSError:
        return False
    return True


@contextlib.contextmanager
def _offline_mode(enabled: bool):
    """Make ``datasets`` and ``huggingface_hub`` use only their local caches (they read these flags per call)."""
    import datasets
    from huggingface_hub import constants

    saved = datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE
    if enabled:
        datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = saved


def _load_hub(name: str, config: str | None, data_dir: str | None):
    import datasets
    from huggingface_hub import constants

    offline = bool(datasets.config.HF_HUB_OFFLINE) or not _hub_reachable()
    try:
        with _offline_mode(offline):
            return datasets.load_dataset(name, config, data_dir=data_dir)
    except ConnectionError as error:
        where = "offline mode is on (HF_HUB_OFFLINE)" if datasets.config.HF_HUB_OFFLINE else f"{constants.ENDPOINT} is not reachable"
        raise ConnectionError(
            f"cannot load the dataset {name!r}: {where} and it is not in the local cache "
            f"({datasets.config.HF_DATASETS_CACHE}). Load it once where the Hub is reachable (it is then "
            "cached), or give a local folder (--train_data_dir) or a built-in dataset (--dataset_name shapes, emoji, emojione or emoji+emojione)"
        ) from error


# --- batches ---------------------------------------------------------------------------------


def collate(batch: list[dict]) -> dict:
    """Stack tensors (``pixel_values`` -> (B, 3, R, R)); keep strings as a list."""
    out = {}
    for key in batch[0]:
        values = [item[key] for item in batch]
        out[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values  # (B, ...)
    return out


def build_dataloader(dataset, batch_size: int, shuffle: bool = True, seed: int = 0, num_workers: int = 0,
                     drop_last: bool = False, group: int = 1) -> DataLoader:
    """A DataLoader that batches with :func:`collate` and shuffles in an order fixed by ``seed``.

    Per-item randomness (caption choice, random crops and flips) is the dataset's, a function of
    (seed, epoch, index) (:class:`~latentdiff.data.dataset.EpochSeeded`): what an epoch yields is
    the same for any ``num_workers``. A dataset with aspect-ratio buckets is batched one bucket per
    batch, in runs of ``group`` batches of one bucket (accumulation steps x processes: one optimizer step),
    by :class:`~latentdiff.data.buckets.BucketBatchSampler`.
    """
    generator = torch.Generator().manual_seed(seed)
    # No persistent workers: a worker holds a copy of the dataset made when it starts, so persistent
    # ones never see set_epoch (nor anything else the main process changes) and repeat epoch 0's
    # captions and flips. Workers started per epoch cost 50-110 ms an epoch under fork (Linux;
    # measured with 2 workers on a 2-core machine), a fraction of a percent of a shapes or emoji
    # epoch; under spawn (macOS, Windows) each worker imports torch again every epoch, seconds.
    if isinstance(dataset, ShardStream):
        if dataset.bucket_targets() is None:  # streamed: each process and worker reads only its own samples
            return ShardLoader(dataset, batch_size, shuffle, seed, num_workers, drop_last, collate_fn=collate)
        dataset = dataset.as_samples()  # buckets: samples read at their offsets, batched as any bucketed dataset
    sampler = bucket_batch_sampler(dataset, batch_size, group, shuffle, seed)
    if sampler is not None:
        return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=collate)
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers, collate_fn=collate,
        generator=generator, drop_last=drop_last,
    )
