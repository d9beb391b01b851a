"""What one training step keeps for backward, per base precision, compiled or eager, with or without checkpointing.

    python benchmarks/bench_saved_activations.py --out saved.json                       # full size on a GPU, 1024²
    python benchmarks/bench_saved_activations.py --variants fp8:compiled:all,bf16:compiled:all --out saved.json
    python benchmarks/bench_saved_activations.py --tiny --out saved.json                # CPU smoke test

Each variant builds the full-size transformer with random weights on the GPU (`--tiny`: the tiny model, 128², on
the CPU), stores its block Linears as `--base_precision` would, adds a LoRA r32 on attention, checkpoints every block
(`all`) or none (`none`), compiles the blocks or not, and then:
- times a few optimiser steps (`bench_train_step.measure`: s/step, peak allocated and reserved GiB);
- runs one more forward under `saved_tensors_hooks` and sums what autograd keeps for backward (parameters left out),
  with the largest shapes: a checkpointed block should keep little more than its input.
Prints a table; writes JSON.
"""

import argparse
import gc
import json
import sys
import time
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_train_step import FULL, build_transformer, make_batch, measure, ours  # noqa: E402

from zimage_utils import tiny  # noqa: E402
from zimage_utils.attention import use_real_rope  # noqa: E402
from zimage_utils.base_precision import quantize_after_loading_  # noqa: E402
from zimage_utils.lora import add_lora  # noqa: E402
from zimage_utils.step_options import compile_blocks, set_gradient_checkpointing  # noqa: E402

DEFAULT_VARIANTS = "fp8:compiled:all,bf16:compiled:all,fp8:eager:all,fp8_matmul:compiled:all,fp8:compiled:none"


def allocated(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated()


def saved_for_backward(step, model, batch) -> tuple[torch.Tensor, list[tuple[str, int]]]:
    """The loss of one forward, and (shape and dtype, bytes) of every non-parameter tensor autograd saved in it."""
    saved = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if not isinstance(t, torch.nn.Parameter):
            saved.append((f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}", t.numel() * t.element_size()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        return step(model, batch), saved


def run_variant(precision: str, compiled: bool, checkpointing: bool, cfg: dict, resolution: int, device) -> dict:
    start = time.perf_counter()
    transformer = build_transformer(cfg, device, torch.bfloat16)
    quantize_after_loading_(transformer, precision, device)
    gc.collect()
    base_gib = allocated(device) / 2**30
    use_real_rope(transformer)
    add_lora(transformer, rank=32, alpha=32, targets="attention")
    if checkpointing:
        set_gradient_checkpointing(transformer, -1)
    if compiled:
        compile_blocks(transformer)
    batch = make_batch(16, resolution, resolution, 1, cfg["cap_feat_dim"], device)
    step = ours([0])
    timed = measure(transformer, batch, step, warmup=2, steps=3, device=device)
    before = allocated(device)
    loss, saved = saved_for_backward(step, transformer, batch)
    forward_gib = (allocated(device) - before) / 2**30
    loss.backward()
    largest = Counter()
    for kind, size in saved:
        largest[kind] += size
    return {
        "precision": precision,
        "compiled": compiled,
        "checkpointing": "all" if checkpointing else "none",
        "base_gib": base_gib,
        **timed,
        "forward_allocated_gib": forward_gib,
        "saved_gib": sum(size for _, size in saved) / 2**30,
        "saved_tensors": len(saved),
        "largest_saved_gib": {kind: size / 2**30 for kind, size in largest.most_common(6)},
        "wall_s": time.perf_counter() - start,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--variants",
        default=DEFAULT_VARIANTS,
        help="Comma-separated precision:compiled|eager:all|none (checkpointed blocks).",
    )
    parser.add_argument("--tiny", action="store_true", help="The tiny model at 128² (CPU smoke test).")
    parser.add_argument("--out", required=True, help="JSON file to write.")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    cfg = {**tiny.TINY_TRANSFORMER, **({} if args.tiny else FULL)}
    resolution = 128 if args.tiny else 1024
    report = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__}
    report["resolution"], report["rows"] = resolution, []
    for variant in args.variants.split(","):
        precision, mode, blocks = variant.split(":")
        torch._dynamo.reset()
        row = run_variant(precision, mode == "compiled", blocks == "all", cfg, resolution, device)
        print(json.dumps(row), flush=True)
        report["rows"].append(row)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        Path(args.out).write_text(json.dumps(report, indent=1))  # after each variant: a cut-off run keeps the rest
    print(f"\n{report['device']}, {resolution}², bs1, LoRA r32 attention")
    print(
        f"{'precision':11s} {'mode':9s} {'ckpt':5s} {'base GiB':>9s} {'peak GiB':>9s} {'s/step':>7s} "
        f"{'saved GiB':>10s}"
    )
    for r in report["rows"]:
        mode = "compiled" if r["compiled"] else "eager"
        print(
            f"{r['precision']:11s} {mode:9s} {r['checkpointing']:5s} {r['base_gib']:9.2f} {r['peak_gib']:9.2f} "
            f"{r['s_per_step']:7.3f} {r['saved_gib']:10.2f}"
        )


if __name__ == "__main__":
    main()
