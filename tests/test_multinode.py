"""Beyond one machine, tested on one: two "machines" of one CPU process each on loopback (`accelerate launch
--num_machines 2 --machine_rank 0|1 --main_process_ip 127.0.0.1`), each with its own output and cache folder
as nodes without a shared disk have them, or both on one shared folder; and FSDP, which accelerate does not
run on a CPU."""

import shutil
import threading
from pathlib import Path

import pytest
import torch
from accelerate.commands.config.config_args import load_config_from_file
from safetensors.torch import load_file
from scripts import launch_two_machines, load_script, run_script

from latentdiff import vae_from_preset
from latentdiff.data.files import digest
from latentdiff.data.nodes import PROBE_PREFIX, cache_writers, disk_peers
from latentdiff.training.checkpointing import checkpoint_damage

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "training" / "train_ldm.py"
STEPS = 4
# validation on (it samples on the main process only), an EMA and a pipeline in each checkpoint: every kind of
# file a run writes
TRAIN = ("--max_train_steps", STEPS, "--checkpointing_steps", 2, "--validation_steps", STEPS, "--cache_latents",
         "--use_ema", "--save_pipeline_at_checkpoints", "--validation_prompts", "a red circle",
         "--num_validation_images", 1, "--validation_inference_steps", 2)  # fmt: skip


@pytest.fixture(scope="module")
def vae(tmp_path_factory):
    path = tmp_path_factory.mktemp("multinode") / "vae"
    torch.manual_seed(0)
    vae_from_preset("tiny").save_pretrained(path)
    return path


def flags(vae, node: Path, *extra):
    """train_ldm's flags for a machine whose disk is ``node``."""
    return [
        "--output_dir", node / "out", "--data_cache_dir", node / "cache", "--pretrained_vae_name_or_path", vae,
        "--dataset_name", "shapes", "--max_train_samples", 8, "--unet_preset", "tiny", "--train_batch_size", 2,
        "--report_to", "none", *extra,
    ]  # fmt: skip


def files(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` by its relative path, with its bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def model_weights(checkpoint: Path) -> dict:
    return {(f.name, k): v for f in sorted(checkpoint.glob("model*.safetensors")) for k, v in load_file(f).items()}


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = model_weights(a), model_weights(b)
    assert wa.keys() == wb.keys() and wa
    assert all(torch.equal(wa[k], wb[k]) for k in wa), f"{a} and {b} hold different weights"
    ema = [torch.load(c / "custom_checkpoint_0.pkl", weights_only=False)["shadow_params"] for c in (a, b)]
    assert all(torch.equal(x, y) for x, y in zip(*ema, strict=True))


@pytest.mark.slow  # ~40 s on 2 idle cores: two launches of two machines
def test_two_machines_without_a_shared_disk_each_write_the_whole_run_and_resume(vae, tmp_path):
    """Each machine builds the latent cache alone and writes complete checkpoints and the pipeline into its own
    output dir (one writer per file: its one process); both hold the same weights; the validation grid is
    written once, by the main machine. Resumed from `latest` on both (machine 0 also holds a checkpoint-4 that
    machine 1 lost, as when killed between their saves), the run ends with the weights of the unbroken run."""
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    logs = launch_two_machines(SCRIPT, [flags(vae, node, *TRAIN) for node in nodes], step=STEPS)
    assert "is not shared between the machines" in logs[0]

    for rank, node in enumerate(nodes):
        (cache,) = (node / "cache" / "latents").iterdir()  # built per node: its one process encoded every item
        assert sorted(files(cache)) == ["manifest.json", "shard-00000-of-00001.safetensors"]
        out = files(node / "out")
        assert not [name for name in out if "/." in f"/{name}"], "a temporary or probe file was left behind"
        for step in (2, STEPS):
            checkpoint = node / "out" / "checkpoints" / f"checkpoint-{step}"
            assert checkpoint_damage(checkpoint) is None
            assert (checkpoint / "custom_checkpoint_0.pkl").is_file()  # the EMA
            assert [p.name for p in checkpoint.glob("random_states_*")] == [f"random_states_{rank}.pkl"]
        for pipeline in ("pipeline", f"checkpoints/checkpoint-{STEPS}/pipeline"):  # transformers saves on rank 0
            assert out[f"{pipeline}/text_encoder/model.safetensors"]  # only, unless told
    a, b = (files(node / "out") for node in nodes)
    differs = sorted(name for name in a.keys() & b.keys() if a[name] != b[name])
    # the same weights, optimizer, EMA and pipeline on both; the train time, start time and file lists differ
    assert all(name.endswith(("latentdiff_manifest.json", "latentdiff_state.json", "latentdiff_run.json"))
               for name in differs), differs
    assert "pipeline/unet/diffusion_pytorch_model.safetensors" in a.keys() & b.keys()
    assert sorted(a.keys() - b.keys()) == [
        *(f"checkpoints/checkpoint-{s}/random_states_0.pkl" for s in (2, STEPS)), f"validation/step-{STEPS:06d}.png"
    ]  # fmt: skip

    resumed = [tmp_path / "resumed0", tmp_path / "resumed1"]
    for node, copy in zip(nodes, resumed, strict=True):
        shutil.copytree(node / "out", copy / "out")
        shutil.rmtree(copy / "out" / "pipeline")
        (copy / "cache").symlink_to(node / "cache")
    shutil.rmtree(resumed[1] / "out" / "checkpoints" / f"checkpoint-{STEPS}")
    logs = launch_two_machines(
        SCRIPT, [flags(vae, copy, *TRAIN, "--resume_from_checkpoint", "latest") for copy in resumed], step=STEPS
    )  # fmt: skip
    assert "not every machine has it" in logs[0] and "resumed from" in logs[0] and "at step 2" in logs[0]
    assert "latent cache hit" in logs[0]
    for node, copy in zip(nodes, resumed, strict=True):
        assert_same_weights(node / "out" / "checkpoints" / f"checkpoint-{STEPS}", copy / "out" / "checkpoints" / f"checkpoint-{STEPS}")
    assert (resumed[0] / "out" / "checkpoints" / f"abandoned-checkpoint-{STEPS}").is_dir()  # set aside, not deleted


@pytest.mark.slow  # ~11 s on 2 idle cores
def test_two_machines_on_a_shared_disk_write_one_copy(vae, tmp_path):
    """One folder for both machines (a shared file system): one cache of two shards, one writer of every file."""
    argv = flags(vae, tmp_path, "--max_train_steps", 2, "--checkpointing_steps", 2, "--cache_latents")
    logs = launch_two_machines(SCRIPT, [argv, argv], step=2)
    assert not any("is not shared" in log for log in logs)
    (cache,) = (tmp_path / "cache" / "latents").iterdir()
    assert sorted(files(cache)) == ["manifest.json", "shard-00000-of-00002.safetensors", "shard-00001-of-00002.safetensors"]
    checkpoint = tmp_path / "out" / "checkpoints" / "checkpoint-2"
    assert checkpoint_damage(checkpoint) is None
    assert sorted(p.name for p in checkpoint.glob("random_states_*")) == ["random_states_0.pkl", "random_states_1.pkl"]
    assert not [name for name in files(tmp_path / "out") if "/." in f"/{name}"]


class ThreadProcess:
    """A 'process' of a run as a thread, meeting the others at a barrier like accelerate's wait_for_everyone."""

    def __init__(self, rank, world, barrier):
        self.process_index, self.num_processes, self.barrier = rank, world, barrier

    def wait_for_everyone(self):
        self.barrier.wait(timeout=60)


def run_as_threads(function, folders):
    """``function(process, folder)`` on one thread per folder (process r gets ``folders[r]``); the results."""
    barrier, results, errors = threading.Barrier(len(folders)), {}, []

    def run(rank):
        try:
            results[rank] = function(ThreadProcess(rank, len(folders), barrier), folders[rank])
        except Exception as error:  # surfaced below
            errors.append(error)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(len(folders))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    return [results[rank] for rank in range(len(folders))]


def test_the_probe_tells_a_shared_folder_from_one_per_machine(tmp_path, monkeypatch):
    """Four processes: one folder for all, one per pair (two machines of two), one each; a stale probe of a killed
    run counts for nothing; nothing is left behind."""
    for name in ("MASTER_ADDR", "MASTER_PORT"):  # the rendezvous that names the probes
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / f"{PROBE_PREFIX}{digest(None, None, 4)}-3").touch()  # a killed run's, of rank 3
    assert run_as_threads(disk_peers, [tmp_path / "all"] * 4) == [[0, 1, 2, 3]] * 4
    assert run_as_threads(disk_peers, [tmp_path / "a", tmp_path / "a", tmp_path / "b", tmp_path / "b"]) == [
        [0, 1], [0, 1], [2, 3], [2, 3]]  # fmt: skip
    assert run_as_threads(cache_writers, [tmp_path / "a", tmp_path / "a", tmp_path / "b", tmp_path / "b"]) == [
        (0, 2, True), (1, 2, False), (0, 2, True), (1, 2, False)]  # fmt: skip
    assert run_as_threads(cache_writers, [tmp_path / str(r) for r in range(4)]) == [(0, 1, True)] * 4
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


@pytest.mark.parametrize("config", ["accelerate_config.yaml", "accelerate_fsdp.yaml", "accelerate_deepspeed.yaml"])
def test_shipped_accelerate_configs_load(config):
    """The GPU configs beside accelerate_config.yaml are what `accelerate launch --config_file` reads."""
    loaded = load_config_from_file(str(ROOT / config))
    assert loaded.num_machines == 1 and loaded.num_processes == 8 and loaded.mixed_precision == "bf16"
    expected = {"accelerate_config.yaml": "MULTI_GPU", "accelerate_fsdp.yaml": "FSDP", "accelerate_deepspeed.yaml": "DEEPSPEED"}
    assert loaded.distributed_type.value == expected[config]


def test_fsdp_on_a_cpu_is_refused_not_run_as_copies(vae, tmp_path, monkeypatch):
    """accelerate 1.15 sets up FSDP on GPUs only: given an FSDP config on a CPU (what `accelerate launch
    --config_file accelerate_fsdp.yaml` exports to the processes) it would train unsharded copies, silently."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ValueError, match="the accelerate config asks for FSDP, but accelerate .* runs FSDP only across"):
        run_script(load_script("train_ldm"), flags(vae, tmp_path, "--max_train_steps", 1))
