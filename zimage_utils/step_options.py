"""Speed and memory options of the training step, applied to the transformer in place: selective gradient
checkpointing (a chosen number of blocks recompute their activations) and regional compilation of the repeated
blocks."""

import time

import torch


def checkpointable_blocks(transformer) -> list[torch.nn.Module]:
    """The blocks worth recomputing, in forward order: the noise refiner and main layers (they see every image
    token). The context refiner only sees caption tokens, so checkpointing it saves little."""
    return list(transformer.noise_refiner) + list(transformer.layers)


def set_gradient_checkpointing(transformer, num_blocks: int, offload: bool = False) -> int:
    """Recompute activations in the first `num_blocks` of `checkpointable_blocks` (0 = off; -1 or more than
    exist = all). Uses diffusers' own hook (`enable_gradient_checkpointing` with a per-block function).
    offload: keep what a checkpointed block saves (its hidden-state input, ~32 MB a block at 1024²) in pinned host
    memory until backward recomputes the block, instead of on the GPU (`offload_to_host`).
    Returns the number of blocks checkpointed."""
    blocks = checkpointable_blocks(transformer)
    n = len(blocks) if num_blocks < 0 else min(num_blocks, len(blocks))
    if n == 0:
        transformer.disable_gradient_checkpointing()
        return 0
    chosen = {id(b) for b in blocks[:n]}

    def checkpoint_some(block, *args):
        if id(block) not in chosen:
            return block(*args)
        if not offload:
            return torch.utils.checkpoint.checkpoint(block.__call__, *args, use_reentrant=False)
        # Non-reentrant checkpointing saves the block's inputs as autograd saved tensors before it installs its own
        # hooks, so these hooks see exactly the inputs, and nothing of the recompute.
        with torch.autograd.graph.saved_tensors_hooks(offload_to_host, bring_back):
            return torch.utils.checkpoint.checkpoint(block.__call__, *args, use_reentrant=False)

    transformer.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint_some)
    return n


def offload_to_host(tensor: torch.Tensor):
    """saved_tensors_hooks pack: an accelerator tensor that needs a gradient (the hidden states; not masks, rotary
    tables or the timestep embedding, which are small or shared) is copied to pinned host memory without blocking.
    The copy is queued on the current stream, so the GPU memory it frees is reused only after the copy is done."""
    if tensor.device.type == "cpu" or not tensor.requires_grad:
        return tensor
    host = torch.empty(tensor.shape, dtype=tensor.dtype, layout=tensor.layout, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    return tensor.device, host


def bring_back(packed):
    """saved_tensors_hooks unpack: the inverse of `offload_to_host`, queued on the current stream."""
    if isinstance(packed, torch.Tensor):
        return packed
    device, host = packed
    return host.to(device, non_blocking=True)


def raise_recompile_limit(limit: int) -> None:
    """Let dynamo keep up to `limit` compiled variants of one function (its default of 8 is too few for one block
    compiled for several sequence lengths, or a VAE encoder compiled for each bucket size)."""
    name = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), limit))


def compile_blocks(
    transformer, fullgraph: bool = True, activation_memory_budget: float | None = None, **compile_kwargs
) -> float:
    """Regional compilation (`compile_repeated_blocks`): each ZImageTransformerBlock is compiled once and the
    compiled code reused by all 34 of them. Returns seconds spent here (the real compile cost shows on the first
    steps, which the trainer reports). fullgraph=False lets layers dynamo cannot trace (bitsandbytes NF4) break the
    graph instead of failing. activation_memory_budget (0-1): memory/speed trade-off inside each compiled block,
    an alternative to checkpointing whole blocks (1 = keep every activation the compiler would)."""
    start = time.perf_counter()
    # One compiled block serves 34 instances over three sequence lengths (noise refiner, caption refiner, main
    # layers), with and without checkpointing: more variants than dynamo's default recompile limit of 8.
    raise_recompile_limit(64)
    if activation_memory_budget is not None:
        # Read when a block is compiled (its first call): the partitioner then keeps about this fraction of the
        # activations and recomputes the cheapest of the rest (elementwise ops first, matmuls last).
        torch._functorch.config.activation_memory_budget = activation_memory_budget
    transformer.compile_repeated_blocks(fullgraph=fullgraph, **compile_kwargs)
    return time.perf_counter() - start
