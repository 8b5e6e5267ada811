"""The training scripts, run in the test process as `python training/NAME.py ARGS` would run them."""

import importlib.util
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
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


def kill_after_checkpoint(script: Path, argv, output_dir: Path, step: int, env: dict) -> None:
    """Run ``script argv`` in a subprocess and SIGKILL it once ``output_dir`` holds checkpoint-``step``; asserts
    it was killed before it finished (no pipeline yet)."""
    process = subprocess.Popen([sys.executable, str(script), *map(str, argv)], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.monotonic() + 120
    while not (Path(output_dir) / "checkpoints" / f"checkpoint-{step}").is_dir():
        assert process.poll() is None, process.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, f"no checkpoint-{step} after 120 s"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    process.stderr.close()
    assert not (Path(output_dir) / "pipeline").exists(), "the run finished before it was killed"


def free_port() -> int:
    """A free TCP port on loopback, for a launched run's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two_processes(script: Path, argv, step: int) -> str:
    """``accelerate launch`` of ``script`` with 2 CPU processes (gloo), one thread each; asserts it succeeded
    and that the two replicas' weights agree to the bit at ``step``; returns the log.

    (`--cpu --num_processes 2` starts one process only: accelerate's CPU launcher needs mpirun; torchrun
    with ACCELERATE_USE_CPU gives the gloo process group.)"""
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--main_process_port", str(free_port()), "--mixed_precision", "no", "--dynamo_backend", "no", str(script),
        *map(str, argv),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "ACCELERATE_USE_CPU": "true"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    ends = dict(re.findall(rf"process (\d) of 2: step {step}, 0 batches skipped, weights checksum (\S+)", log))
    assert set(ends) == {"0", "1"} and ends["0"] == ends["1"], log[-4000:]
    return log


def launch_two_machines(script: Path, argvs, step: int) -> list[str]:
    """``accelerate launch`` of ``script`` as two machines of one CPU process each on loopback (machine r runs
    ``argvs[r]``: each its own folders, as nodes without a shared disk); asserts both succeeded and that their
    weights agree to the bit at ``step``; returns the two logs."""
    port = str(free_port())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "ACCELERATE_USE_CPU": "true"}
    logs = [tempfile.TemporaryFile("w+") for _ in argvs]  # not pipes: a full pipe would stall one machine
    processes = [
        subprocess.Popen([
            sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
            "--main_process_port", port, "--mixed_precision", "no", "--dynamo_backend", "no", str(script),
            *map(str, argv),
        ], env=env, stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        for rank, (argv, log) in enumerate(zip(argvs, logs, strict=True))
    ]  # fmt: skip
    try:
        for process in processes:
            process.wait(timeout=300)
    finally:  # a machine left waiting for the other at a barrier, with the processes it started
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    for log in logs:
        log.seek(0)
    logs = [log.read() for log in logs]
    for process, log in zip(processes, logs, strict=True):
        assert process.returncode == 0, log[-4000:]
    ends = dict(m for log in logs for m in re.findall(rf"process (\d) of 2: step {step}, 0 batches skipped, weights checksum (\S+)", log))
    assert set(ends) == {"0", "1"} and ends["0"] == ends["1"], "\n".join(log[-2000:] for log in logs)
    return logs
