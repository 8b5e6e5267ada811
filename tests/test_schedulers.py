"""Our DDPM/DDIM against diffusers' number for number, and against the closed-form maths."""

import diffusers
import pytest
import torch
from diffusers.utils.torch_utils import randn_tensor

from latentdiff import LatentDiffPipeline
from latentdiff.schedulers import DDIMScheduler, DDPMScheduler

SHAPE = (2, 4, 8, 8)
TOL = 1e-5
PREDICTION_TYPES = ["epsilon", "sample", "v_prediction"]
SPACINGS = ["leading", "trailing", "linspace"]
SCHEDULES = ["linear", "scaled_linear", "squaredcos_cap_v2"]
VARIANCE_TYPES = ["fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log"]
SD1_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}


def fake_model(sample, t, scheduler):
    """A deterministic stand-in for the UNet, a fixed function of (x_t, t) that depends on the trajectory.

    It denoises towards x_0 = softsign(1.3 x_t) + t / 2000 and answers in the scheduler's prediction
    type, so that every prediction type keeps the trajectory of order 1 with clipping off. (Plain
    arithmetic only: tanh and sin go through MKL's threaded VML, which crawls on a busy 2-core machine.)
    """
    alpha_prod_t = scheduler.alphas_cumprod[t]
    x0 = 1.3 * sample / (1 + 1.3 * sample.abs()) + float(t) / 2000
    eps = (sample - alpha_prod_t**0.5 * x0) / (1 - alpha_prod_t) ** 0.5
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "sample":
        return x0
    return alpha_prod_t**0.5 * eps - (1 - alpha_prod_t) ** 0.5 * x0


def sample_loop(scheduler, num_inference_steps, seed=0, **step_kwargs):
    """Run a full sampling loop; return every step's (prev_sample, pred_original_sample), stacked."""
    scheduler.set_timesteps(num_inference_steps)
    generator = torch.Generator().manual_seed(seed)
    sample = randn_tensor(SHAPE, generator=generator) * scheduler.init_noise_sigma
    prev_samples, pred_originals = [], []
    for t in scheduler.timesteps:
        model_output = fake_model(scheduler.scale_model_input(sample, t), t, scheduler)
        out = scheduler.step(model_output, t, sample, generator=generator, **step_kwargs)
        sample = out.prev_sample
        prev_samples.append(sample)
        pred_originals.append(out.pred_original_sample)
    return torch.stack(prev_samples), torch.stack(pred_originals)


def assert_same_loop(ours, theirs, num_inference_steps=10, theirs_noises_last_step=False, **step_kwargs):
    ours_prev, ours_x0 = sample_loop(ours, num_inference_steps, **step_kwargs)
    theirs_prev, theirs_x0 = sample_loop(theirs, num_inference_steps, **step_kwargs)
    if theirs_noises_last_step:
        # Past the last step alpha_bar_{t_prev} = 1, so the noiseless last step of Alg. 2 returns that
        # step's x_0 estimate (eq. 7's coefficients are exactly 1 and 0); diffusers adds its noise to it.
        theirs_prev[-1] = theirs_x0[-1]
    assert torch.equal(ours.timesteps, theirs.timesteps)
    assert torch.isfinite(ours_prev).all()
    assert (ours_prev - theirs_prev).abs().max() <= TOL
    assert (ours_x0 - theirs_x0).abs().max() <= TOL


# Step-for-step equality with diffusers ------------------------------------------------------


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("beta_schedule", SCHEDULES)
@pytest.mark.parametrize("timestep_spacing", SPACINGS)
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_ddim_loop_matches_diffusers(prediction_type, timestep_spacing, beta_schedule, eta):
    cfg = dict(
        beta_schedule=beta_schedule,
        prediction_type=prediction_type,
        timestep_spacing=timestep_spacing,
        clip_sample=False,
    )
    assert_same_loop(DDIMScheduler(**cfg), diffusers.DDIMScheduler(**cfg), eta=eta)


@pytest.mark.parametrize("variance_type", VARIANCE_TYPES)
@pytest.mark.parametrize("beta_schedule", SCHEDULES)
@pytest.mark.parametrize("timestep_spacing", SPACINGS)
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_ddpm_loop_matches_diffusers(prediction_type, timestep_spacing, beta_schedule, variance_type):
    cfg = dict(
        beta_schedule=beta_schedule,
        prediction_type=prediction_type,
        timestep_spacing=timestep_spacing,
        clip_sample=False,
    )
    # diffusers 0.42 takes sqrt(log beta_t) for "fixed_large_log" (NaN); the log variant is meant
    # to be the same standard deviation as "fixed_large", which is what we compare with.
    reference_variance = "fixed_large" if variance_type == "fixed_large_log" else variance_type
    ours = DDPMScheduler(variance_type=variance_type, **cfg)
    # diffusers 0.42 adds noise on every step whose t > 0, so also on trailing spacing's last step
    # (t = 99), where Ho et al. Alg. 2 sets z = 0 and we do. With "fixed_small" its sigma there is
    # sqrt(1e-20), within TOL, so the whole loop still matches; with "fixed_large" it is sqrt(beta_t)
    # across the stride (0.17-0.32 here), and the last step is compared without diffusers' noise.
    theirs_noises_last_step = timestep_spacing == "trailing" and variance_type.startswith("fixed_large")
    assert_same_loop(
        ours,
        diffusers.DDPMScheduler(variance_type=reference_variance, **cfg),
        theirs_noises_last_step=theirs_noises_last_step,
    )


@pytest.mark.parametrize(
    "clipping",
    [
        dict(clip_sample=True),
        dict(clip_sample=True, clip_sample_range=1.5),
        dict(thresholding=True, sample_max_value=1.3),
    ],
)
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_clipping_and_thresholding_match_diffusers(prediction_type, clipping):
    cfg = dict(prediction_type=prediction_type, beta_schedule="scaled_linear", **clipping)
    assert_same_loop(DDPMScheduler(**cfg), diffusers.DDPMScheduler(**cfg))
    for use_clipped_model_output in (False, True):
        assert_same_loop(
            DDIMScheduler(**cfg),
            diffusers.DDIMScheduler(**cfg),
            eta=0.5,
            use_clipped_model_output=use_clipped_model_output,
        )


@pytest.mark.parametrize("prediction_type", ["sample", "v_prediction"])
@pytest.mark.parametrize("scheduler_cls", [DDPMScheduler, DDIMScheduler])
def test_zero_terminal_snr_with_trailing_spacing_matches_diffusers(scheduler_cls, prediction_type):
    # epsilon prediction is undefined at alpha_bar_T = 0 (x_0 = (x_T - eps) / 0), so Lin et al. use v.
    cfg = dict(
        rescale_betas_zero_snr=True,
        timestep_spacing="trailing",
        beta_schedule="scaled_linear",
        prediction_type=prediction_type,
        clip_sample=False,
    )
    ours, theirs = scheduler_cls(**cfg), getattr(diffusers, scheduler_cls.__name__)(**cfg)
    assert torch.equal(ours.alphas_cumprod, theirs.alphas_cumprod)
    assert_same_loop(
        ours, theirs, num_inference_steps=25, **({"eta": 0.5} if scheduler_cls is DDIMScheduler else {})
    )


def test_zero_terminal_snr_ddim_eta1_stays_finite():
    """At alpha_bar_T = 0 and eta = 1, 1 - alpha_bar_prev - sigma^2 is 0 up to rounding (NaN in diffusers 0.42)."""
    scheduler = DDIMScheduler(
        rescale_betas_zero_snr=True,
        timestep_spacing="trailing",
        prediction_type="v_prediction",
        clip_sample=False,
    )
    prev_samples, _ = sample_loop(scheduler, 25, eta=1.0)
    assert torch.isfinite(prev_samples).all()


@pytest.mark.parametrize("num_inference_steps", [7, 25])
def test_stable_diffusion_config_matches_diffusers(num_inference_steps):
    """SD 1.x: scaled_linear betas, steps_offset 1, alpha_bar_0 before the first step."""
    ours, theirs = (
        DDIMScheduler.from_config(SD1_SCHEDULER_CONFIG),
        diffusers.DDIMScheduler.from_config(SD1_SCHEDULER_CONFIG),
    )
    assert_same_loop(ours, theirs, num_inference_steps, eta=0.0)
    # steps_offset=1 ends at t = 1, where diffusers' DDPM still adds noise (see
    # test_ddpm_loop_matches_diffusers): sqrt(1e-20) with "fixed_small", sqrt(1 - alpha_bar_1) with
    # "fixed_large", whose last step is then compared without it.
    for variance_type in ("fixed_small", "fixed_large"):
        ours, theirs = (
            DDPMScheduler.from_config(SD1_SCHEDULER_CONFIG, variance_type=variance_type),
            diffusers.DDPMScheduler.from_config(SD1_SCHEDULER_CONFIG, variance_type=variance_type),
        )
        assert_same_loop(
            ours, theirs, num_inference_steps, theirs_noises_last_step=variance_type == "fixed_large"
        )


@pytest.mark.parametrize("timestep_spacing", SPACINGS)
@pytest.mark.parametrize("steps_offset", [0, 1])
def test_timesteps_match_diffusers(timestep_spacing, steps_offset):
    ours = DDPMScheduler(timestep_spacing=timestep_spacing, steps_offset=steps_offset)
    theirs = diffusers.DDPMScheduler(timestep_spacing=timestep_spacing, steps_offset=steps_offset)
    assert torch.equal(ours.timesteps, theirs.timesteps)
    for n in [1, 2, 3, 7, 10, 25, 48, 50, 61, 100, 999, 1000]:
        theirs.set_timesteps(n)
        if timestep_spacing == "leading" and steps_offset == 1 and n == 1000:
            # diffusers starts at timestep 1000, one past its alphas_cumprod: its first step fails
            # with an IndexError; ours refuses in set_timesteps.
            assert theirs.timesteps.max() == 1000
            with pytest.raises(ValueError, match="num_inference_steps=1000"):
                ours.set_timesteps(n)
            continue
        ours.set_timesteps(n)
        assert len(ours.timesteps) == n and ours.timesteps.min() >= 0 and ours.timesteps.max() <= 999
        # diffusers' trailing arange overshoots by one for some n (61 of 1000 ends at timestep -1)
        assert torch.equal(ours.timesteps, theirs.timesteps[:n]), n
        if n <= 100:
            assert torch.equal(
                ours.previous_timestep(ours.timesteps),
                torch.stack([theirs.previous_timestep(t) for t in ours.timesteps]),
            )


@pytest.mark.parametrize("beta_schedule", SCHEDULES)
def test_schedule_forward_process_and_velocity_match_diffusers(beta_schedule):
    ours, theirs = (
        DDPMScheduler(beta_schedule=beta_schedule),
        diffusers.DDPMScheduler(beta_schedule=beta_schedule),
    )
    assert ours.alphas_cumprod.dtype == torch.float32
    assert (ours.alphas_cumprod - theirs.alphas_cumprod).abs().max() <= 1e-7
    generator = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(SHAPE, generator=generator), torch.randn(SHAPE, generator=generator)
    timesteps = torch.tensor([0, 999])
    assert (ours.add_noise(x0, noise, timesteps) - theirs.add_noise(x0, noise, timesteps)).abs().max() <= TOL
    assert (
        ours.get_velocity(x0, noise, timesteps) - theirs.get_velocity(x0, noise, timesteps)
    ).abs().max() <= TOL


# Closed-form identities ----------------------------------------------------------------------


def _x0_noise_t():
    generator = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(4, 3, 4, 4, generator=generator), torch.randn(4, 3, 4, 4, generator=generator)
    return x0, noise, torch.tensor([1, 10, 500, 999])


def test_posterior_mean_equals_eps_parameterised_mean():
    """Ho et al. eq. 7 with x_0 and x_t equals eq. 11 when eps_theta is the true noise."""
    scheduler = DDPMScheduler()
    x0, noise, t = _x0_noise_t()
    x_t = scheduler.add_noise(x0, noise, t)
    beta_t = scheduler.betas[t].reshape(-1, 1, 1, 1)
    alpha_bar_t = scheduler.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    eq11_mean = (x_t - beta_t / (1 - alpha_bar_t) ** 0.5 * noise) / (1 - beta_t) ** 0.5
    torch.testing.assert_close(scheduler.posterior_mean(x0, x_t, t), eq11_mean, atol=1e-4, rtol=1e-4)
    alpha_bar_prev = scheduler.alphas_cumprod[t - 1].reshape(-1)
    expected_variance = (1 - alpha_bar_prev) / (1 - alpha_bar_t.reshape(-1)) * beta_t.reshape(-1)
    torch.testing.assert_close(scheduler.posterior_variance(t), expected_variance)


@pytest.mark.parametrize("num_inference_steps", [None, 10])
def test_ddpm_step_with_true_noise_is_posterior_mean_plus_noise(num_inference_steps):
    scheduler = DDPMScheduler(clip_sample=False)
    if num_inference_steps:
        scheduler.set_timesteps(num_inference_steps)
    x0, noise, _ = _x0_noise_t()
    for t in scheduler.timesteps[[0, 3, -1]]:
        x_t = scheduler.add_noise(x0, noise, t)
        out = scheduler.step(noise, t, x_t, generator=torch.Generator().manual_seed(7))
        torch.testing.assert_close(out.pred_original_sample, x0, atol=2e-4, rtol=1e-4)
        last_step = scheduler.previous_timestep(t) < 0
        z = 0 if last_step else torch.randn(x0.shape, generator=torch.Generator().manual_seed(7))
        mean = out.prev_sample - scheduler.posterior_variance(t) ** 0.5 * z
        torch.testing.assert_close(mean, scheduler.posterior_mean(x0, x_t, t), atol=1e-4, rtol=1e-4)
    assert scheduler.posterior_variance(scheduler.timesteps[-1]) == 0  # the last step ends at x_0
    torch.testing.assert_close(out.prev_sample, x0, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("variance_type", VARIANCE_TYPES)
@pytest.mark.parametrize("timestep_spacing, steps_offset", [("trailing", 0), ("leading", 1)])
def test_ddpm_last_step_is_noiseless_when_it_starts_above_t0(timestep_spacing, steps_offset, variance_type):
    """Ho et al. Alg. 2 line 3 sets z = 0 on the last step, also where the schedule's last timestep is
    above 0 (trailing spacing ends at t = T / N - 1, leading with steps_offset=1 at t = 1)."""
    scheduler = DDPMScheduler(
        variance_type=variance_type,
        timestep_spacing=timestep_spacing,
        steps_offset=steps_offset,
        clip_sample=False,
    )
    scheduler.set_timesteps(10)
    sample = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    first, last = scheduler.timesteps[0], scheduler.timesteps[-1]
    assert last > 0

    def step(t, seed):
        model_output = fake_model(sample, t, scheduler)
        return scheduler.step(model_output, t, sample, generator=torch.Generator().manual_seed(seed))

    assert not torch.equal(step(first, 1).prev_sample, step(first, 2).prev_sample)
    out = step(last, 1)
    assert torch.equal(out.prev_sample, step(last, 2).prev_sample)
    # alpha_bar_{t_prev} = 1 past the last step, so the posterior mean (eq. 7) is the x_0 estimate itself
    assert torch.equal(out.prev_sample, out.pred_original_sample)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_recovering_x0_and_eps_from_any_prediction_is_exact(prediction_type):
    scheduler = DDIMScheduler(prediction_type=prediction_type)
    x0, noise, t = _x0_noise_t()
    x_t = scheduler.add_noise(x0, noise, t)
    target = {"epsilon": noise, "sample": x0, "v_prediction": scheduler.get_velocity(x0, noise, t)}[
        prediction_type
    ]
    pred_x0, pred_eps = scheduler.predict_original_and_epsilon(target, x_t, t)
    torch.testing.assert_close(
        pred_x0[1:3], x0[1:3], atol=1e-5, rtol=1e-5
    )  # x_0 from eps is ill-posed at t=999
    torch.testing.assert_close(pred_eps[1:], noise[1:], atol=1e-5, rtol=1e-5)
    if prediction_type == "v_prediction":
        torch.testing.assert_close(pred_x0, x0, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(pred_eps, noise, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("timestep_spacing", SPACINGS)
def test_ddim_eta0_with_true_eps_recovers_x0_along_the_trajectory(timestep_spacing):
    scheduler = DDIMScheduler(
        clip_sample=False, timestep_spacing=timestep_spacing, beta_schedule="scaled_linear"
    )
    scheduler.set_timesteps(20)
    x0, noise, _ = _x0_noise_t()
    sample = scheduler.add_noise(x0, noise, scheduler.timesteps[0])
    for t in scheduler.timesteps:
        alpha_bar_t = scheduler.alphas_cumprod[t]
        true_eps = (sample - alpha_bar_t**0.5 * x0) / (1 - alpha_bar_t) ** 0.5
        out = scheduler.step(true_eps, t, sample, eta=0.0)
        torch.testing.assert_close(out.pred_original_sample, x0, atol=1e-4, rtol=1e-4)
        sample = out.prev_sample
    torch.testing.assert_close(sample, x0, atol=1e-4, rtol=1e-4)


def test_zero_terminal_snr_ends_at_zero():
    plain = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    rescaled = DDPMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=True
    )
    assert rescaled.alphas_cumprod[-1] == 0 and rescaled.snr(999) == 0
    torch.testing.assert_close(rescaled.alphas_cumprod[0], plain.alphas_cumprod[0])


def test_cosine_betas_are_capped():
    betas = DDPMScheduler(beta_schedule="squaredcos_cap_v2").betas
    assert betas.max() <= 0.999 and torch.isclose(betas[-1], torch.tensor(0.999))


@pytest.mark.parametrize("rescale_betas_zero_snr", [False, True])
@pytest.mark.parametrize("beta_schedule", SCHEDULES)
def test_snr_is_monotone_decreasing(beta_schedule, rescale_betas_zero_snr):
    scheduler = DDPMScheduler(beta_schedule=beta_schedule, rescale_betas_zero_snr=rescale_betas_zero_snr)
    snr = scheduler.snr(torch.arange(1000))
    assert (snr[1:] < snr[:-1]).all() and (snr >= 0).all()
    alpha_bar = scheduler.alphas_cumprod[[3, 400]]
    torch.testing.assert_close(scheduler.snr(torch.tensor([3, 400])), alpha_bar / (1 - alpha_bar))


# Contract, config and errors -----------------------------------------------------------------


@pytest.mark.parametrize("scheduler_cls", [DDPMScheduler, DDIMScheduler])
def test_contract(scheduler_cls):
    scheduler = scheduler_cls()
    assert scheduler.config_name == "scheduler_config.json"
    assert len(scheduler) == 1000 and scheduler.order == 1 and scheduler.init_noise_sigma == 1.0
    assert diffusers.DPMSolverMultistepScheduler in scheduler.compatibles
    sample = torch.randn(SHAPE)
    assert scheduler.scale_model_input(sample, 3) is sample
    scheduler.set_timesteps(10)
    prev_sample, pred_original_sample = scheduler.step(
        sample, scheduler.timesteps[0], sample, return_dict=False
    )
    assert prev_sample.shape == pred_original_sample.shape == SHAPE


def test_ddim_variance_noise_replaces_generator():
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(10)
    sample = torch.randn(SHAPE)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    with_noise = scheduler.step(sample, 900, sample, eta=1.0, variance_noise=noise).prev_sample
    with_generator = scheduler.step(sample, 900, sample, eta=1.0, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(with_noise, with_generator.prev_sample)
    with pytest.raises(ValueError, match="generator or variance_noise"):
        scheduler.step(sample, 900, sample, eta=1.0, variance_noise=noise, generator=torch.Generator())


@pytest.mark.parametrize("scheduler_cls", [DDPMScheduler, DDIMScheduler])
def test_config_round_trip(scheduler_cls, tmp_path):
    scheduler = scheduler_cls(
        beta_schedule="squaredcos_cap_v2",
        prediction_type="v_prediction",
        timestep_spacing="trailing",
        rescale_betas_zero_snr=True,
    )
    scheduler.save_config(tmp_path)
    assert (tmp_path / "scheduler_config.json").exists()
    loaded = scheduler_cls.from_pretrained(tmp_path)
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert type(loaded) is scheduler_cls and public(loaded.config) == public(scheduler.config)
    assert torch.equal(loaded.alphas_cumprod, scheduler.alphas_cumprod)


def test_loads_stable_diffusion_pndm_config_and_other_schedulers_configs():
    ddim = DDIMScheduler.from_config(SD1_SCHEDULER_CONFIG)
    assert ddim.config.beta_schedule == "scaled_linear" and ddim.config.steps_offset == 1
    assert ddim.final_alpha_cumprod == ddim.alphas_cumprod[0]
    ddpm = DDPMScheduler(
        beta_schedule="scaled_linear", prediction_type="v_prediction", variance_type="fixed_large"
    )
    from_ddpm = DDIMScheduler.from_config(ddpm.config)
    assert from_ddpm.config.prediction_type == "v_prediction"
    # keys of a compatible scheduler ride along hidden in the config, so the round trip keeps them
    assert DDPMScheduler.from_config(from_ddpm.config).config.variance_type == "fixed_large"
    assert torch.equal(from_ddpm.alphas_cumprod, ddpm.alphas_cumprod)
    from_diffusers = DDIMScheduler.from_config(diffusers.DDIMScheduler(beta_schedule="scaled_linear").config)
    assert torch.equal(from_diffusers.alphas_cumprod, ddpm.alphas_cumprod)


@pytest.mark.parametrize(
    "other_cls", [diffusers.DPMSolverMultistepScheduler, diffusers.EulerDiscreteScheduler]
)
def test_diffusers_scheduler_from_our_config_runs(other_cls):
    """Swapping in a diffusers scheduler from our config gives what it gives from diffusers' own."""
    ours = DDIMScheduler.from_config(SD1_SCHEDULER_CONFIG)
    samples = []
    for config in (ours.config, diffusers.DDIMScheduler.from_config(SD1_SCHEDULER_CONFIG).config):
        scheduler = other_cls.from_config(config)
        scheduler.set_timesteps(5)
        sample = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)) * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            model_input = scheduler.scale_model_input(sample, t)
            model_output = 0.9 * model_input / (1 + model_input.abs()) + float(t) / 2000
            sample = scheduler.step(model_output, t, sample).prev_sample
        samples.append(sample)
    assert torch.isfinite(samples[0]).all()
    torch.testing.assert_close(samples[0], samples[1])


@pytest.mark.parametrize(
    "scheduler_cls, argument, value, allowed",
    [
        (DDPMScheduler, "beta_schedule", "cosine", ["linear", "scaled_linear", "squaredcos_cap_v2"]),
        (DDIMScheduler, "beta_schedule", "cosine", ["linear", "scaled_linear", "squaredcos_cap_v2"]),
        (DDIMScheduler, "prediction_type", "x0", ["epsilon", "sample", "v_prediction"]),
        (DDPMScheduler, "timestep_spacing", "uniform", ["leading", "trailing", "linspace"]),
        (
            DDPMScheduler,
            "variance_type",
            "learned_range",
            ["fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log"],
        ),
    ],
)
def test_bad_config_fails_at_construction(scheduler_cls, argument, value, allowed):
    with pytest.raises(ValueError) as error:
        scheduler_cls(**{argument: value})
    message = str(error.value)
    assert f"{argument}={value!r}" in message and all(repr(a) in message for a in allowed)


@pytest.mark.parametrize("num_inference_steps", [0, 1001])
def test_bad_num_inference_steps(num_inference_steps):
    with pytest.raises(ValueError, match=f"num_inference_steps={num_inference_steps} must be between 1 and"):
        DDIMScheduler().set_timesteps(num_inference_steps)


@pytest.mark.parametrize("scheduler_cls", [DDPMScheduler, DDIMScheduler])
def test_leading_offset_past_the_last_timestep_fails_in_set_timesteps(scheduler_cls):
    """leading with steps_offset=1 and N = T would start at timestep T, one past alphas_cumprod."""
    scheduler = scheduler_cls(num_train_timesteps=20, timestep_spacing="leading", steps_offset=1)
    with pytest.raises(ValueError) as error:
        scheduler.set_timesteps(20)
    message = str(error.value)
    for named in [
        "num_inference_steps=20",
        "timestep_spacing='leading'",
        "steps_offset=1",
        "the largest num_inference_steps that fits is 19",
    ]:
        assert named in message, named
    scheduler.set_timesteps(19)
    assert scheduler.timesteps.max() == 19


def test_pipeline_rejects_leading_offset_past_the_last_timestep(tiny_pipeline):
    """The pipeline's own check (1 <= N <= T) lets N = T through; set_timesteps stops it before any step."""
    scheduler = DDIMScheduler(num_train_timesteps=20, timestep_spacing="leading", steps_offset=1)
    pipe = LatentDiffPipeline(**{**tiny_pipeline.components, "scheduler": scheduler})

    def no_denoising(module, args):
        raise AssertionError("the UNet ran before num_inference_steps was refused")

    hook = pipe.unet.register_forward_pre_hook(no_denoising)
    try:
        with pytest.raises(ValueError, match="num_inference_steps=20 with timestep_spacing='leading'"):
            pipe("a red square", num_inference_steps=20, output_type="latent")
    finally:
        hook.remove()


@pytest.mark.parametrize("scheduler_cls", [DDPMScheduler, DDIMScheduler])
@pytest.mark.parametrize(
    "timestep_spacing, steps_offset",
    [("leading", 0), ("trailing", 0), ("trailing", 1), ("linspace", 0), ("linspace", 1)],
)
def test_as_many_inference_steps_as_training_steps(scheduler_cls, timestep_spacing, steps_offset):
    """N = T visits every trained timestep once; steps_offset only shifts "leading" (as in diffusers)."""
    scheduler = scheduler_cls(
        num_train_timesteps=20,
        timestep_spacing=timestep_spacing,
        steps_offset=steps_offset,
        clip_sample=False,
    )
    prev_samples, _ = sample_loop(scheduler, 20)
    assert torch.equal(scheduler.timesteps, torch.arange(19, -1, -1))
    assert torch.isfinite(prev_samples).all()


@pytest.mark.parametrize("timestep_spacing", SPACINGS)
@pytest.mark.parametrize("steps_offset", [0, 1, 2])
def test_set_timesteps_stays_in_the_table_or_fails(timestep_spacing, steps_offset):
    T = 20
    scheduler = DDIMScheduler(
        num_train_timesteps=T, timestep_spacing=timestep_spacing, steps_offset=steps_offset
    )
    refused = []
    for n in range(1, T + 1):
        try:
            scheduler.set_timesteps(n)
        except ValueError as error:
            assert f"num_inference_steps={n}" in str(error)
            refused.append(n)
            continue
        assert len(scheduler.timesteps) == n
        assert 0 <= scheduler.timesteps.min() and scheduler.timesteps.max() <= T - 1
    # leading's first timestep is (N - 1) (T // N) + steps_offset
    expected = {1: [20], 2: [10, 19, 20]}.get(steps_offset, []) if timestep_spacing == "leading" else []
    assert refused == expected
