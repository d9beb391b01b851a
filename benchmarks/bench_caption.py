"""caption_images.py's speed and memory on the default captioner's architecture: a Qwen3-VL-8B with random weights
(built offline, the published model's sizes), in bf16 and in NF4 (`--load_in_4bit`), at several batch sizes; the
whole script once; and a batch that runs out of GPU memory being captioned again in halves.

    python benchmarks/bench_caption.py --work /tmp/cap --out caption.json --deadline_s 540      # one GPU
    python benchmarks/bench_caption.py --work /tmp/cap --out caption.json --captioner DIR \\
        --images 3 --batch_sizes 1,2 --ways bf16                                                 # any saved model

Random weights never write the end-of-turn token, so every caption is `--max_new_tokens` long: the figures are for
captions of that length (a real model stops earlier on most images). The images are 1 MP (caption_images.py's
default --max_pixels), in the three aspects of training buckets. Each way loads the model through
`captioning.load_captioner`, as the script does, and times `captioning.FittingBatches` after one warm-up batch.
Qwen-VL processors need torchvision (the GPU hosts have it; the CPU test uses --captioner with the tiny LLaVA).
"""

import argparse
import gc
import json
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_scale import PAST_DEADLINE, launch  # noqa: E402

from zimage_utils import tiny  # noqa: E402
from zimage_utils.captioning import DEFAULT_INSTRUCTION, FittingBatches, fit_pixels, load_captioner  # noqa: E402

# Qwen/Qwen3-VL-8B-Instruct's sizes (8.77e9 parameters); its vocabulary, with our tiny tokenizer's tokens in front
QWEN3_VL_8B_TEXT = dict(
    hidden_size=4096,
    intermediate_size=12288,
    num_hidden_layers=36,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    vocab_size=151936,
    max_position_embeddings=262144,
    rope_parameters={
        "rope_type": "default",
        "rope_theta": 5e6,
        "mrope_section": [24, 20, 20],
        "mrope_interleaved": True,
    },
)
QWEN3_VL_8B_VISION = dict(
    depth=27,
    hidden_size=1152,
    intermediate_size=4304,
    num_heads=16,
    out_hidden_size=4096,
    patch_size=16,
    spatial_merge_size=2,
    temporal_patch_size=2,
    deepstack_visual_indexes=[8, 16, 24],
)
VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
QWEN_VL_CHAT_TEMPLATE = tiny.CAPTIONER_CHAT_TEMPLATE.replace("<image>", "<|vision_start|><|image_pad|><|vision_end|>")
SIZES = [(1024, 1024), (832, 1248), (1248, 832)]  # 1 MP, as the training buckets' aspects
REPORT = re.compile(r"captioned (?P<images>\d+) image\(s\) in (?P<seconds>[\d.]+) s")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", required=True, help="Folder for the model and the images.")
    p.add_argument("--out", required=True, help="JSON path.")
    p.add_argument("--captioner", default=None, help="A saved captioner to use instead of the random Qwen3-VL-8B.")
    p.add_argument("--images", type=int, default=32, help="Images captioned per batch size (after the warm-up).")
    p.add_argument("--batch_sizes", default="1,4,8,16", help="bf16 batch sizes, comma-separated.")
    p.add_argument("--nf4_batch_sizes", default="1,8", help="NF4 batch sizes (CUDA only).")
    p.add_argument("--ways", default="bf16,nf4,script,oom", help="What to run: bf16, nf4, script, oom.")
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--deadline_s", type=float, default=0, help="Start nothing past this many seconds.")
    return p.parse_args()


def save_random_qwen3_vl(folder: Path, device: torch.device) -> Path:
    """A Qwen3-VL-8B with random bf16 weights and a processor built offline (tiny tokenizer, Qwen-VL chat format)."""
    from transformers import (
        Qwen2VLImageProcessor,
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
        Qwen3VLProcessor,
        Qwen3VLVideoProcessor,
    )

    if (folder / "model.safetensors.index.json").exists():
        return folder
    tokenizer = tiny.make_tokenizer()
    tokenizer.add_tokens(VISION_TOKENS, special_tokens=True)
    ids = dict(zip(VISION_TOKENS, tokenizer.convert_tokens_to_ids(VISION_TOKENS), strict=True))
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    config = Qwen3VLConfig(
        text_config=QWEN3_VL_8B_TEXT,
        vision_config=QWEN3_VL_8B_VISION,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen3VLForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    model.generation_config.eos_token_id = end_of_turn
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    pixels = dict(shortest_edge=65536, longest_edge=16777216)
    normalise = dict(image_mean=[0.5] * 3, image_std=[0.5] * 3)
    processor = Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(patch_size=16, merge_size=2, size=pixels, **normalise),
        video_processor=Qwen3VLVideoProcessor(patch_size=16, merge_size=2, **normalise),
        tokenizer=tokenizer,
        chat_template=QWEN_VL_CHAT_TEMPLATE,
    )
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return folder


def make_images(folder: Path, count: int) -> list[Path]:
    """`count` 1 MP JPEGs of random shapes, cycling through SIZES."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        path = folder / f"{i:04d}.jpg"
        if not path.exists():
            width, height = SIZES[i % len(SIZES)]
            low = rng.integers(0, 256, size=(height // 32, width // 32, 3), dtype=np.uint8)
            Image.fromarray(low).resize((width, height), Image.Resampling.BICUBIC).save(path, quality=90)
        paths.append(path)
    return paths


def peak_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None


def sweep(way, model_dir, images, batch_sizes, args, device, deadline) -> list[dict]:
    """Load the model `way` (bf16 | nf4) and caption `args.images` images at each batch size after a warm-up."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    start = time.perf_counter()
    model, processor = load_captioner(str(model_dir), device, dtype, load_in_4bit=way == "nf4")
    load_s = time.perf_counter() - start
    weights_gib = torch.cuda.memory_allocated() / 2**30 if device.type == "cuda" else None
    rows = []
    for batch_size in batch_sizes:
        row = {
            "way": way,
            "dtype": str(dtype).removeprefix("torch."),
            "batch_size": batch_size,
            "load_s": round(load_s, 1),
        }
        if deadline():
            rows.append({**row, "error": PAST_DEADLINE})
            continue
        captioner = FittingBatches(model, processor, DEFAULT_INSTRUCTION, args.max_new_tokens, batch_size)
        try:
            captioner(images[:batch_size])  # warm-up
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            results = captioner(images[: args.images])
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
        except (torch.OutOfMemoryError, ValueError) as error:
            rows.append({**row, "error": str(error)[:300]})
            continue
        new_tokens = sum(len(processor.tokenizer(c).input_ids) for c, _ in results)
        rows.append(
            {
                **row,
                "images": len(results),
                "seconds": round(seconds, 2),
                "images_per_s": round(len(results) / seconds, 3),
                "all_reached_max_new_tokens": all(cut for _, cut in results),
                "batch_size_at_end": captioner.batch_size,
                "weights_gib": None if weights_gib is None else round(weights_gib, 2),
                "peak_gib": peak_gib(device),
                "caption_tokens_retokenized": new_tokens,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def oom_halving(model_dir, images, bf16_rows, args, device) -> dict:
    """Cap the process's GPU memory a little above what a batch of 4 needed and ask for a batch of 16: the batch
    must be captioned again in halves, every image captioned, each as the batch of 1 captioned it."""
    fitted = next((r for r in bf16_rows if r.get("batch_size") == 4 and "peak_gib" in r), None)
    if device.type != "cuda" or fitted is None:
        return {"skipped": "needs CUDA and the bf16 batch-of-4 row"}
    total = torch.cuda.get_device_properties(device).total_memory / 2**30
    cap_gib = fitted["peak_gib"] + 1.0
    model, processor = load_captioner(str(model_dir), device, torch.bfloat16)
    reference = FittingBatches(model, processor, DEFAULT_INSTRUCTION, args.max_new_tokens, 1)(images[:16])
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(cap_gib / total, device)
    captioner = FittingBatches(model, processor, DEFAULT_INSTRUCTION, args.max_new_tokens, 16)
    try:
        results = captioner(images[:16])
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
    same = sum(a[0] == b[0] for a, b in zip(results, reference, strict=True))
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return {
        "cap_gib": round(cap_gib, 2),
        "asked_batch_size": 16,
        "batch_size_at_end": captioner.batch_size,
        "captioned": len(results),
        "captions_equal_to_batch_of_1": same,
    }


def run_script(model_dir: Path, image_dir: Path, args, timeout: float) -> dict:
    """`python caption_images.py` on the image folder, in a process of its own (wall time includes loading)."""
    for caption in image_dir.glob("*.txt"):
        caption.unlink()
    cmd = [sys.executable, str(ROOT / "caption_images.py"), "--train_data_dir", str(image_dir)]
    cmd += ["--model", str(model_dir), "--batch_size", "8", "--max_new_tokens", str(args.max_new_tokens)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    start = time.perf_counter()
    returncode, stdout, stderr = launch(cmd, env, timeout)
    row = {"way": "script", "batch_size": 8, "returncode": returncode, "wall_s": round(time.perf_counter() - start, 1)}
    found = REPORT.search(stdout)
    if returncode or not found:
        return {**row, "error": (stderr or stdout)[-1500:]}
    written = [p for p in image_dir.glob("*.txt") if p.read_text(encoding="utf-8").strip()]
    return {
        **row,
        "images": int(found["images"]),
        "script_s": float(found["seconds"]),
        "captions_written": len(written),
    }


def main() -> None:
    args = parse_args()
    started = time.perf_counter()

    def deadline(margin: float = 45) -> bool:
        return bool(args.deadline_s) and time.perf_counter() - started > args.deadline_s - margin

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ways = args.ways.split(",")
    model_dir = Path(args.captioner) if args.captioner else save_random_qwen3_vl(work / "qwen3_vl_8b_random", device)
    paths = make_images(work / "images", args.images)
    images = [fit_pixels(Image.open(p).convert("RGB"), 1024 * 1024) for p in paths]
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "captioner": args.captioner or "random Qwen3-VL-8B (published sizes)",
        "max_new_tokens": args.max_new_tokens,
        "model_ready_s": round(time.perf_counter() - started, 1),
        "rows": [],
    }

    def save() -> None:
        Path(args.out).write_text(json.dumps(result, indent=2))

    rows = result["rows"]
    if "bf16" in ways:
        rows += sweep("bf16", model_dir, images, [int(b) for b in args.batch_sizes.split(",")], args, device, deadline)
        save()
    if "nf4" in ways and device.type == "cuda":
        batch_sizes = [int(b) for b in args.nf4_batch_sizes.split(",")]
        rows += sweep("nf4", model_dir, images, batch_sizes, args, device, deadline)
        save()
    if "script" in ways:
        left = args.deadline_s - (time.perf_counter() - started) if args.deadline_s else 0
        too_late = args.deadline_s and left < 60
        rows.append(
            {"way": "script", "error": PAST_DEADLINE}
            if too_late
            else run_script(model_dir, paths[0].parent, args, left)
        )
        print(json.dumps(rows[-1]), flush=True)
        save()
    if "oom" in ways:
        result["oom_halving"] = (
            {"error": PAST_DEADLINE} if deadline(90) else oom_halving(model_dir, images, rows, args, device)
        )
        print(json.dumps(result["oom_halving"]), flush=True)
        save()

    print(f"\n{'way':7} {'batch':>5} {'images/s':>9} {'s':>7} {'peak GiB':>8} {'weights GiB':>11}")
    for r in rows:
        if "error" in r:
            print(f"{r['way']:7} {r.get('batch_size', ''):>5} failed: {r['error'][-200:]}")
        elif r["way"] == "script":
            rate = r["images"] / r["script_s"]
            print(f"{'script':7} {8:>5} {rate:9.3f} {r['script_s']:7.1f}   (whole script, wall {r['wall_s']} s)")
        else:
            peak = r["peak_gib"] if r["peak_gib"] is not None else float("nan")
            weights = r["weights_gib"] if r["weights_gib"] is not None else float("nan")
            print(
                f"{r['way']:7} {r['batch_size']:5d} {r['images_per_s']:9.3f} {r['seconds']:7.1f} {peak:8.2f} {weights:11.2f}"
            )
    if "oom_halving" in result:
        print(f"out of memory halving: {result['oom_halving']}")
    if any("error" in r for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
