"""Shapes prompt adherence, FID/KID and caption retrieval, checked with stand-in pipelines whose right
answers are known."""

from types import SimpleNamespace

import PIL.Image
import pytest
import torch

from latentdiff.data import shapes
from latentdiff.data.transforms import to_pil
from latentdiff.evaluation import (
    caption_retrieval,
    distinct_caption_positions,
    distribution_distance,
    eval_splits,
    retrieval_ranks,
    shapes_adherence,
    shapes_prompts,
)
from latentdiff.features import FeatureNet, FeatureNetConfig, FeatureNetFeatures

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
    # only the prompts that ask for red get their color, and each prompted color is listed
    assert scores["color_by_name"] == {name: float(name == "red") for name in {t["color"] for t in prompts}}


def test_a_blank_image_matches_nothing():
    class Blank:
        def __call__(self, prompts, **kwargs):
            return SimpleNamespace(images=[PIL.Image.new("RGB", (32, 32), "white") for _ in prompts])

    scores = shapes_adherence(Blank(), "held_out", num_prompts=5, images_per_prompt=1)
    assert scores["color"] == scores["shape"] == scores["position"] == 0.0


# --- FID/KID and caption retrieval, with stand-in pipelines that copy real images ----------------

SHAPE_ITEMS = [("red", "circle", "small", "top left"), ("blue", "square", "large", "center"),
               ("green", "triangle", "large", "bottom"), ("yellow", "circle", "large", "right"),
               ("purple", "square", "small", "top"), ("orange", "triangle", "small", "bottom left"),
               ("red", "square", "large", "bottom right"), ("blue", "circle", "small", "left"),
               ("green", "circle", "large", "top right"), ("yellow", "triangle", "large", "center")]


def captioned_folder(root, items=SHAPE_ITEMS):
    """A folder of shapes images with same-named .txt captions, one distinct caption per image."""
    root.mkdir(parents=True, exist_ok=True)
    for i, attributes in enumerate(items):
        shapes.render_shape(*attributes, resolution=32).save(root / f"img{i:02d}.png")
        (root / f"img{i:02d}.txt").write_text(shapes.caption(*attributes))
    return root


class Copier:
    """A 'pipeline' that returns the real image whose caption is the prompt (or always one image)."""

    def __init__(self, dataset, fixed=None):
        self.images = {dataset.captions(i)[0]: to_pil(dataset[i]["pixel_values"]) for i in range(len(dataset))}
        self.fixed = fixed

    def __call__(self, prompts, **kwargs):
        return SimpleNamespace(images=[self.images[self.fixed or p] for p in prompts])


@pytest.fixture(scope="module")
def folder_data(tmp_path_factory):
    splits = eval_splits(str(captioned_folder(tmp_path_factory.mktemp("data") / "shapes_folder")), 32)
    net = FeatureNet(FeatureNetConfig(channels=(8, 8, 8, 16))).eval()  # untrained: any fixed embedding will do
    return splits, FeatureNetFeatures(net, "shapes_folder")


def test_small_folders_hold_nothing_out(folder_data):
    (splits, _) = folder_data
    assert len(splits["train"]) == len(splits["held_out"]) == len(SHAPE_ITEMS)
    assert splits["train"].fingerprint == splits["held_out"].fingerprint


def test_retrieval_of_the_real_images_themselves_is_perfect(folder_data):
    (splits, embed) = folder_data
    data = splits["held_out"]
    scores = caption_retrieval(Copier(data), data, embed, num_prompts=8)
    assert scores["candidates"] == 8 and scores["top1"] == scores["top5"] == 1.0
    assert scores["chance_top1"] == 1 / 8 and scores["chance_top5"] == 5 / 8


def test_retrieval_of_a_model_that_ignores_the_prompt_is_chance(folder_data):
    (splits, embed) = folder_data
    data = splits["held_out"]
    scores = caption_retrieval(Copier(data, fixed=data.captions(0)[0]), data, embed, num_prompts=len(data))
    assert scores["top1"] == pytest.approx(1 / len(data))  # a hit only for the prompt of that one image


def test_retrieval_needs_distinct_captions(tmp_path, folder_data):
    (_, embed) = folder_data
    same = eval_splits(str(captioned_folder(tmp_path / "same", [SHAPE_ITEMS[0]] * 3)), 32)["held_out"]
    assert distinct_caption_positions(same, 10) == [distinct_caption_positions(same, 10)[0]]
    assert caption_retrieval(Copier(same), same, embed)["skipped"] == "fewer than 2 distinct captions"


def test_retrieval_ranks():
    candidates = torch.eye(4, dtype=torch.float64)
    assert retrieval_ranks(candidates, candidates).tolist() == [0, 0, 0, 0]
    queries = candidates[[1, 1, 2, 3]]  # query 0 looks like candidate 1
    assert retrieval_ranks(queries, candidates).tolist() == [1, 0, 0, 0]


def test_fid_of_the_real_images_themselves_is_zero(folder_data):
    (splits, embed) = folder_data
    data = splits["held_out"]
    same = distribution_distance(Copier(data), data, embed, num_images=len(data))
    assert same["real_images"] == same["generated_images"] == len(data)
    # identical sets: the unbiased MMD² keeps k(x, x) only in the cross term, so it is <= 0 (K is PSD)
    assert abs(same["fid"]["value"]) < 1e-6 and same["kid"]["mean"] <= 0
    assert same["fid"]["name"] == "in-domain FID (latentdiff feature net trained on shapes_folder)"
    one = distribution_distance(Copier(data, fixed=data.captions(0)[0]), data, embed, num_images=len(data))
    assert one["fid"]["value"] > 1e-3 and one["kid"]["mean"] > 0


def test_shapes_splits_are_at_least_32_px_and_unknown_data_is_refused():
    splits = eval_splits("shapes", 16)
    assert splits["train"].resolution == 32 and splits["held_out"].name == "shapes/validation"
    with pytest.raises(FileNotFoundError, match="neither built in"):
        eval_splits("no_such_dataset", 32)


class _PixelVAE:
    """A stand-in autoencoder whose latents are the pixels, optionally with red and blue swapped."""

    device, dtype = torch.device("cpu"), torch.float32

    def __init__(self, swap_red_blue: bool = False):
        self.swap = swap_red_blue

    def encode(self, x):
        from types import SimpleNamespace

        return SimpleNamespace(latent_dist=SimpleNamespace(mean=x))

    def decode(self, z):
        from types import SimpleNamespace

        return SimpleNamespace(sample=z[:, [2, 1, 0]] if self.swap else z)


def test_vae_round_trip_is_perfect_for_a_lossless_vae_and_catches_a_color_shift():
    from latentdiff.evaluation import shapes_vae_round_trip

    perfect = shapes_vae_round_trip(_PixelVAE(), resolution=32, num_images=36)
    assert perfect["images"] == 36 and perfect["color_and_shape"] == perfect["position"] == 1.0
    swapped = shapes_vae_round_trip(_PixelVAE(swap_red_blue=True), resolution=32, num_images=36)
    assert swapped["shape"] == 1.0 and swapped["color"] < 0.7  # red and blue trade places
    assert perfect["color_by_name"] == {name: 1.0 for name in shapes.COLORS}
    assert swapped["color_by_name"]["red"] == swapped["color_by_name"]["blue"] == 0.0
    assert swapped["color_by_name"]["green"] == swapped["color_by_name"]["purple"] == 1.0  # unchanged by the swap
