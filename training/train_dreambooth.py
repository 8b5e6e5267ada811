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

from latentdiff.data.args import add_image_args
from latentdiff.training.args import add_text_to_image_args, check_text_to_image_args
from latentdiff.training.dreambooth import PriorPreservationDataset, generate_class_images, prompt_dataset
from latentdiff.training.loop import train
from latentdiff.training.lora import LORA_DIR, add_lora_args, check_lora_args
from latentdiff.training.models import load_models
from latentdiff.training.run import count_parameters, log_run_start, make_accelerator
from latentdiff.training.text_to_image import TextToImage
from latentdiff.training.validation import PIPELINE_DIR, build_pipeline

RUN_KIND = "dreambooth"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_image_args(parser)
    add_text_to_image_args(parser, pipeline_required=True)
    d = parser.add_argument_group("DreamBooth")
    d.add_argument("--instance_data_dir", required=True, help="A folder of images of the subject.")
    d.add_argument("--instance_prompt", required=True, help='The prompt of every instance image: "a photo of sks dog".')
    d.add_argument(
        "--with_prior_preservation", action="store_true",
        help="Add the prior-preservation loss on class images (Ruiz et al. 2023 eq. 2).",
    )  # fmt: skip
    d.add_argument("--class_prompt", help='The class the subject belongs to: "a photo of dog".')
    d.add_argument("--class_data_dir", help="Class images; the base pipeline fills it up to --num_class_images.")
    d.add_argument("--num_class_images", type=int, default=100)
    d.add_argument("--prior_loss_weight", type=float, default=1.0, help="lambda, the weight of the prior loss.")
    d.add_argument("--sample_batch_size", type=int, default=4, help="Images per batch when generating class images.")
    d.add_argument("--class_inference_steps", type=int, default=50, help="Sampling steps of a class image.")
    parser.add_argument("--use_lora", action="store_true", help="Train LoRA adapters instead of every weight.")
    add_lora_args(parser)
    # diffusers' DreamBooth: no caption dropout, one image a batch, small rates for every weight, larger for adapters
    parser.set_defaults(train_batch_size=1, learning_rate=None, proportion_empty_prompts=0.0)
    args = parser.parse_args(argv)
    if args.learning_rate is None:
        args.learning_rate = 1e-4 if args.use_lora else 5e-6
    if args.max_train_steps is None and args.num_train_epochs is None:
        args.max_train_steps = 400
    check_text_to_image_args(args)
    for flag in ("enable_bucket", "masked_loss"):
        if getattr(args, flag):
            raise ValueError(f"train_dreambooth.py does not take --{flag}: its instance and class images are paired in "
                             "one batch at --resolution. Fine-tune with finetune_lora.py or train_ldm.py for it")
    check_lora_args(args)
    check_dreambooth_args(args)
    return args


def check_dreambooth_args(args: argparse.Namespace) -> None:
    """Raise for flags that would fail later, naming the flag, the value and what is allowed."""
    prompt_dataset(args.instance_data_dir, args.instance_prompt, resolution=1)  # raises without usable images
    if args.validation_loss_images:
        raise ValueError("--validation_loss_images needs held-out images: a handful of instance images has none to spare")
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
    models = load_models(args)
    if args.with_prior_preservation:  # sampled from the base model, before training changes it
        generate_class_images(
            build_pipeline(accelerator, *models.components()).to(accelerator.device), args.class_prompt,
            args.class_data_dir, args.num_class_images, resolution=models.resolution, batch_size=args.sample_batch_size,
            num_inference_steps=args.class_inference_steps, seed=args.seed, accelerator=accelerator,
        )  # fmt: skip
    task = TextToImage(
        accelerator, args, models, train_text_encoder=bool(args.train_text_encoder), lora=args.use_lora,
        prior_loss_weight=args.prior_loss_weight if args.with_prior_preservation else None,
    )  # fmt: skip
    crop = dict(random_crop=args.random_crop, random_flip=args.random_flip)
    dataset = instances = task.cached(prompt_dataset(args.instance_data_dir, args.instance_prompt, task.resolution, **crop))
    if args.with_prior_preservation:
        classes = prompt_dataset(args.class_data_dir, args.class_prompt, task.resolution, flag="--class_data_dir", **crop)
        dataset = PriorPreservationDataset(instances, task.cached(classes))
    task.prepare(dataset)
    log_run_start(
        accelerator, args, task.dataset_size, instance_images=len(instances),
        class_images=len(dataset.class_) if args.with_prior_preservation else "none (no prior preservation)",
        unet=count_parameters(task.unet), text_encoder=count_parameters(task.text_encoder),
        lora=f"rank {args.rank}, alpha {args.lora_alpha or args.rank}" if args.use_lora else "no (full)",
        resolution=task.resolution,
    )  # fmt: skip

    train(accelerator, args, task)
    return task.export(Path(args.output_dir) / (LORA_DIR if args.use_lora else PIPELINE_DIR))

if __name__ == "__main__":
    main()
