"""Checkpoints in Accelerate's format, written atomically, pruned safely, resumed exactly.

Layout: `output_dir/checkpoints/checkpoint-{step}/` holds what `accelerator.save_state` writes
(models, optimizers, LR schedulers, objects registered with `register_for_checkpointing` such as
the EMA, RNG states) plus `latentdiff_state.json` ({"global_step": step, "train_seconds": ...}) and, written last,
`latentdiff_manifest.json`: the size of every file in it. A checkpoint is written into
`.tmp-checkpoint-{step}` and renamed when complete, so a kill during a save leaves a `.tmp-*`
folder that is never taken for a checkpoint (and is removed by the next save), never a broken one.
A checkpoint damaged later (a truncated copy, a full disk) fails its manifest: `latest` passes over
it to the newest intact one, a checkpoint named by path is refused with the file that is wrong.
Resuming from a checkpoint older than others sets the newer ones aside (`abandoned-checkpoint-N`),
so a later `latest` cannot resume the run that was abandoned; nothing is deleted.
Machines that do not share the output dir each write a whole checkpoint into theirs (one process of each
writes what accelerate's ``save_on_each_node`` does not), and `latest` is the newest that all of them have.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import gather_object

from latentdiff.training.run import writes_output

logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
STATE_FILE = "latentdiff_state.json"
MANIFEST_FILE = "latentdiff_manifest.json"
TMP_PREFIX = ".tmp-"
ABANDONED_PREFIX = "abandoned-"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints under output_dir/checkpoints, oldest step first (`.tmp-*` folders are ignored)."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def find_checkpoint(output_dir: str | Path, name_or_path: str) -> Path | None:
    """A --resume_from_checkpoint value as a folder: the path itself, else a name under output_dir/checkpoints."""
    for path in (Path(name_or_path), Path(output_dir) / CHECKPOINTS_DIR / name_or_path):
        if path.is_dir():
            return path
    return None


def save_checkpoint(
    accelerator: Accelerator,
    output_dir: str | Path,
    step: int,
    extra: Callable[[Path], object] | None = None,
    state: dict | None = None,
) -> Path:
    """Save the full training state as checkpoint-{step}, atomically; prune to the project's total_limit.

    Every process must call this (save_state gathers sharded state). The limit is
    `accelerator.project_configuration.total_limit` (`make_accelerator` sets it from
    --checkpoints_total_limit); the checkpoint just written is never pruned. ``extra(folder)`` runs on the
    writing process (:func:`~latentdiff.training.run.writes_output`: the main one, or each machine's first when
    the machines do not share the output dir, so that each gets a whole checkpoint) before the checkpoint is
    renamed into place, to write more into it (a pipeline folder);
    ``state`` is stored beside the step in its ``latentdiff_state.json`` (see :func:`checkpoint_state`).
    """
    root = Path(output_dir) / CHECKPOINTS_DIR
    tmp, final = root / f"{TMP_PREFIX}checkpoint-{step}", root / f"checkpoint-{step}"
    writes = writes_output(accelerator)  # the main process, or each machine's first one without a shared disk
    if writes:
        root.mkdir(parents=True, exist_ok=True)
        for leftover in root.glob(f"{TMP_PREFIX}*"):  # from a run killed during a save
            shutil.rmtree(leftover)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if writes:
        if extra is not None:
            extra(tmp)
        (tmp / STATE_FILE).write_text(json.dumps({"global_step": step, **(state or {})}))
        write_manifest(tmp)
        if final.exists():  # the same step saved again (e.g. a resumed run): swap, keeping a complete one on disk
            old = root / f"{TMP_PREFIX}old-checkpoint-{step}"
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old)
        else:
            tmp.rename(final)
        _prune(root.parent, accelerator.project_configuration.total_limit, keep=final)
        logger.info("saved checkpoint %s", final)
    accelerator.wait_for_everyone()
    return final


def _prune(output_dir: Path, total_limit: int | None, keep: Path) -> None:
    if not total_limit:
        return
    checkpoints = list_checkpoints(output_dir)
    for path in checkpoints[: max(0, len(checkpoints) - total_limit)]:
        if path != keep:
            shutil.rmtree(path)
            logger.info("removed old checkpoint %s (--checkpoints_total_limit %d)", path, total_limit)


def write_manifest(folder: Path) -> None:
    """Record the size of every file of a checkpoint folder, so damage done after the save can be seen."""
    files = sorted(f for f in folder.rglob("*") if f.is_file() and f.name != MANIFEST_FILE)
    sizes = {f.relative_to(folder).as_posix(): f.stat().st_size for f in files}
    (folder / MANIFEST_FILE).write_text(json.dumps({"sizes": sizes}, indent=0))


def checkpoint_damage(folder: Path) -> str | None:
    """What is wrong with a checkpoint folder by its manifest, or None if it is intact.

    A checkpoint written before manifests existed has none and is taken as it is.
    """
    manifest = folder / MANIFEST_FILE
    if not manifest.is_file():
        return None
    try:
        sizes = json.loads(manifest.read_text())["sizes"]
    except (ValueError, KeyError) as error:
        return f"its {MANIFEST_FILE} is unreadable ({error})"
    for name, size in sizes.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} when it was saved"
    return None


def resolve_resume(args) -> Path | None:
    """The checkpoint to resume from: None (no flag, or "latest" with none saved yet), or an intact folder.

    ``latest`` is the newest checkpoint that passes its manifest on every machine (machines without a shared
    disk each have their own, and a run killed between their saves leaves the last one on some only; called
    with ``latest``, every process must call it); each newer one is named in a warning. A checkpoint given by
    name or path that fails it is an error.
    """
    value = args.resume_from_checkpoint
    if not value:
        return None
    if value == "latest":
        checkpoints = {int(_NAME.match(p.name).group(1)): p for p in list_checkpoints(args.output_dir)}
        damage = {step: checkpoint_damage(path) for step, path in checkpoints.items()}
        everywhere = _on_every_process({step for step, found in damage.items() if found is None})
        latest = max(everywhere, default=None)
        for step in sorted(checkpoints, reverse=True):
            if latest is not None and step <= latest:
                break
            if damage[step] is not None:
                logger.warning("skipping damaged checkpoint %s: %s", checkpoints[step], damage[step])
            else:
                logger.warning("skipping checkpoint %s: not every machine has it (killed between their saves)", checkpoints[step])
        if latest is None:
            logger.info("--resume_from_checkpoint latest: no intact checkpoint in %s yet, starting a new run", args.output_dir)
            return None
        return checkpoints[latest]
    path = find_checkpoint(args.output_dir, value)
    if path is None:
        raise FileNotFoundError(f"--resume_from_checkpoint {value!r} does not exist; give a checkpoint folder or 'latest'")
    damage = checkpoint_damage(path)
    if damage is not None:
        raise ValueError(
            f"--resume_from_checkpoint {value!r}: the checkpoint is damaged ({damage}); "
            "resume from another checkpoint, or 'latest' for the newest intact one"
        )
    return path


def _on_every_process(steps: set[int]) -> set[int]:
    """The steps in ``steps`` of every process (each may read another disk); ``steps`` outside a distributed run."""
    if not PartialState._shared_state or PartialState().num_processes == 1:
        return steps
    return set.intersection(*gather_object([steps]))


def set_aside_newer(output_dir: str | Path, step: int) -> list[Path]:
    """Rename the checkpoints of output_dir newer than ``step`` to ``abandoned-checkpoint-N[.K]``.

    A run resumed from an older checkpoint is a new branch: left in place, the newer checkpoints of
    the abandoned branch would be what the next ``latest`` resumes (and what pruning keeps).
    """
    moved = []
    for path in list_checkpoints(output_dir):
        if int(_NAME.match(path.name).group(1)) <= step:
            continue
        target, n = path.with_name(ABANDONED_PREFIX + path.name), 1
        while target.exists():
            target, n = path.with_name(f"{ABANDONED_PREFIX}{path.name}.{n}"), n + 1
        path.rename(target)
        logger.warning("resumed at step %d: set aside the newer checkpoint %s as %s", step, path, target.name)
        moved.append(target)
    return moved


def checkpoint_state(path: str | Path | None) -> dict:
    """A checkpoint's ``latentdiff_state.json`` ({} for None or a checkpoint without one)."""
    state_file = Path(path) / STATE_FILE if path is not None else None
    return json.loads(state_file.read_text()) if state_file is not None and state_file.is_file() else {}


class TrainClock:
    """Training time summed over a run and the runs it resumed (``train_seconds`` in each checkpoint's state),
    so that ``--max_train_minutes`` budgets the whole training, however often it was killed and resumed."""

    def __init__(self, accelerator: Accelerator, max_train_minutes: float | None, resumed_from: Path | None):
        self.accelerator, self.max_train_minutes = accelerator, max_train_minutes
        self.earlier = float(checkpoint_state(resumed_from).get("train_seconds", 0.0))
        self.start = time.perf_counter()

    def seconds(self) -> float:
        return self.earlier + time.perf_counter() - self.start

    def out_of_time(self) -> bool:
        """Whether the budget is spent on any process (all processes get the same answer, so all stop together)."""
        if self.max_train_minutes is None:
            return False
        elapsed = torch.tensor(self.seconds(), device=self.accelerator.device)
        return self.accelerator.reduce(elapsed, "max").item() >= 60 * self.max_train_minutes


def load_checkpoint(accelerator: Accelerator, path: str | Path) -> int:
    """Restore everything save_checkpoint saved (models, optimizers, schedulers, EMA, RNG); return the global step."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        step = checkpoint_state(path)["global_step"]
    elif m := _NAME.match(path.name):
        step = int(m.group(1))
    else:
        raise ValueError(f"{str(path)!r} is not a checkpoint: it has no {STATE_FILE} and is not named checkpoint-<step>")
    steps = gather_object([step])
    if len(set(steps)) > 1:  # a checkpoint named by path, another on each machine's disk
        raise ValueError(f"the processes would resume from different steps ({steps}, by process) of {str(path)!r}: "
                         "give each machine a checkpoint of the same step, or 'latest'")
    accelerator.load_state(str(path))
    accelerator.wait_for_everyone()  # every process has read the checkpoint before any is renamed
    run_dir = accelerator.project_dir
    if writes_output(accelerator) and run_dir and path.parent.resolve() == (Path(run_dir) / CHECKPOINTS_DIR).resolve():
        set_aside_newer(run_dir, step)
    accelerator.wait_for_everyone()
    logger.info("resumed from %s at step %d", path, step)
    return step


def batches_to_skip(global_step: int, gradient_accumulation_steps: int, num_batches: int) -> tuple[int, int]:
    """(epoch, batches of that epoch already consumed) after `global_step` optimizer steps.

    Accelerate syncs gradients every `gradient_accumulation_steps` batches and at the end of each
    epoch, so an epoch of `num_batches` batches holds ceil(num_batches / accumulation) optimizer steps.
    """
    steps_per_epoch = math.ceil(num_batches / gradient_accumulation_steps)
    epoch, step_in_epoch = divmod(global_step, steps_per_epoch)
    return epoch, step_in_epoch * gradient_accumulation_steps


def set_epoch(dataloader, epoch: int) -> None:
    """Seed epoch ``epoch``: its order (the sampler) and its per-item draws (captions, flips, crops).

    accelerate forwards ``set_epoch`` to the sampler only, so the dataset is told here; both are
    functions of (seed, epoch), which is what makes a resumed epoch yield what an unbroken one would.
    """
    dataloader.set_epoch(epoch)
    if hasattr(dataloader.dataset, "set_epoch"):
        dataloader.dataset.set_epoch(epoch)


def resumed_batches(accelerator, dataloader, args, global_step: int):
    """The training batches from where optimizer step ``global_step`` left off, epoch after epoch.

    Every epoch is seeded (:func:`set_epoch`) and a resumed run first skips the batches its
    checkpoint had used, so it sees exactly what an unbroken run would. The caller stops at
    ``--max_train_steps``; a run that resumes already finished gets no batch.
    """
    if global_step >= args.max_train_steps:
        return
    first_epoch, skip = batches_to_skip(global_step, args.gradient_accumulation_steps, len(dataloader))
    for epoch in range(first_epoch, args.num_train_epochs):
        set_epoch(dataloader, epoch)
        if epoch == first_epoch and skip and hasattr(dataloader, "resumed"):  # a shard stream: skipped undecoded
            yield from dataloader.resumed(skip)
        else:
            yield from accelerator.skip_first_batches(dataloader, skip) if epoch == first_epoch and skip else dataloader
