"""Single-file checkpoints (latentdiff.single_file) against diffusers' converters, on tiny SD-shaped models.

The references: diffusers' ``StableDiffusionPipeline.from_single_file`` (offline, with a local config)
reads what we write, and the tables of diffusers' export script (copied below) write what we read.
"""

import re

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from latentdiff import LatentDiffPipeline, single_file
from latentdiff.presets import (
    sd_scheduler,
    text_encoder_from_preset,
    tokenizer_for,
    unet_from_preset,
    vae_from_preset,
)
from latentdiff.single_file import from_single_file, main, to_single_file

PROMPT = "a red circle"
COMPONENTS = ("unet", "vae", "text_encoder")


def tiny_sd(version: str) -> LatentDiffPipeline:
    """SD's block structure (4 UNet levels, CrossAttnDownBlock2D x3 + DownBlock2D, 2 layers per block; a
    4-level VAE, f=8) at tiny widths; SD 2.x's OpenCLIP text tower (gelu) and linear attention projections."""
    torch.manual_seed(0)
    sd2 = version == "sd2"
    text_encoder = text_encoder_from_preset("tiny", hidden_act="gelu" if sd2 else "quick_gelu").eval()
    unet = unet_from_preset("sd15", block_out_channels=(32, 64, 64, 64), attention_head_dim=4, sample_size=8,
                            cross_attention_dim=text_encoder.config.hidden_size, use_linear_projection=sd2).eval()
    vae = vae_from_preset("sd15", block_out_channels=(32, 64, 64, 64), sample_size=64).eval()
    pipe = LatentDiffPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer_for(text_encoder), unet=unet,
                              scheduler=sd_scheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def exported(request, tmp_path_factory):
    """(version, pipeline folder, the single file we export from it)."""
    root = tmp_path_factory.mktemp(request.param)
    tiny_sd(request.param).save_pretrained(root / "pipeline")
    return request.param, root / "pipeline", to_single_file(root / "pipeline", root / "model.safetensors")


def images(pipe) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    return pipe(PROMPT, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images


def folder_weights(folder) -> dict[str, dict[str, torch.Tensor]]:
    names = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}
    return {c: load_file(folder / c / f"{names[c]}.safetensors") for c in COMPONENTS}


def assert_same_weights(pipe, folder):
    for component, saved in folder_weights(folder).items():
        state = getattr(pipe, component).state_dict()
        assert state.keys() == saved.keys(), component
        for key, tensor in saved.items():
            assert state[key].dtype == tensor.dtype and torch.equal(state[key], tensor), f"{component}/{key}"


def diffusers_from_single_file(path, folder) -> StableDiffusionPipeline:
    return StableDiffusionPipeline.from_single_file(str(path), config=str(folder), local_files_only=True,
                                                    safety_checker=None, requires_safety_checker=False)


def test_export_opens_in_diffusers_with_the_same_images(exported):
    version, folder, path = exported
    with safe_open(path, "pt") as f:
        keys = set(f.keys())
    text_prefix = "cond_stage_model.model." if version == "sd2" else "cond_stage_model.transformer.text_model."
    assert {k.split(".")[0] for k in keys} == {"model", "first_stage_model", "cond_stage_model"}
    assert all(k.startswith(text_prefix) for k in keys if k.startswith("cond_stage_model."))
    theirs = diffusers_from_single_file(path, folder)
    assert_same_weights(theirs, folder)
    reference = images(StableDiffusionPipeline.from_pretrained(folder, safety_checker=None))
    difference = np.abs(images(theirs) - reference).max()
    assert difference <= 1e-4, difference


# --- diffusers' export script, scripts/convert_diffusers_to_original_stable_diffusion.py at huggingface/diffusers
# commit 58eb52c0803ea9af3abec60841c2a093bdf1f951 (Apache-2.0): its tables, copied, and its functions'
# replace order. The script lives outside diffusers' package, so it cannot be imported here.
unet_conversion_map = [
    ("time_embed.0.weight", "time_embedding.linear_1.weight"),
    ("time_embed.0.bias", "time_embedding.linear_1.bias"),
    ("time_embed.2.weight", "time_embedding.linear_2.weight"),
    ("time_embed.2.bias", "time_embedding.linear_2.bias"),
    ("input_blocks.0.0.weight", "conv_in.weight"),
    ("input_blocks.0.0.bias", "conv_in.bias"),
    ("out.0.weight", "conv_norm_out.weight"),
    ("out.0.bias", "conv_norm_out.bias"),
    ("out.2.weight", "conv_out.weight"),
    ("out.2.bias", "conv_out.bias"),
]
unet_conversion_map_resnet = [
    ("in_layers.0", "norm1"),
    ("in_layers.2", "conv1"),
    ("out_layers.0", "norm2"),
    ("out_layers.3", "conv2"),
    ("emb_layers.1", "time_emb_proj"),
    ("skip_connection", "conv_shortcut"),
]
unet_conversion_map_layer = []
for i in range(4):
    for j in range(2):
        unet_conversion_map_layer.append((f"input_blocks.{3 * i + j + 1}.0.", f"down_blocks.{i}.resnets.{j}."))
        if i < 3:
            unet_conversion_map_layer.append((f"input_blocks.{3 * i + j + 1}.1.", f"down_blocks.{i}.attentions.{j}."))
    for j in range(3):
        unet_conversion_map_layer.append((f"output_blocks.{3 * i + j}.0.", f"up_blocks.{i}.resnets.{j}."))
        if i > 0:
            unet_conversion_map_layer.append((f"output_blocks.{3 * i + j}.1.", f"up_blocks.{i}.attentions.{j}."))
    if i < 3:
        unet_conversion_map_layer.append((f"input_blocks.{3 * (i + 1)}.0.op.", f"down_blocks.{i}.downsamplers.0.conv."))
        unet_conversion_map_layer.append((f"output_blocks.{3 * i + 2}.{1 if i == 0 else 2}.", f"up_blocks.{i}.upsamplers.0."))
unet_conversion_map_layer.append(("middle_block.1.", "mid_block.attentions.0."))
for j in range(2):
    unet_conversion_map_layer.append((f"middle_block.{2 * j}.", f"mid_block.resnets.{j}."))

vae_conversion_map = [
    ("nin_shortcut", "conv_shortcut"),
    ("norm_out", "conv_norm_out"),
    ("mid.attn_1.", "mid_block.attentions.0."),
]
for i in range(4):
    for j in range(2):
        vae_conversion_map.append((f"encoder.down.{i}.block.{j}.", f"encoder.down_blocks.{i}.resnets.{j}."))
    if i < 3:
        vae_conversion_map.append((f"down.{i}.downsample.", f"down_blocks.{i}.downsamplers.0."))
        vae_conversion_map.append((f"up.{3 - i}.upsample.", f"up_blocks.{i}.upsamplers.0."))
    for j in range(3):
        vae_conversion_map.append((f"decoder.up.{3 - i}.block.{j}.", f"decoder.up_blocks.{i}.resnets.{j}."))
for i in range(2):
    vae_conversion_map.append((f"mid.block_{i + 1}.", f"mid_block.resnets.{i}."))
vae_conversion_map_attn = [
    ("norm.", "group_norm."),
    ("q.", "query."),
    ("k.", "key."),
    ("v.", "value."),
    ("proj_out.", "proj_attn."),
]
vae_extra_conversion_map = [
    ("to_q", "q"),
    ("to_k", "k"),
    ("to_v", "v"),
    ("to_out.0", "proj_out"),
]
textenc_conversion_lst = [
    ("resblocks.", "text_model.encoder.layers."),
    ("ln_1", "layer_norm1"),
    ("ln_2", "layer_norm2"),
    (".c_fc.", ".fc1."),
    (".c_proj.", ".fc2."),
    (".attn", ".self_attn"),
    ("ln_final.", "transformer.text_model.final_layer_norm."),
    ("token_embedding.weight", "transformer.text_model.embeddings.token_embedding.weight"),
    ("positional_embedding", "transformer.text_model.embeddings.position_embedding.weight"),
]
protected = {re.escape(x[1]): x[0] for x in textenc_conversion_lst}
textenc_pattern = re.compile("|".join(protected.keys()))
code2idx = {"q": 0, "k": 1, "v": 2}


def convert_unet_state_dict(unet_state_dict):
    mapping = {k: k for k in unet_state_dict}
    for sd_name, hf_name in unet_conversion_map:
        mapping[hf_name] = sd_name
    for k, v in mapping.items():
        if "resnets" in k:
            for sd_part, hf_part in unet_conversion_map_resnet:
                v = v.replace(hf_part, sd_part)
            mapping[k] = v
    for k, v in mapping.items():
        for sd_part, hf_part in unet_conversion_map_layer:
            v = v.replace(hf_part, sd_part)
        mapping[k] = v
    return {v: unet_state_dict[k] for k, v in mapping.items()}


def reshape_weight_for_sd(w):
    return w if w.ndim == 1 else w.reshape(*w.shape, 1, 1)


def convert_vae_state_dict(vae_state_dict):
    mapping = {k: k for k in vae_state_dict}
    for k, v in mapping.items():
        for sd_part, hf_part in vae_conversion_map:
            v = v.replace(hf_part, sd_part)
        mapping[k] = v
    for k, v in mapping.items():
        if "attentions" in k:
            for sd_part, hf_part in vae_conversion_map_attn:
                v = v.replace(hf_part, sd_part)
            mapping[k] = v
    new_state_dict = {v: vae_state_dict[k] for k, v in mapping.items()}
    keys_to_rename = {}
    for k, v in new_state_dict.items():
        for weight_name in ["q", "k", "v", "proj_out"]:
            if f"mid.attn_1.{weight_name}.weight" in k:
                new_state_dict[k] = reshape_weight_for_sd(v)
        for weight_name, real_weight_name in vae_extra_conversion_map:
            if f"mid.attn_1.{weight_name}.weight" in k or f"mid.attn_1.{weight_name}.bias" in k:
                keys_to_rename[k] = k.replace(weight_name, real_weight_name)
    for k, v in keys_to_rename.items():
        if k in new_state_dict:
            new_state_dict[v] = reshape_weight_for_sd(new_state_dict[k])
            del new_state_dict[k]
    return new_state_dict


def convert_text_enc_state_dict_v20(text_enc_dict):
    new_state_dict, capture = {}, {"weight": {}, "bias": {}}
    for k, v in text_enc_dict.items():
        match = re.search(r"\.self_attn\.([qkv])_proj\.(weight|bias)$", k)
        if match:
            capture[match[2]].setdefault(k[: match.start()] + ".self_attn", [None] * 3)[code2idx[match[1]]] = v
            continue
        new_state_dict[textenc_pattern.sub(lambda m: protected[re.escape(m.group(0))], k)] = v
    for param, captured in capture.items():
        for k_pre, tensors in captured.items():
            relabelled_key = textenc_pattern.sub(lambda m: protected[re.escape(m.group(0))], k_pre)
            new_state_dict[f"{relabelled_key}.in_proj_{param}"] = torch.cat(tensors)
    return new_state_dict


def diffusers_script_state_dict(folder, version: str) -> dict[str, torch.Tensor]:
    """The script's __main__, on the folder's safetensors. The script predates transformers 5, whose
    CLIPTextModel no longer nests its names under ``text_model.``: the prefix is put back first."""
    weights = folder_weights(folder)
    text = {"text_model." + k: v for k, v in weights["text_encoder"].items()}
    if version == "sd2":
        text = convert_text_enc_state_dict_v20({"transformer." + k: v for k, v in text.items()})
        text = {"cond_stage_model.model." + k: v for k, v in text.items()}
    else:
        text = {"cond_stage_model.transformer." + k: v for k, v in text.items()}
    return {**{"model.diffusion_model." + k: v for k, v in convert_unet_state_dict(weights["unet"]).items()},
            **{"first_stage_model." + k: v for k, v in convert_vae_state_dict(weights["vae"]).items()}, **text}


def test_a_file_written_by_diffusers_script_opens_here_with_the_same_images(exported, tmp_path):
    version, folder, path = exported
    theirs = diffusers_script_state_dict(folder, version)
    ours = load_file(path)
    assert sorted(theirs) == sorted(ours)
    assert all(torch.equal(theirs[k].contiguous(), ours[k]) for k in ours)
    save_file({k: v.contiguous() for k, v in theirs.items()}, tmp_path / "theirs.safetensors")
    pipe = from_single_file(tmp_path / "theirs.safetensors", folder)
    assert_same_weights(pipe, folder)
    reference = images(LatentDiffPipeline.from_pretrained(folder))
    difference = np.abs(images(pipe) - reference).max()
    assert difference <= 1e-4, difference


def test_diffusers_loader_and_ours_read_a_file_alike(exported, tmp_path):
    version, folder, path = exported
    diffusers_from_single_file(path, folder).save_pretrained(tmp_path / "theirs")
    theirs, ours = folder_weights(tmp_path / "theirs"), folder_weights(folder)
    for component in COMPONENTS:
        assert theirs[component].keys() == ours[component].keys()
        assert all(torch.equal(theirs[component][k], ours[component][k]) for k in ours[component])
    difference = np.abs(images(from_single_file(path, folder)) - images(diffusers_from_single_file(path, folder))).max()
    assert difference <= 1e-4, difference


def test_round_trip_is_bit_identical(exported, tmp_path):
    version, folder, path = exported
    assert main([str(path), str(tmp_path / "back"), "--config", str(folder)]) == 0
    original, back = folder_weights(folder), folder_weights(tmp_path / "back")
    for component in COMPONENTS:
        assert back[component].keys() == original[component].keys()
        assert all(torch.equal(back[component][k], original[component][k]) for k in original[component])
    assert isinstance(LatentDiffPipeline.from_pretrained(tmp_path / "back").scheduler, type(sd_scheduler()))
    assert main([str(tmp_path / "back"), str(tmp_path / "again.safetensors")]) == 0
    again, first = load_file(tmp_path / "again.safetensors"), load_file(path)
    assert again.keys() == first.keys() and all(torch.equal(again[k], first[k]) for k in first)


def test_half_writes_fp16(exported, tmp_path):
    version, folder, path = exported
    half = load_file(to_single_file(folder, tmp_path / "half.safetensors", half=True))
    full = load_file(path)
    assert half.keys() == full.keys()
    assert {t.dtype for t in half.values()} == {torch.float16}
    assert all(torch.equal(half[k], full[k].half()) for k in full)
    pipe = from_single_file(tmp_path / "half.safetensors", folder)
    assert pipe.unet.dtype == torch.float32
    assert main([str(path), str(tmp_path / "half"), "--config", str(folder), "--half"]) == 0
    assert {t.dtype for c in folder_weights(tmp_path / "half").values() for t in c.values()} == {torch.float16}


def test_keys_of_original_checkpoints_that_hold_no_weights_are_skipped(exported, tmp_path):
    version, folder, path = exported
    state = load_file(path)
    extra = {"alphas_cumprod": torch.ones(1000), "model_ema.decay": torch.tensor(0.9999),
             "model_ema.diffusion_modelout0weight": torch.ones(32)}
    if version == "sd2":  # OpenCLIP's last layer, which SD 2.x skips, and its projection head
        layers = tiny_sd("sd2").text_encoder.config.num_hidden_layers
        extra[f"cond_stage_model.model.transformer.resblocks.{layers}.ln_1.weight"] = torch.ones(32)
        extra["cond_stage_model.model.text_projection"] = torch.ones(32, 32)
    save_file({**state, **extra}, tmp_path / "full.safetensors")
    assert_same_weights(from_single_file(tmp_path / "full.safetensors", folder), folder)


def forbid_reading_weights(monkeypatch):
    """Fail the test if the reader reads a tensor: bad input must be refused before any work."""
    real = single_file.safe_open

    class ShapesOnly:
        def __init__(self, *args, **kwargs):
            self.file = real(*args, **kwargs)

        def __enter__(self):
            self.file.__enter__()
            return self

        def __exit__(self, *exc):
            return self.file.__exit__(*exc)

        def keys(self):
            return self.file.keys()

        def get_slice(self, key):
            return self.file.get_slice(key)

        def get_tensor(self, key):
            raise AssertionError(f"read {key} before the checks")

    monkeypatch.setattr(single_file, "safe_open", ShapesOnly)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load ran"))


def test_missing_and_unknown_keys_are_named(exported, tmp_path, monkeypatch):
    version, folder, path = exported
    state = load_file(path)
    missing, unknown = "first_stage_model.decoder.mid.attn_1.q.weight", "model.diffusion_model.some_adapter.weight"
    state[unknown] = state.pop(missing)
    save_file(state, tmp_path / "bad.safetensors")
    forbid_reading_weights(monkeypatch)
    with pytest.raises(ValueError, match=r"missing.*unknown") as error:
        from_single_file(tmp_path / "bad.safetensors", folder)
    assert missing in str(error.value) and unknown in str(error.value)


def test_a_file_of_another_architecture_is_refused(exported, tmp_path, monkeypatch):
    version, folder, path = exported
    other = tiny_sd(version)
    other.unet = unet_from_preset("sd15", block_out_channels=(64, 128, 128, 128), attention_head_dim=4, sample_size=8,
                                  cross_attention_dim=32, use_linear_projection=version == "sd2")
    other.save_pretrained(tmp_path / "other")
    to_single_file(tmp_path / "other", tmp_path / "other.safetensors")
    forbid_reading_weights(monkeypatch)
    with pytest.raises(ValueError, match=r"another shape.*model\.diffusion_model\.input_blocks\.1\.0\.in_layers\.0\.bias: \(64,\) where the config makes \(32,\)"):
        from_single_file(tmp_path / "other.safetensors", folder)


def test_pickle_is_refused_unless_allowed(exported, tmp_path, monkeypatch):
    version, folder, path = exported
    torch.save({"state_dict": load_file(path)}, tmp_path / "model.ckpt")
    with pytest.raises(ValueError, match="pickle.*allow_pickle"):
        from_single_file(tmp_path / "model.ckpt", folder)
    with pytest.raises(ValueError, match="pickle"):
        main([str(tmp_path / "model.ckpt"), str(tmp_path / "out"), "--config", str(folder)])
    loads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(k) or real_load(*a, **k))
    assert_same_weights(from_single_file(tmp_path / "model.ckpt", folder, allow_pickle=True), folder)
    assert loads == [{"map_location": "cpu", "weights_only": True}]


def test_bad_arguments_are_refused_before_any_work(exported, tmp_path):
    version, folder, path = exported
    with pytest.raises(ValueError, match="--config"):
        main([str(path), str(tmp_path / "out")])
    with pytest.raises(ValueError, match=r"\.safetensors"):
        to_single_file(folder, tmp_path / "model.ckpt")
    with pytest.raises(FileNotFoundError):
        from_single_file(tmp_path / "absent.safetensors", folder)
    with pytest.raises(ValueError, match="model_index.json"):
        from_single_file(path, tmp_path)


def test_latentdiff_convert_both_ways_and_one_line_errors(exported, tmp_path, capsys):
    """The `latentdiff convert` verb: a folder to a file and back, and bad input as one line, exit status 2."""
    from latentdiff import cli

    version, folder, path = exported
    assert cli.main(["convert", str(folder), str(tmp_path / "model.safetensors")]) == 0
    assert load_file(tmp_path / "model.safetensors").keys() == load_file(path).keys()
    assert cli.main(["convert", str(tmp_path / "model.safetensors"), str(tmp_path / "back"), "--config", str(folder)]) == 0
    assert (tmp_path / "back" / "model_index.json").is_file()
    assert cli.main(["convert", str(tmp_path / "model.safetensors"), str(tmp_path / "again")]) == 2
    err = capsys.readouterr().err.strip().splitlines()  # the earlier conversions' progress bars come first
    assert err[-1].startswith("latentdiff convert: error:") and "--config" in err[-1]
    assert not any("Traceback" in line for line in err)
