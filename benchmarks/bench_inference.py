"""LatentDiffPipeline against diffusers' StableDiffusionPipeline on identical components.

Both pipelines share the same UNet, VAE, text encoder, tokenizer and scheduler objects; the runs
alternate in one process (so drift in machine load hits both alike) and the median of each is
compared. Also checks that the two produce the same images.

    python benchmarks/bench_inference.py --preset small --steps 25 --runs 7
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from results_file import result_header, write_result  # benchmarks/ is on sys.path when a script runs

from latentdiff import pipeline_from_preset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--batch", type=int, default=4, help="images per call")
    parser.add_argument("--runs", type=int, default=7, help="timed calls of each pipeline")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    parser.add_argument("--out", default="benchmarks/results/inference.json")
    args = parser.parse_args()

    ours = pipeline_from_preset(args.preset).to(args.device, getattr(torch, args.dtype))
    theirs = StableDiffusionPipeline(
        **ours.components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipes = {"latentdiff": ours, "diffusers": theirs}
    prompts = ["a small red circle in the top left"] * args.batch

    def call(pipe) -> tuple[float, np.ndarray]:
        generator = torch.Generator(args.device).manual_seed(0)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        images = pipe(prompts, num_inference_steps=args.steps, generator=generator, output_type="np").images
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start, images

    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)
        call(pipe)  # warm-up: allocator, kernels, lazy init
    times = {name: [] for name in pipes}
    outputs = {}
    for _ in range(args.runs):
        for name, pipe in pipes.items():
            seconds, outputs[name] = call(pipe)
            times[name].append(seconds)

    median = {name: statistics.median(t) for name, t in times.items()}
    result = {
        **result_header(f"python benchmarks/bench_inference.py --preset {args.preset} --steps {args.steps} "
                        f"--batch {args.batch} --runs {args.runs} --dtype {args.dtype}", args.device),
        "preset": args.preset,
        "dtype": args.dtype,
        "steps": args.steps,
        "batch": args.batch,
        "median_s": median,
        "all_s": times,
        "ratio_latentdiff_over_diffusers": median["latentdiff"] / median["diffusers"],
        "max_abs_image_difference": float(np.abs(outputs["latentdiff"] - outputs["diffusers"]).max()),
    }
    print(f"{'pipeline':<12} {'median s':>9}   ({args.preset} preset, batch {args.batch}, {args.steps} steps, "
          f"{args.runs} alternating runs, {args.device}, {args.dtype})")
    for name, seconds in median.items():
        print(f"{name:<12} {seconds:>9.3f}")
    print(f"ratio latentdiff / diffusers: {result['ratio_latentdiff_over_diffusers']:.3f}  "
          f"(max abs image difference {result['max_abs_image_difference']:.2e})")
    write_result(args.out, result)


if __name__ == "__main__":
    main()
