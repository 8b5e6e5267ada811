"""What a run shows while it trains: a progress bar, the NaN guard, image grids for validation."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import torch.distributed as dist
from accelerate import Accelerator
from tqdm.auto import tqdm

from latentdiff.images import image_grid, save_png


class TrainingBar(tqdm):
    """tqdm over optimizer steps that also shows the loss, the learning rate and images per second."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.images_per_second, self._last = None, time.perf_counter()

    def step(self, loss: float, lr: float, images: int) -> None:
        """Advance one optimizer step that consumed `images` images (summed over processes)."""
        now = time.perf_counter()
        rate, self._last = images / max(now - self._last, 1e-9), now
        # smoothed like tqdm's own rate, so one slow step (a validation) does not dominate
        self.images_per_second = rate if self.images_per_second is None else 0.9 * self.images_per_second + 0.1 * rate
        self.update(1)
        self.set_postfix(loss=f"{loss:.4g}", lr=f"{lr:.3g}", img_s=f"{self.images_per_second:.1f}")


def progress_bar(accelerator: Accelerator, total: int, initial: int = 0) -> TrainingBar:
    """A bar over `total` optimizer steps starting at `initial` (a resumed run), shown on the main process only."""
    return TrainingBar(total=total, initial=initial, desc="steps", disable=not accelerator.is_local_main_process)


def check_finite(loss: torch.Tensor, step: int, policy: str) -> bool:
    """True when the loss is finite on every process; else raise ("stop") or return False ("skip").

    Call it before `backward`: a non-finite loss then never reaches the weights, so no checkpoint of
    NaN weights is written. Under several processes the verdict is agreed (all-reduced), so that all
    of them skip together and DDP's gradient all-reduce stays matched.
    """
    finite = torch.isfinite(loss.detach()).all().to(torch.int32)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    if finite.item():
        return True
    if policy == "stop":
        raise FloatingPointError(
            f"the loss is not finite (value {loss.detach().float().flatten()[:1].item()}) at step {step}; "
            "lower --learning_rate, use --mixed_precision no, or pass --nan_policy skip"
        )
    if policy != "skip":
        raise ValueError(f"nan policy {policy!r} is not one of 'stop', 'skip'")
    return False


def save_image_grid(images: torch.Tensor, nrow: int, path: str | Path) -> PIL.Image.Image:
    """Write (N, 3, H, W) images in [-1, 1] as a grid PNG, `nrow` images per row, atomically; return the grid."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid = image_grid(images, ncols=nrow)
    save_png(grid, path)
    return grid


def log_images(accelerator: Accelerator, tag: str, grid: PIL.Image.Image, step: int) -> None:
    """Send an image grid to TensorBoard, when the run reports there."""
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image(tag, np.asarray(grid), step, dataformats="HWC")
