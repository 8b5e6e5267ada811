"""LPIPS (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual Metric").

The distance between two images is the sum over five VGG16 stages k of
    mean_{h,w} || w_k ⊙ (f̂_k(x) − f̂_k(y)) ||²,   f̂ = features normalised to unit length over channels,
with learned non-negative channel weights w_k (the `lin{k}` 1x1 convolutions), eq. 1 of the paper.

No weights are downloaded: `LPIPS.from_file(path)` loads a safetensors file with the state dict
of the `lpips` package's `LPIPS(net="vgg")` (VGG16 features from torchvision + the v0.1 linear
layers), whose keys this module reproduces: `net.slice{1..5}.{i}.weight|bias` (i the index in
torchvision's `vgg16().features`) and `lin{0..4}.model.1.weight`. To convert, where lpips and a
network are available:

    import lpips, safetensors.torch
    sd = lpips.LPIPS(net="vgg").state_dict()
    safetensors.torch.save_file({k: v for k, v in sd.items() if not k.startswith("lins.")}, "lpips_vgg.safetensors")

The widths are read from the file, so a narrower VGG-shaped network (in tests) loads the same way.
"""

from __future__ import annotations

import torch
from safetensors.torch import load_file
from torch import nn

VGG16_CHANNELS = (64, 128, 256, 512, 512)
# (convolutions per stage) of VGG16; a max-pool opens every stage but the first
VGG16_CONVS = (2, 2, 3, 3, 3)


class ScalingLayer(nn.Module):
    """Maps [-1, 1] images to the ImageNet statistics VGG was trained on (constants of the lpips package)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None])
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450])[None, :, None, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.shift) / self.scale


class VGGStages(nn.Module):
    """torchvision's vgg16().features cut into five stages, layer indices kept so the state dict keys match."""

    def __init__(self, channels=VGG16_CHANNELS):
        super().__init__()
        index, in_channels = 0, 3
        for stage, (width, convs) in enumerate(zip(channels, VGG16_CONVS, strict=True), start=1):
            layers = nn.Sequential()
            if stage > 1:
                layers.add_module(str(index), nn.MaxPool2d(kernel_size=2, stride=2))
                index += 1
            for _ in range(convs):
                layers.add_module(str(index), nn.Conv2d(in_channels, width, kernel_size=3, padding=1))
                layers.add_module(str(index + 1), nn.ReLU(inplace=False))
                index, in_channels = index + 2, width
            self.add_module(f"slice{stage}", layers)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for stage in range(1, 6):
            x = getattr(self, f"slice{stage}")(x)
            features.append(x)
        return features


class LinearLayer(nn.Module):
    """A 1x1 convolution to one channel; `model.0` is the (inactive, eval-only) dropout of the lpips package."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, kernel_size=1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class LPIPS(nn.Module):
    """A frozen perceptual distance; gradients flow to its inputs (the reconstructions), never to its weights."""

    def __init__(self, channels=VGG16_CHANNELS):
        super().__init__()
        self.scaling_layer = ScalingLayer()
        self.net = VGGStages(channels)
        for k, width in enumerate(channels):
            self.add_module(f"lin{k}", LinearLayer(width))
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> LPIPS:
        return super().train(False)  # always in eval: a fixed metric, dropout off

    @classmethod
    def from_file(cls, path: str) -> LPIPS:
        """Load LPIPS-VGG weights from a safetensors file (see the module docstring for the expected keys)."""
        state = {k: v for k, v in load_file(path).items() if not k.startswith(("lins.", "scaling_layer."))}
        missing = [f"lin{k}.model.1.weight" for k in range(5) if f"lin{k}.model.1.weight" not in state]
        if missing:
            raise ValueError(f"{path!r} does not hold LPIPS-VGG weights: no {', '.join(missing)}")
        model = cls(channels=tuple(state[f"lin{k}.model.1.weight"].shape[1] for k in range(5)))
        expected = {k for k in model.state_dict() if not k.startswith("scaling_layer.")}
        if set(state) != expected:
            raise ValueError(
                f"{path!r} is not an LPIPS-VGG state dict: missing {sorted(expected - set(state))[:5]}, "
                f"unexpected {sorted(set(state) - expected)[:5]}"
            )
        model.load_state_dict(state, strict=False)
        return model

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(B,) perceptual distances between images x and y in [-1, 1]."""
        features_x = self.net(self.scaling_layer(x))
        features_y = self.net(self.scaling_layer(y))
        distance = 0
        for k, (fx, fy) in enumerate(zip(features_x, features_y, strict=True)):
            diff = (_unit_normalize(fx) - _unit_normalize(fy)) ** 2  # (B, C_k, H_k, W_k)
            distance = distance + getattr(self, f"lin{k}")(diff).mean(dim=(1, 2, 3))  # (B,)
        return distance


def _unit_normalize(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    return x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)
