"""The emoji dataset, rendered from the Noto Color Emoji font.

CI must install the font (and RAQM layout for multi-codepoint emoji):
    apt-get install -y fonts-noto-color-emoji libraqm0
"""

import os

import numpy as np
import pytest
from PIL import features

from latentdiff.data import build_dataset
from latentdiff.data import emoji as emoji_data

try:
    FONT = emoji_data.find_font()
except FileNotFoundError:
    FONT = None
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
