"""The trainer's whole loading phase (`training_base.load_training_base`) with a training adapter, each variant (base
precision and blocks swapped) in a fresh process: seconds, the peak of anonymous host memory above the process's
start, GPU memory, and the pinned host memory the swapped blocks took (`torch.cuda.host_memory_stats()`) against what
`block_swap.pack` predicts for them. It also checks the adapter's update against PEFT's merge on the CPU, for Linears
in swapped and in resident blocks: the same bf16 bits, or for an fp8 base the same e4m3 bytes and row scales.

    python benchmarks/bench_training_base.py --model /tmp/s/model --variants bf16:0,bf16:32,fp8:0,fp8:16 --out x.json
    python benchmarks/bench_training_base.py --tiny --variants bf16:2 --out x.json   # CPU smoke test (CI)
"""

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_load_memory import (  # noqa: E402
    add_arguments,
    anonymous_gib,
    model_and_adapter,
    run_children,
    start_peak_sampler,
)

from zimage_utils.base_precision import Fp8StoredLinear, quantize_rows  # noqa: E402

ADAPTER_SCALE = 0.8


def checked_linears(num_layers: int) -> list[str]:
    """Adapter Linears whose merged weights are compared: in the first blocks (swapped first) and the last."""
    middle, last = num_layers // 2, num_layers - 1
    return [
        "layers.0.attention.to_q",
        "layers.0.feed_forward.w2",
        f"layers.{middle}.attention.to_out.0",
        f"layers.{last}.feed_forward.w1",
    ]


def write_reference(model: str, adapter: Path, path: Path) -> None:
    """The checked Linears' weights after PEFT merges the adapter into the bf16 transformer on the CPU."""
    from safetensors.torch import save_file

    from zimage_utils.model_loading import load_transformer
    from zimage_utils.training_adapter import merge_training_adapter

    transformer = load_transformer(model, torch.bfloat16, "cpu")
    merge_training_adapter(transformer, str(adapter), ADAPTER_SCALE)
    names = checked_linears(len(transformer.layers))
    save_file({name: transformer.get_submodule(name).weight.detach().contiguous() for name in names}, str(path))


def run_variant(model: str, adapter: str, reference: str, precision: str, blocks: int) -> dict:
    """In this process: the trainer's load, measured, then the checks."""
    from accelerate import Accelerator
    from safetensors.torch import load_file

    from zimage_utils.block_swap import pack
    from zimage_utils.training_base import load_training_base

    accelerator = Accelerator(mixed_precision="bf16")
    cuda = accelerator.device.type == "cuda"
    args = SimpleNamespace(
        pretrained_model_name_or_path=model,
        revision=None,
        transformer_single_file=None,
        training_adapter=adapter,
        training_adapter_scale=ADAPTER_SCALE,
        base_precision=precision,
        blocks_to_swap=blocks,
    )
    start_anon = anonymous_gib()
    peak = start_peak_sampler()
    start = time.perf_counter()
    transformer, _ = load_training_base(args, accelerator, print0=lambda message: None)
    if cuda:
        torch.cuda.synchronize()
    load_s = time.perf_counter() - start
    time.sleep(0.05)
    swap = getattr(transformer, "_block_swap", None)
    sizes = [h.numel() * h.element_size() for pairs in swap.host for _, h in pairs] if swap else []
    row = {
        "variant": f"{precision}:{blocks}",
        "base_precision": precision,
        "blocks_to_swap": len(swap.blocks) if swap else 0,
        "load_s": load_s,
        "anon_peak_above_start_gib": peak[0] - start_anon,
        "gpu_allocated_gib": torch.cuda.memory_allocated() / 2**30 if cuda else None,
        "gpu_reserved_gib": torch.cuda.memory_reserved() / 2**30 if cuda else None,
        "swapped_weight_gib": sum(sizes) / 2**30,
        "pinned_predicted_gib": sum(size for size, _ in pack(sizes)) / 2**30 if sizes else 0.0,
        "pinned_gib": torch.cuda.host_memory_stats()["allocated_bytes.current"] / 2**30 if cuda else None,
    }
    row["adapter_checked"] = {
        name: merged_as_expected(transformer.get_submodule(name), weight, accelerator.device)
        for name, weight in load_file(reference).items()
    }
    return row


def merged_as_expected(linear: torch.nn.Module, expected: torch.Tensor, device: torch.device) -> bool:
    """Whether `linear` holds PEFT's merged weight `expected` (bf16) as its precision stores it: the same bf16 values,
    or for an fp8 Linear the e4m3 bytes and row scales `quantize_rows` makes of it on `device`, where the load made
    them."""
    if not isinstance(linear, Fp8StoredLinear):
        return torch.equal(linear.weight.detach().cpu(), expected)
    values, scale = quantize_rows(expected.to(device))
    return torch.equal(linear.weight.cpu(), values.view(torch.uint8).cpu()) and torch.equal(
        linear.weight_scale.view(torch.float32).cpu(), scale.cpu()
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser, "/tmp/bench_training_base")
    parser.add_argument(
        "--variants", default="bf16:0,bf16:32,fp8:0,fp8:16", help="precision:blocks_to_swap pairs, comma-separated."
    )
    args = parser.parse_args()
    reference = Path(args.work) / "reference.safetensors"
    if args._variant:  # a child process
        precision, blocks = args._variant.split(":")
        adapter = str(Path(args.work) / "adapter.safetensors")
        print(json.dumps(run_variant(args.model, adapter, str(reference), precision, int(blocks))))
        return
    model, adapter = model_and_adapter(args)
    write_reference(model, adapter, reference)
    rows = run_children(__file__, args, model)
    gib = lambda value: "-" if value is None else f"{value:.2f}"  # noqa: E731
    print(
        f"{'variant':9s} {'load s':>6s} {'anon peak':>9s} {'GPU alloc':>9s} {'swapped':>7s} {'pinned':>6s} "
        f"{'predicted':>9s}  adapter = PEFT merge"
    )
    for r in rows:
        checked = r.get("adapter_checked")
        same = "-" if checked is None else f"{sum(checked.values())}/{len(checked)} Linears"
        print(
            f"{r['variant']:9s} {r['load_s']:6.1f} {gib(r['anon_peak_above_start_gib']):>9s} "
            f"{gib(r['gpu_allocated_gib']):>9s} {gib(r['swapped_weight_gib']):>7s} {gib(r['pinned_gib']):>6s} "
            f"{gib(r['pinned_predicted_gib']):>9s}  {same}"
        )


if __name__ == "__main__":
    main()
