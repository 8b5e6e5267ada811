"""Setting up a run: the Accelerator, the run-kind marker, optimizer, LR schedule, step plan.

Step arithmetic, once for every script: a "step" is an optimizer step. With B images per process,
A accumulation steps and P processes, one step consumes A batches per process and B * A * P images.
An epoch of N (per-process, after `accelerator.prepare`) batches holds ceil(N / A) steps.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import accelerate
import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import (
    DataLoaderConfiguration,
    DistributedType,
    ProjectConfiguration,
    parse_flag_from_env,
    set_seed,
)
from diffusers.optimization import get_scheduler

import latentdiff
from latentdiff.data.nodes import output_on_each_node

RUN_FILE = "latentdiff_run.json"

logger = logging.getLogger(__name__)


def check_run_kind(output_dir: str | Path, run_kind: str) -> None:
    """Refuse an output dir that holds another kind of run, or a model folder that is not a run at all."""
    output_dir = Path(output_dir)
    marker = output_dir / RUN_FILE
    if marker.is_file():
        found = json.loads(marker.read_text()).get("kind")
        if found != run_kind:
            raise ValueError(
                f"--output_dir {str(output_dir)!r} holds a {found!r} run, not a {run_kind!r} run: "
                "choose another --output_dir"
            )
    elif (output_dir / "model_index.json").is_file() or (output_dir / "config.json").is_file():
        raise ValueError(
            f"--output_dir {str(output_dir)!r} holds a saved model, not a training run: choose another --output_dir"
        )


def make_accelerator(args, run_kind: str) -> Accelerator:
    """An Accelerator for this run; seeds everything and marks output_dir as a run of `run_kind`.

    Machines that do not share output_dir (each its own disk) each write the whole run into theirs: accelerate's
    ``save_on_each_node`` is set, and :func:`writes_output` names the one process of each machine that writes.
    """
    check_run_kind(args.output_dir, run_kind)
    report = args.report_to if args.report_to != "none" else None
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=report,
        project_config=ProjectConfiguration(
            project_dir=args.output_dir,
            logging_dir=str(Path(args.output_dir) / args.logging_dir),
            total_limit=args.checkpoints_total_limit,
        ),
        # the data order becomes a function of (seed, epoch): what exact resume needs
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
    )
    if parse_flag_from_env("ACCELERATE_USE_FSDP") and accelerator.distributed_type != DistributedType.FSDP:
        raise ValueError(
            f"the accelerate config asks for FSDP, but accelerate {accelerate.__version__} runs FSDP only across several "
            f"GPU (or other accelerator) processes: here ({accelerator.distributed_type.value}, {accelerator.num_processes} "
            "process(es)) each would train a whole copy without a word; use a config without FSDP on a CPU "
            "(tests/accelerate_cpu.yaml, or --multi_gpu with ACCELERATE_USE_CPU=true)"
        )
    # our notes (saved checkpoint, resumed at step) on the main process; other libraries' warnings only
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    logging.getLogger("latentdiff").setLevel(logging.INFO if accelerator.is_main_process else logging.WARNING)
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    set_seed(args.seed)
    # found out, not a flag: a checkpoint written on the main machine only cannot resume on the others
    accelerator.project_configuration.save_on_each_node = output_on_each_node(accelerator, args.output_dir)
    if accelerator.project_configuration.save_on_each_node:
        if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            raise ValueError(
                f"--output_dir {args.output_dir!r} is not shared between the machines, and {accelerator.distributed_type.value} "
                "checkpoints are written in parts by the processes of all machines (full weights by process 0 only): "
                "no machine would hold a checkpoint it can resume from. Give an --output_dir on a disk they all share"
            )
        logger.info("--output_dir %s is not shared between the machines: each writes its own checkpoints and pipeline", args.output_dir)
    if writes_output(accelerator):
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        marker = {"kind": run_kind, "latentdiff_version": latentdiff.__version__, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        (Path(args.output_dir) / RUN_FILE).write_text(json.dumps(marker, indent=2) + "\n")
    if report:
        accelerator.init_trackers(run_kind, config=_loggable(vars(args)))
    accelerator.wait_for_everyone()
    return accelerator


def writes_output(accelerator: Accelerator) -> bool:
    """Whether this process writes the run's files (checkpoints, the exported model) into its --output_dir: the
    main process, or the first process of each machine when the machines do not share it (``make_accelerator``)."""
    if accelerator.project_configuration.save_on_each_node:
        return accelerator.is_local_main_process
    return accelerator.is_main_process


@contextmanager
def saving_on_any_rank(pipeline) -> Iterator[None]:
    """Inside the block, the pipeline's transformers models save on whichever process calls ``save_pretrained``.

    transformers 5 writes a model on torch.distributed rank 0 only, and silently (``should_save_on_this_rank``):
    another machine's exported pipeline would get an empty text_encoder folder. Who writes is ours to decide
    (:func:`writes_output`).
    """
    models = [m for m in pipeline.components.values() if hasattr(m, "should_save_on_this_rank")]
    for model in models:
        model.should_save_on_this_rank = lambda is_main_process: is_main_process
    try:
        yield
    finally:
        for model in models:
            del model.should_save_on_this_rank


def _loggable(config: dict) -> dict:
    """TensorBoard's hparams take only numbers, strings and booleans."""
    return {k: v for k, v in config.items() if isinstance(v, (int, float, str, bool))}


def resolve_train_steps(args, num_batches_per_epoch: int) -> None:
    """Fill in args.max_train_steps and args.num_train_epochs from each other (max_train_steps wins).

    `num_batches_per_epoch` is len(train_dataloader) after `accelerator.prepare`, i.e. per process.
    """
    steps_per_epoch = math.ceil(num_batches_per_epoch / args.gradient_accumulation_steps)
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * steps_per_epoch
    args.num_train_epochs = math.ceil(args.max_train_steps / steps_per_epoch)


def make_optimizer(args, params) -> torch.optim.AdamW:
    """AdamW from the --adam_* flags; --scale_lr multiplies the LR by accumulation x batch x processes."""
    lr = args.learning_rate
    if args.scale_lr:
        lr *= args.gradient_accumulation_steps * args.train_batch_size * PartialState().num_processes
    return torch.optim.AdamW(
        params,
        lr=lr,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
        # one kernel over all parameters (README, "Training throughput": the optimizer column)
        fused=True,
    )


def make_lr_scheduler(args, optimizer: torch.optim.Optimizer, accelerator: Accelerator):
    """diffusers' `get_scheduler` with warmup and total counted in optimizer steps.

    Once prepared, Accelerate's AcceleratedScheduler steps the wrapped scheduler only on steps where
    gradients sync (so accumulation needs no correction) and then `num_processes` times (it assumes
    a length counted in single-process batches): hence both lengths are multiplied by num_processes.
    `args.max_train_steps` must be resolved first (`resolve_train_steps`).
    """
    if args.max_train_steps is None:
        raise ValueError("make_lr_scheduler needs args.max_train_steps: call resolve_train_steps first")
    return get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_train_steps * accelerator.num_processes,
    )


def count_parameters(model: torch.nn.Module) -> str:
    """Trainable / total parameters, e.g. "2.1M trainable of 2.1M"."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f"{trainable / 1e6:.2f}M trainable of {total / 1e6:.2f}M"


def images_per_step(args, accelerator: Accelerator, per_batch: int | None = None) -> int:
    """Images in one optimizer step: ``per_batch`` (default --train_batch_size) x accumulation x processes."""
    per_batch = args.train_batch_size if per_batch is None else per_batch
    return per_batch * args.gradient_accumulation_steps * accelerator.num_processes


def log_run_start(accelerator: Accelerator, args, dataset_len: int, **extra) -> None:
    """Print the plan of the run (on the main process): data, batch arithmetic, steps, and any extra lines."""
    lines = [
        f"examples: {dataset_len}",
        f"batch per process: {args.train_batch_size}, accumulation: {args.gradient_accumulation_steps}, "
        f"processes: {accelerator.num_processes} -> {images_per_step(args, accelerator)} images per optimizer step",
        f"optimizer steps: {args.max_train_steps} ({args.num_train_epochs} epochs)",
        f"mixed precision: {accelerator.mixed_precision}, device: {accelerator.device}",
    ]
    lines += [f"{key}: {value}" for key, value in extra.items()]
    accelerator.print("***** training *****\n  " + "\n  ".join(lines))


def step_generator(seed: int, step: int, accelerator: Accelerator) -> torch.Generator:
    """A generator for the noise of one optimizer step, seeded by (seed, step, process).

    Training noise drawn from the global RNG would depend on how many numbers the data loader drew
    before it (a resumed loader is created at another point), so exact resume draws from this.
    """
    generator = torch.Generator(device=accelerator.device)
    generator.manual_seed((seed * 1_000_003 + step) * 1009 + accelerator.process_index)
    return generator
