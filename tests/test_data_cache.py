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
