"""What a run will do, from its flags, its caches and the model's config alone: its steps, the LoRA it trains (with
`--init_lora` and the training adapter checked on a weightless model, before the real one loads), and the line it
starts with, which is all `--dry_run` prints."""

import argparse
import math
import os
import re
import warnings
from typing import NamedTuple

import torch

from . import cli
from .checkpoints import SUPERSEDED_DIR, check_resume_fits, later_checkpoints, read_training_state, resolve_resume_path
from .ema import require_ema_state
from .lora import add_lora, add_lora_dropouts, count_trainable_parameters, init_lora_from, lora_target_modules
from .lora_io import DIFFUSERS_PREFIX, read_lora
from .train_data import BucketBatchSampler


def add_run_lora(model: torch.nn.Module, args: argparse.Namespace):
    """The LoRA (or LoKr) the flags ask for, added to `model` with its dropouts; returns its PEFT config."""
    config = add_lora(
        model,
        args.rank,
        args.lora_alpha or args.rank,
        args.lora_dropout,
        args.lora_targets,
        args.lora_exclude_refiners,
        adapter=args.adapter,
        lokr_factor=args.lokr_factor,
    )
    add_lora_dropouts(model, args.network_dropout, args.rank_dropout, args.module_dropout)
    return config


def check_flag_values(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """`p.error` (naming the flag and what to give) for the trainer's flags out of range or not going together, as
    they are read; the optimiser's are `optimizers.check_optimizer_flags`."""
    if len({os.path.realpath(d) for d in args.precomputed_dir}) < len(args.precomputed_dir):
        p.error("--precomputed_dir names one cache twice: give it once, with --repeats to see it more often")
    if args.repeats and (len(args.repeats) != len(args.precomputed_dir) or min(args.repeats) < 1):
        p.error(f"--repeats takes one count of at least 1 per --precomputed_dir ({len(args.precomputed_dir)} given)")
    if args.loss_weights and (len(args.loss_weights) != len(args.precomputed_dir) or min(args.loss_weights) < 0):
        p.error(
            f"--loss_weights takes one weight of at least 0 per --precomputed_dir ({len(args.precomputed_dir)} given)"
        )
    if not 0 <= args.mask_floor <= 1 or args.preservation_weight < 0 or args.blank_preservation_weight < 0:
        p.error(
            "--mask_floor is a loss weight between 0 and 1, --preservation_weight and --blank_preservation_weight "
            "ones of at least 0"
        )
    if not 0 <= args.sigma_range[0] < args.sigma_range[1] <= 1:
        p.error("--sigma_range takes LO HI with 0 <= LO < HI <= 1")
    dropouts = ("lora_dropout", "network_dropout", "rank_dropout", "module_dropout")
    if args.adapter == "lokr" and (args.base_precision == "nf4" or any(getattr(args, d) for d in dropouts)):
        p.error("--adapter lokr works with a bf16 or fp8 base (not nf4) and without --lora_dropout and the like")
    cli.require_within(p, args, **dict.fromkeys(dropouts, (0, 0.99)))
    if args.adapter == "dora" and args.base_precision not in ("bf16", "nf4"):
        p.error("--adapter dora takes the norms of the base's weights, which fp8 keeps scaled: use a bf16 or nf4 base")
    if args.adapter == "dora" and (args.training_adapter or args.blocks_to_swap):
        p.error(
            "--adapter dora works without --training_adapter (a DoRA's norms are of the weights it trained on, so "
            "removing the adapter to sample would change them) and without --blocks_to_swap (not tried together)"
        )
    cli.require_at_least(p, args, rank=1, train_batch_size=1, gradient_accumulation_steps=1, max_train_steps=1,
                         num_train_epochs=1, checkpointing_steps=0, checkpointing_epochs=0, validation_steps=0,
                         validation_epochs=0, blocks_to_swap=0, lr_warmup_steps=0, logging_steps=1,
                         validation_num_inference_steps=1, checkpoints_total_limit=1, dataloader_num_workers=0,
                         lr_num_cycles=1, mask_prior_weight=0)  # fmt: skip
    for flag in ("lora_alpha", "timestep_shift", "huber_c"):
        if (value := getattr(args, flag)) is not None and value <= 0:
            p.error(f"--{flag} {value}: give a positive value")
    cli.require_within(p, args, caption_dropout=(0, 1), random_flip=(0, 1), ema_decay=(0, 0.999999),
                       validation_split=(0, 0.99), activation_memory_budget=(0, 1))  # fmt: skip
    if args.activation_memory_budget is not None and not args.compile:
        p.error("--activation_memory_budget applies to compiled blocks: add --compile")
    if args.lokr_factor == 0 or args.lokr_factor < -1:
        p.error(f"--lokr_factor {args.lokr_factor}: give w1's side (1 or more), or -1 for near-square factors")


def schedule_steps(args, sampler) -> tuple[float, int]:
    """Optimiser steps per epoch (a fraction with gradient accumulation, which runs on across an epoch's end), and
    in the whole run: --max_train_steps, or the fewest that cover --num_train_epochs."""
    steps_per_epoch = len(sampler) / args.gradient_accumulation_steps
    return steps_per_epoch, args.max_train_steps or math.ceil(args.num_train_epochs * steps_per_epoch)


def is_due(step: int, every_steps: int, epochs_before: int, epochs_done: int, every_epochs: int) -> bool:
    """Whether optimiser step `step` is one to save or validate at: every `every_steps`-th step, or the step that
    completed every `every_epochs`-th epoch (`epochs_before` epochs were complete before it, `epochs_done` after: with
    gradient accumulation an epoch can end inside a step, which then counts). 0 turns either off."""
    by_steps = every_steps > 0 and step % every_steps == 0
    return by_steps or (every_epochs > 0 and epochs_done // every_epochs > epochs_before // every_epochs)


def start_line(args, accelerator, train, sampler, caches, trainable: int, modules: int, global_step: int) -> str:
    """What the run trains on and for how long, with `run_notes`' warnings: the line a run (or a dry run) starts with."""
    steps_per_epoch, max_steps = schedule_steps(args, sampler)
    return (
        f"{len(train)} training items from {len(args.precomputed_dir)} cache(s) in {len(sampler.groups)} buckets; "
        f"{trainable:,} trainable LoRA parameters ({modules} modules); "
        f"effective batch {args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps}; "
        f"{max_steps} steps ({steps_per_epoch:.4g}/epoch); {accelerator.num_processes} process(es) on {accelerator.device}"
        + run_notes(args, caches, sampler, global_step, max_steps, accelerator.mixed_precision)
    )


class LoraPlan(NamedTuple):
    trainable: int  # LoRA parameters
    modules: int  # modules the LoRA targets
    base_gib: float  # the transformer's weights in bf16
    adapter_state: dict[str, torch.Tensor] | None  # the training adapter, read


def check_lora_plan(args: argparse.Namespace, base_config: dict) -> LoraPlan:
    """The run's adapters, checked on a weightless (meta) transformer before the real one loads: the LoRA the flags
    ask for, the checkpoint it resumes from and `--init_lora` against it (their kind, modules and rank), and the training
    adapter, read and checked to adapt only modules this model has. Draws nothing from the global random generator
    (the meta model's initialisation would, and so change the LoRA the run then initialises)."""
    from diffusers import ZImageTransformer2DModel

    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        model = ZImageTransformer2DModel.from_config(base_config).requires_grad_(False)
        base_gib = sum(p.numel() for p in model.parameters()) * 2 / 2**30
        targets = lora_target_modules(model, args.lora_targets, args.lora_exclude_refiners)
        config = add_run_lora(model, args)
    if resume := resolve_resume_path(args.output_dir, args.resume_from_checkpoint):
        check_resume_fits(resume, model, resume_settings(args))
        if args.ema_decay:
            require_ema_state(resume)
    if args.init_lora:
        with warnings.catch_warnings():  # its values are copied into meta tensors: nothing, as meant
            warnings.filterwarnings("ignore", message=".*non-meta parameter in the checkpoint to a meta parameter")
            init_lora_from(model, args.init_lora, config, targets)
    adapter_state = read_lora(args.training_adapter) if args.training_adapter else None
    names = {re.split(r"\.(?:lora_[AB]|lokr_)", key.removeprefix(DIFFUSERS_PREFIX))[0] for key in adapter_state or {}}
    present = {name for name, _ in model.named_modules()}
    if missing := sorted(names - present):
        raise ValueError(
            f"--training_adapter {args.training_adapter} adapts {missing[0]}, which "
            f"{args.pretrained_model_name_or_path}'s transformer lacks: is it made for another Z-Image model?"
        )
    return LoraPlan(count_trainable_parameters(model), len(targets), base_gib, adapter_state)


def resume_settings(args: argparse.Namespace) -> dict:
    """The flags a checkpoint's optimiser state and LoRA scale depend on (written into its training_state.json): a
    resume with others is refused."""
    return {
        "optimizer": args.optimizer,
        "loraplus_lr_ratio": args.loraplus_lr_ratio,
        "lora_alpha": args.lora_alpha or args.rank,  # (the checkpoint's LoRA is unscaled: another alpha rescales it)
    }


def noted_settings(args: argparse.Namespace) -> dict:
    """The flags a checkpoint may be resumed with others of, said when it is (written into its
    training_state.json; `checkpoints.NOTED_CHANGES`)."""
    return {
        "seed": args.seed,
        "training_adapter": args.training_adapter or "",
        "training_adapter_scale": args.training_adapter_scale if args.training_adapter else None,
    }


def dry_run_report(args, accelerator, plan: LoraPlan, train, sampler, caches) -> str:
    """`--dry_run`: the start line of the run these flags would make (`plan` counted its LoRA), and the checkpoint it
    would resume from."""
    checkpoint = resolve_resume_path(args.output_dir, args.resume_from_checkpoint)
    global_step = read_training_state(checkpoint)["global_step"] if checkpoint else 0
    resumes = f"it would resume from {checkpoint} (step {global_step}); " if checkpoint else ""
    if later := later_checkpoints(args.output_dir, checkpoint):
        resumes += f"it would move the {len(later)} checkpoint(s) after it to {SUPERSEDED_DIR}/; "
    line = start_line(args, accelerator, train, sampler, caches, plan.trainable, plan.modules, global_step)
    return (
        f"{line}\ndry run: the caches fit {args.pretrained_model_name_or_path} (its transformer: {plan.base_gib:.1f} "
        f"GiB in bf16); {resumes}nothing was loaded or written. Drop --dry_run to train."
    )


def run_notes(
    args, caches: dict, sampler: BucketBatchSampler, global_step: int, max_steps: int, precision: str = "bf16"
) -> str:
    """What the trainer's start-up line adds about the data and the flags ("; ..." each): loss masks, items no
    batch takes, validation without prompts, a long run that saves no checkpoint, a warmup as long as the run, a
    resumed run that is already done, fp16 (`precision`: accelerate's mixed precision)."""
    notes = f"; {caches['num_masked']} items with a loss mask" if caches["num_masked"] else ""
    if unused := [f"--{flag}" for flag in ("mask_floor", "mask_prior_weight") if getattr(args, flag)]:
        if not caches["num_masked"]:
            does = "does" if len(unused) == 1 else "do"
            notes = f"; no loss masks in the cache(s), so {' and '.join(unused)} {does} nothing"
    if never := sum(len(g) for g in sampler.groups if len(g) < sampler.global_batch):
        notes += (
            f"; {never} items never train: their buckets hold fewer than a global batch (lower --train_batch_size)"
        )
    if (args.validation_steps or args.validation_epochs) and not caches["validation_prompts"]:
        notes += "; no --validation_prompts in the cache(s): validation gives the held-out loss only, no samples"
    no_checkpoints = not (args.checkpointing_steps or args.checkpointing_epochs or args.checkpointing_minutes)
    if no_checkpoints and max_steps - global_step > 500:
        notes += (
            f"; no checkpoint will be saved before step {max_steps}: a run stopped before then starts over "
            "(--checkpointing_steps or --checkpointing_minutes)"
        )
    if precision == "fp16":
        notes += (
            "; fp16 is untested with Z-Image: no run of this repository trains in it, and whether the model's "
            "activations stay within fp16's range is unknown (bf16 on cards that have it: Ampere and newer)"
        )
    if args.lr_warmup_steps >= max_steps:
        notes += (
            f"; --lr_warmup_steps {args.lr_warmup_steps} is not shorter than the run's {max_steps} steps: the learning "
            "rate never reaches --learning_rate"
        )
    if global_step >= max_steps:
        notes += f"; the checkpoint is at step {global_step}: nothing left to train (raise --max_train_steps)"
    return notes
