"""When does the demo's VAE learn its palette? Train its stage longer, with checkpoints, and read each color back
after a round trip at every checkpoint (raw weights) and at the end (EMA weights).

    python benchmarks/vae_color_curve.py --steps 3000 --seeds 0 1 2 3 --parallel 4 \\
        --output_dir out/vae_color_curve --jsonl benchmarks/results/vae_steps_curve_cpu.jsonl

Levers: ``--variants "name|flags" ...`` adds each variant's train_vae.py flags to the base ones (one run per seed
each; "demo|" is the base alone), e.g. ``--variants "l1w0.1|--l1_weight 0.1" "lat8|--latent_channels 8"``.

Each run is training/train_vae.py as the demo ran it before issue 20's fix (shapes 32 px, 8,000 images, batch 8, lr
1e-3 constant, --use_ema, train_vae's L1 + L2; the demo now adds --l1_weight 0.1, a variant here) to --steps, with a
checkpoint every --every steps (all kept), OMP_NUM_THREADS=--threads, --parallel runs side by side. A run whose folder holds a finished VAE is only measured. Each checkpoint's model.safetensors (the raw
weights) and the exported EMA VAE are read back on all 360 held-out images by the shapes analyzer.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from diffusers import AutoencoderKL
from safetensors.torch import load_file

from latentdiff.evaluation import format_by_color, shapes_vae_round_trip

ROOT = Path(__file__).resolve().parents[1]
HELD_OUT = 360


def train(run: Path, seed: int, flags: list[str], args) -> None:
    if (run / "vae" / "config.json").is_file():
        return
    command = [
        sys.executable, str(ROOT / "training" / "train_vae.py"), "--output_dir", str(run), "--dataset_name", "shapes",
        "--resolution", "32", "--seed", str(seed), "--max_train_samples", "8000", "--max_train_steps", str(args.steps),
        "--learning_rate", "1e-3", "--use_ema", "--report_to", "none", "--data_cache_dir", str(Path(args.output_dir) / "cache"),
        "--checkpointing_steps", str(args.every), "--checkpoints_total_limit", str(args.steps // args.every + 1),
        "--resume_from_checkpoint", "latest", *flags,
    ]  # fmt: skip
    run.parent.mkdir(parents=True, exist_ok=True)
    log_path = run.parent / f"{run.name}.log"  # not with_suffix: a variant's name may hold a dot (l1w0.1)
    with open(log_path, "w") as log:
        if subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)}, stdout=log,
                          stderr=subprocess.STDOUT).returncode:  # fmt: skip
            raise RuntimeError(f"{' '.join(command)} failed; see {log_path}")


def measure(run: Path, seed: int, variant: str) -> list[dict]:
    vae = AutoencoderKL.from_pretrained(run / "vae").eval()
    metrics = json.loads((run / "metrics.json").read_text())
    rows = [{"variant": variant, "seed": seed, "step": metrics["step"], "weights": "ema", "psnr": metrics["psnr"],
             **shapes_vae_round_trip(vae, 32, num_images=HELD_OUT)}]  # fmt: skip
    for checkpoint in sorted(run.glob("checkpoints/checkpoint-*"), key=lambda p: int(p.name.rsplit("-", 1)[1])):
        weights = load_file(checkpoint / "model.safetensors")
        vae.load_state_dict({k[len("vae."):]: v for k, v in weights.items() if k.startswith("vae.")})
        rows.append({"variant": variant, "seed": seed, "step": int(checkpoint.name.rsplit("-", 1)[1]), "weights": "raw",
                     **shapes_vae_round_trip(vae, 32, num_images=HELD_OUT)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--every", type=int, default=500, help="steps between checkpoints")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--output_dir", default="out/vae_color_curve")
    parser.add_argument("--variants", nargs="+", default=["demo|"], metavar="NAME|FLAGS",
                        help="train_vae.py flags added to the demo's, one run per seed each (default: the demo's own)")
    parser.add_argument("--jsonl", default=None, help="write one JSON line per (seed, checkpoint) here")
    args = parser.parse_args()
    variants = dict(v.split("|", 1) for v in args.variants)
    runs = {(name, seed): Path(args.output_dir) / (f"seed{seed}" if name == "demo" else f"{name}_seed{seed}")
            for name in variants for seed in args.seeds}  # fmt: skip
    with ThreadPoolExecutor(args.parallel) as pool:
        futures = [pool.submit(train, run, seed, variants[name].split(), args) for (name, seed), run in runs.items()]
        for future in futures:
            future.result()
    rows = [row for (name, seed), run in runs.items() for row in measure(run, seed, name)]
    for row in sorted(rows, key=lambda r: (r["variant"], r["seed"], r["step"], r["weights"])):
        print(f"{row['variant']} seed {row['seed']} step {row['step']:>5} {row['weights']:>3}: color {row['color']:.1%}, "
              f"color+shape {row['color_and_shape']:.1%}  {format_by_color(row['color_by_name'])}")
    if args.jsonl:
        Path(args.jsonl).write_text("".join(json.dumps(row) + "\n" for row in rows))


if __name__ == "__main__":
    main()
