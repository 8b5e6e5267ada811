"""Fine-tune a text-to-image pipeline with LoRA (Hu et al. 2022): small trainable low-rank adapters on the UNet's
attention projections (and, with --train_text_encoder, the text encoder's), the pretrained weights frozen.

    accelerate launch training/finetune_lora.py --pretrained_model_name_or_path out/ldm/pipeline \\
        --train_data_dir my_style --rank 8 --learning_rate 1e-4 --max_train_steps 2000 \\
        --validation_prompts "a small red circle in the top left" --output_dir out/lora

Takes the data flags of train_ldm.py (images + captions; --resolution defaults to the pipeline's own size).
Writes checkpoints (adapters and optimizer state only) to output_dir/checkpoints, validation grids to
output_dir/validation and, at the end, output_dir/lora/pytorch_lora_weights.safetensors in diffusers' format:

    pipe = LatentDiffPipeline.from_pretrained("out/ldm/pipeline")   # or diffusers' StableDiffusionPipeline
    pipe.load_lora_weights("out/lora/lora")
    image = pipe("...", cross_attention_kwargs={"scale": 0.8}).images[0]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from accelerate.logging import get_logger
from latentdiff.pipelines import LatentDiffPipeline

from latentdiff.data import add_data_args, build_dataloader, build_dataset
from latentdiff.training.args import add_common_args, check_common_args
from latentdiff.training.checkpointing import (
    resume_step,
)
from latentdiff.training.diffusion_loss import diffusion_loss
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

logger = get_logger(__name__, log_level="INFO")
RUN_KIND = "lora"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_args(parser)
    add_data_args(parser)
    add_finetune_args(parser)
    add_lora_args(parser)
    parser.add_argument(
        "--proportion_empty_prompts",
        type=float,
        default=0.0,
        help="Captions replaced by '' so the adapters learn the unconditional model of guidance too.",
    )
    args = parser.parse_args(argv)
    check_common_args(args)
    check_finetune_args(args)
    check_lora_args(args)
    if not 0.0 <= args.proportion_empty_prompts <= 1.0:
        raise ValueError(
            f"--proportion_empty_prompts must lie in [0, 1], got {args.proportion_empty_prompts}"
        )
    return args


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    accelerator = make_accelerator(args, RUN_KIND)
    pipe = LatentDiffPipeline.from_pretrained(args.pretrained_model_name_or_path)
    vae, text_encoder, tokenizer, unet = pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.unet
    noise_scheduler = training_scheduler(pipe.scheduler.config)
    args.resolution = args.resolution or native_resolution(vae, unet)
    check_models(vae, text_encoder, unet, args.resolution)

    vae.requires_grad_(False).eval().to(accelerator.device)
    text_encoder.requires_grad_(False)  # frozen, but for its adapters with --train_text_encoder
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

    dataset = build_dataset(args, split="train")
    dataset, empty_states = maybe_cache(
        args, dataset, accelerator, vae, text_encoder, tokenizer, cache_text=not args.train_text_encoder
    )
    train_dataloader = build_dataloader(
        dataset, args.train_batch_size, seed=args.seed, num_workers=args.dataloader_num_workers
    )

    trained = [unet, text_encoder] if args.train_text_encoder else [unet]
    register_lora_checkpointing(accelerator, *trained)
    # the adapters only: the optimizer and the EMA never hold the frozen weights
    adapters = [torch.nn.ParameterList(p for p in model.parameters() if p.requires_grad) for model in trained]
    optimizer = make_optimizer(args, [p for params in adapters for p in params])
    emas = [make_ema(args, params) for params in adapters] if args.use_ema else []
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
        unet=count_parameters(unet),
        text_encoder=count_parameters(text_encoder),
        lora=f"rank {args.rank}, alpha {args.lora_alpha or args.rank}, dropout {args.lora_dropout}",
        prediction_type=noise_scheduler.config.prediction_type,
        resolution=args.resolution,
        cached=args.cache_latents,
    )

    global_step = resume_step(accelerator, args)

    def denoise(x_t, t, encoder_hidden_states):
        return unet(x_t, t, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]

    components = dict(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, noise_scheduler=noise_scheduler
    )
    loop = TrainingLoop(
        accelerator, args, global_step, optimizer, lr_scheduler, trained, emas, adapters,
        validate=lambda step: validate(accelerator, args, step, components, args.resolution, emas, adapters),
    )  # fmt: skip
    for batch, generator in loop.batches(train_dataloader):
        with accelerator.accumulate(*trained):
            latents = latents_from_batch(batch, vae, generator)  # (B, C, h, w)
            with accelerator.autocast():
                states = text_states_from_batch(
                    batch, tokenizer, text_encoder, empty_states, args.proportion_empty_prompts, generator,
                    args.train_text_encoder,
                )  # fmt: skip
            loss = diffusion_loss(
                denoise, latents, states, noise_scheduler,
                snr_gamma=args.snr_gamma, noise_offset=args.noise_offset, generator=generator,
            )  # fmt: skip
            loop.step(loss)

    lora_dir = Path(args.output_dir) / LORA_DIR
    if accelerator.is_main_process:
        with averaged_weights(emas, adapters):
            save_lora(lora_dir, *[accelerator.unwrap_model(model) for model in trained])
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return lora_dir


if __name__ == "__main__":
    main()
