"""Training-step speed and memory: the naive eager diffusers+PEFT step against our trainer's own step function
(`zimage_utils.training_step.flow_matching_step`) with its options, side by side in one run.

    python benchmarks/bench_train_step.py --out step.json                 # full-size Z-Image, random weights, GPU
    python benchmarks/bench_train_step.py --tiny                          # CPU smoke test at tiny size

Prints s/step, samples/s, peak GiB, achieved TFLOP/s and % of a bf16 matmul peak measured in the same run, and
the ratio to the naive step; writes JSON. LoRA r32 on attention, bf16 base, fp32 LoRA, AdamW, caption 128 tokens.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from zimage_utils import tiny  # noqa: E402
from zimage_utils.lora import add_lora  # noqa: E402
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


def matmul_peak_tflops(device) -> float:
    if device.type != "cuda":
        return float("nan")
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    return 2 * 8192**3 * 10 / (time.perf_counter() - start) / 1e12


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


def measure(transformer, params, lora_init, batch, step_fn, warmup: int, steps: int, device) -> dict:
    """Restore the LoRA to its initial values, then time `steps` optimiser steps after `warmup`."""
    with torch.no_grad():
        for p, v in zip(params, lora_init):
            p.copy_(v)
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda")
    first_loss = None
    for i in range(warmup + steps):
        if i == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
        loss = step_fn(transformer, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if first_loss is None:
            first_loss = float(loss.detach())
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    del optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"s_per_step": seconds, "peak_gib": peak, "first_loss": first_loss}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true", help="Tiny model on the CPU (smoke test).")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--no_compile", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = torch.bfloat16
    cfg = {**tiny.TINY_TRANSFORMER, **({} if args.tiny else FULL)}
    cfg_full = {k: cfg[k] for k in ("dim", "n_layers", "n_refiner_layers")}
    transformer = build_transformer(cfg, device, dtype)
    add_lora(transformer, rank=32, alpha=32, targets="attention")
    params = [p for p in transformer.parameters() if p.requires_grad]
    lora_init = [p.detach().clone() for p in params]
    total_blocks = cfg["n_layers"] + cfg["n_refiner_layers"]
    peak_tflops = matmul_peak_tflops(device)
    ours = lambda seeds: lambda m, b: flow_matching_step(m, b, StepConfig("uniform"), seeds)["loss"]  # noqa: E731
    warmup = 1 if args.tiny else 3
    steps = 2 if args.tiny else args.steps
    sizes = [(64, 1), (64, 2)] if args.tiny else [(1024, 1), (512, 1), (512, 8), (1024, 4)]

    rows = []

    def record(name, res, bs, ckpt_blocks):
        batch = make_batch(16, res, res, bs, cfg["cap_feat_dim"], device)
        step = naive_step if name.startswith("naive") else ours(list(range(bs)))
        m = measure(transformer, params, lora_init, batch, step, warmup, steps, device)
        flops = step_flops(cfg_full, res, res, bs, ckpt_blocks)
        m.update(
            name=name,
            resolution=res,
            batch=bs,
            checkpointed_blocks=ckpt_blocks,
            samples_per_s=bs / m["s_per_step"],
            tflops=flops / m["s_per_step"] / 1e12,
            pct_matmul_peak=100 * flops / m["s_per_step"] / 1e12 / peak_tflops,
        )
        rows.append(m)
        if args.out:  # after every row, so a crash later keeps what was measured
            Path(args.out).write_text(json.dumps({"partial": True, "rows": rows}, indent=2))
        print(
            f"{name:28s} {res}² bs{bs} ckpt {ckpt_blocks:2d}: {m['s_per_step']:.3f} s/step  {m['peak_gib']:.1f} GiB",
            flush=True,
        )

    # Eager: the naive baseline and our step, full and no checkpointing (the default diffusers function)
    for res, bs in sizes[:1]:
        transformer.enable_gradient_checkpointing()
        record("naive eager ckpt", res, bs, total_blocks)
        record("ours eager ckpt", res, bs, set_gradient_checkpointing(transformer, -1))
        if not args.tiny:
            transformer.disable_gradient_checkpointing()
            record("naive eager no-ckpt", res, bs, 0)
    # Compiled: regional compile of the repeated blocks, then sweep checkpointing
    if not args.no_compile:
        compile_seconds = compile_blocks(transformer)
        for res, bs in sizes:
            for n in [-1, 0] if args.tiny else [-1, total_blocks // 2, 0] if (res, bs) == (1024, 1) else [-1, 0]:
                try:
                    record("ours compiled", res, bs, set_gradient_checkpointing(transformer, n))
                except torch.OutOfMemoryError:
                    print(f"ours compiled {res}² bs{bs} ckpt {n}: out of memory", flush=True)
                    torch.cuda.empty_cache()
                except Exception as error:  # report and keep measuring the other variants
                    print(f"ours compiled {res}² bs{bs} ckpt {n}: failed: {type(error).__name__}: {error}"[:400])
    else:
        compile_seconds = 0.0

    # Ratio of samples/s to the naive checkpointed step at the same resolution (measured at batch 1)
    base = {r["resolution"]: r for r in rows if r["name"] == "naive eager ckpt"}
    for r in rows:
        ref = base.get(r["resolution"])
        r["speedup_vs_naive_ckpt"] = r["samples_per_s"] / ref["samples_per_s"] if ref else None
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "matmul_peak_tflops": peak_tflops,
        "compile_call_s": compile_seconds,
        "rows": rows,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    print(
        f"\n{result['device']}, torch {result['torch']}, bf16 matmul peak {peak_tflops:.0f} TFLOP/s; LoRA r32 attention"
    )
    print(
        f"{'variant':22s} {'res':>5s} {'bs':>3s} {'ckpt':>4s} {'s/step':>7s} {'samp/s':>7s} {'GiB':>6s} "
        f"{'TFLOP/s':>8s} {'%peak':>6s} {'x naive':>7s} {'loss0':>8s}"
    )
    for r in rows:
        sp = r["speedup_vs_naive_ckpt"]
        print(
            f"{r['name']:22s} {r['resolution']:5d} {r['batch']:3d} {r['checkpointed_blocks']:4d} {r['s_per_step']:7.3f} "
            f"{r['samples_per_s']:7.2f} {r['peak_gib']:6.1f} {r['tflops']:8.1f} {r['pct_matmul_peak']:6.1f} "
            f"{(f'{sp:.2f}' if sp else '-'):>7s} {r['first_loss']:8.4f}"
        )


if __name__ == "__main__":
    main()
