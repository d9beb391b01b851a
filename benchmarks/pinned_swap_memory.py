"""Pinned host memory `--blocks_to_swap` asks for, from the full-size Z-Image blocks' tensor sizes (a model on the meta
device: nothing is allocated, runs anywhere in seconds): pinned tensor by tensor, as torch's pinned-memory allocator
rounds each request up to a power of two, against packed into buffers (`block_swap.pack`), for bf16 and fp8 bases.

    python benchmarks/pinned_swap_memory.py --blocks 32 --out pinned.json

On a GPU, `torch.cuda.host_memory_stats()` after a swapped run shows what was really pinned (not measured yet).
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_train_step import FULL  # noqa: E402

from zimage_utils import tiny  # noqa: E402
from zimage_utils.base_precision import quantizable  # noqa: E402
from zimage_utils.block_swap import first_blocks, frozen_tensors, pack, pinned_bytes  # noqa: E402


def swapped_sizes(transformer: torch.nn.Module, blocks: int, precision: str) -> list[int]:
    """Bytes of each tensor the swap moves; fp8 Linears as e4m3 values plus int32 row scales."""
    names = {id(m): n for n, m in transformer.named_modules()}
    sizes = []
    for block in first_blocks(transformer, blocks):
        quantized = {
            id(m.weight)
            for n, m in block.named_modules()
            if precision == "fp8" and quantizable(f"{names[id(block)]}.{n}", m)
        }
        for t in frozen_tensors(block):
            sizes += [t.numel(), 4 * t.shape[0]] if id(t) in quantized else [t.numel() * t.element_size()]
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=32)
    parser.add_argument("--tiny", action="store_true", help="The tiny model's blocks (CI keeps the script working).")
    parser.add_argument("--out", default=None, help="Also write the rows as JSON here.")
    args = parser.parse_args()
    config = tiny.TINY_TRANSFORMER if args.tiny else {**tiny.TINY_TRANSFORMER, **FULL}
    from diffusers import ZImageTransformer2DModel

    with torch.device("meta"):
        transformer = ZImageTransformer2DModel(**config).to(torch.bfloat16).requires_grad_(False)
    rows = []
    for precision in ("bf16", "fp8"):
        sizes = swapped_sizes(transformer, args.blocks, precision)
        rows.append(
            {
                "base": precision,
                "blocks": args.blocks,
                "tensors": len(sizes),
                "weight_bytes": sum(sizes),
                "one_by_one_bytes": sum(pinned_bytes(s) for s in sizes),
                "packed_bytes": sum(size for size, _ in pack(sizes)),
            }
        )
    if args.out:
        Path(args.out).write_text(json.dumps({"rows": rows}, indent=2))
    print(f"{'base':5s} {'tensors':>7s} {'weights GiB':>11s} {'one by one GiB':>14s} {'packed GiB':>10s}")
    for r in rows:
        print(
            f"{r['base']:5s} {r['tensors']:7d} {r['weight_bytes'] / 2**30:11.2f} {r['one_by_one_bytes'] / 2**30:14.2f} "
            f"{r['packed_bytes'] / 2**30:10.2f}"
        )


if __name__ == "__main__":
    main()
