"""Prompt adherence on the shapes dataset: generate from captions, read the images back with the analyzer.

A generated image "adheres" when the analyzer sees the prompted color, shape and position. The
held-out combinations (color, shape, position triples never seen in training) measure whether the
model composes attributes rather than memorising captions.
"""

from __future__ import annotations

import random

import torch

from latentdiff.data import shapes

ATTRIBUTES = ("color", "shape", "size", "position")


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
    targets = shapes_prompts(split, num_prompts, seed)
    jobs = [(t, seed + i * images_per_prompt + j) for i, t in enumerate(targets) for j in range(images_per_prompt)]
    hits = {key: 0 for key in (*ATTRIBUTES, "color_and_shape", "color_shape_position")}
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        images = pipe(
            [t["prompt"] for t, _ in chunk],
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            generator=[torch.Generator().manual_seed(s) for _, s in chunk],
        ).images
        for (target, _), image in zip(chunk, images, strict=True):
            seen = shapes.analyze(image)
            ok = {a: seen.get(a) == target[a] for a in ATTRIBUTES}
            for a in ATTRIBUTES:
                hits[a] += ok[a]
            hits["color_and_shape"] += ok["color"] and ok["shape"]
            hits["color_shape_position"] += ok["color"] and ok["shape"] and ok["position"]
    return {"split": split, "images": len(jobs), **{k: v / len(jobs) for k, v in hits.items()}}
