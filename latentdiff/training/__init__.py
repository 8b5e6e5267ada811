"""Shared training machinery used by every script in training/.

API (fixed by the lead engineer; the scripts train_vae.py and train_ldm.py are written against it concurrently):

## Shared training machinery: `latentdiff/training/` (API fixed by the lead; owner: the VAE helper)

Every training script (train_vae.py, train_ldm.py, later finetune_lora.py / train_dreambooth.py) is a short file in
`training/` that reads top to bottom and calls these. Nothing here is copied into a script.

- `latentdiff/training/args.py`
  - `add_common_args(parser)`: `--output_dir` (required), `--seed` (default 0; seed 0 must be honoured, not treated as None),
    `--train_batch_size`, `--gradient_accumulation_steps` (1), `--max_train_steps`, `--num_train_epochs`
    (max_train_steps wins when both are given), `--learning_rate`, `--scale_lr` (lr × accumulation × batch × processes),
    `--lr_scheduler` (diffusers.optimization.get_scheduler names: constant, constant_with_warmup, linear, cosine, ...),
    `--lr_warmup_steps`, `--adam_beta1` `--adam_beta2` `--adam_weight_decay` `--adam_epsilon`, `--max_grad_norm`,
    `--mixed_precision` {no, fp16, bf16}, `--allow_tf32`, `--checkpointing_steps`, `--checkpoints_total_limit`,
    `--resume_from_checkpoint` (a path or `latest`), `--use_ema`, `--ema_decay`, `--validation_steps`,
    `--report_to` {tensorboard, none}, `--logging_dir`, `--nan_policy` {stop, skip}.
    Script-specific defaults via `parser.set_defaults(...)` in the script.
  - `check_common_args(args)`: fails early with a message naming the flag, the value and what is allowed: fp16/bf16 on a
    machine without CUDA where unsupported (fp16 on CPU is an error), a `--resume_from_checkpoint` path that does not
    exist, non-positive batch/steps, neither max_train_steps nor num_train_epochs, etc.
- `latentdiff/training/run.py`
  - `make_accelerator(args, run_kind: str) -> accelerate.Accelerator`: ProjectConfiguration(output_dir, logging_dir),
    gradient accumulation, mixed precision, `log_with="tensorboard"` when report_to says so (init_trackers with the
    args), `set_seed(args.seed)`, a seedable sampler (`DataLoaderConfiguration(use_seedable_sampler=True)`) so the data
    order is a function of seed+epoch. Writes `output_dir/latentdiff_run.json` ({"kind": run_kind, ...}) on the main
    process; if the output dir already holds a run of another kind, raises ValueError before training starts.
  - `make_optimizer(args, params)` (AdamW) and `make_lr_scheduler(args, optimizer, accelerator)` — warmup and total
    steps counted in optimizer steps, correctly multiplied by num_processes the way accelerate steps a prepared
    scheduler (diffusers' scripts got this wrong 12+ times: read accelerate's AcceleratedScheduler).
  - `count_parameters(model) -> str`, `log_run_start(accelerator, args, dataset_len, ...)` printing the plan
    (examples, batch, accumulation, processes, total optimizer steps).
- `latentdiff/training/checkpointing.py`
  - `save_checkpoint(accelerator, output_dir, step) -> Path`: `accelerator.save_state` into
    `output_dir/checkpoints/.tmp-checkpoint-{step}` then an atomic rename to `checkpoint-{step}` (main process renames,
    everyone waits), then prunes to `--checkpoints_total_limit`, never deleting the newest complete one. A kill during a
    save never leaves a broken "latest": incomplete `.tmp-*` folders are ignored (and cleaned) on the next run.
  - `resolve_resume(args) -> Path | None` ("latest" → newest complete checkpoint or None with a note; a path → must exist).
  - `load_checkpoint(accelerator, path) -> int` (global step; `accelerator.load_state` restores model, optimizer,
    LR scheduler, EMA (registered with `accelerator.register_for_checkpointing`), and RNG states).
  - data position: `batches_to_skip(global_step, grad_accum, len(dataloader)) -> (epoch, skip)` and the loop uses
    `accelerator.skip_first_batches(dataloader, skip)` for the first resumed epoch, and `dataloader.set_epoch(epoch)`
    (or the sampler's) so epoch e's order is the same with and without resume.
- `latentdiff/training/ema.py`: EMA of a model's weights for checkpointing and export (diffusers.training_utils.EMAModel
  is fine to wrap/reuse; it must be checkpointable through register_for_checkpointing, and `copy_to` for export).
- `latentdiff/training/progress.py`: `progress_bar(accelerator, total, initial)` (tqdm on the main process only), showing
  loss, lr and images/s; `check_finite(loss, step, policy) -> bool` (policy "stop": raise FloatingPointError naming the
  step, before any checkpoint of NaN weights is written; "skip": returns False so the loop skips the update and counts it);
  `save_image_grid(images, nrow, path)` (PIL, atomic write) and `log_images(accelerator, tag, grid, step)` for TensorBoard.
- Exact resume is the contract: N steps, kill -9, resume to 2N ≡ 2N steps in one go (CPU, fp32), bit-identical weights.

## As implemented (additions to the API above)

- `run.resolve_train_steps(args, len(train_dataloader))`: fills args.max_train_steps / args.num_train_epochs
  from each other; call it after `accelerator.prepare(train_dataloader)` (per-process length) and before
  `make_lr_scheduler`.
- `save_checkpoint(accelerator, output_dir, step)` prunes to `accelerator.project_configuration.total_limit`,
  which `make_accelerator` sets from --checkpoints_total_limit.
- `run.step_generator(seed, step, accelerator)`: a torch.Generator for the training noise of one optimizer
  step. Draw training noise from it, not from the global RNG: a resumed data loader draws from the
  global RNG at other moments than an uninterrupted one, so global-RNG noise is not exact on resume.
- `ema.make_ema(args, model) -> EMA` (diffusers' EMAModel, device-stable across load) and
  `ema.ema_weights(ema_or_None, model)`, a context manager that swaps the EMA weights in for validation.
- `progress.progress_bar(...)` returns a tqdm with `.step(loss, lr, images)`; grids come from `latentdiff.images`.

The loop every script runs (training/train_vae.py is the worked example):

    global_step = load_checkpoint(accelerator, path) if (path := resolve_resume(args)) else 0
    first_epoch, skip = batches_to_skip(global_step, args.gradient_accumulation_steps, len(train_dataloader))
    for epoch in range(first_epoch, args.num_train_epochs):
        train_dataloader.set_epoch(epoch)
        loader = accelerator.skip_first_batches(train_dataloader, skip) if epoch == first_epoch and skip else train_dataloader
        for batch in loader:
            with accelerator.accumulate(model):
                generator = generator or step_generator(args.seed, global_step, accelerator)
                loss = ...
                if check_finite(loss, global_step, args.nan_policy):
                    accelerator.backward(loss)
                    ...clip (when accelerator.sync_gradients), optimizer.step(), lr_scheduler.step(), optimizer.zero_grad()
            if accelerator.sync_gradients:
                global_step += 1; generator = None; ema.step(...); bar.step(...); log; validate; save_checkpoint
            if global_step >= args.max_train_steps: break
"""
