"""Write and read Z-Image LoRA files that diffusers and ComfyUI load as they are.

Two files per save, both safetensors:

- `pytorch_lora_weights.safetensors` (diffusers): keys `transformer.<module>.lora_A.weight` / `.lora_B.weight`,
  with alpha / rank FOLDED into lora_A, so the file means the same to every loader, including those that assume
  alpha = rank (diffusers without metadata, ComfyUI given `transformer.`-prefixed keys, which carry no `.alpha`).
  Loaders that ignore an unfolded alpha are where "the LoRA only works at strength 2" comes from. diffusers'
  adapter metadata (`lora_adapter_metadata`: r, lora_alpha = r, target_modules) is written too, so
  `ZImagePipeline.load_lora_weights` rebuilds the exact config instead of inferring it.
- `pytorch_lora_weights_comfyui.safetensors` (ComfyUI / ai-toolkit layout): keys
  `diffusion_model.<module>.lora_A.weight` / `.lora_B.weight` with the trained (unfolded) weights, and
  `diffusion_model.<module>.alpha` (float32 scalar); the loader scales by alpha / rank. diffusers converts this
  layout on load too (`_convert_non_diffusers_z_image_lora_to_diffusers` folds alpha into lora_A).

A DoRA (`add_lora(..., adapter="dora")`) adds each module's norms: `.lora_magnitude_vector` [out] in the diffusers
file (as diffusers' loader reads DoRA), `.dora_scale` [out, 1] in the ComfyUI one (see `comfyui_dora_scales`).

A LoKr adapter (`add_lora(..., adapter="lokr")`) is written to the same two names, with `.lokr_w1` / `.lokr_w2`
(or `.lokr_w2_a` / `.lokr_w2_b`) keys instead; see `lokr_files`.

Weights are saved as float32 by default: lossless, so a file loaded back (to resume, merge or compare) is the
trained adapter, and small next to the model (rank 32 on attention ≈ 130 MB). Pass `dtype=torch.bfloat16` to
halve it for sharing; inference runs the base in bf16 anyway.

Both files are written atomically (a temporary name in the same folder, then `os.replace`), so a crash or a
full disk never leaves a truncated file under the final name. Metadata that follows the SAI model spec
(model_spec.py) gets each file's own `modelspec.hash_sha256`.
"""

import functools
import json
import math
import os
import re
from collections.abc import Iterable
from pathlib import Path

import safetensors
import safetensors.torch
import torch
from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
from diffusers.utils.peft_utils import get_peft_kwargs
from peft import LoKrConfig, LoraConfig
from peft.utils import get_peft_model_state_dict
from peft.utils.other import get_pattern_key

from .lora import MAGNITUDE
from .model_spec import HASH_KEY, SPEC_KEY, tensor_hash

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
COMFYUI_WEIGHT_NAME = "pytorch_lora_weights_comfyui.safetensors"
LORA_FORMATS = ("diffusers", "comfyui")
DIFFUSERS_PREFIX = "transformer."
SAVE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # --save_dtype
COMFYUI_PREFIX = "diffusion_model."


def get_lora_state_dict(model: torch.nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's trained weights with diffusers keys, alpha NOT folded.

    Args:
        model: the transformer after `add_lora` (or a `peft.PeftModel` around it, or its `torch.compile` wrapper).
            Unwrap DDP first (`accelerator.unwrap_model`).
        adapter_name: the PEFT adapter to export.

    Returns:
        {"transformer.<module>.lora_A.weight": [r, in], "transformer.<module>.lora_B.weight": [out, r], ...}
        (a LoKr adapter: "transformer.<module>.lokr_w1", ...), detached, on the model's device and dtype.
    """
    model = getattr(model, "_orig_mod", model)  # torch.compile wrapper
    if adapter_name not in getattr(model, "peft_config", {}):
        raise ValueError(f"{type(model).__name__} has no LoRA adapter {adapter_name!r}; call add_lora first")
    state_dict = get_peft_model_state_dict(model, adapter_name=adapter_name)
    if not state_dict:
        raise ValueError(f"{type(model).__name__} has no LoRA adapter {adapter_name!r}; call add_lora first")
    empty = [k for k, v in state_dict.items() if v.numel() == 0]
    if empty:
        # DeepSpeed ZeRO-3 keeps only a shard on each rank; saving that silently writes a useless file.
        raise RuntimeError(f"LoRA tensors are empty (e.g. {empty[0]}): gather the parameters before saving (ZeRO-3)")
    # PeftModel keys carry `base_model.model.`; the transformer's own keys are already `<module>.lora_A.weight`.
    return {DIFFUSERS_PREFIX + k.removeprefix("base_model.model."): v.detach() for k, v in state_dict.items()}


def _lora_scale(rank: int, alpha: float, use_rslora: bool = False) -> float:
    # PEFT scales the LoRA update by alpha / r (alpha / sqrt(r) with rsLoRA).
    return alpha / (math.sqrt(rank) if use_rslora else rank)


def fold_alpha(state_dict: dict[str, torch.Tensor], alpha: float, use_rslora: bool = False) -> dict[str, torch.Tensor]:
    """Multiply each lora_A by its LoRA scale alpha / r, so the file needs no alpha (alpha = rank when loaded).

    The rank of each module is read from its lora_A [r, in]; lora_B is returned unchanged.
    """
    folded = {}
    for key, value in state_dict.items():
        if key.endswith(".lora_A.weight"):
            value = value * _lora_scale(value.shape[0], alpha, use_rslora)
        folded[key] = value
    return folded


def to_comfyui(state_dict_diffusers: dict[str, torch.Tensor], alpha: float | None) -> dict[str, torch.Tensor]:
    """Rename diffusers keys to ComfyUI's and add one `.alpha` per module.

    Args:
        state_dict_diffusers: UNFOLDED weights from `get_lora_state_dict` (`transformer.<module>.lora_A.weight`).
        alpha: the training alpha; None for folded weights (each module's `.alpha` is then its rank: scale 1).

    Returns:
        {"diffusion_model.<module>.lora_A.weight", ".lora_B.weight", "diffusion_model.<module>.alpha": 0-d float32}.
    """
    out = {}
    for key, value in state_dict_diffusers.items():
        if not key.startswith(DIFFUSERS_PREFIX):
            raise ValueError(f"expected diffusers LoRA keys starting with {DIFFUSERS_PREFIX!r}, got {key!r}")
        if key.endswith(MAGNITUDE):  # (a DoRA: values from `comfyui_dora_scales`)
            out[COMFYUI_PREFIX + key.removeprefix(DIFFUSERS_PREFIX).removesuffix(MAGNITUDE) + "dora_scale"] = value
            continue
        out[COMFYUI_PREFIX + key.removeprefix(DIFFUSERS_PREFIX)] = value
        if key.endswith(".lora_A.weight"):
            module = key.removeprefix(DIFFUSERS_PREFIX).removesuffix(".lora_A.weight")
            # float32 whatever the weights' dtype: an alpha such as 0.3 is not exact in bf16.
            module_alpha = value.shape[0] if alpha is None else alpha
            out[f"{COMFYUI_PREFIX}{module}.alpha"] = torch.tensor(float(module_alpha), dtype=torch.float32)
    return out


@torch.no_grad()
def comfyui_dora_scales(transformer: torch.nn.Module, raw: dict[str, torch.Tensor], scale: float) -> dict:
    """A DoRA's norms as ComfyUI's `dora_scale` values, [out, 1] under the magnitudes' keys (`to_comfyui` renames
    them). DoRA (PEFT, diffusers) makes each adapted weight m · (W + s·BA) / ||W + s·BA||, the norms per output row.
    ComfyUI's `weight_decompose` (comfy/weight_adapter/base.py; run on the tiny model, see the README) divides by the
    base weight's row norms ||W|| instead when the scale has one value per output row, so each scale here is
    m · ||W|| / ||W + s·BA||, which makes ComfyUI's weight at strength 1 the trained one. `raw`:
    `get_lora_state_dict`'s (unfolded) weights of `transformer`'s adapter; `scale`: its s = alpha / r."""
    from peft.utils.integrations import dequantize_module_weight

    model = getattr(transformer, "_orig_mod", transformer)
    scales = {}
    for key in [k for k in raw if k.endswith(MAGNITUDE)]:
        module = key.removesuffix("." + MAGNITUDE)
        weight = dequantize_module_weight(model.get_submodule(module.removeprefix(DIFFUSERS_PREFIX)).base_layer)
        weight = weight.float()
        update = raw[f"{module}.lora_B.weight"].float() @ raw[f"{module}.lora_A.weight"].float()
        adapted_norm = (weight + scale * update.to(weight.device)).norm(dim=1)
        ratio = (weight.norm(dim=1) / adapted_norm).to(raw[key].device)
        scales[key] = (raw[key].float() * ratio).unsqueeze(1)
    return scales


def _diffusers_adapter_metadata(state_dict: dict[str, torch.Tensor]) -> dict:
    # The LoraConfig kwargs diffusers' loader rebuilds the adapter from (prefixed with the component name, as
    # `ZImagePipeline.save_lora_weights` packs them), for FOLDED weights: alpha = rank in every module. Modules at
    # another rank than the most common go in rank_pattern / alpha_pattern, as diffusers infers them without metadata.
    ranks = {
        k.removeprefix(DIFFUSERS_PREFIX): v.shape[1] for k, v in state_dict.items() if k.endswith(".lora_B.weight")
    }
    config = get_peft_kwargs(ranks, None, {k.removeprefix(DIFFUSERS_PREFIX): v for k, v in state_dict.items()})
    config["target_modules"] = sorted(config["target_modules"])
    return {DIFFUSERS_PREFIX + k: v for k, v in config.items()}


def lokr_files(raw: dict[str, torch.Tensor], config: LoKrConfig) -> tuple[dict, dict, dict]:
    """A LoKr adapter's (diffusers tensors, ComfyUI tensors, diffusers adapter metadata).

    PEFT scales w1 ⊗ w2 by alpha / r; LyCORIS-style loaders (diffusers' converter, ComfyUI) scale by alpha / rank
    only when a factor is rank-decomposed and by 1 otherwise. So PEFT's scale is baked into lokr_w1 here, and the
    ComfyUI file carries `.alpha` = rank where w2 is decomposed (scale 1 there too): both files mean, at strength 1,
    exactly the update that was trained. Keys: `transformer.` / `diffusion_model.` + `<module>.lokr_w1`, `.lokr_w2`
    or `.lokr_w2_a` / `.lokr_w2_b`: the Z-Image LoKr layout diffusers' converter reads as ai-toolkit's (older ai-toolkit
    versions write `lycoris_`-prefixed names instead), and which ComfyUI's Z-Image key map takes."""
    scale = config.alpha / config.r
    baked = {k: v.float() * scale if k.endswith((".lokr_w1", ".lokr_w1_a")) else v.float() for k, v in raw.items()}
    comfyui = {}
    for key, value in baked.items():
        comfyui[COMFYUI_PREFIX + key.removeprefix(DIFFUSERS_PREFIX)] = value
        if key.endswith(".lokr_w2_b"):
            module = key.removeprefix(DIFFUSERS_PREFIX).removesuffix(".lokr_w2_b")
            comfyui[f"{COMFYUI_PREFIX}{module}.alpha"] = torch.tensor(float(value.shape[0]), dtype=torch.float32)
    modules = sorted({k.removeprefix(DIFFUSERS_PREFIX).rsplit(".lokr_", 1)[0] for k in raw})
    adapter = {
        "r": config.r,
        "alpha": config.r,
        "decompose_factor": config.decompose_factor,
        "target_modules": modules,
    }
    return baked, comfyui, {DIFFUSERS_PREFIX + k: v for k, v in adapter.items()}


def save_safetensors_atomic(
    tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None
) -> None:
    """safetensors to a temporary name in the same folder, flushed to disk, then renamed: never a half-written file.
    Metadata that follows the SAI model spec gets the hash of these tensors (model_spec.HASH_KEY), replacing any."""
    if metadata and SPEC_KEY in metadata:
        metadata = {**metadata, HASH_KEY: tensor_hash(tensors)}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        safetensors.torch.save_file(tensors, tmp, metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())  # the bytes reach the disk before the name does
        os.chmod(tmp, 0o666 & ~current_umask())  # safetensors writes 0600; a LoRA is for sharing, as files usually are
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_lora(
    output_dir: str | Path,
    transformer: torch.nn.Module,
    lora_config: LoraConfig,
    metadata: dict[str, str] | None = None,
    formats: Iterable[str] = LORA_FORMATS,
    dtype: torch.dtype = torch.float32,
) -> dict[str, Path]:
    """Write the adapter of `transformer` as LoRA files in `output_dir` (created if missing).

    diffusers' `ZImagePipeline.save_lora_weights` is not used: it writes in place (not atomically), and a custom
    `save_function` would drop its adapter metadata; this writes the same keys and the same metadata entry.

    Args:
        output_dir: folder; the diffusers file gets the name `load_lora_weights(output_dir)` looks for.
        transformer: the model after `add_lora` (unwrapped from DDP).
        lora_config: the config `add_lora` returned (rank, alpha, rsLoRA).
        metadata: caller's safetensors metadata, strings only, e.g. {"base_model": ..., "rank": "32",
            "alpha": "32", "targets": "attention", "steps": "1500", "resolution": "1024", "trigger_word": "sks"}.
            `format`, `lora_format`, `lora_alpha_folded` (and diffusers' adapter entry) are added.
        formats: any of "diffusers", "comfyui".
        dtype: dtype of the saved LoRA weights (see the module docstring).

    Returns:
        {format: path written}.
    """
    metadata = dict(metadata or {})
    bad = {k: type(v).__name__ for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)}
    if bad:
        raise TypeError(f"safetensors metadata must be str -> str; convert these values: {bad}")
    formats = tuple(formats)
    unknown = set(formats) - set(LORA_FORMATS)
    if unknown:
        raise ValueError(f"unknown LoRA format(s) {sorted(unknown)}; choose from {LORA_FORMATS}")
    if lora_config.alpha_pattern or lora_config.rank_pattern:
        raise NotImplementedError("per-module rank/alpha patterns are not supported by save_lora")

    raw = get_lora_state_dict(transformer)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    def prepare(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # Fold in fp32 first, then cast; `.alpha` scalars stay fp32. safetensors needs contiguous CPU tensors.
        return {
            k: (v if k.endswith(".alpha") else v.to(dtype)).detach().to("cpu").contiguous() for k, v in tensors.items()
        }

    paths = {}
    if isinstance(lora_config, LoKrConfig):
        diffusers_sd, comfyui_sd, adapter = lokr_files(raw, lora_config)
        common = {**metadata, "format": "pt", "adapter": "lokr", "lokr_scale_baked": "true"}
        written = {
            "diffusers": (diffusers_sd, LORA_WEIGHT_NAME, {LORA_ADAPTER_METADATA_KEY: json.dumps(adapter, indent=2)}),
            "comfyui": (comfyui_sd, COMFYUI_WEIGHT_NAME, {}),
        }
        for fmt in formats:
            tensors, name, extra = written[fmt]
            paths[fmt] = output_dir / name
            save_safetensors_atomic(prepare(tensors), paths[fmt], {**common, "lora_format": fmt, **extra})
        return paths
    if lora_config.use_dora:
        metadata["adapter"] = "dora"
    if "diffusers" in formats:
        folded = fold_alpha({k: v.float() for k, v in raw.items()}, lora_config.lora_alpha, lora_config.use_rslora)
        paths["diffusers"] = output_dir / LORA_WEIGHT_NAME
        _save_diffusers_file(paths["diffusers"], prepare(folded), metadata)
    if "comfyui" in formats:
        if lora_config.use_rslora:
            raise NotImplementedError("ComfyUI scales by alpha / rank; an rsLoRA adapter has no such alpha")
        file_metadata = {**metadata, "format": "pt", "lora_format": "comfyui", "lora_alpha_folded": "false"}
        paths["comfyui"] = output_dir / COMFYUI_WEIGHT_NAME
        if lora_config.use_dora:
            raw = {**raw, **comfyui_dora_scales(transformer, raw, lora_config.lora_alpha / lora_config.r)}
        save_safetensors_atomic(prepare(to_comfyui(raw, lora_config.lora_alpha)), paths["comfyui"], file_metadata)
    return paths


def _save_diffusers_file(path: Path, folded: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    adapter = json.dumps(_diffusers_adapter_metadata(folded), indent=2, sort_keys=True)
    file_metadata = {**metadata, "format": "pt", "lora_format": "diffusers", "lora_alpha_folded": "true"}
    save_safetensors_atomic(folded, path, {**file_metadata, LORA_ADAPTER_METADATA_KEY: adapter})


def save_lora_state(
    output_dir: str | Path,
    state_dict: dict[str, torch.Tensor],
    metadata: dict[str, str] | None = None,
    formats: Iterable[str] = LORA_FORMATS,
    dtype: torch.dtype = torch.float32,
) -> dict[str, Path]:
    """Write a LoRA given as tensors in `read_lora`'s layout (diffusers keys, alpha folded, each module at its own
    rank) to the files `save_lora` writes, under the same names: the ComfyUI file's `.alpha` is each module's rank
    (its scale 1). Returns {format: path written}."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in state_dict.items()}
    paths = {}
    if "diffusers" in formats:
        paths["diffusers"] = output_dir / LORA_WEIGHT_NAME
        _save_diffusers_file(paths["diffusers"], tensors, dict(metadata or {}))
    if "comfyui" in formats:
        paths["comfyui"] = output_dir / COMFYUI_WEIGHT_NAME
        file_metadata = {**(metadata or {}), "format": "pt", "lora_format": "comfyui", "lora_alpha_folded": "true"}
        save_safetensors_atomic(to_comfyui(tensors, None), paths["comfyui"], file_metadata)
    return paths


def add_metadata_if_saved_at(folders: Iterable[str | Path], step: int, extra: dict[str, str]) -> list[Path]:
    """Rewrite (atomically) the LoRA files in `folders` that a run saved at `step` (their "steps" metadata) with
    `extra` added to their metadata: the validation sample of that step as their thumbnail, drawn after they were
    written. Returns the files rewritten."""
    rewritten = []
    for folder in map(Path, folders) if extra else ():
        for path in (folder / LORA_WEIGHT_NAME, folder / COMFYUI_WEIGHT_NAME):
            if path.is_file() and lora_metadata(path).get("steps") == str(step):
                tensors, metadata = load_lora_file(path)
                save_safetensors_atomic(tensors, path, metadata | extra)
                rewritten.append(path)
    return rewritten


def load_lora_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a LoRA safetensors file → (tensors on CPU, its string metadata). Pickled files are refused."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: only .safetensors LoRA files are read (pickle files can run code)")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such LoRA file")
    with safetensors.safe_open(path, framework="pt", device="cpu") as f:
        metadata = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return tensors, metadata


# The transformer's top-level modules (ZImageTransformer2DModel): every key of a Z-Image LoRA starts with one
ZIMAGE_MODULES = ("layers.", "noise_refiner.", "context_refiner.", "all_x_embedder.", "all_final_layer.", "t_embedder.",
                  "cap_embedder.")  # fmt: skip


def split_strength(spec: str, flag: str = "LoRA") -> tuple[str, float]:
    """ "path:0.8" → ("path", 0.8); a path without a strength gets 1.0 (Windows drive letters are kept). A ":" after
    a path that is not there and before no number is refused, naming `flag`."""
    path, sep, strength = spec.rpartition(":")
    if sep and path and not Path(spec).exists():
        try:
            return path, float(strength)
        except ValueError:
            if ":" in spec[2:]:  # (past a Windows drive letter)
                raise ValueError(
                    f"{flag} {spec}: write PATH or PATH:STRENGTH with a number, e.g. my_lora:0.8"
                ) from None
    return spec, 1.0


def lora_file(path: str | Path) -> Path:
    """The file a LoRA path names: itself, or a folder's pytorch_lora_weights.safetensors."""
    return Path(path) / LORA_WEIGHT_NAME if Path(path).is_dir() else Path(path)


def lora_metadata(path: str | Path) -> dict[str, str]:
    """The safetensors metadata of the LoRA at `path` (a file, or a folder's pytorch_lora_weights.safetensors),
    from its header alone; {} for a hub id, a path that is not there or a file without metadata."""
    file = lora_file(path)
    if not file.is_file() or file.suffix != ".safetensors":
        return {}
    with safetensors.safe_open(str(file), framework="pt") as f:  # the tensors stay on disk
        return dict(f.metadata() or {})


def safetensors_keys(path: str | Path) -> list[str]:
    """The tensor names of a safetensors file, from its header alone ([] for a file that is not one)."""
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except (OSError, safetensors.SafetensorError):
        return []


def trigger_of(metadata: dict[str, str]) -> str:
    """The trigger phrase a LoRA's metadata names: the SAI model spec's (any trainer that writes it), else ours."""
    return metadata.get("modelspec.trigger_phrase") or metadata.get("trigger_word", "")


def read_lora(path: str) -> dict[str, torch.Tensor]:
    """A LoRA in any layout diffusers reads (ours, ComfyUI/ai-toolkit, kohya, diffusers' trainers), as diffusers keys
    `transformer.<module>.lora_A.weight` / `.lora_B.weight` with any alpha folded in (the update at strength 1 is
    B @ A: `.alpha` tensors, and diffusers' adapter metadata, `fold_adapter_metadata`); a LoKr as
    `transformer.<module>.lokr_w1`, ... with its alpha baked in likewise. Layouts diffusers' converter misreads are
    rewritten first (`fixed_layout`). `path`: a .safetensors file, a folder holding pytorch_lora_weights.safetensors,
    or a hub id. Pickled weights are refused, and so are a path that is not there, a file that is not safetensors or
    holds no tensors, tensors that are not adapter weights and a LoRA for another model, each with a message."""
    from diffusers import ZImagePipeline

    local = Path(path)
    if not local.exists() and (os.environ.get("HF_HUB_OFFLINE") or path.count("/") != 1 or path.startswith(".")):
        raise FileNotFoundError(f"LoRA {path}: no such file or folder")
    if local.is_file() and local.suffix != ".safetensors":
        raise ValueError(f"{path}: only .safetensors LoRA files are read (pickle files can run code)")
    if local.is_dir() and not (local / LORA_WEIGHT_NAME).is_file():
        files = sorted(p.name for p in local.glob("*.safetensors"))
        raise FileNotFoundError(
            f"LoRA folder {path} holds no {LORA_WEIGHT_NAME}"
            + (f": give one of its files instead ({', '.join(files[:5])})" if files else "")
        )
    if local.exists() and any(k.endswith(".dora_scale") for k in safetensors_keys(lora_file(local))):
        raise ValueError(
            f"{path} is a DoRA in ComfyUI's layout (.dora_scale keys), which diffusers reads without its norms: give "
            f"the diffusers file saved beside it ({LORA_WEIGHT_NAME}, with .lora_magnitude_vector keys)"
        )
    try:
        if local.exists():
            tensors, file_metadata = load_lora_file(lora_file(local))
            if not tensors:
                raise ValueError(f"{path} holds no tensors: not a LoRA file")
            state = ZImagePipeline.lora_state_dict(fixed_layout(tensors))
            adapter = json.loads(file_metadata.get(LORA_ADAPTER_METADATA_KEY) or "null")
        else:  # a hub id
            state, adapter = ZImagePipeline.lora_state_dict(path, use_safetensors=True, return_lora_metadata=True)
    except (OSError, safetensors.SafetensorError, KeyError) as error:  # (KeyError: a layout diffusers half knows)
        raise ValueError(f"LoRA {path} could not be read (damaged, or not a LoRA file): {error!r}") from None
    kinds = (".lora_A.weight", ".lora_B.weight", f".{MAGNITUDE}", ".lokr_w1", ".lokr_w2", ".lokr_w1_a", ".lokr_w1_b",
             ".lokr_w2_a", ".lokr_w2_b")  # fmt: skip
    if others := [k for k in state if not k.endswith(kinds)]:
        raise ValueError(
            f"{path} holds {len(others)} tensor(s) that are not LoRA or LoKr weights (e.g. {others[0]}), which "
            "diffusers refuses: save the file without them"
        )
    names = zimage_module_names()
    foreign = [k for k in state if _numbered(_module_of(k.removeprefix(DIFFUSERS_PREFIX))) not in names]
    if foreign:
        raise ValueError(f"{path} is not a Z-Image LoRA: it adapts modules Z-Image does not have (e.g. {foreign[0]})")
    return fold_adapter_metadata(state, adapter)


def _module_of(key: str) -> str:
    """`layers.0.attention.to_q.lora_A.weight` → `layers.0.attention.to_q`."""
    return re.split(r"\.(?:lora_[AB]\.weight|lora_magnitude_vector|lokr_w[12](?:_[ab])?)$", key)[0]


def _numbered(module: str) -> str:
    """A module name with its indices as N: `layers.3.attention.to_out.0` → `layers.N.attention.to_out.N`."""
    return re.sub(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.)", "N", module)


@functools.cache
def zimage_module_names() -> frozenset[str]:
    """The Linear modules of Z-Image's transformer (`_numbered`), from a weightless tiny one: the names a Z-Image LoRA
    can adapt, at any number of layers."""
    from diffusers import ZImageTransformer2DModel

    from .tiny import TINY_TRANSFORMER

    with torch.device("meta"):
        model = ZImageTransformer2DModel(**TINY_TRANSFORMER)
    return frozenset(_numbered(n) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear))


def fixed_layout(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A file's tensors in a layout diffusers' converter reads as meant. Rewritten: PEFT's in-model names
    (`.lora_A.default.weight`, `.lora_magnitude_vector.weight`); PEFT keys without `transformer.` and without alphas
    (diffusers would load nothing); `transformer.` keys with kohya-style `.alpha` tensors, folded into lora_A here
    (diffusers would prefix them twice). Other files come back as they are."""
    fixed = {}
    for key, value in tensors.items():
        key = re.sub(r"\.default(?=\.weight$)", "", key)
        fixed[re.sub(rf"\.{MAGNITUDE}\.weight$", f".{MAGNITUDE}", key)] = value
    if any(".lokr_" in k for k in fixed) and all(k.startswith(("lycoris_", "lora_unet_")) for k in fixed):
        fixed = {_dotted_lokr_key(k): v for k, v in fixed.items()}  # (LyCORIS / musubi-tuner names)
    alphas = {k.removesuffix(".alpha"): v for k, v in fixed.items() if k.endswith(".alpha")}
    if not alphas and all(k.startswith(ZIMAGE_MODULES) for k in fixed):
        return {DIFFUSERS_PREFIX + k: v for k, v in fixed.items()}
    if alphas and all(k.startswith(DIFFUSERS_PREFIX) for k in fixed) and not any(".lokr_" in k for k in fixed):
        for module, alpha in alphas.items():
            del fixed[f"{module}.alpha"]
            down = fixed[f"{module}.lora_A.weight"]
            fixed[f"{module}.lora_A.weight"] = down * (float(alpha) / down.shape[0])
    return fixed


def _dotted_lokr_key(key: str) -> str:
    """A LyCORIS-named LoKr key (`lycoris_layers_0_attention_to_q.lokr_w1`, musubi-tuner's `lora_unet_...`) in the
    ComfyUI layout diffusers' LoKr converter reads (`diffusion_model.layers.0.attention.to_q.lokr_w1`); a name that
    matches no Z-Image module is left as it is (and refused as such)."""
    flat, _, kind = key.partition(".")
    flat = flat.removeprefix("lycoris_").removeprefix("lora_unet_")
    for name, pattern in _flat_module_patterns():
        if found := pattern.fullmatch(flat):
            indices = iter(found.groups())
            dotted = ".".join(next(indices) if part == "N" else part for part in name.split("."))
            return f"{COMFYUI_PREFIX}{dotted}.{kind}"
    return key


@functools.cache
def _flat_module_patterns() -> list[tuple[str, re.Pattern]]:
    """(numbered module name, the pattern of its underscored form with its indices captured), compiled once."""
    return [
        (name, re.compile("_".join(r"(\d+)" if part == "N" else re.escape(part) for part in name.split("."))))
        for name in sorted(zimage_module_names())
    ]


def fold_adapter_metadata(state: dict[str, torch.Tensor], metadata: dict | None) -> dict[str, torch.Tensor]:
    """`state` (diffusers keys) with the scale diffusers' adapter metadata gives each module folded into its first
    factor (lora_A; a LoKr's lokr_w1): the config its loader rebuilds from `lora_adapter_metadata` (keys prefixed
    `transformer.`) scales a module by alpha / r (a LoRA's lora_alpha; rsLoRA: / √r), per module through
    alpha_pattern / rank_pattern. Ours are written with alpha = r (scale 1); diffusers' training scripts write their
    --lora_alpha."""
    config = {k.removeprefix(DIFFUSERS_PREFIX): v for k, v in (metadata or {}).items()}
    lokr = any(".lokr_" in k for k in state)
    alpha_key, first = ("alpha", (".lokr_w1", ".lokr_w1_a")) if lokr else ("lora_alpha", (".lora_A.weight",))
    if alpha_key not in config:
        return state
    ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    folded = dict(state)
    for key, factor in state.items():
        if key.endswith(first):
            module = _module_of(key.removeprefix(DIFFUSERS_PREFIX))
            rank = ranks.get(get_pattern_key(ranks, module), config.get("r", 8))
            alpha = alphas.get(get_pattern_key(alphas, module), config[alpha_key])
            scale = alpha / (math.sqrt(rank) if config.get("use_rslora") and not lokr else rank)
            folded[key] = factor * scale if scale != 1 else factor
    return folded
