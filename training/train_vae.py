"""Train the KL autoencoder of a latent diffusion model (Rombach et al. 2022, sec. 3 and App. G).

    accelerate launch training/train_vae.py --output_dir out/vae-shapes         # shapes, 32 px: the CPU defaults
    accelerate launch training/train_vae.py --dataset_name emoji --resolution 64 --output_dir out/vae-emoji
    python training/train_vae.py --output_dir out/vae-shapes --resume_from_checkpoint latest

The objective (latentdiff/training/vae_loss.py): L1/L2 reconstruction + w_kl KL(q(z|x) ‖ N(0, I)),
optionally + LPIPS and a PatchGAN with the adaptive weight. What the run leaves in --output_dir:

    vae/                  diffusers AutoencoderKL (safetensors), scaling_factor = 1 / std of the training latents
    checkpoints/          Accelerate checkpoints (model, optimizers, schedulers, EMA, RNG): exact resume
    validation/           originals (top row) over reconstructions (bottom row) at each validation
    logs/                 TensorBoard: losses, lr, held-out PSNR / SSIM / KL, the grids
    metrics.json          the held-out metrics of the exported weights and the scaling factor
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from torch.utils.data import Subset

from latentdiff.data import add_data_args, build_dataset
from latentdiff.data.args import default_dataset, resolution_of
from latentdiff.presets import VAE_PRESETS, vae_from_preset, vae_scale_factor
from latentdiff.training.args import add_common_args, check_common_args
from latentdiff.training.autoencoder import AutoencoderTraining
from latentdiff.training.loop import train
from latentdiff.training.run import count_parameters, images_per_step, log_run_start, make_accelerator
from latentdiff.training.vae_loss import VAELossConfig

RUN_KIND = "vae"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_data_args(parser)
    add_common_args(parser)
    g = parser.add_argument_group("autoencoder")
    g.add_argument("--vae_preset", type=str, default=None, choices=list(VAE_PRESETS), help="Default: small.")
    g.add_argument(
        "--pretrained_vae_name_or_path",
        type=str,
        default=None,
        help="A local AutoencoderKL folder, or a pipeline folder (its vae/ is used), to fine-tune.",
    )
    g.add_argument(
        "--latent_channels",
        type=int,
        default=None,
        help="Channels of a new VAE's latent (default: the preset's, 4 as in SD). More channels keep more of each "
        "latent pixel's colors and edges apart; the text-to-image model takes as many.",
    )
    g.add_argument(
        "--init_logvar",
        type=float,
        default=-6.0,
        help="A new VAE's posterior log-variance at initialisation (diffusers: 0). Starting narrow (σ ≈ 0.05), "
        "reconstruction learns from the first step instead of first shrinking σ = 1 noise.",
    )
    g.add_argument("--l1_weight", type=float, default=1.0)
    g.add_argument("--l2_weight", type=float, default=1.0)
    g.add_argument("--kl_weight", type=float, default=1e-6, help="Relative to the per-pixel reconstruction (SD: 1e-6).")
    g.add_argument("--perceptual_weight", type=float, default=0.0, help="LPIPS weight (SD: 1.0).")
    g.add_argument("--perceptual_weights", type=str, default=None, help="LPIPS-VGG weights, a safetensors file.")
    g.add_argument("--disc_weight", type=float, default=0.0, help="PatchGAN weight (SD: 0.5); 0: no discriminator.")
    g.add_argument("--disc_start", type=int, default=5000, help="Optimizer step at which the GAN term starts.")
    g.add_argument("--disc_channels", type=int, default=64)
    g.add_argument("--disc_layers", type=int, default=3)
    g.add_argument("--num_heldout_images", type=int, default=360, help="Held-out images for the metrics.")
    g.add_argument("--num_grid_images", type=int, default=8)
    g.add_argument("--scaling_factor_images", type=int, default=1024, help="Training images to measure it on.")
    # CPU defaults for shapes at 32 px, chosen by short runs (README, "The autoencoder")
    parser.set_defaults(
        train_batch_size=8,
        learning_rate=2e-3,
        lr_scheduler="constant_with_warmup",
        lr_warmup_steps=50,
        adam_weight_decay=0.0,
        max_train_steps=3000,
        validation_steps=250,
        checkpointing_steps=500,
        checkpoints_total_limit=2,
        ema_decay=0.999,
    )
    args = default_dataset(parser.parse_args(argv), "shapes")  # shapes unless --dataset_name or --train_data_dir
    if args.latent_channels is not None and args.latent_channels < 1:
        parser.error(f"--latent_channels must be a positive integer, got {args.latent_channels}")
    args.resolution = resolution_of(args)  # the dataset's native size unless given: shapes 32, emoji 64
    return args


def load_vae(args) -> AutoencoderKL:
    """The autoencoder to train: a named preset, initialised from --seed, or a local pretrained folder."""
    if args.pretrained_vae_name_or_path is None:
        torch.manual_seed(args.seed)
        overrides = {} if args.latent_channels is None else {"latent_channels": args.latent_channels}
        vae = vae_from_preset(args.vae_preset or "small", **overrides)
        # the encoder's last 1x1 conv emits [μ; log σ²] along channels: shift the log σ² half
        with torch.no_grad():
            vae.quant_conv.bias[vae.config.latent_channels :] += args.init_logvar
        return vae
    if args.vae_preset is not None or args.latent_channels is not None:
        raise ValueError("--vae_preset and --latent_channels shape a new VAE: give them or --pretrained_vae_name_or_path, "
                         "not both")
    path = Path(args.pretrained_vae_name_or_path)
    if (path / "model_index.json").is_file():
        path = path / "vae"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"--pretrained_vae_name_or_path {args.pretrained_vae_name_or_path!r} is not a local AutoencoderKL folder "
            "(config.json + weights) nor a pipeline folder with a vae/ (nothing is downloaded)"
        )
    return AutoencoderKL.from_pretrained(path, use_safetensors=True)


def check_args(args, vae: AutoencoderKL) -> None:
    factor = vae_scale_factor(vae)
    if args.resolution % factor:
        raise ValueError(
            f"--resolution {args.resolution} is not divisible by the VAE's downsampling factor {factor}: "
            f"use a multiple of {factor}"
        )
    if args.enable_bucket and args.bucket_reso_steps % factor:
        raise ValueError(f"--bucket_reso_steps {args.bucket_reso_steps} is not a multiple of the VAE's downsampling "
                         f"factor {factor}: use a multiple of {factor}")
    for name in ("num_heldout_images", "num_grid_images", "scaling_factor_images", "disc_channels", "disc_layers"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be a positive integer, got {getattr(args, name)!r}")


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    check_common_args(args)
    loss_config = VAELossConfig(
        l1_weight=args.l1_weight, l2_weight=args.l2_weight, kl_weight=args.kl_weight,
        perceptual_weight=args.perceptual_weight, perceptual_weights=args.perceptual_weights,
        disc_weight=args.disc_weight, disc_start=args.disc_start,
    )  # fmt: skip
    vae = load_vae(args)
    check_args(args, vae)
    accelerator = make_accelerator(args, RUN_KIND)
    train_dataset = build_dataset(args, split="train", captions=False)  # an autoencoder needs no captions
    val_dataset = build_dataset(args, split="validation", captions=False)
    val_dataset = Subset(val_dataset, range(min(args.num_heldout_images, len(val_dataset))))
    task = AutoencoderTraining(accelerator, args, vae, loss_config, train_dataset, val_dataset)
    latent_shape = (vae.config.latent_channels, *(args.resolution // vae_scale_factor(vae),) * 2)
    log_run_start(accelerator, args, len(train_dataset), vae=count_parameters(vae), latents=f"{latent_shape} per image",
                  loss=loss_config)  # fmt: skip

    start = time.perf_counter()
    loop = train(accelerator, args, task)
    seconds_now = time.perf_counter() - start
    train_seconds = loop.state()["train_seconds"]  # summed over the runs this one resumed, as checkpoints keep it

    metrics = task.export(Path(args.output_dir) / "vae", loop.global_step)  # EMA weights, latent scale measured
    if accelerator.is_main_process:
        # this run's speed; a rerun of a finished run trained nothing and has none
        images_per_second = loop.trained_now * images_per_step(args, accelerator) / seconds_now if loop.trained_now else None
        metrics.update(step=loop.global_step, resolution=args.resolution, train_seconds=train_seconds,
                       images_per_second=images_per_second, skipped_steps=loop.skipped)  # fmt: skip
        (Path(args.output_dir) / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        accelerator.print(
            f"held-out: PSNR {metrics['psnr']:.2f} dB, SSIM {metrics['ssim']:.4f}, KL {metrics['kl']:.1f} nats/image; "
            f"scaling_factor {metrics['scaling_factor']:.5f} (latent std {metrics['latent_std']:.4f}); "
            f"saved {Path(args.output_dir) / 'vae'}"
        )
    accelerator.end_training()
    return metrics


if __name__ == "__main__":
    main()
