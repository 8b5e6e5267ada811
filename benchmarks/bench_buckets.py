"""Aspect-ratio buckets on real photographs (scikit-image's): how much of each photo training sees, and whether
the loader keeps up with the training step it feeds.

1. Pixels kept: for every RGB photograph scikit-image ships, the share of the photo that survives the cut to
   its bucket (``--enable_bucket``, sd-scripts' default buckets at ``--resolution 512``) against the center
   square (no buckets). The cut is computed by the training code itself (``transforms.crop_box``).
2. Throughput: a folder of those photos (each copied ``--copies`` times), and the tar shards
   ``latentdiff prepare`` makes of it, read by ``build_dataset`` with buckets at 512 px and batched by the
   bucket sampler, with 0 and 2 loader workers, images/s over ``--batches`` batches; against the training step it feeds: forward + backward + AdamW of the ``--preset``
   UNet on the first ``--step_batches`` of those batches' latents (f = the preset VAE's factor), images/s, measured in the same run.
   A ratio above 1 means the loader is not what limits training.

    python benchmarks/bench_buckets.py --out benchmarks/results/buckets.json

About 3 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import skimage.data
import torch
from PIL import Image
from results_file import result_header, write_result  # benchmarks/ is on sys.path when a script runs

from latentdiff.cli import main as cli
from latentdiff.data import add_data_args, build_dataloader, build_dataset
from latentdiff.data.buckets import BucketSpec, nearest
from latentdiff.data.transforms import crop_box, exif_upright
from latentdiff.presets import text_encoder_from_preset, unet_from_preset, vae_from_preset, vae_scale_factor

PHOTOS = Path(os.path.dirname(skimage.data.__file__))


def photographs() -> list[Path]:
    """scikit-image's colour photographs (not its test patterns, masks or greyscale scans)."""
    names = ["astronaut.png", "chelsea.png", "coffee.png", "motorcycle_left.png", "rocket.jpg", "retina.jpg",
             "hubble_deep_field.jpg", "color.png", "ihc.png", "horse.png", "logo.png"]  # fmt: skip
    return [PHOTOS / n for n in names if (PHOTOS / n).is_file()]


def kept_share(size: tuple[int, int], target: tuple[int, int]) -> float:
    """The share of a ``size`` photo left after resizing it to cover ``target`` and cutting ``target`` out."""
    resized, box = crop_box(size, target)
    return (box[2] - box[0]) * (box[3] - box[1]) / (resized[0] * resized[1])


def pixels_kept(resolution: int) -> list[dict]:
    buckets = BucketSpec(resolution).sizes()
    rows = []
    for path in photographs():
        size = exif_upright(Image.open(path)).size
        bucket = nearest(size, buckets)
        rows.append({"photo": path.name, "size": f"{size[0]}x{size[1]}", "bucket": f"{bucket[0]}x{bucket[1]}",
                     "kept_bucket": round(kept_share(size, bucket), 3),
                     "kept_center_square": round(kept_share(size, (resolution, resolution)), 3)})
    return rows


def photo_folder(root: Path, copies: int) -> Path:
    root = root / "photos"
    root.mkdir()
    for path in photographs():
        for c in range(copies):
            shutil.copy(path, root / f"{path.stem}-{c}{path.suffix}")
            (root / f"{path.stem}-{c}.txt").write_text(f"a photo, {path.stem}")
    return root


def loader_rate(args, folder: Path, workers: int) -> tuple[float, list]:
    parser = add_data_args(argparse.ArgumentParser())
    flags = parser.parse_args(["--train_data_dir", str(folder), "--enable_bucket", "--resolution", str(args.resolution),
                               "--dataloader_num_workers", str(workers)])  # fmt: skip
    dataset = build_dataset(flags)
    loader = build_dataloader(dataset, args.batch_size, seed=0, num_workers=workers)
    batches, start = [], time.perf_counter()
    for batch in loader:
        batches.append(batch["pixel_values"].shape)
        if len(batches) == args.batches:
            break
    return sum(s[0] for s in batches) / (time.perf_counter() - start), batches


def step_rate(args, shapes: list) -> float:
    torch.manual_seed(0)
    unet, factor = unet_from_preset(args.preset).train(), vae_scale_factor(vae_from_preset(args.preset))
    states = text_encoder_from_preset(args.preset).config.hidden_size
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    images, start = 0, time.perf_counter()
    for shape in shapes:
        b, _, h, w = shape
        latents = torch.randn(b, unet.config.in_channels, h // factor, w // factor)
        loss = unet(latents, torch.randint(0, 1000, (b,)), encoder_hidden_states=torch.randn(b, 77, states)).sample.square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        images += b
    return images / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--copies", type=int, default=6)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--step_batches", type=int, default=2, help="training steps timed (a 512 px step is slow on a CPU)")
    parser.add_argument("--out", default="benchmarks/results/buckets.json")
    args = parser.parse_args()

    kept = pixels_kept(args.resolution)
    for row in kept:
        print(row)
    with tempfile.TemporaryDirectory() as tmp:
        folder = photo_folder(Path(tmp), args.copies)
        shards = Path(tmp) / "shards"
        assert cli(["prepare", str(folder), str(shards), "--shard_size", "16"]) == 0
        loaders = {}
        for source, path in (("folder", folder), ("shards", shards)):
            for workers in (0, 2):
                rate, shapes = loader_rate(args, path, workers)
                loaders[f"{source}, {workers} workers"] = round(rate, 2)
                print(f"loader from the {source}, {workers} workers: {rate:.2f} images/s")
    step = step_rate(args, shapes[: args.step_batches])
    print(f"training step ({args.preset} UNet): {step:.2f} images/s")
    write_result(args.out, {
        **result_header(f"python benchmarks/bench_buckets.py --resolution {args.resolution} --batch_size "
                        f"{args.batch_size} --batches {args.batches} --copies {args.copies} --preset {args.preset} "
                        f"--step_batches {args.step_batches}"),
        "pixels_kept": kept,
        "mean_kept_bucket": round(float(np.mean([r["kept_bucket"] for r in kept])), 3),
        "mean_kept_center_square": round(float(np.mean([r["kept_center_square"] for r in kept])), 3),
        "loader_images_per_s": loaders,
        "train_step_images_per_s": round(step, 2),
        "loader_over_step": {w: round(r / step, 2) for w, r in loaders.items()},
        "batch_shapes": [list(s) for s in shapes],
    })  # fmt: skip


if __name__ == "__main__":
    main()
