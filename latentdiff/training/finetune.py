"""What the scripts that train a text-to-image UNet share: flags, the pipeline they start from, the inputs of a
training step, the optimizer update, validation.

train_ldm.py trains from presets or a pipeline folder; finetune_lora.py and train_dreambooth.py start from a
pipeline folder. Each script keeps its own loop (it reads top to bottom); the pieces below are the ones that
would otherwise be copied between them.
"""

from __future__ import annotations

import argparse
import importlib.util
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from diffusers import AutoencoderKL

from latentdiff.data import cache_latents, sample_latent
from latentdiff.presets import vae_scale_factor
from latentdiff.schedulers import DDPMScheduler
from latentdiff.text import tokenize
from latentdiff.training.diffusion_loss import drop_captions, drop_text_states
from latentdiff.training.ema import ema_weights
from latentdiff.training.progress import check_finite
from latentdiff.training.validation import build_pipeline, log_validation

# INFO on every process, so that main_process_only=False lines show on all of them
logger = get_logger(__name__, log_level="INFO")


# --- flags -----------------------------------------------------------------------------------


def add_validation_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    v = parser.add_argument_group("validation")
    v.add_argument(
        "--validation_prompts",
        nargs="*",
        help="Prompts sampled every --validation_steps (one grid row each).",
    )
    v.add_argument("--num_validation_images", type=int, default=4, help="Images per validation prompt.")
    v.add_argument("--validation_inference_steps", type=int, default=25)
    v.add_argument("--validation_guidance_scale", type=float, default=7.5)
    return parser


def check_validation_args(args: argparse.Namespace) -> None:
    if args.validation_prompts is not None and not args.validation_prompts:
        raise ValueError(
            "--validation_prompts was given without any prompt; give at least one or leave the flag out"
        )
    if args.num_validation_images < 1:
        raise ValueError(f"--num_validation_images must be at least 1, got {args.num_validation_images}")
    if args.validation_inference_steps < 1:
        raise ValueError(
            f"--validation_inference_steps must be at least 1, got {args.validation_inference_steps}"
        )


def add_finetune_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags of a script that continues from a pipeline folder: the folder, the loss, speed, validation."""
    m = parser.add_argument_group("model")
    m.add_argument(
        "--pretrained_model_name_or_path",
        required=True,
        help="The pipeline folder to fine-tune (model_index.json + vae/, text_encoder/, tokenizer/, unet/, scheduler/).",
    )
    m.add_argument(
        "--train_text_encoder",
        action="store_true",
        help="Train the text encoder too (it stays frozen otherwise).",
    )
    return add_loss_and_speed_args(parser)


def add_loss_and_speed_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The loss options, speed switches and validation flags of every text-to-image script."""
    d = parser.add_argument_group("loss")
    d.add_argument(
        "--snr_gamma", type=float, help="Min-SNR-gamma loss weighting (Hang et al. 2023); 5.0 is usual."
    )
    d.add_argument(
        "--noise_offset", type=float, default=0.0, help="Offset noise (Guttenberg 2023); 0.05-0.1 is usual."
    )
    e = parser.add_argument_group("speed")
    e.add_argument(
        "--cache_latents",
        action="store_true",
        help="Encode the images once with the frozen VAE (and the frozen text encoder) before training.",
    )
    e.add_argument("--gradient_checkpointing", action="store_true")
    e.add_argument("--enable_xformers_memory_efficient_attention", action="store_true")
    return add_validation_args(parser)


def check_pipeline_folder(path: str, flag: str = "--pretrained_model_name_or_path") -> None:
    if not (Path(path) / "model_index.json").is_file():
        raise FileNotFoundError(
            f"{flag} {path!r} is not a pipeline folder (no model_index.json): give a folder written by "
            "train_ldm.py (output_dir/pipeline) or LatentDiffPipeline.save_pretrained"
        )


def check_finetune_args(args: argparse.Namespace) -> None:
    """Raise for the flags of `add_finetune_args` that would fail later, naming flag, value and what is allowed."""
    check_pipeline_folder(args.pretrained_model_name_or_path)
    check_loss_and_speed_args(args)
    check_validation_args(args)


def check_loss_and_speed_args(args: argparse.Namespace) -> None:
    """Raise for the flags of `add_loss_and_speed_args` that would fail later."""
    if args.snr_gamma is not None and not args.snr_gamma > 0:
        raise ValueError(f"--snr_gamma must be > 0, got {args.snr_gamma}")
    if args.noise_offset < 0:
        raise ValueError(f"--noise_offset must be >= 0, got {args.noise_offset}")
    if args.enable_xformers_memory_efficient_attention and importlib.util.find_spec("xformers") is None:
        raise ValueError(
            "--enable_xformers_memory_efficient_attention needs the xformers package (CUDA only), "
            "which is not installed: pip install xformers, or leave the flag out (PyTorch SDPA is used)"
        )


# --- models ----------------------------------------------------------------------------------


def training_scheduler(config: Mapping, **overrides) -> DDPMScheduler:
    """The forward process a UNet was trained under, from a scheduler config (a pipeline's, whatever its class),
    with `overrides` that are not None applied."""
    config = {**config, **{k: v for k, v in overrides.items() if v is not None}}
    scheduler = DDPMScheduler(
        num_train_timesteps=config["num_train_timesteps"],
        beta_start=config["beta_start"],
        beta_end=config["beta_end"],
        beta_schedule=config["beta_schedule"],
        trained_betas=config.get("trained_betas"),
        prediction_type=config.get("prediction_type", "epsilon"),
        rescale_betas_zero_snr=config.get("rescale_betas_zero_snr", False),
    )
    if scheduler.config.rescale_betas_zero_snr and scheduler.config.prediction_type == "epsilon":
        raise ValueError(
            "zero terminal SNR with prediction_type 'epsilon' cannot recover x_0 at t = T "
            "(Lin et al. 2024 §3.2): add --prediction_type v_prediction"
        )
    return scheduler


def native_resolution(vae: AutoencoderKL, unet) -> int:
    """The image side a pipeline samples by default: the UNet's sample size in pixels."""
    return unet.config.sample_size * vae_scale_factor(vae)


def check_models(vae, text_encoder, unet, resolution: int) -> None:
    """The three networks must fit together and the resolution must suit the VAE."""
    if (
        vae.config.latent_channels != unet.config.in_channels
        or vae.config.latent_channels != unet.config.out_channels
    ):
        raise ValueError(
            f"the VAE has {vae.config.latent_channels} latent channels but the UNet takes "
            f"{unet.config.in_channels} and predicts {unet.config.out_channels}: use a VAE and "
            "a UNet made for the same latent space"
        )
    if text_encoder.config.hidden_size != unet.config.cross_attention_dim:
        raise ValueError(
            f"the text encoder's hidden size is {text_encoder.config.hidden_size} but the UNet's "
            f"cross_attention_dim is {unet.config.cross_attention_dim}: pick matching presets "
            "(e.g. the same name for --unet_preset and --text_encoder_preset)"
        )
    factor = vae_scale_factor(vae)
    if resolution % factor:
        raise ValueError(
            f"--resolution {resolution} is not a multiple of the VAE's downsampling factor {factor}: "
            f"use e.g. {max(factor, resolution // factor * factor)}"
        )


def weight_dtype(accelerator: Accelerator) -> torch.dtype:
    """The dtype frozen weights can be held in under the run's mixed precision (trained ones stay fp32)."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


# --- data and the inputs of a step ------------------------------------------------------------


def maybe_cache(args, dataset, accelerator: Accelerator, vae, text_encoder, tokenizer, cache_text: bool):
    """With --cache_latents, `dataset` encoded once by the frozen VAE (and text encoder, when `cache_text`),
    and the states of "" (1, L, D) for captions dropped from cached text; else `dataset` and None."""
    if not args.cache_latents:
        return dataset, None
    text = {"text_encoder": text_encoder, "tokenizer": tokenizer} if cache_text else {}
    dataset = cache_latents(dataset, vae, cache_dir=args.data_cache_dir, accelerator=accelerator, **text)
    empty = dataset.null_encoder_hidden_states
    return dataset, None if empty is None else empty[None].to(accelerator.device)


def latents_from_batch(batch: dict, vae: AutoencoderKL, generator: torch.Generator) -> torch.Tensor:
    """z ~ q(z | x) scaled to unit variance (LDM §4.3.2), from pixels or from a cached mean and std, (B, C, h, w)."""
    if "latent_mean" in batch:
        latents = sample_latent(batch["latent_mean"].float(), batch["latent_std"].float(), generator)
    else:
        with torch.no_grad():
            latents = vae.encode(batch["pixel_values"].float()).latent_dist.sample(generator)
    return latents * vae.config.scaling_factor


def text_states_from_batch(
    batch: dict,
    tokenizer,
    text_encoder,
    empty_states: torch.Tensor | None,
    proportion_empty: float,
    generator: torch.Generator,
    train_text_encoder: bool,
) -> torch.Tensor:
    """The UNet's cross-attention context (B, L, D), some captions dropped to "" for classifier-free guidance."""
    if "encoder_hidden_states" in batch:  # cached by the frozen text encoder
        return drop_text_states(
            batch["encoder_hidden_states"].float(), empty_states, proportion_empty, generator
        )
    captions = drop_captions(list(batch["text"]), proportion_empty, generator)
    input_ids = tokenize(tokenizer, captions).to(generator.device)  # (B, L)
    with torch.set_grad_enabled(train_text_encoder):
        return text_encoder(input_ids)[0]  # (B, L, D)


# --- the update, validation, the end of a run -------------------------------------------------


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


@contextmanager
def averaged_weights(emas: list, models: list) -> Iterator[None]:
    """Inside the block each trained model holds its EMA weights (nothing changes without --use_ema)."""
    with ExitStack() as stack:
        for ema, model in zip(emas, models, strict=False):
            stack.enter_context(ema_weights(ema, model))
        yield


def validate(
    accelerator: Accelerator, args, step: int, components: dict, resolution: int,
    emas: Sequence = (), averaged: Sequence = (),
) -> None:  # fmt: skip
    """Sample the --validation_prompts grid with `components` (the arguments of `build_pipeline`: vae,
    text_encoder, tokenizer, unet, noise_scheduler), the EMA weights swapped into the `averaged` models;
    every process calls it, the main process samples."""
    if accelerator.is_main_process:
        with averaged_weights(list(emas), [accelerator.unwrap_model(m) for m in averaged]):
            pipeline = build_pipeline(accelerator, **components)
            log_validation(
                accelerator, pipeline, args.validation_prompts, step, args.output_dir,
                num_images=args.num_validation_images, seed=args.seed, resolution=resolution,
                num_inference_steps=args.validation_inference_steps, guidance_scale=args.validation_guidance_scale,
            )  # fmt: skip
    accelerator.wait_for_everyone()


def log_replica_checksum(accelerator: Accelerator, models: list, step: int, skipped: int) -> float:
    """Log (on every process) the sum of the trained weights: with data parallelism the replicas must agree
    to the last bit."""
    checksum = sum(
        p.detach().double().sum().item() for m in models for p in m.parameters() if p.requires_grad
    )
    logger.info(
        f"process {accelerator.process_index} of {accelerator.num_processes}: step {step}, "
        f"{skipped} batches skipped, weights checksum {checksum!r}",
        main_process_only=False,
    )
    return checksum
