"""Precompute throughput with full-size components (random weights): the real Z-Image VAE config and Qwen3 with the
real 4B config, at 1024², through precompute_embeddings.py's own code (only weight loading is replaced).

    python benchmarks/bench_precompute.py --out results.json            # on a GPU
    python benchmarks/bench_precompute.py --tiny --num_images 8         # CPU smoke test (CI keeps it working)

Prints a table: VAE alone per batch size (eager / channels_last / compiled), text encoder alone (pad to 512 vs
longest), then the whole script (JPEG decode in DataLoader workers + both encoders + Arrow writes) in images/s.
"""

import argparse
import json
import os
import random
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import precompute_embeddings  # noqa: E402
from zimage_utils import tiny  # noqa: E402
from zimage_utils.latents import encode_images  # noqa: E402
from zimage_utils.text_encoding import encode_captions  # noqa: E402

# The released Z-Image VAE (Flux's AutoencoderKL layout) and Qwen3-4B's text model.
VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512],
    layers_per_block=2,
    latent_channels=16,
    norm_num_groups=32,
    sample_size=1024,
    scaling_factor=0.3611,
    shift_factor=0.1159,
    use_quant_conv=False,
    use_post_quant_conv=False,
)
QWEN3_4B = dict(
    vocab_size=151936,
    hidden_size=2560,
    intermediate_size=9728,
    num_hidden_layers=36,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=40960,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)


def make_captions(n: int) -> list[str]:
    """Captions of 40-120 words the tiny tokenizer knows (about one token each): ~90 templated tokens on average,
    like 60-80-word captions in Qwen's own tokenizer. The text encoder's cost follows the token count."""
    rng = random.Random(0)
    words = list(tiny.COLOURS) + list(tiny.SHAPES) + ["a", "on", "the", "background", "of", "small", "large"]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(40, 120))) for _ in range(n)]


def timed(fn, repeats: int, device) -> float:
    fn()  # warm-up (and compile)
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def make_jpegs(folder: Path, n: int, side: int) -> None:
    """Noisy JPEGs (harder to decode than flat colour) in several aspect ratios around side², with captions."""
    import numpy as np
    from PIL import Image

    captions = make_captions(64)
    shapes = [
        (side, side),
        (side * 3 // 4, side * 4 // 3),
        (side * 4 // 3, side * 3 // 4),
        (side * 9 // 16, side * 16 // 9),
    ]
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        h, w = shapes[i % len(shapes)]
        base = np.random.default_rng(i).integers(0, 255, (h // 8, w // 8, 3), dtype=np.uint8)
        Image.fromarray(base).resize((w, h), Image.BICUBIC).save(folder / f"img_{i:04d}.jpg", quality=92)
        (folder / f"img_{i:04d}.txt").write_text(captions[i % len(captions)])


def build_models(size: str, device, dtype):
    from diffusers import AutoencoderKL
    from transformers import Qwen3Config, Qwen3Model

    tokenizer = tiny.make_tokenizer()
    if size == "tiny":
        vae_cfg, te_cfg = (
            tiny.TINY_VAE,
            dict(tiny.TINY_TEXT_ENCODER),
        )
        te_cfg["vocab_size"] = len(tokenizer)
    else:
        vae_cfg, te_cfg = VAE_CONFIG, QWEN3_4B
    with torch.device(device):
        vae = AutoencoderKL(**vae_cfg).to(dtype).eval()
        text_encoder = Qwen3Model(Qwen3Config(**te_cfg)).to(dtype).eval()
    return vae, text_encoder, tokenizer


def write_config_only_model(folder: Path, vae, text_encoder, tokenizer) -> None:
    """A model folder with configs only: enough for the script's checks and fingerprint, not for weights."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "ZImagePipeline",
                "transformer": ["diffusers", "ZImageTransformer2DModel"],
                "vae": ["diffusers", "AutoencoderKL"],
                "text_encoder": ["transformers", "Qwen3Model"],
                "tokenizer": ["transformers", "Qwen2Tokenizer"],
                "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
            }
        )
    )
    vae.save_config(folder / "vae")
    text_encoder.config.save_pretrained(folder / "text_encoder")
    tokenizer.save_pretrained(folder / "tokenizer")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true", help="Tiny components on the CPU (smoke test).")
    parser.add_argument("--num_images", type=int, default=256)
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--batch_sizes", default="1,4,8,16")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--compile", action="store_true", help="Also time a torch.compile'd VAE encoder.")
    parser.add_argument("--out", default=None, help="Write the results as JSON here.")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    resolution = 64 if args.tiny else args.resolution
    vae, text_encoder, tokenizer = build_models("tiny" if args.tiny else "full", device, dtype)
    rows, results = (
        [],
        {
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "torch": torch.__version__,
            "resolution": resolution,
            "date": time.strftime("%Y-%m-%d"),
        },
    )
    repeats = 2 if args.tiny else 5

    # VAE alone
    for bs in [int(b) for b in args.batch_sizes.split(",")]:
        pixels = torch.rand(bs, 3, resolution, resolution, device=device, dtype=dtype) * 2 - 1
        variants = {"eager": vae}
        for name, model in variants.items():
            s = timed(partial(encode_images, model, pixels), repeats, device)
            rows.append(("vae " + name, bs, bs / s))
        if device.type == "cuda":
            vae_cl = vae.to(memory_format=torch.channels_last)
            pixels_cl = pixels.contiguous(memory_format=torch.channels_last)
            s = timed(partial(encode_images, vae_cl, pixels_cl), repeats, device)
            rows.append(("vae channels_last", bs, bs / s))
            vae.to(memory_format=torch.contiguous_format)
    if args.compile and device.type == "cuda":
        vae.encoder = torch.compile(vae.encoder)
        for bs in [int(b) for b in args.batch_sizes.split(",")]:
            pixels = torch.rand(bs, 3, resolution, resolution, device=device, dtype=dtype) * 2 - 1
            s = timed(partial(encode_images, vae, pixels), repeats, device)
            rows.append(("vae compiled", bs, bs / s))
        vae.encoder = vae.encoder._orig_mod

    # Text encoder alone, and whether padding to the longest caption changes any bit
    captions = make_captions(64)
    for bs in (16, 64):
        for padding in ("max_length", "longest"):
            call = partial(encode_captions, captions[:bs], tokenizer, text_encoder, 512, device, padding)
            s = timed(call, repeats, device)
            rows.append((f"text pad={padding}", bs, bs / s))
    exact, _ = encode_captions(captions[:16], tokenizer, text_encoder, 512, device, "max_length")
    short, _ = encode_captions(captions[:16], tokenizer, text_encoder, 512, device, "longest")
    results["text_longest_bit_identical"] = all(torch.equal(a, b) for a, b in zip(exact, short))
    results["text_longest_max_abs_diff"] = max(
        float((a.float() - b.float()).abs().max()) for a, b in zip(exact, short)
    )
    results["text_tokens_mean"] = sum(e.shape[0] for e in exact) / len(exact)

    # The whole script on JPEGs: decode in workers, both encoders, Arrow shards and merge
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_jpegs(tmp / "images", args.num_images, resolution)
        write_config_only_model(tmp / "model", vae, text_encoder, tokenizer)
        precompute_embeddings.load_vae = lambda *a, **k: vae
        precompute_embeddings.load_text_encoder_and_tokenizer = lambda *a, **k: (text_encoder, tokenizer)
        runs = [(8, "max_length", False), (8, "longest", False), (8, "longest", True), (8, "longest", True)]
        runs += [(16, "longest", True)]
        for k, (bs, padding, compiled) in enumerate(runs[:2] if args.tiny else runs):
            out = tmp / f"cache_{k}"
            cli = [
                "--pretrained_model_name_or_path",
                str(tmp / "model"),
                "--train_data_dir",
                str(tmp / "images"),
                "--output_dir",
                str(out),
                "--resolution",
                str(resolution),
                "--batch_size",
                str(bs),
                "--dataloader_num_workers",
                str(0 if args.tiny else args.workers),
                "--text_padding",
                padding,
            ] + (["--compile"] if compiled else [])
            start = time.perf_counter()
            precompute_embeddings.main(precompute_embeddings.parse_args(cli))
            elapsed = time.perf_counter() - start
            if hasattr(vae.encoder, "_orig_mod"):  # the next run compiles again, from dynamo's warm cache
                vae.encoder = vae.encoder._orig_mod
            label = f"script pad={padding}" + (" compile" if compiled else "")
            label += " (warm)" if compiled and (bs, padding, compiled) in runs[:k] else ""
            rows.append((label, bs, args.num_images / elapsed))
    if device.type == "cuda":
        results["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30

    results["rows"] = [{"what": w, "batch": b, "items_per_s": round(r, 2)} for w, b, r in rows]
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    print(
        f"\n{results['device']}, torch {results['torch']}, {resolution}², {args.num_images} JPEGs, "
        f"{args.workers} workers; text mean {results['text_tokens_mean']:.0f} tokens; pad=longest bit-identical: "
        f"{results['text_longest_bit_identical']} (max |diff| {results['text_longest_max_abs_diff']:.3g})"
    )
    print(f"{'what':40s} {'batch':>5s} {'items/s':>9s}")
    for w, b, r in rows:
        print(f"{w:40s} {b:5d} {r:9.1f}")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
