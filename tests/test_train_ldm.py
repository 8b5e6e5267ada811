"""training/train_ldm.py end to end on tiny models and 32 px shapes: output, exact resume, two processes, bad input."""

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file
from scripts import kill_after_checkpoint, launch_two_processes, load_script, run_script

from latentdiff import LatentDiffPipeline, vae_from_preset
from latentdiff.schedulers import DDPMScheduler
from latentdiff.training import text_to_image
from latentdiff.training.validation import sampling_scheduler

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "training" / "train_ldm.py"
# One thread, as in this process (see one_thread): bit-exact results need the same reduction order, and
# OpenMP threads that spin while waiting slow a step down 50x when another process holds a core.
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from a second thread; and OpenMP threads that spin while another process
    holds a core make every op many times slower (seen here: 50x) on this shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def train_ldm():
    return load_script("train_ldm")


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """A tiny VAE folder (f = 2, 4 latent channels) and a data cache shared by the module's runs."""
    root = tmp_path_factory.mktemp("ldm")
    torch.manual_seed(0)
    vae_from_preset("tiny").save_pretrained(root / "vae")
    return root


def flags(shared, out, *extra, samples=8):
    return [
        "--output_dir", str(out), "--dataset_name", "shapes", "--max_train_samples", str(samples),
        "--data_cache_dir", str(shared / "cache"), "--pretrained_vae_name_or_path", str(shared / "vae"),
        "--unet_preset", "tiny", "--train_batch_size", "2", "--report_to", "none", *extra,
    ]  # fmt: skip


run = run_script


def weights(folder):
    """Every tensor of a checkpoint's models, by file and name."""
    return {
        (f.name, k): v
        for f in sorted(Path(folder).glob("model*.safetensors"))
        for k, v in load_file(f).items()
    }


def assert_same_weights(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and wa
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"{len(different)} of {len(wa)} tensors differ, e.g. {different[:3]}"


def test_end_to_end_writes_a_pipeline_that_loads_and_generates(train_ldm, shared, tmp_path):
    out = tmp_path / "run"
    argv = flags(
        shared, out, "--max_train_steps", 4, "--checkpointing_steps", 2, "--validation_steps", 2,
        "--validation_prompts", "a small red circle in the top left", "a large blue square at the bottom",
        "--num_validation_images", 2, "--validation_inference_steps", 2, "--cache_latents", "--use_ema",
        "--prediction_type", "v_prediction", "--rescale_betas_zero_snr", "--snr_gamma", 5, "--noise_offset", 0.05,
        "--immiscible_noise",
        "--gradient_checkpointing", "--report_to", "tensorboard", "--save_pipeline_at_checkpoints",
    )  # fmt: skip
    pipeline_dir = run(train_ldm, argv)

    assert pipeline_dir == out / "pipeline"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]
    assert list((out / "logs").rglob("events.out.tfevents*"))
    grids = sorted((out / "validation").glob("*.png"))
    assert [g.name for g in grids] == ["step-000002.png", "step-000004.png"]
    from PIL import Image

    assert Image.open(grids[-1]).size == (2 + 2 * 34, 2 + 2 * 34)  # 2 prompts x 2 images of 32 px, 2 px gaps
    # a complete safetensors pipeline whose sampler is the training schedule
    assert not list(pipeline_dir.rglob("*.bin")) and len(list(pipeline_dir.rglob("*.safetensors"))) == 3
    scheduler = json.loads((pipeline_dir / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "DDIMScheduler" and scheduler["prediction_type"] == "v_prediction"
    assert scheduler["rescale_betas_zero_snr"] and scheduler["timestep_spacing"] == "trailing"

    # with --use_ema the exported UNet holds the averaged weights, not the last trained ones
    exported = UNet2DConditionModel.from_pretrained(pipeline_dir / "unet")
    assert exported.config.sample_size == 16  # 32 px / f = 2: the pipeline's default size is the training one
    ema = torch.load(out / "checkpoints" / "checkpoint-4" / "custom_checkpoint_0.pkl", weights_only=False)
    for param, shadow in zip(exported.parameters(), ema["shadow_params"], strict=True):
        torch.testing.assert_close(param.data, shadow, rtol=0, atol=0)
    trained = load_file(out / "checkpoints" / "checkpoint-4" / "model.safetensors")
    assert any(not torch.equal(trained[k], v) for k, v in exported.state_dict().items())
    # --save_pipeline_at_checkpoints: each checkpoint holds the pipeline of its step (EMA weights too)
    at_4 = load_file(out / "checkpoints" / "checkpoint-4" / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")
    assert at_4.keys() == exported.state_dict().keys()
    assert all(torch.equal(v, exported.state_dict()[k]) for k, v in at_4.items())
    early = UNet2DConditionModel.from_pretrained(out / "checkpoints" / "checkpoint-2" / "pipeline" / "unet")
    assert any(not torch.equal(p, q) for p, q in zip(early.parameters(), exported.parameters(), strict=True))

    pipe = LatentDiffPipeline.from_pretrained(pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    images = pipe("a small red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                  output_type="np").images  # fmt: skip
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()


def test_sampling_scheduler_is_the_training_schedule():
    train = DDPMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="sample"
    )
    sampler = sampling_scheduler(train)
    torch.testing.assert_close(sampler.alphas_cumprod, train.alphas_cumprod, rtol=0, atol=0)
    assert sampler.config.prediction_type == "sample" and sampler.config.timestep_spacing == "leading"
    assert not sampler.config.clip_sample  # latents are not bounded to [-1, 1]


def test_continue_from_a_pipeline_folder_keeps_the_pretrained_text_encoder(train_ldm, shared, tmp_path):
    first = run(
        train_ldm, flags(shared, tmp_path / "a", "--max_train_steps", 1, "--prediction_type", "sample")
    )
    second = run(
        train_ldm,
        [
            "--output_dir",
            tmp_path / "b",
            "--dataset_name",
            "shapes",
            "--max_train_samples",
            8,
            "--data_cache_dir",
            shared / "cache",
            "--train_batch_size",
            2,
            "--report_to",
            "none",
            "--pretrained_model_name_or_path",
            first,
            "--max_train_steps",
            1,
            "--cache_latents",
        ],
    )
    for part, changed in (
        ("text_encoder/model.safetensors", False),
        ("unet/diffusion_pytorch_model.safetensors", True),
    ):
        a, b = load_file(first / part), load_file(second / part)
        assert any(not torch.equal(a[k], b[k]) for k in a) == changed, part
    config = json.loads((second / "scheduler" / "scheduler_config.json").read_text())
    assert (
        config["prediction_type"] == "sample"
    )  # the pipeline's own, unless --prediction_type says otherwise


def test_exact_resume_after_kill(train_ldm, shared, tmp_path):
    """6 steps in one go == 6 steps killed (SIGKILL) after the checkpoint at step 2 and resumed: same weights."""
    common = (
        "--max_train_steps",
        6,
        "--checkpointing_steps",
        2,
        "--gradient_accumulation_steps",
        2,
        "--use_ema",
    )
    run(train_ldm, flags(shared, tmp_path / "one_go", *common, samples=10))

    killed = tmp_path / "killed"
    argv = [str(a) for a in flags(shared, killed, *common, samples=10)]
    kill_after_checkpoint(SCRIPT, argv, killed, 2, SUBPROCESS_ENV)

    run(train_ldm, [*argv, "--resume_from_checkpoint", "latest"])
    assert_same_weights(
        tmp_path / "one_go" / "checkpoints" / "checkpoint-6", killed / "checkpoints" / "checkpoint-6"
    )
    ema = [torch.load(p / "checkpoints" / "checkpoint-6" / "custom_checkpoint_0.pkl", weights_only=False)
           for p in (tmp_path / "one_go", killed)]  # fmt: skip
    assert ema[0]["optimization_step"] == ema[1]["optimization_step"] == 6
    for a, b in zip(ema[0]["shadow_params"], ema[1]["shadow_params"], strict=True):
        assert torch.equal(a, b)


def test_latest_resumes_from_the_newest_intact_checkpoint(train_ldm, shared, tmp_path, caplog):
    """checkpoint-4's weights truncated: `latest` warns, resumes from checkpoint-2 and trains to step 4 again;
    the damaged one is set aside, not deleted. Named by path, it is one clear error before any training."""
    out = tmp_path / "run"
    argv = flags(shared, out, "--max_train_steps", 4, "--checkpointing_steps", 2, "--resume_from_checkpoint", "latest")
    run(train_ldm, argv)
    weights_file = out / "checkpoints" / "checkpoint-4" / "model.safetensors"
    weights_file.write_bytes(weights_file.read_bytes()[:1000])

    named = [*argv[:-1], str(out / "checkpoints" / "checkpoint-4")]
    with pytest.raises(ValueError, match=r"the checkpoint is damaged \(model.safetensors has 1000 bytes"):
        run(train_ldm, named)
    with caplog.at_level("WARNING", logger="latentdiff"):
        run(train_ldm, argv)
    assert "skipping damaged checkpoint" in caplog.text and "set aside the newer checkpoint" in caplog.text
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "abandoned-checkpoint-4", "checkpoint-2", "checkpoint-4"
    ]  # fmt: skip
    assert weights(out / "checkpoints" / "checkpoint-4")  # whole again


def test_time_budget_stops_checkpoints_the_last_step_and_holds_across_resumes(train_ldm, shared, tmp_path):
    out = tmp_path / "run"

    def argv(steps, minutes):
        return flags(shared, out, "--max_train_steps", steps, "--checkpointing_steps", 20,
                     "--max_train_minutes", minutes, "--resume_from_checkpoint", "latest")  # fmt: skip

    run(train_ldm, argv(50, 0.05 / 60))  # 50 ms: spent by the first step
    checkpoint = out / "checkpoints" / "checkpoint-1"
    assert [p.name for p in (out / "checkpoints").iterdir()] == [checkpoint.name]  # stopped by time, last step saved
    state = json.loads((checkpoint / "latentdiff_state.json").read_text())
    assert state["global_step"] == 1 and state["train_seconds"] >= 0.05
    first = weights(checkpoint)

    run(train_ldm, argv(50, 0.05 / 60))  # the same command again: the budget is spent, nothing more is trained
    assert [p.name for p in (out / "checkpoints").iterdir()] == [checkpoint.name]
    assert all(torch.equal(v, first[k]) for k, v in weights(checkpoint).items())

    run(train_ldm, argv(3, 10))  # a larger budget goes on from the saved last step, to the step count
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-1", "checkpoint-3"]


def test_two_processes_train_one_model(shared, tmp_path):
    """`accelerate launch` with 2 CPU processes (gloo): both train, replicas agree, the step count is the
    optimizer's, and files are written once."""
    out = tmp_path / "run"
    steps = 3
    argv = flags(shared, out, "--max_train_steps", steps, "--checkpointing_steps", steps,
                 "--gradient_accumulation_steps", 2, "--cache_latents", samples=16)  # fmt: skip
    log = launch_two_processes(SCRIPT, argv, step=steps)
    assert "processes: 2 -> 8 images per optimizer step" in log

    checkpoint = out / "checkpoints" / f"checkpoint-{steps}"
    optimizer = torch.load(checkpoint / "optimizer.bin", weights_only=False)
    assert {int(s["step"]) for s in optimizer["state"].values()} == {steps}  # AdamW stepped once per step
    lr_scheduler = torch.load(checkpoint / "scheduler.bin", weights_only=False)
    assert lr_scheduler["last_epoch"] == steps * 2  # accelerate steps it num_processes times per step
    # one copy of everything, written by the main process; RNG states are per process by design
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "latentdiff_run.json", "pipeline"]
    assert sorted(p.name for p in checkpoint.iterdir() if p.name.startswith("random_states")) == [
        "random_states_0.pkl", "random_states_1.pkl"]  # fmt: skip
    assert [p.name for p in (out / "checkpoints").iterdir()] == [checkpoint.name]
    assert (
        len(list((shared / "cache" / "latents").rglob("shard-*-of-00002.safetensors"))) == 2
    )  # each encoded half


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_a_non_finite_loss_stops_before_a_checkpoint_or_is_skipped(
    train_ldm, shared, tmp_path, monkeypatch, policy
):
    calls = []
    loss_fn = text_to_image.diffusion_loss

    def nan_at_second_batch(*args, **kwargs):
        calls.append(1)
        loss = loss_fn(*args, **kwargs)
        return loss * float("nan") if len(calls) == 2 else loss

    monkeypatch.setattr(text_to_image, "diffusion_loss", nan_at_second_batch)
    out = tmp_path / "run"
    argv = flags(shared, out, "--max_train_steps", 3, "--checkpointing_steps", 1, "--nan_policy", policy)
    if policy == "stop":
        with pytest.raises(FloatingPointError, match="not finite .* at step 2"):
            run(train_ldm, argv)
        assert [p.name for p in (out / "checkpoints").iterdir()] == ["checkpoint-1"]
    else:
        run(train_ldm, argv)
        assert (out / "pipeline" / "model_index.json").is_file()
        assert all(torch.isfinite(t).all() for t in weights(out / "checkpoints" / "checkpoint-3").values())


@pytest.fixture(scope="module")
def vae8(shared):
    path = shared / "vae8"
    vae_from_preset("tiny", latent_channels=8).save_pretrained(path)
    return path


BAD_INPUT = [
    (["--unet_preset", "huge"], r"--unet_preset 'huge' is unknown; choose one of 'tiny', 'small', 'small64', 'base', 'sd15'"),
    (["--text_encoder_preset", "huge"], r"--text_encoder_preset 'huge' is unknown; choose one of 'tiny'"),
    (["--text_encoder_preset", "small"],
     r"the text encoder's hidden size is 128 but the UNet's cross_attention_dim is 32"),
    (["VAE8"], r"the VAE has 8 latent channels but the UNet takes 4 and predicts 4"),  # a pipeline's UNet
    (["--validation_prompts"], r"--validation_prompts was given without any prompt"),
    (["--resolution", "33"], r"--resolution 33 is not a multiple of the VAE's downsampling factor 2"),
    (["--mixed_precision", "fp16"], r"--mixed_precision fp16 needs a CUDA GPU"),
    (["NO_VAE"], r"needs a trained autoencoder: give --pretrained_vae_name_or_path"),
    (["--rescale_betas_zero_snr"], r"--rescale_betas_zero_snr .* add --prediction_type v_prediction"),
    (["--proportion_empty_prompts", "1.5"], r"--proportion_empty_prompts must lie in \[0, 1\], got 1.5"),
    (["--pretrained_model_name_or_path", "nowhere"], r"'nowhere' is not a pipeline folder"),
    (["--snr_gamma", "5", "--loss_weighting", "edm"], r"--snr_gamma and --loss_weighting edm are two loss weightings"),
    (["--token_embedding_std", "0"], r"--token_embedding_std must be > 0, got 0.0"),
    (["--unet_block_out_channels", "64", "128", "128"], r"the tiny UNet has 2 levels, give 2 widths"),
    (["--unet_block_out_channels", "48", "64"], r"each width must be a positive multiple of 32"),
    (["--unet_layers_per_block", "0"], r"--unet_layers_per_block 0: give 1 or more"),
    (["--pretrained_model_name_or_path", "nowhere", "--unet_layers_per_block", "2"],
     r"--unet_layers_per_block build new models"),
    (["--token_embedding_std", "0.5", "--pretrained_text_encoder_name_or_path", "nowhere"],
     r"--token_embedding_std initialises a new text encoder, but --pretrained_text_encoder_name_or_path brings"),
]  # fmt: skip


@pytest.mark.parametrize("extra, message", BAD_INPUT, ids=[m[:40] for _, m in BAD_INPUT])
def test_bad_input_fails_before_training(train_ldm, shared, vae8, tiny_pipeline_dir, tmp_path, extra, message):
    if torch.cuda.is_available() and "fp16" in extra:
        pytest.skip("fp16 is allowed with a GPU")
    argv = flags(shared, tmp_path / "run", "--max_train_steps", 1)
    if extra == ["VAE8"]:  # a pretrained UNet of 4 channels given a VAE of 8
        argv[argv.index("--pretrained_vae_name_or_path") + 1] = vae8
        i = argv.index("--unet_preset")
        del argv[i : i + 2]
        extra = ["--pretrained_model_name_or_path", str(tiny_pipeline_dir)]
    if extra == ["NO_VAE"]:
        i = argv.index("--pretrained_vae_name_or_path")
        del argv[i : i + 2]
        extra = []
    if "--pretrained_model_name_or_path" in extra and "--unet_preset" in argv:
        i = argv.index("--unet_preset")
        del argv[i : i + 2]
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        run(train_ldm, [*argv, *extra])
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_new_unet_takes_the_vaes_latent_channels(train_ldm, shared, vae8, tmp_path):
    out = tmp_path / "run"
    argv = flags(shared, out, "--max_train_steps", 1)
    argv[argv.index("--pretrained_vae_name_or_path") + 1] = str(vae8)
    run(train_ldm, argv)
    config = json.loads((out / "pipeline" / "unet" / "config.json").read_text())
    assert config["in_channels"] == config["out_channels"] == 8


def test_token_embedding_std_sets_a_new_text_encoders_embeddings_and_the_pipeline_keeps_them(
    train_ldm, shared, tmp_path
):
    stds = {}
    for name, extra in (("default", []), ("scaled", ["--token_embedding_std", "0.5"])):
        out = tmp_path / name
        run(train_ldm, flags(shared, out, "--max_train_steps", 1, "--seed", 3, "--no-train_text_encoder", *extra))
        pipe = LatentDiffPipeline.from_pretrained(out / "pipeline")
        stds[name] = pipe.text_encoder.get_input_embeddings().weight
        image = pipe("a red circle", num_inference_steps=2, output_type="np").images[0]
        assert image.shape[-1] == 3 and np.isfinite(image).all()
    assert stds["default"].std().item() == pytest.approx(0.02, rel=0.02)
    assert stds["scaled"].std().item() == pytest.approx(0.5, rel=0.02)
    # the same seed's draw, rescaled: the flag changes the scale, not the embedding's directions
    torch.testing.assert_close(stds["scaled"], stds["default"] * 25, rtol=1e-5, atol=1e-6)


def test_edm_loss_weighting_and_immiscible_noise_train(train_ldm, shared, tmp_path):
    out = tmp_path / "run"
    run(train_ldm, flags(shared, out, "--max_train_steps", 2, "--loss_weighting", "edm", "--immiscible_noise",
                         "--prediction_type", "v_prediction"))  # fmt: skip
    assert (out / "pipeline" / "model_index.json").is_file()
    unet = load_file(out / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.isfinite(t).all() for t in unet.values())


@pytest.mark.skipif(importlib.util.find_spec("xformers") is not None, reason="xformers is installed")
def test_xformers_flag_without_xformers_is_a_clear_error(train_ldm, shared, tmp_path):
    argv = flags(
        shared, tmp_path / "run", "--max_train_steps", 1, "--enable_xformers_memory_efficient_attention"
    )
    with pytest.raises(ValueError, match="needs the xformers package"):
        run(train_ldm, argv)


def test_held_out_loss_is_logged_at_fixed_noise(train_ldm, shared, tmp_path):
    """--validation_loss_images: the diffusion loss of held-out images at every validation, its randomness
    fixed once, so two runs agree and the value moves only with the weights."""
    def losses(out, *extra):
        run(train_ldm, flags(shared, out, "--max_train_steps", 3, "--validation_steps", 1, "--validation_loss_images", 4,
                             "--learning_rate", 1e-3, *extra))  # fmt: skip
        return [json.loads(line) for line in (out / "validation" / "loss.jsonl").read_text().splitlines()]

    first, again = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert [r["step"] for r in first] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in first)
    assert first == again
    assert len({r["loss"] for r in first}) == 3  # the weights changed between validations
    cached = losses(tmp_path / "c", "--cache_latents")
    assert [r["step"] for r in cached] == [1, 2, 3]
    with pytest.raises(ValueError, match="--validation_loss_images must be >= 0"):
        run(train_ldm, flags(shared, tmp_path / "d", "--max_train_steps", 1, "--validation_loss_images", -1))


def test_unet_shape_flags_shape_the_new_unet(train_ldm, shared, tmp_path):
    out = tmp_path / "run"
    run(train_ldm, flags(shared, out, "--max_train_steps", 1, "--unet_block_out_channels", 64, 96,
                         "--unet_layers_per_block", 2))
    config = json.loads((out / "pipeline" / "unet" / "config.json").read_text())
    assert config["block_out_channels"] == [64, 96] and config["layers_per_block"] == 2
    assert config["down_block_types"] == ["CrossAttnDownBlock2D", "DownBlock2D"]  # the rest is tiny's
