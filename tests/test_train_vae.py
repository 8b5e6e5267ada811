"""training/train_vae.py end to end on the tiny preset: exact resume, the exported folder, bad input."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file, save_file
from scripts import load_script, run_script

from latentdiff import LatentDiffPipeline, pipeline_from_preset
from latentdiff.training.perceptual import LPIPS

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "training" / "train_vae.py"
train_vae = load_script("train_vae")

# 24 shapes, 4 per batch, 2 accumulation steps: 3 optimizer steps an epoch, so 8 steps cross epochs
TINY = [
    "--max_train_samples",
    "24",
    "--train_batch_size",
    "4",
    "--gradient_accumulation_steps",
    "2",
    "--learning_rate",
    "1e-3",
    "--lr_warmup_steps",
    "2",
    "--use_ema",
    "--validation_steps",
    "4",
    "--num_heldout_images",
    "8",
    "--num_grid_images",
    "4",
    "--scaling_factor_images",
    "8",
]


def run(output_dir, *flags):
    model = (
        []
        if "--pretrained_vae_name_or_path" in flags or "--vae_preset" in flags
        else ["--vae_preset", "tiny"]
    )
    return run_script(train_vae, ["--output_dir", output_dir, *TINY, *model, *flags])


@pytest.fixture(scope="module")
def eight_steps(tmp_path_factory):
    """8 steps in one go, a checkpoint every 4 (TensorBoard on); the reference for resume."""
    out = tmp_path_factory.mktemp("vae") / "one_go"
    metrics = run(out, "--max_train_steps", "8", "--checkpointing_steps", "4")
    return out, metrics


def test_resume_is_exact(eight_steps, tmp_path):
    one_go, _ = eight_steps
    # a run killed after step 4: its output dir holds checkpoint-4 (and a half-written save)
    killed = tmp_path / "killed"
    shutil.copytree(one_go / "checkpoints" / "checkpoint-4", killed / "checkpoints" / "checkpoint-4")
    (killed / "checkpoints" / ".tmp-checkpoint-5").mkdir()
    run(
        killed,
        "--max_train_steps",
        "8",
        "--checkpointing_steps",
        "4",
        "--resume_from_checkpoint",
        "latest",
        "--report_to",
        "none",
    )

    first, resumed = json.loads((one_go / "metrics.json").read_text()), json.loads((killed / "metrics.json").read_text())
    # the training time is the whole run's: the 4 steps before the kill (checkpoint-4's) and the 4 after
    before = json.loads((killed / "checkpoints/checkpoint-4/latentdiff_state.json").read_text())["train_seconds"]
    assert resumed["train_seconds"] > before > 0 and first["images_per_second"] > 0 and resumed["images_per_second"] > 0
    rerun = run(killed, "--max_train_steps", "8", "--checkpointing_steps", "4", "--resume_from_checkpoint", "latest",
                "--report_to", "none")  # a finished run: trains nothing and keeps its time
    at_end = json.loads((killed / "checkpoints/checkpoint-8/latentdiff_state.json").read_text())["train_seconds"]
    assert rerun["train_seconds"] >= at_end > before and rerun["images_per_second"] is None

    for name in ("vae/diffusion_pytorch_model.safetensors", "checkpoints/checkpoint-8/model.safetensors"):
        expected, resumed = load_file(one_go / name), load_file(killed / name)
        assert all(torch.equal(expected[k], resumed[k]) for k in expected), name
    for name in ("optimizer.bin", "custom_checkpoint_0.pkl"):  # AdamW moments; the EMA
        expected = torch.load(one_go / "checkpoints/checkpoint-8" / name, weights_only=False)
        resumed = torch.load(killed / "checkpoints/checkpoint-8" / name, weights_only=False)
        torch.testing.assert_close(resumed, expected, rtol=0, atol=0)


def test_exported_vae_loads_with_its_measured_scaling_factor(eight_steps, tmp_path):
    out, metrics = eight_steps
    saved = json.loads((out / "metrics.json").read_text())
    assert {"psnr", "ssim", "kl", "scaling_factor", "latent_std"} <= set(saved)
    assert (
        saved["scaling_factor"]
        == pytest.approx(1 / saved["latent_std"])
        == pytest.approx(metrics["scaling_factor"])
    )
    vae = AutoencoderKL.from_pretrained(out / "vae")
    assert vae.config.scaling_factor == pytest.approx(saved["scaling_factor"])
    assert (out / "vae" / "diffusion_pytorch_model.safetensors").is_file()
    assert sorted(p.name for p in (out / "validation").iterdir()) == ["step-000004.png", "step-000008.png"]
    assert list((out / "logs").rglob("events.out.tfevents.*"))

    pipe = pipeline_from_preset("tiny")
    pipe.vae = vae
    pipe.save_pretrained(tmp_path / "pipeline")
    loaded = LatentDiffPipeline.from_pretrained(tmp_path / "pipeline")
    assert loaded.vae.config.scaling_factor == pytest.approx(saved["scaling_factor"])
    loaded.set_progress_bar_config(disable=True)
    image = loaded("a red circle", num_inference_steps=1, height=32, width=32, output_type="np").images
    assert image.shape == (1, 32, 32, 3)


@pytest.mark.parametrize(
    "flags, error, message",
    [
        (
            ["--vae_preset", "small", "--resolution", "34"],
            ValueError,
            "--resolution 34 is not divisible by the VAE's downsampling factor 4",
        ),
        (
            ["--resume_from_checkpoint", "checkpoint-77"],
            FileNotFoundError,
            "--resume_from_checkpoint 'checkpoint-77' does not exist",
        ),
        (
            ["--pretrained_vae_name_or_path", "/nonexistent"],
            FileNotFoundError,
            "is not a local AutoencoderKL folder",
        ),
        (["--kl_weight", "-1"], ValueError, "kl_weight must be >= 0"),
        (
            ["--pretrained_vae_name_or_path", "/nonexistent", "--latent_channels", "8"],
            ValueError,
            "--vae_preset and --latent_channels shape a new VAE",
        ),
    ],
)
def test_bad_input_fails_before_training(tmp_path, flags, error, message):
    with pytest.raises(error, match=message):
        run(tmp_path / "out", "--max_train_steps", "1", "--report_to", "none", *flags)
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_latent_channels_shape_a_new_vae(tmp_path, capsys):
    run(tmp_path / "out", "--max_train_steps", "1", "--report_to", "none", "--latent_channels", "8")
    config = json.loads((tmp_path / "out" / "vae" / "config.json").read_text())
    assert config["latent_channels"] == 8 and config["block_out_channels"] == [32, 64]  # the rest as the tiny preset has it
    with pytest.raises(SystemExit):
        run(tmp_path / "zero", "--max_train_steps", "1", "--latent_channels", "0")
    assert "--latent_channels must be a positive integer, got 0" in capsys.readouterr().err


def test_unknown_preset_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        train_vae.parse_args(["--output_dir", str(tmp_path), "--vae_preset", "huge"])
    err = capsys.readouterr().err
    assert "--vae_preset: invalid choice: 'huge'" in err and "tiny" in err and "sd15" in err


@pytest.mark.parametrize(
    "content, message",
    [
        ("latentdiff_run.json", "holds a 'ldm' run, not a 'vae' run"),
        ("model_index.json", "holds a saved model, not a training run"),
    ],
)
def test_output_dir_of_another_kind_is_refused(tmp_path, content, message):
    out = tmp_path / "out"
    out.mkdir()
    (out / content).write_text(json.dumps({"kind": "ldm"}))
    with pytest.raises(ValueError, match=message):
        run(out, "--max_train_steps", "1", "--report_to", "none")
    assert not (out / "checkpoints").exists()


def test_runs_under_accelerate_launch(tmp_path):
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ROOT / "tests" / "accelerate_cpu.yaml"),
        str(SCRIPT),
        "--output_dir",
        str(tmp_path / "out"),
        *TINY,
        "--vae_preset",
        "tiny",
        "--max_train_steps",
        "2",
        "--report_to",
        "none",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "held-out: PSNR" in result.stdout
    assert AutoencoderKL.from_pretrained(tmp_path / "out" / "vae").config.scaling_factor > 0


def test_lpips_and_gan_terms_train(tmp_path):
    lpips = LPIPS(channels=(4, 8, 8, 8, 8))
    save_file({k: v.abs() for k, v in lpips.state_dict().items()}, str(tmp_path / "lpips.safetensors"))
    metrics = run(
        tmp_path / "out",
        "--max_train_steps",
        "2",
        "--checkpointing_steps",
        "2",
        "--report_to",
        "none",
        "--perceptual_weight",
        "1",
        "--perceptual_weights",
        str(tmp_path / "lpips.safetensors"),
        "--disc_weight",
        "0.5",
        "--disc_start",
        "1",
        "--disc_channels",
        "8",
        "--disc_layers",
        "2",
    )
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
    checkpoint = tmp_path / "out" / "checkpoints" / "checkpoint-2"
    assert (checkpoint / "model_1.safetensors").is_file()  # D; its Adam is a param group of optimizer.bin


def test_a_folder_alone_trains_on_every_image_captioned_or_not(tmp_path, monkeypatch):
    """--train_data_dir without --dataset_name: the user's folder, not the shapes default; uncaptioned images count."""
    from PIL import Image

    folder = tmp_path / "my_photos"
    folder.mkdir()
    for i in range(6):
        Image.new("RGB", (20, 16), (40 * i, 255 - 40 * i, 90)).save(folder / f"photo{i}.png")
    for i in range(3):  # half of them captioned
        (folder / f"photo{i}.txt").write_text(f"photo {i}")
    sizes = {}

    def counted(args, split="train", **kwargs):
        dataset = build_dataset(args, split, **kwargs)
        sizes[split] = len(dataset)
        return dataset

    build_dataset = train_vae.build_dataset
    monkeypatch.setattr(train_vae, "build_dataset", counted)
    metrics = run(tmp_path / "out", "--train_data_dir", folder, "--resolution", "16", "--max_train_steps", "2",
                  "--report_to", "none")
    assert sizes == {"train": 6, "validation": 6} and metrics["step"] == 2


def test_shapes_is_the_default_only_without_data_flags_and_both_together_are_refused(tmp_path):
    assert train_vae.parse_args(["--output_dir", str(tmp_path)]).dataset_name == "shapes"
    assert train_vae.parse_args(["--output_dir", str(tmp_path), "--train_data_dir", "x"]).dataset_name is None
    (tmp_path / "my_photos").mkdir()
    with pytest.raises(ValueError, match="--dataset_name shapes is built in; drop --train_data_dir"):
        run(tmp_path / "out", "--dataset_name", "shapes", "--train_data_dir", tmp_path / "my_photos",
            "--max_train_steps", "1", "--report_to", "none")
    assert not (tmp_path / "out" / "checkpoints").exists()
