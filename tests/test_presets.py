"""Model presets, the vendored tokenizer, and what the installed package contains."""

import subprocess
import sys
import zipfile

import pytest
import torch

from latentdiff.presets import (
    MODEL_PRESETS,
    PRESETS,
    Preset,
    default_image_size,
    load_tokenizer,
    pipeline_from_preset,
    text_encoder_from_preset,
    unet_from_preset,
    vae_from_preset,
    vae_scale_factor,
)


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def test_sd15_preset_has_stable_diffusion_15_parameter_counts():
    with torch.device("meta"):  # shapes only: no 1B-parameter allocation
        unet, vae, text_encoder = unet_from_preset("sd15"), vae_from_preset("sd15"), text_encoder_from_preset("sd15")
    assert n_params(unet) == 859_520_964
    assert n_params(vae) == 83_653_863
    assert n_params(text_encoder) == 123_060_480
    assert vae_scale_factor(vae) == 8 and vae.config.scaling_factor == 0.18215


@pytest.mark.parametrize("name", PRESETS)
def test_presets_fit_together(name):
    with torch.device("meta"):
        unet, vae, text_encoder = unet_from_preset(name), vae_from_preset(name), text_encoder_from_preset(name)
    assert vae.config.latent_channels == unet.config.in_channels
    assert text_encoder.config.hidden_size == unet.config.cross_attention_dim


@pytest.mark.parametrize("name", PRESETS)
def test_presets_derive_the_couplings_from_the_image_size_and_the_text_encoder(name):
    preset = MODEL_PRESETS[name]
    with torch.device("meta"):
        unet, vae = unet_from_preset(name), vae_from_preset(name)
    assert vae.config.sample_size == default_image_size(vae, unet) == preset.image_size
    assert unet.config.cross_attention_dim == preset.text_encoder["hidden_size"]


def test_tiny_makes_16_px_images_and_its_vae_says_so():
    assert MODEL_PRESETS["tiny"].image_size == 16 == vae_from_preset("tiny").config.sample_size


def test_a_preset_whose_image_size_the_vae_cannot_divide_is_refused():
    with pytest.raises(ValueError, match="image_size 20 is not a multiple of the VAE's downsampling factor 8"):
        Preset(image_size=20, unet={}, vae=dict(block_out_channels=(8, 8, 8, 8), latent_channels=4),
               text_encoder=dict(hidden_size=8))


def test_unknown_preset_names_the_choices():
    with pytest.raises(ValueError, match="UNet preset 'huge' is unknown; choose one of 'tiny', 'small', 'small64', 'base', 'sd15'"):
        unet_from_preset("huge")
    with pytest.raises(ValueError, match="VAE preset 'x' is unknown"):
        vae_from_preset("x")
    with pytest.raises(ValueError, match="pipeline preset 'x' is unknown"):
        pipeline_from_preset("x")


def test_vendored_tokenizer_matches_openai_clip():
    tokenizer = load_tokenizer()
    assert len(tokenizer) == 49408 and tokenizer.model_max_length == 77
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_tiny_pipeline_weights_depend_on_seed_only():
    a, b = pipeline_from_preset("tiny", seed=1), pipeline_from_preset("tiny", seed=1)
    torch.testing.assert_close(a.unet.state_dict(), b.unet.state_dict(), rtol=0, atol=0)


def test_wheel_ships_tokenizer_and_no_generic_top_level_packages(tmp_path):
    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(root)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("latentdiff-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {n.split("/")[0] for n in names}
    assert "pipelines" not in top_level and "training" not in top_level and "tests" not in top_level
    assert "latentdiff/pipelines/latent_diff_pipeline.py" in names
    assert {"latentdiff/tokenizer/vocab.json", "latentdiff/tokenizer/merges.txt"} <= set(names)


def test_small_presets_pad_prompts_to_their_text_encoders_positions(tmp_path):
    pipe = pipeline_from_preset("tiny")
    assert pipe.text_encoder.config.max_position_embeddings == pipe.tokenizer.model_max_length == 32
    pipe.save_pretrained(tmp_path, safe_serialization=True)
    loaded = type(pipe).from_pretrained(tmp_path)
    assert loaded.tokenizer.model_max_length == 32
    assert loaded.tokenizer(["a cat"], padding="max_length").input_ids[0].__len__() == 32
