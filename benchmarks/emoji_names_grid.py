"""Sixteen common emoji names through a pipeline: a grid a person can judge (issue 20, item 2).

Rows are the names (cat face, red apple, rocket, ...), columns seeds; beside each generated row, with
``--with_reference``, the emoji the name belongs to as the dataset renders it. Prints for every name
whether it is a training or a held-out caption of the emoji dataset (every 20th emoji is held out).

    python benchmarks/emoji_names_grid.py out/demo_emoji/ldm/pipeline --out benchmarks/results/emoji_names_grid.png
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from latentdiff.pipelines import LatentDiffPipeline
from PIL import Image

from latentdiff.data.emoji import VALIDATION_EVERY, load_emoji
from latentdiff.images import image_grid, save_png

NAMES = [
    "cat face", "dog face", "red apple", "banana", "pizza", "birthday cake", "rocket", "automobile",
    "sun", "snowman", "red heart", "star", "house", "christmas tree", "smiling face with sunglasses", "ghost",
]  # fmt: skip


def reference_images(resolution: int) -> dict[str, tuple[Image.Image, str]]:
    """Each name's emoji as the dataset renders it, and its split."""
    images, captions, _ = load_emoji(resolution)
    found = {}
    for row, names in enumerate(captions):
        for name in names:
            if name.lower() in NAMES and name.lower() not in found:
                split = "held out" if row % VALIDATION_EVERY == VALIDATION_EVERY - 1 else "training"
                found[name.lower()] = (Image.fromarray(np.asarray(images[row])), split)
    missing = [name for name in NAMES if name not in found]
    if missing:
        raise ValueError(f"no emoji is named {', '.join(map(repr, missing))}")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir")
    parser.add_argument("--out", required=True)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--with_reference", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--cell_size", type=int, default=64,
                        help="each image is shown this large, enlarged without smoothing (nearest pixel)")
    args = parser.parse_args()
    pipe = LatentDiffPipeline.from_pretrained(args.model_dir)
    pipe.set_progress_bar_config(disable=True)
    resolution = pipe.unet.config.sample_size * pipe.vae_scale_factor
    references = reference_images(resolution)
    cells = []
    for name in NAMES:
        images = pipe([name] * args.seeds, num_inference_steps=args.steps, guidance_scale=args.guidance,
                      generator=[torch.Generator().manual_seed(s) for s in range(args.seeds)]).images
        reference, split = references[name]
        print(f"{name}: {split} caption")
        row = [*images, reference] if args.with_reference else images
        cells += [image.resize((args.cell_size,) * 2, Image.NEAREST) for image in row]
    grid = image_grid(cells, ncols=args.seeds + int(args.with_reference))
    save_png(grid, args.out, {"names": ", ".join(NAMES), "resolution": f"{resolution} px, shown at {args.cell_size}",
                              "columns": f"seeds 0-{args.seeds - 1}"
                              + (", then the dataset's emoji" if args.with_reference else "")})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
