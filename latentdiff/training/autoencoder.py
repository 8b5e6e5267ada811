"""Training the KL autoencoder (Rombach et al. 2022, sec. 3 and App. G), as a task of `loop.train`.

    task = AutoencoderTraining(accelerator, args, vae, VAELossConfig(...), train_dataset, val_dataset)
    train(accelerator, args, task)
    metrics = task.export(Path(args.output_dir) / "vae")   # EMA weights, scaling_factor measured

A batch becomes a loss in ``loss``: x -> z ~ q(z|x) -> x̂ and the objective of `vae_loss.VAELoss`; with
the GAN on, plus the PatchGAN's hinge loss, whose weights are a second param group of the one optimizer.
"""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers import AutoencoderKL
from torch.utils.data import Subset
from tqdm.auto import tqdm

from latentdiff.data import build_dataloader
from latentdiff.data.buckets import global_batch
from latentdiff.training.ema import ema_weights, make_ema
from latentdiff.training.metrics import psnr, ssim
from latentdiff.training.progress import log_images, save_image_grid
from latentdiff.training.run import make_lr_scheduler, make_optimizer, resolve_train_steps, writes_output
from latentdiff.training.vae_loss import (
    PatchDiscriminator,
    Reconstruction,
    VAELoss,
    VAELossConfig,
    hinge_d_loss,
    kl_divergence,
)


class AutoencoderTraining:
    """An AutoencoderKL, its loss (and discriminator), the data and the held-out metrics of a VAE run."""

    def __init__(self, accelerator: Accelerator, args, vae: AutoencoderKL, loss_config: VAELossConfig, train_dataset, val_dataset):
        self.accelerator, self.args, self.train_dataset = accelerator, args, train_dataset
        if len(train_dataset) < args.train_batch_size:
            raise ValueError(
                f"the training set has {len(train_dataset)} images, fewer than --train_batch_size {args.train_batch_size}"
            )
        # drop_last: every step sees the same number of images (and the discriminator's BatchNorm a full batch)
        dataloader = build_dataloader(
            train_dataset, args.train_batch_size, seed=args.seed, num_workers=args.dataloader_num_workers, drop_last=True,
            group=global_batch(args)[0],
        )
        val_dataloader = build_dataloader(val_dataset, 64, shuffle=False, num_workers=args.dataloader_num_workers)
        self.dataloader = accelerator.prepare(dataloader)
        resolve_train_steps(args, len(self.dataloader))

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
        self.model, self.optimizer, self.lr_scheduler, self.val_dataloader = accelerator.prepare(
            model, optimizer, lr_scheduler, val_dataloader
        )
        self.disc = accelerator.prepare(disc) if disc is not None else None
        self.trained = [self.model] + ([self.disc] if disc is not None else [])
        self.loss_fn = VAELoss(loss_config).to(accelerator.device)
        self.ema = make_ema(args, self.model) if args.use_ema else None
        if self.ema is not None:
            accelerator.register_for_checkpointing(self.ema)
        self.last_layer = accelerator.unwrap_model(self.model).vae.decoder.conv_out.weight
        self.images_per_batch, self.checkpoint_extra = args.train_batch_size, None
        self.metrics, self.metrics_step = None, None

    def loss(self, batch: dict, generator: torch.Generator, step: int) -> tuple[torch.Tensor, dict]:
        """The generator's loss at optimizer step ``step`` (the GAN term from --disc_start), plus the discriminator's."""
        x = batch["pixel_values"]
        x_rec, mean, logvar = self.model(x, generator)
        gan_active = self.loss_fn.gan_active(step)
        logits_fake = discriminate_frozen(self.accelerator, self.disc, x_rec) if gan_active else None
        grad_scale = self.accelerator.scaler.get_scale() if self.accelerator.scaler is not None else 1.0
        loss, logs = self.loss_fn(x, x_rec, mean, logvar, logits_fake, self.last_layer, grad_scale)
        if gan_active:
            # the two losses reach disjoint weights (D is frozen in `loss`, x_rec detached here): one backward
            d_loss = hinge_d_loss(self.disc(x.detach()), self.disc(x_rec.detach()))
            loss, logs["d_loss"] = loss + d_loss, d_loss.item()
        return loss, logs

    def update_ema(self) -> None:
        if self.ema is not None:
            self.ema.step(self.model.parameters())

    def validate(self, step: int) -> dict[str, float]:
        """Held-out metrics and a grid of the EMA weights at ``step``; every process calls it."""
        with ema_weights(self.ema, self.model):
            self.metrics, self.metrics_step = validate(self.accelerator, self.model, self.val_dataloader, self.args, step), step
        if self.accelerator.is_main_process:
            tqdm.write(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in self.metrics.items()))
        return self.metrics

    def export(self, path: Path, step: int) -> dict[str, float]:
        """Save the averaged weights (when there are some) with scaling_factor = 1 / std of their training latents;
        return the held-out metrics of the saved weights. Every process calls it."""
        self.accelerator.wait_for_everyone()
        if self.ema is not None:
            self.ema.copy_to(self.model.parameters())
        metrics = self.metrics if self.metrics_step == step else validate(self.accelerator, self.model, self.val_dataloader, self.args, step)
        vae = self.accelerator.unwrap_model(self.model).vae
        if writes_output(self.accelerator):
            scaling_factor, latent_std = measure_scaling_factor(self.accelerator, vae, self.train_dataset, self.args)
            vae.register_to_config(scaling_factor=scaling_factor)
            vae.save_pretrained(path, safe_serialization=True)
            metrics.update(scaling_factor=scaling_factor, latent_std=latent_std)
        return metrics


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
    first = range(min(args.scaling_factor_images, len(dataset)))
    subset = dataset.subset(first) if hasattr(dataset, "subset") else Subset(dataset, first)  # a view keeps its buckets
    generator = torch.Generator(device=accelerator.device).manual_seed(args.seed)
    latents = []
    vae.eval()
    for batch in build_dataloader(subset, 64, shuffle=False, num_workers=args.dataloader_num_workers):
        with accelerator.autocast():
            posterior = vae.encode(batch["pixel_values"].to(accelerator.device)).latent_dist
        latents.append(posterior.sample(generator=generator).float().flatten())
    std = torch.cat(latents).std().item()
    return 1.0 / std, std
