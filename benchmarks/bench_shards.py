"""Training-loader throughput from tar shards (``latentdiff prepare``) against the folder they were made from.

``--items`` JPEG photos (``--size`` px, smooth gradients with noise, ~quality 90) with .txt captions are
written to a temporary folder, then shards of them with ``latentdiff prepare``. For each source and each of
``--workers``, with the files dropped from the page cache first (``posix_fadvise``):

- ``build_s``: building the dataset (the folder's index opens every image's header; the shards' reads
  index.json);
- ``epoch_items_per_s``: one epoch of ``build_dataloader`` at ``--resolution``, batch ``--batch_size``;
- for the shards, ``resume_first_batch_s``: the first batch of an epoch resumed half-way
  (``ShardLoader.resumed``: the skipped half read and shuffled, not decoded), beside ``decoded_skip_s``,
  the same half skipped by decoding its batches (what accelerate's ``skip_first_batches`` does for a stream).

    python benchmarks/bench_shards.py --out benchmarks/results/shards.json

About a minute and a half on 2 CPU cores. There decoding dominates, and the two sources stream at the same
rate within the run-to-run noise of a shared machine (shards/folder 0.9-1.5x over two runs); shards pay off
where opening many small files is slow (network disks, object stores), which this does not measure. What
holds across runs: building the dataset reads one index instead of every image header (under 0.01 s against
0.5-1.1 s at 1,000 items, growing with them), and a resumed epoch reaches its first batch 5-6x sooner than
by decoding the skipped half.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from results_file import result_header, write_result  # benchmarks/ is on sys.path when a script runs

from latentdiff.data.loaders import build_dataloader, build_dataset
from latentdiff.data.prepare import build_parser, prepare


def write_photos(folder: Path, items: int, size: int) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    y, x = np.mgrid[0:size, 0:size] / size
    for i in range(items):
        color = rng.random((3, 1, 1))
        pixels = (color * x + (1 - color) * y) * 255 + rng.normal(0, 8, (3, size, size))  # (3, S, S)
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8).transpose(1, 2, 0))  # (S, S, 3)
        image.save(folder / f"photo{i:05d}.jpg", quality=90)
        (folder / f"photo{i:05d}.txt").write_text(f"a photo of color {color.ravel().round(2).tolist()}")


def drop_page_cache(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)


def measure(source: Path, args, workers: int) -> dict:
    drop_page_cache(source)
    data_args = argparse.Namespace(train_data_dir=str(source), resolution=args.resolution, seed=0)
    start = time.perf_counter()
    dataset = build_dataset(data_args, "train")
    built = time.perf_counter() - start
    loader = build_dataloader(dataset, args.batch_size, num_workers=workers)  # not prepared: one process
    start = time.perf_counter()
    items = sum(len(batch["text"]) for batch in loader)
    epoch = time.perf_counter() - start
    result = {"workers": workers, "items": items, "build_s": round(built, 3), "epoch_items_per_s": round(items / epoch, 1)}
    if hasattr(loader, "resumed"):
        half = len(loader) // 2
        for key, batches, take in (("resume_first_batch_s", loader.resumed, 1), ("decoded_skip_s", None, half + 1)):
            drop_page_cache(source)
            loader.set_epoch(0)
            start = time.perf_counter()
            iterator = iter(batches(half) if batches else loader)
            for _ in range(take):
                next(iterator)
            result[key] = round(time.perf_counter() - start, 3)
            if hasattr(iterator, "close"):  # the resumed generator: stop its workers now
                iterator.close()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=1000)
    parser.add_argument("--size", type=int, default=384, help="side of the JPEG photos written")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--dir", default=None, help="where the temporary photos and shards go")
    parser.add_argument("--out", default="benchmarks/results/shards.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        photos, shards = Path(tmp) / "photos", Path(tmp) / "shards"
        write_photos(photos, args.items, args.size)
        start = time.perf_counter()
        prepare(build_parser().parse_args([str(photos), str(shards), "--shard_size", "100MB"]))
        prepare_s = time.perf_counter() - start
        rows = [{"source": name, **measure(path, args, w)} for w in args.workers for name, path in
                (("folder", photos), ("shards", shards))]  # fmt: skip
        megabytes = sum(p.stat().st_size for p in shards.glob("*.tar")) / 2**20
    for row in rows:
        print(row)
    ratios = {f"workers_{w}": round(s["epoch_items_per_s"] / f["epoch_items_per_s"], 2)
              for w in args.workers for f, s in [[r for r in rows if r["workers"] == w]]}  # fmt: skip
    write_result(args.out, {
        **result_header(" ".join(["python", "benchmarks/bench_shards.py", *sys.argv[1:]])),
        "items": args.items, "photo_px": args.size, "resolution": args.resolution, "batch_size": args.batch_size,
        "prepare_s": round(prepare_s, 2), "shards_mb": round(megabytes, 1), "rows": rows,
        "shards_over_folder_items_per_s": ratios,
    })  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
