"""LoRA: adapter sizes, frozen base weights, diffusers' file format (our pipeline and StableDiffusionPipeline),
scale, fuse/unfuse, a loader that refuses weights matching no layer, and training/finetune_lora.py end to end.

(The full fine-tune, train_ldm.py --pretrained_model_name_or_path, is tested in test_train_ldm.py.)
"""

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from scripts import launch_two_processes, load_script, run_script

from latentdiff import LatentDiffPipeline
from latentdiff.training import text_to_image
from latentdiff.training.lora import (
    KOHYA_WEIGHT_NAME,
    LORA_WEIGHT_NAME,
    TEXT_ENCODER_TARGET_MODULES,
    UNET_TARGET_MODULES,
    add_lora,
    load_lora,
    save_lora,
    save_lora_kohya,
)

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "training" / "finetune_lora.py"
# Adapters loaded from a file, or fused into the weights, compute the same update by another path;
# this untrained net with guidance amplifies the float rounding (seen up to 1.8e-4 from 1e-7 steps).
ROUNDING = 1e-3
COLORS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 160, 30), "yellow": (230, 200, 20)}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base_dir(tiny_pipeline_dir):
    return tiny_pipeline_dir


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    """Four 16 px images of colored squares with .txt captions."""
    path = tmp_path_factory.mktemp("images")
    for i, (name, color) in enumerate(COLORS.items()):
        pixels = np.full((16, 16, 3), 255, np.uint8)
        pixels[4:12, 4:12] = color
        Image.fromarray(pixels).save(path / f"{i}.png")
        (path / f"{i}.txt").write_text(f"a {name} square in sks style\n")
    return path


@pytest.fixture(scope="module")
def finetune_lora():
    return load_script("finetune_lora")


run = run_script


def flags(base_dir, image_dir, out, *extra):
    return [
        "--pretrained_model_name_or_path", base_dir, "--train_data_dir", image_dir, "--output_dir", out,
        "--train_batch_size", 2, "--report_to", "none", "--learning_rate", 1e-2, *extra,
    ]  # fmt: skip


def load(path):
    pipe = LatentDiffPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, **kwargs):
    return pipe(
        ["a red square", "a blue square"], num_inference_steps=3, guidance_scale=4.0,
        generator=torch.Generator().manual_seed(0), output_type="np", **kwargs,
    ).images  # fmt: skip


def targeted_linears(model, targets):
    return {
        name: module for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in targets)
    }  # fmt: skip


def randomize_adapters(*models, seed=0):
    """B starts at zero (the adapters do nothing yet): give it values, as training would."""
    generator = torch.Generator().manual_seed(seed)
    for model in models:
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.data = 0.1 * torch.randn(param.shape, generator=generator)


@pytest.mark.parametrize("rank", [1, 3])
def test_adapters_train_rank_times_in_plus_out_per_targeted_layer(base_dir, rank):
    pipe = load(base_dir)
    for model, targets in (
        (pipe.unet, UNET_TARGET_MODULES),
        (pipe.text_encoder, TEXT_ENCODER_TARGET_MODULES),
    ):
        linears = targeted_linears(model, targets)
        # the UNet: 4 transformers x 2 attention layers; the text encoder: 2 layers
        assert len(linears) == (32 if targets == UNET_TARGET_MODULES else 8)
        expected = sum(rank * (m.in_features + m.out_features) for m in linears.values())
        assert add_lora(model, targets, rank) == expected
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected
        assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)


def test_saved_adapters_give_the_same_images_here_and_in_diffusers(base_dir, tmp_path):
    trained = load(base_dir)
    add_lora(trained.unet, UNET_TARGET_MODULES, rank=2, alpha=4.0)  # alpha / rank = 2: the file must keep it
    add_lora(trained.text_encoder, TEXT_ENCODER_TARGET_MODULES, rank=2, alpha=4.0)
    randomize_adapters(trained.unet, trained.text_encoder)
    expected, base = generate(trained), generate(load(base_dir))
    assert np.abs(expected - base).max() > 1e-2  # the adapters change the images

    path = save_lora(tmp_path / "lora", trained.unet, trained.text_encoder)
    assert path == tmp_path / "lora" / LORA_WEIGHT_NAME
    weights = load_file(path)
    assert {k.split(".")[0] for k in weights} == {"unet", "text_encoder"}  # diffusers' prefixes
    assert len(weights) == 2 * (32 + 8)  # an A and a B per adapted layer

    ours = load(base_dir)
    name = load_lora(ours, tmp_path / "lora")
    theirs = StableDiffusionPipeline.from_pretrained(base_dir)
    theirs.set_progress_bar_config(disable=True)
    theirs.load_lora_weights(tmp_path / "lora")
    loaded = generate(ours)
    # the same file gives the same images here and in diffusers
    assert np.abs(loaded - generate(theirs)).max() <= 1e-4
    # and the images of the adapters it was saved from, up to float rounding
    assert np.abs(loaded - expected).max() <= ROUNDING

    # the scale: 0 is the base model; set_adapters and cross_attention_kwargs agree
    assert np.abs(generate(ours, cross_attention_kwargs={"scale": 0.0}) - base).max() <= 1e-4
    half = generate(ours, cross_attention_kwargs={"scale": 0.5})
    assert np.abs(half - base).max() > 1e-3 and np.abs(half - expected).max() > 1e-3
    ours.set_adapters([name], adapter_weights=[0.5])
    assert np.abs(generate(ours) - half).max() <= 1e-4
    ours.set_adapters([name], adapter_weights=[1.0])

    # fuse the update into the weights and take it out again
    base_weights = {k: v.clone() for k, v in ours.unet.state_dict().items() if "lora" not in k}
    ours.fuse_lora()
    assert np.abs(generate(ours) - loaded).max() <= ROUNDING
    ours.unfuse_lora()
    for key, value in ours.unet.state_dict().items():
        if "lora" not in key:
            torch.testing.assert_close(value, base_weights[key], rtol=0, atol=1e-6)
    assert np.abs(generate(ours) - loaded).max() <= ROUNDING
    ours.unload_lora_weights()
    assert np.abs(generate(ours) - base).max() <= 1e-4


def test_weights_that_match_no_layer_are_refused_not_dropped(base_dir, tmp_path):
    trained = load(base_dir)
    add_lora(trained.unet, UNET_TARGET_MODULES, rank=2)
    randomize_adapters(trained.unet)
    save_lora(tmp_path / "good", trained.unet)
    weights = load_file(tmp_path / "good" / LORA_WEIGHT_NAME)
    (tmp_path / "other").mkdir()
    # a LoRA for a model whose query projections are named differently
    renamed = {k.replace(".to_q.", ".query."): v for k, v in weights.items()}
    save_file(renamed, tmp_path / "other" / LORA_WEIGHT_NAME)

    # diffusers loads the rest, logs a warning, and goes on without the unmatched weights
    theirs = load(base_dir)
    theirs.load_lora_weights(tmp_path / "other")
    assert len(theirs.get_list_adapters()["unet"]) == 1

    ours = load(base_dir)
    with pytest.raises(
        ValueError,
        match=r"16 of 64 LoRA weights match no layer of this pipeline, e\.g\. 'unet\..*"
        r"attn1\.query\.lora\.down\.weight' \(no layer '.*attn1\.query' in its 'unet'\)",
    ):
        load_lora(ours, tmp_path / "other")
    assert not ours.get_list_adapters()  # nothing was loaded
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        load_lora(ours, tmp_path / "missing")
    load_lora(ours, tmp_path / "good" / LORA_WEIGHT_NAME)  # the file itself is fine too


def test_finetune_lora_end_to_end(finetune_lora, base_dir, image_dir, tmp_path, monkeypatch):
    exported = {}
    save = text_to_image.save_lora

    def keep_models(path, unet, text_encoder=None):
        exported.update(unet=unet, text_encoder=text_encoder)
        return save(path, unet, text_encoder)

    monkeypatch.setattr(text_to_image, "save_lora", keep_models)
    out = tmp_path / "run"
    argv = flags(
        base_dir, image_dir, out, "--max_train_steps", 4, "--checkpointing_steps", 2, "--rank", 2,
        "--lora_alpha", 4, "--train_text_encoder", "--gradient_checkpointing", "--validation_prompts", "a red square",
        "--validation_steps", 2, "--num_validation_images", 2, "--validation_inference_steps", 2,
    )  # fmt: skip
    lora_dir = run(finetune_lora, argv)

    assert lora_dir == out / "lora" and (lora_dir / LORA_WEIGHT_NAME).is_file()
    assert [g.name for g in sorted((out / "validation").glob("*.png"))] == [
        "step-000002.png",
        "step-000004.png",
    ]
    # checkpoints hold the adapters, not the models: a fraction of the UNet's size
    checkpoint = out / "checkpoints" / "checkpoint-4"
    assert not list(checkpoint.glob("model*")) and (checkpoint / LORA_WEIGHT_NAME).is_file()
    unet_bytes = (base_dir / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size
    assert sum(f.stat().st_size for f in checkpoint.iterdir()) < unet_bytes / 5

    # the pretrained weights are frozen, bit for bit; the adapters trained
    for component in ("unet", "text_encoder"):
        model = exported[component]
        base = {k: v for f in (base_dir / component).glob("*.safetensors") for k, v in load_file(f).items()}
        frozen = {n.replace(".base_layer", ""): p for n, p in model.named_parameters() if "lora_" not in n}
        assert frozen.keys() == base.keys()
        assert all(torch.equal(p.data, base[n]) for n, p in frozen.items()), component
        assert all(p.abs().max() > 0 for n, p in model.named_parameters() if "lora_B" in n), component

    pipe = load(base_dir)
    before = generate(pipe)
    load_lora(pipe, lora_dir)
    assert np.abs(generate(pipe) - before).max() > 1e-3


def test_resume_gives_the_same_adapters_as_one_run(finetune_lora, base_dir, image_dir, tmp_path):
    """4 steps in one go == 2 steps, then a resumed run to 4: same adapters, optimizer and EMA to the bit."""
    common = ("--checkpointing_steps", 2, "--train_text_encoder", "--use_ema", "--gradient_accumulation_steps", 2)  # fmt: skip
    run(finetune_lora, flags(base_dir, image_dir, tmp_path / "one_go", "--max_train_steps", 4, *common))
    split = tmp_path / "split"
    run(finetune_lora, flags(base_dir, image_dir, split, "--max_train_steps", 2, *common))
    run(finetune_lora, flags(base_dir, image_dir, split, "--max_train_steps", 4, "--resume_from_checkpoint", "latest",
                             *common))  # fmt: skip

    a, b = (p / "checkpoints" / "checkpoint-4" for p in (tmp_path / "one_go", split))
    wa, wb = load_file(a / LORA_WEIGHT_NAME), load_file(b / LORA_WEIGHT_NAME)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    halfway = load_file(b.parent / "checkpoint-2" / LORA_WEIGHT_NAME)
    assert not all(torch.equal(wa[k], v) for k, v in halfway.items())
    oa, ob = (torch.load(c / "optimizer.bin", weights_only=False)["state"] for c in (a, b))
    assert oa.keys() == ob.keys() and all(torch.equal(oa[i][n], ob[i][n]) for i in oa for n in oa[i])
    for name in ("custom_checkpoint_0.pkl", "custom_checkpoint_1.pkl"):  # the EMA of each model's adapters
        ea, eb = (torch.load(c / name, weights_only=False) for c in (a, b))
        assert ea["optimization_step"] == eb["optimization_step"] == 4
        assert all(torch.equal(x, y) for x, y in zip(ea["shadow_params"], eb["shadow_params"], strict=True))


def test_mixed_precision_holds_the_frozen_unet_in_half_and_the_adapters_in_fp32(
    finetune_lora, base_dir, image_dir, tmp_path, monkeypatch
):
    exported = {}
    monkeypatch.setattr(text_to_image, "save_lora", lambda path, unet, te=None: exported.update(unet=unet))
    run(finetune_lora, flags(base_dir, image_dir, tmp_path / "run", "--max_train_steps", 1, "--mixed_precision",
                             "bf16", "--cache_latents", "--data_cache_dir", tmp_path / "cache"))  # fmt: skip
    dtypes = {("lora_" in n, p.dtype) for n, p in exported["unet"].named_parameters()}
    assert dtypes == {(False, torch.bfloat16), (True, torch.float32)}


BAD_INPUT = [
    (["--pretrained_model_name_or_path", "IMAGES"], r"is not a pipeline folder \(no model_index.json\)"),
    (["--rank", "0"], r"--rank must be a positive integer, got 0"),
    (["--lora_alpha", "0"], r"--lora_alpha must be > 0, got 0.0"),
    (["--lora_dropout", "1"], r"--lora_dropout must lie in \[0, 1\), got 1.0"),
    (["--proportion_empty_prompts", "2"], r"--proportion_empty_prompts must lie in \[0, 1\], got 2.0"),
]  # fmt: skip


@pytest.mark.parametrize("extra, message", BAD_INPUT, ids=[m[:30] for _, m in BAD_INPUT])
def test_bad_input_fails_before_training(finetune_lora, base_dir, image_dir, tmp_path, extra, message):
    extra = [str(image_dir) if e == "IMAGES" else e for e in extra]
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        run(finetune_lora, [*flags(base_dir, image_dir, tmp_path / "run", "--max_train_steps", 1), *extra])
    assert not (tmp_path / "run").exists()


def test_two_processes_train_one_set_of_adapters(base_dir, image_dir, tmp_path):
    """`accelerate launch` with 2 CPU processes (gloo, as in test_train_ldm.py): the replicas' adapters agree
    to the bit, and the checkpoint holds one LoRA file, written once."""
    out = tmp_path / "run"
    argv = flags(base_dir, image_dir, out, "--max_train_steps", 2, "--checkpointing_steps", 2, "--train_text_encoder")
    log = launch_two_processes(SCRIPT, argv, step=2)
    assert "processes: 2 -> 4 images per optimizer step" in log
    checkpoint = out / "checkpoints" / "checkpoint-2"
    assert sorted(p.name for p in checkpoint.iterdir() if "random_states" not in p.name) == [
        "latentdiff_manifest.json", "latentdiff_state.json", "optimizer.bin", LORA_WEIGHT_NAME, "scheduler.bin"]  # fmt: skip
    assert (out / "lora" / LORA_WEIGHT_NAME).is_file()


def test_an_incompatible_transformers_and_peft_fail_in_one_line_before_training(
    finetune_lora, base_dir, image_dir, tmp_path, monkeypatch
):
    """transformers 5.24 refuses adapters with peft < 0.22 deep inside add_adapter: the text-encoder LoRA
    path says which pair is installed and what to do, before any step is taken."""
    from latentdiff.training import lora

    installed = {"transformers": "5.24.0", "peft": "0.21.2"}
    monkeypatch.setattr(lora, "version", installed.__getitem__)
    monkeypatch.setattr(lora.transformers_peft, "MIN_PEFT_VERSION", "0.22.0", raising=False)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError) as error:
        run(finetune_lora, flags(base_dir, image_dir, out, "--max_train_steps", 1, "--train_text_encoder"))
    message = str(error.value)
    assert len(message.splitlines()) == 1, message
    assert "transformers 5.24.0" in message and "peft 0.21.2" in message, message
    assert "peft>=0.22.0" in message and "requirements/lock.txt" in message, message
    assert not (out / "checkpoints").exists() and not (out / "lora").exists()

    installed["peft"] = "0.22.0"
    lora.check_peft_compatible()
    monkeypatch.delattr(lora.transformers_peft, "MIN_PEFT_VERSION")  # older transformers check nothing
    installed["peft"] = "0.11.0"
    lora.check_peft_compatible()


# kohya-ss sd-scripts' format (networks/lora.py), what AUTOMATIC1111 and ComfyUI load; diffusers' loader converts it

KOHYA_SUFFIXES = {"lora_down.weight", "lora_up.weight", "alpha"}


def kohya_names(pipe):
    """kohya's name of each layer the adapters target: prefix + module path, "." -> "_"; the text encoder's
    under transformers 4's text_model wrapper, as sd-scripts (transformers 4.54) names it."""
    unet = {f"lora_unet_{n}".replace(".", "_") for n in targeted_linears(pipe.unet, UNET_TARGET_MODULES)}
    text = targeted_linears(pipe.text_encoder, TEXT_ENCODER_TARGET_MODULES)
    return unet | {f"lora_te_text_model_{n}".replace(".", "_") for n in text}


def trained_adapters(base_dir, rank=2, alpha=4.0, text_encoder=True):
    pipe = load(base_dir)
    add_lora(pipe.unet, UNET_TARGET_MODULES, rank=rank, alpha=alpha)
    if text_encoder:
        add_lora(pipe.text_encoder, TEXT_ENCODER_TARGET_MODULES, rank=rank, alpha=alpha)
    randomize_adapters(pipe.unet, pipe.text_encoder)
    return pipe


def test_kohya_file_names_each_layer_as_sd_scripts_does_with_its_alpha(base_dir, tmp_path):
    names = kohya_names(load(base_dir))
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in names
    assert "lora_unet_up_blocks_1_attentions_1_transformer_blocks_0_attn2_to_out_0" in names
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in names
    trained = trained_adapters(base_dir, rank=2, alpha=3.0)  # alpha / rank = 1.5

    path = save_lora_kohya(tmp_path / "lora", trained.unet, trained.text_encoder)
    assert path == tmp_path / "lora" / KOHYA_WEIGHT_NAME
    weights = load_file(path)
    by_layer = {}
    for key in weights:
        layer, _, suffix = key.partition(".")
        by_layer.setdefault(layer, set()).add(suffix)
    assert by_layer.keys() == names and len(names) == 32 + 8
    assert all(suffixes == KOHYA_SUFFIXES for suffixes in by_layer.values())
    for layer in names:
        alpha, down, up = (weights[f"{layer}.{s}"] for s in ("alpha", "lora_down.weight", "lora_up.weight"))
        assert alpha.shape == () and alpha.dtype == torch.float32 and alpha.item() == 3.0
        assert down.shape[0] == 2 and up.shape[1] == 2  # A (r x in), B (out x r)
    # the weights are peft's A and B
    q = trained.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    prefix = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert torch.equal(weights[f"{prefix}.lora_down.weight"], q.lora_A["default"].weight)
    assert torch.equal(weights[f"{prefix}.lora_up.weight"], q.lora_B["default"].weight)
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata()
    assert metadata == {"ss_network_module": "networks.lora", "ss_network_dim": "2", "ss_network_alpha": "3.0"}

    # the UNet alone: lora_unet_ keys only
    save_lora_kohya(tmp_path / "unet_only", trained.unet)
    assert all(k.startswith("lora_unet_") for k in load_file(tmp_path / "unet_only" / KOHYA_WEIGHT_NAME))


def test_kohya_file_gives_the_images_of_the_diffusers_file_here_and_in_diffusers(base_dir, tmp_path):
    trained = trained_adapters(base_dir)  # alpha 4, rank 2: a file without its alphas would give other images
    save_lora(tmp_path / "diffusers", trained.unet, trained.text_encoder)
    save_lora_kohya(tmp_path / "kohya", trained.unet, trained.text_encoder)
    base = generate(load(base_dir))

    for pipeline in (LatentDiffPipeline, StableDiffusionPipeline):
        images = {}
        for kind in ("diffusers", "kohya"):
            pipe = pipeline.from_pretrained(base_dir)
            pipe.set_progress_bar_config(disable=True)
            pipe.load_lora_weights(tmp_path / kind)  # the folder: diffusers' loader finds the one file there
            images[kind] = generate(pipe)
        assert np.abs(images["kohya"] - images["diffusers"]).max() <= 1e-5, pipeline.__name__
        assert np.abs(images["kohya"] - base).max() > 1e-2
        if pipeline is LatentDiffPipeline:
            assert pipe.unet.peft_config["default_0"].lora_alpha == 4.0
            assert pipe.text_encoder.peft_config["default_0"].lora_alpha == 4.0
            reference = images["diffusers"]

    # our checked loader reads the folder and the file
    for path in (tmp_path / "kohya", tmp_path / "kohya" / KOHYA_WEIGHT_NAME):
        ours = load(base_dir)
        load_lora(ours, path)
        assert np.abs(generate(ours) - reference).max() <= 1e-5
    # with both files in one folder, diffusers' is the one read, by diffusers' loader and ours
    (tmp_path / "diffusers" / KOHYA_WEIGHT_NAME).write_bytes((tmp_path / "kohya" / KOHYA_WEIGHT_NAME).read_bytes())
    ours = load(base_dir)
    load_lora(ours, tmp_path / "diffusers")
    assert np.abs(generate(ours) - reference).max() <= 1e-5


OTHER_MODELS = {
    # a UNet whose query projections are named differently
    "renamed": (("_attn1_to_q.", "_attn1_query."), r"'down_blocks\.0\.attentions\.0\.transformer_blocks\.0\.attn1\.query'"),
    # a deeper UNet (SD's 4 down blocks; the tiny one has 2)
    "deeper unet": (("lora_unet_down_blocks_0_", "lora_unet_down_blocks_3_"), r"'down_blocks\.3\.attentions\.0\..*'"),
    # a 12-layer text encoder (SD's; the tiny one has 2)
    "deeper text encoder": (("_encoder_layers_1_", "_encoder_layers_11_"), r"'encoder\.layers\.11\.self_attn\..*'"),
}  # fmt: skip


@pytest.mark.parametrize("other", OTHER_MODELS)
def test_kohya_file_for_another_model_is_refused_before_any_image(base_dir, tmp_path, other):
    (old, new), layer = OTHER_MODELS[other]
    trained = trained_adapters(base_dir)
    good = save_lora_kohya(tmp_path / "good", trained.unet, trained.text_encoder)
    weights = load_file(good)
    renamed = {k.replace(old, new): v for k, v in weights.items()}
    assert renamed.keys() != weights.keys()
    (tmp_path / "other").mkdir()
    save_file(renamed, tmp_path / "other" / KOHYA_WEIGHT_NAME)

    ours = load(base_dir)
    calls = []
    ours.unet.register_forward_pre_hook(lambda *_: calls.append(1))
    with pytest.raises(ValueError, match=rf"of 80 LoRA weights match no layer of this pipeline, .*\(no layer {layer}"):
        load_lora(ours, tmp_path / "other")
    assert not ours.get_list_adapters() and not calls  # nothing loaded, nothing generated


def test_unknown_save_format_is_refused_by_the_parser(finetune_lora, base_dir, image_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        run(finetune_lora, flags(base_dir, image_dir, tmp_path / "run", "--max_train_steps", 1, "--save_format", "a1111"))
    assert re.search(r"--save_format: invalid choice: 'a1111' \(choose from '?diffusers'?, '?kohya'?\)", capsys.readouterr().err)
    assert not (tmp_path / "run").exists()


def test_finetune_lora_saves_kohya_format(finetune_lora, base_dir, image_dir, tmp_path):
    out = tmp_path / "run"
    argv = flags(
        base_dir, image_dir, out, "--max_train_steps", 2, "--checkpointing_steps", 2, "--rank", 2, "--lora_alpha", 4,
        "--train_text_encoder", "--save_format", "kohya",
    )  # fmt: skip
    lora_dir = run(finetune_lora, argv)

    assert sorted(p.name for p in lora_dir.iterdir()) == [KOHYA_WEIGHT_NAME]  # instead of diffusers' file
    weights = load_file(lora_dir / KOHYA_WEIGHT_NAME)
    assert {k.partition(".")[0] for k in weights} == kohya_names(load(base_dir))
    assert len(weights) == 3 * (32 + 8)
    assert all(v.item() == 4.0 for k, v in weights.items() if k.endswith(".alpha"))
    # checkpoints keep diffusers' format (resume reads it): the same adapters, the same images
    checkpoint = out / "checkpoints" / "checkpoint-2"
    assert (checkpoint / LORA_WEIGHT_NAME).is_file()
    images = []
    for path in (lora_dir, checkpoint / LORA_WEIGHT_NAME):
        pipe = load(base_dir)
        load_lora(pipe, path)
        images.append(generate(pipe))
    assert np.abs(images[0] - images[1]).max() <= 1e-5
    assert np.abs(images[0] - generate(load(base_dir))).max() > 1e-3
