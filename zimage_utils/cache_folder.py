"""The cache's output folder: what a run adds to (checked against the settings it was made with), and --overwrite's
replacement, which keeps the old cache aside until the new one is written."""

import json
import logging
import os
import shutil
from pathlib import Path

import datasets

from . import cache as cache_lib
from .cache import CONFIG_NAME, DATA_DIR, MANIFEST_NAME, PROMPT_EMBEDDINGS_NAME, SHARDS_DIR
from .contact_sheet import CONTACT_SHEET_NAME

logger = logging.getLogger(__name__)

REPLACED_DIR = ".replaced"  # --overwrite: the cache being replaced, kept here until its replacement is written


def cache_entries() -> tuple[str, ...]:
    """What a cache folder holds (as --overwrite replaces it)."""
    return DATA_DIR, SHARDS_DIR, MANIFEST_NAME, PROMPT_EMBEDDINGS_NAME, CONFIG_NAME, CONTACT_SHEET_NAME


def _remove(path: Path) -> None:
    shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


def set_aside_for_overwrite(out: Path, fingerprint: dict | None = None) -> None:
    """--overwrite: the cache in `out` moved into out/.replaced (renames, so instant) instead of deleted, so that a run
    that fails before its own cache is written loses nothing (`restore_set_aside`); `drop_set_aside` removes it after.
    If an earlier --overwrite left one there unfinished, that is still the cache to keep, and what the unfinished run
    wrote is removed instead, but for its finished parts when they were made with `fingerprint` (this run's
    settings): they are this run's to merge, not to encode again."""
    aside = out / REPLACED_DIR
    if aside.is_dir():
        shards = out / SHARDS_DIR / cache_lib.SHARDS_FINGERPRINT_NAME
        made = json.loads(shards.read_text()) if shards.exists() else None
        same = fingerprint is not None and made is not None and not same_settings(fingerprint, made)
        for name in cache_entries():
            if not (same and name == SHARDS_DIR):
                _remove(out / name)
        return
    present = [name for name in cache_entries() if (out / name).exists()]
    if present:
        aside.mkdir()
        for name in present:
            os.replace(out / name, aside / name)


def restore_set_aside(out: Path) -> bool:
    """Put back the cache an unfinished --overwrite run set aside, removing what that run wrote in its place (after a
    finished one, which wrote its manifest, only drop what was set aside). True if a cache was put back."""
    aside = out / REPLACED_DIR
    if not aside.is_dir():
        return False
    if (out / MANIFEST_NAME).exists():  # the replacement was written; only the removal of the old one was cut short
        drop_set_aside(out)
        return False
    for name in cache_entries():
        _remove(out / name)
    for path in aside.iterdir():
        os.replace(path, out / path.name)
    aside.rmdir()
    return True


def drop_set_aside(out: Path) -> None:
    shutil.rmtree(out / REPLACED_DIR, ignore_errors=True)


def same_settings(fingerprint: dict, previous: dict) -> list[str]:
    """How a cache (or its parts) made with `previous` differs from one made with `fingerprint`, the model's path
    aside (the same model may be given another way): [] when it does not."""
    return cache_lib.fingerprint_mismatches(
        {k: v for k, v in fingerprint.items() if k != "model"}, {k: v for k, v in previous.items() if k != "model"}
    )


def prepare_output_dir(args, fingerprint: dict) -> datasets.Dataset | None:
    """The existing cache to extend, after checking it was made the same way (main process only)."""
    out = Path(args.output_dir)
    if args.overwrite and out.exists():
        set_aside_for_overwrite(out, fingerprint)  # (kept until the new cache is written)
    elif restore_set_aside(out):
        logger.info(f"an earlier --overwrite of {out} did not finish: the cache it was replacing is back")
    out.mkdir(parents=True, exist_ok=True)
    if cache_lib.restore_interrupted_save(out / cache_lib.DATA_DIR):
        logger.info(
            f"an earlier run was stopped while it replaced {out / cache_lib.DATA_DIR}: the previous one is back"
        )
    manifest = cache_lib.read_manifest(out)
    # An interrupted run leaves finished parts (and, on a first run, no manifest yet): they are merged into this
    # run's cache, so they must have been made the same way too.
    shards_fingerprint = out / cache_lib.SHARDS_DIR / cache_lib.SHARDS_FINGERPRINT_NAME
    found = [manifest["fingerprint"]] if manifest is not None else []
    if shards_fingerprint.exists() and any(shards_fingerprint.parent.glob("rank*")):
        found.append(json.loads(shards_fingerprint.read_text()))
    for previous in found:
        diffs = same_settings(fingerprint, previous)
        if diffs or (
            manifest is not None and manifest.get("format_version") not in cache_lib.READABLE_FORMAT_VERSIONS
        ):
            raise cache_lib.CacheError(
                f"{out} holds a cache made differently ({'; '.join(diffs) or 'older format'}): "
                "pass --overwrite to rebuild it, or choose another --output_dir."
            )
    shards_fingerprint.parent.mkdir(exist_ok=True)
    cache_lib.write_json_atomic(shards_fingerprint, fingerprint)
    if manifest is None or manifest.get("num_items") == 0:  # (older versions wrote a cache of no item)
        return None
    return datasets.load_from_disk(str(out / cache_lib.DATA_DIR))


def prepare_output_dir_readonly(output_dir: str) -> datasets.Dataset | None:
    # Same rule as the main process: data/ without a manifest is a half-written cache that will be replaced.
    data, manifest = Path(output_dir) / cache_lib.DATA_DIR, cache_lib.read_manifest(output_dir)
    has_items = manifest is not None and manifest.get("num_items") != 0
    return datasets.load_from_disk(str(data)) if data.exists() and has_items else None
