"""Fixtures shared by all test files: a tiny random Z-Image pipeline, a synthetic captioned folder, and the embedding
cache `precompute_embeddings.py` makes from them. Session-scoped, so they are built once per pytest run; tests that
change them must work on a copy."""

import os
import sys
from pathlib import Path

# Set before anything imports huggingface_hub: there is no network here, and the tests must never need one.
os.environ["HF_HUB_OFFLINE"] = "1"

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))  # so tests can import the top-level scripts, e.g. precompute_embeddings

import pytest  # noqa: E402
import torch  # noqa: E402

# The tiny models gain nothing from threads, and on a busy machine (2 cores, another job running) OpenMP threads
# waiting on each other made CPU convolutions ~50x slower. One thread also matches `accelerate launch
# --num_cpu_threads_per_process 1`, so in-process and launched runs do the same float arithmetic.
torch.set_num_threads(1)

# Where the scripts run in this process and in what dtype (a GPU's bf16 when there is one, else the CPU's fp32), so
# that a reference is made as they make their output: run on a GPU, the suite then compares like with like.
SCRIPT_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SCRIPT_DTYPE = torch.bfloat16 if SCRIPT_DEVICE == "cuda" else torch.float32
# Latents computed in SCRIPT_DTYPE by two routes (other batch sizes) agree to this; stored bf16 rounds too (8 bits)
LATENT_TOLERANCE = dict(rtol=1 / 128, atol=1e-3) if SCRIPT_DTYPE == torch.float32 else dict(rtol=1 / 32, atol=2e-2)

# Tests that launch CPU processes (`accelerate launch` with ACCELERATE_USE_CPU=1) and compare them with an in-process
# run, which on a GPU host would run on the GPU: other arithmetic.
LAUNCHES_CPU_PROCESSES = pytest.mark.skipif(
    torch.cuda.is_available(), reason="compares launched CPU processes with an in-process run, here on the GPU"
)


# The files that take longest on CI's 2 cores, longest first (each a few minutes of CPU, 2026-12). The two xdist
# workers take whole files in collection order (pyproject.toml: --dist loadfile --no-loadscope-reorder), so a long file
# started last would leave one worker idle while the other finishes it. The other files follow, in name order.
SLOW_FILES = (
    "test_benchmarks.py", "test_trainer.py", "test_low_memory.py", "test_docs.py", "test_notebook.py",
    "test_deepspeed.py", "test_scale_benchmark.py", "test_step_options.py", "test_precompute.py",
)  # fmt: skip


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOW_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FILES)))  # stable: a file's tests keep their order


def script_pipeline(model_dir):
    """`ZImagePipeline` from `model_dir`, on the device and in the dtype the scripts use here."""
    from diffusers import ZImagePipeline

    return ZImagePipeline.from_pretrained(str(model_dir), dtype=SCRIPT_DTYPE).to(SCRIPT_DEVICE)


def pipeline_embeddings(pipe, text: str) -> torch.Tensor:
    """`encode_prompt`'s embeddings of `text` ([tokens, hidden]), on the CPU and in fp32 (exact from bf16)."""
    reference, _ = pipe.encode_prompt([text], do_classifier_free_guidance=False)
    return reference[0].float().cpu()


# The validation prompts `tiny_cache_dir` stores embeddings for.
TINY_CACHE_VALIDATION_PROMPTS = ["a red circle", "a blue square on a white background"]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A random tiny Z-Image diffusers folder (model_index.json + components), loadable like the real model."""
    from zimage_utils.tiny import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory) -> Path:
    """12 PNGs of coloured shapes (64x64, 64x96, 96x64, 48x112) with .txt caption sidecars."""
    from zimage_utils.tiny import make_synthetic_dataset

    return make_synthetic_dataset(tmp_path_factory.mktemp("tiny_data"), num_images=12)


@pytest.fixture(scope="session")
def tiny_captioner_dir(tmp_path_factory) -> Path:
    """A tiny random vision-language captioner (LLaVA-NeXT) folder, loadable like a real one."""
    from zimage_utils.tiny import save_tiny_captioner

    return save_tiny_captioner(tmp_path_factory.mktemp("tiny_captioner"))


@pytest.fixture(scope="session")
def tiny_cache_dir(tmp_path_factory, tiny_model_dir, tiny_data_dir) -> Path:
    """The finished cache of `tiny_data_dir` at resolution 64 (bf16 storage), with TINY_CACHE_VALIDATION_PROMPTS."""
    import precompute_embeddings

    output_dir = tmp_path_factory.mktemp("tiny_cache")
    args = [
        "--pretrained_model_name_or_path", str(tiny_model_dir),
        "--train_data_dir", str(tiny_data_dir),
        "--output_dir", str(output_dir),
        "--resolution", "64",
        "--dataloader_num_workers", "0",
        "--validation_prompts", *TINY_CACHE_VALIDATION_PROMPTS,
    ]  # fmt: skip
    precompute_embeddings.main(precompute_embeddings.parse_args(args))
    return output_dir


@pytest.fixture
def text_encoder_calls(monkeypatch) -> list[int]:
    """How many captions each text-encoder call of the precompute got (grouped or per batch), in order."""
    import precompute_embeddings

    calls = []
    real = precompute_embeddings.encode_captions

    def counting(captions, *args, **kwargs):
        calls.append(len(captions))
        return real(captions, *args, **kwargs)

    monkeypatch.setattr(precompute_embeddings, "encode_captions", counting)
    monkeypatch.setattr("zimage_utils.precompute.encode_captions", counting)
    return calls
