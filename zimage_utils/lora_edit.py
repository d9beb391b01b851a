"""LoRA arithmetic without a model: a smaller rank for a LoRA, several LoRAs merged into one; and a LoRA extracted
from the weight differences of a fine-tuned model to its base.

A LoRA here is `read_lora`'s state dict (diffusers keys, any alpha folded in, so each module's update at strength 1
is B @ A) taken apart as {module: (B [out, r], A [r, in])}. Nothing else in the stack does these two jobs on a LoRA
file: PEFT's `add_weighted_adapter(combination_type="svd")` needs the 6B base model loaded with both adapters
attached and takes a dense SVD of every [out, in] update (minutes each on a CPU for the 10240-wide FFN), and has no
per-module rank chosen by how much of the update it keeps.

The SVD of B @ A is taken from its factors instead: B = Q_b R_b and Aᵀ = Q_a R_a (QR), so B @ A = Q_b (R_b R_aᵀ) Q_aᵀ,
and the SVD of the small r×r core gives the update's exact singular values and vectors, in O((out + in) r²) —
the whole model's LoRA in seconds on a CPU. Truncating it to k values is the best rank-k approximation of the
update (Eckart-Young): the part lost has Frobenius norm √(Σ dropped σ²)."""

import re
from collections.abc import Iterable

import torch

from .lora import MAGNITUDE

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]  # module → (B [out, r], A [r, in])

_KEY = re.compile(r"transformer\.(.+)\.lora_([AB])\.weight")


def lora_factors(state_dict: dict[str, torch.Tensor], source: str) -> Factors:
    """`read_lora`'s state dict as {module: (B, A)}. `source` (the file) names the LoRA in errors: a LoKr, or a
    key without its partner."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        match = _KEY.fullmatch(key)
        if match is None:
            kind = "a LoKr" if ".lokr_" in key else "a DoRA" if key.endswith(MAGNITUDE) else "not a plain LoRA"
            raise ValueError(f"{source} is {kind} (key {key}): only LoRA files (lora_A / lora_B) can be edited")
        pairs.setdefault(match[1], {})[match[2]] = value
    lone = [module for module, pair in pairs.items() if len(pair) != 2]
    if lone:
        raise ValueError(f"{source}: module {lone[0]} has only one of lora_A / lora_B; the file is damaged")
    return {module: (pair["B"], pair["A"]) for module, pair in sorted(pairs.items())}


def factors_state_dict(factors: Factors) -> dict[str, torch.Tensor]:
    """Back to `read_lora`'s layout (what `lora_io.save_lora_state` writes)."""
    state_dict = {}
    for module, (up, down) in factors.items():
        state_dict[f"transformer.{module}.lora_A.weight"] = down
        state_dict[f"transformer.{module}.lora_B.weight"] = up
    return state_dict


def update_svd(up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The SVD of the update up @ down ([out, r] @ [r, in]) from its factors, in float64: (U [out, r], S [r]
    descending, Vh [r, in]) with U diag(S) Vh = up @ down."""
    q_up, r_up = torch.linalg.qr(up.double())  # [out, r], [r, r]
    q_down, r_down = torch.linalg.qr(down.double().T)  # [in, r], [r, r]
    u, s, vh = torch.linalg.svd(r_up @ r_down.T)
    return q_up @ u, s, vh @ q_down.T


def rank_for(singular_values: torch.Tensor, rank: int | None, keep: float | None) -> int:
    """How many of the (descending) singular values to keep: the fewest whose update keeps the fraction `keep` of
    the update's Frobenius norm, at most `rank` (either may be None). At least 1: a file needs every module."""
    k = len(singular_values)
    if keep is not None:
        energy = singular_values.square().cumsum(0)
        if energy[-1] > 0:  # (an all-zero update, e.g. a LoRA saved before training: one zero rank)
            # (1 - 1e-12: a prefix that keeps the fraction up to rounding counts as keeping it)
            k = int((energy.sqrt() < keep * energy[-1].sqrt() * (1 - 1e-12)).sum()) + 1
    return max(1, min(k, rank if rank is not None else k))


def resize(factors: Factors, rank: int | None = None, keep: float | None = None) -> tuple[Factors, dict]:
    """Each module's update cut to `rank_for` its singular values, B and A sharing √S (as trained factors do, so the
    result also trains on with --init_lora). Returns (factors, {module: (old rank, new rank, fraction of the update's
    Frobenius norm kept)}), in float32."""
    resized, report = {}, {}
    for module, (up, down) in factors.items():
        u, s, vh = update_svd(up, down)
        k = rank_for(s, rank, keep)
        root = s[:k].sqrt()
        resized[module] = ((u[:, :k] * root).float(), (root[:, None] * vh[:k]).float())
        total = s.square().sum()
        kept = float((s[:k].square().sum() / total).sqrt()) if total > 0 else 1.0
        report[module] = (down.shape[0], k, kept)
    return resized, report


def merge(weighted: list[tuple[Factors, float]]) -> Factors:
    """Σ weight · (B @ A) over the LoRAs, exactly: the factors side by side (ranks add up; `resize` then shrinks
    them). A module only some LoRAs adapt gets only theirs. float32."""
    modules = sorted({module for factors, _ in weighted for module in factors})
    merged = {}
    for module in modules:
        parts = [(factors[module], weight) for factors, weight in weighted if module in factors]
        shapes = {(up.shape[0], down.shape[1]) for (up, down), _ in parts}
        if len(shapes) > 1:
            raise ValueError(f"the LoRAs adapt {module} with different shapes {sorted(shapes)}: not the same model")
        merged[module] = (
            torch.cat([up.float() * weight for (up, _), weight in parts], dim=1),
            torch.cat([down.float() for (_, down), _ in parts], dim=0),
        )
    return merged


def extract(
    differences: Iterable[tuple[str, torch.Tensor]], rank: int | None, keep: float | None
) -> tuple[Factors, dict]:
    """Each module's weight difference (tuned − base, [out, in], float32 on the device the SVD should run on) as the
    factors of its `rank_for` largest singular values, B and A sharing √S. With `rank` alone the top values come
    from a randomized SVD (`torch.svd_lowrank`: rank + 10 directions, 4 power iterations, seconds for the whole
    model); `keep` needs the full spectrum, so a full SVD. A module whose difference is zero is left out.

    Returns (factors on the CPU, {module: (rank, fraction of the difference's Frobenius norm the LoRA holds)})."""
    factors, report = {}, {}
    for module, difference in differences:
        total = torch.linalg.vector_norm(difference, dtype=torch.float64)  # (float32 sums: ~0.3% off at 10240x3840)
        if total == 0:
            continue
        q = None if rank is None else min(rank + 10, *difference.shape)
        if keep is None and q < min(difference.shape):
            cuda = [difference.device] if difference.is_cuda else []
            with torch.random.fork_rng(devices=cuda):  # the same LoRA on every run; the caller's RNG left alone
                torch.manual_seed(0)
                u, s, v = torch.svd_lowrank(difference, q=q, niter=4)
            vh = v.T
        else:
            u, s, vh = torch.linalg.svd(difference, full_matrices=False)
        k = rank_for(s, rank, keep)
        root = s[:k].sqrt()
        factors[module] = ((u[:, :k] * root).cpu(), (root[:, None] * vh[:k]).cpu())
        report[module] = (k, float(s[:k].double().square().sum().sqrt() / total))
    return factors, report
