"""build_dataset on every source format, bad data, splits, and its error messages."""

import argparse
import json
import logging
import time

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from latentdiff.data import add_data_args, build_dataloader, build_dataset, collate, loaders


def parse(*flags):
    return add_data_args(argparse.ArgumentParser()).parse_args(["--resolution", "16", *flags])


def colored(i):
    return (10 * i % 256, 255 - 10 * i % 256, 100)


def write_images(folder, n, size=(24, 20), fmt="png"):
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        name = f"img{i:03d}.{fmt}"
        Image.new("RGB", size, colored(i)).save(folder / name)
        names.append(name)
    return names


def imagefolder(folder, n, captions=None):
    names = write_images(folder, n)
    rows = [{"file_name": name, "text": captions[i] if captions else f"color {i}"} for i, name in enumerate(names)]
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    return folder


def test_flags_use_diffusers_names_and_defaults(tmp_path, monkeypatch):
    args = add_data_args(argparse.ArgumentParser()).parse_args([])
    assert (args.image_column, args.caption_column, args.random_flip, args.random_crop) == ("image", "text", False, False)
    assert args.resolution is None and args.dataloader_num_workers == 0 and args.min_image_size == 0
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    from latentdiff.data import default_cache_dir

    assert default_cache_dir() == tmp_path / "latentdiff"
    with pytest.raises(SystemExit):  # the center square is the default crop: no flag asks for it
        add_data_args(argparse.ArgumentParser()).parse_args(["--center_crop"])


def test_imagefolder_with_metadata(tmp_path):
    root = imagefolder(tmp_path / "data", 4)
    dataset = build_dataset(parse("--train_data_dir", str(root)))
    assert len(dataset) == 4
    item = dataset[2]
    assert item["pixel_values"].shape == (3, 16, 16) and item["text"] == "color 2"
    assert item["pixel_values"].min() >= -1 and item["pixel_values"].max() <= 1
    expected = torch.tensor(colored(2), dtype=torch.float32) / 127.5 - 1
    assert torch.allclose(item["pixel_values"][:, 8, 8], expected, atol=0.02)
    # fewer than 50 items: validation is the same data
    assert len(build_dataset(parse("--train_data_dir", str(root)), "validation")) == 4


def test_imagefolder_metadata_in_subfolders_and_other_caption_column(tmp_path):
    root = tmp_path / "data"
    for sub in ("a", "b"):
        names = write_images(root / sub, 2)
        (root / sub / "metadata.jsonl").write_text(
            "\n".join(json.dumps({"file_name": n, "prompt": f"{sub} {n}"}) for n in names))
    dataset = build_dataset(parse("--train_data_dir", str(root), "--caption_column", "prompt"))
    assert sorted(dataset.captions(i)[0] for i in range(len(dataset))) == [
        "a img000.png", "a img001.png", "b img000.png", "b img001.png"]


def test_several_captions_are_drawn_at_random(tmp_path):
    root = imagefolder(tmp_path / "data", 1, captions=[["one", "two", "three"]])
    dataset = build_dataset(parse("--train_data_dir", str(root)))
    # one draw per (seed, epoch, index): the same within an epoch, so a resumed run sees the same
    # captions; every caption over the epochs
    assert len({dataset[0]["text"] for _ in range(5)}) == 1
    seen = set()
    for epoch in range(40):
        dataset.set_epoch(epoch)
        seen.add(dataset[0]["text"])
    assert seen == {"one", "two", "three"}


def test_txt_captions(tmp_path):
    root = tmp_path / "data"
    names = write_images(root, 3, fmt="jpg")
    (root / "img000.txt").write_text("a red thing\n")
    (root / "img001.txt").write_text("first caption\nsecond caption\n")
    (root / "img002.txt").write_text("  \n")  # empty: skipped
    dataset = build_dataset(parse("--dataset_name", str(root)))
    assert len(dataset) == 2 and len(names) == 3
    assert dataset.captions(0) == ["a red thing"] and dataset.captions(1) == ["first caption", "second caption"]
    assert dataset.skipped.counts() == {"empty caption": 1}


def test_uncaptioned_images_with_empty_caption_column(tmp_path):
    root = tmp_path / "data"
    write_images(root, 3)
    with pytest.raises(ValueError, match="no caption"):
        build_dataset(parse("--train_data_dir", str(root)))
    dataset = build_dataset(parse("--train_data_dir", str(root), "--caption_column", ""))
    assert len(dataset) == 3 and dataset[0]["text"] == ""


def hf_table(n=6):
    captions = [f"caption {i}" for i in range(n)]
    captions[1] = ""  # skipped
    return datasets.Dataset.from_dict(
        {"image": [Image.new("RGB", (20, 20), colored(i)) for i in range(n)], "caption": captions,
         "extra": list(range(n))},
        features=datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string"),
                                    "extra": datasets.Value("int64")}),
    )


def test_save_to_disk_dataset_and_dataset_dict(tmp_path):
    hf_table().save_to_disk(tmp_path / "single")
    dataset = build_dataset(parse("--dataset_name", str(tmp_path / "single"), "--caption_column", "caption"))
    assert len(dataset) == 5 and dataset.skipped.counts() == {"no caption": 1}
    assert dataset[0]["text"] == "caption 0" and dataset[0]["pixel_values"].shape == (3, 16, 16)

    datasets.DatasetDict({"train": hf_table(), "test": hf_table(3)}).save_to_disk(tmp_path / "dict")
    args = parse("--train_data_dir", str(tmp_path / "dict"), "--caption_column", "caption")
    assert len(build_dataset(args)) == 5 and len(build_dataset(args, "validation")) == 2


def test_parquet_file_and_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf"))
    hf_table().to_parquet(tmp_path / "one.parquet")
    dataset = build_dataset(parse("--dataset_name", str(tmp_path / "one.parquet"), "--caption_column", "caption"))
    assert len(dataset) == 5 and dataset[4]["text"] == "caption 5"
    (tmp_path / "folder").mkdir()
    hf_table().to_parquet(tmp_path / "folder" / "train.parquet")
    hf_table(2).to_parquet(tmp_path / "folder" / "validation.parquet")
    args = parse("--dataset_name", str(tmp_path / "folder"), "--caption_column", "caption")
    assert len(build_dataset(args)) == 5 and len(build_dataset(args, "validation")) == 1


def test_arrow_files(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf"))
    hf_table().save_to_disk(tmp_path / "saved")
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    dataset = build_dataset(parse("--dataset_name", str(arrow), "--caption_column", "caption"))
    assert len(dataset) == 5


def test_bad_files_are_skipped_counted_and_reported(tmp_path, caplog):
    root = tmp_path / "data"
    write_images(root, 3, size=(40, 40))
    write_images(root / "jpegs", 1, size=(64, 64), fmt="jpg")
    good_jpeg = (root / "jpegs" / "img000.jpg").read_bytes()  # a sub-folder is searched too
    png = (root / "img000.png").read_bytes()
    (root / "corrupt.png").write_bytes(png[:40] + b"\0" * 30 + png[70:])  # chunk checksum fails
    (root / "truncated.png").write_bytes(png[: len(png) // 2])
    (root / "truncated.jpg").write_bytes(good_jpeg[: len(good_jpeg) // 2])
    (root / "zero.png").write_bytes(b"")
    (root / "notes.png").write_text("this is not an image")
    Image.new("RGB", (8, 8)).save(root / "tiny.png")
    (root / "nocaption.png").write_bytes(png)
    for name in ["img000", "img001", "img002", "jpegs/img000", "corrupt", "truncated", "zero", "notes", "tiny"]:
        (root / f"{name}.txt").write_text(f"caption of {name}")
    (root / "truncated.txt").write_text("caption of truncated jpeg")
    (root / "README.md").write_text("ignored: not an image")

    with caplog.at_level(logging.WARNING):
        dataset = build_dataset(parse("--train_data_dir", str(root), "--min_image_size", "16"))
    counts = dataset.skipped.counts()
    assert counts == {"unreadable image": 4, "empty file": 1, "too small": 1, "no caption": 1}
    assert len(dataset) == 4  # 3 good PNGs and the good JPEG
    report = [r.getMessage() for r in caplog.records if "skipped 7 items" in r.getMessage()]
    assert len(report) == 1 and "corrupt.png" in report[0]

    # a file that breaks after indexing (or passes the header check and fails to decode)
    # is replaced by the next good item, counted, and logged
    (root / "img001.png").write_bytes(b"garbage")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        texts = [dataset[i]["text"] for i in range(len(dataset))]
    assert "caption of img001" not in texts and len(texts) == 4
    assert dataset.skipped.counts()["failed to decode"] == 1
    assert any("img001.png" in r.getMessage() for r in caplog.records)
    batch = next(iter(build_dataloader(dataset, batch_size=4, shuffle=False)))
    assert batch["pixel_values"].shape == (4, 3, 16, 16)


def test_missing_folder_unknown_column_and_nothing_usable(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such_folder"):
        build_dataset(parse("--train_data_dir", str(tmp_path / "no_such_folder")))
    with pytest.raises(ValueError, match="--dataset_name .* or --train_data_dir"):
        build_dataset(parse())

    root = imagefolder(tmp_path / "data", 2)
    with pytest.raises(ValueError, match=r"--caption_column 'prompt' is not a column .*its columns are: image, file_name, text"):
        build_dataset(parse("--train_data_dir", str(root), "--caption_column", "prompt"))
    with pytest.raises(ValueError, match="--image_column 'picture'"):
        build_dataset(parse("--train_data_dir", str(root), "--image_column", "picture"))
    hf_table().save_to_disk(tmp_path / "saved")
    with pytest.raises(ValueError, match="its columns are: image, caption, extra"):
        build_dataset(parse("--train_data_dir", str(tmp_path / "saved")))

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no usable items"):
        build_dataset(parse("--train_data_dir", str(empty)))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"")
    (broken / "a.txt").write_text("a caption")
    with pytest.raises(ValueError, match="no usable items .*1 empty file"):
        build_dataset(parse("--train_data_dir", str(broken)))


def test_hub_name_fails_fast_and_clearly_offline(monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(loaders, "_hub_reachable", lambda timeout=3.0: False)
    start = time.monotonic()
    with pytest.raises(ConnectionError, match="not reachable and it is not in the local cache"):
        build_dataset(parse("--dataset_name", "someone/no-such-dataset-xyz"))
    assert time.monotonic() - start < 15
    assert datasets.config.HF_HUB_OFFLINE is False  # the offline switch was only for that call


def test_holdout_split_is_fixed_and_disjoint(tmp_path):
    root = tmp_path / "data"
    names = write_images(root, 60, size=(16, 16))
    for name in names:
        (root / name).with_suffix(".txt").write_text(name)
    args = parse("--train_data_dir", str(root))
    train, validation = build_dataset(args), build_dataset(args, "validation")
    train_names = {train.captions(i)[0] for i in range(len(train))}
    held = {validation.captions(i)[0] for i in range(len(validation))}
    assert len(held) == 1 and len(train_names) == 59 and not held & train_names
    assert held == {build_dataset(args, "validation").captions(0)[0]}


def test_split_subfolders(tmp_path):
    imagefolder(tmp_path / "data" / "train", 3)
    imagefolder(tmp_path / "data" / "validation", 2)
    args = parse("--train_data_dir", str(tmp_path / "data"))
    assert len(build_dataset(args)) == 3 and len(build_dataset(args, "validation")) == 2


def test_max_train_samples_is_a_fixed_subset(tmp_path):
    args = parse("--dataset_name", "shapes", "--resolution", "32", "--max_train_samples", "10")
    a, b = build_dataset(args), build_dataset(args)
    assert len(a) == 10 and [a.captions(i) for i in range(10)] == [b.captions(i) for i in range(10)]
    assert a.fingerprint != build_dataset(parse("--dataset_name", "shapes", "--resolution", "32")).fingerprint


def test_builtin_shapes_refuses_moving_augmentations():
    with pytest.raises(ValueError, match="random_flip"):
        build_dataset(parse("--dataset_name", "shapes", "--random_flip"))
    dataset = build_dataset(parse("--dataset_name", "shapes", "--resolution", "32"))
    assert dataset[0]["pixel_values"].shape == (3, 32, 32)
    assert build_dataset(add_data_args(argparse.ArgumentParser()).parse_args(["--dataset_name", "shapes"])).resolution == 32


def test_dataloader_batches_and_workers_are_reproducible():
    dataset = build_dataset(parse("--dataset_name", "shapes", "--resolution", "32", "--max_train_samples", "16"))
    first = [b["text"] for b in build_dataloader(dataset, batch_size=4, seed=1, num_workers=2)]
    again = [b["text"] for b in build_dataloader(dataset, batch_size=4, seed=1, num_workers=0)]
    assert first == again and len(first) == 4
    batch = collate([dataset[0], dataset[1]])
    assert batch["pixel_values"].shape == (2, 3, 32, 32) and len(batch["text"]) == 2
    assert np.isfinite(batch["pixel_values"].numpy()).all()


def test_small_images_in_a_table_are_skipped_when_decoded(tmp_path):
    table = datasets.Dataset.from_dict(
        {"image": [Image.new("RGB", (8, 8), "red"), Image.new("RGB", (32, 32), "blue")], "text": ["small", "big"]},
        features=datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")}),
    )
    table.save_to_disk(tmp_path / "saved")
    dataset = build_dataset(parse("--train_data_dir", str(tmp_path / "saved"), "--min_image_size", "16"))
    assert [dataset[i]["text"] for i in range(2)] == ["big", "big"]
    assert dataset.skipped.counts() == {"too small": 1}


def test_a_table_with_only_a_train_split_holds_out_from_it(tmp_path):
    datasets.DatasetDict({"train": hf_table(60)}).save_to_disk(tmp_path / "dict")
    args = parse("--train_data_dir", str(tmp_path / "dict"), "--caption_column", "caption")
    train, validation = build_dataset(args), build_dataset(args, "validation")
    train_texts = {train.captions(i)[0] for i in range(len(train))}
    assert len(train) == 58 and len(validation) == 1  # 59 captioned rows, 1 held out
    assert validation.captions(0)[0] not in train_texts


def two_sided(folder, n):
    """Images whose left and right halves differ (a flip shows), each with three captions."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        image = Image.new("RGB", (16, 16), colored(i))
        image.paste((255, 255, 255), (0, 0, 8, 16))
        image.save(folder / f"img{i:03d}.png")
        (folder / f"img{i:03d}.txt").write_text(f"a {i}\nb {i}\nc {i}\n")
    return folder


def items_of(batches):
    return [(text, pixels) for b in batches for text, pixels in zip(b["text"], b["pixel_values"], strict=True)]


def epochs_of(loader, epochs):
    """The items of each epoch as the training loops see them (set_epoch first)."""
    from latentdiff.training.checkpointing import set_epoch

    seen = []
    for epoch in epochs:
        set_epoch(loader, epoch)
        seen.append(items_of(loader))
    return seen


def training_accelerator():
    """Accelerate as the training scripts set it up (make_accelerator): the order of an epoch is a function of (seed, epoch)."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    return Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=1))


def same_items(a, b):
    return len(a) == len(b) and all(ta == tb and torch.equal(pa, pb) for (ta, pa), (tb, pb) in zip(a, b, strict=True))


def test_workers_see_every_epoch_as_the_main_process_does(tmp_path):
    """set_epoch reaches the workers: with 2 workers each epoch's captions and flips are those of num_workers=0."""
    dataset = build_dataset(parse("--train_data_dir", str(two_sided(tmp_path / "data", 6)), "--random_flip"))
    accelerator = training_accelerator()
    by_workers = {n: epochs_of(accelerator.prepare(build_dataloader(dataset, 2, seed=1, num_workers=n)), range(3))
                  for n in (0, 2)}
    for epoch in range(3):
        assert same_items(by_workers[2][epoch], by_workers[0][epoch]), epoch
    assert not same_items(by_workers[0][1], by_workers[0][0])  # the epoch changes what items yield


def test_a_resumed_run_skips_batches_and_keeps_the_epoch_in_workers(tmp_path):
    """Resume (accelerate's skip_first_batches) over worker processes yields what an unbroken num_workers=0 run does."""
    from latentdiff.training.checkpointing import resumed_batches

    dataset = build_dataset(parse("--train_data_dir", str(two_sided(tmp_path / "data", 6)), "--random_flip"))
    accelerator = training_accelerator()
    run = argparse.Namespace(max_train_steps=12, gradient_accumulation_steps=1, num_train_epochs=4)
    unbroken = items_of(resumed_batches(
        accelerator, accelerator.prepare(build_dataloader(dataset, 2, seed=1)), run, global_step=0))
    # 3 batches an epoch: step 4 is one batch into epoch 1; epochs 2 and 3 follow in the same workers' loader
    resumed = items_of(resumed_batches(
        accelerator, accelerator.prepare(build_dataloader(dataset, 2, seed=1, num_workers=2)), run, 4))
    assert len(unbroken) == 24 and same_items(resumed, unbroken[8:])


def test_captions_not_needed_keeps_uncaptioned_images(tmp_path):
    """build_dataset(captions=False), for VAE training: every image, captioned or not, with the text ''."""
    root = tmp_path / "data"
    write_images(root, 4)
    (root / "img000.txt").write_text("a caption")
    (root / "img001.txt").write_text("  \n")  # empty
    args = parse("--train_data_dir", str(root))
    assert len(build_dataset(args)) == 1
    dataset = build_dataset(args, captions=False)
    assert len(dataset) == 4 and {dataset[i]["text"] for i in range(4)} == {""} and not dataset.skipped
    assert args.caption_column == "text"  # the caller's flags are left as they were

    hf_table().save_to_disk(tmp_path / "saved")  # one row of 6 without a caption
    args = parse("--train_data_dir", str(tmp_path / "saved"), "--caption_column", "caption")
    assert len(build_dataset(args)) == 5 and len(build_dataset(args, captions=False)) == 6
