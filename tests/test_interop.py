"""A folder written here opens in diffusers without latentdiff; older folders still open here."""

import inspect
import json
import subprocess
import sys

import diffusers
import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler

from latentdiff import DDIMScheduler, DDPMScheduler, LatentDiffPipeline
from latentdiff.presets import sd_scheduler
from latentdiff.training.validation import export_pipeline, sampling_scheduler

PROMPTS = ["a small red circle in the top left", "a large blue square in the center"]
SAMPLING = dict(num_inference_steps=4, guidance_scale=6.0, output_type="np")

# Run as `python -I -c DIFFUSERS_USER out_dir prompts sampling folder...`. It plays a diffusers user on a machine without
# latentdiff. Uninstalling is not an option, and no single path can be removed: the checkout is installed
# editable (a meta-path finder that a .pth file adds), and the checkout itself would be importable from the
# working directory or PYTHONPATH. So a finder placed first on sys.meta_path refuses every latentdiff
# module, however it is installed; `-I` drops PYTHONPATH, the user site and the working directory too.
# Any import of latentdiff, by diffusers or by this script, fails with ModuleNotFoundError.
DIFFUSERS_USER = """
import importlib.abc
import importlib.util
import json
import os
import sys


class NoLatentdiff(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "latentdiff":
            raise ModuleNotFoundError(f"No module named {name!r} (blocked: this process has no latentdiff)")
        return None


sys.meta_path.insert(0, NoLatentdiff())
try:
    importlib.util.find_spec("latentdiff")
except ModuleNotFoundError:
    pass
else:
    raise SystemExit("latentdiff is importable; the test would prove nothing")

import numpy as np
import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline

torch.set_num_threads(min(2, os.cpu_count() or 1))
out, prompts, sampling, folders = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4:]
loaded = []
for i, folder in enumerate(folders):
    for name, cls in (("stable_diffusion", StableDiffusionPipeline), ("diffusion", DiffusionPipeline)):
        pipe = cls.from_pretrained(folder)
        pipe.set_progress_bar_config(disable=True)
        images = pipe(prompts, generator=torch.Generator().manual_seed(0), **sampling).images
        np.save(f"{out}/{i}-{name}.npy", images)
        loaded.append({
            "pipeline": type(pipe).__name__,
            "scheduler": f"{type(pipe.scheduler).__module__}.{type(pipe.scheduler).__name__}",
            "safety_checker": repr(pipe.safety_checker),
            "latentdiff_modules": sorted(m for m in sys.modules if m.partition(".")[0] == "latentdiff"),
        })
print(json.dumps(loaded))
"""


def run_as_diffusers_user(folders, out_dir) -> list[dict]:
    """Load and sample each folder with StableDiffusionPipeline and DiffusionPipeline in a process where
    latentdiff cannot be imported; the images are written to out_dir/{i}-{stable_diffusion,diffusion}.npy."""
    result = subprocess.run(
        [sys.executable, "-I", "-c", DIFFUSERS_USER, str(out_dir), json.dumps(PROMPTS), json.dumps(SAMPLING),
         *map(str, folders)],
        cwd=out_dir, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def load_here(folder):
    pipe = LatentDiffPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe):
    return pipe(PROMPTS, generator=torch.Generator().manual_seed(0), **SAMPLING).images


def test_saved_folder_opens_in_diffusers_without_latentdiff_with_same_images(tiny_pipeline, tmp_path):
    """The tiny preset's folder (SD's schedule), and one that training exports for a zero-terminal-SNR,
    v-prediction run (trailing timesteps). Measured: identical images (max abs difference 0.0)."""
    noise_scheduler = DDPMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
    )
    trained = LatentDiffPipeline(**{**tiny_pipeline.components, "scheduler": sampling_scheduler(noise_scheduler)})
    folders = [tmp_path / "tiny", tmp_path / "zero_snr"]
    tiny_pipeline.save_pretrained(folders[0])
    export_pipeline(trained, folders[1])
    out = tmp_path / "out"
    out.mkdir()

    loaded = run_as_diffusers_user(folders, out)
    assert loaded == [{
        "pipeline": "StableDiffusionPipeline",  # DiffusionPipeline picks it by _class_name
        "scheduler": "diffusers.schedulers.scheduling_ddim.DDIMScheduler",
        "safety_checker": "None",
        "latentdiff_modules": [],
    }] * 4
    for i, folder in enumerate(folders):
        ours = load_here(folder)
        assert type(ours.scheduler) is DDIMScheduler
        expected = generate(ours)
        for name in ("stable_diffusion", "diffusion"):
            theirs = np.load(out / f"{i}-{name}.npy")
            assert theirs.shape == expected.shape == (2, 16, 16, 3)
            assert np.abs(theirs - expected).max() <= 1e-5


@pytest.mark.parametrize(
    "scheduler, entry, loaded_class",
    [
        (sd_scheduler(), ["diffusers", "DDIMScheduler"], DDIMScheduler),
        (DDPMScheduler.from_config(sd_scheduler().config), ["diffusers", "DDPMScheduler"], DDPMScheduler),
        (EulerDiscreteScheduler.from_config(sd_scheduler().config), ["diffusers", "EulerDiscreteScheduler"],
         EulerDiscreteScheduler),
        (diffusers.DDIMScheduler.from_config(sd_scheduler().config), ["diffusers", "DDIMScheduler"], DDIMScheduler),
    ],
    ids=["ours-ddim", "ours-ddpm", "diffusers-euler", "diffusers-ddim"],
)
def test_model_index_names_only_diffusers_and_transformers_classes(
    tiny_pipeline, tmp_path, scheduler, entry, loaded_class
):
    LatentDiffPipeline(**{**tiny_pipeline.components, "scheduler": scheduler}).save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["requires_safety_checker"] is False
    assert index["scheduler"] == entry
    components = {k: v for k, v in index.items() if not k.startswith("_") and isinstance(v, list)}
    assert sorted(components) == ["scheduler", "text_encoder", "tokenizer", "unet", "vae"]
    assert {library for library, _ in components.values()} <= {"diffusers", "transformers"}
    # diffusers' DDIM and DDPM load as ours, which they equal number for number; any other as itself
    assert type(load_here(tmp_path).scheduler) is loaded_class


@pytest.mark.parametrize("ours, theirs", [(DDIMScheduler, diffusers.DDIMScheduler),
                                          (DDPMScheduler, diffusers.DDPMScheduler)])
def test_scheduler_config_is_one_diffusers_reads_key_for_key(tmp_path, caplog, ours, theirs):
    """Every key our scheduler writes is an argument of diffusers' class of the same name. (A scheduler made
    by `from_config` also keeps the keys of the config's class, e.g. DDIM's set_alpha_to_one in a DDPM;
    diffusers writes those too and drops them on loading, as keys of a compatible scheduler.)"""
    scheduler = ours(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False, steps_offset=1,
        prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing",
    )
    accepted = set(inspect.signature(theirs.__init__).parameters) - {"self"}
    assert {k for k in scheduler.config if not k.startswith("_")} <= accepted
    scheduler.save_pretrained(tmp_path)
    with caplog.at_level("WARNING", logger="diffusers.configuration_utils"):
        loaded = theirs.from_pretrained(tmp_path)
    assert "not expected and will be ignored" not in caplog.text
    assert {k: v for k, v in loaded.config.items() if not k.startswith("_")} == {
        k: v for k, v in scheduler.config.items() if not k.startswith("_")
    }


@pytest.mark.parametrize("scheduler_cls, module", [(DDIMScheduler, "latentdiff.schedulers.ddim"),
                                                   (DDPMScheduler, "latentdiff.schedulers.ddpm")])
def test_folder_of_an_earlier_version_still_loads(tiny_pipeline, tmp_path, scheduler_cls, module):
    """Before folders named diffusers' classes, model_index.json named our scheduler by module path and
    LatentDiffPipeline as the pipeline class."""
    pipe = LatentDiffPipeline(**{**tiny_pipeline.components, "scheduler": scheduler_cls.from_config(
        sd_scheduler().config)})
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    del index["requires_safety_checker"]
    index.update(_class_name="LatentDiffPipeline", scheduler=[module, scheduler_cls.__name__])
    (tmp_path / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True))

    loaded = load_here(tmp_path)
    assert type(loaded) is LatentDiffPipeline and type(loaded.scheduler) is scheduler_cls
    np.testing.assert_array_equal(generate(loaded), generate(pipe))


def test_a_scheduler_passed_to_from_pretrained_is_kept(tiny_pipeline_dir):
    theirs = diffusers.DDIMScheduler.from_config(sd_scheduler().config)
    assert LatentDiffPipeline.from_pretrained(tiny_pipeline_dir, scheduler=theirs).scheduler is theirs
