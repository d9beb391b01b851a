"""`--blocks_to_swap N`: swapped blocks train and sample exactly as resident ones, their weights are on the device
only while they run, and the LoRA never leaves it. (The GPU memory it saves and its speed: docs/BENCHMARKS.md.)"""

import argparse
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from test_step_options import batch, lora_transformer, loss_and_grads
from test_trainer import train

from zimage_utils.block_swap import move_except_swapped, move_to_host_buffers, pack, pinned_bytes, swap_blocks
from zimage_utils.lora import add_lora
from zimage_utils.lora_io import LORA_WEIGHT_NAME
from zimage_utils.step_options import checkpointable_blocks, compile_blocks, set_gradient_checkpointing
from zimage_utils.training_step import StepConfig, flow_matching_step


def weights_on_the_device(block, swap) -> bool:
    """Whether a swapped block's frozen tensors are device copies rather than their host copies."""
    index = swap.blocks.index(block)
    return all(t.data_ptr() != host.data_ptr() for t, host in swap.host[index])


def record_residency(swap) -> list[tuple[int, list[int]]]:
    """Calls `swap.onload` as usual and appends (the block asked for, the swapped blocks whose weights are then on
    the device) to the returned list, for every call."""
    calls, real_onload = [], swap.onload

    def onload(index, backward=False):
        real_onload(index, backward)
        resident = [i for i, b in enumerate(swap.blocks) if weights_on_the_device(b, swap)]
        calls.append((index, resident))

    swap.onload = onload
    return calls


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_swapped_blocks_give_the_resident_loss_and_gradients(compiled):
    transformer = lora_transformer()
    set_gradient_checkpointing(transformer, -1)
    if compiled:
        compile_blocks(transformer)
    reference_loss, reference_grads = loss_and_grads(transformer)

    swap = swap_blocks(transformer, 3, "cpu")
    assert set_gradient_checkpointing(transformer, 0) == 3  # swapped blocks stay checkpointed
    calls = record_residency(swap)
    loss, grads = loss_and_grads(transformer)
    assert torch.equal(loss, reference_loss)
    for name, g in grads.items():
        assert torch.allclose(g, reference_grads[name], atol=1e-6), name

    # forward in order, then backward in reverse, each block's weights in just before it runs, beside the next one's
    assert [index for index, _ in calls] == [0, 1, 2, 2, 1, 0]
    assert calls[0][1] == [0, 1] and calls[1][1] == [1, 2] and calls[2][1] == [2]  # forward
    assert calls[4][1] == [0, 1] and calls[5][1] == [0]  # backward: the block before comes in
    # between steps the host copies are the weights, except the block the next step starts with
    assert [weights_on_the_device(b, swap) for b in swap.blocks] == [True, False, False]


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_backward_computes_with_the_weights_brought_in_for_it(compiled):
    # What makes the swap free memory: nothing of forward's copy is kept; backward (compiled too) reads the weights the
    # block holds when it runs. Here the host copy of block 0 changes between forward and backward, and the
    # gradients follow.
    transformer = lora_transformer()
    swap = swap_blocks(transformer, 3, "cpu")
    set_gradient_checkpointing(transformer, 0)
    if compiled:
        compile_blocks(transformer)
    _, reference_grads = loss_and_grads(transformer)
    out = flow_matching_step(transformer, batch(), StepConfig("uniform"), seeds=[1, 2])
    for _, host in swap.host[0]:
        host.mul_(2)
    out["loss"].backward()
    changed = [n for n, p in transformer.named_parameters() if p.requires_grad and p.grad is not None]
    changed = [
        n for n in changed if not torch.allclose(dict(transformer.named_parameters())[n].grad, reference_grads[n])
    ]
    assert changed and all(n.startswith("noise_refiner.0.") for n in changed)


def test_a_step_under_no_grad_brings_in_each_block_once_and_keeps_no_hooks():
    # validation sampling and the preservation pass without the LoRA run the blocks without gradient
    transformer = lora_transformer()
    swap = swap_blocks(transformer, 2, "cpu")
    set_gradient_checkpointing(transformer, 0)
    calls = record_residency(swap)
    with torch.no_grad():
        out = flow_matching_step(transformer, batch(), StepConfig("uniform"), seeds=[1, 2])
    assert torch.isfinite(out["loss"])
    assert [index for index, _ in calls] == [0, 1]


def test_only_the_frozen_weights_stay_in_host_memory():
    transformer = lora_transformer()
    swap = swap_blocks(transformer, 2, "cpu")
    swapped = {id(t) for pairs in swap.host for t, _ in pairs}
    blocks = checkpointable_blocks(transformer)
    lora = [p for b in blocks[:2] for n, p in b.named_parameters() if "lora_" in n]
    assert lora and not any(id(p) in swapped for p in lora)  # the LoRA trains on the device
    frozen = [p for b in blocks[:2] for p in b.parameters() if not p.requires_grad]
    assert {id(p) for p in frozen} <= swapped
    assert not any(id(p) in swapped for b in blocks[2:] for p in b.parameters())
    assert swap.weight_gib() == pytest.approx(sum(p.numel() * p.element_size() for p in frozen) / 2**30)

    # moving the model leaves them where they are ("meta" stands in for a GPU: no data, but a device of its own)
    move_except_swapped(transformer, "meta")
    assert all(p.device.type == "cpu" for p in frozen)
    assert {p.device.type for b in blocks[:2] for n, p in b.named_parameters() if "lora_" in n} == {"meta"}
    assert {p.device.type for b in blocks[2:] for p in b.parameters()} == {"meta"}
    assert {p.device.type for p in transformer.all_x_embedder.parameters()} == {"meta"}


def test_a_run_with_swapped_blocks_trains_and_samples_what_a_resident_run_does(
    tiny_model_dir, tiny_cache_dir, tmp_path
):
    # compiled, with a validation grid half-way (the pipeline calls the blocks without gradient) and at the end
    flags = {"gradient_checkpointing": True, "compile": True, "validation_steps": 3, "learning_rate": 5e-3}
    resident = train(tiny_model_dir, tiny_cache_dir, tmp_path / "resident", **flags)
    swapped = train(tiny_model_dir, tiny_cache_dir, tmp_path / "swapped", blocks_to_swap=3, **flags)
    assert [r["loss"] for r in swapped if "loss" in r] == [r["loss"] for r in resident if "loss" in r]
    state, reference = (load_file(str(tmp_path / run / LORA_WEIGHT_NAME)) for run in ("swapped", "resident"))
    assert state.keys() == reference.keys() and all(torch.equal(state[k], reference[k]) for k in state)
    assert any(v.abs().max() > 0 for k, v in state.items() if "lora_B" in k)
    grids = [Image.open(tmp_path / run / "samples" / "grid.png") for run in ("swapped", "resident")]
    assert grids[0].tobytes() == grids[1].tobytes()


def test_swapping_needs_no_checkpointing_flag_of_its_own(tiny_model_dir, tiny_cache_dir, tmp_path):
    # the swapped blocks are checkpointed, so what changes checkpointed blocks needs nothing more
    log = train(tiny_model_dir, tiny_cache_dir, tmp_path, blocks_to_swap=2, checkpoint_keep_attention=True)
    assert len([r for r in log if "loss" in r]) == 6


@pytest.mark.parametrize(
    "stage, precision, message",
    [(3, "bf16", "does not work under DeepSpeed.*deepspeed_zero3_offload"), (0, "nf4", "cannot move NF4 weights")],
)
def test_swapping_is_refused_where_something_else_places_the_weights(stage, precision, message):
    from test_low_memory import fake_deepspeed_accelerator

    from zimage_utils.memory_budget import check_memory_options

    accelerator = fake_deepspeed_accelerator(stage, {}) if stage else SimpleNamespace(distributed_type="NO")
    args = argparse.Namespace(blocks_to_swap=4, base_precision=precision, max_memory_gb=None)
    with pytest.raises(ValueError, match=message):
        check_memory_options(args, accelerator)


def test_host_copies_are_packed_into_power_of_two_buffers_with_little_left_over():
    """torch's pinned allocator rounds each request up to a power of two: Z-Image's bf16 blocks pinned tensor by
    tensor would take 16.25 GiB for 10.78 GiB of weights. Here: a block's tensor sizes at 1/1024 scale (the three FFN
    weights, four attention ones, the modulation, norms) for 32 blocks, into buffers of 256 KiB."""
    block = [75 * 1024] * 3 + [28800] * 4 + [7680, 7680, 120, 120, 64, 64]
    sizes = block * 32
    buffers = pack(sizes, buffer_bytes=256 * 1024)
    assert sorted(i for _, placed in buffers for i, _ in placed) == list(range(len(sizes)))
    for size, placed in buffers:
        assert size & (size - 1) == 0  # a power of two: what the allocator is asked for is what it takes
        spans = sorted((offset, offset + sizes[i]) for i, offset in placed)
        assert all(offset % 512 == 0 for offset, _ in spans) and spans[-1][1] <= size
        assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:]))  # no overlap
    one_by_one = sum(pinned_bytes(s) for s in sizes)
    assert sum(size for size, _ in buffers) <= 1.05 * sum(sizes) < one_by_one / 1.4


def test_moving_to_host_buffers_keeps_values_and_shares_buffers():
    g = torch.Generator().manual_seed(0)
    tensors = [
        torch.randn(40, 30, generator=g).to(torch.bfloat16),
        torch.randint(0, 255, (64, 16), generator=g, dtype=torch.uint8),  # fp8 values
        torch.randint(-(2**31), 2**31 - 1, (64,), generator=g, dtype=torch.int32),  # their row scales
        torch.randn(7, generator=g),
        torch.randn(3000, generator=g),  # 12000 bytes, more than a buffer: one of its own
        torch.randn(40, 30, generator=g).to(torch.bfloat16).t(),  # not contiguous
    ]
    before = [t.clone() for t in tensors]
    hosts = move_to_host_buffers(tensors, pin=False, buffer_bytes=8192)
    for t, host, value in zip(tensors, hosts, before):
        assert t.data.data_ptr() == host.data_ptr() and t.dtype == value.dtype and torch.equal(t, value)
    storages = {h.untyped_storage().data_ptr() for h in hosts}
    assert len(storages) == 2  # the large one alone, the rest together


@pytest.mark.skipif(not torch.cuda.is_available(), reason="copies between a GPU and pinned host memory")
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_on_a_gpu_swapped_weights_leave_the_card_and_come_back_for_each_block(compiled):
    transformer = lora_transformer().to("cuda")
    set_gradient_checkpointing(transformer, -1)
    if compiled:
        compile_blocks(transformer)
    reference_loss, reference_grads = loss_and_grads(transformer)
    before = torch.cuda.memory_allocated()
    swap = swap_blocks(transformer, 3, "cuda")
    assert all(host.is_pinned() for pairs in swap.host for _, host in pairs)
    assert before - torch.cuda.memory_allocated() >= 0.99 * swap.weight_gib() * 2**30  # they left the card
    calls = record_residency(swap)
    for _ in range(2):  # the second step starts with block 0 still on the card from the first one's backward
        loss, grads = loss_and_grads(transformer)
        assert torch.equal(loss, reference_loss)
        for name, g in grads.items():
            assert torch.allclose(g, reference_grads[name], atol=1e-6), name
    assert [index for index, _ in calls] == [0, 1, 2, 2, 1, 0] * 2
    assert calls[0][1] == [0, 1] and calls[5][1] == [0]


def wide_transformer(device: str, lora: bool = True) -> torch.nn.Module:
    """A Z-Image of the tiny one's shape but 1024 wide (~27 MiB of bf16 weights a block), with a LoRA on attention
    (`lora`)."""
    from diffusers import ZImageTransformer2DModel

    from zimage_utils.tiny import TINY_TRANSFORMER

    config = dict(TINY_TRANSFORMER, dim=1024, n_layers=14, n_heads=8, n_kv_heads=8, axes_dims=[64, 32, 32])
    torch.manual_seed(0)
    transformer = ZImageTransformer2DModel(**config).to(device, torch.bfloat16).requires_grad_(False)
    if lora:
        add_lora(transformer, rank=4, alpha=4, targets="attention")
    return transformer.to(device)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA caching allocator")
def test_on_a_gpu_blocks_copied_in_reuse_the_memory_of_blocks_that_ran():
    """With the CPU far ahead of the GPU (as it is ahead of a compiled model), every copy is queued before the blocks
    before it have run: the memory they give back must still serve the next copies, not stay reserved."""
    transformer = wide_transformer("cuda")
    set_gradient_checkpointing(transformer, -1)
    for block in checkpointable_blocks(transformer):  # each block (and its recompute) keeps the GPU busy for a while
        block.register_forward_pre_hook(lambda *_: torch.cuda._sleep(20_000_000))

    def reserved_peak_of_steps() -> int:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(3):
            out = flow_matching_step(transformer, wide_batch(), StepConfig("uniform"), seeds=[1])
            out["loss"].backward()
            transformer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_reserved()

    resident = reserved_peak_of_steps()
    swap = swap_blocks(transformer, len(checkpointable_blocks(transformer)), "cuda")
    swapped = reserved_peak_of_steps()
    weights = swap.weight_gib() * 2**30
    # Resident: all the weights and the step's own memory; swapped: that less all but 3-4 of the 15 blocks' weights
    assert swapped <= resident - 0.6 * weights, (resident / 2**20, swapped / 2**20, weights / 2**20)


def wide_batch() -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "latents": torch.randn(1, 16, 32, 32, generator=g).cuda(),
        "caption_embeds": [torch.randn(7, 16, generator=g).cuda()],
    }


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp8 made on a GPU")
def test_on_a_gpu_swapped_blocks_fp8_weights_are_made_there_and_kept_in_host_memory():
    from zimage_utils.base_precision import quantize_after_loading_
    from zimage_utils.block_swap import first_blocks

    transformer = wide_transformer("cpu", lora=False)
    swapped = first_blocks(transformer, 4)
    before = torch.cuda.memory_allocated()
    assert quantize_after_loading_(transformer, "fp8", torch.device("cuda"), swapped) > 0
    on_host = {id(t) for b in swapped for t in b.parameters()} | {id(t) for b in swapped for t in b.buffers()}
    tensors = [*transformer.named_parameters(), *transformer.named_buffers()]
    for name, t in tensors:
        if "weight_scale" in name or t.dtype == torch.uint8:  # what the quantisation made
            assert t.device.type == ("cpu" if id(t) in on_host else "cuda"), name
    # Nothing else stayed on the GPU: what it holds now is the other blocks' fp8 weights, scales and biases
    on_gpu = sum(t.numel() * t.element_size() for _, t in tensors if t.is_cuda)
    assert 0 < torch.cuda.memory_allocated() - before <= on_gpu + 2**20
