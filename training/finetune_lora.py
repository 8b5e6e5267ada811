"""Fine-tune a text-to-image pipeline with LoRA (Hu et al. 2022): small trainable low-rank adapters on the UNet's
attention projections (and, with --train_text_encoder, the text encoder's), the pretrained weights frozen.

    accelerate launch training/finetune_lora.py --pretrained_model_name_or_path out/ldm/pipeline \\
        --train_data_dir my_style --rank 8 --learning_rate 1e-4 --max_train_steps 2000 \\
        --validation_prompts "a small red circle in the top left" --output_dir out/lora

Takes the data flags of train_ldm.py (images + captions; --resolution defaults to the pipeline's own size).
Writes checkpoints (adapters and optimizer state only) to output_dir/checkpoints, validation grids to
output_dir/validation and, at the end, output_dir/lora/pytorch_lora_weights.safetensors in diffusers' format
(--save_format kohya: pytorch_lora_weights_kohya.safetensors in kohya-ss' keys, for AUTOMATIC1111/ComfyUI):

    pipe = LatentDiffPipeline.from_pretrained("out/ldm/pipeline")   # or diffusers' StableDiffusionPipeline
    pipe.load_lora_weights("out/lora/lora")
    image = pipe("...", cross_attention_kwargs={"scale": 0.8}).images[0]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from latentdiff.data import add_data_args, build_dataset
from latentdiff.training.args import add_text_to_image_args, check_text_to_image_args
from latentdiff.training.loop import train
from latentdiff.training.lora import LORA_DIR, add_lora_args, check_lora_args
from latentdiff.training.models import load_models
from latentdiff.training.run import count_parameters, log_run_start, make_accelerator
from latentdiff.training.text_to_image import TextToImage

RUN_KIND = "lora"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_args(parser)
    add_text_to_image_args(parser, pipeline_required=True)
    add_lora_args(parser)
    parser.set_defaults(proportion_empty_prompts=0.0)
    args = parser.parse_args(argv)
    check_text_to_image_args(args)
    check_lora_args(args)
    return args


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    accelerator = make_accelerator(args, RUN_KIND)
    task = TextToImage(accelerator, args, load_models(args), train_text_encoder=bool(args.train_text_encoder), lora=True)
    task.prepare(task.cached(build_dataset(args, split="train", resolution=task.resolution)))
    if args.validation_loss_images:
        task.hold_out(build_dataset(args, split="validation", resolution=task.resolution))
    log_run_start(
        accelerator, args, task.dataset_size, unet=count_parameters(task.unet),
        text_encoder=count_parameters(task.text_encoder),
        lora=f"rank {args.rank}, alpha {args.lora_alpha or args.rank}, dropout {args.lora_dropout}",
        prediction_type=task.noise_scheduler.config.prediction_type, resolution=task.resolution,
        cached=args.cache_latents,
    )  # fmt: skip

    train(accelerator, args, task)
    return task.export(Path(args.output_dir) / LORA_DIR)


if __name__ == "__main__":
    main()
