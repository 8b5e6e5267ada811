"""Data-loading speed: samples/s of the built-in datasets, and time to the first batch with a
cold and a warm latent cache.

    python benchmarks/bench_data.py [--seconds 5] [--vae tiny] [--cache_items 1024] [--out out/bench_data.json]

Prints a table and writes the numbers as JSON. Runs in about a minute on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
from results_file import write_result  # benchmarks/ is on sys.path when a script runs

from latentdiff.data import EmojiDataset, ShapesDataset, build_dataloader, cache_latents
from latentdiff.presets import vae_from_preset


def throughput(dataset, batch_size: int, num_workers: int, seconds: float) -> dict:
    """Samples/s over ``seconds`` after the first batch, and how long that first batch took."""
    start = time.perf_counter()
    loader = build_dataloader(dataset, batch_size=batch_size, shuffle=True, seed=0, num_workers=num_workers)
    batches = iter(loader)
    next(batches)
    first = time.perf_counter() - start
    samples, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        try:
            samples += len(next(batches)["text"])
        except StopIteration:
            batches = iter(loader)
    elapsed = time.perf_counter() - start
    del batches, loader
    return {"samples_per_s": samples / elapsed, "first_batch_s": first}


def first_batch_from_cache(dataset, vae, cache_dir: Path, batch_size: int) -> float:
    start = time.perf_counter()
    cached = cache_latents(dataset, vae, cache_dir=cache_dir, batch_size=batch_size)
    next(iter(build_dataloader(cached, batch_size=batch_size, seed=0)))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0, help="how long to measure each loader")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--vae", default="tiny", help="VAE preset for the latent cache (tiny, small)")
    parser.add_argument("--cache_items", type=int, default=1024, help="shapes items to encode into the cache")
    parser.add_argument("--data_cache_dir", default=None, help="where emoji are rendered (default: the user cache)")
    parser.add_argument("--out", default="out/bench_data.json")
    args = parser.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))

    rows = []
    emoji_start = time.perf_counter()
    emoji = EmojiDataset(64, "train", cache_dir=args.data_cache_dir)
    emoji_load = time.perf_counter() - emoji_start
    for name, dataset in (("shapes 32px", ShapesDataset(32, "train")), ("emoji 64px", emoji)):
        for workers in (0, 2):
            result = throughput(dataset, args.batch_size, workers, args.seconds)
            rows.append({"loader": name, "workers": workers, **result})

    vae = vae_from_preset(args.vae).eval()
    subset = ShapesDataset(32, "train").subset(range(args.cache_items))
    with tempfile.TemporaryDirectory() as cache_dir:
        cold = first_batch_from_cache(subset, vae, Path(cache_dir), args.batch_size)
        warm = first_batch_from_cache(subset, vae, Path(cache_dir), args.batch_size)

    print(f"{'loader':<14}{'workers':>8}{'samples/s':>12}{'first batch s':>15}")
    for row in rows:
        print(f"{row['loader']:<14}{row['workers']:>8}{row['samples_per_s']:>12.0f}{row['first_batch_s']:>15.2f}")
    print(f"\nemoji dataset ready in {emoji_load:.2f} s (rendered now if this is the first run, else read from the cache)")
    print(f"latent cache, {args.cache_items} shapes at 32 px, VAE {args.vae!r}: first batch "
          f"cold {cold:.2f} s, warm {warm:.2f} s")

    results = {
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
                    "torch": torch.__version__},
        "loaders": rows,
        "emoji_ready_s": emoji_load,
        "latent_cache": {"vae": args.vae, "items": args.cache_items, "resolution": 32,
                         "first_batch_cold_s": cold, "first_batch_warm_s": warm},
    }
    write_result(args.out, results)


if __name__ == "__main__":
    main()
