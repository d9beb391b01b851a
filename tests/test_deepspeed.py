"""DeepSpeed ZeRO-2 and ZeRO-3 runs of train_zimage_lora.py, launched with the repo's own accelerate configs on two
CPU processes: they train the same LoRA as plain DDP, save it whole (not a ZeRO-3 shard), checkpoint only the LoRA,
resume exactly, and sample validation images without hanging.

On a machine without GPUs the DeepSpeed configs are launched as they are, only with `--mixed_precision no` (the
CPU has no fast bf16) and WITHOUT ACCELERATE_USE_CPU=1 / `use_cpu: true`: those make accelerate drop DeepSpeed
silently and run plain DDP, which the trainer refuses. The trainer runs DeepSpeed over gloo instead. DeepSpeed's CPU
backend compiles a small C++ op (deepspeed_shm_comm) on its first run on a machine (~30 s on 2 cores; needs a C++
compiler and the ninja package), then reuses it from ~/.cache/torch_extensions.
"""

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffusers import ZImagePipeline
from PIL import Image
from test_lora_io import fail_on_loader_warnings
from test_masks import half_mask
from test_trainer import (
    DEFAULT_FLAGS,
    REPO_ROOT,
    free_port,
    precompute,
    read_log,
    reset_accelerate,
    subprocess_env,
    train,
    trainer_args,
)

from zimage_utils.checkpoints import list_checkpoints
from zimage_utils.lora_io import LORA_WEIGHT_NAME, load_lora_file

CONFIGS = {
    "ddp": "accelerate_configs/multi_gpu.yaml",
    "zero2": "accelerate_configs/deepspeed_zero2.yaml",
    "zero3": "accelerate_configs/deepspeed_zero3.yaml",
}
# 4 steps, a checkpoint and a validation grid (the cache's two prompts) every 2; fp32 files to compare exactly.
# Checkpointed blocks keeping their attention outputs: under ZeRO-3 the recomputation inside each block's forward
# (step_options) must still see the gathered parameters, and what is kept must not change what is trained.
FLAGS = dict(max_train_steps=4, checkpointing_steps=2, validation_steps=2, save_dtype="fp32")
FLAGS |= dict(gradient_checkpointing=True, checkpoint_keep_attention=True)
# DeepSpeed vs DDP. Measured on 2 CPU processes: ZeRO-2 gives DDP's losses and LoRA bit for bit; ZeRO-3 sums
# gradients in another order (reduce-scatter of its partitions): losses (~1.3) and LoRA weights differ by <= 1.2e-7.
# Asserted: 1e-5, as for DDP against one process in test_trainer.py.
TOLERANCE = 1e-5
LAUNCH_TIMEOUT_S = 300  # a hang (one rank waiting in a ZeRO-3 collective) fails the test instead of blocking CI


def start(config: str, model_dir, cache_dir, output_dir, log_path, **flags) -> subprocess.Popen:
    """`accelerate launch --config_file <config>` on 2 CPU processes, in the background, its output in log_path."""
    env = subprocess_env()
    env.pop("ACCELERATE_USE_CPU", None)
    if config == "ddp":  # multi_gpu.yaml runs DDP over gloo on the CPU only when told to
        env["ACCELERATE_USE_CPU"] = "1"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", CONFIGS[config]]
    command += ["--num_processes", "2", "--mixed_precision", "no", "--main_process_port", str(free_port())]
    command += ["train_zimage_lora.py", *trainer_args(model_dir, cache_dir, output_dir, **{**FLAGS, **flags})]
    with open(log_path, "w") as log:  # a file, not a pipe: a full pipe would block a run nobody is reading yet
        # Its own process group, so that a hung run is killed with its workers (torchrun leaves them behind)
        return subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=log, start_new_session=True)


def finish(process: subprocess.Popen, log_path) -> str:
    """Wait for a run (killing it, workers included, after LAUNCH_TIMEOUT_S) and return its log."""
    try:
        process.wait(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        pytest.fail(f"{' '.join(process.args[-30:])} hung:\n{Path(log_path).read_text()[-4000:]}")
    log = Path(log_path).read_text()
    assert process.returncode == 0, log[-4000:]
    assert "2 process(es)" in log
    return log


def masked_cache_with_variants(model_dir, data_dir, folder: Path) -> Path:
    """`tiny_data_dir` cached with a half-black loss mask per image, two caption variants per caption, and
    preservation captions."""
    data, masks = shutil.copytree(data_dir, folder / "data"), folder / "masks"
    masks.mkdir()
    for image in data.glob("*.png"):
        with Image.open(image) as picture:
            half_mask(*picture.size).save(masks / image.name)
        caption = image.with_suffix(".txt")
        caption.write_text(f"{caption.read_text()}\nanother way to say it")
    flags = [
        "--mask_dir",
        str(masks),
        "--caption_variants",
        "--caption_prefix",
        "sks",
        "--preservation_class",
        "shape",
    ]
    return precompute(model_dir, data, folder / "cache", *flags)


@pytest.fixture(scope="module")
def rich_cache(tiny_model_dir, tiny_data_dir, tmp_path_factory) -> Path:
    """`masked_cache_with_variants` of the tiny dataset: loss masks, caption variants, preservation captions."""
    return masked_cache_with_variants(tiny_model_dir, tiny_data_dir, tmp_path_factory.mktemp("masked"))


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tiny_cache_dir, rich_cache, tmp_path_factory) -> dict:
    """Four-step runs of the same training (FLAGS: checkpointed blocks): DDP, ZeRO-2, ZeRO-3, and ZeRO-3 stopped
    after its checkpoint at step 2 then resumed with --resume_from_checkpoint latest; beside the resume, two ZeRO-3
    steps with LoRA+ and preservation on a cache with loss masks and caption variants. Two runs at a time (4
    processes on CI's 2 cores: ~1.5 GB)."""
    names = ("ddp", "zero2", "zero3", "zero3_resumed", "zero3_loraplus")
    out = {name: tmp_path_factory.mktemp(name) for name in names}
    logs = tmp_path_factory.mktemp("launch_logs")

    def run_together(*runs: tuple[str, Path, dict]) -> list[str]:
        """(config, output_dir, extra flags) each; returns their logs."""
        started = []
        for config, output_dir, flags in runs:
            log_path = logs / f"{output_dir.name}_{len(list(logs.iterdir()))}.log"
            cache = rich_cache if output_dir == out["zero3_loraplus"] else tiny_cache_dir
            started.append((start(config, tiny_model_dir, cache, output_dir, log_path, **flags), log_path))
        return [finish(process, log_path) for process, log_path in started]

    run_together(("ddp", out["ddp"], {}), ("zero2", out["zero2"], {}))
    run_together(("zero3", out["zero3"], {}), ("zero3", out["zero3_resumed"], {"max_train_steps_this_run": 2}))
    out["checkpoints_at_stop"] = [p.name for p in list_checkpoints(out["zero3_resumed"])]
    loraplus = {"loraplus_lr_ratio": 4, "max_train_steps": 2, "checkpointing_steps": 1, "preservation_weight": 1.0}
    out["resume_log"], out["loraplus_log"] = run_together(
        ("zero3", out["zero3_resumed"], {"resume_from_checkpoint": "latest"}),
        ("zero3", out["zero3_loraplus"], loraplus),
    )
    return out


def losses(output_dir) -> list[dict]:
    """Per step: the loss and the per-sigma-bin losses (not the wall-clock steps_per_s)."""
    return [{k: v for k, v in record.items() if k != "steps_per_s"} for record in read_log(output_dir)]


def assert_close_losses(log, reference) -> None:
    assert [r["step"] for r in log] == [r["step"] for r in reference]
    for record, expected in zip(log, reference):
        assert record.keys() == expected.keys(), f"step {record['step']}"
        for key in record:
            assert record[key] == pytest.approx(expected[key], rel=0, abs=TOLERANCE), f"step {record['step']}: {key}"


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_deepspeed_lora_loads_in_diffusers_whole_and_trained(stage, runs, tiny_model_dir):
    """Under ZeRO-3 each rank holds a shard of every LoRA tensor; the saved file must hold them whole."""
    path = runs[stage] / LORA_WEIGHT_NAME
    lora, _ = load_lora_file(path)
    assert lora and all(t.numel() > 0 for t in lora.values())
    untrained = [k for k, t in lora.items() if "lora_B" in k and not t.any()]
    assert not untrained, f"lora_B still at its zero init: {untrained[:3]}"
    pipe = ZImagePipeline.from_pretrained(tiny_model_dir)
    with fail_on_loader_warnings():  # no unexpected or missing keys
        pipe.load_lora_weights(runs[stage])


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_deepspeed_trains_the_same_lora_as_ddp(stage, runs):
    assert_close_losses(losses(runs[stage]), losses(runs["ddp"]))
    lora, _ = load_lora_file(runs[stage] / LORA_WEIGHT_NAME)
    reference, _ = load_lora_file(runs["ddp"] / LORA_WEIGHT_NAME)
    assert set(lora) == set(reference)
    for key in reference:
        torch.testing.assert_close(lora[key], reference[key], rtol=0, atol=TOLERANCE)


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_deepspeed_checkpoints_hold_the_lora_not_the_frozen_base(stage, runs, tiny_model_dir):
    """DeepSpeed's own state (`pytorch_model/`: LoRA, its fp32 master copy and Adam moments, one optimiser shard per
    rank) next to our files; the frozen base would make it larger than the transformer itself."""
    deepspeed_dir = runs[stage] / "checkpoint-4" / "pytorch_model"
    assert (deepspeed_dir / "zero_pp_rank_1_mp_rank_00_optim_states.pt").exists()  # partitioned over 2 ranks
    checkpoint_bytes = sum(p.stat().st_size for p in deepspeed_dir.iterdir())
    base_bytes = (Path(tiny_model_dir) / "transformer" / "diffusion_pytorch_model.safetensors").stat().st_size
    assert checkpoint_bytes < base_bytes / 4, (checkpoint_bytes, base_bytes)


def test_zero3_resume_reproduces_the_uninterrupted_run_exactly(runs):
    """DeepSpeed's checkpoint restores the LoRA, its fp32 master copy and Adam state on every rank; ours the loop
    position and RNG. Same partitions, same reduction order: the resumed run is bit for bit the uninterrupted one."""
    assert runs["checkpoints_at_stop"] == ["checkpoint-2"]
    assert re.search(r"resumed from \S*checkpoint-2: step 2,", runs["resume_log"])
    assert losses(runs["zero3_resumed"]) == losses(runs["zero3"])  # steps 1-2, then 3-4 after the resume
    lora, _ = load_lora_file(runs["zero3_resumed"] / LORA_WEIGHT_NAME)
    reference, _ = load_lora_file(runs["zero3"] / LORA_WEIGHT_NAME)
    assert set(lora) == set(reference) and all(torch.equal(lora[k], reference[k]) for k in reference)


def test_loraplus_under_zero3_moves_the_b_factors_ratio_times_the_learning_rate(runs):
    """Adam's first step moves each B entry by lr · ratio where its gradient is not tiny (A gets none: B starts at
    zero; nor does the preservation loss, zero while the LoRA is). Without the LoRA+ groups reaching DeepSpeed's
    optimiser, the largest move would be lr."""
    assert "12 items with a loss mask" in runs["loraplus_log"]  # masks and caption variants under ZeRO-3 too
    # the base model's prediction (adapters off, no grad) on every rank, then a preservation loss once the LoRA moved.
    # Its second step is the one torch 2.13 failed with checkpointed blocks (FLAGS), before step_options'
    # recompute_freely: after that pass without the LoRA, the recomputed blocks gather other parameters.
    assert [r["loss/preservation"] > 1e-9 for r in losses(runs["zero3_loraplus"])] == [False, True]
    lora, _ = load_lora_file(runs["zero3_loraplus"] / "checkpoint-1" / LORA_WEIGHT_NAME)
    largest = max(t.abs().max().item() for k, t in lora.items() if "lora_B" in k)
    assert largest == pytest.approx(4 * DEFAULT_FLAGS["learning_rate"], rel=1e-3)


def test_zero3_validation_samples_on_every_rank_and_writes_each_image_once(runs):
    """Under ZeRO-3 every forward gathers parameters from all ranks, so all of them sample (a rank-0-only sample
    would hang; completing within LAUNCH_TIMEOUT_S is the check); only the main process writes: one file per
    validation step and the prompts x steps grid, no leftover temporary files."""
    samples = runs["zero3"] / "samples"
    assert sorted(p.name for p in samples.iterdir()) == ["grid.png", "step_000002.png", "step_000004.png"]
    with Image.open(samples / "step_000004.png") as step_image:
        assert step_image.size == (2 * 64, 64)  # the cache's two validation prompts side by side, at resolution 64
    with Image.open(samples / "grid.png") as grid:
        assert grid.width == 2 * 64  # one column per validation step


def test_a_deepspeed_config_with_use_cpu_is_refused_rather_than_run_as_ddp(
    tiny_model_dir, tiny_cache_dir, tmp_path, monkeypatch
):
    """ACCELERATE_USE_CPU=1 (or `use_cpu: true` in the config) makes accelerate drop DeepSpeed without a word."""
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # what `accelerate launch` sets for a DeepSpeed config
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    with pytest.raises(RuntimeError, match="turned it off"):
        train(tiny_model_dir, tiny_cache_dir, tmp_path)
    reset_accelerate()
    assert not os.listdir(tmp_path)  # refused before writing anything


class _RunsCodeWhenUnpickled:
    """Unpickling this calls `Path.touch` on `marker`: what a malicious checkpoint could do with any function."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_deepspeed_checkpoints_are_read_weights_only(tmp_path):
    """DeepSpeed unpickles its checkpoint files whole; the trainer makes its engine read them weights only, allowing
    the few DeepSpeed classes its LoRA checkpoints hold (the ZeRO-3 resume above reads real ones through it)."""
    from accelerate.utils import DistributedType
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    from zimage_utils.distributed import weights_only_checkpoint_loads

    marker = tmp_path / "code_ran"
    torch.save({"optimizer": _RunsCodeWhenUnpickled(marker)}, tmp_path / "tampered.pt")
    TorchCheckpointEngine().load(str(tmp_path / "tampered.pt"))  # DeepSpeed's own load runs it
    assert marker.exists()
    marker.unlink()

    engine = TorchCheckpointEngine()
    accelerator = SimpleNamespace(
        distributed_type=DistributedType.DEEPSPEED,
        state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=3)),
        deepspeed_engine_wrapped=SimpleNamespace(engine=SimpleNamespace(checkpoint_engine=engine)),
    )
    weights_only_checkpoint_loads(accelerator)
    with pytest.raises(ValueError, match=r"tampered\.pt holds \w+, which .* --init_lora"):
        engine.load(str(tmp_path / "tampered.pt"))
    assert not marker.exists()

    saved = {
        "loss_scaler": LossScaler(1.0),
        "zero_stage": ZeroStageEnum.weights,
        "param_slice_mappings": [{"lora_A": fragment_address(numel=4, start=8)}],
        "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(4)}},
    }
    torch.save(saved, tmp_path / "optim_states.pt")
    loaded = engine.load(str(tmp_path / "optim_states.pt"), map_location="cpu")
    assert loaded["zero_stage"] is ZeroStageEnum.weights and loaded["loss_scaler"].cur_scale == 1.0
    assert loaded["param_slice_mappings"][0]["lora_A"].start == 8 and loaded["state"][0]["step"] == 3
