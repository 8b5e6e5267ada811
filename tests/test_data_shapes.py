"""The shapes dataset: deterministic, held-out combinations never in train, analyzer >= 99%."""

import itertools

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from latentdiff.data import shapes
from latentdiff.data.shapes import HELD_OUT, ShapesDataset, analyze, caption, render_shape
from latentdiff.data.transforms import to_pil


def test_vocabulary_and_captions():
    assert set(shapes.COLORS) >= {"red", "green", "blue", "yellow", "purple", "orange"}
    assert set(shapes.SHAPES) >= {"circle", "square", "triangle"}
    assert set(shapes.SIZES) == {"small", "large"} and len(shapes.POSITIONS) == 9
    assert caption("red", "circle", "small", "top left") == "a small red circle in the top left"
    assert caption("blue", "square", "large", "center") == "a large blue square in the center"
    assert caption("green", "triangle", "small", "top") == "a small green triangle at the top"
    assert caption("yellow", "circle", "large", "left") == "a large yellow circle on the left"


def test_held_out_combinations_cover_every_pair_once_and_never_train():
    assert len(HELD_OUT) == 18
    assert {(c, s) for c, s, _ in HELD_OUT} == {(c, s) for c in shapes.COLORS for s in shapes.SHAPES}
    assert {p for _, _, p in HELD_OUT} == set(shapes.POSITIONS)
    train = ShapesDataset(32, "train")
    seen = {(a["color"], a["shape"], a["position"]) for a in map(train.attributes, range(len(train)))}
    assert not seen & HELD_OUT
    assert seen == set(shapes.TRAIN_COMBINATIONS)  # 20,000 items cover all 144 train combinations
    validation = ShapesDataset(32, "validation")
    held = {(a["color"], a["shape"], a["position"]) for a in map(validation.attributes, range(len(validation)))}
    assert held == HELD_OUT and len(validation) == 360


def test_deterministic_per_seed_and_jittered():
    a, b, other = ShapesDataset(32, seed=0), ShapesDataset(32, seed=0), ShapesDataset(32, seed=1)
    for i in (0, 7, 19_999):
        assert a[i]["text"] == b[i]["text"] and (a[i]["pixel_values"] == b[i]["pixel_values"]).all()
    assert [a.captions(i) for i in range(20)] != [other.captions(i) for i in range(20)]
    assert len({a.image(i).numpy().tobytes() for i in range(50)}) == 50
    assert len(a) == shapes.TRAIN_SIZE and a[0]["pixel_values"].shape == (3, 32, 32)


def test_render_any_resolution_and_checks():
    assert render_shape("red", "circle", "small", "top left", 48).size == (48, 48)
    with pytest.raises(ValueError, match="at least 32"):
        render_shape("red", "circle", "small", "top left", 16)
    with pytest.raises(ValueError, match="unknown color 'pink'"):
        render_shape("pink", "circle", "small", "top left", 32)


@pytest.mark.parametrize("resolution", [32, 64])
def test_analyzer_reads_its_own_images(resolution):
    dataset = ShapesDataset(resolution, "train")
    indices = range(0, 20_000, 50)  # 400 images
    right = sum(analyze(to_pil(dataset.image(i))) == dataset.attributes(i) for i in indices)
    assert right / len(indices) >= 0.99
    validation = ShapesDataset(resolution, "validation")
    assert all(analyze(to_pil(validation.image(i))) == validation.attributes(i) for i in range(0, 360, 9))


def test_analyzer_is_robust_to_blur_and_noise():
    dataset = ShapesDataset(64, "train")
    rng = np.random.default_rng(0)
    right = 0
    for i in range(200):
        blurred = to_pil(dataset.image(i)).filter(ImageFilter.GaussianBlur(1.0))
        noisy = np.asarray(blurred, dtype=np.float64) + rng.normal(0, 12, (64, 64, 3))
        right += analyze(np.clip(noisy, 0, 255).astype(np.uint8)) == dataset.attributes(i)
    assert right / 200 >= 0.95


def test_analyzer_on_arrays_blank_images_and_nominal_renders():
    assert analyze(Image.new("RGB", (32, 32), "white")) == dict(color=None, shape=None, size=None, position=None)
    for color, shape, size, position in [("orange", "triangle", "large", "bottom right"),
                                         ("purple", "square", "small", "top"),
                                         ("yellow", "circle", "small", "center")]:
        image = np.asarray(render_shape(color, shape, size, position, 32)).astype(np.float32) / 255
        assert analyze(image) == dict(color=color, shape=shape, size=size, position=position)


def test_outlined_shapes_are_read_as_hollow():
    combinations = itertools.product(shapes.COLORS, shapes.SHAPES, shapes.POSITIONS)
    for seed, (color, shape, position) in enumerate(combinations):  # 162 jittered layouts, each filled and hollow
        filled = render_shape(color, shape, "large", position, 32, rng=np.random.default_rng(seed))
        hollow = render_shape(color, shape, "large", position, 32, rng=np.random.default_rng(seed), outline=2)
        assert shapes.is_hollow(filled) is False and shapes.is_hollow(hollow) is True
        seen = analyze(hollow)
        assert (seen["color"], seen["position"]) == (color, position)
    assert shapes.is_hollow(Image.new("RGB", (32, 32), "white")) is None
    broken = render_shape("red", "circle", "large", "center", 32, outline=2)
    ImageDraw.Draw(broken).rectangle((16, 0, 31, 31), fill="white")  # a C: empty centroid, no closed ring
    assert shapes.is_hollow(broken) is False
    assert shapes.is_hollow(render_shape("red", "square", "large", "center", 64, outline=2)) is True
    with pytest.raises(ValueError, match="outline must be a positive width"):
        render_shape("red", "circle", "large", "center", 32, outline=0)
