"""The KL-autoencoder objective of Stable Diffusion's VAE (Rombach et al. 2022, App. G; CompVis LPIPSWithDiscriminator).

For an image x with D pixel values, an encoder posterior q(z|x) = N(μ, σ²) and a reconstruction
x̂ = Dec(z), z = μ + σ ⊙ ε, the generator minimises (per image, averaged over the batch)

    L = (1/D) Σ_pixels [l1 |x − x̂| + l2 (x − x̂)²]  +  w_p · LPIPS(x, x̂)
        + w_kl · (1/D) · KL(q(z|x) ‖ N(0, I))  +  λ · w_d · L_G,

which is CompVis' loss divided by D: the weights mean what they mean there (SD: w_kl = 1e-6,
w_p = 1, w_d = 0.5), and the loss reads as a per-pixel error. KL is the ELBO's term in closed form,
λ the adaptive GAN weight, L_G the hinge generator loss of a PatchGAN discriminator (below).
All terms are computed in fp32, outside autocast, whatever the training precision.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from latentdiff.training.perceptual import LPIPS


def kl_divergence(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """(B,) KL(N(μ, σ²) ‖ N(0, I)) = ½ Σ (μ² + σ² − log σ² − 1), summed over latent dims (Kingma & Welling 2014, App. B)."""
    mean, logvar = mean.float(), logvar.float()
    return 0.5 * (mean.pow(2) + logvar.exp() - logvar - 1).flatten(1).sum(dim=1)


def adaptive_weight(
    rec_loss: torch.Tensor,
    gan_loss: torch.Tensor,
    last_layer: torch.Tensor,
    num_pixel_values: int,
    grad_scale: float = 1.0,
    delta: float = 1e-4,
    max_weight: float = 1e4,
) -> torch.Tensor:
    """λ = ‖∇_{G_L} L_rec‖ / (‖∇_{G_L} L_GAN‖ + δ) at the decoder's last layer G_L (Esser et al. 2021, eq. 7).

    Balances the two gradients where they meet the image; clamped and detached as in taming/CompVis.
    Our L_rec is CompVis' divided by the D = ``num_pixel_values`` of an image (module docstring) and
    L_GAN is theirs, so our λ is theirs / D: so is the clamp (theirs: λ ≤ 1e4; δ = 1e-4 is unchanged,
    it is added to L_GAN's gradient). Under fp16 the gradients run through a half-precision decoder:
    taken of the losses times the loss scale ``grad_scale`` (the ratio does not change), they do not
    underflow to zero as L_rec's does at 256 px.
    """
    rec_grad = torch.autograd.grad(rec_loss * grad_scale, last_layer, retain_graph=True)[0].float()
    gan_grad = torch.autograd.grad(gan_loss * grad_scale, last_layer, retain_graph=True)[0].float()
    weight = rec_grad.norm() / (gan_grad.norm() + delta * grad_scale)
    return weight.clamp(0.0, max_weight / num_pixel_values).detach()


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """The discriminator's hinge loss ½ (E[max(0, 1 − D(x))] + E[max(0, 1 + D(x̂))]) (Lim & Ye 2017; taming)."""
    return 0.5 * (F.relu(1.0 - logits_real.float()).mean() + F.relu(1.0 + logits_fake.float()).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """The generator's side of the hinge GAN: −E[D(x̂)]."""
    return -logits_fake.float().mean()


class Reconstruction(nn.Module):
    """x -> (x̂, μ, log σ²) through an AutoencoderKL, with z = μ + σ ⊙ ε drawn from `generator`.

    One `forward` is what DistributedDataParallel needs: it syncs gradients only for modules
    called through forward, and AutoencoderKL's own forward does not return the posterior.
    """

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None):
        posterior = self.vae.encode(x).latent_dist
        z = posterior.sample(generator=generator)  # (B, C, h, w)
        return self.vae.decode(z).sample, posterior.mean, posterior.logvar


class PatchDiscriminator(nn.Module):
    """PatchGAN (Isola et al. 2017, pix2pix): a real/fake logit for each overlapping patch, (B, 1, h, w).

    taming's NLayerDiscriminator: 4x4 convolutions, `num_layers` stride-2 stages, BatchNorm, LeakyReLU 0.2.
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, num_layers: int = 3):
        super().__init__()
        layers = [nn.Conv2d(in_channels, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        width = channels
        for n in range(1, num_layers + 1):
            new_width = channels * min(2**n, 8)
            stride = 2 if n < num_layers else 1
            layers += [
                nn.Conv2d(width, new_width, 4, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(new_width),
                nn.LeakyReLU(0.2),
            ]
            width = new_width
        layers.append(nn.Conv2d(width, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        for module in self.modules():  # pix2pix initialisation
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.02)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.normal_(module.weight, 1.0, 0.02)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)  # (B, 1, h, w)


@dataclass
class VAELossConfig:
    l1_weight: float = 1.0
    l2_weight: float = 0.0
    kl_weight: float = 1e-6
    perceptual_weight: float = 0.0
    # safetensors file with LPIPS-VGG weights (see latentdiff/training/perceptual.py); needed when perceptual_weight > 0
    perceptual_weights: str | None = None
    # the GAN term's weight w_d; 0 turns the discriminator off
    disc_weight: float = 0.0
    # optimizer step from which the GAN term (and the discriminator's training) starts
    disc_start: int = 0

    def __post_init__(self):
        for name in ("l1_weight", "l2_weight", "kl_weight", "perceptual_weight", "disc_weight", "disc_start"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.l1_weight == 0 and self.l2_weight == 0 and self.perceptual_weight == 0:
            raise ValueError("the reconstruction term is empty: give l1_weight, l2_weight or perceptual_weight > 0")
        if self.perceptual_weight > 0 and not self.perceptual_weights:
            raise ValueError(
                "perceptual_weight > 0 needs perceptual_weights, a safetensors file of LPIPS-VGG weights "
                "(none can be downloaded at run time)"
            )


class VAELoss(nn.Module):
    """The generator's loss (module docstring) and the discriminator's, from a VAELossConfig."""

    def __init__(self, config: VAELossConfig):
        super().__init__()
        self.config = config
        self.perceptual = LPIPS.from_file(config.perceptual_weights) if config.perceptual_weight > 0 else None

    def gan_active(self, step: int) -> bool:
        return self.config.disc_weight > 0 and step >= self.config.disc_start

    def forward(
        self,
        inputs: torch.Tensor,
        reconstructions: torch.Tensor,
        mean: torch.Tensor,
        logvar: torch.Tensor,
        logits_fake: torch.Tensor | None = None,
        last_layer: torch.Tensor | None = None,
        grad_scale: float = 1.0,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """(loss, logs) for images and reconstructions (B, 3, H, W) in [-1, 1] and the posterior's (B, C, h, w) mean, logvar.

        Pass the discriminator's logits on the reconstructions and the decoder's last weight to add
        the adaptive GAN term (during training, when `gan_active`); ``grad_scale`` is fp16's loss
        scale (``accelerator.scaler.get_scale()``), 1 otherwise.
        """
        c = self.config
        with torch.autocast(device_type=inputs.device.type, enabled=False):
            x, x_rec = inputs.float(), reconstructions.float()
            rec = c.l1_weight * (x - x_rec).abs().mean() + c.l2_weight * (x - x_rec).pow(2).mean()
            logs = {"l1": (x - x_rec).abs().mean().item(), "l2": (x - x_rec).pow(2).mean().item()}
            if self.perceptual is not None:
                perceptual = self.perceptual(x, x_rec).mean()
                rec = rec + c.perceptual_weight * perceptual
                logs["perceptual"] = perceptual.item()
            kl = kl_divergence(mean, logvar).mean()
            loss = rec + c.kl_weight * kl / x[0].numel()
            logs.update(rec=rec.item(), kl=kl.item())
            if logits_fake is not None:
                g_loss = hinge_g_loss(logits_fake)
                d_weight = adaptive_weight(rec, g_loss, last_layer, x[0].numel(), grad_scale) * c.disc_weight
                loss = loss + d_weight * g_loss
                logs.update(g_loss=g_loss.item(), d_weight=d_weight.item())
        logs["loss"] = loss.item()
        return loss, logs
