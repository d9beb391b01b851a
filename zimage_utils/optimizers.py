"""Optimisers for the LoRA parameters: each comes from the library that maintains it."""

import contextlib

import torch

OPTIMIZERS = ("adamw", "adamw8bit", "prodigy", "adafactor", "adamw_schedulefree")
POLYNOMIAL_END = 1e-7  # the rate diffusers' polynomial schedule ends at (get_scheduler's lr_end default)
SCHEDULE_FREE = "adamw_schedulefree"


def _optimizer_class(
    name: str, params: list[torch.nn.Parameter], fused: bool | None, betas, eps, warmup_steps: int = 0
) -> tuple[type, dict]:
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
    if name == SCHEDULE_FREE:
        try:
            from schedulefree import AdamWScheduleFree
        except ImportError as e:
            raise ImportError(f"--optimizer {SCHEDULE_FREE} needs schedulefree: pip install schedulefree") from e
        return AdamWScheduleFree, {"betas": betas, "eps": eps, "warmup_steps": warmup_steps}
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
    warmup_steps: int = 0,
) -> torch.optim.Optimizer:
    """`adamw` (torch, fused on CUDA), `adamw8bit` (bitsandbytes), `prodigy` (prodigyopt; lr ≈ 1.0),
    `adafactor` (transformers, with the given lr rather than its relative-step schedule), `adamw_schedulefree`
    (Meta's schedulefree: no schedule; `warmup_steps` are its own; see `evaluation_weights`).
    fused: AdamW's single-kernel step (default: when every parameter is on CUDA; pass False when DeepSpeed
    will move the optimiser state to the CPU).
    loraplus_lr_ratio: LoRA+ (PEFT's `create_loraplus_optimizer`): the LoRA B factors of `model`'s trainable
    parameters (which must be `params`) learn at lr × ratio, the A factors at lr (0 = off)."""
    cls, kwargs = _optimizer_class(name, params, fused, betas, eps, warmup_steps)
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


def add_optimizer_flags(group) -> None:
    """The trainer's optimiser and learning-rate schedule flags, on `group` (an argument group)."""
    group.add_argument(
        "--optimizer",
        choices=OPTIMIZERS,
        default="adamw",
        help="adamw_schedulefree: no learning-rate schedule (it warms up over --lr_warmup_steps itself); samples and "
        "saved LoRAs are its averaged weights. DDP or one GPU, not DeepSpeed; no --ema_decay (it averages already).",
    )
    group.add_argument("--learning_rate", type=float, default=1e-4)
    group.add_argument("--adam_weight_decay", type=float, default=1e-4)
    group.add_argument("--adam_beta1", type=float, default=0.9, help="adamw, adamw8bit, prodigy, adamw_schedulefree.")
    group.add_argument(
        "--adam_beta2", type=float, default=0.999, help="adamw, adamw8bit, prodigy, adamw_schedulefree."
    )
    group.add_argument(
        "--adam_epsilon", type=float, default=1e-8, help="adamw, adamw8bit, prodigy, adamw_schedulefree."
    )
    group.add_argument(
        "--loraplus_lr_ratio",
        type=float,
        default=0.0,
        help="LoRA+: the B factors learn this many times faster than --learning_rate (kohya's loraplus_lr_ratio; "
        "the paper suggests 16 with a 2x lower --learning_rate; 0 = off). --adapter lora only.",
    )
    group.add_argument(
        "--lr_scheduler",
        default="constant",
        choices=["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"],
        help="diffusers' schedules; the decaying ones reach 0 at the last step (polynomial: 1e-7).",
    )
    group.add_argument(
        "--lr_warmup_steps",
        type=int,
        default=0,
        help="Steps of linear warmup from 0. With the constant schedule this means constant_with_warmup (diffusers' "
        "constant has no warmup); adamw_schedulefree warms up itself.",
    )
    group.add_argument("--lr_num_cycles", type=int, default=1, help="Hard restarts of cosine_with_restarts.")
    group.add_argument("--lr_power", type=float, default=1.0, help="Power of the polynomial decay (1 = linear).")


def check_optimizer_flags(parser, args) -> None:
    """`parser.error` for optimiser flags that do not go together; --lr_warmup_steps with the constant schedule
    becomes constant_with_warmup (diffusers' constant has no warmup)."""
    if args.loraplus_lr_ratio and (args.adapter != "lora" or args.loraplus_lr_ratio < 1):
        parser.error("--loraplus_lr_ratio is for --adapter lora, and at least 1 (B learns ratio times faster than A)")
    if args.loraplus_lr_ratio and args.optimizer == "prodigy":
        parser.error("--optimizer prodigy takes one learning rate for all parameters: drop --loraplus_lr_ratio")
    if args.learning_rate < 0 or (args.learning_rate == 0 and args.optimizer == "prodigy"):
        # (0 has a use: --init_lora and one step re-save a LoRA unchanged; Prodigy refuses it)
        parser.error(f"--learning_rate {args.learning_rate}: give a positive rate (Prodigy: 1.0)")
    if args.lr_scheduler == "polynomial" and (args.learning_rate <= POLYNOMIAL_END or args.lr_power < 0):
        parser.error(
            f"--lr_scheduler polynomial decays from --learning_rate to {POLYNOMIAL_END:g} with --lr_power >= 0: "
            f"give a rate above {POLYNOMIAL_END:g} (--learning_rate {args.learning_rate:g}, --lr_power {args.lr_power:g})"
        )
    schedules = ("constant", "constant_with_warmup")
    if args.optimizer == SCHEDULE_FREE and (args.lr_scheduler not in schedules or args.ema_decay):
        parser.error(
            f"--optimizer {SCHEDULE_FREE} takes no --lr_scheduler (it warms up over --lr_warmup_steps itself) and "
            "no --ema_decay (its weights are an average already)"
        )
    if args.lr_scheduler == "constant" and args.lr_warmup_steps > 0:
        args.lr_scheduler = "constant_with_warmup"


def optimizer_and_schedule(args, params, model, max_steps: int, num_processes: int, deepspeed: int, offloaded: bool):
    """The trainer's optimiser (`--optimizer`, `--learning_rate`, `--adam_*`, `--loraplus_lr_ratio`) and diffusers'
    learning-rate schedule (`--lr_*`) over `max_steps` optimiser steps. The schedule counts `num_processes` ticks a
    step, as accelerate's prepared scheduler steps once per process; `deepspeed`: the ZeRO stage (0: none);
    `offloaded`: DeepSpeed keeps the optimiser on the CPU (no fused AdamW). Schedule-free AdamW gets a constant
    schedule and does --lr_warmup_steps itself."""
    from diffusers.optimization import get_scheduler

    schedule_free = args.optimizer == SCHEDULE_FREE
    if schedule_free and deepspeed:
        # its averaged weights are made from the optimiser's parameters, which under ZeRO are DeepSpeed's own
        # copies, not the model's: the LoRA saved and sampled would not be them
        raise ValueError(f"--optimizer {SCHEDULE_FREE} does not work under DeepSpeed: use DDP, or another optimiser")
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
        warmup_steps=args.lr_warmup_steps if schedule_free else 0,
    )
    schedule = get_scheduler(
        "constant" if schedule_free else args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * num_processes,
        num_training_steps=max_steps * num_processes,
        num_cycles=args.lr_num_cycles,
        power=args.lr_power,
    )
    return optimizer, schedule


@contextlib.contextmanager
def evaluation_weights(optimizer):
    """Inside the block, a schedule-free optimiser's parameters hold what it evaluates (its average x, not the point
    y where it takes gradients): what validation samples and LoRA files are made from, as schedulefree asks. After
    it, y exactly as it was (a copy, not schedulefree's `train()`, whose interpolation back is not exact in floating
    point): a run's steps do not depend on when it validates or saves, and a checkpoint's state, saved in train mode,
    resumes bit for bit. Other optimisers have no such modes: nothing happens."""
    if "train_mode" not in optimizer.param_groups[0]:
        yield
        return
    params = [p for group in optimizer.param_groups for p in group["params"]]
    training = [p.detach().clone() for p in params]
    optimizer.eval()
    try:
        yield
    finally:
        optimizer.train()
        with torch.no_grad():
            for param, value in zip(params, training, strict=True):
                param.copy_(value)


def current_learning_rates(optimizer, schedule) -> list[float]:
    """Each parameter group's learning rate at the last step: the schedule's, or a schedule-free optimiser's own
    (its warmup is inside it)."""
    groups = optimizer.param_groups
    return [g["scheduled_lr"] for g in groups] if "scheduled_lr" in groups[0] else schedule.get_last_lr()
