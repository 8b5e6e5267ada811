"""The latentdiff command: what it writes, and one-line errors with exit status 2."""

import json
import subprocess
import sys

import PIL.Image
import pytest

from latentdiff.cli import main


@pytest.fixture(scope="module")
def pipeline_dir(tiny_pipeline_dir):
    return tiny_pipeline_dir


def test_demo_trains_samples_and_measures(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    argv = ["demo", "--output_dir", str(tmp_path / "demo"), "--preset", "tiny", "--vae_steps", "2",
            "--max_train_steps", "2", "--max_train_samples", "64", "--steps", "2", "--seeds", "2"]
    assert main(argv) == 0
    out = tmp_path / "demo"
    assert PIL.Image.open(out / "grid.png").size == (2 * 34 + 2, 6 * 34 + 2)  # 6 prompts x 2 seeds of 32 px
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["adherence"]) == {"train", "held_out"} and "psnr" in metrics["vae"]
    assert (out / "ldm" / "pipeline" / "model_index.json").is_file()
    assert "latentdiff generate" in capsys.readouterr().out
    # the same command again resumes: both stages are complete, nothing retrains
    assert main(argv) == 0


@pytest.mark.parametrize("scheduler", ["ddim", "ddpm", "dpmsolver++", "euler"])
def test_generate_writes_png_with_settings(pipeline_dir, tmp_path, scheduler):
    out = tmp_path / "cat.png"
    argv = ["generate", str(pipeline_dir), "a cat", "--steps", "2", "--seed", "7", "--scheduler", scheduler, "--out", str(out)]
    assert main(argv) == 0
    image = PIL.Image.open(out)
    assert image.size == (16, 16)
    settings = json.loads(image.text["latentdiff"])
    assert settings["prompt"] == "a cat" and settings["seed"] == 7 and settings["scheduler"] == scheduler


def test_generate_several_images_makes_a_grid(pipeline_dir, tmp_path):
    out = tmp_path / "grid.png"
    assert main(["generate", str(pipeline_dir), "a cat", "-n", "4", "--steps", "1", "--out", str(out)]) == 0
    assert PIL.Image.open(out).size == (2 * 18 + 2, 2 * 18 + 2)


def test_info_describes_components(pipeline_dir, capsys):
    assert main(["info", str(pipeline_dir)]) == 0
    out = capsys.readouterr().out
    assert "0.79M parameters" in out and "DDIMScheduler" in out and "16x16 px" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "missing_dir", "a cat"], "does not exist"),
        (["generate", "{tmp}", "a cat"], "has no model_index.json"),
        (["generate", "{pipe}", "a cat", "--out", "{tmp}/no/such/dir/x.png"], "does not exist"),
        (["generate", "{pipe}", "a cat", "--height", "15"], "height=15"),
        (["info", "{tmp}"], "has no model_index.json"),
    ],
)
def test_user_errors_are_one_line_with_status_2(pipeline_dir, tmp_path, capsys, argv, message):
    argv = [a.format(tmp=tmp_path, pipe=pipeline_dir) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()  # loading progress bars may come first
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in err


@pytest.mark.parametrize("argv", [["paint"], ["generate", "x", "a cat", "--steps", "0"], ["demo", "--bogus"]])
def test_bad_command_lines_exit_2_without_traceback(argv):
    result = subprocess.run([sys.executable, "-m", "latentdiff.cli", *argv], capture_output=True, text=True)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "error:" in result.stderr
