"""precompute_embeddings.py end to end on the tiny model: what a user's folder becomes in the cache, what the cached
tensors mean, and how re-runs, crashes, changed settings and several processes behave.

Runs call the script in-process: `precompute_embeddings.main(precompute_embeddings.parse_args([...]))`.
"""

import hashlib
import json
import logging
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
import yaml
from conftest import (
    LATENT_TOLERANCE,
    LAUNCHES_CPU_PROCESSES,
    SCRIPT_DEVICE,
    SCRIPT_DTYPE,
    pipeline_embeddings,
    script_pipeline,
)
from PIL import Image

import precompute_embeddings
from zimage_utils import cache as cache_lib
from zimage_utils.buckets import plan_crop, resize_and_crop
from zimage_utils.cache_folder import REPLACED_DIR, restore_set_aside, set_aside_for_overwrite
from zimage_utils.latents import encode_images, pil_to_tensor
from zimage_utils.model_loading import load_vae
from zimage_utils.precompute import ShardWriter, encode_ahead, load_shards
from zimage_utils.sample_prompts import SamplePrompt

REPO_ROOT = Path(precompute_embeddings.__file__).resolve().parent


def precompute(model_dir, output_dir, *extra, data_dir=None):
    """One in-process run at resolution 64 without worker processes; `extra` flags override these defaults."""
    args = [
        "--pretrained_model_name_or_path", str(model_dir),
        "--output_dir", str(output_dir),
        "--resolution", "64",
        "--dataloader_num_workers", "0",
    ]  # fmt: skip
    if data_dir is not None:
        args += ["--train_data_dir", str(data_dir)]
    precompute_embeddings.main(precompute_embeddings.parse_args(args + [str(a) for a in extra]))
    return output_dir


def load(cache_dir):
    """({source: record}, manifest) of a finished cache."""
    dataset, manifest = cache_lib.load_cache(cache_dir)
    return {record["source"]: record for record in dataset}, manifest


def new_and_kept(caplog) -> tuple[int, int]:
    """(new, kept) from the last run's summary line "cache DIR: N items (new new, kept kept), ..."."""
    counts = re.findall(r"\((\d+) new, (\d+) kept\)", caplog.text)
    caplog.clear()
    return tuple(map(int, counts[-1]))


@pytest.fixture
def summary(caplog):
    caplog.set_level(logging.INFO, logger="precompute")
    return caplog


@pytest.fixture
def encoded_sources(monkeypatch):
    """Sources passed to the encoder, per run: wraps the script's encode_batch without changing what it does."""
    seen = []
    real = precompute_embeddings.encode_batch

    def recording(batch, *args, **kwargs):
        seen.extend(p.item.source for p in batch["planned"])
        return real(batch, *args, **kwargs)

    monkeypatch.setattr(precompute_embeddings, "encode_batch", recording)
    return seen


def _noise(width, height, mode="RGB", seed=0):
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode)


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------------------------------------
# A messy folder

LONG_CAPTION = "a small blue square on a green background, " * 10  # far over 32 tokens
CONVERTED = {  # file → what the manifest note says was done to it
    "cmyk.jpg": "CMYK → RGB",
    "rgba.png": "RGBA → RGB",
    "gray.png": "L → RGB",
    "palette.png": "P → RGB",
    "rotated.jpg": "rotated upright (EXIF orientation 6)",
}


@pytest.fixture
def messy_folder(tmp_path, tiny_data_dir):
    """Two good images plus one of each case a user's folder can hold; all big enough for resolution 64."""
    root = tmp_path / "messy"
    root.mkdir()
    for name in ("shape_000", "shape_001"):
        shutil.copy(tiny_data_dir / f"{name}.png", root)
        shutil.copy(tiny_data_dir / f"{name}.txt", root)

    (root / "corrupt.jpg").write_bytes(random.Random(0).randbytes(2000))
    _noise(96, 96).save(root / "full.jpg", quality=95)
    (root / "truncated.jpg").write_bytes((root / "full.jpg").read_bytes()[:3000])
    (root / "full.jpg").unlink()
    _noise(24, 24).save(root / "small.png")  # a 64x64 bucket needs x2.7 > --max_upscale 2

    Image.new("CMYK", (64, 64), (0, 255, 255, 0)).save(root / "cmyk.jpg")
    rgba = Image.new("RGBA", (64, 64), (255, 0, 0, 255))
    rgba.paste((0, 0, 0, 0), (0, 0, 32, 64))
    rgba.save(root / "rgba.png")
    Image.new("L", (64, 64), 128).save(root / "gray.png")
    palette = Image.new("P", (64, 64), 0)
    palette.putpalette([200, 30, 30, 0, 0, 255] + [0] * 762)
    palette.paste(1, (32, 0, 64, 64))
    palette.save(root / "palette.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # a phone portrait: stored 96 wide x 48 high, displayed 48 wide x 96 high
    _noise(96, 48).save(root / "rotated.jpg", exif=exif)

    _noise(64, 64, seed=1).save(root / "empty_caption.png")
    _noise(64, 64, seed=2).save(root / "no_caption.png")
    _noise(64, 64, seed=3).save(root / "long_caption.png")

    for image in root.glob("*.*"):
        if image.suffix != ".txt" and image.stem not in ("shape_000", "shape_001", "no_caption"):
            image.with_suffix(".txt").write_text("a small red square")
    (root / "empty_caption.txt").write_text("  \n")
    (root / "long_caption.txt").write_text(LONG_CAPTION)
    return root


def test_a_messy_folder_is_cached_with_every_bad_file_reported_by_name_and_fix(tiny_model_dir, messy_folder, tmp_path):
    # Two DataLoader workers decode the images here, as in a real run.
    flags = ["--max_sequence_length", 32, "--dataloader_num_workers", 2]
    out = precompute(tiny_model_dir, tmp_path / "cache", *flags, data_dir=messy_folder)
    records, manifest = load(out)

    skipped = {s["source"]: s["reason"] for s in manifest["skipped"]}
    assert set(skipped) == {"corrupt.jpg", "truncated.jpg", "small.png", "empty_caption.png", "no_caption.png"}
    assert "re-export" in skipped["corrupt.jpg"] and "re-export" in skipped["truncated.jpg"]
    assert "--max_upscale" in skipped["small.png"] and "lower --resolution" in skipped["small.png"]
    assert (
        skipped["empty_caption.png"].startswith("empty caption")
        and "--default_caption" in skipped["empty_caption.png"]
    )
    assert skipped["no_caption.png"].startswith("missing caption") and "--default_caption" in skipped["no_caption.png"]

    assert set(records) == {"shape_000.png", "shape_001.png", "long_caption.png", *CONVERTED}
    assert manifest["num_items"] == len(records) == 8
    # The run's own figures: where its time went, from the process start on (a launcher's share is before it)
    run = manifest["last_run"]
    assert run["images"] == 8 and run["processes"] == 1
    assert set(run["seconds"]) == {"scan", "load", "encode", "merge", "total"}
    assert all(v >= 0 for v in [*run["seconds"].values(), *run["startup_seconds"].values()])
    assert run["process_started_at"] < run["finished_at"] - run["seconds"]["total"] <= time.time()
    notes = {n["source"]: n["reason"] for n in manifest["notes"]}
    for source, what in CONVERTED.items():
        assert what in notes[source]

    rotated = records["rotated.jpg"]
    assert (rotated["original_height"], rotated["original_width"]) == (96, 48)
    assert rotated["bucket_height"] > rotated["bucket_width"]  # a portrait bucket

    long = records["long_caption.png"]
    assert long["caption_truncated"] and long["caption_length"] == 32
    assert not any(r["caption_truncated"] for s, r in records.items() if s != "long_caption.png")
    assert all(r["caption_length"] < 32 for s, r in records.items() if s != "long_caption.png")

    # A re-run encodes nothing new and still reports every skipped and converted file.
    precompute(tiny_model_dir, out, *flags, data_dir=messy_folder)
    _, rerun = load(out)
    assert rerun["skipped"] == manifest["skipped"] and rerun["notes"] == manifest["notes"]


def test_default_caption_caches_the_images_that_have_none(tiny_model_dir, messy_folder, tmp_path):
    out = precompute(tiny_model_dir, tmp_path / "cache", "--default_caption", "a photo", data_dir=messy_folder)
    records, manifest = load(out)

    assert records["no_caption.png"]["caption"] == records["empty_caption.png"]["caption"] == "a photo"
    assert {s["source"] for s in manifest["skipped"]} == {"corrupt.jpg", "truncated.jpg", "small.png"}
    notes = {n["source"]: n["reason"] for n in manifest["notes"]}
    assert notes["no_caption.png"] == "missing caption, used --default_caption"
    assert notes["empty_caption.png"] == "empty caption, used --default_caption"


# ----------------------------------------------------------------------------------------------------------
# What the cached tensors are


def _cropped_pixels(data_dir, record) -> torch.Tensor:
    """[1, 3, H, W] in [-1, 1]: the record's image, center-cropped to its bucket as the script does."""
    image = Image.open(data_dir / record["source"]).convert("RGB")
    bucket = (record["bucket_height"], record["bucket_width"])
    crop = plan_crop(image.height, image.width, bucket, "center")
    assert record["crop_box"] == pytest.approx(crop.to_original(image.height, image.width))
    return pil_to_tensor(resize_and_crop(image, crop))[None]


def test_cached_records_decode_to_the_vae_latents_of_the_cropped_image(tiny_model_dir, tiny_data_dir, tiny_cache_dir):
    records, manifest = load(tiny_cache_dir)
    assert len(records) == 12 and manifest["fingerprint"]["latent_dtype"] == "bf16"
    vae = load_vae(str(tiny_model_dir), SCRIPT_DTYPE, SCRIPT_DEVICE)

    for source in ("shape_000.png", "shape_001.png", "shape_003.png"):  # 64x64, 64x96 and 48x112 originals
        record = records[source]
        tensors = cache_lib.decode_record(record, manifest)
        h, w = record["bucket_height"], record["bucket_width"]
        assert tensors["latents"].shape == (16, h // 8, w // 8) and tensors["latents"].dtype == torch.bfloat16
        assert tensors["caption_embeds"].shape == (record["caption_length"], 16)
        assert tensors["caption_embeds"].dtype == torch.bfloat16

        pixels = _cropped_pixels(tiny_data_dir, record).to(SCRIPT_DEVICE, SCRIPT_DTYPE)
        expected = encode_images(vae, pixels)[0].float().cpu()
        torch.testing.assert_close(tensors["latents"].float(), expected, **LATENT_TOLERANCE)


def test_fp32_cache_holds_the_pipeline_caption_embeddings_bit_for_bit_and_the_vae_latents(
    tiny_model_dir, tiny_data_dir, tmp_path
):
    # Validation prompts too: a plain one, and from a file one with settings of its own (kohya's syntax)
    prompt_file = tmp_path / "samples.txt"
    prompt_file.write_text("# sample prompts\na blue square --w 32 --h 48 --d 5 --s 3 --l 2.5 --n blurry, dark\n")
    out = precompute(
        tiny_model_dir,
        tmp_path / "cache",
        *("--cache_dtype", "fp32", "--validation_prompts", "a red circle", "--validation_prompt_file", prompt_file),
        data_dir=tiny_data_dir,
    )
    records, manifest = load(out)
    pipe = script_pipeline(tiny_model_dir)
    vae = pipe.vae

    for record in list(records.values())[:4]:
        tensors = cache_lib.decode_record(record, manifest)
        assert torch.equal(tensors["caption_embeds"], pipeline_embeddings(pipe, record["caption"]))

        # The pipeline's inverse of the cached latents (fp32 storage: exact) is the VAE's latent of the cropped image.
        pixels = _cropped_pixels(tiny_data_dir, record).to(SCRIPT_DEVICE, SCRIPT_DTYPE)
        with torch.no_grad():
            expected = vae.encode(pixels).latent_dist.mode()[0].float().cpu()
        unscaled = tensors["latents"] / vae.config.scaling_factor + vae.config.shift_factor
        tolerance = dict(rtol=1e-5, atol=1e-5) if SCRIPT_DTYPE == torch.float32 else LATENT_TOLERANCE
        torch.testing.assert_close(unscaled, expected, **tolerance)

    empty, validation = cache_lib.load_prompt_embeddings(out)
    assert torch.equal(empty, pipeline_embeddings(pipe, ""))
    with_settings = SamplePrompt("a blue square", "blurry, dark", width=32, height=48, seed=5, steps=3, guidance=2.5)
    assert [p.prompt for p in validation] == [SamplePrompt("a red circle"), with_settings]
    assert all(torch.equal(p.embeds, pipeline_embeddings(pipe, p.prompt.text)) for p in validation)
    assert validation[0].negative_embeds is None
    assert torch.equal(validation[1].negative_embeds, pipeline_embeddings(pipe, "blurry, dark"))
    # The manifest and the config that re-runs it list the lines themselves (the file is read once)
    lines = ["a red circle", "a blue square --w 32 --h 48 --d 5 --s 3 --l 2.5 --n blurry, dark"]
    assert cache_lib.read_manifest(out)["validation_prompts"] == lines
    config = yaml.safe_load((out / cache_lib.CONFIG_NAME).read_text())
    assert config["validation_prompts"] == lines and "validation_prompt_file" not in config


def test_validation_prompts_take_the_trigger_word_for_trigger_and_a_note_says_when_none_holds_it(
    tiny_model_dir, tmp_path, summary, capsys
):
    from zimage_utils.tiny import make_synthetic_dataset

    data = make_synthetic_dataset(tmp_path / "data", num_images=2)
    prompts = ["a photo of [trigger] --w 32", "a red circle"]  # as in captions (ai-toolkit's placeholder)
    out = precompute(tiny_model_dir, tmp_path / "a", "--caption_prefix", "sks", "--validation_prompts", *prompts,
                     data_dir=data)  # fmt: skip
    _, cached = cache_lib.load_prompt_embeddings(out)
    assert [(p.prompt.text, p.prompt.width) for p in cached] == [("a photo of sks", 32), ("a red circle", None)]
    assert "holds the trigger" not in summary.text
    precompute(tiny_model_dir, tmp_path / "b", "--caption_prefix", "sks", "--validation_prompts", "a red circle",
               data_dir=data)  # fmt: skip
    assert "note: no --validation_prompts holds the trigger 'sks' (or [trigger]): the samples will not show" in (
        summary.text
    )
    with pytest.raises(SystemExit):
        precompute_embeddings.parse_args(
            ["--pretrained_model_name_or_path", str(tiny_model_dir), "--train_data_dir", str(data)]
            + ["--output_dir", str(tmp_path / "c"), "--validation_prompts", "[trigger], smiling"]
        )
    assert "a validation prompt holds [trigger], which --caption_prefix replaces: give --caption_prefix" in (
        capsys.readouterr().err
    )


def test_a_bad_validation_prompt_setting_stops_precompute_before_anything_loads(tiny_data_dir, tmp_path, capsys):
    (tmp_path / "samples.txt").write_text("a red circle\n# a comment\na blue square --fs 3\n")
    flags = ["--pretrained_model_name_or_path", str(tmp_path / "no_model"), "--train_data_dir", str(tiny_data_dir)]
    flags += ["--output_dir", str(tmp_path / "cache")]
    for prompt_flags, message in [
        (["--validation_prompts", "a red circle --w 1020"], "--validation_prompts, prompt 1 ('a red circle --w 1020')"
         ": --w 1020: sides are positive multiples of 16 (VAE and 2x2 patches), e.g. 1024"),
        (["--validation_prompt_file", str(tmp_path / "samples.txt")], f"--validation_prompt_file {tmp_path}/samples.txt"
         ", prompt 2 ('a blue square --fs 3'): unknown option --fs"),
    ]:  # fmt: skip
        with pytest.raises(SystemExit):
            precompute_embeddings.parse_args(flags + prompt_flags)
        assert message in capsys.readouterr().err


def test_validation_prompt_embeddings_are_cached_in_order(tiny_cache_dir):
    empty, validation = cache_lib.load_prompt_embeddings(tiny_cache_dir)
    prompts = cache_lib.read_manifest(tiny_cache_dir)["validation_prompts"]
    assert len(prompts) == 2 and [p.prompt.text for p in validation] == prompts
    assert empty.shape[1] == 16 and all(p.embeds.shape[1] == 16 for p in validation)


# ----------------------------------------------------------------------------------------------------------
# Re-runs


def test_a_rerun_encodes_only_new_and_changed_images(
    tiny_model_dir, tiny_data_dir, tmp_path, summary, encoded_sources
):
    data = shutil.copytree(tiny_data_dir, tmp_path / "data")
    out = precompute(tiny_model_dir, tmp_path / "cache", data_dir=data)
    assert new_and_kept(summary) == (12, 0)

    precompute(tiny_model_dir, out, data_dir=data)
    assert new_and_kept(summary) == (0, 12)

    encoded_sources.clear()
    shutil.copy(data / "shape_000.png", data / "added.png")
    (data / "added.txt").write_text("a new image")
    changed = Image.open(data / "shape_005.png")
    changed.putpixel((0, 0), (1, 2, 3))
    changed.save(data / "shape_005.png")
    (data / "shape_007.txt").write_text("a better caption")  # an edited caption is re-encoded too
    # this time from the flags the last run left in the cache (the same run, as a --config file)
    config = out / cache_lib.CONFIG_NAME
    assert yaml.safe_load(config.read_text())["train_data_dir"] == str(data)
    precompute_embeddings.main(precompute_embeddings.parse_args(["--config", str(config)]))

    assert sorted(encoded_sources) == ["added.png", "shape_005.png", "shape_007.png"]
    log = summary.text
    assert new_and_kept(summary) == (3, 10)
    dataset, manifest = cache_lib.load_cache(out)
    assert len(dataset) == manifest["num_items"] == 13
    assert dataset["source"] == sorted(set(dataset["source"]))  # unique, sorted
    records = {r["source"]: r for r in dataset}
    assert records["shape_005.png"]["content_hash"] == _sha256(data / "shape_005.png")
    assert records["shape_007.png"]["caption"] == "a better caption"
    # added.png is a copy of shape_000.png: noted on the later in source order, as it trains that image twice as often
    copy_note = [n for n in manifest["notes"] if n["reason"].startswith("the same image file as")]
    assert copy_note == [
        {
            "source": "shape_000.png",
            "reason": "the same image file as added.png: the image trains 2x as often as one without copies "
            "(delete the copies, unless that is what you want)",
        }
    ]
    assert "shape_000.png: the same image file as added.png" in log
    (data / "added.png").unlink()  # the note goes with the copy (nothing re-encoded)
    precompute(tiny_model_dir, out, data_dir=data)
    assert not [n for n in cache_lib.read_manifest(out)["notes"] if "same image file" in n["reason"]]


def test_a_rerun_drops_images_deleted_or_broken_since_unless_told_to_keep_them(
    tiny_model_dir, tiny_data_dir, tmp_path, summary
):
    """The cache follows the folder: a photo the user deleted (or that no longer opens) is not trained on."""
    data = shutil.copytree(tiny_data_dir, tmp_path / "data")
    out = precompute(tiny_model_dir, tmp_path / "cache", data_dir=data)
    (data / "shape_001.png").unlink()
    (data / "shape_001.txt").unlink()
    (data / "shape_002.png").write_bytes(b"not a PNG any more")

    precompute(tiny_model_dir, out, "--keep_missing", data_dir=data)
    dataset, manifest = cache_lib.load_cache(out)
    assert len(dataset) == 12 and manifest["last_run"]["dropped"] == []
    assert [s["source"] for s in manifest["skipped"]] == ["shape_002.png"]

    precompute(tiny_model_dir, out, data_dir=data)
    dataset, manifest = cache_lib.load_cache(out)
    assert manifest["last_run"]["dropped"] == ["shape_001.png", "shape_002.png"]
    assert "dropped 2 cached item(s) whose image is gone or now skipped" in summary.text
    assert len(dataset) == manifest["num_items"] == 10
    assert "shape_001.png" not in dataset["source"] and "shape_002.png" not in dataset["source"]
    assert sum(manifest["buckets"].values()) == 10


def test_a_run_that_can_cache_no_image_says_why_and_writes_nothing(tiny_model_dir, tiny_data_dir, tmp_path, summary):
    # A first run at the default resolution on small images: every one is below its bucket
    with pytest.raises(
        ValueError,
        match=r"cached in .*new: all 12 were skipped \(.*shape_000.png: image is 64x64.*lower --resolution\)",
    ):
        precompute(tiny_model_dir, tmp_path / "new", "--resolution", "256", data_dir=tiny_data_dir)
    assert not (tmp_path / "new").exists()
    assert summary.text.count("smaller than its") == 12  # each one listed, with the fix

    # A re-run after the captions went missing keeps the cache it had, instead of writing one of 0 items
    data = shutil.copytree(tiny_data_dir, tmp_path / "data")
    out = precompute(tiny_model_dir, tmp_path / "cache", data_dir=data)
    before = {p.name: p.stat().st_mtime_ns for p in out.rglob("*")}
    for caption in data.glob("*.txt"):
        caption.unlink()
    with pytest.raises(ValueError, match="all 12 were skipped .*, and the cache there is as it was"):
        precompute(tiny_model_dir, out, data_dir=data)
    assert {p.name: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    assert len(cache_lib.load_cache(out)[0]) == 12


def test_a_cache_of_no_item_from_an_older_version_is_refused_with_the_fix_and_rebuilt_over(
    tiny_model_dir, tiny_data_dir, tiny_cache_dir, tmp_path
):
    with pytest.raises(cache_lib.CacheError, match="does not exist: give --precomputed_dir the --output_dir"):
        cache_lib.load_cache(tmp_path / "nowhere")
    old = shutil.copytree(tiny_cache_dir, tmp_path / "old")
    manifest = json.loads((old / cache_lib.MANIFEST_NAME).read_text())
    (old / cache_lib.MANIFEST_NAME).write_text(json.dumps({**manifest, "num_items": 0}))
    with pytest.raises(cache_lib.CacheError, match="holds no items: every image was skipped.*--overwrite"):
        cache_lib.load_cache(old)
    precompute(tiny_model_dir, old, data_dir=tiny_data_dir)  # a re-run treats it as empty and writes a whole cache
    assert len(cache_lib.load_cache(old)[0]) == 12


def test_a_dry_run_reports_buckets_skips_and_what_a_run_would_encode_and_writes_nothing(
    tiny_model_dir, tiny_data_dir, tmp_path, summary
):
    data = shutil.copytree(tiny_data_dir, tmp_path / "data")
    (data / "shape_003.png").write_bytes(b"not a PNG")
    shutil.copy(data / "shape_000.png", data / "copy.png")  # (its caption: the default)
    with Image.open(data / "shape_005.png") as image:  # a JPEG cut short: its header reads, decoding it fails
        image.convert("RGB").save(data / "cut.jpg", quality=95)
    whole = (data / "cut.jpg").read_bytes()
    (data / "cut.jpg").write_bytes(whole[: len(whole) // 2])
    out = tmp_path / "cache"
    precompute(tiny_model_dir, out, "--dry_run", "--default_caption", "a copy", data_dir=data)
    assert not out.exists()
    assert "2 skipped:\n  cut.jpg: " in summary.text and "\n  shape_003.png: " in summary.text
    assert "  shape_000.png: the same image file as copy.png: the image trains 2x as often" in summary.text
    assert "dry run: 12 images fit their buckets, 2 skipped; a run would encode 12 (new or changed)" in summary.text
    (data / "copy.png").unlink()
    summary.clear()
    precompute(tiny_model_dir, out, "--dry_run", data_dir=data)
    (predicted,) = re.findall(r"buckets \(h x w: items\): (.*)", summary.text)
    summary.clear()

    precompute(tiny_model_dir, out, data_dir=data)
    buckets = cache_lib.read_manifest(out)["buckets"]  # what the real run made: as the dry run said
    assert predicted == ", ".join(f"{hw}: {n}" for hw, n in buckets.items())
    (data / "shape_004.txt").write_text("an edited caption")
    before = sorted(p.name for p in out.rglob("*"))
    precompute(tiny_model_dir, out, "--dry_run", data_dir=data)
    assert "a run would encode 1 (new or changed)" in summary.text  # only the edited caption
    assert sorted(p.name for p in out.rglob("*")) == before


def test_an_interrupted_run_keeps_its_finished_parts(tiny_model_dir, tiny_data_dir, tmp_path, summary, monkeypatch):
    # batch_size 1: the resumed run batches differently, and the VAE's last bits depend on the batch size.
    flags = ["--batch_size", 1, "--shard_size", 2]
    data = tmp_path / "data"
    data.mkdir()
    for i in range(6):  # half the images: batches of one are slow
        shutil.copy(tiny_data_dir / f"shape_{i:03d}.png", data)
        shutil.copy(tiny_data_dir / f"shape_{i:03d}.txt", data)
    calls = []
    real = precompute_embeddings.encode_batch

    def crash_on_the_fourth_batch(batch, *args, **kwargs):
        calls.append(batch)
        if len(calls) == 4:
            raise KeyboardInterrupt  # what Ctrl-C or a killed job looks like
        return real(batch, *args, **kwargs)

    monkeypatch.setattr(precompute_embeddings, "encode_batch", crash_on_the_fourth_batch)
    out = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        precompute(tiny_model_dir, out, *flags, data_dir=data)
    assert cache_lib.read_manifest(out) is None and len(list((out / cache_lib.SHARDS_DIR).glob("rank*"))) == 1

    # The unfinished parts were made at resolution 64: a re-run with other settings may not mix them in.
    with pytest.raises(cache_lib.CacheError, match="resolution: cache 64, now 48.*--overwrite"):
        precompute(tiny_model_dir, out, *flags, "--resolution", 48, data_dir=data)

    monkeypatch.undo()
    summary.clear()
    precompute(tiny_model_dir, out, *flags, data_dir=data)
    assert new_and_kept(summary) == (4, 2)  # the first part's 2 items were kept; the 3rd was lost with the crash
    assert not (out / cache_lib.SHARDS_DIR).exists()

    clean = precompute(tiny_model_dir, tmp_path / "clean", *flags, data_dir=data)
    resumed, _ = load(out)
    reference, _ = load(clean)
    assert list(resumed) == list(reference) and len(resumed) == 6
    for source, record in reference.items():
        assert resumed[source]["latents"] == record["latents"], source
        assert resumed[source]["caption_embeds"] == record["caption_embeds"], source


def test_a_run_killed_while_it_finishes_the_cache_loses_no_encoding(
    tiny_model_dir, tiny_data_dir, tmp_path, summary, monkeypatch
):
    """Killed between data/'s two renames, a cache has its previous data/ aside: the trainer names the fix and a
    re-run puts it back. Killed before the manifest, a first build keeps its parts: a re-run merges them instead of
    encoding every image again (a kill audit found both)."""
    out = precompute(tiny_model_dir, tmp_path / "cache", data_dir=tiny_data_dir)
    before = load(out)
    os.replace(out / cache_lib.DATA_DIR, out / f".{cache_lib.DATA_DIR}.old999")  # (the first rename done)
    with pytest.raises(cache_lib.CacheError, match="stopped while it replaced data/.*re-run precompute_embeddings.py"):
        cache_lib.load_cache(out)
    summary.clear()
    precompute(tiny_model_dir, out, data_dir=tiny_data_dir)
    assert new_and_kept(summary) == (0, 12) and load(out)[0] == before[0]

    def killed_at_the_manifest(path, *args):
        if Path(path).name == cache_lib.MANIFEST_NAME:
            raise KeyboardInterrupt
        return real(path, *args)

    real = cache_lib.write_json_atomic
    monkeypatch.setattr(cache_lib, "write_json_atomic", killed_at_the_manifest)
    with pytest.raises(KeyboardInterrupt):
        precompute(tiny_model_dir, tmp_path / "first", data_dir=tiny_data_dir)
    monkeypatch.undo()
    assert not (tmp_path / "first" / cache_lib.MANIFEST_NAME).exists()
    summary.clear()
    precompute(tiny_model_dir, tmp_path / "first", data_dir=tiny_data_dir)
    assert new_and_kept(summary) == (0, 12) and load(tmp_path / "first")[0] == before[0]


# ----------------------------------------------------------------------------------------------------------
# The encode loop overlaps the host with the accelerator without changing what is written


def test_each_batch_is_queued_before_the_previous_one_is_turned_into_records():
    log = []

    class Queued:  # stands in for encode_batch's EncodedBatch
        def __init__(self, name):
            self.name = name

        def records(self):
            log.append(f"records {self.name}")
            return [{"source": self.name}]

    def encode(batch):
        log.append(f"queue {batch['name']}")
        return Queued(batch["name"])

    batches = [
        {"name": "a", "planned": ["a"]},
        {"name": "b", "planned": ["b"]},
        {"name": "only skipped files", "planned": []},
        {"name": "c", "planned": ["c"]},
    ]
    for batch, records in encode_ahead(batches, encode):
        log.append(f"write {batch['name']}: {[r['source'] for r in records]}")

    assert log == [
        "queue a",
        "queue b",
        "records a",
        "write a: ['a']",
        "records b",
        "write b: ['b']",
        "queue c",
        "write only skipped files: []",
        "records c",
        "write c: ['c']",
    ]


def test_the_overlapped_loop_writes_the_same_cache_as_one_batch_at_a_time(
    tiny_model_dir, messy_folder, tmp_path, monkeypatch
):
    # Small batches and parts: several parts are saved by the writer thread, and some batches hold only files that
    # fail to decode (skipped, with no records).
    flags = ["--batch_size", 2, "--shard_size", 3, "--cache_flipped"]
    overlapped = precompute(tiny_model_dir, tmp_path / "overlapped", *flags, data_dir=messy_folder)

    def one_at_a_time(batches, encode):
        for batch in batches:
            yield batch, encode(batch).records() if batch["planned"] else []

    monkeypatch.setattr(precompute_embeddings, "encode_ahead", one_at_a_time)
    reference = precompute(tiny_model_dir, tmp_path / "reference", *flags, data_dir=messy_folder)

    dataset, manifest = cache_lib.load_cache(overlapped)
    expected, expected_manifest = cache_lib.load_cache(reference)
    assert dataset.to_list() == expected.to_list()
    assert manifest.pop("last_run")["images"] == expected_manifest.pop("last_run")["images"]  # timings differ
    assert manifest == expected_manifest  # skipped files and conversion notes included


def test_captions_encoded_several_batches_at_a_time_give_the_same_cache(
    tiny_model_dir, messy_folder, tmp_path, text_encoder_calls
):
    # --text_batch_size 6 with image batches of 2: the text encoder sees three batches' captions at once (fewer,
    # larger calls), including captions of images that then fail to decode and are skipped.
    calls = text_encoder_calls
    flags = ["--batch_size", 2, "--cache_dtype", "fp32"]  # fp32: compare embeddings before any storage rounding
    grouped = precompute(tiny_model_dir, tmp_path / "grouped", *flags, "--text_batch_size", 6, data_dir=messy_folder)
    grouped_calls, calls[:] = list(calls), []
    reference = precompute(tiny_model_dir, tmp_path / "reference", *flags, data_dir=messy_folder)

    assert max(grouped_calls) > 2 and len(grouped_calls) < len(calls)  # more than one batch per call, fewer calls
    dataset, _ = cache_lib.load_cache(grouped)
    expected, _ = cache_lib.load_cache(reference)
    assert dataset["source"] == expected["source"] and dataset["latents"] == expected["latents"]
    assert dataset["caption_length"] == expected["caption_length"]
    for a, b in zip(dataset["caption_embeds"], expected["caption_embeds"]):
        a, b = (cache_lib.bytes_to_tensor(x, torch.float32, (-1,)) for x in (a, b))
        assert torch.allclose(a, b, atol=1e-6)


def test_a_text_encoder_offloaded_to_host_ram_gives_the_same_cache(
    tiny_model_dir, tiny_data_dir, tmp_path, monkeypatch
):
    # --text_encoder_offload, for cards that cannot hold the 8 GB text encoder: diffusers' group offloading moves one
    # decoder layer at a time to the execution device as it runs (here the CPU itself: CI has no GPU)
    from zimage_utils import text_encoding

    offloaded, offload = [], text_encoding.offload_text_encoder

    def recording(model, device):
        offload(model, device)
        offloaded.append((device.type, model))

    monkeypatch.setattr(precompute_embeddings, "offload_text_encoder", recording)
    flags = ["--cache_dtype", "fp32"]
    reference = precompute(tiny_model_dir, tmp_path / "reference", *flags, data_dir=tiny_data_dir)
    assert not offloaded
    cache = precompute(tiny_model_dir, tmp_path / "offload", *flags, "--text_encoder_offload", data_dir=tiny_data_dir)
    [(device, model)] = offloaded
    assert device == SCRIPT_DEVICE
    layers = model.layers
    assert all(getattr(layer, "_diffusers_hook", None) is not None for layer in layers)  # one group per layer
    dataset, _ = cache_lib.load_cache(cache)
    expected, _ = cache_lib.load_cache(reference)
    assert len(dataset) == len(expected) > 0
    assert dataset["caption_embeds"] == expected["caption_embeds"] and dataset["latents"] == expected["latents"]
    assert cache_lib.load_prompt_embeddings(cache)[0].equal(cache_lib.load_prompt_embeddings(reference)[0])


@pytest.mark.parametrize(
    "available_gb, processes, pinned_up_front", [(64.0, 1, True), (4.0, 1, False), (64.0, 8, False)]
)
def test_offloading_pins_the_text_encoder_up_front_only_where_host_ram_holds_a_second_copy(
    available_gb, processes, pinned_up_front, tiny_model_dir, monkeypatch
):
    # Pinning copies every weight before the originals go (8 GB more for Qwen3-4B while setting up), in every process
    # on the machine at once: with too little free host RAM diffusers pins each layer as it moves instead. The tiny
    # encoder is scaled up to Qwen3-4B's 8 GB.
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(processes))
    import diffusers.hooks
    import psutil

    from zimage_utils import text_encoding
    from zimage_utils.model_loading import load_text_encoder_and_tokenizer

    text_encoder, tokenizer = load_text_encoder_and_tokenizer(str(tiny_model_dir), torch.float32, "cpu")
    reference, _ = text_encoding.encode_captions(["a red circle"], tokenizer, text_encoder, 64, "cpu")
    tiny_bytes = sum(t.numel() * t.element_size() for t in [*text_encoder.parameters(), *text_encoder.buffers()])
    scale = 8e9 / tiny_bytes
    ram = psutil.virtual_memory()
    monkeypatch.setattr(psutil, "virtual_memory", lambda: ram._replace(available=int(available_gb * 1e9 / scale)))
    calls, apply = [], diffusers.hooks.apply_group_offloading
    monkeypatch.setattr(diffusers.hooks, "apply_group_offloading", lambda m, **kw: calls.append(kw) or apply(m, **kw))
    text_encoding.offload_text_encoder(text_encoder, "cpu")
    [kw] = calls
    assert kw["low_cpu_mem_usage"] is not pinned_up_front
    offloaded, _ = text_encoding.encode_captions(["a red circle"], tokenizer, text_encoder, 64, "cpu")
    assert torch.equal(offloaded[0], reference[0])


@pytest.mark.parametrize("user_setting", [None, "max_split_size_mb:256"])
def test_precompute_lets_the_cuda_allocator_expand_its_segments_unless_the_user_configured_it(
    user_setting, tiny_model_dir, tiny_data_dir, tmp_path, monkeypatch
):
    # VAE batches of several bucket shapes fragment the default allocator (29 GiB reserved for 12 allocated on an
    # H200); the setting is read when CUDA first allocates, so main must make it before anything loads
    seen = []
    for name in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF"):
        monkeypatch.setenv(name, "")  # so that monkeypatch restores them after the test, whatever main set
        monkeypatch.delenv(name)
    if user_setting:
        monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", user_setting)
    load_vae = precompute_embeddings.load_vae
    monkeypatch.setattr(
        precompute_embeddings,
        "load_vae",
        lambda *a, **k: seen.append(os.environ.get("PYTORCH_CUDA_ALLOC_CONF")) or load_vae(*a, **k),
    )
    precompute(tiny_model_dir, tmp_path / "cache", data_dir=tiny_data_dir)
    assert seen == [user_setting or "expandable_segments:True"]


def test_the_run_reports_its_peak_gpu_memory_and_an_images_cost_on_cuda_only(monkeypatch):
    # so a user can size --batch_size to their card (CI has no GPU: CUDA's counters are stood in for)
    from types import SimpleNamespace

    from zimage_utils.precompute import gpu_memory_report

    assert gpu_memory_report(torch.device("cpu"), 8, 1024) == (None, "")
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: 12.17 * 2**30)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device: 15.22 * 2**30)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=24 * 2**30))
    figures, line = gpu_memory_report(torch.device("cuda", 0), 8, 512)
    assert figures == pytest.approx({"allocated": 12.17, "reserved": 15.22, "card": 24.0})
    assert line == (
        "GPU memory (this process): peak 12.2 GiB allocated, 15.2 reserved, of the card's 24.0; at --batch_size 8 "
        "and 512 px each image of a batch takes ~0.4 GiB"
    )


def test_running_out_of_gpu_memory_ends_with_what_to_change_and_keeps_finished_parts(
    tiny_model_dir, tiny_data_dir, tmp_path, monkeypatch, capsys
):
    from zimage_utils import cli

    real, calls = precompute_embeddings.encode_batch, []

    def out_of_memory_on_the_third_batch(batch, *args, **kwargs):
        calls.append(batch)
        if len(calls) == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
        return real(batch, *args, **kwargs)

    monkeypatch.setattr(precompute_embeddings, "encode_batch", out_of_memory_on_the_third_batch)
    flags = ["--pretrained_model_name_or_path", str(tiny_model_dir), "--train_data_dir", str(tiny_data_dir)]
    flags += ["--output_dir", str(tmp_path / "cache"), "--resolution", "64", "--dataloader_num_workers", "0"]
    flags += ["--batch_size", "2", "--shard_size", "2"]
    with pytest.raises(SystemExit) as stopped:
        cli.run(precompute_embeddings.main, lambda: precompute_embeddings.parse_args(flags))
    message = capsys.readouterr().err
    assert stopped.value.code == 2
    expected = "error: out of GPU memory while encoding batches of 2 images at about 64 px a side: give --batch_size 1"
    assert expected in message
    assert "--text_encoder_offload" in message and "a re-run encodes only the rest" in message
    assert list((tmp_path / "cache" / cache_lib.SHARDS_DIR).glob("rank*/*"))  # the first two batches' part


def _record(i: int) -> dict:
    return {
        "source": f"img_{i}.png", "content_hash": f"{i:064x}", "caption": f"caption {i}",
        "bucket_height": 64, "bucket_width": 96, "original_height": 70, "original_width": 100,
        "crop_box": [0.5, 1.0, 99.5, 69.0],
        "latents": bytes([i]) * 8, "latents_flipped": b"", "caption_embeds": bytes([i]) * 4,
        "caption_length": 2, "caption_truncated": False, "mask": b"",
        "caption_variants": [], "variant_embeds": b"", "variant_lengths": [],
        "preservation_caption": "", "preservation_embeds": b"", "preservation_length": 0,
    }  # fmt: skip


def test_the_shard_writer_saves_parts_in_order_and_finishes_them_after_a_crash(tmp_path):
    records = [_record(i) for i in range(4)]
    with ShardWriter(tmp_path / "cache", rank=0, shard_size=2) as writer:
        writer.add(records[:3])  # shard_size reached: handed to the saving thread
        writer.add(records[3:4])  # saved when the block ends
    parts = load_shards(tmp_path / "cache")
    assert [part.to_list() for part in parts] == [records[:3], records[3:4]]
    assert all(part.features == cache_lib.FEATURES for part in parts)

    with pytest.raises(KeyboardInterrupt), ShardWriter(tmp_path / "crashed", rank=0, shard_size=2) as writer:
        writer.add(records[:2])
        writer.add(records[2:3])
        raise KeyboardInterrupt
    # The part handed over before the crash is on disk when the error arrives; the unfinished one is lost.
    assert [part.to_list() for part in load_shards(tmp_path / "crashed")] == [records[:2]]


# ----------------------------------------------------------------------------------------------------------
# The fingerprint guards a cache against other settings and other models


def test_a_cache_refuses_other_settings_until_overwrite(tiny_model_dir, tiny_data_dir, tiny_cache_dir, tmp_path):
    out = shutil.copytree(tiny_cache_dir, tmp_path / "cache")
    with pytest.raises(
        cache_lib.CacheError, match=rf"{re.escape(str(out))}.*resolution: cache 64, now 48.*--overwrite"
    ):
        precompute(tiny_model_dir, out, "--resolution", 48, data_dir=tiny_data_dir)

    other_model = shutil.copytree(tiny_model_dir, tmp_path / "other_model")
    vae_config = json.loads((other_model / "vae" / "config.json").read_text())
    vae_config["scaling_factor"] = 0.5
    (other_model / "vae" / "config.json").write_text(json.dumps(vae_config))
    with pytest.raises(
        cache_lib.CacheError, match=rf"{re.escape(str(out))}.*component_config_hash.*scaling_factor.*--overwrite"
    ):
        precompute(other_model, out, data_dir=tiny_data_dir)

    precompute(tiny_model_dir, out, "--resolution", 48, "--overwrite", data_dir=tiny_data_dir)
    dataset, manifest = cache_lib.load_cache(out)
    assert manifest["fingerprint"]["resolution"] == 48
    assert max(h * w for h, w in zip(dataset["bucket_height"], dataset["bucket_width"])) <= 48 * 48


def test_an_overwrite_that_fails_or_is_cut_short_keeps_the_cache_it_was_replacing(
    tiny_model_dir, tiny_data_dir, tiny_cache_dir, tmp_path, monkeypatch
):
    out = shutil.copytree(tiny_cache_dir, tmp_path / "cache")
    before = load(out)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.png").write_text("not an image")
    (bad / "a.txt").write_text("a caption")
    with pytest.raises(ValueError, match="no image could be cached.*the cache there is as it was"):
        precompute(tiny_model_dir, out, "--overwrite", data_dir=bad)
    assert load(out) == before and not (out / REPLACED_DIR).exists()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(precompute_embeddings, "encode_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        precompute(tiny_model_dir, out, "--resolution", 48, "--overwrite", data_dir=tiny_data_dir)
    assert load(out) == before
    # A run killed outright leaves the old cache set aside: the next run without --overwrite puts it back
    set_aside_for_overwrite(out)
    assert not (out / cache_lib.MANIFEST_NAME).exists()
    (out / cache_lib.SHARDS_DIR).mkdir()  # (what the killed run had written)
    assert restore_set_aside(out) and load(out) == before and not (out / cache_lib.SHARDS_DIR).exists()


def test_an_overwrite_killed_and_given_again_keeps_the_parts_it_had_finished(
    tiny_model_dir, tiny_data_dir, tiny_cache_dir, tmp_path, summary, monkeypatch
):
    """Killed outright (no handler runs: the old cache stays set aside), an --overwrite run given again with the same
    settings merges the parts it had finished instead of encoding them again; with other settings it does not."""
    out = shutil.copytree(tiny_cache_dir, tmp_path / "cache")
    flags = ["--overwrite", "--resolution", 48, "--batch_size", 1, "--shard_size", 2]
    calls, real = [], precompute_embeddings.encode_batch

    def killed_at_the_fourth_batch(batch, *args, **kwargs):
        calls.append(batch)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(batch, *args, **kwargs)

    monkeypatch.setattr(precompute_embeddings, "encode_batch", killed_at_the_fourth_batch)
    monkeypatch.setattr(precompute_embeddings, "restore_set_aside", lambda out: False)  # (a SIGKILL runs no handler)
    with pytest.raises(KeyboardInterrupt):
        precompute(tiny_model_dir, out, *flags, data_dir=tiny_data_dir)
    monkeypatch.undo()
    assert (out / REPLACED_DIR).is_dir() and len(list((out / cache_lib.SHARDS_DIR).glob("rank*"))) == 1
    summary.clear()
    precompute(tiny_model_dir, out, *flags, data_dir=tiny_data_dir)
    assert new_and_kept(summary) == (10, 2) and not (out / REPLACED_DIR).exists()
    assert cache_lib.read_manifest(out)["fingerprint"]["resolution"] == 48


def test_a_cache_another_precompute_is_writing_is_refused_and_left_as_it_is(
    tiny_model_dir, tiny_data_dir, tiny_cache_dir, tmp_path
):
    """Two precomputes in one cache used to end with the rows one of them wrote (35 of 300 in a kill audit), both
    exiting 0. The second is refused, naming the first; with --overwrite it does not touch the cache either."""
    from zimage_utils import cli

    out = shutil.copytree(tiny_cache_dir, tmp_path / "cache")
    before = load(out)
    with cli.folder_lock(out, "precompute_embeddings.py"):  # (as the first run holds it: the lock is per open file)
        for extra in ([], ["--overwrite"]):
            with pytest.raises(cli.FolderInUse, match=r"cache is being written by precompute_embeddings.py \(pid"):
                precompute(tiny_model_dir, out, *extra, data_dir=tiny_data_dir)
            assert load(out) == before and not (out / REPLACED_DIR).exists()
    precompute(tiny_model_dir, out, data_dir=tiny_data_dir)  # once the first has ended
    assert load(out)[0].keys() == before[0].keys()


def test_a_caption_length_the_transformer_cannot_place_is_refused_and_cut_captions_are_named(
    tiny_model_dir, tiny_data_dir, tmp_path, caplog
):
    with pytest.raises(ValueError, match="--max_sequence_length 2000: .* places at most 992 caption tokens"):
        precompute(tiny_model_dir, tmp_path / "cache", "--max_sequence_length", 2000, data_dir=tiny_data_dir)
    assert not (tmp_path / "cache").exists()
    with caplog.at_level(logging.INFO):
        precompute(tiny_model_dir, tmp_path / "cache", "--max_sequence_length", 8, data_dir=tiny_data_dir)
    cut = sorted(r["source"] for r in cache_lib.load_cache(tmp_path / "cache")[0] if r["caption_truncated"])
    assert cut and f"captions cut at --max_sequence_length 8 tokens (the rest is not trained on): {cut[0]}, " in (
        caplog.text
    )


def test_load_cache_refuses_a_cache_made_for_another_model(tiny_cache_dir):
    _, manifest = cache_lib.load_cache(tiny_cache_dir, {"embed_dim": 16, "latent_channels": 16})
    found = manifest["fingerprint"]["component_config_hash"]
    with pytest.raises(
        cache_lib.CacheError, match=rf"{re.escape(str(tiny_cache_dir))}.*component_config_hash: cache '{found}'"
    ):
        cache_lib.load_cache(tiny_cache_dir, {"component_config_hash": "0" * 64})


# ----------------------------------------------------------------------------------------------------------
# Several processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@LAUNCHES_CPU_PROCESSES
def test_two_processes_write_the_same_cache_as_one(tiny_model_dir, tiny_data_dir, tmp_path):
    # With random crops and sampled latents, equal records prove that each item is seeded by itself, not by its
    # process or batch; so are loss masks, each cropped as its image's seeded crop, and caption variants. (One and
    # two processes with center crops: benchmarks/bench_scale.py's test.) Bit-identical latents also need the same
    # VAE arithmetic: batches of one image (conv kernels choose their algorithm by batch size) and one thread per
    # process, as `--num_cpu_threads_per_process 1` gives the two processes below.
    data, masks = shutil.copytree(tiny_data_dir, tmp_path / "data"), tmp_path / "masks"
    masks.mkdir()
    for image in sorted(data.glob("*.png")):
        with Image.open(image) as opened:
            gradient = np.linspace(0, 255, opened.width, dtype=np.uint8)[None].repeat(opened.height, 0)
        Image.fromarray(gradient, "L").save(masks / image.name)
        caption = image.with_suffix(".txt")
        caption.write_text(caption.read_text() + f"\nanother caption of {image.stem}")
    flags = ["--batch_size", 1, "--crop", "random", "--latent_sampling", "sample", "--seed", 7]
    flags += ["--mask_dir", masks, "--caption_variants"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = precompute(tiny_model_dir, tmp_path / "one", *flags, data_dir=data)
    finally:
        torch.set_num_threads(threads)

    # `accelerate launch --cpu --num_processes 2` starts ONE process (its multi-CPU path is mpirun). torchrun-style
    # launching on CPU is `--multi_gpu` plus ACCELERATE_USE_CPU=1, which makes accelerate use gloo.
    two = tmp_path / "two"
    launch = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--main_process_port", str(_free_port()),
        "--num_cpu_threads_per_process", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "precompute_embeddings.py",
        "--pretrained_model_name_or_path", str(tiny_model_dir), "--train_data_dir", str(data),
        "--output_dir", str(two), "--resolution", "64", "--dataloader_num_workers", "0", *map(str, flags),
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "1"}
    # a dry run gathers both processes' scans (each decoding its images and masks), and writes nothing
    dry = subprocess.run(launch + ["--dry_run"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert "dry run: 12 images fit their buckets, 0 skipped; a run would encode 12" in dry.stderr
    assert not two.exists()
    result = subprocess.run(launch, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "12 items (12 new, 0 kept)" in result.stderr and "on 2 process(es)" in result.stderr

    records_one, manifest_one = load(one)
    records_two, manifest_two = load(two)
    assert manifest_two["fingerprint"] == {**manifest_one["fingerprint"], "model": str(tiny_model_dir)}
    assert list(records_two) == list(records_one)
    for source, record in records_one.items():
        for column in ("crop_box", "latents", "caption_embeds", "mask", "caption_variants", "variant_embeds"):
            assert records_two[source][column] == record[column], (source, column)
    assert manifest_one["num_masked"] == 12
    assert all(len(r["caption_variants"]) == 1 for r in records_one.values())
    cut_left = 0  # the mask (255 · x / width) was cut to each image's crop: it spans the crop's x range
    for record in records_one.values():
        grid = cache_lib.decode_record(record, manifest_one)["mask"][0].float()
        left, _, right, _ = record["crop_box"]
        width = record["original_width"]
        assert grid.diff(dim=1).ge(0).all() and grid.std(dim=0).max() == 0  # rising left to right, rows equal
        assert 255 * left / width - 1 <= grid[0, 0] and grid[0, -1] <= 255 * right / width + 1
        cut_left += left > 1
    assert cut_left > 0  # some crops did not start at the left edge


def test_a_multi_process_launch_that_accelerate_did_not_connect_is_refused(tiny_model_dir, tiny_data_dir, tmp_path):
    # What `accelerate launch --multi_gpu` without ACCELERATE_USE_CPU=1 does on a machine without GPUs: each process
    # sees WORLD_SIZE=2 but runs alone, and all of them would write the whole cache into one folder.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WORLD_SIZE", "2")
        with pytest.raises(
            RuntimeError, match="2 processes were launched but accelerate set up 1.*ACCELERATE_USE_CPU"
        ):
            precompute(tiny_model_dir, tmp_path / "cache", data_dir=tiny_data_dir)


# ----------------------------------------------------------------------------------------------------------
# Other inputs and user errors


def test_a_saved_datasets_dataset_is_cached_end_to_end(tiny_model_dir, tiny_data_dir, tiny_cache_dir, tmp_path):
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    rows = {
        "image": [Image.open(tiny_data_dir / f"shape_{i:03d}.png") for i in range(4)],
        "text": [(tiny_data_dir / f"shape_{i:03d}.txt").read_text().strip() for i in range(4)],
    }
    saved = tmp_path / "dataset"
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(saved))

    out = precompute(tiny_model_dir, tmp_path / "cache", "--dataset_name", saved)
    records, manifest = load(out)
    assert list(records) == [f"{saved}[{row}]" for row in range(4)] and manifest["skipped"] == []
    assert [r["caption"] for r in records.values()] == rows["text"]
    folder_records, folder_manifest = load(tiny_cache_dir)
    for row, record in enumerate(records.values()):  # the same image gives the same latents from either source
        from_folder = cache_lib.decode_record(folder_records[f"shape_{row:03d}.png"], folder_manifest)["latents"]
        # bf16 storage: batches of another size may round a few values the other way
        torch.testing.assert_close(
            cache_lib.decode_record(record, manifest)["latents"], from_folder, **LATENT_TOLERANCE
        )


def test_giving_both_a_folder_and_a_dataset_is_a_usage_error(capsys):
    both = ["--train_data_dir", "photos", "--dataset_name", "user/photos"]
    with pytest.raises(SystemExit):
        precompute_embeddings.parse_args(["--pretrained_model_name_or_path", "m", "--output_dir", "o", *both])
    assert "pass exactly one of --train_data_dir or --dataset_name" in capsys.readouterr().err


def test_a_model_that_is_not_z_image_is_refused_naming_the_path(tiny_data_dir, tmp_path):
    sdxl = tmp_path / "sdxl"
    sdxl.mkdir()
    index = {
        "_class_name": "StableDiffusionXLPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    }
    (sdxl / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(
        ValueError, match=rf"{re.escape(str(sdxl))} is a Stable Diffusion XL model.*needs a Z-Image model"
    ):
        precompute(sdxl, tmp_path / "cache", data_dir=tiny_data_dir)
    assert not (tmp_path / "cache").exists()


def test_batches_keep_one_bucket_and_group_captions_of_similar_length():
    # The text encoder pads a batch to its longest caption: batching by length spends less work on padding.
    from zimage_utils.buckets import CropBox
    from zimage_utils.images import ImageItem
    from zimage_utils.precompute import Planned, plan_batches

    rng = random.Random(0)
    crop = CropBox(64, 64, 0, 0, 64, 64)
    planned = [
        Planned(ImageItem(f"{i:02d}.png", path=f"/d/{i:02d}.png"), "w " * rng.randint(1, 60), "", (64, 64), b, crop)
        for i, b in enumerate([(64, 64), (64, 128)] * 20)
    ]
    batches = plan_batches(planned, batch_size=4)
    assert sorted(p.item.source for b in batches for p in b) == sorted(p.item.source for p in planned)
    assert all(len({p.bucket for p in b}) == 1 and len(b) <= 4 for b in batches)
    for bucket in ((64, 64), (64, 128)):
        ranges = [[len(p.caption) for p in b] for b in batches if b[0].bucket == bucket]
        # consecutive batches of a bucket cover consecutive, non-overlapping caption lengths
        assert all(max(a) <= min(b) for a, b in zip(ranges, ranges[1:]))


def test_output_paths_that_cannot_be_written_are_refused_before_anything_is_made(tiny_model_dir, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("")
    with pytest.raises(ValueError, match="--output_dir .*afile is a file: give a folder"):
        precompute(tiny_model_dir, afile, data_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="image folder .*nowhere does not exist"):
        precompute(tiny_model_dir, tmp_path / "cache", data_dir=tmp_path / "nowhere")
    assert not (tmp_path / "cache").exists()  # no empty cache folder left behind
    from test_trainer import train

    with pytest.raises(ValueError, match="--output_dir .*afile is a file: give a folder"):
        train(tiny_model_dir, tmp_path, afile)


def test_a_crop_that_throws_most_of_an_image_away_is_noted(tiny_model_dir, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    _noise(2000, 50).save(data / "banner.png")  # 40:1, four times wider than the widest bucket
    (data / "banner.txt").write_text("a banner")
    _noise(96, 64).save(data / "photo.png")
    (data / "photo.txt").write_text("a photo")
    flags = ["--pretrained_model_name_or_path", tiny_model_dir, "--train_data_dir", data, "--output_dir", tmp_path]
    report = precompute_embeddings.main(
        precompute_embeddings.parse_args([str(f) for f in flags] + ["--dry_run", "--resolution", "64"])
    )
    [note] = [n for n in report["notes"] if "crop keeps" in n["reason"]]
    assert (
        note["source"] == "banner.png"
        and "of the 2000x50 image: crop it yourself, or raise --max_aspect" in (note["reason"])
    )


def test_a_crashed_saves_temporary_folders_are_removed_by_the_next_save(tmp_path):
    for stale in (".data.tmp123", ".data.old456"):
        (tmp_path / stale / "part").mkdir(parents=True)
    (tmp_path / ".other.tmp1").mkdir()
    cache_lib.save_dataset_atomic(datasets.Dataset.from_dict({"x": [1, 2]}), tmp_path / cache_lib.DATA_DIR)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.tmp1", "data"]
    assert datasets.load_from_disk(str(tmp_path / "data"))["x"] == [1, 2]


def test_caption_column_names_the_metadata_files_caption_column(tiny_model_dir, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(2):
        Image.new("RGB", (64, 64), (90 * i, 40, 200)).save(data / f"{i}.png")
    rows = [{"file_name": f"{i}.png", "caption": f"square {i}"} for i in range(2)]
    (data / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    precompute(tiny_model_dir, tmp_path / "cache", "--caption_column", "caption", data_dir=data)
    assert sorted(load(tmp_path / "cache")[0][f"{i}.png"]["caption"] for i in range(2)) == ["square 0", "square 1"]


def test_a_re_run_without_the_trigger_or_the_prompts_keeps_the_caches_unless_told(
    tiny_model_dir, tiny_data_dir, tmp_path, capsys
):
    out = tmp_path / "cache"
    precompute(
        tiny_model_dir, out, "--caption_prefix", "sks", "--validation_prompts", "sks at noon", data_dir=tiny_data_dir
    )
    captions = {source: r["caption"] for source, r in load(out)[0].items()}
    precompute(tiny_model_dir, out, data_dir=tiny_data_dir)  # the flags left out
    records, manifest = load(out)
    assert {source: r["caption"] for source, r in records.items()} == captions
    assert (manifest["caption_prefix"], manifest["validation_prompts"]) == ("sks", ["sks at noon"])
    printed = capsys.readouterr().out
    assert "note: --caption_prefix 'sks' kept from the cache" in printed and "1 validation prompt(s) kept" in printed
    precompute(tiny_model_dir, out, "--caption_prefix", "", "--validation_prompts", data_dir=tiny_data_dir)
    records, manifest = load(out)
    assert (manifest["caption_prefix"], manifest["validation_prompts"]) == ("", [])
    assert not any(r["caption"].startswith("sks") for r in records.values())
