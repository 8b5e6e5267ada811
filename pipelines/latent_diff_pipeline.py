"""LatentDiffPipeline: text-to-image sampling in a VAE's latent space (Rombach et al. 2022).

The on-disk format is diffusers' (model_index.json + one sub-folder per component, weights in
safetensors), so a folder written here opens in diffusers' StableDiffusionPipeline and an
SD 1.x/2.x folder opens here. Any scheduler that follows diffusers' contract can sample.

Its model_index.json is the one StableDiffusionPipeline writes, naming only diffusers' and
transformers' classes: diffusers imports no other module a folder names, and
``DiffusionPipeline.from_pretrained`` takes the class named by ``_class_name`` from diffusers. Our
DDIM and DDPM are number-equal to diffusers' classes of the same names and take the same config
keys (tests/test_schedulers.py, tests/test_interop.py), so the folder names diffusers' class and
LatentDiffPipeline loads that name as ours.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from diffusers.utils import BaseOutput
from diffusers.utils.peft_utils import scale_lora_layers, unscale_lora_layers
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPTextModel, CLIPTokenizer

from latentdiff.pickles import pickle_only
from latentdiff.presets import default_image_size, vae_scale_factor
from latentdiff.schedulers import DDIMScheduler, DDPMScheduler
from latentdiff.text import encode_prompts

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
# what a saved folder's model_index.json names as its pipeline class, so that diffusers can find it
DIFFUSERS_PIPELINE = "StableDiffusionPipeline"
# diffusers' scheduler class name -> ours; each is number-equal to the diffusers class it is named after
OWN_SCHEDULERS = {cls.__name__: cls for cls in (DDIMScheduler, DDPMScheduler)}


@dataclass
class LatentDiffPipelineOutput(BaseOutput):
    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor


class LatentDiffPipeline(DiffusionPipeline, StableDiffusionLoraLoaderMixin):
    """Generate images from text with a UNet denoising VAE latents under CLIP text conditioning.

    >>> pipe = LatentDiffPipeline.from_pretrained("out/pipeline")
    >>> image = pipe("a small red circle in the top left").images[0]
    """

    model_cpu_offload_seq = "text_encoder->unet->vae"

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler,
    ):
        super().__init__()
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)
        self.vae_scale_factor = vae_scale_factor(vae)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, allow_pickle: bool = False, **kwargs):
        """Load a local pipeline folder; pickle weights are refused unless ``allow_pickle=True``.

        A scheduler named diffusers' DDIMScheduler or DDPMScheduler (as this project writes it, and as
        SD 2.x folders do), or ours by module path (as earlier versions of latentdiff wrote it), loads as
        our class; any other scheduler (SD 1.x's PNDM, DPM-Solver, Euler, ...) loads as itself.
        """
        path = Path(pretrained_model_name_or_path)
        if not path.is_dir():
            raise FileNotFoundError(f"model path {str(path)!r} does not exist or is not a folder")
        if not (path / "model_index.json").is_file():
            raise ValueError(
                f"{str(path)!r} is not a pipeline folder: it has no model_index.json "
                "(expected a folder written by save_pretrained)"
            )
        index = json.loads((path / "model_index.json").read_text())
        if not allow_pickle:
            _refuse_pickle_only_components(path, index)
        own_scheduler = _own_scheduler_class(index.get("scheduler"))
        if own_scheduler is not None and "scheduler" not in kwargs:
            kwargs["scheduler"] = own_scheduler.from_pretrained(path, subfolder="scheduler")
        kwargs.setdefault("use_safetensors", None if allow_pickle else True)
        return super().from_pretrained(path, **kwargs)

    def to_json_string(self) -> str:
        """model_index.json as diffusers writes it for a StableDiffusionPipeline of these components: our
        scheduler under diffusers' name, no safety checker (none is part of this pipeline, so diffusers
        need not warn that it is missing). LatentDiffPipeline.from_pretrained loads it as this class."""
        index = json.loads(super().to_json_string())
        index["_class_name"] = DIFFUSERS_PIPELINE
        index["requires_safety_checker"] = False
        scheduler_cls = type(self.scheduler)
        if OWN_SCHEDULERS.get(scheduler_cls.__name__) is scheduler_cls:
            index["scheduler"] = ["diffusers", scheduler_cls.__name__]
        return json.dumps(index, indent=2, sort_keys=True) + "\n"

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        eta: float = 0.0,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        cross_attention_kwargs: dict | None = None,
    ):
        """Sample images for ``prompt``; with ``guidance_scale`` > 1, classifier-free guidance
        (Ho & Salimans 2022): eps = eps_uncond + w (eps_cond - eps_uncond)."""
        default_size = default_image_size(self.vae, self.unet)
        height = default_size if height is None else height
        width = default_size if width is None else width
        prompts, negative_prompts = self._check_inputs(
            prompt, negative_prompt, height, width, num_inference_steps, num_images_per_prompt, output_type
        )
        batch_size = len(prompts) * num_images_per_prompt
        latents_shape = (
            batch_size,
            self.unet.config.in_channels,
            height // self.vae_scale_factor,
            width // self.vae_scale_factor,
        )
        if latents is not None and tuple(latents.shape) != latents_shape:
            raise ValueError(f"latents have shape {tuple(latents.shape)}; this call needs {latents_shape}")
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"got {len(generator)} generators for {batch_size} images; pass one per image")

        device = self._execution_device
        do_guidance = guidance_scale > 1.0
        lora_scale = (cross_attention_kwargs or {}).get("scale")
        prompt_embeds = self._encode(prompts, negative_prompts if do_guidance else None, lora_scale)
        # each prompt's states repeated for its images; the [uncond; cond] halves stay apart for chunk(2)
        prompt_embeds = prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0)  # (G*B, L, D)

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        if latents is None:
            latents = randn_tensor(latents_shape, generator=generator, device=device, dtype=prompt_embeds.dtype)
        latents = latents.to(device) * self.scheduler.init_noise_sigma  # (B, C, h, w)
        step_kwargs = self._step_kwargs(generator, eta)

        timesteps = self.scheduler.timesteps
        with self.progress_bar(total=len(timesteps)) as progress_bar:
            for i, t in enumerate(timesteps):
                model_input = torch.cat([latents] * 2) if do_guidance else latents  # (G*B, C, h, w)
                model_input = self.scheduler.scale_model_input(model_input, t)
                noise_pred = self.unet(
                    model_input,
                    t,
                    encoder_hidden_states=prompt_embeds,
                    cross_attention_kwargs=cross_attention_kwargs,
                    return_dict=False,
                )[0]
                if do_guidance:
                    noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
                    noise_pred = noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)
                latents = self.scheduler.step(noise_pred, t, latents, **step_kwargs, return_dict=False)[0]
                if callback_on_step_end is not None:
                    outputs = callback_on_step_end(self, i, t, {"latents": latents})
                    latents = outputs.get("latents", latents)
                progress_bar.update()

        if output_type == "latent":
            images = latents
        else:
            # the UNet works on latents scaled to unit variance (LDM sec. 4.3.2); undo it before decoding
            decoded = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False)[0]
            images = self.image_processor.postprocess(decoded, output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return LatentDiffPipelineOutput(images=images)

    def _encode(self, prompts: list[str], negative_prompts: list[str] | None, lora_scale: float | None):
        """Text-encoder states, negatives first when guiding: (B, L, D) or (2B, L, D)."""
        texts = prompts if negative_prompts is None else negative_prompts + prompts
        if lora_scale is not None:
            scale_lora_layers(self.text_encoder, lora_scale)
        try:
            return encode_prompts(self.tokenizer, self.text_encoder, texts, warn_truncated=True)
        finally:
            if lora_scale is not None:
                unscale_lora_layers(self.text_encoder, lora_scale)

    def _step_kwargs(self, generator, eta: float) -> dict:
        params = inspect.signature(self.scheduler.step).parameters
        kwargs = {}
        if "eta" in params:
            kwargs["eta"] = eta
        if "generator" in params:
            kwargs["generator"] = generator
        return kwargs

    def _check_inputs(
        self, prompt, negative_prompt, height, width, num_inference_steps, num_images_per_prompt, output_type
    ) -> tuple[list[str], list[str]]:
        prompts = _as_prompt_list(prompt, "prompt")
        if negative_prompt is None:
            negative_prompts = [""] * len(prompts)
        elif isinstance(negative_prompt, str):
            negative_prompts = [negative_prompt] * len(prompts)
        else:
            negative_prompts = _as_prompt_list(negative_prompt, "negative_prompt")
            if len(negative_prompts) != len(prompts):
                raise ValueError(
                    f"negative_prompt has {len(negative_prompts)} entries but prompt has {len(prompts)}; "
                    "give one negative prompt per prompt, or a single string for all"
                )
        for name, value in (("height", height), ("width", width)):
            if not isinstance(value, int) or value <= 0 or value % self.vae_scale_factor:
                raise ValueError(
                    f"{name}={value!r} must be a positive multiple of the VAE's downsampling factor "
                    f"{self.vae_scale_factor}"
                )
        num_train_timesteps = self.scheduler.config.num_train_timesteps
        if not 1 <= num_inference_steps <= num_train_timesteps:
            raise ValueError(
                f"num_inference_steps={num_inference_steps} must be between 1 and the scheduler's "
                f"num_train_timesteps ({num_train_timesteps})"
            )
        if num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt={num_images_per_prompt} must be at least 1")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type={output_type!r} is not one of {', '.join(map(repr, OUTPUT_TYPES))}")
        return prompts, negative_prompts


def _as_prompt_list(prompt, name: str) -> list[str]:
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    raise TypeError(f"{name} must be a str or a non-empty list of str, got {type(prompt).__name__}: {prompt!r:.80}")


def _own_scheduler_class(spec) -> type | None:
    """Our scheduler class for a model_index.json entry naming diffusers' DDIM/DDPM or ours, else None."""
    if not isinstance(spec, list) or len(spec) != 2 or not isinstance(spec[0], str):
        return None
    library, class_name = spec
    if library == "diffusers" or library.startswith("latentdiff."):
        return OWN_SCHEDULERS.get(class_name)
    return None


def _refuse_pickle_only_components(path: Path, index: dict) -> None:
    """Pickle files can run arbitrary code when loaded: refuse a component that has nothing else."""
    for name, spec in index.items():
        folder = path / name
        if name.startswith("_") or not isinstance(spec, list) or not folder.is_dir():
            continue
        pickles = pickle_only(f.name for f in folder.iterdir())
        if pickles:
            raise ValueError(
                f"component {name!r} in {str(path)!r} has only pickle weights ({', '.join(pickles)}); "
                "loading pickle can run arbitrary code. Convert them to safetensors, or pass "
                "allow_pickle=True if you trust where they came from."
            )
