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

A text-to-image script's loop (``loop.TrainingLoop``), with exact resume (N steps, a kill, a resume
to 2N give the weights of 2N in one go)::

    loop = TrainingLoop(accelerator, args, resume_step(accelerator, args), optimizer, lr_scheduler,
                        trained, emas, ema_targets, validate)
    for batch, generator in loop.batches(train_dataloader):  # generator: noise, timesteps, dropout
        with accelerator.accumulate(*trained):
            loss = ...
            loop.step(loss)  # check finite, backward, clip, step; then EMA, log, checkpoint, validate

train_vae.py writes the same steps out, with its discriminator's second optimizer.
"""
