"""latentdiff installed from its wheel, outside a checkout: the wheel holds the training scripts as
latentdiff.scripts, and the `latentdiff` command runs them from there (the demo in an empty folder).

The wheel goes into a fresh virtual environment without its dependencies; those come from this interpreter's
site-packages through a .pth file. A folder named by a .pth line gets no .pth processing of its own, so a
checkout's editable install there (its import finder) does not come along: latentdiff is the wheel's.
"""

import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ["pyproject.toml", "README.md", "latentdiff", "pipelines", "training"]  # what the wheel is built from
SCRIPTS = ["train_vae", "train_ldm", "finetune_lora", "train_dreambooth"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(the wheel, a fresh venv with the wheel installed, an empty folder outside the checkout)."""
    tmp = tmp_path_factory.mktemp("install")
    source = tmp / "source"  # a copy, so that the build's egg-info and build/ stay out of the checkout
    source.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(ROOT / name, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", tmp / "dist", source], check=True)
    (wheel,) = (tmp / "dist").glob("latentdiff-*.whl")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    subprocess.run([*pip, "--python", venv / "bin" / "python", "install", "--no-deps", wheel], check=True)
    purelib = subprocess.run([venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()  # fmt: skip
    (Path(purelib) / "latentdiff_test_dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    empty = tmp / "empty"
    empty.mkdir()
    return wheel, venv, empty


def run_installed(built, *command, timeout=300):
    _, venv, empty = built
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env |= {"XDG_CACHE_HOME": str(empty.parent / "cache"), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([str(c) for c in command], cwd=empty, env=env, capture_output=True, text=True,
                            timeout=timeout)  # fmt: skip
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    return log


def test_the_wheel_holds_the_scripts_under_latentdiff_only(built):
    wheel, _, _ = built
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")} == {"latentdiff"}
    assert all(f"latentdiff/scripts/{script}.py" in names for script in SCRIPTS)
    assert "latentdiff/pipelines/__init__.py" in names and "latentdiff/tokenizer/vocab.json" in names


def test_latentdiff_is_the_wheels_and_runs_its_scripts_as_modules(built):
    _, venv, _ = built
    python = venv / "bin" / "python"
    log = run_installed(built, python, "-c", "import latentdiff, latentdiff.scripts as s; print(latentdiff.__file__, s.__file__)")
    assert all(Path(file).is_relative_to(venv) for file in log.split()), log
    log = run_installed(built, python, "-m", "latentdiff.scripts.train_vae", "--help")
    assert "usage: train_vae.py" in log and "--vae_preset" in log
    log = run_installed(built, python, "-m", "accelerate.commands.launch", "--config_file", ROOT / "tests" / "accelerate_cpu.yaml",
                        "-m", "latentdiff.scripts.train_ldm", "--help")  # fmt: skip
    assert "usage: train_ldm.py" in log and "--unet_preset" in log


@pytest.mark.slow  # ~40 s on 2 cores: each stage starts a python, then the demo samples and measures
def test_installed_demo_runs_in_an_empty_folder(built):
    _, venv, empty = built
    log = run_installed(built, venv / "bin" / "latentdiff", "demo", "--output_dir", "demo", "--preset", "tiny",
                        "--vae_steps", 2, "--max_train_steps", 2, "--max_train_samples", 64, "--steps", 2,
                        "--seeds", 1)  # fmt: skip
    for script in ("train_vae", "train_ldm"):  # the stages ran the wheel's modules with the venv's python
        assert f"{venv / 'bin' / 'python'} -m latentdiff.scripts.{script} " in log, log[-4000:]
    out = empty / "demo"
    assert (out / "ldm" / "pipeline" / "model_index.json").is_file()
    assert Image.open(out / "grid.png").size == (34 + 2, 6 * 34 + 2)  # 6 prompts x 1 seed of 32 px
    assert (out / "metrics.json").is_file()
