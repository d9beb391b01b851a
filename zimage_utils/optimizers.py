"""Optimisers for the LoRA parameters: each comes from the library that maintains it."""

import torch

OPTIMIZERS = ("adamw", "adamw8bit", "prodigy", "adafactor")


def _optimizer_class(name: str, params: list[torch.nn.Parameter], fused: bool | None, betas, eps) -> tuple[type, dict]:
    """(class, keyword arguments other than lr and weight_decay) for `name`."""
    if name == "adamw":
        if fused is None:  # one kernel for all parameters instead of a loop over them
            fused = all(p.is_cuda for p in params)
        return torch.optim.AdamW, {"betas": betas, "eps": eps, "fused": fused or None}
    if name == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as e:
            raise ImportError("--optimizer adamw8bit needs bitsandbytes: pip install bitsandbytes") from e
        return bnb.optim.AdamW8bit, {"betas": betas, "eps": eps}
    if name == "prodigy":
        try:
            from prodigyopt import Prodigy
        except ImportError as e:
            raise ImportError("--optimizer prodigy needs prodigyopt: pip install prodigyopt") from e
        return Prodigy, {"betas": betas, "eps": eps, "safeguard_warmup": True, "use_bias_correction": True}
    if name == "adafactor":
        from transformers.optimization import Adafactor

        # the given lr rather than Adafactor's relative-step schedule
        return Adafactor, {"scale_parameter": False, "relative_step": False, "warmup_init": False}
    raise ValueError(f"unknown --optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")


def make_optimizer(
    params: list[torch.nn.Parameter],
    name: str,
    lr: float,
    weight_decay: float = 1e-4,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    fused: bool | None = None,
    loraplus_lr_ratio: float = 0.0,
    model: torch.nn.Module | None = None,
) -> torch.optim.Optimizer:
    """`adamw` (torch, fused on CUDA), `adamw8bit` (bitsandbytes), `prodigy` (prodigyopt; lr ≈ 1.0),
    `adafactor` (transformers, with the given lr rather than its relative-step schedule).
    fused: AdamW's single-kernel step (default: when every parameter is on CUDA; pass False when DeepSpeed
    will move the optimiser state to the CPU).
    loraplus_lr_ratio: LoRA+ (PEFT's `create_loraplus_optimizer`): the LoRA B factors of `model`'s trainable
    parameters (which must be `params`) learn at lr × ratio, the A factors at lr (0 = off)."""
    cls, kwargs = _optimizer_class(name, params, fused, betas, eps)
    if not loraplus_lr_ratio:
        return cls(params, lr=lr, weight_decay=weight_decay, **kwargs)
    from peft.optimizers import create_loraplus_optimizer

    grouped = create_loraplus_optimizer(
        model, cls, lr=lr, loraplus_lr_ratio=loraplus_lr_ratio, loraplus_weight_decay=weight_decay, **kwargs
    )
    if sum(len(g["params"]) for g in grouped.param_groups) != len(params):
        raise ValueError("LoRA+ grouped other parameters than the trainable ones it was given")
    # PEFT keeps a group for embedding LoRAs even when empty; with it, ZeRO-2 and ZeRO-3 runs stop at start-up
    # ("zip() argument 2 is longer than argument 1")
    return cls([g for g in grouped.param_groups if g["params"]], lr=lr, **kwargs)


def optimizer_and_schedule(args, params, model, max_steps: int, num_processes: int, offloaded: bool):
    """The trainer's optimiser (`--optimizer`, `--learning_rate`, `--adam_*`, `--loraplus_lr_ratio`) and diffusers'
    learning-rate schedule (`--lr_*`) over `max_steps` optimiser steps. The schedule counts `num_processes` ticks a
    step, as accelerate's prepared scheduler steps once per process; `offloaded`: DeepSpeed keeps the optimiser on
    the CPU (no fused AdamW)."""
    from diffusers.optimization import get_scheduler

    optimizer = make_optimizer(
        params,
        args.optimizer,
        args.learning_rate,
        args.adam_weight_decay,
        betas=(args.adam_beta1, args.adam_beta2),
        eps=args.adam_epsilon,
        fused=False if offloaded else None,
        loraplus_lr_ratio=args.loraplus_lr_ratio,
        model=model,
    )
    schedule = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * num_processes,
        num_training_steps=max_steps * num_processes,
        num_cycles=args.lr_num_cycles,
        power=args.lr_power,
    )
    return optimizer, schedule
