"""DDPM ancestral sampling (Ho et al. 2020, Alg. 2), with diffusers' scheduler contract."""

import torch
from diffusers import ConfigMixin, SchedulerMixin
from diffusers.configuration_utils import register_to_config
from diffusers.utils.torch_utils import randn_tensor

from .schedule import NoiseSchedule, SchedulerOutput, check_choice

VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log")


# diffusers' loader recognises a component of a non-diffusers library by finding its base classes
# (SchedulerMixin, ConfigMixin) in the module it was saved from, so they are named here.
class DDPMScheduler(NoiseSchedule, SchedulerMixin, ConfigMixin):
    """x_{t-1} ~ N(mu~_t(x_0(x_t), x_t), sigma_t^2 I) with x_0 predicted by the model.

    `variance_type` picks sigma_t^2 (Ho et al. §3.2): "fixed_small" is the posterior variance beta~_t,
    "fixed_large" is beta_t; the "_log" variants compute the same standard deviation through the log,
    as Glide and the RL diffuser do. Config names and defaults are diffusers' DDPMScheduler's.
    """

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas=None,
        variance_type: str = "fixed_small",
        clip_sample: bool = True,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
    ):
        check_choice("variance_type", variance_type, VARIANCE_TYPES)
        self._init_schedule()

    def previous_timestep(self, timestep):
        """The timestep that follows `timestep` in `timesteps` (-1 after the last); t - 1 before
        `set_timesteps`, i.e. in training. Works on one timestep or a tensor of them."""
        if self.num_inference_steps is None:
            return timestep - 1
        t = torch.as_tensor(timestep, device=self.timesteps.device)
        matches = self.timesteps == t.reshape(-1, 1)  # (B, N)
        if not matches.any(dim=1).all():
            raise ValueError(
                f"timestep {timestep} is not one of the inference timesteps {self.timesteps.tolist()}"
            )
        chain = torch.cat([self.timesteps, self.timesteps.new_tensor([-1])])
        return chain[matches.int().argmax(dim=1) + 1].reshape(t.shape)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple:
        """One step of Ho et al. Alg. 2: x_t -> x_{t_prev}, returning (prev_sample, pred_original_sample)."""
        alpha_prod_t, alpha_prod_t_prev = self._alpha_prods(timestep)
        pred_original_sample, _ = self._original_and_epsilon(model_output, sample, alpha_prod_t)
        pred_original_sample = self._clip_or_threshold(pred_original_sample)

        # mu~_t(x_0, x_t), Ho et al. eq. 7; with x_0 from eq. 15 it equals eq. 11 (clipping aside)
        pred_original_sample_coeff, current_sample_coeff = self._posterior_mean_coefs(
            alpha_prod_t, alpha_prod_t_prev
        )
        prev_sample = pred_original_sample_coeff * pred_original_sample + current_sample_coeff * sample

        # Alg. 2 line 3: z = 0 on the last step (t = 1 in the paper's 1-based t). The last step is the
        # one that leaves the chain (t_prev < 0, alpha_bar_{t_prev} = 1), not the one at t = 0: trailing
        # spacing ends at t = T / N - 1 and leading with steps_offset=1 at t = 1, and their last step
        # too must return the mean, which there is the x_0 estimate. diffusers tests t > 0 instead.
        if self.previous_timestep(timestep) >= 0:
            variance_noise = randn_tensor(
                model_output.shape, generator=generator, device=model_output.device, dtype=model_output.dtype
            )
            prev_sample = prev_sample + self._std_dev(alpha_prod_t, alpha_prod_t_prev) * variance_noise

        if not return_dict:
            return prev_sample, pred_original_sample
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)

    def _std_dev(self, alpha_prod_t, alpha_prod_t_prev) -> torch.Tensor:
        """sigma_t (Ho et al. §3.2): sqrt(beta~_t) ("small") or sqrt(beta_t) ("large")."""
        if self.config.variance_type.startswith("fixed_large"):
            variance = 1 - alpha_prod_t / alpha_prod_t_prev  # beta_t across the stride
        else:
            variance = self._posterior_variance(alpha_prod_t, alpha_prod_t_prev)
        # Floored as diffusers does, so that a variance that rounds to 0 keeps a finite log.
        variance = variance.clamp(min=1e-20)
        if self.config.variance_type.endswith("_log"):
            return torch.exp(0.5 * torch.log(variance))
        return variance**0.5
