"""Shapes prompt adherence of every pipeline a train_ldm run wrote with --save_pipeline_at_checkpoints.

Each checkpoint-N/pipeline is scored on training prompts (the demo's 72 images: 36 prompts x 2 seeds,
25 DDIM steps, guidance 7.5), the final pipeline on held-out prompts too; one JSON line per pipeline
is appended to OUT. Used by benchmarks/sweep_demo.sh to chart adherence against training steps.

    python benchmarks/eval_checkpoints.py results.jsonl out/ldm
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from latentdiff import LatentDiffPipeline
from latentdiff.evaluation import DEFAULT_NUM_PROMPTS, shapes_adherence

KEYS = ("color", "shape", "position", "color_and_shape")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="JSON lines file to append to")
    parser.add_argument("run", help="a train_ldm output folder")
    args = parser.parse_args()
    run = Path(args.run)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    steps = sorted(run.glob("checkpoints/checkpoint-*/pipeline"), key=lambda p: int(p.parent.name.split("-")[1]))
    for folder in [*steps, run / "pipeline"]:
        if not (folder / "model_index.json").is_file():
            continue
        pipe = LatentDiffPipeline.from_pretrained(folder).to(device)
        pipe.set_progress_bar_config(disable=True)
        final = folder == run / "pipeline"
        row = {"run": run.name, "ckpt": "final" if final else folder.parent.name}
        for split in ("train", "held_out") if final else ("train",):
            scores = shapes_adherence(pipe, split, num_prompts=DEFAULT_NUM_PROMPTS, num_inference_steps=25,
                                      guidance_scale=7.5, seed=0, batch_size=72)  # fmt: skip
            row[split] = {k: round(scores[k], 3) for k in KEYS}
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
