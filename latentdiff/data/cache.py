"""Encode a dataset once through the frozen VAE (and frozen text encoder), keep it on disk.

What is cached is the VAE's posterior q(z|x) = N(mean, std^2) per image, not one sample, so a
training loop still draws a fresh latent each step (LDM, Rombach et al. 2022, sec. 3):

    latent = sample_latent(batch["latent_mean"], batch["latent_std"]) * vae.config.scaling_factor

With a text encoder and tokenizer, every distinct caption's last hidden state is cached too
(items then carry ``encoder_hidden_states``), and the empty caption's, for classifier-free
guidance dropout (:attr:`LatentCache.null_encoder_hidden_states`).

A cache lives in ``<cache dir>/latents/<key>/``; the key hashes the dataset's fingerprint
(source, split, subset, resolution, crop, flip), the VAE's and text encoder's config and
weights, the tokenizer's vocabulary and the storage dtype, so changing any of them builds a
new cache and an unchanged run reuses the old one. Files are safetensors (no pickle).

Multi-process runs (accelerate): process r of W encodes the r-th contiguous share of the items
into ``shard-r-of-W.safetensors`` (written under a temporary name and renamed: never seen half
written), all wait, the main process writes ``manifest.json`` the same way, all wait, and every
process opens every shard: :class:`LatentCache` reads an item's rows from its shard when the item is
accessed, so no process holds the latents in memory, however large the dataset. Machines that do not share the cache directory (each
its own disk) each build the whole cache, split among their own processes (``latentdiff.data.nodes``). A shard left by an interrupted run is complete (renamed only when
done) and is reused.

Random crops cannot be cached (a cache holds one view per image): ``cache_latents`` refuses
them. Random flips can: both the image and its mirror are encoded and an item picks one at
random.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import os
import struct
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import Dataset

from latentdiff.data.dataset import EpochSeeded, pick_caption
from latentdiff.data.files import atomic_path, default_cache_dir, digest
from latentdiff.data.nodes import cache_writers
from latentdiff.data.transforms import latent_mask
from latentdiff.presets import vae_scale_factor
from latentdiff.text import encode_prompts

logger = logging.getLogger(__name__)

VERSION = 2  # 2: aspect-ratio buckets and masks
NULL_CAPTION = ""


def sample_latent(latent_mean: torch.Tensor, latent_std: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """z = mean + std * eps, eps ~ N(0, I): the reparameterised VAE posterior sample (Kingma & Welling 2014)."""
    device = generator.device if generator is not None else latent_mean.device
    eps = torch.randn(latent_mean.shape, generator=generator, device=device, dtype=latent_mean.dtype)
    return latent_mean + latent_std * eps.to(latent_mean.device)


def model_digest(model: torch.nn.Module) -> str:
    """A hash of a model's config (without bookkeeping keys such as its path) and of every weight."""
    config = model.config.to_dict() if hasattr(model.config, "to_dict") else dict(model.config)
    config = {k: v for k, v in config.items() if not k.startswith("_") and k != "transformers_version"}
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        h.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        h.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def tokenizer_digest(tokenizer) -> str:
    return digest(type(tokenizer).__name__, tokenizer.model_max_length, sorted(tokenizer.get_vocab().items()))


class LatentCache(EpochSeeded, Dataset):
    """Cached items ``{"latent_mean", "latent_std", "text"[, "encoder_hidden_states"]}``, read from the
    shard files on access: what a process holds grows with the number of distinct captions (their
    text and two indices per item), not with the latents.

    ``latent_mean``/``latent_std``: (C, h, w), unscaled (multiply samples by the VAE's
    ``scaling_factor``). When images were cached with their mirror, each access picks one of the
    two at random; with several captions, one at random.
    """

    def __init__(self, shards: list[ShardReader], caption_offsets: torch.Tensor, caption_ids: torch.Tensor,
                 captions: list[str], text_rows: torch.Tensor | None = None, folder: Path | None = None):
        self.shards = shards
        self.starts = [0]  # item i lies in the shard s with starts[s] <= i < starts[s + 1]
        for shard in shards:
            self.starts.append(self.starts[-1] + shard.items)
        self.views = next((shard.views for shard in shards if shard.views), 1)
        self.caption_offsets = caption_offsets  # (N + 1,): item i's captions are caption_ids[off[i]:off[i+1]]
        self.caption_ids = caption_ids  # indices into captions
        self.captions = captions  # distinct captions; captions[0] is ""
        self.text_rows = text_rows  # (len(captions), 2): the shard and row holding each caption's states, or None
        # the empty caption's states (L, D), for classifier-free guidance dropout; None without text
        self.null_encoder_hidden_states = None if text_rows is None else self._text_states(0)
        self.folder = folder
        self.masked = any(shard.masked for shard in shards)

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, index: int) -> dict:
        if not -len(self) <= index < len(self):
            raise IndexError(f"item {index} of a latent cache of {len(self)}")
        index %= len(self)
        generator = self.item_generator(index)
        view = int(torch.randint(self.views, (), generator=generator)) if self.views > 1 else 0
        ids = self.caption_ids[self.caption_offsets[index]:self.caption_offsets[index + 1]].tolist()
        caption_id = int(pick_caption(ids, generator))
        s = bisect.bisect_right(self.starts, index) - 1
        shard = self.shards[s]
        suffix, row = shard.locate(index - self.starts[s])
        item = {
            "latent_mean": shard.read("latent_mean" + suffix, row, view),  # (C, h, w)
            "latent_std": shard.read("latent_std" + suffix, row, view),  # (C, h, w)
            "text": self.captions[caption_id],
        }
        if shard.masked:
            item["mask"] = shard.read("mask" + suffix, row, view)  # (1, h, w): the loss mask on the latent grid
        if self.text_rows is not None:
            item["encoder_hidden_states"] = self._text_states(caption_id)  # (L, D)
        return item

    def bucket_targets(self) -> list[tuple[int, int]] | None:
        """Each item's aspect-ratio bucket (width, height) in pixels, for batching; None without buckets."""
        if not any(shard.sizes for shard in self.shards):
            return None
        return [tuple(shard.sizes[k]) for shard in self.shards for k in shard.bucket_index[:, 0].tolist()]

    def _text_states(self, caption_id: int) -> torch.Tensor:
        s, row = self.text_rows[caption_id].tolist()
        return self.shards[s].read("text_hidden_states", row)  # (L, D)

    @property
    def latent_mean(self) -> torch.Tensor:
        """Every item's mean (N, V, C, h, w), read from disk now: to inspect a cache (of one size), not to train from."""
        return torch.cat([shard.read_all("latent_mean") for shard in self.shards])

    @property
    def latent_std(self) -> torch.Tensor:
        """Every item's std (N, V, C, h, w), read from disk now: to inspect a cache (of one size), not to train from."""
        return torch.cat([shard.read_all("latent_std") for shard in self.shards])

    @classmethod
    def load(cls, folder: str | os.PathLike) -> LatentCache:
        """Open the cache in ``folder``: its captions and indices are read now, its tensors on access."""
        folder = Path(folder)
        manifest = json.loads((folder / "manifest.json").read_text())
        shards, offsets, ids, text_rows = [], [0], [], []
        captions: list[str] = []  # every shard lists "" first, so captions[0] == ""
        index: dict[str, int] = {}
        for s, name in enumerate(manifest["shards"]):
            shards.append(ShardReader(folder / name))
            with safe_open(folder / name, framework="pt") as f:
                shard_captions = json.loads(f.metadata()["captions"])
                has_text = "text_hidden_states" in f.keys()
                shard_offsets, shard_ids = f.get_tensor("caption_offsets"), f.get_tensor("caption_ids")
            remap = []
            for j, caption in enumerate(shard_captions):
                if caption not in index:
                    index[caption] = len(captions)
                    captions.append(caption)
                    if has_text:
                        text_rows.append((s, j))
                remap.append(index[caption])
            offsets.extend((shard_offsets[1:] + offsets[-1]).tolist())
            ids.append(torch.tensor(remap, dtype=torch.long)[shard_ids])
        return cls(shards, torch.tensor(offsets), torch.cat(ids), captions,
                   torch.tensor(text_rows, dtype=torch.long) if text_rows else None, folder)


class ShardReader:
    """One safetensors shard, read one row at a time with positioned reads (``os.pread``).

    Not a memory map: pages of a mapped file that were read count in the resident set of every
    process that mapped them until the kernel reclaims them, so after one epoch each process's
    peak RSS would be the size of the cache (measured with safetensors' ``get_slice``: +630 MB
    after reading a 655 MB shard once). A read lands in a new tensor and the file's pages stay in
    the page cache, shared by all processes. The file descriptor is opened on first use in each
    process, so a DataLoader worker forked (or spawned) from a process that read items opens its own.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        with open(self.path, "rb") as f:  # the safetensors layout: u64 header size, JSON header, data
            (header_size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_size))
        metadata = header.pop("__metadata__", None) or {}
        self.data_start = 8 + header_size
        self.tensors = {name: (_DTYPES[info["dtype"]], tuple(info["shape"]), info["data_offsets"][0])
                        for name, info in header.items()}
        self._fd, self._pid = None, None
        # buckets: each bucket's [width, height] and each item's (bucket, row); without, one tensor of all items
        self.sizes = json.loads(metadata["sizes"]) if "sizes" in metadata else None
        self.bucket_index = self.read_all("bucket_index") if self.sizes is not None else None
        self.items = self.tensors["caption_offsets"][1][0] - 1
        means = [shape for name, (_, shape, _) in self.tensors.items() if name.startswith("latent_mean")]
        self.views = next((shape[1] for shape in means), 0)
        self.masked = any(name.startswith("mask") for name in self.tensors)

    def locate(self, item: int) -> tuple[str, int]:
        """The tensor-name suffix and the row of item ``item`` of this shard."""
        if self.sizes is None:
            return "", item
        k, row = self.bucket_index[item].tolist()
        width, height = self.sizes[k]
        return f"@{width}x{height}", row

    def shape(self, name: str) -> tuple[int, ...]:
        return self.tensors[name][1]

    def read(self, name: str, *index: int) -> torch.Tensor:
        """``tensor[index]`` of the tensor ``name``, read from the file now."""
        dtype, shape, begin = self.tensors[name]
        row = 0
        for i, size in zip(index, shape, strict=False):
            if not 0 <= i < size:
                raise IndexError(f"index {index} out of range for {name} of shape {shape} in {self.path}")
            row = row * size + i
        out = torch.empty(shape[len(index):], dtype=dtype)
        buffer = out.view(-1).view(torch.uint8).numpy()
        offset = self.data_start + begin + row * buffer.nbytes
        if os.preadv(self._file(), [buffer], offset) != buffer.nbytes:
            raise OSError(f"{self.path} ends before {name}{list(index)}: the file is cut short")
        return out

    def read_all(self, name: str) -> torch.Tensor:
        with safe_open(self.path, framework="pt") as f:
            return f.get_tensor(name)

    def _file(self) -> int:
        if self._pid != os.getpid():
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        return self._fd

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fd": None, "_pid": None}

    def __del__(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32}


def cache_latents(dataset, vae, *, cache_dir: str | os.PathLike | None = None, text_encoder=None, tokenizer=None,
                  accelerator=None, batch_size: int = 32, dtype: torch.dtype = torch.float32) -> LatentCache:
    """The :class:`LatentCache` of ``dataset`` under ``vae`` (and ``text_encoder``): loaded from disk
    when an identical run built it before, encoded and saved now otherwise.

    ``dataset`` is a :class:`~latentdiff.data.dataset.CaptionedImageDataset` (anything with
    ``fingerprint``, ``random_crop``, ``random_flip``, ``image(i, flip)`` and ``captions(i)``).
    Under accelerate, call it on every process with the ``accelerator``; each encodes its share.
    """
    if getattr(dataset, "fingerprint", None) is None:
        raise TypeError(f"cannot cache a {type(dataset).__name__}: it has no fingerprint to key the cache by; "
                        "use a dataset from latentdiff.data.build_dataset")
    if dataset.random_crop:
        raise ValueError("cannot cache latents of random crops: every epoch sees another crop and a cache holds "
                         "one. Drop --random_crop (center crops are cached) or do not cache latents")
    if (text_encoder is None) != (tokenizer is None):
        raise ValueError("caching text needs both text_encoder and tokenizer (or neither)")
    views = 2 if dataset.random_flip else 1
    key = digest(
        VERSION, dataset.fingerprint, views, getattr(dataset, "masked", False), str(dtype), model_digest(vae),
        None if text_encoder is None else (model_digest(text_encoder), tokenizer_digest(tokenizer)),
    )
    folder = Path(cache_dir or default_cache_dir()) / "latents" / key
    manifest = folder / "manifest.json"
    rank, world, writes_manifest = cache_writers(accelerator, folder)  # on a machine's own disk, its share of all
    shard = f"shard-{rank:05d}-of-{world:05d}.safetensors"
    if manifest.exists():
        logger.info("latent cache hit: %s", folder)
    elif not (folder / shard).exists():
        start, end = rank * len(dataset) // world, (rank + 1) * len(dataset) // world
        logger.info("latent cache miss: encoding items %d-%d of %s into %s", start, end, dataset.name, folder / shard)
        tensors, captions, sizes = _encode(dataset, range(start, end), views, vae, text_encoder, tokenizer, batch_size, dtype)
        write_shard(folder / shard, tensors, captions, sizes)
    # Every process passes both barriers, hit or miss, so that none waits for one that went ahead.
    if accelerator is not None:
        accelerator.wait_for_everyone()
    if writes_manifest and not manifest.exists():
        write_manifest(folder, len(dataset), views, [f"shard-{r:05d}-of-{world:05d}.safetensors" for r in range(world)])
    if accelerator is not None:
        accelerator.wait_for_everyone()
    cache = LatentCache.load(folder)
    cache.seed = dataset.seed
    return cache


def write_shard(path: Path, tensors: dict[str, torch.Tensor], captions: list[str],
                sizes: list[list[int]] | None = None) -> None:
    """One shard: ``latent_mean``/``latent_std`` (n, V, C, h, w), ``caption_offsets`` (n + 1,),
    ``caption_ids`` into ``captions`` (which start with ""), optionally ``text_hidden_states``
    (len(captions), L, D) and ``mask`` (n, V, 1, h, w). With aspect-ratio buckets (``sizes``: each bucket's
    [width, height]), the latents of bucket [w, h] are ``latent_mean@WxH`` etc. and ``bucket_index`` (n, 2)
    gives each item's (bucket, row). Written under a temporary name and renamed."""
    metadata = {"captions": json.dumps(captions)}
    if sizes is not None:
        metadata["sizes"] = json.dumps(sizes)
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)


def write_manifest(folder: Path, items: int, views: int, shards: list[str]) -> None:
    """What makes ``folder`` a complete cache: written last, once every shard is."""
    with atomic_path(folder / "manifest.json") as tmp:
        tmp.write_text(json.dumps({"version": VERSION, "items": items, "views": views, "shards": shards}))


@torch.no_grad()
def _encode(dataset, positions: range, views: int, vae, text_encoder, tokenizer, batch_size: int, dtype: torch.dtype):
    """Encode ``dataset[positions]``: latent mean/std of each view (and the loss mask on the latent grid with
    ``--masked_loss``), and the distinct captions. Images are encoded a bucket at a time (one size per VAE
    batch); a dataset without buckets is one square bucket, stored under the plain names."""
    device, vae_dtype = next(vae.parameters()).device, next(vae.parameters()).dtype
    masked = getattr(dataset, "masked", False)
    bucketed = getattr(dataset, "bucket_targets", lambda: None)() is not None
    groups: dict[tuple[int, int], list[int]] = {}
    for position in positions:
        groups.setdefault(dataset.target(position), []).append(position)  # the square without buckets
    sizes = sorted(groups)
    found: dict[int, tuple[int, int]] = {}  # position -> (bucket, row) of what was encoded
    tensors: dict[str, torch.Tensor] = {}
    for k, size in enumerate(sizes):
        means, stds, masks, rows = [], [], [], 0
        members = groups[size]
        for first in range(0, len(members), batch_size):
            images, kept = [], []
            for position in members[first:first + batch_size]:
                try:
                    if masked:
                        pairs = [dataset.image_and_mask(position, flip=bool(v)) for v in range(views)]
                        images.append(tuple(torch.stack(t) for t in zip(*pairs, strict=True)))
                    else:
                        images.append((torch.stack([dataset.image(position, flip=bool(v)) for v in range(views)]),))
                except Exception as error:  # a file that fails to decode is left out of the cache, as out of training
                    dataset.skipped.add_decode_failure(str(position), error)
                    continue
                kept.append(position)
            if not kept:
                continue
            pixels = torch.stack([i[0] for i in images]).flatten(0, 1).to(device, vae_dtype)  # (B * V, 3, H, W)
            posterior = vae.encode(pixels).latent_dist
            means.append(posterior.mean.unflatten(0, (len(kept), views)).to("cpu", dtype))  # (B, V, C, h, w)
            stds.append(posterior.std.unflatten(0, (len(kept), views)).to("cpu", dtype))  # (B, V, C, h, w)
            if masked:
                pixel_masks = torch.stack([i[1] for i in images]).flatten(0, 1)  # (B * V, 1, H, W)
                grid = latent_mask(pixel_masks, posterior.mean.shape[-2:])
                masks.append(grid.unflatten(0, (len(kept), views)).to(dtype))  # (B, V, 1, h, w)
            for position in kept:
                found[position] = (k, rows)
                rows += 1
        suffix = f"@{size[0]}x{size[1]}" if bucketed else ""
        empty = (0, views, *_latent_shape(vae, size))
        tensors["latent_mean" + suffix] = torch.cat(means) if means else torch.empty(empty, dtype=dtype)
        tensors["latent_std" + suffix] = torch.cat(stds) if stds else torch.empty(empty, dtype=dtype)
        if masked:
            tensors["mask" + suffix] = torch.cat(masks) if masks else torch.empty((0, views, 1, *empty[-2:]), dtype=dtype)
    if not sizes:  # an empty share
        square = (dataset.resolution,) * 2
        tensors["latent_mean"] = tensors["latent_std"] = torch.empty((0, views, *_latent_shape(vae, square)), dtype=dtype)
    offsets, caption_ids, order = [0], [], sorted(found)
    captions, index = [NULL_CAPTION], {NULL_CAPTION: 0}
    for position in order:
        for caption in dataset.captions(position):
            caption_ids.append(index.setdefault(caption, len(index)))
            if len(index) > len(captions):
                captions.append(caption)
        offsets.append(len(caption_ids))
    tensors["caption_offsets"] = torch.tensor(offsets, dtype=torch.long)
    tensors["caption_ids"] = torch.tensor(caption_ids, dtype=torch.long)
    if bucketed:  # item i of the shard is row bucket_index[i, 1] of the tensors of bucket bucket_index[i, 0]
        tensors["bucket_index"] = torch.tensor([found[p] for p in order], dtype=torch.long).reshape(-1, 2)
    if text_encoder is not None:
        tensors["text_hidden_states"] = encode_text(captions, text_encoder, tokenizer, batch_size).to(dtype)
    return tensors, captions, [list(size) for size in sizes] if bucketed else None


def _latent_shape(vae, size: tuple[int, int]) -> tuple[int, int, int]:
    factor = vae_scale_factor(vae)
    return vae.config.latent_channels, size[1] // factor, size[0] // factor


@torch.no_grad()
def encode_text(captions: list[str], text_encoder, tokenizer, batch_size: int = 32) -> torch.Tensor:
    """The text encoder's last hidden states (N, L, D) for ``captions``, padded to the tokenizer's length."""
    hidden = [encode_prompts(tokenizer, text_encoder, captions[first:first + batch_size]).cpu()  # (B, L, D)
              for first in range(0, len(captions), batch_size)]
    return torch.cat(hidden)
