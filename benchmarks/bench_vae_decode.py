"""GPU memory and time of one VAE decode, as validation sampling does it, with the real Z-Image VAE config (random
weights): full-frame in fp32 (what `ZImagePipeline` does with an fp32 VAE), in bf16, with the decoder's attention in
chunks, and in tiles (diffusers' `enable_tiling`, 512-pixel tiles), each against full-frame fp32 measured in the same
run.

    python benchmarks/bench_vae_decode.py --out decode.json                 # on a GPU, 1024² and 2048²
    python benchmarks/bench_vae_decode.py --tiny --resolutions 64           # CPU smoke test (CI keeps it working)

Prints one row per (resolution, variant): peak GiB allocated above the VAE's weights (what the decode adds to a
training process's memory), peak reserved, ms per decode, the ratio of the peak to fp32 full-frame's, and the largest
pixel difference from fp32 full-frame (images in [-1, 1]).
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_precompute import VAE_CONFIG  # noqa: E402

from zimage_utils import tiny  # noqa: E402
from zimage_utils.vae_attention import use_chunked_attention  # noqa: E402
from zimage_utils.validation import decode_in_tiles  # noqa: E402

# name -> (dtype, chunked attention, tiles)
VARIANTS = {
    "fp32": (torch.float32, False, False),
    "fp32_chunked": (torch.float32, True, False),
    "bf16": (torch.bfloat16, False, False),
    "fp32_tiled": (torch.float32, False, True),
    "fp32_tiled_chunked": (torch.float32, True, True),
    "bf16_tiled": (torch.bfloat16, False, True),
}


def build_vae(full: bool, dtype: torch.dtype, chunked: bool, tiled: bool, device: torch.device):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)  # the same random weights for every variant
    vae = AutoencoderKL(**(VAE_CONFIG if full else tiny.TINY_VAE)).to(device, dtype).eval().requires_grad_(False)
    if chunked:
        use_chunked_attention(vae)
    if tiled:
        decode_in_tiles(vae, 512 if full else 32)
    return vae


@torch.no_grad()
def measure(vae, latents: torch.Tensor, repeats: int) -> dict:
    """Peak GiB the decode adds above what was allocated before it, peak reserved GiB, ms per decode, the image."""
    device = latents.device
    cuda = device.type == "cuda"
    latents = latents.to(vae.dtype)
    image = vae.decode(latents).sample  # warm-up (cuDNN picks its algorithms)
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    start = time.perf_counter()
    for _ in range(repeats):
        image = vae.decode(latents).sample
    if cuda:
        torch.cuda.synchronize(device)
    seconds = (time.perf_counter() - start) / repeats
    result = {"ms": 1000 * seconds, "peak_gib": None, "reserved_gib": None}
    if cuda:
        result["peak_gib"] = (torch.cuda.max_memory_allocated(device) - before) / 2**30
        result["reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
    return result | {"image": image.float().cpu()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="the tiny VAE on the CPU (smoke test)")
    parser.add_argument("--resolutions", default="1024,2048", help="square image sides in pixels, comma-separated")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"any of {', '.join(VARIANTS)}")
    parser.add_argument("--repeats", type=int, default=3, help="timed decodes per variant, after one warm-up")
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    names = ["fp32"] + [n for n in args.variants.split(",") if n != "fp32"]
    rows = []
    for side in (int(s) for s in args.resolutions.split(",")):
        reference = None
        for name in names:
            vae = build_vae(not args.tiny, *VARIANTS[name], device)
            generator = torch.Generator().manual_seed(side)
            latents = torch.randn(1, vae.config.latent_channels, side // 8, side // 8, generator=generator)
            try:
                result = measure(vae, latents.to(device), args.repeats)
            except torch.OutOfMemoryError:
                result = {"ms": None, "peak_gib": None, "reserved_gib": None, "image": None, "error": "out of memory"}
            image = result.pop("image")
            if name == "fp32":
                reference = (image, result["peak_gib"])
            result["max_abs_diff"] = None if image is None else float((image - reference[0]).abs().max())
            result["peak_vs_fp32"] = result["peak_gib"] / reference[1] if result["peak_gib"] and reference[1] else None
            rows.append({"resolution": side, "variant": name, **result})
            print(json.dumps(rows[-1]), flush=True)
            del vae
            if device.type == "cuda":
                torch.cuda.empty_cache()
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    if args.out:
        meta = {"device": gpu, "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__}
        args.out.write_text(json.dumps(meta | {"rows": rows}, indent=2))

    def fmt(value, spec):
        return format(value, spec) if value is not None else format("-", ">" + spec.split(".")[0])

    print(f"\nVAE decode, {gpu}, batch 1")
    print(f"{'side':>5} {'variant':20} {'peak GiB':>9} {'reserved':>9} {'ms':>8} {'x fp32':>7} {'max |diff|':>10}")
    for r in rows:
        print(
            f"{r['resolution']:>5} {r['variant']:20} {fmt(r['peak_gib'], '9.2f')} {fmt(r['reserved_gib'], '9.2f')} "
            f"{fmt(r['ms'], '8.1f')} {fmt(r['peak_vs_fp32'], '7.2f')} {fmt(r['max_abs_diff'], '10.4f')}"
        )


if __name__ == "__main__":
    main()
