"""Training an inpainting model as Stable Diffusion's inpainting UNets were: a 9-channel UNet that sees, beside
the noisy latents, the mask and the latents of the masked image (Rombach et al. 2022, §4.5 and App.; the
sd-v1-5-inpainting model card: synthetic masks, and 25% of the time the whole image masked).

    unet = inpainting_unet(unet)                                  # 4 -> 9 input channels, new ones zero
    extra = masked_image_conditioning(pixels, vae, generator, latents.shape[-2:])   # (B, 5, h, w)
    model_input = torch.cat([x_t, extra], dim=1)                  # (B, 9, h, w)

The layout of the 9 channels is diffusers' (StableDiffusionInpaintPipeline): latents, the mask (1 where
the image is to be filled), the masked image's latents; the masked image keeps the pixels where mask < 0.5.
"""

from __future__ import annotations

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel

# share of training images masked whole (the model then learns text-to-image too)
FULL_MASK_PROBABILITY = 0.25


def inpainting_unet(unet: UNet2DConditionModel) -> UNet2DConditionModel:
    """``unet`` with 2C + 1 input channels: its first conv keeps its weights for the C latent channels, and
    the mask's and masked latents' channels start at zero, so the model starts as the text-to-image one."""
    latent_channels = unet.config.out_channels
    if unet.config.in_channels == 2 * latent_channels + 1:
        return unet
    if unet.config.in_channels != latent_channels:
        raise ValueError(
            f"the UNet takes {unet.config.in_channels} channels: neither a text-to-image UNet ({latent_channels}) "
            f"nor an inpainting one ({2 * latent_channels + 1})"
        )
    old = unet.conv_in
    new = torch.nn.Conv2d(2 * latent_channels + 1, old.out_channels, old.kernel_size, old.stride, old.padding)
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, :latent_channels] = old.weight
        new.bias.copy_(old.bias)
    unet.conv_in = new.to(device=old.weight.device, dtype=old.weight.dtype)
    unet.register_to_config(in_channels=2 * latent_channels + 1)
    return unet


def random_masks(batch_size: int, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
    """Masks (B, 1, H, W) in {0, 1}, 1 where the model fills in: the whole image with probability 1/4, else
    one to three random rectangles, each a tenth to two thirds of a side long."""
    device = generator.device
    masks = torch.zeros(batch_size, 1, height, width, device=device)
    full = torch.rand(batch_size, device=device, generator=generator) < FULL_MASK_PROBABILITY
    counts = torch.randint(1, 4, (batch_size,), device=device, generator=generator)
    sides = torch.tensor([height, width], device=device, dtype=torch.float32)
    for i in range(batch_size):
        if full[i]:
            masks[i] = 1
            continue
        for _ in range(int(counts[i])):
            size = (sides * (0.1 + 0.57 * torch.rand(2, device=device, generator=generator))).long().clamp(min=1)
            corner = ((sides - size) * torch.rand(2, device=device, generator=generator)).long()
            masks[i, :, corner[0] : corner[0] + size[0], corner[1] : corner[1] + size[1]] = 1
    return masks


def inpainting_example(pixel_values: torch.Tensor) -> dict[str, PIL.Image.Image]:
    """A validation input for an inpainting pipeline: an image (3, H, W) in [-1, 1] and a mask of its center
    square (half the sides), as the ``image`` and ``mask_image`` the pipeline takes."""
    image = ((pixel_values.float() + 1) * 127.5).clamp(0, 255).round().byte().permute(1, 2, 0).cpu().numpy()
    height, width = image.shape[:2]
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[height // 4 : height - height // 4, width // 4 : width - width // 4] = 255
    return {"image": PIL.Image.fromarray(image), "mask_image": PIL.Image.fromarray(mask, mode="L")}


def masked_image_conditioning(
    pixel_values: torch.Tensor, vae: AutoencoderKL, generator: torch.Generator, latent_size: tuple[int, int],
    masks: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """The extra input of an inpainting UNet for images (B, 3, H, W) in [-1, 1]: the mask at the latents'
    size (nearest, as diffusers) and the scaled latents z ~ q(z | masked image), (B, 1 + C, h, w)."""
    pixel_values = pixel_values.float()
    if masks is None:
        masks = random_masks(pixel_values.shape[0], *pixel_values.shape[-2:], generator)
    masked = pixel_values * (masks < 0.5)  # (B, 3, H, W): the kept pixels, 0 (gray) where filled
    with torch.no_grad():
        masked_latents = vae.encode(masked).latent_dist.sample(generator) * vae.config.scaling_factor
    return torch.cat([F.interpolate(masks, size=tuple(latent_size)), masked_latents], dim=1)  # (B, 1 + C, h, w)
