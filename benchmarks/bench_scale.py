"""Scale-out: the real trainer under each accelerate config, on a full-size random Z-Image (no hub), 1024², LoRA r32.

    python benchmarks/bench_scale.py --work /tmp/scale --gpus 1,2,4 --out scale.json       # on a multi-GPU host
    python benchmarks/bench_scale.py --tiny --work /tmp/scale                              # CPU smoke test

Writes a model folder (random full-size transformer + the VAE/text-encoder configs the fingerprint needs) and a
synthetic 1024² cache (random latents, 128-token caption embeddings), then runs `accelerate launch
train_zimage_lora.py` for DDP on 1/2/4 GPUs and DeepSpeed ZeRO-2, ZeRO-3 and ZeRO-3 + CPU offload, reads s/step and
the peak GPU memory (max over ranks) from each run's train_log.jsonl, and checks that each saved LoRA has the
expected keys, no empty tensor, and loads into the transformer through diffusers. Prints a table; writes JSON.

    python benchmarks/bench_scale.py --work /tmp/scale --only compile_bf16,compile_fp8_matmul,compile_fp8_matmul_max22

runs the trainer on one GPU with a compiled bf16 or fp8_matmul base instead (peak allocated and reserved memory);
`one_gpu` in `main` lists the other one-GPU runs (eager weight transpose, no workers, bf16 at 22 GB, EMA, LoKr, a
cache with masks and caption variants).

On a device call, give `--out $OUT/scale.json --deadline_s` (the call's limit less ~60 s): each run's log (and
train_log.jsonl) is copied beside the JSON as it finishes, precompute runs included, and no run outlives the
deadline, so a call that would have run out of time still brings back what it measured.
"""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_precompute import QWEN3_4B, VAE_CONFIG, write_config_only_model  # noqa: E402
from bench_train_step import FULL, build_transformer  # noqa: E402

from zimage_utils import cache as cache_lib  # noqa: E402
from zimage_utils import tiny  # noqa: E402
from zimage_utils.model_loading import component_config_hash  # noqa: E402
from zimage_utils.sample_prompts import SamplePrompt  # noqa: E402

CONFIGS = ROOT / "accelerate_configs"
# environment of some runs
RUN_ENV = {
    "compile_fp8_matmul_eager_transpose": {"ZIMAGE_FP8_EAGER_TRANSPOSE": "1"},
    "compile_bf16_ema_gc": {"ZIMAGE_GC_FREEZE": "0"},
    "compile_fp8_max10_expandable": {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"},
}


PAST_DEADLINE = "not started: past --deadline_s"
VALIDATION_FLAGS = ["--validation_steps", "8", "--validation_num_inference_steps", "4"]
PRESERVE = ["--preservation_weight", "1"]


def make_model(folder: Path, full: bool, transformer_weights: bool = True) -> None:
    """Transformer weights (random) plus configs only for the VAE and text encoder: the trainer loads neither's
    weights, except the VAE's where a run samples validation prompts (`add_vae_weights`). transformer_weights=False:
    its config only (precompute runs alone never load it)."""
    has_weights = any((folder / "transformer").glob("*.safetensors*"))
    if (folder / "model_index.json").exists() and (has_weights or not transformer_weights):
        return
    from diffusers import AutoencoderKL, ZImageTransformer2DModel
    from transformers import Qwen3Config

    cfg = {**tiny.TINY_TRANSFORMER, **(FULL if full else {})}
    if transformer_weights:
        transformer = build_transformer(cfg, "cuda" if full and torch.cuda.is_available() else "cpu", torch.bfloat16)
        transformer.save_pretrained(folder / "transformer")
        del transformer
    else:
        with torch.device("meta"):
            ZImageTransformer2DModel(**cfg).save_config(folder / "transformer")
    tokenizer = tiny.make_tokenizer()
    te = QWEN3_4B if full else {**tiny.TINY_TEXT_ENCODER, "vocab_size": len(tokenizer)}
    vae = AutoencoderKL(**(VAE_CONFIG if full else tiny.TINY_VAE))
    write_config_only_model(folder, vae, SimpleNamespace(config=Qwen3Config(**te)), tokenizer)
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0})
    )


def make_cache(
    folder: Path,
    model: Path,
    resolution: int,
    num_items: int,
    embed_dim: int,
    masked=False,
    prompts=0,
    preserved=False,
) -> None:
    """A cache in our format with random tensors: one bucket, equal 128-token captions. `masked`: each item also
    has a loss mask (its left half black) and two caption variants (96 and 160 tokens). `prompts`: validation
    prompts (random 128-token embeddings) for the trainer to sample. `preserved`: each item also has a 128-token
    preservation caption (--preservation_weight)."""
    if (folder / cache_lib.MANIFEST_NAME).exists():
        return
    import datasets

    g = torch.Generator().manual_seed(0)
    side = resolution // 8
    mask = torch.full((side, side), 255, dtype=torch.uint8)
    mask[:, : side // 2] = 0
    extra = {
        "mask": mask.numpy().tobytes() if masked else b"",
        "caption_variants": ["synthetic, shorter", "synthetic, longer"] if masked else [],
        "variant_lengths": [96, 160] if masked else [],
    }
    records = [
        {
            "source": f"synthetic_{i:04d}.png",
            "content_hash": str(i),
            "caption": "synthetic",
            "bucket_height": resolution,
            "bucket_width": resolution,
            "original_height": resolution,
            "original_width": resolution,
            "crop_box": [0.0, 0.0, float(resolution), float(resolution)],
            "latents": cache_lib.tensor_to_bytes(torch.randn(16, side, side, generator=g), torch.bfloat16),
            "latents_flipped": b"",
            "caption_embeds": cache_lib.tensor_to_bytes(torch.randn(128, embed_dim, generator=g), torch.bfloat16),
            "caption_length": 128,
            "caption_truncated": False,
            **extra,
            "variant_embeds": cache_lib.tensor_to_bytes(
                torch.randn(sum(extra["variant_lengths"]), embed_dim, generator=g), torch.bfloat16
            ),
            "preservation_caption": "class, synthetic" if preserved else "",
            "preservation_embeds": cache_lib.tensor_to_bytes(torch.randn(128, embed_dim, generator=g), torch.bfloat16)
            if preserved
            else b"",
            "preservation_length": 128 if preserved else 0,
        }
        for i in range(num_items)
    ]
    folder.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_list(records, features=cache_lib.FEATURES).save_to_disk(str(folder / cache_lib.DATA_DIR))
    validation = [
        cache_lib.CachedPrompt(SamplePrompt(f"synthetic prompt {i}"), torch.randn(128, embed_dim, generator=g))
        for i in range(prompts)
    ]
    cache_lib.save_prompt_embeddings(folder, torch.zeros(8, embed_dim), validation, torch.bfloat16)
    cache_lib.write_json_atomic(
        folder / cache_lib.MANIFEST_NAME,
        {
            "format_version": cache_lib.CACHE_FORMAT_VERSION,
            "num_items": num_items,
            "num_masked": num_items if masked else 0,
            "fingerprint": {
                "component_config_hash": component_config_hash(str(model)),
                "resolution": resolution,
                "latent_dtype": "bf16",
                "embedding_dtype": "bf16",
                "latent_channels": 16,
                "vae_downsample": 8,
                "embed_dim": embed_dim,
            },
        },
    )


def add_vae_weights(folder: Path, full: bool) -> None:
    """Random VAE weights in the model folder (validation sampling decodes with them)."""
    if not (folder / "vae" / "diffusion_pytorch_model.safetensors").exists():
        from diffusers import AutoencoderKL

        AutoencoderKL(**(VAE_CONFIG if full else tiny.TINY_VAE)).save_pretrained(folder / "vae")


def add_encoder_weights(folder: Path, full: bool) -> None:
    """Random VAE and Qwen3 weights in the model folder, so `accelerate launch precompute_embeddings.py` can load
    them in every process."""
    if any((folder / "text_encoder").glob("*.safetensors")):  # one file, or shards and their index
        return
    from transformers import Qwen3Config, Qwen3Model

    add_vae_weights(folder, full)
    config = Qwen3Config.from_pretrained(folder / "text_encoder")
    torch.set_default_dtype(torch.bfloat16)
    Qwen3Model(config).save_pretrained(folder / "text_encoder")
    torch.set_default_dtype(torch.float32)


def jpeg_folders(work: Path, sizes: list[int], full: bool) -> dict[int, Path]:
    """One folder of benchmark JPEGs per dataset size: the largest made once, the others links to its first files
    (so every size reads the same, already cached, images)."""
    from bench_precompute import make_jpegs

    largest = work / f"jpegs_{max(sizes)}"
    if not largest.exists():
        make_jpegs(largest, max(sizes), 1024 if full else 64)
    stems = sorted(f.stem for f in largest.glob("*.jpg"))
    folders = {}
    for n in sizes:
        folder = work / f"jpegs_{n}"
        if not folder.exists():
            folder.mkdir()
            for stem in stems[:n]:
                for suffix in (".jpg", ".txt"):
                    (folder / f"{stem}{suffix}").symlink_to(largest / f"{stem}{suffix}")
        folders[n] = folder
    return folders


def run_precompute(gpus: int, work: Path, full: bool, images: Path, batch_size: int = 16, timeout: float = 0) -> dict:
    """The precompute script on `gpus` processes over the JPEGs in `images` (killed after `timeout` s, 0 = never);
    images/s from wall time (process start, model loading and the merge included) and the main process's own phase
    timings."""
    out = work / f"precompute_{gpus}gpu_{images.name}"
    cmd = [
        "accelerate",
        "launch",
        "--config_file",
        str(CONFIGS / ("multi_gpu.yaml" if gpus > 1 or not full else "single_gpu.yaml")),
        "--num_processes",
        str(gpus),
        "--main_process_port",
        str(29700 + gpus),
        str(ROOT / "precompute_embeddings.py"),
        "--pretrained_model_name_or_path",
        str(work / "model"),
        "--train_data_dir",
        str(images),
        "--output_dir",
        str(out),
        "--resolution",
        str(1024 if full else 64),
        "--batch_size",
        str(batch_size),
        "--dataloader_num_workers",
        "6" if full else "0",  # the tiny run's images decode in no time: forking workers would cost more
        "--text_padding",
        "longest",
        "--overwrite",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **({} if full else {"ACCELERATE_USE_CPU": "1"})}
    launched_at, start = time.time(), time.perf_counter()
    returncode, stdout, stderr = launch(cmd, env, timeout)
    wall, exited_at = time.perf_counter() - start, time.time()
    (work / f"log_precompute_{gpus}_{images.name}.txt").write_text(stdout[-20000:] + "\n" + stderr[-20000:])
    lines = (stdout + stderr).splitlines()
    line = next((x for x in lines if "images/s over" in x), "")
    phases = next((x for x in lines if x.startswith("time: ")), "")
    run = (cache_lib.read_manifest(out) or {}).get("last_run") if returncode == 0 else None
    # Where the wall time goes, from the main process's clock readings: the launcher before the script's process
    # existed, the script's start-up (imports, accelerate), its phases, and the exit after main returned.
    wall_parts = None
    if run:
        wall_parts = {
            "launcher": run["process_started_at"] - launched_at,
            **{f"startup_{k}": v for k, v in run["startup_seconds"].items()},
            **run["seconds"],
            "exit": exited_at - run["finished_at"],
        }
        wall_parts.pop("total")
    return {
        "name": f"precompute_{gpus}gpu_{images.name}",
        "gpus": gpus,
        "images": sum(1 for f in images.iterdir() if f.suffix == ".jpg"),
        "returncode": returncode,
        "wall_s": wall,  # process start, imports and model loading included
        "script_s": run["seconds"]["total"] if run else None,  # the script's own time, from scan to merge
        "encode_images_per_s": run["encode_images_per_s"] if run else None,  # all images / encode phase
        "wall_parts_s": wall_parts,
        "summary": line.strip(),
        "phases": phases.strip(),
        "cache": str(out),
    }


def compare_precompute_runs(runs: list[dict]) -> None:
    """Speed-ups of each run against the first (same images, fewer processes), written into the runs."""
    first = runs[0]
    if len(runs) < 2 or any(p["returncode"] != 0 for p in runs):
        return
    for p in runs[1:]:
        p["identical_to_first"] = same_cache(first["cache"], p["cache"])
        p["speedup"] = first["wall_s"] / p["wall_s"]
        if p["script_s"] and first["script_s"]:
            p["script_speedup"] = first["script_s"] / p["script_s"]
        if p["encode_images_per_s"] and first["encode_images_per_s"]:
            # all processes' images over the encode phase: the rate a large dataset sees once loaded
            p["encode_speedup"] = p["encode_images_per_s"] / first["encode_images_per_s"]


def marginal_precompute_speedups(runs: list[dict], small: int, large: int) -> dict:
    """What each further image costs in wall time, from the same process count on two dataset sizes:
    (wall(large) - wall(small)) / (large - small). Every fixed cost (launch, imports, model loading, compiling, exit)
    cancels, so the ratio between process counts is the end-to-end speed-up a large dataset approaches."""
    wall = {(p["gpus"], p["images"]): p["wall_s"] for p in runs if p["returncode"] == 0}
    per_image = {
        gpus: (wall[(gpus, large)] - wall[(gpus, small)]) / (large - small)
        for gpus in sorted({g for g, _ in wall})
        if (gpus, small) in wall and (gpus, large) in wall
    }
    if not per_image:
        return {}
    first = per_image[min(per_image)]
    fixed = {g: wall[(g, small)] - small * per_image[g] for g in per_image}
    return {
        "images": [small, large],
        "wall_s_per_image": per_image,
        "fixed_s": fixed,  # the wall time left at zero images: the costs that do not grow with the dataset
        "speedup": {g: first / t for g, t in per_image.items()},
    }


def same_cache(a: str, b: str) -> bool:
    import datasets

    x, y = datasets.load_from_disk(f"{a}/data"), datasets.load_from_disk(f"{b}/data")
    return x["source"] == y["source"] and x["latents"] == y["latents"] and x["caption_embeds"] == y["caption_embeds"]


def launch(cmd: list[str], env: dict, timeout: float = 0) -> tuple[int, str, str]:
    """Run `cmd` in a process group of its own, so that one past `timeout` seconds (0 = none) is killed with its
    workers; its return code, stdout and stderr."""
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout or None)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        stderr += f"\nkilled after {timeout:g} s (--run_timeout, or what --deadline_s left)"
    return proc.returncode, stdout, stderr


def run_trainer(
    name, config, gpus, work, model, cache, steps, extra, tiny_mode, env_extra=None, timeout=0, logging_steps=0
) -> dict:
    out = work / f"run_{name}"
    cmd = [
        "accelerate",
        "launch",
        "--config_file",
        str(CONFIGS / config),
        "--num_processes",
        str(gpus),
        "--main_process_port",
        str(29500 + gpus * 10 + len(name) % 10),
    ]
    if tiny_mode:
        cmd += ["--mixed_precision", "no"]
    cmd += [
        str(ROOT / "train_zimage_lora.py"),
        "--pretrained_model_name_or_path",
        str(model),
        "--precomputed_dir",
        str(cache),
        "--output_dir",
        str(out),
        "--rank",
        "32",
        "--lora_targets",
        "attention",
        "--max_train_steps",
        str(steps),
        "--logging_steps",
        str(logging_steps or max(steps // 4, 1)),
        "--checkpointing_steps",
        str(steps),
        "--report_to",
        "none",
        "--save_dtype",
        "bf16",
        "--dataloader_num_workers",
        "2",
        *extra,
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    if tiny_mode and not config.startswith("deepspeed"):  # DeepSpeed runs on the CPU over gloo without it
        env["ACCELERATE_USE_CPU"] = "1"
    start = time.perf_counter()
    returncode, stdout, stderr = launch(cmd, env, timeout)
    wall = time.perf_counter() - start
    (work / f"log_{name}.txt").write_text(stdout[-20000:] + "\n" + stderr[-20000:])
    result = {"name": name, "config": config, "gpus": gpus, "returncode": returncode, "wall_s": wall}
    log = out / "train_log.jsonl"
    if returncode != 0 or not log.exists():
        result["error"] = (stderr or stdout)[-1500:]
        return result
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    timed = rows[1:] or rows  # the first window holds the warm-up
    s_per_step = sum(1 / r["steps_per_s"] for r in timed) / len(timed)
    result.update(
        s_per_step=s_per_step,
        window_s_per_step=[1 / r["steps_per_s"] for r in rows],  # every logging window, the warm-up one first
        running_peak_reserved_gib=[
            r.get("peak_reserved_gib") for r in rows
        ],  # since calibration, to each window's end
        samples_per_s=gpus / s_per_step,
        peak_gib=max(r.get("peak_mem_gib", float("nan")) for r in rows),
        peak_reserved_gib=max(r.get("peak_reserved_gib", float("nan")) for r in rows),
        flags=" ".join([f"{k}={v}" for k, v in (env_extra or {}).items()] + extra),
        final_loss=rows[-1]["loss"],
        lora=str(out / "pytorch_lora_weights.safetensors"),
    )
    return result


def check_lora(path: str, transformer) -> dict:
    """Keys, non-empty tensors, and a load through diffusers' own converter and adapter loader."""
    from diffusers import ZImagePipeline
    from safetensors.torch import load_file

    raw = load_file(path)
    state = ZImagePipeline.lora_state_dict(path)
    transformer.load_lora_adapter(state, prefix="transformer", adapter_name="check")
    loaded = sum(1 for n, _ in transformer.named_parameters() if ".check." in n or n.endswith(".check"))  # (LoKr)
    transformer.delete_adapters("check")
    return {
        "tensors": len(raw),
        "empty": sum(1 for v in raw.values() if v.numel() == 0),
        # the factors that start at zero: LoRA's B, LoKr's w1
        "nonzero_B": sum(1 for k, v in raw.items() if k.endswith(("lora_B.weight", "lokr_w1")) and bool(v.any())),
        "loaded_params": loaded,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", required=True, help="Scratch folder (model, cache, runs).")
    parser.add_argument("--gpus", default="1,2,4", help="DDP process counts to compare.")
    parser.add_argument("--zero_gpus", type=int, default=2, help="Processes for the DeepSpeed runs.")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--only", default=None, help="Comma-separated run names to run (default: all).")
    parser.add_argument(
        "--run_timeout",
        type=float,
        default=0,
        help="Seconds a training run may take before it is killed and recorded as timed out (0 = no limit): one "
        "stuck variant then leaves the rest of a device call to the others.",
    )
    parser.add_argument(
        "--deadline_s",
        type=float,
        default=0,
        help="Seconds from the start after which no training or precompute run starts, and each run is killed when it "
        "would go past them (0 = none): give a device call's limit less a margin, so the call still ends with its "
        "JSON and logs.",
    )
    parser.add_argument(
        "--precompute_gpus", default=None, help="Also time precompute on these process counts, e.g. 1,2."
    )
    parser.add_argument(
        "--precompute_images",
        default="2048",
        help="JPEGs for the precompute runs; two sizes (e.g. 1024,4096) also give the marginal speed-up.",
    )
    parser.add_argument(
        "--logging_steps",
        type=int,
        default=0,
        help="Steps per logging window, each with its time and peak memory (default: a quarter of --steps).",
    )
    parser.add_argument("--tiny", action="store_true", help="Tiny model on the CPU (smoke test).")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    full = not args.tiny
    resolution = 1024 if full else 64
    ckpt = ["--gradient_checkpointing"]
    runs = [
        (f"ddp_{n}gpu", "multi_gpu.yaml" if n > 1 else "single_gpu.yaml", n, ckpt)
        for n in [int(x) for x in args.gpus.split(",")]
    ]
    runs += [
        ("zero2", "deepspeed_zero2.yaml", args.zero_gpus, ckpt),
        ("zero3", "deepspeed_zero3.yaml", args.zero_gpus, ckpt),
        ("zero3_offload", "deepspeed_zero3_offload.yaml", args.zero_gpus, ckpt),
        # DeepSpeed's own live-parameter defaults (1e9), the same-run baseline for the trainer's 2e8
        (
            "zero3_offload_ds_defaults",
            "deepspeed_zero3_offload.yaml",
            args.zero_gpus,
            ckpt + ["--zero3_max_live_parameters", "0"],
        ),
    ]
    # One-GPU variants, run only when named in --only: the trainer end to end, compiled, with an fp8_matmul or bf16
    # base, with and without a memory budget, and with an EMA, a LoKr adapter, masks or LoRA+
    one_gpu = [
        ("compile_fp8_matmul", ["--compile", "--base_precision", "fp8_matmul"]),
        ("compile_fp8_matmul_max22", ["--compile", "--base_precision", "fp8_matmul", "--max_memory_gb", "22"]),
        ("compile_bf16", ["--compile"]),
        # backward's weight transpose as eager's strided copy (base_precision.COMPILED_TRANSPOSE off)
        ("compile_fp8_matmul_eager_transpose", ["--compile", "--base_precision", "fp8_matmul"]),
        # no dataloader worker processes (the trainer's default): less host contention
        (
            "compile_fp8_matmul_no_workers",
            ["--compile", "--base_precision", "fp8_matmul", "--dataloader_num_workers", "0"],
        ),
        # bf16 under the 24 GB budget, against fp8_matmul_max22
        ("compile_bf16_max22", ["--compile", "--max_memory_gb", "22"]),
        # the averaged LoRA's cost (one fp32 copy, one lerp per step)
        ("compile_bf16_ema", ["--compile", "--ema_decay", "0.999"]),
        # the same with Python's garbage collector free to scan the model and compiled graphs mid-run (freeze_gc off)
        ("compile_bf16_ema_gc", ["--compile", "--ema_decay", "0.999"]),
        # LoKr at factor 4: w2 as w2_a · w2_b of rank 32, and w2 a full matrix (a rank above half its side)
        ("compile_lokr", ["--compile", "--adapter", "lokr", "--lokr_factor", "4"]),
        ("compile_lokr_full", ["--compile", "--adapter", "lokr", "--lokr_factor", "4", "--rank", "100000"]),
        # a cache with a loss mask and two caption variants per item (against compile_bf16)
        ("compile_bf16_masked", ["--compile"]),
        # differential output preservation: a base pass (no grad) and the batch twice, per step (against compile_bf16
        # and compile_fp8_max10)
        ("compile_bf16_preserved", ["--compile"] + PRESERVE),
        ("compile_fp8_max10_preserved", ["--compile", "--base_precision", "fp8", "--max_memory_gb", "10"] + PRESERVE),
        # which budgets preservation fits: 24 GB cards (22), 16 GB cards (14), 12 GB cards with the checkpointed
        # blocks' inputs in host memory (10)
        ("compile_bf16_max22_preserved", ["--compile", "--max_memory_gb", "22"] + PRESERVE),
        ("compile_fp8_max14_preserved", ["--compile", "--base_precision", "fp8", "--max_memory_gb", "14"] + PRESERVE),
        (
            "compile_fp8_matmul_max14_preserved",
            ["--compile", "--base_precision", "fp8_matmul", "--max_memory_gb", "14"] + PRESERVE,
        ),
        (
            "compile_fp8_offload_max10_preserved",
            ["--compile", "--base_precision", "fp8", "--cpu_offload_checkpointing", "--max_memory_gb", "10"]
            + PRESERVE,
        ),
        # LoRA+ (two parameter groups in the fused AdamW)
        ("compile_bf16_loraplus", ["--compile", "--loraplus_lr_ratio", "16"]),
        # the weight-only fp8 base (any GPU): compiled, eager, and compiled under a 16 GB card's budget
        ("compile_fp8", ["--compile", "--base_precision", "fp8"]),
        ("fp8", ["--base_precision", "fp8"]),
        ("compile_fp8_max16", ["--compile", "--base_precision", "fp8", "--max_memory_gb", "16"]),
        # 16 and 12 GB cards' budgets, once compiled checkpointing recomputes the fp8 Linears (session 11)
        ("compile_fp8_matmul_max16", ["--compile", "--base_precision", "fp8_matmul", "--max_memory_gb", "16"]),
        ("compile_fp8_max12", ["--compile", "--base_precision", "fp8", "--max_memory_gb", "12"]),
        ("compile_fp8_max22", ["--compile", "--base_precision", "fp8", "--max_memory_gb", "22"]),
        # the budget the README gives 16 GB cards, a little under the card as 22 is on 24 GB ones
        ("compile_fp8_max14", ["--compile", "--base_precision", "fp8", "--max_memory_gb", "14"]),
        ("compile_fp8_matmul_max14", ["--compile", "--base_precision", "fp8_matmul", "--max_memory_gb", "14"]),
        # 12 GB cards (10), and with the checkpointed blocks' inputs in host memory, 12 and 8 GB cards (10, 7)
        ("compile_fp8_max10", ["--compile", "--base_precision", "fp8", "--max_memory_gb", "10"]),
        # the same with PyTorch's allocator growing its segments (less reserved beyond what is allocated?)
        ("compile_fp8_max10_expandable", ["--compile", "--base_precision", "fp8", "--max_memory_gb", "10"]),
        (
            "compile_fp8_offload_max10",
            ["--compile", "--base_precision", "fp8", "--cpu_offload_checkpointing", "--max_memory_gb", "10"],
        ),
        (
            "compile_fp8_offload_max7",
            ["--compile", "--base_precision", "fp8", "--cpu_offload_checkpointing", "--max_memory_gb", "7"],
        ),
        # block swap: every block checkpointed, and the first 16 or all 32 keeping their weights in host memory
        ("compile_fp8_gc", ["--compile", "--base_precision", "fp8"] + ckpt),
        ("compile_fp8_swap16", ["--compile", "--base_precision", "fp8", "--blocks_to_swap", "16"] + ckpt),
        ("compile_fp8_swap32", ["--compile", "--base_precision", "fp8", "--blocks_to_swap", "32"] + ckpt),
        ("compile_bf16_gc", ["--compile"] + ckpt),
        ("compile_bf16_swap32", ["--compile", "--blocks_to_swap", "32"] + ckpt),
        # 8 GB cards: the budget with half the blocks swapped
        (
            "compile_fp8_max7_swap16",
            ["--compile", "--base_precision", "fp8", "--blocks_to_swap", "16", "--max_memory_gb", "7"],
        ),
        # the 12 GB budget with validation sampling (2 prompts, 4 steps with guidance, the VAE decoding at the cache's
        # resolution, in bf16 tiles under the budget) every 8 steps: what the calibration does not measure
        (
            "compile_fp8_max10_validation",
            ["--compile", "--base_precision", "fp8", "--max_memory_gb", "10"] + VALIDATION_FLAGS,
        ),
    ]
    if args.only:
        wanted = args.only.split(",")
        runs = [r for r in runs + [(n, "single_gpu.yaml", 1, x) for n, x in one_gpu] if r[0] in wanted]
    start = time.perf_counter()

    def time_left() -> float | None:
        """Seconds to --deadline_s, or None without one."""
        return args.deadline_s - (time.perf_counter() - start) if args.deadline_s else None

    def keep_logs(log: Path, *renamed: tuple[Path, str]) -> None:
        """Copy a run's log (and `renamed` files: (path, new name)) beside --out, so that a device call bringing
        back only --out's folder has them too."""
        keep = Path(args.out).resolve().parent if args.out else work.resolve()
        if keep == work.resolve():
            return
        for path, name in [(log, log.name), *renamed]:
            if path.exists():
                shutil.copy(path, keep / name)

    make_model(work / "model", full, transformer_weights=bool(runs))
    cache_args = (work / "model", resolution, 64 if full else 8, 2560 if full else 16)
    if runs:
        make_cache(work / "cache", *cache_args)
    if any(name.endswith("_masked") for name, *_ in runs):
        make_cache(work / "cache_masked", *cache_args, masked=True)
    if any(name.endswith("_preserved") for name, *_ in runs):
        make_cache(work / "cache_preserved", *cache_args, preserved=True)
    if any(name.endswith("_validation") for name, *_ in runs):
        add_vae_weights(work / "model", full)
        make_cache(work / "cache_validation", *cache_args, prompts=2)
    setup_s = time.perf_counter() - start
    results = []
    for name, config, gpus, extra in runs:
        if full and gpus > torch.cuda.device_count():
            continue
        if args.tiny and config == "single_gpu.yaml":
            config = "multi_gpu.yaml"
        steps = args.steps if full else 4
        env = RUN_ENV.get(name)
        suffixes = ("masked", "validation", "preserved")
        cache = work / next((f"cache_{k}" for k in suffixes if name.endswith(f"_{k}")), "cache")
        timeout, left = args.run_timeout, time_left()
        if left is not None:
            if left <= 0:
                results.append(
                    {"name": name, "config": config, "gpus": gpus, "returncode": None, "error": PAST_DEADLINE}
                )
                print(f"{name}: {PAST_DEADLINE} {args.deadline_s:g}", flush=True)
                continue
            timeout = min(timeout or left, left)
        r = run_trainer(
            name, config, gpus, work, work / "model", cache, steps, extra, args.tiny, env, timeout, args.logging_steps
        )
        results.append(r)
        keep_logs(work / f"log_{name}.txt", (work / f"run_{name}" / "train_log.jsonl", f"train_log_{name}.jsonl"))
        print(json.dumps({k: v for k, v in r.items() if k != "error"}), flush=True)
        if "error" in r:
            print(r["error"], flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps({"partial": True, "runs": results}, indent=2))

    precompute, marginal = [], {}
    if args.precompute_gpus:
        add_encoder_weights(work / "model", full)
        sizes = [int(x) for x in args.precompute_images.split(",")]
        folders = jpeg_folders(work, sizes + [64], full)
        gpu_counts = [int(x) for x in args.precompute_gpus.split(",")]
        # Untimed: the first launch pays for compiling Python bytecode and reading the model files into page cache
        # (not with --tiny: its CPU timings mean nothing, and a launch is most of a CI test's time)
        if full and (time_left() is None or time_left() > 0):
            warmup = run_precompute(gpu_counts[0], work, full, folders[64], timeout=time_left() or 0)
            print(f"warm-up run: rc {warmup['returncode']}, {warmup['wall_s']:.1f} s", flush=True)
        for size in sizes:
            runs_of_size = []
            for n in gpu_counts:
                left = time_left()
                if left is not None and left <= 0:
                    name = f"precompute_{n}gpu_{folders[size].name}"
                    runs_of_size.append(
                        {"name": name, "gpus": n, "images": size, "returncode": None, "error": PAST_DEADLINE}
                    )
                    print(f"precompute on {n} process(es), {size} images: {PAST_DEADLINE}", flush=True)
                    continue
                runs_of_size.append(run_precompute(n, work, full, folders[size], timeout=left or 0))
                print(json.dumps(runs_of_size[-1]), flush=True)
                keep_logs(work / f"log_precompute_{n}_{folders[size].name}.txt")
            compare_precompute_runs(runs_of_size)
            precompute += runs_of_size
            if args.out:
                Path(args.out).write_text(json.dumps({"partial": True, "runs": results, "precompute": precompute}))
        if len(sizes) > 1:
            marginal = marginal_precompute_speedups(precompute, min(sizes), max(sizes))

    # Every saved LoRA through diffusers, on one transformer loaded once
    if any("lora" in r for r in results):
        from zimage_utils.model_loading import load_transformer

        transformer = load_transformer(str(work / "model"), torch.bfloat16, "cuda" if full else "cpu")
        for r in results:
            if "lora" in r:
                r["lora_check"] = check_lora(r["lora"], transformer)
    base = next((r for r in results if r["name"] == "ddp_1gpu" and "s_per_step" in r), None)
    for r in results:
        if base and "samples_per_s" in r:
            r["speedup_vs_1gpu"] = r["samples_per_s"] / base["samples_per_s"]
    summary = {
        "device": torch.cuda.get_device_name() if full else "cpu",
        "gpus_visible": torch.cuda.device_count(),
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "resolution": resolution,
        "setup_s": setup_s,
        "runs": results,
        "precompute": precompute,
        "precompute_marginal": marginal,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2))
    print(f"\n{summary['device']} x{summary['gpus_visible']}, {resolution}², bs1/GPU, LoRA r32 attention")
    print(
        f"{'run':36s} {'gpus':>4s} {'s/step':>7s} {'samples/s':>9s} {'x 1gpu':>6s} {'peak GiB':>8s} "
        f"{'reserved':>8s} {'LoRA check':>30s}  flags"
    )
    for r in results:
        if "s_per_step" not in r:
            print(f"{r['name']:36s} {r['gpus']:4d} failed (rc {r['returncode']}), see log_{r['name']}.txt")
            continue
        c = r.get("lora_check", {})
        check = f"{c.get('tensors')} tensors, {c.get('empty')} empty, {c.get('loaded_params')} loaded"
        print(
            f"{r['name']:36s} {r['gpus']:4d} {r['s_per_step']:7.3f} {r['samples_per_s']:9.2f} "
            f"{r.get('speedup_vs_1gpu', float('nan')):6.2f} {r['peak_gib']:8.2f} {r['peak_reserved_gib']:8.2f} "
            f"{check:>30s}  {r['flags']}"
        )

    for p in precompute:
        if "wall_s" not in p:
            print(f"{p['name']}: {p['error']}")
            continue
        print(
            f"{p['name']}: rc {p['returncode']}, {p['wall_s']:.1f} s wall, x{p.get('speedup', 1.0):.2f} "
            f"(script x{p.get('script_speedup', 1.0):.2f}, encode loop x{p.get('encode_speedup', 1.0):.2f}), "
            f"identical: {p.get('identical_to_first', '-')}; {p['summary']}"
        )
        if p.get("wall_parts_s"):
            print("  wall parts (s): " + ", ".join(f"{k} {v:.1f}" for k, v in p["wall_parts_s"].items()))
    if marginal:
        print(
            f"marginal, {marginal['images'][0]} → {marginal['images'][1]} images: "
            + "; ".join(
                f"{g} GPU(s) {t * 1e3:.1f} ms/image (x{marginal['speedup'][g]:.2f}), fixed {marginal['fixed_s'][g]:.1f} s"
                for g, t in marginal["wall_s_per_image"].items()
            )
        )


if __name__ == "__main__":
    main()
