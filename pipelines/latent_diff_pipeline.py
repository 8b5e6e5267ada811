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
from diffusers.loaders import StableDiffusionLoraLoaderMixin, TextualInversionLoaderMixin
from diffusers.utils import BaseOutput
from diffusers.utils.peft_utils import scale_lora_layers, unscale_lora_layers
from diffusers.utils.torch_utils import randn_tensor
from transformers import BertModel, BertTokenizerFast, CLIPTextModel, CLIPTokenizer

from latentdiff.pickles import pickle_only
from latentdiff.presets import default_image_size, vae_scale_factor
from latentdiff.schedulers import DDIMScheduler, DDPMScheduler
from latentdiff.text import text_encoder_outputs

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
# diffusers' scheduler class name -> ours; each is number-equal to the diffusers class it is named after
OWN_SCHEDULERS = {cls.__name__: cls for cls in (DDIMScheduler, DDPMScheduler)}


@dataclass
class LatentDiffPipelineOutput(BaseOutput):
    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor


class LatentDiffPipeline(DiffusionPipeline, StableDiffusionLoraLoaderMixin, TextualInversionLoaderMixin):
    """Generate images from text with a UNet denoising VAE latents under text conditioning: a CLIP text model,
    or a BERT such as MiniLM (latentdiff.text_encoders), whose states go in as diffusers' StableDiffusionPipeline
    computes them (latentdiff.text.uses_attention_mask).

    >>> pipe = LatentDiffPipeline.from_pretrained("out/pipeline")
    >>> image = pipe("a small red circle in the top left").images[0]
    """

    model_cpu_offload_seq = "text_encoder->unet->vae"
    # what a saved folder's model_index.json names as its pipeline class: diffusers' pipeline of the same
    # components and task, so that diffusers can open the folder without latentdiff
    diffusers_pipeline = "StableDiffusionPipeline"

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel | BertModel,
        tokenizer: CLIPTokenizer | BertTokenizerFast,
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
        """model_index.json as diffusers writes it for its pipeline of these components and task
        (``diffusers_pipeline``): our scheduler under diffusers' name, no safety checker (none is part of
        this pipeline, so diffusers need not warn that it is missing). from_pretrained of any of our
        pipeline classes loads it as that class."""
        index = json.loads(super().to_json_string())
        index["_class_name"] = self.diffusers_pipeline
        index["requires_safety_checker"] = False
        scheduler_cls = type(self.scheduler)
        if OWN_SCHEDULERS.get(scheduler_cls.__name__) is scheduler_cls:
            index["scheduler"] = ["diffusers", scheduler_cls.__name__]
        return json.dumps(index, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_pipe(cls, pipeline: DiffusionPipeline, **components):
        """A pipeline of this class on ``pipeline``'s components (any of them replaced by ``components``),
        shared, not copied, e.g. ``LatentDiffImg2ImgPipeline.from_pipe(pipe)``. DiffusionPipeline.from_pipe
        shares them too but casts every module to one dtype (float32 unless ``torch_dtype`` is given)."""
        names = ("vae", "text_encoder", "tokenizer", "unet", "scheduler")
        unknown = sorted(set(components) - set(names))
        if unknown:
            raise TypeError(f"from_pipe got {', '.join(unknown)}; it takes the components {', '.join(names)}")
        missing = [name for name in names if name not in components and name not in pipeline.components]
        if missing:
            raise ValueError(f"{type(pipeline).__name__} has no {', '.join(missing)}; pass them to from_pipe")
        new = cls(**{name: components.get(name, pipeline.components.get(name)) for name in names})
        new.set_progress_bar_config(**getattr(pipeline, "_progress_bar_config", {}))
        return new

    @classmethod
    def from_single_file(cls, path, config, **kwargs):
        """A pipeline from one SD 1.x/2.x checkpoint file in the original CompVis layout; ``config`` is a
        local pipeline folder giving the components' configs (see latentdiff.single_file)."""
        from latentdiff import single_file

        pipe = single_file.from_single_file(path, config, **kwargs)
        return pipe if type(pipe) is cls else cls.from_pipe(pipe)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
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
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        clip_skip: int | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        cross_attention_kwargs: dict | None = None,
    ):
        """Sample images for ``prompt`` (or ``prompt_embeds``); with ``guidance_scale`` > 1, classifier-free
        guidance (Ho & Salimans 2022): eps = eps_uncond + w (eps_cond - eps_uncond), rescaled by
        ``guidance_rescale`` (Lin et al. 2024 sec. 3.4). ``clip_skip`` takes the text encoder's states that
        many layers before the last; ``timesteps`` replaces the scheduler's spacing where it accepts one."""
        default_size = default_image_size(self.vae, self.unet)
        height = default_size if height is None else height
        width = default_size if width is None else width
        text = self._check_text(
            prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, clip_skip, guidance_scale
        )
        self._check_sampling(
            height, width, num_inference_steps, timesteps, guidance_rescale, num_images_per_prompt, output_type
        )
        batch_size = text.batch_size * num_images_per_prompt
        latents_shape = (
            batch_size,
            self.unet.config.in_channels,
            height // self.vae_scale_factor,
            width // self.vae_scale_factor,
        )
        if latents is not None and tuple(latents.shape) != latents_shape:
            raise ValueError(f"latents have shape {tuple(latents.shape)}; this call needs {latents_shape}")
        self._check_generator(generator, batch_size)

        device = self._execution_device
        prompt_embeds = self._encode(text, guidance_scale > 1.0, num_images_per_prompt, clip_skip, cross_attention_kwargs)
        timesteps = self._set_timesteps(num_inference_steps, timesteps, device)
        if latents is None:
            latents = randn_tensor(latents_shape, generator=generator, device=device, dtype=prompt_embeds.dtype)
        latents = latents.to(device) * self.scheduler.init_noise_sigma  # (B, C, h, w)
        latents = self._denoise(
            latents, timesteps, prompt_embeds, guidance_scale, guidance_rescale, self._step_kwargs(generator, eta),
            cross_attention_kwargs, callback_on_step_end,
        )
        images = self._decode(latents, output_type)
        return LatentDiffPipelineOutput(images=images) if return_dict else (images,)

    # The steps every pipeline here shares (text-to-image, img2img, inpainting) ---------------------------

    def _denoise(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        prompt_embeds: torch.Tensor,
        guidance_scale: float,
        guidance_rescale: float,
        step_kwargs: dict,
        cross_attention_kwargs: dict | None,
        callback_on_step_end: Callable | None,
        conditioning: torch.Tensor | None = None,
        after_step: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The sampling loop. ``conditioning`` (e.g. an inpainting UNet's mask and masked-image latents, one
        per UNet input row) is concatenated to the scaled latents along channels; ``after_step(i, latents)``
        may change the latents after each scheduler step (e.g. to restore an inpainting's known region)."""
        do_guidance = guidance_scale > 1.0
        with self.progress_bar(total=len(timesteps)) as progress_bar:
            for i, t in enumerate(timesteps):
                model_input = torch.cat([latents] * 2) if do_guidance else latents  # (G*B, C, h, w)
                model_input = self.scheduler.scale_model_input(model_input, t)
                if conditioning is not None:
                    model_input = torch.cat([model_input, conditioning], dim=1)  # (G*B, C + C', h, w)
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
                    if guidance_rescale > 0.0:
                        noise_pred = rescale_guidance(noise_pred, noise_pred_text, guidance_rescale)
                latents = self.scheduler.step(noise_pred, t, latents, **step_kwargs, return_dict=False)[0]
                if after_step is not None:
                    latents = after_step(i, latents)
                if callback_on_step_end is not None:
                    outputs = callback_on_step_end(self, i, t, {"latents": latents})
                    latents = outputs.get("latents", latents)
                progress_bar.update()
        return latents

    def _decode(self, latents: torch.Tensor, output_type: str):
        if output_type == "latent":
            images = latents
        else:
            # the UNet works on latents scaled to unit variance (LDM sec. 4.3.2); undo it before decoding
            decoded = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False)[0]
            images = self.image_processor.postprocess(decoded, output_type=output_type)
        self.maybe_free_model_hooks()
        return images

    def _encode(
        self, text: TextInputs, do_guidance: bool, num_images_per_prompt: int, clip_skip: int | None,
        cross_attention_kwargs: dict | None,
    ) -> torch.Tensor:
        """Text-encoder states for each image, negatives first when guiding: (B, L, D) or (2B, L, D)."""
        lora_scale = (cross_attention_kwargs or {}).get("scale")
        if lora_scale is not None:
            scale_lora_layers(self.text_encoder, lora_scale)
        try:
            embeds = text.prompt_embeds
            if embeds is None:
                embeds = self._encode_texts(text.prompts, clip_skip)
            if do_guidance:
                negative = text.negative_prompt_embeds
                if negative is None:
                    negative = self._encode_texts(text.negative_prompts, clip_skip)
                embeds = torch.cat([negative.to(embeds), embeds])  # (2B, L, D)
        finally:
            if lora_scale is not None:
                unscale_lora_layers(self.text_encoder, lora_scale)
        embeds = embeds.to(device=self._execution_device, dtype=self.text_encoder.dtype)
        # each prompt's states repeated for its images; the [uncond; cond] halves stay apart for chunk(2)
        return embeds.repeat_interleave(num_images_per_prompt, dim=0)  # (G*B, L, D)

    def _encode_texts(self, texts: list[str], clip_skip: int | None) -> torch.Tensor:
        """(B, L, D) states; a textual-inversion token of several vectors is first spelt out in its tokens.
        Unlike diffusers' StableDiffusionPipeline, which encodes negative prompts without ``clip_skip``,
        the negative prompts here come from the same layer as the prompts: guidance subtracts the two."""
        texts = self.maybe_convert_prompt(texts, self.tokenizer)
        outputs = text_encoder_outputs(self.tokenizer, self.text_encoder, texts, warn_truncated=True,
                                       output_hidden_states=clip_skip is not None)  # fmt: skip
        if clip_skip is None:
            return outputs[0]  # (B, L, D)
        hidden_states = outputs.hidden_states[-(clip_skip + 1)]  # (B, L, D)
        # CLIP's last layer's output passes through the final layer norm; an earlier one must too. transformers 5's
        # CLIPTextModel holds it itself, CLIPTextModelWithProjection (and transformers 4's) in .text_model. A BERT
        # has none: each of its layers ends in its own layer norm
        final_layer_norm = getattr(getattr(self.text_encoder, "text_model", self.text_encoder), "final_layer_norm", None)
        return hidden_states if final_layer_norm is None else final_layer_norm(hidden_states)  # (B, L, D)

    def _set_timesteps(self, num_inference_steps: int, timesteps: list[int] | None, device) -> torch.Tensor:
        if timesteps is None:
            self.scheduler.set_timesteps(num_inference_steps, device=device)
        else:
            self.scheduler.set_timesteps(timesteps=[int(t) for t in timesteps], device=device)
        return self.scheduler.timesteps

    def _step_kwargs(self, generator, eta: float) -> dict:
        params = inspect.signature(self.scheduler.step).parameters
        kwargs = {}
        if "eta" in params:
            kwargs["eta"] = eta
        if "generator" in params:
            kwargs["generator"] = generator
        return kwargs

    # Argument checks, all before any model runs --------------------------------------------------------

    def _check_text(
        self, prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, clip_skip, guidance_scale
    ) -> TextInputs:
        if prompt is not None and prompt_embeds is not None:
            raise ValueError("pass prompt or prompt_embeds, not both")
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("pass negative_prompt or negative_prompt_embeds, not both")
        width = self.unet.config.cross_attention_dim
        length = self.tokenizer.model_max_length
        if prompt_embeds is None:
            if prompt is None:
                raise ValueError("pass prompt (a str or a list of str) or prompt_embeds")
            prompts = _as_prompt_list(prompt, "prompt")
            embeds_shape = (len(prompts), length, width)
        else:
            prompts = None
            if not isinstance(prompt_embeds, torch.Tensor) or prompt_embeds.ndim != 3 or prompt_embeds.shape[-1] != width:
                shape = tuple(prompt_embeds.shape) if isinstance(prompt_embeds, torch.Tensor) else type(prompt_embeds).__name__
                raise ValueError(
                    f"prompt_embeds has shape {shape}; it must be a tensor (batch, tokens, {width}), "
                    f"{width} being the UNet's cross_attention_dim"
                )
            embeds_shape = tuple(prompt_embeds.shape)
        batch = embeds_shape[0]
        if negative_prompt_embeds is not None:
            shape = tuple(negative_prompt_embeds.shape) if isinstance(negative_prompt_embeds, torch.Tensor) else None
            if shape != embeds_shape:
                raise ValueError(
                    f"negative_prompt_embeds has shape {shape or type(negative_prompt_embeds).__name__}; it must "
                    f"have the prompts' shape {embeds_shape}"
                )
            negative_prompts = None
        elif negative_prompt is None:
            negative_prompts = [""] * batch
        elif isinstance(negative_prompt, str):
            negative_prompts = [negative_prompt] * batch
        else:
            negative_prompts = _as_prompt_list(negative_prompt, "negative_prompt")
            if len(negative_prompts) != batch:
                what = "prompt" if prompts is not None else "prompt_embeds"
                raise ValueError(
                    f"negative_prompt has {len(negative_prompts)} entries but {what} has {batch}; "
                    "give one negative prompt per prompt, or a single string for all"
                )
        if guidance_scale > 1.0 and negative_prompts is not None and embeds_shape[1] != length:
            raise ValueError(
                f"prompt_embeds has {embeds_shape[1]} tokens but negative prompts encode to the tokenizer's "
                f"{length}; pass negative_prompt_embeds of the shape {embeds_shape}"
            )
        if clip_skip is not None:
            layers = self.text_encoder.config.num_hidden_layers
            if not isinstance(clip_skip, int) or not 0 <= clip_skip < layers:
                raise ValueError(
                    f"clip_skip={clip_skip!r} must be an int from 0 to {layers - 1}: the text encoder has "
                    f"{layers} layers"
                )
        return TextInputs(prompts, negative_prompts, prompt_embeds, negative_prompt_embeds)

    def _check_sampling(
        self, height, width, num_inference_steps, timesteps, guidance_rescale, num_images_per_prompt, output_type
    ) -> None:
        for name, value in (("height", height), ("width", width)):
            if not isinstance(value, int) or value <= 0 or value % self.vae_scale_factor:
                raise ValueError(
                    f"{name}={value!r} must be a positive multiple of the VAE's downsampling factor "
                    f"{self.vae_scale_factor}"
                )
        num_train_timesteps = self.scheduler.config.num_train_timesteps
        if timesteps is None:
            if not 1 <= num_inference_steps <= num_train_timesteps:
                raise ValueError(
                    f"num_inference_steps={num_inference_steps} must be between 1 and the scheduler's "
                    f"num_train_timesteps ({num_train_timesteps})"
                )
        else:
            _check_timesteps(self.scheduler, timesteps)
        if not 0.0 <= guidance_rescale <= 1.0:
            raise ValueError(f"guidance_rescale={guidance_rescale!r} must be between 0 and 1")
        if num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt={num_images_per_prompt} must be at least 1")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type={output_type!r} is not one of {', '.join(map(repr, OUTPUT_TYPES))}")

    @staticmethod
    def _check_generator(generator, batch_size: int) -> None:
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"got {len(generator)} generators for {batch_size} images; pass one per image")


@dataclass
class TextInputs:
    """A call's text, checked: prompts or their embeddings, and the negatives (None where given as embeddings)."""

    prompts: list[str] | None
    negative_prompts: list[str] | None
    prompt_embeds: torch.Tensor | None
    negative_prompt_embeds: torch.Tensor | None

    @property
    def batch_size(self) -> int:
        return len(self.prompts) if self.prompts is not None else self.prompt_embeds.shape[0]


def rescale_guidance(noise_cfg: torch.Tensor, noise_pred_text: torch.Tensor, guidance_rescale: float) -> torch.Tensor:
    """Lin et al. 2024 sec. 3.4 (Algorithm 2): rescale the guided prediction to the conditional one's standard
    deviation per sample, x_rescaled = x_cfg std(x_pos) / std(x_cfg), then mix
    x_final = phi x_rescaled + (1 - phi) x_cfg, which keeps guided images from over-exposure."""
    dims = list(range(1, noise_cfg.ndim))
    std_text = noise_pred_text.std(dim=dims, keepdim=True)  # (B, 1, 1, 1)
    std_cfg = noise_cfg.std(dim=dims, keepdim=True)  # (B, 1, 1, 1)
    noise_rescaled = noise_cfg * (std_text / std_cfg)
    return guidance_rescale * noise_rescaled + (1 - guidance_rescale) * noise_cfg


def _check_timesteps(scheduler, timesteps) -> None:
    if "timesteps" not in inspect.signature(scheduler.set_timesteps).parameters:
        raise ValueError(
            f"timesteps: {type(scheduler).__name__}.set_timesteps takes no custom timesteps; use a scheduler "
            "whose set_timesteps does (e.g. diffusers' DDPMScheduler, EulerDiscreteScheduler, "
            "DPMSolverMultistepScheduler) or pass num_inference_steps"
        )
    num_train_timesteps = scheduler.config.num_train_timesteps
    values = [int(t) for t in timesteps]
    if not values or any(t < 0 or t >= num_train_timesteps for t in values):
        raise ValueError(
            f"timesteps={values!r} must be a non-empty list of timesteps from 0 to num_train_timesteps - 1 "
            f"({num_train_timesteps - 1})"
        )
    if any(a <= b for a, b in zip(values, values[1:], strict=False)):
        raise ValueError(f"timesteps={values!r} must be strictly descending (the sampler runs from noise to data)")


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
