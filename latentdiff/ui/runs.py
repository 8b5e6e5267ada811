"""What the web UI's "runs" tab reads from a training output folder, as the training scripts write it:

    latentdiff_run.json           marks the folder as a run (latentdiff.training.run)
    validation/step-XXXXXX.png    the validation grids (latentdiff.training.validation)
    validation/loss.jsonl         the held-out loss, {"step", "loss"} a line (--validation_loss_images)
    logs/**/events.out.tfevents.* TensorBoard scalars: train/loss, val/loss, a VAE's losses, ...
    metrics.json                  a VAE run's held-out metrics
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from latentdiff.training.run import RUN_FILE
from latentdiff.training.validation import VALIDATION_DIR

GRID_NAME = re.compile(r"step-(\d+)\.png")
HELDOUT_LOSS = "validation/loss.jsonl"
SMOOTHING = 0.9  # the EMA of a long noisy curve (TensorBoard's default smoothing is 0.6 on its own scale)


@dataclass
class Run:
    """A training output folder: its validation grids by step, its loss curves, its final metrics."""

    folder: Path
    grids: list[tuple[int, Path]] = field(default_factory=list)  # (step, path), by step
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # tag -> (step, value), by step
    metrics: dict | None = None

    def rows(self, smooth_over: int = 50) -> list[dict]:
        """The curves as plot rows {"step", "value", "curve"}; a curve of more than ``smooth_over`` points
        also gets its exponential moving average, which shows the trend under a noisy per-step loss."""
        rows = []
        for tag, points in self.curves.items():
            rows += [{"step": step, "value": value, "curve": tag} for step, value in points]
            if len(points) > smooth_over:
                average = points[0][1]
                for step, value in points:
                    average = SMOOTHING * average + (1 - SMOOTHING) * value
                    rows.append({"step": step, "value": average, "curve": f"{tag} (smoothed)"})
        return rows


def is_run(folder: str | Path) -> bool:
    return (Path(folder) / RUN_FILE).is_file()


def find_runs(model_dir: str | Path) -> list[Path]:
    """Training output folders near a model: the model's own folder's parent (out/ldm for out/ldm/pipeline)
    and the folders beside that one (out/vae, out/lora, ...)."""
    parent = Path(model_dir).resolve().parent
    candidates = [parent, *sorted(p for p in parent.parent.iterdir() if p.is_dir())] if parent.parent.is_dir() else [parent]
    return list(dict.fromkeys(p for p in candidates if is_run(p)))


def read_run(folder: str | Path) -> Run:
    """Everything the runs tab shows of ``folder``; ValueError when it is not a training output folder."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise ValueError(f"{str(folder)!r} is not a folder")
    if not is_run(folder):
        raise ValueError(f"{str(folder)!r} is not a training output folder: it has no {RUN_FILE}")
    run = Run(folder=folder)
    grids = [(int(m.group(1)), p) for p in (folder / VALIDATION_DIR).glob("step-*.png") if (m := GRID_NAME.fullmatch(p.name))]
    run.grids = sorted(grids)
    run.curves = tensorboard_scalars(folder, keep=lambda tag: "loss" in tag)
    heldout = folder / HELDOUT_LOSS
    if heldout.is_file() and "val/loss" not in run.curves:  # the same numbers, when TensorBoard was off
        run.curves["val/loss"] = read_jsonl_loss(heldout)
    if (folder / "metrics.json").is_file():
        run.metrics = json.loads((folder / "metrics.json").read_text())
    return run


def read_jsonl_loss(path: Path) -> list[tuple[int, float]]:
    points = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            points[int(record["step"])] = float(record["loss"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            raise ValueError(f"{str(path)!r} line {number} is not {{\"step\": ..., \"loss\": ...}}: {line[:80]!r}") from None
    return sorted(points.items())


def tensorboard_scalars(folder: Path, keep=lambda tag: True) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series under ``folder``'s event files, merged over files (a resumed run writes a new one;
    a step logged twice keeps the later value), by step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    series: dict[str, dict[int, tuple[float, float]]] = {}
    for path in sorted(folder.rglob("events.out.tfevents.*")):
        events = EventAccumulator(str(path), size_guidance={"scalars": 0})  # 0: every point, not a sample
        events.Reload()
        for tag in filter(keep, events.Tags().get("scalars", [])):
            points = series.setdefault(tag, {})
            for event in events.Scalars(tag):
                if event.step not in points or points[event.step][0] <= event.wall_time:
                    points[event.step] = (event.wall_time, event.value)
    return {tag: sorted((step, value) for step, (_, value) in points.items()) for tag, points in sorted(series.items())}
