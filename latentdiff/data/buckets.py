"""Aspect-ratio buckets (``--enable_bucket``): train on photos of any shape without cropping them square.

The buckets are kohya-ss sd-scripts' (``make_bucket_resolutions``): sizes of about ``--resolution``²
pixels whose sides are multiples of ``--bucket_reso_steps`` and lie within
[``--min_bucket_reso``, ``--max_bucket_reso``], each with its transpose, and the square. An image
goes to the bucket whose aspect ratio is nearest its own, is resized to cover it and center-cropped
(or randomly, with ``--random_crop``): the least crop a fixed set of sizes allows.

A batch holds one bucket. With B images per batch, A accumulation steps and P processes, one
optimizer step draws A * P batches, all from one bucket (:class:`BucketBatchSampler`), so every
process trains the same size at every step and a bucket needs B * A * P images: one with fewer is
merged into the nearest bucket in aspect that has enough (its images are then cropped a bit more),
and the merges are logged with the table of counts. Nothing is dropped: an epoch's last global
batch of a bucket is filled with images of that bucket seen earlier in the epoch.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from torch.utils.data import Sampler

logger = logging.getLogger(__name__)

Size = tuple[int, int]  # (width, height)


@dataclass(frozen=True)
class BucketSpec:
    """The bucket flags: buckets of about ``resolution``² pixels, sides multiples of ``step`` in [low, high]."""

    resolution: int
    low: int = 256
    high: int = 1024
    step: int = 64

    def check(self) -> None:
        flags = {"--bucket_reso_steps": self.step, "--min_bucket_reso": self.low, "--max_bucket_reso": self.high}
        for flag, value in flags.items():
            if value < 1:
                raise ValueError(f"{flag} must be positive, got {value}")
        for flag in ("--min_bucket_reso", "--max_bucket_reso"):
            if flags[flag] % self.step:
                raise ValueError(f"{flag} {flags[flag]} is not a multiple of --bucket_reso_steps {self.step}")
        if not self.low <= self.resolution <= self.high:
            raise ValueError(
                f"--resolution {self.resolution} must lie within --min_bucket_reso {self.low} and --max_bucket_reso "
                f"{self.high} (for --resolution {self.resolution}, e.g. --min_bucket_reso "
                f"{max(self.step, self.resolution // 2 // self.step * self.step)} --max_bucket_reso {2 * self.resolution})"
            )
        if self.resolution < self.step:
            raise ValueError(f"--resolution {self.resolution} is below --bucket_reso_steps {self.step}")

    def sizes(self) -> list[Size]:
        """Every bucket, sorted (sd-scripts' make_bucket_resolutions)."""
        self.check()
        area = self.resolution**2
        side = int(math.sqrt(area) // self.step) * self.step
        sizes = {(side, side)}
        for width in range(self.low, self.high + 1, self.step):
            height = min(self.high, int(area // width // self.step) * self.step)
            if height >= self.low:
                sizes.update({(width, height), (height, width)})
        return sorted(sizes)


def nearest(size: Size, buckets: Sequence[Size]) -> Size:
    """The bucket whose aspect ratio (in log space: 2:1 and 1:2 are as far from 1:1) is nearest ``size``'s."""
    ratios = np.log([w / h for w, h in buckets])
    return tuple(buckets[int(np.abs(ratios - math.log(size[0] / size[1])).argmin())])


def assign(sizes: Sequence[Size], spec: BucketSpec, min_count: int = 1) -> tuple[list[Size | None], list[str]]:
    """Each image's bucket (``None`` for one that is smaller than the smallest bucket: either side below
    ``--min_bucket_reso``), and the merges done so that each bucket holds at least ``min_count`` images."""
    buckets = spec.sizes()
    chosen: list[Size | None] = [nearest(s, buckets) if min(s) >= spec.low else None for s in sizes]
    counts = Counter(b for b in chosen if b is not None)
    notes = []
    # merge the smallest bucket under min_count into its nearest neighbour in aspect, until none is left
    while len(counts) > 1 and min(counts.values()) < min_count:
        small = min(counts, key=lambda b: (counts[b], b))
        others = [b for b in counts if b != small]
        into = nearest(small, others)
        notes.append(f"{small[0]}x{small[1]} ({counts[small]} images) merged into {into[0]}x{into[1]}")
        counts[into] += counts.pop(small)
        chosen = [into if b == small else b for b in chosen]
    if counts and min(counts.values()) < min_count:
        (only,) = counts
        notes.append(f"{only[0]}x{only[1]} holds {counts[only]} images, fewer than one global batch of {min_count}: "
                     "its images are repeated to fill it")
    return chosen, notes


def log_table(name: str, targets: Sequence[Size], notes: Sequence[str]) -> None:
    """The bucket counts, before training."""
    counts = Counter(targets)
    rows = "\n".join(f"  {w:>5} x {h:<5} aspect {w / h:5.2f}  {n:>7} images" for (w, h), n in sorted(counts.items()))
    logger.info("%s: %d images in %d aspect-ratio buckets\n%s", name, len(targets), len(counts), rows)
    for note in notes:
        logger.info("%s: bucket %s", name, note)


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of ``batch_size`` positions of one bucket each, in runs of ``group`` batches (accumulation steps
    times processes) of one bucket, so that accelerate, which hands process r the batches r, r + P, ..., gives
    every process the same bucket at every step.

    The order is a function of (seed, epoch) only, so exact resume (skip the batches already trained) holds; the
    epoch is read from ``epoch_source`` (the dataset, which every training loop tells the epoch) because
    accelerate does not forward ``set_epoch`` to a custom batch sampler it wraps. Without ``shuffle``, the
    batches follow the positions' order within each bucket (for a held-out set).
    """

    drop_last = True  # for accelerate's BatchSamplerShard: every batch is whole

    def __init__(self, targets: Sequence[Size], batch_size: int, group: int = 1, shuffle: bool = True, seed: int = 0,
                 epoch_source=None):
        if batch_size < 1 or group < 1:
            raise ValueError(f"batch_size and group must be positive, got {batch_size} and {group}")
        self.batch_size, self.group, self.shuffle, self.seed = batch_size, group, shuffle, seed
        self.epoch_source = epoch_source
        self.epoch = 0
        self.buckets: dict[Size, np.ndarray] = {}
        for position, target in enumerate(targets):
            self.buckets.setdefault(tuple(target), []).append(position)
        self.buckets = {b: np.asarray(p, dtype=np.int64) for b, p in sorted(self.buckets.items())}
        if not self.buckets:
            raise ValueError("no items to batch")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _chunk(self) -> int:
        return self.batch_size * self.group if self.shuffle else self.batch_size

    def __len__(self) -> int:
        chunk = self._chunk()
        return sum(math.ceil(len(p) / chunk) for p in self.buckets.values()) * chunk // self.batch_size

    def __iter__(self) -> Iterator[list[int]]:
        epoch = getattr(self.epoch_source, "epoch", self.epoch)
        rng = np.random.default_rng([self.seed, epoch])
        chunk = self._chunk()
        runs = []
        for positions in self.buckets.values():
            order = rng.permutation(positions) if self.shuffle else positions
            filled = math.ceil(len(order) / chunk) * chunk
            order = np.resize(order, filled)  # the last run filled with the bucket's first images, repeated
            runs.extend(order[i:i + chunk] for i in range(0, filled, chunk))
        for r in rng.permutation(len(runs)) if self.shuffle else range(len(runs)):
            run = runs[r]
            for i in range(0, len(run), self.batch_size):
                yield run[i:i + self.batch_size].tolist()


def bucket_batch_sampler(dataset, batch_size: int, group: int = 1, shuffle: bool = True, seed: int = 0):
    """The sampler for a dataset with buckets (``bucket_targets()``), else ``None``."""
    targets = getattr(dataset, "bucket_targets", lambda: None)()
    if targets is None:
        return None
    return BucketBatchSampler(targets, batch_size, group, shuffle, seed, epoch_source=dataset)


def global_batch(args) -> tuple[int, int]:
    """(batches per optimizer step across all processes, images in them): A * P batches of B images."""
    from accelerate import PartialState

    group = (getattr(args, "gradient_accumulation_steps", 1) or 1) * PartialState().num_processes
    return group, group * (getattr(args, "train_batch_size", 1) or 1)

