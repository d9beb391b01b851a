"""The pictures a run leaves for its user: OUTPUT/samples/grid.png (validation prompts x steps), OUTPUT/loss_per_sigma.png
(the loss of each noise level over the run) and, from `precompute_embeddings.py --contact_sheet`, CACHE/contact_sheet.png
(how each image was cropped into its bucket).
"""

import io
import json
import math
import shutil
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_CACHE_VALIDATION_PROMPTS
from PIL import Image
from test_trainer import read_log, reset_accelerate, train

import precompute_embeddings
from zimage_utils import cache as cache_lib
from zimage_utils import contact_sheet
from zimage_utils.model_loading import load_transformer
from zimage_utils.plots import plot_loss_per_sigma
from zimage_utils.sample_prompts import SamplePrompt
from zimage_utils.validation import grid_label_height

SAMPLE = 64  # validation images are sampled at the cache's resolution


@pytest.fixture(scope="module")
def resumed_run(tiny_model_dir, tiny_cache_dir, tmp_path_factory) -> Path:
    """4 steps validating every 2 with a held-out quarter of the cache, stopped after step 2 and resumed, so the
    second validation rebuilds the grid from the first one's file; logged to TensorBoard."""
    out = tmp_path_factory.mktemp("pictures_run")
    flags = dict(max_train_steps=4, validation_steps=2, checkpointing_steps=2, validation_split=0.25)
    flags |= dict(report_to="tensorboard")
    train(tiny_model_dir, tiny_cache_dir, out, **flags, max_train_steps_this_run=2)
    with Image.open(out / "samples" / "grid.png") as grid:
        assert grid.width == SAMPLE  # one column after the first validation
    train(tiny_model_dir, tiny_cache_dir, out, **flags, resume_from_checkpoint="latest")
    return out


def test_the_sample_grid_has_a_row_per_prompt_and_a_column_per_validation_step(resumed_run):
    samples = resumed_run / "samples"
    assert sorted(p.name for p in samples.iterdir()) == ["grid.png", "step_000002.png", "step_000004.png"]
    prompts = len(TINY_CACHE_VALIDATION_PROMPTS)
    with Image.open(samples / "grid.png") as grid:
        grid = grid.convert("RGB")
    label = grid_label_height(SAMPLE)
    assert grid.size == (2 * SAMPLE, label + prompts * SAMPLE)
    # Column j is step file j, its prompts (side by side there) stacked top to bottom under the step label
    for column, step in enumerate((2, 4)):
        with Image.open(samples / f"step_{step:06d}.png") as row:
            row = row.convert("RGB")
        for i in range(prompts):
            cell = grid.crop((column * SAMPLE, label + i * SAMPLE, (column + 1) * SAMPLE, label + (i + 1) * SAMPLE))
            assert np.array_equal(np.asarray(cell), np.asarray(row.crop((i * SAMPLE, 0, (i + 1) * SAMPLE, SAMPLE))))
    labels = np.asarray(grid.crop((0, 0, 2 * SAMPLE, label)).convert("L"))
    assert labels.min() < 128 < labels.max()  # the step numbers are written on white


def test_tensorboard_shows_each_validations_samples(resumed_run):
    """Under "validation", one picture per validation step (TensorBoard tiles the prompts' samples into it), from
    both halves of the resumed run; its first tile is the first prompt's sample, pixel for pixel."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(resumed_run / "logs" / "zimage-lora"), size_guidance={"images": 0})  # 0: all
    events.Reload()
    logged = events.Images("validation")
    assert [e.step for e in logged] == [2, 4]
    for event in logged:
        with Image.open(io.BytesIO(event.encoded_image_string)) as picture:
            first = np.asarray(picture.convert("RGB").crop((0, 0, SAMPLE, SAMPLE)))
        with Image.open(resumed_run / "samples" / f"step_{event.step:06d}.png") as row:
            expected = np.asarray(row.convert("RGB").crop((0, 0, SAMPLE, SAMPLE)))
        assert np.array_equal(first, expected), f"step {event.step}"


def test_the_loss_plot_is_drawn_with_the_held_out_loss_per_sigma(resumed_run):
    with Image.open(resumed_run / "loss_per_sigma.png") as plot:
        pixels = np.asarray(plot.convert("L"), dtype=np.float32)
    assert pixels.std() > 10  # not a blank canvas
    # The log holds the validation losses the plot's second panel draws, one line per validation
    validations = [r for r in read_log(resumed_run) if "val/loss" in r]
    assert [r["step"] for r in validations] == [2, 4]
    assert {k for k in validations[0] if k.startswith("val/loss_sigma_")} == {
        f"val/loss_sigma_{s}" for s in ("0.1", "0.3", "0.5", "0.7", "0.9")
    }


def test_the_loss_plot_adds_a_validation_panel_only_when_there_is_a_held_out_loss(tmp_path):
    log = tmp_path / "train_log.jsonl"
    records = [
        {"step": s, "loss": 1 / s, "loss/sigma_0.0-0.2": 0.5 / s, "loss/sigma_0.8-1.0": 2 / s} for s in (1, 2, 3)
    ]
    log.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert plot_loss_per_sigma(tmp_path / "missing.jsonl", tmp_path / "none.png") is None
    with Image.open(plot_loss_per_sigma(log, tmp_path / "train_only.png")) as plot:
        train_only = plot.size
    with open(log, "a") as f:
        f.write(json.dumps({"step": 3, "val/loss": 0.4, "val/loss_sigma_0.1": 0.3, "val/loss_sigma_0.9": 0.5}) + "\n")
    with Image.open(plot_loss_per_sigma(log, tmp_path / "with_validation.png")) as plot:
        assert plot.width == train_only[0] and plot.height > train_only[1]


def contact_sheet_of(model_dir, data_dir, cache_dir, *flag) -> tuple[Image.Image, list[str]]:
    """Re-run the precompute on a finished cache with --contact_sheet [N]: (the sheet, the sources it shows)."""
    args = ["--pretrained_model_name_or_path", str(model_dir), "--train_data_dir", str(data_dir)]
    args += ["--output_dir", str(cache_dir), "--resolution", "64", "--dataloader_num_workers", "0", *flag]
    reset_accelerate()
    precompute_embeddings.main(precompute_embeddings.parse_args(args))
    with Image.open(Path(cache_dir) / contact_sheet.CONTACT_SHEET_NAME) as sheet:
        sheet.load()
    return sheet, json.loads(sheet.text["sources"])


def test_the_contact_sheet_shows_every_cached_image_grouped_by_bucket(
    tiny_model_dir, tiny_data_dir, tiny_cache_dir, tmp_path, caplog
):
    """Asked of a finished cache, nothing is re-encoded: the originals are decoded again from the records."""
    cache = shutil.copytree(tiny_cache_dir, tmp_path / "cache")
    with caplog.at_level("INFO"):
        sheet, sources = contact_sheet_of(tiny_model_dir, tiny_data_dir, cache, "--contact_sheet")
    assert "(0 new, 12 kept)" in caplog.text
    dataset, manifest = cache_lib.load_cache(cache)
    assert sorted(sources) == sorted(dataset["source"])  # one tile per image: 12, under the default cap of 64
    # A header line per bucket, then its tiles, COLUMNS to a row
    header = contact_sheet.TEXT_H + 2 * contact_sheet.PAD
    rows = sum(math.ceil(n / contact_sheet.COLUMNS) for n in manifest["buckets"].values())
    height = len(manifest["buckets"]) * header + rows * contact_sheet.TILE_H
    assert sheet.size == (contact_sheet.COLUMNS * contact_sheet.TILE_W, height)
    assert np.asarray(sheet.convert("L"), dtype=np.float32).std() > 10


def test_a_capped_contact_sheet_shows_every_bucket_first(tiny_model_dir, tiny_data_dir, tiny_cache_dir, tmp_path):
    cache = shutil.copytree(tiny_cache_dir, tmp_path / "cache")
    dataset, manifest = cache_lib.load_cache(cache)
    bucket_of = dict(zip(dataset["source"], zip(dataset["bucket_height"], dataset["bucket_width"])))
    cap = len(manifest["buckets"])  # 3 buckets of 12 images
    _, sources = contact_sheet_of(tiny_model_dir, tiny_data_dir, cache, "--contact_sheet", str(cap))
    assert len(sources) == cap and len({bucket_of[s] for s in sources}) == cap


def test_a_dry_run_draws_the_crops_a_run_would_take(tiny_model_dir, tiny_data_dir, tiny_cache_dir, tmp_path):
    """--dry_run --contact_sheet: the same sheet as the finished cache's, before anything is encoded; the only file
    written is the sheet."""
    fresh = tmp_path / "fresh"
    dry, dry_sources = contact_sheet_of(tiny_model_dir, tiny_data_dir, fresh, "--dry_run", "--contact_sheet")
    assert [p.name for p in fresh.iterdir()] == [contact_sheet.CONTACT_SHEET_NAME]
    cache = shutil.copytree(tiny_cache_dir, tmp_path / "cache")
    real, real_sources = contact_sheet_of(tiny_model_dir, tiny_data_dir, cache, "--contact_sheet")
    assert dry_sources == real_sources and np.array_equal(np.asarray(dry), np.asarray(real))


def test_weights_and_biases_gets_each_sample_captioned_with_its_prompt(monkeypatch):
    """wandb is not installed here: a stand-in module records what `log_samples` hands it."""
    import sys

    from zimage_utils.validation import log_samples

    class WandbImage:
        def __init__(self, image, caption=None):
            self.image, self.caption = image, caption

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(Image=WandbImage))
    logged = []
    tracker = types.SimpleNamespace(name="wandb", log=lambda values, step: logged.append((values, step)))
    other = types.SimpleNamespace(name="comet_ml", log=lambda *a, **k: pytest.fail("images sent to another tracker"))
    images = [Image.new("RGB", (SAMPLE, SAMPLE), c) for c in ("red", "blue")]
    log_samples([tracker, other], images, TINY_CACHE_VALIDATION_PROMPTS, step=7)
    ((values, step),) = logged
    assert step == 7 and list(values) == ["validation"]
    assert [(w.image, w.caption) for w in values["validation"]] == list(zip(images, TINY_CACHE_VALIDATION_PROMPTS))


def test_validation_at_start_samples_the_untrained_model_as_the_first_column(tiny_model_dir, tiny_cache_dir, tmp_path):
    """--validation_at_start: step_000000.png is what the model samples before training, i.e. what a run whose
    learning rate is 0 still samples after its steps; the trained samples differ from it."""
    flags = dict(max_train_steps=2, validation_steps=2)
    train(tiny_model_dir, tiny_cache_dir, tmp_path / "a", **flags, learning_rate=5e-2, validation_at_start=True)
    train(tiny_model_dir, tiny_cache_dir, tmp_path / "b", **flags, learning_rate=0)
    samples = tmp_path / "a" / "samples"
    assert sorted(p.name for p in samples.iterdir()) == ["grid.png", "step_000000.png", "step_000002.png"]
    with Image.open(samples / "grid.png") as grid:
        assert grid.width == 2 * SAMPLE  # the baseline column, then step 2

    def pixels(path):
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))

    start = pixels(samples / "step_000000.png")
    assert np.array_equal(start, pixels(tmp_path / "b" / "samples" / "step_000002.png"))
    assert not np.array_equal(start, pixels(samples / "step_000002.png"))


def test_validation_samples_can_be_portrait(tiny_model_dir, tiny_cache_dir, tmp_path, capsys):
    """--validation_resolution WIDTHxHEIGHT: each prompt's sample is that size (a 64 px cache, 48 x 80 samples)."""
    train(
        tiny_model_dir,
        tiny_cache_dir,
        tmp_path,
        max_train_steps=1,
        validation_resolution="48x80",
        report_to="tensorboard",
    )
    with Image.open(tmp_path / "samples" / "step_000001.png") as row:
        assert row.size == (len(TINY_CACHE_VALIDATION_PROMPTS) * 48, 80)
    for wrong in ("50x80", "48by80"):
        reset_accelerate()
        with pytest.raises(SystemExit):
            train(tiny_model_dir, tiny_cache_dir, tmp_path / wrong, validation_resolution=wrong)
    err = capsys.readouterr().err
    assert "multiples of 16" in err and "WIDTHxHEIGHT" in err


def test_under_a_memory_budget_validation_decodes_in_tiles(tiny_model_dir, tiny_cache_dir, tmp_path, monkeypatch):
    # --max_memory_gb makes the trainer's Validator low_memory: a full-frame fp32 decode at 1024² would add GiBs to a
    # process held to its budget, bf16 tiles the least. Tiles are 512 px on the real model; 32 px here, so the 64 px
    # samples are tiled.
    from diffusers import AutoencoderKL

    from zimage_utils import validation

    monkeypatch.setattr(validation, "LOW_MEMORY_TILE", 32)
    tiled_decodes = []
    tiled_decode = AutoencoderKL.tiled_decode
    monkeypatch.setattr(
        AutoencoderKL, "tiled_decode", lambda vae, z, **kw: tiled_decodes.append(z.shape) or tiled_decode(vae, z, **kw)
    )
    empty, prompts = cache_lib.load_prompt_embeddings(tiny_cache_dir)
    transformer = load_transformer(str(tiny_model_dir), device="cpu")
    grids = {}
    for low_memory in (False, True):
        out = tmp_path / f"low_memory_{low_memory}"
        validator = validation.Validator(
            str(tiny_model_dir), None, prompts, empty, out, (SAMPLE, SAMPLE), steps=2, low_memory=low_memory
        )
        validator.sample_grid(transformer, 1, "cpu")
        assert validator.vae.dtype == (torch.bfloat16 if low_memory else torch.float32)
        with Image.open(out / "step_000001.png") as row:
            grids[low_memory] = np.asarray(row.convert("RGB"), dtype=np.int16)
    # Only the low-memory Validator tiled: once per prompt, the 64 px sample's whole 8x8 latent
    assert tiled_decodes == [(1, 16, SAMPLE // 8, SAMPLE // 8)] * len(TINY_CACHE_VALIDATION_PROMPTS)
    assert grids[True].shape == grids[False].shape == (SAMPLE, SAMPLE * len(TINY_CACHE_VALIDATION_PROMPTS), 3)
    # (How close tiles come to the full frame depends on the VAE's weights; on random tiny ones, not close at all.)
    assert grids[True].std() > 10  # a picture, not a blank


def validation_pipe(model_dir):
    from diffusers import ZImagePipeline

    from zimage_utils.model_loading import load_scheduler, load_vae

    return ZImagePipeline(
        transformer=load_transformer(str(model_dir)),
        vae=load_vae(str(model_dir)),
        scheduler=load_scheduler(str(model_dir)),
        text_encoder=None,
        tokenizer=None,
    )


def test_validation_samples_are_the_pipelines_own_images(tiny_model_dir, tiny_cache_dir):
    # Validation samples to latents and decodes them itself (to retry a decode that ran out of memory): what it
    # decodes must be what ZImagePipeline gives, with the run's settings and with a prompt line's own
    from zimage_utils.validation import sample_images

    empty, (plain, other) = cache_lib.load_prompt_embeddings(tiny_cache_dir)
    own = SamplePrompt(other.prompt.text, "(cached)", width=32, height=48, seed=5, steps=3, guidance=2.5)
    prompts = [plain, cache_lib.CachedPrompt(own, other.embeds, negative_embeds=plain.embeds)]
    pipe = validation_pipe(tiny_model_dir)
    ours = sample_images(pipe.transformer, pipe.vae, pipe.scheduler, prompts, empty, (SAMPLE, SAMPLE), 2, 0.0, 7)
    run_settings = dict(height=SAMPLE, width=SAMPLE, num_inference_steps=2, guidance_scale=0.0)
    theirs = pipe(prompt_embeds=[plain.embeds], **run_settings, generator=torch.Generator().manual_seed(7)).images
    theirs += pipe(
        prompt_embeds=[other.embeds],
        negative_prompt_embeds=[plain.embeds],  # the line's --n, in place of the empty caption
        height=48,
        width=32,
        num_inference_steps=3,
        guidance_scale=2.5,
        generator=torch.Generator().manual_seed(5),
    ).images
    assert [i.size for i in ours] == [(SAMPLE, SAMPLE), (32, 48)]
    for a, b in zip(ours, theirs, strict=True):
        assert np.asarray(b).std() > 0 and np.array_equal(np.asarray(a), np.asarray(b))


def test_prompts_of_several_sizes_share_a_step_file_in_cells_of_the_largest(tiny_model_dir, tiny_cache_dir, tmp_path):
    """A portrait prompt beside a square one: each sample whole and centred on white in a cell of the largest width
    and height, so grid.png splits the step file into its prompts, and TensorBoard gets one image batch."""
    from zimage_utils import validation

    empty, (square, other) = cache_lib.load_prompt_embeddings(tiny_cache_dir)
    portrait = cache_lib.CachedPrompt(SamplePrompt(other.prompt.text, width=32, height=96), other.embeds)
    validator = validation.Validator(
        str(tiny_model_dir), None, [square, portrait], empty, tmp_path, (SAMPLE, SAMPLE), steps=2
    )
    logged = []
    board = types.SimpleNamespace(
        name="tensorboard", log_images=lambda values, step, dataformats: logged.append(values)
    )
    grid = validator.sample_grid(load_transformer(str(tiny_model_dir), device="cpu"), 1, "cpu", trackers=[board])
    with Image.open(tmp_path / "step_000001.png") as row:
        row = np.asarray(row.convert("RGB"))
    assert row.shape == (96, 2 * SAMPLE, 3)
    white = np.full(3, 255)
    assert (row[:16, :SAMPLE] == white).all() and (row[16 + SAMPLE :, :SAMPLE] == white).all()  # square: centred
    assert (row[:, SAMPLE : SAMPLE + 16] == white).all() and (row[:, -16:] == white).all()  # portrait: centred
    assert row[16 : 16 + SAMPLE, :SAMPLE].std() > 10 and row[:, SAMPLE + 16 : -16].std() > 10  # pictures in them
    assert logged[0]["validation"].shape == (2, 96, SAMPLE, 3) and validator.first_sample[1].size == (SAMPLE, SAMPLE)
    with Image.open(grid) as image:
        assert image.size == (SAMPLE, grid_label_height(SAMPLE) + 2 * 96)  # one column (step 1), a row per prompt


def test_a_decode_that_runs_out_of_memory_is_done_again_in_tiles(tiny_model_dir, monkeypatch, caplog):
    from diffusers import AutoencoderKL

    from zimage_utils.validation import decode_latents

    decode, calls = AutoencoderKL.decode, []

    def decode_on_a_small_card(vae, z, **kw):  # full frame runs out of memory; tiles fit
        calls.append(vae.use_tiling)
        if not vae.use_tiling:
            raise torch.OutOfMemoryError("CUDA out of memory (a stand-in)")
        return decode(vae, z, **kw)

    monkeypatch.setattr(AutoencoderKL, "decode", decode_on_a_small_card)
    pipe = validation_pipe(tiny_model_dir)
    latents = torch.randn(1, 16, SAMPLE // 8, SAMPLE // 8, generator=torch.Generator().manual_seed(0))
    (image,) = decode_latents(pipe, latents)
    assert image.size == (SAMPLE, SAMPLE) and calls == [False, True]
    assert "decoding a 64x64 sample ran out of GPU memory; decoding in 512-px tiles from now on" in caplog.text
    decode_latents(pipe, latents)  # the next validations start in tiles
    assert calls == [False, True, True]
    monkeypatch.setattr(AutoencoderKL, "decode", lambda *a, **k: (_ for _ in ()).throw(torch.OutOfMemoryError()))
    with pytest.raises(torch.OutOfMemoryError):  # out of memory in tiles too: nothing left to try
        decode_latents(pipe, latents)
