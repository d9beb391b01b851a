"""`--max_memory_gb`: the fastest gradient-checkpointing setting whose *measured* peak fits a memory budget.

Fewer recomputed blocks = faster steps and more memory. Each block left un-checkpointed keeps its activations, about
the same amount per main block, so the peak is close to linear in the number of un-checkpointed blocks. The chooser
measures the two cheap ends it can always afford (all blocks checkpointed; a few blocks not), predicts the fewest
checkpointed blocks that fit, then measures that setting and steps back until a measurement fits. Nothing is
guessed from model sizes: every accepted setting was run once on the worst-case batch shape of the dataset.
"""

import gc
import math
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from .block_swap import block_weight_gib
from .cli import OutOfGPUMemory
from .distributed import deepspeed_stage
from .step_options import checkpointable_blocks, set_gradient_checkpointing, swapped_blocks
from .training_step import flow_matching_step

SAFETY = 0.97  # aim below the budget: later batches allocate in a different order and fragment differently
# With --cpu_offload_checkpointing, each block input's GPU memory is freed only once its copy to the host is done, so
# how much the allocator holds depends on timing: at 1024² one run reserved 0.48 GiB more than its measured step and
# optimiser state, where runs without offload stayed within 0.08 (docs/BENCHMARKS.md, session 12). Kept free: this
# many block inputs.
OFFLOAD_SLACK_BLOCK_INPUTS = 16
REMEDIES = (
    "lower --train_batch_size or the cache's resolution, use --base_precision fp8/nf4, or DeepSpeed ZeRO-3 with CPU "
    "offload (accelerate_configs/deepspeed_zero3_offload.yaml)"
)


class MemoryBudgetError(ValueError):
    """The budget is below what the step needs even with every block checkpointed, by `shortfall_gib` (inf: the
    step ran out of memory)."""

    def __init__(self, message: str, shortfall_gib: float = math.inf):
        super().__init__(message)
        self.shortfall_gib = shortfall_gib


@dataclass
class Calibration:
    budget_gib: float
    total_blocks: int
    reserve_gib: float = 0.0  # of the budget, kept for what calibration cannot run (the optimiser's state)
    reserve_for: str = "optimiser state"
    checkpointed: int = -1  # the chosen number of recomputed blocks
    measured: dict[int, float] = field(default_factory=dict)  # checkpointed blocks → peak GiB (inf: out of memory)
    swapped: int = 0  # of the checkpointed blocks, the first ones whose weights wait in host memory (--blocks_to_swap)

    def summary(self) -> str:
        tried = ", ".join(
            f"{k}: {'OOM' if math.isinf(v) else f'{v:.2f} GiB'}" for k, v in sorted(self.measured.items())
        )
        return (
            f"--max_memory_gb {self.budget_gib:g}: checkpointing {self.checkpointed} of {self.total_blocks} blocks"
            + (f" ({self.swapped} swapped)" if self.swapped else "")
            + ", "
            f"measured peak {self.measured[self.checkpointed]:.2f} GiB + {self.reserve_gib:.2f} GiB {self.reserve_for} "
            f"(checkpointed blocks → peak: {tried})"
        )


def choose_checkpointing(
    measure: Callable[[int], float],
    total_blocks: int,
    budget_gib: float,
    reserve_gib: float = 0.0,
    probe: int = 4,
    max_tries: int = 6,
    reserve_for: str = "optimiser state",
    remedies: str = REMEDIES,
    min_blocks: int = 0,
) -> Calibration:
    """The fewest checkpointed blocks, at least `min_blocks`, whose measured peak is ≤ `budget_gib` − `reserve_gib`.

    Args:
        measure: runs one forward + backward with k blocks checkpointed and returns its peak GiB (inf when it ran
            out of memory); k counts from the first block (`step_options.set_gradient_checkpointing`).
        total_blocks: blocks that can be checkpointed.
        budget_gib: the limit, GiB.
        reserve_gib: memory the measured step does not show but training will use (the optimiser's state), and what
            it is for (`reserve_for`, in messages).
        probe: blocks left un-checkpointed for the second measurement (the per-block slope).
        remedies: what to do when even full checkpointing does not fit, for the error.
        min_blocks: blocks that are always checkpointed (the swapped ones).
    """
    cal = Calibration(budget_gib, total_blocks, reserve_gib, reserve_for, swapped=min_blocks)
    limit = budget_gib - reserve_gib

    def run(k: int) -> float:
        if k not in cal.measured:
            cal.measured[k] = measure(k)
        return cal.measured[k]

    floor = run(total_blocks)
    if floor > limit:
        raise MemoryBudgetError(
            f"even with all {total_blocks} blocks checkpointed one step needs "
            f"{'more than the card has' if math.isinf(floor) else f'{floor:.1f} GiB'} (+ {reserve_gib:.2f} GiB "
            f"{reserve_for}), above --max_memory_gb {budget_gib:g}: {remedies}",
            floor - limit,
        )
    probe = min(probe, total_blocks - min_blocks)
    probed = run(total_blocks - probe) if probe > 0 else floor
    per_block = (probed - floor) / probe if probe > 0 else 0.0
    if not 0 < per_block < math.inf:
        # The probe ran out of memory (or showed no slope): bisect between a setting that fits and one that doesn't
        fit, fail = (total_blocks, total_blocks - probe) if probed > limit else (total_blocks - probe, min_blocks - 1)
        for _ in range(max_tries):
            if fit - fail <= 1:
                break
            mid = (fit + fail) // 2
            fit, fail = (mid, fail) if run(mid) <= limit else (fit, mid)
    else:
        k = max(min_blocks, total_blocks - math.floor((limit * SAFETY - floor) / per_block))
        for _ in range(max_tries):
            peak = run(k)
            if peak <= limit:
                break
            k = min(total_blocks, k + math.ceil((peak - limit) / per_block) + 1)
        # Room left under the limit at the best fitting setting: try keeping that many more blocks (measured)
        best = min(kk for kk, v in cal.measured.items() if v <= limit)
        if (spare := math.floor((limit - cal.measured[best]) / per_block)) > 0 and best > min_blocks:
            run(max(min_blocks, best - spare))
    # The best measured setting that fits (a fitting measurement with fewer checkpointed blocks may already exist)
    cal.checkpointed = min(kk for kk, v in cal.measured.items() if v <= limit)
    return cal


def calibrate_checkpointing(
    accelerator,
    model,
    batch: dict,
    loss_fn: Callable,
    budget_gib: float,
    reserve_gib: float,
    offload: bool = False,
    keep_attention: bool = False,
    **choose_kwargs,
) -> Calibration:
    """Choose and set the checkpointed blocks of the (prepared) `model` for `budget_gib`: each setting runs
    `loss_fn(model, batch)` forward + backward once (a loss_fn returning a detached loss has run its backward),
    without gradient sync and without an optimiser step (training state is untouched); a setting's peak is the
    largest over all processes, so every process picks the same.
    offload, keep_attention: how checkpointed blocks run (`set_gradient_checkpointing`), measured so.
    choose_kwargs: passed on to `choose_checkpointing` (reserve_for, remedies)."""
    unwrapped = accelerator.unwrap_model(model)

    def measure(k: int) -> float:
        set_gradient_checkpointing(unwrapped, k, offload, keep_attention)

        def run() -> None:
            with accelerator.no_sync(model):
                loss = loss_fn(model, batch)
                if loss.requires_grad:
                    accelerator.backward(loss)
            for p in unwrapped.parameters():
                p.grad = None

        peak = measure_peak_gib(run, accelerator.device)
        return float(accelerator.reduce(torch.full((), peak, device=accelerator.device), "max"))

    cal = choose_checkpointing(
        measure,
        len(checkpointable_blocks(unwrapped)),
        budget_gib,
        reserve_gib,
        min_blocks=swapped_blocks(unwrapped),
        **choose_kwargs,
    )
    set_gradient_checkpointing(unwrapped, cal.checkpointed, offload, keep_attention)
    torch.cuda.reset_peak_memory_stats(accelerator.device)
    return cal


def measure_peak_gib(run_step: Callable[[], None], device: torch.device) -> float:
    """Peak GiB the CUDA caching allocator reserved while `run_step()` ran (what the process takes from the card,
    CUDA context not included); inf if it ran out of memory."""
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    try:
        run_step()
        torch.cuda.synchronize(device)
    except torch.OutOfMemoryError:
        return math.inf
    finally:
        gc.collect()
        torch.cuda.empty_cache()
    return torch.cuda.max_memory_reserved(device) / 2**30


def optimizer_state_gib(params: list[torch.nn.Parameter], optimizer_name: str) -> float:
    """Memory the optimiser's state will take once it exists (it does not during calibration)."""
    bytes_per_value = {"adamw": 8, "adamw8bit": 2, "prodigy": 16, "adafactor": 4, "adamw_schedulefree": 8}.get(
        optimizer_name, 8
    )
    return sum(p.numel() for p in params) * bytes_per_value / 2**30


def budget_overshoot(
    peak_reserved_gib: float | None, budget_gib: float, step: int, validation_peak_gib: float | None = None
) -> str | None:
    """A warning when what the allocator reserved since calibration (the trainer's logged `peak_reserved_gib`) went
    past the budget, else None. That peak covers training and whatever ran beside it; `validation_peak_gib`, the
    peak when validation sampling last raised it (`Validator.raised_peak_gib`), says whether sampling set it."""
    if peak_reserved_gib is None or peak_reserved_gib <= budget_gib:
        return None
    risk = "a card with no more than that could run out of memory"
    if validation_peak_gib is not None and validation_peak_gib >= peak_reserved_gib:
        return (
            f"by step {step} validation sampling took the card to {peak_reserved_gib:.2f} GiB, above --max_memory_gb "
            f"{budget_gib:g} (the training steps stayed under it): {risk}. A lower --validation_resolution samples "
            f"in less; a lower budget would not help, sampling does not depend on it."
        )
    return (
        f"by step {step} the card held up to {peak_reserved_gib:.2f} GiB in training, above --max_memory_gb "
        f"{budget_gib:g}: {risk}. Next time give about --max_memory_gb {2 * budget_gib - peak_reserved_gib:.1f}."
    )


def block_input_gib(batch: dict, dim: int, patch_size: int) -> float:
    """GiB of one block's hidden-state input (bf16) for `batch` (`worst_case_batch`): image tokens (latent pixels
    over the patch area) and caption tokens, `dim` wide, for every item."""
    latents = batch["latents"]
    image_tokens = latents.shape[-2] * latents.shape[-1] // patch_size**2
    tokens = image_tokens + max(c.shape[0] for c in batch["caption_embeds"])
    return latents.shape[0] * tokens * dim * 2 / 2**30


def remedies(args, zero_stage: int = 0, block_weight_gib: float | None = None) -> str:
    """What could make a step fit a smaller budget, leaving out what this run already does. `zero_stage`: DeepSpeed's,
    where preservation puts each batch through the model twice in one pass (elsewhere it needs no more memory).
    `block_weight_gib`: what swapping one more block would save, when known (`block_swap.block_weight_gib`)."""
    steps = []
    if args.train_batch_size > 1:
        steps.append("lower --train_batch_size")
    preserving = [f"--{flag}" for flag in ("preservation_weight", "blank_preservation_weight") if getattr(args, flag)]
    if preserving and zero_stage:
        steps.append(
            f"drop {' and '.join(preserving)} (each puts the batch through once more, in one pass under DeepSpeed)"
        )
    steps.append("lower the cache's resolution")
    if args.base_precision == "bf16":
        steps.append("use --base_precision fp8 (any GPU) or nf4")
    elif args.base_precision != "nf4":
        steps.append("use --base_precision nf4 (a quarter of bf16's weights; fp8 is half)")
    if not args.cpu_offload_checkpointing:
        steps.append("add --cpu_offload_checkpointing")
    if not zero_stage and args.base_precision != "nf4":
        more = "more " if args.blocks_to_swap else ""
        each = f", {block_weight_gib:.2f} GiB less each" if block_weight_gib else ""
        steps.append(f"swap {more}blocks' weights to host memory (--blocks_to_swap N, up to 32{each})")
    steps.append("use DeepSpeed ZeRO-3 with CPU offload (accelerate_configs/deepspeed_zero3_offload.yaml)")
    return ", ".join(steps[:-1]) + ", or " + steps[-1]


@contextmanager
def out_of_memory_explained(args, step: int, batch: dict, zero_stage: int = 0):
    """Turns CUDA running out of memory inside the block (a training step on `batch`) into `cli.OutOfGPUMemory`, which
    says where and what to change, which the scripts print as one line (ZIMAGE_DEBUG=1 shows the original).
    `zero_stage`: DeepSpeed's (`deepspeed_stage`), where --max_memory_gb does not work."""
    try:
        yield
    except torch.OutOfMemoryError as error:
        b, _, h, w = batch["latents"].shape
        length = max(c.shape[0] for c in batch["caption_embeds"])
        where = f"out of GPU memory in training step {step} (a batch of {b} at {8 * w}x{8 * h} px, {length} caption"
        where += " tokens)"
        checkpointing = args.gradient_checkpointing or args.gradient_checkpointing_blocks
        if zero_stage:
            change = "" if checkpointing else "add --gradient_checkpointing, or "
        elif args.max_memory_gb:
            change = (
                f"--max_memory_gb {args.max_memory_gb:g} was measured on the largest batch, so something else held "
                "the card (another process, a display): give a lower --max_memory_gb, or "
            )
        elif checkpointing:
            change = "give --max_memory_gb (a little under the card) to checkpoint as many blocks as it needs, or "
        else:
            change = "give --max_memory_gb (a little under the card, e.g. 22 on a 24 GB one) to fit it, or "
        raise OutOfGPUMemory(
            f"{where}: {change}{remedies(args, zero_stage)}. --resume_from_checkpoint latest continues from the last checkpoint."
        ) from error


def worst_case_batch(
    bucket_sizes: list[tuple[int, int]],
    caption_lengths: list[int],
    batch_size: int,
    channels: int,
    cap_dim: int,
    preservation: bool = False,
    blank: bool = False,
) -> dict:
    """A batch as large as any the dataset gives: the bucket with the most pixels and the longest caption, at the
    training batch size (values are random; memory depends only on shapes). Latents are 8× smaller than pixels.
    `preservation`: every item also has a preservation caption of that length (--preservation_weight); `blank`: and
    "empty_embeds", an empty caption of that length too, for --blank_preservation_weight (a bound: it is shorter)."""
    h, w = max(bucket_sizes, key=lambda hw: hw[0] * hw[1])
    length = max(caption_lengths)
    g = torch.Generator().manual_seed(0)
    batch = {
        "latents": torch.randn(batch_size, channels, h // 8, w // 8, generator=g),
        "caption_embeds": [torch.randn(length, cap_dim, generator=g) for _ in range(batch_size)],
    }
    if preservation:
        batch["preservation_embeds"] = [torch.randn(length, cap_dim, generator=g) for _ in range(batch_size)]
    if blank:
        batch["empty_embeds"] = torch.randn(length, cap_dim, generator=g)
    return batch


def check_memory_options(args, accelerator) -> None:
    """The trainer's checkpointing and block-swap flags, checked together before anything loads."""
    if args.blocks_to_swap:
        if deepspeed_stage(accelerator):
            raise ValueError(
                "--blocks_to_swap does not work under DeepSpeed, which places the weights itself: drop it, or use "
                "accelerate_configs/deepspeed_zero3_offload.yaml alone to keep the weights in host memory"
            )
        if args.base_precision == "nf4":
            raise ValueError("--blocks_to_swap cannot move NF4 weights (bitsandbytes): use --base_precision fp8")
    checkpointing = (
        args.gradient_checkpointing or args.gradient_checkpointing_blocks or args.max_memory_gb or args.blocks_to_swap
    )
    for flag in ("cpu_offload_checkpointing", "checkpoint_keep_attention"):
        if getattr(args, flag) and not checkpointing:
            raise ValueError(
                f"--{flag} changes what checkpointed blocks keep: add --gradient_checkpointing, "
                "--gradient_checkpointing_blocks N, --max_memory_gb or --blocks_to_swap"
            )
    if not args.max_memory_gb:
        return
    if accelerator.device.type != "cuda":
        raise ValueError("--max_memory_gb measures GPU memory and needs a CUDA device; drop it on this device")
    if deepspeed_stage(accelerator):
        raise ValueError("--max_memory_gb does not work under DeepSpeed; use --gradient_checkpointing there")
    if args.gradient_checkpointing or args.gradient_checkpointing_blocks:
        raise ValueError("--max_memory_gb chooses the checkpointing itself: drop --gradient_checkpointing(_blocks)")


def item_shapes(train) -> tuple[list[tuple[int, int]], list[int]]:
    """(bucket (h, w), longest caption in tokens: the first, any variant or the preservation caption) of every item of
    `train`, a `CachedLatentsDataset`."""
    names = ["bucket_height", "bucket_width", "caption_length", "variant_lengths", "preservation_length"]
    shapes = train.columns(names, defaults={"variant_lengths": [], "preservation_length": 0})
    lengths = [
        max([first, *variants, preserved])
        for first, variants, preserved in zip(
            shapes["caption_length"], shapes["variant_lengths"], shapes["preservation_length"]
        )
    ]
    return list(zip(shapes["bucket_height"], shapes["bucket_width"])), lengths


def fit_memory_budget(args, accelerator, transformer, train, config, params, print0) -> None:
    """Set the fewest checkpointed blocks that fit --max_memory_gb, measured on the largest batch the caches hold
    (`train`: a `CachedLatentsDataset`; `config`: the run's `StepConfig`)."""
    model = accelerator.unwrap_model(transformer)
    batch = worst_case_batch(
        *item_shapes(train),
        args.train_batch_size,
        model.config.in_channels,
        model.config.cap_feat_dim,
        preservation=config.preservation_weight > 0,
        blank=config.blank_preservation_weight > 0,
    )
    empty = batch.pop("empty_embeds", None)
    seeds = list(range(args.train_batch_size))
    reserve, reserve_for = optimizer_state_gib(params, args.optimizer), "optimiser state"
    if args.cpu_offload_checkpointing:
        patch = model.config.all_patch_size[0]
        reserve += OFFLOAD_SLACK_BLOCK_INPUTS * block_input_gib(batch, model.config.dim, patch)
        reserve_for = "optimiser state and host copies in flight"
    blocks = checkpointable_blocks(model)
    per_block = block_weight_gib(blocks[-1])
    try:
        calibration = calibrate_checkpointing(
            accelerator,
            transformer,
            batch,
            lambda m, b: flow_matching_step(m, b, config, seeds, empty, backward=accelerator.backward)["loss"],
            args.max_memory_gb,
            reserve,
            args.cpu_offload_checkpointing,
            args.checkpoint_keep_attention,
            reserve_for=reserve_for,
            remedies=remedies(args, block_weight_gib=per_block),
        )
    except MemoryBudgetError as error:
        if args.base_precision == "nf4":
            raise
        estimate = swap_estimate(error.shortfall_gib, per_block, args.blocks_to_swap, len(blocks))
        raise MemoryBudgetError(f"{error}{estimate}", error.shortfall_gib) from None
    print0(calibration.summary())


def swap_estimate(shortfall_gib: float, per_block_gib: float, swapped: int, total: int) -> str:
    """For the budget refusal: how many swapped blocks would cover `shortfall_gib` by the weights they take off the
    card (`per_block_gib` each; two swapped blocks are on the card at a time, which the step measured already when
    some were swapped). An estimate from sizes, not a measurement; "" when no number of blocks would do."""
    in_flight = 0 if swapped else 2
    finite = math.isfinite(shortfall_gib) and per_block_gib > 0
    needed = swapped + math.ceil(shortfall_gib / per_block_gib) + in_flight if finite else None
    if needed is None or needed > total:
        return ""
    return (
        f". By the weights alone --blocks_to_swap {needed} would cover the {shortfall_gib:.2f} GiB missing "
        f"({per_block_gib:.2f} GiB a block): an estimate; the next run measures it"
    )
