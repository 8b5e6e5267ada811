"""What DDPM and DDIM share: the noise schedule, the forward process and the posterior.

Notation follows Ho et al. 2020 ("DDPM") and diffusers: beta_t is the noise added at step t,
alpha_t = 1 - beta_t, alpha_bar_t = prod_{s<=t} alpha_s (`alphas_cumprod`). In code,
`alpha_prod_t` is alpha_bar_t and `beta_prod_t` is 1 - alpha_bar_t. During sampling, "the step
before t" is the previous inference timestep, so beta_t there is the noise of the whole
stride: 1 - alpha_bar_t / alpha_bar_{t_prev}.
"""

from dataclasses import dataclass

import numpy as np
import torch
from diffusers import ConfigMixin, SchedulerMixin
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers
from diffusers.utils import BaseOutput

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


def check_choice(name: str, value, allowed: tuple) -> None:
    """Raise a ValueError naming the argument, what was given and what is allowed."""
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(map(repr, allowed))}")


@dataclass
class SchedulerOutput(BaseOutput):
    """What `step` returns: x_{t-1}, and the x_0 predicted on the way (for previews and guidance)."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


def cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal 2021 eq. 17: alpha_bar(t) = cos^2((t/T + s) / (1 + s) * pi/2), s = 0.008."""
    t = np.arange(num_train_timesteps + 1) / num_train_timesteps
    alpha_bar = np.cos((t + 0.008) / 1.008 * np.pi / 2) ** 2
    # beta_t = 1 - alpha_bar_t / alpha_bar_{t-1}, capped below 1 so the last steps stay invertible.
    return torch.tensor(np.minimum(1 - alpha_bar[1:] / alpha_bar[:-1], max_beta), dtype=torch.float32)


def make_betas(
    beta_schedule: str,
    num_train_timesteps: int,
    beta_start: float,
    beta_end: float,
    trained_betas=None,
) -> torch.Tensor:
    """beta_1..beta_T (float32, built in float32 as diffusers does so that schedules agree bit for bit)."""
    if trained_betas is not None:
        return torch.tensor(trained_betas, dtype=torch.float32)
    check_choice("beta_schedule", beta_schedule, BETA_SCHEDULES)
    if beta_schedule == "linear":  # Ho et al. 2020 §4: 1e-4 -> 0.02
        return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    if beta_schedule == "scaled_linear":  # Rombach et al. 2022 (LDM): linear in sqrt(beta)
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    return cosine_betas(num_train_timesteps)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2024 Alg. 1: shift and scale sqrt(alpha_bar) so that alpha_bar_T = 0, keeping alpha_bar_1."""
    alphas_bar_sqrt = torch.cumprod(1 - betas, dim=0).sqrt()
    first, last = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * (first / (first - last))
    alphas_bar = alphas_bar_sqrt**2
    alphas = torch.cat([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])  # undo the cumprod
    return 1 - alphas


def inference_timesteps(
    num_train_timesteps: int, num_inference_steps: int, spacing: str, steps_offset: int = 0
) -> np.ndarray:
    """The sampling timesteps, descending; spacings as in Lin et al. 2024 Table 2."""
    T, N = num_train_timesteps, num_inference_steps
    if spacing == "linspace":
        timesteps = np.linspace(0, T - 1, N).round()[::-1]
    elif spacing == "leading":
        timesteps = np.arange(N)[::-1] * (T // N) + steps_offset
    else:
        # A float step lets arange overshoot by one element (N=61 of T=1000 would end at -1);
        # the values themselves are kept as arange computes them so that ties round as in diffusers.
        timesteps = np.round(np.arange(T, 0, -T / N))[:N] - 1
    return timesteps.astype(np.int64)


def dynamic_threshold(sample: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Saharia et al. 2022 (Imagen) §2.3: s = the `ratio` quantile of |x_0| per sample, clipped to
    [1, max_value]; x_0 is clipped to [-s, s] and divided by s."""
    flat = sample.flatten(1).to(torch.promote_types(sample.dtype, torch.float32))  # (B, C*H*W)
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(1, max_value)[:, None]  # (B, 1)
    return (flat.clamp(-s, s) / s).reshape(sample.shape).to(sample.dtype)


def _like(values: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
    """Per-sample scalars shaped (B, 1, ..., 1) to broadcast over `sample`, in its dtype and device."""
    return values.to(sample.device, sample.dtype).reshape(-1, *[1] * (sample.ndim - 1))


class NoiseSchedule(SchedulerMixin, ConfigMixin):
    """Base of DDPMScheduler and DDIMScheduler: the diffusers scheduler contract and the closed-form
    maths of the Gaussian diffusion. Subclasses register their config and call `_init_schedule`."""

    config_name = "scheduler_config.json"
    _compatibles = [e.name for e in KarrasDiffusionSchedulers]
    order = 1
    init_noise_sigma = 1.0

    def _init_schedule(self) -> None:
        cfg = self.config
        check_choice("prediction_type", cfg.prediction_type, PREDICTION_TYPES)
        check_choice("timestep_spacing", cfg.timestep_spacing, TIMESTEP_SPACINGS)
        self.betas = make_betas(
            cfg.beta_schedule, cfg.num_train_timesteps, cfg.beta_start, cfg.beta_end, cfg.trained_betas
        )
        if cfg.rescale_betas_zero_snr:
            self.betas = rescale_zero_terminal_snr(self.betas)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)  # alpha_bar_t, Ho et al. eq. 4
        # alpha_bar "before the first step", used when the previous timestep is < 0 (DDIM may change it).
        self.final_alpha_cumprod = torch.tensor(1.0)
        self.num_inference_steps = None
        self.timesteps = torch.arange(cfg.num_train_timesteps - 1, -1, -1, dtype=torch.int64)

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    def scale_model_input(self, sample: torch.Tensor, timestep: int | None = None) -> torch.Tensor:
        """Identity: DDPM and DDIM feed x_t to the model unscaled (init_noise_sigma = 1)."""
        return sample

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """Choose the `num_inference_steps` timesteps to sample with, spaced by `config.timestep_spacing`."""
        T = self.config.num_train_timesteps
        if not 1 <= num_inference_steps <= T:
            raise ValueError(
                f"num_inference_steps={num_inference_steps} must be between 1 and num_train_timesteps={T}"
            )
        spacing, steps_offset = self.config.timestep_spacing, self.config.steps_offset
        timesteps = inference_timesteps(T, num_inference_steps, spacing, steps_offset)
        # "leading" adds steps_offset after the stride, so its first timestep is (N - 1) (T // N) +
        # steps_offset, which can pass T - 1, the last row of alphas_cumprod (SD 1.x's steps_offset=1 at
        # N = T starts at T). diffusers lets it through to an IndexError in the first step.
        if timesteps.max() > T - 1:
            # Not a bound: from steps_offset=2 on some smaller N fail too (T = 20, offset 2: 18 fits, 10 not).
            fitting = [
                n for n in range(1, T + 1) if inference_timesteps(T, n, spacing, steps_offset).max() < T
            ]
            allowed = (
                f"the largest num_inference_steps that fits is {max(fitting)}"
                if fitting
                else "no num_inference_steps fits while steps_offset >= num_train_timesteps"
            )
            raise ValueError(
                f"num_inference_steps={num_inference_steps} with timestep_spacing={spacing!r} and "
                f"steps_offset={steps_offset} starts at timestep {timesteps.max()}, past the last trained "
                f"timestep {T - 1} (num_train_timesteps={T}); {allowed}"
            )
        self.num_inference_steps = num_inference_steps
        self.timesteps = torch.from_numpy(timesteps).to(device)

    def previous_timestep(self, timestep):
        """The timestep a step from `timestep` lands on (-1 past the end); each sampler defines it."""
        raise NotImplementedError

    # Forward process q(x_t | x_0) --------------------------------------------------------------

    def _alpha_prod(self, timesteps, sample: torch.Tensor) -> torch.Tensor:
        # Kept on the samples' device so that a training loop does not copy the table every step.
        self.alphas_cumprod = self.alphas_cumprod.to(sample.device)
        return _like(self.alphas_cumprod[torch.as_tensor(timesteps, device=sample.device)], sample)

    def add_noise(
        self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps (Ho et al. eq. 4)."""
        alpha_prod_t = self._alpha_prod(timesteps, original_samples)
        return alpha_prod_t**0.5 * original_samples + (1 - alpha_prod_t) ** 0.5 * noise

    def get_velocity(
        self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        """The v-prediction target v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x_0 (Salimans & Ho 2022 §4)."""
        alpha_prod_t = self._alpha_prod(timesteps, sample)
        return alpha_prod_t**0.5 * noise - (1 - alpha_prod_t) ** 0.5 * sample

    def snr(self, timesteps) -> torch.Tensor:
        """Signal-to-noise ratio alpha_bar_t / (1 - alpha_bar_t) (Kingma et al. 2021; min-SNR weighting)."""
        timesteps = torch.as_tensor(timesteps)
        alpha_prod_t = self.alphas_cumprod.to(timesteps.device)[timesteps]
        return alpha_prod_t / (1 - alpha_prod_t)

    def predict_original_and_epsilon(
        self, model_output: torch.Tensor, sample: torch.Tensor, timesteps
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_0, eps) implied by the model output at x_t, whatever `prediction_type` the model has."""
        return self._original_and_epsilon(model_output, sample, self._alpha_prod(timesteps, sample))

    def _original_and_epsilon(self, model_output, sample, alpha_prod_t):
        beta_prod_t = 1 - alpha_prod_t
        prediction_type = self.config.prediction_type
        if prediction_type == "epsilon":
            pred_epsilon = model_output
            # x_0 from eq. 4 solved for x_0 (Ho et al. eq. 15; Song et al. eq. 12 "predicted x_0")
            pred_original_sample = (sample - beta_prod_t**0.5 * model_output) / alpha_prod_t**0.5
        elif prediction_type == "sample":
            pred_original_sample = model_output
            pred_epsilon = (sample - alpha_prod_t**0.5 * model_output) / beta_prod_t**0.5  # eq. 4 for eps
        else:
            # v = sqrt(a) eps - sqrt(1-a) x_0 and x_t = sqrt(a) x_0 + sqrt(1-a) eps are a rotation:
            # x_0 = sqrt(a) x_t - sqrt(1-a) v, eps = sqrt(a) v + sqrt(1-a) x_t (Salimans & Ho 2022 §4)
            pred_original_sample = alpha_prod_t**0.5 * sample - beta_prod_t**0.5 * model_output
            pred_epsilon = alpha_prod_t**0.5 * model_output + beta_prod_t**0.5 * sample
        return pred_original_sample, pred_epsilon

    def _clip_or_threshold(self, pred_original_sample: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        if cfg.thresholding:
            return dynamic_threshold(
                pred_original_sample, cfg.dynamic_thresholding_ratio, cfg.sample_max_value
            )
        if cfg.clip_sample:
            return pred_original_sample.clamp(-cfg.clip_sample_range, cfg.clip_sample_range)
        return pred_original_sample

    # Posterior q(x_{t-1} | x_t, x_0) -----------------------------------------------------------

    def _alpha_prods(self, timestep) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha_bar_t, alpha_bar_{t_prev}), shaped like `timestep`."""
        device = self.alphas_cumprod.device
        t = torch.as_tensor(timestep, device=device)
        prev_t = torch.as_tensor(self.previous_timestep(t), device=device)
        alpha_prod_t_prev = torch.where(
            prev_t >= 0, self.alphas_cumprod[prev_t.clamp(min=0)], self.final_alpha_cumprod.to(device)
        )
        return self.alphas_cumprod[t], alpha_prod_t_prev

    @staticmethod
    def _posterior_mean_coefs(alpha_prod_t, alpha_prod_t_prev):
        """Ho et al. eq. 7: mu~_t = sqrt(alpha_bar_{t-1}) beta_t / (1 - alpha_bar_t) x_0
        + sqrt(alpha_t) (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) x_t."""
        current_alpha_t = alpha_prod_t / alpha_prod_t_prev
        current_beta_t = 1 - current_alpha_t
        beta_prod_t = 1 - alpha_prod_t
        pred_original_sample_coeff = alpha_prod_t_prev**0.5 * current_beta_t / beta_prod_t
        current_sample_coeff = current_alpha_t**0.5 * (1 - alpha_prod_t_prev) / beta_prod_t
        return pred_original_sample_coeff, current_sample_coeff

    @staticmethod
    def _posterior_variance(alpha_prod_t, alpha_prod_t_prev):
        """Ho et al. eq. 7: beta~_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) beta_t."""
        return (1 - alpha_prod_t_prev) / (1 - alpha_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev)

    def posterior_mean(self, original_sample: torch.Tensor, sample: torch.Tensor, timestep) -> torch.Tensor:
        """Mean of q(x_{t_prev} | x_t, x_0) (Ho et al. eq. 6-7); `timestep` is one t or one per sample."""
        coef_x0, coef_xt = self._posterior_mean_coefs(*self._alpha_prods(timestep))
        return _like(coef_x0, sample) * original_sample + _like(coef_xt, sample) * sample

    def posterior_variance(self, timestep) -> torch.Tensor:
        """Variance beta~_t of q(x_{t_prev} | x_t, x_0) (Ho et al. eq. 7), shaped like `timestep`."""
        return self._posterior_variance(*self._alpha_prods(timestep))
