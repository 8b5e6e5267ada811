"""LatentDiffImg2ImgPipeline and LatentDiffInpaintPipeline against diffusers' pipelines; sharing, saving, bad input."""

import json
import logging
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import (
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
)

from latentdiff import DDIMScheduler, DDPMScheduler, LatentDiffImg2ImgPipeline, LatentDiffInpaintPipeline
from latentdiff.presets import unet_from_preset

PROMPTS = ["a small red circle in the top left", "a large blue square in the center"]
SD_BETAS = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
SCHEDULERS = {
    "ddim": lambda: DDIMScheduler(**SD_BETAS, clip_sample=False),
    "ddpm": lambda: DDPMScheduler(**SD_BETAS, clip_sample=False),
    "dpmsolver++": lambda: DPMSolverMultistepScheduler(**SD_BETAS),
}


def source_image(size=16):
    return PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8))


def mask_image(size=16):
    mask = np.zeros((size, size), np.uint8)
    mask[size // 4 : 3 * size // 4, size // 8 : 5 * size // 8] = 255
    return PIL.Image.fromarray(mask)


def generate(pipe, seed=0, **kwargs):
    kwargs = {"num_inference_steps": 4, "output_type": "np", **kwargs}
    return pipe(PROMPTS, generator=torch.Generator().manual_seed(seed), **kwargs).images


def pair(ours_cls, theirs_cls, components):
    ours = ours_cls(**components)
    theirs = theirs_cls(**components, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    for pipe in (ours, theirs):
        pipe.set_progress_bar_config(disable=True)
    return ours, theirs


@pytest.fixture(scope="module")
def inpainting_unet():
    torch.manual_seed(0)
    return unet_from_preset("tiny", in_channels=9)


def test_public_api_imports():
    import latentdiff.pipelines

    import latentdiff

    assert latentdiff.LatentDiffImg2ImgPipeline is latentdiff.pipelines.LatentDiffImg2ImgPipeline
    assert latentdiff.LatentDiffInpaintPipeline is latentdiff.pipelines.LatentDiffInpaintPipeline


@pytest.mark.parametrize("scheduler", list(SCHEDULERS), ids=list(SCHEDULERS))
@pytest.mark.parametrize("kwargs", [dict(strength=0.6, guidance_scale=6.0, num_images_per_prompt=2),
                                    dict(strength=1.0, guidance_scale=1.0)], ids=["guided", "full"])
def test_img2img_matches_diffusers(tiny_pipeline, scheduler, kwargs):
    """Measured: max abs difference 3.6e-6 (DDPM), 3.3e-6 (DDIM), 1.3e-6 (DPM-Solver++)."""
    components = {**tiny_pipeline.components, "scheduler": SCHEDULERS[scheduler]()}
    ours, theirs = pair(LatentDiffImg2ImgPipeline, StableDiffusionImg2ImgPipeline, components)
    a, b = generate(ours, image=source_image(), **kwargs), generate(theirs, image=source_image(), **kwargs)
    assert a.shape == (2 * kwargs.get("num_images_per_prompt", 1), 16, 16, 3)
    assert np.abs(a - b).max() <= 1e-4


@pytest.mark.parametrize("scheduler", list(SCHEDULERS), ids=list(SCHEDULERS))
@pytest.mark.parametrize("strength", [1.0, 0.7])
def test_inpaint_with_a_9_channel_unet_matches_diffusers(tiny_pipeline, inpainting_unet, scheduler, strength):
    """Measured: identical images (max abs difference 0.0) for each scheduler."""
    components = {**tiny_pipeline.components, "unet": inpainting_unet, "scheduler": SCHEDULERS[scheduler]()}
    ours, theirs = pair(LatentDiffInpaintPipeline, StableDiffusionInpaintPipeline, components)
    kwargs = dict(image=source_image(), mask_image=mask_image(), strength=strength, guidance_scale=6.0,
                  num_images_per_prompt=2)
    assert np.abs(generate(ours, **kwargs) - generate(theirs, **kwargs)).max() <= 1e-4


@pytest.mark.parametrize("scheduler", ["ddim", "dpmsolver++"])
@pytest.mark.parametrize("strength", [1.0, 0.7])
def test_inpaint_with_a_text_to_image_unet_matches_diffusers(tiny_pipeline, scheduler, strength):
    """The known region replaced by the re-noised source after each step, as diffusers does for 4 channels.
    Deterministic samplers only: diffusers also encodes the masked image there, which it never uses but
    which draws from the generator, so a stochastic sampler (DDPM) then draws other noise than ours."""
    components = {**tiny_pipeline.components, "scheduler": SCHEDULERS[scheduler]()}
    ours, theirs = pair(LatentDiffInpaintPipeline, StableDiffusionInpaintPipeline, components)
    kwargs = dict(image=source_image(), mask_image=mask_image(), strength=strength, guidance_scale=6.0,
                  num_images_per_prompt=2)
    assert np.abs(generate(ours, **kwargs) - generate(theirs, **kwargs)).max() <= 1e-4


def test_inpaint_keeps_the_known_region_and_changes_the_masked_one(tiny_pipeline):
    pipe = LatentDiffInpaintPipeline.from_pipe(tiny_pipeline)
    kwargs = dict(image=source_image(), mask_image=mask_image(), output_type="latent", guidance_scale=1.0)
    latents = generate(pipe, **kwargs)
    source_latents = pipe.vae.encode(pipe.image_processor.preprocess(source_image())).latent_dist
    known = torch.ones(8, 8, dtype=torch.bool)
    known[2:6, 1:5] = False  # the mask's rectangle at latent resolution
    # outside the mask the result is the source's latents (the mean here, a sample of q(z|x) there)
    assert (latents[:, :, known] - source_latents.mean[:, :, known] * pipe.vae.config.scaling_factor).abs().max() < 1.0
    other = generate(pipe, seed=1, **kwargs)
    np.testing.assert_allclose(latents[:, :, known], generate(pipe, **kwargs)[:, :, known])
    assert (latents[:, :, ~known] - other[:, :, ~known]).abs().max() > 1e-3
    blurred = generate(pipe, mask_blur=2.0, **kwargs)
    assert (blurred - latents).abs().max() > 1e-4


def test_padding_mask_crop_pastes_into_the_source(tiny_pipeline):
    pipe = LatentDiffInpaintPipeline.from_pipe(tiny_pipeline)
    source = source_image(32)
    mask = np.zeros((32, 32), np.uint8)
    mask[4:10, 4:10] = 255
    images = pipe("a cat", image=source, mask_image=PIL.Image.fromarray(mask), padding_mask_crop=2,
                  num_inference_steps=2, height=16, width=16, generator=torch.Generator().manual_seed(0)).images
    result = np.asarray(images[0])
    assert result.shape == (32, 32, 3)
    far = np.ones((32, 32), bool)
    far[:16, :16] = False  # outside the crop the source is pasted back unchanged
    np.testing.assert_array_equal(result[far], np.asarray(source)[far])


def test_from_pipe_shares_components_and_diffusers_from_pipe_works(tiny_pipeline):
    for cls in (LatentDiffImg2ImgPipeline, LatentDiffInpaintPipeline):
        pipe = cls.from_pipe(tiny_pipeline)
        assert type(pipe) is cls and pipe.unet is tiny_pipeline.unet and pipe.vae is tiny_pipeline.vae
        assert pipe.text_encoder is tiny_pipeline.text_encoder and pipe.scheduler is tiny_pipeline.scheduler
        assert DiffusionPipeline.from_pipe.__func__(cls, tiny_pipeline).unet is tiny_pipeline.unet
    half = LatentDiffImg2ImgPipeline(**{**tiny_pipeline.components, "unet": unet_from_preset("tiny").half()})
    # diffusers' from_pipe would cast the shared UNet to float32; ours keeps it
    assert LatentDiffInpaintPipeline.from_pipe(half).unet.dtype == torch.float16 == half.unet.dtype


def test_saved_folders_name_diffusers_classes_and_load_back(tiny_pipeline, tmp_path):
    for cls, name in ((LatentDiffImg2ImgPipeline, "StableDiffusionImg2ImgPipeline"),
                      (LatentDiffInpaintPipeline, "StableDiffusionInpaintPipeline")):
        folder = tmp_path / name
        pipe = cls.from_pipe(tiny_pipeline)
        pipe.save_pretrained(folder)
        index = json.loads((folder / "model_index.json").read_text())
        assert index["_class_name"] == name and index["scheduler"] == ["diffusers", "DDIMScheduler"]
        loaded = cls.from_pretrained(folder)
        loaded.set_progress_bar_config(disable=True)
        assert type(loaded) is cls and type(loaded.scheduler) is DDIMScheduler
        kwargs = dict(image=source_image(), strength=0.75)
        if cls is LatentDiffInpaintPipeline:
            kwargs["mask_image"] = mask_image()
        np.testing.assert_array_equal(generate(pipe, **kwargs), generate(loaded, **kwargs))
    # a diffusers user without latentdiff opens both as diffusers' pipelines of those names
    script = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.partition('.')[0] == 'latentdiff': raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from diffusers import DiffusionPipeline\n"
        "print(' '.join(type(DiffusionPipeline.from_pretrained(f)).__name__ for f in sys.argv[1:]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-I", "-c", script, str(tmp_path / "StableDiffusionImg2ImgPipeline"),
         str(tmp_path / "StableDiffusionInpaintPipeline")],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline"]


def test_image_of_another_size_is_resized_with_a_warning(tiny_pipeline, caplog):
    pipe = LatentDiffImg2ImgPipeline.from_pipe(tiny_pipeline)
    with caplog.at_level(logging.WARNING, logger="latentdiff.pipelines.img2img"):
        images = generate(pipe, image=source_image(24), height=16, width=16, strength=0.5)
    assert images.shape == (2, 16, 16, 3)
    assert "image is 24x24 (width x height); it is resized to 16x16" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="latentdiff.pipelines.img2img"):
        assert generate(pipe, image=source_image(24), strength=0.5).shape == (2, 24, 24, 3)  # its own size
    assert caplog.text == ""


def test_mask_of_another_size_or_mode_is_converted_with_a_warning(tiny_pipeline, caplog):
    pipe = LatentDiffInpaintPipeline.from_pipe(tiny_pipeline)
    rgba = mask_image(32).convert("RGBA")
    with caplog.at_level(logging.WARNING):
        converted = generate(pipe, image=source_image(), mask_image=rgba)
    assert "mask_image is 32x32 (width x height); it is resized to 16x16" in caplog.text
    assert "mask_image has mode RGBA" in caplog.text
    np.testing.assert_allclose(converted, generate(pipe, image=source_image(), mask_image=mask_image()), atol=1e-5)


def test_all_black_mask_returns_the_source_with_a_warning(tiny_pipeline, caplog):
    pipe = LatentDiffInpaintPipeline.from_pipe(tiny_pipeline)
    black = PIL.Image.new("L", (16, 16))
    with caplog.at_level(logging.WARNING, logger="latentdiff.pipelines.inpaint"):
        latents = generate(pipe, image=source_image(), mask_image=black, output_type="latent", guidance_scale=1.0)
    assert "nothing to inpaint" in caplog.text
    expected = pipe._encode_images(pipe.image_processor.preprocess(source_image()),
                                   torch.Generator().manual_seed(0), 1, 2, torch.float32)
    torch.testing.assert_close(latents, expected)


@pytest.mark.parametrize(
    "cls, kwargs, error, message",
    [
        (LatentDiffImg2ImgPipeline, dict(strength=0.0), ValueError, "strength=0.0 must be in (0, 1]"),
        (LatentDiffImg2ImgPipeline, dict(strength=1.5), ValueError, "strength=1.5 must be in (0, 1]"),
        (LatentDiffImg2ImgPipeline, dict(strength=0.2), ValueError, "strength=0.2 of 2 steps leaves no denoising step"),
        (LatentDiffImg2ImgPipeline, dict(image=None), TypeError, "image must be a PIL image"),
        (LatentDiffImg2ImgPipeline, dict(image=[source_image()] * 3), ValueError, "image holds 3 images for 2 prompts"),
        (LatentDiffImg2ImgPipeline, dict(height=15), ValueError, "height=15 must be a positive multiple"),
        (LatentDiffImg2ImgPipeline, dict(prompt_embeds=torch.zeros(2, 32, 32)), ValueError,
         "pass prompt or prompt_embeds, not both"),
        (LatentDiffInpaintPipeline, dict(mask_image=None), ValueError, "mask_image is required"),
        (LatentDiffInpaintPipeline, dict(mask_blur=-1), ValueError, "mask_blur=-1 must be a number >= 0"),
        (LatentDiffInpaintPipeline, dict(padding_mask_crop=4, output_type="np"), ValueError,
         "output_type must be 'pil'"),
        (LatentDiffInpaintPipeline, dict(strength=2), ValueError, "strength=2 must be in (0, 1]"),
    ],
)
def test_bad_arguments_fail_before_denoising(tiny_pipeline, cls, kwargs, error, message):
    pipe = cls.from_pipe(tiny_pipeline)
    calls = []
    handle = pipe.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    kwargs = {"prompt": PROMPTS, "image": source_image(), "num_inference_steps": 2, **kwargs}
    if cls is LatentDiffInpaintPipeline:
        kwargs.setdefault("mask_image", mask_image())
    try:
        with pytest.raises(error) as excinfo:
            pipe(**kwargs)
    finally:
        handle.remove()
    assert message in str(excinfo.value)
    assert calls == [], "the UNet ran before the bad argument was reported"


def test_inpaint_refuses_a_unet_of_other_input_channels(tiny_pipeline):
    pipe = LatentDiffInpaintPipeline(**{**tiny_pipeline.components, "unet": unet_from_preset("tiny", in_channels=5)})
    with pytest.raises(ValueError, match="the UNet takes 5 input channels; inpainting needs 4"):
        pipe("a cat", image=source_image(), mask_image=mask_image(), num_inference_steps=2)
