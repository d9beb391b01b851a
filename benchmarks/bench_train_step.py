"""Training-step speed and memory: the naive eager diffusers+PEFT step against our trainer's own step function
(`zimage_utils.training_step.flow_matching_step`) with its options, side by side in one run.

    python benchmarks/bench_train_step.py --out step.json                 # full-size Z-Image, random weights, GPU
    python benchmarks/bench_train_step.py --tiny                          # CPU smoke test at tiny size

Prints s/step, samples/s, peak GiB, achieved TFLOP/s and % of a bf16 matmul peak measured in the same run, and
the ratio to the naive step; writes JSON. LoRA r32 on attention, bf16 base, fp32 LoRA, AdamW, caption 128 tokens.
"Ours" is the model as the trainer prepares it (accelerate, bf16 autocast) running `flow_matching_step`.

--part speed: eager and compiled steps over checkpointing settings and sizes, the trainer's `--max_memory_gb`
calibration (then the chosen setting timed), host syncs per step, a profile (kernel time by kind, idle, top kernels),
and recompiled variants (inductor's activation-memory budget; diffusers' complex rotary embedding).
--part fp8: `--base_precision fp8_matmul` against the bf16 base: one Linear's fp8 and bf16 matmuls alone, and the
transposing copy of its weight eager and compiled; the loss and LoRA gradients of each, eager and compiled, against
the eager bf16 step on the same inputs; each eager with full checkpointing, then compiled at 1024² bs1 without
checkpointing (the 24 GiB target; also with backward's weight transpose as eager's strided copy instead of the
inductor kernel the trainer uses on a GPU) and fully
checkpointed, and 512²; then interleaved rounds (the model not being timed waits in host memory, so each peak is its
own) and a profile. With `--compile_quantized`, the fp8 weight-only base (`--base_precision fp8`) gets the same
agreement check and its eager and compiled 1024² rows (over torchao's tensors, up to session 9, compiling it never
finished on an H100/H200).
--part lokr: `--adapter lokr` (factor 4, on attention), our LoKr layer against PEFT's forward: same gradients, and
their compiled 1024² steps.
--part dora: `--adapter dora` against LoRA (r32 on attention, 1024² bs1): eager with every block checkpointed, compiled
without checkpointing, and DoRA over an NF4 base (CUDA: from a saved random model, eager, checkpointed).
--part memory: bf16 / fp8 / NF4 (bitsandbytes) bases loaded through the trainer's `load_transformer` from a saved
random model (set BENCH_TMP to a roomy disk: it is 11.5 GiB), 8-bit AdamW and `--cpu_offload_checkpointing`. `--profile_offload` adds, for
compiled bf16: a gradient check with and without offload, an interleaved A/B of their step times, and a profile of each
with host-side calls. `--precisions` picks the bases.

    BENCH_TMP=/tmp python benchmarks/bench_train_step.py --part memory --profile_offload --out memory.json   # ~5 min
"""

import argparse
import gc
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from accelerate import Accelerator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusers.models.transformers.transformer_z_image import ZSingleStreamAttnProcessor  # noqa: E402

from zimage_utils import base_precision, tiny  # noqa: E402
from zimage_utils.attention import RealRopeAttnProcessor, use_real_rope  # noqa: E402
from zimage_utils.base_precision import (  # noqa: E402
    _Fp8Matmul,
    base_weight_gib,
    nf4_config,
    quantize_fp8_,
    quantize_rows,
    use_fp8_matmul_,
)
from zimage_utils.lora import add_lora  # noqa: E402
from zimage_utils.memory_budget import MemoryBudgetError, calibrate_checkpointing  # noqa: E402
from zimage_utils.model_loading import load_transformer  # noqa: E402
from zimage_utils.optimizers import make_optimizer  # noqa: E402
from zimage_utils.step_options import compile_blocks, set_gradient_checkpointing  # noqa: E402
from zimage_utils.training_step import StepConfig, flow_matching_step  # noqa: E402

FULL = dict(
    dim=3840,
    n_layers=30,
    n_refiner_layers=2,
    n_heads=30,
    n_kv_heads=30,
    cap_feat_dim=2560,
    axes_dims=[32, 48, 48],
    axes_lens=[1024, 512, 512],
)
CAPTION_TOKENS = 128


def build_transformer(config: dict, device, dtype):
    from diffusers import ZImageTransformer2DModel

    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise directly in bf16: no fp32 copy of 6B parameters
    with torch.device(device):
        model = ZImageTransformer2DModel(**config)
    torch.set_default_dtype(previous)
    with torch.no_grad():
        model.x_pad_token.normal_(std=0.02)
        model.cap_pad_token.normal_(std=0.02)
    return model.requires_grad_(False)


def step_flops(cfg: dict, h: int, w: int, batch: int, recomputed_blocks: int) -> float:
    """Matmul + attention FLOPs of one LoRA training step (frozen base: forward + input gradients, no weight
    gradients; recomputed blocks run their forward twice). Image tokens (h/16)(w/16), caption 128, padded to 32."""
    d, ffn = cfg["dim"], 10240 if cfg["dim"] == 3840 else int(cfg["dim"] / 3 * 8)
    pad = lambda n: n + (-n) % 32  # noqa: E731
    t_img, t_cap = pad((h // 16) * (w // 16)), pad(CAPTION_TOKENS)
    per_token = 2 * (4 * d * d + 3 * d * ffn)  # forward matmul FLOPs per token per block
    blocks = [t_img] * cfg["n_refiner_layers"] + [t_img + t_cap] * cfg["n_layers"]  # checkpointable, in order
    total = sum(2 * (t * per_token + 4 * t * t * d) for t in [t_cap] * cfg["n_refiner_layers"])
    for i, t in enumerate(blocks):
        fwd = t * per_token + 4 * t * t * d
        total += fwd * (3 if i < recomputed_blocks else 2) + 4 * t * t * d  # attention backward ~2x forward
    return total * batch


def ms_per_call(fn, *operands, calls: int = 20) -> float:
    """GPU milliseconds per `fn(*operands)`, after 5 untimed calls."""
    for _ in range(5):
        fn(*operands)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn(*operands)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e3


def matmul_peak_tflops(device) -> float:
    if device.type != "cuda":
        return float("nan")
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    return 2 * 8192**3 / (ms_per_call(torch.matmul, a, b, calls=10) / 1e3) / 1e12


def make_batch(c: int, h: int, w: int, batch: int, cap_dim: int, device):
    g = torch.Generator(device="cpu").manual_seed(1)
    return {
        "latents": torch.randn(batch, c, h // 8, w // 8, generator=g).to(device),
        "caption_embeds": [torch.randn(CAPTION_TOKENS, cap_dim, generator=g).to(device) for _ in range(batch)],
    }


def naive_step(transformer, batch):
    """What a first diffusers+PEFT training script does: global-RNG noise and t, one forward, MSE."""
    x1 = batch["latents"]
    x0 = torch.randn_like(x1)
    t = torch.rand(x1.shape[0], device=x1.device)
    x_t = t.view(-1, 1, 1, 1) * x1 + (1 - t.view(-1, 1, 1, 1)) * x0
    out = transformer(
        list(x_t.to(torch.bfloat16).unsqueeze(2).unbind(0)),
        t,
        [c.to(torch.bfloat16) for c in batch["caption_embeds"]],
        return_dict=False,
    )[0]
    pred = torch.stack(out).squeeze(2).float()
    return torch.nn.functional.mse_loss(pred, x1 - x0)


def ours(seeds):
    """Our trainer's step function (the model given to it is prepared by accelerate, as in the trainer)."""
    return lambda model, batch: flow_matching_step(model, batch, StepConfig("uniform"), seeds)["loss"]


def lora_params(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def measure(model, batch, step_fn, warmup: int, steps: int, device, optimizer_name="adamw") -> dict:
    """Restore the LoRA to zero-B init values, then time `steps` optimiser steps after `warmup`."""
    params = lora_params(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.zero_()
    optimizer = make_optimizer(params, optimizer_name, 1e-5)
    if hasattr(optimizer, "train"):  # schedule-free AdamW steps only in its train mode
        optimizer.train()
    first_loss = None
    for i in range(warmup + steps):
        if i == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
        loss = step_fn(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if first_loss is None:
            first_loss = float(loss.detach())
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    reserved = torch.cuda.max_memory_reserved() / 2**30 if device.type == "cuda" else float("nan")
    del optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"s_per_step": seconds, "peak_gib": peak, "reserved_gib": reserved, "first_loss": first_loss}


def count_host_syncs(model, batch_cpu, step_fn, device, steps: int = 3) -> dict:
    """Host syncs per training step as the trainer runs it (pinned CPU batch → step → backward → clip → AdamW):
    CUDA's sync debug mode reports each synchronising call."""
    if device.type != "cuda":
        return {"syncs_per_step": None}
    batch = {
        "latents": batch_cpu["latents"].pin_memory(),
        "caption_embeds": [c.pin_memory() for c in batch_cpu["caption_embeds"]],
    }
    params = lora_params(model)
    optimizer = make_optimizer(params, "adamw", 1e-5)
    for _ in range(2):  # warm up (compile, optimiser state)
        step_fn(model, batch).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(steps):
            step_fn(model, batch).backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    syncs = [str(w.message).splitlines()[0][:160] for w in caught if "synchroniz" in str(w.message).lower()]
    return {"syncs_per_step": len(syncs) / steps, "examples": sorted(set(syncs))[:5]}


KERNEL_KINDS = [  # first match wins; names as CUDA/Triton kernels appear in the profiler
    ("attention", ("flash", "fmha", "attention", "sdpa", "cudnn_")),
    ("matmul", ("gemm", "sm90_", "sm80_", "cutlass", "nvjet", "xmma", "wgmma", "matmul", "cublas")),
    ("optimizer", ("adam", "multi_tensor")),
    ("elementwise", ("triton", "elementwise", "vectorized", "reduce", "copy", "fill", "cat", "index", "norm")),
]


def kernel_ms(prof, steps: int) -> dict[str, float]:
    """CUDA kernel name → ms per step, from a profile that ran `steps` steps."""
    kernels = {}
    for event in prof.key_averages():
        t = event.self_device_time_total / 1e3 / steps
        if t > 0 and event.device_type.name == "CUDA":
            kernels[event.key] = kernels.get(event.key, 0.0) + t
    return kernels


def profile_step(model, batch, step_fn, device, steps: int = 3, cpu: bool = False) -> dict:
    """Where a step's GPU time goes: kernel time by kind, idle (wall − kernel time), top kernels; cpu: also the
    host-side calls that took the most time (allocations, copies, synchronisations)."""
    from torch.profiler import ProfilerActivity, profile

    params = lora_params(model)
    optimizer = make_optimizer(params, "adamw", 1e-5)
    for _ in range(2):
        step_fn(model, batch).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA] + [ProfilerActivity.CPU] * cpu) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step_fn(model, batch).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - start) * 1e3 / steps
    kernels = kernel_ms(prof, steps)
    by_kind = {kind: 0.0 for kind, _ in KERNEL_KINDS} | {"other": 0.0}
    for name, t in kernels.items():
        low = name.lower()
        kind = next((k for k, keys in KERNEL_KINDS if any(key in low for key in keys)), "other")
        by_kind[kind] += t
    busy = sum(kernels.values())
    by_kind["idle"] = max(0.0, wall_ms - busy)
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:12]
    host = {}
    for event in prof.key_averages() if cpu else []:
        if event.device_type.name == "CPU" and event.key.startswith(("cuda", "aten::", "Pinned", "Caching")):
            host[event.key] = event.self_cpu_time_total / 1e3 / steps
    return {
        "top_host_calls_ms": [[k, t] for k, t in sorted(host.items(), key=lambda kv: -kv[1])[:15]],
        "wall_ms_per_step": wall_ms,
        "ms_by_kind": by_kind,
        "pct_by_kind": {k: 100 * v / wall_ms for k, v in by_kind.items()},
        "top_kernels_ms": [[name[:120], t] for name, t in top],
    }


def save_random_model(cfg: dict, folder: Path, device) -> None:
    """A diffusers folder with the full-size transformer (random weights), loadable by our `load_transformer`."""
    model = build_transformer(cfg, device, torch.bfloat16)
    model.save_pretrained(folder / "transformer")
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()


def outer_checkpointing(transformer) -> int:
    """Every block checkpointed the way the trainer did before session 4: an eager checkpoint around the (compiled)
    block, so its recomputation is the whole compiled forward run again. Kept here only to compare against."""
    from zimage_utils.step_options import checkpointable_blocks

    set_gradient_checkpointing(transformer, 0)
    chosen = {id(b) for b in checkpointable_blocks(transformer)}

    def checkpoint_some(block, *args):
        if id(block) not in chosen:
            return block(*args)
        return torch.utils.checkpoint.checkpoint(block.__call__, *args, use_reentrant=False)

    transformer.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint_some)
    return len(chosen)


def checkpointing_variants(args, cfg, accelerator, device, big, warmup, steps, record, save) -> dict:
    """--part ckpt: every block checkpointed, compiled, 1024² bs1, three ways: the checkpoint around the compiled
    block (before), inside it (now: the compiler builds the recomputation into the backward), and inside it keeping
    the attention outputs (`keep_attention`); also with offload, and some blocks. Interleaved rounds for the times,
    LoRA gradients compared, and a profile of each way."""
    transformer = build_transformer(cfg, device, torch.bfloat16)
    add_lora(transformer, rank=32, alpha=32, targets="attention")
    use_real_rope(transformer)
    model = accelerator.prepare_model(transformer)
    compile_blocks(transformer)
    batch = make_batch(16, big, big, 1, cfg["cap_feat_dim"], device)
    total = len(transformer.noise_refiner) + len(transformer.layers)
    ways = {
        "outer": lambda: outer_checkpointing(transformer),
        "inner": lambda: set_gradient_checkpointing(transformer, -1),
        "inner keep_attention": lambda: set_gradient_checkpointing(transformer, -1, keep_attention=True),
    }
    out = {"grads": {}, "ab_s_per_step": {w: [] for w in ways}, "profiles": {}}
    nonzero_lora(model)  # so the A gradients are compared too
    start = lora_snapshot(model)
    reference = None
    for way, apply in ways.items():  # the same LoRA values and batch for each way: compare the gradients
        apply()
        restore_lora(model, start)
        _, grads = loss_and_grads(model, batch)  # (the first call of each way also compiles it)
        reference = grads if reference is None else reference
        out["grads"][way] = float((grads - reference).abs().max())
        del grads
    del reference, start
    for way, apply in ways.items():
        apply()
        record(f"ours compiled ckpt {way}", model, big, 1, total)
    record(
        "ours compiled ckpt inner keep_attention offload",
        model,
        big,
        1,
        set_gradient_checkpointing(transformer, -1, offload=True, keep_attention=True),
    )
    for k in (13,):
        record("ours compiled ckpt inner", model, big, 1, set_gradient_checkpointing(transformer, k))
        record(
            "ours compiled ckpt inner keep_attention",
            model,
            big,
            1,
            set_gradient_checkpointing(transformer, k, keep_attention=True),
        )
    record("ours compiled no ckpt", model, big, 1, set_gradient_checkpointing(transformer, 0))
    for _ in range(args.rounds):
        for way, apply in ways.items():
            apply()
            out["ab_s_per_step"][way].append(measure(model, batch, ours([0]), warmup, steps, device)["s_per_step"])
        print("A/B/C s/step", json.dumps(out["ab_s_per_step"]), flush=True)
        save()
    if device.type == "cuda":
        for way, apply in ways.items():
            apply()
            out["profiles"][way] = profile_step(model, batch, ours([0]), device)
            save()
    print("LoRA gradients, max |difference| to outer:", out["grads"], flush=True)
    for way, prof in out["profiles"].items():
        kinds = ", ".join(f"{k} {v:.1f}" for k, v in prof["ms_by_kind"].items())
        print(f"profile {way}: {prof['wall_ms_per_step']:.1f} ms/step ({kinds} ms)", flush=True)
    accelerator._models.clear()  # the caller collects the model once this returns
    return out


def stored_fp8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight as `Fp8MatmulLinear` keeps it: e4m3 bytes (uint8) and fp32 row scales."""
    values, scale = quantize_rows(weight)
    return values.view(torch.uint8), scale


def forward_backward(fn, x: torch.Tensor, operands: tuple, grad: torch.Tensor) -> None:
    fn(x, *operands).backward(grad)


def linear_fp8_vs_bf16(device, tokens: int = 4224) -> list[dict]:
    """ms per forward + input gradient of one Linear, bf16 (F.linear) against `_Fp8Matmul` (quantising included),
    at the block's shapes: 4096 image + 128 caption tokens, 3840 → 10240 (w1/w3) and 10240 → 3840 (w2); and
    whether the compiled fp8 Linear agrees with its eager self. Also the transposing copy of the weight's bytes that
    backward makes, eager against an inductor-generated kernel (the trainer's on a GPU)."""
    rows, fp8_matmul = [], torch.compile(_Fp8Matmul.apply, dynamic=False)  # static kernels for every shape
    transpose = torch.compile(lambda t: t.t().contiguous(), dynamic=False)
    for d_in, d_out in ((3840, 10240), (10240, 3840), (3840, 3840)):
        x = torch.randn(tokens, d_in, device=device, dtype=torch.bfloat16, requires_grad=True)
        weight = torch.randn(d_out, d_in, device=device, dtype=torch.bfloat16) / d_in**0.5
        grad = torch.randn(tokens, d_out, device=device, dtype=torch.bfloat16)
        variants = {"bf16": (torch.nn.functional.linear, (weight,)), "fp8": (fp8_matmul, stored_fp8(weight))}
        times = {
            name: ms_per_call(forward_backward, fn, x, operands, grad) for name, (fn, operands) in variants.items()
        }
        # Does the compiled fp8 Linear give eager's output and input gradient? (cosine of each)
        agreement = []
        for fn in (_Fp8Matmul.apply, fp8_matmul):
            x.grad = None
            out = fn(x, *variants["fp8"][1])
            out.backward(grad)
            agreement.append((out.detach().float().flatten(), x.grad.float().flatten()))
        cosines = [float(torch.nn.functional.cosine_similarity(a, b, dim=0)) for a, b in zip(*agreement)]
        weight_bytes = variants["fp8"][1][0]
        assert torch.equal(transpose(weight_bytes), weight_bytes.t().contiguous())
        transpose_ms = {
            "eager": ms_per_call(lambda t: t.t().contiguous(), weight_bytes),
            "compiled": ms_per_call(transpose, weight_bytes),
        }
        rows.append(
            {
                "in": d_in,
                "out": d_out,
                "bf16_ms": times["bf16"],
                "fp8_ms": times["fp8"],
                "compiled_cos": cosines,
                "weight_transpose_ms": transpose_ms,
            }
        )
        print(
            f"Linear {d_in}->{d_out} x{tokens} fwd+dgrad: bf16 {times['bf16']:.3f} ms, fp8 {times['fp8']:.3f} ms; "
            f"compiled vs eager cosine: output {cosines[0]:.5f}, input gradient {cosines[1]:.5f}; weight transpose "
            f"eager {transpose_ms['eager']:.3f} ms, compiled {transpose_ms['compiled']:.3f} ms"
        )
    return rows


def nonzero_lora(model, seed: int = 1) -> None:
    """Set every LoRA B from a fixed generator, so two models' A gradients are compared too."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def lora_snapshot(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def restore_lora(model, snapshot: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in snapshot:
                p.copy_(snapshot[name])


def loss_and_grads(model, batch) -> tuple[float, torch.Tensor]:
    """The step's loss and the LoRA gradients, flattened into one fp32 vector (then cleared)."""
    loss = ours([0])(model, batch)
    loss.backward()
    grads = torch.cat([p.grad.flatten().float() for p in lora_params(model)])
    model.zero_grad(set_to_none=True)
    return float(loss.detach()), grads


def against(result: tuple[float, torch.Tensor], reference: tuple[float, torch.Tensor]) -> dict:
    """How far a step's (loss, LoRA gradients) are from the reference step's on the same inputs."""
    (loss, grads), (ref_loss, ref_grads) = result, reference
    return {
        "loss": loss,
        "loss_rel_diff": abs(loss - ref_loss) / abs(ref_loss),
        "grad_rel_err": float((grads - ref_grads).norm() / ref_grads.norm()),
        "grad_cosine": float(torch.nn.functional.cosine_similarity(grads, ref_grads, dim=0)),
    }


def fp8_matmul_variants(args, cfg, accelerator, device, big, small, warmup, steps, record, save) -> dict:
    """--part fp8 (see the module docstring)."""
    out = {"linears": linear_fp8_vs_bf16(device) if device.type == "cuda" else [], "vs_eager_bf16": {}}
    batch = make_batch(16, big, big, 1, cfg["cap_feat_dim"], device)
    models, total = {}, cfg["n_layers"] + cfg["n_refiner_layers"]
    reference = None
    for precision in ("bf16", "fp8_matmul") + (("fp8",) if args.compile_quantized else ()):
        transformer = build_transformer(cfg, device, torch.bfloat16)
        if precision == "fp8_matmul":
            use_fp8_matmul_(transformer, device)
        if precision == "fp8":
            quantize_fp8_(transformer, device)
        torch.manual_seed(0)
        add_lora(transformer, rank=32, alpha=32, targets="attention")
        if precision == "bf16":  # the baseline of the ratios
            transformer.enable_gradient_checkpointing()
            record("naive eager ckpt", transformer, big, 1, total)
            transformer.disable_gradient_checkpointing()
        use_real_rope(transformer)
        model = accelerator.prepare_model(transformer)
        nonzero_lora(model)
        lora_values = lora_snapshot(model)
        eager = loss_and_grads(model, batch)
        reference = reference or eager
        # Eager with every block checkpointed: how a small card runs it without --compile
        record(f"ours eager {precision}", model, big, 1, set_gradient_checkpointing(transformer, -1))
        set_gradient_checkpointing(transformer, 0)
        if not args.no_compile:
            compile_blocks(transformer)
        restore_lora(model, lora_values)  # the timed steps trained the LoRA: back to what the eager step saw
        compiled = loss_and_grads(model, batch)
        for way, result in (("eager", eager), ("compiled", compiled)):
            out["vs_eager_bf16"][f"{precision} {way}"] = against(result, reference)
        print(f"{precision} vs eager bf16:", json.dumps(out["vs_eager_bf16"]), flush=True)
        del eager, compiled
        kind = "compiled" if not args.no_compile else "eager"
        # A step whose gradients are wrong has no speed worth reporting: its rows say so in their name
        right = out["vs_eager_bf16"][f"{precision} {kind}"]["grad_cosine"] > 0.99
        name = f"ours {kind} {precision}" + ("" if right else " WRONG GRADIENTS")
        record(name, model, big, 1, set_gradient_checkpointing(transformer, 0))
        if precision == "fp8_matmul":
            # The same step with backward's weight transpose as eager's strided copy: what the inductor kernel,
            # the default on a GPU, saves
            base_precision.COMPILED_TRANSPOSE = False
            try:
                restore_lora(model, lora_values)
                out["vs_eager_bf16"][f"fp8_matmul {kind} eager transpose"] = against(
                    loss_and_grads(model, batch), reference
                )
                record(f"{name} eager transpose", model, big, 1, set_gradient_checkpointing(transformer, 0))
            finally:
                base_precision.COMPILED_TRANSPOSE = True
            full = set_gradient_checkpointing(transformer, -1, keep_attention=True)
            record(f"{name} keep_attention", model, big, 1, full)
            ckpt = set_gradient_checkpointing(transformer, -1, offload=True, keep_attention=True)
            record(f"{name} keep_attention offload", model, big, 1, ckpt)
            for bs in (1, 8):
                record(name, model, small, bs, set_gradient_checkpointing(transformer, 0))
            set_gradient_checkpointing(transformer, 0)
        if precision == "fp8":  # not in the rounds
            accelerator._models.remove(model)
            del model, transformer
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        else:
            models[precision] = model.to("cpu")  # waits in host memory while the other is measured
        save()
    out["rounds_s_per_step"] = {p: [] for p in models}
    for _ in range(args.rounds if device.type == "cuda" else 0):
        for precision, model in models.items():
            model.to(device)
            out["rounds_s_per_step"][precision].append(
                measure(model, batch, ours([0]), warmup, steps, device)["s_per_step"]
            )
            model.to("cpu")
        print("rounds s/step", json.dumps(out["rounds_s_per_step"]), flush=True)
        save()
    if device.type == "cuda":
        out["profile"] = profile_step(models["fp8_matmul"].to(device), batch, ours([0]), device)
        out["profile"]["checkpointed_blocks"] = 0
    accelerator._models.clear()
    return out


def lokr_variants(args, cfg, accelerator, device, big, record) -> dict:
    """--part lokr: LoKr (factor 4) on attention at each of --lokr_ranks, our LoKr Linear (w1 · x · w2ᵀ) against
    PEFT's own forward (which builds w1 ⊗ w2, out × in, on every call), compiled without checkpointing at 1024² bs1,
    after a check that both give the same loss and gradients."""
    from peft.tuners.lokr.layer import Linear as PeftLoKrLinear

    from zimage_utils.lora import _LoKrLinearWithoutModuleDropout as OurLoKrLinear

    class PeftForward(OurLoKrLinear):  # PEFT's arithmetic, still without the module-dropout draw
        _get_delta_activations = PeftLoKrLinear._get_delta_activations

    out = {}
    batch = make_batch(16, big, big, 1, cfg["cap_feat_dim"], device)
    for rank in [int(r) for r in args.lokr_ranks.split(",")]:
        transformer = build_transformer(cfg, device, torch.bfloat16)
        add_lora(transformer, rank=rank, targets="attention", adapter="lokr", lokr_factor=4)
        use_real_rope(transformer)
        model = accelerator.prepare_model(transformer)
        with torch.no_grad():  # w1 starts at zero: give it values, so that every gradient is compared
            for name, p in model.named_parameters():
                if ".lokr_w1" in name:
                    p.normal_(std=0.02)
        layers = [m for m in transformer.modules() if isinstance(m, OurLoKrLinear)]
        grads = {}
        for impl, cls in (("ours", OurLoKrLinear), ("peft", PeftForward)):
            for layer in layers:
                layer.__class__ = cls
            loss, grads[impl] = loss_and_grads(model, batch)
            out[f"rank {rank} {impl} loss"] = loss
        out[f"rank {rank} grad_cosine"] = float(
            torch.nn.functional.cosine_similarity(grads["ours"], grads["peft"], dim=0)
        )
        del grads
        for impl, cls in (("ours", OurLoKrLinear), ("peft", PeftForward)):
            for layer in layers:
                layer.__class__ = cls
            torch._dynamo.reset()
            if not args.no_compile:
                compile_blocks(transformer)
            kind = "eager" if args.no_compile else "compiled"
            record(f"lokr r{rank} {impl} {kind}", model, big, 1, set_gradient_checkpointing(transformer, 0))
        print(json.dumps({k: v for k, v in out.items() if k.startswith(f"rank {rank}")}), flush=True)
        accelerator._models.remove(model)
        del model, transformer, layers
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


def dora_variants(args, cfg, accelerator, device, big, record) -> None:
    """--part dora: DoRA's step against LoRA's, eager (every block checkpointed) and compiled (none), then DoRA over
    an NF4 base (eager, checkpointed), loaded as the trainer loads it."""
    for adapter in ("lora", "dora"):
        transformer = build_transformer(cfg, device, torch.bfloat16)
        add_lora(transformer, rank=32, targets="attention", adapter=adapter)
        use_real_rope(transformer)
        model = accelerator.prepare_model(transformer)
        record(f"{adapter} r32 eager", model, big, 1, set_gradient_checkpointing(transformer, -1), adapter=adapter)
        if not args.no_compile:
            torch._dynamo.reset()
            compile_blocks(transformer, fullgraph=adapter != "dora")  # (as the trainer compiles each)
            record(
                f"{adapter} r32 compiled", model, big, 1, set_gradient_checkpointing(transformer, 0), adapter=adapter
            )
        accelerator._models.remove(model)
        del model, transformer
        gc.collect()
        torch._dynamo.reset()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if device.type != "cuda":
        return
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        save_random_model(cfg, Path(tmp), device)
        transformer = load_transformer(tmp, torch.bfloat16, device=device, quantization_config=nf4_config())
        use_real_rope(transformer)
        add_lora(transformer, rank=32, targets="attention", adapter="dora")
        model = accelerator.prepare_model(transformer)
        record("dora r32 eager nf4", model, big, 1, set_gradient_checkpointing(transformer, -1), adapter="dora")
        accelerator._models.remove(model)
        del model, transformer
        gc.collect()
        torch.cuda.empty_cache()


def swap_variants(args, cfg, accelerator, device, big, record) -> None:
    """--part swap: `--blocks_to_swap` over an fp8 and a bf16 base, eager, every block checkpointed, 1024² bs1: none,
    half and all of the 32 image-token blocks' weights in pinned host memory, each timed with its peak. Also checks
    that the LoRA gradients of the swapped model equal the resident one's (the side-stream copies arrive in time)."""
    from zimage_utils.block_swap import swap_blocks

    batch = make_batch(16, big, big, 1, cfg["cap_feat_dim"], device)
    for precision in args.precisions.split(","):
        transformer = build_transformer(cfg, device, torch.bfloat16)
        if precision == "fp8":
            quantize_fp8_(transformer, device)
        add_lora(transformer, rank=32, alpha=32, targets="attention")
        use_real_rope(transformer)
        model = accelerator.prepare_model(transformer)
        nonzero_lora(model)
        snapshot = lora_snapshot(model)
        reference = loss_and_grads(model, batch)
        blocks = set_gradient_checkpointing(transformer, -1)
        for swapped in [0, blocks // 2, blocks]:
            if swapped:
                swap_blocks(transformer, swapped, device)
                set_gradient_checkpointing(transformer, -1)
                restore_lora(model, snapshot)
                agreement = against(loss_and_grads(model, batch), reference)
            else:
                agreement = {}
            record(f"{precision} eager ckpt swap{swapped}", model, big, 1, blocks, blocks_to_swap=swapped, **agreement)
        accelerator._models.remove(model)
        del model, transformer
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true", help="Tiny model on the CPU (smoke test).")
    parser.add_argument(
        "--part", choices=["speed", "memory", "ckpt", "fp8", "lokr", "dora", "swap", "all"], default="all"
    )
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--no_compile", action="store_true")
    parser.add_argument(
        "--act_budgets", default="0.5,0.7", help="Inductor activation-memory budgets to time ('' = none)."
    )
    parser.add_argument(
        "--profile_blocks",
        type=int,
        default=None,
        help="Speed part: profile with this many blocks checkpointed (default: what --max_memory_gb 24 chose; with "
        "--quick, only when given).",
    )
    parser.add_argument(
        "--quick", action="store_true", help="Speed part: only compiled 1024² bs1 without checkpointing, and budgets."
    )
    parser.add_argument(
        "--compile_quantized",
        action="store_true",
        help="Memory and fp8 parts: also time compiled fp8 (and, memory part, NF4) bases (slow).",
    )
    parser.add_argument("--budgets", default="24,18", help="--max_memory_gb values to calibrate at 1024² bs1.")
    parser.add_argument("--precisions", default="bf16,fp8,nf4", help="Memory part: base precisions to measure.")
    parser.add_argument(
        "--profile_offload", action="store_true", help="Memory part: profile compiled bf16 with/without offload."
    )
    parser.add_argument("--rounds", type=int, default=3, help="Ckpt/fp8 parts: interleaved rounds of the timing.")
    parser.add_argument("--lokr_ranks", default="100000", help="LoKr part: ranks (100000: w2 a full matrix).")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    cfg = {**tiny.TINY_TRANSFORMER, **({} if args.tiny else FULL)}
    cfg_full = {k: cfg[k] for k in ("dim", "n_layers", "n_refiner_layers")}
    total_blocks = cfg["n_layers"] + cfg["n_refiner_layers"]
    peak_tflops = matmul_peak_tflops(device)
    warmup = 1 if args.tiny else 3
    steps = 2 if args.tiny else args.steps
    big = 64 if args.tiny else 1024
    small = 32 if args.tiny else 512
    compile_ok = not args.no_compile
    accelerator = Accelerator(mixed_precision="bf16" if device.type == "cuda" else "no", cpu=device.type == "cpu")
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "matmul_peak_tflops": peak_tflops,
        "rows": [],
    }
    rows = result["rows"]

    def save():
        if args.out:  # after every row, so a crash later keeps what was measured
            Path(args.out).write_text(json.dumps(result, indent=2))

    def record(name, model, res, bs, ckpt_blocks, step=None, optimizer="adamw", **extra):
        batch = make_batch(16, res, res, bs, cfg["cap_feat_dim"], device)
        step = step or (naive_step if name.startswith("naive") else ours(list(range(bs))))
        try:
            m = measure(model, batch, step, warmup, steps, device, optimizer)
        except torch.OutOfMemoryError:
            print(f"{name} {res}² bs{bs} ckpt {ckpt_blocks}: out of memory", flush=True)
            torch.cuda.empty_cache()
            return None
        except Exception as error:  # report and keep measuring the other variants
            print(
                f"{name} {res}² bs{bs} ckpt {ckpt_blocks}: failed: {type(error).__name__}: {error}"[:600], flush=True
            )
            return None
        flops = step_flops(cfg_full, res, res, bs, ckpt_blocks)
        m.update(
            name=name,
            resolution=res,
            batch=bs,
            checkpointed_blocks=ckpt_blocks,
            samples_per_s=bs / m["s_per_step"],
            tflops=flops / m["s_per_step"] / 1e12,
            pct_matmul_peak=100 * flops / m["s_per_step"] / 1e12 / peak_tflops,
            **extra,
        )
        rows.append(m)
        save()
        print(
            f"{name:34s} {res}² bs{bs} ckpt {ckpt_blocks:2d}: {m['s_per_step']:.3f} s/step  {m['peak_gib']:.1f} GiB",
            flush=True,
        )
        return m

    if args.part in ("speed", "all"):
        transformer = build_transformer(cfg, device, torch.bfloat16)
        add_lora(transformer, rank=32, alpha=32, targets="attention")
        # The naive baseline on the bare model, then our step on the model as the trainer prepares it (autocast)
        transformer.enable_gradient_checkpointing()
        record("naive eager ckpt", transformer, big, 1, total_blocks)
        if not args.tiny and not args.quick:
            transformer.disable_gradient_checkpointing()
            record("naive eager no-ckpt", transformer, big, 1, 0)
        use_real_rope(transformer)
        model = accelerator.prepare_model(transformer)
        if not args.quick:
            record("ours eager ckpt", model, big, 1, set_gradient_checkpointing(transformer, -1))
        if compile_ok:
            start = time.perf_counter()
            compile_blocks(transformer)
            result["compile_call_s"] = time.perf_counter() - start
            grid = [(big, 1, [-1, total_blocks // 2, 0]), (small, 1, [-1, 0]), (small, 8, [-1, 0]), (big, 4, [-1])]
            for res, bs, settings in grid[:2] if args.tiny else [(big, 1, [0])] if args.quick else grid:
                for n in settings:
                    record("ours compiled", model, res, bs, set_gradient_checkpointing(transformer, n))

        # --max_memory_gb: the trainer's calibration, then the chosen setting timed
        budgets = [float(b) for b in args.budgets.split(",")] if device.type == "cuda" and not args.quick else []
        chosen = {}
        for budget in budgets:
            batch = make_batch(16, big, big, 1, cfg["cap_feat_dim"], device)
            start = time.perf_counter()
            try:
                cal = calibrate_checkpointing(accelerator, model, batch, ours([0]), budget, 0.25)
            except MemoryBudgetError as error:
                print(f"--max_memory_gb {budget}: {error}")
                continue
            result.setdefault("calibrations", []).append(
                {
                    "budget_gib": budget,
                    "chosen": cal.checkpointed,
                    "measured": cal.measured,
                    "calibration_s": time.perf_counter() - start,
                }
            )
            print(cal.summary(), flush=True)
            chosen[budget] = cal.checkpointed
            record(
                f"ours {'compiled ' if compile_ok else ''}max_memory_gb {budget:g}", model, big, 1, cal.checkpointed
            )

        # Host syncs in the trainer's hot loop, and where the time of the fastest setting within 24 GiB goes
        k24 = args.profile_blocks if args.profile_blocks is not None else chosen.get(24.0, total_blocks // 2)
        set_gradient_checkpointing(transformer, k24)
        cpu_batch = make_batch(16, big, big, 1, cfg["cap_feat_dim"], torch.device("cpu"))
        if not args.quick:
            result["host_syncs"] = count_host_syncs(model, cpu_batch, ours([0]), device)
            print(f"host syncs per step: {result['host_syncs']}", flush=True)
        if device.type == "cuda" and (not args.quick or args.profile_blocks is not None):
            result["profile"] = profile_step(
                model, make_batch(16, big, big, 1, cfg["cap_feat_dim"], device), ours([0]), device
            )
            result["profile"]["checkpointed_blocks"] = k24
            save()

        # Recompiled variants: inductor's activation-memory budget (it recomputes cheap ops, not whole blocks), and
        # diffusers' own complex-valued rotary embedding (what `use_real_rope` replaces), for the same-run ratio
        if compile_ok and device.type == "cuda":
            for mem_budget in [float(b) for b in args.act_budgets.split(",") if b]:
                torch._dynamo.reset()
                set_gradient_checkpointing(transformer, 0)
                with torch._functorch.config.patch(activation_memory_budget=mem_budget):
                    record(
                        f"ours compiled act_budget {mem_budget}", model, big, 1, 0, activation_memory_budget=mem_budget
                    )
            for module in transformer.modules():
                if isinstance(getattr(module, "processor", None), RealRopeAttnProcessor):
                    module.set_processor(ZSingleStreamAttnProcessor())
            torch._dynamo.reset()
            for k in () if args.quick else (0, k24):
                record("ours compiled complex-rope", model, big, 1, set_gradient_checkpointing(transformer, k))
        accelerator._models.clear()
        del model, transformer
        gc.collect()  # accelerate's autocast wrapper makes the model a reference cycle
        torch._dynamo.reset()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    if args.part == "ckpt":
        result["ckpt"] = checkpointing_variants(args, cfg, accelerator, device, big, warmup, steps, record, save)
        gc.collect()
        torch._dynamo.reset()

    if args.part == "fp8":
        result["fp8"] = fp8_matmul_variants(args, cfg, accelerator, device, big, small, warmup, steps, record, save)
        gc.collect()
        torch._dynamo.reset()

    if args.part == "dora":
        dora_variants(args, cfg, accelerator, device, big, record)

    if args.part == "lokr":
        result["lokr"] = lokr_variants(args, cfg, accelerator, device, big, record)
        gc.collect()
        torch._dynamo.reset()

    if args.part == "swap":
        swap_variants(args, cfg, accelerator, device, big, record)

    if args.part in ("memory", "all"):
        # Low-precision bases, loaded by the trainer's own code path from a saved random model
        with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
            save_random_model(cfg, Path(tmp), device)
            for precision in args.precisions.split(","):
                if precision == "nf4" and device.type != "cuda":
                    continue
                transformer = load_transformer(
                    tmp,
                    torch.bfloat16,
                    device=device if precision == "nf4" else "cpu",
                    quantization_config=nf4_config() if precision == "nf4" else None,
                )
                if precision == "fp8":
                    quantize_fp8_(transformer, device)
                if precision != "nf4":
                    transformer.to(device)
                base_gib = base_weight_gib(transformer)
                use_real_rope(transformer)
                add_lora(transformer, rank=32, alpha=32, targets="attention")
                model = accelerator.prepare_model(transformer)
                info = {"base_precision": precision, "base_weights_gib": base_gib}
                print(f"{precision} base weights: {base_gib:.2f} GiB", flush=True)
                if device.type == "cuda":
                    info["after_load_gib"] = torch.cuda.memory_allocated() / 2**30
                record(f"ours eager {precision}", model, big, 1, set_gradient_checkpointing(transformer, -1), **info)
                if precision == "bf16":
                    record("ours eager bf16 adamw8bit", model, big, 1, total_blocks, optimizer="adamw8bit", **info)
                    name, free = "ours eager bf16 adamw_schedulefree", "adamw_schedulefree"
                    record(name, model, big, 1, total_blocks, optimizer=free, **info)
                # Checkpointed blocks' inputs in host memory (--cpu_offload_checkpointing)
                ckpt = set_gradient_checkpointing(transformer, -1, offload=True)
                record(f"ours eager {precision} offload", model, big, 1, ckpt, **info)
                if precision != "bf16":
                    name = f"ours eager {precision} offload adamw8bit"
                    record(name, model, big, 1, ckpt, optimizer="adamw8bit", **info)
                set_gradient_checkpointing(transformer, -1)
                # Quantised bases compiled only on request (NF4 is slow to compile)
                if compile_ok and (precision == "bf16" or args.compile_quantized):
                    torch._dynamo.reset()
                    compile_blocks(transformer, fullgraph=precision != "nf4")
                    ckpt = set_gradient_checkpointing(transformer, -1)
                    record(f"ours compiled {precision}", model, big, 1, ckpt, **info)
                    ckpt = set_gradient_checkpointing(transformer, -1, offload=True)
                    record(f"ours compiled {precision} offload", model, big, 1, ckpt, **info)
                    if args.profile_offload and device.type == "cuda":
                        batch = make_batch(16, big, big, 1, cfg["cap_feat_dim"], device)
                        grads = []
                        for offload in (False, True):  # offloading must not change a gradient
                            set_gradient_checkpointing(transformer, -1, offload=offload)
                            ours([0])(model, batch).backward()
                            grads.append([p.grad.clone() for p in lora_params(model)])
                            model.zero_grad(set_to_none=True)
                        result["offload_grads_max_abs_diff"] = max(float((a - b).abs().max()) for a, b in zip(*grads))
                        # Interleaved A/B, 3 rounds: the step time with and without offloading, same conditions
                        times = {"off": [], "on": []}
                        for _ in range(3):
                            for offload in (False, True):
                                set_gradient_checkpointing(transformer, -1, offload=offload)
                                m = measure(model, batch, ours([0]), warmup, steps, device)
                                times["on" if offload else "off"].append(m["s_per_step"])
                        result[f"offload_ab_compiled_{precision}_s_per_step"] = times
                        for offload in (False, True):
                            set_gradient_checkpointing(transformer, -1, offload=offload)
                            key = f"profile_compiled_{precision}_ckpt" + "_offload" * offload
                            result[key] = profile_step(model, batch, ours([0]), device, cpu=True)
                        print("offload grads max abs diff", result["offload_grads_max_abs_diff"], flush=True)
                        print("offload A/B s/step", json.dumps(times), flush=True)
                        del grads, batch  # or the next base is measured with these on the GPU
                accelerator._models.clear()  # the accelerator keeps every prepared model alive otherwise
                del model, transformer
                gc.collect()  # accelerate's autocast wrapper makes the model a reference cycle
                torch._dynamo.reset()
                if device.type == "cuda":
                    torch.cuda.empty_cache()

    # Ratio of samples/s to the naive checkpointed step at the same resolution (measured at batch 1)
    base = {r["resolution"]: r for r in rows if r["name"] == "naive eager ckpt"}
    for r in rows:
        ref = base.get(r["resolution"])
        r["speedup_vs_naive_ckpt"] = r["samples_per_s"] / ref["samples_per_s"] if ref else None
    save()
    print(
        f"\n{result['device']}, torch {result['torch']}, bf16 matmul peak {peak_tflops:.0f} TFLOP/s; LoRA r32 attention"
    )
    print(
        f"{'variant':34s} {'res':>5s} {'bs':>3s} {'ckpt':>4s} {'s/step':>7s} {'samp/s':>7s} {'GiB':>6s} "
        f"{'TFLOP/s':>8s} {'%peak':>6s} {'x naive':>7s} {'loss0':>8s}"
    )
    for r in rows:
        sp = r["speedup_vs_naive_ckpt"]
        print(
            f"{r['name']:34s} {r['resolution']:5d} {r['batch']:3d} {r['checkpointed_blocks']:4d} {r['s_per_step']:7.3f} "
            f"{r['samples_per_s']:7.2f} {r['peak_gib']:6.1f} {r['tflops']:8.1f} {r['pct_matmul_peak']:6.1f} "
            f"{(f'{sp:.2f}' if sp else '-'):>7s} {r['first_loss']:8.4f}"
        )
    for name, diff in result.get("fp8", {}).get("vs_eager_bf16", {}).items():
        print(
            f"{name:24s} vs eager bf16: loss {diff['loss_rel_diff']:.2e} rel, LoRA grads {diff['grad_rel_err']:.3f} rel "
            f"error, cosine {diff['grad_cosine']:.5f}"
        )
    for prof in [result[key].get("profile") for key in ("ckpt", "fp8") if key in result] + [result.get("profile")]:
        if prof is None:
            continue
        print(f"\nprofile, 1024² bs1 ckpt {prof['checkpointed_blocks']}: {prof['wall_ms_per_step']:.1f} ms/step")
        print("  " + ", ".join(f"{k} {v:.1f}%" for k, v in prof["pct_by_kind"].items()))
        for name, t in prof["top_kernels_ms"][:8]:
            print(f"  {t:7.2f} ms  {name}")


if __name__ == "__main__":
    main()
