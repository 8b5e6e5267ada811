"""img2img and inpainting on the demo's text-to-image model, measured by the shapes analyzer.

Each task starts from a rendered shape (the dataset's own drawing) and asks for a change the analyzer can
read back, over several seeds (25 DDIM steps, guidance 7.5):

- img2img, strength 0.5 and 0.8: "a large red circle in the center" redrawn as a blue circle, a red
  square, ...: how often the result has the new attribute and keeps the rest;
- inpainting (the 4-channel method: the known region replaced by the source re-noised at each step): the
  center square of a large red circle masked and filled with "a large green triangle in the center".

Writes benchmarks/results/img2img_inpaint.json and a grid per task (rows: tasks; columns: source, mask,
then the seeds).

    python benchmarks/demo_img2img_inpaint.py --base out/demo/ldm/pipeline
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from results_file import result_header, write_result  # benchmarks/ is on sys.path when a script runs

from latentdiff import LatentDiffImg2ImgPipeline, LatentDiffInpaintPipeline, LatentDiffPipeline
from latentdiff.data.shapes import analyze, render_shape
from latentdiff.images import image_grid, save_png

RESULTS = Path(__file__).resolve().parent / "results"
SOURCE = ("red", "circle", "large", "center")
# (prompt, what the analyzer must read): one attribute changed each, the others kept
IMG2IMG = [
    ("a large blue circle in the center", {"color": "blue", "shape": "circle", "position": "center"}),
    ("a large red square in the center", {"color": "red", "shape": "square", "position": "center"}),
    ("a large red triangle in the center", {"color": "red", "shape": "triangle", "position": "center"}),
    ("a large yellow circle in the center", {"color": "yellow", "shape": "circle", "position": "center"}),
]
INPAINT = ("a large green triangle in the center", {"color": "green", "shape": "triangle", "position": "center"})


def center_mask(resolution: int) -> PIL.Image.Image:
    """White (fill in) over the middle half of each side, where the large centered shape lies."""
    mask = np.zeros((resolution, resolution), dtype=np.uint8)
    mask[resolution // 6 : resolution - resolution // 6, resolution // 6 : resolution - resolution // 6] = 255
    return PIL.Image.fromarray(mask, mode="L")


def hits(images, target: dict) -> list[bool]:
    return [all(analyze(image)[k] == v for k, v in target.items()) for image in images]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="a text-to-image pipeline folder trained on shapes")
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--strengths", type=float, nargs="+", default=[0.5, 0.8])
    parser.add_argument("--out", default=str(RESULTS / "img2img_inpaint.json"))
    args = parser.parse_args()

    pipe = LatentDiffPipeline.from_pretrained(args.base)
    pipe.set_progress_bar_config(disable=True)
    resolution = pipe.unet.config.sample_size * pipe.vae_scale_factor
    source = render_shape(*SOURCE, resolution=resolution)
    assert all(hits([source], {"color": "red", "shape": "circle", "position": "center"}))
    img2img, inpaint = LatentDiffImg2ImgPipeline.from_pipe(pipe), LatentDiffInpaintPipeline.from_pipe(pipe)
    common = dict(num_inference_steps=args.steps, guidance_scale=7.5, num_images_per_prompt=args.seeds)

    def generators():
        return [torch.Generator().manual_seed(seed) for seed in range(args.seeds)]

    results, rows = {"img2img": {}, "inpainting": {}}, []
    blank = PIL.Image.new("RGB", (resolution, resolution), "white")
    for strength in args.strengths:
        for prompt, target in IMG2IMG:
            images = img2img(prompt, image=source, strength=strength, generator=generators(), **common).images
            results["img2img"].setdefault(str(strength), {})[prompt] = float(np.mean(hits(images, target)))
            rows.append([source, blank, *images])
    mask = center_mask(resolution)
    inpaint_prompt, target = INPAINT
    images = inpaint(inpaint_prompt, image=source, mask_image=mask, generator=generators(), **common).images
    results["inpainting"][inpaint_prompt] = float(np.mean(hits(images, target)))
    outside = np.asarray(mask) == 0  # the known region must come back as it was (up to the VAE's round trip)
    results["inpainting_known_region_max_abs_error"] = float(max(
        np.abs(np.asarray(image, dtype=np.float32) - np.asarray(source, dtype=np.float32))[outside].max() / 255
        for image in images
    ))  # fmt: skip
    rows.append([source, mask.convert("RGB"), *images])

    grid = image_grid([image for row in rows for image in row], ncols=2 + args.seeds)
    grid_path = save_png(grid.resize((grid.width * 2, grid.height * 2), PIL.Image.NEAREST), RESULTS / "img2img_inpaint_grid.png")
    for strength, scores in results["img2img"].items():
        for prompt, score in scores.items():
            print(f"img2img strength {strength}: {prompt!r}: {score:.0%}")
    print(f"inpainting: {inpaint_prompt!r}: {results['inpainting'][inpaint_prompt]:.0%}; known region max abs error "
          f"{results['inpainting_known_region_max_abs_error']:.3f}")
    command = shlex.join(["python", "benchmarks/demo_img2img_inpaint.py", *sys.argv[1:]])
    write_result(args.out, {**result_header(command), "base": args.base, "seeds": args.seeds, "steps": args.steps,
                            "source": " ".join(SOURCE), "results": results, "grid": str(grid_path.name)})


if __name__ == "__main__":
    main()
