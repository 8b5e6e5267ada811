"""UNet training at real sizes on a GPU: images/s and peak memory, PyTorch SDPA against xformers.

train_ldm's step (diffusion_loss on latents, fp32 master weights, AdamW, bf16 autocast through
Accelerate) on the ``base`` UNet at 256 px and the ``sd15`` UNet at 512 px (32x32 and 64x64 latents,
77 text tokens). The latents and text states come from a cache in train_ldm --cache_latents, so
the step here is the UNet's alone: random latents and states of the right shapes stand in for them.
For each size, the attention backends (and gradient checkpointing) run in one process, one after the
other on fresh copies of the same initial weights; the ratio to SDPA is what to read.

    python benchmarks/bench_attention.py                   # needs a CUDA GPU
    python benchmarks/bench_attention.py --sizes base:256:32 --steps 20
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import platform
import statistics
import time
from datetime import date

import torch
from accelerate import Accelerator
from diffusers.models.attention_processor import AttnProcessor2_0
from results_file import write_result  # benchmarks/ is on sys.path when a script runs

from latentdiff.presets import TEXT_ENCODER_PRESETS, sd_scheduler, unet_from_preset
from latentdiff.schedulers import DDPMScheduler
from latentdiff.training.args import add_common_args
from latentdiff.training.diffusion_loss import diffusion_loss
from latentdiff.training.run import make_optimizer


def parse_size(text: str) -> tuple[str, int, int]:
    """'preset:resolution:batch'."""
    preset, resolution, batch = text.split(":")
    return preset, int(resolution), int(batch)


def time_steps(accelerator, unet, states, latents, args, gradient_checkpointing: bool) -> dict:
    """Median step time and peak memory of train_ldm's step on a copy of ``unet``."""
    common = add_common_args(argparse.ArgumentParser()).parse_args(["--output_dir", "-", "--learning_rate", "1e-4"])
    model = copy.deepcopy(unet).train()
    if gradient_checkpointing:
        model.enable_gradient_checkpointing()
    optimizer = make_optimizer(common, model.parameters())
    model, optimizer = accelerator.prepare(model, optimizer)
    scheduler = DDPMScheduler.from_config(sd_scheduler().config)

    def denoise(x, t, c):
        return model(x, t, encoder_hidden_states=c, return_dict=False)[0]

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(args.warmup + args.steps):
        generator = torch.Generator(accelerator.device).manual_seed(i)
        torch.cuda.synchronize()
        start = time.perf_counter()
        with accelerator.autocast():
            loss = diffusion_loss(denoise, latents, states, scheduler, generator=generator)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30
    accelerator.free_memory()
    torch.cuda.empty_cache()
    median = statistics.median(times)
    return {"median_step_s": median, "images_per_s": latents.shape[0] / median, "peak_gib": peak, "loss": loss.item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", type=parse_size, default=[("base", 256, 32), ("sd15", 512, 8)],
                        help="preset:resolution:batch")  # fmt: skip
    parser.add_argument("--mixed_precision", choices=("bf16", "fp16", "no"), default="bf16")
    parser.add_argument("--steps", type=int, default=15, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results/attention.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_attention.py measures GPU training: no CUDA device is visible")
    backends, skipped = ["sdpa"], {}
    if importlib.util.find_spec("xformers") is None:
        skipped["xformers"] = "not installed"
    else:
        try:  # xformers' wheels are built for one torch release: a mismatch fails here, not mid-table
            probe = unet_from_preset("tiny").cuda()
            probe.enable_xformers_memory_efficient_attention()
            backends.append("xformers")
        except Exception as error:  # noqa: BLE001 - any failure means: cannot measure it here
            skipped["xformers"] = f"{type(error).__name__}: {str(error).splitlines()[0]}"
    for name, reason in skipped.items():
        print(f"{name} skipped: {reason}")
    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    torch.backends.cuda.matmul.allow_tf32 = True

    rows = []
    for preset, resolution, batch in args.sizes:
        torch.manual_seed(0)
        unet = unet_from_preset(preset, sample_size=resolution // 8).to(accelerator.device)
        width = TEXT_ENCODER_PRESETS[preset]["hidden_size"]
        latents = torch.randn(batch, 4, resolution // 8, resolution // 8, device=accelerator.device)
        states = torch.randn(batch, 77, width, device=accelerator.device)
        for backend in backends:
            if backend == "xformers":
                unet.enable_xformers_memory_efficient_attention()
            else:
                unet.set_attn_processor(AttnProcessor2_0())  # torch's scaled_dot_product_attention
            for checkpointing in (False, True):
                row = dict(preset=preset, resolution=resolution, batch=batch, attention=backend,
                           gradient_checkpointing=checkpointing)  # fmt: skip
                row.update(time_steps(accelerator, unet, states, latents, args, checkpointing))
                rows.append(row)
                print(f"{preset:>5} {resolution:>4} px  batch {batch:>3}  {backend:<8} ckpt={checkpointing!s:<5} "
                      f"{row['images_per_s']:8.1f} images/s  peak {row['peak_gib']:6.2f} GiB", flush=True)  # fmt: skip
        del unet
        torch.cuda.empty_cache()

    for row in rows:  # relative to SDPA without checkpointing at the same size
        base = next(r for r in rows if (r["preset"], r["resolution"], r["attention"], r["gradient_checkpointing"])
                    == (row["preset"], row["resolution"], "sdpa", False))  # fmt: skip
        row["speed_vs_sdpa"] = row["images_per_s"] / base["images_per_s"]
        row["memory_vs_sdpa"] = row["peak_gib"] / base["peak_gib"]
    versions = {"torch": torch.__version__}
    if importlib.util.find_spec("xformers") is not None:
        import xformers

        versions["xformers"] = xformers.__version__
    result = {
        "date": date.today().isoformat(),
        "machine": f"{torch.cuda.get_device_name()}, {platform.machine()}",
        "versions": versions,
        "mixed_precision": args.mixed_precision,
        "command": "python benchmarks/bench_attention.py "
        + " ".join(f"--sizes {p}:{r}:{b}" for p, r, b in args.sizes)
        + f" --mixed_precision {args.mixed_precision} --steps {args.steps} --warmup {args.warmup}",
        "rows": rows,
        "skipped": skipped,
    }
    print(f"\n{'preset':<6} {'px':>4} {'batch':>5} {'attention':<9} {'ckpt':<5} {'images/s':>9} {'peak GiB':>9} "
          f"{'speed/SDPA':>10} {'mem/SDPA':>9}")  # fmt: skip
    for r in rows:
        print(f"{r['preset']:<6} {r['resolution']:>4} {r['batch']:>5} {r['attention']:<9} "
              f"{'yes' if r['gradient_checkpointing'] else 'no':<5} {r['images_per_s']:>9.1f} {r['peak_gib']:>9.2f} "
              f"{r['speed_vs_sdpa']:>10.2f} {r['memory_vs_sdpa']:>9.2f}")  # fmt: skip
    write_result(args.out, result)


if __name__ == "__main__":
    main()
