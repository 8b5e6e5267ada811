"""Noise schedulers: DDPM and DDIM written from the papers, drop-in replacements for diffusers'."""

from .ddim import DDIMScheduler
from .ddpm import DDPMScheduler
from .schedule import NoiseSchedule, SchedulerOutput, make_betas, rescale_zero_terminal_snr

__all__ = [
    "DDIMScheduler",
    "DDPMScheduler",
    "NoiseSchedule",
    "SchedulerOutput",
    "make_betas",
    "rescale_zero_terminal_snr",
]
