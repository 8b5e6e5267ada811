"""Shapes prompt adherence, checked with stand-in pipelines whose right answers are known."""

from types import SimpleNamespace

import PIL.Image
import pytest

from latentdiff.data import shapes
from latentdiff.evaluation import shapes_adherence, shapes_prompts

CAPTIONS = {
    shapes.caption(c, s, z, p): (c, s, z, p)
    for c in shapes.COLORS for s in shapes.SHAPES for z in shapes.SIZES for p in shapes.POSITIONS
}


class Painter:
    """A 'pipeline' that draws what the prompt says, or always the same thing."""

    def __init__(self, fixed=None):
        self.fixed = fixed

    def __call__(self, prompts, **kwargs):
        attrs = [self.fixed or CAPTIONS[p] for p in prompts]
        return SimpleNamespace(images=[shapes.render_shape(*a, resolution=32) for a in attrs])


def test_prompts_come_from_the_right_split():
    held_out = shapes_prompts("held_out", 100)
    assert len(held_out) == len(shapes.HELD_OUT)
    assert all((t["color"], t["shape"], t["position"]) in shapes.HELD_OUT for t in held_out)
    train = shapes_prompts("train", 20, seed=1)
    assert all((t["color"], t["shape"], t["position"]) not in shapes.HELD_OUT for t in train)
    assert train == shapes_prompts("train", 20, seed=1)
    with pytest.raises(ValueError, match="split='test'"):
        shapes_prompts("test", 1)


def test_a_perfect_model_scores_one():
    scores = shapes_adherence(Painter(), "train", num_prompts=12, images_per_prompt=2, batch_size=5)
    assert scores["images"] == 24
    assert scores["color_and_shape"] == scores["color_shape_position"] == scores["size"] == 1.0


def test_a_model_that_ignores_the_prompt_scores_by_chance():
    fixed = ("red", "circle", "small", "center")
    scores = shapes_adherence(Painter(fixed), "train", num_prompts=60, images_per_prompt=1)
    prompts = shapes_prompts("train", 60)
    expected = sum(t["color"] == "red" and t["shape"] == "circle" for t in prompts) / 60
    assert scores["color_and_shape"] == pytest.approx(expected)
    assert scores["color_and_shape"] < 0.2


def test_a_blank_image_matches_nothing():
    class Blank:
        def __call__(self, prompts, **kwargs):
            return SimpleNamespace(images=[PIL.Image.new("RGB", (32, 32), "white") for _ in prompts])

    scores = shapes_adherence(Blank(), "held_out", num_prompts=5, images_per_prompt=1)
    assert scores["color"] == scores["shape"] == scores["position"] == 0.0
