"""The ``latentdiff`` command: ``demo``, ``generate`` and ``info``.

Errors a user can fix (a wrong path, a bad option) end in one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

SCHEDULERS = ("ddim", "ddpm", "dpmsolver++", "euler")
DEMO_PROMPTS = (
    "a small red circle in the top left",
    "a large blue square in the center",
    "a small green triangle in the bottom right",
    "a large yellow circle on the left",
)


class UsageError(Exception):
    """A mistake in the command line or its inputs: reported in one line, exit status 2."""


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="latentdiff", description="Latent diffusion: train, sample, inspect.")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    demo = verbs.add_parser("demo", help="build the tiny preset pipeline and write a sample grid")
    demo.add_argument("--output_dir", default="out/demo", help="where the pipeline folder and the grid go")
    demo.add_argument("--preset", default="tiny", help="model size preset (tiny, small, base, sd15)")
    demo.add_argument("--steps", type=positive_int, default=10, help="denoising steps")
    demo.add_argument("--seeds", type=positive_int, default=4, help="columns of the grid (one seed each)")

    generate = verbs.add_parser("generate", help="generate images from a pipeline folder")
    generate.add_argument("model_dir", help="a pipeline folder (model_index.json + components)")
    generate.add_argument("prompt")
    generate.add_argument("--negative_prompt", default=None)
    generate.add_argument("-n", "--num_images", type=positive_int, default=1)
    generate.add_argument("--steps", type=positive_int, default=25)
    generate.add_argument("--guidance", type=float, default=7.5)
    generate.add_argument("--scheduler", choices=SCHEDULERS, default="ddim")
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--height", type=positive_int, default=None)
    generate.add_argument("--width", type=positive_int, default=None)
    generate.add_argument("--out", default="latentdiff.png", help="PNG path: one image, or a grid when -n > 1")

    info = verbs.add_parser("info", help="describe a pipeline folder")
    info.add_argument("model_dir")
    return parser


def load_pipeline(model_dir: str):
    from latentdiff import LatentDiffPipeline

    try:
        return LatentDiffPipeline.from_pretrained(model_dir)
    except (FileNotFoundError, ValueError) as error:  # our checks: missing folder, no model_index, pickle
        raise UsageError(str(error)) from error


def make_scheduler(name: str, config):
    from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler

    from latentdiff import DDIMScheduler, DDPMScheduler

    classes = {
        "ddim": DDIMScheduler,
        "ddpm": DDPMScheduler,
        "dpmsolver++": DPMSolverMultistepScheduler,
        "euler": EulerDiscreteScheduler,
    }
    return classes[name].from_config(config)


def run_demo(args) -> None:
    import torch

    from latentdiff import pipeline_from_preset
    from latentdiff.images import image_grid, save_png

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    pipe = pipeline_from_preset(args.preset)
    pipe.save_pretrained(out / "pipeline")
    generators = [torch.Generator().manual_seed(s) for _ in DEMO_PROMPTS for s in range(args.seeds)]
    images = pipe(
        [p for p in DEMO_PROMPTS for _ in range(args.seeds)],
        num_inference_steps=args.steps,
        generator=generators,
    ).images
    grid = save_png(image_grid(images, ncols=args.seeds), out / "grid.png", {"prompts": json.dumps(DEMO_PROMPTS)})
    print(f"wrote {out / 'pipeline'} (randomly initialised {args.preset!r} preset: untrained, the grid is noise)")
    print(f"wrote {grid} (rows: prompts, columns: seeds 0..{args.seeds - 1})")
    print(f"next: latentdiff generate {out / 'pipeline'} \"a red circle\" --out {out / 'red_circle.png'}")


def run_generate(args) -> None:
    import torch

    from latentdiff.images import image_grid, save_png

    out = Path(args.out)
    if not out.parent.is_dir():
        raise UsageError(f"cannot write {args.out!r}: the folder {str(out.parent)!r} does not exist")
    pipe = load_pipeline(args.model_dir)
    pipe.scheduler = make_scheduler(args.scheduler, pipe.scheduler.config)
    try:
        images = pipe(
            args.prompt,
            negative_prompt=args.negative_prompt,
            num_images_per_prompt=args.num_images,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            height=args.height,
            width=args.width,
            generator=torch.Generator().manual_seed(args.seed),
        ).images
    except (ValueError, TypeError) as error:
        raise UsageError(str(error)) from error
    settings = {
        "prompt": args.prompt,
        "negative_prompt": args.negative_prompt or "",
        "seed": args.seed,
        "steps": args.steps,
        "guidance_scale": args.guidance,
        "scheduler": args.scheduler,
        "model": str(Path(args.model_dir).resolve()),
    }
    image = images[0] if len(images) == 1 else image_grid(images)
    save_png(image, out, {"latentdiff": json.dumps(settings)})
    print(f"wrote {out} ({len(images)} image{'s' * (len(images) > 1)}, seed {args.seed})")


def run_info(args) -> None:
    from latentdiff.presets import vae_scale_factor

    pipe = load_pipeline(args.model_dir)
    factor = vae_scale_factor(pipe.vae)
    latent = pipe.unet.config.sample_size
    rows = [
        ("unet", f"{sum(p.numel() for p in pipe.unet.parameters()) / 1e6:.2f}M parameters, "
                 f"blocks {list(pipe.unet.config.block_out_channels)}, cross-attention {pipe.unet.config.cross_attention_dim}"),
        ("vae", f"{sum(p.numel() for p in pipe.vae.parameters()) / 1e6:.2f}M parameters, f={factor}, "
                f"{pipe.vae.config.latent_channels} latent channels, scaling_factor {pipe.vae.config.scaling_factor:.5g}"),
        ("text_encoder", f"{sum(p.numel() for p in pipe.text_encoder.parameters()) / 1e6:.2f}M parameters, "
                         f"{type(pipe.text_encoder).__name__}, hidden {pipe.text_encoder.config.hidden_size}"),
        ("tokenizer", f"{type(pipe.tokenizer).__name__}, {len(pipe.tokenizer)} tokens, max {pipe.tokenizer.model_max_length}"),
        ("scheduler", f"{type(pipe.scheduler).__name__}, {pipe.scheduler.config.num_train_timesteps} train steps, "
                      f"{pipe.scheduler.config.beta_schedule}, {pipe.scheduler.config.get('prediction_type', 'epsilon')}"),
        ("image size", f"{latent * factor}x{latent * factor} px (latents {latent}x{latent})"),
    ]
    for name, text in rows:
        print(f"{name:<13} {text}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        {"demo": run_demo, "generate": run_generate, "info": run_info}[args.verb](args)
    except (UsageError, FileNotFoundError) as error:
        print(f"latentdiff {args.verb}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
