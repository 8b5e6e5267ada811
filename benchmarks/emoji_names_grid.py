"""Sixteen common emoji names through a pipeline: a grid a person can judge (issue 20, item 2).

Rows are the names (cat face, red apple, rocket, ...), columns seeds; beside each generated row, with
``--with_reference``, the emoji the name belongs to as the dataset renders it, in each of ``--styles``
(noto, emojione). Prints for every name whether it is a training or a held-out caption of the emoji
dataset (every 20th emoji is held out). ``none`` for the model draws the references alone, a row per style.

    python benchmarks/emoji_names_grid.py out/demo_emoji/ldm/pipeline --out benchmarks/results/emoji_names_grid.png
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from latentdiff.pipelines import LatentDiffPipeline
from PIL import Image

from latentdiff.cli import SCHEDULERS, make_scheduler
from latentdiff.data.emoji import VALIDATION_EVERY, load_emoji
from latentdiff.images import image_grid, save_png

NAMES = [
    "cat face", "dog face", "red apple", "banana", "pizza", "birthday cake", "rocket", "automobile",
    "sun", "snowman", "red heart", "star", "house", "christmas tree", "smiling face with sunglasses", "ghost",
]  # fmt: skip


def reference_images(resolution: int, style: str = "noto") -> dict[str, tuple[Image.Image, str]]:
    """Each name's emoji as the dataset of ``style`` renders it, and its split there."""
    images, captions, _ = load_emoji(resolution, style=style)
    found = {}
    for row, names in enumerate(captions):
        for name in names:
            if name.lower() in NAMES and name.lower() not in found:
                split = "held out" if row % VALIDATION_EVERY == VALIDATION_EVERY - 1 else "training"
                found[name.lower()] = (Image.fromarray(np.asarray(images[row])), split)
    missing = [name for name in NAMES if name not in found]
    if missing:
        raise ValueError(f"no {style} emoji is named {', '.join(map(repr, missing))}")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir")
    parser.add_argument("--out", required=True)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--scheduler", choices=SCHEDULERS, help="default: the pipeline's own")
    parser.add_argument("--with_reference", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--styles", nargs="+", choices=("noto", "emojione"), default=["noto"],
                        help="the reference columns: each name's emoji in these styles")
    parser.add_argument("--resolution", type=int, default=32, help="the references' size with --model_dir none")
    parser.add_argument("--cell_size", type=int, default=64,
                        help="each image is shown this large, enlarged without smoothing (nearest pixel)")
    args = parser.parse_args()
    pipe = None if args.model_dir == "none" else LatentDiffPipeline.from_pretrained(args.model_dir)
    seeds = 0 if pipe is None else args.seeds
    if pipe is not None:
        pipe.set_progress_bar_config(disable=True)
        if args.scheduler:
            pipe.scheduler = make_scheduler(args.scheduler, pipe.scheduler.config)
    resolution = args.resolution if pipe is None else pipe.unet.config.sample_size * pipe.vae_scale_factor
    references = [reference_images(resolution, style) for style in args.styles]
    cells = []
    for name in NAMES:
        images = [] if pipe is None else pipe(
            [name] * seeds, num_inference_steps=args.steps, guidance_scale=args.guidance,
            generator=[torch.Generator().manual_seed(s) for s in range(seeds)]).images
        print(f"{name}: {references[0][name][1]} caption")
        row = [*images, *(found[name][0] for found in references)] if args.with_reference or pipe is None else images
        cells += [image.resize((args.cell_size,) * 2, Image.NEAREST) for image in row]
    columns = len(cells) // len(NAMES)
    if pipe is None:  # a row per style, the names across
        cells, columns = [cells[i * columns + j] for j in range(columns) for i in range(len(NAMES))], len(NAMES)
    grid = image_grid(cells, ncols=columns)
    save_png(grid, args.out, {"names": ", ".join(NAMES), "resolution": f"{resolution} px, shown at {args.cell_size}",
                              "columns": f"the names; rows: {', '.join(args.styles)}" if pipe is None else
                              f"seeds 0-{seeds - 1}" + (f", then the dataset's emoji in {' and '.join(args.styles)}"
                                                        if args.with_reference else "")})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
