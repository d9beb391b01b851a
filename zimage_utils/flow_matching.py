"""Z-Image's flow-matching objective, written once (pure torch: no I/O, no accelerate).

Conventions (checked against diffusers' `ZImagePipeline` and `FlowMatchEulerDiscreteScheduler`):

    x1 = clean latents, x0 ~ N(0, I) noise, both [B, C, (F,) H, W]
    t ∈ [0, 1] is the transformer's time: 1 = clean data, 0 = pure noise
    sigma = 1 - t is the scheduler's noise level

    x_t    = t * x1 + (1 - t) * x0          (interpolate)
    target = dx_t/dt = x1 - x0              (velocity_target; points from noise to data)
    loss   = w(sigma) * || transformer(x_t, t) - target ||^2    (MSE in fp32)

The raw transformer output approximates `x1 - x0`; the pipeline negates it before `scheduler.step`, whose Euler
update `x + (sigma_next - sigma) * v` expects `v = x0 - x1` (sigma decreases towards the data).

Like minRF, the loss can be logged per sigma bin (`SigmaBinMeter`): low-sigma bins are nearly clean and learn
detail, high-sigma bins learn composition, so one average hides which part a run is (not) learning.
"""

import math

import torch
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

TIMESTEP_SAMPLING_METHODS = ("uniform", "logit_normal", "shift", "flux_shift")
LOSS_WEIGHTING_SCHEMES = ("none", "sigma_sqrt", "cosmap")

# Sampled sigmas are clamped to [_SIGMA_EPS, 1 - _SIGMA_EPS]: sigma = 0 would train on clean latents (a zero-
# information step) and make `sigma_sqrt` weights infinite; the sigmoid of a large logit rounds to exactly 1 in
# fp32. 1e-5 is far above fp32 resolution near 1 (6e-8), so t = 1 - sigma stays < 1 too.
_SIGMA_EPS = 1e-5


def _broadcast_time(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape t [B] to [B, 1, ..., 1] so it broadcasts over x [B, C, (F,) H, W]."""
    return t.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)


def interpolate(x1: torch.Tensor, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The noisy input the transformer sees: x_t = t·x1 + (1 − t)·x0.

    Args:
        x1: clean latents [B, C, (F,) H, W].
        x0: noise, same shape as x1.
        t: transformer time [B] in [0, 1] (1 = clean).

    Returns:
        x_t, same shape and dtype as x1.
    """
    t = _broadcast_time(t, x1)
    return t * x1 + (1 - t) * x0


def velocity_target(x1: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """The regression target of the raw transformer output: x1 − x0 (data minus noise), shape of x1."""
    return x1 - x0


def flux_shift_mu(image_seq_len: int) -> float:
    """The resolution-dependent shift mu the Z-Image pipeline computes at inference (Flux's). Its scheduler applies mu
    only with `use_dynamic_shifting`, which the released configs leave off: they sample at the fixed shift 3.

    Args:
        image_seq_len: number of image tokens, (H_latent // 2) * (W_latent // 2) = (H_px // 16) * (W_px // 16).
    """
    # Imported here, not at module top: the pipeline module pulls in transformers, which a pure helper should not.
    from diffusers.pipelines.z_image.pipeline_z_image import calculate_shift

    # Same constants the pipeline reads from the released scheduler config (256, 4096, 0.5, 1.15).
    return calculate_shift(image_seq_len, 256, 4096, 0.5, 1.15)


def sample_timesteps(
    batch_size: int,
    method: str = "uniform",
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    shift: float = 3.0,
    image_seq_len: int | None = None,
    sigma_range: tuple[float, float] = (0.0, 1.0),
) -> torch.Tensor:
    """Draw one transformer time per sample.

    The noise level sigma is sampled first (that is where the literature defines these densities), then
    t = 1 − sigma is returned.

    - `uniform`: sigma ~ U(0, 1).
    - `logit_normal`: sigma = sigmoid(N(logit_mean, logit_std)) (SD3); the median sigma is sigmoid(logit_mean).
    - `shift`: sigma ~ U(0, 1) then sigma' = s·sigma / (1 + (s − 1)·sigma), as `FlowMatchEulerDiscreteScheduler`
      with `shift=s` (s > 1 spends more steps at high noise).
    - `flux_shift`: sigma ~ U(0, 1) then the scheduler's exponential time shift
      sigma' = e^mu / (e^mu + (1/sigma − 1)), mu = calculate_shift(image_seq_len) as the pipeline computes it:
      larger images are trained at higher noise (Flux's convention; Z-Image samples at a fixed shift).

    Args:
        batch_size: B.
        method: one of `TIMESTEP_SAMPLING_METHODS`.
        generator: makes the draw reproducible; must live on `device`.
        device: where the result lives (default: CPU, or the generator's device).
        logit_mean, logit_std: parameters of `logit_normal`.
        shift: s of `shift`.
        image_seq_len: image tokens per sample, required by `flux_shift` (see `flux_shift_mu`).
        sigma_range: (lo, hi): the drawn sigma is mapped linearly from [0, 1] into [lo, hi], keeping the method's
            shape within it (musubi-tuner's min/max timestep): e.g. (0, 0.4) trains only the detail-forming noise
            levels.

    Returns:
        t [B] float32, strictly inside (0, 1).
    """
    if method not in TIMESTEP_SAMPLING_METHODS:
        raise ValueError(f"unknown timestep sampling method {method!r}; choose one of {TIMESTEP_SAMPLING_METHODS}")
    if device is None:
        device = generator.device if generator is not None else "cpu"
    # diffusers' SD3 helper already takes a generator and a device, so uniform and logit-normal come from it.
    density = "logit_normal" if method == "logit_normal" else "uniform"
    sigma = compute_density_for_timestep_sampling(
        density, batch_size, logit_mean=logit_mean, logit_std=logit_std, device=device, generator=generator
    ).float()
    if method == "shift":
        sigma = shift * sigma / (1 + (shift - 1) * sigma)
    elif method == "flux_shift":
        if image_seq_len is None:
            raise ValueError("method='flux_shift' needs image_seq_len (image tokens = (H_px // 16) * (W_px // 16))")
        exp_mu = math.exp(flux_shift_mu(image_seq_len))
        sigma = sigma.clamp(_SIGMA_EPS, 1 - _SIGMA_EPS)  # 1/sigma below must stay finite
        sigma = exp_mu / (exp_mu + (1 / sigma - 1))
    lo, hi = sigma_range
    if (lo, hi) != (0.0, 1.0):
        sigma = lo + (hi - lo) * sigma
    sigma = sigma.clamp(_SIGMA_EPS, 1 - _SIGMA_EPS)
    return 1 - sigma


def loss_weighting(sigma: torch.Tensor, scheme: str = "none") -> torch.Tensor:
    """Per-sample loss weights [B] (float32) for noise levels sigma [B], via diffusers' SD3 helper.

    `none` → 1; `sigma_sqrt` → sigma^−2; `cosmap` → 2 / (π·(1 − 2σ + 2σ²)).
    """
    if scheme not in LOSS_WEIGHTING_SCHEMES:
        raise ValueError(f"unknown loss weighting {scheme!r}; choose one of {LOSS_WEIGHTING_SCHEMES}")
    return compute_loss_weighting_for_sd3(scheme, sigmas=sigma.float()).float()


LOSS_TYPES = ("mse", "huber", "l1")


def flow_matching_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    weights: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    loss_type: str = "mse",
    huber_c: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean-squared error between the transformer output and the velocity target, computed in float32 (or, by
    `loss_type`, each element's pseudo-Huber loss 2c·(sqrt(err² + c²) − c) with c = `huber_c`, as kohya's "huber":
    err² near 0, 2c·|err| far out; or its absolute error, "l1").

    Args:
        pred: raw transformer output [B, C, (F,) H, W], any dtype (bf16 under mixed precision).
        target: `velocity_target(x1, x0)`, same shape.
        weights: optional per-sample weights [B] (see `loss_weighting`).
        mask: optional loss mask [B, 1, (F,) H, W], each latent pixel's weight in [0, 1]: a sample's loss is then
            its weighted mean, e.g. sum(mask · err²) / (C · sum(mask)), so a masked image weighs as much as a whole
            one. A sample whose mask is all zero contributes 0.

    Returns:
        (loss, per_sample): loss is the scalar mean over the batch of weights·MSE, the one to backpropagate;
        per_sample [B] is the unweighted, detached MSE of each sample, for logging per sigma bin (comparable
        across weighting schemes).
    """
    # bf16 has 8 bits of mantissa: squaring and summing thousands of latent values in it loses the loss signal.
    error = pred.float() - target.float()
    if loss_type == "huber":
        elementwise = 2 * huber_c * (torch.sqrt(error.pow(2) + huber_c**2) - huber_c)
    elif loss_type == "l1":
        elementwise = error.abs()
    else:
        elementwise = error.pow(2)
    if mask is None:
        per_sample = elementwise.flatten(1).mean(dim=1)  # [B]
    else:
        mask = mask.float()
        weight = (mask.flatten(1).sum(1) * elementwise.shape[1]).clamp_min(1e-8)  # C · sum(mask)
        per_sample = (elementwise * mask).flatten(1).sum(1) / weight
    weighted = per_sample if weights is None else per_sample * weights.float()
    return weighted.mean(), per_sample.detach()


def sigma_bin_index(sigma: torch.Tensor, num_bins: int) -> torch.Tensor:
    """Bin b of [b/num_bins, (b+1)/num_bins) holding each sigma [B] → LongTensor [B] in [0, num_bins)."""
    return (sigma.float() * num_bins).floor().long().clamp(0, num_bins - 1)


class SigmaBinMeter:
    """Accumulates the loss per sigma bin on the loss's device, without a host sync per step.

    `sums` and `counts` ([num_bins] float32) are plain tensors: under data parallelism, reduce them across
    processes (e.g. `accelerator.reduce(meter.sums, "sum")`) before `compute()`.
    """

    def __init__(self, num_bins: int = 5, device: torch.device | str | None = None):
        self.num_bins = num_bins
        self.sums = torch.zeros(num_bins, device=device)
        self.counts = torch.zeros(num_bins, device=device)

    def update(self, sigma: torch.Tensor, per_sample_loss: torch.Tensor) -> None:
        """Add per-sample losses [B] at noise levels sigma [B]."""
        index = sigma_bin_index(sigma, self.num_bins).to(self.sums.device)
        values = per_sample_loss.detach().float().to(self.sums.device)
        self.sums.index_add_(0, index, values)
        self.counts.index_add_(0, index, torch.ones_like(values))

    def compute(self) -> dict[str, float]:
        """Mean loss of each non-empty bin, e.g. {"loss/sigma_0.0-0.2": 0.31, ...} (one host sync)."""
        decimals = 1 if 10 % self.num_bins == 0 else 2
        sums, counts = self.sums.tolist(), self.counts.tolist()
        return {
            f"loss/sigma_{b / self.num_bins:.{decimals}f}-{(b + 1) / self.num_bins:.{decimals}f}": sums[b] / counts[b]
            for b in range(self.num_bins)
            if counts[b] > 0
        }

    def reset(self) -> None:
        """Start a new logging window."""
        self.sums.zero_()
        self.counts.zero_()
