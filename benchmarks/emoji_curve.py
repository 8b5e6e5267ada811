"""`latentdiff eval` of every checkpoint of a text-to-image run that kept an EMA (--use_ema), as the demo runs:
the curve of caption retrieval and in-domain FID against training steps.

Each checkpoint-N's EMA weights (the UNet's averaged weights, what the run would export at step N) are copied
into the run's final pipeline, which gives the VAE, text encoder and scheduler, and the whole is evaluated as
``latentdiff eval PIPELINE --dataset DATASET --num_images N`` evaluates it. The last step is always
checkpointed, so the last row is the final pipeline's. One JSON line per step is appended to OUT.
``--save_pipelines`` also writes each checkpoint's pipeline to checkpoint-N/pipeline, as train_ldm's
--save_pipeline_at_checkpoints would have.

    python benchmarks/emoji_curve.py out/curve.jsonl out/demo/ldm --dataset emoji --num_images 64
    python benchmarks/emoji_curve.py out/curve.jsonl out/demo/ldm --after 3000   # the steps a continued run added
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from latentdiff import LatentDiffPipeline
from latentdiff.evaluation import evaluate
from latentdiff.training.checkpointing import checkpoint_state, list_checkpoints

EMA_FILE = "custom_checkpoint_0.pkl"  # accelerate's name for the first object registered for checkpointing


def load_ema_into(unet: torch.nn.Module, checkpoint: Path) -> None:
    """Copy the EMA's shadow weights of ``checkpoint`` (our own file, read as tensors only) into ``unet``."""
    state = torch.load(checkpoint / EMA_FILE, map_location="cpu", weights_only=True)
    shadow = state["shadow_params"]
    params = list(unet.parameters())
    if len(shadow) != len(params):
        raise ValueError(f"{checkpoint}: the EMA holds {len(shadow)} tensors, the UNet has {len(params)} parameters "
                         "(was the run trained with --use_ema on the UNet alone?)")
    with torch.no_grad():
        for param, average in zip(params, shadow, strict=True):
            param.copy_(average)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="JSON lines file to append to")
    parser.add_argument("run", help="a train_ldm output folder (checkpoints/ and pipeline/)")
    parser.add_argument("--dataset", default="emoji")
    parser.add_argument("--num_images", type=int, default=64)
    parser.add_argument("--every", type=int, default=1, help="evaluate every n-th checkpoint (and the last)")
    parser.add_argument("--save_pipelines", action="store_true", help="write each checkpoint's pipeline into it")
    parser.add_argument("--after", type=int, default=0, help="only checkpoints past this step (a continued run)")
    args = parser.parse_args()
    run = Path(args.run)
    checkpoints = [c for c in list_checkpoints(run) if int(c.name.rsplit("-", 1)[1]) > args.after]  # checkpoint-N
    if not checkpoints:
        parser.error(f"{run} has no checkpoint past step {args.after}")
    chosen = checkpoints[args.every - 1::args.every]
    pipe = LatentDiffPipeline.from_pretrained(run / "pipeline")  # each checkpoint's EMA replaces all UNet weights
    pipe.set_progress_bar_config(disable=True)
    for checkpoint in chosen + [c for c in checkpoints[-1:] if c not in chosen]:
        load_ema_into(pipe.unet, checkpoint)
        if args.save_pipelines:
            pipe.save_pretrained(checkpoint / "pipeline")
        results = evaluate(pipe, args.dataset, num_images=args.num_images)
        step = checkpoint_state(checkpoint)["global_step"]
        row = {"run": str(run), "step": step, "fid": round(results["fid"]["value"], 3),
               **{f"{k}_{split}": round(r[k], 3) for split, r in results["retrieval"].items() for k in ("top1", "top5")}}
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
