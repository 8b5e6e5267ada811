"""Image reconstruction metrics on (B, 3, H, W) images in [-1, 1], one value per image."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def psnr(images: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """(B,) peak signal-to-noise ratio in dB, 10 log10(MAX² / MSE) with MAX = 2, the range of [-1, 1]; inf when equal."""
    mse = (images.float() - references.float()).pow(2).flatten(1).mean(dim=1)
    return 10 * torch.log10(4.0 / mse)


def _gaussian_window(size: int, sigma: float, channels: int, device) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float32, device=device) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size)  # (C, 1, size, size)


def ssim(images: torch.Tensor, references: torch.Tensor, window_size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """(B,) structural similarity (Wang et al. 2004, eq. 13) on [0, 1] intensities, averaged over channels and positions.

    The constants are the paper's (K1 = 0.01, K2 = 0.03, an 11x11 Gaussian window with σ = 1.5, valid
    positions only); images smaller than the window use a window as large as the image.
    """
    x = (images.float() + 1) / 2
    y = (references.float() + 1) / 2
    channels = x.shape[1]
    size = min(window_size, x.shape[-1], x.shape[-2])
    window = _gaussian_window(size, sigma, channels, x.device)
    c1, c2 = 0.01**2, 0.03**2

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, window, groups=channels)  # (B, C, H - size + 1, W - size + 1)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov_xy = blur(x * y) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(1).mean(dim=1)
