"""The emoji datasets: Noto Color Emoji rendered from the font, EmojiOne's PNGs, and both.

CI must install the font (and RAQM layout for multi-codepoint emoji) and EmojiOne:
    apt-get install -y fonts-noto-color-emoji libraqm0 ruby-gemojione
"""

import os

import numpy as np
import pytest
from PIL import features

from latentdiff.data import build_dataset
from latentdiff.data import emoji as emoji_data
from latentdiff.data.files import digest


def installed(find):
    """What ``find`` finds, or None where it is not installed."""
    try:
        return find()
    except FileNotFoundError:
        return None


FONT = installed(emoji_data.find_font)
needs_font = pytest.mark.skipif(
    FONT is None, reason="the Noto Color Emoji font is not installed: apt-get install -y fonts-noto-color-emoji libraqm0"
)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("emoji-cache")


@needs_font
def test_renders_thousands_of_single_glyph_emoji_on_white(cache_dir):
    if not features.check("raqm"):
        pytest.skip("Pillow has no RAQM layout here, so multi-codepoint emoji are dropped: apt-get install -y libraqm0")
    train = emoji_data.EmojiDataset(32, "train", cache_dir=cache_dir)
    validation = emoji_data.EmojiDataset(32, "validation", cache_dir=cache_dir)
    assert len(train) + len(validation) >= 3700
    assert len(validation) == (len(train) + len(validation)) // emoji_data.VALIDATION_EVERY
    assert train.images.shape[1:] == (32, 32, 3) and train.images.dtype == np.uint8
    corners = train.images[:, [0, 0, -1, -1], [0, -1, 0, -1]]  # (N, 4, 3)
    assert (corners > 240).all(axis=-1).mean() > 0.9  # white backgrounds (a few emoji fill the square)
    item = train[0]
    assert item["pixel_values"].shape == (3, 32, 32) and isinstance(item["text"], str)
    all_captions = {c for captions in train.row_captions for c in captions}
    assert {"cat face", "red apple", "woman astronaut"} <= all_captions
    train_first = {train.captions(i)[0] for i in range(len(train))}
    assert not train_first & {validation.captions(i)[0] for i in range(len(validation))}


@needs_font
def test_aliases_are_extra_captions():
    captions = dict((chars, names) for chars, names in emoji_data._emoji_captions())
    assert captions["\N{GRINNING CAT FACE WITH SMILING EYES}"][0] == "grinning cat with smiling eyes"
    assert "smile cat" in captions["\N{GRINNING CAT FACE WITH SMILING EYES}"]
    assert emoji_data.caption_of(":cat_face:") == "cat face"


@needs_font
def test_rendered_once_then_read_from_the_cache(cache_dir):
    emoji_data.EmojiDataset(32, cache_dir=cache_dir)
    files = list((cache_dir / "emoji").iterdir())
    assert len(files) == 1 and files[0].suffix == ".safetensors"  # no temporary file left behind
    before = os.stat(files[0]).st_mtime_ns
    again = build_dataset(_args(cache_dir))
    assert os.stat(files[0]).st_mtime_ns == before
    assert again.resolution == 32 and len(again) > 3000


def _args(cache_dir):
    import argparse

    return argparse.Namespace(dataset_name="emoji", resolution=32, data_cache_dir=str(cache_dir))


def test_missing_font_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv(emoji_data.FONT_ENV, str(tmp_path / "nowhere.ttf"))
    with pytest.raises(FileNotFoundError, match="apt-get install fonts-noto-color-emoji"):
        emoji_data.EmojiDataset(32, cache_dir=tmp_path)


EMOJIONE = installed(emoji_data.find_emojione)
needs_emojione = pytest.mark.skipif(
    EMOJIONE is None, reason="the EmojiOne images are not installed: apt-get install -y ruby-gemojione"
)


def test_second_style_takes_the_split_of_the_first_styles_emoji_of_its_name():
    first = [["cat", "cat2"], ["cat face", "cat"], ["dog"], ["rocket"], ["sparkles", "shiny"]]
    first_held_out = np.array([True, False, False, True, True])
    more = [["cat face", "cat"], ["cat"], ["rocket", "dog"], ["dog", "rocket"], ["shiny"],
            *[[f"new {i:02d}"] for i in range(40)]]
    held = emoji_data.held_out_with(more, first, first_held_out)
    # by name; a name that is another emoji's alias ("cat") goes with the emoji it names; else by alias ("shiny")
    assert held[:5].tolist() == [False, True, True, False, True]
    assert held[5:].tolist() == emoji_data.every_20th(more[5:]).tolist() and held[5:].sum() == 2


@needs_emojione
def test_emojione_images_on_white_named_like_noto(cache_dir):
    train = emoji_data.EmojiDataset(32, "train", cache_dir=cache_dir, name="emojione")
    validation = emoji_data.EmojiDataset(32, "validation", cache_dir=cache_dir, name="emojione")
    assert len(train) + len(validation) >= 1700
    assert len(validation) == (len(train) + len(validation)) // emoji_data.VALIDATION_EVERY
    assert train.images.shape[1:] == (32, 32, 3) and train.images.dtype == np.uint8
    corners = train.images[:, [0, 0, -1, -1], [0, -1, 0, -1]]
    assert (corners > 240).all(axis=-1).mean() > 0.8  # transparency became white (EmojiOne fills more of its square)
    firsts = {captions[0]: captions for captions in train.row_captions}
    assert {"cat face", "red apple", "rocket"} <= firsts.keys()  # the emoji package's names, as Noto's
    assert "hundred points symbol" in firsts["hundred points"]  # then EmojiOne's own name where it differs
    assert train.name == "emojione/train" and train.fingerprint != validation.fingerprint


@needs_font
@needs_emojione
def test_emoji_and_emojione_together_keep_noto_held_out_emoji_unseen(cache_dir):
    noto = {split: emoji_data.EmojiDataset(32, split, cache_dir=cache_dir) for split in ("train", "validation")}
    both = {split: emoji_data.EmojiDataset(32, split, cache_dir=cache_dir, name="emoji+emojione")
            for split in ("train", "validation")}
    one = emoji_data.EmojiDataset(32, "train", cache_dir=cache_dir, name="emojione")
    assert len(both["train"]) > len(noto["train"]) + 1500
    assert len(both["train"]) + len(both["validation"]) == len(noto["train"]) + len(noto["validation"]) + len(one) + len(
        emoji_data.EmojiDataset(32, "validation", cache_dir=cache_dir, name="emojione"))

    def names(dataset):
        return {c.lower() for i in range(len(dataset)) for c in dataset.captions(i)}

    noto_held_out = names(noto["validation"]) - names(noto["train"])
    assert noto_held_out and not noto_held_out & names(both["train"])
    first = {split: [d.captions(i)[0] for i in range(len(d))] for split, d in both.items()}
    assert first["validation"].count(noto["validation"].captions(0)[0]) == 2  # a held-out emoji, in both styles
    assert first["train"].count("cat face") == 2
    assert both["train"].name == "emoji+emojione/train"
    # emoji keeps the fingerprint it had before EmojiOne came (latent caches and feature nets are keyed by it)
    key = emoji_data.load_emoji(32, cache_dir)[2]
    assert noto["train"].fingerprint == digest(digest("emoji", key, "train"), 32, False, False)
    assert both["train"].fingerprint != noto["train"].fingerprint


@needs_emojione
def test_emojione_by_name_through_the_data_flags(cache_dir):
    import argparse

    from latentdiff.data.args import resolution_of

    args = argparse.Namespace(dataset_name="emojione", resolution=None, data_cache_dir=str(cache_dir))
    assert resolution_of(args) == 64
    dataset = build_dataset(argparse.Namespace(**{**vars(args), "resolution": 32}), "validation")
    assert dataset.name == "emojione/validation" and dataset[0]["pixel_values"].shape == (3, 32, 32)
    with pytest.raises(ValueError, match="emojione images are square already"):
        build_dataset(argparse.Namespace(**{**vars(args), "resolution": 32, "random_crop": True}))


def test_missing_emojione_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv(emoji_data.EMOJIONE_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="apt-get install ruby-gemojione"):
        emoji_data.EmojiDataset(32, cache_dir=tmp_path, name="emojione")


def test_unknown_emoji_dataset_lists_the_known_ones(tmp_path):
    with pytest.raises(ValueError, match="emoji, emojione, emoji\\+emojione, not 'emojitwo'"):
        emoji_data.EmojiDataset(32, cache_dir=tmp_path, name="emojitwo")
