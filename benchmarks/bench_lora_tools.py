"""lora_tools.py on a full-size Z-Image LoRA (random factors, every block Linear, no model needed): the time of each
command, and the SVD it rests on (from the factors) against the dense SVD of each update that PEFT's svd merge and
kohya's resize take (float32), on the same modules in the same run. And `extract`'s randomized SVD of one block's
weight differences (a stand-in fine-tune: a decaying spectrum over small full-rank noise) against the full SVD that
kohya's extract_lora_from_models takes: seconds each, and the part of each difference the rank-r LoRA holds either
way (the full SVD's is the best there is).

    python benchmarks/bench_lora_tools.py --work /tmp/lt --out lora_tools.json          # full size, CPU or GPU host
    python benchmarks/bench_lora_tools.py --tiny --work /tmp/lt --out lora_tools.json   # the tiny model (CI)

Prints one row per command (seconds, written MiB), the SVD comparison on one block's modules (seconds each way,
their ratio, and the largest relative difference of the singular values) and the extraction comparison.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_train_step import FULL  # noqa: E402

import lora_tools  # noqa: E402
from zimage_utils.lora import lora_target_modules  # noqa: E402
from zimage_utils.lora_edit import extract, factors_state_dict, update_svd  # noqa: E402
from zimage_utils.lora_io import save_lora_state  # noqa: E402
from zimage_utils.tiny import TINY_TRANSFORMER  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", required=True, help="Folder for the LoRA files.")
    p.add_argument("--tiny", action="store_true", help="The tiny model's modules (CI smoke test).")
    p.add_argument("--rank", type=int, default=32, help="Rank of the source LoRAs.")
    p.add_argument("--out", required=True, help="JSON path.")
    return p.parse_args()


def module_shapes(tiny: bool) -> dict[str, tuple[int, int]]:
    """{module: (out, in)} of every block Linear (`--lora_targets all`), from a model on the meta device."""
    from diffusers import ZImageTransformer2DModel

    config = TINY_TRANSFORMER if tiny else {**TINY_TRANSFORMER, **FULL}
    with torch.device("meta"):
        transformer = ZImageTransformer2DModel(**config)
    names = lora_target_modules(transformer, "all")
    return {n: tuple(transformer.get_submodule(n).weight.shape) for n in names}


def random_lora(shapes: dict[str, tuple[int, int]], rank: int, seed: int) -> dict[str, torch.Tensor]:
    """A bf16 LoRA with singular values spread as trained ones are (B's columns scaled down the rank)."""
    g = torch.Generator().manual_seed(seed)
    decay = torch.tensor([0.8**j for j in range(rank)])
    factors = {
        name: (torch.randn(out, rank, generator=g) * decay * 0.01, torch.randn(rank, inp, generator=g) / inp**0.5)
        for name, (out, inp) in shapes.items()
    }
    return {k: v.bfloat16() for k, v in factors_state_dict(factors).items()}


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main() -> None:
    args = parse_args()
    work = Path(args.work)
    shapes = module_shapes(args.tiny)
    sources = [work / f"source_{i}" for i in range(2)]
    for i, folder in enumerate(sources):
        save_lora_state(folder, random_lora(shapes, args.rank, seed=i), {"base_model": "random"}, dtype=torch.bfloat16)
    commands = {
        "convert": ["convert", sources[0]],
        f"resize --rank {args.rank // 2}": ["resize", sources[0], "--rank", args.rank // 2],
        "resize --keep 0.9": ["resize", sources[0], "--keep", 0.9],
        "merge (exact)": ["merge", f"{sources[0]}:1.0", f"{sources[1]}:0.5"],
        f"merge --rank {args.rank}": ["merge", f"{sources[0]}:1.0", f"{sources[1]}:0.5", "--rank", args.rank],
    }
    rows = []
    for i, (name, argv) in enumerate(commands.items()):
        output = work / f"out_{i}"
        argv = [str(a) for a in argv] + ["--output_dir", str(output), "--overwrite"]
        seconds, _ = timed(lambda argv=argv: lora_tools.main(lora_tools.parse_args(argv)))
        size = sum(p.stat().st_size for p in output.glob("*.safetensors")) / 2**20
        rows.append({"command": name, "seconds": round(seconds, 2), "written_mib": round(size, 3)})

    # The SVD itself on the modules of one block: ours (from the factors, float64) against the dense SVD of each update
    # in float32, as PEFT's svd merge and kohya's resize_lora take it
    block = {n: s for n, s in shapes.items() if n.startswith("layers.0.")}
    state = random_lora(block, args.rank, seed=0)
    pairs = [(state[f"transformer.{n}.lora_B.weight"], state[f"transformer.{n}.lora_A.weight"]) for n in block]
    factored_s, factored = timed(lambda: [update_svd(up, down)[1] for up, down in pairs])
    dense_s, dense = timed(
        lambda: [torch.linalg.svdvals(up.float() @ down.float())[: len(f)] for (up, down), f in zip(pairs, factored)]
    )
    worst = max(float(((f - d.double()).abs() / d[0]).max()) for f, d in zip(factored, dense))
    svd = {
        "modules": len(block),
        "factored_s": round(factored_s, 3),
        "dense_s": round(dense_s, 3),
        "dense_over_factored": round(dense_s / factored_s, 1),
        "max_rel_diff": worst,
    }
    extraction = extract_one_block(block, rank=2 * args.rank)
    report = {
        "model": "tiny" if args.tiny else "full-size Z-Image (30 blocks + 4 refiners, every block Linear)",
        "modules": len(shapes),
        "rank": args.rank,
        "torch_threads": torch.get_num_threads(),
        "rows": rows,
        "svd_one_block": svd,
        "extract_one_block": extraction,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"{len(shapes)} modules at rank {args.rank}; {torch.get_num_threads()} CPU threads")
    print(f"{'command':<22} {'s':>8} {'MiB':>8}")
    for row in rows:
        print(f"{row['command']:<22} {row['seconds']:>8.2f} {row['written_mib']:>8.1f}")
    print(
        f"SVD of one block's {svd['modules']} updates: factored {svd['factored_s']:.3f} s, dense {svd['dense_s']:.3f} s "
        f"({svd['dense_over_factored']}×), singular values agree to {worst:.1e} of the largest"
    )
    e = extraction
    print(
        f"extract --rank {e['rank']} on one block's {e['modules']} differences: randomized SVD {e['randomized_s']:.2f} s, "
        f"full SVD {e['full_s']:.2f} s ({e['full_over_randomized']}×); norm held: {e['randomized_kept']:.4f} vs the "
        f"best {e['full_kept']:.4f} (mean over modules; at most {e['largest_shortfall']:.4f} less in one)"
    )


def extract_one_block(shapes: dict[str, tuple[int, int]], rank: int) -> dict:
    """`extract` on stand-in differences of one block's weights: randomized (as `--rank` runs) against full SVD."""
    g = torch.Generator().manual_seed(3)

    def difference(out: int, inp: int) -> torch.Tensor:  # what fine-tuning leaves: a few strong directions, and noise
        k = min(out, inp) // 4
        strong = (
            torch.randn(out, k, generator=g)
            * torch.tensor([0.99**j for j in range(k)])
            @ torch.randn(k, inp, generator=g)
        )
        return (strong + 0.3 * torch.randn(out, inp, generator=g)) / inp**0.5

    differences = [(n, difference(*shape)) for n, shape in shapes.items()]
    randomized_s, (_, randomized) = timed(lambda: extract(differences, rank, None))
    # the full SVD of each (kohya's extract), the same number of values kept: `keep` 1 forces extract's full path
    full_s, (_, full) = timed(lambda: extract(differences, rank, 1.0))
    mean = lambda report: sum(kept for _, kept in report.values()) / len(report)  # noqa: E731
    return {
        "modules": len(shapes),
        "rank": rank,
        "randomized_s": round(randomized_s, 3),
        "full_s": round(full_s, 3),
        "full_over_randomized": round(full_s / randomized_s, 1),
        "randomized_kept": mean(randomized),
        "full_kept": mean(full),
        "largest_shortfall": max(full[m][1] - randomized[m][1] for m in full),  # of the norm, in the worst module
    }


if __name__ == "__main__":
    main()
