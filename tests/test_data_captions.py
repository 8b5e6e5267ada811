"""Captions as tag lists (sd-scripts' flags): shuffle, keep_tokens, tag dropout, caption files, bad input, resume."""

import argparse
import logging

import pytest
import torch
from PIL import Image
from scripts import load_script

from latentdiff.data import add_data_args, build_dataloader, build_dataset
from latentdiff.data.captions import CaptionOptions, process_caption, tags

CAPTION = "sks dog, sitting, grass, sunny, collar, red ball, park, smiling"


def parse(*flags):
    return add_data_args(argparse.ArgumentParser()).parse_args(["--resolution", "16", *flags])


def tagged_folder(folder, captions, extension=".txt"):
    folder.mkdir(parents=True, exist_ok=True)
    for i, caption in enumerate(captions):
        Image.new("RGB", (20, 20), (10 * i, 100, 200)).save(folder / f"img{i:03d}.png")
        (folder / f"img{i:03d}{extension}").write_text(caption)
    return folder


def draw(seed, *options):
    return process_caption(CAPTION, torch.Generator().manual_seed(seed), *options)


def test_shuffle_keeps_the_first_tags_and_permutes_the_rest():
    written = tags(CAPTION)
    results = {draw(seed, True, 2) for seed in range(50)}
    assert len(results) > 20
    for result in results:
        shuffled = result.split(", ")
        assert shuffled[:2] == written[:2] and sorted(shuffled[2:]) == sorted(written[2:])


def test_no_option_leaves_the_caption_as_written_and_draws_nothing():
    generator = torch.Generator().manual_seed(3)
    assert process_caption(" a,b ,, c ", generator, keep_tokens=1) == " a,b ,, c "
    assert torch.equal(generator.get_state(), torch.Generator().manual_seed(3).get_state())
    assert CaptionOptions()("x, y") == "x, y"


def test_tag_dropout_leaves_out_about_p_of_the_tags_beyond_the_kept_ones():
    written = tags(CAPTION)
    kept_counts = []
    for seed in range(2000):
        result = draw(seed, False, 1, 0.3).split(", ")
        assert result[0] == written[0]
        assert result[1:] == [t for t in written[1:] if t in result[1:]]  # order kept without --shuffle_caption
        kept_counts.append(len(result) - 1)
    dropped = 1 - sum(kept_counts) / (len(kept_counts) * (len(written) - 1))
    assert abs(dropped - 0.3) < 0.02
    assert process_caption("a, b, c", torch.Generator(), tag_dropout=1.0) == ""


def test_keep_tokens_separator_marks_a_kept_head_and_suffix():
    caption = "sks, dog ||| grass, sunny, park ||| masterpiece"
    for seed in range(20):
        result = process_caption(caption, torch.Generator().manual_seed(seed), True, 5, 0.0, "|||").split(", ")
        assert result[:2] == ["sks", "dog"] and result[-1] == "masterpiece"
        assert sorted(result[2:-1]) == ["grass", "park", "sunny"]
    # the marker is markup, never text for the encoder
    assert process_caption("a ||| b, c", None, keep_tokens_separator="|||") == "a, b, c"


def test_per_item_captions_are_a_function_of_seed_epoch_and_index(tmp_path):
    root = tagged_folder(tmp_path / "data", [CAPTION] * 4)
    flags = ("--train_data_dir", str(root), "--shuffle_caption", "--keep_tokens", "1",
             "--caption_tag_dropout_rate", "0.2")

    def epoch_texts(dataset, epoch):
        dataset.set_epoch(epoch)
        return [dataset[i]["text"] for i in range(len(dataset))]

    first, again = build_dataset(parse(*flags)), build_dataset(parse(*flags))
    assert epoch_texts(first, 0) == epoch_texts(again, 0) == epoch_texts(first, 0)
    assert len(set(epoch_texts(first, 0))) > 1  # items differ within an epoch
    assert epoch_texts(first, 1) != epoch_texts(first, 0)  # and across epochs
    assert all(t.startswith("sks dog") for t in epoch_texts(first, 1))
    # the validation split keeps its captions as written
    assert {build_dataset(parse(*flags), "validation")[0]["text"]} == {CAPTION}


def test_caption_extension(tmp_path):
    root = tagged_folder(tmp_path / "data", ["a cat", "a dog"], extension=".caption")
    (root / "img000.txt").write_text("not this one")
    dataset = build_dataset(parse("--train_data_dir", str(root), "--caption_extension", ".caption"))
    assert [dataset.captions(i) for i in range(2)] == [["a cat"], ["a dog"]]
    assert build_dataset(parse("--train_data_dir", str(root), "--caption_extension", "caption")).captions(1) == ["a dog"]
    # without the flag, .txt where there is one, else .caption (as before the flag existed)
    dataset = build_dataset(parse("--train_data_dir", str(root)))
    assert [dataset.captions(i) for i in range(2)] == [["not this one"], ["a dog"]]
    # another extension asked for: the images with only a .caption file are skipped, and the message says why
    (root / "img000.txt").unlink()
    with pytest.raises(ValueError, match=r"2 no caption\). Found img000.caption: pass --caption_extension \.caption"):
        build_dataset(parse("--train_data_dir", str(root), "--caption_extension", ".txt"))
    with pytest.raises(ValueError, match="--caption_extension"):
        build_dataset(parse("--train_data_dir", str(root), "--caption_extension", "."))


def test_a_caption_of_only_commas_is_skipped_and_counted(tmp_path, caplog):
    root = tagged_folder(tmp_path / "data", ["a, b", " , ,,\n", ",,\nreal tag, other"])
    with caplog.at_level(logging.WARNING):
        dataset = build_dataset(parse("--train_data_dir", str(root), "--shuffle_caption"))
    assert len(dataset) == 2 and dataset.captions(1) == ["real tag, other"]
    assert dataset.skipped.counts() == {"empty caption": 1}
    assert "img001.png: empty caption (only commas)" in caplog.text


def test_keep_tokens_above_a_captions_tag_count_keeps_it_whole_with_one_warning(tmp_path, caplog):
    root = tagged_folder(tmp_path / "data", ["a, b", "c", CAPTION])
    with caplog.at_level(logging.WARNING):
        dataset = build_dataset(parse("--train_data_dir", str(root), "--shuffle_caption", "--keep_tokens", "3",
                                      "--caption_tag_dropout_rate", "0.5"))
        for epoch in range(5):
            dataset.set_epoch(epoch)
            assert [dataset[i]["text"] for i in range(2)] == ["a, b", "c"]
    warnings = [r.getMessage() for r in caplog.records if "--keep_tokens" in r.getMessage()]
    assert len(warnings) == 1 and "2 of 3 captions have fewer tags than --keep_tokens 3" in warnings[0]


@pytest.mark.parametrize("flags, message", [
    (["--keep_tokens", "-1"], "--keep_tokens must be >= 0"),
    (["--caption_tag_dropout_rate", "-0.1"], r"--caption_tag_dropout_rate must lie in \[0, 1\]"),
    (["--caption_tag_dropout_rate", "1.5"], r"--caption_tag_dropout_rate must lie in \[0, 1\]"),
])
def test_out_of_range_values_are_refused(tmp_path, flags, message):
    root = tagged_folder(tmp_path / "data", ["a, b"])
    with pytest.raises(ValueError, match=message):
        build_dataset(parse("--train_data_dir", str(root), *flags))


@pytest.fixture(scope="module")
def train_ldm():
    return load_script("train_ldm")


@pytest.mark.parametrize("flags, named", [
    (["--shuffle_caption"], "--shuffle_caption"),
    (["--caption_tag_dropout_rate", "0.1"], "--caption_tag_dropout_rate"),
    (["--shuffle_caption", "--keep_tokens_separator", "|||"], "--shuffle_caption and --keep_tokens_separator"),
])
def test_cached_text_and_changing_captions_are_refused_before_any_work(tmp_path, train_ldm, flags, named):
    (tmp_path / "vae").mkdir()
    (tmp_path / "text_encoder").mkdir()  # parse_args reads only the encoder's config (its model_type)
    (tmp_path / "text_encoder" / "config.json").write_text('{"model_type": "clip_text_model"}')
    base = ["--output_dir", str(tmp_path / "out"), "--pretrained_vae_name_or_path", str(tmp_path / "vae"),
            "--pretrained_text_encoder_name_or_path", str(tmp_path / "text_encoder"), "--dataset_name", "shapes",
            "--max_train_steps", "1"]
    with pytest.raises(ValueError, match=f"--cache_latents cannot go with {named}"):
        train_ldm.parse_args([*base, "--cache_latents", *flags])
    # a trained text encoder caches no states, but the cache still yields each caption as written
    with pytest.raises(ValueError, match=f"--cache_latents cannot go with {named}"):
        train_ldm.parse_args([*base, "--cache_latents", "--train_text_encoder", *flags])
    assert train_ldm.parse_args([*base, *flags]).shuffle_caption == ("--shuffle_caption" in flags)
    with pytest.raises(ValueError, match="--keep_tokens must be >= 0"):
        train_ldm.parse_args([*base, "--keep_tokens", "-2"])
    assert not (tmp_path / "out").exists()


def test_a_resumed_run_sees_the_captions_of_an_unbroken_one(tmp_path):
    """Two epochs through build_dataloader, against a run resumed one batch into the second (workers too)."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    from latentdiff.training.checkpointing import resumed_batches

    root = tagged_folder(tmp_path / "data", [f"subject {i}, " + CAPTION for i in range(6)])
    dataset = build_dataset(parse("--train_data_dir", str(root), "--shuffle_caption", "--keep_tokens", "1",
                                  "--caption_tag_dropout_rate", "0.25"))
    accelerator = Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=1))
    run = argparse.Namespace(max_train_steps=6, gradient_accumulation_steps=1, num_train_epochs=2)

    def texts(batches):
        return [text for batch in batches for text in batch["text"]]

    unbroken = texts(resumed_batches(accelerator, accelerator.prepare(build_dataloader(dataset, 2, seed=1)), run, 0))
    resumed = texts(resumed_batches(
        accelerator, accelerator.prepare(build_dataloader(dataset, 2, seed=1, num_workers=2)), run, global_step=4))
    assert len(unbroken) == 12 and resumed == unbroken[8:]
    assert unbroken[:6] != unbroken[6:]  # two epochs, different captions
    assert all(t.split(", ")[0].startswith("subject") for t in unbroken)
