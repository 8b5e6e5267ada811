"""Training-step time of UNet presets at one latent size, measured in one run, in alternating order.

One step is forward, backward and AdamW on a batch of random latents and text states, as train_ldm.py
trains with a frozen text encoder and cached latents (the text states of MiniLM: 77 x 384 by default).
Prints every timed step of every preset and each preset's median against the first preset's.

    python benchmarks/unet_preset_speed.py --presets small small64 --latent_size 16 --out benchmarks/results/unet_preset_speed.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from latentdiff.presets import unet_from_preset


def step_seconds(unet, optimizer, batch: dict) -> float:
    start = time.perf_counter()
    loss = unet(batch["latents"], batch["timesteps"], batch["states"]).sample.pow(2).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["small", "small64"])
    parser.add_argument("--latent_size", type=int, default=16, help="16: 64 px images through an f=4 VAE")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=77)
    parser.add_argument("--hidden_size", type=int, default=384, help="the text states' width (MiniLM: 384)")
    parser.add_argument("--rounds", type=int, default=4, help="timed steps of each preset, taken in turn")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    batch = {
        "latents": torch.randn(args.batch_size, 4, args.latent_size, args.latent_size, generator=generator),
        "timesteps": torch.randint(0, 1000, (args.batch_size,), generator=generator),
        "states": torch.randn(args.batch_size, args.tokens, args.hidden_size, generator=generator),
    }
    models = {}
    for name in args.presets:
        unet = unet_from_preset(name, sample_size=args.latent_size, cross_attention_dim=args.hidden_size)
        models[name] = (unet, torch.optim.AdamW(unet.parameters(), 1e-4))
        step_seconds(*models[name], batch)  # warm-up, not timed
    times = {name: [] for name in args.presets}
    for round_ in range(args.rounds):
        order = args.presets if round_ % 2 == 0 else list(reversed(args.presets))
        for name in order:
            times[name].append(step_seconds(*models[name], batch))
    reference = statistics.median(times[args.presets[0]])
    results = {
        "latent_size": args.latent_size, "batch_size": args.batch_size, "tokens": args.tokens,
        "hidden_size": args.hidden_size, "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
        "presets": {
            name: {"parameters": sum(p.numel() for p in models[name][0].parameters()), "step_seconds": times[name],
                   "median_seconds": statistics.median(times[name]),
                   "speed_vs_" + args.presets[0]: reference / statistics.median(times[name])}
            for name in args.presets
        },
    }
    for name, row in results["presets"].items():
        print(f"{name}: {row['parameters'] / 1e6:.2f}M parameters, steps {[round(t, 2) for t in row['step_seconds']]} s, "
              f"median {row['median_seconds']:.2f} s, {row['speed_vs_' + args.presets[0]]:.2f}x {args.presets[0]}'s speed")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
