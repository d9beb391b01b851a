"""`--base_precision bf16|fp8|nf4`: how the frozen base transformer's big Linears are stored while training.

- bf16: as released (11.5 GiB for the 6B transformer).
- fp8: torchao `Float8WeightOnlyConfig` (e4m3 weights with per-row scales, dequantised to bf16 for each matmul), applied
  in place after loading, so it works for folders, single files and a merged training adapter alike; it can quantise
  layer by layer on the GPU so the full bf16 model never sits there. The quantised Linears become `Fp8Linear`, which
  dequantises again in backward instead of keeping each weight's bf16 copy for it (torchao's own path keeps one per
  Linear in every block that is not checkpointed, and one block's worth during each recompute).
- nf4: bitsandbytes 4-bit NormalFloat through diffusers' `BitsAndBytesConfig`, at load time (needs a CUDA GPU).

Only the Linears inside the transformer blocks (attention and feed-forward: ~98% of the weights) change; the
embedders, timestep MLP, adaLN modulation and final layer stay bf16, since every token passes through them and they
are small. The LoRA stays fp32 over either (PEFT wraps torchao and bitsandbytes layers).
"""

import torch

BASE_PRECISIONS = ("bf16", "fp8", "nf4")
KEEP_BF16 = ("x_embedder", "cap_embedder", "t_embedder", "adaLN_modulation", "final_layer")


def quantizable(name: str, module: torch.nn.Module) -> bool:
    """A Linear inside a transformer block that is not one of the small `KEEP_BF16` layers (nor a LoRA layer)."""
    return isinstance(module, torch.nn.Linear) and not any(part in name for part in KEEP_BF16 + ("lora_",))


def check_base_precision(base_precision: str, device: torch.device, deepspeed_stage: int, training_adapter) -> None:
    """Refuse combinations that cannot work, with the fix, before anything heavy is loaded."""
    if base_precision == "bf16":
        return
    if deepspeed_stage:
        raise ValueError(
            f"--base_precision {base_precision} cannot be combined with DeepSpeed (ZeRO partitions bf16 weights): "
            f"use a DDP/single-GPU accelerate config, or DeepSpeed with --base_precision bf16"
        )
    if base_precision == "nf4":
        if device.type != "cuda":
            raise ValueError("--base_precision nf4 needs a CUDA GPU (bitsandbytes); use fp8 or bf16 on this device")
        if training_adapter:
            raise ValueError(
                "--training_adapter cannot be merged into an NF4 base; use --base_precision fp8 (quantised after "
                "the merge) or bf16"
            )


def nf4_config(compute_dtype: torch.dtype = torch.bfloat16):
    """diffusers' `BitsAndBytesConfig` for an NF4 base: bf16 compute, the `KEEP_BF16` layers left alone."""
    from diffusers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=compute_dtype,
        llm_int8_skip_modules=list(KEEP_BF16),
    )


class _DequantizingMatmul(torch.autograd.Function):
    """x @ W.T with W stored quantised: dequantised for the product in forward, and again in backward, so that
    autograd saves the quantised weight instead of a bf16 copy. Gradients equal those of F.linear on the copy."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight)
        ctx.x_dtype = x.dtype
        return torch.nn.functional.linear(x, weight.dequantize())

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (weight,) = ctx.saved_tensors
        # Only the input's gradient: the frozen base weight takes none.
        grad_x = grad_out.matmul(weight.dequantize().to(grad_out.dtype))
        return grad_x.to(ctx.x_dtype), None


class Fp8Linear(torch.nn.Linear):
    """A frozen Linear whose weight is a torchao float8 tensor, with `_DequantizingMatmul`'s backward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _DequantizingMatmul.apply(x, self.weight)
        return out if self.bias is None else out + self.bias.to(out.dtype)


def quantize_fp8_(transformer: torch.nn.Module, device: torch.device | str | None = None) -> int:
    """Store the block Linears' weights in float8 e4m3 (torchao weight-only), in place, each moved to `device`
    first (so quantising from host memory never needs the bf16 model on the GPU). Returns the number quantised."""
    try:
        from torchao.quantization import Float8WeightOnlyConfig, quantize_
    except ImportError as e:
        raise ImportError("--base_precision fp8 needs torchao: pip install torchao") from e
    names = [name for name, module in transformer.named_modules() if quantizable(name, module)]
    quantize_(transformer, Float8WeightOnlyConfig(), filter_fn=lambda m, name: quantizable(name, m), device=device)
    for name in names:
        # Same parameters, another forward; still an nn.Linear, so PEFT wraps it as a torchao layer
        transformer.get_submodule(name).__class__ = Fp8Linear
    return len(names)


def base_weight_gib(transformer: torch.nn.Module) -> float:
    """GiB the frozen base weights take as stored (quantised tensors count their packed data and scales)."""
    total = 0
    for p in transformer.parameters():
        if p.requires_grad:
            continue
        data = getattr(p, "data", p)
        inner = [getattr(data, name) for name in getattr(data, "__tensor_flatten__", lambda: ([], None))()[0]]
        total += sum(t.numel() * t.element_size() for t in inner) if inner else data.numel() * data.element_size()
    return total / 2**30
