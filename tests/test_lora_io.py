"""LoRA files: what we save is what diffusers (and ComfyUI's layout, through diffusers' converter) loads back.

Every check is train-free: the adapter gets random non-zero weights, is saved, and a FRESH tiny pipeline (same
seed, so the same base weights) loads the file; its transformer must then compute what the trained PEFT model
computed. Tolerance: fp32 throughout, so outputs agree to rounding (atol 1e-5 on outputs of magnitude ~1; the
LoRA itself moves them by > 1e-2, so a missing or mis-scaled adapter cannot pass).
"""

import contextlib
import copy
import hashlib
import json
import logging
import os
import warnings

import pytest
import safetensors.torch
import torch
from diffusers import ZImagePipeline
from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY

from zimage_utils import lora_io
from zimage_utils.lora import add_lora
from zimage_utils.lora_io import (
    COMFYUI_WEIGHT_NAME,
    LORA_WEIGHT_NAME,
    get_lora_state_dict,
    load_lora_file,
    read_lora,
    save_lora,
    to_comfyui,
)
from zimage_utils.tiny import make_tiny_pipeline

METADATA = {
    "base_model": "tiny-z-image",
    "rank": "4",
    "alpha": "8",
    "targets": "all",
    "steps": "0",
    "resolution": "64",
    "trigger_word": "sks",
}
# (rank, alpha, targets, exclude_refiners): alpha = rank; alpha = 2·rank (the "only works at strength 2" case);
# alpha < rank/2 (diffusers' ComfyUI converter then splits the scale between lora_A and lora_B).
CASES = [(4, 4, "attention", False), (4, 8, "all", False), (8, 2, "attention_ffn", True)]


def spec_hash(path) -> str:
    """The SAI model spec's hash_sha256 of a safetensors file, computed here from its bytes: SHA-256 of all that
    follows the header (8 bytes of header length, then the header)."""
    data = open(path, "rb").read()
    return "0x" + hashlib.sha256(data[8 + int.from_bytes(data[:8], "little") :]).hexdigest()


@contextlib.contextmanager
def fail_on_loader_warnings():
    """Turn any warning diffusers or PEFT emits while loading (unexpected / missing keys, ...) into a failure."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(level=logging.WARNING)
    handler.emit = records.append
    # diffusers' root logger does not propagate, so pytest's caplog would not see it.
    loggers = [logging.getLogger("diffusers"), logging.getLogger("peft")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    messages = [r.getMessage() for r in records] + [
        str(w.message) for w in caught if "lora" in str(w.message).lower() or "key" in str(w.message).lower()
    ]
    assert not messages, f"loading the LoRA logged: {messages}"


def stand_in_for_training(transformer: torch.nn.Module, seed: int) -> None:
    """Random values (× 0.3) in the adapter factors that start at zero (LoRA's B, LoKr's w1), as training would
    leave them, so that the adapter changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if ".lora_B." in name or ".lokr_w1." in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.3)


def transformer_output(transformer: torch.nn.Module) -> torch.Tensor:
    """The transformer on fixed inputs: 2 latents [16, 1, 4, 4], captions of different lengths (masking on)."""
    g = torch.Generator().manual_seed(123)
    x = [torch.randn(16, 1, 4, 4, generator=g) for _ in range(2)]
    cap_feats = [torch.randn(5, 16, generator=g), torch.randn(9, 16, generator=g)]
    t = torch.tensor([0.3, 0.8])
    with torch.no_grad():
        out = transformer(x, t, cap_feats, return_dict=False)[0]
    return torch.stack(out)


def lora_delta(state_dict: dict[str, torch.Tensor], module: str, prefix: str = "transformer.") -> torch.Tensor:
    """The weight update B @ A [out, in] a loader with alpha = rank applies to `module`."""
    return state_dict[f"{prefix}{module}.lora_B.weight"] @ state_dict[f"{prefix}{module}.lora_A.weight"]


@pytest.fixture(scope="module")
def base_output():
    return transformer_output(make_tiny_pipeline(seed=0).transformer)


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"r{c[0]}-a{c[1]}-{c[2]}")
def saved(request, tmp_path_factory):
    """A tiny transformer with a non-zero LoRA, its output, and the files save_lora wrote."""
    rank, alpha, targets, exclude_refiners = request.param
    transformer = make_tiny_pipeline(seed=0).transformer
    config = add_lora(transformer, rank=rank, alpha=alpha, targets=targets, exclude_refiners=exclude_refiners)
    stand_in_for_training(transformer, seed=1)
    output_dir = tmp_path_factory.mktemp("lora")
    paths = save_lora(output_dir, transformer, config, METADATA)
    return {
        "dir": output_dir,
        "paths": paths,
        "rank": rank,
        "alpha": alpha,
        "raw": {k: v.clone() for k, v in get_lora_state_dict(transformer).items()},
        "output": transformer_output(transformer),
        "peft_model": transformer,
    }


def test_files_written_atomically_with_readable_metadata(saved):
    assert sorted(p.name for p in saved["dir"].iterdir()) == sorted([LORA_WEIGHT_NAME, COMFYUI_WEIGHT_NAME])
    for fmt, path in saved["paths"].items():
        tensors, metadata = load_lora_file(path)
        assert metadata["lora_format"] == fmt
        assert {k: metadata[k] for k in METADATA} == METADATA
        assert all(v.is_contiguous() for v in tensors.values())
        assert all(v.dtype == torch.float32 for v in tensors.values())
    _, metadata = load_lora_file(saved["paths"]["diffusers"])
    adapter = json.loads(metadata[LORA_ADAPTER_METADATA_KEY])
    assert adapter["transformer.r"] == saved["rank"]
    assert adapter["transformer.lora_alpha"] == saved["rank"]  # alpha is folded into the weights


def test_files_get_the_permissions_the_umask_gives_not_safetensors_own_0600(tmp_path):
    from zimage_utils.lora_io import save_safetensors_atomic

    previous = os.umask(0o022)
    try:
        save_safetensors_atomic({"w": torch.zeros(2)}, tmp_path / "a.safetensors")
    finally:
        os.umask(previous)
    assert (tmp_path / "a.safetensors").stat().st_mode & 0o777 == 0o644  # others can read a LoRA meant for sharing


def test_key_names(saved):
    diffusers_sd, _ = load_lora_file(saved["paths"]["diffusers"])
    comfy_sd, _ = load_lora_file(saved["paths"]["comfyui"])
    modules = {k.removeprefix("transformer.").rsplit(".lora_", 1)[0] for k in diffusers_sd}
    assert set(diffusers_sd) == {f"transformer.{m}.lora_{ab}.weight" for m in modules for ab in "AB"}
    assert set(comfy_sd) == {f"diffusion_model.{m}.lora_{ab}.weight" for m in modules for ab in "AB"} | {
        f"diffusion_model.{m}.alpha" for m in modules
    }
    assert all(comfy_sd[f"diffusion_model.{m}.alpha"].item() == saved["alpha"] for m in modules)
    assert "layers.0.attention.to_out.0" in modules


def test_diffusers_file_loads_cleanly_and_reproduces_the_trained_output(saved, base_output):
    pipe = make_tiny_pipeline(seed=0)
    with fail_on_loader_warnings():
        pipe.load_lora_weights(saved["dir"])  # finds pytorch_lora_weights.safetensors
    assert pipe.get_list_adapters() == {"transformer": ["default_0"]}
    # Every saved module got a LoRA layer, and nothing else did.
    saved_modules = {k.removeprefix("transformer.").rsplit(".lora_", 1)[0] for k in saved["raw"]}
    loaded_modules = {n.rsplit(".lora_A", 1)[0] for n, _ in pipe.transformer.named_modules() if n.endswith("lora_A")}
    assert loaded_modules == saved_modules

    output = transformer_output(pipe.transformer)
    assert (saved["output"] - base_output).abs().max() > 1e-2  # the adapter really changes the output
    torch.testing.assert_close(output, saved["output"], rtol=0, atol=1e-5)


def test_comfyui_file_converts_to_the_same_update_and_output(saved):
    converted = ZImagePipeline.lora_state_dict(str(saved["paths"]["comfyui"]))
    diffusers_sd, _ = load_lora_file(saved["paths"]["diffusers"])
    assert set(converted) == set(diffusers_sd)
    for key in diffusers_sd:
        if key.endswith(".lora_A.weight"):
            module = key.removeprefix("transformer.").removesuffix(".lora_A.weight")
            expected = saved["alpha"] / saved["rank"] * lora_delta(saved["raw"], module)
            torch.testing.assert_close(lora_delta(converted, module), expected)
            torch.testing.assert_close(lora_delta(diffusers_sd, module), expected)

    pipe = make_tiny_pipeline(seed=0)
    with fail_on_loader_warnings():
        pipe.load_lora_weights(saved["dir"], weight_name=COMFYUI_WEIGHT_NAME)
    torch.testing.assert_close(transformer_output(pipe.transformer), saved["output"], rtol=0, atol=1e-5)


def test_why_alpha_is_folded(saved, tmp_path):
    """Unfolded weights without an alpha are read as alpha = rank: off by alpha / rank ("needs strength 2")."""
    safetensors.torch.save_file(saved["raw"], tmp_path / "unfolded.safetensors")
    pipe = make_tiny_pipeline(seed=0)
    pipe.load_lora_weights(tmp_path, weight_name="unfolded.safetensors")
    mismatch = (transformer_output(pipe.transformer) - saved["output"]).abs().max()
    assert (mismatch > 1e-2) == (saved["alpha"] != saved["rank"])
    pipe.set_adapters(["default_0"], [saved["alpha"] / saved["rank"]])  # the "strength" users end up dialling in
    torch.testing.assert_close(transformer_output(pipe.transformer), saved["output"], rtol=0, atol=1e-5)


def test_to_comfyui_renames_and_adds_alpha():
    sd = {"transformer.layers.0.attention.to_q.lora_A.weight": torch.ones(2, 3)}
    sd["transformer.layers.0.attention.to_q.lora_B.weight"] = torch.ones(3, 2)
    out = to_comfyui(sd, alpha=16)
    assert set(out) == {
        "diffusion_model.layers.0.attention.to_q.lora_A.weight",
        "diffusion_model.layers.0.attention.to_q.lora_B.weight",
        "diffusion_model.layers.0.attention.to_q.alpha",
    }
    assert out["diffusion_model.layers.0.attention.to_q.alpha"].ndim == 0


def test_bf16_files_load_too(saved, tmp_path):
    config = saved["peft_model"].peft_config["default"]
    paths = save_lora(tmp_path, saved["peft_model"], config, METADATA, formats=["diffusers"], dtype=torch.bfloat16)
    tensors, _ = load_lora_file(paths["diffusers"])
    assert {v.dtype for v in tensors.values()} == {torch.bfloat16}
    pipe = make_tiny_pipeline(seed=0)
    with fail_on_loader_warnings():
        pipe.load_lora_weights(tmp_path)
    torch.testing.assert_close(transformer_output(pipe.transformer), saved["output"], rtol=0.02, atol=0.02)


def test_a_failed_save_leaves_the_previous_file_intact(saved, tmp_path, monkeypatch):
    config = saved["peft_model"].peft_config["default"]
    first = save_lora(tmp_path, saved["peft_model"], config, {"steps": "100"}, formats=["diffusers"])["diffusers"]
    real_save_file = safetensors.torch.save_file

    def disk_full(tensors, filename, metadata=None):
        real_save_file(dict(list(tensors.items())[:1]), filename, metadata=metadata)  # a partial write...
        raise OSError("No space left on device")  # ...then the failure

    monkeypatch.setattr(lora_io.safetensors.torch, "save_file", disk_full)
    with pytest.raises(OSError, match="No space"):
        save_lora(tmp_path, saved["peft_model"], config, {"steps": "200"}, formats=["diffusers"])
    assert [p.name for p in tmp_path.iterdir()] == [LORA_WEIGHT_NAME]  # no temp file left behind
    tensors, metadata = load_lora_file(first)
    assert metadata["steps"] == "100" and len(tensors) == len(saved["raw"])


def test_user_errors_name_the_problem(saved, tmp_path):
    config = saved["peft_model"].peft_config["default"]
    with pytest.raises(TypeError, match="steps"):
        save_lora(tmp_path, saved["peft_model"], config, {"steps": 100})
    with pytest.raises(ValueError, match="kohya"):
        save_lora(tmp_path, saved["peft_model"], config, {}, formats=["kohya"])
    with pytest.raises(ValueError, match="add_lora"):
        get_lora_state_dict(copy.deepcopy(make_tiny_pipeline(seed=0).transformer))
    with pytest.raises(ValueError, match="safetensors"):
        load_lora_file(tmp_path / "lora.bin")
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_lora_file(tmp_path / "missing.safetensors")


# ---------------------------------------------------------------------------------------------------------------
# LoKr (--adapter lokr): the same promise, with ai-toolkit's Z-Image LoKr layout for ComfyUI
# ---------------------------------------------------------------------------------------------------------------

# (rank, alpha, factor): every w2 a full matrix (rank >= half its side) with PEFT's scale alpha / r = 0.5 to bake
# in; every w2 rank-decomposed (w2_a @ w2_b) with scale 3.
LOKR_CASES = [(64, 32, 4), (2, 6, 4)]


@pytest.fixture(scope="module", params=LOKR_CASES, ids=lambda c: f"lokr-r{c[0]}-a{c[1]}-f{c[2]}")
def saved_lokr(request, tmp_path_factory):
    rank, alpha, factor = request.param
    transformer = make_tiny_pipeline(seed=0).transformer
    config = add_lora(transformer, rank=rank, alpha=alpha, targets="all", adapter="lokr", lokr_factor=factor)
    stand_in_for_training(transformer, seed=1)
    output_dir = tmp_path_factory.mktemp("lokr")
    paths = save_lora(output_dir, transformer, config, METADATA)
    output = transformer_output(transformer)
    with torch.no_grad():  # the update is linear in w1: halving it is the adapter at strength 0.5
        for name, param in transformer.named_parameters():
            if ".lokr_w1." in name:
                param.mul_(0.5)
    return {"dir": output_dir, "paths": paths, "rank": rank, "output": output, "half": transformer_output(transformer)}


def test_lokr_files_load_in_diffusers_and_reproduce_the_trained_output(saved_lokr, base_output):
    diffusers_sd, metadata = load_lora_file(saved_lokr["paths"]["diffusers"])
    decomposed = any(k.endswith(".lokr_w2_a") for k in diffusers_sd)
    assert decomposed == (saved_lokr["rank"] == 2) and metadata["adapter"] == "lokr"
    assert decomposed == all(k.endswith(("_a", "_b")) for k in diffusers_sd if ".lokr_w2" in k)
    modules = {k.removeprefix("transformer.").rsplit(".lokr_", 1)[0] for k in diffusers_sd}
    assert len(modules) == 31  # every block Linear, refiners included
    for source in (saved_lokr["dir"], saved_lokr["paths"]["comfyui"]):
        pipe = make_tiny_pipeline(seed=0)
        with fail_on_loader_warnings():
            pipe.load_lora_weights(str(source))
        assert (saved_lokr["output"] - base_output).abs().max() > 1e-2  # the adapter really changes the output
        torch.testing.assert_close(transformer_output(pipe.transformer), saved_lokr["output"], rtol=0, atol=1e-5)
    pipe.set_adapters(pipe.get_list_adapters()["transformer"], [0.5])  # a strength, as generate.py --lora PATH:0.5
    torch.testing.assert_close(transformer_output(pipe.transformer), saved_lokr["half"], rtol=0, atol=1e-5)


def test_lokr_comfyui_file_is_ai_toolkits_layout(saved_lokr):
    comfy_sd, _ = load_lora_file(saved_lokr["paths"]["comfyui"])
    diffusers_sd, _ = load_lora_file(saved_lokr["paths"]["diffusers"])
    assert {k for k in comfy_sd if not k.endswith(".alpha")} == {
        "diffusion_model." + k.removeprefix("transformer.") for k in diffusers_sd
    }
    alphas = {k: v for k, v in comfy_sd.items() if k.endswith(".alpha")}
    # An alpha only where w2 is decomposed, equal to its rank: LyCORIS loaders then scale by 1, as diffusers does
    assert all(v.item() == saved_lokr["rank"] for v in alphas.values())
    assert len(alphas) == (31 if saved_lokr["rank"] == 2 else 0)


# ---------------------------------------------------------------------------------------------------------------
# DoRA (--adapter dora): norms in diffusers' layout, and ComfyUI's `dora_scale` fitted to ComfyUI's arithmetic
# ---------------------------------------------------------------------------------------------------------------


def comfyui_dora_weight(weight, up, down, alpha, dora_scale) -> torch.Tensor:
    """A DoRA module's weight as ComfyUI computes it at strength 1, in float32: `weight_decompose` in
    comfy/weight_adapter/base.py, its branch for a scale with one value per output row, as read from its code. The
    adapted weight W + (alpha / r)·BA is multiplied by dora_scale over the BASE weight's row norms."""
    weight = weight.float()
    adapted = weight + (up.float() @ down.float()) * (alpha / down.shape[0])
    return adapted * (dora_scale.float() / (weight.norm(dim=1, keepdim=True) + torch.finfo(torch.float32).eps))


def dora_modules(transformer: torch.nn.Module) -> list[str]:
    return [n for n, m in transformer.named_modules() if "default" in getattr(m, "lora_magnitude_vector", {})]


@pytest.fixture(scope="module")
def saved_dora(tmp_path_factory):
    """A tiny transformer with a trained-looking DoRA (rank 4, alpha 8, every block Linear), its files, its output,
    and each module's base weight and the weight PEFT merges from the DoRA."""
    transformer = make_tiny_pipeline(seed=0).transformer
    config = add_lora(transformer, rank=4, alpha=8, targets="all", adapter="dora")
    stand_in_for_training(transformer, seed=1)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # norms away from the adapted weights' own, as training leaves them
        for name, param in transformer.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(1 + 0.2 * torch.randn(param.shape, generator=g))
    output_dir = tmp_path_factory.mktemp("dora")
    paths = save_lora(output_dir, transformer, config, METADATA)
    merged = copy.deepcopy(transformer)
    modules = dora_modules(transformer)
    for name in modules:
        merged.get_submodule(name).merge()
    weights = {name: merged.get_submodule(name).base_layer.weight for name in modules}
    base = {name: transformer.get_submodule(name).base_layer.weight for name in modules}
    return {
        "dir": output_dir,
        "paths": paths,
        "output": transformer_output(transformer),
        "merged": weights,
        "base": base,
    }


def test_dora_diffusers_file_loads_as_a_dora_and_reproduces_the_trained_output(saved_dora, base_output):
    diffusers_sd, metadata = load_lora_file(saved_dora["paths"]["diffusers"])
    norms = [k for k in diffusers_sd if k.endswith(".lora_magnitude_vector")]
    assert metadata["adapter"] == "dora" and len(norms) == len(saved_dora["merged"]) == 31
    pipe = make_tiny_pipeline(seed=0)
    with fail_on_loader_warnings():
        pipe.load_lora_weights(str(saved_dora["dir"]))
    assert pipe.transformer.peft_config["default_0"].use_dora
    assert (saved_dora["output"] - base_output).abs().max() > 1e-2
    torch.testing.assert_close(transformer_output(pipe.transformer), saved_dora["output"], rtol=0, atol=1e-5)


def test_dora_comfyui_file_gives_comfyuis_arithmetic_the_trained_weights(saved_dora):
    comfy_sd, _ = load_lora_file(saved_dora["paths"]["comfyui"])
    diffusers_sd, _ = load_lora_file(saved_dora["paths"]["diffusers"])
    assert not any("magnitude" in k for k in comfy_sd)
    for name, merged in saved_dora["merged"].items():
        key = f"diffusion_model.{name}"
        scale = comfy_sd[f"{key}.dora_scale"]
        assert scale.shape == (merged.shape[0], 1)
        up, down, alpha = comfy_sd[f"{key}.lora_B.weight"], comfy_sd[f"{key}.lora_A.weight"], comfy_sd[f"{key}.alpha"]
        got = comfyui_dora_weight(saved_dora["base"][name], up, down, alpha.item(), scale)
        torch.testing.assert_close(got, merged.float(), rtol=1e-5, atol=1e-6)
        # (the trained norms themselves would not do: ComfyUI divides by the base weight's norms, not the adapted's)
        norms = diffusers_sd[f"transformer.{name}.lora_magnitude_vector"].unsqueeze(1)
        plain = comfyui_dora_weight(saved_dora["base"][name], up, down, alpha.item(), norms)
        assert not torch.allclose(plain, merged.float(), rtol=1e-3)


def test_a_dora_is_read_only_from_its_diffusers_file_and_not_edited(saved_dora):
    from zimage_utils.lora_edit import lora_factors

    with pytest.raises(ValueError, match="DoRA in ComfyUI's layout.*pytorch_lora_weights.safetensors"):
        read_lora(str(saved_dora["paths"]["comfyui"]))
    state = read_lora(str(saved_dora["dir"]))
    assert sum(k.endswith(".lora_magnitude_vector") for k in state) == 31
    with pytest.raises(ValueError, match="is a DoRA .*only LoRA files"):
        lora_factors(state, "dora.safetensors")
    import lora_tools

    shown = lora_tools.describe(str(saved_dora["dir"]))
    assert "DoRA, 31 modules" in shown and "rank: 4" in shown and "adapter: dora" in shown


def test_a_dora_starts_from_a_dora_or_from_a_plain_lora_equal_to_it(saved_dora, tmp_path):
    """--init_lora for --adapter dora (here at another rank and alpha): a DoRA file gives its own model; a plain
    LoRA's gives the LoRA's model, its norms made to fit; a LoRA run refuses a DoRA file."""
    from zimage_utils.lora import init_lora_from, lora_target_modules

    plain = make_tiny_pipeline(seed=0).transformer
    plain_config = add_lora(plain, rank=4, alpha=8, targets="all")
    stand_in_for_training(plain, seed=3)
    save_lora(tmp_path, plain, plain_config, METADATA, formats=["diffusers"])
    for source, expected in ((saved_dora["dir"], saved_dora["output"]), (tmp_path, transformer_output(plain))):
        transformer = make_tiny_pipeline(seed=0).transformer
        targets = lora_target_modules(transformer, "all")
        config = add_lora(transformer, rank=8, alpha=4, targets="all", adapter="dora")
        assert init_lora_from(transformer, str(source), config, targets) == []
        torch.testing.assert_close(transformer_output(transformer), expected, rtol=0, atol=1e-5)
    lora_run = make_tiny_pipeline(seed=0).transformer
    config = add_lora(lora_run, rank=4, alpha=8, targets="all")
    with pytest.raises(ValueError, match="holds a DoRA .*--adapter dora"):
        init_lora_from(lora_run, str(saved_dora["dir"]), config, targets)


# ---------------------------------------------------------------------------------------------------------------
# Other tools' layouts: read as the update they mean, or refused with the reason
# ---------------------------------------------------------------------------------------------------------------

MODULE = "layers.0.attention.to_q"


def other_tools_files(folder) -> dict[str, tuple]:
    """name → (path, the update read_lora must give MODULE, as scale · B @ A): one rank-4 LoRA in layouts other
    tools write, which diffusers' converter alone misreads or reads at another strength."""
    generator = torch.Generator().manual_seed(0)
    down, up = torch.randn(4, 32, generator=generator), torch.randn(32, 4, generator=generator)
    peft = {f"{MODULE}.lora_A.weight": down, f"{MODULE}.lora_B.weight": up}
    prefixed = {f"transformer.{k}": v for k, v in peft.items()}

    def metadata(**config) -> dict[str, str]:  # diffusers' adapter metadata, as its trainers write it
        return {LORA_ADAPTER_METADATA_KEY: json.dumps({f"transformer.{k}": v for k, v in config.items()})}

    files = {
        "alpha in diffusers' metadata": (prefixed, metadata(r=4, lora_alpha=8, target_modules=[MODULE]), 2.0),
        "rsLoRA metadata": (prefixed, metadata(r=4, lora_alpha=8, use_rslora=True, target_modules=[MODULE]), 4.0),
        "PEFT keys without transformer.": (peft, None, 1.0),
        "PEFT's in-model names": ({k.replace(".weight", ".default.weight"): v for k, v in prefixed.items()}, None, 1),
        "transformer. keys with .alpha": ({**prefixed, f"transformer.{MODULE}.alpha": torch.tensor(2.0)}, None, 0.5),
    }
    paths = {}
    for name, (tensors, meta, scale) in files.items():
        path = folder / f"{name.replace(' ', '_').replace('.', '')}.safetensors"
        safetensors.torch.save_file(tensors, str(path), metadata=meta)
        paths[name] = (path, scale * up @ down)
    return paths


def test_other_tools_layouts_read_as_the_update_they_mean(tmp_path):
    for name, (path, update) in other_tools_files(tmp_path).items():
        state = read_lora(str(path))
        assert set(state) == {f"transformer.{MODULE}.lora_A.weight", f"transformer.{MODULE}.lora_B.weight"}, name
        torch.testing.assert_close(lora_delta(state, MODULE), update, msg=name)
    # diffusers applies its metadata's alpha too: the update read is the one it samples with
    pipe = make_tiny_pipeline(seed=0)
    base = pipe.transformer.get_submodule(MODULE).weight.detach().clone()
    path, update = other_tools_files(tmp_path)["alpha in diffusers' metadata"]
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora()
    torch.testing.assert_close(pipe.transformer.get_submodule(MODULE).weight - base, update, atol=1e-5, rtol=1e-5)

    # A LyCORIS-named LoKr (older ai-toolkit, musubi-tuner) and PEFT's name for a DoRA's norms
    lycoris = {
        f"lycoris_layers_0_attention_to_q.lokr_{k}": torch.ones(*s) for k, s in [("w1", (4, 4)), ("w2", (8, 8))]
    }
    safetensors.torch.save_file(lycoris, str(tmp_path / "lycoris.safetensors"))
    lokr = {f"transformer.{MODULE}.lokr_w{i}": torch.ones(n, n) for i, n in ((1, 4), (2, 8))}  # metadata alpha 2r
    meta = {LORA_ADAPTER_METADATA_KEY: json.dumps({"transformer.r": 8, "transformer.alpha": 16})}
    safetensors.torch.save_file(lokr, str(tmp_path / "lokr.safetensors"), metadata=meta)
    assert read_lora(str(tmp_path / "lokr.safetensors"))[f"transformer.{MODULE}.lokr_w1"].eq(2).all()
    assert set(read_lora(str(tmp_path / "lycoris.safetensors"))) == {
        f"transformer.{MODULE}.lokr_w1",
        f"transformer.{MODULE}.lokr_w2",
    }
    dora = {f"transformer.{MODULE}.lora_magnitude_vector.weight": torch.full((32,), 3.0)}
    dora |= {
        f"transformer.{MODULE}.lora_A.weight": torch.ones(4, 32),
        f"transformer.{MODULE}.lora_B.weight": torch.ones(32, 4),
    }
    safetensors.torch.save_file(dora, str(tmp_path / "dora.safetensors"))
    assert f"transformer.{MODULE}.lora_magnitude_vector" in read_lora(str(tmp_path / "dora.safetensors"))


def test_files_that_are_not_z_image_loras_are_refused_with_the_reason(tmp_path):
    lora = {
        f"transformer.{MODULE}.lora_A.weight": torch.ones(4, 32),
        f"transformer.{MODULE}.lora_B.weight": torch.ones(32, 4),
    }
    cases = {
        "empty": ({}, "holds no tensors"),
        "lumina": ({k.replace(".attention.", ".attn."): v for k, v in lora.items()}, r"Z-Image does not have \(e.g. transformer\.layers\.0\.attn\.to_q"),
        "extra": ({**lora, "transformer.t_embedder.mlp.0.weight": torch.ones(32, 32)}, "1 tensor\\(s\\) that are not LoRA or LoKr weights \\(e.g. transformer.t_embedder.mlp.0.weight\\)"),
    }  # fmt: skip
    for name, (tensors, message) in cases.items():
        safetensors.torch.save_file(tensors, str(tmp_path / f"{name}.safetensors"))
        with pytest.raises(ValueError, match=message):
            read_lora(str(tmp_path / f"{name}.safetensors"))
