import itertools

import pytest
import torch

from latentdiff.presets import sd_scheduler, unet_from_preset
from latentdiff.schedulers import DDPMScheduler
from latentdiff.training.diffusion_loss import (
    caption_dropout_mask,
    diffusion_loss,
    drop_captions,
    drop_text_states,
    edm_timesteps,
    immiscible_noise,
    min_snr_weights,
    sample_noise,
    sample_timesteps,
    training_target,
)

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


def scheduler(prediction_type="epsilon", **kwargs):
    return DDPMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type=prediction_type,
        **kwargs,
    )


def oracle(sched, x0):
    """A model that knows x_0: it outputs the exact target for x_t, whatever the prediction type."""

    def model_fn(x_t, t, cond):
        a = sched.alphas_cumprod[t].reshape(-1, 1, 1, 1)
        eps = (x_t - a.sqrt() * x0) / (1 - a).sqrt()  # Ho et al. eq. 4 solved for eps
        return {"epsilon": eps, "sample": x0, "v_prediction": a.sqrt() * eps - (1 - a).sqrt() * x0}[
            sched.config.prediction_type
        ]

    return model_fn


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_a_model_that_outputs_the_target_has_zero_loss(prediction_type):
    torch.manual_seed(0)
    sched = scheduler(prediction_type)
    x0 = torch.randn(8, 4, 6, 6)
    t = torch.tensor([0, 1, 10, 100, 500, 900, 998, 999])
    loss = diffusion_loss(oracle(sched, x0), x0, None, sched, timesteps=t, snr_gamma=5.0)
    assert loss.item() < 1e-8


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_a_zero_model_has_the_mean_square_target_as_loss(prediction_type):
    torch.manual_seed(0)
    sched = scheduler(prediction_type)
    x0, noise = torch.randn(2, 3, 4, 4, 4).unbind(0)
    t = torch.tensor([5, 700, 999])
    loss = diffusion_loss(lambda x_t, t, c: torch.zeros_like(x_t), x0, None, sched, noise=noise, timesteps=t)
    a = sched.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    target = {"epsilon": noise, "sample": x0, "v_prediction": a.sqrt() * noise - (1 - a).sqrt() * x0}[
        prediction_type
    ]
    torch.testing.assert_close(loss, target.pow(2).mean())


def test_model_sees_x_t_of_eq_4_and_its_condition():
    sched = scheduler()
    x0, noise = torch.randn(2, 2, 4, 3, 3).unbind(0)
    t = torch.tensor([3, 400])
    seen = {}

    def model_fn(x_t, timesteps, cond):
        seen.update(x_t=x_t, t=timesteps, cond=cond)
        return torch.zeros_like(x_t)

    diffusion_loss(model_fn, x0, "caption states", sched, noise=noise, timesteps=t)
    a = sched.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    torch.testing.assert_close(seen["x_t"], a.sqrt() * x0 + (1 - a).sqrt() * noise)
    assert seen["t"] is t and seen["cond"] == "caption states"


def test_v_target_is_the_closed_form():
    sched = scheduler("v_prediction")
    x0, noise = torch.randn(2, 5, 4, 2, 2).unbind(0)
    t = torch.tensor([0, 10, 250, 600, 999])
    a = sched.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    torch.testing.assert_close(training_target(sched, x0, noise, t), a.sqrt() * noise - (1 - a).sqrt() * x0)


def test_min_snr_weights_follow_hang_et_al():
    snr = torch.tensor([0.5, 5.0, 10.0])
    torch.testing.assert_close(min_snr_weights(snr, 5.0, "epsilon"), torch.tensor([1.0, 1.0, 0.5]))
    torch.testing.assert_close(
        min_snr_weights(snr, 5.0, "v_prediction"), torch.tensor([0.5 / 1.5, 5 / 6, 5 / 11])
    )
    torch.testing.assert_close(min_snr_weights(snr, 5.0, "sample"), torch.tensor([0.5, 5.0, 5.0]))
    # zero terminal SNR: the eps weight is its limit 1, not 0/0
    assert min_snr_weights(torch.tensor([0.0]), 5.0, "epsilon").item() == 1.0
    assert min_snr_weights(torch.tensor([0.0]), 5.0, "v_prediction").item() == 0.0


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_snr_gamma_weights_each_sample(prediction_type):
    sched = scheduler(prediction_type)
    x0, noise = torch.randn(2, 4, 4, 3, 3).unbind(0)
    t = torch.tensor([1, 50, 300, 999])
    pred = torch.randn_like(x0)
    loss = diffusion_loss(lambda *_: pred, x0, None, sched, noise=noise, timesteps=t, snr_gamma=5.0)
    snr = sched.alphas_cumprod[t] / (1 - sched.alphas_cumprod[t])
    weight = {"epsilon": snr.clamp(max=5) / snr, "v_prediction": snr.clamp(max=5) / (snr + 1)}.get(
        prediction_type, snr.clamp(max=5)
    )
    mse = (pred - training_target(sched, x0, noise, t)).pow(2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(loss, (weight * mse).mean())


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_edm_weighting_is_edms_loss_on_the_implied_x0(prediction_type):
    """lambda(sigma) ||D(x_t) - x_0||^2 with lambda = (sigma^2 + 1) / sigma^2 (Karras et al. 2022, sigma_data 1),
    D the x_0 the prediction implies, whatever the UNet predicts."""
    sched = scheduler(prediction_type)
    x0, noise = torch.randn(2, 4, 4, 3, 3).unbind(0)
    t = torch.tensor([1, 50, 300, 998])
    pred = torch.randn_like(x0)
    loss = diffusion_loss(lambda *_: pred, x0, None, sched, noise=noise, timesteps=t, loss_weighting="edm")
    x_t = sched.add_noise(x0, noise, t)
    implied_x0, _ = sched.predict_original_and_epsilon(pred, x_t, t)
    sigma2 = (1 - sched.alphas_cumprod[t]) / sched.alphas_cumprod[t]
    edm = ((sigma2 + 1) / sigma2 * (implied_x0 - x0).pow(2).mean(dim=(1, 2, 3))).mean()
    torch.testing.assert_close(loss, edm, rtol=1e-4, atol=0)
    with pytest.raises(ValueError, match="two weightings"):
        diffusion_loss(lambda *_: pred, x0, None, sched, timesteps=t, loss_weighting="edm", snr_gamma=5.0)


def test_edm_timesteps_draw_edms_noise_levels():
    sched = scheduler()
    t = edm_timesteps(20_000, sched, generator=torch.Generator().manual_seed(0))
    log_sigma = 0.5 * torch.log((1 - sched.alphas_cumprod[t]) / sched.alphas_cumprod[t])
    # ln sigma ~ N(-1.2, 1.2^2), snapped to the schedule's steps (ln sigma from -3.5 to 2.7 here)
    assert log_sigma.median().item() == pytest.approx(-1.2, abs=0.05)
    assert ((log_sigma > -2.4) & (log_sigma < 0.0)).float().mean().item() == pytest.approx(0.683, abs=0.02)
    # the last step of a zero-terminal-SNR schedule (sigma = inf) is never drawn
    zero_snr = scheduler("v_prediction", rescale_betas_zero_snr=True)
    t = edm_timesteps(20_000, zero_snr, generator=torch.Generator().manual_seed(0))
    assert t.max().item() < 999 and torch.isfinite(zero_snr.snr(t)).all()


def test_zero_terminal_snr_loss_is_finite():
    sched = scheduler("v_prediction", rescale_betas_zero_snr=True)
    x0 = torch.randn(2, 4, 3, 3)
    loss = diffusion_loss(
        lambda x, t, c: x, x0, None, sched, timesteps=torch.tensor([999, 999]), snr_gamma=5.0
    )
    assert torch.isfinite(loss)


def test_loss_is_float32_for_a_low_precision_model():
    sched = scheduler()
    x0 = torch.randn(2, 4, 3, 3)
    loss = diffusion_loss(lambda x, t, c: x.bfloat16(), x0, None, sched)
    assert loss.dtype == torch.float32


def test_wrong_model_output_shape_is_an_error():
    with pytest.raises(
        ValueError, match=r"model_fn returned shape \(2, 3, 3, 3\); the target has \(2, 4, 3, 3\)"
    ):
        diffusion_loss(lambda x, t, c: x[:, :3], torch.randn(2, 4, 3, 3), None, scheduler())


def test_timesteps_are_uniform_over_the_schedule():
    torch.manual_seed(0)
    t = sample_timesteps(20_000, 1000)
    assert t.shape == (20_000,) and t.min() == 0 and t.max() == 999
    assert abs(t.float().mean().item() - 499.5) < 10


def test_offset_noise_shifts_each_channel_of_each_sample():
    torch.manual_seed(0)
    x0 = torch.zeros(512, 4, 16, 16)
    plain, offset = sample_noise(x0), sample_noise(x0, noise_offset=0.5)
    assert offset.shape == x0.shape and offset.dtype == x0.dtype
    # the per-(sample, channel) mean varies by 1/(H W) for white noise, by that + offset^2 with the offset
    assert abs(plain.mean(dim=(2, 3)).var().item() - 1 / 256) < 0.001
    assert abs(offset.mean(dim=(2, 3)).var().item() - (1 / 256 + 0.25)) < 0.02
    assert abs(offset.var().item() - 1.25) < 0.03
    with pytest.raises(ValueError, match="noise_offset"):
        diffusion_loss(lambda x, t, c: x, x0[:2], None, scheduler(), noise=plain[:2], noise_offset=0.1)


def test_immiscible_noise_is_the_drawn_noise_assigned_at_the_least_total_distance():
    torch.manual_seed(0)
    x0 = torch.randn(6, 4, 8, 8) * 0.5 + torch.arange(6.0)[:, None, None, None] * 0.3
    noise = torch.randn(6, 4, 8, 8)
    assigned = immiscible_noise(x0, noise)
    distance = torch.cdist(x0.flatten(1), noise.flatten(1))  # (6, 6)
    order = [next(j for j in range(6) if torch.equal(assigned[i], noise[j])) for i in range(6)]
    assert sorted(order) == list(range(6))  # a permutation of the drawn rows, none changed
    best = min(itertools.permutations(range(6)), key=lambda p: sum(distance[i, p[i]] for i in range(6)))
    total = sum(distance[i, order[i]] for i in range(6))
    assert total == pytest.approx(sum(distance[i, best[i]] for i in range(6)).item())
    assert total < distance.diagonal().sum()  # this draw's identity order is not the optimum


def test_diffusion_loss_with_immiscible_noise_noises_with_the_assigned_draw():
    x0, sched = torch.randn(4, 4, 8, 8), scheduler()
    seen = []
    diffusion_loss(lambda x, t, c: seen.append(x) or x, x0, None, sched, immiscible=True,
                   generator=torch.Generator().manual_seed(1))  # fmt: skip
    replay = torch.Generator().manual_seed(1)  # the same draws: timesteps, then noise
    t = sample_timesteps(4, sched.config.num_train_timesteps, generator=replay)
    noise = immiscible_noise(x0, sample_noise(x0, generator=replay))
    torch.testing.assert_close(seen[0], sched.add_noise(x0, noise, t))
    with pytest.raises(ValueError, match="immiscible apply to the noise diffusion_loss draws"):
        diffusion_loss(lambda x, t, c: x, x0, None, sched, noise=noise, immiscible=True)


def test_caption_dropout_rate():
    torch.manual_seed(0)
    dropped = drop_captions(["a red circle"] * 10_000, 0.1)
    assert set(dropped) == {"", "a red circle"}
    assert abs(dropped.count("") - 1000) < 120  # 4 standard deviations
    assert drop_captions(["a", "b"], 0.0) == ["a", "b"] and drop_captions(["a", "b"], 1.0) == ["", ""]
    with pytest.raises(ValueError, match=r"proportion of empty prompts must be in \[0, 1\], got 1.5"):
        caption_dropout_mask(4, 1.5)


def test_dropped_text_states_are_the_empty_prompts():
    torch.manual_seed(0)
    states, empty = torch.randn(1000, 3, 2), torch.randn(1, 3, 2)
    out = drop_text_states(states, empty, 0.25)
    is_empty = (out == empty).all(dim=(1, 2))
    assert ((out == states).all(dim=(1, 2)) | is_empty).all()
    assert abs(is_empty.float().mean().item() - 0.25) < 0.06


@pytest.fixture
def one_thread():
    """A tiny UNet gains nothing from a second thread, which spins (50x slower) when another process holds a core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_a_few_steps_on_a_fixed_batch_lower_the_loss(one_thread):
    torch.manual_seed(0)
    unet = unet_from_preset("tiny")
    sched = sd_scheduler()
    x0, noise = torch.randn(2, 4, 4, 8, 8).unbind(0)
    t = torch.tensor([50, 300, 600, 900])
    cond = torch.randn(4, 5, 32)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3)

    def model_fn(x_t, t, cond):
        return unet(x_t, t, encoder_hidden_states=cond, return_dict=False)[0]

    losses = []
    for _ in range(8):
        loss = diffusion_loss(model_fn, x0, cond, sched, noise=noise, timesteps=t)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
