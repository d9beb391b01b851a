"""The VAE's mid-block self-attention as two matmuls with fp32 scores, a chunk of queries at a time.

The Z-Image VAE (Flux's AutoencoderKL layout) attends once in its encoder, over every latent pixel with a single
head of 512 channels: 16384 tokens at 1024². Flash and cuDNN attention kernels stop at head dim 256, so
`scaled_dot_product_attention` falls back to its memory-efficient kernel there: on an H100 that kernel took 4.7 ms per
1024² image, the largest single kernel of the compiled encoder, against 3.0 ms in chunks (docs/BENCHMARKS.md).
Computing scores = q·kᵀ with cuBLAS into fp32, an fp32 softmax, and probabilities·v, for a bounded block of query
rows at a time, is the same arithmetic in the same precision as the fused kernels (fp32 scores and softmax, the
probabilities rounded to the input dtype for the second matmul), not an approximation.
"""

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0


def attention_in_chunks(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, max_scores: int = 2**28
) -> torch.Tensor:
    """softmax(q·kᵀ / √d)·v for `[B, H, S, D]` inputs without a mask, holding at most `max_scores` fp32 scores
    (1 GiB) at once. Returns `[B, H, S, D]` in the inputs' dtype."""
    b, h, s, d = query.shape
    q, k_t, v = query.flatten(0, 1), key.flatten(0, 1).transpose(1, 2), value.flatten(0, 1)
    rows = max(1, max_scores // (b * h * k_t.shape[-1]))
    out = torch.empty_like(q)
    for start in range(0, s, rows):
        block = q[:, start : start + rows]
        if block.dtype == torch.float32 or not block.is_cuda:
            scores = torch.bmm(block.float(), k_t.float())
        else:  # cuBLAS accumulates in fp32 and keeps the fp32 result
            scores = torch.bmm(block, k_t, out_dtype=torch.float32)
        probabilities = torch.softmax(scores.mul_(d**-0.5), dim=-1).to(v.dtype)
        out[:, start : start + rows] = torch.bmm(probabilities, v)
    return out.unflatten(0, (b, h))


class ChunkedAttnProcessor(AttnProcessor2_0):
    """diffusers' `AttnProcessor2_0` for the VAE's unmasked self-attention over a feature map, with `attention_in_chunks`
    in place of `scaled_dot_product_attention`; anything else (sequences, masks, cross-attention, spatial norms) goes
    to the parent."""

    def __call__(self, attn: Attention, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        if (
            hidden_states.ndim != 4
            or encoder_hidden_states is not None
            or attention_mask is not None
            or attn.spatial_norm is not None
        ):
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        residual = hidden_states
        batch, channels, height, width = hidden_states.shape
        hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query, key, value = (
            x.view(batch, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2) for x in (query, key, value)
        )
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        hidden_states = attention_in_chunks(query, key, value)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch, -1, channels).to(query.dtype)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def use_chunked_attention(vae) -> int:
    """Give every attention of the VAE (the encoder's and the decoder's mid block) `ChunkedAttnProcessor`, in
    place; returns how many."""
    swapped = 0
    for module in vae.modules():
        if isinstance(module, Attention):
            module.set_processor(ChunkedAttnProcessor())
            swapped += 1
    return swapped
