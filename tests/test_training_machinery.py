"""The shared training machinery: checkpoints, resume arithmetic, LR schedule, NaN guard, run marker."""

import argparse
import json

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState

from latentdiff.training.args import add_common_args, check_common_args
from latentdiff.training.checkpointing import (
    MANIFEST_FILE,
    batches_to_skip,
    list_checkpoints,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
)
from latentdiff.training.ema import ema_weights, make_ema
from latentdiff.training.loop import optimizer_step
from latentdiff.training.progress import check_finite, save_image_grid
from latentdiff.training.run import (
    RUN_FILE,
    make_accelerator,
    make_lr_scheduler,
    make_optimizer,
    resolve_train_steps,
)


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def parse(tmp_path, *flags):
    parser = add_common_args(argparse.ArgumentParser())
    return parser.parse_args(["--output_dir", str(tmp_path / "run"), "--report_to", "none", *flags])


def test_checkpoints_are_atomic_pruned_and_resumable(tmp_path):
    args = parse(tmp_path, "--max_train_steps", "10", "--checkpoints_total_limit", "2", "--use_ema")
    accelerator = make_accelerator(args, "test")
    model = torch.nn.Linear(3, 2)
    optimizer = make_optimizer(args, model.parameters())
    model, optimizer = accelerator.prepare(model, optimizer)
    ema = make_ema(args, model)
    accelerator.register_for_checkpointing(ema)

    for step in (1, 2, 3):
        with torch.no_grad():
            model.weight.add_(1.0)
        ema.step(model.parameters())
        save_checkpoint(accelerator, args.output_dir, step)
    root = tmp_path / "run" / "checkpoints"
    assert [p.name for p in list_checkpoints(args.output_dir)] == ["checkpoint-2", "checkpoint-3"]
    assert not list(root.glob(".tmp-*"))

    # a save killed half-way leaves a .tmp- folder: never a checkpoint, removed by the next save
    (root / ".tmp-checkpoint-9").mkdir()
    args.resume_from_checkpoint = "latest"
    assert resolve_resume(args) == root / "checkpoint-3"

    # an out-of-order save (a resumed run) keeps the checkpoint just written even over the limit
    accelerator.project_configuration.total_limit = 1
    save_checkpoint(accelerator, args.output_dir, 1)
    assert [p.name for p in list_checkpoints(args.output_dir)] == ["checkpoint-1", "checkpoint-3"]
    assert not (root / ".tmp-checkpoint-9").exists()

    trained = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.zero_()
    ema.shadow_params[0].zero_()
    assert load_checkpoint(accelerator, root / "checkpoint-3") == 3
    torch.testing.assert_close(model.weight, trained)
    assert ema.optimization_step == 3 and ema.shadow_params[0].abs().sum() > 0
    with ema_weights(ema, model):
        torch.testing.assert_close(model.weight, ema.shadow_params[0])
    torch.testing.assert_close(model.weight, trained)


def test_resolve_resume_latest_path_and_missing(tmp_path):
    args = parse(tmp_path, "--max_train_steps", "1", "--resume_from_checkpoint", "latest")
    assert resolve_resume(args) is None  # nothing saved yet: a fresh start
    checkpoint = tmp_path / "run" / "checkpoints" / "checkpoint-5"
    checkpoint.mkdir(parents=True)
    assert resolve_resume(args) == checkpoint
    args.resume_from_checkpoint = "checkpoint-5"
    assert resolve_resume(args) == checkpoint
    args.resume_from_checkpoint = str(checkpoint)
    assert resolve_resume(args) == checkpoint
    args.resume_from_checkpoint = str(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        check_common_args(args)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_resume(args)


@pytest.mark.parametrize(
    "step, accumulation, batches, expected",
    [
        (0, 1, 5, (0, 0)),
        (3, 1, 5, (0, 3)),
        (5, 1, 5, (1, 0)),
        (7, 2, 5, (2, 2)),
        (6, 2, 5, (2, 0)),
        (4, 4, 4, (4, 0)),
    ],
)
def test_batches_to_skip(step, accumulation, batches, expected):
    assert batches_to_skip(step, accumulation, batches) == expected


def test_batches_to_skip_matches_accelerate_sync_points(tmp_path):
    """Count where accelerate really syncs: 5 batches an epoch, accumulation 2 -> steps after batches 2, 4, 5."""
    args = parse(tmp_path, "--max_train_steps", "7", "--gradient_accumulation_steps", "2")
    accelerator = make_accelerator(args, "test")
    model = torch.nn.Linear(1, 1)
    loader = torch.utils.data.DataLoader(torch.arange(5.0)[:, None], batch_size=1, shuffle=True)
    model, loader = accelerator.prepare(model, loader)
    step = 0
    for epoch in range(3):
        loader.set_epoch(epoch)
        for i, _ in enumerate(loader):
            with accelerator.accumulate(model):
                pass
            if accelerator.sync_gradients:
                step += 1
                consumed = (epoch, i + 1) if i + 1 < len(loader) else (epoch + 1, 0)
                assert batches_to_skip(step, 2, len(loader)) == consumed, step
    assert step == 9


def test_lr_schedule_counts_optimizer_steps_under_accumulation(tmp_path):
    args = parse(
        tmp_path,
        "--max_train_steps",
        "8",
        "--gradient_accumulation_steps",
        "3",
        "--learning_rate",
        "1.0",
        "--lr_scheduler",
        "linear",
        "--lr_warmup_steps",
        "4",
    )
    accelerator = make_accelerator(args, "test")
    model = torch.nn.Linear(1, 1)
    optimizer = make_optimizer(args, model.parameters())
    resolve_train_steps(args, num_batches_per_epoch=24)
    lr_scheduler = make_lr_scheduler(args, optimizer, accelerator)
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    lrs = []
    for _ in range(24):  # 24 batches = 8 optimizer steps
        with accelerator.accumulate(model):
            accelerator.backward(model(torch.ones(1, 1)).sum())
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()
        if accelerator.sync_gradients:
            lrs.append(lr_scheduler.get_last_lr()[0])
    # warmup over 4 optimizer steps to 1.0, then linear decay to 0 at step 8
    assert lrs == pytest.approx([0.25, 0.5, 0.75, 1.0, 0.75, 0.5, 0.25, 0.0])


@pytest.mark.parametrize("policy_loss", [1.0, float("nan")])
def test_a_skipped_step_moves_the_lr_schedule_as_a_trained_one(tmp_path, policy_loss):
    """Both loops (train_vae and the text-to-image one) step through ``optimizer_step``: the learning rate
    is a function of the step count, whether or not a batch was skipped for a non-finite loss."""
    args = parse(tmp_path, "--max_train_steps", "4", "--learning_rate", "1.0", "--lr_scheduler", "linear",
                 "--lr_warmup_steps", "0", "--nan_policy", "skip")  # fmt: skip
    accelerator = make_accelerator(args, "test")
    model = torch.nn.Linear(1, 1)
    optimizer = make_optimizer(args, model.parameters())
    lr_scheduler = make_lr_scheduler(args, optimizer, accelerator)
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    before = model.weight.detach().clone()
    with accelerator.accumulate(model):
        loss = model(torch.ones(1, 1)).sum() * policy_loss
        trained = optimizer_step(accelerator, loss, optimizer, lr_scheduler, args, step=1)
    assert trained == (policy_loss == 1.0)
    assert torch.equal(model.weight, before) != trained
    assert lr_scheduler.get_last_lr()[0] == pytest.approx(0.75)


def saved_run(tmp_path, steps):
    args = parse(tmp_path, "--max_train_steps", "10")
    accelerator = make_accelerator(args, "test")
    model = accelerator.prepare(torch.nn.Linear(3, 2))
    for step in steps:
        with torch.no_grad():
            model.weight.fill_(step)
        save_checkpoint(accelerator, args.output_dir, step)
    return args, accelerator, model, tmp_path / "run" / "checkpoints"


def test_a_damaged_checkpoint_is_passed_over_by_latest_and_refused_by_name(tmp_path, caplog):
    args, accelerator, model, root = saved_run(tmp_path, (5, 10))
    manifest = json.loads((root / "checkpoint-10" / MANIFEST_FILE).read_text())["sizes"]
    assert manifest["model.safetensors"] == (root / "checkpoint-10" / "model.safetensors").stat().st_size
    weights = root / "checkpoint-10" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a truncated copy

    args.resume_from_checkpoint = "latest"
    with caplog.at_level("WARNING", logger="latentdiff"):
        assert resolve_resume(args) == root / "checkpoint-5"
    assert "skipping damaged checkpoint" in caplog.text and "checkpoint-10" in caplog.text
    assert "model.safetensors has" in caplog.text
    for value in ("checkpoint-10", str(root / "checkpoint-10")):
        args.resume_from_checkpoint = value
        with pytest.raises(ValueError, match=r"checkpoint-10'?: the checkpoint is damaged \(model.safetensors has \d+ bytes"):
            resolve_resume(args)
    (root / "checkpoint-5" / "model.safetensors").unlink()
    args.resume_from_checkpoint = "latest"
    assert resolve_resume(args) is None  # nothing intact: a fresh start, both named in warnings


def test_resuming_an_older_checkpoint_sets_the_newer_ones_aside(tmp_path, caplog):
    args, accelerator, model, root = saved_run(tmp_path, (5, 10, 15))
    with caplog.at_level("WARNING", logger="latentdiff"):
        assert load_checkpoint(accelerator, root / "checkpoint-5") == 5
    assert model.weight.eq(5).all()
    assert sorted(p.name for p in root.iterdir()) == ["abandoned-checkpoint-10", "abandoned-checkpoint-15", "checkpoint-5"]
    assert "set aside the newer checkpoint" in caplog.text
    args.resume_from_checkpoint = "latest"
    assert resolve_resume(args) == root / "checkpoint-5"
    save_checkpoint(accelerator, args.output_dir, 10)  # the new branch, then an old branch's resume again
    assert load_checkpoint(accelerator, root / "checkpoint-5") == 5
    assert sorted(p.name for p in root.iterdir()) == [
        "abandoned-checkpoint-10", "abandoned-checkpoint-10.1", "abandoned-checkpoint-15", "checkpoint-5"
    ]  # fmt: skip


def test_resolve_train_steps(tmp_path):
    args = parse(tmp_path, "--num_train_epochs", "3", "--gradient_accumulation_steps", "2")
    resolve_train_steps(args, num_batches_per_epoch=5)
    assert (args.max_train_steps, args.num_train_epochs) == (9, 3)
    args = parse(tmp_path, "--num_train_epochs", "3", "--max_train_steps", "4")
    resolve_train_steps(args, num_batches_per_epoch=3)
    assert (args.max_train_steps, args.num_train_epochs) == (4, 2)


def test_check_finite_stops_or_skips():
    assert check_finite(torch.tensor(1.5), 3, "stop")
    with pytest.raises(FloatingPointError, match="step 7"):
        check_finite(torch.tensor(float("nan")), 7, "stop")
    assert not check_finite(torch.tensor(float("inf")), 7, "skip")


def test_run_kind_marker_conflict(tmp_path):
    args = parse(tmp_path, "--max_train_steps", "1")
    make_accelerator(args, "vae")
    assert json.loads((tmp_path / "run" / RUN_FILE).read_text())["kind"] == "vae"
    make_accelerator(args, "vae")  # the same kind again: a resume
    with pytest.raises(ValueError, match="holds a 'vae' run, not a 'ldm' run"):
        make_accelerator(args, "ldm")


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--max_train_steps", "0"], "--max_train_steps must be a positive integer, got 0"),
        ([], "give --max_train_steps or --num_train_epochs"),
        (["--max_train_steps", "1", "--learning_rate", "0"], "--learning_rate must be > 0"),
        (["--max_train_steps", "1", "--mixed_precision", "fp16"], "fp16 needs a CUDA GPU"),
    ],
)
def test_check_common_args_fails_early(tmp_path, flags, message):
    if "fp16" in flags and torch.cuda.is_available():
        pytest.skip("fp16 is allowed where CUDA is")
    with pytest.raises(ValueError, match=message):
        check_common_args(parse(tmp_path, *flags))


def test_save_image_grid(tmp_path):
    images = torch.linspace(-1, 1, 5 * 3 * 4 * 4).reshape(5, 3, 4, 4)
    grid = save_image_grid(images, nrow=3, path=tmp_path / "grid.png")
    assert grid.size == (3 * 6 + 2, 2 * 6 + 2)
    assert (tmp_path / "grid.png").is_file() and not list(tmp_path.glob(".tmp-*"))
