"""An exponential moving average of a model's weights, checkpointed with the run and exported in its place.

diffusers' EMAModel does the averaging, with its warmup decay min(decay, (1 + n) / (10 + n)) after n
updates. What it lacks for checkpointing through `accelerator.register_for_checkpointing` is kept here:
Accelerate loads registered state onto the CPU, so the shadow weights go back to their device on load.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from diffusers.training_utils import EMAModel


class EMA(EMAModel):
    """EMAModel whose shadow weights stay on their device across `load_state_dict`."""

    def load_state_dict(self, state_dict: dict) -> None:
        device = self.shadow_params[0].device
        super().load_state_dict(state_dict)
        self.to(device)


def make_ema(args, model: torch.nn.Module) -> EMA:
    """An EMA of `model`'s parameters (on their device) with decay --ema_decay; register it for checkpointing."""
    return EMA(model.parameters(), decay=args.ema_decay, foreach=True)


@contextmanager
def ema_weights(ema: EMA | None, model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Inside the block `model` holds the averaged weights (for validation); the trained ones come back after."""
    if ema is None:
        yield model
        return
    ema.store(model.parameters())
    ema.copy_to(model.parameters())
    try:
        yield model
    finally:
        ema.restore(model.parameters())
