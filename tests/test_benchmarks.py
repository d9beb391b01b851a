"""The benchmark scripts keep working: each runs at tiny size on the CPU and writes the JSON its table comes from
(the real figures come from GPU runs, recorded in docs/BENCHMARKS.md)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from zimage_utils.base_precision import cpu_has_rowwise_fp8

ROOT = Path(__file__).resolve().parents[1]


def run_benchmark(script: str, *args: str) -> dict:
    out = Path(args[args.index("--out") + 1])
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text())


def test_train_step_benchmark_compares_the_naive_step_with_ours(tmp_path):
    report = run_benchmark("bench_train_step.py", "--tiny", "--no_compile", "--out", str(tmp_path / "step.json"))
    names = [row["name"] for row in report["rows"]]
    assert names[:2] == ["naive eager ckpt", "ours eager ckpt"]
    assert all(row["s_per_step"] > 0 and row["speedup_vs_naive_ckpt"] > 0 for row in report["rows"])


@pytest.mark.skipif(not cpu_has_rowwise_fp8(), reason="this torch's CPU fp8 matmul has no row-wise scales")
def test_fp8_part_reports_how_far_each_step_is_from_eager_bf16(tmp_path):
    flags = ["--tiny", "--no_compile", "--compile_quantized", "--part", "fp8", "--out", str(tmp_path / "fp8.json")]
    report = run_benchmark("bench_train_step.py", *flags)
    agreement = report["fp8"]["vs_eager_bf16"]
    assert agreement["bf16 eager"]["grad_cosine"] > 0.9999  # the reference against itself
    # (--no_compile: the second step runs eager again, after timed steps that trained the LoRA, which is put back)
    assert agreement["bf16 compiled"]["grad_cosine"] > 0.9999
    for precision in ("fp8_matmul", "fp8"):
        assert 0.9 < agreement[f"{precision} eager"]["grad_cosine"] < 1.0  # close, but quantised
    # Either transposing copy moves the same bytes: the same gradients
    eager_copy = agreement["fp8_matmul eager eager transpose"]
    assert eager_copy["grad_rel_err"] == pytest.approx(agreement["fp8_matmul eager"]["grad_rel_err"], abs=1e-6)
    assert {row["name"] for row in report["rows"]} >= {"ours eager bf16", "ours eager fp8_matmul", "ours eager fp8"}


def test_precompute_benchmark_times_each_part_and_the_whole_script(tmp_path):
    report = run_benchmark(
        "bench_precompute.py", "--tiny", "--num_images", "4", "--batch_sizes", "1", "--text_offload",
        "--script_runs", "longest,longest+te_offload", "--out", str(tmp_path / "p.json"),
    )  # fmt: skip
    parts = {row["what"].split(" ")[0] for row in report["rows"]}
    assert parts == {"vae", "text", "script"}
    assert all(row["items_per_s"] > 0 for row in report["rows"])
    # the text encoder offloaded to host RAM both ways, and a whole-script run with --text_encoder_offload, whose
    # cache holds the same embeddings as the run before it
    offload_rows = [row["what"] for row in report["rows"] if row["what"].startswith("text offload")]
    assert offload_rows == [f"text offload {way} pad=longest" for way in ("accelerate", "ours") for _ in (16, 64)]
    assert report["text_offload_accelerate_bit_identical"] and report["text_offload_ours_bit_identical"]
    scripts = [row for row in report["rows"] if row["what"].startswith("script")]
    assert [row["what"] for row in scripts] == ["script pad=longest", "script pad=longest te-offload"]
    assert all(row["caption_embeds_equal_first_run"] for row in scripts)


def test_vae_decode_benchmark_compares_each_decode_with_fp32_full_frame(tmp_path):
    flags = ["--tiny", "--resolutions", "64", "--variants", "fp32_chunked,bf16,fp32_tiled", "--repeats", "1"]
    report = run_benchmark("bench_vae_decode.py", *flags, "--out", str(tmp_path / "decode.json"))
    rows = {row["variant"]: row for row in report["rows"]}
    assert list(rows) == ["fp32", "fp32_chunked", "bf16", "fp32_tiled"]  # the reference first, always
    assert rows["fp32"]["max_abs_diff"] == 0
    assert rows["fp32_chunked"]["max_abs_diff"] < 1e-4  # the same arithmetic, only in row blocks
    assert 0 < rows["bf16"]["max_abs_diff"]
    assert all(row["ms"] > 0 for row in rows.values())


def test_pinned_memory_calculation_counts_the_swapped_tensors_both_ways(tmp_path):
    report = run_benchmark("pinned_swap_memory.py", "--tiny", "--blocks", "2", "--out", str(tmp_path / "pinned.json"))
    rows = {row["base"]: row for row in report["rows"]}
    # fp8 adds a row-scale tensor for each quantised Linear and halves their weights
    assert 0 < rows["bf16"]["tensors"] < rows["fp8"]["tensors"]
    assert rows["fp8"]["weight_bytes"] < rows["bf16"]["weight_bytes"]
    for row in rows.values():  # (the tiny model's tensors, under the 512-byte alignment, pack no tighter)
        assert row["weight_bytes"] <= min(row["packed_bytes"], row["one_by_one_bytes"])


def test_load_memory_benchmark_measures_each_variant_in_its_own_process(tmp_path):
    flags = ["--tiny", "--work", str(tmp_path / "work"), "--variants", "load,fp8_streamed"]
    report = run_benchmark("bench_load_memory.py", *flags, "--out", str(tmp_path / "load.json"))
    assert [row["variant"] for row in report["rows"]] == ["load", "fp8_streamed"]
    for row in report["rows"]:
        assert row["weights_gib"] > 0 and row["anon_after_load_gib"] > 0 and row["anon_peak_above_load_gib"] >= 0
    # fp8 stores the block Linears in one byte a weight: fewer bytes than the bf16 model loaded
    assert report["rows"][1]["weights_gib"] < report["rows"][0]["weights_gib"]


def test_training_base_benchmark_checks_the_swapped_adapter_merge_against_peft(tmp_path):
    flags = ["--tiny", "--work", str(tmp_path / "work"), "--variants", "fp8:2"]  # quantised, swapped, adapter added
    (row,) = run_benchmark("bench_training_base.py", *flags, "--out", str(tmp_path / "base.json"))["rows"]
    assert row["blocks_to_swap"] == 2 and row["swapped_weight_gib"] > 0
    assert row["swapped_weight_gib"] <= row["pinned_predicted_gib"]
    # pinned host memory is measured where there is a GPU, and is then what `pack` predicts
    assert row["pinned_gib"] == (row["pinned_predicted_gib"] if torch.cuda.is_available() else None)
    assert len(row["adapter_checked"]) == 4 and all(row["adapter_checked"].values())


def test_saved_activations_benchmark_sees_checkpointing_keep_less(tmp_path):
    flags = ["--tiny", "--variants", "fp8:eager:none,fp8:eager:all", "--out", str(tmp_path / "saved.json")]
    none, checkpointed = run_benchmark("bench_saved_activations.py", *flags)["rows"]
    assert none["checkpointing"] == "none" and checkpointed["checkpointing"] == "all"
    assert 0 < checkpointed["saved_gib"] < none["saved_gib"] / 2
    assert none["s_per_step"] > 0 and sum(none["largest_saved_gib"].values()) <= none["saved_gib"]


def test_generate_benchmark_samples_with_layer_offload(tmp_path):
    # One way, to keep CI short: the same image with and without offloading is test_generate.py's (in-process)
    flags = ["--tiny", "--work", str(tmp_path), "--ways", "layers", "--out", str(tmp_path / "g.json")]
    (layers,) = run_benchmark("bench_generate.py", *flags)["runs"]
    assert layers["way"] == "layers" and layers["returncode"] == 0
    assert layers["sampling_s"] > 0  # read from the line generate.py prints
    assert np.asarray(Image.open(layers["image"])).std() > 0  # a picture, not a blank


def test_generate_benchmark_reads_the_peak_memory_generate_prints_on_cuda(monkeypatch):
    import generate

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from bench_generate import REPORT

    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: 3 * 2**30)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda: 4.5 * 2**30)
    found = REPORT.search(generate.sampling_report(2, 12.34, "cuda"))
    assert (found["seconds"], found["allocated"], found["reserved"]) == ("12.34", "3.00", "4.50")
    assert REPORT.search(generate.sampling_report(1, 0.5, "cpu"))["allocated"] is None


def test_lora_tools_benchmark_times_each_command_and_checks_the_factored_and_randomized_svds(tmp_path):
    flags = ["--tiny", "--rank", "4", "--work", str(tmp_path / "work")]
    report = run_benchmark("bench_lora_tools.py", *flags, "--out", str(tmp_path / "lora_tools.json"))
    assert [row["command"] for row in report["rows"]] == [
        "convert", "resize --rank 2", "resize --keep 0.9", "merge (exact)", "merge --rank 4",
    ]  # fmt: skip
    assert all(row["seconds"] > 0 and row["written_mib"] > 0 for row in report["rows"])
    assert report["svd_one_block"]["modules"] > 0 and report["svd_one_block"]["max_rel_diff"] < 1e-5
    extraction = report["extract_one_block"]  # the randomized SVD holds at most what the full one does, the best
    assert (
        extraction["rank"] == 8 and 0.5 < extraction["randomized_kept"] <= extraction["full_kept"] + 1e-6 <= 1 + 1e-6
    )


def test_extract_benchmark_measures_the_extraction_against_loading_the_fine_tune_alone(tmp_path):
    flags = ["--tiny", "--rank", "8", "--delta_rank", "4", "--work", str(tmp_path / "work")]
    report = run_benchmark("bench_extract.py", *flags, "--out", str(tmp_path / "extract.json"))
    assert report["lora_rank"] == "8" and report["delta_rank"] == 4
    for run in ("fine_tune_loaded", "extract"):
        assert report[run]["seconds"] > 0 and report[run]["peak_rss_gib"] > 0.1
    assert report["peak_ratio"] == report["extract"]["peak_rss_gib"] / report["fine_tune_loaded"]["peak_rss_gib"]


def test_caption_benchmark_times_each_batch_size_with_the_scripts_own_captioner(tmp_path, tiny_captioner_dir):
    flags = ["--work", str(tmp_path / "work"), "--captioner", str(tiny_captioner_dir), "--ways", "bf16"]
    flags += ["--images", "3", "--batch_sizes", "1,2", "--max_new_tokens", "4"]
    report = run_benchmark("bench_caption.py", *flags, "--out", str(tmp_path / "caption.json"))
    assert [(r["batch_size"], r["images"], r["batch_size_at_end"]) for r in report["rows"]] == [(1, 3, 1), (2, 3, 2)]
    assert all(r["images_per_s"] > 0 and r["dtype"] == "float32" for r in report["rows"])
