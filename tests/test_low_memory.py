"""Memory options: `--max_memory_gb` picks the fewest checkpointed blocks whose measured peak fits, and
`--base_precision fp8` / `fp8_matmul` train a LoRA over float8 base weights that loads into the ordinary pipeline.
(The GPU figures — peaks, speeds, NF4 — are in docs/BENCHMARKS.md; NF4 needs a GPU and is not run here.)"""

import argparse
import math

import pytest
import torch
from conftest import SCRIPT_DEVICE
from test_lora_io import fail_on_loader_warnings, transformer_output
from test_trainer import read_log, reset_accelerate, train, trainer_args

import train_zimage_lora
from zimage_utils import base_precision, cli, tiny
from zimage_utils.base_precision import (
    Fp8Linear,
    Fp8MatmulLinear,
    _Fp8Matmul,
    base_weight_gib,
    check_base_precision,
    cpu_has_rowwise_fp8,
    dequantize,
    quantize_fp8_,
    quantize_rows,
    use_fp8_matmul_,
)
from zimage_utils.lora import add_lora
from zimage_utils.memory_budget import (
    MemoryBudgetError,
    block_input_gib,
    choose_checkpointing,
    remedies,
    worst_case_batch,
)
from zimage_utils.step_options import compile_blocks, set_gradient_checkpointing
from zimage_utils.training_step import StepConfig, flow_matching_step


def linear_memory(floor: float, per_block: float, total: int, calls: list[int], card: float = math.inf):
    """A fake `measure`: peak = floor + per_block · (un-checkpointed blocks), OOM above `card` GiB."""

    def measure(k: int) -> float:
        calls.append(k)
        peak = floor + per_block * (total - k)
        return math.inf if peak > card else peak

    return measure


@pytest.mark.parametrize("budget", [14.0, 18.5, 24.0, 31.0, 80.0])
def test_chooses_the_fewest_checkpointed_blocks_that_fit(budget):
    # Shaped like the H100 figures: 13.8 GiB with all 32 blocks recomputed, ~0.5 GiB per block kept
    calls = []
    cal = choose_checkpointing(linear_memory(13.8, 0.5, 32, calls), 32, budget)
    fitting = [k for k in range(33) if 13.8 + 0.5 * (32 - k) <= budget]
    assert cal.measured[cal.checkpointed] <= budget
    assert cal.checkpointed == min(fitting)
    assert len(calls) <= 4  # a few measured steps, not a sweep over 33 settings
    assert "checkpointing" in cal.summary() and f"{cal.checkpointed} of 32" in cal.summary()


def test_a_prediction_that_misses_is_measured_again_until_it_fits():
    # Memory grows faster than the two probes suggest (e.g. fragmentation at large sizes): the first guess is over
    calls = []

    def measure(k):
        calls.append(k)
        kept = 32 - k
        return 13.8 + 0.5 * kept + (0.15 * kept**1.5 if kept > 4 else 0)

    cal = choose_checkpointing(measure, 32, 22.0)
    assert cal.measured[cal.checkpointed] <= 22.0
    assert len(set(calls)) >= 4  # it re-measured after the miss


def test_an_out_of_memory_probe_falls_back_to_safe_settings():
    calls = []
    cal = choose_checkpointing(linear_memory(13.8, 0.5, 32, calls, card=15.0), 32, 15.0)
    assert cal.checkpointed == 30 and cal.measured[28] == math.inf


@pytest.mark.parametrize("budget", [14.0, 18.5, 24.0])
def test_swapped_blocks_are_always_checkpointed_and_never_measured_without(budget):
    calls = []
    cal = choose_checkpointing(linear_memory(13.8, 0.5, 32, calls), 32, budget, min_blocks=20)
    fitting = [k for k in range(20, 33) if 13.8 + 0.5 * (32 - k) <= budget]
    assert cal.checkpointed == min(fitting) and min(calls) >= 20
    assert f"checkpointing {cal.checkpointed} of 32 blocks (20 swapped)" in cal.summary()


def test_optimiser_state_is_kept_out_of_the_budget():
    with_reserve = choose_checkpointing(linear_memory(13.8, 0.5, 32, []), 32, 20.0, reserve_gib=2.0)
    without = choose_checkpointing(linear_memory(13.8, 0.5, 32, []), 32, 20.0)
    assert with_reserve.checkpointed > without.checkpointed
    assert with_reserve.measured[with_reserve.checkpointed] <= 18.0


def test_a_budget_below_full_checkpointing_says_what_to_do():
    with pytest.raises(MemoryBudgetError, match="fp8/nf4.*zero3_offload") as error:
        choose_checkpointing(linear_memory(13.8, 0.5, 32, []), 32, 12.0)
    assert "13.8 GiB" in str(error.value)


def test_a_refusal_suggests_only_what_the_run_does_not_already_do():
    run = argparse.Namespace(
        train_batch_size=1,
        base_precision="fp8",
        cpu_offload_checkpointing=True,
        preservation_weight=0.0,
        blank_preservation_weight=0.0,
        blocks_to_swap=0,
    )
    advice = remedies(run)
    assert "fp8 (any GPU)" not in advice and "--cpu_offload_checkpointing" not in advice
    assert "swap blocks' weights to host memory (--blocks_to_swap N" in advice
    run.blocks_to_swap = 8
    assert "swap more blocks'" in remedies(run) and "--blocks_to_swap" not in remedies(run, zero_stage=3)
    assert "(--blocks_to_swap N, up to 32, 0.17 GiB less each)" in remedies(run, block_weight_gib=0.17)
    assert "--train_batch_size" not in advice and "nf4" in advice and "zero3_offload" in advice
    assert "--preservation_weight" not in advice
    run = argparse.Namespace(
        train_batch_size=4,
        base_precision="bf16",
        cpu_offload_checkpointing=False,
        preservation_weight=1.0,
        blank_preservation_weight=0.0,
        blocks_to_swap=0,
    )
    advice = remedies(run)
    assert all(x in advice for x in ("--train_batch_size", "fp8 (any GPU)", "--cpu_offload_checkpointing"))
    # Preservation's pass runs after the batch's backward: no more memory, so dropping it is no remedy (H200, 1024²,
    # fp8, --max_memory_gb 10: 31 blocks checkpointed with and without it); under DeepSpeed both go in one pass
    assert "--preservation_weight" not in advice
    assert "drop --preservation_weight (each" in remedies(run, zero_stage=3)
    run.blank_preservation_weight = 0.5
    assert "drop --preservation_weight and --blank_preservation_weight" in remedies(run, zero_stage=3)
    with pytest.raises(
        MemoryBudgetError,
        match=r"7.8 GiB \(\+ 0.80 GiB host copies\), above --max_memory_gb 7: lower --train_batch_size",
    ):
        choose_checkpointing(lambda k: 7.8, 32, 7.0, 0.8, reserve_for="host copies", remedies=advice)


def test_a_refusal_estimates_how_many_blocks_to_swap():
    from zimage_utils.memory_budget import swap_estimate

    with pytest.raises(MemoryBudgetError) as error:
        choose_checkpointing(linear_memory(8.3, 0.5, 32, []), 32, 7.0, reserve_gib=0.25)
    assert error.value.shortfall_gib == pytest.approx(1.55)
    # fp8 weights, 0.17 GiB a block: 10 blocks cover 1.55 GiB, and two more are on the card while swapping
    assert "--blocks_to_swap 12 would cover the 1.55 GiB missing (0.17 GiB a block): an estimate" in swap_estimate(
        1.55, 0.17, 0, 32
    )
    assert "--blocks_to_swap 18 would cover" in swap_estimate(1.55, 0.17, 8, 32)  # 8 already: in flight measured
    assert swap_estimate(9.0, 0.17, 0, 32) == "" and swap_estimate(math.inf, 0.17, 0, 32) == ""  # none would do


def test_the_trainers_budget_refusal_carries_the_swap_estimate(monkeypatch):
    from types import SimpleNamespace

    from zimage_utils import memory_budget, tiny

    model = tiny.make_tiny_pipeline(seed=0).transformer.requires_grad_(False)  # the frozen base, as the trainer's
    per_block = memory_budget.block_weight_gib(memory_budget.checkpointable_blocks(model)[-1])
    shortfall = 0.5 * per_block  # one block covers it, and two are on the card while swapping: 3 of the 3

    def refuse(*args, **kwargs):
        raise MemoryBudgetError("even with all blocks checkpointed one step needs more: remedies", shortfall)

    monkeypatch.setattr(memory_budget, "calibrate_checkpointing", refuse)
    monkeypatch.setattr(memory_budget, "item_shapes", lambda train: ([(64, 64)], [8]))
    args = argparse.Namespace(
        train_batch_size=1, optimizer="adamw", cpu_offload_checkpointing=False, checkpoint_keep_attention=False,
        max_memory_gb=1.0, base_precision="bf16", blocks_to_swap=0, preservation_weight=0.0,
        blank_preservation_weight=0.0,
    )  # fmt: skip
    accelerator = SimpleNamespace(unwrap_model=lambda m: m)
    config = SimpleNamespace(preservation_weight=0.0, blank_preservation_weight=0.0)
    with pytest.raises(MemoryBudgetError, match=r"remedies. By the weights alone --blocks_to_swap 3 would cover"):
        memory_budget.fit_memory_budget(args, accelerator, model, None, config, [], print)


def test_offload_slack_is_counted_in_block_inputs_of_the_largest_batch():
    # 1024² in latents (128²) at patch 2: 4096 image tokens + 300 caption tokens, 3840 wide, bf16, two items
    batch = worst_case_batch([(1024, 1024)], [300], 2, 16, 2560)
    assert block_input_gib(batch, 3840, 2) == 2 * (4096 + 300) * 3840 * 2 / 2**30


def test_calibration_batch_is_the_largest_shape_in_the_cache():
    batch = worst_case_batch([(1024, 1024), (768, 1408), (1408, 768)], [40, 300, 90], 2, 16, 2560)
    assert batch["latents"].shape in {(2, 16, 96, 176), (2, 16, 176, 96)}  # 768·1408 > 1024²
    assert [c.shape for c in batch["caption_embeds"]] == [(300, 2560)] * 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU it would train (CPU only)")
def test_max_memory_gb_without_a_gpu_is_refused_with_a_message(tiny_model_dir, tiny_cache_dir, tmp_path, capsys):
    reset_accelerate()
    args = trainer_args(tiny_model_dir, tiny_cache_dir, tmp_path / "out", max_memory_gb=20)
    with pytest.raises(SystemExit) as exit_:
        cli.run(train_zimage_lora.main, lambda: train_zimage_lora.parse_args(args))
    assert exit_.value.code == 2
    assert "--max_memory_gb measures GPU memory" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["cpu_offload_checkpointing", "checkpoint_keep_attention"])
def test_checkpointing_options_without_checkpointing_are_refused_with_a_message(
    flag, tiny_model_dir, tiny_cache_dir, tmp_path, capsys
):
    reset_accelerate()
    args = trainer_args(tiny_model_dir, tiny_cache_dir, tmp_path / "out", **{flag: True})
    with pytest.raises(SystemExit) as exit_:
        cli.run(train_zimage_lora.main, lambda: train_zimage_lora.parse_args(args))
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"--{flag}" in err and "add --gradient_checkpointing" in err


def test_nf4_and_deepspeed_combinations_are_refused_before_loading():
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        check_base_precision("nf4", torch.device("cpu"), 0, None)
    with pytest.raises(ValueError, match="DeepSpeed"):
        check_base_precision("fp8", torch.device("cuda"), 3, None)
    with pytest.raises(ValueError, match="training_adapter"):
        check_base_precision("nf4", torch.device("cuda"), 0, "adapter.safetensors")
    check_base_precision("fp8", torch.device("cpu"), 0, "adapter.safetensors")  # fp8 quantises after the merge


def test_fp8_matmul_on_a_gpu_without_fp8_tensor_cores_is_refused_with_the_alternative(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    with pytest.raises(ValueError, match="A100 has \\(8, 0\\): use --base_precision fp8"):
        check_base_precision("fp8_matmul", torch.device("cuda"), 0, None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    check_base_precision("fp8_matmul", torch.device("cuda"), 0, None)
    monkeypatch.setattr(base_precision, "cpu_has_rowwise_fp8", lambda: True)
    check_base_precision("fp8_matmul", torch.device("cpu"), 0, None)
    monkeypatch.setattr(base_precision, "cpu_has_rowwise_fp8", lambda: False)  # torch 2.11's CPU fp8 matmul
    with pytest.raises(ValueError, match="cannot multiply row-wise scaled fp8 on the CPU"):
        check_base_precision("fp8_matmul", torch.device("cpu"), 0, None)


CPU_FP8 = pytest.mark.skipif(not cpu_has_rowwise_fp8(), reason="this torch's CPU fp8 matmul has no row-wise scales")
# For the trainer's runs, on the scripts' device: a GPU host trains fp8_matmul on its GPU, whatever its torch's CPU can
SCRIPT_FP8 = pytest.mark.skipif(
    not (torch.cuda.get_device_capability() >= (8, 9) if SCRIPT_DEVICE == "cuda" else cpu_has_rowwise_fp8()),
    reason="fp8 matmuls on the scripts' device: fp8 tensor cores, or on the CPU a torch with row-wise scales",
)


FP8_GPU = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9), reason="needs fp8 tensor cores"
)


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize(
    "convert, device",
    [
        (quantize_fp8_, "cpu"),
        pytest.param(quantize_fp8_, "cuda", marks=CUDA),
        pytest.param(use_fp8_matmul_, "cpu", marks=CPU_FP8),
        pytest.param(use_fp8_matmul_, "cuda", marks=FP8_GPU),
    ],
)
def test_compiled_fp8_linear_gives_the_eager_result(convert, device):
    # The GPU cases matter most. fp8_matmul: inductor has its own fp8 matmul lowering, which gave zeros and wrong
    # gradients (torch 2.11, H200) until `fp8_weight_matmul` kept it out. fp8: compiling over torchao's weight-only
    # tensors never finished there (sessions 2 and 9), which is why `Fp8Linear` has its own dequantising op.
    linear = torch.nn.Sequential(torch.nn.Linear(256, 512, bias=False)).to(device, torch.bfloat16)
    convert(linear)
    x = torch.randn(300, 256, device=device, dtype=torch.bfloat16)
    grad_out = torch.randn(300, 512, device=device, dtype=torch.bfloat16)
    results = []
    for fn in (linear, torch.compile(linear)):
        x_ = x.clone().requires_grad_()
        out = fn(x_)
        out.backward(grad_out)
        results.append((out, x_.grad))
    for compiled, eager in zip(results[1], results[0]):
        assert ((compiled.float() - eager.float()).norm() / eager.float().norm()).item() < 0.01


@CPU_FP8
def test_fp8_matmul_multiplies_the_per_row_quantised_operands():
    # The product and the input gradient are exactly those of the dequantised e4m3 operands (up to the bf16 output),
    # which shows the weight's row scales folded into the gradient's columns in backward are right.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 24, 64, generator=g).to(torch.bfloat16).requires_grad_()
    weight = torch.randn(48, 64, generator=g) * torch.linspace(0.01, 3, 48)[:, None]  # rows of very unequal size
    grad_out = torch.randn(2, 24, 48, generator=g).to(torch.bfloat16)
    w_q, w_scale = quantize_rows(weight)
    assert w_q.dtype == torch.float8_e4m3fn and w_scale.shape == (48, 1)
    out = _Fp8Matmul.apply(x, w_q.view(torch.uint8), w_scale)  # the weight as stored: its bytes
    out.backward(grad_out)

    w = w_q.float() * w_scale
    x_q, x_scale = quantize_rows(x.detach().reshape(-1, 64))
    expected = ((x_q.float() * x_scale) @ w.t()).reshape(2, 24, 48)
    torch.testing.assert_close(out.float(), expected, rtol=8e-3, atol=1e-3)
    g_q, g_scale = quantize_rows(grad_out.reshape(-1, 48).float() * w_scale.t())
    expected_grad = ((g_q.float() * g_scale) @ w_q.float()).reshape(2, 24, 64)
    torch.testing.assert_close(x.grad.float(), expected_grad, rtol=8e-3, atol=1e-3)
    assert x.grad.dtype == torch.bfloat16
    # and close to the full-precision product: e4m3 keeps ~2 significant digits of each operand
    exact = x.detach().float() @ weight.t()
    assert (out.float() - exact).norm() / exact.norm() < 0.06


@CPU_FP8
def test_fp8_matmul_base_trains_close_to_bf16_and_survives_dtype_casts():
    bf16 = tiny.make_tiny_pipeline(seed=0).transformer.to(torch.bfloat16).requires_grad_(False)
    fp8 = tiny.make_tiny_pipeline(seed=0).transformer.to(torch.bfloat16).requires_grad_(False)
    assert use_fp8_matmul_(fp8, "cpu") == 7 * 4
    to_q = fp8.layers[0].attention.to_q
    assert isinstance(to_q, Fp8MatmulLinear) and to_q.weight.dtype == torch.uint8
    # the tiny FFN's 85-wide Linears are not for the GPU's fp8 matmul (sides multiples of 16): fp8 storage, bf16 matmul
    ffn = fp8.layers[0].feed_forward
    assert ffn.w1.out_features % 16 and type(ffn.w1) is Fp8Linear and ffn.w1.weight.dtype == torch.uint8
    assert base_weight_gib(fp8) < base_weight_gib(bf16)
    fp8.to(torch.float32).to(torch.bfloat16)  # casts of the whole model leave the e4m3 bytes alone
    assert to_q.weight.dtype == torch.uint8 and fp8.dtype == torch.bfloat16
    runs = []
    for transformer in (bf16, fp8):
        torch.manual_seed(0)
        add_lora(transformer, rank=4, alpha=4, targets="attention")
        assert all(p.dtype == torch.float32 for p in transformer.parameters() if p.requires_grad)
        with torch.no_grad():
            for name, p in transformer.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.02, generator=torch.Generator().manual_seed(1))
        g = torch.Generator().manual_seed(0)
        batch = {"latents": torch.randn(1, 16, 8, 8, generator=g), "caption_embeds": [torch.randn(7, 16, generator=g)]}
        loss = flow_matching_step(transformer, batch, StepConfig("uniform"), [3])["loss"]
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in transformer.parameters() if p.requires_grad])
        runs.append((float(loss), grads))
    assert runs[1][0] == pytest.approx(runs[0][0], rel=0.05)
    assert torch.nn.functional.cosine_similarity(runs[0][1], runs[1][1], dim=0) > 0.98


def test_fp8_base_stores_block_weights_in_float8_and_computes_close_to_bf16():
    bf16 = tiny.make_tiny_pipeline(seed=0).transformer.to(torch.bfloat16).requires_grad_(False)
    fp8 = tiny.make_tiny_pipeline(seed=0).transformer.to(torch.bfloat16).requires_grad_(False)
    quantized = quantize_fp8_(fp8, "cpu")
    assert quantized == 7 * 4  # attention q/k/v/out + w1/w2/w3 in each of the 4 blocks (tiny: 2 + 1 + 1)
    assert base_weight_gib(fp8) < base_weight_gib(bf16)
    to_q = fp8.layers[0].attention.to_q
    assert isinstance(to_q, Fp8Linear) and to_q.weight.dtype == torch.uint8 and fp8.dtype == torch.bfloat16
    assert fp8.layers[0].adaLN_modulation[0].weight.dtype == torch.bfloat16  # small layers stay bf16
    g = torch.Generator().manual_seed(0)
    batch = {"latents": torch.randn(1, 16, 8, 8, generator=g), "caption_embeds": [torch.randn(7, 16, generator=g)]}
    losses = [float(flow_matching_step(m, batch, StepConfig("uniform"), [3])["loss"]) for m in (bf16, fp8)]
    assert losses[0] == pytest.approx(losses[1], rel=0.05)  # e4m3 keeps ~2 significant digits per weight


def saved_tensor_shapes(fn, *args) -> tuple:
    """fn(*args), and the shape and dtype of every plain tensor autograd saves for backward while it runs."""
    saved = []

    def pack(t):
        if type(t) is torch.Tensor or type(t) is torch.nn.Parameter:
            saved.append((tuple(t.shape), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        return fn(*args), saved


def test_fp8_linears_keep_no_bf16_weight_copy_for_backward_and_give_the_same_gradients():
    # Against plain Linears holding the dequantised weights: the same loss and LoRA gradients, bit for bit, but no
    # bf16 copy of a block weight saved for backward (at full size those copies cost ~1 GiB).
    runs, lora = {}, None
    for name in ("ours", "plain"):
        transformer = tiny.make_tiny_pipeline(seed=0).transformer.to(torch.bfloat16).requires_grad_(False)
        quantize_fp8_(transformer, "cpu")
        weight_shapes = {tuple(m.weight.shape) for m in transformer.modules() if isinstance(m, Fp8Linear)}
        if name == "plain":
            for module in [m for m in transformer.modules() if isinstance(m, Fp8Linear)]:
                weight = dequantize(module.weight, module.weight_scale.view(torch.float32), torch.bfloat16)
                del module.weight_scale
                module.weight = torch.nn.Parameter(weight, requires_grad=False)
                module.__class__ = torch.nn.Linear
        add_lora(transformer, rank=4, alpha=4, targets="attention_ffn")
        # the same LoRA in both (PEFT first casts a new adapter to a floating-point base weight's dtype: the plain
        # run's starting A would be rounded to bf16)
        lora = lora or {n: p.detach().clone() for n, p in transformer.named_parameters() if p.requires_grad}
        assert not transformer.load_state_dict(lora, strict=False).unexpected_keys
        g = torch.Generator().manual_seed(0)
        batch = {"latents": torch.randn(1, 16, 8, 8, generator=g), "caption_embeds": [torch.randn(7, 16, generator=g)]}
        out, saved = saved_tensor_shapes(flow_matching_step, transformer, batch, StepConfig("uniform"), [3])
        out["loss"].backward()
        copies = [s for s, dtype in saved if s in weight_shapes and dtype == torch.bfloat16]
        grads = {n: p.grad for n, p in transformer.named_parameters() if p.requires_grad}
        runs[name] = (float(out["loss"]), grads, copies)
    assert runs["ours"][0] == runs["plain"][0]
    assert runs["ours"][1].keys() == runs["plain"][1].keys()
    assert all(torch.equal(runs["ours"][1][n], g) for n, g in runs["plain"][1].items())
    # plain: a bf16 copy for each quantised Linear whose input needs a gradient: all 28 but q/k/v of the first
    # noise-refiner block and of the context refiner, whose inputs come straight from frozen embedders.
    assert len(runs["plain"][2]) == 7 * 4 - 2 * 3
    assert runs["ours"][2] == []


def activation_bytes_saved(transformer, batch) -> int:
    """Bytes of the tensors autograd saves for backward in one training step that are not the model's own
    parameters or buffers (a compiled block saves those as plain tensors, at no cost in memory)."""
    own = {t.untyped_storage().data_ptr() for t in [*transformer.parameters(), *transformer.buffers()]}
    saved = []

    def pack(t):
        if t.untyped_storage().data_ptr() not in own:
            saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        flow_matching_step(transformer, batch, StepConfig("uniform"), [3])["loss"].backward()
    return sum(saved)


def test_compiled_checkpointed_blocks_over_an_fp8_base_keep_no_more_than_eager_ones():
    # A checkpointed block keeps its inputs and recomputes its Linears' outputs in backward. Compiled with torch
    # 2.11, the fp8 Linears' outputs (ops inside an autograd.Function) were kept instead, unless the checkpoint
    # spelt out its policy: +11 GiB at 1024² on an H200 (docs/BENCHMARKS.md, sessions 10 and 11), and 1.6 times
    # eager's bytes here. CI's torch 2.13 recomputes them either way; this guards the versions that did not.
    transformer = tiny.make_tiny_pipeline(seed=0).transformer.to(torch.bfloat16).requires_grad_(False)
    quantize_fp8_(transformer, "cpu")
    add_lora(transformer, rank=4, alpha=4, targets="attention_ffn")
    set_gradient_checkpointing(transformer, -1)
    g = torch.Generator().manual_seed(0)
    batch = {"latents": torch.randn(1, 16, 8, 8, generator=g), "caption_embeds": [torch.randn(7, 16, generator=g)]}
    eager = activation_bytes_saved(transformer, batch)
    compile_blocks(transformer)
    assert 0 < activation_bytes_saved(transformer, batch) <= eager


def test_fp8_dequantised_weight_is_within_e4m3_rounding_of_the_original():
    weight = torch.randn(64, 32, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 1, 64)[:, None]
    weight = weight.to(torch.bfloat16).float()
    linear = torch.nn.Linear(32, 64, bias=False).requires_grad_(False)
    linear.weight.data = weight.to(torch.bfloat16)
    model = torch.nn.ModuleDict({"block": linear})
    assert quantize_fp8_(model, "cpu") == 1
    back = dequantize(linear.weight, linear.weight_scale.view(torch.float32), torch.float32)
    # e4m3 keeps 3 mantissa bits (relative rounding <= 2^-4); each row's scale maps its own largest to 448, so
    # small rows keep their precision (subnormals aside: values under 2^-6 of the row's largest)
    big = weight.abs() > weight.abs().amax(dim=1, keepdim=True) * 2**-6
    assert ((back - weight).abs() <= weight.abs() * 2**-4 + 1e-6)[big].all()
    assert not torch.equal(back, weight)  # (rounded: the check above is not vacuous)


@pytest.mark.parametrize(
    "precision, compile, adapter",
    [
        ("fp8", None, "lora"),
        pytest.param("fp8_matmul", None, "lora", marks=SCRIPT_FP8),
        pytest.param("fp8_matmul", True, "lora", marks=SCRIPT_FP8),
        ("fp8", None, "lokr"),
        pytest.param("fp8_matmul", None, "lokr", marks=SCRIPT_FP8),
    ],
)
def test_training_over_an_fp8_base_saves_a_lora_the_bf16_pipeline_loads(
    tiny_model_dir, tiny_cache_dir, tmp_path, precision, compile, adapter
):
    from diffusers import ZImagePipeline
    from safetensors.torch import load_file

    out = tmp_path / precision
    # Eager, the lowest-memory setting (offload is a no-op on the CPU, wired all the same). Compiled, without it:
    # compiling the checkpointed blocks takes 58 s here on 2 cores, against 40 s (compiled checkpointing has its own
    # tests in test_step_options.py).
    lowest_memory = None if compile else True
    reset_accelerate()
    train_zimage_lora.main(
        train_zimage_lora.parse_args(
            trainer_args(
                tiny_model_dir,
                tiny_cache_dir,
                out,
                base_precision=precision,
                adapter=adapter,
                compile=compile,
                gradient_checkpointing=lowest_memory,
                cpu_offload_checkpointing=lowest_memory,
                max_train_steps=30,
                learning_rate=2e-3,
                logging_steps=10,
            )
        )
    )
    losses = [r["loss"] for r in read_log(out) if "loss" in r]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    state = load_file(str(out / "pytorch_lora_weights.safetensors"))
    trained = [v for k, v in state.items() if "lora_B" in k or "lokr_w1" in k]  # the factors that start at zero
    assert trained and all(v.abs().max() > 0 for v in trained)  # every adapted layer was trained
    pipe = ZImagePipeline.from_pretrained(tiny_model_dir)
    base = transformer_output(pipe.transformer)
    with fail_on_loader_warnings():  # every key found its layer
        pipe.load_lora_weights(out)
    assert (transformer_output(pipe.transformer) - base).abs().max() > 1e-3


@pytest.mark.parametrize("precision", ["fp8", pytest.param("fp8_matmul", marks=SCRIPT_FP8)])
def test_a_run_over_an_fp8_base_resumes_to_the_same_losses(tiny_model_dir, tiny_cache_dir, tmp_path, precision):
    # The checkpoint holds only the LoRA and the loop state; the base is quantised again from the model on resume.
    flags = dict(base_precision=precision, max_train_steps=6, checkpointing_steps=3, learning_rate=3e-3)
    whole = train(tiny_model_dir, tiny_cache_dir, tmp_path / "whole", **flags)
    train(tiny_model_dir, tiny_cache_dir, tmp_path / "resumed", **flags, max_train_steps_this_run=3)
    resumed = train(tiny_model_dir, tiny_cache_dir, tmp_path / "resumed", **flags, resume_from_checkpoint="latest")
    losses = [[r["loss"] for r in log if "loss" in r] for log in (whole, resumed)]
    assert len(losses[0]) == 6 and losses[0] == losses[1]


def fake_deepspeed_accelerator(stage: int, zero: dict):
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    plugin = SimpleNamespace(zero_stage=stage, deepspeed_config={"zero_optimization": dict(zero)})
    return SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, state=SimpleNamespace(deepspeed_plugin=plugin))


def test_zero3_live_parameters_are_capped_unless_the_config_file_says_otherwise():
    from zimage_utils.distributed import configure_deepspeed

    ours = fake_deepspeed_accelerator(3, {"stage": 3})
    configure_deepspeed(ours, 1, int(2e8))
    zero = ours.state.deepspeed_plugin.deepspeed_config["zero_optimization"]
    assert zero["stage3_max_live_parameters"] == zero["stage3_max_reuse_distance"] == int(2e8)
    users = fake_deepspeed_accelerator(3, {"stage": 3, "stage3_max_live_parameters": 5e8})
    configure_deepspeed(users, 1, int(2e8))
    assert users.state.deepspeed_plugin.deepspeed_config["zero_optimization"]["stage3_max_live_parameters"] == 5e8
    for stage, limit in ((2, int(2e8)), (3, 0)):  # ZeRO-2 has no such setting; 0 keeps DeepSpeed's default
        other = fake_deepspeed_accelerator(stage, {"stage": stage})
        configure_deepspeed(other, 1, limit)
        assert "stage3_max_live_parameters" not in other.state.deepspeed_plugin.deepspeed_config["zero_optimization"]


def test_ddp_leaves_the_frozen_base_out_of_its_broadcast():
    from zimage_utils.distributed import skip_frozen_in_ddp
    from zimage_utils.lora import add_lora

    transformer = tiny.make_tiny_pipeline(seed=0).transformer.to(torch.bfloat16)
    use_fp8_matmul_(transformer)  # whose weight scales are buffers
    add_lora(transformer, rank=4)
    skip_frozen_in_ddp(transformer)
    ignored = set(transformer._ddp_params_and_buffers_to_ignore)
    trainable = {n for n, p in transformer.named_parameters() if p.requires_grad}
    buffers = {n for n, _ in transformer.named_buffers()}
    assert trainable and buffers and not ignored & trainable
    assert ignored | trainable == {n for n, _ in transformer.named_parameters()} | buffers


def test_compiling_with_an_activation_memory_budget_gives_the_same_loss():
    from test_step_options import lora_transformer, loss_and_grads

    reference, _ = loss_and_grads(lora_transformer())
    transformer = lora_transformer()
    previous = torch._functorch.config.activation_memory_budget
    try:
        compile_blocks(transformer, activation_memory_budget=0.5)
        assert torch._functorch.config.activation_memory_budget == 0.5
        loss, _ = loss_and_grads(transformer)
    finally:
        torch._functorch.config.activation_memory_budget = previous
    assert torch.allclose(loss, reference, rtol=1e-4)


def test_an_over_budget_warning_says_whether_training_or_validation_sampling_went_over():
    from zimage_utils.memory_budget import budget_overshoot

    training = budget_overshoot(11.8, 11.5, 12)
    assert "in training" in training and "--max_memory_gb 11.2." in training  # a budget that would have fit
    # Sampling set the peak (e.g. at step 8's validation; the window logged at 12 shows it): a lower budget would
    # leave sampling as it was, so the warning points at the sampling resolution instead
    sampling = budget_overshoot(11.8, 11.5, 12, validation_peak_gib=11.8)
    assert "validation sampling took the card to 11.80 GiB" in sampling and "--validation_resolution" in sampling
    assert "11.2" not in sampling
    # Sampling went over, but training has gone further since
    assert budget_overshoot(11.8, 11.5, 12, validation_peak_gib=11.6) == training
    assert budget_overshoot(11.5, 11.5, 12, validation_peak_gib=11.5) is None


def test_memory_calibration_in_the_trainer_leaves_training_unchanged(
    tiny_model_dir, tiny_cache_dir, tmp_path, monkeypatch, caplog
):
    """The trainer's --max_memory_gb path on the CPU, with the GPU's memory reading replaced by a fake that still
    runs each calibration step: it picks the setting the fake says fits, sets it, and the logged losses equal a run
    given that setting directly (calibration takes no optimiser step and draws no random numbers)."""
    import logging

    import zimage_utils.memory_budget as memory_budget
    from zimage_utils import train_log

    settings, options = [], []  # each checkpointing setting the calibration applies, in order, and its options
    real_set = memory_budget.set_gradient_checkpointing

    def recording_set(model, k, *how):
        settings.append(real_set(model, k, *how))
        options.append(how)
        return settings[-1]

    def fake_peak(run_step, device):
        run_step()  # the real forward + backward on the worst-case batch
        return 10.0 + 1.0 * (3 - settings[-1])  # 10 GiB + 1 GiB per block not checkpointed (the tiny model has 3)

    real_read = train_log.LogWindow.read

    def read_with_peak(self, *args):  # the CUDA figure the CPU has none of: 0.3 GiB over the budget below
        return {**real_read(self, *args), "peak_reserved_gib": 11.8}

    monkeypatch.setattr(train_log.LogWindow, "read", read_with_peak)
    monkeypatch.setattr(memory_budget, "measure_peak_gib", fake_peak)
    monkeypatch.setattr(memory_budget, "set_gradient_checkpointing", recording_set)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a, **k: None)
    monkeypatch.setattr(train_zimage_lora, "check_memory_options", lambda args, accelerator: None)
    caplog.set_level(logging.INFO, logger="train")

    # measured, and then trained, the way it was asked for (host offload is a no-op on the CPU)
    keep = {"checkpoint_keep_attention": True, "cpu_offload_checkpointing": True}
    calibrated = train(tiny_model_dir, tiny_cache_dir, tmp_path / "calibrated", max_memory_gb=11.5, **keep)
    # 11.5 GiB minus a tiny reserve (optimiser state, host copies): one block may stay un-checkpointed
    assert "checkpointing 2 of 3 blocks" in caplog.text and settings[-1] == 2
    assert "GiB optimiser state and host copies in flight" in caplog.text
    # Past the budget in a logged window: said once, with a budget that would have fit
    assert caplog.text.count("above --max_memory_gb 11.5") == 1 and "--max_memory_gb 11.2." in caplog.text
    assert options and all(how == (True, True) for how in options)  # (offload, keep_attention)
    reference = train(tiny_model_dir, tiny_cache_dir, tmp_path / "given", gradient_checkpointing_blocks=2, **keep)
    assert [r["loss"] for r in calibrated] == [r["loss"] for r in reference]


def test_a_training_step_out_of_gpu_memory_ends_the_run_with_what_to_change(
    tiny_model_dir, tiny_cache_dir, tmp_path, monkeypatch, capsys
):
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(train_zimage_lora, "flow_matching_step", out_of_memory)
    reset_accelerate()
    flags = trainer_args(tiny_model_dir, tiny_cache_dir, tmp_path, max_train_steps=2)
    with pytest.raises(SystemExit) as stopped:
        cli.run(train_zimage_lora.main, lambda: train_zimage_lora.parse_args(flags))
    assert stopped.value.code == 2
    message = capsys.readouterr().err
    assert "error: out of GPU memory in training step 1 (a batch of 1 at " in message
    assert "give --max_memory_gb (a little under the card, e.g. 22 on a 24 GB one)" in message
    assert "use --base_precision fp8 (any GPU) or nf4" in message and "--resume_from_checkpoint latest" in message


def test_out_of_memory_under_a_budget_points_at_what_else_holds_the_card():
    from zimage_utils.memory_budget import out_of_memory_explained

    run = argparse.Namespace(
        max_memory_gb=10.0,
        gradient_checkpointing=False,
        gradient_checkpointing_blocks=0,
        train_batch_size=2,
        base_precision="fp8",
        cpu_offload_checkpointing=True,
        preservation_weight=0.0,
        blank_preservation_weight=0.0,
        blocks_to_swap=0,
    )
    batch = {"latents": torch.zeros(2, 16, 128, 96), "caption_embeds": [torch.zeros(77, 8), torch.zeros(120, 8)]}
    with pytest.raises(cli.OutOfGPUMemory) as error, out_of_memory_explained(run, 7, batch):
        raise torch.OutOfMemoryError("CUDA out of memory")
    message = str(error.value)
    assert message.startswith("out of GPU memory in training step 7 (a batch of 2 at 768x1024 px, 120 caption tokens)")
    assert "something else held the card" in message and "lower --train_batch_size" in message
    assert "--base_precision nf4" in message and "--cpu_offload_checkpointing" not in message  # it has that already
    with out_of_memory_explained(run, 8, batch):  # no error, nothing raised
        pass
    # Under DeepSpeed, where --max_memory_gb is refused: checkpointing, then the rest
    run.gradient_checkpointing = run.gradient_checkpointing_blocks = False
    with pytest.raises(cli.OutOfGPUMemory) as error, out_of_memory_explained(run, 7, batch, zero_stage=2):
        raise torch.OutOfMemoryError("CUDA out of memory")
    assert "--max_memory_gb" not in str(error.value) and ": add --gradient_checkpointing, or lower" in str(error.value)
