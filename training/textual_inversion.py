"""Textual inversion (Gal et al. 2022): learn a new word for a concept or a style from a few images, as the
word's input embedding only; the UNet, the VAE and every other weight of the text encoder stay frozen.

    accelerate launch training/textual_inversion.py --pretrained_model_name_or_path out/ldm/pipeline \\
        --train_data_dir my_cat_toy --placeholder_token "<cat-toy>" --initializer_token toy \\
        --learnable_property object --max_train_steps 3000 \\
        --validation_prompt "a <cat-toy> on a beach" --output_dir out/ti

Captions are templates around the placeholder ("a photo of a <cat-toy>", ...; "a painting in the style of
<tok>", ... with --learnable_property style): the folder needs images only. Writes checkpoints (the vectors
and optimizer state only) to output_dir/checkpoints, validation grids to output_dir/validation and, at the
end, output_dir/textual_inversion/learned_embeds.safetensors (diffusers' layout) and cat-toy.safetensors
(A1111's, {"emb_params": (N, D)}):

    pipe = LatentDiffPipeline.from_pretrained("out/ldm/pipeline")
    load_textual_inversion(pipe, "out/ti/textual_inversion")  # latentdiff.training.textual_inversion
    image = pipe("a <cat-toy> on a beach").images[0]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from latentdiff.data import add_data_args, build_dataset
from latentdiff.training.args import add_text_to_image_args, check_text_to_image_args
from latentdiff.training.loop import train
from latentdiff.training.models import load_models
from latentdiff.training.run import count_parameters, log_run_start, make_accelerator
from latentdiff.training.textual_inversion import (
    TEXTUAL_INVERSION_DIR,
    TextualInversion,
    add_textual_inversion_args,
    check_textual_inversion_args,
)

RUN_KIND = "textual_inversion"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_args(parser)
    add_text_to_image_args(parser, pipeline_required=True)
    add_textual_inversion_args(parser)
    parser.set_defaults(learning_rate=5e-4, proportion_empty_prompts=0.0)  # diffusers' example's
    args = parser.parse_args(argv)
    check_text_to_image_args(args)
    check_textual_inversion_args(args)
    return args


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    accelerator = make_accelerator(args, RUN_KIND)
    task = TextualInversion(accelerator, args, load_models(args))
    task.prepare(task.cached(build_dataset(args, split="train", captions=False, resolution=task.resolution)))
    if args.validation_loss_images:
        task.hold_out(build_dataset(args, split="validation", captions=False, resolution=task.resolution))
    log_run_start(
        accelerator, args, task.dataset_size, unet=count_parameters(task.unet),
        text_encoder=count_parameters(task.text_encoder),
        placeholder=f"{args.placeholder_token!r}: {args.num_vectors} vectors from {args.initializer_token!r}",
        templates=args.learnable_property, resolution=task.resolution, cached=args.cache_latents,
    )  # fmt: skip

    train(accelerator, args, task)
    return task.export(Path(args.output_dir) / TEXTUAL_INVERSION_DIR)


if __name__ == "__main__":
    main()
