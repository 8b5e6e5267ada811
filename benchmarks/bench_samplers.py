"""Samplers against steps on a trained shapes model: the fewest steps at equal quality.

For DDPM, DDIM, DPM-Solver++ and Euler (each built from the pipeline's own scheduler config, so the
same training schedule) at 10, 20 and 50 steps: color-and-shape adherence on training prompts (the
demo's 72 images, guidance 7.5) and in-domain FID/KID between images generated from held-out
captions and the held-out real images (``latentdiff eval``'s feature net; compare FIDs only at the
same image count). Also the seconds each configuration took to sample.

    python benchmarks/bench_samplers.py out/demo/ldm/pipeline
"""

from __future__ import annotations

import argparse
import time

from results_file import result_header, write_result  # benchmarks/ is on sys.path when a script runs

from latentdiff import LatentDiffPipeline
from latentdiff.cli import SCHEDULERS, make_scheduler
from latentdiff.evaluation import DEFAULT_NUM_PROMPTS, distribution_distance, eval_splits, shapes_adherence
from latentdiff.features import load_features
from latentdiff.presets import default_image_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", help="a pipeline folder trained on shapes (latentdiff demo's ldm/pipeline)")
    parser.add_argument("--schedulers", nargs="+", choices=SCHEDULERS, default=list(SCHEDULERS))
    parser.add_argument("--steps", nargs="+", type=int, default=[10, 20, 50])
    parser.add_argument("--fid_images", type=int, default=64, help="images generated for FID/KID per configuration")
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--out", default="benchmarks/results/samplers.json")
    args = parser.parse_args()

    pipe = LatentDiffPipeline.from_pretrained(args.model_dir)
    pipe.set_progress_bar_config(disable=True)
    config = pipe.scheduler.config
    splits = eval_splits("shapes", default_image_size(pipe.vae, pipe.unet))
    features = load_features(splits["train"], "shapes")
    rows = []
    print(f"{'sampler':<12} {'steps':>5} {'color+shape':>11} {'color':>6} {'shape':>6} {'FID':>8} {'KID':>8} {'seconds':>8}")
    for name in args.schedulers:
        pipe.scheduler = make_scheduler(name, config)
        for steps in args.steps:
            settings = dict(num_inference_steps=steps, guidance_scale=args.guidance, seed=0)
            start = time.perf_counter()
            adherence = shapes_adherence(pipe, "train", num_prompts=DEFAULT_NUM_PROMPTS, **settings)
            distance = distribution_distance(pipe, splits["held_out"], features, args.fid_images, **settings)
            seconds = time.perf_counter() - start
            row = dict(sampler=name, steps=steps, color_and_shape=adherence["color_and_shape"],
                       color=adherence["color"], shape=adherence["shape"], position=adherence["position"],
                       fid=distance["fid"]["value"], kid=distance["kid"]["mean"], seconds=seconds)  # fmt: skip
            rows.append(row)
            print(f"{name:<12} {steps:>5} {row['color_and_shape']:>11.0%} {row['color']:>6.0%} {row['shape']:>6.0%} "
                  f"{row['fid']:>8.3f} {row['kid']:>8.4f} {seconds:>8.1f}", flush=True)  # fmt: skip
    write_result(args.out, {
        **result_header(f"python benchmarks/bench_samplers.py {args.model_dir} --fid_images {args.fid_images}"),
        "model": str(args.model_dir),
        "features": distance["fid"]["name"],
        "adherence_images": adherence["images"],
        "fid_images": args.fid_images,
        "rows": rows,
    })  # fmt: skip


if __name__ == "__main__":
    main()
