"""Training-step time of UNet presets at one latent size, measured in one run, in alternating order.

One step is forward, backward and AdamW on a batch of random latents and text states, as train_ldm.py
trains with a frozen text encoder and cached latents (the text states of MiniLM: 77 x 384 by default).
``--modes`` runs each preset in several ways: ``fp32``; ``bf16``, the forward under CPU or CUDA autocast
to bfloat16 as train_ldm's ``--mixed_precision bf16`` runs it (fp32 weights and optimizer); ``compile``,
the UNet through ``torch.compile`` (inductor), as ``accelerate launch --dynamo_backend inductor`` runs it;
``compile+bf16``, both. Compilation happens in the untimed warm-up steps and its seconds are reported.
Prints every timed step of every variant and each one's median against the first's.

    python benchmarks/unet_preset_speed.py --presets small small64 --latent_size 16 --out benchmarks/results/unet_preset_speed.json
    python benchmarks/unet_preset_speed.py --presets small --latent_size 8 --modes fp32 bf16 compile compile+bf16
    python benchmarks/unet_preset_speed.py --presets small --latent_size 8 --tokens 77 16   # train_ldm --tokenizer_max_length 16
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from latentdiff.presets import unet_from_preset

MODES = ("fp32", "bf16", "compile", "compile+bf16")


def step_seconds(unet, optimizer, batch: dict, bf16: bool = False) -> float:
    start = time.perf_counter()
    with torch.autocast(batch["latents"].device.type, dtype=torch.bfloat16, enabled=bf16):
        prediction = unet(batch["latents"], batch["timesteps"], batch["states"], return_dict=False)[0]
    loss = prediction.float().pow(2).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["small", "small64"])
    parser.add_argument("--latent_size", type=int, default=16, help="16: 64 px images through an f=4 VAE")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--tokens", type=int, nargs="+", default=[77], help="text states' lengths, each a variant")
    parser.add_argument("--hidden_size", type=int, default=384, help="the text states' width (MiniLM: 384)")
    parser.add_argument("--rounds", type=int, default=4, help="timed steps of each variant, taken in turn")
    parser.add_argument("--modes", nargs="+", default=["fp32"], choices=MODES, help="how each preset runs")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps of each variant first (compiling)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(args.batch_size, 4, args.latent_size, args.latent_size, generator=generator)
    timesteps = torch.randint(0, 1000, (args.batch_size,), generator=generator)
    states = torch.randn(args.batch_size, max(args.tokens), args.hidden_size, generator=generator)
    batches = {n: {"latents": latents, "timesteps": timesteps, "states": states[:, :n].contiguous()} for n in args.tokens}
    models, warmup_seconds = {}, {}
    for name, mode, tokens in itertools.product(args.presets, args.modes, args.tokens):
        torch.manual_seed(0)
        unet = unet_from_preset(name, sample_size=args.latent_size, cross_attention_dim=args.hidden_size)
        optimizer = torch.optim.AdamW(unet.parameters(), 1e-4)
        forward = torch.compile(unet) if mode.startswith("compile") else unet
        variant = " ".join([name, *([mode] if args.modes != ["fp32"] else []),
                            *([f"{tokens} tokens"] if len(args.tokens) > 1 else [])])
        models[variant] = (forward, optimizer, unet, mode.endswith("bf16"), batches[tokens])
        start = time.perf_counter()
        for _ in range(args.warmup):  # not timed; compiles where asked
            step_seconds(forward, optimizer, batches[tokens], bf16=mode.endswith("bf16"))
        warmup_seconds[variant] = time.perf_counter() - start
    variants = list(models)
    times = {variant: [] for variant in variants}
    for round_ in range(args.rounds):
        for variant in variants if round_ % 2 == 0 else list(reversed(variants)):
            forward, optimizer, _, bf16, batch = models[variant]
            times[variant].append(step_seconds(forward, optimizer, batch, bf16))
    first = variants[0]
    reference = statistics.median(times[first])
    results = {
        "latent_size": args.latent_size, "batch_size": args.batch_size, "tokens": args.tokens,
        "hidden_size": args.hidden_size, "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__, "warmup_steps": args.warmup,
        "presets": {
            variant: {"parameters": sum(p.numel() for p in models[variant][2].parameters()),
                      "warmup_seconds": warmup_seconds[variant], "step_seconds": times[variant],
                      "median_seconds": statistics.median(times[variant]),
                      "speed_vs_" + first: reference / statistics.median(times[variant])}
            for variant in variants
        },
    }
    for variant, row in results["presets"].items():
        print(f"{variant}: {row['parameters'] / 1e6:.2f}M parameters, warm-up {row['warmup_seconds']:.1f} s, "
              f"steps {[round(t, 2) for t in row['step_seconds']]} s, median {row['median_seconds']:.2f} s, "
              f"{row['speed_vs_' + first]:.2f}x {first}'s speed")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
