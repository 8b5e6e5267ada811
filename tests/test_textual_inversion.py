"""Textual inversion: new tokens and their embedding rows, training/textual_inversion.py end to end (only the
new rows train; every other weight bit for bit unchanged), both file layouts loading to the same images here
and in diffusers, exact resume, and the bad input refused before any work."""

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image
from safetensors.torch import load_file, save_file
from scripts import launch_two_processes, load_script, run_script

from latentdiff import LatentDiffPipeline
from latentdiff.training import textual_inversion as ti
from latentdiff.training.textual_inversion import (
    A1111_KEY,
    DIFFUSERS_WEIGHT_NAME,
    PlaceholderEmbedding,
    add_placeholder,
    load_textual_inversion,
)

TOKEN, INITIALIZER, NUM_VECTORS = "<sks-toy>", "cat", 2
PROMPT = "a photo of <sks-toy> on grass"
SCRIPT = Path(__file__).resolve().parents[1] / "training" / "textual_inversion.py"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base_dir(tiny_pipeline_dir):
    return tiny_pipeline_dir


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    """Four 16 px images of one orange square on white, no captions (the templates give them)."""
    path = tmp_path_factory.mktemp("images")
    for i in range(4):
        pixels = np.full((16, 16, 3), 255, np.uint8)
        pixels[2 + i : 10 + i, 4:12] = (240, 140, 20)
        Image.fromarray(pixels).save(path / f"{i}.png")
    return path


@pytest.fixture(scope="module")
def script():
    return load_script("textual_inversion")


def flags(base_dir, image_dir, out, *extra):
    return [
        "--pretrained_model_name_or_path", base_dir, "--train_data_dir", image_dir, "--output_dir", out,
        "--train_batch_size", 2, "--report_to", "none", "--placeholder_token", TOKEN, "--initializer_token",
        INITIALIZER, "--num_vectors", NUM_VECTORS, "--learning_rate", 0.1, *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def trained(script, base_dir, image_dir, tmp_path_factory):
    """One 4-step run: (its output folder, the task as it was at export)."""
    out = tmp_path_factory.mktemp("ti") / "run"
    tasks = []
    export = ti.TextualInversion.export
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ti.TextualInversion, "export", lambda self, path: (tasks.append(self), export(self, path))[1])
        argv = flags(
            base_dir, image_dir, out, "--max_train_steps", 4, "--checkpointing_steps", 2, "--gradient_checkpointing",
            "--validation_prompt", "a photo of <sks-toy>", "--validation_steps", 2, "--num_validation_images", 1,
            "--validation_inference_steps", 2,
        )  # fmt: skip
        folder = run_script(script, argv)
    assert folder == out / "textual_inversion"
    return out, tasks[0]


def load(path):
    pipe = LatentDiffPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_pipeline(path):
    pipe = StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, prompt=PROMPT):
    return pipe(
        [prompt, "a photo of a cat"], num_inference_steps=3, guidance_scale=4.0,
        generator=torch.Generator().manual_seed(0), output_type="np",
    ).images  # fmt: skip


def test_new_tokens_get_new_rows_started_at_the_initializer_and_only_they_take_gradients(tiny_pipeline):
    pipe = copy.deepcopy(tiny_pipeline)
    vocab_size = len(pipe.tokenizer)
    table = pipe.text_encoder.get_input_embeddings().weight.detach().clone()
    embedding = add_placeholder(pipe.tokenizer, pipe.text_encoder, TOKEN, INITIALIZER, 3)
    assert pipe.text_encoder.get_input_embeddings() is embedding and embedding.vectors.shape == (3, table.shape[1])
    tokens = ["<sks-toy>", "<sks-toy>_1", "<sks-toy>_2"]  # named as diffusers' pipelines write them out
    assert pipe.tokenizer.convert_tokens_to_ids(tokens) == [vocab_size + i for i in range(3)]
    assert pipe.maybe_convert_prompt(["a <sks-toy> photo", "none"], pipe.tokenizer) == [f"a {' '.join(tokens)} photo", "none"]
    cat = pipe.tokenizer.convert_tokens_to_ids("cat</w>")
    ids = torch.tensor([[cat, vocab_size, 5, vocab_size + 2]])
    rows = embedding(ids)  # (1, 4, D)
    assert torch.equal(rows[0, 0], table[cat]) and torch.equal(rows[0, 2], table[5])
    assert torch.equal(rows[0, 1], table[cat]) and torch.equal(rows[0, 3], table[cat])  # started at "cat"
    pipe.text_encoder(ids)[0].sum().backward()
    grads = {n for n, p in pipe.text_encoder.named_parameters() if p.grad is not None}
    assert grads >= {"embeddings.token_embedding.vectors"}
    assert embedding.table.weight.grad is None and not embedding.table.weight.requires_grad
    assert embedding.vectors.grad[0].abs().sum() > 0 and embedding.vectors.grad[1].abs().sum() == 0  # <sks-toy>_1 unused


def test_training_moves_the_new_rows_only_and_every_other_weight_stays_bit_for_bit(trained, base_dir):
    out, task = trained
    assert [g.name for g in sorted((out / "validation").glob("*.png"))] == ["step-000002.png", "step-000004.png"]
    # checkpoints hold the vectors, not the models
    checkpoint = out / "checkpoints" / "checkpoint-4"
    assert not list(checkpoint.glob("model*")) and (checkpoint / DIFFUSERS_WEIGHT_NAME).is_file()

    base = {
        component: {k: v for f in (base_dir / component).glob("*.safetensors") for k, v in load_file(f).items()}
        for component in ("unet", "text_encoder")
    }
    text_encoder = task.accelerator.unwrap_model(task.text_encoder)
    weights = {n.replace("token_embedding.table.", "token_embedding."): p for n, p in text_encoder.named_parameters()}
    vectors = weights.pop("embeddings.token_embedding.vectors")
    assert weights.keys() == base["text_encoder"].keys()
    assert all(torch.equal(p.data, base["text_encoder"][n]) for n, p in weights.items())
    unet = dict(task.unet.named_parameters())
    assert unet.keys() == base["unet"].keys() and all(torch.equal(p.data, base["unet"][n]) for n, p in unet.items())
    cat = task.tokenizer.convert_tokens_to_ids("cat</w>")
    initial = base["text_encoder"]["embeddings.token_embedding.weight"][cat]
    assert all((v - initial).abs().max() > 1e-2 for v in vectors)  # both vectors trained

    files = {f.name: load_file(f) for f in (out / "textual_inversion").iterdir()}
    assert files.keys() == {DIFFUSERS_WEIGHT_NAME, "sks-toy.safetensors"}
    assert torch.equal(files[DIFFUSERS_WEIGHT_NAME][TOKEN], vectors.detach())
    assert torch.equal(files["sks-toy.safetensors"][A1111_KEY], vectors.detach())

    # loaded into a fresh pipeline: the table's old rows are the base's to the bit, the new rows the vectors
    pipe = load(base_dir)
    assert load_textual_inversion(pipe, out / "textual_inversion") == TOKEN
    table = pipe.text_encoder.get_input_embeddings().weight
    old = base["text_encoder"]["embeddings.token_embedding.weight"]
    assert torch.equal(table[: len(old)], old) and torch.equal(table[len(old) :], vectors.detach())


def test_the_learned_token_changes_the_image(trained, base_dir, tmp_path):
    out, _ = trained
    base = load(base_dir)
    # before training, "<sks-toy>" (written out "<sks-toy> <sks-toy>_1" by the pipeline) is "cat cat"
    initial_images = generate(base, PROMPT.replace("<sks-toy>", "cat cat"))
    untrained = load(base_dir)
    cat = untrained.tokenizer.convert_tokens_to_ids("cat</w>")
    start = untrained.text_encoder.get_input_embeddings().weight[cat].detach().repeat(NUM_VECTORS, 1)
    save_file({TOKEN: start.contiguous()}, tmp_path / "start.safetensors")
    load_textual_inversion(untrained, tmp_path / "start.safetensors")
    assert np.abs(generate(untrained) - initial_images).max() <= 1e-6

    learned = load(base_dir)
    load_textual_inversion(learned, out / "textual_inversion")
    images = generate(learned)
    assert np.abs(images[0] - initial_images[0]).max() > 1e-2  # the prompt with the token
    assert np.abs(images[1] - initial_images[1]).max() <= 1e-6  # a prompt without it: as before


def test_both_layouts_give_the_same_images_here_and_in_diffusers(trained, base_dir):
    """Each pipeline writes the two-vector token of the prompt out itself (maybe_convert_prompt)."""
    folder = trained[0] / "textual_inversion"
    diffusers_layout = load(base_dir)
    load_textual_inversion(diffusers_layout, folder / DIFFUSERS_WEIGHT_NAME)
    expected = generate(diffusers_layout)
    a1111 = load(base_dir)
    assert load_textual_inversion(a1111, folder / "sks-toy.safetensors", token=TOKEN) == TOKEN
    assert np.array_equal(generate(a1111), expected)
    named_by_file = load(base_dir)  # A1111's word is the file's name
    assert load_textual_inversion(named_by_file, folder / "sks-toy.safetensors") == "sks-toy"
    assert np.array_equal(generate(named_by_file, PROMPT.replace("<sks-toy>", "sks-toy")), expected)

    for kwargs in ({}, {"weight_name": "sks-toy.safetensors", "token": TOKEN}):
        theirs = diffusers_pipeline(base_dir)
        theirs.load_textual_inversion(folder, **kwargs)
        images = theirs(
            [PROMPT, "a photo of a cat"], num_inference_steps=3, guidance_scale=4.0,
            generator=torch.Generator().manual_seed(0), output_type="np",
        ).images  # fmt: skip
        assert np.abs(images - expected).max() <= 1e-4


def test_resume_gives_the_same_vectors_as_one_run(script, base_dir, image_dir, tmp_path):
    """4 steps in one go == 2 steps, then a resumed run to 4: same vectors, optimizer and EMA to the bit."""
    common = ("--checkpointing_steps", 2, "--use_ema", "--gradient_accumulation_steps", 2)
    run_script(script, flags(base_dir, image_dir, tmp_path / "one_go", "--max_train_steps", 4, *common))
    split = tmp_path / "split"
    run_script(script, flags(base_dir, image_dir, split, "--max_train_steps", 2, *common))
    resume = ("--max_train_steps", 4, "--resume_from_checkpoint", "latest")
    run_script(script, flags(base_dir, image_dir, split, *resume, *common))

    a, b = (p / "checkpoints" / "checkpoint-4" for p in (tmp_path / "one_go", split))
    va, vb = (load_file(c / DIFFUSERS_WEIGHT_NAME)[TOKEN] for c in (a, b))
    assert torch.equal(va, vb)
    assert not torch.equal(va, load_file(b.parent / "checkpoint-2" / DIFFUSERS_WEIGHT_NAME)[TOKEN])
    oa, ob = (torch.load(c / "optimizer.bin", weights_only=False)["state"] for c in (a, b))
    assert oa.keys() == ob.keys() and all(torch.equal(oa[i][n], ob[i][n]) for i in oa for n in oa[i])
    ea, eb = (torch.load(c / "custom_checkpoint_0.pkl", weights_only=False) for c in (a, b))
    assert ea["optimization_step"] == eb["optimization_step"] == 4
    assert all(torch.equal(x, y) for x, y in zip(ea["shadow_params"], eb["shadow_params"], strict=True))
    # the export is the EMA of the vectors
    exported = load_file(split / "textual_inversion" / DIFFUSERS_WEIGHT_NAME)[TOKEN]
    assert torch.equal(exported, eb["shadow_params"][0].cpu()) and not torch.equal(exported, vb)


BAD_INPUT = [
    (["--initializer_token", "toy car"], r"--initializer_token 'toy car' is 2 tokens \(\['toy</w>', 'car</w>'\]\)"),
    (["--placeholder_token", "cat"], r"--placeholder_token 'cat': 'cat' is already in the tokenizer's vocabulary"),
    (["--placeholder_token", "<Tok>"], r"--placeholder_token '<Tok>' must be one lowercase word"),
    (["--num_vectors", "0"], r"--num_vectors must be at least 1, got 0"),
    (["--save_pipeline_at_checkpoints"], r"--save_pipeline_at_checkpoints is not for textual inversion"),
]  # fmt: skip


@pytest.mark.parametrize("extra, message", BAD_INPUT, ids=[m[:30] for _, m in BAD_INPUT])
def test_bad_input_fails_before_training(script, base_dir, image_dir, tmp_path, extra, message):
    with pytest.raises(ValueError, match=message):
        run_script(script, [*flags(base_dir, image_dir, tmp_path / "run", "--max_train_steps", 1), *extra])
    assert not (tmp_path / "run").exists()


def test_a_file_of_another_vector_size_or_layout_is_refused_before_anything_changes(base_dir, tmp_path):
    pipe = load(base_dir)
    size = pipe.text_encoder.get_input_embeddings().embedding_dim
    vocab_size = len(pipe.tokenizer)
    save_file({TOKEN: torch.zeros(2, 16)}, tmp_path / "small.safetensors")
    message = rf"holds vectors of size 16, but this text encoder's token embeddings have size {size}"
    with pytest.raises(ValueError, match=message):
        load_textual_inversion(pipe, tmp_path / "small.safetensors")
    save_file({"a": torch.zeros(1, size), "b": torch.zeros(1, size)}, tmp_path / "two.safetensors")
    with pytest.raises(ValueError, match=r"holds 2 tensors \(a, b\); a textual inversion file holds one"):
        load_textual_inversion(pipe, tmp_path / "two.safetensors")
    torch.save({TOKEN: torch.zeros(1, size)}, tmp_path / "pickled.pt")
    with pytest.raises(ValueError, match=r"not a \.safetensors file; pickled embeddings"):
        load_textual_inversion(pipe, tmp_path / "pickled.pt")
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_textual_inversion(pipe, tmp_path)
    assert len(pipe.tokenizer) == vocab_size and pipe.text_encoder.get_input_embeddings().num_embeddings == vocab_size

    save_file({TOKEN: torch.zeros(1, size)}, tmp_path / "good.safetensors")
    load_textual_inversion(pipe, tmp_path / "good.safetensors")
    with pytest.raises(ValueError, match=r"Token <sks-toy> already in tokenizer vocabulary"):  # diffusers' check
        load_textual_inversion(pipe, tmp_path / "good.safetensors")


def test_a_tokenizer_longer_than_the_embedding_table_is_refused(tiny_pipeline):
    pipe = copy.deepcopy(tiny_pipeline)
    pipe.tokenizer.add_tokens(["<other>"])
    message = r"the tokenizer has 49409 tokens but the text encoder's embedding table 49408 rows"
    with pytest.raises(ValueError, match=message):
        add_placeholder(pipe.tokenizer, pipe.text_encoder, TOKEN, INITIALIZER, 1)
    assert not isinstance(pipe.text_encoder.get_input_embeddings(), PlaceholderEmbedding)


def test_mixed_precision_trains_fp32_vectors_through_the_frozen_models(script, base_dir, image_dir, tmp_path):
    argv = flags(
        base_dir, image_dir, tmp_path / "run", "--max_train_steps", 1, "--mixed_precision", "bf16", "--cache_latents",
        "--data_cache_dir", tmp_path / "cache",
    )  # fmt: skip
    out = run_script(script, argv)
    vectors = load_file(out / DIFFUSERS_WEIGHT_NAME)[TOKEN]
    assert vectors.dtype == torch.float32 and vectors.shape == (NUM_VECTORS, 32) and vectors.isfinite().all()


def test_two_processes_train_one_set_of_vectors(base_dir, image_dir, tmp_path):
    """`accelerate launch` with 2 CPU processes (gloo, as in test_lora.py): the replicas' vectors agree to the
    bit, and the checkpoint holds the embedding files, not the text encoder."""
    out = tmp_path / "run"
    log = launch_two_processes(SCRIPT, flags(base_dir, image_dir, out, "--max_train_steps", 2, "--checkpointing_steps", 2), step=2)
    assert "processes: 2 -> 4 images per optimizer step" in log
    checkpoint = out / "checkpoints" / "checkpoint-2"
    assert sorted(p.name for p in checkpoint.iterdir() if "random_states" not in p.name) == [
        "latentdiff_manifest.json", "latentdiff_state.json", DIFFUSERS_WEIGHT_NAME, "optimizer.bin",
        "scheduler.bin", "sks-toy.safetensors"]  # fmt: skip
    assert (out / "textual_inversion" / DIFFUSERS_WEIGHT_NAME).is_file()
