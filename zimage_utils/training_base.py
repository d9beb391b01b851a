"""The frozen base the trainer trains on: the Z-Image transformer loaded in the precision the base is kept in (bf16,
fp8 made Linear by Linear on the GPU, NF4 while loading), a training adapter merged into it, blocks swapped to host
memory, and everything else on this process's device (except under ZeRO-3, which partitions it from host memory)."""

import argparse
from collections.abc import Callable

import torch

from .attention import use_real_rope
from .base_precision import nf4_config, quantize_after_loading_
from .block_swap import first_blocks, move_except_swapped, swap_blocks
from .distributed import deepspeed_stage
from .lora_io import read_lora
from .model_loading import load_transformer
from .training_adapter import LinearUpdates, merge_training_adapter


def load_training_base(
    args: argparse.Namespace,
    accelerator,
    print0: Callable[[str], None],
    adapter_state: dict[str, torch.Tensor] | None = None,
) -> tuple[torch.nn.Module, dict[str, torch.Tensor] | None]:
    """The transformer, frozen and placed, and the training adapter's state dict (None without one), which sampling
    applies at −scale. `adapter_state`: `--training_adapter` already read (else it is read here). The caller has
    checked that the model is a Z-Image (`model_loading.require_zimage`), as the trainer does before its caches."""
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    nf4 = args.base_precision == "nf4"  # quantised while loading, straight onto this process's GPU
    # A bf16 base that will sit whole on this process's device goes there straight from the (memory-mapped) files,
    # so that PEFT merges a LoKr training adapter there too: on the CPU the full model's merge took 73 s and 10.3 GiB
    # of host memory (2 CPU cores, docs/BENCHMARKS.md). fp8 is made Linear by Linear from a base on the CPU, swapped
    # blocks stay there, and ZeRO-3 partitions it.
    resident = args.base_precision == "bf16" and not args.blocks_to_swap and deepspeed_stage(accelerator) != 3
    transformer = load_transformer(
        args.pretrained_model_name_or_path,
        weight_dtype,
        device=accelerator.device if nf4 or resident else "cpu",
        revision=args.revision,
        single_file=args.transformer_single_file,
        quantization_config=nf4_config(weight_dtype) if nf4 else None,
    )
    transformer.requires_grad_(False)
    updates = None
    if args.training_adapter:  # a LoRA is added on the GPU, Linear by Linear (below); a LoKr by PEFT, here
        adapter_state = adapter_state if adapter_state is not None else read_lora(args.training_adapter)
        updates = LinearUpdates.of(adapter_state, args.training_adapter_scale)
        if updates is None:
            merge_training_adapter(transformer, adapter_state, args.training_adapter_scale)
    swapped = first_blocks(transformer, args.blocks_to_swap)  # their fp8 weights are made on the GPU, then kept off it
    quantize_after_loading_(transformer, args.base_precision, accelerator.device, swapped, updates)  # fp8: + updates
    use_real_rope(transformer)  # same attention, fusable rotary embedding (zimage_utils/attention.py)
    swap = swap_blocks(transformer, args.blocks_to_swap, accelerator.device)
    if swap:
        print0(f"{len(swap.blocks)} blocks' frozen weights ({swap.weight_gib():.2f} GiB) wait in pinned host memory")
    if deepspeed_stage(accelerator) != 3 and not nf4:  # ZeRO-3 partitions the base from host memory
        move_except_swapped(transformer, accelerator.device)
    if updates is not None:
        updates.finish(transformer, accelerator.device)  # the updates of bf16 Linears, where they now are
    return transformer, adapter_state
