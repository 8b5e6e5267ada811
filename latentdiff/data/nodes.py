"""Which processes of a run see the same folder: one disk shared by every machine, or a disk per machine.

Machines without a shared file system each need their own complete copy of what a run writes (the latent
cache, checkpoints), and each file of a folder needs exactly one writer among the processes that see it.
A probe finds out: every process writes an empty file named by its rank into the folder, all wait, and
each looks for the others' files by name.
"""

from __future__ import annotations

import os
from pathlib import Path

from accelerate.utils import gather_object

from latentdiff.data.files import digest

PROBE_PREFIX = ".probe-"


def disk_peers(accelerator, folder: str | os.PathLike) -> list[int]:
    """The processes (global ranks, ascending) whose ``folder`` is this process's ``folder``: all of them on a
    shared disk, this machine's on a disk of its own. Every process must call it (it waits for all three times);
    ``accelerator`` needs ``process_index``, ``num_processes`` and ``wait_for_everyone`` only."""
    rank, world = accelerator.process_index, accelerator.num_processes
    if world == 1:
        return [0]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # named by the run's rendezvous, so that a run started elsewhere at the same time probes apart
    run = digest(os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT"), world)
    for stale in folder.glob(f"{PROBE_PREFIX}{run}-*"):  # left by a killed run
        stale.unlink(missing_ok=True)
    accelerator.wait_for_everyone()
    probe = folder / f"{PROBE_PREFIX}{run}-{rank}"
    probe.touch()
    accelerator.wait_for_everyone()
    # by name, not by listing the folder: a network file system may list a new file late but opens it at once
    peers = [r for r in range(world) if (folder / f"{PROBE_PREFIX}{run}-{r}").exists()]
    accelerator.wait_for_everyone()
    probe.unlink()
    return peers


def cache_writers(accelerator, folder: str | os.PathLike) -> tuple[int, int, bool]:
    """(share, shares, writes_manifest) of this process in building the cache in ``folder``: the processes that
    see the folder split the items into ``shares`` and this one encodes share ``share``; the first of them writes
    the manifest. On a shared disk that is (rank, world size, rank == 0); on a machine with a disk of its own, the
    machine's processes encode the whole dataset among themselves. ``accelerator`` None: one process, (0, 1, True).
    """
    if accelerator is None:
        return 0, 1, True
    peers = disk_peers(accelerator, folder)
    share = peers.index(accelerator.process_index)
    return share, len(peers), share == 0


def output_on_each_node(accelerator, output_dir: str | os.PathLike) -> bool:
    """Whether every machine must write its own copy of the run into ``output_dir``: False when all processes
    share it, True when each machine has it on a disk of its own (the ``save_on_each_node`` of accelerate's
    ProjectConfiguration). Every process must call it.

    Raises ValueError (on every process) for any other layout, a folder shared by some machines only, or not by
    one machine's own processes: accelerate writes either once in all or once per machine.
    """
    peers = disk_peers(accelerator, output_dir)
    if accelerator.num_processes == 1:
        return False
    seen = gather_object([peers])  # every process decides from the same table, so all raise or none does
    if all(len(its_peers) == accelerator.num_processes for its_peers in seen):
        return False
    first = gather_object([accelerator.process_index - accelerator.local_process_index])  # of each one's machine
    machines = [[r for r, f in enumerate(first) if f == first[rank]] for rank in range(accelerator.num_processes)]
    if seen != machines:
        raise ValueError(
            f"--output_dir {str(output_dir)!r} is shared by some processes of this run and not by others (process r "
            f"sees the files of: {dict(enumerate(seen))}): give a folder on a disk that every machine shares, or one "
            "on each machine's own disk"
        )
    return True
