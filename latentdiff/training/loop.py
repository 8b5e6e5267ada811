"""The loop every training script shares, around the script's own loss.

    loop = TrainingLoop(accelerator, args, resume_step(accelerator, args), optimizer, lr_scheduler, trained,
                        emas, ema_targets, validate)
    for batch, generator in loop.batches(train_dataloader):
        with accelerator.accumulate(*trained):
            loss = ...  # the script's own, drawing its noise and timesteps from `generator`
            loop.step(loss)

``batches`` resumes at the data position of ``global_step``, hands out one generator per micro-batch
seeded by (seed, micro-batch, process) so a resumed run draws what an unbroken one would, and after
each optimizer step does the bookkeeping: EMA, the loss averaged over the accumulation window and
the processes, the progress bar and logs, checkpoints (``checkpoint_extra`` writes more into each)
and validation. It stops after ``--max_train_steps`` or ``--max_train_minutes`` (training time summed
over resumed runs), checkpoints and validates the last step if that was not a regular one (so a
rerun of a finished run has nothing left to do), and logs a checksum of the trained weights per
process (replicas must agree).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger

from latentdiff.training.checkpointing import TrainClock, resolve_resume, resumed_batches, save_checkpoint
from latentdiff.training.finetune import log_replica_checksum, optimizer_step
from latentdiff.training.progress import progress_bar
from latentdiff.training.run import images_per_step, step_generator

logger = get_logger(__name__, log_level="INFO")


class TrainingLoop:
    def __init__(
        self,
        accelerator: Accelerator,
        args,
        global_step: int,
        optimizer: torch.optim.Optimizer,
        lr_scheduler,
        trained: Sequence[torch.nn.Module],
        emas: Sequence = (),
        ema_targets: Sequence[torch.nn.Module] = (),
        validate: Callable[[int], object] | None = None,
        checkpoint_extra: Callable[[Path], object] | None = None,
        images_per_batch: int | None = None,
    ):
        self.accelerator, self.args, self.global_step = accelerator, args, global_step
        self.images_per_step, self.trained = images_per_step(args, accelerator, images_per_batch), trained
        self.optimizer, self.lr_scheduler = optimizer, lr_scheduler
        self.emas, self.ema_targets = emas, ema_targets
        self.validate, self.checkpoint_extra = validate, checkpoint_extra
        self.micro_step, self.window_losses, self.skipped = 0, [], 0

    def batches(self, dataloader) -> Iterator[tuple[dict, torch.Generator]]:
        """(batch, generator) per micro-batch, from the resumed position to --max_train_steps."""
        accelerator, args = self.accelerator, self.args
        # nothing has been saved since the scripts resumed, so this is the checkpoint they resumed from
        self.clock = TrainClock(accelerator, getattr(args, "max_train_minutes", None), resolve_resume(args))
        bar = progress_bar(accelerator, args.max_train_steps, self.global_step)
        first_step = self.global_step
        batches = () if self.clock.out_of_time() else resumed_batches(accelerator, dataloader, args, self.global_step)
        for batch in batches:
            batch_index = self.global_step * args.gradient_accumulation_steps + self.micro_step
            yield batch, step_generator(args.seed, batch_index, accelerator)
            if not accelerator.sync_gradients:
                self.micro_step += 1
                continue
            self._end_of_step(bar)
            if self.global_step >= args.max_train_steps or self.clock.out_of_time():
                break
        bar.close()
        trained_now = self.global_step > first_step
        if trained_now and self.global_step % args.checkpointing_steps:
            self._save_checkpoint()
        log_replica_checksum(accelerator, self.trained, self.global_step, self.skipped)
        if trained_now and self._validating() and self.global_step % args.validation_steps:
            self.validate(self.global_step)

    def step(self, loss: torch.Tensor) -> None:
        """Backward and (at the end of an accumulation window) the optimizer step; a non-finite loss is
        checked before backward, so it never reaches the weights: stopped, or skipped with --nan_policy skip."""
        if optimizer_step(self.accelerator, loss, self.optimizer, self.lr_scheduler, self.args, self.global_step + 1):
            self.window_losses.append(loss.item())
        else:
            self.skipped += 1
            logger.warning(f"step {self.global_step + 1}: non-finite loss, batch skipped ({self.skipped} so far)")

    def _save_checkpoint(self) -> None:
        save_checkpoint(self.accelerator, self.args.output_dir, self.global_step, extra=self.checkpoint_extra,
                        state={"train_seconds": self.clock.seconds()})

    def _validating(self) -> bool:
        return self.validate is not None and bool(getattr(self.args, "validation_prompts", None))

    def _end_of_step(self, bar) -> None:
        accelerator, args = self.accelerator, self.args
        self.global_step, self.micro_step = self.global_step + 1, 0
        for ema, target in zip(self.emas, self.ema_targets, strict=False):
            ema.step(target.parameters())
        window_loss = sum(self.window_losses) / max(len(self.window_losses), 1)
        loss = accelerator.reduce(torch.tensor(window_loss, device=accelerator.device), "mean").item()
        self.window_losses = []
        lr = self.lr_scheduler.get_last_lr()[0]
        bar.step(loss, lr, self.images_per_step)
        accelerator.log({"train/loss": loss, "train/lr": lr, "train/skipped": self.skipped}, step=self.global_step)
        if self.global_step % args.checkpointing_steps == 0:
            self._save_checkpoint()
        if self._validating() and self.global_step % args.validation_steps == 0:
            self.validate(self.global_step)
