"""LatentDiffImg2ImgPipeline: SDEdit (Meng et al. 2022) in a VAE's latent space.

The source image's latents are noised to the timestep that ``strength`` picks, x_t = sqrt(alpha_bar_t) x_0
+ sqrt(1 - alpha_bar_t) eps (Ho et al. 2020 eq. 4), and denoised from there with the text-to-image
pipeline's loop. Numbers match diffusers' StableDiffusionImg2ImgPipeline on the same components,
scheduler and generator (tests/test_img2img_inpaint.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import PIL.Image
import torch
from diffusers.utils.torch_utils import randn_tensor
from latentdiff.pipelines.latent_diff_pipeline import LatentDiffPipeline, LatentDiffPipelineOutput

logger = logging.getLogger(__name__)


class LatentDiffImg2ImgPipeline(LatentDiffPipeline):
    """Turn an image into another under a prompt; ``strength`` in (0, 1] is how much of the sampling
    schedule runs (1: the image only sets the starting noise's mean, nothing of it is kept for sure).

    >>> img2img = LatentDiffImg2ImgPipeline.from_pipe(pipe)  # the same modules, no copy
    >>> image = img2img("a blue square", image=source, strength=0.6).images[0]
    """

    diffusers_pipeline = "StableDiffusionImg2ImgPipeline"

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image=None,
        strength: float = 0.8,
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
        """``image``: a PIL image, an array (H, W, C) in [0, 1], a tensor (C, H, W) in [-1, 1], or a list or
        batch of them, one for all prompts or one per prompt; it is resized to height x width (by default
        its own size, rounded down to the VAE's factor), with a warning if that changes it. Image i goes
        with prompt i and its ``num_images_per_prompt`` images (diffusers tiles several images over the
        prompts instead; both agree for one image, or one per prompt and image)."""
        text = self._check_text(
            prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, clip_skip, guidance_scale
        )
        height, width = self._check_image(image, "image", height, width, text.batch_size)
        self._check_sampling(
            height, width, num_inference_steps, timesteps, guidance_rescale, num_images_per_prompt, output_type
        )
        self._check_strength(strength, num_inference_steps, timesteps)
        batch_size = text.batch_size * num_images_per_prompt
        self._check_generator(generator, batch_size)

        device = self._execution_device
        prompt_embeds = self._encode(text, guidance_scale > 1.0, num_images_per_prompt, clip_skip, cross_attention_kwargs)
        source = self.image_processor.preprocess(image, height=height, width=width)  # (N, 3, H, W)
        timesteps = self._strength_timesteps(num_inference_steps, timesteps, strength, device)
        image_latents = self._encode_images(source, generator, num_images_per_prompt, batch_size, prompt_embeds.dtype)
        noise = randn_tensor(image_latents.shape, generator=generator, device=device, dtype=prompt_embeds.dtype)
        latents = self.scheduler.add_noise(image_latents, noise, timesteps[:1].repeat(batch_size))  # (B, C, h, w)
        latents = self._denoise(
            latents, timesteps, prompt_embeds, guidance_scale, guidance_rescale, self._step_kwargs(generator, eta),
            cross_attention_kwargs, callback_on_step_end,
        )
        images = self._decode(latents, output_type)
        return LatentDiffPipelineOutput(images=images) if return_dict else (images,)

    # Shared with LatentDiffInpaintPipeline -----------------------------------------------------------

    def _check_image(self, image, name: str, height: int | None, width: int | None, num_prompts: int):
        """(height, width) of the call: given, or the image's own rounded down to the VAE's factor. An image
        of another size is resized, and said; the image count must be 1 or one per prompt."""
        size, count = _image_size_and_count(image, name)
        factor = self.vae_scale_factor
        height = size[0] - size[0] % factor if height is None else height
        width = size[1] - size[1] % factor if width is None else width
        if count not in (1, num_prompts):
            raise ValueError(f"{name} holds {count} images for {num_prompts} prompts; give one for all, or one per prompt")
        if (height, width) != size and isinstance(height, int) and isinstance(width, int):
            logger.warning(
                "%s is %dx%d (width x height); it is resized to %dx%d", name, size[1], size[0], width, height
            )
        return height, width

    def _check_strength(self, strength, num_inference_steps: int, timesteps) -> None:
        if not isinstance(strength, (int, float)) or not 0.0 < strength <= 1.0:
            raise ValueError(f"strength={strength!r} must be in (0, 1]: the fraction of the schedule to run")
        steps = num_inference_steps if timesteps is None else len(timesteps)
        if int(steps * strength) < 1:
            raise ValueError(
                f"strength={strength} of {steps} steps leaves no denoising step (int({steps} * {strength}) = 0); "
                "raise strength or num_inference_steps"
            )

    def _strength_timesteps(self, num_inference_steps: int, timesteps, strength: float, device) -> torch.Tensor:
        """The scheduler's timesteps from the last int(N strength) of its N steps on (a step being `order`
        timesteps; N counts custom timesteps as diffusers does)."""
        order = getattr(self.scheduler, "order", 1)
        custom = timesteps is not None
        timesteps = self._set_timesteps(num_inference_steps, timesteps, device)
        num_steps = len(timesteps) if custom else num_inference_steps
        t_start = num_steps - min(int(num_steps * strength), num_steps)
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(t_start * order)
        return timesteps[t_start * order :]

    def _encode_images(
        self, images: torch.Tensor, generator, num_images_per_prompt: int, batch_size: int, dtype: torch.dtype
    ) -> torch.Tensor:
        """Scaled VAE latents sampled from q(z | x) (LDM sec. 3), one per output image: (B, C, h, w). A list
        of generators samples output image j's latents with generator j."""
        images = images.to(device=self._execution_device, dtype=dtype)
        repeats = batch_size // images.shape[0]
        if isinstance(generator, list):
            images = images.repeat_interleave(repeats, dim=0)  # (B, 3, H, W)
            latents = torch.cat([
                self.vae.encode(images[j : j + 1]).latent_dist.sample(generator[j]) for j in range(batch_size)
            ])
        else:
            latents = self.vae.encode(images).latent_dist.sample(generator)
            latents = latents.repeat_interleave(repeats, dim=0)  # (B, C, h, w)
        return self.vae.config.scaling_factor * latents


def _image_size_and_count(image, name: str) -> tuple[tuple[int, int], int]:
    """((height, width), number of images) of a PIL image, array, tensor, or list of one kind of them."""
    items = image if isinstance(image, list) else [image]
    if not items:
        raise ValueError(f"{name} is an empty list")
    first = items[0]
    if isinstance(first, PIL.Image.Image):
        return (first.size[1], first.size[0]), len(items)
    if isinstance(first, np.ndarray) and first.ndim in (2, 3, 4):
        # (H, W), (H, W, C) or (N, H, W, C), as diffusers' VaeImageProcessor reads arrays
        hw = first.shape[:2] if first.ndim < 4 else first.shape[1:3]
        count = len(items) if first.ndim < 4 else first.shape[0] * len(items)
        return tuple(int(x) for x in hw), count
    if isinstance(first, torch.Tensor) and first.ndim in (2, 3, 4):
        count = len(items) if first.ndim < 4 else first.shape[0] * len(items)
        return tuple(int(x) for x in first.shape[-2:]), count
    raise TypeError(
        f"{name} must be a PIL image, a numpy array, a torch tensor or a list of them, got {type(first).__name__}"
    )
