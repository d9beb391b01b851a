"""Speed and memory options of the training step, applied to the transformer in place: selective gradient
checkpointing (a chosen number of blocks recompute their activations) and regional compilation of the repeated
blocks; and keeping Python's garbage collector out of the steps."""

import functools
import gc
import os
import time
import weakref

import torch


def checkpointable_blocks(transformer) -> list[torch.nn.Module]:
    """The blocks worth recomputing, in forward order: the noise refiner and main layers (they see every image
    token). The context refiner only sees caption tokens, so checkpointing it saves little."""
    return list(transformer.noise_refiner) + list(transformer.layers)


def set_gradient_checkpointing(
    transformer, num_blocks: int, offload: bool = False, keep_attention: bool = False
) -> int:
    """Recompute activations in the first `num_blocks` of `checkpointable_blocks` (0 = off; -1 or more than
    exist = all). The checkpoint is taken inside each chosen block's own forward (`_checkpointing_class`), so a
    compiled block compiles its recomputation together with its backward.
    offload: keep what a checkpointed block saves (its hidden-state input, ~32 MB a block at 1024²) in pinned host
    memory until backward recomputes the block, instead of on the GPU (`HostOffload`).
    keep_attention: a checkpointed block also keeps its attention output (+0.75 GiB over 32 blocks at 1024²), so
    backward recomputes the projections around it but not the attention itself (selective activation checkpointing).
    Blocks whose weights are swapped (`block_swap.swap_blocks`, the first ones) are checkpointed whatever
    `num_blocks` says. Returns the number of blocks checkpointed."""
    blocks = checkpointable_blocks(transformer)
    n = len(blocks) if num_blocks < 0 else min(num_blocks, len(blocks))
    n = max(n, swapped_blocks(transformer))  # a swapped block must not keep its weights for backward
    for i, block in enumerate(blocks):
        plain = getattr(type(block), "_plain_class", type(block))
        block.__class__ = _checkpointing_class(plain, keep_attention) if i < n else plain
    if n == 0:
        transformer.disable_gradient_checkpointing()
        return 0
    host = HostOffload()

    def call_block(block, *args):
        if not offload or not hasattr(type(block), "_plain_class"):
            return block(*args)
        # The hooks see what the checkpoint saves: the block's inputs (and the kept attention outputs, which need no
        # gradient and so stay on the GPU), nothing of the recompute.
        with torch.autograd.graph.saved_tensors_hooks(host.pack, host.unpack):
            return block(*args)

    # diffusers calls this for every block while checkpointing is on: the place to wrap a block in the hooks.
    transformer.enable_gradient_checkpointing(gradient_checkpointing_func=call_block)
    return n


def swapped_blocks(transformer) -> int:
    """How many of the first `checkpointable_blocks` keep their weights in host memory (`block_swap`)."""
    swap = getattr(transformer, "_block_swap", None)
    return len(swap.blocks) if swap is not None else 0


ATTENTION_OPS = {
    getattr(torch.ops.aten, name).default
    for name in (
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
    )
    if hasattr(torch.ops.aten, name)
}


def _keep_attention(ctx, op, *args, **kwargs):
    from torch.utils.checkpoint import CheckpointPolicy

    return CheckpointPolicy.MUST_SAVE if op in ATTENTION_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _recompute_everything(ctx, op, *args, **kwargs):
    from torch.utils.checkpoint import CheckpointPolicy

    return CheckpointPolicy.PREFER_RECOMPUTE


def _compiled_checkpoint_needs_policy() -> bool:
    """Whether a plain checkpoint, compiled, must be given `_recompute_everything` to recompute all it holds. torch
    2.11 tags for recomputation the nodes of the graph dynamo traced, where an autograd.Function (each fp8 base
    Linear) is one node, and the ops inside it were kept for backward: +11 GiB at 1024² (docs/BENCHMARKS.md, sessions
    10 and 11). torch 2.13 runs a plain checkpoint through such a policy itself (`_always_prefer_recompute`), and
    without the warning torch prints for a policy passed under compile. Should that private name go, we pass ours:
    the same policy, and only the warning comes back."""
    from torch._higher_order_ops import wrap

    return not hasattr(wrap, "_always_prefer_recompute")


COMPILED_CHECKPOINT_NEEDS_POLICY = _compiled_checkpoint_needs_policy()


def _policy_context(policy, recompute_freely: bool = False):
    """torch's two selective-checkpointing modes for `policy` (forward, recompute). recompute_freely (eager only):
    the recompute runs every op the policy did not save as it comes, as a plain checkpoint does, and looks up only the
    saved ones. torch 2.13's recompute mode otherwise expects the very ops of the first run, one by one, and ZeRO-3
    breaks that: its hooks gather parameters inside the block when they are not there already, which differs
    between the first run and the recompute (seen with --preservation_weight: "c10d._allgather_base_ invocation
    index 18 encountered during backward but not found in storage"). Compiled, the modes only tag the traced graph,
    so they stay as torch made them."""
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    forward, recompute = create_selective_checkpoint_contexts(policy)
    if recompute_freely:
        recompute.__class__ = _recompute_freely_class(type(recompute))
    return forward, recompute


@functools.cache
def _recompute_freely_class(mode: type) -> type:
    class RecomputeFreely(mode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func not in ATTENTION_OPS:
                return func(*args, **(kwargs or {}))
            return super().__torch_dispatch__(func, types, args, kwargs)

    return RecomputeFreely


_CHECKPOINTING_CLASSES: dict[tuple[type, bool], type] = {}


def _checkpointing_class(plain: type, keep_attention: bool) -> type:
    """A subclass of the block class whose forward runs under `torch.utils.checkpoint`, swapped in as the block's
    class: parameter names and the state dict stay as they were, and every block of one class shares one compiled
    forward (regional compilation matches the class name, which the subclass keeps)."""
    key = (plain, keep_attention)
    if key not in _CHECKPOINTING_CLASSES:

        class Checkpointing(plain):
            _plain_class = plain

            def __call__(self, *args, **kwargs):
                # Outside the compiled forward: a swapped block's weights come in before it runs (training or
                # sampling), and again before its backward, which recomputes it (`block_swap.BlockSwap`)
                swap = self.__dict__.get("_weight_swap")
                if swap is None:
                    return super().__call__(*args, **kwargs)
                owner, index = swap
                owner.onload(index)
                out = super().__call__(*args, **kwargs)
                if isinstance(out, torch.Tensor) and out.requires_grad:
                    out.register_hook(functools.partial(owner.before_backward, index))
                return out

            def forward(self, *args, **kwargs):
                # A plain checkpoint gets a policy only while compiling, where torch does not add one itself
                # (eager, it would only add a dispatch per op)
                if keep_attention:
                    policy = _keep_attention
                elif COMPILED_CHECKPOINT_NEEDS_POLICY and torch.compiler.is_compiling():
                    policy = _recompute_everything
                else:
                    policy = None
                freely = keep_attention and not torch.compiler.is_compiling()
                context = {"context_fn": functools.partial(_policy_context, policy, freely)} if policy else {}
                return torch.utils.checkpoint.checkpoint(
                    super().forward, *args, use_reentrant=False, **context, **kwargs
                )

        Checkpointing.__name__, Checkpointing.__qualname__ = plain.__name__, plain.__qualname__
        Checkpointing.__module__ = plain.__module__
        _CHECKPOINTING_CLASSES[key] = Checkpointing
    return _CHECKPOINTING_CLASSES[key]


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

    @staticmethod
    def moves(tensor: torch.Tensor) -> bool:
        """Whether a saved tensor goes to the host: activations needing a gradient. Not parameters (a compiled block
        saves the LoRA weights it multiplies by), nor the empty marker some torch versions' checkpoint saves."""
        return tensor.requires_grad and not isinstance(tensor, torch.nn.Parameter) and tensor.numel() > 0

    def pack(self, tensor: torch.Tensor):
        if tensor.device.type != "cuda" or not self.moves(tensor):
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


def freeze_gc() -> bool:
    """Exempt every object alive now from the garbage collector's full collections. The model, the compiled graphs
    and their caches are ~0.7M objects even for the tiny model; a full collection scans them all (0.3 s on CPU
    here), and lands in whichever step allocates past its threshold. Call once the first step has compiled;
    `gc.unfreeze()` hands them back. Returns False where ZIMAGE_GC_FREEZE=0 (benchmarks: the step without it)."""
    if os.environ.get("ZIMAGE_GC_FREEZE") == "0":
        return False
    gc.collect()
    gc.freeze()
    return True


def apply_step_flags(args, transformer) -> None:
    """The trainer's `--gradient_checkpointing(_blocks)` (with `--cpu_offload_checkpointing` and
    `--checkpoint_keep_attention`; swapped blocks are checkpointed too) and `--compile` (with
    `--activation_memory_budget`) on the LoRA-wrapped transformer, checkpointing first so compiled blocks compile
    their recomputation."""
    if args.gradient_checkpointing or args.gradient_checkpointing_blocks or swapped_blocks(transformer):
        set_gradient_checkpointing(
            transformer,
            -1 if args.gradient_checkpointing else args.gradient_checkpointing_blocks,
            args.cpu_offload_checkpointing,
            args.checkpoint_keep_attention,
        )
    if args.compile:
        # NF4 layers and PEFT's DoRA (its base-weight lookup calls str.startswith) break the graph; the rest is whole
        whole = args.base_precision != "nf4" and getattr(args, "adapter", "lora") != "dora"
        compile_blocks(transformer, whole, args.activation_memory_budget)
