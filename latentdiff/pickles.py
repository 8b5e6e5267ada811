"""Pickle weight files, which can run arbitrary code when loaded: a folder that has nothing else is
refused (pipeline components, CLIP feature nets) unless its user says they trust it."""

from __future__ import annotations

from collections.abc import Iterable

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pickle", ".pkl", ".pt", ".pth")


def pickle_only(names: Iterable[str]) -> list[str]:
    """The pickle files among file ``names``, sorted, when none of them is a safetensors file; else []."""
    names = list(names)
    if any(name.endswith(".safetensors") for name in names):
        return []
    return sorted(name for name in names if name.lower().endswith(PICKLE_SUFFIXES))
