"""Optimisers for the LoRA parameters: each comes from the library that maintains it."""

import torch

OPTIMIZERS = ("adamw", "adamw8bit", "prodigy", "adafactor")


def make_optimizer(
    params: list[torch.nn.Parameter],
    name: str,
    lr: float,
    weight_decay: float = 1e-4,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    fused: bool | None = None,
) -> torch.optim.Optimizer:
    """`adamw` (torch, fused on CUDA), `adamw8bit` (bitsandbytes), `prodigy` (prodigyopt; lr ≈ 1.0),
    `adafactor` (transformers, with the given lr rather than its relative-step schedule).
    fused: AdamW's single-kernel step (default: when every parameter is on CUDA; pass False when DeepSpeed
    will move the optimiser state to the CPU)."""
    if name == "adamw":
        if fused is None:  # one kernel for all parameters instead of a loop over them
            fused = all(p.is_cuda for p in params)
        return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=fused or None)
    if name == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as e:
            raise ImportError("--optimizer adamw8bit needs bitsandbytes: pip install bitsandbytes") from e
        return bnb.optim.AdamW8bit(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if name == "prodigy":
        try:
            from prodigyopt import Prodigy
        except ImportError as e:
            raise ImportError("--optimizer prodigy needs prodigyopt: pip install prodigyopt") from e
        return Prodigy(
            params, lr=lr, betas=betas, weight_decay=weight_decay, safeguard_warmup=True, use_bias_correction=True
        )
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(
            params, lr=lr, weight_decay=weight_decay, scale_parameter=False, relative_step=False, warmup_init=False
        )
    raise ValueError(f"unknown --optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
