"""The flow-matching conventions: what the transformer sees, what it must predict, and how t is drawn."""

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from zimage_utils.flow_matching import (
    TIMESTEP_SAMPLING_METHODS,
    SigmaBinMeter,
    flow_matching_loss,
    interpolate,
    loss_weighting,
    sample_timesteps,
    sigma_bin_index,
    velocity_target,
)


@pytest.fixture
def latents():
    g = torch.Generator().manual_seed(0)
    x1 = torch.randn(4, 16, 1, 8, 8, generator=g)  # clean latents [B, C, F, H, W]
    x0 = torch.randn(4, 16, 1, 8, 8, generator=g)  # noise
    return x1, x0


def test_interpolation_endpoints(latents):
    x1, x0 = latents
    assert torch.equal(interpolate(x1, x0, torch.ones(4)), x1)  # t = 1 is clean data
    assert torch.equal(interpolate(x1, x0, torch.zeros(4)), x0)  # t = 0 is pure noise


def test_t_broadcasts_per_sample_over_4d_and_5d(latents):
    x1, x0 = latents
    t = torch.tensor([0.0, 0.25, 0.5, 1.0])
    x_t = interpolate(x1[:, :, 0], x0[:, :, 0], t)  # [B, C, H, W]
    for b in range(4):
        torch.testing.assert_close(x_t[b], t[b] * x1[b, :, 0] + (1 - t[b]) * x0[b, :, 0])
    assert interpolate(x1, x0, t).shape == x1.shape


def test_one_euler_step_along_the_target_lands_on_the_data(latents):
    x1, x0 = latents
    t = torch.tensor([0.1, 0.4, 0.7, 0.95])
    x_t = interpolate(x1, x0, t)
    # The target is dx_t/dt, so moving from t to 1 (a step of 1 - t) along it reaches x1.
    landed = x_t + (1 - t).view(-1, 1, 1, 1, 1) * velocity_target(x1, x0)
    torch.testing.assert_close(landed, x1)


def test_sign_matches_the_pipeline_scheduler_step(latents):
    """Our target, negated as ZImagePipeline negates the transformer output, is what the scheduler expects."""
    x1, x0 = latents
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)  # as the released config
    scheduler.set_timesteps(sigmas=[0.6], device="cpu")  # one step: sigma (shifted by the scheduler) -> 0
    timestep = scheduler.timesteps[0]
    # The pipeline feeds the transformer (1000 - timestep) / 1000; that must be our t = 1 - sigma.
    t = ((1000 - timestep) / 1000).expand(4)
    torch.testing.assert_close(t, (1 - scheduler.sigmas[0]).expand(4))
    x_t = interpolate(x1, x0, t)
    model_output = -velocity_target(x1, x0)  # `noise_pred = -noise_pred` in ZImagePipeline.__call__
    denoised = scheduler.step(model_output, timestep, x_t, return_dict=False)[0]
    torch.testing.assert_close(denoised, x1, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", TIMESTEP_SAMPLING_METHODS)
def test_samplers_stay_strictly_inside_the_unit_interval(method):
    t = sample_timesteps(20_000, method, generator=torch.Generator().manual_seed(0), image_seq_len=4096)
    assert t.shape == (20_000,) and t.dtype == torch.float32
    assert (t > 0).all() and (t < 1).all()


def test_extreme_logit_normal_is_clamped():
    t = sample_timesteps(1000, "logit_normal", logit_mean=0.0, logit_std=50.0, generator=torch.Generator())
    assert (t > 0).all() and (t < 1).all()


def _mean_sigma(method: str, **kwargs) -> float:
    t = sample_timesteps(50_000, method, generator=torch.Generator().manual_seed(0), **kwargs)
    return (1 - t).mean().item()


def test_shift_greater_than_one_trains_at_higher_noise():
    assert _mean_sigma("uniform") == pytest.approx(0.5, abs=0.01)
    assert _mean_sigma("shift", shift=3.0) > _mean_sigma("shift", shift=1.0) + 0.1
    assert _mean_sigma("shift", shift=1.0) == pytest.approx(_mean_sigma("uniform"), abs=1e-6)


def test_flux_shift_trains_larger_images_at_higher_noise():
    small = _mean_sigma("flux_shift", image_seq_len=256)  # 256² pixels
    large = _mean_sigma("flux_shift", image_seq_len=4096)  # 1024² pixels
    assert large > small > 0.5
    with pytest.raises(ValueError, match="image_seq_len"):
        sample_timesteps(4, "flux_shift")


def test_logit_normal_median_is_sigmoid_of_mean():
    t = sample_timesteps(50_000, "logit_normal", logit_mean=0.8, generator=torch.Generator().manual_seed(0))
    assert (1 - t).median().item() == pytest.approx(1 / (1 + math.exp(-0.8)), abs=0.01)


@pytest.mark.parametrize("method", TIMESTEP_SAMPLING_METHODS)
def test_a_sigma_range_keeps_every_draw_inside_it_and_the_methods_shape(method):
    """(0.6, 0.8): each sigma is the full-range draw mapped linearly into the range, from the same random numbers."""
    draw = dict(generator=torch.Generator().manual_seed(0), image_seq_len=4096)
    full = 1 - sample_timesteps(20_000, method, **draw)
    draw["generator"].manual_seed(0)
    ranged = 1 - sample_timesteps(20_000, method, sigma_range=(0.6, 0.8), **draw)
    assert ranged.min() >= 0.6 and ranged.max() <= 0.8
    torch.testing.assert_close(ranged, 0.6 + 0.2 * full, rtol=0, atol=1e-5)


def test_generator_makes_sampling_reproducible():
    a = sample_timesteps(8, "logit_normal", generator=torch.Generator().manual_seed(42))
    b = sample_timesteps(8, "logit_normal", generator=torch.Generator().manual_seed(42))
    c = sample_timesteps(8, "logit_normal", generator=torch.Generator().manual_seed(43))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_unknown_names_are_rejected():
    with pytest.raises(ValueError, match="uniform"):
        sample_timesteps(4, "cosine")
    with pytest.raises(ValueError, match="cosmap"):
        loss_weighting(torch.rand(4), "snr")


def test_loss_weighting_schemes():
    sigma = torch.tensor([0.1, 0.5, 0.9])
    torch.testing.assert_close(loss_weighting(sigma, "none"), torch.ones(3))
    torch.testing.assert_close(loss_weighting(sigma, "sigma_sqrt"), sigma**-2)
    torch.testing.assert_close(loss_weighting(sigma, "cosmap"), 2 / (math.pi * (1 - 2 * sigma + 2 * sigma**2)))


def test_loss_is_fp32_mse_even_from_bf16_inputs(latents):
    x1, x0 = latents
    pred = (x1 - x0 + 0.1 * torch.randn_like(x1)).bfloat16()
    target = velocity_target(x1, x0).bfloat16()
    loss, per_sample = flow_matching_loss(pred, target)
    assert loss.dtype == torch.float32 and per_sample.shape == (4,)
    expected = (pred.float() - target.float()).pow(2).mean()
    torch.testing.assert_close(loss, expected)


def test_weights_scale_the_loss_not_the_logged_per_sample_values(latents):
    x1, x0 = latents
    pred = torch.zeros_like(x1)
    target = velocity_target(x1, x0)
    loss, per_sample = flow_matching_loss(pred, target)
    weighted, per_sample_w = flow_matching_loss(pred, target, weights=torch.tensor([2.0, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(per_sample_w, per_sample)
    torch.testing.assert_close(weighted, 2 * per_sample[0] / 4)
    assert not per_sample.requires_grad


def test_sigma_bins_and_meter():
    sigma = torch.tensor([0.0, 0.19, 0.2, 0.55, 0.999, 1.0])
    assert sigma_bin_index(sigma, 5).tolist() == [0, 0, 1, 2, 4, 4]
    meter = SigmaBinMeter(num_bins=5)
    meter.update(sigma, torch.tensor([1.0, 3.0, 5.0, 7.0, 9.0, 11.0]))
    meter.update(torch.tensor([0.5]), torch.tensor([1.0]))
    assert meter.compute() == {
        "loss/sigma_0.0-0.2": 2.0,
        "loss/sigma_0.2-0.4": 5.0,
        "loss/sigma_0.4-0.6": 4.0,
        "loss/sigma_0.8-1.0": 10.0,
    }
    meter.reset()
    assert meter.compute() == {}
    assert list(SigmaBinMeter(num_bins=4).compute()) == []
    meter4 = SigmaBinMeter(num_bins=4)
    meter4.update(torch.tensor([0.3]), torch.tensor([1.0]))
    assert list(meter4.compute()) == ["loss/sigma_0.25-0.50"]


def huber_of(error: float) -> float:
    return float(flow_matching_loss(torch.tensor([[error]]), torch.zeros(1, 1), loss_type="huber")[1])


def test_huber_and_l1_losses_are_kohyas_elementwise_and_masked_the_same_way():
    """--loss_type huber: 2c·(sqrt(err² + c²) − c), about err² for |err| ≪ c and 2c·|err| far out; l1: |err|."""
    pred, target = torch.tensor([[0.001, 10.0, -10.0, 0.0]]), torch.zeros(1, 4)
    _, huber = flow_matching_loss(pred, target, loss_type="huber", huber_c=0.1)
    torch.testing.assert_close(huber, (2 * 0.1 * (torch.sqrt(pred**2 + 0.01) - 0.1)).mean().reshape(1))
    assert huber_of(0.001) == pytest.approx(0.001**2, rel=1e-3) and huber_of(10.0) == pytest.approx(2, rel=0.01)
    assert float(flow_matching_loss(pred, target, loss_type="l1")[1]) == pytest.approx(20.001 / 4)
    mask = torch.tensor([[[1.0, 0.0, 0.0, 1.0]]])  # [B, 1, W]: weighs elements as it does the squared error
    l1 = flow_matching_loss(pred[:, None], target[:, None], mask=mask, loss_type="l1")[1]
    assert float(l1) == pytest.approx(0.001 / 2)
