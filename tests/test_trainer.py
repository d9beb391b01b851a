"""train_zimage_lora.py end to end on the tiny model (CPU): what a run writes, that it learns the right thing, and
how resume, interruption, bad losses, several processes, training adapters and wrong caches behave.

Runs call the script in-process, `train_zimage_lora.main(train_zimage_lora.parse_args([...]))`, except where a
signal or a second process is the point. Every run logs one JSON line per logging step to OUTPUT/train_log.jsonl;
tests read losses from there, as a user plotting the curve would.
"""

import base64
import datetime
import gc
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import DistributedType
from conftest import LAUNCHES_CPU_PROCESSES, TINY_CACHE_VALIDATION_PROMPTS
from diffusers import ZImagePipeline, ZImageTransformer2DModel
from peft.utils import set_peft_model_state_dict
from PIL import Image
from safetensors.torch import load_file, save_file
from test_lora_io import fail_on_loader_warnings, lora_delta, spec_hash, transformer_output

import lora_tools
import precompute_embeddings
import train_zimage_lora
from zimage_utils import cache as cache_lib
from zimage_utils import cli, flow_matching, step_options
from zimage_utils.checkpoints import (
    LORA_STATE_NAME,
    TRAINING_STATE_NAME,
    check_same_processes,
    list_checkpoints,
    read_training_state,
    resume_training,
    write_training_state,
)
from zimage_utils.lora import add_lora, lora_target_modules
from zimage_utils.lora_io import COMFYUI_WEIGHT_NAME, LORA_WEIGHT_NAME, load_lora_file, save_lora
from zimage_utils.model_loading import load_transformer, longest_caption
from zimage_utils.tiny import TINY_TRANSFORMER, make_synthetic_dataset
from zimage_utils.training_adapter import merge_training_adapter, training_adapter_removed

REPO_ROOT = Path(train_zimage_lora.__file__).resolve().parent

# Flags every run gets unless a test overrides them (None removes one). Validation sampling at the end of a run
# takes one step without guidance, to keep the suite fast.
DEFAULT_FLAGS = {
    "max_train_steps": 6,
    "learning_rate": 1e-3,
    "rank": 4,
    "logging_steps": 1,
    "checkpointing_steps": 0,
    "report_to": "none",
    "validation_num_inference_steps": 1,
    "validation_guidance_scale": 0,
}


def trainer_args(model_dir, cache_dir, output_dir, **flags) -> list[str]:
    """Command-line arguments: `learning_rate=1e-3` becomes `--learning_rate 1e-3`, `flag=True` becomes `--flag`,
    `repeats=[1, 2]` becomes `--repeats 1 2`; `cache_dir` may be a list of caches."""
    caches = cache_dir if isinstance(cache_dir, list) else [cache_dir]
    args = ["--pretrained_model_name_or_path", str(model_dir), "--precomputed_dir", *map(str, caches)]
    args += ["--output_dir", str(output_dir)]
    for name, value in {**DEFAULT_FLAGS, **flags}.items():
        if value is True:
            args.append(f"--{name}")
        elif isinstance(value, list):
            args += [f"--{name}", *map(str, value)]
        elif value is not None:
            args += [f"--{name}", str(value)]
    return args


def reset_accelerate() -> None:
    """Forget accelerate's process-wide state, as a new `python train_zimage_lora.py` process would start."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def train(model_dir, cache_dir, output_dir, **flags) -> list[dict]:
    """One in-process training run; returns the records of its train_log.jsonl."""
    reset_accelerate()
    train_zimage_lora.main(train_zimage_lora.parse_args(trainer_args(model_dir, cache_dir, output_dir, **flags)))
    return read_log(output_dir)


def read_log(output_dir) -> list[dict]:
    path = Path(output_dir) / "train_log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def precompute(model_dir, data_dir, output_dir, *extra) -> Path:
    args = [
        "--pretrained_model_name_or_path", str(model_dir),
        "--train_data_dir", str(data_dir),
        "--output_dir", str(output_dir),
        "--resolution", "64",
        "--dataloader_num_workers", "0",
    ]  # fmt: skip
    precompute_embeddings.main(precompute_embeddings.parse_args(args + list(extra)))
    return Path(output_dir)


def subprocess_env() -> dict[str, str]:
    # One thread per process: the tiny model is far faster single-threaded, and 2 cores are shared.
    path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": path}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model trains ~3x faster on one thread than on two (its matrices are too small to split)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    reset_accelerate()


@pytest.fixture(scope="module")
def flipped_cache_dir(tiny_model_dir, tiny_data_dir, tmp_path_factory) -> Path:
    """`tiny_cache_dir` plus the mirrored latents (--cache_flipped), which --random_flip needs."""
    return precompute(tiny_model_dir, tiny_data_dir, tmp_path_factory.mktemp("flipped_cache"), "--cache_flipped")


# ---------------------------------------------------------------------------------------------------------------
# A finished run: the loss falls, and the files it leaves are the trained model
# ---------------------------------------------------------------------------------------------------------------

FINISHED_STEPS = 150


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, tiny_cache_dir, tmp_path_factory):
    """150 steps, rank 8 with alpha 16 (scale 2, so a loader that drops alpha would be caught), every block Linear;
    a checkpoint at the last step keeps the exact fp32 LoRA to compare the final files against."""
    output_dir = tmp_path_factory.mktemp("finished_run")
    handlers_before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    log = train(
        tiny_model_dir,
        tiny_cache_dir,
        output_dir,
        max_train_steps=FINISHED_STEPS,
        learning_rate=5e-3,
        rank=8,
        lora_alpha=16,
        lora_targets="all",
        train_batch_size=2,
        checkpointing_steps=FINISHED_STEPS,
        save_dtype="fp32",
    )
    handlers_after = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    return {"dir": output_dir, "log": log, "handlers": (handlers_before, handlers_after)}


def test_loss_falls_clearly_over_a_short_run(finished_run):
    losses = [record["loss"] for record in finished_run["log"]]
    assert [r["step"] for r in finished_run["log"]] == list(range(1, FINISHED_STEPS + 1))
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert last < 0.85 * first, f"mean loss of the first 20 steps {first:.3f}, of the last 20 {last:.3f}"


def test_a_finished_run_writes_both_lora_files_a_checkpoint_and_validation_samples(finished_run):
    out = finished_run["dir"]
    assert {p.name for p in out.iterdir()} == {
        LORA_WEIGHT_NAME,
        COMFYUI_WEIGHT_NAME,
        f"checkpoint-{FINISHED_STEPS}",
        "samples",
        "train_log.jsonl",
        "loss_per_sigma.png",
        "README.md",  # the model card (tests/test_model_card.py)
        "run_config.yaml",  # the flags, which --config repeats (tests/test_config.py)
    }
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["grid.png", f"step_{FINISHED_STEPS:06d}.png"]
    assert read_training_state(out / f"checkpoint-{FINISHED_STEPS}")["global_step"] == FINISHED_STEPS


def trained_transformer(model_dir, checkpoint_dir) -> torch.nn.Module:
    """The model as training left it: base + LoRA from the checkpoint's exact (fp32, alpha not folded) state."""
    transformer = load_transformer(str(model_dir), torch.float32)
    add_lora(transformer, rank=8, alpha=16, targets="all")
    state = load_file(str(Path(checkpoint_dir) / LORA_STATE_NAME))
    result = set_peft_model_state_dict(transformer, {k.removeprefix("transformer."): v for k, v in state.items()})
    assert not result.unexpected_keys
    assert not [k for k in result.missing_keys if "lora_" in k]
    return transformer


def test_final_lora_loads_in_diffusers_and_computes_what_training_left(finished_run, tiny_model_dir):
    """Tolerance: fp32 end to end, outputs of magnitude ~1 agree to 1e-5 (the LoRA moves them by > 1e-2)."""
    trained = transformer_output(trained_transformer(tiny_model_dir, finished_run["dir"] / "checkpoint-150"))
    pipe = ZImagePipeline.from_pretrained(tiny_model_dir)
    base = transformer_output(pipe.transformer)
    with fail_on_loader_warnings():
        pipe.load_lora_weights(finished_run["dir"])  # finds pytorch_lora_weights.safetensors
    assert (trained - base).abs().max() > 1e-2  # training really changed the model
    torch.testing.assert_close(transformer_output(pipe.transformer), trained, rtol=0, atol=1e-5)


def test_comfyui_file_converts_to_the_same_weight_updates(finished_run):
    diffusers_sd, _ = load_lora_file(finished_run["dir"] / LORA_WEIGHT_NAME)
    converted = ZImagePipeline.lora_state_dict(str(finished_run["dir"] / COMFYUI_WEIGHT_NAME))
    assert set(converted) == set(diffusers_sd)
    modules = {k.removeprefix("transformer.").removesuffix(".lora_A.weight") for k in diffusers_sd if "lora_A" in k}
    assert len(modules) == 31  # 2 layers x 8 Linears + noise refiner 8 + context refiner 7 (no adaLN)
    for module in modules:
        torch.testing.assert_close(lora_delta(converted, module), lora_delta(diffusers_sd, module))


def test_lora_metadata_tells_what_was_trained(finished_run, tiny_model_dir):
    for name in (LORA_WEIGHT_NAME, COMFYUI_WEIGHT_NAME):
        _, metadata = load_lora_file(finished_run["dir"] / name)
        assert metadata["base_model"] == str(tiny_model_dir)
        assert (metadata["rank"], float(metadata["alpha"]), metadata["targets"]) == ("8", 16.0, "all")
        assert (metadata["steps"], metadata["resolution"]) == (str(FINISHED_STEPS), "64")
        # The SAI model spec, by which SwarmUI and LoRA browsers classify and check the file
        assert metadata["modelspec.architecture"] == "z-image/lora" and metadata["modelspec.sai_model_spec"] == "1.0.0"
        assert metadata["modelspec.title"] == f"{finished_run['dir'].name}, step {FINISHED_STEPS}"
        assert metadata["modelspec.resolution"] == "64x64" and "modelspec.trigger_phrase" not in metadata  # none here
        assert metadata["modelspec.usage_hint"] == "50 steps, CFG 4"  # the tiny model samples as the base model
        assert metadata["modelspec.hash_sha256"] == spec_hash(finished_run["dir"] / name)
        saved_at = datetime.datetime.fromisoformat(metadata["modelspec.date"])
        assert (
            datetime.timedelta(0)
            <= datetime.datetime.now(datetime.timezone.utc) - saved_at
            < datetime.timedelta(hours=1)
        )


def thumbnail_of(path) -> Image.Image:
    """The image in a LoRA file's `modelspec.thumbnail` (a JPEG data URL)."""
    url = load_lora_file(path)[1]["modelspec.thumbnail"]
    assert url.startswith("data:image/jpeg;base64,")
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))


def test_the_lora_files_show_the_first_sample_of_their_step_as_their_thumbnail(finished_run):
    """The final files and the last checkpoint's (step 150), written before that step's samples were drawn, are
    rewritten with the first prompt's sample; their hash still matches."""
    out = finished_run["dir"]
    samples = Image.open(out / "samples" / f"step_{FINISHED_STEPS:06d}.png").convert("RGB")
    width = samples.width // len(TINY_CACHE_VALIDATION_PROMPTS)  # the prompts side by side
    tiles = [np.asarray(samples.crop((i * width, 0, (i + 1) * width, samples.height)), float) for i in range(2)]
    for path in [
        folder / name for folder in (out, out / "checkpoint-150") for name in (LORA_WEIGHT_NAME, COMFYUI_WEIGHT_NAME)
    ]:
        image = thumbnail_of(path)
        assert image.format == "JPEG" and image.size == (width, samples.height)  # (64 px: under 256, not enlarged)
        pixels = np.asarray(image.convert("RGB"), float)
        errors = [np.abs(pixels - tile).mean() for tile in tiles]
        assert errors[0] < 10 and errors[0] < errors[1] / 2, (
            errors
        )  # the first prompt's (JPEG rounds noisy tiles most)
        assert load_lora_file(path)[1]["modelspec.hash_sha256"] == spec_hash(path)


@pytest.mark.parametrize("weight_name", [LORA_WEIGHT_NAME, COMFYUI_WEIGHT_NAME])
def test_init_lora_starts_training_from_a_saved_lora(
    finished_run, tiny_model_dir, tiny_cache_dir, tmp_path, weight_name
):
    """--init_lora with a different alpha (scale 0.5 against the file's 2) and learning rate 0: the run's LoRA is
    the file's, update for update, from either layout."""
    flags = dict(rank=8, lora_alpha=4, lora_targets="all", learning_rate=0, max_train_steps=1, save_dtype="fp32")
    train(tiny_model_dir, tiny_cache_dir, tmp_path, init_lora=finished_run["dir"] / weight_name, **flags)
    original, _ = load_lora_file(finished_run["dir"] / LORA_WEIGHT_NAME)
    started, metadata = load_lora_file(tmp_path / LORA_WEIGHT_NAME)
    assert metadata["init_lora"] == str(finished_run["dir"] / weight_name)
    modules = {k.removeprefix("transformer.").removesuffix(".lora_A.weight") for k in original if "lora_A" in k}
    assert len(modules) == 31
    for module in modules:
        torch.testing.assert_close(lora_delta(started, module), lora_delta(original, module), rtol=1e-5, atol=1e-7)


def test_init_lora_from_a_file_resized_to_lower_ranks_starts_from_its_update_and_trains_the_rest(
    finished_run, tiny_model_dir, tiny_cache_dir, tmp_path
):
    """A file shrunk by `lora_tools.py resize --keep` (each module at its own rank, all below 8) into a rank-8 run:
    with learning rate 0 the run's LoRA is the file's update for update; one step at a learning rate moves the B
    columns the file lacked (the missing rank is trained, not dead)."""
    resized = tmp_path / "resized"
    lora_tools.main(
        lora_tools.parse_args(["resize", str(finished_run["dir"]), "--keep", "0.6", "--output_dir", str(resized)])
    )
    small, _ = load_lora_file(resized / LORA_WEIGHT_NAME)
    ranks = {
        k.removeprefix("transformer.").removesuffix(".lora_A.weight"): v.shape[0]
        for k, v in small.items()
        if "lora_A" in k
    }
    assert max(ranks.values()) < 8
    flags = dict(rank=8, lora_alpha=8, lora_targets="all", max_train_steps=1, save_dtype="fp32", init_lora=resized)
    train(tiny_model_dir, tiny_cache_dir, tmp_path / "still", learning_rate=0, **flags)
    started, _ = load_lora_file(tmp_path / "still" / LORA_WEIGHT_NAME)
    for module in ranks:
        assert started[f"transformer.{module}.lora_A.weight"].shape[0] == 8
        torch.testing.assert_close(lora_delta(started, module), lora_delta(small, module), rtol=1e-5, atol=1e-7)
    train(tiny_model_dir, tiny_cache_dir, tmp_path / "moved", learning_rate=1e-2, **flags)
    moved, _ = load_lora_file(tmp_path / "moved" / LORA_WEIGHT_NAME)
    padding = [moved[f"transformer.{m}.lora_B.weight"][:, r:] for m, r in ranks.items()]
    assert max(float(p.abs().max()) for p in padding) > 0


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            dict(rank=4, lora_targets="all"),
            "has LoRA rank 8, this run 4: pass --rank 8, or shrink .* lora_tools.py resize",
        ),
        (dict(rank=8, lora_targets="attention"), "adapts 15 module\\(s\\) this run does not target"),
    ],
)
def test_init_lora_that_does_not_fit_the_run_is_refused_before_the_model_loads(
    finished_run, tiny_model_dir, tiny_cache_dir, tmp_path, flags, message, monkeypatch
):
    monkeypatch.setattr(train_zimage_lora, "load_training_base", lambda *a: pytest.fail("the model loaded first"))
    with pytest.raises(ValueError, match=message):
        train(tiny_model_dir, tiny_cache_dir, tmp_path, init_lora=finished_run["dir"], **flags)


def test_the_checks_before_the_load_leave_the_runs_random_numbers_alone(tiny_model_dir, tiny_cache_dir, tmp_path):
    """The meta model they build initialises its weights; drawn from the global generator, that would change the
    LoRA the run then initialises (and did: a 2-process run's LoRA then missed the 1-process one's by 1.6e-5)."""
    from zimage_utils.model_loading import transformer_config
    from zimage_utils.run_plan import check_lora_plan

    args = train_zimage_lora.parse_args(trainer_args(tiny_model_dir, tiny_cache_dir, tmp_path, rank=8))
    torch.manual_seed(0)
    before = torch.get_rng_state()
    plan = check_lora_plan(args, transformer_config(str(tiny_model_dir)))
    assert plan.trainable > 0 and torch.equal(torch.get_rng_state(), before)


def test_a_training_adapter_for_modules_the_model_lacks_is_refused_before_the_model_loads(
    tiny_model_dir, tiny_cache_dir, adapter_file, tmp_path, monkeypatch
):
    """(an adapter for a deeper Z-Image: its keys are Z-Image's, but the tiny model has no layers.9)"""
    state = load_file(str(adapter_file))
    state = {key.replace("layers.1.", "layers.9."): value for key, value in state.items()}
    save_file(state, str(tmp_path / "deeper.safetensors"))
    monkeypatch.setattr(train_zimage_lora, "load_training_base", lambda *a: pytest.fail("the model loaded first"))
    with pytest.raises(ValueError, match="adapts layers.9.attention.* which .*transformer lacks"):
        train(tiny_model_dir, tiny_cache_dir, tmp_path / "out", training_adapter=tmp_path / "deeper.safetensors")


def test_the_loss_type_reaches_the_step(tiny_model_dir, tiny_cache_dir, tmp_path):
    """--loss_type huber: the same first batch, another loss (Huber's is below the squared error's for |err| > c)."""
    mse = train(tiny_model_dir, tiny_cache_dir, tmp_path / "mse", max_train_steps=1)
    huber = train(tiny_model_dir, tiny_cache_dir, tmp_path / "huber", max_train_steps=1, loss_type="huber")
    assert 0 < huber[0]["loss"] < mse[0]["loss"]


def test_a_run_with_kohyas_dropouts_resumes_exactly(tiny_model_dir, tiny_cache_dir, tmp_path, capsys):
    """The dropouts draw from the random state the checkpoint keeps: stopped at step 2 and resumed, the run ends
    where the uninterrupted one does (that they act: test_lora.py)."""
    flags = dict(learning_rate=1e-2, max_train_steps=4, checkpointing_steps=2, save_dtype="fp32", lora_targets="all")
    dropouts = dict(network_dropout=0.3, rank_dropout=0.2, module_dropout=0.2)
    train(tiny_model_dir, tiny_cache_dir, tmp_path / "a", **flags, **dropouts)
    train(tiny_model_dir, tiny_cache_dir, tmp_path / "b", **flags, **dropouts, max_train_steps_this_run=2)
    train(tiny_model_dir, tiny_cache_dir, tmp_path / "b", **flags, **dropouts, resume_from_checkpoint="latest")
    a, b = (load_lora_file(tmp_path / run / LORA_WEIGHT_NAME)[0] for run in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(SystemExit):
        train_zimage_lora.parse_args(
            trainer_args(tiny_model_dir, tiny_cache_dir, tmp_path, adapter="lokr", rank_dropout=0.1)
        )
    assert (
        "--adapter lokr works with a bf16 or fp8 base (not nf4) and without --lora_dropout" in capsys.readouterr().err
    )


def test_lokr_run_resumes_exactly_and_its_files_give_the_trained_model_in_diffusers(
    tiny_model_dir, tiny_cache_dir, tmp_path
):
    """--adapter lokr end to end: stopped at its step-3 checkpoint and resumed, it ends where the uninterrupted run
    does; its diffusers file and its ComfyUI-layout file both load through diffusers and compute what training left."""
    flags = dict(adapter="lokr", rank=64, lora_alpha=32, lora_targets="all", learning_rate=1e-2, max_train_steps=6)
    flags.update(checkpointing_steps=3, save_dtype="fp32")
    train(tiny_model_dir, tiny_cache_dir, tmp_path / "a", **flags)
    train(tiny_model_dir, tiny_cache_dir, tmp_path / "b", **flags, max_train_steps_this_run=3)
    train(tiny_model_dir, tiny_cache_dir, tmp_path / "b", **flags, resume_from_checkpoint="latest")
    lokr_a, metadata = load_lora_file(tmp_path / "a" / LORA_WEIGHT_NAME)
    lokr_b, _ = load_lora_file(tmp_path / "b" / LORA_WEIGHT_NAME)
    assert metadata["adapter"] == "lokr" and all(".lokr_w" in k for k in lokr_a)
    assert all(torch.equal(lokr_a[k], lokr_b[k]) for k in lokr_a)

    trained = load_transformer(str(tiny_model_dir), torch.float32)
    add_lora(trained, rank=64, alpha=32, targets="all", adapter="lokr")
    state = load_file(str(tmp_path / "a" / "checkpoint-6" / LORA_STATE_NAME))
    set_peft_model_state_dict(trained, {k.removeprefix("transformer."): v for k, v in state.items()})
    expected = transformer_output(trained)
    for source in (tmp_path / "a", tmp_path / "a" / COMFYUI_WEIGHT_NAME):
        pipe = ZImagePipeline.from_pretrained(tiny_model_dir)
        base = transformer_output(pipe.transformer)
        with fail_on_loader_warnings():
            pipe.load_lora_weights(str(source))
        assert (expected - base).abs().max() > 1e-3  # training moved the model
        torch.testing.assert_close(transformer_output(pipe.transformer), expected, rtol=0, atol=1e-5)


def test_captions_longer_than_the_transformer_places_are_refused_before_it_loads(
    tiny_model_dir, tiny_cache_dir, tmp_path, monkeypatch
):
    """`longest_caption` is diffusers' own limit (a caption that long runs, one token more fails), and the trainer
    refuses a cache holding a longer caption, naming it, before loading the model."""
    config = {**TINY_TRANSFORMER, "axes_lens": [98, 32, 32]}
    transformer, limit = ZImageTransformer2DModel(**config), longest_caption(config)
    latents, t = [torch.randn(16, 1, 4, 4)], torch.tensor([0.5])
    with torch.no_grad():
        transformer(latents, t, [torch.randn(limit, 16)])
        with pytest.raises(IndexError):
            transformer(latents, t, [torch.randn(limit + 1, 16)])
    longest = max(cache_lib.load_cache(tiny_cache_dir)[0]["caption_length"])
    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    config_path = model / "transformer" / "config.json"
    config = json.loads(config_path.read_text())
    config["axes_lens"][0] = longest  # places fewer tokens than the longest caption
    config_path.write_text(json.dumps(config))
    monkeypatch.setattr(train_zimage_lora, "load_training_base", lambda *a: pytest.fail("the model loaded first"))
    with pytest.raises(ValueError, match=rf"has a caption of {longest} tokens; .* places at most .*--max_sequence"):
        train(model, tiny_cache_dir, tmp_path / "out")


def test_dora_run_trains_its_norms_and_its_diffusers_file_gives_the_trained_model(
    tiny_model_dir, tiny_cache_dir, tmp_path, capsys
):
    """--adapter dora end to end: the norms train along with the factors, and the saved diffusers file loads in
    ZImagePipeline as the model the checkpoint holds. Combinations DoRA cannot take are refused with the fix."""
    flags = dict(adapter="dora", rank=4, lora_alpha=8, lora_targets="attention", learning_rate=1e-2, save_dtype="fp32")
    train(tiny_model_dir, tiny_cache_dir, tmp_path, **flags, max_train_steps=3, checkpointing_steps=3)
    trained = load_transformer(str(tiny_model_dir), torch.float32)
    add_lora(trained, rank=4, alpha=8, targets="attention", adapter="dora")
    untrained = {n: p.detach().clone() for n, p in trained.named_parameters() if "magnitude" in n}
    state = load_file(str(tmp_path / "checkpoint-3" / LORA_STATE_NAME))
    set_peft_model_state_dict(trained, {k.removeprefix("transformer."): v for k, v in state.items()})
    moved = [(p - untrained[n]).abs().max() for n, p in trained.named_parameters() if "magnitude" in n]
    assert len(moved) == 16 and min(moved) > 0  # every module's norms trained
    expected = transformer_output(trained)
    pipe = ZImagePipeline.from_pretrained(tiny_model_dir)
    with fail_on_loader_warnings():
        pipe.load_lora_weights(str(tmp_path))
    torch.testing.assert_close(transformer_output(pipe.transformer), expected, rtol=0, atol=1e-5)
    assert load_lora_file(tmp_path / LORA_WEIGHT_NAME)[1]["adapter"] == "dora"
    for extra, message in (
        (dict(base_precision="fp8"), "use a bf16 or nf4 base"),
        (dict(blocks_to_swap=2), "without --blocks_to_swap"),
    ):
        with pytest.raises(SystemExit):
            train_zimage_lora.parse_args(
                trainer_args(tiny_model_dir, tiny_cache_dir, tmp_path / "x", **flags, **extra)
            )
        assert message in capsys.readouterr().err


@pytest.fixture(scope="module")
def lokr_run(tiny_model_dir, tiny_cache_dir, tmp_path_factory) -> Path:
    """A LoKr trained 3 steps: w2 rank-decomposed (rank 2, alpha 6, so PEFT's scale 3 is baked into w1)."""
    out = tmp_path_factory.mktemp("lokr_run")
    flags = dict(adapter="lokr", rank=2, lora_alpha=6, lora_targets="attention", save_dtype="fp32")
    train(tiny_model_dir, tiny_cache_dir, out, **flags, learning_rate=1e-2, max_train_steps=3)
    return out


@pytest.mark.parametrize("weight_name", [LORA_WEIGHT_NAME, COMFYUI_WEIGHT_NAME])
def test_init_lora_continues_a_lokr(lokr_run, tiny_model_dir, tiny_cache_dir, tmp_path, weight_name):
    """--init_lora with a LoKr file, another alpha (scale 1) and learning rate 0: the run saves the same LoKr."""
    flags = dict(adapter="lokr", rank=2, lora_alpha=2, lora_targets="attention", save_dtype="fp32")
    train(
        tiny_model_dir,
        tiny_cache_dir,
        tmp_path,
        **flags,
        learning_rate=0,
        max_train_steps=1,
        init_lora=lokr_run / weight_name,
    )
    first, _ = load_lora_file(lokr_run / LORA_WEIGHT_NAME)
    second, _ = load_lora_file(tmp_path / LORA_WEIGHT_NAME)
    assert set(second) == set(first) and any(k.endswith(".lokr_w2_a") for k in first)
    assert max(v.abs().max() for k, v in first.items() if k.endswith(".lokr_w1")) > 0  # trained, not the zero init
    for key in first:
        torch.testing.assert_close(second[key], first[key], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "flags, message",
    [
        (dict(adapter="lokr", rank=2, lokr_factor=8), "has LoKr factors this run does not.*pass the --lokr_factor"),
        (dict(adapter="lora", rank=2), "does not hold a LoRA: train with --adapter lokr"),
    ],
)
def test_init_lora_of_another_shape_or_kind_is_refused(
    lokr_run, tiny_model_dir, tiny_cache_dir, tmp_path, flags, message
):
    with pytest.raises(ValueError, match=message):
        train(tiny_model_dir, tiny_cache_dir, tmp_path, lora_targets="attention", init_lora=lokr_run, **flags)


def test_calling_main_in_process_restores_the_callers_signal_handlers(finished_run):
    before, after = finished_run["handlers"]
    assert after == before  # else Ctrl-C in a notebook or pytest would be swallowed by a finished run's handler


def test_a_run_keeps_its_objects_from_the_garbage_collector_and_hands_them_back(
    tiny_model_dir, tiny_cache_dir, tmp_path, monkeypatch
):
    """After the first step (when compiling has made its graphs) the objects alive are frozen, so that no full
    collection scans them mid-run; when main returns, the caller's collector sees them again."""
    frozen, real_freeze = [], gc.freeze

    def freeze():
        real_freeze()
        frozen.append((len(read_log(tmp_path)), gc.get_freeze_count()))

    monkeypatch.setattr(step_options.gc, "freeze", freeze)
    train(tiny_model_dir, tiny_cache_dir, tmp_path, max_train_steps=3)
    assert len(frozen) == 1 and frozen[0][0] == 0 and frozen[0][1] > 10_000  # once, before step 1 was logged
    assert gc.get_freeze_count() == 0


def test_per_sigma_losses_describe_each_logging_window(tiny_model_dir, tiny_cache_dir, tmp_path):
    """One item per step and a log every step: each record holds exactly one sigma bin, that step's loss (not a
    running average since the start, which would also differ after a resume)."""
    for record in train(tiny_model_dir, tiny_cache_dir, tmp_path, max_train_steps=4):
        bins = {k: v for k, v in record.items() if k.startswith("loss/sigma_")}
        assert list(bins.values()) == [pytest.approx(record["loss"])], record


def test_a_sigma_range_trains_only_those_noise_levels(tiny_model_dir, tiny_cache_dir, tmp_path, capsys):
    log = train(tiny_model_dir, tiny_cache_dir, tmp_path, max_train_steps=6, sigma_range=[0.6, 0.8])
    assert {k for r in log for k in r if k.startswith("loss/sigma_")} == {"loss/sigma_0.6-0.8"}
    assert load_lora_file(tmp_path / LORA_WEIGHT_NAME)[1]["sigma_range"] == "0.6,0.8"  # said in the file
    with pytest.raises(SystemExit):
        train_zimage_lora.parse_args(trainer_args(tiny_model_dir, tiny_cache_dir, tmp_path, sigma_range=[0.5, 0.5]))
    assert "--sigma_range takes LO HI with 0 <= LO < HI <= 1" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# Resume and pruning
# ---------------------------------------------------------------------------------------------------------------

# Everything random at once: caption dropout, random flips, LoRA dropout, gradient accumulation across epoch ends
# (5 micro-batches per epoch) and a warmup + cosine schedule.
RESUME_FLAGS = dict(
    max_train_steps=12,
    train_batch_size=2,
    gradient_accumulation_steps=2,
    caption_dropout=0.3,
    random_flip=0.5,
    lora_dropout=0.1,
    lr_scheduler="cosine",
    lr_warmup_steps=2,
    learning_rate=3e-3,
    save_dtype="fp32",
)


def test_caches_at_two_resolutions_train_together_with_repeats(
    tiny_model_dir, tiny_data_dir, tiny_cache_dir, tmp_path, monkeypatch
):
    """One cache per resolution, the 32² one seen twice an epoch: one epoch visits every 64² item once and every
    32² item twice (each copy with its own index, so its own noise), and the LoRA says it saw both resolutions."""
    small_cache = precompute(tiny_model_dir, tiny_data_dir, tmp_path / "cache_32", "--resolution", "32")
    seen, original = [], train_zimage_lora.flow_matching_step

    def spy(transformer, batch, *args, **kwargs):
        h, w = batch["latents"].shape[-2:]
        seen.extend((int(i), h * w * 64) for i in batch["indices"])  # (index, pixels)
        return original(transformer, batch, *args, **kwargs)

    monkeypatch.setattr(train_zimage_lora, "flow_matching_step", spy)
    out = tmp_path / "run"
    log = train(
        tiny_model_dir, [tiny_cache_dir, small_cache], out, repeats=[1, 2], max_train_steps=36, logging_steps=12
    )

    assert sorted(i for i, _ in seen) == list(range(36))  # 12 items + 2 x 12 copies, each once
    assert sum(pixels > 2048 for _, pixels in seen) == 12  # the 64² cache's buckets hold ~4096 pixels
    assert sum(pixels <= 2048 for _, pixels in seen) == 24  # the 32² cache's ~1024, twice
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in log)
    _, metadata = load_lora_file(out / LORA_WEIGHT_NAME)
    assert metadata["resolution"] == "32,64"


def test_one_repeat_count_per_cache_is_required(tiny_model_dir, tiny_cache_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        train_zimage_lora.parse_args(trainer_args(tiny_model_dir, [tiny_cache_dir, tmp_path], tmp_path, repeats=[2]))
    assert "--repeats takes one count of at least 1 per --precomputed_dir (2 given)" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # the same cache twice would train each item twice an epoch, unasked
        train_zimage_lora.parse_args(trainer_args(tiny_model_dir, [tiny_cache_dir] * 2, tmp_path))
    assert "--precomputed_dir names one cache twice: give it once, with --repeats" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_zimage_lora.parse_args(trainer_args(tiny_model_dir, tiny_cache_dir, tmp_path, loss_weights=[1, 2]))
    assert "--loss_weights takes one weight of at least 0 per --precomputed_dir (1 given)" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("rank", 0, "--rank 0: give 1 or more"),
        ("train_batch_size", 0, "--train_batch_size 0: give 1 or more"),
        ("max_train_steps", 0, "--max_train_steps 0: give 1 or more"),
        ("checkpointing_steps", -1, "--checkpointing_steps -1: give 0 or more (0 = off)"),
        ("learning_rate", -0.001, "--learning_rate -0.001: give a positive rate"),
        ("lokr_factor", 0, "--lokr_factor 0: give w1's side (1 or more), or -1 for near-square factors"),
        ("network_dropout", 1.0, "--network_dropout 1.0: give a value from 0 to 0.99"),
    ],
)
def test_values_out_of_range_are_refused_naming_the_flag(tmp_path, capsys, flag, value, message):
    with pytest.raises(SystemExit):
        train_zimage_lora.parse_args(trainer_args(tmp_path, tmp_path, tmp_path, **{flag: value}))
    assert message in capsys.readouterr().err


def test_caches_weighted_zero_teach_the_lora_nothing(tiny_model_dir, tiny_cache_dir, tmp_path):
    caches = [tiny_cache_dir, shutil.copytree(tiny_cache_dir, tmp_path / "copy")]
    log = train(tiny_model_dir, caches, tmp_path / "run", loss_weights=[0, 0], max_train_steps=3)
    state = load_file(str(tmp_path / "run" / LORA_WEIGHT_NAME))
    rows = [r for r in log if "loss" in r]
    assert [r["loss"] for r in rows] == [0.0] * 3  # "loss" is what is optimised: weighted
    assert all(v > 0 for r in rows for k, v in r.items() if k.startswith("loss/sigma"))  # the per-σ losses are not
    assert all(v.eq(0).all() for k, v in state.items() if "lora_B" in k)  # no gradient: lora_B keeps its zero init


@pytest.fixture(scope="module")
def interrupted_and_resumed(tiny_model_dir, flipped_cache_dir, tmp_path_factory):
    """Run A: 12 steps in one go. Run B: stopped after 6 steps (checkpoints every 3, keep 2), then resumed."""
    a, b = tmp_path_factory.mktemp("uninterrupted"), tmp_path_factory.mktemp("interrupted")
    log_a = train(tiny_model_dir, flipped_cache_dir, a, **RESUME_FLAGS)
    flags_b = dict(RESUME_FLAGS, checkpointing_steps=3, checkpoints_total_limit=2)
    train(tiny_model_dir, flipped_cache_dir, b, **flags_b, max_train_steps_this_run=6)
    checkpoints_at_stop = [p.name for p in list_checkpoints(b)]
    log_b = train(tiny_model_dir, flipped_cache_dir, b, **flags_b, resume_from_checkpoint="latest")
    return {"a": a, "b": b, "log_a": log_a, "log_b": log_b, "checkpoints_at_stop": checkpoints_at_stop}


def test_resume_reproduces_the_uninterrupted_run_exactly(interrupted_and_resumed):
    log_a, log_b = interrupted_and_resumed["log_a"], interrupted_and_resumed["log_b"]
    assert [r["step"] for r in log_b] == list(range(1, 13))  # 1-6 from the first run, 7-12 after resuming
    for record_a, record_b in zip(log_a, log_b):
        assert {k: v for k, v in record_b.items() if k != "steps_per_s"} == {
            k: v for k, v in record_a.items() if k != "steps_per_s"
        }, f"step {record_a['step']}"
    lora_a, _ = load_lora_file(interrupted_and_resumed["a"] / LORA_WEIGHT_NAME)
    lora_b, _ = load_lora_file(interrupted_and_resumed["b"] / LORA_WEIGHT_NAME)
    assert all(torch.equal(lora_a[k], lora_b[k]) for k in lora_a)


def test_a_resumed_run_follows_its_own_learning_rate_and_weight_decay(
    tiny_model_dir, tiny_cache_dir, tmp_path, caplog
):
    """Loading a checkpoint's optimiser and scheduler would bring back the saved --learning_rate and
    --adam_weight_decay; the resumed run uses its own, and says so. Resumed at learning rate 0 the LoRA stays the
    checkpoint's; resumed with weight decay 1000 (AdamW: weights × (1 - lr · wd) = 0) every factor falls to about one
    step's size (the checkpoint's kept rate and decay would leave them as large as before)."""
    flags = dict(max_train_steps=3, checkpointing_steps=2, learning_rate=1e-3, save_dtype="fp32")
    train(tiny_model_dir, tiny_cache_dir, tmp_path / "a", **flags, max_train_steps_this_run=2)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    checkpoint, _ = load_lora_file(tmp_path / "a" / "checkpoint-2" / LORA_WEIGHT_NAME)

    log = train(
        tiny_model_dir,
        tiny_cache_dir,
        tmp_path / "a",
        **{**flags, "learning_rate": 0},
        resume_from_checkpoint="latest",
    )
    assert [r["lr"] for r in log] == [1e-3, 1e-3, 0]
    assert (
        "other optimiser settings, which apply from here: --learning_rate 0.0 (the checkpoint's: 0.001)" in caplog.text
    )
    still, _ = load_lora_file(tmp_path / "a" / LORA_WEIGHT_NAME)
    assert all(torch.equal(still[k], checkpoint[k]) for k in checkpoint)

    train(
        tiny_model_dir,
        tiny_cache_dir,
        tmp_path / "b",
        **flags,
        adam_weight_decay=1000,
        resume_from_checkpoint="latest",
    )
    decayed, _ = load_lora_file(tmp_path / "b" / LORA_WEIGHT_NAME)
    a_factors = [k for k in checkpoint if "lora_A" in k]
    assert min(float(checkpoint[k].abs().max()) for k in a_factors) > 0.05
    assert max(float(decayed[k].abs().max()) for k in a_factors) < 3e-3


def test_checkpoints_total_limit_keeps_the_newest_checkpoints(interrupted_and_resumed):
    assert interrupted_and_resumed["checkpoints_at_stop"] == ["checkpoint-3", "checkpoint-6"]
    assert sorted(p.name for p in interrupted_and_resumed["b"].glob("checkpoint-*")) == [
        "checkpoint-12",
        "checkpoint-9",
    ]


def test_a_run_resumed_from_an_older_checkpoint_sets_the_later_ones_aside(
    tiny_model_dir, tiny_cache_dir, tmp_path, monkeypatch, caplog
):
    """Resumed from checkpoint-2 while the abandoned run's checkpoint-4 is there: it moves to OUTPUT/superseded/, so
    that --checkpoints_total_limit prunes it rather than the new run's, and "latest" after the process dies (here
    while saving step 2 again) picks the new run's, never the abandoned one nor a half-written one."""
    train(tiny_model_dir, tiny_cache_dir, tmp_path, max_train_steps=4, checkpointing_steps=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-4"]
    caplog.set_level("INFO", logger="train")
    resume = dict(max_train_steps=4, checkpointing_steps=2, resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    train(tiny_model_dir, tiny_cache_dir, tmp_path, dry_run=True, **resume)
    assert "it would move the 1 checkpoint(s) after it to superseded/" in caplog.text
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-4"]  # (a dry run moves none)

    def killed(self, output_dir, **kwargs):
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(train_zimage_lora.Accelerator, "save_state", killed)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_model_dir, tiny_cache_dir, tmp_path, **resume)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2"]
    [aside] = (tmp_path / "superseded").iterdir()
    assert aside.name.startswith("after-checkpoint-2-") and list_checkpoints(aside)[0].name == "checkpoint-4"
    assert f"moved to {aside}" in caplog.text


def test_with_a_limit_of_one_a_save_cut_short_keeps_the_checkpoint_before_it(
    tiny_model_dir, tiny_cache_dir, tmp_path, monkeypatch
):
    """--checkpoints_total_limit 1: the old checkpoint goes only once the new one is finished, so a kill during the
    save leaves a checkpoint to resume from (it used to leave none: the run started over). The unfinished folders of
    saves cut short go at the next finished save."""
    flags = dict(max_train_steps=6, checkpointing_steps=2, checkpoints_total_limit=1)
    original, calls = train_zimage_lora.Accelerator.save_state, []

    def killed_on_the_second(self, output_dir, **kwargs):
        calls.append(output_dir)
        if len(calls) == 2:
            (Path(output_dir) / "random_states_0.pkl.tmp").parent.mkdir(exist_ok=True)
            raise KeyboardInterrupt("killed while saving")
        return original(self, output_dir, **kwargs)

    monkeypatch.setattr(train_zimage_lora.Accelerator, "save_state", killed_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_model_dir, tiny_cache_dir, tmp_path, **flags)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2"] and (tmp_path / "checkpoint-4").is_dir()
    monkeypatch.undo()
    (tmp_path / "checkpoint-3").mkdir()  # (one more save cut short, older than the next finished one)
    log = train(tiny_model_dir, tiny_cache_dir, tmp_path, resume_from_checkpoint="latest", **flags)
    assert [r["step"] for r in log if "loss" in r][-1] == 6
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-6"]


def test_an_output_folder_another_run_is_training_in_is_refused(tiny_model_dir, tiny_cache_dir, tmp_path):
    """Two runs in one folder deleted each other's checkpoints and the last to end overwrote the other's LoRA (a kill
    audit). The second is refused before it writes anything; the first's lock ends with it."""
    with cli.folder_lock(tmp_path, "train_zimage_lora.py"):
        with pytest.raises(
            cli.FolderInUse, match="is being written by train_zimage_lora.py .pid .* another --output_dir"
        ):
            train(tiny_model_dir, tiny_cache_dir, tmp_path, max_train_steps=1)
        assert sorted(p.name for p in tmp_path.iterdir()) == [cli.LOCK_NAME]  # (the first run's)
    train(tiny_model_dir, tiny_cache_dir, tmp_path, max_train_steps=1)
    # what a killed run was writing (its final LoRA, a sample) goes when the next one takes the folder
    stale = [tmp_path / ".pytorch_lora_weights.safetensors.tmp-123", tmp_path / "samples" / ".step_000002.png.tmp"]
    for path in stale:
        path.write_bytes(b"half a file")
    train(tiny_model_dir, tiny_cache_dir, tmp_path, max_train_steps=2, resume_from_checkpoint="latest")
    assert not any(path.exists() for path in stale)


@pytest.mark.parametrize("minutes, expected", [(1e-9, [1, 2, 3, 4]), (60, [])])
def test_checkpointing_minutes_saves_when_that_much_time_has_passed(
    tiny_model_dir, tiny_cache_dir, tmp_path, minutes, expected
):
    """A nanosecond has always passed by the next step; an hour never has in this run."""
    flags = dict(max_train_steps=4, checkpointing_steps=0, checkpointing_minutes=minutes)
    train(tiny_model_dir, tiny_cache_dir, tmp_path, **flags)
    assert [read_training_state(p)["global_step"] for p in list_checkpoints(tmp_path)] == expected


@pytest.mark.parametrize("every, expected", [(1, [(2, 1, 2), (3, 2, 1), (4, 3, 0)]), (2, [(3, 2, 1)])])
def test_checkpointing_and_validation_epochs_act_at_the_step_that_completes_every_nth_epoch(
    tiny_model_dir, tiny_cache_dir, tmp_path, every, expected
):
    """The tiny cache's buckets (6, 3 and 3 items) in batches of 3 make 4 batches an epoch; three batches a step, so
    epochs 1 and 2 end inside steps 2 and 3, and epoch 3 with step 4. (global step, next epoch, next batch) each."""
    flags = dict(max_train_steps=4, train_batch_size=3, gradient_accumulation_steps=3)
    flags.update(checkpointing_epochs=every, validation_epochs=every)
    train(tiny_model_dir, tiny_cache_dir, tmp_path, **flags)
    states = [read_training_state(p) for p in list_checkpoints(tmp_path)]
    assert [(s["global_step"], s["epoch"], s["next_batch"]) for s in states] == expected
    # the same steps validated, and the last step (every run validates at its end)
    sampled = sorted(int(p.stem.split("_")[1]) for p in (tmp_path / "samples").glob("step_*.png"))
    assert sampled == sorted({step for step, _, _ in expected} | {4})
    # and the run's flags, as a --config file that repeats it
    given = train_zimage_lora.parse_args(trainer_args(tiny_model_dir, tiny_cache_dir, tmp_path, **flags))
    again = train_zimage_lora.parse_args(["--config", str(tmp_path / "run_config.yaml")])
    assert vars(again) | {"config": None} == vars(given)


def test_epochs_with_gradient_accumulation_train_the_fewest_steps_that_cover_them(
    tiny_model_dir, tiny_cache_dir, tmp_path, caplog
):
    # 12 batches an epoch (12 items, batches of 1), accumulated 5 at a time across the epoch's end: 2 epochs are 24
    # batches, 5 steps (4.8 of them); 6 steps, as ceil(12 / 5) = 3 a epoch gave, trained 30 batches (2.5 epochs)
    caplog.set_level("INFO", logger="train")
    log = train(
        tiny_model_dir,
        tiny_cache_dir,
        tmp_path,
        max_train_steps=None,
        num_train_epochs=2,
        gradient_accumulation_steps=5,
    )
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5] and "5 steps (2.4/epoch)" in caplog.text


def test_resume_latest_without_a_checkpoint_starts_a_new_run(tiny_model_dir, tiny_cache_dir, tmp_path, caplog):
    caplog.set_level("INFO", logger="train")
    log = train(tiny_model_dir, tiny_cache_dir, tmp_path, max_train_steps=2, resume_from_checkpoint="latest")
    assert "no checkpoint" in caplog.text and [r["step"] for r in log] == [1, 2]
    # a new run in that folder would add its losses to this one's log (and its samples beside these)
    with pytest.raises(ValueError, match="holds an earlier run \\(its train_log.jsonl and samples.*new --output_dir"):
        train(tiny_model_dir, tiny_cache_dir, tmp_path, max_train_steps=2)


def test_a_folder_of_another_run_is_refused_and_a_damaged_checkpoint_names_the_fix(
    tiny_model_dir, tiny_cache_dir, tmp_path, monkeypatch
):
    train(tiny_model_dir, tiny_cache_dir, tmp_path, max_train_steps=2, checkpointing_steps=1)
    # a new run there would mix its checkpoints with these ("latest" could then pick the other run's)
    with pytest.raises(ValueError, match="holds checkpoints of an earlier run .*checkpoint-2.*new --output_dir"):
        train(tiny_model_dir, tiny_cache_dir, tmp_path, rank=8)
    loaded = train_zimage_lora.load_training_base
    monkeypatch.setattr(train_zimage_lora, "load_training_base", lambda *a: pytest.fail("the model loaded first"))
    other_rank = r"checkpoint-2 holds a LoRA of other shapes .*: \(4, 32\), here \(8, 32\)\): resume with the --rank"
    for dry_run in ({"dry_run": True}, {}):  # refused from the checkpoint's file header, before the model loads
        with pytest.raises(ValueError, match=other_rank):
            train(tiny_model_dir, tiny_cache_dir, tmp_path, rank=8, resume_from_checkpoint="latest", **dry_run)
    state = tmp_path / "checkpoint-2" / LORA_STATE_NAME
    state.write_bytes(state.read_bytes()[:100])  # a file cut short (a full disk, a killed copy)
    with pytest.raises(ValueError, match="checkpoint-2 could not be loaded .*delete that checkpoint folder"):
        train(tiny_model_dir, tiny_cache_dir, tmp_path, resume_from_checkpoint="latest")
    monkeypatch.setattr(train_zimage_lora, "load_training_base", loaded)
    shutil.rmtree(tmp_path / "checkpoint-2")  # as the message says: the run goes on from checkpoint-1
    (tmp_path / "checkpoint-1" / TRAINING_STATE_NAME).write_text('{"global_step": 1,')
    with pytest.raises(ValueError, match=r"checkpoint-1/training_state.json is damaged"):
        train(tiny_model_dir, tiny_cache_dir, tmp_path, resume_from_checkpoint="latest")


def test_ema_lora_files_hold_the_average_of_the_weights_after_each_step(tiny_model_dir, tiny_cache_dir, tmp_path):
    """--ema_decay 0.5: the files written at step k (checkpoint-k and the final ones) are diffusers' EMA of the raw
    weights after steps 1..k, starting from the initial LoRA; the checkpoint's resume state keeps the raw weights."""
    from diffusers.training_utils import EMAModel

    flags = dict(max_train_steps=4, checkpointing_steps=1, save_dtype="fp32", rank=4, validation_num_inference_steps=1)
    train(tiny_model_dir, tiny_cache_dir, tmp_path / "ema", ema_decay=0.5, **flags)
    # The initial LoRA: the same seed with a learning rate of 0
    train(tiny_model_dir, tiny_cache_dir, tmp_path / "init", **dict(flags, max_train_steps=1, learning_rate=0))
    raw = [load_file(str(tmp_path / "init" / "checkpoint-1" / LORA_STATE_NAME))]
    raw += [load_file(str(tmp_path / "ema" / f"checkpoint-{k}" / LORA_STATE_NAME)) for k in range(1, 5)]
    names = sorted(raw[0])
    params = [torch.nn.Parameter(raw[0][n].clone()) for n in names]
    expected = EMAModel(params, decay=0.5)
    for step in range(1, 5):
        for p, n in zip(params, names):
            p.data.copy_(raw[step][n])
        expected.step(params)
        saved, _ = load_lora_file(tmp_path / "ema" / f"checkpoint-{step}" / LORA_WEIGHT_NAME)  # alpha = rank
        for n, average in zip(names, expected.shadow_params):
            torch.testing.assert_close(saved[n], average, rtol=0, atol=1e-7, msg=f"step {step}: {n}")
    assert not torch.equal(saved[names[1]], raw[4][names[1]])  # the average is not the raw weights
    final, metadata = load_lora_file(tmp_path / "ema" / LORA_WEIGHT_NAME)
    assert all(torch.equal(final[n], saved[n]) for n in names) and metadata["ema_decay"] == "0.5"


def test_resume_with_ema_reproduces_the_uninterrupted_average(tiny_model_dir, tiny_cache_dir, tmp_path, caplog):
    flags = dict(max_train_steps=6, checkpointing_steps=3, save_dtype="fp32", ema_decay=0.9)
    train(tiny_model_dir, tiny_cache_dir, tmp_path / "a", **flags)
    train(tiny_model_dir, tiny_cache_dir, tmp_path / "b", **flags, max_train_steps_this_run=3)
    train(tiny_model_dir, tiny_cache_dir, tmp_path / "b", **flags, resume_from_checkpoint="latest")
    lora_a, _ = load_lora_file(tmp_path / "a" / LORA_WEIGHT_NAME)
    lora_b, _ = load_lora_file(tmp_path / "b" / LORA_WEIGHT_NAME)
    assert all(torch.equal(lora_a[k], lora_b[k]) for k in lora_a)
    # Resuming, with --ema_decay, a run that had none
    train(tiny_model_dir, tiny_cache_dir, tmp_path / "no_ema", max_train_steps=2, checkpointing_steps=1)
    with pytest.raises(FileNotFoundError, match="written without --ema_decay"):
        train(tiny_model_dir, tiny_cache_dir, tmp_path / "no_ema", **flags, resume_from_checkpoint="latest")
    # and without it, one that had one: said, as the average stops
    caplog.set_level("INFO", logger="train")
    train(tiny_model_dir, tiny_cache_dir, tmp_path / "b", max_train_steps=7, resume_from_checkpoint="latest")
    assert "checkpoint-6 holds a LoRA average (--ema_decay); this run has none" in caplog.text


def test_resuming_over_changed_caches_warns_that_the_epoch_order_changed(
    tiny_model_dir, tiny_cache_dir, tmp_path, caplog
):
    train(tiny_model_dir, tiny_cache_dir, tmp_path, max_train_steps=2, checkpointing_steps=2)
    caplog.set_level("INFO", logger="train")
    caches = [tiny_cache_dir, shutil.copytree(tiny_cache_dir, tmp_path / "copy")]
    log = train(tiny_model_dir, caches, tmp_path, max_train_steps=4, resume_from_checkpoint="latest")
    assert "was trained on 12 items an epoch, the caches now give 24" in caplog.text
    assert [r["step"] for r in log] == [1, 2, 3, 4]  # the log file holds both runs


def test_resuming_with_another_batch_size_goes_on_after_the_items_already_seen(
    tiny_model_dir, tiny_cache_dir, tmp_path, caplog
):
    train(tiny_model_dir, tiny_cache_dir, tmp_path, max_train_steps=2, checkpointing_steps=2)  # 2 batches of 1
    state = read_training_state(tmp_path / "checkpoint-2")
    assert (state["processes"], state["train_batch_size"], state["next_batch"]) == (1, 1, 2)
    caplog.set_level("INFO", logger="train")
    train(
        tiny_model_dir,
        tiny_cache_dir,
        tmp_path,
        max_train_steps=3,
        train_batch_size=2,
        resume_from_checkpoint="latest",
        seed=5,
    )
    assert "it goes on after the 2 items its epoch had reached" in caplog.text
    assert "checkpoint-2 was trained with --seed 0, this run has --seed 5: the run goes on" in caplog.text
    assert re.search(
        r"resumed from \S*checkpoint-2: step 2, epoch 0, batch 1\b", caplog.text
    )  # 2 items = 1 batch of 2


def test_a_deepspeed_checkpoint_is_refused_on_another_number_of_processes(tmp_path):
    """ZeRO splits the optimiser state one part per process; refused before anything is loaded."""
    (tmp_path / "checkpoint-4").mkdir()
    write_training_state(tmp_path / "checkpoint-4", {"global_step": 4, "epoch": 0, "next_batch": 4, "processes": 2})
    plugin = SimpleNamespace(zero_stage=2)
    accelerator = SimpleNamespace(
        num_processes=4, distributed_type=DistributedType.DEEPSPEED, state=SimpleNamespace(deepspeed_plugin=plugin)
    )
    with pytest.raises(ValueError, match="saved by 2 processes, this run has 4.*--num_processes 2.*--init_lora"):
        resume_training(accelerator, tmp_path, "latest", items=12)
    state = read_training_state(tmp_path / "checkpoint-4")  # (what the trainer checks before the model loads)
    with pytest.raises(ValueError, match="checkpoint-4 was saved by 2 processes, this run has 4"):
        check_same_processes(accelerator, tmp_path / "checkpoint-4", state)
    check_same_processes(
        SimpleNamespace(**{**vars(accelerator), "num_processes": 2}), tmp_path / "checkpoint-4", state
    )


# ---------------------------------------------------------------------------------------------------------------
# The conventions together: a LoRA trained on one image makes the pipeline sample that image
# ---------------------------------------------------------------------------------------------------------------

# Every block Linear plus the patch embedder and the final projection. The tiny model's embedder and final layer
# are random and frozen by default; adapting them lets 150 CPU steps memorise (the blocks alone need many more).
MEMORISE_TARGETS = ",".join(
    ["to_q", "to_k", "to_v", "to_out.0", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"]
    + ["adaLN_modulation.0", "all_x_embedder.2-1", "all_final_layer.2-1.linear"]
)
MEMORISE_FLAGS = dict(
    max_train_steps=150, learning_rate=1e-2, rank=32, lora_targets=MEMORISE_TARGETS, logging_steps=10
)


@pytest.fixture(scope="module")
def wide_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny pipeline with a 64-wide transformer. A 2x2 patch of 16-channel latents holds 64 values; the
    32-wide tiny transformer cannot represent all of the noise it must remove, so no LoRA on it gets much closer
    than half the base model's distance. VAE and text encoder are unchanged, so caches made with the tiny model fit.
    """
    model_dir = tmp_path_factory.mktemp("wide_model") / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    torch.manual_seed(0)
    transformer = ZImageTransformer2DModel(**{**TINY_TRANSFORMER, "dim": 64, "n_heads": 4, "n_kv_heads": 4})
    with torch.no_grad():  # uninitialised memory otherwise (see ZIMAGE.md)
        transformer.x_pad_token.normal_(std=0.02)
        transformer.cap_pad_token.normal_(std=0.02)
    shutil.rmtree(model_dir / "transformer")
    transformer.save_pretrained(model_dir / "transformer")
    return model_dir


@pytest.fixture(scope="module")
def one_image_cache_dir(tiny_model_dir, tmp_path_factory) -> Path:
    data_dir = make_synthetic_dataset(tmp_path_factory.mktemp("one_image"), num_images=1)
    return precompute(tiny_model_dir, data_dir, tmp_path_factory.mktemp("one_image_cache"))


def sampled_distance(model_dir, cache_dir, lora_dir=None, seeds=(0, 1, 2)) -> float:
    """Mean squared distance between the pipeline's latents for the cached caption and the cached latents.

    Sampling goes through diffusers' own ZImagePipeline (8 steps, no guidance, fixed generators) from the
    cached caption embedding; `output_type="latent"` returns latents before VAE unscaling, the cache's space.
    """
    dataset, manifest = cache_lib.load_cache(cache_dir)
    record = cache_lib.decode_record(dataset[0], manifest)
    target, caption = record["latents"].float(), record["caption_embeds"].float()
    pipe = ZImagePipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    if lora_dir is not None:
        pipe.load_lora_weights(lora_dir)
    distances = []
    for seed in seeds:
        latents = pipe(
            prompt_embeds=[caption],
            height=64,
            width=64,
            num_inference_steps=8,
            guidance_scale=0.0,
            generator=torch.Generator().manual_seed(seed),
            output_type="latent",
        ).images
        distances.append(float(((latents[0].float() - target) ** 2).mean()))
    return sum(distances) / len(distances)


@pytest.fixture(scope="module")
def base_distance(wide_model_dir, one_image_cache_dir) -> float:
    return sampled_distance(wide_model_dir, one_image_cache_dir)


def test_lora_trained_on_one_image_makes_the_pipeline_sample_it(
    wide_model_dir, one_image_cache_dir, base_distance, tmp_path
):
    """Time direction, target sign, latent scaling and the pipeline's negation all have to agree for this."""
    log = train(wide_model_dir, one_image_cache_dir, tmp_path, **MEMORISE_FLAGS)
    assert log[-1]["loss"] < 0.7 * log[0]["loss"]
    trained_distance = sampled_distance(wide_model_dir, one_image_cache_dir, tmp_path)
    assert trained_distance < 0.5 * base_distance, (trained_distance, base_distance)


def test_a_wrong_target_sign_would_be_caught(
    wide_model_dir, one_image_cache_dir, base_distance, tmp_path, monkeypatch
):
    """Training on noise - data (the scheduler's velocity) instead of data - noise: the same run now leaves samples
    farther from the image than the untrained model (measured: ~2x the base distance, where the correct run reaches
    ~0.3x), so the test above guards the convention."""
    monkeypatch.setattr(flow_matching, "velocity_target", lambda x1, x0: x0 - x1)
    train(wide_model_dir, one_image_cache_dir, tmp_path, **MEMORISE_FLAGS)
    wrong_distance = sampled_distance(wide_model_dir, one_image_cache_dir, tmp_path)
    assert wrong_distance > base_distance, (wrong_distance, base_distance)


# ---------------------------------------------------------------------------------------------------------------
# Caption dropout
# ---------------------------------------------------------------------------------------------------------------


def record_transformer_captions(monkeypatch) -> list[torch.Tensor]:
    """Spy on every training forward: the caption embeddings the transformer receives."""
    captions = []
    original = train_zimage_lora.flow_matching_step

    def spy(transformer, *args, **kwargs):
        handle = transformer.register_forward_pre_hook(lambda module, inputs: captions.extend(inputs[2]))
        try:
            return original(transformer, *args, **kwargs)
        finally:
            handle.remove()

    monkeypatch.setattr(train_zimage_lora, "flow_matching_step", spy)
    return captions


@pytest.mark.parametrize("dropout", [1.0, 0.0])
def test_caption_dropout_trains_on_the_cached_empty_caption(
    dropout, tiny_model_dir, tiny_cache_dir, tmp_path, monkeypatch
):
    captions = record_transformer_captions(monkeypatch)
    train(tiny_model_dir, tiny_cache_dir, tmp_path, max_train_steps=3, train_batch_size=2, caption_dropout=dropout)
    empty, _ = cache_lib.load_prompt_embeddings(tiny_cache_dir)
    is_empty = [c.shape == empty.shape and torch.equal(c.float().cpu(), empty.float()) for c in captions]
    assert len(is_empty) == 6
    assert all(is_empty) if dropout == 1.0 else not any(is_empty)


def test_dropout_and_flip_depend_only_on_the_items_seed():
    """So a batch split across processes, or a resumed run, makes the same choices for each item."""
    from zimage_utils.training_step import StepConfig, per_item_choices

    config = StepConfig(caption_dropout=0.3, flip_prob=0.5)
    seeds = list(range(1000))
    drop, flip = per_item_choices(seeds, config, has_flipped=True)
    assert per_item_choices(seeds[:7], config, True) == (drop[:7], flip[:7])
    assert per_item_choices(seeds[500:503], config, True) == (drop[500:503], flip[500:503])
    assert 0.25 < sum(drop) / 1000 < 0.35 and 0.45 < sum(flip) / 1000 < 0.55
    assert per_item_choices(seeds, config, has_flipped=False)[1] == [False] * 1000  # no mirrored latents cached


# ---------------------------------------------------------------------------------------------------------------
# Training adapter (Z-Image-Turbo): merged for training, cancelled for sampling, never saved
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adapter_file(tiny_model_dir, tmp_path_factory) -> Path:
    """A LoRA over attention + FFN with random non-zero weights, standing in for the de-distillation adapter."""
    transformer = load_transformer(str(tiny_model_dir), torch.float32)
    config = add_lora(transformer, rank=4, targets="attention_ffn")
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.3)
    out = tmp_path_factory.mktemp("adapter")
    return save_lora(out, transformer, config, formats=["diffusers"])["diffusers"]


def randomise_trained_lora(transformer, seed=3) -> None:
    """Stands in for training: the same seeded values for lora_A and lora_B of the trained adapter ("default")."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if ".default." in name or name.endswith(
                ".default"
            ):  # LoRA's lora_A.default.weight, LoKr's lokr_w1.default
                param.copy_(torch.randn(param.shape, generator=g) * 0.3)


@pytest.mark.parametrize("adapter", ["lora", "lokr"])
def test_training_adapter_is_merged_for_training_and_cancelled_for_sampling(
    tiny_model_dir, adapter_file, adapter, recwarn
):
    base = load_transformer(str(tiny_model_dir), torch.float32)
    base_output = transformer_output(base)

    model = load_transformer(str(tiny_model_dir), torch.float32)
    adapter_state = merge_training_adapter(model, str(adapter_file), scale=1.0)
    merged_output = transformer_output(model)
    assert (merged_output - base_output).abs().max() > 1e-2  # the base now computes base + adapter
    assert not any("lora" in name for name, _ in model.named_modules())  # fused: no adapter layers remain
    add_lora(model, rank=4, targets="attention", adapter=adapter)  # what the trainer does next
    randomise_trained_lora(model)

    # base + trained LoRA, no adapter anywhere: what a user gets loading our file into the real base
    reference = load_transformer(str(tiny_model_dir), torch.float32)
    add_lora(reference, rank=4, targets="attention", adapter=adapter)
    randomise_trained_lora(reference)
    expected = transformer_output(reference)

    trained_with_adapter = transformer_output(model)
    assert (expected - base_output).abs().max() > 1e-2  # the trained adapter changes the output
    recwarn.clear()
    with training_adapter_removed(model, adapter_state, scale=1.0) as sampling_model:
        # fp32: cancelling W + BA with -BA leaves rounding of ~1e-7 on outputs of magnitude ~1
        torch.testing.assert_close(transformer_output(sampling_model), expected, rtol=0, atol=1e-5)
    assert not [w for w in recwarn if "peft_config" in str(w.message)]  # the second adapter is meant
    torch.testing.assert_close(transformer_output(model), trained_with_adapter, rtol=0, atol=0)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(f".{adapter}_" in name and ".default" in name for name in trainable)
    assert len(trainable) == 2 * len(lora_target_modules(base, "attention"))
    assert not any("training_adapter" in name for name, _ in model.named_parameters())


@pytest.mark.parametrize("precision", ["bf16", "fp8"])
@pytest.mark.parametrize("adapter_dtype", [torch.float32, torch.bfloat16])
def test_the_base_takes_the_training_adapter_linear_by_linear_as_peft_merges_it(
    tiny_model_dir, adapter_file, adapter_dtype, precision
):
    """`--base_precision fp8` adds each Linear's update just before quantising it (on the GPU in a run), and the rest
    (here a modulation Linear, which stays bf16) once the weights are in place, as a bf16 base takes all of them: the
    same base as PEFT's whole-model merge (then fp8)."""
    from zimage_utils.base_precision import quantize_after_loading_
    from zimage_utils.lora_io import read_lora
    from zimage_utils.training_adapter import LinearUpdates

    state = {k: v.to(adapter_dtype) for k, v in read_lora(str(adapter_file)).items()}
    g = torch.Generator().manual_seed(5)
    kept = "layers.0.adaLN_modulation.0"
    linear = load_transformer(str(tiny_model_dir), torch.bfloat16).get_submodule(kept)
    state[f"transformer.{kept}.lora_A.weight"] = torch.randn(4, linear.in_features, generator=g).to(adapter_dtype)
    state[f"transformer.{kept}.lora_B.weight"] = torch.randn(linear.out_features, 4, generator=g).to(adapter_dtype)

    reference = load_transformer(str(tiny_model_dir), torch.bfloat16)
    merge_training_adapter(reference, dict(state), scale=0.7)
    quantize_after_loading_(reference, precision, torch.device("cpu"))

    model = load_transformer(str(tiny_model_dir), torch.bfloat16)
    updates = LinearUpdates.of(state, 0.7)
    quantized = quantize_after_loading_(model, precision, torch.device("cpu"), update=updates)
    if precision == "fp8":
        assert quantized > 0 and list(updates.updates) == [kept]  # every other update went in before quantising
    updates.finish(model, "cpu")
    assert not updates.updates
    expected, merged = reference.state_dict(), model.state_dict()
    assert merged.keys() == expected.keys()
    for key in expected:
        assert torch.equal(merged[key], expected[key]), key
    base = load_transformer(str(tiny_model_dir), torch.bfloat16).get_submodule(kept).weight
    assert not torch.equal(model.get_submodule(kept).weight, base)  # the bf16 Linear took its update too

    lokr = {"transformer.layers.0.attention.to_q.lokr_w1": torch.ones(2, 2)}
    assert LinearUpdates.of(lokr, 1.0) is None  # merged by PEFT, on the CPU


@pytest.mark.parametrize("precision", ["bf16", "fp8"])  # fp8: merged Linear by Linear as they are quantised
def test_training_with_an_adapter_saves_only_the_trained_lora(
    tiny_model_dir, tiny_cache_dir, adapter_file, tmp_path, precision, caplog
):
    flags = dict(max_train_steps=3, training_adapter=adapter_file, base_precision=precision)
    train(tiny_model_dir, tiny_cache_dir, tmp_path, **flags, checkpointing_steps=3)
    saved, metadata = load_lora_file(tmp_path / LORA_WEIGHT_NAME)
    adapter, _ = load_lora_file(adapter_file)
    attention = lora_target_modules(load_transformer(str(tiny_model_dir), torch.float32), "attention")
    assert set(saved) == {f"transformer.{m}.lora_{ab}.weight" for m in attention for ab in "AB"}  # no FFN keys
    assert not any(torch.equal(saved[k], adapter[k]) for k in saved)
    assert metadata["training_adapter"] == str(adapter_file)
    assert (tmp_path / "samples" / "step_000003.png").exists()  # sampled with the adapter cancelled
    if precision == "bf16":  # resumed at another strength: said
        caplog.set_level("INFO", logger="train")
        flags |= dict(max_train_steps=4, training_adapter_scale=0.5, resume_from_checkpoint="latest")
        train(tiny_model_dir, tiny_cache_dir, tmp_path, **flags)
        assert (
            "--training_adapter_scale 1.0, this run has --training_adapter_scale 0.5: the LoRA goes on" in caplog.text
        )


def test_a_training_adapter_merges_into_swapped_blocks_as_into_resident_ones(
    tiny_model_dir, tiny_cache_dir, adapter_file, tmp_path
):
    # the swapped blocks' updates are added to their host copies in place, after the swap
    flags = {"gradient_checkpointing": True, "training_adapter": adapter_file, "max_train_steps": 3}
    train(tiny_model_dir, tiny_cache_dir, tmp_path / "resident", **flags)
    train(tiny_model_dir, tiny_cache_dir, tmp_path / "swapped", blocks_to_swap=3, **flags)
    state, reference = (load_file(str(tmp_path / run / LORA_WEIGHT_NAME)) for run in ("swapped", "resident"))
    assert state.keys() == reference.keys() and all(torch.equal(state[k], reference[k]) for k in state)


# ---------------------------------------------------------------------------------------------------------------
# Failures users run into
# ---------------------------------------------------------------------------------------------------------------


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(
    tiny_model_dir, tiny_cache_dir, tmp_path, monkeypatch
):
    """The loss becomes NaN at step 4; the check runs at the next log or checkpoint (step 6), before saving."""
    original, calls = train_zimage_lora.flow_matching_step, []

    def nan_at_step_4(*args, **kwargs):
        out = original(*args, **kwargs)
        calls.append(1)
        if len(calls) == 4:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(train_zimage_lora, "flow_matching_step", nan_at_step_4)
    with pytest.raises(FloatingPointError, match="non-finite at step 4"):
        train(tiny_model_dir, tiny_cache_dir, tmp_path, max_train_steps=10, checkpointing_steps=3, logging_steps=100)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-3"]
    assert not (tmp_path / "checkpoint-6").exists() and not (tmp_path / LORA_WEIGHT_NAME).exists()


def test_a_diverging_learning_rate_is_reported_with_its_step(tiny_model_dir, tiny_cache_dir, tmp_path):
    with pytest.raises(FloatingPointError, match=r"non-finite at step \d+.*--learning_rate"):
        train(tiny_model_dir, tiny_cache_dir, tmp_path, max_train_steps=10, learning_rate=1e30, rank=8)


def test_a_cache_made_for_another_model_is_refused_before_the_model_loads(
    tiny_model_dir, tiny_cache_dir, tmp_path, monkeypatch
):
    other_model = tmp_path / "other_model"
    shutil.copytree(tiny_model_dir, other_model)
    vae_config = json.loads((other_model / "vae" / "config.json").read_text())
    vae_config["scaling_factor"] = 0.5
    (other_model / "vae" / "config.json").write_text(json.dumps(vae_config))
    monkeypatch.setattr(train_zimage_lora, "load_training_base", lambda *a: pytest.fail("the model loaded first"))
    with pytest.raises(cache_lib.CacheError, match=re.escape(str(tiny_cache_dir))):
        train(other_model, tiny_cache_dir, tmp_path / "out")


def test_a_dry_run_prints_the_runs_start_line_and_loads_and_writes_nothing(
    tiny_model_dir, tiny_cache_dir, tmp_path, monkeypatch, caplog
):
    caplog.set_level("INFO", logger="train")
    flags = dict(max_train_steps=5, rank=8, lora_targets="attention_ffn", train_batch_size=2, checkpointing_steps=5)
    train(tiny_model_dir, tiny_cache_dir, tmp_path / "run", **flags)

    def start_lines() -> list[str]:
        lines = [r.getMessage() for r in caplog.records if "trainable LoRA parameters" in r.getMessage()]
        caplog.clear()
        return lines

    [start] = start_lines()
    monkeypatch.setattr(train_zimage_lora, "load_training_base", lambda *a: pytest.fail("the model loaded"))
    train(tiny_model_dir, tiny_cache_dir, tmp_path / "dry", dry_run=True, **flags)
    [report] = start_lines()
    assert report.splitlines()[0] == start and "nothing was loaded or written" in report
    assert not (tmp_path / "dry").exists()

    files = sorted(tmp_path.rglob("*"))  # resuming the finished run: where it would start, and that it is done
    train(tiny_model_dir, tiny_cache_dir, tmp_path / "run", dry_run=True, resume_from_checkpoint="latest", **flags)
    [report] = start_lines()
    assert f"resume from {tmp_path / 'run' / 'checkpoint-5'} (step 5)" in report and "nothing left to train" in report
    assert sorted(tmp_path.rglob("*")) == files


def test_random_flip_over_a_cache_without_mirrored_latents_is_refused(
    tiny_model_dir, tiny_cache_dir, flipped_cache_dir, tmp_path
):
    """Else the run would train without ever flipping, and say nothing."""
    with pytest.raises(ValueError, match=f"which {re.escape(str(tiny_cache_dir))} does not hold.*--cache_flipped"):
        train(tiny_model_dir, [flipped_cache_dir, tiny_cache_dir], tmp_path, random_flip=0.5)


def test_processes_launched_without_a_process_group_are_refused(tiny_model_dir, tiny_cache_dir, tmp_path, monkeypatch):
    """What `accelerate launch --multi_gpu` does on a machine without GPUs: two lone trainers on the same files."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="ACCELERATE_USE_CPU=1"):
        train(tiny_model_dir, tiny_cache_dir, tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# Preemption: SIGTERM saves a checkpoint and exits cleanly
# ---------------------------------------------------------------------------------------------------------------


def test_sigterm_saves_a_checkpoint_and_resume_finishes_the_run(tiny_model_dir, tiny_cache_dir, tmp_path):
    steps = 200
    args = trainer_args(tiny_model_dir, tiny_cache_dir, tmp_path, max_train_steps=steps)
    with open(tmp_path / "stderr.txt", "w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "train_zimage_lora.py", *args],
            cwd=REPO_ROOT,
            env=subprocess_env(),
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
        deadline = time.time() + 120
        while len(read_log(tmp_path)) < 5 and process.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)  # as a cluster scheduler does before preempting
        returncode = process.wait(timeout=120)
    messages = (tmp_path / "stderr.txt").read_text()
    assert returncode == 0, messages[-3000:]
    stopped_at = read_log(tmp_path)[-1]["step"]
    assert 5 <= stopped_at < steps
    assert f"stopped by signal at step {stopped_at}" in messages
    assert [p.name for p in list_checkpoints(tmp_path)] == [f"checkpoint-{stopped_at}"]
    assert not (tmp_path / LORA_WEIGHT_NAME).exists()  # unfinished: only the checkpoint

    log = train(tiny_model_dir, tiny_cache_dir, tmp_path, max_train_steps=steps, resume_from_checkpoint="latest")
    assert [r["step"] for r in log] == list(range(1, steps + 1))
    _, metadata = load_lora_file(tmp_path / LORA_WEIGHT_NAME)
    assert metadata["steps"] == str(steps)


def test_a_signal_during_validation_saves_and_stops_at_that_step(
    tiny_model_dir, tiny_cache_dir, tmp_path, monkeypatch
):
    """Validation on the real model can outlast a preemption's grace period: the run stops after it, not a step
    later (it used to train one more step first)."""
    original = train_zimage_lora.Validator.sample_grid

    def signalled_while_sampling(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # (the trainer's handler only notes it)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(train_zimage_lora.Validator, "sample_grid", signalled_while_sampling)
    train(tiny_model_dir, tiny_cache_dir, tmp_path, max_train_steps=6, validation_steps=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2"]
    assert not (tmp_path / LORA_WEIGHT_NAME).exists()


# ---------------------------------------------------------------------------------------------------------------
# Two processes (DDP over gloo on the CPU)
# ---------------------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@LAUNCHES_CPU_PROCESSES
def test_two_processes_train_the_same_lora_as_one_process_with_the_same_global_batch(
    tiny_model_dir, flipped_cache_dir, tmp_path
):
    """accelerate 1.15's `launch --cpu` starts ONE process whatever --num_processes says (multi-CPU goes through
    mpirun there, huggingface/accelerate#2741). Two CPU processes come from its torchrun launcher (`--multi_gpu`)
    with ACCELERATE_USE_CPU=1, which makes accelerate set up gloo instead of looking for GPUs.

    Tolerance: every random choice is seeded per item and gradients are averaged over the same 4 items, so the two
    LoRAs differ only by fp32 reduction order: measured 4e-7 (lora_B up to 2e-2, lora_A up to 0.5); asserted 1e-5.
    """
    flags = dict(
        max_train_steps=6, learning_rate=3e-3, caption_dropout=0.3, random_flip=0.5, save_dtype="fp32", rank=8
    )
    flags |= dict(lr_scheduler="cosine")  # a learning rate that depends on the step (for the resume below)
    two, one = tmp_path / "two_processes", tmp_path / "one_process"
    # Always due: the ranks agree through their one-step-late vote, so they save together every other step
    checkpoint_every_chance = dict(checkpointing_steps=0, checkpointing_minutes=1e-9)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    launch += ["--main_process_port", str(free_port()), "train_zimage_lora.py"]
    result = subprocess.run(
        launch
        + trainer_args(tiny_model_dir, flipped_cache_dir, two, **flags, **checkpoint_every_chance, train_batch_size=2),
        cwd=REPO_ROOT,
        env={**subprocess_env(), "ACCELERATE_USE_CPU": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "effective batch 4" in result.stderr and "2 process(es)" in result.stderr
    # One writer: one pair of LoRA files, one log line per step
    assert {p.name for p in two.iterdir()} == {
        LORA_WEIGHT_NAME,
        COMFYUI_WEIGHT_NAME,
        "README.md",
        "run_config.yaml",
        "train_log.jsonl",
        "loss_per_sigma.png",
        "checkpoint-2",
        "checkpoint-4",
        "checkpoint-6",
    }
    assert [r["step"] for r in read_log(two)] == list(range(1, 7))

    train(tiny_model_dir, flipped_cache_dir, one, **flags, train_batch_size=4)
    lora_two, _ = load_lora_file(two / LORA_WEIGHT_NAME)
    lora_one, _ = load_lora_file(one / LORA_WEIGHT_NAME)
    assert set(lora_two) == set(lora_one)
    assert max(lora_one[k].abs().max() for k in lora_one if "lora_B" in k) > 1e-3  # trained, not the zero init
    for key in lora_one:
        torch.testing.assert_close(lora_two[key], lora_one[key], rtol=0, atol=1e-5)

    # The two processes' run moved to one process at step 2 (a cloud node swapped for a smaller one): accelerate
    # stepped the schedule twice a step there, once here; the resume puts it at step 2's point and the epoch at
    # the next global batch, so the run ends as the one-process run did
    moved = tmp_path / "moved_to_one_process"
    log = train(
        tiny_model_dir,
        flipped_cache_dir,
        moved,
        **flags,
        train_batch_size=4,
        resume_from_checkpoint=two / "checkpoint-2",
    )
    assert [r["lr"] for r in log] == pytest.approx([r["lr"] for r in read_log(one)][2:], rel=1e-6)
    lora_moved, _ = load_lora_file(moved / LORA_WEIGHT_NAME)
    for key in lora_one:
        torch.testing.assert_close(lora_moved[key], lora_one[key], rtol=0, atol=1e-5)


@LAUNCHES_CPU_PROCESSES
def test_two_nodes_launched_with_the_multi_node_config_train_what_one_process_does(
    tiny_model_dir, tiny_cache_dir, tmp_path
):
    """accelerate_configs/multi_node.yaml as its first line says to run it, once per node (--machine_rank 0 and 1),
    both "nodes" on this machine with one CPU process each and the address and port given on the command line:
    they meet, train on one shared output folder (the main process writes), and give what one process gives with
    the same global batch. The nodes swap their first two blocks' weights to host memory (--blocks_to_swap, which
    DDP must leave where they are), the one process does not."""
    flags = dict(max_train_steps=4, learning_rate=3e-3, save_dtype="fp32", rank=8, checkpointing_steps=2)
    nodes, port = tmp_path / "two_nodes", str(free_port())
    launched = []
    for machine_rank in (0, 1):
        launch = [sys.executable, "-m", "accelerate.commands.launch"]
        launch += ["--config_file", "accelerate_configs/multi_node.yaml", "--machine_rank", str(machine_rank)]
        launch += ["--num_processes", "2", "--main_process_ip", "127.0.0.1", "--main_process_port", port]
        launch += ["--mixed_precision", "no", "train_zimage_lora.py"]
        log = open(tmp_path / f"node_{machine_rank}.log", "w")
        command = launch + trainer_args(tiny_model_dir, tiny_cache_dir, nodes, **flags, blocks_to_swap=2)
        env = {**subprocess_env(), "ACCELERATE_USE_CPU": "1"}
        launched.append(subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=log, text=True))
        log.close()
    for node, process in enumerate(launched):
        try:
            process.wait(timeout=300)
        except subprocess.TimeoutExpired:
            for p in launched:
                p.kill()
            pytest.fail(f"node {node} hung: {(tmp_path / f'node_{node}.log').read_text()[-3000:]}")
    logs = [(tmp_path / f"node_{node}.log").read_text() for node in (0, 1)]
    assert [p.returncode for p in launched] == [0, 0], logs[0][-2000:] + logs[1][-2000:]
    assert "effective batch 2" in logs[0] and "2 process(es)" in logs[0]
    assert "effective batch" not in logs[1]  # the summary (and every file) comes from the main process only
    assert "2 blocks' frozen weights" in logs[0]
    assert [r["step"] for r in read_log(nodes)] == [1, 2, 3, 4]
    assert sorted(p.name for p in list_checkpoints(nodes)) == ["checkpoint-2", "checkpoint-4"]

    one = tmp_path / "one_process"
    train(tiny_model_dir, tiny_cache_dir, one, **flags, train_batch_size=2)
    lora_nodes, _ = load_lora_file(nodes / LORA_WEIGHT_NAME)
    lora_one, _ = load_lora_file(one / LORA_WEIGHT_NAME)
    assert set(lora_nodes) == set(lora_one)
    for key in lora_one:
        torch.testing.assert_close(lora_nodes[key], lora_one[key], rtol=0, atol=1e-5)


def test_a_checkpoint_named_as_diffusers_examples_name_it_is_found_in_the_output_folder(tmp_path, monkeypatch):
    from zimage_utils.checkpoints import resolve_resume_path

    (tmp_path / "run" / "checkpoint-2").mkdir(parents=True)
    (tmp_path / "run" / "checkpoint-2" / TRAINING_STATE_NAME).write_text("{}")
    monkeypatch.chdir(tmp_path)
    assert resolve_resume_path(tmp_path / "run", "checkpoint-2") == tmp_path / "run" / "checkpoint-2"
    with pytest.raises(FileNotFoundError, match="checkpoint-9: no such folder \\(nor in .*run\\)"):
        resolve_resume_path(tmp_path / "run", "checkpoint-9")


def test_a_tracker_that_cannot_start_stops_the_run_before_the_model_loads(
    tiny_model_dir, tiny_cache_dir, tmp_path, monkeypatch
):
    def not_logged_in(*args, **kwargs):
        raise RuntimeError("No API key configured")

    monkeypatch.setattr(train_zimage_lora.Accelerator, "init_trackers", not_logged_in)
    monkeypatch.setattr(train_zimage_lora, "load_training_base", lambda *a: pytest.fail("the model loaded first"))
    with pytest.raises(ValueError, match="--report_to tensorboard could not start .*No API key.*--report_to"):
        train(tiny_model_dir, tiny_cache_dir, tmp_path, report_to="tensorboard")
