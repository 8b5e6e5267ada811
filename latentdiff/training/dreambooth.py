"""DreamBooth (Ruiz et al. 2023): teach a text-to-image model one subject from a few images bound to a prompt
with a rare token ("a photo of sks dog"), while a prior-preservation loss on images the base model itself
generated for the class prompt ("a photo of dog") keeps it from forgetting what the class looks like.

    n = generate_class_images(pipe, "a photo of dog", "class_dir", 100, resolution=512)  # only the missing ones
    pairs = PriorPreservationDataset(prompt_dataset("dog_dir", "a photo of sks dog", 512),
                                     prompt_dataset("class_dir", "a photo of dog", 512))
    batch = join_prior_batch(next(iter(loader)))            # instance half, then class half
    loss = prior_preservation_loss(model_fn, latents, states, scheduler, prior_loss_weight=1.0)
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch.utils.data import Dataset

from latentdiff.data.dataset import ImageCaptionDataset
from latentdiff.data.files import atomic_path, digest
from latentdiff.data.folders import index_captioned_images
from latentdiff.training.diffusion_loss import diffusion_loss

logger = logging.getLogger(__name__)

CLASS_PREFIX = "class_"
CLASS_IMAGE_NAME = "class-{index:05d}.png"


def prompt_dataset(
    folder: str | Path, prompt: str, resolution: int, *, random_crop: bool = False, random_flip: bool = False,
    flag: str = "--instance_data_dir",
) -> ImageCaptionDataset:  # fmt: skip
    """Every readable image under `folder`, each captioned `prompt`; items {"pixel_values": (3, R, R), "text"}.

    `flag` names the folder in the error raised when it holds no usable image."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{flag} {str(folder)!r} is not a folder")
    index = index_captioned_images(folder, caption_column=None)
    index.skipped.report()
    if not index.paths:
        skipped = ", ".join(f"{n} {reason}" for reason, n in index.skipped.counts().most_common())
        raise ValueError(
            f"{flag} {str(folder)!r} holds no usable images{f' (skipped: {skipped})' if skipped else ''}; "
            "give a folder of images (.png, .jpg, .webp, ...)"
        )
    return ImageCaptionDataset(
        index.paths, [[prompt]] * len(index.paths), name=str(folder), resolution=resolution,
        fingerprint=digest(index.fingerprint, prompt), random_crop=random_crop, random_flip=random_flip,
        skipped=index.skipped,
    )  # fmt: skip


def count_images(folder: str | Path) -> int:
    """The images under `folder` that `prompt_dataset` would train on (unreadable files do not count)."""
    folder = Path(folder)
    return len(index_captioned_images(folder, caption_column=None).paths) if folder.is_dir() else 0


@torch.no_grad()
def generate_class_images(
    pipe, prompt: str, folder: str | Path, num_images: int, *, resolution: int | None = None,
    batch_size: int = 4, num_inference_steps: int = 50, guidance_scale: float = 7.5, seed: int = 0,
    accelerator=None,
) -> int:  # fmt: skip
    """Fill `folder` up to `num_images` images of `prompt` sampled from `pipe`, generating only the missing
    ones (none when enough are there); return how many this process wrote.

    Sample with the base model, before fine-tuning: the prior loss pulls the model towards its own
    samples of the class (Ruiz et al. 2023 §3.3). Image `class-i.png` comes from noise seeded by
    (seed, i), so a run interrupted here and restarted writes the same images. Under accelerate every
    process calls this and writes its share.
    """
    folder = Path(folder)
    missing = max(0, num_images - count_images(folder))
    indices, index = [], 0
    while len(indices) < missing:
        if not (folder / CLASS_IMAGE_NAME.format(index=index)).exists():
            indices.append(index)
        index += 1
    rank, world = (
        (accelerator.process_index, accelerator.num_processes) if accelerator is not None else (0, 1)
    )
    if accelerator is not None:
        accelerator.wait_for_everyone()  # every process has listed the folder before any writes to it
    mine = indices[rank::world]
    if missing and rank == 0:
        logger.info("generating %d class images of %r into %s", missing, prompt, folder)
    for first in range(0, len(mine), batch_size):
        chunk = mine[first : first + batch_size]
        images = pipe(
            prompt, height=resolution, width=resolution, num_images_per_prompt=len(chunk),
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
            generator=[torch.Generator().manual_seed(seed * 1_000_003 + i) for i in chunk],
        ).images  # fmt: skip
        for i, image in zip(chunk, images, strict=True):
            with atomic_path(folder / CLASS_IMAGE_NAME.format(index=i)) as tmp:
                image.save(tmp, format="PNG")
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return len(mine)


class PriorPreservationDataset(Dataset):
    """Instance items paired with class items: item i is instance[i % n] with class[i % m] under "class_" keys.

    Its length is max(n, m), so an epoch sees every image of the larger set once. Either dataset may be a
    latent cache (`latentdiff.data.cache_latents`)."""

    def __init__(self, instance: Dataset, class_: Dataset):
        if not len(instance) or not len(class_):
            raise ValueError(
                f"prior preservation needs instance and class images; got {len(instance)} and {len(class_)}"
            )
        self.instance, self.class_ = instance, class_

    def __len__(self) -> int:
        return max(len(self.instance), len(self.class_))

    def set_epoch(self, epoch: int) -> None:
        """Tell both parts the epoch: their captions, flips and crops (or cached views) are drawn per epoch."""
        for part in (self.instance, self.class_):
            if hasattr(part, "set_epoch"):
                part.set_epoch(epoch)

    def __getitem__(self, index: int) -> dict:
        item = dict(self.instance[index % len(self.instance)])
        item.update({CLASS_PREFIX + k: v for k, v in self.class_[index % len(self.class_)].items()})
        return item


def join_prior_batch(batch: dict) -> dict:
    """A batch of pairs as one batch of 2B: the instance half first, the class half second (tensors
    concatenated along dim 0, lists of captions joined)."""
    joined = {}
    for key, value in batch.items():
        if key.startswith(CLASS_PREFIX):
            continue
        other = batch[CLASS_PREFIX + key]
        joined[key] = (
            torch.cat([value, other]) if isinstance(value, torch.Tensor) else [*value, *other]
        )  # (2B, ...)
    return joined


def prior_preservation_loss(
    model_fn, x0: torch.Tensor, cond, scheduler, prior_loss_weight: float = 1.0, **loss_kwargs
) -> torch.Tensor:
    """The DreamBooth objective (Ruiz et al. 2023 eq. 2), a scalar:

        E[w_t ||x^(a_t x + s_t eps, c) - x||^2] + lambda E[w_t' ||x^(a_t' x_pr + s_t' eps', c_pr) - x_pr||^2]

    each term the simple loss of `diffusion_loss` (its ``loss_kwargs``: noise, timesteps, snr_gamma,
    noise_offset, immiscible, loss_weighting, generator) averaged over its half, lambda = `prior_loss_weight`. x0 (2B, C, h, w) and
    `cond` hold the instance half first and the class half second (`join_prior_batch`); `model_fn` runs once
    on both, so a DDP model sees one forward per backward. With lambda = 1 and the same generator this is
    twice `diffusion_loss` of the whole batch.
    """
    if x0.shape[0] % 2:
        raise ValueError(f"x0 must hold an instance half and a class half; got an odd batch of {x0.shape[0]}")
    mse = diffusion_loss(model_fn, x0, cond, scheduler, reduction="none", **loss_kwargs)  # (2B,)
    instance_mse, prior_mse = mse.chunk(2)  # (B,), (B,)
    return instance_mse.mean() + prior_loss_weight * prior_mse.mean()
