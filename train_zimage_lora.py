"""Flow-matching LoRA training for Z-Image on the cache written by precompute_embeddings.py.

    accelerate launch train_zimage_lora.py --pretrained_model_name_or_path Tongyi-MAI/Z-Image-Turbo \
        --precomputed_dir my_cache --output_dir my_lora --rank 32 --max_train_steps 2000

Writes OUTPUT/pytorch_lora_weights.safetensors (diffusers: `ZImagePipeline.load_lora_weights(OUTPUT)`) and
OUTPUT/pytorch_lora_weights_comfyui.safetensors (ComfyUI / ai-toolkit keys), the same in every checkpoint-N, and
at the end OUTPUT/README.md, a model card for the hub.
"""

import argparse
import contextlib
import gc
import logging
import signal
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from tqdm.auto import tqdm

from zimage_utils import cli
from zimage_utils.base_precision import BASE_PRECISIONS, check_base_precision
from zimage_utils.block_swap import move_except_swapped
from zimage_utils.checkpoints import (
    SaveTriggers,
    batch_layout,
    check_new_run,
    check_same_processes,
    mark_unfinished,
    prune_checkpoints,
    read_training_state,
    register_lora_state_hooks,
    remove_stale_temporaries,
    resolve_resume_path,
    resume_training,
    set_aside_later_checkpoints,
    write_training_state,
)
from zimage_utils.distributed import (
    check_deepspeed_active,
    check_process_group,
    configure_deepspeed,
    deepspeed_stage,
    gathered_lora,
    optimizer_offloaded,
    partition_for_zero3,
    process_group_kwargs,
    skip_frozen_in_ddp,
)
from zimage_utils.ema import LoraEMA, averaged_weights
from zimage_utils.hub import add_hub_flags, prepare_hub_repo, push_to_hub
from zimage_utils.lora import ADAPTERS, count_trainable_parameters, init_lora_from, lora_target_modules
from zimage_utils.lora_io import SAVE_DTYPES, add_metadata_if_saved_at, save_lora
from zimage_utils.memory_budget import (
    budget_overshoot,
    check_memory_options,
    fit_memory_budget,
    out_of_memory_explained,
)
from zimage_utils.model_card import training_metadata, write_model_card
from zimage_utils.model_loading import component_config_hash, longest_caption, require_zimage, transformer_config
from zimage_utils.model_spec import add_metadata_flags
from zimage_utils.optimizers import (
    add_optimizer_flags,
    check_optimizer_flags,
    current_learning_rates,
    evaluation_weights,
    optimizer_and_schedule,
    optimizer_arguments,
)
from zimage_utils.plots import plot_loss_per_sigma
from zimage_utils.run_plan import (
    add_run_lora,
    check_flag_values,
    check_lora_plan,
    dry_run_report,
    is_due,
    noted_settings,
    resume_settings,
    schedule_steps,
    start_line,
)
from zimage_utils.step_options import apply_step_flags, freeze_gc
from zimage_utils.train_data import check_caption_lengths, collate, item_generator_seed, train_loader, training_data
from zimage_utils.train_log import LogWindow, add_tracker_flags, append_jsonl, lowest_held_out_loss, start_trackers
from zimage_utils.training_adapter import training_adapter_removed
from zimage_utils.training_base import load_training_base
from zimage_utils.training_step import StepConfig, add_step_flags, flow_matching_step
from zimage_utils.validation import Validator, add_validation_flags, validation_loss

logger = logging.getLogger("train")
# Flags of diffusers' and kohya's trainers that are precompute_embeddings.py's here: named, not just "unrecognized"
CACHING_FLAGS = ("--caption_prefix", "--resolution", "--validation_prompts", "--validation_prompt", "--instance_prompt",
                 "--train_data_dir", "--caption_extension", "--class_prompt")  # fmt: skip


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("Model and data")
    g.add_argument("--pretrained_model_name_or_path", required=True, help="Z-Image diffusers folder or hub id.")
    g.add_argument("--revision", default=None)
    g.add_argument("--transformer_single_file", default=None, help="A single-file transformer checkpoint to train.")
    g.add_argument(
        "--precomputed_dir",
        required=True,
        nargs="+",
        help="Cache folder(s) written by precompute_embeddings.py. Several mix their items, e.g. one cache per "
        "resolution (512 and 1024) or per concept; each must be made with this model's VAE and text encoder.",
    )
    g.add_argument(
        "--repeats",
        type=int,
        nargs="+",
        default=None,
        help="Times each --precomputed_dir's items are seen per epoch, one count per cache (default 1 each): "
        "balances a small concept against a large one.",
    )
    g.add_argument(
        "--folder_repeats",
        action="store_true",
        help="kohya-style datasets: an image under a top folder named N_name (e.g. '10_sks woman/') is seen N times "
        "per epoch, times its cache's --repeats; one cache can then hold every folder.",
    )
    g.add_argument(
        "--loss_weights",
        type=float,
        nargs="+",
        default=None,
        help="Loss weight of each --precomputed_dir's items (default 1 each), e.g. 1 0.5 for a regularisation set "
        "(kohya's prior_loss_weight).",
    )
    g.add_argument("--output_dir", default="zimage-lora", help="LoRA files, checkpoints, logs and samples.")
    g.add_argument(
        "--dry_run",
        action="store_true",
        help="Check the flags, the caches, --init_lora and --training_adapter against the model, print what the run "
        "would train (items, buckets, LoRA parameters, steps) and stop, without loading the transformer or writing "
        "anything.",
    )
    g.add_argument("--validation_split", type=float, default=0.0, help="Fraction of each cache held out (0 = none).")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--dataloader_num_workers", type=int, default=0)
    g = p.add_argument_group("LoRA")
    g.add_argument("--rank", type=int, default=16, help="LoRA rank.")
    g.add_argument("--lora_alpha", type=float, default=None, help="LoRA alpha (default: = rank, scale 1).")
    g.add_argument("--lora_dropout", type=float, default=0.0, help="PEFT's dropout on each LoRA layer's input.")
    for flag, dropped in (  # kohya's regularisers (lora.add_lora_dropouts), e.g. 0.1
        ("network_dropout", "elements of the LoRA's down projection output (its rank channels, per token)"),
        ("rank_dropout", "whole rank channels of a layer for a sample (all its tokens)"),
        ("module_dropout", "a layer's whole LoRA update for a batch"),
    ):
        g.add_argument(f"--{flag}", type=float, default=0.0, help=f"kohya's: drops {dropped} with this probability.")
    g.add_argument(
        "--lora_targets",
        default="attention",
        help="attention | attention_ffn | all, or a comma-separated list of module names/suffixes.",
    )
    g.add_argument("--lora_exclude_refiners", action="store_true", help="No LoRA in the noise/context refiners.")
    g.add_argument(
        "--adapter",
        default="lora",
        choices=ADAPTERS,
        help="lora; lokr: Kronecker-product factors as LyCORIS/ai-toolkit train them (see --lokr_factor; --rank "
        "of at least half a factor's side keeps that factor a full matrix); dora: a LoRA that also trains each "
        "adapted weight's norm per output row (PEFT's DoRA).",
    )
    g.add_argument("--lokr_factor", type=int, default=4, help="LoKr: w1 is factor x factor (-1 = near-square).")
    g.add_argument(
        "--init_lora",
        default=None,
        help="Start from this LoRA (or LoKr) instead of from zero (a .safetensors file or a folder of ours; "
        "diffusers, ComfyUI/ai-toolkit or kohya keys): a --rank at least its own (LoKr: the same), and --lora_targets "
        "covering its modules.",
    )
    g.add_argument(
        "--training_adapter",
        default=None,
        help="LoRA merged into the base at +scale for training and applied at -scale when sampling "
        "(keeps Z-Image-Turbo's few-step sampling).",
    )
    g.add_argument("--training_adapter_scale", type=float, default=1.0)
    g = p.add_argument_group("Optimisation")
    add_optimizer_flags(g)
    g.add_argument("--train_batch_size", type=int, default=1, help="Per process.")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument(
        "--group_by_caption_length",
        action="store_true",
        help="Batch only equal caption lengths (no attention mask; needs enough same-length items).",
    )
    g.add_argument("--max_train_steps", type=int, default=None, help="Optimiser steps (overrides epochs).")
    g.add_argument("--num_train_epochs", type=int, default=10)
    g.add_argument(
        "--ema_decay",
        type=float,
        default=0.0,
        help="Keep an exponential moving average of the LoRA (e.g. 0.999) for the saved files and samples (0 = off).",
    )
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient clipping (0 = off).")
    g.add_argument(
        "--mixed_precision",
        choices=["no", "fp16", "bf16"],
        default=None,
        help="Default: accelerate config; bf16 recommended on GPU.",
    )
    g = p.add_argument_group("Memory and speed")
    g.add_argument("--gradient_checkpointing", action="store_true", help="Recompute activations of every block.")
    g.add_argument(
        "--gradient_checkpointing_blocks",
        type=int,
        default=0,
        help="Recompute only the first N of the 32 image-token blocks (0 = off): between no and full "
        "checkpointing in memory and speed.",
    )
    g.add_argument(
        "--cpu_offload_checkpointing",
        action="store_true",
        help="Keep checkpointed blocks' inputs in pinned host memory until backward (~0.8 GiB less at 1024² with "
        "every block checkpointed; see docs/BENCHMARKS.md for its cost). Needs checkpointing or --max_memory_gb.",
    )
    g.add_argument(
        "--checkpoint_keep_attention",
        action="store_true",
        help="Checkpointed blocks keep their attention outputs, so backward does not rerun attention (~4%% faster, "
        "+0.75 GiB at 1024² with every block checkpointed). Needs checkpointing or --max_memory_gb.",
    )
    g.add_argument(
        "--blocks_to_swap",
        type=int,
        default=0,
        help="Keep the frozen weights of the first N of the 32 image-token blocks in pinned host memory and copy each "
        "block's to the GPU only while it runs, beside the compute (musubi-tuner's block swap; 0 = off): N × 0.17 GiB "
        "(fp8) or 0.35 GiB (bf16) less on the GPU. Swapped blocks are checkpointed. For CUDA; not nf4 or DeepSpeed.",
    )
    g.add_argument(
        "--max_memory_gb",
        type=float,
        default=None,
        help="GPU memory budget, GiB: on the dataset's largest batch shape, measure and keep the fewest checkpointed "
        "blocks that fit (replaces --gradient_checkpointing*; CUDA, no DeepSpeed).",
    )
    g.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the repeated transformer blocks (regional): faster after a one-off compile.",
    )
    g.add_argument(
        "--activation_memory_budget",
        type=float,
        default=None,
        help="With --compile: fraction (0-1) of activations each compiled block keeps, recomputing the cheapest "
        "rest (H100, 1024²: 0.7 → 23 GiB at 0.27 s/step vs 28 GiB at 0.25 s).",
    )
    g.add_argument(
        "--zero3_max_live_parameters",
        type=float,
        default=2e8,
        help="ZeRO-3: parameters a GPU holds gathered at once (~one transformer block; 0 = DeepSpeed's 1e9).",
    )
    g.add_argument(
        "--base_precision",
        choices=BASE_PRECISIONS,
        default="bf16",
        help="Storage of the frozen base's block Linears: bf16, fp8 (e4m3 weights, bf16 matmuls, any GPU; ~half the "
        "memory), fp8_matmul (fp8 storage and fp8 tensor-core matmuls, GPUs of compute capability 8.9+; with "
        "--compile the fastest setting measured) or nf4 (bitsandbytes, ~quarter; CUDA). The LoRA stays fp32.",
    )
    g = p.add_argument_group("Flow matching and loss")
    add_step_flags(g)  # flow matching: the flags StepConfig reads
    g = p.add_argument_group("Checkpoints, validation, logging")
    g.add_argument("--checkpointing_steps", type=int, default=500, help="Save a checkpoint every N steps (0 = off).")
    g.add_argument(
        "--checkpointing_epochs",
        type=int,
        default=0,
        help="Also save one when every N-th epoch is done, at its last optimiser step (kohya's save_every_n_epochs; "
        "0 = off).",
    )
    g.add_argument(
        "--checkpointing_minutes",
        type=float,
        default=0.0,
        help="Also save one when M minutes passed since the last (notebooks that stop without warning; 0 = off).",
    )
    g.add_argument("--checkpoints_total_limit", type=int, default=None, help="Keep only the newest N checkpoints.")
    g.add_argument("--resume_from_checkpoint", default=None, help='"latest" or a checkpoint-N folder.')
    add_validation_flags(g)  # --validation_steps, --validation_epochs, --validation_at_start, ...
    add_metadata_flags(g)  # --metadata_title, --metadata_author, --metadata_description, --metadata_license
    g.add_argument(
        "--save_dtype",
        choices=sorted(SAVE_DTYPES),
        default="bf16",
        help="dtype of the final LoRA files (checkpoints always keep fp32 for exact resume).",
    )
    add_tracker_flags(g)  # --report_to, --tracker_project_name, --tracker_run_name
    g.add_argument("--logging_steps", type=int, default=10, help="Read the loss back from the device every N steps.")
    g.add_argument("--max_train_steps_this_run", type=int, default=None, help=argparse.SUPPRESS)  # tests: stop early
    add_hub_flags(p.add_argument_group("Hugging Face hub"))  # --push_to_hub, --hub_model_id, --hub_private
    given = sys.argv[1:] if input_args is None else input_args
    if misplaced := [a.split("=")[0] for a in given if a.split("=")[0] in CACHING_FLAGS]:
        p.error(
            f"{misplaced[0]} is set when caching (precompute_embeddings.py: captions, trigger word, resolution and "
            "validation prompts are cached there, as --caption_prefix, --resolution, --validation_prompts): cache "
            "with it, then pass the cache with --precomputed_dir"
        )
    args = cli.parse_with_config(p, input_args)
    check_flag_values(p, args)
    check_optimizer_flags(p, args)
    return args


def save_lora_files(args, accelerator, transformer, lora_config, targets, directory, step, caches, dtype, card=False):
    """Both LoRA formats into `directory` (written by the main process; every rank must call this, since ZeRO-3
    gathers the LoRA from all of them), with the metadata users and tools look for; `card`: and a README.md."""
    metadata = training_metadata(args, targets, step, caches)
    model = accelerator.unwrap_model(transformer)
    with gathered_lora(accelerator, model):
        if accelerator.is_main_process:
            save_lora(directory, model, lora_config, metadata, dtype=dtype)
            prompts = [p.prompt.text for p in caches["validation_prompts"]]
            about = {k: getattr(args, f"metadata_{k}") for k in ("title", "description", "license")}
            if card and not write_model_card(
                directory, metadata, prompts, args.hub_model_id if args.push_to_hub else None, about
            ):
                logger.info(f"{directory}/README.md is not a model card of ours: left as it is (no card written)")


def main(args: argparse.Namespace) -> None:
    """Train, then give the caller back its SIGTERM/SIGINT handlers (tests and notebooks call this in-process; a
    stale handler would swallow their Ctrl-C)."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        with contextlib.ExitStack() as held:  # (the output folder's lock, once taken)
            run_training(args, held)
    finally:
        gc.unfreeze()  # what freeze_gc exempted is the caller's to collect again
        for s, handler in handlers.items():
            signal.signal(s, handler)


def run_training(args: argparse.Namespace, held: contextlib.ExitStack) -> None:
    cli.setup_logging("train")
    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        kwargs_handlers=process_group_kwargs(),
    )
    check_deepspeed_active(accelerator)
    print0 = logger.info if accelerator.is_main_process else (lambda *a, **k: None)
    check_process_group(accelerator)
    check_base_precision(args.base_precision, accelerator.device, deepspeed_stage(accelerator), args.training_adapter)
    check_memory_options(args, accelerator)
    cli.check_output_dir(output_dir)
    check_new_run(output_dir, args.resume_from_checkpoint)
    resume = resolve_resume_path(output_dir, args.resume_from_checkpoint)
    if resume is not None:  # (the LoRA's fit: check_lora_plan)
        check_same_processes(accelerator, resume, read_training_state(resume))
    if args.ema_decay and deepspeed_stage(accelerator) == 3:
        raise ValueError("--ema_decay does not work under ZeRO-3 (each rank holds a shard): use ZeRO-2 or DDP")
    if args.adapter == "dora" and deepspeed_stage(accelerator) == 3:
        raise ValueError("--adapter dora reads whole base weights, which ZeRO-3 keeps in shards: use ZeRO-2 or DDP")
    set_seed(args.seed)

    # Data and adapters first: what does not fit the model is refused before its 12 GB load
    require_zimage(args.pretrained_model_name_or_path, revision=args.revision)
    base_config = transformer_config(args.pretrained_model_name_or_path, revision=args.revision)
    expected = {
        "component_config_hash": component_config_hash(args.pretrained_model_name_or_path, revision=args.revision),
        "embed_dim": base_config["cap_feat_dim"],
        "latent_channels": base_config["in_channels"],
    }
    train, val_data, sampler, caches = training_data(args, accelerator, expected)
    limit = longest_caption(base_config)
    check_caption_lengths([train, val_data], caches["validation_prompts"], limit, args.pretrained_model_name_or_path)
    plan = check_lora_plan(args, base_config)  # --init_lora and --training_adapter too
    if args.push_to_hub and accelerator.is_main_process:  # logged in and online, before hours of training
        print0(prepare_hub_repo(args, output_dir))
    if args.dry_run:
        print0(dry_run_report(args, accelerator, plan, train, sampler, caches))
        return
    output_dir.mkdir(parents=True, exist_ok=True)
    if accelerator.is_main_process:  # one run at a time in a folder (two deleted each other's checkpoints)
        held.enter_context(cli.folder_lock(output_dir, "train_zimage_lora.py"))
        remove_stale_temporaries(output_dir)  # (what a killed run was writing)
    if accelerator.is_main_process:  # `--config OUTPUT/run_config.yaml` repeats this run (or resumes it)
        if aside := set_aside_later_checkpoints(output_dir, resume):
            print0(f"note: the checkpoints after {resume.name}, of the run this one goes back on, moved to {aside}")
        cli.write_config(output_dir / "run_config.yaml", args, leave_out=("max_train_steps_this_run",))
        start_trackers(accelerator, args, output_dir)  # (before the model loads: a tracker that cannot start says so)

    # The frozen base (never the text encoder): its precision, a training adapter merged, blocks swapped, on its devices
    transformer, adapter_state = load_training_base(args, accelerator, print0, plan.adapter_state)
    empty_embeds = caches["empty_embeds"]
    if empty_embeds is not None:  # moved once, not copied to the device for every dropped caption
        empty_embeds = empty_embeds.to(accelerator.device)
    loader = train_loader(train, sampler, args, accelerator.device)

    # LoRA: fp32 parameters over the frozen base
    targets = lora_target_modules(transformer, args.lora_targets, args.lora_exclude_refiners)
    lora_config = add_run_lora(transformer, args)
    if args.init_lora:
        fresh = init_lora_from(transformer, args.init_lora, lora_config, targets)
        print0(f"LoRA starts from {args.init_lora} ({len(fresh)} targeted modules it lacks start from zero)")
    move_except_swapped(transformer, accelerator.device)  # the LoRA of swapped blocks was made beside their weights
    apply_step_flags(args, transformer)  # checkpointing and compiling
    params = [p for p in transformer.parameters() if p.requires_grad]

    # Optimiser and schedule
    _, max_steps = schedule_steps(args, sampler)
    zero_stage = deepspeed_stage(accelerator)
    optimizer, lr_scheduler = optimizer_and_schedule(
        args, params, transformer, max_steps, accelerator.num_processes, zero_stage, optimizer_offloaded(accelerator)
    )
    configure_deepspeed(accelerator, args.train_batch_size, int(args.zero3_max_live_parameters))
    partition_for_zero3(accelerator, transformer)
    skip_frozen_in_ddp(transformer)
    # accelerate would move the swapped weights to the GPU; DeepSpeed (which swapping refuses) takes no placement
    placement = {"device_placement": [False, True, True]} if args.blocks_to_swap else {}
    transformer, optimizer, lr_scheduler = accelerator.prepare(transformer, optimizer, lr_scheduler, **placement)
    register_lora_state_hooks(accelerator, type(accelerator.unwrap_model(transformer)))
    trainable = [(n, p) for n, p in accelerator.unwrap_model(transformer).named_parameters() if p.requires_grad]
    ema = LoraEMA(trainable, args.ema_decay) if args.ema_decay else None

    # Resume: LoRA, optimiser, scheduler and RNG from accelerate; the loop position from training_state.json
    global_step, epoch, start_batch = resume_training(
        accelerator,
        output_dir,
        args.resume_from_checkpoint,
        len(train),
        ema,
        print0,
        resume_settings(args),
        batch_size=args.train_batch_size,
        lr_scheduler=lr_scheduler,
        noted=noted_settings(args),
        optimizer_args=tuple(optimizer_arguments(args.optimizer_args)),
    )

    config = StepConfig.from_flags(args)
    if args.max_memory_gb:
        fit_memory_budget(args, accelerator, transformer, train, config, params, print0)
    trainable = count_trainable_parameters(transformer)
    print0(start_line(args, accelerator, train, sampler, caches, trainable, len(targets), global_step))

    # Preemption: SIGTERM/SIGINT finish the current step, save a checkpoint and exit
    triggers = SaveTriggers(accelerator, args.checkpointing_minutes, global_step)

    def save_checkpoint(step, next_epoch, next_batch):
        path = output_dir / f"checkpoint-{step}"
        if accelerator.is_main_process:
            mark_unfinished(path)
        accelerator.save_state(str(path), **({"exclude_frozen_parameters": True} if zero_stage else {}))
        if ema is not None and accelerator.is_main_process:
            ema.save(path)
        with averaged_weights(ema), evaluation_weights(optimizer):  # (the state above keeps the training weights)
            save_lora_files(args, accelerator, transformer, lora_config, targets, path, step, caches, torch.float32)
        if accelerator.is_main_process:
            write_training_state(
                path,
                {
                    "global_step": step,
                    "epoch": next_epoch,
                    "next_batch": next_batch,
                    "items": len(train),
                }
                | noted_settings(args)
                | batch_layout(accelerator, args.train_batch_size)
                | resume_settings(args),
            )
            prune_checkpoints(output_dir, args.checkpoints_total_limit)  # (only now: a kill above keeps the last)
        accelerator.wait_for_everyone()
        triggers.saved(step)
        return path

    validator = Validator.for_run(args, caches, empty_embeds, output_dir / "samples")

    backward = None if zero_stage else accelerator.backward  # the step's own backward passes; DeepSpeed takes one
    zero3 = zero_stage == 3
    if zero3 and adapter_state is not None:
        print0("note: under ZeRO-3 validation samples keep the training adapter merged (it is not removed)")

    def thumbnail_saved_loras(step):  # the LoRA files saved at `step`, before its samples: the first one as thumbnail
        add_metadata_if_saved_at([output_dir, output_dir / f"checkpoint-{step}"], step, validator.thumbnail(step))

    def validate(step):
        transformer.eval()
        with averaged_weights(ema), evaluation_weights(optimizer):
            logs = validation_loss(transformer, val_data, collate, args.seed) if val_data is not None else {}
            # Under ZeRO-3 every forward is collective, so every rank samples (the main one saves); otherwise only
            # the main process does.
            if accelerator.is_main_process or zero3:
                adapter = None if zero3 else adapter_state
                model = accelerator.unwrap_model(transformer)
                with training_adapter_removed(
                    model, adapter, args.training_adapter_scale, device=accelerator.device
                ) as model:
                    path = validator.sample_grid(
                        model, step, accelerator.device, accelerator.is_main_process, accelerator.trackers
                    )
                if path:
                    print0(f"validation samples: {path} (prompts x steps)")
                    thumbnail_saved_loras(step)
        transformer.train()
        if logs:
            accelerator.log(logs, step=step)
        if accelerator.is_main_process:
            if logs:  # a line of its own: "val/..." keys, no "loss"
                append_jsonl(output_dir / "train_log.jsonl", {"step": step, **logs})
            plot_loss_per_sigma(output_dir / "train_log.jsonl", output_dir / "loss_per_sigma.png")

    # Train
    transformer.train()
    optimizer.train()  # (schedule-free AdamW's mode; nothing for other optimisers)
    window, first_step = LogWindow(accelerator.device, global_step), global_step
    warned_over_budget = False
    stop_at = min(max_steps, global_step + (args.max_train_steps_this_run or max_steps))
    progress = tqdm(total=max_steps, initial=global_step, desc="train", disable=not accelerator.is_local_main_process)
    empty = empty_embeds if args.caption_dropout > 0 or args.blank_preservation_weight > 0 else None
    if args.validation_at_start and global_step == 0:
        with window.paused():
            validate(0)
    epochs_done = epoch  # epochs completed by the last optimiser step (--checkpointing_epochs, --validation_epochs)
    validate_now = False  # whether the last step validated
    while global_step < stop_at:
        sampler.set_epoch(epoch, start_batch)
        for batch_index, batch in enumerate(loader, start=start_batch):
            seeds = [item_generator_seed(args.seed, epoch, int(i)) for i in batch["indices"]]
            oom_explained = out_of_memory_explained(args, global_step + 1, batch, zero_stage)
            with accelerator.accumulate(transformer), oom_explained:
                out = flow_matching_step(transformer, batch, config, seeds, empty, backward=backward)
                if backward is None:
                    accelerator.backward(out["loss"])
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(params, args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            window.add(out, global_step + 1)
            if not accelerator.sync_gradients:
                continue
            global_step += 1
            if global_step == first_step + 1:
                freeze_gc()  # after compiling: no full collection scans the model and its graphs mid-run
            if ema is not None:
                ema.step()
            progress.update(1)
            stop, due = triggers.poll(global_step)
            log_now = global_step % args.logging_steps == 0 or global_step == stop_at or stop
            next_position = (epoch, batch_index + 1) if batch_index + 1 < len(sampler) else (epoch + 1, 0)
            epochs_before, epochs_done = epochs_done, next_position[0]
            checkpoint_now = due or is_due(
                global_step, args.checkpointing_steps, epochs_before, epochs_done, args.checkpointing_epochs
            )
            validate_now = is_due(
                global_step, args.validation_steps, epochs_before, epochs_done, args.validation_epochs
            )
            if log_now or checkpoint_now:
                lrs = current_learning_rates(optimizer, lr_scheduler)  # LoRA+: the A factors' group, then the B's
                logs = {"lr": lrs[0], **({"lr_lora_B": lrs[-1]} if args.loraplus_lr_ratio else {})}
                logs.update(window.read(accelerator, global_step, output_dir))
                if args.max_memory_gb and not warned_over_budget:  # once; the peak is the same on every process
                    peak = logs.get("peak_reserved_gib")
                    note = budget_overshoot(peak, args.max_memory_gb, global_step, validator.raised_peak_gib)
                    if note and accelerator.is_main_process:
                        logger.warning(note)
                    warned_over_budget = note is not None
                accelerator.log(logs, step=global_step)
                if accelerator.is_main_process:
                    append_jsonl(output_dir / "train_log.jsonl", {"step": global_step, **logs})
                progress.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs['lr']:.2e}")
            if checkpoint_now or stop:
                with window.paused():
                    path = save_checkpoint(global_step, *next_position)
                print0(f"saved {path}")
            if validate_now and not stop:
                with window.paused():
                    validate(global_step)
                stop = triggers.stop_now()  # a signal while sampling: save and stop at once, not a step later
                if stop and not checkpoint_now:
                    with window.paused():
                        path = save_checkpoint(global_step, *next_position)
                    print0(f"saved {path}")
            if stop:
                print0(f"stopped by signal at step {global_step}; resume with --resume_from_checkpoint latest")
                accelerator.end_training()
                return
            if global_step >= stop_at:
                break
        else:
            epoch, start_batch = epoch + 1, 0
            continue
        epoch, start_batch = next_position
    progress.close()

    # Save the final LoRA (and a last validation) when the run is complete
    if global_step >= max_steps:
        dtype = SAVE_DTYPES[args.save_dtype]
        with averaged_weights(ema), evaluation_weights(optimizer):
            save_lora_files(
                args, accelerator, transformer, lora_config, targets, output_dir, global_step, caches, dtype, True
            )
        if not validate_now:  # (unless the last step just validated, before these files were written)
            validate(global_step)
        elif accelerator.is_main_process:
            thumbnail_saved_loras(global_step)
        print0(
            f"LoRA written to {output_dir}/pytorch_lora_weights.safetensors (+ _comfyui, and README.md, its model card)"
        )
        if accelerator.is_main_process and (line := lowest_held_out_loss(output_dir)):
            print0(line)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if args.push_to_hub and accelerator.is_main_process and global_step >= max_steps:
        print0(f"uploaded to {push_to_hub(args.hub_model_id, output_dir, global_step)}")


if __name__ == "__main__":
    cli.run(main, parse_args)
