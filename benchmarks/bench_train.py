"""Training throughput: train_ldm's step on cached latents against a loop that encodes every batch.

The reference loop is the one of diffusers' examples/text_to_image/train_text_to_image.py: each step
decodes the images, encodes them with the frozen VAE and the captions with the frozen text encoder,
then trains the UNet. train_ldm with --cache_latents encodes the dataset once (VAE posterior mean and
std, text states) and each step only samples z = mean + std * eps. Same models, data, batch and UNet
initialisation; the two loops alternate step by step in one process (which goes first alternates too),
so drift in machine load hits both alike, and the median step time of each is compared. The one-off
cost of building the cache is reported too, with the number of steps after which it has paid for itself.

Both steps are also timed in parts (loading the batch; the latents and text states: the VAE and the text
encoder in the reference, sampling from the cached posterior in train_ldm; the UNet's forward and
backward; the optimizer). Loading and encoding are all a cache can save, so reference / (reference -
loading - encoding) is the most any cache can give on these models (Amdahl's law); the rest of the
difference is the optimizer (train_ldm's fused AdamW against diffusers' default).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_train.py --preset small --resolution 32 --batch 32 --steps 10

(OMP_WAIT_POLICY=PASSIVE: on a machine shared with other jobs, spinning OpenMP threads slow steps down
many times over, and unevenly.)
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F
from results_file import result_header, write_result  # benchmarks/ is on sys.path when a script runs

from latentdiff.data import ShapesDataset, build_dataloader, cache_latents
from latentdiff.presets import (
    sd_scheduler,
    text_encoder_from_preset,
    tokenizer_for,
    unet_from_preset,
    vae_from_preset,
)
from latentdiff.schedulers import DDPMScheduler
from latentdiff.training.args import add_common_args
from latentdiff.training.diffusion_loss import diffusion_loss
from latentdiff.training.run import make_optimizer
from latentdiff.training.text_to_image import latents_from_batch, text_states_from_batch


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="small", help="the size of the UNet, VAE and text encoder")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--samples", type=int, default=256, help="dataset size (shapes)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps of each loop")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps of each loop first")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="benchmarks/results/train.json")
    args = parser.parse_args()
    device = torch.device(args.device)

    torch.manual_seed(0)
    vae = vae_from_preset(args.preset).requires_grad_(False).eval().to(device)
    text_encoder = text_encoder_from_preset(args.preset).requires_grad_(False).eval().to(device)
    tokenizer = tokenizer_for(text_encoder)
    unet = unet_from_preset(args.preset).to(device)
    noise_scheduler = DDPMScheduler.from_config(sd_scheduler().config)  # SD's training schedule
    dataset = ShapesDataset(resolution=args.resolution).subset(range(args.samples))

    with tempfile.TemporaryDirectory() as cache_dir:
        start = time.perf_counter()
        cached = cache_latents(
            dataset, vae, cache_dir=cache_dir, text_encoder=text_encoder, tokenizer=tokenizer
        )
        cache_seconds = time.perf_counter() - start
    empty_states = cached.null_encoder_hidden_states[None].to(device)  # (1, L, D)

    def backward_and_step(loss, unet, optimizer, lap):
        """What both loops do with their loss: backward, clip the gradients to norm 1, step."""
        loss.backward()
        lap("UNet forward + backward")
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        lap("optimizer")

    def cached_step(unet, optimizer, batch, generator, lap):
        """The body of train_ldm's loop with --cache_latents and a frozen text encoder."""
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        latents = latents_from_batch(batch, vae, generator)  # (B, C, h, w)
        states = text_states_from_batch(
            batch, tokenizer, text_encoder, empty_states, 0.1, generator, False
        )
        lap("encoding")
        loss = diffusion_loss(lambda x, t, c: unet(x, t, encoder_hidden_states=c, return_dict=False)[0],
                              latents, states, noise_scheduler, generator=generator)  # fmt: skip
        backward_and_step(loss, unet, optimizer, lap)

    def reference_step(unet, optimizer, batch, generator, lap):
        """diffusers' train_text_to_image: encode the batch with the VAE and the text encoder, every step."""
        with torch.no_grad():
            latents = (
                vae.encode(batch["pixel_values"].to(device)).latent_dist.sample() * vae.config.scaling_factor
            )
            captions = ["" if torch.rand(()) < 0.1 else c for c in batch["text"]]
            input_ids = tokenizer(captions, max_length=tokenizer.model_max_length, padding="max_length",
                                  truncation=True, return_tensors="pt").input_ids  # fmt: skip
            encoder_hidden_states = text_encoder(input_ids.to(device), return_dict=False)[0]
        lap("encoding")
        noise = torch.randn_like(latents)
        timesteps = torch.randint(
            0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=device
        )
        noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
        model_pred = unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
        loss = F.mse_loss(model_pred.float(), noise.float(), reduction="mean")
        backward_and_step(loss, unet, optimizer, lap)

    # train_ldm's optimizer is the shared machinery's (make_optimizer); diffusers' script uses plain AdamW
    common = add_common_args(argparse.ArgumentParser()).parse_args(
        ["--output_dir", "-", "--learning_rate", "1e-4"]
    )
    loops = {
        "reference (encode each batch)": (reference_step, dataset, lambda p: torch.optim.AdamW(p, lr=1e-4)),
        "train_ldm --cache_latents": (cached_step, cached, lambda p: make_optimizer(common, p)),
    }
    state = {}
    for name, (step, data, optimizer) in loops.items():
        model = copy.deepcopy(unet).train()
        loader = build_dataloader(data, args.batch, seed=0, drop_last=True)
        state[name] = (step, model, optimizer(model.parameters()), iter_forever(loader))
    times = {name: [] for name in loops}
    parts = {name: {} for name in loops}  # name -> part -> seconds per timed step
    for i in range(args.warmup + args.steps):
        # which loop goes first alternates too: the second of a pair measured ~10% faster UNet steps
        for name, (step, model, optimizer, batches) in list(state.items())[:: 1 if i % 2 else -1]:
            generator = torch.Generator(device).manual_seed(i)
            lap = Laps(device)
            batch = next(batches)
            lap("loading")
            step(model, optimizer, batch, generator, lap)
            if i >= args.warmup:
                times[name].append(lap.total)
                for part, seconds in lap.seconds.items():
                    parts[name].setdefault(part, []).append(seconds)

    median = {name: statistics.median(t) for name, t in times.items()}
    images_per_s = {name: args.batch / s for name, s in median.items()}
    reference, ours = (median[name] for name in loops)
    part_median = {name: {part: statistics.median(t) for part, t in p.items()} for name, p in parts.items()}
    reference_parts = part_median[next(iter(loops))]
    reference_total = sum(reference_parts.values())
    saveable = reference_parts["loading"] + reference_parts["encoding"]
    bound = reference_total / (reference_total - saveable)
    result = {
        **result_header(f"python benchmarks/bench_train.py --preset {args.preset} --resolution {args.resolution} "
                        f"--batch {args.batch} --samples {args.samples} --steps {args.steps} --warmup {args.warmup}",
                        args.device),
        "preset": args.preset,
        "resolution": args.resolution,
        "batch": args.batch,
        "median_step_s": median,
        "images_per_s": images_per_s,
        "all_step_s": times,
        "speedup": reference / ours,
        "parts_median_s": part_median,
        "saveable_fraction": saveable / reference_total,
        "most_any_cache_can_give": bound,
        "cache_build_s": cache_seconds,
        "cache_pays_off_after_steps": cache_seconds / max(reference - ours, 1e-9),
    }
    print(
        f"{'loop':<32} {'median step s':>13} {'images/s':>9}   ({args.preset} preset, {args.resolution} px, "
        f"batch {args.batch}, {args.steps} alternating steps, {args.device})"
    )
    for name in loops:
        print(f"{name:<32} {median[name]:>13.3f} {images_per_s[name]:>9.1f}")
    print(f"{'parts of a step, median s':<32} " + " ".join(f"{part:>12}" for part in reference_parts))
    for name in loops:
        print(f"{name:<32} " + " ".join(f"{part_median[name][part]:>12.3f}" for part in reference_parts))
    print(
        f"loading and encoding are {result['saveable_fraction']:.0%} of the reference step: no cache can give more "
        f"than {bound:.2f}x on these models (the rest of the speedup: see the optimizer column)"
    )
    print(
        f"speedup: {result['speedup']:.2f}x; building the cache of {args.samples} images took {cache_seconds:.1f} s "
        f"(paid back after {result['cache_pays_off_after_steps']:.0f} steps)"
    )
    write_result(args.out, result)


class Laps:
    """Seconds per named part of a step: call it with the part's name when the part ends."""

    def __init__(self, device: torch.device):
        self.device, self.seconds = device, {}
        sync(device)
        self.start = self.last = time.perf_counter()

    def __call__(self, part: str) -> None:
        sync(self.device)
        now = time.perf_counter()
        self.seconds[part], self.last = now - self.last, now

    @property
    def total(self) -> float:
        return self.last - self.start


def iter_forever(loader):
    while True:
        yield from loader


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
