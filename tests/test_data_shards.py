"""WebDataset tar shards: `latentdiff prepare`, the stream split over processes and workers, exact resume,
damaged shards, and train_ldm on shards (one process resumed after a kill, and two processes)."""

import argparse
import json
import logging
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scripts import free_port, kill_after_checkpoint, launch_two_processes, load_script, run_script

from latentdiff import vae_from_preset
from latentdiff.cli import main as cli
from latentdiff.data.loaders import build_dataloader, build_dataset, collate
from latentdiff.data.shards import INDEX_FILE, ShardLoader, ShardSamples, ShardStream

ROOT = Path(__file__).resolve().parents[1]
TRAIN_LDM = ROOT / "training" / "train_ldm.py"
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}


def make_folder(folder: Path, count: int, seed: int = 0) -> Path:
    """``count`` tiny images of several sizes (PNG and JPEG) with .txt captions; image 1 has two captions."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for i in range(count):
        size = (20 + i % 7, 24 - i % 5)  # (width, height)
        image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
        image.save(folder / f"photo{i:03d}.{'png' if i % 2 else 'jpg'}")
        (folder / f"photo{i:03d}.txt").write_text(
            f"photo number {i}" + ("\nanother caption" if i == 1 else "")
        )
    return folder


def prepare(source: Path, out: Path, *extra) -> Path:
    assert cli(["prepare", str(source), str(out), *map(str, extra)]) == 0
    return out


def data_args(**flags) -> argparse.Namespace:
    return argparse.Namespace(**{"resolution": 16, "seed": 0, **flags})


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """13 items in shards of 4 (4 shards, the last of one)."""
    root = tmp_path_factory.mktemp("shards")
    return prepare(make_folder(root / "source", 13), root / "shards", "--shard_size", 4)


def samples(tar: Path) -> dict[str, dict[str, bytes]]:
    with tarfile.open(tar) as archive:
        found = {}
        for member in archive.getmembers():
            key, suffix = member.name.split(".", 1)
            found.setdefault(key, {})[suffix] = archive.extractfile(member).read()
        return found


def test_prepare_writes_the_images_as_stored_captions_and_an_index(shards):
    source = shards.parent / "source"
    index = json.loads((shards / INDEX_FILE).read_text())
    assert [s["name"] for s in index["shards"]] == [f"shard-{i:05d}.tar" for i in range(4)]
    assert [s["count"] for s in index["shards"]] == [4, 4, 4, 1] and index["count"] == 13
    assert sorted(p.name for p in shards.iterdir()) == [INDEX_FILE] + [f"shard-{i:05d}.tar" for i in range(4)]
    by_caption = {}
    for shard in index["shards"]:
        assert (shards / shard["name"]).stat().st_size == shard["bytes"]
        for key, sample in samples(shards / shard["name"]).items():
            captions = json.loads(sample["json"]) if "json" in sample else [sample["txt"].decode()]
            by_caption[captions[0]] = (key, sample, captions)
    assert len(by_caption) == 13
    for i in range(13):
        key, sample, captions = by_caption[f"photo number {i}"]
        suffix = "png" if i % 2 else "jpg"
        assert sample[suffix] == (source / f"photo{i:03d}.{suffix}").read_bytes()  # not re-encoded
        assert captions == (["photo number 1", "another caption"] if i == 1 else [f"photo number {i}"])
        row = index["key"].index(key)
        assert (index["width"][row], index["height"][row]) == (20 + i % 7, 24 - i % 5)
        assert index["shard"][row] == next(
            n for n, s in enumerate(index["shards"]) if key in samples(shards / s["name"])
        )
    assert sorted(index["key"]) == index["key"] == [f"{i:09d}" for i in range(13)]


def test_prepare_records_sizes_upright_and_shards_by_megabytes(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown portrait
    Image.new("RGB", (30, 20), "red").save(source / "turned.jpg", exif=exif)
    (source / "turned.txt").write_text("a turned photo")
    for i in range(3):
        Image.new("RGB", (64, 64), "blue").save(source / f"big{i}.png")
        (source / f"big{i}.txt").write_text(f"big {i}")
    out = prepare(source, tmp_path / "out", "--shard_size", "1MB")
    index = json.loads((out / INDEX_FILE).read_text())
    assert len(index["shards"]) == 1
    row = next(r for r, s in enumerate(samples(out / "shard-00000.tar").values()) if "jpg" in s)
    assert (index["width"][row], index["height"][row]) == (20, 30)
    dataset = build_dataset(data_args(train_data_dir=str(out)))
    assert sorted(dataset.image_sizes()) == [(20, 30), (64, 64), (64, 64), (64, 64)]


def test_prepare_reads_a_saved_datasets_folder(tmp_path):
    """A save_to_disk folder (its images embedded as bytes): the bytes are written as they are, named by their file."""
    import datasets

    source = make_folder(tmp_path / "images", 3)
    paths = sorted(str(p) for p in source.glob("photo*.[jp][pn]g"))
    table = datasets.Dataset.from_dict({"image": paths, "caption": [Path(p).stem for p in paths]})
    table.cast_column("image", datasets.Image()).save_to_disk(str(tmp_path / "saved"))
    out = prepare(tmp_path / "saved", tmp_path / "out", "--caption_column", "caption")
    written = {s["txt"].decode(): s for s in samples(out / "shard-00000.tar").values()}
    for path in paths:
        suffix = Path(path).suffix[1:]
        assert written[Path(path).stem][suffix] == Path(path).read_bytes()


def test_prepare_refuses_bad_input(tmp_path, capsys, shards):
    assert cli(["prepare", "shapes", str(tmp_path / "a")]) == 2
    assert "built in" in capsys.readouterr().err
    assert cli(["prepare", str(shards.parent / "source"), str(shards)]) == 2
    assert "not an empty folder" in capsys.readouterr().err
    assert cli(["prepare", str(shards.parent / "source"), str(tmp_path / "b"), "--shard_size", "0"]) == 2
    assert "--shard_size" in capsys.readouterr().err
    assert cli(["prepare", str(tmp_path / "nowhere"), str(tmp_path / "c")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_shard_items_are_the_source_items(shards):
    """Same bytes, same preprocessing: every item from the shards equals the one from the source folder."""
    from_shards = build_dataset(data_args(train_data_dir=str(shards)))
    from_folder = build_dataset(data_args(train_data_dir=str(shards.parent / "source")))
    assert isinstance(from_shards, ShardStream) and len(from_shards) == len(from_folder) == 13
    folder_items = {from_folder.captions(i)[0]: from_folder.image(i) for i in range(13)}
    for i in range(13):
        assert torch.equal(from_shards.image(i), folder_items[from_shards.captions(i)[0]])
    assert dict(zip(range(13), from_shards.image_sizes(), strict=True)) == {
        i: (20 + n % 7, 24 - n % 5) for i in range(13) for n in [int(from_shards.captions(i)[0].split()[-1])]
    }


def test_latents_of_shards_are_cached_like_any_dataset(shards, tmp_path):
    from latentdiff.data import cache_latents

    torch.manual_seed(0)
    vae = vae_from_preset("tiny").eval()
    dataset = build_dataset(data_args(train_data_dir=str(shards)))
    cache = cache_latents(dataset, vae, cache_dir=tmp_path)
    assert len(cache) == 13 and {cache[i]["text"] for i in range(13)} <= {
        c for i in range(13) for c in dataset.captions(i)
    }


def epoch(loader, number: int, skip: int = 0) -> list[dict]:
    loader.set_epoch(number)
    return list(loader.resumed(skip) if skip else loader)


def texts(batches) -> list[list[str]]:
    return [batch["text"] for batch in batches]


@pytest.mark.parametrize("workers", [0, 2])
def test_processes_read_disjoint_shares_of_equal_size(shards, workers, monkeypatch):
    """Two processes (rank given) x workers: each reads only its own samples, both yield len(loader) batches,
    every item is dataset[position] of that epoch, and epochs differ in order."""
    dataset = build_dataset(data_args(train_data_dir=str(shards), random_flip=True))
    read = {0: [], 1: [], None: []}
    original = type(dataset.index)._read_run
    current = {"rank": None}  # reads while a process's epoch is streamed (in this process: workers == 0)
    monkeypatch.setattr(
        type(dataset.index),
        "_read_run",
        lambda self, rows, on_error: (read[current["rank"]].extend(rows), original(self, rows, on_error))[1],
    )
    seen, first, second = {}, [], []
    for rank in (0, 1):
        loader = ShardLoader(dataset, 2, num_workers=workers, collate_fn=collate, rank=rank, world=2)
        current["rank"] = rank
        batches = epoch(loader, 1)
        current["rank"] = None
        assert len(loader) == len(batches) == 3  # 13 // 2 = 6 items each: 3 batches
        seen[rank] = [t for b in batches for t in b["text"]]
        dataset.set_epoch(1)
        for batch in batches:
            for pixels, text in zip(batch["pixel_values"], batch["text"], strict=True):
                position = next(i for i in range(13) if text in dataset.captions(i))
                expected = dataset[position]
                assert torch.equal(pixels, expected["pixel_values"]) and text == expected["text"]
        first.append(texts(batches))
        second.append(texts(epoch(loader, 2)))
    assert not set(seen[0]) & set(seen[1]) and len(set(seen[0]) | set(seen[1])) == 12
    if workers == 0:
        assert read[0] and read[1] and not set(map(int, read[0])) & set(map(int, read[1]))
    assert first != second


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
@pytest.mark.parametrize("workers", [0, 3])
def test_a_resumed_epoch_yields_the_remaining_batches_in_order(shards, workers, monkeypatch):
    """Skipping k batches gives batches k.. of the unbroken epoch, and decodes only those (no worker: counted)."""
    dataset = build_dataset(data_args(train_data_dir=str(shards), shuffle_buffer=5, random_flip=True))
    loader = build_dataloader(dataset, 2, seed=5, num_workers=workers)
    assert isinstance(loader, ShardLoader) and len(loader) == 7  # one process: 13 items, the last batch of 1
    full = epoch(loader, 3)
    assert [len(b["text"]) for b in full].count(1) == 1
    decoded = []
    original = ShardSamples.item
    monkeypatch.setattr(ShardSamples, "item", lambda self, *a: (decoded.append(a[0]), original(self, *a))[1])
    for skip in (1, 2, 4, 6):
        decoded.clear()
        resumed = epoch(loader, 3, skip)
        assert texts(resumed) == texts(full[skip:])
        assert all(
            torch.equal(a["pixel_values"], b["pixel_values"])
            for a, b in zip(resumed, full[skip:], strict=True)
        )
        if workers == 0:
            assert len(decoded) == sum(len(b["text"]) for b in full[skip:])


def test_drop_last_and_no_shuffle(shards):
    """drop_last: each process's share cut to whole batches; shuffle=False: shards and samples in file order."""
    dataset = build_dataset(data_args(train_data_dir=str(shards)))
    loader = ShardLoader(dataset, 4, drop_last=True, collate_fn=collate, rank=1, world=2)
    assert len(loader) == len(epoch(loader, 0)) == 1  # 6 items on process 1: one batch of 4
    ordered = ShardLoader(dataset, 4, shuffle=False, collate_fn=collate, rank=0, world=1)
    for number in (0, 1):
        assert [t for b in epoch(ordered, number) for t in b["text"]] == [dataset[i]["text"] for i in range(13)]


def test_a_shard_cut_in_half_is_skipped_with_a_count_naming_it(shards, tmp_path, caplog):
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for path in shards.iterdir():
        (damaged / path.name).write_bytes(path.read_bytes())
    cut = damaged / "shard-00001.tar"
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    with caplog.at_level(logging.WARNING, logger="latentdiff"):
        dataset = build_dataset(data_args(train_data_dir=str(damaged)))
    lost = 13 - len(dataset)
    assert 1 <= lost <= 4
    message = next(r.getMessage() for r in caplog.records if "damaged shard" in r.getMessage())
    assert f"skipped {lost} items ({lost} damaged shard)" in message and "shard-00001.tar" in message
    assert "cut short" in message
    batches = epoch(build_dataloader(dataset, 2, num_workers=0), 0)
    assert sum(len(b["text"]) for b in batches) == len(dataset)

    for path in damaged.glob("*.tar"):
        path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(ValueError, match=r"no usable items \(skipped: 13 damaged shard\)"):
        build_dataset(data_args(train_data_dir=str(damaged)))


def test_a_sample_damaged_inside_a_shard_is_replaced_and_counted(shards, tmp_path, caplog):
    """Bytes overwritten, the size kept: found only while streaming; the batch count does not change."""
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for path in shards.iterdir():
        (damaged / path.name).write_bytes(path.read_bytes())
    index = json.loads((damaged / INDEX_FILE).read_text())
    shard = damaged / "shard-00002.tar"
    data = bytearray(shard.read_bytes())
    first = index["offset"][index["shard"].index(2)]
    data[first + 512 + 30 : first + 512 + 400] = bytes(370)  # the first sample's image data
    shard.write_bytes(bytes(data))
    dataset = build_dataset(data_args(train_data_dir=str(damaged)))
    assert len(dataset) == 13
    with caplog.at_level(logging.WARNING, logger="latentdiff"):
        batches = epoch(build_dataloader(dataset, 2, num_workers=0), 0)
    assert [len(b["text"]) for b in batches] == [2] * 6 + [1]
    assert any("failed to decode" in r.getMessage() for r in caplog.records)
    assert dataset.skipped.counts()["failed to decode"] == 1


def test_a_brace_pattern_selects_shards_and_bad_patterns_are_refused(shards):
    dataset = build_dataset(data_args(dataset_name=f"{shards}/shard-{{00000..00001}}.tar"))
    assert isinstance(dataset, ShardStream) and len(dataset) == 8
    assert len(build_dataset(data_args(dataset_name=f"{shards}/shard-00003.tar"))) == 1
    with pytest.raises(FileNotFoundError, match="none of its 2 shard"):
        build_dataset(data_args(dataset_name=f"{shards}/other-{{0..1}}.tar"))
    with pytest.raises(ValueError, match="not both"):
        build_dataset(data_args(dataset_name=f"{shards}/shard-00003.tar", train_data_dir=str(shards)))


def test_shards_without_an_index_or_captions_are_refused_clearly(shards, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "shard-00000.tar").write_bytes((shards / "shard-00000.tar").read_bytes())
    with pytest.raises(FileNotFoundError, match="has .tar files but no index"):
        build_dataset(data_args(train_data_dir=str(bare)))
    images_only = prepare(shards.parent / "source", tmp_path / "images_only", "--caption_column", "")
    with pytest.raises(ValueError, match="hold no captions"):
        build_dataset(data_args(train_data_dir=str(images_only)))
    dataset = build_dataset(data_args(train_data_dir=str(images_only)), captions=False)
    assert {dataset[i]["text"] for i in range(len(dataset))} == {""}


def test_the_validation_split_is_the_held_out_shards(tmp_path):
    """A source of 60 items holds 1 out (2%): prepare writes it to validation/, read by random access."""
    source = make_folder(tmp_path / "source", 60)
    out = prepare(source, tmp_path / "out", "--shard_size", 25)
    assert json.loads((out / "validation" / INDEX_FILE).read_text())["count"] == 1
    train, validation = (
        build_dataset(data_args(train_data_dir=str(out)), split) for split in ("train", "validation")
    )
    folder_validation = build_dataset(data_args(train_data_dir=str(source)), "validation")
    assert (
        len(train) == 59 and isinstance(validation, ShardSamples) and not isinstance(validation, ShardStream)
    )
    assert validation[0]["text"] == folder_validation[0]["text"]
    assert torch.equal(validation[0]["pixel_values"], folder_validation[0]["pixel_values"])
    assert validation[0]["text"] not in {c for i in range(len(train)) for c in train.captions(i)}


# --- train_ldm on shards -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    root = tmp_path_factory.mktemp("vae")
    torch.manual_seed(0)
    vae_from_preset("tiny").save_pretrained(root / "vae")
    return root / "vae"


def train_flags(shards, vae, out, *extra):
    return [
        "--output_dir", out, "--train_data_dir", shards, "--resolution", 16, "--pretrained_vae_name_or_path", vae,
        "--unet_preset", "tiny", "--train_batch_size", 2, "--report_to", "none", *extra,
    ]  # fmt: skip


def checkpoint_weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return {
        (f.name, k): v for f in sorted(folder.glob("model*.safetensors")) for k, v in load_file(f).items()
    }


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_train_ldm_on_shards_resumes_exactly_after_a_kill(shards, tiny_vae, tmp_path):
    """6 steps in one go == killed after checkpoint-2 (mid-epoch: 13 items, 7 batches, 4 steps an epoch) and
    resumed, with 3 loader workers (the 4 batches skipped end on another worker's turn) and a small shuffle
    buffer: the same weights."""
    common = ("--max_train_steps", 6, "--checkpointing_steps", 2, "--gradient_accumulation_steps", 2,
              "--dataloader_num_workers", 3, "--shuffle_buffer", 4, "--random_flip")  # fmt: skip
    train_ldm = load_script("train_ldm")
    torch.set_num_threads(1)
    run_script(train_ldm, train_flags(shards, tiny_vae, tmp_path / "one_go", *common))
    killed = tmp_path / "killed"
    argv = [str(a) for a in train_flags(shards, tiny_vae, killed, *common)]
    kill_after_checkpoint(TRAIN_LDM, argv, killed, 2, SUBPROCESS_ENV)
    run_script(train_ldm, [*argv, "--resume_from_checkpoint", "latest"])
    a, b = (checkpoint_weights(p / "checkpoints" / "checkpoint-6") for p in (tmp_path / "one_go", killed))
    assert a.keys() == b.keys() and a
    assert all(torch.equal(a[k], b[k]) for k in a)


READ_KEYS = """
import json, sys
from accelerate import Accelerator
from latentdiff.data.loaders import build_dataloader, build_dataset
from argparse import Namespace
accelerator = Accelerator()
dataset = build_dataset(Namespace(train_data_dir=sys.argv[1], resolution=8, seed=0))
loader = accelerator.prepare(build_dataloader(dataset, 2, num_workers=int(sys.argv[3])))
read = [[], []]
original = type(dataset.index)._read_run
type(dataset.index)._read_run = lambda self, rows, on_error: (read[dataset.epoch].extend(map(int, rows)), original(self, rows, on_error))[1]
epochs = []
for epoch in range(2):
    loader.set_epoch(epoch)
    epochs.append([batch["text"] for batch in loader])
with open(f"{sys.argv[2]}/rank{accelerator.process_index}.json", "w") as f:
    json.dump({"len": len(loader), "epochs": epochs, "read": read}, f)
"""


def test_two_processes_read_disjoint_samples_and_train(shards, tiny_vae, tmp_path):
    """`accelerate launch` on 2 CPU processes: through accelerator.prepare each process reads only its own
    samples, both yield the same number of batches; train_ldm trains on the shards and the replicas agree."""
    script = tmp_path / "read_keys.py"
    script.write_text(READ_KEYS)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--main_process_port", str(free_port()), "--mixed_precision", "no",
               "--dynamo_backend", "no", str(script), str(shards), str(tmp_path), "0"]  # fmt: skip
    result = subprocess.run(command, env={**SUBPROCESS_ENV, "ACCELERATE_USE_CPU": "true"}, capture_output=True,
                            text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["len"] == ranks[1]["len"] == 3
    for e in range(2):
        assert [len(b) for b in ranks[0]["epochs"][e]] == [len(b) for b in ranks[1]["epochs"][e]] == [2, 2, 2]
        mine = [{t for b in r["epochs"][e] for t in b} for r in ranks]
        assert not mine[0] & mine[1] and len(mine[0] | mine[1]) == 12
        reads = [np.bincount(r["read"][e], minlength=13) for r in ranks]
        # each process reads its 6 samples, and no sample is read by both
        assert reads[0].sum() == reads[1].sum() == 6 and not np.any(reads[0] * reads[1])

    log = launch_two_processes(TRAIN_LDM, train_flags(shards, tiny_vae, tmp_path / "run", "--max_train_steps", 4,
                                                      "--checkpointing_steps", 4), step=4)  # fmt: skip
    assert "processes: 2 -> 4 images per optimizer step" in log
    assert re.search(r"optimizer steps: 4 \(2 epochs\)", log), log[-2000:]
