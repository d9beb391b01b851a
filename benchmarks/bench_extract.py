"""`lora_tools.py extract` on the full-size Z-Image transformer (random bf16 weights written to disk first): its time
and peak host memory, against loading the fine-tune alone (the floor of any extraction that holds it in memory),
measured in the same run, each in its own process. An extraction that loads both models, as the first version of
`extract` did, needs about twice that floor: more than the 23 GiB of the 2-core CI machine at full size, so it is
not run here.

The stand-in fine-tune adds to every block Linear a difference of rank `--delta_rank` (singular values falling by 0.9
per direction) and a little full-rank noise, so a LoRA of that rank holds nearly all of it.

    python benchmarks/bench_extract.py --work /tmp/ex --rank 64 --out extract.json   # full size: ~25 GB disk, CPU
    python benchmarks/bench_extract.py --tiny --work /tmp/ex --out extract.json      # the tiny model (CI)

Prints one row per process (seconds, peak resident GiB) and the ratio of the peaks.
"""

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_scale import make_model  # noqa: E402

from zimage_utils.lora import lora_target_modules  # noqa: E402
from zimage_utils.lora_io import lora_metadata  # noqa: E402
from zimage_utils.model_loading import load_transformer  # noqa: E402

# Runs a script or code in a fresh process and prints its wall time and peak resident memory as its last line.
MEASURED = """
import json, resource, runpy, sys, time
start = time.perf_counter()
argv = json.loads(sys.argv[1])
try:
    if argv[0] == "-c":
        sys.argv = argv[1:]
        exec(compile(argv[1], "<measured>", "exec"))
    else:
        sys.argv = argv
        runpy.run_path(argv[0], run_name="__main__")
finally:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    print(json.dumps({"seconds": time.perf_counter() - start, "peak_rss_gib": peak}))
"""
ONE_LOADED = """
import sys, torch
from zimage_utils.model_loading import load_transformer
tuned = load_transformer(sys.argv[1], torch.bfloat16)
"""


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", required=True, help="Folder for the two models and the LoRA.")
    p.add_argument("--tiny", action="store_true", help="The tiny model (CI smoke test).")
    p.add_argument("--rank", type=int, default=64, help="extract --rank.")
    p.add_argument("--delta_rank", type=int, default=16, help="Rank of the stand-in fine-tune's differences.")
    p.add_argument("--out", required=True, help="JSON path.")
    return p.parse_args()


def make_finetune(base: Path, tuned: Path, delta_rank: int) -> None:
    """`tuned`: a model folder like `base` whose block Linears differ from it by a rank-`delta_rank` part plus noise."""
    if any((tuned / "transformer").glob("*.safetensors*")):
        return
    shutil.copytree(base, tuned, ignore=shutil.ignore_patterns("transformer"), dirs_exist_ok=True)
    transformer = load_transformer(str(base), torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    decay = torch.tensor([0.9**j for j in range(delta_rank)])
    with torch.no_grad():
        for name in lora_target_modules(transformer, "all"):
            weight = transformer.get_submodule(name).weight
            out, inp = weight.shape
            strong = (torch.randn(out, delta_rank, generator=g) * decay) @ torch.randn(delta_rank, inp, generator=g)
            scale = weight.float().std() * 0.05 / strong.std()  # a difference of ~5% of the weights
            noise = torch.randn(out, inp, generator=g) * weight.float().std() * 1e-3
            weight += (strong * scale + noise).to(weight.dtype)
    transformer.save_pretrained(tuned / "transformer", max_shard_size="2GB")


def measured(argv: list[str]) -> dict:
    """Wall seconds and peak resident GiB of `argv` (a script and its arguments, or ["-c", code, args...]) run in a
    fresh Python process; its output is echoed but for the last line."""
    done = subprocess.run(
        [sys.executable, "-c", MEASURED, json.dumps(argv)], cwd=ROOT, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"{argv[:2]} failed:\n{done.stderr[-3000:]}")
    lines = done.stdout.strip().splitlines()
    print("\n".join(lines[:-1]))
    return json.loads(lines[-1])


def main() -> None:
    args = parse_args()
    work = Path(args.work)
    base, tuned, out = work / "base", work / "tuned", work / "lora"
    start = time.perf_counter()
    make_model(base, full=not args.tiny)
    make_finetune(base, tuned, args.delta_rank)
    setup_s = time.perf_counter() - start

    one = measured(["-c", ONE_LOADED, str(tuned)])
    extract = measured(
        [str(ROOT / "lora_tools.py"), "extract", str(tuned), "--base", str(base), "--rank", str(args.rank)]
        + ["--output_dir", str(out), "--overwrite", "--device", "cpu"]
    )
    report = {
        "model": "tiny" if args.tiny else "full-size Z-Image (30 blocks + 4 refiners, every block Linear)",
        "rank": args.rank,
        "delta_rank": args.delta_rank,
        "torch_threads": torch.get_num_threads(),
        "setup_s": round(setup_s, 1),
        "fine_tune_loaded": one,
        "extract": extract,
        "peak_ratio": extract["peak_rss_gib"] / one["peak_rss_gib"],
        "lora_rank": lora_metadata(out)["rank"],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"{'process':<34} {'s':>8} {'peak GiB':>9}")
    print(f"{'the fine-tune loaded (no SVD)':<34} {one['seconds']:>8.1f} {one['peak_rss_gib']:>9.2f}")
    print(f"{'extract --rank ' + str(args.rank):<34} {extract['seconds']:>8.1f} {extract['peak_rss_gib']:>9.2f}")
    print(f"extract's peak / the one-model floor: {report['peak_ratio']:.2f}")


if __name__ == "__main__":
    main()
