"""Named sizes for the three networks of a latent diffusion model.

Each preset is the keyword arguments of the diffusers / transformers class it builds, so a
preset is also documentation of the exact architecture. ``sd15`` reproduces the shapes of
Stable Diffusion 1.5 (UNet 859.5M, VAE 83.7M, CLIP ViT-L/14 text encoder 123.1M parameters).
"""

from __future__ import annotations

from importlib.resources import files

from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from latentdiff.schedulers import DDIMScheduler

TOKENIZER_DIR = str(files("latentdiff") / "tokenizer")

_DOWN2 = ("CrossAttnDownBlock2D", "DownBlock2D")
_UP2 = ("UpBlock2D", "CrossAttnUpBlock2D")

UNET_PRESETS: dict[str, dict] = {
    # seconds on a CPU: for tests
    "tiny": dict(
        sample_size=8,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=_DOWN2,
        up_block_types=_UP2,
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    ),
    # CPU training in minutes on 32-64 px images (8-16 px latents at f=4)
    "small": dict(
        sample_size=8,
        block_out_channels=(64, 128, 128),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=128,
        attention_head_dim=8,
        norm_num_groups=32,
    ),
    # one GPU, 256 px images (32 px latents at f=8)
    "base": dict(
        sample_size=32,
        block_out_channels=(192, 384, 768, 768),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=512,
        attention_head_dim=8,
        norm_num_groups=32,
    ),
    # Stable Diffusion 1.5
    "sd15": dict(
        sample_size=64,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768,
        attention_head_dim=8,
        norm_num_groups=32,
    ),
}

VAE_PRESETS: dict[str, dict] = {
    "tiny": dict(
        sample_size=32,
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
    ),
    # f=4: 32 px images -> 8x8x4 latents. Narrow at full resolution, where a CPU spends its time:
    # (32, 64, 64) trains 3.4x faster than (64, 128, 128) and reached 26.6 vs 21.2 dB in 3 minutes.
    "small": dict(
        sample_size=32,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
    ),
    # f=8: 256 px images -> 32x32x4 latents
    "base": dict(
        sample_size=256,
        block_out_channels=(64, 128, 256, 256),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
    ),
    "sd15": dict(
        sample_size=512,
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
        scaling_factor=0.18215,
    ),
}

TEXT_ENCODER_PRESETS: dict[str, dict] = {
    # 32 positions, not CLIP's 77: the built-in datasets' captions are at most 20 tokens, and on a CPU
    # a small model's training step at 32 px (UNet and text encoder, batch 64) takes 1.36x as long with 77 (the tokenizer follows suit)
    "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=32),
    "small": dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                  max_position_embeddings=32),
    "base": dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8),
    # CLIP ViT-L/14's text tower, as in SD 1.x
    "sd15": dict(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        projection_dim=768,
    ),
}

PRESETS = tuple(UNET_PRESETS)


def _preset(table: dict[str, dict], kind: str, name: str) -> dict:
    if name not in table:
        raise ValueError(f"{kind} preset {name!r} is unknown; choose one of {', '.join(map(repr, table))}")
    return dict(table[name])


def unet_from_preset(name: str, **overrides) -> UNet2DConditionModel:
    return UNet2DConditionModel(**{**_preset(UNET_PRESETS, "UNet", name), **overrides})


def vae_from_preset(name: str, **overrides) -> AutoencoderKL:
    return AutoencoderKL(**{**_preset(VAE_PRESETS, "VAE", name), **overrides})


def text_encoder_from_preset(name: str, **overrides) -> CLIPTextModel:
    clip = dict(
        vocab_size=49408,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    return CLIPTextModel(CLIPTextConfig(**{**clip, **_preset(TEXT_ENCODER_PRESETS, "text encoder", name), **overrides}))


def load_tokenizer(model_max_length: int = 77) -> CLIPTokenizer:
    """OpenAI's CLIP BPE tokenizer (49,408 tokens), vendored: works offline. Prompts are padded or
    truncated to ``model_max_length`` tokens: the text encoder's ``max_position_embeddings``."""
    return CLIPTokenizer.from_pretrained(TOKENIZER_DIR, model_max_length=model_max_length)


def tokenizer_for(text_encoder: CLIPTextModel) -> CLIPTokenizer:
    """The vendored tokenizer, padding to as many tokens as ``text_encoder`` has positions."""
    return load_tokenizer(text_encoder.config.max_position_embeddings)


def sd_scheduler(**overrides) -> DDIMScheduler:
    """The training schedule of Stable Diffusion 1.x (scaled_linear 0.00085 -> 0.012, 1000 steps)."""
    config = dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="leading",
    )
    return DDIMScheduler(**{**config, **overrides})


def vae_scale_factor(vae: AutoencoderKL) -> int:
    """How many pixels one latent covers along each side: 2 ** (number of downsamplings)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def pipeline_from_preset(name: str, seed: int = 0):
    """A randomly initialised LatentDiffPipeline of the named size (weights seeded by ``seed``)."""
    import torch

    from latentdiff.pipelines import LatentDiffPipeline

    _preset(UNET_PRESETS, "pipeline", name)
    torch.manual_seed(seed)
    # eval mode, as from_pretrained returns models: some attention paths differ (by float rounding) in train mode
    text_encoder = text_encoder_from_preset(name).eval()
    return LatentDiffPipeline(
        vae=vae_from_preset(name).eval(),
        text_encoder=text_encoder,
        tokenizer=tokenizer_for(text_encoder),
        unet=unet_from_preset(name).eval(),
        scheduler=sd_scheduler(),
    )
