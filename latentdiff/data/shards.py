"""WebDataset tar shards as a training source: ``--train_data_dir SHARDS`` or ``--dataset_name 'SHARDS/shard-{00000..00009}.tar'``.

A shard folder holds ``shard-NNNNN.tar`` files (one sample per key: the image as stored, ``txt`` with its
caption, or ``json`` with a list of captions) and ``index.json`` (written by ``latentdiff prepare``,
:mod:`latentdiff.data.prepare`): every sample's key, shard, byte offset and image size. The index gives
``len()`` before anything is read, the sizes for aspect-ratio buckets without decoding (``image_sizes``),
and where each sample starts, so that a reader opens a shard at its first sample, never reading another's.
Tar parsing and the shuffle buffer are webdataset's (``tar_file_expander``, ``group_by_keys``, ``shuffle``).

Training reads a stream (:class:`ShardStream`, batched by :class:`ShardLoader`), an epoch at a time:

- the shards are put in an order drawn from (seed, epoch), and their samples, in that order, are cut into
  one contiguous share per process of exactly ``N // P`` samples (the last ``N % P`` of the epoch's order are
  left out, another few every epoch), so every process yields the same number of batches (an uneven count
  would leave one process waiting for the others in DDP for ever);
- a process's share is cut again into whole batches per DataLoader worker (worker w the w-th block of
  ``ceil(batches / W)`` or one fewer), so its workers, interleaved by the DataLoader in turn, give exactly
  ``len(loader)`` batches;
- each worker reads its block shard by shard from its first sample's offset and passes the raw samples
  through a shuffle buffer (``--shuffle_buffer`` samples) seeded by (seed, epoch, process, worker); only
  then are images decoded (:func:`~latentdiff.data.transforms.preprocess`), with the per-item randomness of
  :class:`~latentdiff.data.dataset.EpochSeeded`, so sample i yields what ``dataset[i]`` would that epoch.

Resuming k batches into an epoch, each worker reads and shuffles again what it had (bytes, nothing
decoded), drops the samples of its batches among the first k, and the workers swap roles so that the
DataLoader's turn-taking continues where it stopped: the batches are the unbroken run's, in its order.

Damage: a shard file that is missing, or shorter than the index says (cut in half), loses the samples
past the cut before training starts, counted and named in one warning; nothing usable left is an error.
A sample that still fails to read or decode while streaming is counted, and the worker's previous (or
next) good sample takes its place, so the batch counts never change under a run.

The validation split is the ``validation/`` sub-folder of shards that ``latentdiff prepare`` writes when its
source holds items out (:func:`~latentdiff.data.loaders.holdout`); without one, the training shards. It is
read by random access (:class:`ShardSamples`), as a held-out set is: a few items, in order.
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from accelerate import PartialState
from accelerate.data_loader import DataLoaderShard
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_expander

from latentdiff.data.dataset import (
    MAX_FALLBACKS,
    MAX_REPORTED_PATHS,
    CaptionedImageDataset,
    ImageTooSmall,
    SkipLog,
    pick_caption,
)
from latentdiff.data.files import digest
from latentdiff.data.folders import IMAGE_EXTENSIONS, as_captions
from latentdiff.data.transforms import open_image, preprocess

logger = logging.getLogger(__name__)

INDEX_FILE = "index.json"
INDEX_FORMAT = "latentdiff-shards/1"
VALIDATION_DIR = "validation"
DEFAULT_SHUFFLE_BUFFER = 1000  # webdataset's default; memory: this many raw (encoded) images per worker
IMAGE_SUFFIXES = frozenset(e.lstrip(".") for e in IMAGE_EXTENSIONS)


def is_shard_pattern(name: str) -> bool:
    """``--dataset_name`` naming tar shards: a ``.tar`` file or a brace pattern of them."""
    return name.endswith(".tar")


def is_shard_folder(path: Path) -> bool:
    return path.is_dir() and ((path / INDEX_FILE).is_file() or any(path.glob("*.tar")))


@dataclass
class ShardIndex:
    """What ``index.json`` says about a set of shards: per sample its shard, offset and image size."""

    root: Path
    shards: list[Path]
    ends: list[int]  # where each shard's last sample ends
    sizes: list[int]  # each shard file's size in bytes, as written
    keys: list[str]
    shard: np.ndarray  # (N,) index into shards
    offset: np.ndarray  # (N,) byte offset of the sample's first tar header
    width: np.ndarray  # (N,) upright (EXIF applied) image size
    height: np.ndarray
    captions: bool  # whether the samples have captions (prepared without --caption_column '')

    @classmethod
    def load(cls, folder: Path, only: set[str] | None = None) -> ShardIndex:
        """The index of ``folder``; ``only``: the shard file names to keep (a brace pattern's)."""
        path = folder / INDEX_FILE
        if not path.is_file():
            found = "holds no .tar files" if not any(folder.glob("*.tar")) else "has .tar files but no index"
            raise FileNotFoundError(
                f"{folder} {found} ({INDEX_FILE}): shards are read with the index `latentdiff prepare SOURCE "
                f"{folder}` writes beside them; run it on the images (a folder or a datasets dataset)"
            )
        index = json.loads(path.read_text())
        if index.get("format") != INDEX_FORMAT:
            raise ValueError(
                f"{path}: not a latentdiff shard index (format {index.get('format')!r}, expected {INDEX_FORMAT!r})"
            )
        shards = index["shards"]
        names = [s["name"] for s in shards]
        keep = (
            np.ones(len(shards), dtype=bool)
            if only is None
            else np.array([n in only for n in names], dtype=bool)
        )
        if only is not None and (unknown := sorted(only - set(names))):
            raise ValueError(
                f"{', '.join(unknown[:3])}: not in {path} (its shards: {names[0]} ... {names[-1]})"
            )
        shard = np.asarray(index["shard"], dtype=np.int64)
        rows = np.flatnonzero(keep[shard])
        renumber = np.cumsum(keep) - 1  # old shard number -> new
        kept = [s for s, k in zip(shards, keep, strict=True) if k]
        return cls(
            root=folder,
            shards=[folder / s["name"] for s in kept],
            ends=[s["end"] for s in kept],
            sizes=[s["bytes"] for s in kept],
            keys=[index["key"][i] for i in rows],
            shard=renumber[shard[rows]],
            offset=np.asarray(index["offset"], dtype=np.int64)[rows],
            width=np.asarray(index["width"], dtype=np.int64)[rows],
            height=np.asarray(index["height"], dtype=np.int64)[rows],
            captions=bool(index["captions"]),
        )

    def __len__(self) -> int:
        return len(self.keys)

    def end(self, row: int) -> int:
        """Where sample ``row`` ends: the next sample's offset, or its shard's end."""
        if row + 1 < len(self) and self.shard[row + 1] == self.shard[row]:
            return int(self.offset[row + 1])
        return self.ends[self.shard[row]]

    def intact_rows(self, skipped: SkipLog) -> np.ndarray:
        """The samples whose bytes are all on disk; the others counted in ``skipped`` with their shard's name."""
        on_disk = np.array([p.stat().st_size if p.is_file() else -1 for p in self.shards], dtype=np.int64)
        for path, size, written in zip(self.shards, on_disk, self.sizes, strict=True):
            if size > written:
                raise ValueError(
                    f"{path} is {size} bytes, its index {self.root / INDEX_FILE} says {written}: the shard "
                    "was rewritten after the index; run latentdiff prepare again"
                )
        last = np.append(self.shard[1:] != self.shard[:-1], True)  # (N,) the last sample of its shard
        ends = np.where(
            last, np.asarray(self.ends, dtype=np.int64)[self.shard], np.append(self.offset[1:], 0)
        )
        lost = np.flatnonzero(ends > on_disk[self.shard])
        for row in lost:
            path, size = self.shards[self.shard[row]], on_disk[self.shard[row]]
            detail = "missing" if size < 0 else f"cut short: {size} of {self.sizes[self.shard[row]]} bytes"
            skipped.add(f"{path.name}:{self.keys[row]}", "damaged shard", f"{path} {detail}")
        return np.setdiff1d(np.arange(len(self)), lost)

    def read(self, rows: Sequence[int], on_error) -> Iterator[tuple[int, dict | None]]:
        """``(row, sample)`` for each of ``rows`` (ascending within a shard), reading each run of consecutive
        samples in one pass from its first offset; ``sample`` is None where it could not be read, and
        ``on_error(path, error)`` is told why."""
        start = 0
        while start < len(rows):
            stop = start + 1
            while (stop < len(rows) and rows[stop] == rows[stop - 1] + 1
                   and self.shard[rows[stop]] == self.shard[rows[start]]):  # fmt: skip
                stop += 1
            yield from self._read_run(rows[start:stop], on_error)
            start = stop

    def _read_run(self, rows: Sequence[int], on_error) -> Iterator[tuple[int, dict | None]]:
        path = self.shards[self.shard[rows[0]]]

        def handler(error: BaseException) -> bool:  # webdataset's contract: True goes on with the next file
            on_error(path, error)
            return True

        first, last = int(self.offset[rows[0]]), self.end(rows[-1])
        wanted = iter(rows)
        row = next(wanted, None)
        try:
            with open(path, "rb") as file:
                stream = {"url": str(path), "stream": _Span(file, first, last)}
                for sample in group_by_keys(tar_file_expander([stream], handler=handler), handler=handler):
                    while row is not None and self.keys[row] != sample["__key__"]:
                        yield row, None  # not in the tar where the index puts it
                        row = next(wanted, None)
                    if row is None:
                        break
                    yield row, sample
                    row = next(wanted, None)
        except OSError as error:
            on_error(path, error)
        while row is not None:
            yield row, None
            row = next(wanted, None)


class _Span:
    """A file read from ``start`` to ``end`` only: to tarfile the end of a run of samples is the end of the archive."""

    def __init__(self, file, start: int, end: int):
        file.seek(start)
        self.file, self.left = file, end - start

    def read(self, size: int = -1) -> bytes:
        data = self.file.read(self.left if size < 0 else min(size, self.left))
        self.left -= len(data)
        return data


def decode_sample(sample: dict, with_captions: bool):
    """A raw sample's image (PIL, not yet converted) and captions."""
    image = next((value for key, value in sample.items() if key in IMAGE_SUFFIXES), None)
    if image is None:
        raise ValueError(
            f"no image in the sample (it has {', '.join(k for k in sample if not k.startswith('__'))})"
        )
    captions = [""]
    if with_captions:
        if "json" in sample:
            captions = as_captions(json.loads(sample["json"]))
        elif "txt" in sample:
            captions = as_captions(sample["txt"].decode("utf-8"))
        if captions == [""] or not captions:
            raise ValueError("no caption in the sample")
    return open_image(image), captions


class ShardSamples(CaptionedImageDataset):
    """The samples of shards by random access (each read from its offset): the validation split, ``dataset[i]``,
    and what the latent cache encodes. A sample that fails is counted and replaced by the next good one."""

    def __init__(
        self,
        index: ShardIndex,
        *,
        name: str,
        resolution: int,
        with_captions: bool = True,
        min_image_size: int = 0,
        random_crop: bool = False,
        random_flip: bool = False,
    ):
        super().__init__(name=name, num_rows=len(index), resolution=resolution,
                         fingerprint=digest("shards", str(index.root.resolve()), [p.name for p in index.shards],
                                            index.sizes, with_captions),
                         random_crop=random_crop, random_flip=random_flip)  # fmt: skip
        self.index, self.with_captions, self.min_image_size = index, with_captions, min_image_size
        self._rows = index.intact_rows(self.skipped)
        small = (np.minimum(index.width, index.height) < min_image_size)[self._rows]
        for row in self._rows[small]:
            self.skipped.add(
                f"{index.shards[index.shard[row]].name}:{index.keys[row]}",
                "too small",
                f"{index.width[row]}x{index.height[row]} < --min_image_size {min_image_size}",
            )
        self._rows = self._rows[~small]
        self.fingerprint = digest(self.fingerprint, min_image_size, digest(self._rows.tobytes()))

    def image_sizes(self) -> list[tuple[int, int]]:
        """(width, height) of each item, in item order, from the index (nothing decoded): for aspect-ratio buckets."""
        return list(
            zip(self.index.width[self._rows].tolist(), self.index.height[self._rows].tolist(), strict=True)
        )

    def __getitem__(self, index: int) -> dict:
        for attempt in range(min(len(self), MAX_FALLBACKS)):
            position = (index + attempt) % len(self)
            row = int(self._rows[position])
            try:
                return self.item(position, self._read_one(row))
            except Exception as error:  # any reader or decoder error
                self.skipped.add_decode_failure(self.describe(row), error)
        raise RuntimeError(
            f"{self.name}: {MAX_FALLBACKS} samples in a row from item {index} failed to read or decode; "
            f"the shards look broken (first failures: {self.skipped.entries[:MAX_REPORTED_PATHS]})"
        )

    def item(self, position: int, sample: dict | None) -> dict:
        """Item ``position`` made from a raw ``sample`` (its own or a stand-in's), drawn as ``__getitem__`` draws."""
        if sample is None:
            raise OSError("could not be read from its shard")
        image, captions = decode_sample(sample, self.with_captions)
        if min(image.size) < self.min_image_size:
            raise ImageTooSmall(
                f"{image.size[0]}x{image.size[1]} is below --min_image_size {self.min_image_size}"
            )
        generator = self.item_generator(position)
        flip = self.random_flip and bool(torch.rand((), generator=generator) < 0.5)
        return {
            "pixel_values": preprocess(
                image, self._size(int(self._rows[position])), self.random_crop, flip, generator
            ),
            "text": self.caption_options(pick_caption(captions, generator), generator),
        }

    def _read_one(self, row: int) -> dict | None:
        return next(self.index.read([row], self._handler))[1]

    def _row_image(
        self, row: int, flip: bool, generator: torch.Generator | None = None, with_mask: bool = False
    ):
        if with_mask:
            raise ValueError(f"{self.name}: tar shards hold no loss masks (--masked_loss)")
        image, _ = decode_sample(_required(self._read_one(row)), with_captions=False)
        return preprocess(image, self._size(row), self.random_crop, flip, generator)

    def _size(self, row: int):
        """The side of the square an image is cut to, or its (width, height) aspect-ratio bucket."""
        targets = getattr(self, "_targets", None)
        return self.resolution if targets is None else tuple(int(v) for v in targets[row])

    def _row_size(self, row: int) -> tuple[int, int]:
        return int(self.index.width[row]), int(self.index.height[row])

    def _row_captions(self, row: int) -> list[str]:
        return decode_sample(_required(self._read_one(row)), self.with_captions)[1]

    def describe(self, row: int) -> str:
        return f"{self.index.shards[self.index.shard[row]]}:{self.index.keys[row]}"

    def _handler(self, path: Path, error: BaseException) -> None:
        """Counted and logged (the first few), as webdataset's warn_and_continue would, without its 0.5 s sleep."""
        self.skipped.add(str(path), "unreadable shard data", f"{type(error).__name__}: {error}")
        if len(self.skipped) <= MAX_REPORTED_PATHS:
            logger.warning(
                "%s: %s: %s: %s; going on with the next readable sample",
                self.name,
                path,
                type(error).__name__,
                error,
            )


def _required(sample: dict | None) -> dict:
    if sample is None:
        raise OSError("could not be read from its shard")
    return sample


class ShardStream(ShardSamples, IterableDataset):
    """The training split of shards, streamed (see the module docstring); random access (``dataset[i]``) still works."""

    shuffle_buffer = DEFAULT_SHUFFLE_BUFFER

    def as_samples(self) -> ShardSamples:
        """The same items (rows, buckets, caption options, epoch) by random access: what aspect-ratio buckets
        batch, since a step's batches of one bucket on every process are drawn from the whole epoch, not from
        what a stream has at hand."""
        samples = object.__new__(ShardSamples)
        samples.__dict__.update(self.__dict__)
        return samples

    def plan(self, epoch: int, shuffle: bool, seed: int) -> np.ndarray:
        """The epoch's order of item positions before the shuffle buffer: shard by shard, shards in an order
        drawn from (seed, epoch), each shard's samples in file order."""
        shard_of = self.index.shard[self._rows]
        order = (
            np.random.default_rng([seed, epoch]).permutation(len(self.index.shards))
            if shuffle
            else np.arange(len(self.index.shards))
        )
        rank = np.empty_like(order)
        rank[order] = np.arange(len(order))
        return np.lexsort((np.arange(len(self._rows)), rank[shard_of]))

    def __iter__(self):
        raise TypeError(
            "iterate a ShardStream through build_dataloader (a ShardLoader): it splits the stream over processes and workers"
        )


class _ProcessShare(IterableDataset):
    """One process's share of a :class:`ShardStream` epoch, for a torch DataLoader; ``len`` = its samples."""

    def __init__(
        self,
        stream: ShardStream,
        batch_size: int,
        shuffle: bool,
        seed: int,
        drop_last: bool,
        rank: int,
        world: int,
    ):
        self.stream, self.batch_size, self.shuffle, self.seed = stream, batch_size, shuffle, seed
        self.rank, self.world = rank, world
        self.per_process = len(stream) // world
        if self.per_process == 0 or (drop_last and self.per_process < batch_size):
            raise ValueError(
                f"{stream.name}: {len(stream)} items cannot fill a batch of {batch_size} on each of {world} processes"
            )
        if drop_last:
            self.per_process -= self.per_process % batch_size
        self.skip_batches = 0  # set for the first epoch of a resumed run (ShardLoader.resumed)

    def __len__(self) -> int:
        return self.per_process

    def set_epoch(self, epoch: int) -> None:
        self.stream.set_epoch(epoch)

    def __iter__(self):
        info = get_worker_info()
        return self._samples(
            self.stream.epoch, self.skip_batches, info.id if info else 0, info.num_workers if info else 1
        )

    def _samples(self, epoch: int, skip: int, worker: int, workers: int) -> Iterator[dict]:
        stream, B = self.stream, self.batch_size
        share = stream.plan(epoch, self.shuffle, self.seed)[
            self.rank * self.per_process : (self.rank + 1) * self.per_process
        ]
        batches = math.ceil(len(share) / B)
        counts = [batches // workers + (w < batches % workers) for w in range(workers)]
        # resumed `skip` batches in: worker `worker` plays the part of the one the DataLoader's turn would be on
        role = (worker + skip) % workers
        done = min(counts[role], skip // workers + (role < skip % workers))
        first = sum(counts[:role]) * B
        block = share[first : min(first + counts[role] * B, len(share))]
        samples = (sample for _, sample in stream.index.read(stream._rows[block], stream._handler))
        raw = iter(zip(block.tolist(), samples, strict=True))  # (position, raw sample or None)
        if self.shuffle:
            rng = random.Random(hash((self.seed, epoch, self.rank, role)) & (2**63 - 1))
            raw = wds.shuffle(stream.shuffle_buffer, initial=min(100, stream.shuffle_buffer), rng=rng)(raw)
        for _ in range(min(done * B, len(block))):  # already trained on: read and shuffled again, not decoded
            next(raw)
        yield from _with_stand_ins(stream, raw)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(process {self.rank} of {self.world}: {self.per_process} of {self.stream!r})"


def _with_stand_ins(stream: ShardStream, raw) -> Iterator[dict]:
    """Items from ``(position, sample)``; one that fails to read or decode is counted and made from the previous
    good sample (or, before any, the next), drawn with its own position's randomness: the count never changes."""
    good, waiting = None, []
    for position, sample in raw:
        try:
            item = stream.item(position, sample)
        except Exception as error:
            stream.skipped.add_decode_failure(stream.describe(int(stream._rows[position])), error)
            if good is None:
                waiting.append(position)
            else:
                yield stream.item(position, good)
            continue
        good = sample
        for earlier in waiting:
            yield stream.item(earlier, good)
        waiting = []
        yield item
    if waiting:
        raise RuntimeError(
            f"{stream.name}: no sample of this worker's {len(waiting)} could be read and decoded "
            f"(first failures: {stream.skipped.entries[:MAX_REPORTED_PATHS]})"
        )


class ShardLoader:
    """Batches of a :class:`ShardStream` for this process (see the module docstring for the split).

    Not a DataLoader, so that ``accelerator.prepare`` passes it through: accelerate would otherwise read the
    whole stream on the main process and send each process its batches (``dispatch_batches``), or have
    every process read everything and keep its slice (``IterableDatasetShard``). Inside it is accelerate's
    ``DataLoaderShard``, which moves batches to the device and tells the gradient accumulation where an
    epoch ends, as a prepared loader does.
    """

    def __init__(
        self,
        stream: ShardStream,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        num_workers: int = 0,
        drop_last: bool = False,
        collate_fn=None,
        rank: int | None = None,
        world: int | None = None,
    ):
        if getattr(stream, "_targets", None) is not None:
            raise ValueError(
                f"{stream.name}: aspect-ratio buckets (--enable_bucket) are not streamed from tar shards yet; "
                "train on the source folder, or without --enable_bucket"
            )
        state = PartialState()
        rank = state.process_index if rank is None else rank
        world = state.num_processes if world is None else world
        self.dataset = stream
        self.batch_size = batch_size
        self.share = _ProcessShare(stream, batch_size, shuffle, seed, drop_last, rank, world)
        self.loader = DataLoaderShard(self.share, device=state.device, batch_size=batch_size, num_workers=num_workers,
                                      collate_fn=collate_fn, drop_last=drop_last)  # fmt: skip

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        return iter(self.loader)

    def set_epoch(self, epoch: int) -> None:
        # DataLoaderShard tells the stream its own epoch count again at every iter(): set both
        self.loader.set_epoch(epoch)
        self.share.skip_batches = 0  # a resumed epoch left unfinished skips nothing in the next

    def resumed(self, skip_batches: int):
        """This epoch's batches after the first ``skip_batches``, without decoding those (see the module docstring)."""
        self.share.skip_batches = skip_batches
        try:
            yield from self.loader
        finally:
            self.share.skip_batches = 0


# --- the dataset the data flags describe -------------------------------------------------------


def shard_dataset(source: str | Path, split: str, resolution: int, args) -> ShardSamples:
    """The shards of a folder (with ``index.json``) or a brace pattern / ``.tar`` path: a stream to train on,
    random access for validation."""
    path = Path(source).expanduser()
    if path.is_dir():
        folder, only = path, None
        if split == "validation" and (path / VALIDATION_DIR / INDEX_FILE).is_file():
            folder = path / VALIDATION_DIR
    else:
        files = [Path(f) for f in wds.shardlists.expand_urls(str(path))]
        missing = [f for f in files if not f.exists()]
        if len(missing) == len(files):
            raise FileNotFoundError(
                f"--dataset_name {source}: none of its {len(files)} shard(s) exists (first: {files[0]})"
            )
        folders = {f.parent for f in files}
        if len(folders) > 1:
            raise ValueError(
                f"--dataset_name {source}: the shards must lie in one folder (beside its {INDEX_FILE}), "
                f"not in {len(folders)}"
            )
        folder, only = folders.pop(), {f.name for f in files}
    name = str(folder) if only is None else str(source)
    index = ShardIndex.load(folder, only)
    with_captions = bool(getattr(args, "caption_column", "text"))
    if with_captions and not index.captions:
        raise ValueError(
            f"{name}: the shards hold no captions (prepared with --caption_column ''); pass "
            "--caption_column '' to train on the images alone"
        )
    if split == "validation" and folder == path and only is None:
        logger.info("%s: no %s/ shards; validating on the training shards", name, VALIDATION_DIR)
    kind = ShardStream if split == "train" else ShardSamples
    dataset = kind(
        index,
        name=name if split == "train" else f"{name} [{split}]",
        resolution=resolution,
        with_captions=with_captions,
        min_image_size=getattr(args, "min_image_size", 0) or 0,
        random_crop=bool(getattr(args, "random_crop", False)),
        random_flip=bool(getattr(args, "random_flip", False)),
    )
    if isinstance(dataset, ShardStream):
        buffer = getattr(args, "shuffle_buffer", None)
        if buffer is not None:
            if buffer < 1:
                raise ValueError(f"--shuffle_buffer must be at least 1, got {buffer}")
            dataset.shuffle_buffer = buffer
    return dataset
