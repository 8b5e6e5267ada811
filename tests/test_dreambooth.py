"""DreamBooth: class images generated only when missing, the prior-preservation loss, instance/class batches,
and training/train_dreambooth.py end to end (full and LoRA), with its errors on bad input."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from scripts import load_script, run_script

from latentdiff import LatentDiffPipeline
from latentdiff.schedulers import DDPMScheduler
from latentdiff.training import text_to_image
from latentdiff.training.diffusion_loss import diffusion_loss
from latentdiff.training.dreambooth import (
    PriorPreservationDataset,
    count_images,
    generate_class_images,
    join_prior_batch,
    prior_preservation_loss,
    prompt_dataset,
)
from latentdiff.training.lora import LORA_WEIGHT_NAME, load_lora

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "training" / "train_dreambooth.py"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base_dir(tiny_pipeline_dir):
    return tiny_pipeline_dir


@pytest.fixture(scope="module")
def instance_dir(tmp_path_factory):
    """Three 16 px images of "the subject" (a red disc at three places); no captions: the prompt is given."""
    path = tmp_path_factory.mktemp("instance")
    for i, (x, y) in enumerate([(5, 5), (10, 6), (7, 10)]):
        yy, xx = np.mgrid[:16, :16]
        pixels = np.full((16, 16, 3), 255, np.uint8)
        pixels[(xx - x) ** 2 + (yy - y) ** 2 <= 9] = (200, 20, 20)
        Image.fromarray(pixels).save(path / f"subject-{i}.png")
    return path


@pytest.fixture(scope="module")
def train_dreambooth():
    return load_script("train_dreambooth")


run = run_script


def flags(base_dir, instance_dir, out, *extra):
    return [
        "--pretrained_model_name_or_path", base_dir, "--instance_data_dir", instance_dir,
        "--instance_prompt", "a photo of sks disc", "--output_dir", out, "--train_batch_size", 2,
        "--report_to", "none", "--max_train_steps", 2, *extra,
    ]  # fmt: skip


def prior_flags(class_dir, num_class_images=4):
    return [
        "--with_prior_preservation", "--class_prompt", "a photo of disc", "--class_data_dir", class_dir,
        "--num_class_images", num_class_images, "--class_inference_steps", 2, "--sample_batch_size", 2,
    ]  # fmt: skip


def test_class_images_are_generated_only_when_missing(base_dir, instance_dir, tmp_path):
    pipe = LatentDiffPipeline.from_pretrained(base_dir)
    pipe.set_progress_bar_config(disable=True)
    folder = tmp_path / "class"
    folder.mkdir()
    for source in sorted(instance_dir.glob("*.png"))[:2]:  # two images there already, and a file that is none
        (folder / source.name).write_bytes(source.read_bytes())
    (folder / "notes.txt").write_text("not an image")
    generate = dict(resolution=16, batch_size=2, num_inference_steps=2)

    assert generate_class_images(pipe, "a photo of disc", folder, 5, **generate) == 3
    assert count_images(folder) == 5
    written = sorted(folder.glob("class-*.png"))
    assert [p.name for p in written] == ["class-00000.png", "class-00001.png", "class-00002.png"]
    assert Image.open(written[0]).size == (16, 16)
    stamps = {p: p.stat().st_mtime_ns for p in folder.iterdir()}

    assert generate_class_images(pipe, "a photo of disc", folder, 5, **generate) == 0
    assert generate_class_images(pipe, "a photo of disc", folder, 3, **generate) == 0
    assert {p: p.stat().st_mtime_ns for p in folder.iterdir()} == stamps  # nothing rewritten
    assert generate_class_images(pipe, "a photo of disc", folder, 6, **generate) == 1
    assert (folder / "class-00003.png").is_file() and count_images(folder) == 6

    # image i comes from noise seeded by (seed, i): the same image whoever writes it, whenever
    (folder / "class-00001.png").unlink()
    assert generate_class_images(pipe, "a photo of disc", folder, 6, **generate) == 1
    again = np.asarray(Image.open(folder / "class-00001.png"))
    other = tmp_path / "other"
    generate_class_images(pipe, "a photo of disc", other, 2, **generate)
    assert np.array_equal(np.asarray(Image.open(other / "class-00001.png")), again)


def toy_model(x_t, t, cond):
    """A deterministic per-sample 'network': enough to check what the loss does with its output."""
    return 0.5 * x_t + cond.mean(dim=(1, 2))[:, None, None, None] + t[:, None, None, None] / 1000


def test_prior_preservation_loss_adds_the_class_half_weighted_by_lambda():
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 4, 8, 8, generator=generator)  # 2 instance, then 2 class latents
    cond = torch.randn(4, 5, 8, generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    timesteps = torch.tensor([10, 500, 900, 250])

    def loss(weight, **kwargs):
        return prior_preservation_loss(toy_model, x0, cond, scheduler, weight, noise=noise, timesteps=timesteps,
                                       **kwargs)  # fmt: skip

    def half(i, **kwargs):
        s = slice(2 * i, 2 * i + 2)
        return diffusion_loss(
            toy_model, x0[s], cond[s], scheduler, noise=noise[s], timesteps=timesteps[s], **kwargs
        )

    instance, prior = half(0), half(1)
    assert abs(instance - prior) > 1e-3  # so that the checks below tell the halves apart
    for weight in (0.0, 1.0, 2.5):  # Ruiz et al. eq. 2: instance loss + lambda * prior loss
        torch.testing.assert_close(loss(weight), instance + weight * prior)
    torch.testing.assert_close(
        loss(0.7, snr_gamma=5.0), half(0, snr_gamma=5.0) + 0.7 * half(1, snr_gamma=5.0)
    )

    # drawn as diffusion_loss draws: with lambda = 1 it is twice the whole batch's mean
    calls = []

    def counted(x_t, t, c):
        calls.append(x_t.shape[0])
        return toy_model(x_t, t, c)

    drawn = prior_preservation_loss(
        counted, x0, cond, scheduler, 1.0, generator=torch.Generator().manual_seed(1)
    )
    whole = diffusion_loss(toy_model, x0, cond, scheduler, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(drawn, 2 * whole)
    assert calls == [4]  # one forward pass over both halves
    with pytest.raises(ValueError, match="odd batch of 3"):
        prior_preservation_loss(toy_model, x0[:3], cond[:3], scheduler)


def test_instance_and_class_items_pair_up_and_join_instance_first(instance_dir, tmp_path):
    instance = prompt_dataset(instance_dir, "a photo of sks disc", 8)
    (tmp_path / "class").mkdir()
    for i in range(5):
        Image.new("RGB", (16, 16), (0, 0, 50 * i)).save(tmp_path / "class" / f"{i}.png")
    classes = prompt_dataset(tmp_path / "class", "a photo of disc", 8, flag="--class_data_dir")
    pairs = PriorPreservationDataset(instance, classes)
    assert len(pairs) == 5  # every class image once an epoch; instance images repeat
    item = pairs[4]
    assert item["text"] == "a photo of sks disc" and item["class_text"] == "a photo of disc"
    assert torch.equal(item["pixel_values"], instance[1]["pixel_values"])
    assert torch.equal(item["class_pixel_values"], classes[4]["pixel_values"])

    batch = {"pixel_values": torch.zeros(2, 3, 8, 8), "class_pixel_values": torch.ones(2, 3, 8, 8),
             "text": ["a", "b"], "class_text": ["c", "d"]}  # fmt: skip
    joined = join_prior_batch(batch)
    assert joined.keys() == {"pixel_values", "text"} and joined["text"] == ["a", "b", "c", "d"]
    assert joined["pixel_values"].shape == (4, 3, 8, 8) and joined["pixel_values"][2:].eq(1).all()


def test_full_dreambooth_with_prior_preservation(
    train_dreambooth, base_dir, instance_dir, tmp_path, monkeypatch
):
    batches = []
    loss_fn = text_to_image.prior_preservation_loss

    def spy(model_fn, x0, cond, scheduler, prior_loss_weight, **kwargs):
        batches.append((x0.shape[0], prior_loss_weight))
        return loss_fn(model_fn, x0, cond, scheduler, prior_loss_weight, **kwargs)

    monkeypatch.setattr(text_to_image, "prior_preservation_loss", spy)
    class_dir = tmp_path / "class"
    argv = flags(
        base_dir, instance_dir, tmp_path / "run", *prior_flags(class_dir), "--prior_loss_weight", 0.5,
        "--validation_prompts", "a photo of sks disc", "--validation_steps", 2, "--num_validation_images", 1,
        "--validation_inference_steps", 2, "--checkpointing_steps", 2,
    )  # fmt: skip
    pipeline_dir = run(train_dreambooth, argv)

    assert count_images(class_dir) == 4
    assert batches == [(4, 0.5), (4, 0.5)]  # 2 instance + 2 class images a step, the class half weighted
    assert (tmp_path / "run" / "validation" / "step-000002.png").is_file()
    assert pipeline_dir == tmp_path / "run" / "pipeline"
    for part, changed in (
        ("unet/diffusion_pytorch_model.safetensors", True),
        ("text_encoder/model.safetensors", False),
    ):
        a, b = load_file(base_dir / part), load_file(pipeline_dir / part)
        assert any(not torch.equal(a[k], b[k]) for k in a) == changed, part
    pipe = LatentDiffPipeline.from_pretrained(pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    images = pipe("a photo of sks disc", num_inference_steps=2, output_type="np").images
    assert images.shape == (1, 16, 16, 3) and np.isfinite(images).all()

    # a second run finds its class images there and generates none
    stamps = {p: p.stat().st_mtime_ns for p in class_dir.iterdir()}
    run(
        train_dreambooth,
        flags(base_dir, instance_dir, tmp_path / "again", *prior_flags(class_dir), "--max_train_steps", 1),
    )
    assert {p: p.stat().st_mtime_ns for p in class_dir.iterdir()} == stamps


def test_lora_dreambooth_with_prior_preservation(train_dreambooth, base_dir, instance_dir, tmp_path):
    out = tmp_path / "run"
    argv = flags(
        base_dir, instance_dir, out, *prior_flags(tmp_path / "class", 3), "--use_lora", "--rank", 2,
        "--cache_latents", "--data_cache_dir", tmp_path / "cache", "--checkpointing_steps", 1,
    )  # fmt: skip
    lora_dir = run(train_dreambooth, argv)

    assert lora_dir == out / "lora" and not (out / "pipeline").exists()
    assert {k.split(".")[0] for k in load_file(lora_dir / LORA_WEIGHT_NAME)} == {"unet"}
    assert not list((out / "checkpoints" / "checkpoint-1").glob("model*"))  # adapters only
    pipe = LatentDiffPipeline.from_pretrained(base_dir)
    pipe.set_progress_bar_config(disable=True)
    before = pipe("a photo of sks disc", num_inference_steps=2, output_type="np").images
    load_lora(pipe, lora_dir)
    after = pipe("a photo of sks disc", num_inference_steps=2, output_type="np").images
    assert np.abs(after - before).max() > 1e-4


BAD_INPUT = [
    (["EMPTY"], r"--instance_data_dir '.*' holds no usable images"),
    (["--instance_data_dir", "nowhere"], r"--instance_data_dir 'nowhere' is not a folder"),
    (["--with_prior_preservation", "--class_data_dir", "CLASS"], r"--with_prior_preservation needs --class_prompt"),
    (["--with_prior_preservation", "--class_prompt", "a disc"], r"--with_prior_preservation needs --class_data_dir"),
    (["--class_prompt", "a disc"], r"--class_prompt given without --with_prior_preservation"),
    (["--pretrained_model_name_or_path", "INSTANCE"], r"is not a pipeline folder \(no model_index.json\)"),
    (["--use_lora", "--rank", "0"], r"--rank must be a positive integer, got 0"),
    ([*prior_flags("CLASS", 0)], r"--num_class_images must be a positive integer, got 0"),
    (["--validation_loss_images", "4"], r"--validation_loss_images needs held-out images"),
]  # fmt: skip


@pytest.mark.parametrize("extra, message", BAD_INPUT, ids=[m[:30] for _, m in BAD_INPUT])
def test_bad_input_fails_before_training(train_dreambooth, base_dir, instance_dir, tmp_path, extra, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    argv = flags(base_dir, instance_dir, tmp_path / "run")
    places = {"EMPTY": None, "CLASS": str(tmp_path / "class"), "INSTANCE": str(instance_dir)}
    if extra == ["EMPTY"]:
        argv[argv.index("--instance_data_dir") + 1], extra = tmp_path / "empty", []
    extra = [places.get(e, e) if isinstance(e, str) else e for e in extra]
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        run(train_dreambooth, [*argv, *extra])
    assert not (tmp_path / "run").exists() and not (tmp_path / "class").exists()


def test_instance_and_class_items_follow_the_epoch(instance_dir, tmp_path):
    """set_epoch reaches both parts: each epoch's flips are those the instance and class datasets give at that epoch."""
    (tmp_path / "class").mkdir()
    for i in range(2):
        image = Image.new("RGB", (16, 16), (0, 0, 100 * i))
        image.paste((255, 255, 255), (0, 0, 8, 16))  # left half white: a flip shows
        image.save(tmp_path / "class" / f"{i}.png")

    def parts():
        return (prompt_dataset(instance_dir, "a photo of sks disc", 16, random_flip=True),
                prompt_dataset(tmp_path / "class", "a photo of disc", 16, random_flip=True, flag="--class_data_dir"))

    pairs = PriorPreservationDataset(*parts())
    instance, classes = parts()  # the same data, told the epoch directly
    views = set()
    for epoch in range(8):
        pairs.set_epoch(epoch)
        instance.set_epoch(epoch)
        classes.set_epoch(epoch)
        for i in range(len(pairs)):
            item = pairs[i]
            assert torch.equal(item["pixel_values"], instance[i % 3]["pixel_values"]), (epoch, i)
            assert torch.equal(item["class_pixel_values"], classes[i % 2]["pixel_values"]), (epoch, i)
        views.add((item["pixel_values"][:, :, 0].sum().item(), item["class_pixel_values"][:, :, 0].sum().item()))
    assert len(views) > 1  # the views change with the epoch
