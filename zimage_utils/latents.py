"""Images <-> Z-Image latents, with the VAE's shift and scale read from its config.

latents = (z - shift_factor) * scaling_factor, z = the VAE posterior's mode or a sample; the inverse is the one the
pipeline applies before `vae.decode`. Pixels are in [-1, 1], `[B, 3, H, W]`; latents `[B, 16, H/8, W/8]`.
"""

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """`[3, H, W]` float32 in [-1, 1] from a PIL image, the same values as diffusers' `VaeImageProcessor`."""
    # Same arithmetic as VaeImageProcessor (x / 255, then 2x - 1), so cached latents match the pipeline's img2img.
    array = np.asarray(image.convert("RGB")).astype(np.float32) / 255.0
    return 2.0 * torch.from_numpy(array).permute(2, 0, 1) - 1.0


@torch.no_grad()
def encode_images(
    vae,
    pixels: torch.Tensor,
    sampling: str = "mode",
    generators: list[torch.Generator] | None = None,
) -> torch.Tensor:
    """Encode `[B, 3, H, W]` pixels in [-1, 1] (H, W multiples of 8) to float32 latents `[B, C, H/8, W/8]`.

    sampling: "mode" takes the posterior mean (deterministic); "sample" draws mean + std * noise.
    generators: for "sample", one generator per image, so an image's latents do not depend on which batch or
        process it was encoded in (the same draw as `latent_dist.sample(generator)` on that image alone).
        None draws from the global RNG.
    """
    if sampling not in ("mode", "sample"):
        raise ValueError(f"sampling must be 'mode' or 'sample', got {sampling!r}")
    if generators is not None and len(generators) != pixels.shape[0]:
        raise ValueError(f"got {len(generators)} generators for a batch of {pixels.shape[0]} images; pass one each")
    posterior = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist
    # The shift/scale arithmetic runs in float32 so a bf16 VAE's output is rounded once, when the cache stores it.
    mean = posterior.mean.float()
    if sampling == "mode":
        latents = mean
    else:
        shape = (1, *mean.shape[1:])
        if generators is None:
            noise = randn_tensor(mean.shape, device=mean.device, dtype=posterior.mean.dtype)
        else:
            # randn_tensor draws on the generator's device and moves the result, as latent_dist.sample does.
            noise = torch.cat(
                [randn_tensor(shape, generator=g, device=mean.device, dtype=posterior.mean.dtype) for g in generators]
            )
        latents = mean + posterior.std.float() * noise.float()
    return (latents - vae.config.shift_factor) * vae.config.scaling_factor


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Decode `[B, C, h, w]` latents to pixels `[B, 3, 8h, 8w]` (about [-1, 1], not clamped), as the pipeline does."""
    latents = latents.to(device=vae.device, dtype=vae.dtype)
    latents = latents / vae.config.scaling_factor + vae.config.shift_factor
    return vae.decode(latents, return_dict=False)[0]
