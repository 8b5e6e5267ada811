"""The denoising objective of a diffusion model, with the network passed in as a callable (as DiT does).

The network never sees the noise schedule: `diffusion_loss` draws t and eps, builds x_t with the
scheduler's forward process, asks `model_fn(x_t, t, cond)` for its prediction and compares it with the
target of the scheduler's `prediction_type`. Everything is computed in float32 whatever precision the
model ran in.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from latentdiff.schedulers.schedule import PREDICTION_TYPES


def sample_timesteps(
    batch_size: int, num_train_timesteps: int, device=None, generator: torch.Generator | None = None
) -> torch.Tensor:
    """t ~ Uniform{0, ..., T-1}, one per sample (Ho et al. 2020 Alg. 1 line 3), (B,)."""
    return torch.randint(0, num_train_timesteps, (batch_size,), device=device, generator=generator)


def sample_noise(
    x0: torch.Tensor, noise_offset: float = 0.0, generator: torch.Generator | None = None
) -> torch.Tensor:
    """eps ~ N(0, I) shaped like x0; with `noise_offset` > 0, plus offset * N(0, 1) per sample and channel
    (Guttenberg 2023, "Diffusion with offset noise"), so the model learns to shift a whole image's mean."""
    noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
    if noise_offset:
        offset = torch.randn(
            (*x0.shape[:2], *[1] * (x0.ndim - 2)), device=x0.device, dtype=x0.dtype, generator=generator
        )
        noise = noise + noise_offset * offset  # (B, C, 1, 1) broadcast over the pixels
    return noise


def immiscible_noise(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """`noise` reordered within the batch so that each sample gets the noise nearest it overall: the permutation
    that minimises the summed L2 distance between x0_i and its noise, by linear assignment (Li et al. 2024,
    "Immiscible Diffusion", Alg. 1). Each eps stays a draw of N(0, I); what changes is which image it lands on,
    so a noisy x_t points back to a nearer image and the model's target is less of an average. O(B^3), on the
    CPU: negligible next to a UNet step at training batch sizes."""
    from scipy.optimize import linear_sum_assignment

    distance = torch.cdist(x0.flatten(1).float(), noise.flatten(1).float())  # (B, B)
    _, columns = linear_sum_assignment(distance.cpu().numpy())
    return noise[torch.as_tensor(columns, device=noise.device)]


def training_target(
    scheduler, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """What the network learns to output for the scheduler's `prediction_type`: eps (Ho et al. eq. 14),
    x_0 ("sample"), or v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0 (Salimans & Ho 2022 §4)."""
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "sample":
        return x0
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(x0, noise, timesteps)
    raise ValueError(
        f"prediction_type={prediction_type!r} is not one of {', '.join(map(repr, PREDICTION_TYPES))}"
    )


def weights_for_prediction(x0_weights: torch.Tensor, snr: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """Loss weights for the squared error of `prediction_type`'s output from weights meant for an x_0 loss: an
    eps error is an x_0 error times sqrt(SNR) (x_0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar)) and a v error
    one times sqrt(SNR + 1), so the eps and v weights divide by SNR and SNR + 1."""
    if prediction_type == "epsilon":
        return x0_weights / snr.clamp(min=torch.finfo(snr.dtype).tiny)
    if prediction_type == "v_prediction":
        return x0_weights / (snr + 1)
    if prediction_type == "sample":
        return x0_weights
    raise ValueError(
        f"prediction_type={prediction_type!r} is not one of {', '.join(map(repr, PREDICTION_TYPES))}"
    )


def min_snr_weights(snr: torch.Tensor, snr_gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights, (B,) (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR ...").

    The weight min(SNR, gamma) is for an x_0 loss (`weights_for_prediction` turns it into the eps or v
    loss's). At SNR = 0 (the last step of a zero-terminal-SNR schedule, Lin et al. 2024) the eps weight takes
    its limit 1 instead of 0 / 0.
    """
    snr = snr.float()
    weights = weights_for_prediction(torch.clamp(snr, max=snr_gamma), snr, prediction_type)  # min(SNR, gamma)
    if prediction_type == "epsilon":
        return torch.where(snr > 0, weights, torch.ones_like(snr))
    return weights


# EDM's training noise levels, ln sigma ~ N(P_mean, P_std^2) (Karras et al. 2022, Table 1)
EDM_P_MEAN, EDM_P_STD = -1.2, 1.2
# the data's std: latents scaled by the VAE's scaling_factor to unit variance (EDM's pixels: 0.5)
EDM_SIGMA_DATA = 1.0


def edm_timesteps(
    batch_size: int, scheduler, device=None, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Timesteps at EDM's training noise levels (Karras et al. 2022 §5), (B,): per sample a draw of
    ln sigma ~ N(-1.2, 1.2^2), mapped to the step whose sigma_t = sqrt((1 - abar_t) / abar_t) (the noise level of
    x_t / sqrt(abar_t) = x_0 + sigma_t eps) is nearest in log. A zero-terminal-SNR schedule's last step
    (sigma = inf) is never drawn."""
    abar = scheduler.alphas_cumprod.double()
    log_sigma = 0.5 * (torch.log1p(-abar) - torch.log(abar))  # (T,), increasing
    steps = torch.nonzero(torch.isfinite(log_sigma)).squeeze(1)  # (T',)
    draws = EDM_P_MEAN + EDM_P_STD * torch.randn(batch_size, device=device, generator=generator)  # (B,)
    nearest = (log_sigma[steps].to(draws.device, torch.float32)[None] - draws[:, None]).abs().argmin(dim=1)
    return steps.to(draws.device)[nearest]


def edm_weights(snr: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """EDM's loss weights lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 on the x_0 error
    (Karras et al. 2022 eq. 8, Table 1), (B,): 1 / sigma_data^2 + SNR, as `weights_for_prediction` gives them
    for the eps or v loss. With sigma_data = 1 the v loss's weight is 1: v-prediction is EDM's preconditioning."""
    snr = snr.float()
    return weights_for_prediction(1 / EDM_SIGMA_DATA**2 + snr, snr, prediction_type)


LOSS_WEIGHTINGS = ("edm",)


def diffusion_loss(
    model_fn: Callable[[torch.Tensor, torch.Tensor, object], torch.Tensor],
    x0: torch.Tensor,
    cond,
    scheduler,
    noise: torch.Tensor | None = None,
    timesteps: torch.Tensor | None = None,
    snr_gamma: float | None = None,
    noise_offset: float = 0.0,
    immiscible: bool = False,
    loss_weighting: str | None = None,
    generator: torch.Generator | None = None,
    reduction: str = "mean",
    loss_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The simple loss E_{t, eps} || target - model_fn(x_t, t, cond) ||^2 (Ho et al. 2020 eq. 14).

    x0 (B, C, H, W) is the clean sample (scaled VAE latents for LDM); `cond` is passed to `model_fn` as
    is (the text encoder's states). `noise` and `timesteps` are drawn when not given (from `generator`,
    else the global RNG, so a restored RNG state replays them). With `snr_gamma` each sample's mean squared
    error is weighted by `min_snr_weights`. With `immiscible` the drawn noise is assigned to the samples by
    `immiscible_noise`. With ``loss_weighting="edm"`` timesteps are drawn at EDM's noise levels
    (`edm_timesteps`) and each sample's error weighted by `edm_weights`. ``reduction="mean"`` returns the batch mean, ``"none"`` the
    per-sample terms (B,), for a caller that weights or adds them (DreamBooth's prior term).
    ``loss_mask`` (B, 1, H, W) in [0, 1] weights each latent position's squared error (``--masked_loss``;
    :func:`latent_mask`); as sd-scripts does, the mean is then over all positions, so a half-masked image
    weighs half.
    """
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction={reduction!r} is not one of 'mean', 'none'")
    x0 = x0.float()
    if loss_weighting not in (None, *LOSS_WEIGHTINGS):
        raise ValueError(f"loss_weighting={loss_weighting!r} is not one of None, {', '.join(map(repr, LOSS_WEIGHTINGS))}")
    if snr_gamma is not None and loss_weighting is not None:
        raise ValueError(f"snr_gamma and loss_weighting={loss_weighting!r} are two weightings: give one")
    if timesteps is None and loss_weighting == "edm":
        timesteps = edm_timesteps(x0.shape[0], scheduler, x0.device, generator)
    elif timesteps is None:
        timesteps = sample_timesteps(x0.shape[0], scheduler.config.num_train_timesteps, x0.device, generator)
    if noise is None:
        noise = sample_noise(x0, noise_offset, generator)
        if immiscible:
            noise = immiscible_noise(x0, noise)
    elif noise_offset or immiscible:
        raise ValueError(
            "noise_offset and immiscible apply to the noise diffusion_loss draws; apply them to the given noise instead"
        )
    noise = noise.float()
    x_t = scheduler.add_noise(x0, noise, timesteps)  # Ho et al. eq. 4
    target = training_target(scheduler, x0, noise, timesteps)

    model_pred = model_fn(x_t, timesteps, cond)
    if model_pred.shape != target.shape:
        raise ValueError(
            f"model_fn returned shape {tuple(model_pred.shape)}; the target has {tuple(target.shape)}"
        )
    squared = F.mse_loss(model_pred.float(), target, reduction="none")  # (B, C, H, W)
    if loss_mask is not None:
        squared = squared * loss_mask.to(squared)
    mse = squared.mean(dim=tuple(range(1, x0.ndim)))  # (B,)
    if snr_gamma is not None:
        weights = min_snr_weights(
            scheduler.snr(timesteps).to(x0.device), snr_gamma, scheduler.config.prediction_type
        )
        mse = mse * weights
    if loss_weighting == "edm":
        mse = mse * edm_weights(scheduler.snr(timesteps).to(x0.device), scheduler.config.prediction_type)
    return mse.mean() if reduction == "mean" else mse


def caption_dropout_mask(
    batch_size: int, proportion: float, device=None, generator: torch.Generator | None = None
) -> torch.Tensor:
    """True for each sample whose caption is dropped, with probability `proportion`, (B,) bool.

    Training on an empty caption part of the time teaches the unconditional model used by classifier-free
    guidance (Ho & Salimans 2022 Alg. 1, p_uncond; 10% in Stable Diffusion)."""
    if not 0.0 <= proportion <= 1.0:
        raise ValueError(f"the proportion of empty prompts must be in [0, 1], got {proportion}")
    if device is None and generator is not None:
        device = generator.device
    return torch.rand(batch_size, device=device, generator=generator) < proportion


def drop_captions(
    captions: list[str], proportion: float, generator: torch.Generator | None = None
) -> list[str]:
    """Replace each caption by "" with probability `proportion`, before tokenising (caption_dropout_mask)."""
    dropped = caption_dropout_mask(len(captions), proportion, generator=generator).tolist()
    return ["" if drop else caption for caption, drop in zip(captions, dropped, strict=True)]


def drop_text_states(
    encoder_hidden_states: torch.Tensor,
    empty_states: torch.Tensor,
    proportion: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The same dropout on cached text-encoder states (B, L, D): dropped rows become the states of ""."""
    drop = caption_dropout_mask(
        encoder_hidden_states.shape[0], proportion, encoder_hidden_states.device, generator
    )
    return torch.where(drop[:, None, None], empty_states.to(encoder_hidden_states), encoder_hidden_states)
