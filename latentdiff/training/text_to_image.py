"""One text-to-image training path: from scratch, full fine-tune, LoRA and DreamBooth differ only in what
trains and which loss term is added.

    task = TextToImage(accelerator, args, load_models(args), train_text_encoder=..., lora=...)
    task.prepare(task.cached(build_dataset(args)))   # data loader, optimizer, EMA, LR schedule, accelerate
    train(accelerator, args, task)                   # latentdiff.training.loop
    task.export(path)                                # a pipeline folder, or the LoRA file

A batch becomes a loss in ``loss``: latents z ~ q(z|x) (or from the latent cache), the text encoder's
states with some captions dropped for classifier-free guidance, then ``diffusion_loss`` per sample,
plus the prior-preservation term for DreamBooth (pairs of instance and class images).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from diffusers import AutoencoderKL
from torch.utils.data import Dataset

from latentdiff.data import build_dataloader, cache_latents, sample_latent
from latentdiff.data.buckets import global_batch
from latentdiff.data.transforms import latent_mask
from latentdiff.pipelines import LatentDiffInpaintPipeline, LatentDiffPipeline
from latentdiff.text import encode_prompts
from latentdiff.training.diffusion_loss import diffusion_loss, drop_captions, drop_text_states
from latentdiff.training.dreambooth import join_prior_batch, prior_preservation_loss
from latentdiff.training.ema import make_ema
from latentdiff.training.inpainting import inpainting_example, inpainting_unet, masked_image_conditioning
from latentdiff.training.lora import (
    add_lora_adapters,
    register_lora_checkpointing,
    save_lora,
    save_lora_kohya,
)
from latentdiff.training.models import Models, check_sizes, weight_dtype
from latentdiff.training.run import make_lr_scheduler, make_optimizer, resolve_train_steps, writes_output
from latentdiff.training.validation import (
    PIPELINE_DIR,
    VALIDATION_DIR,
    averaged_weights,
    build_pipeline,
    export_pipeline,
    log_validation,
)


class TextToImage:
    """The models of a text-to-image run, what of them trains, and how a batch becomes its loss."""

    def __init__(
        self, accelerator: Accelerator, args, models: Models, *, train_text_encoder: bool, lora: bool = False,
        prior_loss_weight: float | None = None, train_unet: bool = True, inpainting: bool = False,
    ):  # fmt: skip
        self.accelerator, self.args, self.lora, self.train_unet = accelerator, args, lora, train_unet
        self.vae, self.text_encoder, self.tokenizer = models.vae, models.text_encoder, models.tokenizer
        self.unet, self.noise_scheduler, self.resolution = models.unet, models.noise_scheduler, models.resolution
        self.inpainting = inpainting
        if inpainting:  # the UNet also sees the mask and the masked image's latents (9 input channels)
            self.unet = inpainting_unet(self.unet)
        self.train_text_encoder, self.prior_loss_weight = train_text_encoder, prior_loss_weight
        # from_pretrained and the presets give fp32 weights; the VAE stays so (SD's VAE overflows in fp16), and
        # trained weights stay fp32 master weights under accelerate's autocast
        self.vae.requires_grad_(False).eval().to(accelerator.device)
        self.unet.requires_grad_(train_unet)
        self.text_encoder.requires_grad_(train_text_encoder and not lora)
        if lora:  # adapters on the frozen weights; the frozen UNet in the half dtype under mixed precision
            add_lora_adapters(args, self.unet, self.text_encoder if train_text_encoder else None, weight_dtype(accelerator))
        self.text_encoder.train(train_text_encoder).to(accelerator.device)
        self.unet.train().to(accelerator.device)  # before the EMA copies its weights
        if args.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
            if train_text_encoder:
                self.text_encoder.gradient_checkpointing_enable()
        if args.enable_xformers_memory_efficient_attention:
            self.unet.enable_xformers_memory_efficient_attention()
        self.trained = [m for m, trains in ((self.unet, train_unet), (self.text_encoder, train_text_encoder)) if trains]
        self.empty_states, self.heldout = None, None
        self.images_per_batch = args.train_batch_size * (2 if prior_loss_weight is not None else 1)
        self.checkpoint_extra = self.export_pipeline_into if args.save_pipeline_at_checkpoints else None
        check_sizes(args, self.vae, self.unet, self.resolution)

    def cached(self, dataset: Dataset) -> Dataset:
        """With --cache_latents, ``dataset`` encoded once by the frozen VAE (and by the text encoder when it is
        frozen): each epoch then samples z ~ q(z|x) from the cached mean and std. Else ``dataset``."""
        if not self.args.cache_latents:
            return dataset
        text = {} if self.train_text_encoder else {"text_encoder": self.text_encoder, "tokenizer": self.tokenizer}
        dataset = cache_latents(dataset, self.vae, cache_dir=self.args.data_cache_dir, accelerator=self.accelerator, **text)
        if dataset.null_encoder_hidden_states is not None:  # the states of "", for captions dropped from cached text
            self.empty_states = dataset.null_encoder_hidden_states[None].to(self.accelerator.device)  # (1, L, D)
        return dataset

    def prepare(self, dataset: Dataset) -> None:
        """The data loader, optimizer, EMA and LR schedule, through accelerate (in that order, for exact resume)."""
        accelerator, args = self.accelerator, self.args
        self.dataset_size = len(dataset)
        # an inpainting model is shown the first training image with its center square to fill in
        self.validation_inputs = inpainting_example(dataset[0]["pixel_values"]) if self.inpainting else {}
        # what the optimizer and the EMA hold: every weight, or the adapters only (never a frozen weight); read
        # here, so that a subclass can freeze more after __init__ (textual inversion: new embedding rows only)
        self.params = [torch.nn.ParameterList(p for p in m.parameters() if p.requires_grad) for m in self.trained]
        dataloader = build_dataloader(dataset, args.train_batch_size, seed=args.seed, num_workers=args.dataloader_num_workers,
                                      group=global_batch(args)[0])
        if self.lora:
            register_lora_checkpointing(accelerator, *self.trained)
        optimizer = make_optimizer(args, [p for params in self.params for p in params])
        self.emas = [make_ema(args, params) for params in self.params] if args.use_ema else []
        for ema in self.emas:
            accelerator.register_for_checkpointing(ema)
        *self.trained, self.optimizer, self.dataloader = accelerator.prepare(*self.trained, optimizer, dataloader)
        prepared = iter(self.trained)
        if self.train_unet:
            self.unet = next(prepared)
        if self.train_text_encoder:
            self.text_encoder = next(prepared)
        resolve_train_steps(args, len(self.dataloader))
        self.lr_scheduler = accelerator.prepare(make_lr_scheduler(args, self.optimizer, accelerator))

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        return self.unet(x_t, t, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]

    def loss(self, batch: dict, generator: torch.Generator, step: int) -> tuple[torch.Tensor, dict]:
        """The denoising loss of a batch (Ho et al. 2020 eq. 14 in the schedule's prediction type), with noise,
        timesteps and caption dropout drawn from ``generator``; with DreamBooth, plus the weighted prior term."""
        if self.prior_loss_weight is not None:
            batch = join_prior_batch(batch)  # (2B, ...): the instance half, then the class half
        latents = latents_from_batch(batch, self.vae, generator)  # (B, C, h, w)
        with self.accelerator.autocast():
            states = text_states_from_batch(
                batch, self.tokenizer, self.text_encoder, self.empty_states, self.args.proportion_empty_prompts,
                generator, self.train_text_encoder,
            )  # fmt: skip
        terms = dict(snr_gamma=self.args.snr_gamma, noise_offset=self.args.noise_offset,
                     immiscible=self.args.immiscible_noise, loss_weighting=self.args.loss_weighting, generator=generator)
        if "mask" in batch:  # --masked_loss: the mask on the latent grid weights the loss
            terms["loss_mask"] = latent_mask(batch["mask"], latents.shape[-2:])  # (B, 1, h, w)
        denoise = self.denoise
        if self.inpainting:  # a random mask per image; the UNet's input is [x_t; mask; masked image latents]
            extra = masked_image_conditioning(batch["pixel_values"], self.vae, generator, latents.shape[-2:])  # (B, 5, h, w)

            def denoise(x_t, t, states):
                return self.denoise(torch.cat([x_t, extra], dim=1), t, states)  # (B, 9, h, w) in

        if self.prior_loss_weight is not None:
            return prior_preservation_loss(denoise, latents, states, self.noise_scheduler, self.prior_loss_weight, **terms), {}
        return diffusion_loss(denoise, latents, states, self.noise_scheduler, **terms), {}

    def update_ema(self) -> None:
        for ema, params in zip(self.emas, self.params, strict=False):
            ema.step(params.parameters())

    def averaged(self):
        """A block inside which the trained weights are their EMA (nothing changes without --use_ema)."""
        return averaged_weights(self.emas, self.params)

    def pipeline(self):
        """A pipeline over the training components themselves (no copy) and a DDIM sampler of the training schedule:
        text-to-image, or inpainting for an inpainting model."""
        pipeline_class = LatentDiffInpaintPipeline if self.inpainting else LatentDiffPipeline
        return build_pipeline(
            self.accelerator, self.vae, self.text_encoder, self.tokenizer, self.unet, self.noise_scheduler, pipeline_class
        )  # fmt: skip

    def hold_out(self, dataset: Dataset) -> None:
        """Held-out items for the validation loss (--validation_loss_images of them; their latents cached like
        the training set's with --cache_latents)."""
        count = min(self.args.validation_loss_images, len(dataset))
        self.heldout = build_dataloader(self.cached(dataset.subset(np.arange(count))), self.args.train_batch_size, shuffle=False)

    @torch.no_grad()
    def heldout_loss(self, step: int) -> float:
        """The training objective on the held-out items with the randomness of each batch fixed once (its own
        generator, seeded by --seed and the batch's index): the same latents, timesteps, noise and dropped
        captions at every validation, so the curve moves only with the weights."""
        losses, device = [], self.accelerator.device
        for index, batch in enumerate(self.heldout):
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            generator = torch.Generator(device=device).manual_seed(self.args.seed * 1_000_003 + index)
            loss, _ = self.loss(batch, generator, step)
            losses.append(loss.item() * len(batch["text"]))  # the batch's mean, weighted by its size
        return sum(losses) / len(self.heldout.dataset)

    def validate(self, step: int) -> None:
        """With the EMA weights: the held-out loss (--validation_loss_images) and the --validation_prompts grid
        at ``step``; every process calls it, the main one samples and writes."""
        args = self.args
        if self.heldout is None and not args.validation_prompts:
            return  # nothing to validate: no EMA swap (two copies of the trained weights) for nothing
        with self.averaged():
            if self.heldout is not None:
                loss = self.heldout_loss(step)
                self.accelerator.log({"val/loss": loss}, step=step)
                if self.accelerator.is_main_process:
                    (Path(args.output_dir) / VALIDATION_DIR).mkdir(parents=True, exist_ok=True)
                    with (Path(args.output_dir) / VALIDATION_DIR / "loss.jsonl").open("a") as log:
                        log.write(json.dumps({"step": step, "loss": loss}) + "\n")
            if args.validation_prompts and self.accelerator.is_main_process:
                log_validation(
                    self.accelerator, self.pipeline(), args.validation_prompts, step, args.output_dir,
                    num_images=args.num_validation_images, seed=args.seed, **self.validation_size(),
                    num_inference_steps=args.validation_inference_steps, guidance_scale=args.validation_guidance_scale,
                    **self.validation_inputs,
                )  # fmt: skip
        self.accelerator.wait_for_everyone()

    def validation_size(self) -> dict[str, int]:
        """--validation_height/--validation_width, else an inpainting example's own size (its bucket's, with
        --enable_bucket), else the resolution's square."""
        width, height = self.validation_inputs["image"].size if self.validation_inputs else (self.resolution,) * 2
        return {"height": self.args.validation_height or height, "width": self.args.validation_width or width}

    def export(self, path: Path) -> Path:
        """Write what was trained (EMA weights with --use_ema) to ``path``: the LoRA file of the adapters
        (--save_format: diffusers' or kohya's), or a pipeline folder. Every process calls it; the main process
        writes (each machine's first, when the machines do not share the output dir)."""
        if writes_output(self.accelerator):
            with self.averaged():
                if self.lora:
                    save = save_lora_kohya if self.args.save_format == "kohya" else save_lora
                    save(path, *[self.accelerator.unwrap_model(m) for m in self.trained])
                else:
                    export_pipeline(self.pipeline(), path)
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()
        return path

    def export_pipeline_into(self, checkpoint: Path) -> Path:
        """--save_pipeline_at_checkpoints: a pipeline folder inside a checkpoint (on the main process)."""
        with self.averaged():
            return export_pipeline(self.pipeline(), checkpoint / PIPELINE_DIR)


def latents_from_batch(batch: dict, vae: AutoencoderKL, generator: torch.Generator) -> torch.Tensor:
    """z ~ q(z | x) scaled to unit variance (LDM §4.3.2), from pixels or from a cached mean and std, (B, C, h, w)."""
    if "latent_mean" in batch:
        latents = sample_latent(batch["latent_mean"].float(), batch["latent_std"].float(), generator)
    else:
        with torch.no_grad():
            latents = vae.encode(batch["pixel_values"].float()).latent_dist.sample(generator)
    return latents * vae.config.scaling_factor


def text_states_from_batch(
    batch: dict, tokenizer, text_encoder, empty_states: torch.Tensor | None, proportion_empty: float,
    generator: torch.Generator, train_text_encoder: bool,
) -> torch.Tensor:  # fmt: skip
    """The UNet's cross-attention context (B, L, D), some captions dropped to "" for classifier-free guidance."""
    if "encoder_hidden_states" in batch:  # cached by the frozen text encoder
        return drop_text_states(batch["encoder_hidden_states"].float(), empty_states, proportion_empty, generator)
    captions = drop_captions(list(batch["text"]), proportion_empty, generator)
    with torch.set_grad_enabled(train_text_encoder):
        return encode_prompts(tokenizer, text_encoder, captions, device=generator.device)  # (B, L, D)
