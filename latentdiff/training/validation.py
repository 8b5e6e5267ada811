"""Sampling from a text-to-image model while it trains, and writing it out as a pipeline folder.

Both use the training components themselves (no copy of the weights): the caller swaps the EMA
weights in with `ema_weights` around these calls. Sampling uses our DDIMScheduler on the training
schedule, so the exported folder samples exactly the noise process the UNet learned.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
from accelerate import Accelerator

from latentdiff.pipelines import LatentDiffPipeline
from latentdiff.presets import sd_scheduler
from latentdiff.schedulers import DDIMScheduler
from latentdiff.training.ema import ema_weights
from latentdiff.training.progress import log_images, save_image_grid
from latentdiff.training.run import saving_on_any_rank

logger = logging.getLogger(__name__)

VALIDATION_DIR = "validation"
PIPELINE_DIR = "pipeline"


def sampling_scheduler(noise_scheduler) -> DDIMScheduler:
    """Our DDIMScheduler with the training schedule: the same betas, prediction type and zero-SNR rescale.

    With zero terminal SNR the sampler must start at t = T - 1, where alpha_bar = 0, so timesteps are
    spaced "trailing" (Lin et al. 2024 §3.3); otherwise Stable Diffusion's "leading" spacing.
    """
    cfg = noise_scheduler.config
    return sd_scheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_start=cfg.beta_start,
        beta_end=cfg.beta_end,
        beta_schedule=cfg.beta_schedule,
        trained_betas=cfg.trained_betas,
        prediction_type=cfg.prediction_type,
        rescale_betas_zero_snr=cfg.rescale_betas_zero_snr,
        timestep_spacing="trailing" if cfg.rescale_betas_zero_snr else "leading",
    )


@contextmanager
def averaged_weights(emas: Sequence, models: Sequence) -> Iterator[None]:
    """Inside the block each trained model holds its EMA weights (nothing changes without --use_ema)."""
    with ExitStack() as stack:
        for ema, model in zip(emas, models, strict=False):
            stack.enter_context(ema_weights(ema, model))
        yield


def build_pipeline(
    accelerator: Accelerator, vae, text_encoder, tokenizer, unet, noise_scheduler, pipeline_class=LatentDiffPipeline
) -> LatentDiffPipeline:
    """A LatentDiffPipeline (or ``pipeline_class``) over the (unwrapped) training components and a DDIM sampler of
    the training schedule."""
    pipeline = pipeline_class(
        vae=vae,
        text_encoder=accelerator.unwrap_model(text_encoder),
        tokenizer=tokenizer,
        unet=accelerator.unwrap_model(unet),
        scheduler=sampling_scheduler(noise_scheduler),
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@torch.no_grad()
def log_validation(
    accelerator: Accelerator,
    pipeline: LatentDiffPipeline,
    prompts: list[str],
    step: int,
    output_dir: str | Path,
    num_images: int = 4,
    seed: int = 0,
    resolution: int | None = None,
    num_inference_steps: int = 25,
    guidance_scale: float = 7.5,
    height: int | None = None,
    width: int | None = None,
    **call_kwargs,
) -> Path | None:
    """Sample `num_images` images per prompt (one row each) into output_dir/validation/step-XXXXXX.png and
    TensorBoard, at ``height`` x ``width`` (default: ``resolution`` square); on the main process only (the others return None at once). ``call_kwargs`` go to the
    pipeline as they are (an inpainting model's ``image`` and ``mask_image``).

    Each prompt's noise comes from a generator seeded with `seed`, so the grids of successive steps show
    the same starting noise and differ only by what the model learned.
    """
    if not accelerator.is_main_process:
        return None
    modules = [pipeline.unet, pipeline.text_encoder]
    was_training = [m.training for m in modules]
    for m in modules:
        m.eval()
    rows = []
    try:
        for prompt in prompts:
            generator = torch.Generator(device=accelerator.device).manual_seed(seed)
            # no autocast here: prepared models carry their own, and the VAE must decode in fp32
            images = pipeline(
                prompt,
                height=height or resolution,
                width=width or resolution,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                num_images_per_prompt=num_images,
                generator=generator,
                output_type="pt",
                **call_kwargs,
            ).images  # (N, 3, H, W) in [0, 1]
            rows.append(images.float() * 2 - 1)
    finally:
        for m, training in zip(modules, was_training, strict=True):
            m.train(training)
    path = Path(output_dir) / VALIDATION_DIR / f"step-{step:06d}.png"
    grid = save_image_grid(torch.cat(rows), nrow=num_images, path=path)
    log_images(accelerator, "validation", grid, step)
    logger.info("validation images for %d prompts at step %d: %s", len(prompts), step, path)
    return path


def export_pipeline(pipeline: LatentDiffPipeline, path: str | Path) -> Path:
    """Write a complete pipeline folder (model_index.json, safetensors weights) that LatentDiffPipeline and
    diffusers' StableDiffusionPipeline open; written beside `path` and renamed into place, so a kill while
    writing never leaves a half-written folder where a finished one was. Call on the main process only."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}")
    if tmp.exists():
        shutil.rmtree(tmp)
    with saving_on_any_rank(pipeline):  # each machine's own copy, without a shared disk
        pipeline.save_pretrained(tmp, safe_serialization=True)
    if path.exists():
        old = path.with_name(f".old-{path.name}")
        path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old)
    else:
        tmp.rename(path)
    logger.info("saved the pipeline to %s", path)
    return path
