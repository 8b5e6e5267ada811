"""What every benchmark script does last: write its result as JSON and say where."""

from __future__ import annotations

import json
from pathlib import Path


def write_result(path: str | Path, result: dict | list) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    return path
