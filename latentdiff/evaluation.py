"""Measuring a text-to-image pipeline against a dataset: ``evaluate(pipe, "shapes" | "emoji" | DIR)``.

- **Distribution distance**, for every dataset: FID and KID between images generated from the
  captions of held-out real images and those real images (the dataset's validation split),
  computed on the features of a network (:mod:`latentdiff.features`: the in-domain feature net
  trained on the dataset's training split, or a CLIP vision model given by path).
- **Prompt adherence**, for shapes: a generated image "adheres" when the analyzer sees the
  prompted color, shape and position. The held-out combinations (color, shape, position triples
  never seen in training) measure whether the model composes attributes rather than memorising
  captions.
- **Caption retrieval**, for data with a caption of its own per image (emoji, most folders):
  generate from the captions of K real images with distinct captions, and count how often the
  generated image's nearest real image (cosine of features) among those K is the prompted one
  (top-1, top-5, beside chance: 1/K and 5/K), for training and for held-out captions.

Every image is generated with its own seeded generator, so results do not depend on batching
or on the order in which the measures run.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from latentdiff.data import build_dataset, shapes
from latentdiff.data.args import BUILTIN_DATASETS
from latentdiff.features import fid, kid, load_features
from latentdiff.images import to_pil
from latentdiff.presets import default_image_size

ATTRIBUTES = ("color", "shape", "size", "position")
COMBINED = {"color_and_shape": ("color", "shape"), "color_shape_position": ("color", "shape", "position")}
SPLITS = {"train": "train", "held_out": "validation"}  # our names -> the data module's
MAX_REAL_IMAGES = 5000  # real images embedded for FID/KID; more only adds time
DEFAULT_NUM_PROMPTS = len(shapes.HELD_OUT) * 2  # what the demo measures adherence on


def generate(pipe, prompts: list[str], seeds: list[int], num_inference_steps: int = 25, guidance_scale: float = 7.5,
             batch_size: int = 32) -> list:
    """One image per prompt, image i from a generator seeded with ``seeds[i]``, in batches."""
    images = []
    for start in range(0, len(prompts), batch_size):
        images += pipe(
            prompts[start : start + batch_size],
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            generator=[torch.Generator().manual_seed(s) for s in seeds[start : start + batch_size]],
        ).images
    return images


# --- shapes prompt adherence -------------------------------------------------------------------


def shapes_prompts(split: str, num_prompts: int, seed: int = 0) -> list[dict]:
    """``num_prompts`` attribute sets (with their caption) drawn from the training or held-out combinations."""
    if split not in ("train", "held_out"):
        raise ValueError(f"split={split!r} is not one of 'train', 'held_out'")
    combinations = sorted(shapes.TRAIN_COMBINATIONS if split == "train" else shapes.HELD_OUT)
    rng = random.Random(seed)
    picks = rng.sample(combinations, min(num_prompts, len(combinations)))
    targets = []
    for color, shape, position in picks:
        size = rng.choice(list(shapes.SIZES))
        target = dict(color=color, shape=shape, size=size, position=position)
        targets.append({**target, "prompt": shapes.caption(**target)})
    return targets


@torch.no_grad()
def shapes_adherence(
    pipe,
    split: str = "train",
    num_prompts: int = 32,
    images_per_prompt: int = 2,
    num_inference_steps: int = 25,
    guidance_scale: float = 7.5,
    seed: int = 0,
    batch_size: int = 32,
) -> dict:
    """Fraction of generated images whose analyzed color, shape, size, position (each, color and shape,
    and all of color, shape and position) match the prompt."""
    targets = [t for t in shapes_prompts(split, num_prompts, seed) for _ in range(images_per_prompt)]
    seeds = [seed + i for i in range(len(targets))]  # prompt i, image j: seed + i * images_per_prompt + j
    images = generate(pipe, [t["prompt"] for t in targets], seeds, num_inference_steps, guidance_scale, batch_size)
    return {"split": split, **adherence_scores(targets, images)}


def adherence_scores(targets: list[dict], images: list) -> dict:
    """The fraction of ``images`` in which the shapes analyzer reads what their ``targets`` ask for: each
    attribute (color, shape, size, position) that every target names, color and shape together, color,
    shape and position together (where the targets name those), and the color read right per color name."""
    asked = [a for a in ATTRIBUTES if all(a in t for t in targets)]
    needs = {a: (a,) for a in asked}
    needs.update({key: need for key, need in COMBINED.items() if set(need) <= set(asked)})
    hits = dict.fromkeys(needs, 0)
    color_hits = []
    for target, image in zip(targets, images, strict=True):
        seen = shapes.analyze(image)
        ok = {a: seen.get(a) == target[a] for a in asked}
        for key, need in needs.items():
            hits[key] += all(ok[a] for a in need)
        if "color" in ok:
            color_hits.append((target["color"], ok["color"]))
    return {"images": len(targets), **{k: v / len(targets) for k, v in hits.items()},
            "color_by_name": by_color(color_hits)}


def by_color(hits: list[tuple[str, bool]]) -> dict:
    """``{color: fraction of its images whose color was read right}`` for the palette's colors that occur:
    which color a model or a VAE loses, where the overall color score only says that one is lost."""
    counts = {name: [0, 0] for name in shapes.COLORS}
    for name, ok in hits:
        counts[name][0] += ok
        counts[name][1] += 1
    return {name: right / total for name, (right, total) in counts.items() if total}


def format_by_color(fractions: dict) -> str:
    """ "red 100%  orange 83%  ..." """
    return "  ".join(f"{name} {fraction:.0%}" for name, fraction in fractions.items())


@torch.no_grad()
def shapes_vae_round_trip(vae, resolution: int, num_images: int = 216, batch_size: int = 72) -> dict:
    """Fraction of held-out shapes images whose attributes the analyzer still reads correctly after
    encoding and decoding with ``vae``: the ceiling of a text-to-image model on that VAE's latents. (A
    VAE can score a fair PSNR and still turn green into purple: this shows it.)"""
    data = shapes.ShapesDataset(resolution=resolution, split="validation")
    indices = range(min(num_images, len(data)))
    images = []
    for start in range(0, len(indices), batch_size):
        chunk = indices[start : start + batch_size]
        x = torch.stack([data[i]["pixel_values"] for i in chunk]).to(vae.device, vae.dtype)  # (B, 3, R, R)
        images += to_pil(vae.decode(vae.encode(x).latent_dist.mean).sample.float().cpu())
    return adherence_scores([data.attributes(i) for i in indices], images)


# --- data and features -------------------------------------------------------------------------


def eval_splits(dataset: str, resolution: int, data_cache_dir: str | None = None) -> dict:
    """``{"train": ..., "held_out": ...}`` of shapes, emoji or a local folder/file (any format the data
    module reads), at ``resolution`` (shapes: at least its minimum, 32)."""
    if dataset not in BUILTIN_DATASETS and not Path(dataset).expanduser().exists():
        raise FileNotFoundError(f"dataset {dataset!r} is neither built in ({', '.join(BUILTIN_DATASETS)}) "
                                "nor an existing folder or file")
    if dataset == "shapes":
        resolution = max(resolution, shapes.MIN_RESOLUTION)
    args = argparse.Namespace(dataset_name=dataset, resolution=resolution, data_cache_dir=data_cache_dir)
    return {ours: build_dataset(args, theirs) for ours, theirs in SPLITS.items()}


def first_caption(dataset, position: int) -> str:
    """An item's main caption (emoji: its name; its aliases follow)."""
    return dataset.captions(position)[0]


@torch.no_grad()
def embed_real(features, dataset, positions: list[int], batch_size: int = 64) -> torch.Tensor:
    """Features (N, D) of the dataset's items at ``positions``, decoded a batch at a time."""
    chunks = [positions[i : i + batch_size] for i in range(0, len(positions), batch_size)]
    return torch.cat([features(torch.stack([dataset[p]["pixel_values"] for p in chunk])) for chunk in chunks])


@torch.no_grad()
def embed_generated(pipe, features, prompts: list[str], seeds: list[int], num_inference_steps: int,
                    guidance_scale: float, batch_size: int = 32) -> torch.Tensor:
    """Features (N, D) of one generated image per prompt (images are not kept)."""
    return torch.cat([
        features(generate(pipe, prompts[i : i + batch_size], seeds[i : i + batch_size], num_inference_steps,
                          guidance_scale, batch_size))
        for i in range(0, len(prompts), batch_size)
    ])


# --- distribution distance ---------------------------------------------------------------------


def distribution_distance(pipe, real, features, num_images: int = 128, num_inference_steps: int = 25,
                          guidance_scale: float = 7.5, seed: int = 0, batch_size: int = 32,
                          kid_subsets: int = 100, kid_subset_size: int = 1000) -> dict:
    """FID and KID between ``num_images`` images generated from the captions of ``real``'s items (taken
    in a seeded order, repeated if there are fewer) and up to ``MAX_REAL_IMAGES`` of those items."""
    order = [int(p) for p in np.random.default_rng(seed).permutation(len(real))[:MAX_REAL_IMAGES]]
    prompts = [first_caption(real, order[i % len(order)]) for i in range(num_images)]
    real_features = embed_real(features, real, order)
    generated_features = embed_generated(pipe, features, prompts, [seed + i for i in range(num_images)],
                                         num_inference_steps, guidance_scale, batch_size)
    kid_mean, kid_std = kid(generated_features, real_features, kid_subsets, kid_subset_size, seed)
    return {
        "fid": {"name": features.metric_name("FID"), "value": fid(generated_features, real_features)},
        "kid": {"name": features.metric_name("KID"), "mean": kid_mean, "std": kid_std, "subsets": kid_subsets,
                "subset_size": min(kid_subset_size, len(real_features), num_images)},
        "real_images": len(order),
        "generated_images": num_images,
    }


# --- caption retrieval -------------------------------------------------------------------------


def distinct_caption_positions(dataset, n: int, seed: int = 0) -> list[int]:
    """Up to ``n`` items, in a seeded random order, no two with the same main caption: a prompt must
    name one image for "the prompted image" to mean anything."""
    seen, picks = set(), []
    for position in np.random.default_rng(seed).permutation(len(dataset)):
        caption = first_caption(dataset, int(position))
        if caption not in seen:
            seen.add(caption)
            picks.append(int(position))
            if len(picks) == n:
                break
    return picks


def retrieval_ranks(queries: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """For each query i (N, D), how many candidates (N, D) are more similar (cosine) than candidate i,
    its own: rank 0 is a top-1 hit, rank < 5 a top-5 hit."""
    similarity = F.normalize(queries.double(), dim=1) @ F.normalize(candidates.double(), dim=1).T  # (N, N)
    return (similarity > similarity.diagonal()[:, None]).sum(1)  # (N,)


def caption_retrieval(pipe, dataset, features, num_prompts: int = DEFAULT_NUM_PROMPTS, num_inference_steps: int = 25,
                      guidance_scale: float = 7.5, seed: int = 0, batch_size: int = 32) -> dict:
    """Top-1 and top-5 retrieval of the prompted image among ``num_prompts`` real images with distinct
    captions, from one image generated per caption (see the module docstring)."""
    positions = distinct_caption_positions(dataset, num_prompts, seed)
    k = len(positions)
    if k < 2:
        return {"dataset": dataset.name, "candidates": k, "skipped": "fewer than 2 distinct captions"}
    prompts = [first_caption(dataset, p) for p in positions]
    generated = embed_generated(pipe, features, prompts, [seed + i for i in range(k)], num_inference_steps,
                                guidance_scale, batch_size)
    ranks = retrieval_ranks(generated, embed_real(features, dataset, positions))
    return {
        "dataset": dataset.name,
        "candidates": k,
        "top1": float((ranks < 1).double().mean()),
        "top5": float((ranks < 5).double().mean()),
        "chance_top1": 1 / k,
        "chance_top5": min(5, k) / k,
    }


# --- everything --------------------------------------------------------------------------------


def evaluate(pipe, dataset: str = "shapes", *, num_images: int = 128, num_prompts: int = DEFAULT_NUM_PROMPTS,
             images_per_prompt: int = 2, num_inference_steps: int = 25, guidance_scale: float = 7.5, seed: int = 0,
             feature_net: str | None = None, feature_net_steps: int | None = None, cache_dir: str | None = None,
             data_cache_dir: str | None = None) -> dict:
    """FID/KID for every dataset, then shapes adherence or caption retrieval (see the module docstring).

    With the defaults, the shapes adherence is the demo's (``latentdiff demo`` writes the same numbers
    to metrics.json for the same steps, guidance and seed). ``feature_net``: a CLIP vision model folder;
    without it the in-domain feature net (cached under ``cache_dir``) is used, trained first if needed.
    """
    splits = eval_splits(dataset, default_image_size(pipe.vae, pipe.unet), data_cache_dir)
    if len(splits["held_out"]) < 2 or num_images < 2:  # before a feature net is trained for nothing
        raise ValueError(f"FID and KID need at least 2 real and 2 generated images; {splits['held_out'].name} has "
                         f"{len(splits['held_out'])} held-out images and {num_images} were asked for")
    features = load_features(splits["train"], dataset, feature_net, feature_net_steps, cache_dir)
    settings = dict(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, seed=seed)
    results = {
        "dataset": dataset,
        "resolution": splits["held_out"].resolution,
        "settings": {**settings, "scheduler": type(pipe.scheduler).__name__},
        "features": {"name": features.description, "path": str(features.path)},
        **distribution_distance(pipe, splits["held_out"], features, num_images, **settings),
    }
    if splits["held_out"].fingerprint == splits["train"].fingerprint:
        results["note"] = "too few images to hold any out: the real images are the training images"
    if dataset == "shapes":
        results["vae_round_trip"] = shapes_vae_round_trip(pipe.vae, results["resolution"])
        results["adherence"] = {
            split: shapes_adherence(pipe, split, num_prompts=num_prompts, images_per_prompt=images_per_prompt, **settings)
            for split in ("train", "held_out")
        }
    else:
        results["retrieval"] = {
            split: caption_retrieval(pipe, data, features, num_prompts, **settings) for split, data in splits.items()
        }
    return results


def print_results(results: dict) -> None:
    """What :func:`evaluate` (or the demo) measured, as tables: FID/KID, the VAE round trip, prompt adherence
    and caption retrieval, whichever ``results`` holds."""
    if "fid" in results:
        fid, kid = results["fid"], results["kid"]
        print(f"{results['generated_images']} generated vs {results['real_images']} held-out real images of "
              f"{results['dataset']} at {results['resolution']} px")
        if "note" in results:
            print(f"note: {results['note']}")
        print(f"{fid['name']}: {fid['value']:.4g}")
        print(f"{kid['name']}: {kid['mean']:.4g} ± {kid['std']:.2g} ({kid['subsets']} subsets of {kid['subset_size']})")
    if "vae_round_trip" in results:
        r = results["vae_round_trip"]
        print(f"VAE round trip ({r['images']} held-out images, the ceiling of adherence): color {r['color']:.0%}  "
              f"shape {r['shape']:.0%}  position {r['position']:.0%}  color+shape {r['color_and_shape']:.0%}")
        print(f"  color by name: {format_by_color(r['color_by_name'])}")
    if "adherence" in results:
        print(f"{'split':<9} {'images':>6} {'color':>6} {'shape':>6} {'size':>6} {'position':>8} {'color+shape':>11} {'all':>5}")
        for split, r in results["adherence"].items():
            print(f"{split:<9} {r['images']:>6} {r['color']:>6.0%} {r['shape']:>6.0%} {r['size']:>6.0%} "
                  f"{r['position']:>8.0%} {r['color_and_shape']:>11.0%} {r['color_shape_position']:>5.0%}")
        for split, r in results["adherence"].items():
            print(f"{split} color by name: {format_by_color(r['color_by_name'])}")
    if "retrieval" in results:
        print(f"{'retrieval':<9} {'candidates':>10} {'top-1':>6} {'top-5':>6} {'chance top-1':>12} {'chance top-5':>12}")
        for split, r in results["retrieval"].items():
            if "skipped" in r:
                print(f"{split:<9} {r['candidates']:>10}  skipped: {r['skipped']}")
            else:
                print(f"{split:<9} {r['candidates']:>10} {r['top1']:>6.0%} {r['top5']:>6.0%} "
                      f"{r['chance_top1']:>12.1%} {r['chance_top5']:>12.1%}")
