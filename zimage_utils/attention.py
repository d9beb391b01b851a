"""Z-Image attention with the rotary embedding in real arithmetic, for training.

diffusers' `ZSingleStreamAttnProcessor` rotates queries and keys as complex64 numbers. torch.compile cannot fuse
complex ops, so in a compiled block they run as separate eager kernels on fp32 copies of q and k, and autograd keeps
those fp32 copies for the backward pass: on the H100 profile of a 1024² step this was ~0.13 GiB per block and the
largest single elementwise kernel. Written as (x0·cos − x1·sin, x0·sin + x1·cos) on real tensors, the same formula
fuses into the surrounding kernels and the compiler may recompute it in the backward pass instead of storing it.
Everything else (projections, q/k norms, `dispatch_attention_fn` and its backends, output projection) is the
processor's own code path; the LoRA layers on to_q/to_k/to_v/to_out are untouched.
"""

import torch
from diffusers.models.transformers.transformer_z_image import ZSingleStreamAttnProcessor


def rotate(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """x [B, S, H, D] (pairs of adjacent channels are complex numbers) times freqs_cis [B, S, D/2] (complex64),
    computed in fp32 like the complex product, returned in x's dtype."""
    freqs = torch.view_as_real(freqs_cis).unsqueeze(2)  # [B, S, 1, D/2, 2]
    cos, sin = freqs[..., 0], freqs[..., 1]
    pairs = x.float().unflatten(-1, (-1, 2))
    real, imag = pairs[..., 0], pairs[..., 1]
    return torch.stack((real * cos - imag * sin, real * sin + imag * cos), dim=-1).flatten(-2).type_as(x)


class RealRopeAttnProcessor(ZSingleStreamAttnProcessor):
    """`ZSingleStreamAttnProcessor` with `rotate` in place of its complex rotary embedding."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, freqs_cis=None):
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        query = attn.to_q(hidden_states).unflatten(-1, (attn.heads, -1))
        key = attn.to_k(hidden_states).unflatten(-1, (attn.heads, -1))
        value = attn.to_v(hidden_states).unflatten(-1, (attn.heads, -1))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if freqs_cis is not None:
            query, key = rotate(query, freqs_cis), rotate(key, freqs_cis)
        if attention_mask is not None and attention_mask.ndim == 2:  # [B, S] → broadcast over heads and queries
            attention_mask = attention_mask[:, None, None, :]
        out = dispatch_attention_fn(
            query,
            key,
            value,
            attn_mask=attention_mask,
            dropout_p=0.0,
            is_causal=False,
            backend=self._attention_backend,
            parallel_config=self._parallel_config,
        )
        out = attn.to_out[0](out.flatten(2, 3).to(query.dtype))
        return attn.to_out[1](out) if len(attn.to_out) > 1 else out


def use_real_rope(transformer: torch.nn.Module) -> int:
    """Swap every Z-Image attention processor for `RealRopeAttnProcessor`, in place; returns how many."""
    swapped = 0
    for module in transformer.modules():
        if type(getattr(module, "processor", None)) is ZSingleStreamAttnProcessor:
            module.set_processor(RealRopeAttnProcessor())
            swapped += 1
    return swapped
