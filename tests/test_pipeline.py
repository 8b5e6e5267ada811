"""LatentDiffPipeline: sampling behaviour, save/load, interop with diffusers, bad input."""

import json
import logging

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler as DiffusersDDIM,
)
from diffusers import (
    DDPMScheduler as DiffusersDDPM,
)
from diffusers import (
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
)

from latentdiff import DDIMScheduler, DDPMScheduler, LatentDiffPipeline, load_tokenizer
from latentdiff.presets import text_encoder_from_preset, unet_from_preset, vae_from_preset

PROMPTS = ["a small red circle in the top left", "a large blue square in the center"]


def generate(pipe, prompt=PROMPTS, seed=0, **kwargs):
    kwargs = {"num_inference_steps": 4, "output_type": "np", **kwargs}
    return pipe(prompt, generator=torch.Generator().manual_seed(seed), **kwargs).images


def test_public_api_imports():
    import latentdiff

    assert latentdiff.LatentDiffPipeline is LatentDiffPipeline
    assert latentdiff.DDPMScheduler is DDPMScheduler and latentdiff.DDIMScheduler is DDIMScheduler


def test_default_size_is_unet_sample_size_times_vae_factor(tiny_pipeline):
    images = generate(tiny_pipeline, num_inference_steps=2)
    side = tiny_pipeline.unet.config.sample_size * tiny_pipeline.vae_scale_factor
    assert images.shape == (2, side, side, 3)
    assert images.min() >= 0.0 and images.max() <= 1.0


def test_same_generator_same_image_and_seed_matters(tiny_pipeline):
    a, b, c = generate(tiny_pipeline, seed=1), generate(tiny_pipeline, seed=1), generate(tiny_pipeline, seed=2)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3


def test_different_prompt_gives_different_image(tiny_pipeline):
    a = generate(tiny_pipeline, prompt="a red circle")
    b = generate(tiny_pipeline, prompt="a green triangle")
    assert np.abs(a - b).max() > 1e-4


def test_negative_prompt_changes_image_only_with_guidance(tiny_pipeline):
    base = generate(tiny_pipeline, prompt="a cat", guidance_scale=5.0)
    negative = generate(tiny_pipeline, prompt="a cat", negative_prompt="blurry", guidance_scale=5.0)
    assert np.abs(base - negative).max() > 1e-4
    unguided = generate(tiny_pipeline, prompt="a cat", guidance_scale=1.0)
    unguided_negative = generate(tiny_pipeline, prompt="a cat", negative_prompt="blurry", guidance_scale=1.0)
    np.testing.assert_array_equal(unguided, unguided_negative)


def test_num_images_per_prompt_and_output_types(tiny_pipeline):
    images = generate(tiny_pipeline, num_images_per_prompt=3, output_type="pil")
    assert len(images) == 6 and images[0].size == (16, 16)
    latents = generate(tiny_pipeline, output_type="latent")
    assert latents.shape == (2, 4, 8, 8)
    pt = generate(tiny_pipeline, output_type="pt")
    assert pt.shape == (2, 3, 16, 16)


def test_callback_on_step_end_sees_every_step(tiny_pipeline):
    seen = []

    def callback(pipe, i, t, tensors):
        seen.append((i, int(t), tuple(tensors["latents"].shape)))
        return tensors

    generate(tiny_pipeline, num_inference_steps=3, callback_on_step_end=callback)
    assert [s[0] for s in seen] == [0, 1, 2] and seen[0][2] == (2, 4, 8, 8)


def test_given_latents_make_generation_deterministic(tiny_pipeline):
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    a = tiny_pipeline("a cat", latents=latents, num_inference_steps=3, output_type="np").images
    b = tiny_pipeline("a cat", latents=latents.clone(), num_inference_steps=3, output_type="np").images
    np.testing.assert_array_equal(a, b)


def test_save_load_reproduces_image(tiny_pipeline, tmp_path):
    tiny_pipeline.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    # named as diffusers' classes, so that the folder opens without latentdiff (tests/test_interop.py)
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["scheduler"] == ["diffusers", "DDIMScheduler"]
    assert list((tmp_path / "unet").glob("*.safetensors")) and not list((tmp_path / "unet").glob("*.bin"))
    loaded = LatentDiffPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded) is LatentDiffPipeline and type(loaded.scheduler) is DDIMScheduler
    np.testing.assert_array_equal(generate(tiny_pipeline), generate(loaded))


@pytest.mark.parametrize(
    "scheduler",
    [
        DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False),
        DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False),
        DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
        EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    ],
    ids=["ddpm", "ddim", "dpmsolver++", "euler"],
)
def test_any_scheduler_samples_and_matches_diffusers_pipeline(tiny_pipeline, scheduler):
    ours = LatentDiffPipeline(**{**tiny_pipeline.components, "scheduler": scheduler})
    theirs = StableDiffusionPipeline(
        **{**tiny_pipeline.components, "scheduler": scheduler},
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    for pipe in (ours, theirs):
        pipe.set_progress_bar_config(disable=True)
    a, b = generate(ours, num_images_per_prompt=2), generate(theirs, num_images_per_prompt=2)
    assert np.isfinite(a).all()
    assert np.abs(a - b).max() <= 1e-4


def _sd2_components():
    """SD 2.x layout: linear attention projections, per-level head dims, v-prediction, '!' padding."""
    torch.manual_seed(0)
    unet = unet_from_preset(
        "tiny", attention_head_dim=(2, 4), use_linear_projection=True, cross_attention_dim=32
    )
    text_encoder = text_encoder_from_preset("tiny", hidden_act="gelu", projection_dim=512, max_position_embeddings=77)
    tokenizer = load_tokenizer()
    tokenizer.pad_token = "!"
    scheduler = DiffusersDDIM(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
        set_alpha_to_one=False, steps_offset=1, prediction_type="v_prediction",
    )
    return dict(unet=unet, vae=vae_from_preset("tiny"), text_encoder=text_encoder, tokenizer=tokenizer,
                scheduler=scheduler)


def _sd1_components(tiny_pipeline):
    scheduler = PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
        set_alpha_to_one=False, steps_offset=1,
    )
    return {**tiny_pipeline.components, "scheduler": scheduler}


@pytest.mark.parametrize("layout", ["sd1", "sd2"])
def test_stable_diffusion_folder_opens_here_with_same_images(tiny_pipeline, tmp_path, layout):
    components = _sd1_components(tiny_pipeline) if layout == "sd1" else _sd2_components()
    sd = StableDiffusionPipeline(**components, safety_checker=None, feature_extractor=None,
                                 requires_safety_checker=False)
    sd.set_progress_bar_config(disable=True)
    sd.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"

    ours = LatentDiffPipeline.from_pretrained(tmp_path)
    ours.set_progress_bar_config(disable=True)
    # diffusers' DDIM (SD 2.x) loads as ours, which equals it number for number; PNDM (SD 1.x) as itself
    assert type(ours.scheduler) is (PNDMScheduler if layout == "sd1" else DDIMScheduler)
    assert np.abs(generate(ours) - generate(sd)).max() <= 1e-4
    # the same folder with our DDIM built from its scheduler config (e.g. the PNDM config SD ships)
    ddim = DDIMScheduler.from_config(sd.scheduler.config)
    ours.scheduler, sd.scheduler = ddim, ddim
    assert np.abs(generate(ours) - generate(sd)).max() <= 1e-4


def test_long_prompt_is_truncated_with_a_warning(tiny_pipeline, caplog):
    long_prompt = " ".join(["red"] * 100)
    with caplog.at_level(logging.WARNING, logger="latentdiff.text"):
        images = generate(tiny_pipeline, prompt=long_prompt, num_inference_steps=1)
    assert images.shape[0] == 1
    assert "truncated" in caplog.text


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(height=15), ValueError, "height=15 must be a positive multiple of the VAE's downsampling factor 2"),
        (dict(width=0), ValueError, "width=0"),
        (dict(negative_prompt=["x"]), ValueError, "negative_prompt has 1 entries but prompt has 2"),
        (dict(prompt=3), TypeError, "prompt must be a str or a non-empty list of str, got int"),
        (dict(prompt=["a", 3]), TypeError, "prompt must be a str or a non-empty list of str"),
        (dict(prompt=[]), TypeError, "non-empty list"),
        (dict(num_inference_steps=0), ValueError, "num_inference_steps=0 must be between 1"),
        (dict(num_inference_steps=1001), ValueError, "num_train_timesteps (1000)"),
        (dict(num_images_per_prompt=0), ValueError, "num_images_per_prompt=0 must be at least 1"),
        (dict(latents=torch.zeros(1, 4, 8, 8)), ValueError, "latents have shape (1, 4, 8, 8); this call needs (2, 4, 8, 8)"),
        (dict(output_type="jpeg"), ValueError, "output_type='jpeg' is not one of 'pil', 'np', 'pt', 'latent'"),
    ],
)
def test_bad_call_arguments_fail_before_denoising(tiny_pipeline, kwargs, error, message):
    calls = []
    tiny_pipeline.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    kwargs = {"prompt": PROMPTS, "num_inference_steps": 2, **kwargs}
    try:
        with pytest.raises(error) as excinfo:
            tiny_pipeline(**kwargs)
    finally:
        tiny_pipeline.unet._forward_pre_hooks.clear()
    assert message in str(excinfo.value)
    assert calls == [], "the UNet ran before the bad argument was reported"


def test_missing_model_path_and_missing_model_index(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LatentDiffPipeline.from_pretrained(tmp_path / "nope")
    with pytest.raises(ValueError, match="has no model_index.json"):
        LatentDiffPipeline.from_pretrained(tmp_path)


def test_pickle_weights_are_refused_unless_allowed(tiny_pipeline, tmp_path):
    tiny_pipeline.save_pretrained(tmp_path, safe_serialization=False)
    assert list((tmp_path / "unet").glob("*.bin"))
    with pytest.raises(ValueError, match="only pickle weights.*allow_pickle=True"):
        LatentDiffPipeline.from_pretrained(tmp_path)
    loaded = LatentDiffPipeline.from_pretrained(tmp_path, allow_pickle=True)
    loaded.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(generate(tiny_pipeline), generate(loaded))


# Call options SD users reach for: each gives diffusers' images, bad values fail before denoising ---------


def _pair(components):
    ours = LatentDiffPipeline(**components)
    theirs = StableDiffusionPipeline(**components, safety_checker=None, feature_extractor=None,
                                     requires_safety_checker=False)
    for pipe in (ours, theirs):
        pipe.set_progress_bar_config(disable=True)
    return ours, theirs


def _embeds(sd, prompts, clip_skip=None):
    return sd.encode_prompt(prompts, "cpu", 1, False, clip_skip=clip_skip)[0]


def test_prompt_embeds_give_diffusers_images(tiny_pipeline):
    """Measured: max abs difference 0.0 to diffusers, and to the same prompts given as text."""
    ours, theirs = _pair(tiny_pipeline.components)
    embeds = dict(prompt_embeds=_embeds(theirs, PROMPTS), negative_prompt_embeds=_embeds(theirs, ["blurry", ""]))
    a = generate(ours, prompt=None, guidance_scale=6.0, num_images_per_prompt=2, **embeds)
    b = generate(theirs, prompt=None, guidance_scale=6.0, num_images_per_prompt=2, **embeds)
    assert np.abs(a - b).max() <= 1e-4
    as_text = generate(ours, negative_prompt=["blurry", ""], guidance_scale=6.0, num_images_per_prompt=2)
    assert np.abs(a - as_text).max() <= 1e-5
    # prompt_embeds with negatives encoded from text
    a = generate(ours, prompt=None, prompt_embeds=embeds["prompt_embeds"], negative_prompt="blurry", guidance_scale=6.0)
    assert np.abs(a - generate(ours, negative_prompt="blurry", guidance_scale=6.0)).max() <= 1e-5


def test_guidance_rescale_gives_diffusers_images(tiny_pipeline):
    """Measured: max abs difference 0.0; the rescale changes the image by far more."""
    ours, theirs = _pair(tiny_pipeline.components)
    a = generate(ours, guidance_scale=7.5, guidance_rescale=0.7)
    b = generate(theirs, guidance_scale=7.5, guidance_rescale=0.7)
    assert np.abs(a - b).max() <= 1e-4
    assert np.abs(a - generate(ours, guidance_scale=7.5)).max() > 1e-3


def test_clip_skip_gives_diffusers_images(tiny_pipeline, monkeypatch):
    """diffusers applies clip_skip to the prompts only and encodes negative prompts from the last layer; we
    take both from the same layer, so the guided comparison hands diffusers negatives of that layer.
    diffusers 0.42 reads the final layer norm from text_encoder.text_model, which transformers 5's
    CLIPTextModel no longer has (it holds the norm itself): the alias lets diffusers' own code run."""
    from transformers import CLIPTextModel

    monkeypatch.setattr(CLIPTextModel, "text_model", property(lambda self: self), raising=False)
    ours, theirs = _pair(tiny_pipeline.components)
    a, b = generate(ours, clip_skip=1, guidance_scale=1.0), generate(theirs, clip_skip=1, guidance_scale=1.0)
    assert np.abs(a - b).max() <= 1e-4
    assert np.abs(a - generate(ours, guidance_scale=1.0)).max() > 1e-4
    negative = _embeds(theirs, ["", ""], clip_skip=1)
    a = generate(ours, clip_skip=1, guidance_scale=6.0)
    b = generate(theirs, clip_skip=1, guidance_scale=6.0, negative_prompt_embeds=negative)
    assert np.abs(a - b).max() <= 1e-4


@pytest.mark.parametrize(
    "scheduler",
    [
        DiffusersDDPM(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False),
        EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    ],
    ids=["diffusers-ddpm", "euler"],
)
def test_custom_timesteps_give_diffusers_images(tiny_pipeline, scheduler):
    ours, theirs = _pair({**tiny_pipeline.components, "scheduler": scheduler})
    seen = []
    kwargs = dict(timesteps=[999, 850, 500, 301, 20], guidance_scale=6.0)
    a = generate(ours, callback_on_step_end=lambda p, i, t, d: seen.append(int(t)) or d, **kwargs)
    assert np.abs(a - generate(theirs, **kwargs)).max() <= 1e-4
    assert len(seen) == 5


def test_textual_inversion_tokens_of_several_vectors_are_spelt_out(tiny_pipeline):
    """TextualInversionLoaderMixin: "<sks>" of 2 vectors reads as "<sks> <sks>_1" (both vectors), as in diffusers."""
    from latentdiff import pipeline_from_preset

    pipe = pipeline_from_preset("tiny", seed=0)
    pipe.set_progress_bar_config(disable=True)
    width = pipe.text_encoder.config.hidden_size
    pipe.load_textual_inversion({"<sks>": torch.randn(2, width, generator=torch.Generator().manual_seed(0))},
                                token="<sks>")
    theirs = StableDiffusionPipeline(**pipe.components, safety_checker=None, feature_extractor=None,
                                     requires_safety_checker=False)
    theirs.set_progress_bar_config(disable=True)
    a = generate(pipe, prompt="a <sks> cat")
    assert np.abs(a - generate(theirs, prompt="a <sks> cat")).max() <= 1e-4
    assert np.abs(a - generate(pipe, prompt="a cat")).max() > 1e-4


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(prompt_embeds=torch.zeros(2, 32, 32)), "pass prompt or prompt_embeds, not both"),
        (dict(prompt=None), "pass prompt (a str or a list of str) or prompt_embeds"),
        (dict(prompt=None, prompt_embeds=torch.zeros(2, 32, 7)), "prompt_embeds has shape (2, 32, 7); it must be a tensor (batch, tokens, 32)"),
        (dict(prompt=None, prompt_embeds=torch.zeros(32, 32)), "prompt_embeds has shape (32, 32)"),
        (dict(negative_prompt_embeds=torch.zeros(1, 32, 32)), "negative_prompt_embeds has shape (1, 32, 32); it must have the prompts' shape (2, 32, 32)"),
        (dict(negative_prompt="x", negative_prompt_embeds=torch.zeros(2, 32, 32)), "pass negative_prompt or negative_prompt_embeds, not both"),
        (dict(prompt=None, prompt_embeds=torch.zeros(2, 10, 32)), "prompt_embeds has 10 tokens"),
        (dict(guidance_rescale=1.5), "guidance_rescale=1.5 must be between 0 and 1"),
        (dict(guidance_rescale=-0.1), "guidance_rescale=-0.1"),
        (dict(clip_skip=99), "clip_skip=99 must be an int from 0 to"),
        (dict(timesteps=[500, 100]), "timesteps: DDIMScheduler.set_timesteps takes no custom timesteps"),
    ],
)
def test_bad_call_options_fail_before_denoising(tiny_pipeline, kwargs, message):
    test_bad_call_arguments_fail_before_denoising(tiny_pipeline, kwargs, ValueError, message)


@pytest.mark.parametrize(
    "timesteps, message",
    [
        ([100, 500], "timesteps=[100, 500] must be strictly descending"),
        ([500, 500], "strictly descending"),
        ([1000, 10], "timesteps=[1000, 10] must be a non-empty list of timesteps from 0 to num_train_timesteps - 1 (999)"),
        ([10, -1], "from 0 to num_train_timesteps - 1"),
    ],
)
def test_bad_custom_timesteps_fail_before_denoising(tiny_pipeline, timesteps, message):
    pipe = LatentDiffPipeline(**{**tiny_pipeline.components, "scheduler": DiffusersDDPM()})
    test_bad_call_arguments_fail_before_denoising(pipe, dict(timesteps=timesteps), ValueError, message)


def test_from_single_file_delegates_to_latentdiff_single_file(monkeypatch, tiny_pipeline):
    from latentdiff import single_file

    calls = []
    monkeypatch.setattr(single_file, "from_single_file", lambda *a, **k: calls.append((a, k)) or tiny_pipeline)
    assert LatentDiffPipeline.from_single_file("model.safetensors", "config", allow_pickle=False) is tiny_pipeline
    assert calls == [(("model.safetensors", "config"), {"allow_pickle": False})]
