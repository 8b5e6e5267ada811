"""FID and KID against closed forms, the in-domain feature net's training and cache, CLIP features by path."""

import json
import math

import pytest
import torch

from latentdiff import features
from latentdiff.data.shapes import ShapesDataset
from latentdiff.features import (
    ClipFeatures,
    FeatureNetConfig,
    FeatureNetFeatures,
    check_clip_path,
    default_feature_net_config,
    fid,
    frechet_distance,
    gaussian_statistics,
    kid,
    load_or_train_feature_net,
    polynomial_mmd2,
    random_view,
    train_feature_net,
)

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_NET = dict(channels=(8, 8, 8, 16), batch_size=8, train_images=32)


def exact_sample(mean: torch.Tensor, covariance: torch.Tensor, n: int = 64, seed: int = 0) -> torch.Tensor:
    """n points whose sample mean and (unbiased) covariance are exactly ``mean`` and ``covariance``."""
    z = torch.randn(n, len(mean), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    z = z - z.mean(0)
    z = z @ torch.linalg.inv(torch.linalg.cholesky(torch.cov(z.T))).T  # whitened: cov(z) = I
    return mean + z @ torch.linalg.cholesky(covariance).T


def test_fid_of_identical_sets_is_zero():
    x = torch.randn(200, 16, generator=torch.Generator().manual_seed(0))
    assert abs(fid(x, x)) < 1e-8
    # fewer points than dimensions: a singular covariance, whose square root amplifies rounding (sqrt(1e-16) = 1e-8)
    wide = torch.randn(40, 64, generator=torch.Generator().manual_seed(1))
    assert abs(fid(wide, wide)) < 1e-6 * torch.cov(wide.double().T).trace()


def test_fid_of_gaussians_matches_the_closed_form():
    # 2-D, covariances that do not commute: the eigenvalues of S1 S2 give
    # Tr((S1^1/2 S2 S1^1/2)^1/2)^2 = Tr(S1 S2) + 2 sqrt(det S1 det S2)
    mu1, mu2 = torch.tensor([0.0, 1.0], dtype=torch.float64), torch.tensor([2.0, -1.0], dtype=torch.float64)
    s1 = torch.tensor([[2.0, 0.6], [0.6, 1.0]], dtype=torch.float64)
    s2 = torch.tensor([[0.5, -0.3], [-0.3, 1.5]], dtype=torch.float64)
    expected = ((mu1 - mu2) ** 2).sum() + s1.trace() + s2.trace() - 2 * math.sqrt(
        (s1 @ s2).trace() + 2 * math.sqrt(torch.linalg.det(s1) * torch.linalg.det(s2)))
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(float(expected), rel=1e-10)
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(float(expected), rel=1e-10)
    assert fid(exact_sample(mu1, s1), exact_sample(mu2, s2, seed=1)) == pytest.approx(float(expected), rel=1e-8)


def test_fid_of_diagonal_gaussians():
    var1, var2 = torch.linspace(0.5, 2.0, 8, dtype=torch.float64), torch.linspace(3.0, 0.1, 8, dtype=torch.float64)
    shift = torch.full((8,), 0.5, dtype=torch.float64)
    expected = float((shift**2).sum() + ((var1.sqrt() - var2.sqrt()) ** 2).sum())
    assert frechet_distance(torch.zeros(8), torch.diag(var1), shift, torch.diag(var2)) == pytest.approx(expected, rel=1e-10)


def test_gaussian_statistics_need_two_points():
    with pytest.raises(ValueError, match="at least 2"):
        gaussian_statistics(torch.zeros(1, 4))


def test_polynomial_mmd_is_the_unbiased_estimator():
    x, y = torch.randn(2, 6, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def k(a, b):
        return (a @ b / 3 + 1) ** 3

    m = len(x)
    within = sum(k(x[i], x[j]) + k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    across = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / m**2
    assert polynomial_mmd2(x, y) == pytest.approx(float(within - 2 * across), rel=1e-12)


def test_kid_is_near_zero_for_one_distribution_and_positive_for_a_shift():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(400, 16, generator=g), torch.randn(400, 16, generator=g)
    same_mean, same_std = kid(a, b, num_subsets=20, subset_size=200)
    shifted_mean, _ = kid(a, b + 0.5, num_subsets=20, subset_size=200)
    assert abs(same_mean) < 3 * same_std + 1e-3 and same_std > 0
    assert shifted_mean > 10 * (abs(same_mean) + same_std)
    assert kid(a, b + 0.5, num_subsets=20, subset_size=200) == (shifted_mean, pytest.approx(_))  # seeded
    with pytest.raises(ValueError, match="at least 2"):
        kid(a[:1], b)


def test_random_view_without_shift_or_zoom_is_the_image():
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    still = FeatureNetConfig(max_shift=0.0, max_zoom=0.0)
    assert torch.allclose(random_view(x, still, torch.Generator()), x, atol=1e-5)
    moved = random_view(x, FeatureNetConfig(), torch.Generator().manual_seed(0))
    assert moved.shape == x.shape and not torch.allclose(moved, x, atol=1e-2)


class NoAttributes(torch.utils.data.Dataset):
    """A dataset without metadata labels (as emoji and folders are): only images."""

    def __init__(self, resolution=32, n=32):
        self.inner = ShapesDataset(resolution, "train", size=n)
        self.resolution, self.fingerprint, self.name = resolution, "no-attributes", "shapes without labels"

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        return self.inner[i]


def test_default_config_is_supervised_where_labels_exist():
    assert default_feature_net_config(ShapesDataset(32, "train", size=8)).objective == "attributes"
    emoji_like = default_feature_net_config(NoAttributes(64))
    assert emoji_like.objective == "contrastive" and emoji_like.resolution == 64
    assert default_feature_net_config(NoAttributes(32), steps=7).steps == 7
    with pytest.raises(ValueError, match="objective"):
        FeatureNetConfig(objective="magic")


@pytest.mark.parametrize("dataset", [ShapesDataset(32, "train", size=32), NoAttributes()], ids=["attributes", "contrastive"])
def test_training_lowers_the_loss(dataset):
    config = default_feature_net_config(dataset)
    short = train_feature_net(dataset, FeatureNetConfig(**{**vars(config), **TINY_NET, "steps": 1}))
    longer = train_feature_net(dataset, FeatureNetConfig(**{**vars(config), **TINY_NET, "steps": 80}))
    assert longer.training_summary["final_loss"] < 0.85 * short.training_summary["final_loss"]
    assert longer(torch.zeros(2, 3, 32, 32)).shape == (2, 16)


def test_feature_net_is_trained_once_then_loaded(tmp_path, monkeypatch):
    dataset = ShapesDataset(32, "train", size=32)
    config = FeatureNetConfig(**{**vars(default_feature_net_config(dataset)), **TINY_NET, "steps": 4})
    trained = load_or_train_feature_net(dataset, config, cache_dir=tmp_path)
    folder = features.feature_net_path(dataset, config, tmp_path)
    saved = json.loads((folder / "config.json").read_text())
    assert (folder / "model.safetensors").is_file() and saved["config"]["steps"] == 4 and saved["images"] == 32

    def no_training(*args, **kwargs):
        raise AssertionError("the cached feature net was trained again")

    monkeypatch.setattr(features, "train_feature_net", no_training)
    loaded = load_or_train_feature_net(dataset, config, cache_dir=tmp_path)
    images = torch.rand(4, 3, 32, 32) * 2 - 1
    assert torch.equal(FeatureNetFeatures(loaded, "shapes")(images), FeatureNetFeatures(trained, "shapes")(images))
    other = FeatureNetConfig(**{**vars(config), "steps": 5})  # another configuration is another net
    assert features.feature_net_path(dataset, other, tmp_path) != folder


def test_feature_net_embeds_pil_images_and_other_sizes():
    net = features.FeatureNet(FeatureNetConfig(**TINY_NET)).eval()
    embed = FeatureNetFeatures(net, "shapes")
    image = ShapesDataset(32, "validation", size=1)[0]["pixel_values"]
    from latentdiff.data.transforms import to_pil

    assert torch.allclose(embed([to_pil(image)]), embed(image[None]), atol=1e-6)
    assert embed(torch.zeros(2, 3, 64, 64)).shape == (2, 16)
    assert embed.metric_name("FID") == "in-domain FID (latentdiff feature net trained on shapes)"


@pytest.fixture(scope="module")
def clip_dirs(tmp_path_factory):
    from transformers import CLIPVisionConfig, CLIPVisionModel, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8, projection_dim=16)
    root = tmp_path_factory.mktemp("clip")
    torch.manual_seed(0)
    CLIPVisionModel(config).save_pretrained(root / "vision")
    CLIPVisionModelWithProjection(config).save_pretrained(root / "projected")
    return root


@pytest.mark.parametrize("kind, dim", [("vision", 32), ("projected", 16)])
def test_clip_features_from_a_local_folder(clip_dirs, kind, dim):
    embed = ClipFeatures(clip_dirs / kind)
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    out = embed(images)
    assert out.shape == (3, dim) and out.dtype == torch.float64
    assert torch.allclose(embed(images[:1]), out[:1], atol=1e-6) and not torch.allclose(out[0], out[1])
    name = embed.metric_name("FID")
    assert name == f"FID (CLIP ViT features from {clip_dirs / kind})" and "Inception" not in name


def test_pickle_weights_are_refused(tmp_path):
    (tmp_path / "net.pt").write_bytes(b"not read")
    with pytest.raises(ValueError, match="pickle"):
        check_clip_path(tmp_path / "net.pt")
    folder = tmp_path / "bin_only"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "clip_vision_model"}')
    (folder / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ValueError, match="pickle"):
        ClipFeatures(folder)
    with pytest.raises(FileNotFoundError, match="not a folder"):
        check_clip_path(tmp_path / "missing")
