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

from latentdiff.data import add_data_args, build_dataset
from latentdiff.training.args import add_text_to_image_args, check_text_to_image_args
from latentdiff.training.loop import train
from latentdiff.training.models import load_models
from latentdiff.training.run import count_parameters, log_run_start, make_accelerator
from latentdiff.training.text_to_image import TextToImage
from latentdiff.training.validation import PIPELINE_DIR

RUN_KIND = "ldm"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_args(parser)
    add_text_to_image_args(parser)
    parser.add_argument(
        "--inpainting", action="store_true",
        help="Train an inpainting model (9-channel UNet: latents, mask, masked image latents) on random masks, as "
        "SD's inpainting models were; from a text-to-image pipeline its extra input channels start at zero.",
    )  # fmt: skip
    parser.add_argument(
        "--tokenizer_max_length", type=int, metavar="N",
        help="Pad (and truncate) every caption and prompt to N tokens, start and end tokens included, instead of "
        "the tokenizer's length (77 for CLIP and minilm), as diffusers' DreamBooth script's flag does. The saved "
        "pipeline's tokenizer keeps N, so sampling and diffusers pad the same; fewer tokens make the UNet's "
        "cross-attention cheaper (README, \"Emoji on a CPU\"). At most the text encoder's positions.",
    )  # fmt: skip
    parser.set_defaults(train_batch_size=32, learning_rate=1e-4)
    args = parser.parse_args(argv)
    check_text_to_image_args(args)
    if args.tokenizer_max_length is not None and args.tokenizer_max_length < 3:
        raise ValueError(f"--tokenizer_max_length must be at least 3 (start, one word, end), got {args.tokenizer_max_length}")
    if args.inpainting and args.cache_latents:
        raise ValueError("--inpainting encodes each step's masked images with the VAE: leave out --cache_latents")
    return args


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    accelerator = make_accelerator(args, RUN_KIND)
    models = load_models(args)
    # LDM trains a new text encoder jointly; a pretrained one stays frozen unless asked
    train_text_encoder = args.train_text_encoder if args.train_text_encoder is not None else not models.pretrained_text_encoder
    task = TextToImage(accelerator, args, models, train_text_encoder=train_text_encoder, inpainting=args.inpainting)
    task.prepare(task.cached(build_dataset(args, split="train", resolution=task.resolution)))
    if args.validation_loss_images:
        task.hold_out(build_dataset(args, split="validation", resolution=task.resolution))
    log_run_start(
        accelerator, args, task.dataset_size, unet=count_parameters(task.unet),
        text_encoder=f"{count_parameters(task.text_encoder)} ({'trained' if train_text_encoder else 'frozen'})",
        vae=f"{count_parameters(task.vae)} (frozen)", prediction_type=task.noise_scheduler.config.prediction_type,
        resolution=task.resolution, cached=args.cache_latents,
    )  # fmt: skip

    train(accelerator, args, task)
    return task.export(Path(args.output_dir) / PIPELINE_DIR)


if __name__ == "__main__":
    main()
