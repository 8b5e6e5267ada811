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
    load_checkpoint,
    resolve_resume,
    resumed_batches,
    save_checkpoint,
)
from latentdiff.training.diffusion_loss import diffusion_loss
from latentdiff.training.ema import make_ema
from latentdiff.training.finetune import (
    add_finetune_args,
    averaged_weights,
    check_finetune_args,
    check_models,
    latents_from_batch,
    log_replica_checksum,
    maybe_cache,
    native_resolution,
    optimizer_step,
    text_states_from_batch,
    training_scheduler,
    validate,
    weight_dtype,
)
from latentdiff.training.lora import (
    LORA_DIR,
    add_lora_adapters,
    add_lora_args,
    check_lora_args,
    register_lora_checkpointing,
    save_lora,
)
from latentdiff.training.progress import progress_bar
from latentdiff.training.run import (
    count_parameters,
    log_run_start,
    make_accelerator,
    make_lr_scheduler,
    make_optimizer,
    resolve_train_steps,
    step_generator,
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

    global_step = 0
    resume = resolve_resume(args)
    if resume is not None:
        global_step = load_checkpoint(accelerator, resume)

    def denoise(x_t, t, encoder_hidden_states):
        return unet(x_t, t, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]

    components = dict(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, noise_scheduler=noise_scheduler
    )
    bar = progress_bar(accelerator, args.max_train_steps, global_step)
    images_per_step = args.train_batch_size * args.gradient_accumulation_steps * accelerator.num_processes
    micro_step, window_losses, skipped = 0, [], 0
    for batch in resumed_batches(accelerator, train_dataloader, args, global_step):
        # noise, timesteps, latents and dropped captions from (seed, step, micro-batch, process): exact resume
        batch_index = global_step * args.gradient_accumulation_steps + micro_step
        generator = step_generator(args.seed, batch_index, accelerator)
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
            if optimizer_step(accelerator, loss, optimizer, lr_scheduler, args, global_step + 1):
                window_losses.append(loss.item())
            else:
                skipped += 1
                logger.warning(
                    f"step {global_step + 1}: non-finite loss, batch skipped ({skipped} so far)"
                )
        if not accelerator.sync_gradients:
            micro_step += 1
            continue

        global_step, micro_step = global_step + 1, 0
        for ema, params in zip(emas, adapters, strict=False):
            ema.step(params.parameters())
        window_loss = sum(window_losses) / max(len(window_losses), 1)
        loss_value = accelerator.reduce(torch.tensor(window_loss, device=accelerator.device), "mean")
        loss_value = loss_value.item()
        window_losses = []
        lr = lr_scheduler.get_last_lr()[0]
        bar.step(loss_value, lr, images_per_step)
        logs = {"train/loss": loss_value, "train/lr": lr, "train/skipped": skipped}
        accelerator.log(logs, step=global_step)
        if global_step % args.checkpointing_steps == 0:
            save_checkpoint(accelerator, args.output_dir, global_step)
        if args.validation_prompts and global_step % args.validation_steps == 0:
            validate(accelerator, args, global_step, components, args.resolution, emas, adapters)
        if global_step >= args.max_train_steps:
            break
    bar.close()

    log_replica_checksum(accelerator, trained, global_step, skipped)
    if args.validation_prompts and global_step % args.validation_steps:
        validate(accelerator, args, global_step, components, args.resolution, emas, adapters)
    lora_dir = Path(args.output_dir) / LORA_DIR
    if accelerator.is_main_process:
        with averaged_weights(emas, adapters):
            save_lora(lora_dir, *[accelerator.unwrap_model(model) for model in trained])
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return lora_dir


if __name__ == "__main__":
    main()
