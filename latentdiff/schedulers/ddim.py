"""DDIM sampling (Song et al. 2021), with diffusers' scheduler contract."""

import torch
from diffusers import ConfigMixin, SchedulerMixin
from diffusers.configuration_utils import register_to_config
from diffusers.utils.torch_utils import randn_tensor

from .schedule import NoiseSchedule, SchedulerOutput


# diffusers' loader recognises a component of a non-diffusers library by finding its base classes
# (SchedulerMixin, ConfigMixin) in the module it was saved from, so they are named here.
class DDIMScheduler(NoiseSchedule, SchedulerMixin, ConfigMixin):
    """The non-Markovian sampler of Song et al. 2021 eq. 12: the same trained model as DDPM, any
    sub-sequence of timesteps; eta = 0 is deterministic, eta = 1 has DDPM's posterior variance.

    `set_alpha_to_one` chooses alpha_bar before the first step: 1 (a clean x_0), or alpha_bar_0 as
    Stable Diffusion 1.x does. Config names and defaults are diffusers' DDIMScheduler's.
    """

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas=None,
        clip_sample: bool = True,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        rescale_betas_zero_snr: bool = False,
    ):
        self._init_schedule()
        if not set_alpha_to_one:
            self.final_alpha_cumprod = self.alphas_cumprod[0]

    def previous_timestep(self, timestep):
        """t - T // N: the sub-sequence tau of Song et al. §4.2 taken with a uniform stride, as diffusers
        does for every `timestep_spacing` (for "linspace" and "trailing" this can differ by a few steps
        from the next entry of `timesteps`). Stride 1 before `set_timesteps`."""
        return timestep - self.config.num_train_timesteps // (self.num_inference_steps or len(self))

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        eta: float = 0.0,
        use_clipped_model_output: bool = False,
        generator: torch.Generator | None = None,
        variance_noise: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> SchedulerOutput | tuple:
        """One step of Song et al. eq. 12 from x_t to x_{t_prev}, returning (prev_sample, pred_original_sample).

        `use_clipped_model_output` re-derives eps from the clipped x_0 (as Glide does); `variance_noise`
        replaces the noise drawn from `generator` (CycleDiffusion).
        """
        if eta > 0 and variance_noise is not None and generator is not None:
            raise ValueError("pass either generator or variance_noise to DDIMScheduler.step, not both")
        alpha_prod_t, alpha_prod_t_prev = self._alpha_prods(timestep)
        beta_prod_t = 1 - alpha_prod_t
        pred_original_sample, pred_epsilon = self._original_and_epsilon(model_output, sample, alpha_prod_t)
        pred_original_sample = self._clip_or_threshold(pred_original_sample)
        if use_clipped_model_output:
            pred_epsilon = (
                sample - alpha_prod_t**0.5 * pred_original_sample
            ) / beta_prod_t**0.5  # eq. 4 for eps

        # sigma_t(eta) = eta sqrt((1 - a_prev) / (1 - a_t)) sqrt(1 - a_t / a_prev), eq. 16
        std_dev_t = eta * self._posterior_variance(alpha_prod_t, alpha_prod_t_prev) ** 0.5
        # eq. 12: x_prev = sqrt(a_prev) x_0 + sqrt(1 - a_prev - sigma_t^2) eps + sigma_t z
        # With zero terminal SNR and eta = 1 the first step has 1 - a_prev = sigma_t^2 exactly; rounding
        # would make the difference negative and its root NaN (as it does in diffusers 0.42).
        pred_sample_direction = (1 - alpha_prod_t_prev - std_dev_t**2).clamp(min=0) ** 0.5 * pred_epsilon
        prev_sample = alpha_prod_t_prev**0.5 * pred_original_sample + pred_sample_direction
        if eta > 0:
            if variance_noise is None:
                variance_noise = randn_tensor(
                    model_output.shape,
                    generator=generator,
                    device=model_output.device,
                    dtype=model_output.dtype,
                )
            prev_sample = prev_sample + std_dev_t * variance_noise

        if not return_dict:
            return prev_sample, pred_original_sample
        return SchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)
