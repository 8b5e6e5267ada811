"""The main job: train a VAE and a text-to-image model on a built-in dataset, then sample and measure.

It runs the project's own training scripts (``training/train_vae.py`` then ``training/train_ldm.py``)
as a user would, each resuming from its latest checkpoint, so a run killed part-way goes on with the
same command. Step counts decide how long each stage trains, so a finished demo is reproducible and
``latentdiff eval`` on its pipeline gives the same numbers; ``--minutes`` trades that for a time budget
(three tenths to the VAE, as the default step counts take on 2 cores; training time summed over resumes).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import torch

from latentdiff.evaluation import DEFAULT_NUM_PROMPTS, print_results, shapes_adherence, shapes_vae_round_trip
from latentdiff.images import image_grid, save_png
from latentdiff.pipelines import LatentDiffPipeline
from latentdiff.presets import CLIP_TEXT_DEFAULTS, TEXT_ENCODER_PRESETS
from latentdiff.text_encoders import resolve_text_encoder

# optimizer steps of the two stages, per dataset (their time: README, "The main job" and "Emoji on a CPU"); emoji's
# are from `--minutes 60` at two threads on 2026-12-03: the VAE's 7,589 steps of its 18 minutes, then the
# text-to-image checkpoint at 3,000 of the 3,370 steps of its 42 (so the whole demo stays under an hour). Both
# learning rates are constant after warm-up and only the stopping rule differs, so these step counts train that
# run's models (rerun on 2026-12-03: the same VAE metrics and the same eval at 3,000 steps)
DEMO_STEPS = {"shapes": (1500, 900), "emoji": (7589, 3000)}
DEMO_RESOLUTION = 32  # both datasets: at a CPU hour's compute, 32 px beats 64 px on emoji (README, "Emoji on a CPU")
DEMO_TRAIN_SAMPLES = 8000
SCRIPTS_PACKAGE = "latentdiff.scripts"  # the repository's training/, as pyproject installs it
VAE_SHARE_OF_MINUTES = 0.3
UNCAPPED_STEPS = 1_000_000  # with --minutes and no step count: time ends the stage
GRID_PROMPTS = {
    "shapes": [
        "a large red circle in the center",
        "a small blue square in the top left",
        "a large green triangle at the bottom",
        "a small yellow circle on the right",
        "a large purple square in the bottom right",
        "a small orange triangle at the top",
    ],
    "emoji": ["cat face", "red apple", "rocket", "smiling face with sunglasses", "pizza", "woman astronaut"],
}


# the frozen text encoder each dataset's demo trains against when --text_encoder is not given: on emoji the pretrained
# MiniLM, whose states already know that "cat face" and "grinning cat" are near (README, "Emoji on a CPU")
DEFAULT_TEXT_ENCODERS = {"shapes": "clip", "emoji": "minilm"}


def text_encoder_of(args) -> str:
    return args.text_encoder or DEFAULT_TEXT_ENCODERS[args.dataset]


def check_text_encoder(args) -> None:
    """Raise before any training: ModuleNotFoundError, saying what to install, if the demo's text encoder is a
    packaged one that is not installed; ValueError if ``--tokenizer_max_length`` is more than its positions."""
    if text_encoder_of(args) == "minilm":
        encoder_dir, _, _ = resolve_text_encoder("minilm")
        positions = json.loads((encoder_dir / "config.json").read_text())["max_position_embeddings"]
    else:
        positions = {**CLIP_TEXT_DEFAULTS, **TEXT_ENCODER_PRESETS[args.preset or "small"]}["max_position_embeddings"]
    if args.tokenizer_max_length and not 3 <= args.tokenizer_max_length <= positions:
        raise ValueError(f"--tokenizer_max_length {args.tokenizer_max_length}: the demo's text encoder "
                         f"({text_encoder_of(args)}) takes prompts of 3 to {positions} tokens")


def text_encoder_flags(args) -> list[str]:
    """The text-to-image stage's text encoder, kept frozen: MiniLM, or a random CLIP whose token embeddings are
    drawn at std 0.5 on shapes rather than 0.02, so that its states tell one color word from another (measured on
    shapes only; README, "Choosing the demo's settings"), and the prompt length ``--tokenizer_max_length`` asks for."""
    length = ["--tokenizer_max_length", str(args.tokenizer_max_length)] if args.tokenizer_max_length else []
    if text_encoder_of(args) == "minilm":
        return ["--pretrained_text_encoder_name_or_path", "minilm", *length]
    return [*(["--token_embedding_std", "0.5"] if args.dataset == "shapes" else []), *length]


def script_command(script: str) -> list[str]:
    """The command that runs training script ``script`` (``train_vae.py``) as a module of the installed package,
    so that it works from a wheel as from a checkout."""
    module = f"{SCRIPTS_PACKAGE}.{Path(script).stem}"
    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # the package itself is missing
        found = False
    if not found:
        raise FileNotFoundError(
            f"no module {module}: this latentdiff is installed without its training scripts "
            "(reinstall it: pip install latentdiff, or pip install -e . in a clone of the repository)"
        )
    return [sys.executable, "-m", module]


def run_stage(name: str, script: str, output_dir: Path, args: list[str]) -> None:
    """Run a training script to completion; it resumes from ``output_dir``'s latest checkpoint if any."""
    command = [*script_command(script), "--output_dir", str(output_dir), "--resume_from_checkpoint", "latest", *args]
    print(f"\n== {name}: {' '.join(command)}", flush=True)
    subprocess.run(command, check=True)


def stage_lengths(args) -> tuple[list[str], list[str]]:
    """The length flags of the VAE and the text-to-image stage: step counts, or with ``--minutes`` a
    time budget each (a step count given too is then a cap)."""
    if args.minutes is None:
        vae_steps, ldm_steps = DEMO_STEPS[args.dataset]
        return (["--max_train_steps", str(args.vae_steps or vae_steps)],
                ["--max_train_steps", str(args.max_train_steps or ldm_steps)])
    vae_minutes = VAE_SHARE_OF_MINUTES * args.minutes
    return (["--max_train_steps", str(args.vae_steps or UNCAPPED_STEPS), "--max_train_minutes", f"{vae_minutes:g}"],
            ["--max_train_steps", str(args.max_train_steps or UNCAPPED_STEPS),
             "--max_train_minutes", f"{args.minutes - vae_minutes:g}"])


def sample_grid(pipe, prompts: list[str], seeds: int, steps: int, guidance: float):
    """Rows of prompts, columns of seeds."""
    images = pipe(
        [p for p in prompts for _ in range(seeds)],
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=[torch.Generator().manual_seed(s) for _ in prompts for s in range(seeds)],
    ).images
    return image_grid(images, ncols=seeds)


def run_demo(args) -> dict:
    check_text_encoder(args)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    resolution = args.resolution or DEMO_RESOLUTION
    data = [
        "--dataset_name", args.dataset,
        "--resolution", str(resolution),
        "--seed", str(args.seed),
        "--max_train_samples", str(args.max_train_samples),
    ]
    vae_dir, ldm_dir = out / "vae", out / "ldm"

    vae_preset = ["--vae_preset", args.preset] if args.preset else []
    unet_preset = ["--unet_preset", args.preset] if args.preset else []
    vae_length, ldm_length = stage_lengths(args)
    # EMA weights, 1e-3 rather than train_vae's 2e-3, and L2 with a tenth of L1 (train_vae: L1 + L2): with L1 at
    # full weight the small shapes' colors are learnt last, and whether one is lost at 1,500 steps is luck
    # (README, "Choosing the demo's settings")
    run_stage("VAE", "train_vae.py", vae_dir,
              [*data, *vae_preset, *vae_length, "--learning_rate", "1e-3", "--l1_weight", "0.1", "--use_ema"])
    run_stage(
        "text-to-image model",
        "train_ldm.py",
        ldm_dir,
        [
            *data,
            *unet_preset,
            "--pretrained_vae_name_or_path", str(vae_dir),
            *ldm_length,
            # a short run from scratch, as the sweeps chose it (README, "Choosing the demo's settings")
            "--train_batch_size", "64",
            "--learning_rate", "2e-3",
            "--snr_gamma", "5",
            "--lr_scheduler", "constant_with_warmup",
            "--lr_warmup_steps", "50",
            # a frozen text encoder (its random initialisation): its states are cached with the latents and
            # positions are learned (README, "Choosing the demo's settings")
            "--no-train_text_encoder",
            *text_encoder_flags(args),
            "--cache_latents",
            "--use_ema",
            "--validation_prompts", *GRID_PROMPTS[args.dataset][:4],
        ],
    )

    pipe = LatentDiffPipeline.from_pretrained(ldm_dir / "pipeline")
    pipe.set_progress_bar_config(disable=True)
    grid = sample_grid(pipe, GRID_PROMPTS[args.dataset], seeds=args.seeds, steps=args.steps, guidance=args.guidance)
    grid_path = save_png(grid, out / "grid.png", {"prompts": json.dumps(GRID_PROMPTS[args.dataset])})

    metrics = {"dataset": args.dataset, "resolution": resolution, "vae": json.loads((vae_dir / "metrics.json").read_text())}
    if args.dataset == "shapes":
        settings = dict(num_inference_steps=args.steps, guidance_scale=args.guidance, seed=args.seed)
        metrics["vae_round_trip"] = shapes_vae_round_trip(pipe.vae, resolution)
        metrics["adherence"] = {
            split: shapes_adherence(pipe, split, num_prompts=DEFAULT_NUM_PROMPTS, **settings)
            for split in ("train", "held_out")
        }
        metrics["adherence_settings"] = settings
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")

    print(f"\nwrote {grid_path} (rows: prompts, columns: seeds)")
    print_results(metrics)
    print(f"VAE held-out PSNR {metrics['vae'].get('psnr', float('nan')):.2f} dB; all numbers in {out / 'metrics.json'}")
    print("next:")
    print(f"  latentdiff generate {ldm_dir / 'pipeline'} \"{GRID_PROMPTS[args.dataset][0]}\" -n 4 --out sample.png")
    print(f"  latentdiff eval {ldm_dir / 'pipeline'} --dataset {args.dataset}")
    print(f"  latentdiff info {ldm_dir / 'pipeline'}")
    return metrics
