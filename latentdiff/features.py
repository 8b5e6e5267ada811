"""Image features for distribution distances (FID, KID) and caption retrieval.

FID and KID compare generated with real images through the features of a network; the number
means only as much as the network sees. Two sources of features:

- **In-domain feature net** (the default, offline): a small CNN this project trains itself, once
  per dataset, on the dataset's *training* split only (the held-out images it is compared with
  stay unseen). Four conv blocks (3x3 conv, GroupNorm, ReLU, then a 2x2 max pool after the first
  three: max, not average pooling, with which the shapes net tells circles, squares and triangles
  apart; the first conv strides 2 above 32 px) and a global average pool give a 128-d embedding.
  Inputs are resized to the data's resolution, at most 64 px. It learns from what the data offers:

  - shapes: supervised, a linear head per attribute of the dataset's metadata (color, shape,
    size, position): the features separate exactly what a caption asks for;
  - any other data (emoji, folders): contrastive instance discrimination (SimCLR's InfoNCE,
    Chen et al. 2020) between two views of each image made by a random shift (up to 1/8 of the
    side) and zoom (up to 10%). No color jitter and no flips: color tells "red apple" from
    "green apple", and a flip turns "left" into "right".

  It trains in under 40 s on one CPU thread at 32-64 px (:func:`default_feature_net_config`) and
  is kept in ``<cache dir>/feature_nets/<key>/`` (``model.safetensors`` and ``config.json``), keyed
  by the dataset's fingerprint and the training configuration; later runs load it. Its numbers
  are called "in-domain FID (latentdiff feature net trained on <dataset>)": they compare models
  evaluated on the same dataset with the same net, not with published (Inception) FIDs.

  What it sees is content: color, shape, layout. Fine texture moves it much less (emoji, held-out
  images against the same images changed: a 3x3 blur gives FID 0.11, noise of std 0.1 gives
  0.02, swapping red and green 5.8, grayscale 19.4; 188 training emoji in their place 0.41). On
  shapes it is more sensitive to blur (7.9 against 14.1 for training images, whose combinations
  differ from the held-out ones by construction).

- **A CLIP vision model given by path**: a local ``transformers`` folder of a
  ``CLIPVisionModel`` / ``CLIPVisionModelWithProjection`` (or a full ``CLIPModel``) with
  safetensors weights; its pooled (projected, when it has a projection) embedding is the
  feature. Pickle files (:data:`latentdiff.pickles.PICKLE_SUFFIXES`) are refused: unpickling can run code.

FID (Heusel et al. 2017) is the Fréchet distance between Gaussians fitted to the two feature
sets; it is biased at small sample sizes, so compare FIDs only at equal image counts. KID
(Bińkowski et al. 2018) is the unbiased estimate of MMD² with the kernel k(x, y) = (x·y / d + 1)³,
averaged over random subsets (mean and standard deviation reported).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from latentdiff.data import shapes
from latentdiff.data.files import atomic_path, default_cache_dir, digest
from latentdiff.data.transforms import to_tensor
from latentdiff.pickles import pickle_only

logger = logging.getLogger(__name__)

FEATURE_NET_VERSION = 1  # bump when the network or its training changes: cached nets are then retrained
MAX_RESOLUTION = 64
OBJECTIVES = ("attributes", "contrastive")
ATTRIBUTE_CLASSES: dict[str, tuple[str, ...]] = {
    "color": tuple(shapes.COLORS), "shape": shapes.SHAPES, "size": tuple(shapes.SIZES), "position": shapes.POSITIONS,
}
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# --- distances ---------------------------------------------------------------------------------


def gaussian_statistics(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (D,) and unbiased covariance (D, D) of (N, D) features, in float64."""
    features = features.double()
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"need at least 2 feature vectors of shape (N, D), got {tuple(features.shape)}")
    return features.mean(0), torch.cov(features.T)  # (D,), (D, D)


def _psd_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    """The symmetric square root of a symmetric positive semi-definite matrix (rounding below 0 is cut)."""
    eigenvalues, eigenvectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (eigenvectors * eigenvalues.clamp(min=0).sqrt()) @ eigenvectors.T


def frechet_distance(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor) -> float:
    """d² = ‖μ1 − μ2‖² + Tr(Σ1 + Σ2 − 2 (Σ1^½ Σ2 Σ1^½)^½) between N(μ1, Σ1) and N(μ2, Σ2)
    (Dowson & Landau 1982; FID: Heusel et al. 2017).

    Σ1^½ Σ2 Σ1^½ is symmetric PSD with the eigenvalues of Σ1 Σ2, so both square roots come from
    symmetric eigendecompositions in float64 (no scipy ``sqrtm`` of a non-symmetric product).
    """
    mu1, sigma1, mu2, sigma2 = (t.double() for t in (mu1, sigma1, mu2, sigma2))
    sqrt_sigma1 = _psd_sqrt(sigma1)
    middle = sqrt_sigma1 @ sigma2 @ sqrt_sigma1  # (D, D)
    trace_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    difference = mu1 - mu2
    return float(difference @ difference + sigma1.trace() + sigma2.trace() - 2 * trace_sqrt)


def fid(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """The Fréchet distance between Gaussians fitted to two (N, D) feature sets."""
    return frechet_distance(*gaussian_statistics(features_a), *gaussian_statistics(features_b))


def polynomial_mmd2(x: torch.Tensor, y: torch.Tensor) -> float:
    """Unbiased MMD² between samples x (m, D) and y (m, D) with k(a, b) = (a·b / D + 1)³
    (Bińkowski et al. 2018, with their kernel): off-diagonal means of k(x, x') and k(y, y')
    minus twice the mean of k(x, y)."""
    m, dim = x.shape
    k_xx = (x @ x.T / dim + 1) ** 3  # (m, m)
    k_yy = (y @ y.T / dim + 1) ** 3
    k_xy = (x @ y.T / dim + 1) ** 3
    within = (k_xx.sum() - k_xx.diagonal().sum() + k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1))
    return float(within - 2 * k_xy.mean())


def kid(features_a: torch.Tensor, features_b: torch.Tensor, num_subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> tuple[float, float]:
    """KID: mean and standard deviation of the unbiased polynomial MMD² over ``num_subsets`` pairs of
    random subsets of ``subset_size`` (at most the smaller set) drawn without replacement."""
    a, b = features_a.double(), features_b.double()
    m = min(subset_size, len(a), len(b))
    if m < 2:
        raise ValueError(f"KID needs at least 2 feature vectors in each set, got {len(a)} and {len(b)}")
    generator = torch.Generator().manual_seed(seed)

    def subset(features: torch.Tensor) -> torch.Tensor:
        return features[torch.randperm(len(features), generator=generator)[:m]]

    values = torch.tensor([polynomial_mmd2(subset(a), subset(b)) for _ in range(num_subsets)], dtype=torch.float64)
    return float(values.mean()), float(values.std()) if num_subsets > 1 else 0.0


# --- the in-domain feature net -----------------------------------------------------------------


@dataclass
class FeatureNetConfig:
    """The network and how it is trained; every field is part of the cache key."""

    resolution: int = 32
    channels: tuple[int, ...] = (16, 32, 64, 128)  # the last is the embedding's size
    objective: str = "contrastive"
    steps: int = 150
    batch_size: int = 128
    learning_rate: float = 2e-3
    temperature: float = 0.1  # InfoNCE
    max_shift: float = 0.125  # contrastive views: shift by up to this fraction of the side ...
    max_zoom: float = 0.1  # ... and zoom in or out by up to this fraction
    train_images: int = 4096  # drawn once from the training split (decoded into memory)
    seed: int = 0
    version: int = FEATURE_NET_VERSION

    def __post_init__(self):
        self.channels = tuple(self.channels)
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective={self.objective!r} is not one of {', '.join(OBJECTIVES)}")
        if len(self.channels) != 4 or self.resolution < 16 or self.steps < 1 or self.batch_size < 2:
            raise ValueError(f"a feature net needs 4 blocks, resolution >= 16, steps >= 1, batch_size >= 2: {self}")


def default_feature_net_config(dataset, steps: int | None = None) -> FeatureNetConfig:
    """Supervised attributes for shapes (its metadata is the ground truth), contrastive otherwise.

    Measured on one CPU thread, image loading included: shapes at 32 px, 400 steps in 22 s (held-out
    accuracy 100% on each of the four attributes); emoji at 64 px, 150 steps in 39 s (a shifted and
    zoomed view of a held-out emoji has its original as nearest neighbour among the 188 held-out
    ones 96% of the time).
    """
    supervised = hasattr(dataset, "attributes")
    settings = dict(objective="attributes", steps=400, batch_size=64) if supervised else dict(objective="contrastive")
    if steps is not None:
        settings["steps"] = steps
    return FeatureNetConfig(resolution=min(dataset.resolution, MAX_RESOLUTION), **settings)


class FeatureNet(nn.Module):
    """Pixels (B, 3, H, W) in [-1, 1] -> embedding (B, channels[-1]); ``head`` serves training only."""

    def __init__(self, config: FeatureNetConfig):
        super().__init__()
        self.config = config
        layers, in_channels = [], 3
        for i, out_channels in enumerate(config.channels):
            stride = 2 if i == 0 and config.resolution > 32 else 1  # 64 px costs what 32 px does
            layers += [nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1),
                       nn.GroupNorm(8, out_channels), nn.ReLU()]
            if i < len(config.channels) - 1:
                layers.append(nn.MaxPool2d(2))
            in_channels = out_channels
        self.blocks = nn.Sequential(*layers)
        dim = config.channels[-1]
        if config.objective == "attributes":
            self.head = nn.Linear(dim, sum(len(c) for c in ATTRIBUTE_CLASSES.values()))
        else:  # SimCLR's projection head: the loss acts on its output, the features are taken before it
            self.head = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim // 2))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.blocks(resize(pixel_values, self.config.resolution)).mean((2, 3))  # (B, D)


def resize(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 3, size, size), antialiased when shrinking."""
    if pixels.shape[-2:] == (size, size):
        return pixels
    return F.interpolate(pixels, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def _training_data(dataset, config: FeatureNetConfig) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Up to ``train_images`` items of the training split as (N, 3, r, r) uint8 (resized a chunk at a time:
    4096 photos at full size would not fit in memory), with (N, 4) attribute labels for the supervised
    objective."""
    n = min(len(dataset), config.train_images, config.steps * config.batch_size)
    positions = [int(p) for p in np.sort(np.random.default_rng(config.seed).permutation(len(dataset))[:n])]
    chunks = []
    for start in range(0, n, 256):
        pixels = torch.stack([dataset[p]["pixel_values"] for p in positions[start : start + 256]])  # (b, 3, R, R)
        chunks.append(((resize(pixels, config.resolution).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8))
    images = torch.cat(chunks)  # (N, 3, r, r)
    if config.objective == "contrastive":
        return images, None
    labels = [[ATTRIBUTE_CLASSES[a].index(dataset.attributes(p)[a]) for a in ATTRIBUTE_CLASSES] for p in positions]
    return images, torch.tensor(labels)  # (N, 4)


def random_view(x: torch.Tensor, config: FeatureNetConfig, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by up to ``max_shift`` of its side and zoom by up to ``max_zoom`` (edges repeat)."""
    b = len(x)
    zoom = 1 + (2 * torch.rand(b, generator=generator) - 1) * config.max_zoom
    shift = (2 * torch.rand(b, 2, generator=generator) - 1) * 2 * config.max_shift  # grid units: the side is 2
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = zoom
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)  # (B, r, r, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _loss(net: FeatureNet, x: torch.Tensor, labels: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
    config = net.config
    if config.objective == "attributes":
        logits = net.head(net(x)).split([len(c) for c in ATTRIBUTE_CLASSES.values()], dim=1)
        return sum(F.cross_entropy(logit, labels[:, i]) for i, logit in enumerate(logits))
    views = torch.cat([random_view(x, config, generator), random_view(x, config, generator)])  # (2B, 3, r, r)
    z = F.normalize(net.head(net(views)), dim=1)  # (2B, D/2)
    z1, z2 = z.chunk(2)
    logits = z1 @ z2.T / config.temperature  # (B, B): the positives on the diagonal
    target = torch.arange(len(x))
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def train_feature_net(dataset, config: FeatureNetConfig) -> FeatureNet:
    """Train a :class:`FeatureNet` on ``dataset`` (a training split) with AdamW at a constant rate; the
    net's ``training_summary`` says on how many images, to what final loss, in how many seconds."""
    images, labels = _training_data(dataset, config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        net = FeatureNet(config)
    optimizer = torch.optim.AdamW(net.parameters(), lr=config.learning_rate, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(config.seed)
    batch_size = min(config.batch_size, len(images))  # contrastive batches hold distinct images
    start = time.perf_counter()
    net.train()
    for _ in range(config.steps):
        index = torch.randperm(len(images), generator=generator)[:batch_size]
        x = images[index].float() / 127.5 - 1
        loss = _loss(net, x, None if labels is None else labels[index], generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    net.eval()
    seconds = round(time.perf_counter() - start, 1)
    net.training_summary = {"images": len(images), "final_loss": float(loss.detach()), "seconds": seconds}
    return net


def feature_net_path(dataset, config: FeatureNetConfig, cache_dir: str | Path | None = None) -> Path:
    """Where the feature net for ``dataset`` (a training split) and ``config`` is cached."""
    key = digest(dataset.fingerprint, sorted(asdict(config).items()))
    return Path(cache_dir or default_cache_dir()) / "feature_nets" / key


def save_feature_net(net: FeatureNet, folder: str | Path, **info) -> None:
    """``model.safetensors`` then ``config.json``: a folder with a config is complete."""
    folder = Path(folder)
    with atomic_path(folder / "model.safetensors") as tmp:
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, tmp)
    with atomic_path(folder / "config.json") as tmp:
        tmp.write_text(json.dumps({"config": asdict(net.config), **info}, indent=2) + "\n")


def load_feature_net(folder: str | Path) -> FeatureNet:
    folder = Path(folder)
    config = FeatureNetConfig(**json.loads((folder / "config.json").read_text())["config"])
    net = FeatureNet(config)
    net.load_state_dict(load_file(folder / "model.safetensors"))
    return net.eval()


def load_or_train_feature_net(dataset, config: FeatureNetConfig | None = None,
                              cache_dir: str | Path | None = None) -> FeatureNet:
    """The cached feature net for this training split and configuration, trained now if there is none."""
    config = config or default_feature_net_config(dataset)
    folder = feature_net_path(dataset, config, cache_dir)
    if (folder / "config.json").is_file():
        return load_feature_net(folder)
    logger.info("training the in-domain feature net on %s (%s, %d steps; once, kept in %s)",
                dataset.name, config.objective, config.steps, folder)
    net = train_feature_net(dataset, config)
    save_feature_net(net, folder, dataset=dataset.name, fingerprint=dataset.fingerprint, **net.training_summary)
    logger.info("feature net trained in %.1f s", net.training_summary["seconds"])
    return net


# --- feature extractors ------------------------------------------------------------------------


def as_batch(images) -> torch.Tensor:
    """(N, 3, H, W) in [-1, 1] from such a tensor or from a list of PIL images."""
    if isinstance(images, torch.Tensor):
        return images.float()
    return torch.stack([to_tensor(image.convert("RGB")) for image in images])  # (N, 3, H, W)


class FeatureNetFeatures:
    """Embeddings of the in-domain feature net trained on ``dataset_label``."""

    def __init__(self, net: FeatureNet, dataset_label: str, path: Path | None = None):
        self.net = net
        self.description = f"latentdiff feature net trained on {dataset_label}"
        self.path = path

    def metric_name(self, metric: str) -> str:
        return f"in-domain {metric} ({self.description})"

    @torch.no_grad()
    def __call__(self, images, batch_size: int = 256) -> torch.Tensor:
        pixels = as_batch(images)
        return torch.cat([self.net(chunk) for chunk in pixels.split(batch_size)]).double()  # (N, D)


def check_clip_path(path: str | Path) -> Path:
    """Refuse, with a message that says why, anything but a local CLIP folder with safetensors weights."""
    path = Path(path).expanduser()
    files = list(path.iterdir()) if path.is_dir() else [path]
    if pickle_only(f.name for f in files):
        raise ValueError(f"{path}: pickle weights are not loaded (unpickling can run code); give a folder with "
                         "safetensors weights (model.save_pretrained(folder) writes them)")
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: not a folder; give a transformers CLIP vision model folder (config.json "
                                "and model.safetensors)")
    if not (path / "config.json").is_file() or not list(path.glob("*.safetensors")):
        raise ValueError(f"{path}: a CLIP vision model folder needs config.json and *.safetensors weights")
    model_type = json.loads((path / "config.json").read_text()).get("model_type")
    if model_type not in ("clip_vision_model", "clip"):
        raise ValueError(f"{path}: model_type {model_type!r} is not a CLIP model (clip_vision_model or clip)")
    return path


class ClipFeatures:
    """Pooled (and projected, where the model has a projection) embeddings of a local CLIP vision model."""

    def __init__(self, path: str | Path):
        from transformers import CLIPVisionModel, CLIPVisionModelWithProjection

        self.path = check_clip_path(path)
        config = json.loads((self.path / "config.json").read_text())
        projected = config.get("model_type") == "clip" or "CLIPVisionModelWithProjection" in config.get("architectures", [])
        model_class = CLIPVisionModelWithProjection if projected else CLIPVisionModel
        self.model = model_class.from_pretrained(self.path, local_files_only=True, use_safetensors=True).eval()
        preprocessor = self.path / "preprocessor_config.json"
        stats = json.loads(preprocessor.read_text()) if preprocessor.is_file() else {}
        self.mean = torch.tensor(stats.get("image_mean", OPENAI_CLIP_MEAN)).view(1, 3, 1, 1)
        self.std = torch.tensor(stats.get("image_std", OPENAI_CLIP_STD)).view(1, 3, 1, 1)
        self.description = f"CLIP ViT features from {self.path}"

    def metric_name(self, metric: str) -> str:
        return f"{metric} ({self.description})"

    @torch.no_grad()
    def __call__(self, images, batch_size: int = 64) -> torch.Tensor:
        size = self.model.config.image_size
        out = []
        for chunk in as_batch(images).split(batch_size):
            pixels = F.interpolate((chunk + 1) / 2, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
            output = self.model(pixel_values=(pixels.clamp(0, 1) - self.mean) / self.std)
            out.append(output.image_embeds if hasattr(output, "image_embeds") else output.pooler_output)  # (B, D)
        return torch.cat(out).double()


def load_features(train_dataset, dataset_label: str, feature_net: str | Path | None = None,
                  feature_net_steps: int | None = None, cache_dir: str | Path | None = None):
    """A CLIP model's features when ``feature_net`` names one, else the in-domain net's (trained if needed)."""
    if feature_net is not None:
        return ClipFeatures(feature_net)
    config = default_feature_net_config(train_dataset, steps=feature_net_steps)
    net = load_or_train_feature_net(train_dataset, config, cache_dir)
    return FeatureNetFeatures(net, dataset_label, feature_net_path(train_dataset, config, cache_dir))

