"""lora_tools.py: a converted, resized or merged LoRA is what diffusers' own loading of the sources gives.

Each check loads the written files into a fresh tiny ZImagePipeline (the same base weights) and compares the
transformer's output, or the update diffusers fuses into a weight, with what the sources give when diffusers loads
them: at full rank the same to rounding; at a lower rank the update's best approximation, measured against singular
values computed here from the dense update.
"""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import ZImageTransformer2DModel
from PIL import Image
from safetensors.torch import save_file
from test_lora_io import fail_on_loader_warnings, spec_hash, stand_in_for_training, transformer_output
from test_model_loading import to_original_layout

import lora_tools
from zimage_utils import lora_edit
from zimage_utils.lora import add_lora, lora_target_modules
from zimage_utils.lora_edit import lora_factors, update_svd
from zimage_utils.lora_io import COMFYUI_WEIGHT_NAME, LORA_WEIGHT_NAME, load_lora_file, read_lora, save_lora
from zimage_utils.model_loading import load_transformer as load
from zimage_utils.model_spec import model_spec, thumbnail
from zimage_utils.tiny import TINY_TRANSFORMER, make_tiny_pipeline, save_tiny_pipeline

REPO = Path(__file__).resolve().parents[1]


def trained_lora(
    folder: Path, rank: int, alpha: float, targets: str, seed: int, adapter: str = "lora"
) -> torch.Tensor:
    """A non-zero LoRA saved as the trainer saves it; returns the output of the model that holds it."""
    transformer = make_tiny_pipeline(seed=0).transformer
    config = add_lora(transformer, rank=rank, alpha=alpha, targets=targets, adapter=adapter)
    stand_in_for_training(transformer, seed=seed)
    save_lora(folder, transformer, config, {"base_model": "tiny", "trigger_word": f"sks{seed}"})
    return transformer_output(transformer)


def tool(*argv) -> None:
    lora_tools.main(lora_tools.parse_args([str(a) for a in argv]))


def loaded(*loras: tuple[Path, float], weight_name: str | None = None):
    """A fresh tiny pipeline with these LoRAs at these strengths, loaded by diffusers (any warning fails)."""
    pipe = make_tiny_pipeline(seed=0)
    with fail_on_loader_warnings():
        for i, (path, _) in enumerate(loras):
            pipe.load_lora_weights(str(path), weight_name=weight_name, adapter_name=f"l{i}")
    pipe.set_adapters([f"l{i}" for i in range(len(loras))], [w for _, w in loras])
    return pipe


def transformer_with(path: Path):
    """A fresh tiny transformer with the LoRA at `path` loaded by diffusers."""
    return loaded((path, 1.0)).transformer


def fused_updates(path: Path) -> dict[str, torch.Tensor]:
    """{module: the update diffusers' fuse_lora adds to its weight}."""
    base = dict(make_tiny_pipeline(seed=0).transformer.named_parameters())
    pipe = loaded((path, 1.0))
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    fused = dict(pipe.transformer.named_parameters())
    modules = {
        k.removeprefix("transformer.").removesuffix(".lora_A.weight") for k in read_lora(str(path)) if "lora_A" in k
    }
    return {m: (fused[f"{m}.weight"] - base[f"{m}.weight"]).double() for m in modules}


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    """Two LoRAs the trainer could have written: rank 4 alpha 8 on attention, rank 8 alpha 2 on every Linear."""
    root = tmp_path_factory.mktemp("loras")
    outputs = {
        "attention": trained_lora(root / "attention", rank=4, alpha=8, targets="attention", seed=1),
        "all": trained_lora(root / "all", rank=8, alpha=2, targets="all", seed=2),
    }
    return root, outputs


def test_the_svd_from_the_factors_is_the_updates_svd():
    g = torch.Generator().manual_seed(0)
    up, down = torch.randn(40, 6, generator=g), torch.randn(6, 24, generator=g)
    u, s, vh = update_svd(up, down)
    dense = up.double() @ down.double()
    torch.testing.assert_close(s, torch.linalg.svdvals(dense)[:6])
    torch.testing.assert_close(u @ torch.diag(s) @ vh, dense)
    torch.testing.assert_close(u.T @ u, torch.eye(6, dtype=torch.float64))


def kohya_layout(comfyui_file: Path, path: Path) -> Path:
    """The ComfyUI file's LoRA in kohya's / musubi-tuner's layout: `lora_unet_layers_0_attention_to_q.lora_down.weight`,
    `.lora_up.weight` and `.alpha` (its scale alpha / rank, here 2 / 8)."""
    tensors, _ = load_lora_file(comfyui_file)
    renamed = {}
    for key, value in tensors.items():
        module, _, kind = key.removeprefix("diffusion_model.").rpartition(".lora_")
        if not module:  # "<module>.alpha"
            module, kind = key.removeprefix("diffusion_model.").removesuffix(".alpha"), "alpha"
        suffix = {"A.weight": ".lora_down.weight", "B.weight": ".lora_up.weight", "alpha": ".alpha"}[kind]
        renamed["lora_unet_" + module.replace(".", "_") + suffix] = value
    save_file(renamed, str(path))
    return path


@pytest.mark.parametrize("layout", ["comfyui", "kohya"])
def test_convert_writes_another_layout_as_our_two_files(loras, tmp_path, layout):
    """The source has alpha 2 ≠ rank 8 and unfolded weights, in ComfyUI/ai-toolkit's layout or kohya's."""
    root, outputs = loras
    source = root / "all" / COMFYUI_WEIGHT_NAME
    if layout == "kohya":
        source = kohya_layout(source, tmp_path / "kohya.safetensors")
    tool("convert", source, "--output_dir", tmp_path / "out")
    for name in (LORA_WEIGHT_NAME, COMFYUI_WEIGHT_NAME):
        pipe = loaded((tmp_path / "out", 1.0), weight_name=name)
        torch.testing.assert_close(transformer_output(pipe.transformer), outputs["all"], rtol=0, atol=1e-5)
    state, metadata = load_lora_file(tmp_path / "out" / LORA_WEIGHT_NAME)
    assert len(state) == 2 * 31 and metadata["rank"] == "8" and metadata["lora_tools"].startswith("convert")
    assert metadata.get("trigger_word") == ("sks2" if layout == "comfyui" else None)  # (kohya's file: none written)


def test_resize_at_full_rank_changes_nothing_and_to_a_lower_rank_keeps_the_best_part(loras, tmp_path, capsys):
    root, outputs = loras
    tool("resize", root / "all", "--rank", 8, "--output_dir", tmp_path / "full")
    pipe = loaded((tmp_path / "full", 1.0))
    torch.testing.assert_close(transformer_output(pipe.transformer), outputs["all"], rtol=0, atol=1e-5)

    tool("resize", root / "all", "--rank", 3, "--output_dir", tmp_path / "r3", "--save_dtype", "fp32")
    assert "rank 8 → 3" in capsys.readouterr().out
    state, _ = load_lora_file(tmp_path / "r3" / LORA_WEIGHT_NAME)
    assert {v.shape[0] for k, v in state.items() if "lora_A" in k} == {3}
    source, resized = fused_updates(root / "all"), fused_updates(tmp_path / "r3")
    assert set(resized) == set(source) and len(source) == 31
    for module, update in source.items():
        s = torch.linalg.svdvals(update)
        # Eckart-Young: the best rank-3 update misses exactly the other singular values
        lost = torch.linalg.matrix_norm(resized[module] - update)
        torch.testing.assert_close(lost, s[3:].square().sum().sqrt(), rtol=1e-4, atol=1e-6)
        assert torch.linalg.matrix_rank(resized[module], atol=1e-5) <= 3
    comfy = loaded((tmp_path / "r3", 1.0), weight_name=COMFYUI_WEIGHT_NAME)
    torch.testing.assert_close(
        transformer_output(comfy.transformer), transformer_output(transformer_with(tmp_path / "r3"))
    )


def test_keep_gives_each_module_the_fewest_ranks_that_keep_that_much(tmp_path, capsys):
    """Modules whose updates' spectra differ get different ranks; diffusers builds each at its own rank (the file's
    rank_pattern) and the ComfyUI file's alphas agree."""
    transformer = make_tiny_pipeline(seed=0).transformer
    config = add_lora(transformer, rank=8, alpha=8, targets="all")
    stand_in_for_training(transformer, seed=3)
    with torch.no_grad():  # spectra from flat to steep: column j of B scaled by decay^j
        for i, param in enumerate(p for n, p in transformer.named_parameters() if ".lora_B." in n):
            param.mul_(torch.tensor([(0.2 + 0.1 * (i % 8)) ** j for j in range(8)]))
    save_lora(tmp_path / "src", transformer, config, {})
    tool("resize", tmp_path / "src", "--keep", 0.9, "--output_dir", tmp_path / "out")
    assert "update norm kept" in capsys.readouterr().out
    state, _ = load_lora_file(tmp_path / "out" / LORA_WEIGHT_NAME)
    ranks = {
        k.removeprefix("transformer.").removesuffix(".lora_A.weight"): v.shape[0]
        for k, v in state.items()
        if "lora_A" in k
    }
    assert len(set(ranks.values())) > 2
    source, resized = fused_updates(tmp_path / "src"), fused_updates(tmp_path / "out")
    for module, update in source.items():
        s = torch.linalg.svdvals(update)
        norm, k = s.square().sum().sqrt(), ranks[module]
        assert torch.linalg.matrix_norm(resized[module]) >= 0.9 * norm * (1 - 1e-6)
        assert s[: k - 1].square().sum().sqrt() < 0.9 * norm  # one rank fewer would keep too little
    comfy = loaded((tmp_path / "out", 1.0), weight_name=COMFYUI_WEIGHT_NAME)
    torch.testing.assert_close(
        transformer_output(comfy.transformer), transformer_output(transformer_with(tmp_path / "out"))
    )


def test_merge_equals_diffusers_with_both_adapters_at_their_weights(loras, tmp_path, capsys):
    """Weights 0.7 and -0.4; attention modules get rank 4 + 8, the FFN and the rest only the second LoRA's 8."""
    root, _ = loras
    tool("merge", f"{root / 'attention'}:0.7", f"{root / 'all'}:-0.4", "--output_dir", tmp_path / "m")
    both = loaded((root / "attention", 0.7), (root / "all", -0.4))
    expected = transformer_output(both.transformer)
    assert (expected - transformer_output(make_tiny_pipeline(seed=0).transformer)).abs().max() > 1e-2
    for name in (LORA_WEIGHT_NAME, COMFYUI_WEIGHT_NAME):
        merged = loaded((tmp_path / "m", 1.0), weight_name=name)
        torch.testing.assert_close(transformer_output(merged.transformer), expected, rtol=0, atol=1e-5)
    state, metadata = load_lora_file(tmp_path / "m" / LORA_WEIGHT_NAME)
    ranks = {v.shape[0] for k, v in state.items() if "lora_A" in k}
    assert ranks == {12, 8} and metadata["rank"] == "8-12" and metadata["base_model"] == "tiny"
    assert "trigger_word" not in metadata  # the two LoRAs' differ: neither is the merge's
    assert "different base models" not in capsys.readouterr().out  # (both name "tiny")
    tensors, named = load_lora_file(root / "attention" / LORA_WEIGHT_NAME)
    save_file(tensors, str(tmp_path / "other.safetensors"), metadata={**named, "base_model": "other"})
    tool("merge", tmp_path / "other.safetensors", root / "all", "--output_dir", tmp_path / "m_other")
    assert "note: the LoRAs were trained on different base models (other, tiny)" in capsys.readouterr().out
    # the sum shrunk to rank 4 is the best rank-4 part of the merged update
    tool("merge", f"{root / 'attention'}:0.7", f"{root / 'all'}:-0.4", "--rank", 4, "--output_dir", tmp_path / "m4")
    exact, small = fused_updates(tmp_path / "m"), fused_updates(tmp_path / "m4")
    for module, update in exact.items():
        lost = torch.linalg.matrix_norm(small[module] - update)
        torch.testing.assert_close(lost, torch.linalg.svdvals(update)[4:].square().sum().sqrt(), rtol=1e-4, atol=1e-6)


def test_mistakes_are_refused_before_anything_is_written(loras, tmp_path):
    root, _ = loras
    trained_lora(tmp_path / "lokr", rank=4, alpha=4, targets="attention", seed=1, adapter="lokr")
    with pytest.raises(ValueError, match=r"lokr.*LoKr"):
        tool("resize", tmp_path / "lokr", "--rank", 2, "--output_dir", tmp_path / "out")
    with pytest.raises(ValueError, match="already holds pytorch_lora_weights.safetensors.*--overwrite"):
        tool("resize", root / "all", "--rank", 2, "--output_dir", root / "attention")
    assert not (tmp_path / "out").exists()
    with pytest.raises(FileNotFoundError, match="missing"):
        tool("merge", root / "all", tmp_path / "missing", "--output_dir", tmp_path / "out")
    (tmp_path / "empty.safetensors").write_bytes(b"")  # (a copy cut off at 0 bytes)
    with pytest.raises(ValueError, match="empty.safetensors could not be read"):
        tool("show", tmp_path / "empty.safetensors")
    with pytest.raises(ValueError, match="merge .*:half: write PATH or PATH:STRENGTH with a number"):
        tool("merge", root / "all", f"{root / 'attention'}:half", "--output_dir", tmp_path / "out")
    for argv in (["resize", root / "all"], ["merge", root / "all"], ["resize", root / "all", "--keep", 1.5]):
        with pytest.raises(SystemExit):
            tool(*argv, "--output_dir", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    lora_factors(read_lora(str(root / "all")), "all")  # (the source itself is a plain LoRA)


def test_the_script_runs_from_the_command_line(loras, tmp_path):
    root, _ = loras
    argv = [sys.executable, "lora_tools.py", "resize", str(root / "all"), "--rank", "2", "--save_dtype", "bf16"]
    done = subprocess.run(argv + ["--output_dir", str(tmp_path)], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "rank 8 → 2" in done.stdout and "bfloat16" in done.stdout
    state, _ = load_lora_file(tmp_path / LORA_WEIGHT_NAME)
    assert {v.dtype for v in state.values()} == {torch.bfloat16}


def test_show_names_the_layout_the_modules_and_the_rank_each_needs(loras, tmp_path, capsys):
    root, _ = loras
    tool("show", root / "all")
    text = capsys.readouterr().out
    assert "LoRA, 31 modules, float32" in text and "layout: diffusers" in text and "trigger_word: sks2" in text
    assert "  rank: 8\n" in text and "attention" in text and "feed-forward" in text
    needed = []  # the fewest singular values of each dense update that keep 95% of its norm, counted here
    for update in fused_updates(root / "all").values():
        s = torch.linalg.svdvals(update)
        needed.append(next(k for k in range(1, 9) if s[:k].square().sum().sqrt() >= 0.95 * s.square().sum().sqrt()))
    needed.sort()
    assert f"keep 95% of each update: median {needed[len(needed) // 2]}, most {needed[-1]} " in text

    tool("show", kohya_layout(root / "all" / COMFYUI_WEIGHT_NAME, tmp_path / "kohya.safetensors"))
    assert "layout: kohya" in capsys.readouterr().out
    trained_lora(tmp_path / "lokr", rank=4, alpha=4, targets="attention", seed=1, adapter="lokr")
    tool("show", tmp_path / "lokr")
    text = capsys.readouterr().out
    assert "LoKr, 16 modules" in text and "rank needed" not in text and "adapter: lokr" in text


def test_written_files_carry_the_model_spec_and_show_checks_its_hash(loras, tmp_path, capsys):
    """A converted LoRA keeps its title and trigger phrase; a merge is titled for its folder and names its sources;
    every file's hash is its tensors', and `show` tells a file damaged after writing."""
    root, _ = loras
    tensors, metadata = load_lora_file(root / "attention" / LORA_WEIGHT_NAME)
    (tmp_path / "titled").mkdir()
    spec = model_spec("sks style", trigger_phrase="sks") | {"modelspec.hash_sha256": "0xstale"}
    spec["modelspec.thumbnail"] = thumbnail(Image.new("RGB", (300, 200), "red"))
    save_file(tensors, str(tmp_path / "titled" / LORA_WEIGHT_NAME), metadata=metadata | spec)
    tool("convert", tmp_path / "titled", "--output_dir", tmp_path / "c")
    tool("merge", f"{tmp_path / 'titled'}:0.5", root / "all", "--output_dir", tmp_path / "m")
    for folder, title, trigger, merged_from in [("c", "sks style", "sks", None), ("m", "m", None, "sks style, all")]:
        for name in (LORA_WEIGHT_NAME, COMFYUI_WEIGHT_NAME):
            _, written = load_lora_file(tmp_path / folder / name)
            assert written["modelspec.architecture"] == "z-image/lora" and written["modelspec.title"] == title
            assert written.get("modelspec.trigger_phrase") == trigger  # (the merge's sources disagree: none)
            assert written.get("modelspec.merged_from") == merged_from
            assert written["modelspec.hash_sha256"] == spec_hash(tmp_path / folder / name)

    tool("show", tmp_path / "c")
    shown = capsys.readouterr().out
    assert "modelspec.hash_sha256: matches the tensors" in shown
    assert re.search(r"modelspec.thumbnail: data:image/jpeg \(\d\.\d kB\)\n", shown) and "base64" not in shown
    data = bytearray((tmp_path / "c" / LORA_WEIGHT_NAME).read_bytes())
    data[-4] ^= 1  # the lowest bit of the last float32: the file still loads, one weight differs by 1 ulp
    (tmp_path / "damaged.safetensors").write_bytes(data)
    tool("show", tmp_path / "damaged.safetensors")
    assert "modelspec.hash_sha256: does NOT match: the file is damaged" in capsys.readouterr().out


def test_extract_reports_the_part_of_a_large_difference_it_holds_to_float64_accuracy():
    """A 2048x1024 difference of rank 12 at --rank 8: the randomized SVD's top 8 values are the difference's own, and
    the fraction of its norm they hold is the exact one (a float32 norm of a matrix this size is ~1e-5 off)."""
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(2048, 12, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(1024, 12, generator=g, dtype=torch.float64))
    s = torch.logspace(0, -1, 12, dtype=torch.float64)
    difference = ((u * s) @ v.T).float()
    rng = torch.random.get_rng_state()
    factors, report = lora_edit.extract([("m", difference)], rank=8, keep=None)
    assert torch.equal(torch.random.get_rng_state(), rng)  # the caller's random numbers are left as they were
    again, _ = lora_edit.extract([("m", difference)], rank=8, keep=None)
    assert all(torch.equal(a, b) for a, b in zip(factors["m"], again["m"]))  # the same LoRA on every run
    exact = torch.linalg.svdvals(difference.double())
    assert report["m"][0] == 8 and factors["m"][0].shape == (2048, 8) and factors["m"][1].shape == (8, 1024)
    assert report["m"][1] == pytest.approx(float(exact[:8].norm() / exact.norm()), rel=1e-6)
    update = (factors["m"][0] @ factors["m"][1]).double()
    torch.testing.assert_close(
        torch.linalg.matrix_norm(update - difference.double()), exact[8:].norm(), rtol=1e-4, atol=0
    )


@pytest.fixture(scope="module")
def finetune(tmp_path_factory):
    """A stand-in fine-tune of the tiny model: every block Linear but the first moved by its own rank-3 difference.
    Saved as a model folder; returns (base folder, fine-tune folder, {module: difference}, its output)."""
    root = tmp_path_factory.mktemp("finetune")
    base = save_tiny_pipeline(root / "base")
    tuned = make_tiny_pipeline(seed=0)
    g = torch.Generator().manual_seed(7)
    differences = {}
    for module in lora_target_modules(tuned.transformer, "all")[1:]:
        weight = tuned.transformer.get_submodule(module).weight
        differences[module] = (
            0.05 * torch.randn(weight.shape[0], 3, generator=g) @ torch.randn(3, weight.shape[1], generator=g)
        )
        weight.data += differences[module]
    tuned.save_pretrained(root / "tuned", safe_serialization=True)
    return base, root / "tuned", differences, transformer_output(tuned.transformer)


def test_extract_recovers_a_fine_tunes_low_rank_differences_as_a_lora(finetune, tmp_path, capsys, monkeypatch):
    base, tuned, differences, tuned_output = finetune
    assert (tuned_output - transformer_output(make_tiny_pipeline(seed=0).transformer)).abs().max() > 1e-2
    loads = []  # one model in memory: the fine-tune; the base is read tensor by tensor from its files
    monkeypatch.setattr(
        lora_tools, "load_transformer", lambda path, *a, **k: loads.append(path) or load(path, *a, **k)
    )
    tool("extract", tuned, "--base", base, "--rank", 3, "--output_dir", tmp_path / "x")
    assert loads == [str(tuned)]
    out = capsys.readouterr().out
    assert "1 of the 31 targeted modules equal the base's: left out" in out and "other tensors" not in out
    for name in (LORA_WEIGHT_NAME, COMFYUI_WEIGHT_NAME):  # the base with the LoRA computes what the fine-tune does
        pipe = loaded((tmp_path / "x", 1.0), weight_name=name)
        torch.testing.assert_close(transformer_output(pipe.transformer), tuned_output, rtol=0, atol=1e-4)
    state, metadata = load_lora_file(tmp_path / "x" / LORA_WEIGHT_NAME)
    assert len(state) == 2 * 30 and metadata["rank"] == "3" and metadata["base_model"] == str(base)
    assert metadata["modelspec.title"] == "x" and metadata["lora_tools"].startswith("extract tuned --base")


def test_extract_from_a_single_file_keeps_each_differences_best_part_and_names_what_it_leaves_out(
    finetune, tmp_path, capsys
):
    """The fine-tune as one ComfyUI all-in-one file (the transformer in the original layout beside an fp8 text encoder),
    with a norm changed too. At rank 2 each update misses exactly the difference's third singular value; with --keep,
    each module gets the fewest values that keep that much."""
    base, tuned, differences, _ = finetune
    state = make_tiny_pipeline(seed=0).transformer.state_dict()
    for module, difference in differences.items():
        state[f"{module}.weight"] = state[f"{module}.weight"] + difference
    state["layers.1.attention_norm1.weight"] = state["layers.1.attention_norm1.weight"] * 1.1
    checkpoint = to_original_layout({k: v.contiguous() for k, v in state.items()}, prefix="model.diffusion_model.")
    checkpoint["text_encoders.qwen3_4b.norm.weight"] = torch.ones(16).to(torch.float8_e4m3fn)  # (not the model's)
    save_file(checkpoint, str(tmp_path / "ft.safetensors"))

    tool("extract", tmp_path / "ft.safetensors", "--base", base, "--rank", 2, "--output_dir", tmp_path / "r2")
    out = capsys.readouterr().out
    assert "note: 1 other tensors differ from the base (the most: layers.1.attention_norm1.weight, by 10.0%" in out
    updates = fused_updates(tmp_path / "r2")
    assert updates.keys() == differences.keys()
    for module, update in updates.items():
        third = torch.linalg.svdvals(differences[module].double())[2]
        torch.testing.assert_close(torch.linalg.matrix_norm(update - differences[module]), third, rtol=1e-3, atol=1e-6)

    tool("extract", tmp_path / "ft.safetensors", "--base", base, "--keep", 0.8, "--output_dir", tmp_path / "k")
    state, _ = load_lora_file(tmp_path / "k" / LORA_WEIGHT_NAME)
    for module, difference in differences.items():
        s = torch.linalg.svdvals(difference.double())
        fewest = next(k for k in range(1, 4) if s[:k].square().sum().sqrt() >= 0.8 * s.square().sum().sqrt())
        assert state[f"transformer.{module}.lora_A.weight"].shape[0] == fewest


def test_extract_refuses_fp8_checkpoints_a_model_of_another_shape_and_a_base_without_weights(finetune, tmp_path):
    base, tuned, _, _ = finetune
    save_file(
        {"layers.0.attention.qkv.weight": torch.zeros(96, 32, dtype=torch.float8_e4m3fn)},
        str(tmp_path / "f8.safetensors"),
    )
    with pytest.raises(ValueError, match="stores fp8 weights: extract from the bf16 or fp16 release"):
        tool("extract", tmp_path / "f8.safetensors", "--base", base, "--rank", 4, "--output_dir", tmp_path / "o")
    other = shutil.copytree(base, tmp_path / "three_layers")
    ZImageTransformer2DModel(**{**TINY_TRANSFORMER, "n_layers": 3}).save_pretrained(other / "transformer")
    with pytest.raises(
        ValueError, match="three_layers is not shaped as .* give as --base the model it was fine-tuned"
    ):
        tool("extract", other, "--base", base, "--rank", 4, "--output_dir", tmp_path / "o")
    no_weights = shutil.copytree(base, tmp_path / "no_weights")
    for file in (no_weights / "transformer").glob("*.safetensors"):
        file.unlink()
    with pytest.raises(ValueError, match="no_weights holds no safetensors transformer weights"):
        tool("extract", tuned, "--base", no_weights, "--rank", 4, "--output_dir", tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_the_metadata_flags_rewrite_what_a_lora_says_about_itself(loras, tmp_path):
    """convert as a metadata editor: a third-party LoRA given a title, trigger, author, description and licence."""
    root, _ = loras
    flags = {"title": "Ink", "author": "jo", "description": "Pen-and-ink line art.", "license": "mit"}
    argv = [a for k, v in flags.items() for a in (f"--metadata_{k}", v)] + ["--trigger", "ohwx ink"]
    tool("convert", root / "all" / COMFYUI_WEIGHT_NAME, "--output_dir", tmp_path / "c", *argv)
    for name in (LORA_WEIGHT_NAME, COMFYUI_WEIGHT_NAME):
        _, written = load_lora_file(tmp_path / "c" / name)
        assert {k: written[f"modelspec.{k}"] for k in flags} == flags
        assert written["modelspec.trigger_phrase"] == written["trigger_word"] == "ohwx ink"  # (the source's: sks2)
        assert written["modelspec.hash_sha256"] == spec_hash(tmp_path / "c" / name)


def test_a_new_trigger_and_a_new_rank_reach_the_usage_hint_and_the_description(tmp_path):
    """(the trainer's spec names the trigger in its usage hint and the rank in its description)"""
    transformer = make_tiny_pipeline(seed=0).transformer
    config = add_lora(transformer, rank=4, alpha=4, targets="attention")
    stand_in_for_training(transformer, seed=1)
    spec = model_spec("x", trigger_phrase="sks", usage_hint="8 steps, no CFG; start the prompt with 'sks'",
                      description="Z-Image LoRA (rank 4, attention) for tiny.")  # fmt: skip
    save_lora(tmp_path / "a", transformer, config, {"trigger_word": "sks", **spec})
    tool("resize", tmp_path / "a", "--rank", 2, "--trigger", "ohwx", "--output_dir", tmp_path / "b")
    _, written = load_lora_file(tmp_path / "b" / LORA_WEIGHT_NAME)
    assert written["modelspec.usage_hint"] == "8 steps, no CFG; start the prompt with 'ohwx'"
    assert written["modelspec.description"] == "Z-Image LoRA (rank 2, attention) for tiny."
