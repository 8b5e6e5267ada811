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

from latentdiff.data import add_data_args, build_dataloader, build_dataset
from latentdiff.data.args import default_dataset, resolution_of
from latentdiff.presets import VAE_PRESETS, vae_from_preset, vae_scale_factor
from latentdiff.training.args import add_common_args, check_common_args
from latentdiff.training.checkpointing import (
    TrainClock,
    load_checkpoint,
    resolve_resume,
    resumed_batches,
    save_checkpoint,
)
from latentdiff.training.ema import ema_weights, make_ema
from latentdiff.training.finetune import optimizer_step
from latentdiff.training.metrics import psnr, ssim
from latentdiff.training.progress import log_images, progress_bar, save_image_grid
from latentdiff.training.run import (
    count_parameters,
    images_per_step,
    log_run_start,
    make_accelerator,
    make_lr_scheduler,
    make_optimizer,
    resolve_train_steps,
    step_generator,
)
from latentdiff.training.vae_loss import (
    PatchDiscriminator,
    Reconstruction,
    VAELoss,
    VAELossConfig,
    hinge_d_loss,
    kl_divergence,
)

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
    g.add_argument("--num_validation_images", type=int, default=360, help="Held-out images for the metrics.")
    g.add_argument("--num_grid_images", type=int, default=8)
    g.add_argument("--scaling_factor_images", type=int, default=1024, help="Training images to measure it on.")
    # CPU defaults, from short runs on shapes at 32 px (see the report of issue #4): batch 8 beats 4 and 16
    # per image seen, lr 2e-3 beats 1e-3 and 4e-3, and L2 is needed (L1 alone stalls on the white background)
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
    args.resolution = resolution_of(args)  # the dataset's native size unless given: shapes 32, emoji 64
    return args


def load_vae(args) -> AutoencoderKL:
    """The autoencoder to train: a named preset, initialised from --seed, or a local pretrained folder."""
    if args.pretrained_vae_name_or_path is None:
        torch.manual_seed(args.seed)
        vae = vae_from_preset(args.vae_preset or "small")
        # the encoder's last 1x1 conv emits [μ; log σ²] along channels: shift the log σ² half
        with torch.no_grad():
            vae.quant_conv.bias[vae.config.latent_channels :] += args.init_logvar
        return vae
    if args.vae_preset is not None:
        raise ValueError("give --vae_preset or --pretrained_vae_name_or_path, not both")
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
            f"--resolution {args.resolution} is not divisible by the VAE's downsampling factor {factor} "
            f"({len(vae.config.block_out_channels) - 1} downsamplings): use a multiple of {factor}"
        )
    for name in ("num_validation_images", "num_grid_images", "scaling_factor_images", "disc_channels", "disc_layers"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be a positive integer, got {getattr(args, name)!r}")


def discriminate_frozen(accelerator, disc, images: torch.Tensor) -> torch.Tensor:
    """D(images) with D's weights held fixed: the generator's GAN gradient reaches the images, not D."""
    module = accelerator.unwrap_model(disc)
    weights = {name: p.detach() for name, p in module.named_parameters()}
    return torch.func.functional_call(module, weights, (images,))


@torch.no_grad()
def validate(accelerator, model, val_dataloader, args, step: int) -> dict[str, float]:
    """Held-out PSNR, SSIM (reconstructions from the posterior mean) and KL; a grid of originals over reconstructions."""
    reconstruction = accelerator.unwrap_model(model).eval()
    scores = {"psnr": [], "ssim": [], "kl": []}
    grid = None
    for batch in val_dataloader:
        x = batch["pixel_values"]
        with accelerator.autocast():
            posterior = reconstruction.vae.encode(x).latent_dist
            x_rec = reconstruction.vae.decode(posterior.mode()).sample.float().clamp(-1, 1)
        per_image = {"psnr": psnr(x_rec, x), "ssim": ssim(x_rec, x), "kl": kl_divergence(posterior.mean, posterior.logvar)}
        for name, values in accelerator.gather_for_metrics(per_image).items():
            scores[name].append(values.cpu())
        if grid is None:
            n = min(args.num_grid_images, len(x))
            grid = torch.cat([x[:n], x_rec[:n]])  # (2n, 3, H, W): originals over reconstructions
    reconstruction.train()
    metrics = {name: torch.cat(values).mean().item() for name, values in scores.items()}
    if accelerator.is_main_process:
        image = save_image_grid(grid, nrow=len(grid) // 2, path=Path(args.output_dir) / "validation" / f"step-{step:06d}.png")
        log_images(accelerator, "validation/reconstructions", image, step)
    accelerator.log({f"val/{name}": value for name, value in metrics.items()}, step=step)
    return metrics


@torch.no_grad()
def measure_scaling_factor(accelerator, vae: AutoencoderKL, dataset, args) -> tuple[float, float]:
    """(1 / std, std) of latents z ~ q(z|x) of training images: unit-variance latents for diffusion (LDM sec. 4.3.2)."""
    subset = Subset(dataset, range(min(args.scaling_factor_images, len(dataset))))
    generator = torch.Generator(device=accelerator.device).manual_seed(args.seed)
    latents = []
    vae.eval()
    for batch in build_dataloader(subset, 64, shuffle=False, num_workers=args.dataloader_num_workers):
        with accelerator.autocast():
            posterior = vae.encode(batch["pixel_values"].to(accelerator.device)).latent_dist
        latents.append(posterior.sample(generator=generator).float().flatten())
    std = torch.cat(latents).std().item()
    return 1.0 / std, std


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    check_common_args(args)
    loss_config = VAELossConfig(
        l1_weight=args.l1_weight,
        l2_weight=args.l2_weight,
        kl_weight=args.kl_weight,
        perceptual_weight=args.perceptual_weight,
        perceptual_weights=args.perceptual_weights,
        disc_weight=args.disc_weight,
        disc_start=args.disc_start,
    )
    vae = load_vae(args)
    check_args(args, vae)
    accelerator = make_accelerator(args, RUN_KIND)
    resume_path = resolve_resume(args)

    train_dataset = build_dataset(args, split="train", captions=False)  # an autoencoder needs no captions
    val_dataset = build_dataset(args, split="validation", captions=False)
    val_dataset = Subset(val_dataset, range(min(args.num_validation_images, len(val_dataset))))
    if len(train_dataset) < args.train_batch_size:
        raise ValueError(
            f"the training set has {len(train_dataset)} images, fewer than --train_batch_size {args.train_batch_size}"
        )
    # drop_last: every step sees the same number of images (and the discriminator's BatchNorm a full batch)
    train_dataloader = build_dataloader(
        train_dataset, args.train_batch_size, seed=args.seed, num_workers=args.dataloader_num_workers, drop_last=True
    )
    val_dataloader = build_dataloader(val_dataset, 64, shuffle=False, num_workers=args.dataloader_num_workers)
    train_dataloader = accelerator.prepare(train_dataloader)
    resolve_train_steps(args, len(train_dataloader))

    model = Reconstruction(vae)
    optimizer = make_optimizer(args, model.parameters())
    disc = None
    if loss_config.disc_weight > 0:
        disc = PatchDiscriminator(channels=args.disc_channels, num_layers=args.disc_layers)
        # taming / CompVis: Adam(0.5, 0.9) without weight decay for the discriminator, at the autoencoder's
        # learning rate. A param group of the one optimizer, not a second optimizer: fp16's loss scaler is
        # then unscaled once and updated once per step (accelerate updates it inside every optimizer's
        # step and unscales all of them for a clip, which double-unscaled the discriminator's gradients).
        # It follows the LR schedule with the autoencoder.
        optimizer.add_param_group({"params": list(disc.parameters()), "betas": (0.5, 0.9), "weight_decay": 0.0})
    lr_scheduler = make_lr_scheduler(args, optimizer, accelerator)
    model, optimizer, lr_scheduler, val_dataloader = accelerator.prepare(model, optimizer, lr_scheduler, val_dataloader)
    if disc is not None:
        disc = accelerator.prepare(disc)
    loss_fn = VAELoss(loss_config).to(accelerator.device)
    ema = make_ema(args, model) if args.use_ema else None
    if ema is not None:
        accelerator.register_for_checkpointing(ema)
    global_step = load_checkpoint(accelerator, resume_path) if resume_path else 0

    latent_shape = (vae.config.latent_channels, *(args.resolution // vae_scale_factor(vae),) * 2)
    log_run_start(
        accelerator, args, len(train_dataset), vae=count_parameters(vae), latents=f"{latent_shape} per image",
        loss=loss_config, resumed_at_step=global_step,
    )

    last_layer = accelerator.unwrap_model(model).vae.decoder.conv_out.weight
    step_images = images_per_step(args, accelerator)
    bar = progress_bar(accelerator, args.max_train_steps, global_step)
    generator, skipped, start, steps_at_start = None, 0, time.perf_counter(), global_step
    clock, metrics, metrics_step = TrainClock(accelerator, args.max_train_minutes, resume_path), None, None
    batches = () if clock.out_of_time() else resumed_batches(accelerator, train_dataloader, args, global_step)
    for batch in batches:
        x = batch["pixel_values"]
        gan_active = loss_fn.gan_active(global_step)
        with accelerator.accumulate(model, *([disc] if disc is not None else [])):
            generator = generator or step_generator(args.seed, global_step, accelerator)
            x_rec, mean, logvar = model(x, generator)
            logits_fake = discriminate_frozen(accelerator, disc, x_rec) if gan_active else None
            grad_scale = accelerator.scaler.get_scale() if accelerator.scaler is not None else 1.0
            loss, logs = loss_fn(x, x_rec, mean, logvar, logits_fake, last_layer, grad_scale)
            if gan_active:
                # the two losses reach disjoint weights (D is frozen in `loss`, x_rec detached here): one backward
                d_loss = hinge_d_loss(disc(x.detach()), disc(x_rec.detach()))
                loss, logs["d_loss"] = loss + d_loss, d_loss.item()
            if not optimizer_step(accelerator, loss, optimizer, lr_scheduler, args, global_step + 1):
                skipped += 1
        if not accelerator.sync_gradients:
            continue
        global_step += 1
        generator = None
        if ema is not None:
            ema.step(model.parameters())
        lr = lr_scheduler.get_last_lr()[0]
        bar.step(logs["loss"], lr, step_images)
        accelerator.log({**{f"train/{k}": v for k, v in logs.items()}, "train/lr": lr}, step=global_step)
        if global_step % args.validation_steps == 0:
            with ema_weights(ema, model):
                metrics, metrics_step = validate(accelerator, model, val_dataloader, args, global_step), global_step
            bar.write(f"step {global_step}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
        done = global_step >= args.max_train_steps or clock.out_of_time()
        if global_step % args.checkpointing_steps == 0 or done:  # the last step too: a rerun has nothing left to do
            save_checkpoint(accelerator, args.output_dir, global_step, state={"train_seconds": clock.seconds()})
        if done:
            break
    bar.close()
    train_seconds = time.perf_counter() - start

    # export the averaged weights when there are some; measure the latent scale on them
    accelerator.wait_for_everyone()
    if ema is not None:
        ema.copy_to(model.parameters())
    if metrics_step != global_step:
        metrics = validate(accelerator, model, val_dataloader, args, global_step)
    vae = accelerator.unwrap_model(model).vae
    if accelerator.is_main_process:
        scaling_factor, latent_std = measure_scaling_factor(accelerator, vae, train_dataset, args)
        vae.register_to_config(scaling_factor=scaling_factor)
        vae.save_pretrained(Path(args.output_dir) / "vae", safe_serialization=True)
        trained = global_step - steps_at_start
        metrics.update(
            scaling_factor=scaling_factor,
            latent_std=latent_std,
            step=global_step,
            resolution=args.resolution,
            train_seconds=train_seconds,
            images_per_second=trained * step_images / max(train_seconds, 1e-9),
            skipped_steps=skipped,
        )
        (Path(args.output_dir) / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        accelerator.print(
            f"held-out: PSNR {metrics['psnr']:.2f} dB, SSIM {metrics['ssim']:.4f}, KL {metrics['kl']:.1f} nats/image; "
            f"scaling_factor {scaling_factor:.5f} (latent std {latent_std:.4f}); saved {Path(args.output_dir) / 'vae'}"
        )
    accelerator.end_training()
    return metrics


if __name__ == "__main__":
    main()
