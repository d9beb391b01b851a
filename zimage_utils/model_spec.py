"""The SAI model spec (github.com/Stability-AI/ModelSpec): `modelspec.*` safetensors metadata by which SwarmUI, LoRA
browsers and model sites tell what a file is (a Z-Image LoRA) and show its title, trigger phrase and usage, and by
which anyone can check that a file arrived whole (`modelspec.hash_sha256`, over the tensor bytes). The trainer and
lora_tools.py write it into both LoRA files; `lora_io.save_safetensors_atomic` fills in the hash.
"""

import argparse
import base64
import datetime
import hashlib
import io
from pathlib import Path

import safetensors.torch
import torch

SPEC_KEY = "modelspec.sai_model_spec"
SPEC_VERSION = "1.0.0"
HASH_KEY = "modelspec.hash_sha256"
TITLE_KEY = "modelspec.title"
THUMBNAIL_KEY = "modelspec.thumbnail"
THUMBNAIL_SIDE = 256  # the spec's recommended size: a few tens of kB in each file's header as JPEG
# SwarmUI's class id for Z-Image LoRAs (it lower-cases the id it reads; musubi-tuner writes "Z-Image/lora").
ARCHITECTURE = "z-image/lora"
# The official code: the module names in our keys, after the `transformer.` / `diffusion_model.` prefix, are its own.
IMPLEMENTATION = "https://github.com/Tongyi-MAI/Z-Image"


def add_metadata_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """What the LoRA files say about the LoRA, for train_zimage_lora.py and lora_tools.py (kohya's flag names)."""
    parser.add_argument(
        "--metadata_title",
        default=None,
        help="The LoRA's title, which LoRA browsers such as SwarmUI list. Default: the output folder's name "
        "(train_zimage_lora.py adds ', step N' in the files and heads the model card with it; lora_tools.py convert "
        "keeps the source's).",
    )
    parser.add_argument("--metadata_author", default=None, help="Your name or handle.")
    parser.add_argument(
        "--metadata_description",
        default=None,
        help="What the LoRA does (the trainer's model card shows it too). Default: what was trained, on which model "
        "(lora_tools.py: the source's).",
    )
    parser.add_argument(
        "--metadata_license",
        default=None,
        help="The LoRA's licence (the trainer's model card header too): a hub licence id such as apache-2.0 "
        "(--push_to_hub asks the hub when the run starts, as it refuses a card with another).",
    )


def given_metadata(args: argparse.Namespace) -> dict[str, str]:
    """The spec's keys that `--metadata_*` set (those given), to lay over a LoRA's own."""
    given = {"title": args.metadata_title, "author": args.metadata_author}
    given |= {"description": args.metadata_description, "license": args.metadata_license}
    return {f"modelspec.{k}": v for k, v in given.items() if v}


def model_spec(
    title: str,
    *,
    resolution: int | None = None,
    trigger_phrase: str = "",
    usage_hint: str = "",
    description: str = "",
    author: str = "",
    license: str = "",
    merged_from: str = "",
) -> dict[str, str]:
    """The spec's keys for a Z-Image LoRA saved now (str → str, for safetensors metadata); empty optional values are
    left out. `resolution`: the side of the largest square trained on, in pixels."""
    spec = {
        SPEC_KEY: SPEC_VERSION,
        "modelspec.architecture": ARCHITECTURE,
        "modelspec.implementation": IMPLEMENTATION,
        TITLE_KEY: title,
        "modelspec.date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    optional = {
        "modelspec.resolution": f"{resolution}x{resolution}" if resolution else "",
        "modelspec.trigger_phrase": trigger_phrase,
        "modelspec.usage_hint": usage_hint,
        "modelspec.description": description,
        "modelspec.author": author,
        "modelspec.license": license,
        "modelspec.merged_from": merged_from,
    }
    return spec | {k: v for k, v in optional.items() if v}


def thumbnail(image) -> str:
    """A PIL image as the spec's thumbnail: a JPEG data URL, at most THUMBNAIL_SIDE pixels a side."""
    small = image.convert("RGB")
    small.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
    buffer = io.BytesIO()
    small.save(buffer, format="JPEG", quality=85, subsampling=0)  # (4:4:4: sharp colour edges stay sharp)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def tensor_hash(tensors: dict[str, torch.Tensor]) -> str:
    """The spec's hash_sha256 of the file safetensors writes for `tensors` (CPU, contiguous): "0x" + the SHA-256 of
    the bytes after its header, which the metadata does not change."""
    data = safetensors.torch.save(tensors)
    header = int.from_bytes(data[:8], "little")
    return "0x" + hashlib.sha256(memoryview(data)[8 + header :]).hexdigest()


def file_hash(path: str | Path) -> str:
    """The same hash read back from a safetensors file, in 16 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(8 + int.from_bytes(f.read(8), "little"))
        while chunk := f.read(16 << 20):
            digest.update(chunk)
    return "0x" + digest.hexdigest()
