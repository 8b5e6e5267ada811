"""latentdiff: latent diffusion in the style of Stable Diffusion."""

from latentdiff.pipelines import (
    LatentDiffImg2ImgPipeline,
    LatentDiffInpaintPipeline,
    LatentDiffPipeline,
    LatentDiffPipelineOutput,
)
from latentdiff.presets import (
    PRESETS,
    load_tokenizer,
    pipeline_from_preset,
    text_encoder_from_preset,
    tokenizer_for,
    unet_from_preset,
    vae_from_preset,
)
from latentdiff.schedulers import DDIMScheduler, DDPMScheduler

__version__ = "0.1.0"

__all__ = [
    "DDIMScheduler",
    "DDPMScheduler",
    "LatentDiffImg2ImgPipeline",
    "LatentDiffInpaintPipeline",
    "LatentDiffPipeline",
    "LatentDiffPipelineOutput",
    "PRESETS",
    "load_tokenizer",
    "pipeline_from_preset",
    "text_encoder_from_preset",
    "tokenizer_for",
    "unet_from_preset",
    "vae_from_preset",
]
