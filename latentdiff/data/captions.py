"""Captions as tag lists, the way kohya-ss sd-scripts trains on them (``library/train_util.py``).

A caption such as ``"sks dog, sitting, grass, sunny"`` is a list of comma-separated tags. With
``--shuffle_caption`` the tags are put in a random order, with ``--caption_tag_dropout_rate p``
each is left out with probability p; the first ``--keep_tokens N`` tags (a subject's trigger
word, say) stay where they are and are never dropped. ``--keep_tokens_separator S`` marks the
kept part in the caption itself: tags before the first ``S`` are kept, and tags after a second
``S`` are a kept suffix. The result is the tags joined by ``", "``.

Every draw comes from the generator the dataset passes in, one per (seed, epoch, index)
(:class:`~latentdiff.data.dataset.EpochSeeded`), so a resumed run sees the same captions.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

SEPARATOR = ","


def tags(caption: str) -> list[str]:
    """The non-empty comma-separated tags of ``caption``, stripped."""
    return [tag.strip() for tag in caption.split(SEPARATOR) if tag.strip()]


@dataclass(frozen=True)
class CaptionOptions:
    """What the caption flags ask for; the defaults leave a caption as written."""

    shuffle: bool = False
    keep_tokens: int = 0
    tag_dropout: float = 0.0
    keep_tokens_separator: str = ""

    def __post_init__(self):
        if self.keep_tokens < 0:
            raise ValueError(f"--keep_tokens must be >= 0, got {self.keep_tokens}")
        if not 0.0 <= self.tag_dropout <= 1.0:
            raise ValueError(f"--caption_tag_dropout_rate must lie in [0, 1], got {self.tag_dropout}")

    @property
    def changes_captions(self) -> bool:
        return self.shuffle or self.tag_dropout > 0 or bool(self.keep_tokens_separator)

    def __call__(self, caption: str, generator: torch.Generator | None = None) -> str:
        return process_caption(caption, generator, self.shuffle, self.keep_tokens, self.tag_dropout,
                               self.keep_tokens_separator)

    def report_short_captions(self, captions: Iterable[str], name: str) -> int:
        """Warn once about the captions with fewer tags than ``keep_tokens``: all their tags are then kept in
        place, as sd-scripts does, not an error. Returns how many there are."""
        if not self.keep_tokens or not (self.shuffle or self.tag_dropout > 0):
            return 0
        total, short = 0, 0
        for caption in captions:
            total += 1
            marked = self.keep_tokens_separator and self.keep_tokens_separator in caption
            short += not marked and len(tags(caption)) < self.keep_tokens
        if short:
            logger.warning(
                "%s: %d of %d captions have fewer tags than --keep_tokens %d; they are kept whole, in order "
                "(nothing shuffled or dropped)", name, short, total, self.keep_tokens,
            )
        return short


def process_caption(caption: str, generator: torch.Generator | None = None, shuffle: bool = False,
                    keep_tokens: int = 0, tag_dropout: float = 0.0, keep_tokens_separator: str = "") -> str:
    """``caption`` with its tags after the first ``keep_tokens`` shuffled and/or dropped (see the module
    docstring); unchanged, and nothing drawn from ``generator``, when no option asks for a change."""
    marked = bool(keep_tokens_separator) and keep_tokens_separator in caption
    if not (shuffle or tag_dropout > 0 or marked):
        return caption
    suffix: list[str] = []
    if marked:
        head, rest = caption.split(keep_tokens_separator, 1)
        if keep_tokens_separator in rest:
            rest, tail = rest.split(keep_tokens_separator, 1)
            suffix = tags(tail)
        kept, flex = tags(head), tags(rest)
    else:
        all_tags = tags(caption)
        kept, flex = all_tags[:keep_tokens], all_tags[keep_tokens:]
    if shuffle and len(flex) > 1:
        flex = [flex[i] for i in torch.randperm(len(flex), generator=generator).tolist()]
    if tag_dropout > 0 and flex:
        keep = (torch.rand(len(flex), generator=generator) >= tag_dropout).tolist()
        flex = [tag for tag, kept_tag in zip(flex, keep, strict=True) if kept_tag]
    return ", ".join(kept + flex + suffix)
