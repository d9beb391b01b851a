"""Optimisers for the LoRA parameters: each comes from the library that maintains it."""

import argparse
import ast
import contextlib
import importlib
import inspect
import re

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
    if IMPORT_PATH.fullmatch(name):
        return optimizer_by_path(name), {}  # (its own defaults: --optimizer_args gives the rest)
    raise ValueError(f"unknown --optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")


IMPORT_PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")  # "came_pytorch.CAME", "torch.optim.RAdam"


def optimizer_name(value: str) -> str:
    """--optimizer: one of `OPTIMIZERS`, or an optimiser class by its import path."""
    if value in OPTIMIZERS or IMPORT_PATH.fullmatch(value):
        return value
    raise argparse.ArgumentTypeError(
        f"{value!r}: choose one of {', '.join(OPTIMIZERS)}, or give a torch optimiser class by its import path "
        "(e.g. torch.optim.RAdam, came_pytorch.CAME)"
    )


def optimizer_by_path(path: str) -> type:
    """The torch optimiser class at `path` ("package.module.Class"), imported; ImportError/ValueError naming the fix."""
    module_name, _, class_name = path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ImportError(f"--optimizer {path}: cannot import {module_name} ({error}); install the package") from None
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise ValueError(f"--optimizer {path}: {module_name} has no torch optimiser class {class_name}")
    return cls


def optimizer_arguments(pairs: list[str] | None) -> dict:
    """--optimizer_args KEY=VALUE ... as keyword arguments: each value a Python literal (0.01, True, (0.9, 0.99))
    or else a string. ValueError naming a pair without "="."""
    arguments = {}
    for pair in pairs or []:
        key, equals, value = pair.partition("=")
        if not equals or not key.strip().isidentifier():
            raise ValueError(f"--optimizer_args {pair!r}: write KEY=VALUE (e.g. weight_decay=0.01 betas=(0.9,0.99))")
        try:
            arguments[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            arguments[key.strip()] = value.strip()
    return arguments


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
    extra: dict | None = None,
) -> torch.optim.Optimizer:
    """`adamw` (torch, fused on CUDA), `adamw8bit` (bitsandbytes), `prodigy` (prodigyopt; lr ≈ 1.0),
    `adafactor` (transformers, with the given lr rather than its relative-step schedule), `adamw_schedulefree`
    (Meta's schedulefree: no schedule; `warmup_steps` are its own; see `evaluation_weights`).
    fused: AdamW's single-kernel step (default: when every parameter is on CUDA; pass False when DeepSpeed
    will move the optimiser state to the CPU).
    loraplus_lr_ratio: LoRA+ (PEFT's `create_loraplus_optimizer`): the LoRA B factors of `model`'s trainable
    parameters (which must be `params`) learn at lr × ratio, the A factors at lr (0 = off).
    `name` may also be an optimiser class's import path (`optimizer_by_path`), given lr, weight_decay (where it
    takes one) and `extra` alone. extra: keyword arguments over those above (--optimizer_args)."""
    cls, kwargs = _optimizer_class(name, params, fused, betas, eps, warmup_steps)
    kwargs |= extra or {}
    if "weight_decay" not in kwargs and takes_argument(cls, "weight_decay"):
        kwargs["weight_decay"] = weight_decay
    try:
        if not loraplus_lr_ratio:
            return cls(params, lr=lr, **kwargs)
        from peft.optimizers import create_loraplus_optimizer

        decay = kwargs.pop("weight_decay", 0.0)
        grouped = create_loraplus_optimizer(
            model, cls, lr=lr, loraplus_lr_ratio=loraplus_lr_ratio, loraplus_weight_decay=decay, **kwargs
        )
    except TypeError as error:  # an argument the class does not take, e.g. from --optimizer_args
        raise ValueError(f"--optimizer {name}: {error}; see its documentation for --optimizer_args") from None
    if sum(len(g["params"]) for g in grouped.param_groups) != len(params):
        raise ValueError("LoRA+ grouped other parameters than the trainable ones it was given")
    # PEFT keeps a group for embedding LoRAs even when empty; with it, ZeRO-2 and ZeRO-3 runs stop at start-up
    # ("zip() argument 2 is longer than argument 1")
    return cls([g for g in grouped.param_groups if g["params"]], lr=lr, **kwargs)


def takes_argument(cls: type, name: str) -> bool:
    """Whether `cls(...)` accepts the keyword `name` (or any keyword)."""
    parameters = inspect.signature(cls).parameters
    return name in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())


def add_optimizer_flags(group) -> None:
    """The trainer's optimiser and learning-rate schedule flags, on `group` (an argument group)."""
    group.add_argument(
        "--optimizer",
        type=optimizer_name,
        default="adamw",
        help=f"{', '.join(OPTIMIZERS)}, or any torch optimiser class by its import path (torch.optim.RAdam, "
        "came_pytorch.CAME, schedulefree.RAdamScheduleFree: installed by you; given --learning_rate, "
        "--adam_weight_decay and --optimizer_args only). adamw_schedulefree: no learning-rate schedule (it warms up "
        "over --lr_warmup_steps itself); samples and saved LoRAs are its averaged weights. DDP or one GPU, not "
        "DeepSpeed; no --ema_decay (it averages already).",
    )
    group.add_argument(
        "--optimizer_args",
        nargs="+",
        default=None,
        metavar="KEY=VALUE",
        help="More keyword arguments for the optimiser, over this trainer's (kohya's optimizer_args): "
        "d_coef=0.5, betas=(0.9,0.99), decouple=True.",
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
    becomes constant_with_warmup (diffusers' constant has no warmup). An optimiser class given by its import path is
    imported here, so that a missing package is named before anything loads."""
    try:
        optimizer_arguments(args.optimizer_args)
        if args.optimizer not in OPTIMIZERS:
            optimizer_by_path(args.optimizer)
    except (ImportError, ValueError) as error:
        parser.error(str(error))
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
        extra=optimizer_arguments(args.optimizer_args),
    )
    if "train_mode" in optimizer.param_groups[0]:  # schedulefree's: this or a class given by its path
        check_schedule_free(args, deepspeed)
        schedule_free = True
    schedule = get_scheduler(
        "constant" if schedule_free else args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * num_processes,
        num_training_steps=max_steps * num_processes,
        num_cycles=args.lr_num_cycles,
        power=args.lr_power,
    )
    return optimizer, schedule


def check_schedule_free(args, deepspeed: int) -> None:
    """A schedule-free optimiser given by its import path: refused where --optimizer adamw_schedulefree is (its
    averaged weights are made from the optimiser's parameters, which under ZeRO are DeepSpeed's own copies, not the
    model's: the LoRA saved and sampled would not be them), and with --lr_warmup_steps (it warms up by its own
    warmup_steps, --optimizer_args)."""
    if deepspeed:
        raise ValueError(f"--optimizer {args.optimizer} (schedule-free) does not work under DeepSpeed: use DDP")
    if args.optimizer == SCHEDULE_FREE:
        return
    if args.lr_scheduler not in ("constant", "constant_with_warmup") or args.ema_decay or args.lr_warmup_steps:
        raise ValueError(
            f"--optimizer {args.optimizer} is schedule-free: it takes no --lr_scheduler, no --ema_decay (its weights "
            "are an average already) and no --lr_warmup_steps (give its own: --optimizer_args warmup_steps=N)"
        )


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
