"""Speed options change how the step runs, never what it computes: selective checkpointing and regional compilation
give the eager step's loss and gradients (the GPU timings are in docs/BENCHMARKS.md, not here)."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from zimage_utils import tiny
from zimage_utils.attention import RealRopeAttnProcessor, use_real_rope
from zimage_utils.lora import add_lora
from zimage_utils.step_options import (
    ATTENTION_OPS,
    checkpointable_blocks,
    compile_blocks,
    set_gradient_checkpointing,
)
from zimage_utils.training_step import StepConfig, flow_matching_step


def lora_transformer(adapter: str = "lora"):
    transformer = tiny.make_tiny_pipeline(seed=0).transformer
    add_lora(transformer, rank=4, alpha=4, targets="attention", adapter=adapter)
    with torch.no_grad():  # a non-zero adapter, so its gradients and outputs are not trivially equal
        for name, p in transformer.named_parameters():
            if "lora_B" in name or "lokr_w1" in name:
                p.normal_(std=0.02)
    return transformer


def batch():
    g = torch.Generator().manual_seed(0)
    return {
        "latents": torch.randn(2, 16, 8, 8, generator=g),
        "caption_embeds": [torch.randn(7, 16, generator=g), torch.randn(11, 16, generator=g)],
    }


def loss_and_grads(transformer):
    out = flow_matching_step(transformer, batch(), StepConfig("uniform"), seeds=[1, 2])
    out["loss"].backward()
    grads = {n: p.grad.clone() for n, p in transformer.named_parameters() if p.requires_grad}
    transformer.zero_grad(set_to_none=True)
    return out["loss"].detach(), grads


@pytest.mark.parametrize("blocks", [-1, 1])
def test_checkpointing_some_or_all_blocks_leaves_loss_and_gradients_unchanged(blocks):
    transformer = lora_transformer()
    reference_loss, reference_grads = loss_and_grads(transformer)
    n = set_gradient_checkpointing(transformer, blocks)
    assert n == (len(checkpointable_blocks(transformer)) if blocks < 0 else blocks)
    loss, grads = loss_and_grads(transformer)
    assert torch.allclose(loss, reference_loss, atol=1e-6)
    for name, g in grads.items():
        assert torch.allclose(g, reference_grads[name], atol=1e-6), name
    assert set_gradient_checkpointing(transformer, 0) == 0 and not transformer.gradient_checkpointing


def test_offloading_checkpointed_inputs_moves_only_the_hidden_states_and_leaves_gradients_unchanged(monkeypatch):
    transformer = lora_transformer()
    reference_loss, reference_grads = loss_and_grads(transformer)
    packed = fake_host_copies(monkeypatch)
    n = set_gradient_checkpointing(transformer, -1, offload=True)
    loss, grads = loss_and_grads(transformer)
    assert torch.equal(loss, reference_loss)
    for name, g in grads.items():
        assert torch.allclose(g, reference_grads[name], atol=1e-6), name
    assert_only_hidden_states_moved(packed, n, transformer)


def fake_host_copies(monkeypatch) -> list[tuple[int, ...]]:
    """On the CPU there is no host memory to move to (the streams and copies are checked on the GPU by
    benchmarks/bench_train_step.py --profile_offload), so each tensor `HostOffload` would move is cloned instead.
    Returns the list the shapes of those tensors are appended to."""
    from zimage_utils import step_options

    packed, real_pack = [], step_options.HostOffload.pack

    def pack_a_copy(self, tensor):
        if not self.moves(tensor):
            return real_pack(self, tensor)
        packed.append(tuple(tensor.shape))
        return [tensor.detach().clone()]

    monkeypatch.setattr(step_options.HostOffload, "pack", pack_a_copy)
    monkeypatch.setattr(step_options.HostOffload, "unpack", lambda self, i: i[0] if isinstance(i, list) else i)
    return packed


def assert_only_hidden_states_moved(packed: list[tuple[int, ...]], checkpointed: int, transformer) -> None:
    # Every checkpointed block but the first noise-refiner one (its input comes from the frozen embedder) hands over
    # its hidden-state input [B, tokens, dim], and nothing else.
    dim = transformer.config.dim
    assert len(packed) == checkpointed - 1 and all(len(s) == 3 and s[0] == 2 and s[2] == dim for s in packed)


class AttentionCalls(TorchDispatchMode):
    """Counts the attention kernels a step runs (forward and backward), whatever SDPA backend the device picks."""

    def __init__(self):
        super().__init__()
        self.forward = self.backward = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in ATTENTION_OPS:
            self.forward += 1
        elif "scaled_dot_product" in str(func) and "backward" in str(func):
            self.backward += 1
        return func(*args, **(kwargs or {}))


def test_keeping_attention_outputs_skips_their_recomputation_and_changes_no_gradient():
    transformer = lora_transformer()
    reference_loss, reference_grads = loss_and_grads(transformer)
    calls = {}
    for keep in (False, True):
        n = set_gradient_checkpointing(transformer, -1, keep_attention=keep)
        with AttentionCalls() as counted:
            loss, grads = loss_and_grads(transformer)
        calls[keep] = counted
        assert torch.equal(loss, reference_loss)
        for name, g in grads.items():
            assert torch.allclose(g, reference_grads[name], atol=1e-6), name
    attentions = len(transformer.noise_refiner) + len(transformer.context_refiner) + len(transformer.layers)
    assert calls[False].backward == calls[True].backward == attentions
    assert calls[False].forward == attentions + n  # every checkpointed block runs its attention again in backward
    assert calls[True].forward == attentions  # kept: backward reuses the saved output


def test_checkpointing_swaps_the_block_class_but_not_its_name_or_state_dict():
    transformer = lora_transformer()
    keys = list(transformer.state_dict())
    plain = type(transformer.layers[0])
    set_gradient_checkpointing(transformer, 1, keep_attention=True)
    first, rest = checkpointable_blocks(transformer)[0], checkpointable_blocks(transformer)[1:]
    assert type(first) is not plain and isinstance(first, plain) and type(first).__name__ == plain.__name__
    assert all(type(b) is plain for b in rest)
    assert list(transformer.state_dict()) == keys
    set_gradient_checkpointing(transformer, 0)
    assert all(type(b) is plain for b in checkpointable_blocks(transformer))


def test_compiled_checkpointed_blocks_keep_loss_and_gradients_and_offload_only_hidden_states(monkeypatch):
    # Inside a compiled block the checkpoint saves the LoRA weights too (parameters): they must stay where they are.
    transformer = lora_transformer()
    reference_loss, reference_grads = loss_and_grads(transformer)
    compile_blocks(transformer)
    packed = fake_host_copies(monkeypatch)
    for keep in (False, True):
        packed.clear()
        n = set_gradient_checkpointing(transformer, -1, offload=True, keep_attention=keep)
        loss, grads = loss_and_grads(transformer)
        assert torch.allclose(loss, reference_loss, rtol=1e-4)
        for name, g in grads.items():
            assert torch.allclose(g, reference_grads[name], rtol=1e-3, atol=1e-5), name
        assert_only_hidden_states_moved(packed, n, transformer)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="copies between a GPU and pinned host memory")
def test_on_a_gpu_offloaded_inputs_go_to_pinned_host_memory_and_come_back_unchanged(monkeypatch):
    # The real copies and streams (CI has no GPU; run on the device machine).
    from zimage_utils import step_options

    transformer = lora_transformer().cuda()
    reference_loss, reference_grads = loss_and_grads(transformer)
    pinned, real_pack = [], step_options.HostOffload.pack

    def spy(self, tensor):
        packed = real_pack(self, tensor)
        if not isinstance(packed, torch.Tensor):
            pinned.append(packed.host.is_pinned())
        return packed

    monkeypatch.setattr(step_options.HostOffload, "pack", spy)
    n = set_gradient_checkpointing(transformer, -1, offload=True)
    flow_matching_step(transformer, batch(), StepConfig("uniform"), seeds=[1, 2])  # a graph dropped unused
    for _ in range(2):  # and two full steps after it
        loss, grads = loss_and_grads(transformer)
        assert torch.allclose(loss, reference_loss, atol=1e-6)
        for name, g in grads.items():
            assert torch.allclose(g, reference_grads[name], atol=1e-6), name
    assert len(pinned) == 3 * (n - 1) and all(pinned)


@pytest.mark.parametrize("adapter", ["lora", "lokr"])
def test_compiled_blocks_give_the_eager_loss(adapter):
    transformer = lora_transformer(adapter)
    reference_loss, reference_grads = loss_and_grads(transformer)
    compile_blocks(transformer)
    loss, grads = loss_and_grads(transformer)
    # fp32 on the CPU: inductor reorders reductions, so equal up to float rounding, not bit for bit
    assert torch.allclose(loss, reference_loss, rtol=1e-4)
    for name, g in grads.items():
        assert torch.allclose(g, reference_grads[name], rtol=1e-3, atol=1e-5), name


def test_real_valued_rotary_embedding_computes_what_diffusers_complex_one_does():
    reference = lora_transformer()
    reference_loss, reference_grads = loss_and_grads(reference)
    transformer = lora_transformer()
    assert use_real_rope(transformer) == 4  # every attention of the tiny model (2 + 1 + 1 blocks)
    assert all(
        isinstance(m.processor, RealRopeAttnProcessor) for m in transformer.modules() if hasattr(m, "processor")
    )
    loss, grads = loss_and_grads(transformer)
    assert torch.allclose(loss, reference_loss, atol=1e-6)
    for name, g in grads.items():
        assert torch.allclose(g, reference_grads[name], atol=1e-6), name
    compile_blocks(transformer)  # and it compiles (complex ops would not fuse)
    compiled_loss, _ = loss_and_grads(transformer)
    assert torch.allclose(compiled_loss, reference_loss, rtol=1e-4)
