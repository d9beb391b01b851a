"""`--blocks_to_swap N`: the frozen base weights of N transformer blocks wait in pinned host memory, and each block's
are copied to the GPU only while it runs (musubi-tuner's block swap). Saves N blocks' weights (~0.17 GiB each in fp8,
~0.35 GiB in bf16) for PCIe copies that run on a side stream beside the compute.

A swapped block is always a checkpointed one (`step_options.set_gradient_checkpointing`): its forward then keeps
nothing of the weights for backward, and backward, which recomputes the block, copies them in again first. At most
two swapped blocks are on the GPU at once: the one running and the next one, being copied. The next one is the block
after it in forward and the one before it in backward, which walks the blocks in reverse.

Only the frozen tensors move (the base Linears, norms, fp8 row scales); the LoRA stays on the GPU with its optimiser.
Their host copies are packed into pinned buffers of a power-of-two size (`move_to_host_buffers`): pinned one by one,
torch's allocator would round each up to a power of two, 16.25 GiB for the 10.78 GiB of 32 bf16 blocks.
Copies are by reference swap (`tensor.data = ...`), which autograd and compiled blocks both read at the time they
run: a block's compiled backward sees the weights copied in for it (tests/test_block_swap.py).

Not diffusers' group offloading: it moves whole modules, the LoRA parameters inside a block with the rest, and its
prefetching follows the order of the first forward, which backward's recomputation reverses.
"""

import torch

from .step_options import checkpointable_blocks


class BlockSwap:
    """The swapped blocks (the first `len(blocks)` of `checkpointable_blocks`, in forward order) and their weights.

    Each block gets the instance attribute `_weight_swap = (self, index)`, which the checkpointing block class reads
    in `__call__`: `onload` before the block runs, and again from a hook on its output before its backward."""

    def __init__(self, blocks: list[torch.nn.Module], device: torch.device | str):
        self.blocks = blocks
        self.device = torch.device(device)
        cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if cuda else None
        self.host: list[list[tuple[torch.Tensor, torch.Tensor]]] = []  # per block: (module tensor, host copy)
        self.incoming: dict[int, torch.cuda.Event | None] = {}  # blocks on the device (or on their way) → copy done
        tensors = [frozen_tensors(block) for block in blocks]
        hosts = iter(move_to_host_buffers([t for ts in tensors for t in ts], pin=cuda))
        for index, block in enumerate(blocks):
            self.host.append([(t, next(hosts)) for t in tensors[index]])
            block._weight_swap = (self, index)
        if cuda:
            torch.cuda.empty_cache()  # what they took on the GPU (fp8 weights are made there) goes back to the card

    def weight_gib(self) -> float:
        """GiB the swapped weights take, in host memory instead of on the GPU."""
        return sum(h.numel() * h.element_size() for pairs in self.host for _, h in pairs) / 2**30

    def _copy_in(self, index: int) -> None:
        """Start bringing block `index`'s weights to the device (on the side stream on a GPU)."""
        if self.stream is None:  # CPU: a real copy all the same, so tests see the weights come and go
            for t, host in self.host[index]:
                t.data = host.clone()
            self.incoming[index] = None
            return
        # The copies' memory comes from the compute stream's pool, which takes a dropped block's back at once. From the
        # side stream's pool it would come back only once the compute had passed it, and the CPU, far ahead of a
        # compiled model, queues the next copy before that: every block got new memory (bf16, all swapped: 11.6 GiB
        # reserved for 3.5 allocated; docs/BENCHMARKS.md, session 18). A copy may land where the block before still
        # runs, so the side stream waits for the work queued so far.
        current = torch.cuda.current_stream(self.device)
        arriving = [torch.empty_like(host, device=self.device) for _, host in self.host[index]]
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            for (t, host), device_copy in zip(self.host[index], arriving):
                t.data = device_copy.copy_(host, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(self.stream)
        self.incoming[index] = ready

    def _drop(self, index: int) -> None:
        for t, host in self.host[index]:
            t.data = host  # the device copy goes back to the compute stream's pool
        del self.incoming[index]

    def onload(self, index: int, backward: bool = False) -> None:
        """Block `index` is about to run (its forward, or its recompute and backward): have its weights on the device,
        let every other swapped block's go, and start copying the block that runs next."""
        if index not in self.incoming:
            self._copy_in(index)
        ready = self.incoming[index]
        if ready is not None:
            torch.cuda.current_stream(self.device).wait_event(ready)
            self.incoming[index] = None
        for other in [i for i in self.incoming if i != index]:
            self._drop(other)
        following = index - 1 if backward else index + 1
        if 0 <= following < len(self.blocks) and following not in self.incoming:
            self._copy_in(following)

    def before_backward(self, index: int, grad: torch.Tensor) -> None:
        """Tensor hook on a swapped block's output: its gradient is complete, so the block's backward runs next."""
        self.onload(index, backward=True)


# Bytes of each pinned buffer the host copies are packed into: a power of two, as torch's pinned-memory allocator
# rounds every request up to one (a 75 MiB bf16 FFN weight pinned alone takes 128 MiB: 1.5× the weights in all).
PINNED_BUFFER_BYTES = 2**28
ALIGNMENT = 512  # bytes, of each copy's start in its buffer


def pinned_bytes(size: int) -> int:
    """What torch's pinned-memory allocator takes for a request of `size` bytes: the next power of two."""
    return 1 << max(size - 1, 0).bit_length()


def pack(sizes: list[int], buffer_bytes: int = PINNED_BUFFER_BYTES) -> list[tuple[int, list[tuple[int, int]]]]:
    """Where `move_to_host_buffers` puts tensors of `sizes` bytes: per buffer, its size (a power of two) and its
    (tensor index, byte offset) pairs."""
    used: list[int] = []  # bytes taken in each buffer
    contents: list[list[tuple[int, int]]] = []
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        size = -(-sizes[i] // ALIGNMENT) * ALIGNMENT
        buffer = next((b for b, taken in enumerate(used) if taken + size <= buffer_bytes), len(used))
        if buffer == len(used):
            used.append(0)
            contents.append([])
        contents[buffer].append((i, used[buffer]))
        used[buffer] += size
    return [(pinned_bytes(taken), placed) for taken, placed in zip(used, contents)]


def move_to_host_buffers(
    tensors: list[torch.Tensor], pin: bool, buffer_bytes: int = PINNED_BUFFER_BYTES
) -> list[torch.Tensor]:
    """Move each tensor's data (`t.data`) into host memory, packed first-fit, largest first, into (pinned) buffers of
    `buffer_bytes`, or of the next power of two above what the last one holds (a tensor larger than a buffer gets its
    own). Buffer by buffer, so the tensors' old memory goes as the new fills. Returns the host tensors, in order."""
    sizes = [t.numel() * t.element_size() for t in tensors]
    hosts: dict[int, torch.Tensor] = {}
    for buffer_size, placed in pack(sizes, buffer_bytes):
        buffer = torch.empty(buffer_size, dtype=torch.uint8, pin_memory=pin)
        for i, offset in placed:
            t = tensors[i]
            host = buffer[offset : offset + sizes[i]].view(t.dtype).view(t.shape)
            host.copy_(t.data)
            t.data = host
            hosts[i] = host
    return [hosts[i] for i in range(len(tensors))]


def frozen_tensors(block: torch.nn.Module) -> list[torch.Tensor]:
    """The tensors a swap moves: the block's frozen parameters and its buffers, each once."""
    frozen = {id(t): t for t in [p for p in block.parameters() if not p.requires_grad] + list(block.buffers())}
    return list(frozen.values())


def block_weight_gib(block: torch.nn.Module) -> float:
    """GiB of a block's frozen tensors: what swapping it takes off the GPU."""
    return sum(t.numel() * t.element_size() for t in frozen_tensors(block)) / 2**30


def first_blocks(transformer: torch.nn.Module, num_blocks: int) -> list[torch.nn.Module]:
    """The blocks `--blocks_to_swap num_blocks` swaps: the first of `checkpointable_blocks`, in forward order."""
    return checkpointable_blocks(transformer)[: max(num_blocks, 0)]


def swap_blocks(transformer: torch.nn.Module, num_blocks: int, device: torch.device | str) -> BlockSwap | None:
    """Keep the frozen weights of the first `num_blocks` of `checkpointable_blocks(transformer)` in (pinned) host
    memory from now on (0 = none; more than exist = all); wherever they are now, they leave it. Call before the
    blocks' checkpointing is set (`set_gradient_checkpointing` always checkpoints swapped blocks) and before
    `move_except_swapped`."""
    if num_blocks <= 0:
        return None
    swap = BlockSwap(first_blocks(transformer, num_blocks), device)
    transformer._block_swap = swap
    return swap


def move_except_swapped(model: torch.nn.Module, device: torch.device | str) -> None:
    """`model.to(device)`, except for the swapped blocks' frozen tensors, which stay in host memory (the LoRA inside
    those blocks moves)."""
    swap = getattr(model, "_block_swap", None)
    staying = {id(t) for pairs in swap.host for t, _ in pairs} if swap else set()
    # What Module.to runs, given each parameter and buffer in turn
    model._apply(lambda t: t if id(t) in staying else t.to(device))
