"""generate.py with each `--cpu_offload` way, on a full-size random Z-Image (no hub): seconds to sample, peak GPU
memory, and whether the image equals the one sampled with every model on the GPU.

    python benchmarks/bench_generate.py --work /tmp/gen --out gen.json                  # one GPU, 1024², 8 steps
    python benchmarks/bench_generate.py --tiny --work /tmp/gen --out gen.json           # CPU smoke test

Writes a model folder with random weights (transformer, Qwen3-4B text encoder, VAE; ~20 GB on disk at full size),
then runs `python generate.py` once per way (none, model, layers by default) in a process of its own and reads the
sampling time and the peak GPU memory it prints. Wall time includes loading the models (from the page cache after
the first run). On a device call give `--deadline_s` (the call's limit less ~60 s): no run outlives it, and the JSON
holds what was measured.
"""

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_scale import PAST_DEADLINE, add_encoder_weights, launch, make_model  # noqa: E402

REPORT = re.compile(
    r"sampled \d+ image\(s\) in (?P<seconds>[\d.]+) s"
    r"(?:; peak GPU memory (?P<allocated>[\d.]+) GiB allocated, (?P<reserved>[\d.]+) GiB reserved)?"
)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", required=True, help="Folder for the model and the images (kept between calls).")
    p.add_argument("--tiny", action="store_true", help="The tiny model at 64² (CPU smoke test).")
    p.add_argument("--ways", default="none,model,layers", help="`--cpu_offload` ways to run, comma-separated.")
    p.add_argument("--resolution", type=int, default=None, help="Default: 1024 (64 with --tiny).")
    p.add_argument("--steps", type=int, default=8, help="Denoising steps.")
    p.add_argument("--out", required=True, help="JSON path.")
    p.add_argument("--deadline_s", type=float, default=0, help="Stop starting or running anything past this.")
    return p.parse_args()


def sample(way: str, model: Path, work: Path, resolution: int, steps: int, timeout: float) -> dict:
    """One generate.py run; its timings, its peak GPU memory and its image's path."""
    image = work / f"sample_{way}.png"
    cmd = [sys.executable, str(ROOT / "generate.py"), "--pretrained_model_name_or_path", str(model)]
    cmd += ["--prompt", "a benchmark", "--height", str(resolution), "--width", str(resolution)]
    cmd += ["--num_inference_steps", str(steps), "--guidance_scale", "0", "--output", str(image)]
    cmd += [] if way == "none" else ["--cpu_offload", way]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    start = time.perf_counter()
    returncode, stdout, stderr = launch(cmd, env, timeout)
    row = {"way": way, "returncode": returncode, "wall_s": round(time.perf_counter() - start, 1)}
    (work / f"log_{way}.txt").write_text(stdout + stderr)
    found = REPORT.search(stdout)
    if returncode or not found:
        return {**row, "error": (stderr or stdout)[-1500:]}
    row["sampling_s"] = float(found["seconds"])
    for key in ("allocated", "reserved"):
        if found[key]:
            row[f"peak_gpu_{key}_gib"] = float(found[key])
    return {**row, "image": str(image)}


def main() -> None:
    args = parse_args()
    started = time.perf_counter()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    full = not args.tiny
    resolution = args.resolution or (64 if args.tiny else 1024)
    model = work / ("model_full" if full else "model_tiny")
    make_model(model, full)
    add_encoder_weights(model, full)
    print(f"model ready after {time.perf_counter() - started:.0f} s", flush=True)

    rows, reference = [], None
    for way in args.ways.split(","):
        left = args.deadline_s - (time.perf_counter() - started) if args.deadline_s else 0
        if args.deadline_s and left < 30:
            row = {"way": way, "error": PAST_DEADLINE}
        else:
            row = sample(way, model, work, resolution, args.steps, max(left, 0))
        if "image" in row:
            pixels = np.asarray(Image.open(row["image"]), dtype=np.int16)
            reference = pixels if reference is None else reference
            row["max_pixel_diff_vs_first"] = int(np.abs(pixels - reference).max())
        rows.append(row)
        print(json.dumps(row), flush=True)
        result = {"resolution": resolution, "steps": args.steps, "full_size": full, "runs": rows}
        Path(args.out).write_text(json.dumps(result, indent=2))

    first = next((r for r in rows if "sampling_s" in r), None)
    print(
        f"\n{'way':8} {'sampling s':>10} {'x first':>8} {'wall s':>7} {'alloc GiB':>9} {'resv GiB':>9} {'px diff':>7}"
    )
    for r in rows:
        if "sampling_s" not in r:
            print(f"{r['way']:8} failed: {r['error'][-200:]}")
            continue
        ratio = r["sampling_s"] / first["sampling_s"] if first["sampling_s"] else float("nan")
        alloc, resv = r.get("peak_gpu_allocated_gib", float("nan")), r.get("peak_gpu_reserved_gib", float("nan"))
        print(
            f"{r['way']:8} {r['sampling_s']:10.2f} {ratio:8.2f} {r['wall_s']:7.1f} {alloc:9.2f} {resv:9.2f} "
            f"{r['max_pixel_diff_vs_first']:7d}"
        )
    if any("error" in r for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
