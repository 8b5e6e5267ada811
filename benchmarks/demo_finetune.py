"""Fine-tuning demonstration (issue 6): a LoRA to a new style and a DreamBooth subject, measured before and after.

Starts from a pipeline trained on shapes at 32 px (``latentdiff demo``'s ldm/pipeline) and runs the project's own
scripts, as a user would, each resuming in its folder under --out:

(a) **LoRA** (training/finetune_lora.py) on a style the base never saw: hollow shapes, 2 px outlines
    (``shapes.render_shape(..., outline=2)``), captioned in the base grammar ("a large red circle in the center").
    Large shapes only: at 32 px a small triangle has no room for a hole. Measured on 36 training prompts made
    large, 2 seeds each: the fraction of images that are hollow (``shapes.is_hollow``: paint coverage at the
    painted area's centroid below one half, where every filled shape, being convex, is painted, inside a
    closed ring of paint) and the analyzer's color accuracy (the style changes, the color should not). The
    VAE round trip of training images is the ceiling: the UNet can only make what the base VAE decodes, and
    the demo's VAE, trained on filled shapes only, fills hollow triangles and shifts the hue of thin outlines.
(b) **DreamBooth** (training/train_dreambooth.py --use_lora --train_text_encoder --with_prior_preservation: LoRAs
    on the UNet and the text encoder) on 5 images of one subject no caption describes: a red oval twice as wide
    as tall, taught as "a large sks red circle in the center", the class prompt "a large red circle in the center"
    (class images sampled by the script from the base model).
    "Has the subject" = the analyzer's color is red and the painted area is elongated along the horizontal: the
    square root of the ratio of its second moments' eigenvalues is >= 1.5 (1 for a circle, square or equilateral
    triangle, 2 for the subject) with the major axis within 30 degrees of horizontal. Measured: the fraction of
    instance-prompt images with the subject, the fraction of class-prompt images with it (prior preservation
    keeps it low) and the base prompts' color+shape adherence (``evaluation.shapes_adherence``, the demo's).
    (A two-colored subject, e.g. a red circle with a blue dot, is out of reach: the base VAE decodes it as one
    brownish blob.)

Both classifiers are first checked on real renders (printed, and in the JSON). Every image comes from its own
seeded generator, 25 DDIM steps, guidance 7.5: before and after see the same noise. Writes before/after grids
(rows: prompts, columns: seeds) beside the JSON.

    python benchmarks/demo_finetune.py --base out/demo/ldm/pipeline
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from results_file import result_header, write_result  # benchmarks/ is on sys.path when a script runs
from safetensors.torch import load_file

from latentdiff import LatentDiffPipeline
from latentdiff.data import shapes
from latentdiff.data.transforms import to_tensor
from latentdiff.demo import run_stage
from latentdiff.evaluation import adherence_scores, generate, shapes_adherence, shapes_prompts
from latentdiff.images import image_grid, save_png, to_pil
from latentdiff.presets import default_image_size
from latentdiff.training.checkpointing import checkpoint_state, list_checkpoints
from latentdiff.training.lora import LORA_DIR, LORA_WEIGHT_NAME
from latentdiff.training.validation import PIPELINE_DIR

OUTLINE_PX = 2.0
STYLE_SIZE = "large"
SUBJECT_ASPECT = 2.0  # width / height of the subject oval, whose area is that of a large circle
MIN_ELONGATION = 1.5
MAX_TILT_DEGREES = 30.0
STYLE_GRID_PROMPTS = [
    "a large red circle in the center",
    "a large blue square in the top left",
    "a large green triangle at the bottom",
    "a large yellow circle on the right",
    "a large purple square in the bottom right",
    "a large orange triangle at the top",
]
SUBJECT_GRID_PROMPTS = [  # below the instance and the class prompt
    "a large blue square in the center",
    "a large green triangle at the bottom",
]


# --- the subject and its classifier ------------------------------------------------------------


def render_subject(resolution: int, rng: np.random.Generator) -> Image.Image:
    """The DreamBooth subject: a red oval, SUBJECT_ASPECT times as wide as tall, with the area of a large circle,
    near the center (jittered like shapes' own layouts), drawn 4x supersampled like shapes."""
    s = 4
    diameter = shapes.SIZES["large"] * resolution * (1 + rng.uniform(-0.08, 0.08))
    width, height = diameter * math.sqrt(SUBJECT_ASPECT), diameter / math.sqrt(SUBJECT_ASPECT)
    x, y = (resolution * (0.5 + rng.uniform(-0.06, 0.06)) for _ in range(2))
    canvas = Image.new("RGB", (resolution * s, resolution * s), "white")
    box = ((x - width / 2) * s, (y - height / 2) * s, (x + width / 2) * s, (y + height / 2) * s)
    ImageDraw.Draw(canvas).ellipse([c - 0.5 for c in box], fill=shapes.COLORS["red"])
    return canvas.reduce(s)


def elongation(image) -> tuple[float, float] | None:
    """(sqrt of the ratio of the painted area's second-moment eigenvalues, the major axis' angle to the horizontal
    in degrees), or None with no shape."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    mask = shapes._coverage(rgb)
    area = mask.sum()
    if area < shapes._MIN_AREA * mask.size:
        return None
    ys, xs = np.mgrid[0 : mask.shape[0], 0 : mask.shape[1]] + 0.5
    dx, dy = xs - (mask * xs).sum() / area, ys - (mask * ys).sum() / area
    covariance = np.array([[(mask * dx * dx).sum(), (mask * dx * dy).sum()],
                           [(mask * dx * dy).sum(), (mask * dy * dy).sum()]]) / area  # fmt: skip
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)  # ascending
    major = eigenvectors[:, 1]
    tilt = math.degrees(math.atan2(abs(major[1]), abs(major[0])))
    return math.sqrt(eigenvalues[1] / max(eigenvalues[0], 1e-12)), tilt


def has_subject(image) -> bool:
    """Red (the analyzer's color) and elongated along the horizontal (see the module docstring)."""
    shape = elongation(image)
    return (
        shape is not None and shape[0] >= MIN_ELONGATION and shape[1] <= MAX_TILT_DEGREES
        and shapes.analyze(image)["color"] == "red"
    )  # fmt: skip


def check_classifiers(resolution: int, seed: int) -> dict:
    """Both classifiers on real renders: every color x shape x position, jittered; the subject 100 times."""
    layouts = list(enumerate(itertools.product(shapes.COLORS, shapes.SHAPES, shapes.POSITIONS)))
    filled = [shapes.render_shape(c, s, size, p, resolution, np.random.default_rng([seed, k]))
              for k, (c, s, p) in layouts for size in shapes.SIZES]  # fmt: skip
    hollow = [shapes.render_shape(c, s, STYLE_SIZE, p, resolution, np.random.default_rng([seed, k]), outline=OUTLINE_PX)
              for k, (c, s, p) in layouts]  # fmt: skip
    subjects = [render_subject(resolution, np.random.default_rng([seed, 1, k])) for k in range(100)]
    hollow_right = sum(shapes.is_hollow(i) is False for i in filled) + sum(shapes.is_hollow(i) is True for i in hollow)
    subject_right = sum(has_subject(i) for i in subjects) + sum(not has_subject(i) for i in filled + hollow)
    return {
        "is_hollow": {"accuracy": hollow_right / (len(filled) + len(hollow)), "filled": len(filled),
                      "hollow": len(hollow)},
        "has_subject": {"accuracy": subject_right / (len(subjects) + len(filled) + len(hollow)),
                        "subject": len(subjects), "others": len(filled) + len(hollow)},
    }  # fmt: skip


# --- measuring ---------------------------------------------------------------------------------


def style_targets(num_prompts: int, images_per_prompt: int, seed: int) -> list[dict]:
    """The demo's training prompts (``shapes_prompts``), made large, each repeated ``images_per_prompt`` times."""
    targets = []
    for target in shapes_prompts("train", num_prompts, seed):
        target = {**target, "size": STYLE_SIZE}
        target["prompt"] = shapes.caption(target["color"], target["shape"], STYLE_SIZE, target["position"])
        targets += [target] * images_per_prompt
    return targets


def style_scores(images: list, targets: list[dict]) -> dict:
    """Fraction hollow and color accuracy, over all images and per shape."""

    def scores(pairs: list) -> dict:
        return {
            "images": len(pairs),
            "hollow": sum(bool(shapes.is_hollow(i)) for i, _ in pairs) / len(pairs),
            "color": adherence_scores([t for _, t in pairs], [i for i, _ in pairs])["color"],
        }

    pairs = list(zip(images, targets, strict=True))
    by_shape = {s: [p for p in pairs if p[1]["shape"] == s] for s in shapes.SHAPES}
    return {**scores(pairs), "per_shape": {s: scores(found) for s, found in by_shape.items() if found}}


@torch.no_grad()
def vae_round_trip(vae, images: list) -> list:
    x = torch.stack([to_tensor(i) for i in images]).to(vae.device, vae.dtype)  # (N, 3, R, R)
    return to_pil(vae.decode(vae.encode(x).latent_dist.mean).sample.float().cpu())


def beside(results: Path, name: str) -> Path:
    """A file named after the results JSON, in its folder: results/finetune_demo_lora_before.png."""
    return results.with_name(f"{results.stem}_{name}")


def grid(pipe, prompts: list[str], seeds: int, settings: dict, path: Path) -> str:
    """Rows of prompts, columns of seeds 0, 1, ..."""
    images = generate(pipe, [p for p in prompts for _ in range(seeds)], [s for _ in prompts for s in range(seeds)],
                      **settings)  # fmt: skip
    return str(save_png(image_grid(images, ncols=seeds), path, {"prompts": json.dumps(prompts)}))


def load_base(path: str) -> LatentDiffPipeline:
    pipe = LatentDiffPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_training(name: str, script: str, run_dir: Path, flags: list[str]) -> dict:
    """Run a training script, resuming in run_dir: ``train_seconds``, the optimizer loop's time summed over the
    runs it resumed (from its last checkpoint), and ``wall_seconds``, this invocation's, start-up included."""
    start = time.perf_counter()
    run_stage(name, script, run_dir, flags)
    wall = time.perf_counter() - start
    checkpoints = list_checkpoints(run_dir)
    state = checkpoint_state(checkpoints[-1]) if checkpoints else {}
    return {"wall_seconds": wall, "train_seconds": state.get("train_seconds")}


def weights_size(files: list[Path]) -> dict:
    """Bytes and parameter count of the trained weights: a LoRA file, or the safetensors of fine-tuned models."""
    return {"bytes": sum(f.stat().st_size for f in files),
            "parameters": sum(t.numel() for f in files for t in load_file(f).values()),
            "path": ", ".join(map(str, files))}  # fmt: skip


# --- (a) LoRA to a new style -------------------------------------------------------------------


def write_style_data(folder: Path, num_images: int, resolution: int, seed: int) -> Path:
    """``num_images`` hollow large shapes of the training combinations as an imagefolder (PNGs + metadata.jsonl);
    kept when the folder already holds that many."""
    metadata = folder / "metadata.jsonl"
    if metadata.is_file() and len(metadata.read_text().splitlines()) == num_images:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 2])
    rows = []
    for i in range(num_images):
        color, shape, position = shapes.TRAIN_COMBINATIONS[rng.integers(len(shapes.TRAIN_COMBINATIONS))]
        image = shapes.render_shape(color, shape, STYLE_SIZE, position, resolution, rng, outline=OUTLINE_PX)
        image.save(folder / f"{i:05d}.png")
        rows.append({"file_name": f"{i:05d}.png", "text": shapes.caption(color, shape, STYLE_SIZE, position),
                     "color": color, "shape": shape})  # fmt: skip
    metadata.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


def part_lora(args, settings: dict, results: Path) -> dict:
    out = Path(args.out) / "lora"
    pipe = load_base(args.base)
    resolution = default_image_size(pipe.vae, pipe.unet)
    data = write_style_data(out / "data", args.style_images, resolution, args.seed)
    rows = [json.loads(line) for line in (data / "metadata.jsonl").read_text().splitlines()[: args.ceiling_images]]
    originals = [Image.open(data / row["file_name"]).convert("RGB") for row in rows]
    ceiling = style_scores(vae_round_trip(pipe.vae, originals), rows)

    targets = style_targets(args.num_prompts, args.images_per_prompt, args.seed)
    prompts, seeds = [t["prompt"] for t in targets], [args.seed + i for i in range(len(targets))]
    before = style_scores(generate(pipe, prompts, seeds, **settings), targets)
    grids = {"prompts": STYLE_GRID_PROMPTS}
    grids["before"] = grid(pipe, STYLE_GRID_PROMPTS, args.grid_seeds, settings, beside(results, "lora_before.png"))

    run_dir = out / "run"
    timing = run_training("LoRA (hollow style)", "finetune_lora.py", run_dir, [
        "--pretrained_model_name_or_path", args.base,
        "--train_data_dir", str(data),
        "--rank", str(args.lora_rank),
        "--learning_rate", str(args.lora_lr),
        "--lr_scheduler", "constant_with_warmup",
        "--lr_warmup_steps", str(min(20, args.lora_steps // 10)),
        "--train_batch_size", str(args.lora_batch),
        "--max_train_steps", str(args.lora_steps),
        "--proportion_empty_prompts", "0.1",  # as the base was trained: the unconditional model learns the style too
        "--cache_latents",
        "--data_cache_dir", str(Path(args.out) / "cache"),
        "--seed", str(args.seed),
    ])  # fmt: skip
    pipe.load_lora_weights(str(run_dir / LORA_DIR))
    after = style_scores(generate(pipe, prompts, seeds, **settings), targets)
    grids["after"] = grid(pipe, STYLE_GRID_PROMPTS, args.grid_seeds, settings, beside(results, "lora_after.png"))
    return {
        "style": f"hollow {STYLE_SIZE} shapes, {OUTLINE_PX:g} px outlines, captions in the base grammar",
        "training": {"images": args.style_images, "steps": args.lora_steps, "batch_size": args.lora_batch,
                     "rank": args.lora_rank, "learning_rate": args.lora_lr, **timing},
        "adapter": weights_size([run_dir / LORA_DIR / LORA_WEIGHT_NAME]),
        "vae_round_trip_ceiling": ceiling,
        "before": before,
        "after": after,
        "grids": grids,
    }  # fmt: skip


# --- (b) DreamBooth of one subject -------------------------------------------------------------


def subject_scores(pipe, args, settings: dict) -> dict:
    """The subject's share of the instance- and class-prompt images; how many class-prompt images show the color
    and shape the class prompt names; the demo's adherence on the base model's own prompts."""
    num_images = args.subject_images
    seeds = [args.seed + i for i in range(num_images)]
    instance = generate(pipe, [args.instance_prompt] * num_images, seeds, **settings)
    class_ = generate(pipe, [args.class_prompt] * num_images, seeds, **settings)
    words = args.class_prompt.split()
    named = {"color": next(w for w in words if w in shapes.COLORS), "shape": next(w for w in words if w in shapes.SHAPES)}
    return {
        "instance_prompt_subject": sum(map(has_subject, instance)) / num_images,
        "class_prompt_subject": sum(map(has_subject, class_)) / num_images,
        "class_prompt_color_and_shape": adherence_scores([named] * num_images, class_)["color_and_shape"],
        "base_prompts": shapes_adherence(pipe, "train", num_prompts=args.num_prompts, seed=args.seed, **settings),
    }  # fmt: skip


def part_dreambooth(args, settings: dict, results: Path) -> dict:
    out = Path(args.out) / "dreambooth"
    pipe = load_base(args.base)
    resolution = default_image_size(pipe.vae, pipe.unet)
    instance_dir = out / "instance"
    instance_dir.mkdir(parents=True, exist_ok=True)
    for k in range(args.instance_images):
        render_subject(resolution, np.random.default_rng([args.seed, 3, k])).save(instance_dir / f"subject-{k}.png")

    before = subject_scores(pipe, args, settings)
    grids = {"prompts": [args.instance_prompt, args.class_prompt, *SUBJECT_GRID_PROMPTS]}
    grids["before"] = grid(pipe, grids["prompts"], args.grid_seeds, settings, beside(results, "dreambooth_before.png"))

    run_dir = out / "run"
    timing = run_training("DreamBooth (LoRA, prior preservation)", "train_dreambooth.py", run_dir, [
        "--pretrained_model_name_or_path", args.base,
        "--instance_data_dir", str(instance_dir),
        "--instance_prompt", args.instance_prompt,
        "--with_prior_preservation",
        "--class_prompt", args.class_prompt,
        "--class_data_dir", str(out / "class"),
        "--num_class_images", str(args.num_class_images),
        "--class_inference_steps", str(settings["num_inference_steps"]),
        "--sample_batch_size", "32",
        "--prior_loss_weight", "1.0",
        *(["--use_lora", "--rank", str(args.lora_rank)] if not args.dreambooth_full else []),
        *(["--train_text_encoder"] if args.dreambooth_train_text_encoder else []),
        "--learning_rate", str(args.dreambooth_lr),
        "--train_batch_size", str(args.dreambooth_batch),
        "--max_train_steps", str(args.dreambooth_steps),
        "--cache_latents",
        "--data_cache_dir", str(Path(args.out) / "cache"),
        "--seed", str(args.seed),
    ])  # fmt: skip
    if args.dreambooth_full:
        pipe = load_base(str(run_dir / PIPELINE_DIR))
        trained = ["unet"] + (["text_encoder"] if args.dreambooth_train_text_encoder else [])
        adapter = weights_size([f for name in trained for f in sorted((run_dir / PIPELINE_DIR / name).glob("*.safetensors"))])
    else:
        pipe.load_lora_weights(str(run_dir / LORA_DIR))
        adapter = weights_size([run_dir / LORA_DIR / LORA_WEIGHT_NAME])
    after = subject_scores(pipe, args, settings)
    grids["after"] = grid(pipe, grids["prompts"], args.grid_seeds, settings, beside(results, "dreambooth_after.png"))
    return {
        "subject": f"a red oval {SUBJECT_ASPECT:g} times as wide as tall, {args.instance_images} instance images",
        "instance_prompt": args.instance_prompt,
        "class_prompt": args.class_prompt,
        "training": {"steps": args.dreambooth_steps, "batch_size": args.dreambooth_batch,
                     "weights": "full" if args.dreambooth_full else f"LoRA rank {args.lora_rank}",
                     "text_encoder": "trained" if args.dreambooth_train_text_encoder else "frozen",
                     "learning_rate": args.dreambooth_lr, "class_images": args.num_class_images,
                     "prior_loss_weight": 1.0, **timing},
        "adapter": adapter,
        "images_per_prompt": args.subject_images,
        "before": before,
        "after": after,
        "grids": grids,
    }  # fmt: skip


# --- report ------------------------------------------------------------------------------------


def print_lora(r: dict) -> None:
    t = r["training"]
    print(f"\n(a) LoRA, hollow style: rank {t['rank']}, {t['steps']} steps x {t['batch_size']} of {t['images']} images")
    print(f"{'':<26} {'hollow':>7} {'circle':>7} {'square':>7} {'triangle':>8} {'color':>6} {'images':>6}")
    for name, s in (("VAE round trip (ceiling)", r["vae_round_trip_ceiling"]), ("base", r["before"]),
                    ("base + LoRA", r["after"])):  # fmt: skip
        per = [s["per_shape"].get(shape, {}).get("hollow", float("nan")) for shape in shapes.SHAPES]
        print(f"{name:<26} {s['hollow']:>7.0%} {per[0]:>7.0%} {per[1]:>7.0%} {per[2]:>8.0%} {s['color']:>6.0%} "
              f"{s['images']:>6}")  # fmt: skip
    print(f"adapter {r['adapter']['bytes']:,} bytes ({r['adapter']['parameters']:,} parameters); training "
          f"{t['train_seconds']:.0f} s; the script ran {t['wall_seconds']:.0f} s, with start-up and latent caching")


def print_dreambooth(r: dict) -> None:
    t = r["training"]
    print(f"\n(b) DreamBooth, {t['weights']}, text encoder {t['text_encoder']}, {t['steps']} steps x "
          f"({t['batch_size']} instance + {t['batch_size']} class), {t['class_images']} class images")  # fmt: skip
    print(f"images with the subject, on the instance prompt {r['instance_prompt']!r} and the class prompt "
          f"{r['class_prompt']!r}; the class prompt's color+shape; the base prompts' color+shape")
    print(f"{'':<20} {'subject|instance':>16} {'subject|class':>13} {'class':>6} {'base prompts':>12}")
    for name, s in (("base", r["before"]), ("base + DreamBooth", r["after"])):
        print(f"{name:<20} {s['instance_prompt_subject']:>16.0%} {s['class_prompt_subject']:>13.0%} "
              f"{s['class_prompt_color_and_shape']:>6.0%} {s['base_prompts']['color_and_shape']:>12.0%}")  # fmt: skip
    print(f"trained weights {r['adapter']['bytes']:,} bytes ({r['adapter']['parameters']:,} parameters); training "
          f"{t['train_seconds']:.0f} s; the script ran {t['wall_seconds']:.0f} s, with sampling the class images")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True,
                        help="a pipeline folder trained on shapes (latentdiff demo's ldm/pipeline)")
    parser.add_argument("--out", default="out/finetune_demo", help="work folder: data, training runs, caches")
    parser.add_argument("--results", default="benchmarks/results/finetune_demo.json",
                        help="the JSON; the grids go beside it, named after it (finetune_demo_lora_before.png, ...)")
    parser.add_argument("--part", choices=("lora", "dreambooth", "both"), default="both")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--inference_steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--num_prompts", type=int, default=36, help="training prompts measured (the demo's 36)")
    parser.add_argument("--images_per_prompt", type=int, default=2)
    parser.add_argument("--grid_seeds", type=int, default=6, help="columns of the grids")
    g = parser.add_argument_group("(a) LoRA")
    g.add_argument("--style_images", type=int, default=2000, help="hollow shapes to train on")
    g.add_argument("--ceiling_images", type=int, default=216, help="training images sent through the VAE")
    # long enough for the style to show (shorter runs: README, "Fine-tuning the demo's model")
    g.add_argument("--lora_steps", type=int, default=1000)
    g.add_argument("--lora_batch", type=int, default=32)
    g.add_argument("--lora_rank", type=int, default=4, help="rank of both adapters, (a) and (b)")
    g.add_argument("--lora_lr", type=float, default=1e-3)
    d = parser.add_argument_group("(b) DreamBooth")
    d.add_argument("--instance_images", type=int, default=5)
    d.add_argument("--instance_prompt", default="a large sks red circle in the center",
                   help="the class prompt with the rare identifier 'sks' before the class words")
    d.add_argument("--class_prompt", default="a large red circle in the center",
                   help="a prompt of the base grammar (it must name a color and a shape)")
    d.add_argument("--num_class_images", type=int, default=50)
    d.add_argument("--dreambooth_steps", type=int, default=400)
    d.add_argument("--dreambooth_batch", type=int, default=4, help="instance images per step (as many class images)")
    d.add_argument("--dreambooth_lr", type=float, default=2e-4)
    d.add_argument("--subject_images", type=int, default=32, help="images measured per instance and class prompt")
    d.add_argument("--dreambooth_full", action="store_true",
                   help="fine-tune every UNet weight instead of a LoRA (the adapter size is then the UNet's)")
    # the text encoder's LoRA is what teaches the identifier (README, "Fine-tuning the demo's model")
    d.add_argument("--dreambooth_train_text_encoder", action=argparse.BooleanOptionalAction, default=True,
                   help="train the text encoder too (a LoRA on it, or all of it with --dreambooth_full)")
    args = parser.parse_args()
    for flag in ("inference_steps", "num_prompts", "images_per_prompt", "grid_seeds", "style_images", "ceiling_images",
                 "lora_steps", "lora_batch", "lora_rank", "instance_images", "num_class_images", "dreambooth_steps",
                 "dreambooth_batch", "subject_images"):  # fmt: skip
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be a positive integer, got {getattr(args, flag)}")
    if not (Path(args.base) / "model_index.json").is_file():
        parser.error(f"--base {args.base!r} is not a pipeline folder (no model_index.json)")
    words = args.class_prompt.split()
    if not (set(words) & set(shapes.COLORS) and set(words) & set(shapes.SHAPES)):
        parser.error(f"--class_prompt {args.class_prompt!r} names no color or no shape of shapes' grammar")

    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    settings = dict(num_inference_steps=args.inference_steps, guidance_scale=args.guidance)

    base = load_base(args.base)
    checks = check_classifiers(default_image_size(base.vae, base.unet), args.seed)
    print(f"classifiers on real renders: is_hollow {checks['is_hollow']['accuracy']:.1%} of "
          f"{checks['is_hollow']['filled']} filled + {checks['is_hollow']['hollow']} hollow; has_subject "
          f"{checks['has_subject']['accuracy']:.1%} of {checks['has_subject']['subject']} subjects + "
          f"{checks['has_subject']['others']} other shapes", flush=True)  # fmt: skip
    result = {
        **result_header(shlex.join(["python", "benchmarks/demo_finetune.py", *sys.argv[1:]])),
        "base": str(args.base),
        "generation": {**settings, "scheduler": type(base.scheduler).__name__, "seed": args.seed},
        "classifier_checks": checks,
    }
    if args.part in ("lora", "both"):
        result["lora"] = part_lora(args, settings, results)
        print_lora(result["lora"])
    if args.part in ("dreambooth", "both"):
        result["dreambooth"] = part_dreambooth(args, settings, results)
        print_dreambooth(result["dreambooth"])
    write_result(results, result)


if __name__ == "__main__":
    main()
