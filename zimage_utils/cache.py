"""The Arrow cache that `precompute_embeddings.py` writes and `train_zimage_lora.py` reads.

The schema lives here and only here; docs/CACHE_FORMAT.md describes it for people. Layout of a cache folder:

    manifest.json                    format version, fingerprint, counts, buckets, skipped files
    data/                            `datasets.Dataset.save_to_disk`, one record per image (FEATURES below)
    prompt_embeddings.safetensors    the empty caption (caption dropout) and the validation prompts
    shards/                          per-process parts while a run is in progress; merged into data/ at the end

Tensors are stored as raw little-endian bytes in the dtype the manifest names (bf16 by default): compact,
and decoded with one `torch.frombuffer` instead of parsing lists of floats.
"""

import json
import os
import shutil
from pathlib import Path
from typing import Any, NamedTuple

import datasets
import torch
from datasets.table import InMemoryTable
from safetensors.torch import load_file, save_file

from .cli import write_text_atomic
from .sample_prompts import SamplePrompt

CACHE_FORMAT_VERSION = 3
# the trainer still reads version 1 (no loss masks, no caption variants) and 2 (no preservation captions), and
# precompute extends them (`add_missing_columns`)
READABLE_FORMAT_VERSIONS = (1, 2, 3)
MANIFEST_NAME = "manifest.json"
DATA_DIR = "data"
SHARDS_DIR = "shards"
CONFIG_NAME = "precompute_config.yaml"  # the flags of the last run that finished, as a --config file (not read back)
SHARDS_FINGERPRINT_NAME = "fingerprint.json"  # in shards/: the settings the unfinished parts were made with
PROMPT_EMBEDDINGS_NAME = "prompt_embeddings.safetensors"
EMPTY_CAPTION_KEY = "empty_caption"

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

FEATURES = datasets.Features(
    {
        "source": datasets.Value("string"),  # path relative to the data root, or "dataset[row]"
        "content_hash": datasets.Value("string"),  # sha256 of the image file's bytes (and its mask file's)
        "caption": datasets.Value("string"),  # after prefix / default caption (the first variant)
        "bucket_height": datasets.Value("int32"),  # pixels
        "bucket_width": datasets.Value("int32"),
        "original_height": datasets.Value("int32"),  # pixels, after EXIF orientation
        "original_width": datasets.Value("int32"),
        "crop_box": datasets.Sequence(datasets.Value("float32"), length=4),  # left, top, right, bottom (original px)
        "latents": datasets.Value("binary"),  # [C, bucket_height/8, bucket_width/8]
        "latents_flipped": datasets.Value("binary"),  # same of the mirrored image; b"" when not cached
        "caption_embeds": datasets.Value("binary"),  # [caption_length, embed_dim]
        "caption_length": datasets.Value("int32"),  # tokens kept (mask == 1), <= max_sequence_length
        "caption_truncated": datasets.Value("bool"),
        "mask": datasets.Value("binary"),  # uint8 [bucket_height/f, bucket_width/f], 255 = trained; b"" when none
        "caption_variants": datasets.Sequence(datasets.Value("string")),  # the other captions (--caption_variants)
        "variant_embeds": datasets.Value("binary"),  # [sum(variant_lengths), embed_dim], one variant after the other
        "variant_lengths": datasets.Sequence(datasets.Value("int32")),  # tokens kept per variant
        # --preservation_class: the caption with its trigger replaced by the class ("" when none), its embedding
        # [preservation_length, embed_dim] (b"" when none) and tokens kept (0 when none)
        "preservation_caption": datasets.Value("string"),
        "preservation_embeds": datasets.Value("binary"),
        "preservation_length": datasets.Value("int32"),
    }
)
# what each column added since version 1 holds in a record of an older cache
ADDED_COLUMN_DEFAULTS = {
    "mask": b"",
    "caption_variants": [],
    "variant_embeds": b"",
    "variant_lengths": [],
    "preservation_caption": "",
    "preservation_embeds": b"",
    "preservation_length": 0,
}


class CacheError(ValueError):
    """A cache that is missing, stale or made for another model; the message names the folder and the fix."""


def tensor_to_bytes(tensor: torch.Tensor, dtype: torch.dtype) -> bytes:
    """Raw bytes of `tensor` cast to `dtype` (shape is not stored: the record's other fields give it)."""
    return tensor.detach().to("cpu", dtype).contiguous().view(torch.uint8).numpy().tobytes()


def bytes_to_tensor(data: bytes, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of `tensor_to_bytes`: a new tensor (the Arrow buffer is read-only, so it is copied)."""
    return torch.frombuffer(bytearray(data), dtype=dtype).reshape(shape)


def records_to_dataset(records: list[dict[str, Any]], fingerprint: str) -> datasets.Dataset:
    """A dataset of cache records (dicts of FEATURES), built column by column in Arrow. `Dataset.from_list` gives
    the same table but also hashes every byte of it to make a fingerprint: ~1 s for 256 records at 1024²."""
    columns = {name: [record[name] for record in records] for name in FEATURES}
    table = InMemoryTable.from_pydict(columns, schema=FEATURES.arrow_schema)
    return datasets.Dataset(table, info=datasets.DatasetInfo(features=FEATURES), fingerprint=fingerprint)


def add_missing_columns(dataset: datasets.Dataset) -> datasets.Dataset:
    """An older cache's records with the columns added since (`ADDED_COLUMN_DEFAULTS`), so that new records can be
    merged into it (the columns come in FEATURES' order: each was added at the end)."""
    for name, default in ADDED_COLUMN_DEFAULTS.items():
        if name not in dataset.column_names:
            dataset = dataset.add_column(name, [default] * len(dataset), feature=FEATURES[name])
    return dataset


def latent_shape(record: dict[str, Any], manifest: dict[str, Any]) -> tuple[int, int, int]:
    """[C, H/f, W/f] of a record's latents, f being the VAE's downsampling factor recorded in the manifest."""
    f = manifest["fingerprint"]["vae_downsample"]
    return (manifest["fingerprint"]["latent_channels"], record["bucket_height"] // f, record["bucket_width"] // f)


def decode_record(record: dict[str, Any], manifest: dict[str, Any]) -> dict[str, Any]:
    """Tensors of one cache record, in the stored dtypes: `latents` [C, h, w], `latents_flipped` [C, h, w] or None
    when the cache has no mirrored latents, `caption_embeds` [L, D], and `mask` uint8 [1, h, w] (the loss weight of
    each latent pixel, 0-255) or None when the item has no loss mask, and `caption_variants`: the [L_i, D] embeddings
    of the item's other captions ([] when it has none), `preservation_embeds` [L, D] or None (see FEATURES)."""
    fp = manifest["fingerprint"]
    dtype, shape = DTYPES[fp["latent_dtype"]], latent_shape(record, manifest)
    flipped, mask = record["latents_flipped"], record.get("mask")  # (version 1 has no mask column)
    lengths, variants = record.get("variant_lengths") or [], []  # (nor variants)
    if lengths:
        embed_shape = (sum(lengths), fp["embed_dim"])
        variants = list(
            bytes_to_tensor(record["variant_embeds"], DTYPES[fp["embedding_dtype"]], embed_shape).split(lengths)
        )
    preservation = record.get("preservation_embeds")  # (versions 1 and 2 have none)
    return {
        "preservation_embeds": bytes_to_tensor(
            preservation, DTYPES[fp["embedding_dtype"]], (record["preservation_length"], fp["embed_dim"])
        )
        if preservation
        else None,
        "caption_variants": variants,
        "mask": bytes_to_tensor(mask, torch.uint8, (1, *shape[1:])) if mask else None,
        "latents": bytes_to_tensor(record["latents"], dtype, shape),
        "latents_flipped": bytes_to_tensor(flipped, dtype, shape) if flipped else None,
        "caption_embeds": bytes_to_tensor(
            record["caption_embeds"], DTYPES[fp["embedding_dtype"]], (record["caption_length"], fp["embed_dim"])
        ),
    }


def count_masked(dataset: datasets.Dataset) -> int:
    """Records holding a loss mask, counted in Arrow (without reading the masks into Python)."""
    if "mask" not in dataset.column_names:
        return 0
    import pyarrow.compute as pc

    return int(pc.sum(pc.greater(pc.binary_length(dataset.data.column("mask")), 0)).as_py() or 0)


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write JSON to a temporary name beside `path`, then rename, so a crash never leaves half a file."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True))


def save_dataset_atomic(dataset: datasets.Dataset, target: str | Path) -> None:
    """`save_to_disk` into a temporary folder, then swap it in place of `target`."""
    target = Path(target)
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    old = target.with_name(f".{target.name}.old{os.getpid()}")
    restore_interrupted_save(target)
    for kind in ("tmp", "old"):  # what a crashed save left, whatever its process
        for stale in target.parent.glob(f".{target.name}.{kind}*"):
            shutil.rmtree(stale, ignore_errors=True)
    dataset.save_to_disk(str(tmp))
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def restore_interrupted_save(target: str | Path) -> bool:
    """Put back the folder `save_dataset_atomic` had moved aside when a kill came between its two renames (`target`
    missing, its `.NAME.old*` there): what the manifest beside it describes. True if it did."""
    target = Path(target)
    aside = sorted(target.parent.glob(f".{target.name}.old*"), key=lambda p: p.stat().st_mtime)
    if target.exists() or not aside:
        return False
    os.replace(aside[-1], target)
    return True


def read_manifest(cache_dir: str | Path) -> dict[str, Any] | None:
    path = Path(cache_dir) / MANIFEST_NAME
    return json.loads(path.read_text()) if path.exists() else None


def fingerprint_mismatches(expected: dict[str, Any], found: dict[str, Any]) -> list[str]:
    """Human-readable differences between two fingerprints ("resolution: cache 512, now 1024")."""
    keys = sorted(set(expected) | set(found))
    return [f"{k}: cache {found.get(k)!r}, now {expected.get(k)!r}" for k in keys if expected.get(k) != found.get(k)]


def load_cache(cache_dir: str | Path, expected_fingerprint: dict[str, Any] | None = None):
    """Open a finished cache: (`datasets.Dataset`, manifest). Checks the format version and, when given, that
    the fingerprint matches the model about to be trained (only the keys given are compared)."""
    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir():
        raise CacheError(
            f"{cache_dir} does not exist: give --precomputed_dir the --output_dir of a precompute_embeddings.py run."
        )
    manifest = read_manifest(cache_dir)
    if manifest is not None and not (cache_dir / DATA_DIR).exists() and any(cache_dir.glob(f".{DATA_DIR}.old*")):
        raise CacheError(
            f"{cache_dir}: a precompute was stopped while it replaced {DATA_DIR}/ (the previous one is in "
            f".{DATA_DIR}.old*): re-run precompute_embeddings.py there, which puts it back and goes on."
        )
    if manifest is None or not (cache_dir / DATA_DIR).exists():
        raise CacheError(
            f"{cache_dir} is not a finished embedding cache (no {MANIFEST_NAME} or {DATA_DIR}/): "
            "run precompute_embeddings.py with --output_dir pointing there first."
        )
    if manifest.get("format_version") not in READABLE_FORMAT_VERSIONS:
        raise CacheError(
            f"{cache_dir} has cache format {manifest.get('format_version')}, this code reads "
            f"{' and '.join(map(str, READABLE_FORMAT_VERSIONS))}: re-run precompute_embeddings.py with --overwrite."
        )
    if manifest.get("num_items") == 0:  # written by versions before 2026-12-03, which saved a cache of no item
        raise CacheError(
            f"{cache_dir} holds no items: every image was skipped when it was made (its {MANIFEST_NAME} lists why). "
            "Fix them and re-run precompute_embeddings.py with --overwrite."
        )
    if expected_fingerprint is not None:
        found = {k: manifest["fingerprint"].get(k) for k in expected_fingerprint}
        diffs = fingerprint_mismatches(expected_fingerprint, found)
        if diffs:
            raise CacheError(
                f"The cache in {cache_dir} was made for another model or settings ({'; '.join(diffs)}). "
                "Re-run precompute_embeddings.py with the model you train, or point --precomputed_dir at its cache."
            )
    return datasets.load_from_disk(str(cache_dir / DATA_DIR)), manifest


class CachedPrompt(NamedTuple):
    """A validation prompt as a cache holds it: the line's text and settings, the text's embedding [L, D], and its
    --n negative prompt's embedding [L_n, D] (None: the line gave none; the empty caption is used)."""

    prompt: SamplePrompt
    embeds: torch.Tensor
    negative_embeds: torch.Tensor | None = None


def save_prompt_embeddings(
    cache_dir: str | Path, empty: torch.Tensor, prompts: list[CachedPrompt], dtype: torch.dtype
) -> None:
    """Store the empty-caption embedding [L0, D] and each validation prompt's [L_i, D] (and its negative's), with
    the prompts' texts and settings, so that training never needs the text encoder."""
    tensors = {EMPTY_CAPTION_KEY: empty}
    for i, cached in enumerate(prompts):
        tensors[f"validation_{i}"] = cached.embeds
        if cached.negative_embeds is not None:
            tensors[f"validation_negative_{i}"] = cached.negative_embeds
    tensors = {k: t.to("cpu", dtype).contiguous() for k, t in tensors.items()}
    metadata = {
        "validation_prompts": json.dumps([c.prompt.text for c in prompts]),
        "validation_options": json.dumps([c.prompt.options() for c in prompts]),
    }
    path = Path(cache_dir) / PROMPT_EMBEDDINGS_NAME
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def load_prompt_embeddings(cache_dir: str | Path) -> tuple[torch.Tensor, list[CachedPrompt]]:
    """(empty-caption embedding, the validation prompts in order). Caches made before per-prompt settings hold
    none: every prompt then takes the run's."""
    from safetensors import safe_open

    path = Path(cache_dir) / PROMPT_EMBEDDINGS_NAME
    if not path.exists():
        raise CacheError(
            f"{path} is missing: re-run precompute_embeddings.py (it writes the empty-caption embedding)."
        )
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    texts = json.loads(metadata.get("validation_prompts", "[]"))
    options = json.loads(metadata.get("validation_options", "null")) or [{}] * len(texts)
    tensors = load_file(str(path))
    prompts = [
        CachedPrompt(SamplePrompt(text, **opts), tensors[f"validation_{i}"], tensors.get(f"validation_negative_{i}"))
        for i, (text, opts) in enumerate(zip(texts, options, strict=True))
    ]
    return tensors[EMPTY_CAPTION_KEY], prompts
