"""DreamBooth (Ruiz et al. 2023): teach a text-to-image pipeline one subject from a few images, bound to a prompt
with a rare token, optionally with the prior-preservation loss on class images the base model generates.

    accelerate launch training/train_dreambooth.py --pretrained_model_name_or_path out/ldm/pipeline \\
        --instance_data_dir my_dog --instance_prompt "a photo of sks dog" \\
        --with_prior_preservation --class_prompt "a photo of dog" --class_data_dir class_dog \\
        --num_class_images 100 --prior_loss_weight 1.0 --max_train_steps 400 --output_dir out/dreambooth

Trains every UNet weight (learning rate 5e-6 by default), or LoRA adapters with --use_lora (1e-4), for 400 steps
unless --max_train_steps/--num_train_epochs say otherwise. Class images are sampled from the base pipeline into
--class_data_dir, only as many as it lacks. Writes checkpoints to output_dir/checkpoints, validation grids to
output_dir/validation and, at the end, a pipeline folder output_dir/pipeline or, with --use_lora,
output_dir/lora/pytorch_lora_weights.safetensors.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from accelerate.logging import get_logger
from latentdiff.pipelines import LatentDiffPipeline

from latentdiff.data import build_dataloader
from latentdiff.training.args import add_common_args, check_common_args
from latentdiff.training.checkpointing import (
    resume_step,
)
from latentdiff.training.diffusion_loss import diffusion_loss
from latentdiff.training.dreambooth import (
    PriorPreservationDataset,
    generate_class_images,
    join_prior_batch,
    prior_preservation_loss,
    prompt_dataset,
)
from latentdiff.training.ema import make_ema
from latentdiff.training.finetune import (
    add_finetune_args,
    averaged_weights,
    check_finetune_args,
    check_models,
    latents_from_batch,
    maybe_cache,
    native_resolution,
    text_states_from_batch,
    training_scheduler,
    validate,
    weight_dtype,
)
from latentdiff.training.loop import TrainingLoop
from latentdiff.training.lora import (
    LORA_DIR,
    add_lora_adapters,
    add_lora_args,
    check_lora_args,
    register_lora_checkpointing,
    save_lora,
)
from latentdiff.training.run import (
    count_parameters,
    log_run_start,
    make_accelerator,
    make_lr_scheduler,
    make_optimizer,
    resolve_train_steps,
)
from latentdiff.training.validation import PIPELINE_DIR, build_pipeline, export_pipeline

logger = get_logger(__name__, log_level="INFO")
RUN_KIND = "dreambooth"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_args(parser)
    add_finetune_args(parser)
    d = parser.add_argument_group("DreamBooth")
    d.add_argument("--instance_data_dir", required=True, help="A folder of images of the subject.")
    d.add_argument(
        "--instance_prompt", required=True, help='The prompt of every instance image: "a photo of sks dog".'
    )
    d.add_argument(
        "--with_prior_preservation",
        action="store_true",
        help="Add the prior-preservation loss on class images (Ruiz et al. 2023 eq. 2).",
    )
    d.add_argument("--class_prompt", help='The class the subject belongs to: "a photo of dog".')
    d.add_argument(
        "--class_data_dir", help="Class images; the base pipeline fills it up to --num_class_images."
    )
    d.add_argument("--num_class_images", type=int, default=100)
    d.add_argument(
        "--prior_loss_weight", type=float, default=1.0, help="lambda, the weight of the prior loss."
    )
    d.add_argument(
        "--sample_batch_size", type=int, default=4, help="Images per batch when generating class images."
    )
    d.add_argument("--class_inference_steps", type=int, default=50, help="Sampling steps of a class image.")
    d.add_argument(
        "--resolution", type=int, help="Side of the square training images. Default: the pipeline's."
    )
    crop = d.add_mutually_exclusive_group()
    crop.add_argument("--center_crop", action="store_true", help="Crop the center square (the default).")
    crop.add_argument("--random_crop", action="store_true", help="Crop a square at a random place.")
    d.add_argument("--random_flip", action="store_true", help="Mirror half the images at random.")
    d.add_argument(
        "--data_cache_dir", help="Where --cache_latents keeps its cache (default: ~/.cache/latentdiff)."
    )
    d.add_argument("--dataloader_num_workers", type=int, default=0)
    parser.add_argument(
        "--use_lora", action="store_true", help="Train LoRA adapters instead of every weight."
    )
    add_lora_args(parser)
    parser.set_defaults(train_batch_size=1, learning_rate=None)
    args = parser.parse_args(argv)
    if args.learning_rate is None:  # diffusers' DreamBooth rates: small for every weight, larger for adapters
        args.learning_rate = 1e-4 if args.use_lora else 5e-6
    if args.max_train_steps is None and args.num_train_epochs is None:
        args.max_train_steps = 400
    check_common_args(args)
    check_finetune_args(args)
    check_lora_args(args)
    check_dreambooth_args(args)
    return args


def check_dreambooth_args(args: argparse.Namespace) -> None:
    """Raise for flags that would fail later, naming the flag, the value and what is allowed."""
    prompt_dataset(args.instance_data_dir, args.instance_prompt, resolution=1)  # raises without usable images
    if args.with_prior_preservation:
        for flag in ("class_prompt", "class_data_dir"):
            if not getattr(args, flag):
                raise ValueError(f"--with_prior_preservation needs --{flag}")
        if args.num_class_images < 1:
            raise ValueError(f"--num_class_images must be a positive integer, got {args.num_class_images}")
        if args.prior_loss_weight < 0:
            raise ValueError(f"--prior_loss_weight must be >= 0, got {args.prior_loss_weight}")
    else:
        given = [f"--{f}" for f in ("class_prompt", "class_data_dir") if getattr(args, f)]
        if given:
            raise ValueError(
                f"{' and '.join(given)} given without --with_prior_preservation: add it or leave them out"
            )
    for flag in ("sample_batch_size", "class_inference_steps"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag} must be a positive integer, got {getattr(args, flag)}")
    if args.resolution is not None and args.resolution < 1:
        raise ValueError(f"--resolution must be positive, got {args.resolution}")


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    accelerator = make_accelerator(args, RUN_KIND)
    pipe = LatentDiffPipeline.from_pretrained(args.pretrained_model_name_or_path)
    vae, text_encoder, tokenizer, unet = pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.unet
    noise_scheduler = training_scheduler(pipe.scheduler.config)
    resolution = args.resolution or native_resolution(vae, unet)
    check_models(vae, text_encoder, unet, resolution)

    if args.with_prior_preservation:  # sampled from the base model, before training changes it
        pipe.to(accelerator.device).set_progress_bar_config(disable=True)
        generate_class_images(
            pipe, args.class_prompt, args.class_data_dir, args.num_class_images, resolution=resolution,
            batch_size=args.sample_batch_size, num_inference_steps=args.class_inference_steps, seed=args.seed,
            accelerator=accelerator,
        )  # fmt: skip

    vae.requires_grad_(False).eval().to(accelerator.device)
    text_encoder.requires_grad_(args.train_text_encoder)  # with --use_lora: adapters only (add_lora)
    if args.use_lora:
        add_lora_adapters(
            args, unet, text_encoder if args.train_text_encoder else None, weight_dtype(accelerator)
        )
    text_encoder.train(args.train_text_encoder).to(accelerator.device)
    unet.train().to(accelerator.device)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if args.train_text_encoder:
            text_encoder.gradient_checkpointing_enable()
    if args.enable_xformers_memory_efficient_attention:
        unet.enable_xformers_memory_efficient_attention()

    crop = dict(random_crop=args.random_crop, random_flip=args.random_flip)
    text = dict(text_encoder=text_encoder, tokenizer=tokenizer, cache_text=not args.train_text_encoder)
    dataset = prompt_dataset(args.instance_data_dir, args.instance_prompt, resolution, **crop)
    dataset, empty_states = maybe_cache(args, dataset, accelerator, vae, **text)
    num_instance_images = len(dataset)
    if args.with_prior_preservation:
        class_images = prompt_dataset(
            args.class_data_dir, args.class_prompt, resolution, flag="--class_data_dir", **crop
        )
        dataset = PriorPreservationDataset(
            dataset, maybe_cache(args, class_images, accelerator, vae, **text)[0]
        )
    train_dataloader = build_dataloader(
        dataset, args.train_batch_size, seed=args.seed, num_workers=args.dataloader_num_workers
    )

    trained = [unet, text_encoder] if args.train_text_encoder else [unet]
    if args.use_lora:
        register_lora_checkpointing(accelerator, *trained)
    # what trains: every weight, or the adapters only (the optimizer and the EMA never hold frozen weights)
    params = [torch.nn.ParameterList(p for p in model.parameters() if p.requires_grad) for model in trained]
    optimizer = make_optimizer(args, [p for group in params for p in group])
    emas = [make_ema(args, group) for group in params] if args.use_ema else []
    for ema in emas:
        accelerator.register_for_checkpointing(ema)
    *trained, optimizer, train_dataloader = accelerator.prepare(*trained, optimizer, train_dataloader)
    unet = trained[0]
    if args.train_text_encoder:
        text_encoder = trained[1]
    resolve_train_steps(args, len(train_dataloader))
    lr_scheduler = accelerator.prepare(make_lr_scheduler(args, optimizer, accelerator))

    log_run_start(
        accelerator,
        args,
        len(dataset),
        instance_images=num_instance_images,
        class_images=len(dataset.class_) if args.with_prior_preservation else "none (no prior preservation)",
        unet=count_parameters(unet),
        text_encoder=count_parameters(text_encoder),
        lora=f"rank {args.rank}, alpha {args.lora_alpha or args.rank}" if args.use_lora else "no (full)",
        resolution=resolution,
    )

    global_step = resume_step(accelerator, args)

    def denoise(x_t, t, encoder_hidden_states):
        return unet(x_t, t, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]

    components = dict(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, noise_scheduler=noise_scheduler
    )
    pairs = 2 if args.with_prior_preservation else 1  # an instance and a class image per item
    loop = TrainingLoop(
        accelerator, args, global_step, optimizer, lr_scheduler, trained, emas, params,
        validate=lambda step: validate(accelerator, args, step, components, resolution, emas, params),
        images_per_batch=pairs * args.train_batch_size,
    )  # fmt: skip
    for batch, generator in loop.batches(train_dataloader):
        with accelerator.accumulate(*trained):
            if args.with_prior_preservation:
                batch = join_prior_batch(batch)  # instance half, class half
            latents = latents_from_batch(batch, vae, generator)  # (B, C, h, w)
            with accelerator.autocast():
                states = text_states_from_batch(
                    batch, tokenizer, text_encoder, empty_states, 0.0, generator, args.train_text_encoder
                )
            loss_kwargs = dict(snr_gamma=args.snr_gamma, noise_offset=args.noise_offset, generator=generator)
            if args.with_prior_preservation:
                loss = prior_preservation_loss(
                    denoise, latents, states, noise_scheduler, args.prior_loss_weight, **loss_kwargs
                )
            else:
                loss = diffusion_loss(denoise, latents, states, noise_scheduler, **loss_kwargs)
            loop.step(loss)

    output = Path(args.output_dir) / (LORA_DIR if args.use_lora else PIPELINE_DIR)
    if accelerator.is_main_process:
        with averaged_weights(emas, params):
            if args.use_lora:
                save_lora(output, *[accelerator.unwrap_model(model) for model in trained])
            else:
                export_pipeline(build_pipeline(accelerator, **components), output)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return output


if __name__ == "__main__":
    main()
