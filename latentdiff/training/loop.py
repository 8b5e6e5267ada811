"""The training loop every script runs, around the script's task (its models and its loss).

A task (``TextToImage``, ``AutoencoderTraining``) brings what the loop needs: ``dataloader``, ``trained``
(the prepared modules), ``optimizer``, ``lr_scheduler``, ``images_per_batch``, ``loss(batch, generator,
step) -> (loss, logs)``, ``update_ema()``, ``validate(step)`` (with the EMA weights; every process calls
it) and ``checkpoint_extra`` (None, or a function writing more into each checkpoint folder).
``train`` is the loop itself: every step of it is in its body.
"""

from __future__ import annotations

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger

from latentdiff.training.checkpointing import (
    TrainClock,
    load_checkpoint,
    resolve_resume,
    resumed_batches,
    save_checkpoint,
)
from latentdiff.training.progress import check_finite, progress_bar
from latentdiff.training.run import images_per_step, step_generator

# INFO on every process, so that main_process_only=False lines show on all of them
logger = get_logger(__name__, log_level="INFO")


def train(accelerator: Accelerator, args, task) -> TrainingLoop:
    """Train ``task`` from its resumed step to --max_train_steps or --max_train_minutes; return the loop's state.

    Exact resume: N steps, a kill and a resume to 2N give the weights of 2N steps in one go, since the
    checkpoint restores weights, optimizer, LR schedule, EMA and RNG, ``resumed_batches`` the data
    position, and each micro-batch's noise comes from a generator seeded by (seed, micro-batch, process).
    The last step is always checkpointed and validated, so rerunning a finished command trains nothing.
    """
    loop = TrainingLoop(accelerator, args, task.images_per_batch)  # restores the checkpoint it resumes
    for batch in loop.batches(task.dataloader):
        with accelerator.accumulate(*task.trained):
            loss, logs = task.loss(batch, loop.generator(), loop.global_step)
            loop.step(loss, logs, task.optimizer, task.lr_scheduler)  # backward; at a window's end, the update
        if not accelerator.sync_gradients:
            continue
        task.update_ema()
        loop.log(task.lr_scheduler)
        if loop.done() or loop.global_step % args.checkpointing_steps == 0:
            save_checkpoint(accelerator, args.output_dir, loop.global_step, extra=task.checkpoint_extra, state=loop.state())
        if loop.done() or loop.global_step % args.validation_steps == 0:
            task.validate(loop.global_step)  # with the EMA weights
        if loop.done():
            break
    loop.close(task.trained)
    return loop


class TrainingLoop:
    """The state of a run between optimizer steps: the step count, the data position, the time budget, the
    losses of the current accumulation window, the progress bar."""

    def __init__(self, accelerator: Accelerator, args, images_per_batch: int | None = None):
        self.accelerator, self.args = accelerator, args
        resumed_from = resolve_resume(args)
        self.global_step = load_checkpoint(accelerator, resumed_from) if resumed_from else 0
        self.first_step, self.micro_step, self.skipped = self.global_step, 0, 0
        self.clock = TrainClock(accelerator, args.max_train_minutes, resumed_from)
        self.images_per_step = images_per_step(args, accelerator, images_per_batch)
        self.window: list[tuple[float, dict]] = []
        self.bar = progress_bar(accelerator, args.max_train_steps, self.global_step)
        self._out_of_time = self.clock.out_of_time()

    def batches(self, dataloader):
        """The batches from the resumed data position on (none when the step count or the time is spent)."""
        return () if self._out_of_time else resumed_batches(self.accelerator, dataloader, self.args, self.global_step)

    def generator(self) -> torch.Generator:
        """The randomness of this micro-batch (noise, timesteps, caption dropout), seeded by (seed, micro-batch, process)."""
        batch_index = self.global_step * self.args.gradient_accumulation_steps + self.micro_step
        return step_generator(self.args.seed, batch_index, self.accelerator)

    def step(self, loss: torch.Tensor, logs: dict, optimizer, lr_scheduler) -> None:
        """Backward and, at the end of an accumulation window, the optimizer step (``optimizer_step``)."""
        if optimizer_step(self.accelerator, loss, optimizer, lr_scheduler, self.args, self.global_step + 1):
            self.window.append((loss.item(), logs))
        else:
            self.skipped += 1
            logger.warning(f"step {self.global_step + 1}: non-finite loss, batch skipped ({self.skipped} so far)")
        self.micro_step += 1
        if self.accelerator.sync_gradients:
            self.global_step, self.micro_step = self.global_step + 1, 0
            self._out_of_time = self.clock.out_of_time()

    def log(self, lr_scheduler) -> None:
        """The window's mean loss (and logs) over micro-batches and processes: the bar, TensorBoard."""
        losses = [loss for loss, _ in self.window] or [0.0]
        loss = self.accelerator.reduce(torch.tensor(sum(losses) / len(losses), device=self.accelerator.device), "mean").item()
        logs = {key: sum(d[key] for _, d in self.window) / len(self.window) for key in (self.window[0][1] if self.window else {})}
        self.window = []
        lr = lr_scheduler.get_last_lr()[0]
        self.bar.step(loss, lr, self.images_per_step)
        metrics = {"train/loss": loss, "train/lr": lr, "train/skipped": self.skipped, **{f"train/{k}": v for k, v in logs.items()}}
        self.accelerator.log(metrics, step=self.global_step)

    def done(self) -> bool:
        """--max_train_steps reached, or --max_train_minutes spent (on any process: all stop together)."""
        return self.global_step >= self.args.max_train_steps or self._out_of_time

    def state(self) -> dict:
        """What a checkpoint stores beside the step: the training time so far, for --max_train_minutes."""
        return {"train_seconds": self.clock.seconds()}

    def close(self, trained) -> None:
        self.bar.close()
        log_replica_checksum(self.accelerator, trained, self.global_step, self.skipped)

    @property
    def trained_now(self) -> int:
        """Optimizer steps this run made (0 for a rerun of a finished run)."""
        return self.global_step - self.first_step


def optimizer_step(
    accelerator: Accelerator, loss: torch.Tensor, optimizer, lr_scheduler, args, step: int
) -> bool:
    """Backward, clip (when gradients sync), step and zero the gradients; False, and no update, for a
    non-finite loss under --nan_policy skip. Checked before backward: a NaN never reaches the weights.

    Only the first param group is clipped (the model's; train_vae's discriminator is the second). The
    LR schedule steps on a skipped batch too: the learning rate stays a function of the step count.
    """
    finite = check_finite(loss, step, args.nan_policy)
    if finite:
        accelerator.backward(loss)
        if accelerator.sync_gradients and args.max_grad_norm > 0:
            accelerator.clip_grad_norm_(optimizer.param_groups[0]["params"], args.max_grad_norm)
        optimizer.step()
    lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return finite


def log_replica_checksum(accelerator: Accelerator, models, step: int, skipped: int) -> float:
    """Log (on every process) the sum of the trained weights: with data parallelism the replicas must agree
    to the last bit."""
    checksum = sum(p.detach().double().sum().item() for m in models for p in m.parameters() if p.requires_grad)
    logger.info(
        f"process {accelerator.process_index} of {accelerator.num_processes}: step {step}, "
        f"{skipped} batches skipped, weights checksum {checksum!r}",
        main_process_only=False,
    )
    return checksum
