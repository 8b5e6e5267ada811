"""The training scripts, run in the test process as `python training/NAME.py ARGS` would run them."""

import importlib.util
from pathlib import Path

from accelerate.state import AcceleratorState, GradientState

TRAINING = Path(__file__).resolve().parents[1] / "training"


def load_script(name: str):
    """training/NAME.py as a module: the scripts are launched by path, not installed."""
    spec = importlib.util.spec_from_file_location(name, TRAINING / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(script, argv):
    """``script.main(argv)`` with accelerate's process-wide singletons fresh for each run."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    try:
        return script.main([str(a) for a in argv])
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
