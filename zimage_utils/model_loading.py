"""Find out what a model folder or hub id holds, load the Z-Image components, and fingerprint their configs.

Every loader goes through `from_pretrained(path_or_id, subfolder=...)`, so a local diffusers folder and a hub id
(e.g. `Tongyi-MAI/Z-Image-Turbo`) take the same code path. Nothing here runs remote code unless asked to.
"""

import hashlib
import json
import os
from pathlib import Path

import torch

ZIMAGE_EXAMPLE = "Tongyi-MAI/Z-Image-Turbo"
MODEL_TYPE_NAMES = {
    "zimage": "Z-Image",
    "sdxl": "Stable Diffusion XL",
    "sd15": "Stable Diffusion 1.x/2.x",
    "unknown": "not a Z-Image",
}

# The config files that decide what a component computes. Hashing them (not the weights) fingerprints a cache
# cheaply; `True` marks files that must exist.
COMPONENT_CONFIG_FILES = {
    "vae": (("vae/config.json", True),),
    "text_encoder": (("text_encoder/config.json", True),),
    # transformers 5 saves the chat template beside tokenizer_config.json; older folders keep it inside it.
    "tokenizer": (
        ("tokenizer/tokenizer_config.json", True),
        ("tokenizer/chat_template.jinja", False),
        ("tokenizer/chat_template.json", False),
    ),
    "transformer": (("transformer/config.json", True),),
    "scheduler": (("scheduler/scheduler_config.json", True),),
}
# Keys that change with the library version or the save location, not with what the component computes.
VOLATILE_CONFIG_KEYS = {"_diffusers_version", "transformers_version", "_name_or_path", "_commit_hash"}


def offline_default(local_files_only: bool | None) -> bool:
    """`local_files_only` as given, else True when the HF_HUB_OFFLINE environment variable is set."""
    if local_files_only is not None:
        return local_files_only
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _fetch_file(
    path_or_id: str, filename: str, revision: str | None, local_files_only: bool | None, required: bool = True
) -> Path | None:
    """Local path of `filename` inside a model folder or hub repo; None if absent and not `required`.

    Raises `ValueError` naming the model and the fix when a required file cannot be found.
    """
    local = Path(path_or_id).expanduser()
    if local.is_dir():
        candidate = local / filename
        if candidate.is_file():
            return candidate
        if required:
            raise ValueError(f"{path_or_id} has no {filename}; pass a diffusers model folder such as {ZIMAGE_EXAMPLE}")
        return None
    if local.exists():
        raise ValueError(
            f"{path_or_id} is a file, not a diffusers model folder; pass the folder that holds model_index.json "
            f"(a single-file transformer checkpoint goes to the single-file option, with the folder or a hub id such "
            f"as {ZIMAGE_EXAMPLE} for the other components)"
        )

    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HFValidationError, LocalEntryNotFoundError

    offline = offline_default(local_files_only)
    try:
        return Path(hf_hub_download(path_or_id, filename, revision=revision, local_files_only=offline))
    except HFValidationError as error:
        raise ValueError(f"{path_or_id}: no such folder (nor a valid hub id: {error})") from None
    except LocalEntryNotFoundError:
        if not required:
            return None
        if offline:
            raise ValueError(
                f"{path_or_id} is not a local folder and its {filename} is not in the Hugging Face cache "
                f"(offline: HF_HUB_OFFLINE=1 or local_files_only). Download it once online "
                f"(`hf download {path_or_id}`) or pass a local folder."
            ) from None
        raise ValueError(f"could not download {filename} of {path_or_id} and it is not cached") from None
    except EntryNotFoundError:
        if not required:
            return None
        raise ValueError(f"hub repo {path_or_id} has no {filename}; is it a diffusers model?") from None
    except OSError as error:  # repository / revision not found, gated, network errors
        raise ValueError(f"could not get {filename} of {path_or_id}: {error}") from None


def read_component_config(
    path_or_id: str, component: str, revision: str | None = None, local_files_only: bool | None = None
) -> dict:
    """A component's config.json (e.g. "vae", "text_encoder") as a dict, without loading any weights."""
    return json.loads(_fetch_file(path_or_id, f"{component}/config.json", revision, local_files_only).read_text())


def transformer_config(path_or_id: str, revision: str | None = None, local_files_only: bool | None = None) -> dict:
    """The transformer's constructor arguments, its config.json with the class's defaults filled in, without loading
    any weights."""
    from diffusers import ZImageTransformer2DModel

    config = read_component_config(path_or_id, "transformer", revision, local_files_only)
    return ZImageTransformer2DModel.extract_init_dict(config)[0]


def longest_caption(config: dict) -> int:
    """Caption tokens the transformer with this config can place: it pads a caption to a multiple of 32 and numbers
    its tokens 1.., then its image tokens after them, and every number must be below `axes_lens[0]` (the length of
    its first rotary axis; 1024 in Z-Image, so 992 tokens)."""
    return (config["axes_lens"][0] - 2) // 32 * 32


def read_model_index(path_or_id: str, revision: str | None = None, local_files_only: bool | None = None) -> dict:
    """The parsed `model_index.json` of a diffusers folder or hub repo; `ValueError` naming the path otherwise."""
    index_path = _fetch_file(path_or_id, "model_index.json", revision, local_files_only)
    try:
        index = json.loads(index_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{index_path} is not valid JSON: {error}") from None
    if not isinstance(index, dict):
        raise ValueError(f"{index_path} is not a diffusers model_index.json (expected a JSON object)")
    return index


SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
RUN_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}  # the scripts' --dtype


def run_dtype(name: str, device: torch.device) -> torch.dtype:
    """A script's --dtype (auto, bf16, fp16, fp32) for models it only runs: auto is bf16 on CUDA, fp32 elsewhere."""
    return RUN_DTYPES.get(name, torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32)


def component_weight_files(
    path_or_id: str, component: str, revision: str | None = None, local_files_only: bool | None = None
) -> dict[str, Path]:
    """{tensor name: the safetensors file holding it} for a component's weights, sharded or not (a hub id's files
    fetched, every shard: `stored_dtype` reads only the first); {} where the component has no safetensors weights."""
    from safetensors import safe_open

    for stem in ("diffusion_pytorch_model", "model"):
        index = _fetch_file(
            path_or_id, f"{component}/{stem}.safetensors.index.json", revision, local_files_only, False
        )
        weight_map = json.loads(index.read_text())["weight_map"] if index else None
        names = sorted(set(weight_map.values())) if weight_map else [f"{stem}.safetensors"]
        files = {n: _fetch_file(path_or_id, f"{component}/{n}", revision, local_files_only, False) for n in names}
        if all(files.values()):
            if weight_map:
                return {key: files[name] for key, name in weight_map.items()}
            with safe_open(str(files[names[0]]), "pt") as f:
                return dict.fromkeys(f.keys(), files[names[0]])
    return {}


def stored_dtype(
    path_or_id: str, component: str, revision: str | None = None, local_files_only: bool | None = None
) -> torch.dtype | None:
    """The dtype a component's weights are stored in (its first floating-point tensor's, read from the safetensors
    header of its first file), or None where it has no safetensors weights."""
    from safetensors import safe_open

    for stem in ("diffusion_pytorch_model", "model"):
        index = _fetch_file(
            path_or_id, f"{component}/{stem}.safetensors.index.json", revision, local_files_only, False
        )
        name = min(json.loads(index.read_text())["weight_map"].values()) if index else f"{stem}.safetensors"
        first = _fetch_file(path_or_id, f"{component}/{name}", revision, local_files_only, required=False)
        if first is not None:
            break
    if first is None:
        return None
    with safe_open(str(first), "pt") as f:
        for key in f.keys():
            dtype = SAFETENSORS_DTYPES.get(f.get_slice(key).get_dtype())
            if dtype is not None:
                return dtype
    return None


def _component_classes(index: dict) -> dict[str, str]:
    # Components are `"name": [library, class]`; None entries mark optional components left out.
    return {
        name: value[1]
        for name, value in index.items()
        if not name.startswith("_") and isinstance(value, list) and len(value) == 2 and value[1]
    }


def model_type_from_index(index: dict) -> str:
    """Model family of a parsed model_index.json: "zimage" | "sdxl" | "sd15" | "unknown"."""
    class_name = index.get("_class_name") or ""
    components = _component_classes(index)
    if class_name.startswith("ZImage") or components.get("transformer") == "ZImageTransformer2DModel":
        return "zimage"
    if class_name.startswith("StableDiffusionXL") or ("unet" in components and "text_encoder_2" in components):
        return "sdxl"
    # Checked after SDXL; SD3 has a transformer, not a unet, so it stays "unknown".
    if class_name.startswith("StableDiffusion") and "unet" in components:
        return "sd15"
    return "unknown"


def detect_model_type(path_or_id: str, revision: str | None = None, local_files_only: bool | None = None) -> str:
    """Model family of a local folder or hub id: "zimage" | "sdxl" | "sd15" | "unknown", from its model_index.json.

    Reads one small JSON file, no weights. Raises `ValueError` when the folder or its model_index.json is missing
    (or, offline, not cached).
    """
    return model_type_from_index(read_model_index(path_or_id, revision, local_files_only))


def require_zimage(path_or_id: str, revision: str | None = None, local_files_only: bool | None = None) -> None:
    """Raise `ValueError` naming the path and what it holds unless it is a Z-Image diffusers model."""
    index = read_model_index(path_or_id, revision, local_files_only)
    model_type = model_type_from_index(index)
    if model_type == "zimage":
        return
    class_name = index.get("_class_name", "missing")
    found = "is a " + MODEL_TYPE_NAMES[model_type] + " model" if model_type != "unknown" else "is not a Z-Image model"
    components = ", ".join(f"{name}={cls}" for name, cls in _component_classes(index).items()) or "none"
    raise ValueError(
        f"{path_or_id} {found} (model_index.json _class_name={class_name}; components: {components}); "
        f"this trainer needs a Z-Image model such as {ZIMAGE_EXAMPLE}"
    )


def load_text_encoder_and_tokenizer(
    path: str,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    revision: str | None = None,
    local_files_only: bool | None = None,
    trust_remote_code: bool = False,
):
    """The Qwen3 text encoder (frozen, eval mode, on `device`) and its tokenizer, as `(text_encoder, tokenizer)`.

    The encoder is loaded with `transformers.AutoModel`, i.e. the bare `Qwen3Model` the pipeline uses
    (hidden size 2560 in the real model). Weights are cast to `dtype`. On a GPU they are read straight into its
    memory (`device_map`), not into host memory first.
    """
    from transformers import AutoModel, AutoTokenizer

    offline = offline_default(local_files_only)
    tokenizer = AutoTokenizer.from_pretrained(
        path, subfolder="tokenizer", revision=revision, local_files_only=offline, trust_remote_code=trust_remote_code
    )
    device = torch.device(device)
    text_encoder = AutoModel.from_pretrained(
        path,
        subfolder="text_encoder",
        dtype=dtype,
        device_map={"": device} if device.type == "cuda" else None,
        revision=revision,
        local_files_only=offline,
        trust_remote_code=trust_remote_code,
    )
    text_encoder.to(device).eval().requires_grad_(False)
    return text_encoder, tokenizer


def load_vae(
    path: str,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    revision: str | None = None,
    local_files_only: bool | None = None,
):
    """The `AutoencoderKL` (frozen, eval mode, on `device`); 16 latent channels, 8x downsampling."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(
        path, subfolder="vae", dtype=dtype, revision=revision, local_files_only=offline_default(local_files_only)
    )
    vae.to(device).eval().requires_grad_(False)
    return vae


def load_transformer(
    path: str,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    revision: str | None = None,
    local_files_only: bool | None = None,
    single_file: str | None = None,
    quantization_config=None,
):
    """The `ZImageTransformer2DModel` with every base weight frozen (LoRA layers are added later), on `device`.

    `quantization_config`: a diffusers quantisation config applied while loading (e.g.
    `base_precision.nf4_config()`); the weights are then quantised straight onto `device`.

    `single_file`: a `.safetensors` checkpoint of the transformer alone, in the original (ComfyUI / Tongyi: fused
    `attention.qkv`, `final_layer`, optional `model.diffusion_model.` prefix) or the diffusers key layout; its
    architecture comes from `path`'s transformer/config.json, so `path` must still be a Z-Image folder or hub id.
    """
    from diffusers import ZImageTransformer2DModel

    offline = offline_default(local_files_only)
    quantized = {}
    if quantization_config is not None:
        quantized = {"quantization_config": quantization_config, "device_map": {"": str(torch.device(device))}}
    if single_file is None:
        transformer = ZImageTransformer2DModel.from_pretrained(
            path, subfolder="transformer", dtype=dtype, revision=revision, local_files_only=offline, **quantized
        )
    else:
        is_url = single_file.startswith(("https://", "http://"))
        if not is_url and not Path(single_file).expanduser().is_file():
            raise ValueError(f"single-file transformer checkpoint {single_file} does not exist")
        wrong_checkpoint = ValueError(
            f"{single_file} lacks weights of the Z-Image transformer described by {path}'s transformer/config.json; "
            f"is it a Z-Image transformer checkpoint (not another model, or a different Z-Image size)?"
        )
        try:
            transformer = ZImageTransformer2DModel.from_single_file(
                single_file if is_url else str(Path(single_file).expanduser()),
                config=path,
                subfolder="transformer",
                config_revision=revision,
                dtype=dtype,
                local_files_only=offline,
                **quantized,
            )
        except NotImplementedError as error:
            # from_single_file builds the model on the meta device, only warns about keys it cannot place, and then
            # fails casting the weights left on meta: "Cannot copy out of meta tensor".
            if "meta tensor" in str(error):
                raise wrong_checkpoint from None
            raise
        if any(tensor.is_meta for tensor in transformer.state_dict().values()):
            raise wrong_checkpoint
    if quantization_config is None:  # a quantised model is already on `device`
        transformer.to(device)
    return transformer.requires_grad_(False)


def pin_as_needed(*modules: torch.nn.Module) -> bool:
    """Whether diffusers' group offloading should pin each group as it moves (`low_cpu_mem_usage`) rather than pin a
    copy of every weight up front: pinning copies the weights before the unpinned originals are freed, so it needs
    their size again in free host RAM (and a quarter more for the rest of the process), in each of the processes
    launched on this machine (LOCAL_WORLD_SIZE, set by accelerate and torchrun), which all do so at once."""
    import psutil

    weights = sum(t.numel() * t.element_size() for m in modules for t in [*m.parameters(), *m.buffers()])
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return psutil.virtual_memory().available < 1.25 * weights * processes


def load_scheduler(path: str, revision: str | None = None, local_files_only: bool | None = None):
    """The pipeline's `FlowMatchEulerDiscreteScheduler` from `path`'s scheduler/scheduler_config.json."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler.from_pretrained(
        path, subfolder="scheduler", revision=revision, local_files_only=offline_default(local_files_only)
    )


def component_config_hash(
    path: str,
    components: tuple[str, ...] = ("vae", "text_encoder", "tokenizer"),
    revision: str | None = None,
    local_files_only: bool | None = None,
) -> str:
    """sha256 hex digest over the canonical JSON of the named components' config files, read without any weights.

    This is the cache fingerprint: latents and caption embeddings made with one VAE / text encoder / chat template
    must not be reused with another. Library-version and path keys are left out, so re-saving a model with a newer
    diffusers keeps the hash. Limit: retrained weights under an identical config hash the same.
    """
    unknown = set(components) - set(COMPONENT_CONFIG_FILES)
    if unknown:
        raise ValueError(f"unknown components {sorted(unknown)}; choose from {sorted(COMPONENT_CONFIG_FILES)}")
    contents = {}
    for component in sorted(set(components)):
        for filename, required in COMPONENT_CONFIG_FILES[component]:
            file = _fetch_file(path, filename, revision, local_files_only, required=required)
            if file is None:
                continue
            text = file.read_text()
            if filename.endswith(".json"):
                data = json.loads(text)
                contents[filename] = {k: v for k, v in data.items() if k not in VOLATILE_CONFIG_KEYS}
            else:
                contents[filename] = text
    canonical = json.dumps(contents, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()
