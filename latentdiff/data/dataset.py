"""The dataset every loader returns: items ``{"pixel_values": (3, R, R) in [-1, 1], "text": str}``."""

from __future__ import annotations

import copy
import logging
from collections import Counter
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from latentdiff.data.captions import CaptionOptions
from latentdiff.data.files import digest
from latentdiff.data.transforms import MaskSizeError, open_image, preprocess

logger = logging.getLogger(__name__)

MAX_REPORTED_PATHS = 5
_reported: set[str] = set()  # reports already given in this process (train and validation share a folder)
# A decode failure falls back to the next item; this many failures in a row means the data
# itself is broken, which is worth stopping for.
MAX_FALLBACKS = 100


class SkipLog:
    """Items left out of a dataset (bad files, missing captions), counted by reason.

    Problems found while indexing are reported once, in one warning with the count and the
    first few paths; ones found while decoding (a truncated JPEG passes the header check) are
    logged for the first few per process and then only counted.
    """

    def __init__(self, name: str):
        self.name = name
        self.entries: list[tuple[str, str, str]] = []  # (path, reason, detail)
        self._decode_failures = 0

    def add(self, path: str, reason: str, detail: str = "") -> None:
        self.entries.append((str(path), reason, detail))

    def __len__(self) -> int:
        return len(self.entries)

    def counts(self) -> Counter:
        """How many items were skipped for each reason."""
        return Counter(reason for _, reason, _ in self.entries)

    def report(self) -> None:
        key = digest(self.name, self.entries)
        if not self.entries or key in _reported:
            return
        _reported.add(key)
        kinds = ", ".join(f"{n} {reason}" for reason, n in self.counts().most_common())
        first = "; ".join(f"{path}: {reason}{f' ({detail})' if detail else ''}"
                          for path, reason, detail in self.entries[:MAX_REPORTED_PATHS])
        more = f" (and {len(self.entries) - MAX_REPORTED_PATHS} more)" if len(self.entries) > MAX_REPORTED_PATHS else ""
        logger.warning("%s: skipped %d items (%s). First: %s%s", self.name, len(self.entries), kinds, first, more)

    def add_decode_failure(self, path: str, error: BaseException) -> None:
        reason = ("too small" if isinstance(error, ImageTooSmall) else "mask of another size"
                  if isinstance(error, MaskSizeError) else "failed to decode")
        self.add(path, reason, f"{type(error).__name__}: {error}")
        self._decode_failures += 1
        if self._decode_failures <= MAX_REPORTED_PATHS:
            tail = "; later decode failures are counted silently" if self._decode_failures == MAX_REPORTED_PATHS else ""
            logger.warning("%s: skipped %s (%s: %s), using another item%s", self.name, path, reason, error, tail)


class ImageTooSmall(ValueError):
    """An image below ``--min_image_size``, found only when decoded (sources without an index)."""


class EpochSeeded:
    """Per-item randomness (caption, flip, crop) that is a function of (seed, epoch, index) alone.

    A DataLoader prefetches ahead of the step, resumes mid-epoch and spreads items over workers;
    drawing from a global RNG would make what an item yields depend on all of that and break exact
    resume. Training loops call ``set_epoch`` at the start of every epoch. A DataLoader's worker
    copies the dataset when it starts, so it sees the epoch only if it starts after ``set_epoch``:
    persistent workers would not (``build_dataloader`` starts them per epoch).
    """

    seed = 0
    epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def item_generator(self, index: int) -> torch.Generator:
        # hash() of a tuple of ints is the same in every process (PYTHONHASHSEED salts only str/bytes)
        return torch.Generator().manual_seed(hash((self.seed, self.epoch, index)) & (2**63 - 1))


class CaptionedImageDataset(EpochSeeded, Dataset):
    """Images with one or more captions each; one caption is drawn at random on every access.

    Subclasses implement ``_row_image(row, flip)`` and ``_row_captions(row)``; this class maps
    positions to rows so that any dataset can be narrowed (hold-out, ``--max_train_samples``)
    without copying data, and keeps a ``fingerprint`` that identifies exactly what it yields
    (source, split, subset, resolution, crop), which keys the latent cache. ``caption_options``
    (tag shuffle and dropout, :mod:`latentdiff.data.captions`) applies to the caption drawn.
    """

    caption_options = CaptionOptions()
    masked = False  # items carry "mask" (1, H, W) for --masked_loss: set by build_dataset where the source has masks

    def __init__(self, *, name: str, num_rows: int, resolution: int, fingerprint: str,
                 random_crop: bool = False, random_flip: bool = False):
        self.name = name
        self.resolution = resolution
        self.random_crop = random_crop
        self.random_flip = random_flip
        self.fingerprint = digest(fingerprint, resolution, random_crop, random_flip)
        self.skipped = SkipLog(name)
        self._rows = np.arange(num_rows)
        self._targets: np.ndarray | None = None  # (rows, 2): each row's (width, height) bucket; None: square

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, index: int) -> dict:
        generator = self.item_generator(index)
        flip = self.random_flip and bool(torch.rand((), generator=generator) < 0.5)
        item = {}
        if self.masked:
            item["pixel_values"], item["mask"] = self.image_and_mask(index, flip=flip, generator=generator)
        else:
            item["pixel_values"] = self.image(index, flip=flip, generator=generator)
        item["text"] = self.caption_options(pick_caption(self.captions(index), generator), generator)
        return item

    def image(self, index: int, flip: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        """The (3, H, W) pixels of item ``index`` (H = W = resolution, or its bucket's size); the same every
        time unless ``random_crop``."""
        return self._row_image(int(self._rows[index]), flip, generator)

    def image_and_mask(self, index: int, flip: bool = False, generator: torch.Generator | None = None):
        """The pixels (3, H, W) and the loss mask (1, H, W) in [0, 1] of item ``index`` (--masked_loss)."""
        return self._row_image(int(self._rows[index]), flip, generator, with_mask=True)

    def target(self, index: int) -> tuple[int, int]:
        """The (width, height) item ``index`` is cut to: its bucket's, or the resolution's square."""
        if self._targets is None:
            return self.resolution, self.resolution
        return tuple(int(v) for v in self._targets[self._rows[index]])

    def bucket_targets(self) -> list[tuple[int, int]] | None:
        """Every item's bucket (width, height) with --enable_bucket, else None (all are square)."""
        return None if self._targets is None else [tuple(int(v) for v in t) for t in self._targets[self._rows]]

    def image_sizes(self) -> list[tuple[int, int]]:
        """Every item's (width, height), upright, as stored (before resizing): what buckets are chosen from."""
        return [self._row_size(int(row)) for row in self._rows]

    def set_buckets(self, targets: Sequence[tuple[int, int]]) -> None:
        """Cut item i to ``targets[i]`` from now on (per position of this view; rows outside it stay square)."""
        if len(targets) != len(self):
            raise ValueError(f"{len(targets)} bucket sizes for {len(self)} items")
        full = np.full((int(self._rows.max(initial=-1)) + 1, 2), self.resolution, dtype=np.int64)
        if self._targets is not None:
            full[: len(self._targets)] = self._targets[: len(full)]
        full[self._rows] = np.asarray(targets, dtype=np.int64).reshape(-1, 2)
        self._targets = full
        self.fingerprint = digest(self.fingerprint, "buckets", digest(full[self._rows].tobytes()))

    def _row_size(self, row: int) -> tuple[int, int]:
        return self.resolution, self.resolution  # the built-in datasets are square

    def captions(self, index: int) -> list[str]:
        return self._row_captions(int(self._rows[index]))

    def subset(self, positions: Sequence[int] | np.ndarray) -> CaptionedImageDataset:
        """A view of the items at ``positions`` (no data copied)."""
        view = copy.copy(self)
        view._rows = self._rows[np.asarray(positions, dtype=np.int64)]
        view.fingerprint = digest(self.fingerprint, "subset", digest(view._rows.tobytes()))
        return view

    def _row_image(self, row: int, flip: bool, generator: torch.Generator | None = None, with_mask: bool = False):
        raise NotImplementedError

    def _row_captions(self, row: int) -> list[str]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {len(self)} items, {self.resolution} px)"


def pick_caption(captions: Sequence, generator: torch.Generator | None = None):
    """One caption at random."""
    if len(captions) == 1:
        return captions[0]
    return captions[int(torch.randint(len(captions), (), generator=generator))]


class ImageCaptionDataset(CaptionedImageDataset):
    """User data: images decoded lazily, one per access, from paths, bytes or ``datasets`` cells.

    An image that fails to decode (or turns out smaller than ``min_image_size``) is counted in
    ``skipped`` and replaced by the next good item, so a run never stops on one bad file.
    """

    def __init__(self, images: Sequence, captions: list[list[str]], *, name: str, resolution: int,
                 fingerprint: str, root: str | None = None, min_image_size: int = 0,
                 random_crop: bool = False, random_flip: bool = False, skipped: SkipLog | None = None,
                 sizes: Sequence[tuple[int, int]] | None = None, masks: Sequence[str | None] | None = None):
        if len(images) != len(captions):
            raise ValueError(f"{len(images)} images but {len(captions)} caption lists")
        super().__init__(name=name, num_rows=len(images), resolution=resolution, fingerprint=fingerprint,
                         random_crop=random_crop, random_flip=random_flip)
        self.images = images
        self.row_captions = captions
        self.root = root
        self.min_image_size = min_image_size
        if skipped is not None:
            self.skipped = skipped
        self._bad_rows: set[int] = set()
        self.sizes = sizes  # each row's upright (width, height), from the index; None: read from headers when asked
        self.masks = masks  # each row's mask file for --masked_loss, "alpha" for its own transparency, or None

    def __getitem__(self, index: int) -> dict:
        for attempt in range(min(len(self), MAX_FALLBACKS)):
            position = (index + attempt) % len(self)
            row = int(self._rows[position])
            if row in self._bad_rows:
                continue
            try:
                return super().__getitem__(position)
            except Exception as error:  # any decoder error (OSError, ValueError, SyntaxError, ...)
                self._bad_rows.add(row)
                self.skipped.add_decode_failure(self._describe(row), error)
        raise RuntimeError(
            f"{self.name}: {MAX_FALLBACKS} items in a row from index {index} failed to decode; "
            f"the data looks broken (first failures: {self.skipped.entries[:MAX_REPORTED_PATHS]})"
        )

    def _row_image(self, row: int, flip: bool, generator: torch.Generator | None = None, with_mask: bool = False):
        target = self.resolution if self._targets is None else tuple(int(v) for v in self._targets[row])
        image = open_image(self.images[row], root=self.root, draft_size=max(*np.atleast_1d(target), self.min_image_size))
        if min(image.size) < self.min_image_size:
            raise ImageTooSmall(f"{image.size[0]}x{image.size[1]} is below --min_image_size {self.min_image_size}")
        mask = None
        if with_mask:
            mask = self.masks[row] if self.masks is not None else "alpha"
            mask = open_image(mask, root=self.root) if mask not in (None, "alpha") else "alpha"
        return preprocess(image, target, self.random_crop, flip, generator, mask=mask)

    def _row_size(self, row: int) -> tuple[int, int]:
        if self.sizes is not None:
            return tuple(self.sizes[row])
        return upright_size(self.images[row], self.root)

    def _row_captions(self, row: int) -> list[str]:
        return self.row_captions[row]

    def _describe(self, row: int) -> str:
        source = self.images[row]
        if isinstance(source, dict):
            source = source.get("path") or "<bytes>"
        return source if isinstance(source, str) else f"{self.name}[{row}]"


def upright_size(source, root: str | None = None) -> tuple[int, int]:
    """An image's (width, height) once its EXIF orientation is applied, from its header alone."""
    image = open_image(source, root=root, load=False)
    width, height = image.size
    if image.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # rotated a quarter turn
        width, height = height, width
    image.close()
    return width, height


class ColumnView:
    """One column of a ``datasets.Dataset``, read a row at a time (keeps decoding lazy)."""

    def __init__(self, table, column: str):
        self.table = table.select_columns([column])
        self.column = column

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, row: int):
        return self.table[row][self.column]
