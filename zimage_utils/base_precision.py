"""`--base_precision bf16|fp8|nf4`: how the frozen base transformer's big Linears are stored while training.

- bf16: as released (11.5 GiB for the 6B transformer).
- fp8: e4m3 weights with per-row scales, dequantised to the activations' dtype for each matmul (`Fp8Linear`), in
  forward and again in backward, so no bf16 copy of a weight is kept for backward. Applied in place after loading, so
  it works for folders, single files and a merged training adapter alike, and layer by layer on the GPU so the full
  bf16 model never sits there. Any GPU (and the CPU) can run it. Our own rather than torchao's
  `Float8WeightOnlyConfig` (used up to session 9), which keeps a bf16 copy of each weight for backward and, compiled
  on an H100/H200, never got to its first step (docs/BENCHMARKS.md, sessions 2, 9 and 10).
- fp8_matmul: the same stored weights, and the matmuls themselves on fp8 tensor cores
  (`Fp8MatmulLinear`): each activation and output gradient is quantised per row too, and `torch._scaled_mm` multiplies.
  No bf16 weight is ever made, and backward computes only the input's gradient (torchao's float8 training also computes
  the frozen weight's, a third more matmul work). Needs compute capability >= 8.9 (Ada, Hopper) on a GPU.
- nf4: bitsandbytes 4-bit NormalFloat through diffusers' `BitsAndBytesConfig`, at load time (needs a CUDA GPU).

Only the Linears inside the transformer blocks (attention and feed-forward: ~98% of the weights) change; the
embedders, timestep MLP, adaLN modulation and final layer stay bf16, since every token passes through them and they
are small. The LoRA stays fp32 over each (PEFT wraps the fp8 Linears as Linears, and bitsandbytes' as its own).
"""

import functools
import os
from collections.abc import Callable, Sequence

import torch

BASE_PRECISIONS = ("bf16", "fp8", "fp8_matmul", "nf4")
FP8_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448
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
    if base_precision == "fp8_matmul":
        check_fp8_matmul(device)
    if base_precision == "nf4":
        if device.type != "cuda":
            raise ValueError("--base_precision nf4 needs a CUDA GPU (bitsandbytes); use fp8 or bf16 on this device")
        if training_adapter:
            raise ValueError(
                "--training_adapter cannot be merged into an NF4 base; use --base_precision fp8 (quantised after "
                "the merge) or bf16"
            )


def check_fp8_matmul(device: torch.device) -> None:
    """fp8 matmuls need fp8 tensor cores, or on the CPU a torch whose fp8 matmul takes row-wise scales."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        raise ValueError(
            f"--base_precision fp8_matmul needs fp8 tensor cores (compute capability 8.9+: Ada, Hopper, Blackwell); "
            f"this {torch.cuda.get_device_name(device)} has {torch.cuda.get_device_capability(device)}: use "
            f"--base_precision fp8 (fp8 storage, bf16 matmuls)"
        )
    if device.type == "cpu" and not cpu_has_rowwise_fp8():
        raise ValueError(
            f"--base_precision fp8_matmul: torch {torch.__version__} cannot multiply row-wise scaled fp8 on the CPU "
            f"(torch 2.13 can); upgrade torch, or use --base_precision fp8"
        )


def cpu_has_rowwise_fp8() -> bool:
    """Whether this torch's CPU `_scaled_mm` takes row-wise scales (torch 2.11's takes one scale per tensor only)."""
    a = torch.zeros(16, 16, dtype=torch.float8_e4m3fn)
    try:
        torch._scaled_mm(a, a.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16), out_dtype=torch.bfloat16)
    except RuntimeError:
        return False
    return True


def nf4_config(compute_dtype: torch.dtype = torch.bfloat16):
    """diffusers' `BitsAndBytesConfig` for an NF4 base: bf16 compute, the `KEEP_BF16` layers left alone."""
    from diffusers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=compute_dtype,
        llm_int8_skip_modules=list(KEEP_BF16),
    )


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) → e4m3 values (M, K) and fp32 scales (M, 1) with x ≈ values * scales: each row's largest magnitude
    maps to e4m3's largest (448)."""
    amax = torch.linalg.vector_norm(x, ord=float("inf"), dim=-1, keepdim=True).float().clamp(min=1e-12)
    scale = amax / FP8_MAX
    # (the clamp catches rounding just past 448, which the cast would turn into NaN: e4m3fn has no infinity)
    return (x / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


# Backward's weight transpose on a GPU by an inductor kernel (one per weight shape) instead of eager's strided copy:
# on an H200, 0.04-0.07 ms against 0.10-0.27 ms per weight, and a compiled 1024² step 0.204 s against 0.230 s
# (docs/BENCHMARKS.md). False (or ZIMAGE_FP8_EAGER_TRANSPOSE=1, for benchmarks of the trainer): eager, as on the CPU.
COMPILED_TRANSPOSE = os.environ.get("ZIMAGE_FP8_EAGER_TRANSPOSE") != "1"


def transposed_copy(weight_bytes: torch.Tensor) -> torch.Tensor:
    """(out, in) → its transpose (in, out), contiguous. Eager: a strided copy, 37 ms of a 234 ms compiled 1024²
    step on an H200 for all the block weights (as bytes or as e4m3 alike)."""
    return weight_bytes.t().contiguous()


@functools.cache
def gpu_compiled(fn):
    """`fn` compiled by inductor for the GPU, or `fn` itself where triton cannot run (torch's Windows wheels lack it;
    GPUs older than Volta). Compiled on first use, from inside an op (autograd's backward thread included): dynamo
    never traces an op's body, so this is a call like any other. Static shapes: the 6B model has three weight shapes."""
    try:
        from torch.utils._triton import has_triton
    except ImportError:  # (a private module: should it move, run eager)
        return fn
    return torch.compile(fn, dynamic=False) if has_triton() else fn


@torch.library.custom_op("zimage::fp8_weight_matmul", mutates_args=())
def fp8_weight_matmul(
    a: torch.Tensor, a_scale: torch.Tensor, weight_bytes: torch.Tensor, weight_scale: torch.Tensor, transpose: bool
) -> torch.Tensor:
    """(a (M, K) e4m3 · a_scale (M, 1)) times a stored weight Wq (out, in): the bytes of e4m3 values, as uint8.

    transpose=True:  @ Wq.T, scaled by weight_scale (out, 1) → (M, out)   (forward)
    transpose=False: @ Wq,   scaled by weight_scale (1, in)  → (M, in)    (input gradient)

    By `torch._scaled_mm` (row-wise scaled fp8 matmuls output bf16 only), which takes its second operand
    column-major. An opaque op to torch.compile, and the uint8 → e4m3 view and the transposing copy happen inside
    it: compiled on an H200 (torch 2.11), inductor's own lowering of `_scaled_mm` gave zeros and wrong gradients,
    and with only the matmul opaque, the input gradient still came out uncorrelated with eager's."""
    if transpose:
        b, scale_b = weight_bytes.t(), weight_scale.t()
    else:
        copy = gpu_compiled(transposed_copy) if COMPILED_TRANSPOSE and weight_bytes.is_cuda else transposed_copy
        b, scale_b = copy(weight_bytes).t(), weight_scale
    b = b.view(torch.float8_e4m3fn)
    return torch._scaled_mm(
        a.contiguous(), b, scale_a=a_scale.contiguous(), scale_b=scale_b.contiguous(), out_dtype=torch.bfloat16
    )


@fp8_weight_matmul.register_fake
def _(a, a_scale, weight_bytes, weight_scale, transpose):
    return a.new_empty((a.shape[0], weight_bytes.shape[0 if transpose else 1]), dtype=torch.bfloat16)


def _as_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # (decided while tracing, so that a cast which does nothing never enters the compiled graph)
    return t if t.dtype == dtype else t.to(dtype)


class _Fp8Matmul(torch.autograd.Function):
    """x @ W.T on fp8 tensor cores, W = diag(s) Wq stored as the bytes of e4m3 Wq (out, in; uint8) and fp32 s (out, 1).

    forward:  y = (x quantised per row) @ Wq.T, scaled by x's row scales and s.
    backward: dx = g @ W = (g * s.T) @ Wq: s folds into g's columns before g is quantised per row, so Wq is used
    as stored (`fp8_weight_matmul` transposes it into the layout `_scaled_mm` wants: a 39 MB copy at most, for the
    largest Linear). No gradient for the frozen weight."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight_bytes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight_bytes, scale)
        x_q, x_scale = quantize_rows(x.reshape(-1, x.shape[-1]))
        out = fp8_weight_matmul(x_q, x_scale, weight_bytes, scale, True)
        return _as_dtype(out.reshape(*x.shape[:-1], -1), x.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        weight_bytes, scale = ctx.saved_tensors
        g_q, g_scale = quantize_rows(grad_out.reshape(-1, grad_out.shape[-1]) * scale.t())  # fp32
        ones = torch.ones(1, weight_bytes.shape[1], device=weight_bytes.device, dtype=torch.float32)
        grad_x = fp8_weight_matmul(g_q, g_scale, weight_bytes, ones, False)
        # (x's dtype is the output's, so grad_out's: not kept on ctx, where it too changed inductor's result)
        return _as_dtype(grad_x.reshape(*grad_out.shape[:-1], -1), grad_out.dtype), None, None


class Fp8StoredLinear(torch.nn.Linear):
    """A frozen Linear stored in fp8 (`store_fp8_`): its weight is the e4m3 data viewed as uint8 and its fp32 row
    scales `weight_scale` (out, 1) are viewed as int32, so nothing that casts floating-point tensors
    (`Module.to(dtype)`, PEFT matching its adapter to the base weight's dtype) can touch them, and the model's
    dtype stays that of its bf16 layers. The subclasses say how it multiplies, and which Linears they can take."""

    @staticmethod
    def takes(linear: torch.nn.Linear) -> bool:
        return True


class Fp8MatmulLinear(Fp8StoredLinear):
    """Computing in fp8 (`_Fp8Matmul`): `--base_precision fp8_matmul`."""

    @staticmethod
    def takes(linear: torch.nn.Linear) -> bool:
        """Whether a GPU's `_scaled_mm` can multiply by this Linear's weight: both its sides a multiple of 16. Every
        block Linear of Z-Image's is; one that is not (a tiny test model's 85-wide FFN: "mat2 shape (32x85) must be
        divisible by 16" on an H200) becomes an `Fp8Linear` instead (`store_fp8_`), on every device alike."""
        return linear.in_features % 16 == 0 and linear.out_features % 16 == 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _Fp8Matmul.apply(x, self.weight, self.weight_scale.view(torch.float32))
        return out if self.bias is None else out + self.bias.to(out.dtype)


def dequantize(weight_bytes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The stored weight (e4m3 bytes, fp32 row scales) as a `dtype` matrix: values times scales in fp32, then cast."""
    return (weight_bytes.view(torch.float8_e4m3fn).float() * scale).to(dtype)


@torch.library.custom_op("zimage::fp8_dequantized_matmul", mutates_args=())
def fp8_dequantized_matmul(
    a: torch.Tensor, weight_bytes: torch.Tensor, scale: torch.Tensor, transpose: bool
) -> torch.Tensor:
    """a (..., in) @ W.T → (..., out) (transpose=True, forward), or a (..., out) @ W → (..., in) (the input gradient),
    with W (out, in) dequantised to a's dtype inside the op and dropped after it.

    An opaque op to torch.compile: when inductor saw the dequantisation, its partitioner kept every dequantised weight
    from forward for backward, the copies this storage exists to avoid (a compiled 1024² step on an H200 peaked
    5.4 GiB above bf16's, and 30 GiB with every block checkpointed)."""
    # (on a GPU one fused kernel per weight shape: 1 byte read and 2 written per weight, no fp32 temporary)
    fn = gpu_compiled(dequantize) if a.is_cuda else dequantize
    weight = fn(weight_bytes, scale, a.dtype)
    return torch.nn.functional.linear(a, weight) if transpose else a.matmul(weight)


@fp8_dequantized_matmul.register_fake
def _(a, weight_bytes, scale, transpose):
    return a.new_empty((*a.shape[:-1], weight_bytes.shape[0 if transpose else 1]))


class _DequantizingMatmul(torch.autograd.Function):
    """x @ W.T with W stored as e4m3 bytes and row scales, dequantised for the product in forward and again in
    backward (`fp8_dequantized_matmul`), so autograd keeps the 1-byte weight instead of a bf16 copy. Gradients equal
    those of F.linear on the dequantised weight. (Compiled inside a checkpointed block, its output is recomputed in
    backward only under a checkpoint policy: torch 2.13's own, or ours on older torch,
    `step_options._compiled_checkpoint_needs_policy`.)"""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight_bytes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight_bytes, scale)
        return fp8_dequantized_matmul(x, weight_bytes, scale, True)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        weight_bytes, scale = ctx.saved_tensors
        # Only the input's gradient: the frozen base weight takes none.
        return fp8_dequantized_matmul(grad_out, weight_bytes, scale, False), None, None


class Fp8Linear(Fp8StoredLinear):
    """Multiplying in the activations' dtype (`_DequantizingMatmul`): `--base_precision fp8`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _DequantizingMatmul.apply(x, self.weight, self.weight_scale.view(torch.float32))
        return out if self.bias is None else out + self.bias.to(out.dtype)


def store_fp8_(
    transformer: torch.nn.Module,
    linear_class: type,
    device: torch.device | str | None = None,
    host_blocks: Sequence[torch.nn.Module] = (),
    update: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
) -> int:
    """Quantise the block Linears' weights to e4m3 with per-row scales and make them `linear_class`, in place, one
    Linear at a time on `device` (so the bf16 model never needs to fit there); those inside `host_blocks` (swapped
    blocks, whose weights wait in host memory) go back there once quantised. `update(name, weight)`, if given, changes
    each bf16 weight on `device` first (a training adapter's merge). Returns the number converted."""
    on_host = {id(m) for block in host_blocks for m in block.modules()}
    names = [name for name, module in transformer.named_modules() if quantizable(name, module)]
    for name in names:
        linear = transformer.get_submodule(name)
        weight = linear.weight.detach().to(device or linear.weight.device)
        values, scale = quantize_rows(update(name, weight) if update else weight)
        if id(linear) in on_host:
            values, scale = values.cpu(), scale.cpu()
        linear.weight = torch.nn.Parameter(values.view(torch.uint8), requires_grad=False)
        linear.register_buffer("weight_scale", scale.view(torch.int32))
        if linear.bias is not None:
            linear.bias.data = linear.bias.data.to(values.device)
        linear.__class__ = linear_class if linear_class.takes(linear) else Fp8Linear
    return len(names)


def quantize_fp8_(transformer: torch.nn.Module, device: torch.device | str | None = None, **kwargs) -> int:
    """`--base_precision fp8`: the block Linears as `Fp8Linear` (see `store_fp8_`)."""
    return store_fp8_(transformer, Fp8Linear, device, **kwargs)


def use_fp8_matmul_(transformer: torch.nn.Module, device: torch.device | str | None = None, **kwargs) -> int:
    """`--base_precision fp8_matmul`: the block Linears as `Fp8MatmulLinear` (see `store_fp8_`), those whose shape
    the fp8 matmul cannot take as `Fp8Linear` (`Fp8MatmulLinear.takes`)."""
    return store_fp8_(transformer, Fp8MatmulLinear, device, **kwargs)


def quantize_after_loading_(
    transformer: torch.nn.Module,
    base_precision: str,
    device: torch.device,
    host_blocks: Sequence[torch.nn.Module] = (),
    update: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
) -> int:
    """The fp8 precisions, applied to a loaded (and possibly adapter-merged) bf16 model layer by layer onto `device`
    (`host_blocks`' Linears back to host memory once quantised, `update` applied to each weight first: see
    `store_fp8_`); bf16 stays as it is and NF4 was quantised while loading. Returns the number of Linears quantised."""
    if base_precision == "fp8":
        return quantize_fp8_(transformer, device, host_blocks=host_blocks, update=update)
    if base_precision == "fp8_matmul":
        return use_fp8_matmul_(transformer, device, host_blocks=host_blocks, update=update)
    return 0


def base_weight_gib(transformer: torch.nn.Module) -> float:
    """GiB the frozen base weights take as stored, with the fp8 Linears' row scales (NF4's scales live outside the
    tensors and are not counted: a few percent)."""
    frozen = [p for p in transformer.parameters() if not p.requires_grad] + list(transformer.buffers())
    return sum(t.numel() * t.element_size() for t in frozen) / 2**30
