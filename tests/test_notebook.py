"""The Colab/Kaggle notebook, `notebooks/zimage_lora_colab.ipynb`, run top to bottom on the tiny model: what a user
gets from *Run all*, from their images to the ComfyUI file.

The notebook is plain JSON (nbformat 4) and is run here without Jupyter: its code cells are executed in order in
one namespace, as a kernel would. Two conventions make that possible, and the tests below hold the notebook to them:
- the settings live in one code cell tagged "parameters" (as papermill expects); the test runs it, then replaces
  the values it names — the tiny model, the tiny images, a temporary output folder, 64 px, 6 steps, no install;
- Colab/Kaggle-only steps (Drive, upload, download) are guarded inside their cells by `ON_COLAB` / `ON_KAGGLE`, so
  every cell runs anywhere, and no cell uses `!` or `%` IPython magics.
"""

import json
import shutil
import sys
import types
from pathlib import Path

from PIL import Image
from safetensors import safe_open

from zimage_utils.images import IMAGE_EXTENSIONS

REPO_ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO_ROOT / "notebooks" / "zimage_lora_colab.ipynb"


def load_notebook() -> dict:
    return json.loads(NOTEBOOK.read_text(encoding="utf-8"))


def code_cells(notebook: dict) -> list[dict]:
    return [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]


def source(cell: dict) -> str:
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def is_parameters(cell: dict) -> bool:
    return "parameters" in cell.get("metadata", {}).get("tags", [])


def test_notebook_is_nbformat_4_without_stale_outputs():
    """Colab, Kaggle and Jupyter open it; it is committed without outputs (they would show another run's results)."""
    notebook = load_notebook()
    assert notebook["nbformat"] == 4
    assert {"cells", "metadata"} <= notebook.keys()
    assert notebook["metadata"]["kernelspec"]["language"] == "python"
    for cell in notebook["cells"]:
        assert cell["cell_type"] in {"markdown", "code"}
        assert isinstance(cell["source"], list | str)
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None, source(cell)[:80]


def test_notebook_has_one_parameters_cell_first_and_no_magics():
    """The settings a user edits are in one place, before anything runs; every cell is plain Python."""
    cells = code_cells(load_notebook())
    assert [is_parameters(cell) for cell in cells].count(True) == 1
    assert is_parameters(cells[0])
    for cell in cells:
        for line in source(cell).splitlines():
            assert not line.lstrip().startswith(("!", "%")), f"IPython magic in a code cell: {line}"
        compile(source(cell), "notebook cell", "exec")  # e.g. a Colab-only branch with a syntax error


def fake_ipython_display(shown: list[str]) -> dict[str, types.ModuleType]:
    """`IPython.display` as the notebook uses it (it is not installed here): records the files it would show."""
    display_module = types.ModuleType("IPython.display")
    display_module.Image = lambda filename: filename
    display_module.display = shown.append
    ipython = types.ModuleType("IPython")
    ipython.display = display_module
    return {"IPython": ipython, "IPython.display": display_module}


def test_notebook_runs_from_images_to_comfyui_lora(
    tiny_model_dir, tiny_data_dir, tiny_captioner_dir, tmp_path, monkeypatch
):
    """Run all on a machine that is neither Colab nor Kaggle: captions for the images without one, cache, 6 training
    steps with the low-memory preset (checkpointing, 8-bit AdamW, resumable checkpoints), samples shown, and both
    LoRA files written."""
    data = shutil.copytree(tiny_data_dir, tmp_path / "data")
    for name in ("shape_000.txt", "shape_005.txt"):
        (data / name).unlink()
    overrides = {
        "REPO_DIR": str(REPO_ROOT),
        "INSTALL": False,
        "MODEL": str(tiny_model_dir),
        "DATA_DIR": str(data),
        "CAPTION_MODEL": str(tiny_captioner_dir),
        "OUT": str(tmp_path / "out"),
        "RESOLUTION": 64,
        "STEPS": 6,
    }
    monkeypatch.delenv("KAGGLE_KERNEL_RUN_TYPE", raising=False)
    assert "google.colab" not in sys.modules
    monkeypatch.chdir(tmp_path)  # the notebook must not depend on being started in the repository
    shown: list[str] = []
    for name, module in fake_ipython_display(shown).items():
        monkeypatch.setitem(sys.modules, name, module)

    namespace: dict = {"__name__": "__main__"}
    for i, cell in enumerate(code_cells(load_notebook())):
        exec(compile(source(cell), f"{NOTEBOOK.name} code cell {i}", "exec"), namespace)
        if is_parameters(cell):
            assert set(overrides) <= namespace.keys(), "the parameters cell no longer defines these names"
            namespace.update(overrides)

    assert namespace["IMAGE_SUFFIXES"] == set(IMAGE_EXTENSIONS)  # the images it counts are those the scripts read
    assert all((data / f"shape_{i:03d}.txt").read_text().strip() for i in (0, 5))  # the captioner's
    assert (data / "shape_001.txt").read_text() == (tiny_data_dir / "shape_001.txt").read_text()  # kept
    lora_dir = tmp_path / "out" / "lora"
    assert (lora_dir / "pytorch_lora_weights.safetensors").is_file()
    with safe_open(lora_dir / "pytorch_lora_weights_comfyui.safetensors", "pt") as f:
        keys = list(f.keys())
    assert keys and all(key.startswith("diffusion_model.") for key in keys)
    # Resumable after a disconnect: the newest two checkpoints of a run that saves every 3 steps.
    assert sorted(p.name for p in lora_dir.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]

    samples = sorted((lora_dir / "samples").glob("step_*.png"))
    assert samples and str(samples[-1]) in shown
    sample = tmp_path / "out" / "sample.png"  # from generate.py with the LoRA
    assert shown[-1] == str(sample)
    with Image.open(sample) as image:
        assert image.size == (64, 64)
