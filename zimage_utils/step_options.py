"""Speed and memory options of the training step, applied to the transformer in place: selective gradient
checkpointing (a chosen number of blocks recompute their activations) and regional compilation of the repeated
blocks."""

import time
import weakref

import torch


def checkpointable_blocks(transformer) -> list[torch.nn.Module]:
    """The blocks worth recomputing, in forward order: the noise refiner and main layers (they see every image
    token). The context refiner only sees caption tokens, so checkpointing it saves little."""
    return list(transformer.noise_refiner) + list(transformer.layers)


def set_gradient_checkpointing(transformer, num_blocks: int, offload: bool = False) -> int:
    """Recompute activations in the first `num_blocks` of `checkpointable_blocks` (0 = off; -1 or more than
    exist = all). Uses diffusers' own hook (`enable_gradient_checkpointing` with a per-block function).
    offload: keep what a checkpointed block saves (its hidden-state input, ~32 MB a block at 1024²) in pinned host
    memory until backward recomputes the block, instead of on the GPU (`HostOffload`).
    Returns the number of blocks checkpointed."""
    blocks = checkpointable_blocks(transformer)
    n = len(blocks) if num_blocks < 0 else min(num_blocks, len(blocks))
    if n == 0:
        transformer.disable_gradient_checkpointing()
        return 0
    chosen = {id(b) for b in blocks[:n]}
    host = HostOffload()

    def checkpoint_some(block, *args):
        if id(block) not in chosen:
            return block(*args)
        if not offload:
            return torch.utils.checkpoint.checkpoint(block.__call__, *args, use_reentrant=False)
        # Non-reentrant checkpointing saves the block's inputs as autograd saved tensors before it installs its own
        # hooks, so these hooks see exactly the inputs, and nothing of the recompute.
        with torch.autograd.graph.saved_tensors_hooks(host.pack, host.unpack):
            return torch.utils.checkpoint.checkpoint(block.__call__, *args, use_reentrant=False)

    transformer.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint_some)
    return n


class _Offloaded:
    """One saved tensor in host memory, and its copy on the way back once prefetched."""

    def __init__(self, device: torch.device, host: torch.Tensor, index: int):
        self.device, self.host, self.index = device, host, index
        self.back: torch.Tensor | None = None
        self.ready: torch.cuda.Event | None = None


class HostOffload:
    """saved_tensors_hooks that keep saved accelerator tensors needing a gradient (the hidden states; not masks,
    rotary tables or the timestep embedding, which are small or shared) in pinned host memory until backward.

    Both copies run on a side stream, beside the compute: a tensor's GPU memory is reused only after its copy to the
    host (`record_stream`), and when backward takes a tensor back it also starts bringing back the one saved before
    it, which backward needs next (one block's input ahead, ~32 MB at 1024²)."""

    def __init__(self):
        self.streams: dict[torch.device, torch.cuda.Stream] = {}
        # This forward's tensors in the order they were saved, held weakly: autograd's graph owns them, so a graph
        # dropped without a backward frees its host copies too.
        self.saved: list[weakref.ref] = []

    def pack(self, tensor: torch.Tensor):
        if tensor.device.type != "cuda" or not tensor.requires_grad:
            return tensor
        stream = self.streams.setdefault(tensor.device, torch.cuda.Stream(tensor.device))
        stream.wait_stream(torch.cuda.current_stream(tensor.device))  # the tensor has been computed
        with torch.cuda.stream(stream):
            host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            host.copy_(tensor, non_blocking=True)
        tensor.record_stream(stream)
        last = self.saved[-1]() if self.saved else None
        if last is None or last.host is None:  # backward has begun taking back the last forward's: a new forward
            self.saved = []
        item = _Offloaded(tensor.device, host, len(self.saved))
        self.saved.append(weakref.ref(item))
        return item

    def _prefetch(self, item: _Offloaded) -> None:
        stream = self.streams[item.device]
        with torch.cuda.stream(stream):
            item.back = item.host.to(item.device, non_blocking=True)
            item.ready = torch.cuda.Event()
            item.ready.record(stream)

    def unpack(self, packed):
        if isinstance(packed, torch.Tensor):
            return packed
        item: _Offloaded = packed
        current = torch.cuda.current_stream(item.device)
        if item.back is None:
            current.wait_stream(self.streams[item.device])  # its copy to the host is done
            self._prefetch(item)
        current.wait_event(item.ready)
        tensor, item.back, item.host = item.back, None, None
        tensor.record_stream(current)  # allocated on the side stream, used and freed on this one
        previous = self.saved[item.index - 1]() if 0 < item.index <= len(self.saved) else None
        if previous is not None and previous.back is None and previous.host is not None:
            self._prefetch(previous)
        return tensor


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
