"""LatentDiffInpaintPipeline: regenerate the masked part of an image, keep the rest.

Two ways, chosen by the UNet's input channels, as in diffusers' StableDiffusionInpaintPipeline (which it
matches on the same components, scheduler and generator; tests/test_img2img_inpaint.py):

- a 9-channel inpainting UNet (SD-inpainting, Rombach et al. 2022 sec. 4.5) takes the noisy latents, the
  mask downsampled to latent size and the masked image's latents, concatenated along channels;
- any 4-channel text-to-image UNet: after each step the known region is replaced by the source latents
  noised to the next step's timestep, x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps (Ho et al.
  2020 eq. 4; the "replacement" method of RePaint, Lugmayr et al. 2022, without resampling), one noise eps
  for all steps.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.torch_utils import randn_tensor
from latentdiff.pipelines.img2img import LatentDiffImg2ImgPipeline
from latentdiff.pipelines.latent_diff_pipeline import LatentDiffPipelineOutput
from transformers import BertModel, BertTokenizerFast, CLIPTextModel, CLIPTokenizer

logger = logging.getLogger(__name__)

MASK_MODES = ("L", "1", "RGB")


class LatentDiffInpaintPipeline(LatentDiffImg2ImgPipeline):
    """Inpaint where ``mask_image`` is white (>= 0.5), keep where it is black.

    >>> inpaint = LatentDiffInpaintPipeline.from_pipe(pipe)  # any text-to-image model, or a 9-channel UNet's
    >>> image = inpaint("a red circle", image=source, mask_image=mask, mask_blur=2).images[0]
    """

    diffusers_pipeline = "StableDiffusionInpaintPipeline"

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel | BertModel,
        tokenizer: CLIPTokenizer | BertTokenizerFast,
        unet: UNet2DConditionModel,
        scheduler,
    ):
        super().__init__(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)
        self.mask_processor = VaeImageProcessor(
            vae_scale_factor=self.vae_scale_factor, do_normalize=False, do_convert_grayscale=True
        )

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image=None,
        mask_image=None,
        strength: float = 1.0,
        mask_blur: float = 0.0,
        padding_mask_crop: int | None = None,
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        guidance_scale: float = 7.5,
        guidance_rescale: float = 0.0,
        eta: float = 0.0,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        clip_skip: int | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        cross_attention_kwargs: dict | None = None,
    ):
        """``image`` as in LatentDiffImg2ImgPipeline; ``mask_image`` of the same kinds, grayscale (other
        PIL modes are converted, another size resized, each with a warning). ``strength`` < 1 starts from
        the source noised instead of pure noise. ``mask_blur``: a Gaussian blur of that standard deviation in
        pixels softens the mask's edge in the 4-channel blend (a 9-channel UNet, trained on binary masks,
        sees the blurred mask thresholded at 0.5). ``padding_mask_crop``: inpaint only the mask's bounding
        box grown by that many pixels, at full resolution, and paste it back into the source (PIL only)."""
        text = self._check_text(
            prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, clip_skip, guidance_scale
        )
        height, width = self._check_image(image, "image", height, width, text.batch_size)
        mask_image = self._check_mask(mask_image, height, width, text.batch_size)
        self._check_sampling(
            height, width, num_inference_steps, timesteps, guidance_rescale, num_images_per_prompt, output_type
        )
        self._check_strength(strength, num_inference_steps, timesteps)
        self._check_inpaint_options(image, mask_image, mask_blur, padding_mask_crop, output_type)
        batch_size = text.batch_size * num_images_per_prompt
        self._check_generator(generator, batch_size)

        device = self._execution_device
        do_guidance = guidance_scale > 1.0
        prompt_embeds = self._encode(text, do_guidance, num_images_per_prompt, clip_skip, cross_attention_kwargs)
        dtype = prompt_embeds.dtype
        timesteps = self._strength_timesteps(num_inference_steps, timesteps, strength, device)

        crops_coords, resize_mode = None, "default"
        if padding_mask_crop is not None:
            crops_coords = self.mask_processor.get_crop_region(mask_image, width, height, pad=padding_mask_crop)
            resize_mode = "fill"
        source = self.image_processor.preprocess(
            image, height=height, width=width, crops_coords=crops_coords, resize_mode=resize_mode
        ).to(torch.float32)  # (N, 3, H, W)
        mask = self.mask_processor.preprocess(
            mask_image, height=height, width=width, crops_coords=crops_coords, resize_mode=resize_mode
        )  # (M, 1, H, W) in [0, 1]
        if mask_blur > 0:
            mask = gaussian_blur(mask, mask_blur)
        mask_binary = (mask >= 0.5).to(mask.dtype)  # as diffusers' VaeImageProcessor binarizes
        if not mask_binary.any():
            logger.warning("mask_image is black everywhere: nothing to inpaint, the result is the source image")

        nine_channels = self.unet.config.in_channels != self.vae.config.latent_channels
        latents_shape = (batch_size, self.vae.config.latent_channels, height // self.vae_scale_factor,
                         width // self.vae_scale_factor)
        image_latents = None
        if strength < 1.0 or not nine_channels:
            image_latents = self._encode_images(source, generator, num_images_per_prompt, batch_size, dtype)
        noise = randn_tensor(latents_shape, generator=generator, device=device, dtype=dtype)
        if strength == 1.0:
            latents = noise * self.scheduler.init_noise_sigma  # (B, C, h, w)
        else:
            latents = self.scheduler.add_noise(image_latents, noise, timesteps[:1].repeat(batch_size))

        # a blurred mask's soft edge is the 4-channel blend's weights; otherwise the mask is binary, as in diffusers
        latent_mask = mask if mask_blur > 0 and not nine_channels else mask_binary
        latent_mask = latent_mask.repeat_interleave(batch_size // latent_mask.shape[0], dim=0)  # (B, 1, H, W)
        latent_mask = F.interpolate(latent_mask, size=latents_shape[-2:]).to(device=device, dtype=dtype)  # (B, 1, h, w)
        conditioning, after_step = None, None
        if nine_channels:
            masked_image = source * (mask_binary < 0.5)  # (N, 3, H, W); the region to fill is black
            masked_latents = self._encode_images(masked_image, generator, num_images_per_prompt, batch_size, dtype)
            conditioning = torch.cat([latent_mask, masked_latents], dim=1)  # (B, 1 + C, h, w)
            conditioning = torch.cat([conditioning] * 2) if do_guidance else conditioning  # (G*B, 1 + C, h, w)
        else:
            def after_step(i: int, latents: torch.Tensor) -> torch.Tensor:
                known = image_latents
                if i < len(timesteps) - 1:
                    known = self.scheduler.add_noise(image_latents, noise, timesteps[i + 1 : i + 2])
                return (1 - latent_mask) * known + latent_mask * latents

        latents = self._denoise(
            latents, timesteps, prompt_embeds, guidance_scale, guidance_rescale, self._step_kwargs(generator, eta),
            cross_attention_kwargs, callback_on_step_end, conditioning=conditioning, after_step=after_step,
        )
        images = self._decode(latents, output_type)
        if padding_mask_crop is not None:
            images = [self.image_processor.apply_overlay(mask_image, image, result, crops_coords) for result in images]
        return LatentDiffPipelineOutput(images=images) if return_dict else (images,)

    def _check_mask(self, mask_image, height: int, width: int, num_prompts: int):
        if mask_image is None:
            raise ValueError("mask_image is required: white (>= 0.5) where to inpaint, black where to keep")
        self._check_image(mask_image, "mask_image", height, width, num_prompts)
        masks = mask_image if isinstance(mask_image, list) else [mask_image]
        modes = {m.mode for m in masks if isinstance(m, PIL.Image.Image)} - set(MASK_MODES)
        if not modes:
            return mask_image
        logger.warning("mask_image has mode %s, not one of %s: converted to L (grayscale)",
                       "/".join(sorted(modes)), "/".join(MASK_MODES))
        converted = [m.convert("L") if isinstance(m, PIL.Image.Image) and m.mode not in MASK_MODES else m
                     for m in masks]
        return converted if isinstance(mask_image, list) else converted[0]

    def _check_inpaint_options(self, image, mask_image, mask_blur, padding_mask_crop, output_type) -> None:
        latent_channels = self.vae.config.latent_channels
        if self.unet.config.in_channels not in (latent_channels, 2 * latent_channels + 1):
            raise ValueError(
                f"the UNet takes {self.unet.config.in_channels} input channels; inpainting needs "
                f"{latent_channels} (a text-to-image UNet) or {2 * latent_channels + 1} (latents, mask, "
                "masked-image latents: an inpainting UNet)"
            )
        if not isinstance(mask_blur, (int, float)) or mask_blur < 0:
            raise ValueError(f"mask_blur={mask_blur!r} must be a number >= 0 (a standard deviation in pixels)")
        if padding_mask_crop is None:
            return
        if not isinstance(padding_mask_crop, int) or padding_mask_crop < 0:
            raise ValueError(f"padding_mask_crop={padding_mask_crop!r} must be an int >= 0 (pixels)")
        if not (isinstance(image, PIL.Image.Image) and isinstance(mask_image, PIL.Image.Image)):
            raise ValueError("padding_mask_crop needs image and mask_image as single PIL images")
        if output_type != "pil":
            raise ValueError(f"padding_mask_crop pastes into the source image: output_type must be 'pil', not {output_type!r}")


def gaussian_blur(mask: torch.Tensor, sigma: float) -> torch.Tensor:
    """A separable Gaussian blur of standard deviation ``sigma`` pixels, edges replicated: (M, 1, H, W)."""
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=mask.dtype)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    mask = F.pad(mask, (radius, radius, radius, radius), mode="replicate")  # (M, 1, H + 2r, W + 2r)
    mask = F.conv2d(mask, kernel.view(1, 1, 1, -1))  # (M, 1, H + 2r, W)
    return F.conv2d(mask, kernel.view(1, 1, -1, 1))  # (M, 1, H, W)

