"""What every benchmark script does last: write its result as JSON and say where."""

from __future__ import annotations

import json
import platform
from datetime import date
from pathlib import Path

import torch


def result_header(command: str, device: str | None = None) -> dict:
    """The first keys of a result: today's date, the machine (processor, torch's threads, the device where
    given) and the command that reproduces it."""
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    return {"date": date.today().isoformat(), "machine": f"{machine}, {device}" if device else machine, "command": command}


def write_result(path: str | Path, result: dict | list) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    return path
