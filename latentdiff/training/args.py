"""The command-line flags every training script shares, in diffusers' naming, and their checks.

A script adds these with `add_common_args`, its own flags beside them, its own defaults with
`parser.set_defaults(...)`, and calls `check_common_args` before it builds anything, so that a bad
flag fails in the first second with a message naming the flag, the value and what is allowed.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from latentdiff.training.checkpointing import find_checkpoint, resolve_resume

LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
MIXED_PRECISIONS = ("no", "fp16", "bf16")
REPORT_TO = ("tensorboard", "none")
NAN_POLICIES = ("stop", "skip")


def add_common_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = parser.add_argument_group("training")
    g.add_argument("--output_dir", type=str, required=True, help="Run folder: checkpoints, logs, exported model.")
    g.add_argument("--seed", type=int, default=0, help="Seeds weights, data order and noise (0 is a seed too).")
    g.add_argument("--train_batch_size", type=int, default=16, help="Images per process per forward pass.")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument(
        "--max_train_steps", type=int, default=None, help="Optimizer steps; wins over --num_train_epochs."
    )
    g.add_argument("--num_train_epochs", type=int, default=None)
    g.add_argument(
        "--max_train_minutes",
        type=float,
        default=None,
        help="Also stop after this much training time, summed over resumed runs (the last step is checkpointed; "
        "a time-bounded run is not reproducible step for step).",
    )
    g.add_argument("--learning_rate", type=float, default=1e-4)
    g.add_argument(
        "--scale_lr",
        action="store_true",
        help="Multiply the learning rate by accumulation steps x batch size x number of processes.",
    )
    g.add_argument("--lr_scheduler", type=str, default="constant", choices=LR_SCHEDULERS)
    g.add_argument("--lr_warmup_steps", type=int, default=0, help="In optimizer steps.")
    g.add_argument("--adam_beta1", type=float, default=0.9)
    g.add_argument("--adam_beta2", type=float, default=0.999)
    g.add_argument("--adam_weight_decay", type=float, default=1e-2)
    g.add_argument("--adam_epsilon", type=float, default=1e-8)
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient clipping; 0 turns it off.")
    g.add_argument(
        "--mixed_precision",
        type=str,
        default=None,
        choices=MIXED_PRECISIONS,
        help="Defaults to the accelerate config's (`accelerate launch`), else no. Losses stay in fp32.",
    )
    g.add_argument("--allow_tf32", action="store_true", help="TF32 matmuls on Ampere+ GPUs.")
    g.add_argument("--checkpointing_steps", type=int, default=500, help="Save a checkpoint every N optimizer steps.")
    g.add_argument(
        "--checkpoints_total_limit", type=int, default=None, help="Keep at most this many checkpoints (newest kept)."
    )
    g.add_argument(
        "--resume_from_checkpoint",
        type=str,
        default=None,
        help='A checkpoint folder, a checkpoint name in output_dir/checkpoints, or "latest".',
    )
    g.add_argument("--use_ema", action="store_true", help="Keep an exponential moving average of the weights.")
    g.add_argument("--ema_decay", type=float, default=0.9999)
    g.add_argument("--validation_steps", type=int, default=500, help="Validate every N optimizer steps.")
    g.add_argument("--report_to", type=str, default="tensorboard", choices=REPORT_TO)
    g.add_argument("--logging_dir", type=str, default="logs", help="TensorBoard folder, relative to output_dir.")
    g.add_argument(
        "--nan_policy",
        type=str,
        default="stop",
        choices=NAN_POLICIES,
        help="On a non-finite loss: stop with an error, or skip that batch's update and count it.",
    )
    return parser


def effective_mixed_precision(args) -> str:
    """The precision the run will use: the flag, else what `accelerate launch` passes in the environment."""
    return args.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")


def check_common_args(args) -> None:
    """Raise ValueError / FileNotFoundError for flags that would fail later, naming flag, value and what is allowed."""
    positive = ["train_batch_size", "gradient_accumulation_steps", "checkpointing_steps", "validation_steps"]
    positive += [n for n in ("max_train_steps", "num_train_epochs", "checkpoints_total_limit") if getattr(args, n) is not None]
    for name in positive:
        value = getattr(args, name)
        if value is None or value < 1:
            raise ValueError(f"--{name} must be a positive integer, got {value!r}")
    if args.max_train_steps is None and args.num_train_epochs is None:
        raise ValueError("give --max_train_steps or --num_train_epochs: neither was set")
    if args.max_train_minutes is not None and not args.max_train_minutes > 0:
        raise ValueError(f"--max_train_minutes must be > 0, got {args.max_train_minutes!r}")
    if not args.learning_rate > 0:
        raise ValueError(f"--learning_rate must be > 0, got {args.learning_rate!r}")
    if args.lr_warmup_steps < 0:
        raise ValueError(f"--lr_warmup_steps must be >= 0, got {args.lr_warmup_steps!r}")
    if args.max_grad_norm < 0:
        raise ValueError(f"--max_grad_norm must be >= 0 (0 turns clipping off), got {args.max_grad_norm!r}")
    if not 0 < args.ema_decay < 1:
        raise ValueError(f"--ema_decay must lie in (0, 1), got {args.ema_decay!r}")
    precision = effective_mixed_precision(args)
    if precision not in MIXED_PRECISIONS:
        raise ValueError(f"--mixed_precision {precision!r} is not one of {', '.join(MIXED_PRECISIONS)}")
    if precision == "fp16" and not torch.cuda.is_available():
        raise ValueError(
            "--mixed_precision fp16 needs a CUDA GPU and this machine has none: use bf16 (CPU autocast) or no"
        )
    resume = args.resume_from_checkpoint
    if resume and resume != "latest":
        if find_checkpoint(args.output_dir, resume) is None:
            raise FileNotFoundError(
                f"--resume_from_checkpoint {resume!r} does not exist (neither as a path nor as "
                f"{str(Path(args.output_dir) / 'checkpoints' / resume)!r}); give a checkpoint folder or 'latest'"
            )
        resolve_resume(args)  # a damaged checkpoint is refused here, before any model is built

