"""The latent cache: hit, miss, invalidation, text states, flips, and multi-process shards."""

import threading

import pytest
import torch

from latentdiff.data import cache as cache_module
from latentdiff.data import cache_latents, sample_latent
from latentdiff.data.cache import encode_text
from latentdiff.data.shapes import ShapesDataset
from latentdiff.presets import text_encoder_from_preset, tokenizer_for, vae_from_preset


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    return vae_from_preset("tiny").eval()


def shapes(resolution=32, n=10):
    return ShapesDataset(resolution, "train").subset(range(n))


def count_encodes(monkeypatch):
    calls = []
    original = cache_module._encode

    def counting(dataset, positions, *args):
        calls.append(len(positions))
        return original(dataset, positions, *args)

    monkeypatch.setattr(cache_module, "_encode", counting)
    return calls


def test_miss_then_hit_returns_the_posterior(tmp_path, vae, monkeypatch):
    calls = count_encodes(monkeypatch)
    dataset = shapes()
    cached = cache_latents(dataset, vae, cache_dir=tmp_path, batch_size=4)
    assert calls == [10] and len(cached) == 10
    item = cached[3]
    assert item["latent_mean"].shape == (4, 16, 16) and item["text"] == dataset.captions(3)[0]
    with torch.no_grad():
        posterior = vae.encode(dataset.image(3)[None]).latent_dist
    assert torch.allclose(item["latent_mean"], posterior.mean[0], atol=1e-5)
    assert torch.allclose(item["latent_std"], posterior.std[0], atol=1e-5)

    again = cache_latents(shapes(), vae, cache_dir=tmp_path, batch_size=4)
    assert calls == [10]  # hit: nothing encoded
    assert torch.equal(again.latent_mean, cached.latent_mean)
    z1, z2 = (sample_latent(item["latent_mean"], item["latent_std"]) for _ in range(2))
    assert not torch.equal(z1, z2)  # a fresh sample per step


def test_changed_weights_resolution_or_data_rebuild(tmp_path, vae, monkeypatch):
    calls = count_encodes(monkeypatch)
    cache_latents(shapes(), vae, cache_dir=tmp_path)
    other_vae = vae_from_preset("tiny")
    other_vae.load_state_dict(vae.state_dict())
    cache_latents(shapes(), other_vae, cache_dir=tmp_path)
    assert len(calls) == 1  # same weights, another object: still a hit
    with torch.no_grad():
        other_vae.encoder.conv_in.bias.add_(1e-3)
    cache_latents(shapes(), other_vae, cache_dir=tmp_path)
    cache_latents(shapes(resolution=48), vae, cache_dir=tmp_path)
    cache_latents(shapes(n=11), vae, cache_dir=tmp_path)
    assert len(calls) == 4
    assert len(list((tmp_path / "latents").iterdir())) == 4


def test_text_encoder_states_and_null_caption(tmp_path, vae):
    torch.manual_seed(0)
    text_encoder = text_encoder_from_preset("tiny").eval()
    tokenizer = tokenizer_for(text_encoder)
    dataset = shapes(n=6)
    cached = cache_latents(dataset, vae, cache_dir=tmp_path, text_encoder=text_encoder, tokenizer=tokenizer)
    item = cached[2]
    expected = encode_text([dataset.captions(2)[0], ""], text_encoder, tokenizer)
    assert item["encoder_hidden_states"].shape == (32, 32)  # (tokens, width) of the tiny text encoder
    assert torch.allclose(item["encoder_hidden_states"], expected[0], atol=1e-5)
    assert torch.allclose(cached.null_encoder_hidden_states, expected[1], atol=1e-5)
    plain = cache_latents(dataset, vae, cache_dir=tmp_path)
    assert "encoder_hidden_states" not in plain[0] and plain.null_encoder_hidden_states is None


def test_random_crop_is_refused_and_flips_cache_both_views(tmp_path, vae):
    dataset = shapes(n=4)
    dataset.random_crop = True
    with pytest.raises(ValueError, match="random crops"):
        cache_latents(dataset, vae, cache_dir=tmp_path)
    dataset.random_crop, dataset.random_flip = False, True
    cached = cache_latents(dataset, vae, cache_dir=tmp_path)
    assert cached.latent_mean.shape[:2] == (4, 2)
    with torch.no_grad():
        mirrored = vae.encode(dataset.image(1, flip=True)[None]).latent_dist.mean[0]
    assert torch.allclose(cached.latent_mean[1, 1], mirrored, atol=1e-5)
    # the view is drawn per (seed, epoch, index): fixed within an epoch, both views across epochs
    assert len({cached[1]["latent_mean"].sum().item() for _ in range(5)}) == 1
    means = set()
    for epoch in range(30):
        cached.set_epoch(epoch)
        means.add(cached[1]["latent_mean"].sum().item())
    assert len(means) == 2


class FakeAccelerator:
    """Two 'processes' as threads, meeting at a barrier like accelerate's wait_for_everyone."""

    def __init__(self, rank, world, barrier):
        self.process_index, self.num_processes, self.barrier = rank, world, barrier
        self.is_main_process = rank == 0

    def wait_for_everyone(self):
        self.barrier.wait(timeout=60)


def test_multi_process_shards_merge_and_are_reused(tmp_path, vae, monkeypatch):
    calls = count_encodes(monkeypatch)
    barrier, results, errors = threading.Barrier(2), {}, []

    def run(rank):
        try:
            results[rank] = cache_latents(shapes(n=9), vae, cache_dir=tmp_path,
                                          accelerator=FakeAccelerator(rank, 2, barrier))
        except Exception as error:  # surfaced below
            errors.append(error)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert sorted(calls) == [4, 5]  # each process encoded its share once
    assert torch.equal(results[0].latent_mean, results[1].latent_mean) and len(results[0]) == 9
    single = cache_latents(shapes(n=9), vae, cache_dir=tmp_path)  # one process later: a hit
    assert len(calls) == 2 and torch.equal(single.latent_mean, results[0].latent_mean)
    assert [single.captions[single.caption_ids[i]] for i in range(9)] == [shapes(n=9).captions(i)[0] for i in range(9)]
    assert not list(tmp_path.rglob("*.tmp"))


def test_uncacheable_dataset_is_refused(tmp_path, vae):
    with pytest.raises(TypeError, match="no fingerprint"):
        cache_latents([torch.zeros(3, 32, 32)], vae, cache_dir=tmp_path)


def write_synthetic_cache(folder, sizes, views=1, shape=(4, 8, 8), dtype=torch.float16, text=False):
    """A cache of random latents in ``len(sizes)`` shards, written with the cache's own writer; returns the
    in-memory reference: every shard's tensors concatenated, and each item's caption."""
    generator = torch.Generator().manual_seed(0)
    means, stds, texts, names, hidden = [], [], [], [], {}
    for s, n in enumerate(sizes):
        captions = ["", *(f"caption {s}-{i % 3}" for i in range(min(n, 3))), "shared caption"]
        ids = [1 + i % 3 if i % 2 else len(captions) - 1 for i in range(n)]
        tensors = {
            "latent_mean": torch.randn((n, views, *shape), generator=generator).to(dtype),
            "latent_std": torch.rand((n, views, *shape), generator=generator).to(dtype),
            "caption_offsets": torch.arange(n + 1, dtype=torch.long),
            "caption_ids": torch.tensor(ids, dtype=torch.long),
        }
        if text:
            tensors["text_hidden_states"] = torch.randn((len(captions), 5, 6), generator=generator).to(dtype)
            for j, caption in enumerate(captions):
                hidden.setdefault(caption, tensors["text_hidden_states"][j])
        names.append(f"shard-{s:05d}-of-{len(sizes):05d}.safetensors")
        cache_module.write_shard(folder / names[-1], tensors, captions)
        means.append(tensors["latent_mean"])
        stds.append(tensors["latent_std"])
        texts += [captions[i] for i in ids]
    cache_module.write_manifest(folder, sum(sizes), views, names)
    return torch.cat(means), torch.cat(stds), texts, hidden


def test_items_are_read_from_disk_bit_identical_to_the_tensors_written(tmp_path):
    mean, std, texts, hidden = write_synthetic_cache(tmp_path, [5, 0, 7], views=2, dtype=torch.bfloat16, text=True)
    cached = cache_module.LatentCache.load(tmp_path)
    assert len(cached) == 12 and cached.captions[0] == ""
    assert torch.equal(cached.null_encoder_hidden_states, hidden[""])
    for epoch in range(3):
        cached.set_epoch(epoch)
        for i in range(12):
            item = cached[i]
            view = int(torch.equal(item["latent_mean"], mean[i, 1]))  # the view this (epoch, item) drew
            assert torch.equal(item["latent_mean"], mean[i, view]) and torch.equal(item["latent_std"], std[i, view])
            assert item["latent_mean"].dtype == torch.bfloat16 and item["text"] == texts[i]
            assert torch.equal(item["encoder_hidden_states"], hidden[texts[i]])  # "shared caption" from shard 0
    assert torch.equal(cached[-1]["latent_std"], cached[11]["latent_std"])
    with pytest.raises(IndexError):
        cached[12]


def test_cache_built_from_images_reads_what_it_saved(tmp_path, vae):
    from safetensors.torch import load_file

    torch.manual_seed(0)
    text_encoder = text_encoder_from_preset("tiny").eval()
    dataset = shapes(n=5)
    dataset.random_flip = True
    cached = cache_latents(dataset, vae, cache_dir=tmp_path, text_encoder=text_encoder,
                           tokenizer=tokenizer_for(text_encoder), dtype=torch.float16)
    saved = load_file(cached.folder / "shard-00000-of-00001.safetensors")
    for i in range(5):
        item = cached[i]
        assert any(torch.equal(item["latent_mean"], saved["latent_mean"][i, v]) for v in range(2))
        assert torch.equal(item["encoder_hidden_states"], saved["text_hidden_states"][cached.caption_ids[i]])


def test_two_dataloader_workers_yield_what_one_process_does(tmp_path):
    from latentdiff.data import build_dataloader

    _, std, _, _ = write_synthetic_cache(tmp_path, [9, 14])
    cached = cache_module.LatentCache.load(tmp_path)
    cached[3]  # the main process has its own file descriptors open before the workers fork
    batches = {workers: list(build_dataloader(cached, batch_size=4, seed=1, num_workers=workers)) for workers in (0, 2)}
    assert len(batches[2]) == 6
    for one, two in zip(batches[0], batches[2], strict=True):
        assert torch.equal(one["latent_mean"], two["latent_mean"]) and one["text"] == two["text"]
    seen = torch.cat([b["latent_std"] for b in batches[2]])  # (23, 4, 8, 8)
    assert sorted(row.numpy().tobytes() for row in seen) == sorted(row.numpy().tobytes() for row in std[:, 0])


def test_the_dataset_holds_no_latents_in_memory(tmp_path):
    import pickle

    mean, *_ = write_synthetic_cache(tmp_path, [300, 300], shape=(4, 16, 16), text=True)
    cached = cache_module.LatentCache.load(tmp_path)
    for i in range(len(cached)):
        cached[i]
    latent_bytes = 2 * mean.numel() * mean.element_size()
    # what a spawned worker receives: captions, two indices per item, one null caption's states
    assert len(pickle.dumps(cached)) < latent_bytes / 50


PEAK_RSS = """
import sys, torch
from latentdiff.data import build_dataloader
from latentdiff.data.cache import LatentCache
cached = LatentCache.load(sys.argv[1])
for batch in build_dataloader(cached, batch_size=256, seed=0):
    pass
print(max(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM")) // 1024)
"""


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/status"), reason="reads VmHWM from /proc (Linux)")
def test_peak_rss_does_not_grow_with_the_number_of_items(tmp_path):
    """A full pass over 2k and over 8k items of 4x32x32 in a fresh process each: 64 MB and 256 MB of
    fp32 mean and std on disk, the same peak in memory."""
    import subprocess
    import sys

    peaks = {}
    for n in (2000, 8000):
        folder = tmp_path / str(n)
        write_synthetic_cache(folder, [n // 2, n // 2], shape=(4, 32, 32), dtype=torch.float32)
        run = subprocess.run([sys.executable, "-c", PEAK_RSS, str(folder)], capture_output=True, text=True, check=True)
        peaks[n] = int(run.stdout.split()[-1])
    assert peaks[8000] - peaks[2000] < 40, peaks  # MB; holding the latents would add 192
