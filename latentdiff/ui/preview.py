"""A cheap look at the latents while they are denoised: a linear map from latent channels to RGB.

Decoding with the VAE at every step would cost as much as a UNet step or more. The VAE's decoder is far
from linear, but the mean colour of the f x f pixels under one latent is close to an affine function of
that latent's channels (the same observation behind the fixed 4 -> 3 matrices other UIs ship for SD 1.x;
a model trained here has its own VAE, so the matrix is fitted, not copied). ``fit_latent_rgb`` fits it
once per model at load time: it encodes a few synthetic images (random colour blocks and gradients, so
that every colour region is covered), decodes their latents, and solves least squares from each latent
position's C channels plus a bias to the average decoded colour of its f x f patch. Applying it is one
(C + 1) x 3 matrix product per latent pixel.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from latentdiff.presets import vae_scale_factor


@dataclass(frozen=True)
class LatentPreview:
    """RGB in [-1, 1] of scaled latents (the UNet's, ``scaling_factor`` times the VAE's): rgb = [z, 1] @ weight."""

    weight: torch.Tensor  # (C + 1, 3): the channels' rows, then the bias

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) scaled latents to (B, 3, h, w) approximate colours in [-1, 1]."""
        z = latents.detach().float().cpu().permute(0, 2, 3, 1)  # (B, h, w, C)
        z = torch.cat([z, torch.ones_like(z[..., :1])], dim=-1)  # (B, h, w, C + 1)
        return (z @ self.weight).clamp(-1, 1).permute(0, 3, 1, 2)  # (B, 3, h, w)

    def images(self, latents: torch.Tensor, size: tuple[int, int]) -> list[PIL.Image.Image]:
        """PIL previews of (B, C, h, w) latents, scaled up (nearest) to ``size`` = (width, height)."""
        rgb = ((self(latents) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()  # (B, h, w, 3)
        return [PIL.Image.fromarray(image).resize(size, PIL.Image.Resampling.NEAREST) for image in rgb]


def synthetic_images(count: int, side: int, seed: int = 0) -> torch.Tensor:
    """(count, 3, side, side) images in [-1, 1]: even ones a grid of random colour blocks, odd ones a
    random two-colour linear gradient."""
    rng = np.random.default_rng(seed)
    images = []
    for i in range(count):
        if i % 2 == 0:
            cells = rng.integers(2, 5)
            blocks = rng.uniform(-1, 1, (3, cells, cells))
            image = np.kron(blocks, np.ones((side // cells + 1, side // cells + 1)))[:, :side, :side]
        else:
            a, b = rng.uniform(-1, 1, (2, 3, 1, 1))
            angle = rng.uniform(0, 2 * np.pi)
            y, x = np.mgrid[0:side, 0:side] / max(side - 1, 1)
            t = np.cos(angle) * x + np.sin(angle) * y
            t = (t - t.min()) / max(t.max() - t.min(), 1e-6)  # 0 -> 1 across the image
            image = a + (b - a) * t
        images.append(torch.from_numpy(np.ascontiguousarray(image)).float())
    return torch.stack(images)  # (N, 3, side, side)


@torch.no_grad()
def encode_decode(vae, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled latent means (N, C, h, w) of ``images`` and their decodes average-pooled to latent size (N, 3, h, w)."""
    factor = vae_scale_factor(vae)
    param = next(vae.parameters())
    images = images.to(device=param.device, dtype=param.dtype)
    latents = vae.encode(images).latent_dist.mean  # (N, C, h, w)
    decoded = vae.decode(latents, return_dict=False)[0].float().clamp(-1, 1)  # (N, 3, H, W)
    return (latents.float() * vae.config.scaling_factor).cpu(), F.avg_pool2d(decoded, factor).cpu()  # (N, 3, h, w)


def fit_latent_rgb(vae, side: int, count: int = 12, seed: int = 0) -> LatentPreview:
    """Least squares of [z, 1] (C + 1) -> RGB (3) over every latent position of ``count`` synthetic
    ``side`` px images encoded and decoded by ``vae`` (see the module docstring)."""
    latents, target = encode_decode(vae, synthetic_images(count, side, seed))
    z = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])  # (P, C)
    z = torch.cat([z, torch.ones_like(z[:, :1])], dim=1)  # (P, C + 1)
    rgb = target.permute(0, 2, 3, 1).reshape(-1, 3)  # (P, 3)
    weight = torch.linalg.lstsq(z.double(), rgb.double()).solution.float()  # (C + 1, 3)
    return LatentPreview(weight)
