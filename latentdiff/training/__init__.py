"""What every script in training/ shares, written once and tested here.

- ``args``: the common flags (diffusers' names) and ``check_common_args``, which fails before any
  work with a message naming the flag, the value and what is allowed.
- ``run``: ``make_accelerator`` (mixed precision, accumulation, TensorBoard, seeding, a seedable
  sampler, and a run-kind marker so an output dir of another kind of run is refused),
  ``make_optimizer`` (fused AdamW), ``make_lr_scheduler`` (warmup and length in optimizer steps x
  processes, as accelerate steps a prepared scheduler), ``resolve_train_steps``,
  ``step_generator`` (the randomness of one step, a function of (seed, step, process)).
- ``checkpointing``: atomic ``save_checkpoint`` (tmp + rename, pruning never deletes the newest),
  ``resolve_resume`` / ``load_checkpoint``, and ``resumed_batches``, the epoch loop that seeds each
  epoch and skips what a checkpoint had used, so a resumed run sees what an unbroken one would.
- ``ema``, ``progress`` (tqdm with loss, lr and images/s; ``check_finite`` stops or skips a NaN
  step before it reaches the weights; validation grids), ``metrics`` (PSNR, SSIM).
- Objectives: ``vae_loss`` and ``perceptual`` (the SD autoencoder's), ``diffusion_loss`` (DDPM
  training for every prediction type, min-SNR), ``dreambooth`` (prior preservation), ``lora``.
- ``finetune`` and ``validation``: model checks, latent/text inputs of a step, the optimizer step,
  validation grids and pipeline export shared by the text-to-image scripts.

A script's loop, with exact resume (N steps, a kill, a resume to 2N give the weights of 2N in one go)::

    global_step = load_checkpoint(accelerator, path) if (path := resolve_resume(args)) else 0
    for batch in resumed_batches(accelerator, train_dataloader, args, global_step):
        generator = step_generator(args.seed, batch_index, accelerator)  # noise, timesteps, dropout
        with accelerator.accumulate(model):
            loss = ...
            optimizer_step(...)  # check_finite, backward, clip, step
        if accelerator.sync_gradients:
            global_step += 1  # EMA, log, checkpoint, validate
        if global_step >= args.max_train_steps:
            break
"""
