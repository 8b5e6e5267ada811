"""The networks a text-to-image run trains: loaded from a pipeline folder or built from presets, checked to fit.

``load_models(args)`` reads the model flags of ``args.add_model_args`` (one definition for every script):
a pipeline folder (``--pretrained_model_name_or_path``), or a trained VAE and presets for the UNet and
the text encoder, each part replaceable by a folder of its own; the text encoder also by a packaged one
(``--pretrained_text_encoder_name_or_path minilm``, latentdiff.text_encoders), which then sets a new UNet's
cross-attention width.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import BertModel, BertTokenizerFast, CLIPTextModel, CLIPTokenizer

from latentdiff.data.args import resolution_of
from latentdiff.pipelines import LatentDiffPipeline
from latentdiff.presets import (
    default_image_size,
    scale_token_embeddings,
    sd_scheduler,
    text_encoder_from_preset,
    tokenizer_for,
    unet_from_preset,
    vae_scale_factor,
)
from latentdiff.schedulers import DDPMScheduler
from latentdiff.text_encoders import load_text_encoder


@dataclass
class Models:
    """The four components and the forward process the UNet learns (a DDPM schedule), at a training resolution."""

    vae: AutoencoderKL
    text_encoder: CLIPTextModel | BertModel
    tokenizer: CLIPTokenizer | BertTokenizerFast
    unet: UNet2DConditionModel
    noise_scheduler: DDPMScheduler
    resolution: int
    # whether the text encoder came trained (a pipeline folder or --pretrained_text_encoder_name_or_path)
    pretrained_text_encoder: bool

    def components(self) -> tuple:
        """(vae, text_encoder, tokenizer, unet, noise_scheduler): what `validation.build_pipeline` takes."""
        return self.vae, self.text_encoder, self.tokenizer, self.unet, self.noise_scheduler


def subfolder(path: str, component: str) -> str | None:
    """Where a model lies in `path`: at its top (None), or in its `component` sub-folder (a pipeline folder)."""
    if not (Path(path) / "config.json").is_file() and (Path(path) / component / "config.json").is_file():
        return component
    return None


def load_models(args) -> Models:
    """The VAE, text encoder, tokenizer, UNet and training schedule the model flags ask for, checked to fit."""
    if args.pretrained_model_name_or_path:
        pipe = LatentDiffPipeline.from_pretrained(args.pretrained_model_name_or_path)
        vae, text_encoder, tokenizer, unet = pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.unet
        schedule = dict(pipe.scheduler.config)
    else:
        vae = text_encoder = tokenizer = unet = None
        schedule = dict(sd_scheduler().config)
    if args.pretrained_vae_name_or_path:
        path = args.pretrained_vae_name_or_path
        vae = AutoencoderKL.from_pretrained(path, subfolder=subfolder(path, "vae"))
    if args.pretrained_text_encoder_name_or_path:  # its tokenizer comes with it, replacing a pipeline folder's
        text_encoder, tokenizer = load_text_encoder(args.pretrained_text_encoder_name_or_path)
    elif text_encoder is None:
        text_encoder = text_encoder_from_preset(args.text_encoder_preset or args.unet_preset or "small")
        if args.token_embedding_std is not None:
            scale_token_embeddings(text_encoder, args.token_embedding_std)
    if tokenizer is None:
        tokenizer = tokenizer_for(text_encoder)
    if getattr(args, "tokenizer_max_length", None) is not None:  # train_ldm's; the pipeline saves it, sampling pads as training
        positions = text_encoder.config.max_position_embeddings
        if args.tokenizer_max_length > positions:
            raise ValueError(f"--tokenizer_max_length {args.tokenizer_max_length}: the text encoder has {positions} "
                             f"positions, so prompts can be at most {positions} tokens")
        tokenizer.model_max_length = args.tokenizer_max_length
    if isinstance(text_encoder, BertModel) and getattr(args, "train_text_encoder", None):
        raise ValueError(
            "--train_text_encoder: a BERT text encoder (e.g. minilm) is used frozen, as the pretrained sentence "
            "encoder it is; leave out --train_text_encoder (only CLIP text encoders train here)"
        )
    resolution = resolution_of(args, default_image_size(vae, unet) if unet is not None else None)
    if unet is None:
        # sample_size only sets the pipeline's default image size: the training resolution
        # a new UNet works in the VAE's latent space, however many channels it has
        channels = vae.config.latent_channels
        # a pretrained text encoder sets the width the UNet's cross-attention reads (a preset one matches its name)
        shape = {"cross_attention_dim": text_encoder.config.hidden_size} if args.pretrained_text_encoder_name_or_path else {}
        if args.unet_block_out_channels:
            shape["block_out_channels"] = tuple(args.unet_block_out_channels)
        if args.unet_layers_per_block:
            shape["layers_per_block"] = args.unet_layers_per_block
        unet = unet_from_preset(args.unet_preset or "small", sample_size=resolution // vae_scale_factor(vae),
                                in_channels=channels, out_channels=channels, **shape)
    check_models(vae, text_encoder, unet, resolution)
    noise_scheduler = training_scheduler(
        schedule,
        prediction_type=args.prediction_type,
        beta_schedule=args.beta_schedule,
        beta_start=args.beta_start,
        beta_end=args.beta_end,
        rescale_betas_zero_snr=args.rescale_betas_zero_snr or None,
    )
    pretrained_text = bool(args.pretrained_model_name_or_path or args.pretrained_text_encoder_name_or_path)
    return Models(vae, text_encoder, tokenizer, unet, noise_scheduler, resolution, pretrained_text)


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


def check_models(vae, text_encoder, unet, resolution: int) -> None:
    """The three networks must fit together and the resolution must suit the VAE."""
    latent_channels = vae.config.latent_channels
    # an inpainting UNet also takes the mask and the masked image's latents: 2C + 1 channels
    if unet.config.in_channels not in (latent_channels, 2 * latent_channels + 1) or latent_channels != unet.config.out_channels:
        raise ValueError(
            f"the VAE has {latent_channels} latent channels but the UNet takes "
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


def size_multiple(vae, unet) -> int:
    """What every image side must be a multiple of: the VAE's downsampling times the UNet's (2 per down block
    but the last)."""
    return vae_scale_factor(vae) * 2 ** (len(unet.config.down_block_types) - 1)


def check_sizes(args, vae, unet, resolution: int) -> None:
    """Bucket sides and validation sizes the models can take: multiples of :func:`size_multiple`."""
    multiple = size_multiple(vae, unet)
    if getattr(args, "enable_bucket", False) and args.bucket_reso_steps % multiple:
        raise ValueError(
            f"--bucket_reso_steps {args.bucket_reso_steps} is not a multiple of {multiple}, which this VAE and UNet "
            f"need every side to be (the VAE downsamples {vae_scale_factor(vae)}x, the UNet "
            f"{multiple // vae_scale_factor(vae)}x more): use --bucket_reso_steps {multiple} or a multiple of it"
        )
    for flag in ("validation_height", "validation_width"):
        value = getattr(args, flag, None)
        if value is not None and value % multiple:
            raise ValueError(f"--{flag} {value} is not a multiple of {multiple}, which this VAE and UNet need: "
                             f"use e.g. {max(multiple, value // multiple * multiple)}")


def weight_dtype(accelerator: Accelerator) -> torch.dtype:
    """The dtype frozen weights can be held in under the run's mixed precision (trained ones stay fp32)."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
