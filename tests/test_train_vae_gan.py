"""train_vae.py's discriminator: it trains from its first step, and fp16's loss scaling leaves the step unchanged."""

from pathlib import Path

import pytest
import torch
from accelerate.utils import AutocastKwargs
from safetensors.torch import load_file
from scripts import load_script, run_script

train_vae = load_script("train_vae")

GAN = [
    "--vae_preset", "tiny", "--max_train_samples", "16", "--train_batch_size", "4", "--report_to", "none",
    "--disc_weight", "0.5", "--disc_start", "0", "--disc_channels", "8", "--disc_layers", "2",
    "--num_heldout_images", "4", "--num_grid_images", "2", "--scaling_factor_images", "4",
    "--validation_steps", "100",
]  # fmt: skip


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def disc_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The discriminator's trained weights (its BatchNorm statistics move without any optimizer step)."""
    return {k: v for k, v in load_file(checkpoint / "model_1.safetensors").items() if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))}


def test_the_discriminator_trains_during_the_warmup(tmp_path):
    """Its learning rate was read from the VAE's optimizer after LambdaLR had set it to 0 for the warm-up,
    and was never scheduled: D never moved. It now follows the schedule: lr > 0 from the second step."""
    run_script(train_vae, ["--output_dir", tmp_path, *GAN, "--max_train_steps", "3", "--checkpointing_steps", "1",
                           "--lr_warmup_steps", "50"])  # fmt: skip
    checkpoints = tmp_path / "checkpoints"
    second, third = disc_weights(checkpoints / "checkpoint-2"), disc_weights(checkpoints / "checkpoint-3")
    moved = [k for k in second if not torch.equal(second[k], third[k])]
    assert len(moved) == len(second), f"{len(second) - len(moved)} of {len(second)} discriminator weights did not train"
    groups = torch.load(checkpoints / "checkpoint-3" / "optimizer.bin", weights_only=True)["param_groups"]
    assert [tuple(g["betas"]) for g in groups] == [(0.9, 0.999), (0.5, 0.9)]  # taming's Adam(0.5, 0.9) for D
    assert groups[1]["weight_decay"] == 0.0


def test_fp16_loss_scaling_gives_the_fp32_step_under_accumulation_and_gan(tmp_path, monkeypatch):
    """The same run with a loss scaler (2^16) as fp16 uses and without: the same weights.

    The models still compute in fp32 (autocast off), so the only difference is the scaling: a correct
    step unscales each gradient exactly once. Before, clipping unscaled the discriminator's gradients of
    the earlier micro-batches, and its own step unscaled them again (accelerate updates the scaler in
    each optimizer's step); and the adaptive GAN weight took unscaled gradients through the graph.
    This machine has no CUDA, so fp16's scaler is put in by hand.
    """
    flags = [*GAN, "--max_train_steps", "2", "--checkpointing_steps", "2", "--gradient_accumulation_steps", "2",
             "--lr_warmup_steps", "0", "--max_grad_norm", "1.0"]  # fmt: skip
    run_script(train_vae, ["--output_dir", tmp_path / "fp32", *flags])

    make_accelerator, check_common_args = train_vae.make_accelerator, train_vae.check_common_args

    def with_loss_scaler(args, run_kind):
        accelerator = make_accelerator(args, run_kind)
        accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
        accelerator.native_amp = True
        accelerator.autocast_handler = AutocastKwargs(enabled=False)
        return accelerator

    def fp16_allowed(args):  # fp16 is refused on a machine without CUDA
        args.mixed_precision = "no"
        check_common_args(args)
        args.mixed_precision = "fp16"

    monkeypatch.setattr(train_vae, "make_accelerator", with_loss_scaler)
    monkeypatch.setattr(train_vae, "check_common_args", fp16_allowed)
    run_script(train_vae, ["--output_dir", tmp_path / "scaled", *flags, "--mixed_precision", "fp16"])

    for name in ("model.safetensors", "model_1.safetensors"):
        ours, reference = (load_file(tmp_path / run / "checkpoints" / "checkpoint-2" / name) for run in ("scaled", "fp32"))
        for key, value in reference.items():
            torch.testing.assert_close(ours[key], value, rtol=1e-5, atol=1e-6, msg=f"{name}: {key}")
