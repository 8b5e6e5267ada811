"""Train the VAE with the default CPU configuration for a time budget; report held-out quality.

    python benchmarks/bench_vae.py --minutes 20                       # shapes at 32 px, then emoji at 64 px
    python benchmarks/bench_vae.py --minutes 3 --datasets shapes -- --learning_rate 1e-3

Each dataset gets its own run of training/train_vae.py (its defaults, the dataset's native resolution,
stopped by --max_train_minutes) and the table gives held-out PSNR / SSIM / KL, the measured
scaling factor, steps and throughput, against the targets of issue #4 (on 2 CPU cores in 20 minutes:
shapes 32 px >= 30 dB, emoji 64 px >= 26 dB). Results also go to <output_dir>/bench_vae.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET_PSNR = {"shapes": 30.0, "emoji": 26.0}
COLUMNS = ("dataset", "px", "minutes", "steps", "img/s", "PSNR dB", "SSIM", "KL nats", "scaling", "target dB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=20.0, help="Training time per dataset.")
    parser.add_argument("--datasets", nargs="+", default=["shapes", "emoji"], choices=sorted(TARGET_PSNR))
    parser.add_argument("--output_dir", type=str, default="runs/bench_vae")
    parser.add_argument("extra", nargs="*", help="Flags passed on to train_vae.py (after --).")
    args = parser.parse_args()
    if args.minutes <= 0:
        parser.error(f"--minutes must be > 0, got {args.minutes}")

    rows = []
    for dataset in args.datasets:
        run_dir = Path(args.output_dir) / dataset
        command = [
            sys.executable, str(ROOT / "training" / "train_vae.py"), "--output_dir", str(run_dir),
            "--dataset_name", dataset, "--max_train_steps", "1000000", "--max_train_minutes", str(args.minutes),
            "--checkpointing_steps", "1000000", "--report_to", "none", *args.extra,
        ]
        print("$", " ".join(command), flush=True)
        started, load = time.time(), os.getloadavg()[0]
        subprocess.run(command, check=True)
        metrics = json.loads((run_dir / "metrics.json").read_text())
        rows.append({
            "dataset": dataset,
            "px": metrics["resolution"],
            "minutes": metrics["train_seconds"] / 60,
            "steps": metrics["step"],
            "img/s": metrics["images_per_second"],
            "PSNR dB": metrics["psnr"],
            "SSIM": metrics["ssim"],
            "KL nats": metrics["kl"],
            "scaling": metrics["scaling_factor"],
            "target dB": TARGET_PSNR[dataset],
            "wall_minutes": (time.time() - started) / 60,
            "load_average_at_start": load,
            "extra_flags": args.extra,
        })

    print("\n| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS))
    for row in rows:
        print("| " + " | ".join(_format(row[c]) for c in COLUMNS) + " |")
    out = Path(args.output_dir) / "bench_vae.json"
    out.write_text(json.dumps(rows, indent=2) + "\n")
    print(f"\nwritten {out}")


def _format(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


if __name__ == "__main__":
    main()
