"""How reliably does the demo's VAE keep the palette? Train it at several learning rates and seeds, then
read each color back after a round trip.

    python benchmarks/sweep_vae.py --learning_rates 1e-3 2e-3 --seeds 0 1 2 --parallel 2 \\
        --jsonl benchmarks/results/vae_lr_sweep_cpu.jsonl
    python benchmarks/sweep_vae.py --learning_rates 1e-3 --seeds 0 1 2 3 --lr_schedulers constant cosine \\
        --parallel 4 --output_dir out/sweep_vae_2026-12-02 --jsonl benchmarks/results/vae_schedule_sweep_cpu.jsonl

Each run is the demo's VAE stage (training/train_vae.py on 8,000 shapes at 32 px, 1,500 steps of 8,
EMA weights) at one learning rate and seed, with OMP_NUM_THREADS=--threads (runs side by side when
--parallel > 1). Floating-point sums differ with the thread count, so the same seed at one and at two
threads are two different runs. A run whose folder already holds a finished VAE is not trained again,
only measured. Measured: held-out PSNR, and the round trip of all 360 held-out images (color, shape and
color+shape read back by the shapes analyzer, and the color per name: a VAE can lose one color while
the overall color score stays near 90%).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path

from diffusers import AutoencoderKL

from latentdiff.data import shapes
from latentdiff.evaluation import format_by_color, shapes_vae_round_trip

ROOT = Path(__file__).resolve().parents[1]


def train(run_dir: Path, learning_rate: str, seed: int, steps: int, threads: int, cache_dir: str,
          lr_scheduler: str = "constant") -> None:
    command = [
        sys.executable, str(ROOT / "training" / "train_vae.py"), "--output_dir", str(run_dir),
        "--resume_from_checkpoint", "latest", "--dataset_name", "shapes", "--resolution", "32",
        "--seed", str(seed), "--max_train_samples", "8000", "--max_train_steps", str(steps),
        "--learning_rate", learning_rate, "--use_ema", "--report_to", "none", "--data_cache_dir", cache_dir,
        "--lr_scheduler", lr_scheduler,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    log = run_dir.with_suffix(".log")
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        if subprocess.run(command, env=env, stdout=out, stderr=subprocess.STDOUT).returncode:
            raise RuntimeError(f"{' '.join(command)} failed; see {log}")


def measure(run_dir: Path) -> dict:
    vae = AutoencoderKL.from_pretrained(run_dir / "vae").eval()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {
        "psnr": metrics["psnr"], "steps": metrics["step"], "train_seconds": metrics["train_seconds"],
        # every held-out image (360)
        "round_trip": shapes_vae_round_trip(vae, 32, num_images=len(shapes.ShapesDataset(resolution=32, split="validation"))),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--learning_rates", nargs="+", default=["1e-3", "2e-3"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--lr_schedulers", nargs="+", default=["constant"], help="train_vae's --lr_scheduler")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each run")
    parser.add_argument("--parallel", type=int, default=2, help="runs side by side")
    parser.add_argument("--output_dir", default="out/sweep_vae")
    parser.add_argument("--jsonl", default=None, help="append one JSON line per run here")
    args = parser.parse_args()
    if args.steps < 1 or args.threads < 1 or args.parallel < 1:
        parser.error("--steps, --threads and --parallel must be >= 1")

    out = Path(args.output_dir)
    runs = [(lr, seed, schedule) for schedule in args.lr_schedulers for lr in args.learning_rates for seed in args.seeds]
    # the constant schedule keeps the folder names of earlier sweeps
    run_dir = {run: out / (f"lr{run[0]}_seed{run[1]}_threads{args.threads}" + ("" if run[2] == "constant" else f"_{run[2]}"))
               for run in runs}
    todo = [run for run in runs if not (run_dir[run] / "vae" / "config.json").is_file()]
    with ThreadPoolExecutor(args.parallel) as pool:
        for future in [pool.submit(train, run_dir[r], r[0], r[1], args.steps, args.threads, str(out / "cache"), r[2])
                       for r in todo]:
            future.result()

    print(f"{'schedule':>9} {'lr':>6} {'seed':>4} {'PSNR':>6} {'color':>6} {'c+shape':>7}  color by name")
    for lr, seed, schedule in runs:
        row = {"learning_rate": float(lr), "seed": seed, "threads": args.threads, "lr_scheduler": schedule,
               "date": date.today().isoformat(), **measure(run_dir[lr, seed, schedule])}
        r = row["round_trip"]
        print(f"{schedule:>9} {lr:>6} {seed:>4} {row['psnr']:>6.2f} {r['color']:>6.1%} {r['color_and_shape']:>7.1%}  "
              f"{format_by_color(r['color_by_name'])}")
        if args.jsonl:
            with open(args.jsonl, "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
