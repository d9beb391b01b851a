"""Latents: encode/decode with the VAE's own shift and scale, reproducible per-image sampling."""

import copy

import pytest
import torch
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

from zimage_utils.latents import decode_latents, encode_images, pil_to_tensor
from zimage_utils.tiny import make_tiny_pipeline


@pytest.fixture(scope="module")
def vae():
    return make_tiny_pipeline(seed=0).vae


@pytest.fixture(scope="module")
def pixels():
    """Three 64x96 images in [-1, 1], [3, 3, 64, 96]."""
    return torch.rand(3, 3, 64, 96, generator=torch.Generator().manual_seed(0)) * 2 - 1


def test_latents_are_shifted_scaled_posterior_modes(vae, pixels):
    latents = encode_images(vae, pixels, sampling="mode")
    assert latents.shape == (3, vae.config.latent_channels, 64 // 8, 96 // 8) and latents.dtype == torch.float32
    with torch.no_grad():
        mode = vae.encode(pixels).latent_dist.mode()
    assert torch.equal(latents, (mode - vae.config.shift_factor) * vae.config.scaling_factor)


def test_cached_latents_decode_to_the_vae_reconstruction(vae, pixels):
    decoded = decode_latents(vae, encode_images(vae, pixels, sampling="mode"))
    with torch.no_grad():
        reconstruction = vae.decode(vae.encode(pixels).latent_dist.mode()).sample
    assert decoded.shape == pixels.shape
    torch.testing.assert_close(decoded, reconstruction, rtol=1e-5, atol=1e-5)


def test_sampling_with_one_generator_per_image_ignores_batching(vae, pixels):
    def generators():
        return [torch.Generator().manual_seed(1000 + i) for i in range(len(pixels))]

    batched = encode_images(vae, pixels, sampling="sample", generators=generators())
    one_by_one = torch.cat(
        [encode_images(vae, pixels[i : i + 1], sampling="sample", generators=[g]) for i, g in enumerate(generators())]
    )
    torch.testing.assert_close(batched, one_by_one, rtol=1e-6, atol=1e-6)

    # The same draw as the VAE's own latent_dist.sample on each image alone.
    with torch.no_grad():
        own = torch.cat(
            [vae.encode(pixels[i : i + 1]).latent_dist.sample(generator=g) for i, g in enumerate(generators())]
        )
    expected = (own - vae.config.shift_factor) * vae.config.scaling_factor
    torch.testing.assert_close(one_by_one, expected, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(batched, encode_images(vae, pixels, sampling="mode"))


def test_shift_and_scale_come_from_the_vae_config(vae, pixels):
    other = copy.deepcopy(vae)
    other.register_to_config(scaling_factor=0.5, shift_factor=-0.25)
    with torch.no_grad():
        mode = vae.encode(pixels).latent_dist.mode()

    latents = encode_images(other, pixels, sampling="mode")
    assert torch.equal(latents, (mode + 0.25) * 0.5)
    # Both latents come back to `mode` up to the round trip's rounding, which the decoder amplifies (1.1e-5 seen on
    # one pixel of 55296 in a CI-like run); a config ignored on either side would be off by the whole shift.
    torch.testing.assert_close(
        decode_latents(other, latents), decode_latents(vae, encode_images(vae, pixels)), rtol=1e-4, atol=1e-4
    )


def test_bad_arguments_are_refused(vae, pixels):
    with pytest.raises(ValueError, match="sampling must be"):
        encode_images(vae, pixels, sampling="mean")
    with pytest.raises(ValueError, match="one each"):
        encode_images(vae, pixels, sampling="sample", generators=[torch.Generator()])


def test_pil_to_tensor_matches_the_pipeline_image_processor():
    image = Image.new("RGB", (96, 64), (220, 40, 40))
    image.paste((15, 15, 15), (10, 10, 50, 40))
    tensor = pil_to_tensor(image)
    assert tensor.shape == (3, 64, 96) and tensor.min() >= -1 and tensor.max() <= 1
    reference = VaeImageProcessor(vae_scale_factor=16).preprocess(image)[0]
    assert torch.equal(tensor, reference)
