"""Aspect-ratio buckets and masked loss on real photographs (scikit-image's), through build_dataset, the batch
sampler accelerate shards, the latent cache and train_ldm."""

import argparse
import logging
import math
import os
import shutil

import numpy as np
import pytest
import torch
from accelerate.data_loader import BatchSamplerShard
from PIL import Image

from latentdiff.data import add_data_args, build_dataloader, build_dataset, cache_latents
from latentdiff.data.buckets import BucketBatchSampler, BucketSpec, assign, nearest
from latentdiff.data.transforms import preprocess
from latentdiff.presets import vae_from_preset
from latentdiff.training.diffusion_loss import diffusion_loss

skimage_data = pytest.importorskip("skimage.data", reason="scikit-image (a dev dependency) ships the photographs")
PHOTOS = os.path.dirname(skimage_data.__file__)
# name: (file, caption); sizes as shipped: a 451x300 cat, 600x400 coffee, 741x500 motorcycle, 640x427 rocket,
# 512x512 astronaut, 400x328 horse (RGBA: its alpha is a mask), 384x191 page, 448x172 text
SOURCES = {
    "cat": ("chelsea.png", "a cat"), "coffee": ("coffee.png", "a cup of coffee"),
    "motorcycle": ("motorcycle_left.png", "a motorcycle"), "rocket": ("rocket.jpg", "a rocket on its pad"),
    "astronaut": ("astronaut.png", "an astronaut"), "horse": ("horse.png", "a horse"),
    "page": ("page.png", "a page of text"), "text": ("text.png", "text on paper"),
}


def parse(*flags):
    parser = add_data_args(argparse.ArgumentParser())
    parser.add_argument("--masked_loss", action="store_true")
    parser.add_argument("--train_batch_size", type=int, default=1)
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1)
    return parser.parse_args([str(f) for f in flags])


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """The photographs with captions, and the rocket once more as a phone stores a portrait: landscape pixels
    with EXIF orientation 6 (a quarter turn)."""
    root = tmp_path_factory.mktemp("photos")
    for name, (file, caption) in SOURCES.items():
        shutil.copy(os.path.join(PHOTOS, file), root / f"{name}{os.path.splitext(file)[1]}")
        (root / f"{name}.txt").write_text(caption)
    rocket = Image.open(os.path.join(PHOTOS, "rocket.jpg"))
    exif = Image.Exif()
    exif[0x0112] = 6
    rocket.save(root / "portrait.jpg", exif=exif, quality=95)
    (root / "portrait.txt").write_text("a rocket, upright")
    return root


BUCKETS = ("--enable_bucket", "--resolution", 256, "--min_bucket_reso", 128, "--max_bucket_reso", 512,
           "--bucket_reso_steps", 32)  # fmt: skip


def test_buckets_are_sd_scripts_and_an_image_goes_to_the_nearest_aspect():
    sizes = BucketSpec(512).sizes()  # sd-scripts' defaults: 256..1024 in steps of 64
    assert (512, 512) in sizes and (256, 1024) in sizes and (1024, 256) in sizes and (640, 384) in sizes
    assert all(w % 64 == 0 and h % 64 == 0 and 256 <= min(w, h) and max(w, h) <= 1024 for w, h in sizes)
    assert all(w * h <= 512 * 512 for w, h in sizes) and all((h, w) in sizes for w, h in sizes)
    assert nearest((451, 300), sizes) == (640, 384)  # aspect 1.50: 1.67 is nearer than 1.29 (in log ratio)
    assert nearest((300, 451), sizes) == (384, 640)
    with pytest.raises(ValueError, match=r"--resolution 32 must lie within --min_bucket_reso 256"):
        BucketSpec(32).sizes()
    with pytest.raises(ValueError, match=r"--max_bucket_reso 1000 is not a multiple of --bucket_reso_steps 64"):
        BucketSpec(512, high=1000).sizes()


def test_photos_keep_their_aspect_and_more_pixels_than_a_center_square(photos, caplog):
    """Each photo is cut to its bucket (sides multiples of 32, about 256^2 pixels), upright, losing far less than
    the center square does; the table of buckets is logged; batches hold one bucket each."""
    with caplog.at_level(logging.INFO, logger="latentdiff"):
        dataset = build_dataset(parse("--train_data_dir", photos, *BUCKETS))
    assert "aspect-ratio buckets" in caplog.text and "x" in caplog.text
    by_caption = {dataset.captions(i)[0]: i for i in range(len(dataset))}
    sizes = dict(zip((dataset.captions(i)[0] for i in range(len(dataset))), dataset.image_sizes(), strict=True))
    assert sizes["a cat"] == (451, 300) and sizes["a rocket, upright"] == (427, 640)  # EXIF applied
    kept_bucket, kept_square = [], []
    for caption, i in by_caption.items():
        pixels = dataset[i]["pixel_values"]
        (w, h), (height, width) = sizes[caption], pixels.shape[1:]
        assert width % 32 == 0 and height % 32 == 0 and 0.7 * 256**2 <= width * height <= 256**2
        assert abs(math.log((width / height) / (w / h))) < 0.25, caption  # the bucket's aspect is near the photo's
        kept_bucket.append(min(w / h, width / height) / max(w / h, width / height))  # share of the photo kept
        kept_square.append(min(w, h) / max(w, h))
    assert dataset.captions(by_caption["a rocket, upright"])[0] and dataset[by_caption["a rocket, upright"]][
        "pixel_values"].shape[1] > dataset[by_caption["a rocket, upright"]]["pixel_values"].shape[2]  # portrait
    assert np.mean(kept_bucket) > 0.9 > 0.75 > np.mean(kept_square)
    for batch in build_dataloader(dataset, batch_size=2, seed=0):
        assert batch["pixel_values"].ndim == 4  # stacked: one size per batch


def test_small_buckets_merge_and_a_too_small_image_is_skipped_with_a_count(photos, tmp_path, caplog):
    """A global batch of 2 x 2 accumulation = 4 images: every bucket with fewer is merged into its neighbour; a
    photo with a side below --min_bucket_reso is left out and counted, not upscaled."""
    folder = tmp_path / "photos"
    shutil.copytree(photos, folder)
    Image.new("RGB", (100, 400), "red").save(folder / "thin.png")
    (folder / "thin.txt").write_text("a thin red strip")
    with caplog.at_level(logging.INFO, logger="latentdiff"):
        dataset = build_dataset(parse("--train_data_dir", folder, *BUCKETS, "--train_batch_size", 2,
                                      "--gradient_accumulation_steps", 2))
    assert dataset.skipped.counts()["smaller than the smallest bucket"] == 1 and "thin.png" in caplog.text
    assert len(dataset) == 9 and "merged into" in caplog.text
    counts = {}
    for target in dataset.bucket_targets():
        counts[target] = counts.get(target, 0) + 1
    assert min(counts.values()) >= 4


def test_assign_never_leaves_an_empty_epoch():
    """Fewer images than one global batch in all: one bucket remains and is repeated to fill the batch."""
    targets, notes = assign([(451, 300), (300, 451), (500, 500)], BucketSpec(256, 128, 512, 32), min_count=8)
    assert len(set(targets)) == 1 and "repeated" in notes[-1]
    sampler = BucketBatchSampler(targets, batch_size=4, group=2)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 2 and sorted(set(sum(batches, []))) == [0, 1, 2]


def test_every_process_draws_the_same_bucket_at_every_step_and_the_order_is_seeded():
    """2 processes x 2 accumulation steps, batches sharded the way accelerate does: at every optimizer step the 4
    micro-batches are of one bucket; each image is seen at least once an epoch; an epoch's order is a function
    of (seed, epoch)."""
    rng = np.random.default_rng(0)
    targets = [[(64, 32), (32, 64), (48, 48)][i] for i in rng.integers(0, 3, 50)]
    sampler = BucketBatchSampler(targets, batch_size=3, group=4, seed=5)
    shards = [BatchSamplerShard(sampler, num_processes=2, process_index=r) for r in range(2)]
    per_process = [list(shard) for shard in shards]
    assert len(per_process[0]) == len(per_process[1]) == len(shards[0])
    for step in range(len(per_process[0]) // 2):
        micro = [b for p in per_process for b in p[2 * step:2 * step + 2]]
        assert len({targets[i] for b in micro for i in b}) == 1
    assert set(i for p in per_process for b in p for i in b) == set(range(50))
    first = list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) != first
    sampler.set_epoch(0)
    assert list(sampler) == first == list(BucketBatchSampler(targets, batch_size=3, group=4, seed=5))


def test_a_resumed_epoch_yields_the_batches_of_an_unbroken_one(photos):
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    from latentdiff.training.checkpointing import resumed_batches

    dataset = build_dataset(parse("--train_data_dir", photos, *BUCKETS, "--random_flip"))
    accelerator = Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=1))
    run = argparse.Namespace(max_train_steps=8, gradient_accumulation_steps=1, num_train_epochs=2)

    def texts(global_step, workers):
        loader = accelerator.prepare(build_dataloader(dataset, 1, seed=1, num_workers=workers))
        return [(b["text"][0], b["pixel_values"].sum().item()) for b in resumed_batches(accelerator, loader, run, global_step)]

    unbroken = texts(0, 0)
    assert len(unbroken) == 2 * len(dataset) and unbroken[: len(dataset)] != unbroken[len(dataset):]
    assert texts(3, 2) == unbroken[3:]


def test_shards_of_the_photos_bucket_as_the_folder_does(photos, tmp_path):
    """latentdiff prepare, then --enable_bucket on the shards: the buckets come from the index (nothing decoded
    to build them) and every item, read at its offset, equals the folder's."""
    from latentdiff.cli import main as cli
    from latentdiff.data.shards import ShardStream

    assert cli(["prepare", str(photos), str(tmp_path / "shards"), "--shard_size", "3"]) == 0
    folder = build_dataset(parse("--train_data_dir", photos, *BUCKETS))
    shards = build_dataset(parse("--train_data_dir", tmp_path / "shards", *BUCKETS))
    assert isinstance(shards, ShardStream) and len(shards) == len(folder)
    by_caption = {folder.captions(i)[0]: folder[i]["pixel_values"] for i in range(len(folder))}
    for i in range(len(shards)):
        item = shards[i]
        assert torch.equal(item["pixel_values"], by_caption[item["text"]])
    batches = list(build_dataloader(shards, batch_size=2, seed=0))
    assert sum(len(b["text"]) for b in batches) >= len(shards) and all(b["pixel_values"].ndim == 4 for b in batches)


def test_the_latent_cache_stores_each_image_at_its_bucket_size(photos, tmp_path):
    torch.manual_seed(0)
    vae = vae_from_preset("tiny").eval()  # f = 2
    dataset = build_dataset(parse("--train_data_dir", photos, *BUCKETS))
    cached = cache_latents(dataset, vae, cache_dir=tmp_path)
    assert cached.bucket_targets() == dataset.bucket_targets()
    for i in (0, 3, len(dataset) - 1):
        width, height = dataset.target(i)
        assert cached[i]["latent_mean"].shape == (4, height // 2, width // 2)
        expected = vae.encode(dataset.image(i)[None]).latent_dist.mean[0]
        assert torch.allclose(cached[i]["latent_mean"], expected, atol=1e-5)
    square = cache_latents(build_dataset(parse("--train_data_dir", photos, "--resolution", 64)), vae, cache_dir=tmp_path)
    assert square.folder != cached.folder and square.bucket_targets() is None  # the buckets are in the key
    batches = list(build_dataloader(cached, batch_size=2, seed=0))
    assert sum(len(b["text"]) for b in batches) >= len(dataset)


def test_masks_from_a_file_or_the_alpha_channel_follow_the_crop(photos, tmp_path):
    """photo_mask.png beside photo.png masks it (and is no training image itself); an RGBA image's alpha channel
    masks it; a mask of another size is skipped and counted; the masked loss ignores what the mask leaves out."""
    folder = tmp_path / "masked"
    shutil.copytree(photos, folder)
    mask = np.zeros((300, 451), np.uint8)
    mask[:, :225] = 255  # the left half of the cat
    Image.fromarray(mask).save(folder / "cat_mask.png")
    Image.new("L", (10, 10), 255).save(folder / "coffee_mask.png")  # of another size
    rgba = Image.open(folder / "cat.png").convert("RGBA")
    alpha = np.zeros((300, 451), np.uint8)
    alpha[:150] = 255  # the top half of the photo is opaque
    rgba.putalpha(Image.fromarray(alpha))
    rgba.save(folder / "cutout.png")
    (folder / "cutout.txt").write_text("a cut-out cat")
    dataset = build_dataset(parse("--train_data_dir", folder, "--resolution", 64, "--masked_loss"))
    by_caption = {dataset.captions(i)[0]: i for i in range(len(dataset))}
    assert len(dataset) == len(SOURCES) + 2  # the masks are not images
    cat = dataset[by_caption["a cat"]]
    assert cat["mask"].shape == (1, 64, 64) and cat["mask"][0, :, :20].min() == 1 and cat["mask"][0, :, 44:].max() == 0
    cutout = dataset[by_caption["a cut-out cat"]]["mask"]
    assert cutout[0, :28].min() == 1 and cutout[0, 36:].max() == 0  # the alpha channel, cut to the center square
    assert dataset[by_caption["a motorcycle"]]["mask"].min() == 1  # no alpha, no mask file: all of it counts
    for i in range(len(dataset)):
        dataset[i]
    assert dataset.skipped.counts()["mask of another size"] == 1

    x0 = torch.randn(1, 4, 8, 8)
    loss_mask = torch.zeros(1, 1, 8, 8)
    loss_mask[..., :4] = 1

    class Scheduler:
        config = argparse.Namespace(num_train_timesteps=10, prediction_type="epsilon")

        def add_noise(self, x0, noise, t):
            return x0 + noise

    def gradient(mask):
        prediction = torch.zeros(1, 4, 8, 8, requires_grad=True)
        diffusion_loss(lambda x, t, c: prediction, x0, None, Scheduler(), loss_mask=mask,
                       generator=torch.Generator().manual_seed(0)).backward()
        return prediction.grad

    grad = gradient(loss_mask)
    assert grad[..., 4:].abs().max() == 0 and grad[..., :4].abs().min() > 0
    assert torch.equal(grad[..., :4], gradient(None)[..., :4])


def test_preprocess_cuts_mask_and_image_alike():
    image = Image.new("RGB", (90, 60), "white")
    mask = Image.new("L", (90, 60), 0)
    mask.paste(255, (0, 0, 45, 60))
    pixels, cut = preprocess(image, (32, 32), flip=True, mask=mask)
    assert pixels.shape == (3, 32, 32) and cut.shape == (1, 32, 32)
    assert cut[0, :, -8:].min() == 1 and cut[0, :, :8].max() == 0  # mirrored with the image


def train_flags(photos, tmp_path, *extra):
    torch.manual_seed(0)
    vae_from_preset("tiny").save_pretrained(tmp_path / "vae")
    return [
        "--output_dir", tmp_path / "run", "--train_data_dir", photos, "--enable_bucket", "--resolution", 32,
        "--min_bucket_reso", 16, "--max_bucket_reso", 64, "--bucket_reso_steps", 16, "--data_cache_dir",
        tmp_path / "cache", "--pretrained_vae_name_or_path", tmp_path / "vae", "--unet_preset", "tiny",
        "--train_batch_size", 2, "--report_to", "none", *extra,
    ]  # fmt: skip


def test_train_ldm_on_photos_with_buckets_cached_latents_masks_and_a_wide_validation(photos, tmp_path):
    from scripts import load_script, run_script

    from latentdiff import LatentDiffPipeline

    train_ldm = load_script("train_ldm")
    argv = train_flags(photos, tmp_path, "--max_train_steps", 3, "--cache_latents", "--masked_loss",
                       "--validation_prompts", "a cat", "--num_validation_images", 1, "--validation_steps", 3,
                       "--validation_inference_steps", 2, "--validation_height", 32, "--validation_width", 48)
    pipeline_dir = run_script(train_ldm, argv)
    grid = Image.open(tmp_path / "run" / "validation" / "step-000003.png")
    assert grid.size[0] > grid.size[1]  # one 48 x 32 image
    pipeline = LatentDiffPipeline.from_pretrained(pipeline_dir)
    image = pipeline("a cat", height=48, width=32, num_inference_steps=2, output_type="pt").images
    assert image.shape == (1, 3, 48, 32)

    bad = [*train_flags(photos, tmp_path / "bad"), "--max_train_steps", 1, "--resolution", 30, "--bucket_reso_steps",
           6, "--min_bucket_reso", 12, "--max_bucket_reso", 60]  # fmt: skip
    with pytest.raises(ValueError, match=r"--bucket_reso_steps 6 is not a multiple of 4, which this VAE and UNet"):
        run_script(train_ldm, bad)


def test_two_processes_train_on_buckets_in_step(photos, tmp_path):
    """Two processes, accumulation 2: each step's 4 micro-batches are one bucket, so both replicas run (a bucket
    mismatch would still train, a count mismatch would hang) and end with the same weights."""
    from pathlib import Path

    from scripts import launch_two_processes

    script = Path(__file__).resolve().parents[1] / "training" / "train_ldm.py"
    argv = train_flags(photos, tmp_path, "--max_train_steps", 2, "--gradient_accumulation_steps", 2,
                       "--train_batch_size", 1)
    log = launch_two_processes(script, argv, step=2)
    assert "aspect-ratio buckets" in log
