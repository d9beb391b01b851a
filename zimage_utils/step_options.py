"""Speed and memory options of the training step, applied to the transformer in place: selective gradient
checkpointing (a chosen number of blocks recompute their activations), regional compilation of the repeated
blocks, and `--max_memory_gb`, which measures peak memory on the first batch and picks the fewest checkpointed
blocks that fit."""

import time
from collections.abc import Callable

import torch


def checkpointable_blocks(transformer) -> list[torch.nn.Module]:
    """The blocks worth recomputing, in forward order: the noise refiner and main layers (they see every image
    token). The context refiner only sees caption tokens, so checkpointing it saves little."""
    return list(transformer.noise_refiner) + list(transformer.layers)


def set_gradient_checkpointing(transformer, num_blocks: int) -> int:
    """Recompute activations in the first `num_blocks` of `checkpointable_blocks` (0 = off; -1 or more than
    exist = all). Uses diffusers' own hook (`enable_gradient_checkpointing` with a per-block function).
    Returns the number of blocks checkpointed."""
    blocks = checkpointable_blocks(transformer)
    n = len(blocks) if num_blocks < 0 else min(num_blocks, len(blocks))
    if n == 0:
        transformer.disable_gradient_checkpointing()
        return 0
    chosen = {id(b) for b in blocks[:n]}

    def checkpoint_some(block, *args):
        if id(block) in chosen:
            return torch.utils.checkpoint.checkpoint(block.__call__, *args, use_reentrant=False)
        return block(*args)

    transformer.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint_some)
    return n


def raise_recompile_limit(limit: int) -> None:
    """Let dynamo keep up to `limit` compiled variants of one function (its default of 8 is too few for one block
    compiled for several sequence lengths, or a VAE encoder compiled for each bucket size)."""
    name = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), limit))


def compile_blocks(transformer, **compile_kwargs) -> float:
    """Regional compilation (`compile_repeated_blocks`): each ZImageTransformerBlock is compiled once and the
    compiled code reused by all 34 of them. Returns seconds spent here (the real compile cost shows on the first
    steps, which the trainer reports)."""
    start = time.perf_counter()
    # One compiled block serves 34 instances over three sequence lengths (noise refiner, caption refiner, main
    # layers), with and without checkpointing: more variants than dynamo's default recompile limit of 8.
    raise_recompile_limit(64)
    transformer.compile_repeated_blocks(fullgraph=True, **compile_kwargs)
    return time.perf_counter() - start


def pick_checkpointing_for_budget(
    transformer, run_step: Callable[[], None], budget_gib: float, device: torch.device
) -> tuple[int, list[dict]]:
    """Fewest checkpointed blocks whose measured peak memory fits `budget_gib`.

    run_step: forward + backward on a real batch (gradients are cleared by the caller afterwards).
    Measures the peak with none and with all blocks checkpointed, interpolates per block, then verifies the
    choice with one more step (stepping up if it does not fit). Returns (num_blocks, measurements).
    """
    if device.type != "cuda":
        return (0, [])
    total = len(checkpointable_blocks(transformer))
    measured: list[dict] = []

    def peak_with(n: int) -> float:
        set_gradient_checkpointing(transformer, n)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        try:
            run_step()
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() / 2**30
        except torch.OutOfMemoryError:
            peak = float("inf")
        torch.cuda.empty_cache()
        measured.append({"checkpointed_blocks": n, "peak_gib": peak})
        return peak

    none, full = peak_with(0), peak_with(total)
    if none <= budget_gib:
        return set_gradient_checkpointing(transformer, 0), measured
    if full > budget_gib:
        raise RuntimeError(
            f"even with all {total} blocks checkpointed the step needs {full:.1f} GiB > --max_memory_gb {budget_gib}: "
            "lower the resolution or batch size, use --base_precision fp8/nf4, or DeepSpeed ZeRO-3 offload."
        )
    if none == float("inf"):  # out of memory without checkpointing: only the full-checkpointing point is known
        n = total
    else:
        per_block = (none - full) / total
        n = min(total, max(1, int((none - budget_gib) / max(per_block, 1e-6)) + 1))
    while n < total and peak_with(n) > budget_gib:
        n = min(total, n + max(1, total // 10))
    return set_gradient_checkpointing(transformer, n), measured
