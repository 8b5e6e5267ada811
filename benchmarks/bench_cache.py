"""Peak memory and time to the first batch of the latent cache as the dataset grows.

Synthetic latents of 4x64x64 (a 512 px image through an f=8 VAE), fp16 mean and std, one distinct
caption per item, written with the cache's own writer in shards of ``--shard_items`` (as that many
processes would have written them), at each of ``--sizes``. Each measurement runs in a fresh
process, with the shard files dropped from the page cache first (``posix_fadvise``), so every
start is cold:

- ``read``: :class:`latentdiff.data.cache.LatentCache`, items read from the shards on access;
- ``loaded``: every shard loaded into memory and concatenated, as the cache did before (only at
  the sizes whose tensors fit twice in the memory available now).

For each: time from opening the cache to the first batch of a shuffled DataLoader, the process's
peak RSS (VmHWM) then and after one full epoch, the largest DataLoader worker's peak RSS, and items/s
over the epoch.

    python benchmarks/bench_cache.py --sizes 10000 100000 --out benchmarks/results/cache.json

The synthetic files (6.6 GB at 100k items) go to a temporary folder under ``--dir`` and are deleted
at the end. About 3 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from results_file import result_header, write_result  # benchmarks/ is on sys.path when a script runs
from safetensors.torch import load_file
from torch.utils.data import Dataset

from latentdiff.data import build_dataloader
from latentdiff.data.cache import LatentCache, write_manifest, write_shard

LATENT_SHAPE = (4, 64, 64)
DTYPE = torch.float16


def item_bytes() -> int:
    return 2 * torch.Size(LATENT_SHAPE).numel() * DTYPE.itemsize  # mean and std


def write_cache(folder: Path, items: int, shard_items: int) -> None:
    generator = torch.Generator().manual_seed(0)
    starts = list(range(0, items, shard_items))
    names = [f"shard-{s:05d}-of-{len(starts):05d}.safetensors" for s in range(len(starts))]
    for name, start in zip(names, starts, strict=True):
        n = min(shard_items, items - start)
        tensors = {
            "latent_mean": torch.randn((n, 1, *LATENT_SHAPE), generator=generator).to(DTYPE),
            "latent_std": torch.rand((n, 1, *LATENT_SHAPE), generator=generator).to(DTYPE),
            "caption_offsets": torch.arange(n + 1, dtype=torch.long),
            "caption_ids": torch.arange(1, n + 1, dtype=torch.long),
        }
        write_shard(folder / name, tensors, ["", *(f"synthetic item {start + i}" for i in range(n))])
    write_manifest(folder, items, 1, names)


def drop_from_page_cache(folder: Path) -> None:
    for path in folder.iterdir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


class LoadedCache(Dataset):
    """The cache as it was: every shard's tensors loaded and concatenated in each process."""

    def __init__(self, folder: Path):
        manifest = json.loads((folder / "manifest.json").read_text())
        means, stds = [], []
        for name in manifest["shards"]:
            tensors = load_file(folder / name)
            means.append(tensors["latent_mean"])
            stds.append(tensors["latent_std"])
        self.latent_mean, self.latent_std = torch.cat(means), torch.cat(stds)  # (N, 1, C, h, w)

    def __len__(self) -> int:
        return len(self.latent_mean)

    def __getitem__(self, index: int) -> dict:
        return {"latent_mean": self.latent_mean[index, 0], "latent_std": self.latent_std[index, 0], "text": ""}


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def measure(folder: Path, mode: str, batch_size: int, workers: int) -> dict:
    """In a fresh process: open the cache, time the first batch, then read one epoch."""
    start = time.perf_counter()
    dataset = LatentCache.load(folder) if mode == "read" else LoadedCache(folder)
    batches = iter(build_dataloader(dataset, batch_size=batch_size, shuffle=True, seed=0, num_workers=workers))
    next(batches)
    first_batch_s = time.perf_counter() - start
    rss_first = peak_rss_mb()
    start, items = time.perf_counter(), 0
    for batch in batches:
        items += len(batch["latent_mean"])
    epoch_s = time.perf_counter() - start
    del batches  # joins the workers, whose peak then shows in RUSAGE_CHILDREN
    return {
        "first_batch_s": first_batch_s,
        "peak_rss_mb_first_batch": rss_first,
        "peak_rss_mb_epoch": peak_rss_mb(),
        "worker_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024 if workers else None,
        "items_per_s": items / epoch_s,
    }


def available_bytes() -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("MemAvailable")) * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--shard_items", type=int, default=10_000, help="items per shard file")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    parser.add_argument("--dir", default=None, help="where the synthetic caches are written (default: $TMPDIR)")
    parser.add_argument("--out", default="out/bench_cache.json")
    parser.add_argument("--measure", nargs=2, metavar=("FOLDER", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(Path(args.measure[0]), args.measure[1], args.batch_size, args.workers)))
        return

    need = sum(args.sizes) * item_bytes()
    root = Path(tempfile.mkdtemp(prefix="bench_cache-", dir=args.dir))
    free = shutil.disk_usage(root).free
    if need * 1.1 > free:
        shutil.rmtree(root)
        sys.exit(f"the caches of {args.sizes} items need {need / 1e9:.1f} GB and {root} has {free / 1e9:.1f} GB free: "
                 "give smaller --sizes or another --dir")
    rows = []
    try:
        for items in args.sizes:
            folder = root / str(items)
            start = time.perf_counter()
            write_cache(folder, items, args.shard_items)
            print(f"{items} items: wrote {items * item_bytes() / 1e9:.2f} GB in {time.perf_counter() - start:.0f} s")
            modes = ["read"]
            if 2 * items * item_bytes() + 2e9 < available_bytes():  # the shards and their concatenation
                modes.append("loaded")
            for mode in modes:
                drop_from_page_cache(folder)
                command = [sys.executable, __file__, "--measure", str(folder), mode,
                           "--batch_size", str(args.batch_size), "--workers", str(args.workers)]
                run = subprocess.run(command, capture_output=True, text=True, check=True)
                rows.append({"items": items, "cache": mode, "shards": len(list(folder.glob("shard-*"))),
                             "gb_on_disk": items * item_bytes() / 1e9, **json.loads(run.stdout.splitlines()[-1])})
                print(rows[-1])
            shutil.rmtree(folder)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    print(f"\n{'items':>8} {'cache':>7} {'first batch s':>14} {'peak MB, 1st batch':>19} {'peak MB, epoch':>15} "
          f"{'worker peak MB':>15} {'items/s':>8}")
    for r in rows:
        worker = f"{r['worker_peak_rss_mb']:.0f}" if r["worker_peak_rss_mb"] is not None else "-"
        print(f"{r['items']:>8} {r['cache']:>7} {r['first_batch_s']:>14.2f} {r['peak_rss_mb_first_batch']:>19.0f} "
              f"{r['peak_rss_mb_epoch']:>15.0f} {worker:>15} {r['items_per_s']:>8.0f}")
    write_result(args.out, {
        **result_header(" ".join(["python", "benchmarks/bench_cache.py", *sys.argv[1:]])),
        "latent_shape": list(LATENT_SHAPE), "dtype": str(DTYPE), "batch_size": args.batch_size,
        "workers": args.workers, "rows": rows,
    })


if __name__ == "__main__":
    main()
