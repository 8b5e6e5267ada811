"""The VAE objective (KL, reconstruction, LPIPS, PatchGAN + adaptive weight) and the reconstruction metrics."""

import math

import pytest
import torch
from safetensors.torch import save_file

from latentdiff.presets import vae_from_preset
from latentdiff.training.metrics import psnr, ssim
from latentdiff.training.perceptual import LPIPS
from latentdiff.training.vae_loss import (
    PatchDiscriminator,
    VAELoss,
    VAELossConfig,
    adaptive_weight,
    hinge_d_loss,
    hinge_g_loss,
    kl_divergence,
)

TINY_LPIPS = (4, 8, 8, 8, 8)


@pytest.fixture
def lpips_file(tmp_path):
    torch.manual_seed(0)
    state = LPIPS(channels=TINY_LPIPS).state_dict()
    state = {k: v.abs() if k.startswith("lin") else v for k, v in state.items()}  # LPIPS' weights are >= 0
    path = tmp_path / "lpips_tiny.safetensors"
    save_file(state, str(path))
    return str(path)


def test_kl_closed_form_matches_torch_distributions_and_monte_carlo():
    torch.manual_seed(0)
    mean, logvar = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3) * 0.5
    std = (0.5 * logvar).exp()
    q, p = torch.distributions.Normal(mean, std), torch.distributions.Normal(0.0, 1.0)
    expected = torch.distributions.kl_divergence(q, p).flatten(1).sum(1)
    torch.testing.assert_close(kl_divergence(mean, logvar), expected)
    z = q.sample((20000,))  # (S, B, C, h, w)
    monte_carlo = (q.log_prob(z) - p.log_prob(z)).flatten(2).sum(2).mean(0)
    torch.testing.assert_close(kl_divergence(mean, logvar), monte_carlo, rtol=0.03, atol=0.1)
    assert kl_divergence(torch.zeros(1, 4, 2, 2), torch.zeros(1, 4, 2, 2)).item() == 0.0


def test_adaptive_weight_is_the_ratio_of_gradient_norms():
    last_layer = torch.nn.Parameter(torch.randn(3, 4))
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    rec_loss, gan_loss = (last_layer * a).sum(), (last_layer * b).sum()  # gradients a and b
    weight = adaptive_weight(rec_loss, gan_loss, last_layer, 1, delta=1e-4)
    torch.testing.assert_close(weight, a.norm() / (b.norm() + 1e-4))
    assert not weight.requires_grad


def test_hinge_losses():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.5])
    # ½ (mean(relu(1 - real)) + mean(relu(1 + fake))) = ½ (0.25 + 0.75)
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5)
    assert hinge_g_loss(fake).item() == pytest.approx(0.75)


def test_patch_discriminator_gives_a_logit_per_patch():
    assert PatchDiscriminator(channels=8, num_layers=2)(torch.randn(2, 3, 32, 32)).shape == (2, 1, 6, 6)


def test_loss_decreases_on_a_fixed_batch():
    torch.manual_seed(0)
    vae = vae_from_preset("tiny")
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    loss_fn = VAELoss(VAELossConfig(l1_weight=1.0, l2_weight=1.0, kl_weight=1e-6))
    optimizer = torch.optim.Adam(vae.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(8):
        posterior = vae.encode(x).latent_dist
        reconstruction = vae.decode(posterior.sample(generator=generator)).sample
        loss, logs = loss_fn(x, reconstruction, posterior.mean, posterior.logvar)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(logs["loss"])
    assert losses[-1] < 0.8 * losses[0], losses


def test_loss_is_fp32_under_autocast_and_kl_is_scaled_per_pixel():
    torch.manual_seed(0)
    x, x_rec = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8)
    mean, logvar = torch.randn(2, 4, 2, 2), torch.randn(2, 4, 2, 2)
    loss_fn = VAELoss(VAELossConfig(l1_weight=0.0, l2_weight=1.0, kl_weight=0.5))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, logs = loss_fn(x.bfloat16(), x_rec.bfloat16(), mean, logvar)
    assert loss.dtype == torch.float32
    expected = (x.bfloat16().float() - x_rec.bfloat16().float()).pow(2).mean() + 0.5 * kl_divergence(
        mean, logvar
    ).mean() / (3 * 8 * 8)
    torch.testing.assert_close(loss, expected)
    assert logs["kl"] == pytest.approx(kl_divergence(mean, logvar).mean().item())


def test_perceptual_term_loads_from_safetensors_and_carries_gradients(lpips_file):
    loss_fn = VAELoss(VAELossConfig(l1_weight=0.0, perceptual_weight=1.0, perceptual_weights=lpips_file))
    assert loss_fn.perceptual.lin0.model[1].weight.shape == (1, 4, 1, 1)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    x_rec = (torch.rand(2, 3, 32, 32) * 2 - 1).requires_grad_()
    loss, logs = loss_fn(x, x_rec, torch.zeros(2, 4, 8, 8), torch.zeros(2, 4, 8, 8))
    loss.backward()
    assert logs["perceptual"] > 0 and x_rec.grad.abs().sum() > 0
    assert all(p.grad is None for p in loss_fn.perceptual.parameters())
    assert loss_fn.perceptual(x, x).abs().max() == 0


def test_perceptual_weights_are_checked(tmp_path, lpips_file):
    bad = tmp_path / "bad.safetensors"
    save_file({"conv.weight": torch.zeros(1)}, str(bad))
    with pytest.raises(ValueError, match="does not hold LPIPS-VGG weights"):
        LPIPS.from_file(str(bad))
    with pytest.raises(ValueError, match="needs perceptual_weights"):
        VAELossConfig(perceptual_weight=1.0)


def test_gan_term_uses_the_adaptive_weight():
    torch.manual_seed(0)
    vae = vae_from_preset("tiny")
    disc = PatchDiscriminator(channels=8, num_layers=2)
    loss_fn = VAELoss(VAELossConfig(disc_weight=0.5, disc_start=3))
    assert not loss_fn.gan_active(2) and loss_fn.gan_active(3)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    posterior = vae.encode(x).latent_dist
    x_rec = vae.decode(posterior.mode()).sample
    last_layer = vae.decoder.conv_out.weight
    loss, logs = loss_fn(x, x_rec, posterior.mean, posterior.logvar, disc(x_rec), last_layer)
    rec_only, _ = loss_fn(x, x_rec, posterior.mean, posterior.logvar)
    assert logs["d_weight"] > 0
    assert loss.item() == pytest.approx(rec_only.item() + logs["d_weight"] * logs["g_loss"], rel=1e-5)


def test_psnr_and_ssim_on_known_inputs():
    torch.manual_seed(0)
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    assert torch.isinf(psnr(x, x)).all()
    torch.testing.assert_close(ssim(x, x), torch.ones(3))
    # a constant error of 0.02 in [-1, 1]: MSE 4e-4, PSNR = 10 log10(4 / 4e-4) = 40 dB
    torch.testing.assert_close(psnr(x + 0.02, x), torch.full((3,), 40.0))
    noise = torch.randn_like(x) * 0.1  # MSE ≈ 0.01 -> ≈ 26 dB
    assert psnr(x + noise, x).mean().item() == pytest.approx(10 * math.log10(4 / 0.01), abs=0.3)
    assert 0 < ssim(x + noise, x).mean() < 1
    assert ssim(-x, x).mean() < ssim(x + noise, x).mean()


def test_adaptive_weight_clamp_is_compvis_in_our_per_pixel_units():
    """CompVis clamps λ to 1e4 on a loss summed over the D pixel values; ours is their loss / D, so λ / D."""
    last_layer = torch.ones(3, requires_grad=True)
    num_pixel_values = 3 * 32 * 32
    rec = (last_layer * 1e3).sum()  # a reconstruction gradient far larger than the GAN's
    gan = (last_layer * 1e-6).sum()
    weight = adaptive_weight(rec, gan, last_layer, num_pixel_values)
    assert weight.item() == pytest.approx(1e4 / num_pixel_values)
    unclamped = adaptive_weight(rec / 1e9, gan, last_layer, num_pixel_values)
    root3 = 3**0.5  # both gradients are constant over the 3 weights
    assert unclamped.item() == pytest.approx(1e3 / 1e9 * root3 / (1e-6 * root3 + 1e-4), rel=1e-4)


def test_adaptive_weight_takes_scaled_gradients_through_a_half_precision_layer():
    """fp16: the per-pixel reconstruction gradient through a half-precision decoder underflows to 0 unscaled
    (λ = 0: the GAN term vanishes); taken of the loss times fp16's loss scale, λ matches fp32's."""
    torch.manual_seed(0)
    x = torch.randn(4096)
    last_layer = torch.nn.Parameter(torch.ones(4096))

    def losses(weight, dtype):
        out = (weight.to(dtype) * x.to(dtype)).float()  # the decoder's last op in `dtype`
        return (out - 1).abs().mean() * 1e-4, -out.mean()  # tiny per-pixel gradients, as at 256 px

    reference = adaptive_weight(*losses(last_layer, torch.float32), last_layer, 1)
    assert reference > 0
    underflowed = adaptive_weight(*losses(last_layer, torch.float16), last_layer, 1)
    assert underflowed.item() == 0.0
    scaled = adaptive_weight(*losses(last_layer, torch.float16), last_layer, 1, grad_scale=2.0**16)
    assert scaled.item() == pytest.approx(reference.item(), rel=1e-2)
