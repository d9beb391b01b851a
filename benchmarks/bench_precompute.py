"""Precompute throughput with full-size components (random weights): the real Z-Image VAE config and Qwen3 with the
real 4B config, at 1024², through precompute_embeddings.py's own code (only weight loading is replaced).

    python benchmarks/bench_precompute.py --out results.json            # on a GPU
    python benchmarks/bench_precompute.py --compile --workers 12 --num_images 2048 --batch_sizes 8 \
        --script_runs longest,longest+compile,longest+compile,longest+compile+one_stream \
        --out results.json                                               # steady state, ~6-7 min on an H100
    python benchmarks/bench_precompute.py --tiny --num_images 8         # CPU smoke test (CI keeps it working)

Prints a table: VAE alone per batch size (eager / channels_last / compiled), text encoder alone (pad to 512 vs
longest), then the whole script (JPEG decode in DataLoader workers + both encoders + Arrow writes) in images/s,
end to end and in its encode loop alone, with the seconds of each phase the script reports. A `+compile` run
after another is "(warm)": dynamo traces again but inductor reuses its cached kernels, so cold minus warm is the
cost of compiling; the script itself counts the seconds its first batch of each shape blocked on compilation.
`+one_stream` runs the text encoder before the VAE on one CUDA stream instead of beside it on its own. `+sdpa` gives
the VAE diffusers' attention processor back (SDPA's memory-efficient kernel at head dim 512) instead of the script's
`attention_in_chunks`. `+text_groups` passes `--text_batch_size` (`--script_text_batch_size`, 64). `--vae_attention`
times that attention alone under each SDPA backend and in chunks.
"""

import argparse
import copy
import json
import multiprocessing
import os
import random
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import precompute_embeddings  # noqa: E402
from zimage_utils import cache as cache_lib  # noqa: E402
from zimage_utils import tiny  # noqa: E402
from zimage_utils.latents import encode_images  # noqa: E402
from zimage_utils.text_encoding import encode_captions, offload_text_encoder  # noqa: E402
from zimage_utils.vae_attention import AttnProcessor2_0  # noqa: E402

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


def make_jpeg(folder: Path, side: int, caption: str, i: int) -> None:
    """Image i: a noisy JPEG (harder to decode than flat colour) in one of 4 aspect ratios around side², and its
    caption; every image differs, as in a real folder."""
    import numpy as np
    from PIL import Image

    shapes = [
        (side, side),
        (side * 3 // 4, side * 4 // 3),
        (side * 4 // 3, side * 3 // 4),
        (side * 9 // 16, side * 16 // 9),
    ]
    h, w = shapes[i % len(shapes)]
    base = np.random.default_rng(i).integers(0, 255, (h // 8, w // 8, 3), dtype=np.uint8)
    Image.fromarray(base).resize((w, h), Image.BICUBIC).save(folder / f"img_{i:05d}.jpg", quality=92)
    (folder / f"img_{i:05d}.txt").write_text(caption)


def make_jpegs(folder: Path, n: int, side: int) -> None:
    """n captioned JPEGs, made in parallel (about 40 ms each at 1024² on one core). Call it before CUDA starts:
    the pool forks this process."""
    folder.mkdir(parents=True, exist_ok=True)
    captions = make_captions(64)
    jobs = [(folder, side, captions[i % len(captions)], i) for i in range(n)]
    with multiprocessing.get_context("fork").Pool(max(1, min(os.cpu_count() or 1, n))) as pool:
        pool.starmap(make_jpeg, jobs, chunksize=8)


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


def parse_script_runs(spec: str, tiny: bool) -> list[dict]:
    """--script_runs ("longest,longest+compile+one_stream") as [{padding, compile, one_stream}]; --tiny skips the
    compiled ones."""
    runs = []
    for run in [r for r in spec.split(",") if r]:  # "" = no whole-script runs
        padding, *options = run.split("+")
        known = ("compile", "one_stream", "sdpa", "text_groups", "te_offload")
        if padding not in ("max_length", "longest") or not set(options) <= set(known):
            raise SystemExit(
                f"--script_runs: {run!r} is not PADDING[+compile][+one_stream][+sdpa][+text_groups][+te_offload], "
                "PADDING max_length/longest"
            )
        runs.append({"padding": padding, **{option: option in options for option in known}})
    return [r for r in runs if not (tiny and r["compile"])]


def run_script(
    tmp: Path, k: int, resolution: int, bs: int, workers: int, run: dict, text_bs: int
) -> tuple[dict, list[bytes]]:
    """One run of precompute_embeddings.main on tmp/images into a fresh cache (removed afterwards): its stats (on
    a GPU with the peak memory it added, allocated and reserved) and the cache's caption embeddings in source order.
    one_stream: the text encoder runs on the VAE's CUDA stream, before it, as with no GPU stream to spare."""
    out = tmp / f"cache_{k}"
    cli = [
        "--pretrained_model_name_or_path", str(tmp / "model"),
        "--train_data_dir", str(tmp / "images"),
        "--output_dir", str(out),
        "--resolution", str(resolution),
        "--batch_size", str(bs),
        "--dataloader_num_workers", str(workers),
        "--text_padding", run["padding"],
    ] + (["--compile"] if run["compile"] else []) + (["--text_batch_size", str(text_bs)] if run["text_groups"] else [])  # fmt: skip
    cli += ["--text_encoder_offload"] if run["te_offload"] else []
    encode_batch, use_chunked_attention = (
        precompute_embeddings.encode_batch,
        precompute_embeddings.use_chunked_attention,
    )
    if run["one_stream"]:
        precompute_embeddings.encode_batch = lambda *a, text_stream=None, **k: encode_batch(*a, **k)
    if run["sdpa"]:  # the VAE's attention through diffusers' processor (SDPA), as before vae_attention.py
        precompute_embeddings.use_chunked_attention = lambda vae: vae.set_attn_processor(AttnProcessor2_0())
    try:
        with added_gpu_memory(torch.cuda.is_available()) as added:
            stats = precompute_embeddings.main(precompute_embeddings.parse_args(cli))
        stats.update(added)
    finally:
        precompute_embeddings.encode_batch = encode_batch
        precompute_embeddings.use_chunked_attention = use_chunked_attention
    dataset, _ = cache_lib.load_cache(out)
    embeds = [e for _, e in sorted(zip(dataset["source"], dataset["caption_embeds"]))]
    shutil.rmtree(out)  # 2 GB per 1000 images at 1024², twice (parts and merged data)
    return stats, embeds


@contextmanager
def added_gpu_memory(cuda: bool):
    """Yields a dict that, on leaving, holds the peak GPU memory the block added to what was already held (GiB
    allocated and reserved: "added_gib", "added_reserved_gib"); stays empty when `cuda` is False."""
    added = {}
    if not cuda:
        yield added
        return
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    allocated, reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
    yield added
    torch.cuda.synchronize()
    added["added_gib"] = round((torch.cuda.max_memory_allocated() - allocated) / 2**30, 2)
    added["added_reserved_gib"] = round((torch.cuda.max_memory_reserved() - reserved) / 2**30, 2)


def top_kernels(fn, steps: int = 3, n: int = 10) -> list:
    """The `n` CUDA kernels that took the most time per call of `fn`, in ms."""
    from torch.profiler import ProfilerActivity, profile

    if not torch.cuda.is_available():
        return []
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    from bench_train_step import kernel_ms

    kernels = kernel_ms(prof, steps)
    return [[k[:100], round(t, 3)] for k, t in sorted(kernels.items(), key=lambda kv: -kv[1])[:n]]


def attention_alone_rows(device, dtype, resolution: int, bs: int, row) -> None:
    """The encoder's mid-block attention (one head of 512 channels over (res/8)² tokens) alone under each SDPA
    backend and as `attention_in_chunks`: speed, and the largest error against fp32 arithmetic."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from zimage_utils.vae_attention import attention_in_chunks

    tokens = (resolution // 8) ** 2
    q, k, v = (torch.randn(bs, 1, tokens, 512, device=device, dtype=dtype) for _ in range(3))
    exact = attention_in_chunks(q.float(), k.float(), v.float())
    backends = {
        "default": None,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "flash": SDPBackend.FLASH_ATTENTION,
        "math": SDPBackend.MATH,
    }
    for name, backend in backends.items():

        def sdpa(backend=backend):
            if backend is None:
                return torch.nn.functional.scaled_dot_product_attention(q, k, v)
            with sdpa_kernel([backend]):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v)

        try:
            s = timed(sdpa, 5, device)
            err = float((sdpa().float() - exact).abs().max())
        except RuntimeError as error:
            row(f"vae attention {name}", bs, 0.0, error=str(error).splitlines()[0][:200])
            continue
        row(f"vae attention {name}", bs, bs / s, ms_per_image=round(s / bs * 1e3, 3), max_abs_err=err)
    s = timed(lambda: attention_in_chunks(q, k, v), 5, device)
    err = float((attention_in_chunks(q, k, v).float() - exact).abs().max())
    row("vae attention in chunks", bs, bs / s, ms_per_image=round(s / bs * 1e3, 3), max_abs_err=err)


def vae_attention_rows(vae, device, dtype, resolution: int, batch_sizes: list[int], row) -> None:
    """The attention alone (`attention_alone_rows`), then the whole encoder with diffusers' processor and with
    ours, eager and compiled, with the top kernels of each compiled one."""
    from zimage_utils.vae_attention import use_chunked_attention

    bs = min(batch_sizes[-1], 8)
    attention_alone_rows(device, dtype, resolution, bs, row)
    pixels = torch.rand(bs, 3, resolution, resolution, device=device, dtype=dtype) * 2 - 1
    latents = {}
    for name in ("diffusers", "chunked"):
        if name == "chunked":
            use_chunked_attention(vae)
        latents[name] = encode_images(vae, pixels)
        row(f"vae eager attention={name}", bs, bs / timed(partial(encode_images, vae, pixels), 5, device))
        torch._dynamo.reset()
        vae.encoder = torch.compile(vae.encoder)
        s = timed(partial(encode_images, vae, pixels), 5, device)
        kernels = top_kernels(partial(encode_images, vae, pixels))
        row(f"vae compiled attention={name}", bs, bs / s, top_kernels_ms=kernels)
        vae.encoder = vae.encoder._orig_mod
        torch._dynamo.reset()
    row(
        "vae latents chunked vs diffusers",
        bs,
        0.0,
        max_abs_diff=float((latents["chunked"] - latents["diffusers"]).abs().max()),
        max_abs=float(latents["diffusers"].abs().max()),
    )
    vae.set_attn_processor(AttnProcessor2_0())  # back to diffusers' processor for the rows after these


LOAD_ONCE = """
import sys, time, torch
from transformers import AutoModel
sys.path.insert(0, sys.argv[3])
from zimage_utils.model_loading import load_text_encoder_and_tokenizer
way, path = sys.argv[1], sys.argv[2]
torch.zeros(1, device="cuda")  # CUDA set up before the clock starts, as in the script
start = time.perf_counter()
if way == "host_then_gpu":
    model = AutoModel.from_pretrained(path, subfolder="text_encoder", dtype=torch.bfloat16).to("cuda")
else:
    model, _ = load_text_encoder_and_tokenizer(path, torch.bfloat16, "cuda")
torch.cuda.synchronize()
print(time.perf_counter() - start)
"""


def offloaded_copy(text_encoder, device, way: str):
    """A host-RAM copy of `text_encoder` whose layers visit `device` as they run: "accelerate" (its cpu_offload, one
    module's weights copied when it is called) or "ours" (the script's --text_encoder_offload)."""
    model = copy.deepcopy(text_encoder).to("cpu")
    if way == "accelerate":
        from accelerate import cpu_offload

        cpu_offload(model, execution_device=device)
    else:
        offload_text_encoder(model, device)
    return model


def text_offload_rows(text_encoder, tokenizer, captions, exact, device, repeats: int, row, results) -> None:
    """The text encoder offloaded to host RAM (accelerate's cpu_offload vs the script's group offloading) at 16 and
    64 captions per call: captions/s, the GPU memory it adds beyond what is already there, and whether its
    embeddings equal the resident model's (`exact`, 16 captions padded to max_length) bit for bit."""
    for way in ("accelerate", "ours"):
        model = offloaded_copy(text_encoder, device, way)
        for bs in (16, 64):
            call = partial(encode_captions, captions[:bs], tokenizer, model, 512, device, "longest")
            with added_gpu_memory(device.type == "cuda") as added:
                s = timed(call, repeats, device)
            row(f"text offload {way} pad=longest", bs, bs / s, added_gib=added.get("added_gib", 0.0))
        offloaded, _ = encode_captions(captions[:16], tokenizer, model, 512, device, "max_length")
        results[f"text_offload_{way}_bit_identical"] = all(torch.equal(a, b) for a, b in zip(exact, offloaded))
        del model, offloaded


def text_encoder_load_rows(text_encoder, tokenizer, tmp: Path, row, rounds: int = 2) -> None:
    """Seconds to load the 8 GB Qwen3-4B onto the GPU from a saved folder, in a fresh process each time (the files
    are in the page cache after saving, as on a second run): read into host memory then moved (transformers'
    default, the script before session 4) against `load_text_encoder_and_tokenizer` (read straight to the GPU)."""
    import subprocess

    folder = tmp / "load_model"
    text_encoder.save_pretrained(folder / "text_encoder")
    tokenizer.save_pretrained(folder / "tokenizer")
    root = str(Path(__file__).resolve().parents[1])
    for _ in range(rounds):
        for way in ("host_then_gpu", "ours"):
            proc = subprocess.run(
                [sys.executable, "-c", LOAD_ONCE, way, str(folder), root], capture_output=True, text=True
            )
            seconds = float(proc.stdout.split()[-1]) if proc.returncode == 0 else float("nan")
            row(
                f"text encoder load {way}",
                1,
                1 / seconds,
                seconds=round(seconds, 2),
                error=proc.stderr[-300:] * (proc.returncode != 0),
            )
    shutil.rmtree(folder)


def benchmark(args, runs: list[dict], resolution: int, tmp: Path) -> dict:
    """The results JSON: encoders alone on random inputs, then each whole-script run on the JPEGs in tmp/images."""
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    if device.type == "cpu":  # --tiny on a GPU host: the script's runs too, where the models they are given are
        os.environ["ACCELERATE_USE_CPU"] = "1"
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    vae, text_encoder, tokenizer = build_models("tiny" if args.tiny else "full", device, dtype)
    rows, results = (
        [],
        {
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "torch": torch.__version__,
            "resolution": resolution,
            "num_images": args.num_images,
            "workers": 0 if args.tiny else args.workers,
            "date": time.strftime("%Y-%m-%d"),
            "alloc_conf": os.environ.get("PYTORCH_ALLOC_CONF") or os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
        },
    )
    repeats = 2 if args.tiny else 5

    def row(what: str, batch: int, items_per_s: float, **extra) -> None:
        rows.append({"what": what, "batch": batch, "items_per_s": round(items_per_s, 2), **extra})
        print(rows[-1], flush=True)
        if args.out:  # after every row, so a crash later keeps what was measured
            Path(args.out).write_text(json.dumps({**results, "rows": rows}, indent=2))

    # VAE alone
    for bs in [int(b) for b in args.batch_sizes.split(",")]:
        pixels = torch.rand(bs, 3, resolution, resolution, device=device, dtype=dtype) * 2 - 1
        s = timed(partial(encode_images, vae, pixels), repeats, device)
        row("vae eager", bs, bs / s)
        if device.type == "cuda":
            vae_cl = vae.to(memory_format=torch.channels_last)
            pixels_cl = pixels.contiguous(memory_format=torch.channels_last)
            s = timed(partial(encode_images, vae_cl, pixels_cl), repeats, device)
            row("vae channels_last", bs, bs / s)
            vae.to(memory_format=torch.contiguous_format)
    if args.compile and device.type == "cuda":
        vae.encoder = torch.compile(vae.encoder)
        for bs in [int(b) for b in args.batch_sizes.split(",")]:
            pixels = torch.rand(bs, 3, resolution, resolution, device=device, dtype=dtype) * 2 - 1
            s = timed(partial(encode_images, vae, pixels), repeats, device)
            row("vae compiled", bs, bs / s)
        if args.cudnn_benchmark:  # cuDNN times its convolution algorithms per shape and keeps the fastest
            torch.backends.cudnn.benchmark = True
            for bs in [int(b) for b in args.batch_sizes.split(",")]:
                pixels = torch.rand(bs, 3, resolution, resolution, device=device, dtype=dtype) * 2 - 1
                row(
                    "vae compiled cudnn.benchmark",
                    bs,
                    bs / timed(partial(encode_images, vae, pixels), repeats, device),
                )
        vae.encoder = vae.encoder._orig_mod
        for variant in [v for v in args.vae_variants.split(",") if v]:
            # channels_last: NHWC activations, cuDNN's native convolution layout (slower eager, see above);
            # max_autotune: inductor times Triton templates against the library kernels for each shape.
            layout = torch.channels_last if variant == "channels_last" else torch.contiguous_format
            mode = "max-autotune-no-cudagraphs" if variant == "max_autotune" else None
            vae.to(memory_format=layout)
            torch._dynamo.reset()
            vae.encoder = torch.compile(vae.encoder, mode=mode)
            for bs in [int(b) for b in args.batch_sizes.split(",")]:
                pixels = torch.rand(bs, 3, resolution, resolution, device=device, dtype=dtype) * 2 - 1
                pixels = pixels.contiguous(memory_format=layout)
                begin = time.perf_counter()
                s = timed(partial(encode_images, vae, pixels), repeats, device)
                row(f"vae compiled {variant}", bs, bs / s, first_calls_s=round(time.perf_counter() - begin, 1))
            vae.encoder = vae.encoder._orig_mod
            vae.to(memory_format=torch.contiguous_format)
            torch._dynamo.reset()  # dynamo does not guard on the weights' layout: drop code compiled for this one
        if args.cudnn_benchmark:
            for bs in [int(b) for b in args.batch_sizes.split(",")]:
                pixels = torch.rand(bs, 3, resolution, resolution, device=device, dtype=dtype) * 2 - 1
                row("vae eager cudnn.benchmark", bs, bs / timed(partial(encode_images, vae, pixels), repeats, device))

    if args.vae_attention and device.type == "cuda":
        vae_attention_rows(vae, device, dtype, resolution, [int(b) for b in args.batch_sizes.split(",")], row)

    # Text encoder alone, and whether padding to the longest caption changes any bit
    captions = make_captions(64)
    for bs in (16, 64):
        for padding in ("max_length", "longest"):
            call = partial(encode_captions, captions[:bs], tokenizer, text_encoder, 512, device, padding)
            s = timed(call, repeats, device)
            row(f"text pad={padding}", bs, bs / s)
    exact, _ = encode_captions(captions[:16], tokenizer, text_encoder, 512, device, "max_length")
    short, _ = encode_captions(captions[:16], tokenizer, text_encoder, 512, device, "longest")
    results["text_longest_bit_identical"] = all(torch.equal(a, b) for a, b in zip(exact, short))
    results["text_longest_max_abs_diff"] = max(
        float((a.float() - b.float()).abs().max()) for a, b in zip(exact, short)
    )
    results["text_tokens_mean"] = sum(e.shape[0] for e in exact) / len(exact)

    if args.text_offload:
        text_offload_rows(text_encoder, tokenizer, captions, exact, device, repeats, row, results)

    if args.text_encoder_load and device.type == "cuda":
        text_encoder_load_rows(text_encoder, tokenizer, tmp, row)

    # The whole script on JPEGs: decode in workers, both encoders, Arrow shards and merge
    write_config_only_model(tmp / "model", vae, text_encoder, tokenizer)
    precompute_embeddings.load_vae = lambda *a, **k: vae
    # --text_encoder_offload loads the text encoder to the CPU (device "cpu") and offloads it: give it a host copy,
    # made before the run so that the copy's passage through the GPU is not counted as the run's memory
    host_copy = {}
    precompute_embeddings.load_text_encoder_and_tokenizer = lambda path, dtype, where, **k: (
        host_copy.pop("model") if str(where) == "cpu" and device.type == "cuda" else text_encoder,
        tokenizer,
    )
    bs, workers = args.script_batch_size, results["workers"]
    embeds_of = {}  # padding -> the first run's caption embeddings, to compare later runs with
    for k, run in enumerate(runs):
        if run["te_offload"] and device.type == "cuda":
            host_copy["model"] = copy.deepcopy(text_encoder).to("cpu")
        stats, embeds = run_script(tmp, k, resolution, bs, workers, run, args.script_text_batch_size)
        same_as_first = embeds == embeds_of.setdefault((run["padding"], run["text_groups"]), embeds)
        if hasattr(vae.encoder, "_orig_mod"):  # the next run compiles again, from inductor's warm cache
            vae.encoder = vae.encoder._orig_mod
        label = f"script pad={run['padding']}" + " compile" * run["compile"] + " one-stream" * run["one_stream"]
        label += " sdpa-attention" * run["sdpa"] + f" text-bs{args.script_text_batch_size}" * run["text_groups"]
        label += " te-offload" * run["te_offload"]
        label += " (warm)" if run["compile"] and any(r["compile"] for r in runs[:k]) else ""
        row(
            label,
            bs,
            stats["images_per_s"],
            encode_items_per_s=round(stats["encode_images_per_s"], 2),
            compile_s=round(stats["compile_seconds"], 1),
            seconds={name: round(v, 1) for name, v in stats["seconds"].items()},
            caption_embeds_equal_first_run=same_as_first,
            **{k: stats[k] for k in ("added_gib", "added_reserved_gib") if k in stats},
        )
    compiled = [r for r in rows if r["what"].startswith("script") and " compile" in r["what"]]
    if len(compiled) >= 2:  # cold minus warm encode loop: what compiling every batch shape cost
        results["compile_cost_s"] = round(compiled[0]["seconds"]["encode"] - compiled[1]["seconds"]["encode"], 1)
    if device.type == "cuda":
        results["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    results["rows"] = rows
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true", help="Tiny components on the CPU (smoke test).")
    parser.add_argument("--num_images", type=int, default=256, help="JPEGs the whole-script runs encode.")
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--batch_sizes", default="1,4,8,16", help="Batch sizes of the VAE-alone rows.")
    parser.add_argument("--workers", type=int, default=8, help="DataLoader workers of the whole-script runs.")
    parser.add_argument("--compile", action="store_true", help="Also time a torch.compile'd VAE encoder.")
    parser.add_argument(
        "--script_runs",
        default="max_length,longest,longest+compile,longest+compile",
        help="Whole-script runs, in order: PADDING[+compile][+one_stream][+sdpa][+text_groups][+te_offload] (PADDING: "
        "max_length, longest). A +compile run after another is warm. +one_stream: no separate CUDA stream for the "
        "text encoder. +te_offload: --text_encoder_offload. --tiny skips +compile.",
    )
    parser.add_argument(
        "--vae_variants",
        default="",
        help="With --compile: also time the compiled VAE encoder as channels_last and/or max_autotune (comma list).",
    )
    parser.add_argument("--script_batch_size", type=int, default=8, help="--batch_size of the whole-script runs.")
    parser.add_argument(
        "--script_text_batch_size", type=int, default=64, help="--text_batch_size of the +text_groups script runs."
    )
    parser.add_argument(
        "--cudnn_benchmark", action="store_true", help="Also time the VAE with cudnn.benchmark (kept on after)."
    )
    parser.add_argument(
        "--vae_attention",
        action="store_true",
        help="Time the VAE's mid-block attention under each SDPA backend and in chunks (zimage_utils.vae_attention), "
        "the whole VAE with each, and profile the compiled VAE encoder (GPU).",
    )
    parser.add_argument(
        "--text_encoder_load",
        action="store_true",
        help="Time loading the saved text encoder onto the GPU: via host memory vs the script's way (GPU).",
    )
    parser.add_argument(
        "--text_offload",
        action="store_true",
        help="Time the text encoder offloaded to host RAM: accelerate's cpu_offload vs the script's group offloading.",
    )
    parser.add_argument("--out", default=None, help="Write the results as JSON here.")
    args = parser.parse_args()
    precompute_embeddings.use_expandable_segments()  # as the script does, before anything touches CUDA
    runs = parse_script_runs(args.script_runs, args.tiny)
    resolution = 64 if args.tiny else args.resolution
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        started = time.perf_counter()
        make_jpegs(tmp / "images", args.num_images, resolution)  # before CUDA: the pool forks
        jpeg_s = time.perf_counter() - started
        results = benchmark(args, runs, resolution, tmp)
    results["jpeg_creation_s"] = round(jpeg_s, 1)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    print(
        f"\n{results['device']}, torch {results['torch']}, {resolution}², {args.num_images} JPEGs (made in "
        f"{jpeg_s:.0f} s), {results['workers']} workers; text mean {results['text_tokens_mean']:.0f} tokens; "
        f"pad=longest bit-identical: {results['text_longest_bit_identical']} "
        f"(max |diff| {results['text_longest_max_abs_diff']:.3g})"
    )
    for way in ("accelerate", "ours"):
        if f"text_offload_{way}_bit_identical" in results:
            print(f"text encoder offloaded ({way}) bit-identical: {results[f'text_offload_{way}_bit_identical']}")
    if "compile_cost_s" in results:
        print(f"compiling the VAE encoder for every batch shape: {results['compile_cost_s']:.1f} s (cold - warm)")
    print(f"{'what':40s} {'batch':>5s} {'items/s':>9s} {'encode loop':>11s}  script phases (s)")
    for row in results["rows"]:
        line = f"{row['what']:40s} {row['batch']:5d} {row['items_per_s']:9.1f}"
        if "encode_items_per_s" in row:
            phases = ", ".join(f"{k} {v:.1f}" for k, v in row["seconds"].items())
            line += f" {row['encode_items_per_s']:11.1f}  {phases}; compiling {row['compile_s']:.1f}"
        print(line)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
