"""Host memory the trainer's loading takes, each variant in a fresh process: the transformer loaded to the CPU (its
safetensors files are memory-mapped), a training adapter merged there by PEFT, and for an fp8 base the adapter merged
by PEFT before quantising against added Linear by Linear as each is quantised (`training_adapter.LinearUpdates`).
The measure is the peak of anonymous resident memory (RssAnon: what the files' page cache does not cover), sampled
every 20 ms, above what the process held after loading. On the CPU the fp8 weights themselves stay in host memory too
(on a GPU they would not): compare the two fp8 rows with each other.

    python benchmarks/bench_scale.py ...  # or any Z-Image folder; then:
    python benchmarks/bench_load_memory.py --model /tmp/s/model --out load.json
    python benchmarks/bench_load_memory.py --tiny --out load.json            # CPU smoke test (CI keeps it working)
"""

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VARIANTS = ("load", "bf16_merge", "fp8_merge_then_quantize", "fp8_streamed")


def anonymous_gib() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 2**20
    raise RuntimeError("no RssAnon in /proc/self/status (Linux only)")


def start_peak_sampler() -> list[float]:
    """A one-element list whose value a daemon thread keeps at the highest anonymous memory seen (every 20 ms)."""
    peak = [anonymous_gib()]

    def sample() -> None:
        while True:
            peak[0] = max(peak[0], anonymous_gib())
            time.sleep(0.02)

    threading.Thread(target=sample, daemon=True).start()
    return peak


def run_variant(model: str, adapter: str, variant: str) -> dict:
    """In this process: load, then the variant's work, measuring anonymous memory throughout."""
    from zimage_utils.base_precision import quantize_after_loading_
    from zimage_utils.lora_io import read_lora
    from zimage_utils.model_loading import load_transformer
    from zimage_utils.training_adapter import LinearUpdates, merge_training_adapter

    peak = start_peak_sampler()
    start = time.perf_counter()
    transformer = load_transformer(model, torch.bfloat16, "cpu")
    loaded, load_s = anonymous_gib(), time.perf_counter() - start
    peak[0] = loaded
    start = time.perf_counter()
    state = read_lora(adapter)
    if variant == "bf16_merge":
        merge_training_adapter(transformer, state, 1.0)
    elif variant == "fp8_merge_then_quantize":
        merge_training_adapter(transformer, state, 1.0)
        quantize_after_loading_(transformer, "fp8", torch.device("cpu"))
    elif variant == "fp8_streamed":
        updates = LinearUpdates.of(state, 1.0)
        quantize_after_loading_(transformer, "fp8", torch.device("cpu"), update=updates)
        updates.finish(transformer)
    work_s = time.perf_counter() - start
    time.sleep(0.05)
    weights = sum(p.numel() * p.element_size() for p in transformer.parameters()) / 2**30
    return {
        "variant": variant,
        "weights_gib": weights,
        "anon_after_load_gib": loaded,
        "load_s": load_s,
        "anon_peak_above_load_gib": peak[0] - loaded,
        "work_s": work_s,
    }


def random_adapter(model: str, path: Path, rank: int) -> None:
    """A rank-`rank` LoRA on every attention and FFN Linear of the main layers, in diffusers keys."""
    from diffusers import ZImageTransformer2DModel
    from safetensors.torch import save_file

    with torch.device("meta"):
        transformer = ZImageTransformer2DModel.from_config(
            ZImageTransformer2DModel.load_config(model, subfolder="transformer")
        )
    g = torch.Generator().manual_seed(0)
    state = {}
    for name, m in transformer.named_modules():
        if name.startswith("layers.") and isinstance(m, torch.nn.Linear) and (".to_" in name or ".w" in name):
            state[f"transformer.{name}.lora_A.weight"] = torch.randn(rank, m.in_features, generator=g) * 0.01
            state[f"transformer.{name}.lora_B.weight"] = torch.randn(m.out_features, rank, generator=g) * 0.01
    save_file({k: v.to(torch.bfloat16) for k, v in state.items()}, str(path))


def add_arguments(parser: argparse.ArgumentParser, work: str) -> None:
    """The options both load benchmarks take, and the hidden one a child process gets."""
    parser.add_argument("--model", help="A Z-Image folder (transformer weights and config).")
    parser.add_argument("--tiny", action="store_true", help="The tiny random model, made in --work.")
    parser.add_argument("--work", default=work)
    parser.add_argument("--adapter_rank", type=int, default=16)
    parser.add_argument("--out", default=None)
    parser.add_argument("--_variant", help=argparse.SUPPRESS)


def model_and_adapter(args: argparse.Namespace) -> tuple[str, Path]:
    """The model folder (with --tiny, the tiny one, made in --work) and a random adapter for it in --work."""
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model = args.model
    if args.tiny:
        from zimage_utils.tiny import save_tiny_pipeline

        model = str(save_tiny_pipeline(work / "tiny_model"))
    random_adapter(model, work / "adapter.safetensors", args.adapter_rank)
    return model, work / "adapter.safetensors"


def run_children(script: str, args: argparse.Namespace, model: str) -> list[dict]:
    """Each of `args.variants` in a fresh process of `script`, whose last stdout line is its row; the rows so far
    written to --out after each, so a run cut short keeps what it measured."""
    rows = []
    for variant in args.variants.split(","):
        command = [sys.executable, script, "--model", model, "--work", args.work, "--_variant", variant]
        result = subprocess.run(command, capture_output=True, text=True, timeout=3600)
        if result.returncode != 0:
            raise RuntimeError(f"{variant} failed:\n{result.stderr[-3000:]}")
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
        if args.out:
            Path(args.out).write_text(json.dumps({"model": model, "rows": rows}, indent=2))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser, "/tmp/bench_load_memory")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args()
    if args._variant:  # a child process
        adapter = str(Path(args.work) / "adapter.safetensors")
        print(json.dumps(run_variant(args.model, adapter, args._variant)))
        return
    model, _ = model_and_adapter(args)
    rows = run_children(__file__, args, model)
    print(f"{'variant':26s} {'weights GiB':>11s} {'anon after load':>15s} {'anon peak above':>15s} {'work s':>7s}")
    for r in rows:
        print(
            f"{r['variant']:26s} {r['weights_gib']:11.2f} {r['anon_after_load_gib']:15.2f} "
            f"{r['anon_peak_above_load_gib']:15.2f} {r['work_s']:7.1f}"
        )


if __name__ == "__main__":
    main()
