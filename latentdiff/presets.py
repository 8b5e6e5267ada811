"""Named sizes for the three networks of a latent diffusion model.

A preset is a triple (UNet, VAE, text encoder) for one image size. Each network's own choices are
the keyword arguments of the diffusers / transformers class it builds, so a preset is also
documentation of the exact architecture; what couples the three is derived, never written twice:
the VAE's ``sample_size`` is the image size, the UNet's is the image size over the VAE's
downsampling factor, the UNet's ``cross_attention_dim`` is the text encoder's ``hidden_size`` and
its input and output channels are the VAE's latent channels. ``sd15`` reproduces the shapes of
Stable Diffusion 1.5 (UNet 859.5M, VAE 83.7M, CLIP ViT-L/14 text encoder 123.1M parameters).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from importlib.resources import files

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from latentdiff.schedulers import DDIMScheduler

TOKENIZER_DIR = str(files("latentdiff") / "tokenizer")
CLIP_TEXT_DEFAULTS = dict(  # OpenAI's CLIP text tower: the vendored tokenizer's ids, 77 positions
    vocab_size=49408,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=49407,
)


def vae_scale_factor(vae) -> int:
    """How many pixels one latent covers along each side: 2 ** (number of downsamplings), of an
    ``AutoencoderKL`` or of its keyword arguments."""
    config = getattr(vae, "config", vae)
    return 2 ** (len(config["block_out_channels"]) - 1)


def default_image_size(vae, unet) -> int:
    """The side of the images ``unet`` and ``vae`` make by default: the UNet's ``sample_size`` (its
    latents' side; the height of a (height, width) one) times the VAE's downsampling factor."""
    size = unet.config.sample_size
    return (size[0] if isinstance(size, (list, tuple)) else size) * vae_scale_factor(vae)


@dataclass(frozen=True)
class Preset:
    """One model size: the image side in pixels and each network's own keyword arguments (see the
    module docstring for what is derived from them)."""

    image_size: int
    unet: dict
    vae: dict
    text_encoder: dict

    def __post_init__(self):
        if self.image_size % vae_scale_factor(self.vae):
            raise ValueError(f"image_size {self.image_size} is not a multiple of the VAE's downsampling factor "
                             f"{vae_scale_factor(self.vae)}")

    def unet_kwargs(self) -> dict:
        """``UNet2DConditionModel``'s keyword arguments; the up path mirrors the down path."""
        down = self.unet["down_block_types"]
        return {
            **self.unet,
            "up_block_types": tuple(block.replace("Down", "Up") for block in reversed(down)),
            "sample_size": self.image_size // vae_scale_factor(self.vae),
            "in_channels": self.vae["latent_channels"],
            "out_channels": self.vae["latent_channels"],
            "cross_attention_dim": self.text_encoder["hidden_size"],
        }

    def vae_kwargs(self) -> dict:
        """``AutoencoderKL``'s keyword arguments: one encoder and one decoder block per width."""
        levels = len(self.vae["block_out_channels"])
        return {
            "down_block_types": ("DownEncoderBlock2D",) * levels,
            "up_block_types": ("UpDecoderBlock2D",) * levels,
            **self.vae,
            "sample_size": self.image_size,
        }


# CPU training in minutes on 32-64 px images (f=4: 8-16 px latents)
_SMALL = Preset(
    image_size=32,
    unet=dict(
        block_out_channels=(64, 128, 128),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        attention_head_dim=8,
        norm_num_groups=32,
    ),
    # narrow at full resolution, where a CPU spends its time: README, "Model presets"
    vae=dict(block_out_channels=(32, 64, 64), layers_per_block=1, latent_channels=4, norm_num_groups=32),
    text_encoder=dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                      max_position_embeddings=32),
)

MODEL_PRESETS: dict[str, Preset] = {
    # seconds on a CPU: for tests (f=2: 16 px images, 8x8 latents)
    "tiny": Preset(
        image_size=16,
        unet=dict(
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            attention_head_dim=8,
            norm_num_groups=32,
        ),
        vae=dict(block_out_channels=(32, 64), layers_per_block=1, latent_channels=4, norm_num_groups=32),
        # 32 positions, not CLIP's 77: README, "The text-to-image model"
        text_encoder=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          max_position_embeddings=32),
    ),
    "small": _SMALL,
    # small shaped for 64 px images (16 px latents): no attention at the 16x16 latents, where it costs most on a CPU
    # and a 64 px emoji has little to relate across that scale; attention at 8x8 and 4x4 as small has at 32 px.
    # A training step (batch 64, MiniLM's 384-d states) is 1.64x faster than small's at 64 px (README, "Model presets")
    "small64": replace(_SMALL, image_size=64, unet={
        **_SMALL.unet, "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")}),
    # one GPU, 256 px images (f=8: 32 px latents)
    "base": Preset(
        image_size=256,
        unet=dict(
            block_out_channels=(192, 384, 768, 768),
            layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            attention_head_dim=8,
            norm_num_groups=32,
        ),
        vae=dict(block_out_channels=(64, 128, 256, 256), layers_per_block=2, latent_channels=4, norm_num_groups=32),
        text_encoder=dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8),
    ),
    # Stable Diffusion 1.5: 512 px, its VAE and CLIP ViT-L/14's text tower
    "sd15": Preset(
        image_size=512,
        unet=dict(
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            attention_head_dim=8,
            norm_num_groups=32,
        ),
        vae=dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, norm_num_groups=32,
                 scaling_factor=0.18215),
        text_encoder=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                          projection_dim=768),
    ),
}

# each network's keyword arguments by preset name
UNET_PRESETS: dict[str, dict] = {name: preset.unet_kwargs() for name, preset in MODEL_PRESETS.items()}
VAE_PRESETS: dict[str, dict] = {name: preset.vae_kwargs() for name, preset in MODEL_PRESETS.items()}
TEXT_ENCODER_PRESETS: dict[str, dict] = {name: dict(preset.text_encoder) for name, preset in MODEL_PRESETS.items()}
PRESETS = tuple(MODEL_PRESETS)


def _preset(table: dict[str, dict], kind: str, name: str) -> dict:
    if name not in table:
        raise ValueError(f"{kind} preset {name!r} is unknown; choose one of {', '.join(map(repr, table))}")
    return dict(table[name])


def unet_from_preset(name: str, **overrides) -> UNet2DConditionModel:
    return UNet2DConditionModel(**{**_preset(UNET_PRESETS, "UNet", name), **overrides})


def vae_from_preset(name: str, **overrides) -> AutoencoderKL:
    return AutoencoderKL(**{**_preset(VAE_PRESETS, "VAE", name), **overrides})


def text_encoder_from_preset(name: str, **overrides) -> CLIPTextModel:
    preset = _preset(TEXT_ENCODER_PRESETS, "text encoder", name)
    return CLIPTextModel(CLIPTextConfig(**{**CLIP_TEXT_DEFAULTS, **preset, **overrides}))


def scale_token_embeddings(text_encoder: CLIPTextModel, std: float) -> None:
    """Bring a freshly initialised CLIP's token embeddings, drawn N(0, 0.02 * initializer_factor), to standard
    deviation `std`: the same draw, rescaled."""
    init_std = 0.02 * text_encoder.config.initializer_factor
    with torch.no_grad():
        text_encoder.get_input_embeddings().weight.mul_(std / init_std)


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
