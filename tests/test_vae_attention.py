"""The VAE's attention in query chunks computes what `scaled_dot_product_attention` does: the same latents and the
same decoded pixels (its speed on a GPU is in docs/BENCHMARKS.md)."""

import pytest
import torch
from diffusers import AutoencoderKL
from diffusers.models.attention_processor import AttnProcessor2_0

from zimage_utils import tiny
from zimage_utils.latents import decode_latents, encode_images
from zimage_utils.vae_attention import ChunkedAttnProcessor, attention_in_chunks, use_chunked_attention


@pytest.mark.parametrize("max_scores", [2**28, 3 * 2 * 50 * 7])  # one chunk; chunks of 7 rows, the last shorter
def test_attention_in_chunks_equals_sdpa(max_scores):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 2, 50, 16, generator=g) * 3 for _ in range(3))
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    out = attention_in_chunks(q, k, v, max_scores=max_scores)
    assert out.shape == expected.shape and out.dtype == expected.dtype
    assert torch.allclose(out, expected, atol=1e-5)


def test_a_vae_with_chunked_attention_encodes_and_decodes_as_before():
    torch.manual_seed(0)
    vae = AutoencoderKL(**tiny.TINY_VAE).eval()
    pixels = torch.rand(2, 3, 64, 48, generator=torch.Generator().manual_seed(1)) * 2 - 1
    latents, decoded = encode_images(vae, pixels), decode_latents(vae, encode_images(vae, pixels))
    assert use_chunked_attention(vae) == 2  # the encoder's and the decoder's mid block
    assert all(isinstance(p, ChunkedAttnProcessor) for p in vae.attn_processors.values())
    assert torch.allclose(encode_images(vae, pixels), latents, atol=1e-5)
    assert torch.allclose(decode_latents(vae, latents), decoded, atol=1e-5)
    vae.set_attn_processor(AttnProcessor2_0())
    assert torch.equal(encode_images(vae, pixels), latents)  # and the swap is reversible
