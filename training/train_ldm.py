"""Train a text-to-image latent diffusion model (Rombach et al. 2022): a UNet that denoises the latents of a
frozen VAE under cross-attention on a text encoder's states.

    accelerate launch training/train_ldm.py --dataset_name shapes --resolution 32 \\
        --pretrained_vae_name_or_path out/vae --unet_preset small --train_batch_size 64 \\
        --max_train_steps 5000 --cache_latents --validation_prompts "a small red circle in the top left" \\
        --output_dir out/ldm

Starts from presets (the text encoder trains jointly, as in LDM) or continues from a pipeline folder
(--pretrained_model_name_or_path: every UNet weight is trained; the pretrained text encoder stays frozen
unless --train_text_encoder). Writes checkpoints to output_dir/checkpoints, validation grids to
output_dir/validation and, at the end, a pipeline folder output_dir/pipeline (EMA weights with --use_ema).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from accelerate.logging import get_logger
from diffusers import AutoencoderKL
from latentdiff.pipelines import LatentDiffPipeline
from transformers import CLIPTextModel

from latentdiff.data import add_data_args, build_dataloader, build_dataset
from latentdiff.data.args import resolution_of
from latentdiff.presets import (
    TEXT_ENCODER_PRESETS,
    UNET_PRESETS,
    sd_scheduler,
    text_encoder_from_preset,
    tokenizer_for,
    unet_from_preset,
    vae_scale_factor,
)
from latentdiff.schedulers.schedule import BETA_SCHEDULES, PREDICTION_TYPES
from latentdiff.training.args import add_common_args, check_common_args
from latentdiff.training.checkpointing import (
    resume_step,
)
from latentdiff.training.diffusion_loss import diffusion_loss
from latentdiff.training.ema import make_ema
from latentdiff.training.finetune import (
    add_loss_and_speed_args,
    averaged_weights,
    check_loss_and_speed_args,
    check_models,
    check_pipeline_folder,
    check_validation_args,
    latents_from_batch,
    maybe_cache,
    text_states_from_batch,
    training_scheduler,
    validate,
)
from latentdiff.training.loop import TrainingLoop
from latentdiff.training.run import (
    count_parameters,
    log_run_start,
    make_accelerator,
    make_lr_scheduler,
    make_optimizer,
    resolve_train_steps,
)
from latentdiff.training.validation import PIPELINE_DIR, build_pipeline, export_pipeline

logger = get_logger(__name__, log_level="INFO")  # INFO on every process: main_process_only=False lines show
RUN_KIND = "ldm"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_args(parser)
    add_data_args(parser)
    m = parser.add_argument_group("models")
    m.add_argument(
        "--pretrained_model_name_or_path",
        help="A pipeline folder to continue from (full fine-tune of the UNet).",
    )
    m.add_argument(
        "--pretrained_vae_name_or_path",
        help="An AutoencoderKL folder (e.g. out/vae from train_vae.py, or a pipeline folder with vae/).",
    )
    m.add_argument("--unet_preset", help=f"One of {', '.join(UNET_PRESETS)} (default small).")
    m.add_argument("--text_encoder_preset", help="Default: the --unet_preset name.")
    m.add_argument(
        "--pretrained_text_encoder_name_or_path",
        help="A CLIPTextModel folder (or a pipeline folder with text_encoder/).",
    )
    m.add_argument(
        "--train_text_encoder",
        action=argparse.BooleanOptionalAction,
        help="Train the text encoder jointly. Default: yes when it starts from scratch, no when pretrained.",
    )
    d = parser.add_argument_group("diffusion")
    d.add_argument(
        "--prediction_type",
        choices=PREDICTION_TYPES,
        help="What the UNet predicts. Default: the pretrained pipeline's, else epsilon.",
    )
    d.add_argument(
        "--beta_schedule",
        choices=BETA_SCHEDULES,
        help="Training noise schedule. Default: the pretrained pipeline's, else SD's scaled_linear.",
    )
    d.add_argument("--beta_start", type=float)
    d.add_argument("--beta_end", type=float)
    d.add_argument(
        "--rescale_betas_zero_snr",
        action="store_true",
        help="Zero terminal SNR (Lin et al. 2024); needs --prediction_type v_prediction or sample.",
    )
    d.add_argument(
        "--proportion_empty_prompts",
        type=float,
        default=0.1,
        help="Captions replaced by '' to learn the unconditional model of classifier-free guidance.",
    )
    parser.add_argument(
        "--save_pipeline_at_checkpoints",
        action="store_true",
        help="Also write a pipeline folder (EMA weights with --use_ema) into each checkpoint-N/pipeline, "
        "to sample from or evaluate while training goes on.",
    )
    add_loss_and_speed_args(parser)
    parser.set_defaults(train_batch_size=32, learning_rate=1e-4)
    args = parser.parse_args(argv)
    check_common_args(args)
    check_ldm_args(args)
    return args


def check_ldm_args(args: argparse.Namespace) -> None:
    """Raise for flags that would fail later, naming the flag, the value and what is allowed."""
    for flag, value, table in (
        ("--unet_preset", args.unet_preset, UNET_PRESETS),
        ("--text_encoder_preset", args.text_encoder_preset, TEXT_ENCODER_PRESETS),
    ):
        if value is not None and value not in table:
            raise ValueError(f"{flag} {value!r} is unknown; choose one of {', '.join(map(repr, table))}")
    if args.pretrained_model_name_or_path:
        if args.unet_preset or args.text_encoder_preset:
            raise ValueError(
                "--unet_preset/--text_encoder_preset build new models: leave them out with "
                "--pretrained_model_name_or_path, which brings its own"
            )
        check_pipeline_folder(args.pretrained_model_name_or_path)
    elif not args.pretrained_vae_name_or_path:
        raise ValueError(
            "a latent diffusion model needs a trained autoencoder: give --pretrained_vae_name_or_path "
            "(e.g. out/vae from train_vae.py) or --pretrained_model_name_or_path (a pipeline folder)"
        )
    for flag in ("pretrained_vae_name_or_path", "pretrained_text_encoder_name_or_path"):
        path = getattr(args, flag)
        if path and not Path(path).is_dir():
            raise FileNotFoundError(f"--{flag} {path!r} is not a folder")
    check_validation_args(args)
    if not 0.0 <= args.proportion_empty_prompts <= 1.0:
        raise ValueError(
            f"--proportion_empty_prompts must lie in [0, 1], got {args.proportion_empty_prompts}"
        )
    check_loss_and_speed_args(args)
    pretrained_prediction = (
        args.prediction_type is None and args.pretrained_model_name_or_path
    )  # checked on load
    if (
        args.rescale_betas_zero_snr
        and args.prediction_type in (None, "epsilon")
        and not pretrained_prediction
    ):
        raise ValueError(
            "--rescale_betas_zero_snr makes x_T pure noise, where predicting eps says nothing about "
            "x_0 (Lin et al. 2024 §3.2): add --prediction_type v_prediction"
        )


def subfolder(path: str, component: str) -> str | None:
    """Where a model lies in `path`: at its top (None), or in its `component` sub-folder (a pipeline folder)."""
    if not (Path(path) / "config.json").is_file() and (Path(path) / component / "config.json").is_file():
        return component
    return None


def load_models(args, resolution: int):
    """The VAE, text encoder, tokenizer and UNet, and the training noise schedule, as the flags say."""
    if args.pretrained_model_name_or_path:
        pipe = LatentDiffPipeline.from_pretrained(args.pretrained_model_name_or_path)
        vae, text_encoder, tokenizer, unet = pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.unet
        schedule = dict(pipe.scheduler.config)
    else:
        vae = text_encoder = tokenizer = None
        schedule = dict(sd_scheduler().config)
    if args.pretrained_vae_name_or_path:
        path = args.pretrained_vae_name_or_path
        vae = AutoencoderKL.from_pretrained(path, subfolder=subfolder(path, "vae"))
    if args.pretrained_text_encoder_name_or_path:
        path = args.pretrained_text_encoder_name_or_path
        text_encoder = CLIPTextModel.from_pretrained(path, subfolder=subfolder(path, "text_encoder") or "")
    elif text_encoder is None:
        text_encoder = text_encoder_from_preset(args.text_encoder_preset or args.unet_preset or "small")
    if tokenizer is None:
        tokenizer = tokenizer_for(text_encoder)
    if not args.pretrained_model_name_or_path:
        # sample_size only sets the pipeline's default image size: the training resolution
        unet = unet_from_preset(args.unet_preset or "small", sample_size=resolution // vae_scale_factor(vae))
    check_models(vae, text_encoder, unet, resolution)

    noise_scheduler = training_scheduler(
        schedule,
        prediction_type=args.prediction_type,
        beta_schedule=args.beta_schedule,
        beta_start=args.beta_start,
        beta_end=args.beta_end,
        rescale_betas_zero_snr=args.rescale_betas_zero_snr or None,
    )
    return vae, text_encoder, tokenizer, unet, noise_scheduler


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    accelerator = make_accelerator(args, RUN_KIND)
    resolution = resolution_of(args)
    vae, text_encoder, tokenizer, unet, noise_scheduler = load_models(args, resolution)
    pretrained_text = bool(args.pretrained_model_name_or_path or args.pretrained_text_encoder_name_or_path)
    train_text_encoder = (
        args.train_text_encoder if args.train_text_encoder is not None else not pretrained_text
    )

    # from_pretrained and the presets give fp32 weights; the VAE stays so (SD's VAE overflows in fp16), and
    # trained weights stay fp32 master weights under accelerate's autocast.
    vae.requires_grad_(False).eval().to(accelerator.device)
    text_encoder.requires_grad_(train_text_encoder).train(train_text_encoder).to(accelerator.device)
    unet.train().to(accelerator.device)  # before the EMA copies its weights
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if train_text_encoder:
            text_encoder.gradient_checkpointing_enable()
    if args.enable_xformers_memory_efficient_attention:
        unet.enable_xformers_memory_efficient_attention()

    dataset = build_dataset(args, split="train")
    dataset, empty_states = maybe_cache(
        args, dataset, accelerator, vae, text_encoder, tokenizer, cache_text=not train_text_encoder
    )
    train_dataloader = build_dataloader(
        dataset, args.train_batch_size, seed=args.seed, num_workers=args.dataloader_num_workers
    )

    trained = [unet, text_encoder] if train_text_encoder else [unet]
    optimizer = make_optimizer(args, [p for model in trained for p in model.parameters()])
    emas = [make_ema(args, model) for model in trained] if args.use_ema else []
    for ema in emas:
        accelerator.register_for_checkpointing(ema)
    *trained, optimizer, train_dataloader = accelerator.prepare(*trained, optimizer, train_dataloader)
    unet = trained[0]
    if train_text_encoder:
        text_encoder = trained[1]
    resolve_train_steps(args, len(train_dataloader))
    lr_scheduler = accelerator.prepare(make_lr_scheduler(args, optimizer, accelerator))

    log_run_start(
        accelerator,
        args,
        len(dataset),
        unet=count_parameters(unet),
        text_encoder=f"{count_parameters(text_encoder)} ({'trained' if train_text_encoder else 'frozen'})",
        vae=f"{count_parameters(vae)} (frozen)",
        prediction_type=noise_scheduler.config.prediction_type,
        resolution=resolution,
        cached=args.cache_latents,
    )

    global_step = resume_step(accelerator, args)

    def denoise(x_t, t, encoder_hidden_states):
        return unet(x_t, t, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]

    components = dict(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, noise_scheduler=noise_scheduler
    )

    def validate_at(step: int) -> None:
        validate(accelerator, args, step, components, resolution, emas, trained)

    def export_to(folder: Path) -> Path:  # main process only
        with averaged_weights(emas, [accelerator.unwrap_model(m) for m in trained]):
            return export_pipeline(build_pipeline(accelerator, **components), Path(folder) / PIPELINE_DIR)

    loop = TrainingLoop(
        accelerator, args, global_step, optimizer, lr_scheduler, trained, emas, trained,
        validate=validate_at, checkpoint_extra=export_to if args.save_pipeline_at_checkpoints else None,
    )  # fmt: skip
    for batch, generator in loop.batches(train_dataloader):
        with accelerator.accumulate(*trained):
            latents = latents_from_batch(batch, vae, generator)  # (B, C, h, w)
            with accelerator.autocast():
                states = text_states_from_batch(
                    batch, tokenizer, text_encoder, empty_states, args.proportion_empty_prompts, generator,
                    train_text_encoder,
                )  # fmt: skip
            loss = diffusion_loss(
                denoise, latents, states, noise_scheduler,
                snr_gamma=args.snr_gamma, noise_offset=args.noise_offset, generator=generator,
            )  # fmt: skip
            loop.step(loss)

    pipeline_dir = Path(args.output_dir) / PIPELINE_DIR
    if accelerator.is_main_process:
        export_to(args.output_dir)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return pipeline_dir


if __name__ == "__main__":
    main()
