"""benchmarks/bench_scale.py keeps working: at tiny size on CPU processes, its DDP and precompute runs, their
per-run timeouts and the call's deadline (a file of its own so the two test workers share the benchmark tests)."""

import importlib.util

import pytest
import torch
from test_benchmarks import ROOT, run_benchmark

from zimage_utils.cache import load_prompt_embeddings
from zimage_utils.model_loading import load_vae


def run_tiny_scale(tmp_path, *args: str) -> dict:
    return run_benchmark(
        "bench_scale.py", "--tiny", "--work", str(tmp_path / "work"), *args, "--out", str(tmp_path / "s.json")
    )


def load_bench_scale():
    spec = importlib.util.spec_from_file_location("bench_scale", ROOT / "benchmarks" / "bench_scale.py")
    bench_scale = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_scale)
    return bench_scale


@pytest.mark.skipif(
    torch.cuda.is_available(),
    reason="2 CPU processes on a GPU host: the second one's barrier asks for CUDA device 1 (seen on a 1-GPU H200 host: "
    "accelerate's wait_for_everyone, 'invalid device ordinal')",
)
def test_scale_benchmark_runs_precompute_on_1_and_2_processes_to_the_same_cache(tmp_path):
    # (one dataset size here, to keep CI short: the marginal speed-up over two sizes is checked below on given walls)
    report = run_tiny_scale(tmp_path, "--only", "none", "--precompute_gpus", "1,2", "--precompute_images", "8")
    runs = report["precompute"]
    assert [(r["gpus"], r["images"], r["returncode"]) for r in runs] == [(1, 8, 0), (2, 8, 0)]
    assert [r.get("identical_to_first") for r in runs] == [None, True] and all(r["wall_s"] > 0 for r in runs)
    # each run's log beside --out, as a device call brings back only that folder
    assert {f"log_precompute_{g}_jpegs_8.txt" for g in (1, 2)} <= {f.name for f in tmp_path.iterdir()}
    assert report["precompute_marginal"] == {}  # (one size: no marginal cost)


def test_marginal_speedup_cancels_the_fixed_costs():
    bench_scale = load_bench_scale()
    # wall = fixed + images · per image: 1 process 40 s + 0.5 s/image, 2 processes 50 s + 0.25 s/image
    walls = {(1, 100): 90.0, (1, 500): 290.0, (2, 100): 75.0, (2, 500): 175.0}
    runs = [{"gpus": g, "images": n, "wall_s": w, "returncode": 0} for (g, n), w in walls.items()]
    runs.append({"gpus": 4, "images": 100, "wall_s": 1.0, "returncode": 1})  # a failed run counts for nothing
    marginal = bench_scale.marginal_precompute_speedups(runs, 100, 500)
    assert marginal["images"] == [100, 500] and marginal["wall_s_per_image"] == {1: 0.5, 2: 0.25}
    assert marginal["fixed_s"] == {1: 40.0, 2: 50.0} and marginal["speedup"] == {1: 1.0, 2: 2.0}


def test_scale_benchmark_trains_on_its_synthetic_caches_and_checks_the_loras(tmp_path):
    # the plain cache, and one with loss masks and caption variants
    report = run_tiny_scale(tmp_path, "--only", "ddp_1gpu,compile_bf16_masked")
    assert [run["name"] for run in report["runs"]] == ["ddp_1gpu", "compile_bf16_masked"]
    for run in report["runs"]:
        assert run["returncode"] == 0 and run["s_per_step"] > 0
        check = run["lora_check"]
        assert check["tensors"] > 0 and check["empty"] == 0 and check["loaded_params"] == check["tensors"]
    log = (tmp_path / "work" / "log_compile_bf16_masked.txt").read_text()
    assert "8 items with a loss mask" in log
    # and a copy of each run's logs beside the JSON (a device call brings back $OUT only)
    assert (tmp_path / "log_compile_bf16_masked.txt").read_text() == log
    assert (tmp_path / "train_log_ddp_1gpu.jsonl").read_text() == (
        tmp_path / "work/run_ddp_1gpu/train_log.jsonl"
    ).read_text()


def test_scale_benchmarks_validation_cache_holds_prompts_and_the_model_a_vae(tmp_path):
    # What the `_validation` variants add to a run (the trainer's sampling itself: test_pictures.py)
    bench_scale = load_bench_scale()
    model, cache = tmp_path / "model", tmp_path / "cache"
    bench_scale.make_model(model, full=False)
    bench_scale.add_vae_weights(model, full=False)
    bench_scale.make_cache(cache, model, 64, 4, 16, prompts=2)
    _, prompts = load_prompt_embeddings(cache)
    assert [(p.prompt.text, p.embeds.shape) for p in prompts] == [
        (f"synthetic prompt {i}", (128, 16)) for i in range(2)
    ]
    assert load_vae(str(model), torch.float32, "cpu").config.latent_channels == 16


def test_scale_benchmark_kills_a_run_past_its_timeout_and_goes_on(tmp_path):
    # One stuck variant must not take a whole device call: it is killed, recorded, and the next one runs
    report = run_tiny_scale(tmp_path, "--only", "compile_bf16,compile_bf16_masked", "--run_timeout", "0.1")
    assert [run["name"] for run in report["runs"]] == ["compile_bf16", "compile_bf16_masked"]
    for run in report["runs"]:
        assert run["returncode"] != 0 and "killed after 0.1 s (--run_timeout" in run["error"]
        assert run["wall_s"] < 30  # not left to finish


def test_scale_benchmark_starts_nothing_past_its_deadline(tmp_path):
    # A device call's limit less a margin, here already past when the set-up ends: no trainer run and no multi-GPU
    # precompute run starts, and the call still ends with its JSON
    report = run_tiny_scale(
        tmp_path,
        "--only",
        "compile_bf16",
        "--precompute_gpus",
        "1,2",
        "--precompute_images",
        "8",
        "--deadline_s",
        "1e-9",
    )
    (run,) = report["runs"]
    assert run["name"] == "compile_bf16" and run["returncode"] is None
    assert run["error"] == "not started: past --deadline_s" and "wall_s" not in run
    runs = report["precompute"]
    assert [(r["gpus"], r["images"], r["returncode"]) for r in runs] == [(1, 8, None), (2, 8, None)]
    assert all(r["error"] == "not started: past --deadline_s" for r in runs)
    assert report["precompute_marginal"] == {}
