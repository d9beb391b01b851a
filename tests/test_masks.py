"""Loss masks: precompute_embeddings.py --mask_dir / --alpha_mask caches one per image on the latent grid, and the
trainer learns only where it is white (black weighs --mask_floor).

Runs call the scripts in-process on the tiny model, as tests/test_precompute.py and tests/test_trainer.py do.
"""

import json
import logging
import shutil
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from test_trainer import precompute as run_precompute
from test_trainer import train

import precompute_embeddings
from zimage_utils import cache as cache_lib
from zimage_utils import contact_sheet
from zimage_utils import flow_matching as fm
from zimage_utils.train_data import collate, load_caches
from zimage_utils.training_step import StepConfig, flow_matching_step


def precompute(model_dir, data_dir, output_dir, *extra):
    """({source: record}, manifest) of a fresh cache of `data_dir` (test_trainer's run at resolution 64)."""
    dataset, manifest = cache_lib.load_cache(run_precompute(model_dir, data_dir, output_dir, *map(str, extra)))
    return {r["source"]: r for r in dataset}, manifest


def half_mask(width: int, height: int) -> Image.Image:
    """Black left half, white right half."""
    pixels = np.zeros((height, width), dtype=np.uint8)
    pixels[:, width // 2 :] = 255
    return Image.fromarray(pixels, "L")


def grid(record, manifest) -> torch.Tensor | None:
    mask = cache_lib.decode_record(record, manifest)["mask"]
    return None if mask is None else mask[0]


def test_mask_files_are_cached_on_the_latent_grid_and_missing_or_misfit_ones_reported(
    tiny_model_dir, tmp_path, caplog
):
    data, masks = tmp_path / "images", tmp_path / "masks"
    (data / "sub").mkdir(parents=True)
    (masks / "sub").mkdir(parents=True)
    for name in ("a.png", "sub/b.jpg", "c.png", "d.png"):
        Image.new("RGB", (64, 64), (200, 30, 30)).save(data / name)
        (data / name).with_suffix(".txt").write_text(f"a red square {name}")
    half_mask(64, 64).save(masks / "a.webp")  # any image extension
    half_mask(64, 64).convert("RGB").save(masks / "sub" / "b.png")  # RGB masks are read as grayscale
    half_mask(32, 32).save(masks / "c.png")  # half the image's size: resized to it
    Image.new("RGB", (64, 64), (200, 30, 30)).save(data / "e.png")
    (data / "e.txt").write_text("a red square e.png")
    half_mask(64, 32).save(masks / "e.png")  # another aspect ratio: refused
    # d.png has no mask

    caplog.set_level(logging.INFO, logger="precompute")
    run_precompute(
        tiny_model_dir, data, tmp_path / "dry", "--mask_dir", str(masks), "--dry_run"
    )  # decodes the masks too
    assert "dry run: 4 images fit their buckets, 1 skipped" in caplog.text and "e.png: its mask" in caplog.text
    records, manifest = precompute(tiny_model_dir, data, tmp_path / "cache", "--mask_dir", masks)

    assert manifest["fingerprint"]["masks"] == "mask_dir" and manifest["num_masked"] == 3
    f = manifest["fingerprint"]["vae_downsample"]
    for source, blur in (("a.png", 0), ("sub/b.jpg", 0), ("c.png", 1)):  # (c's mask was upscaled: a soft edge)
        mask = grid(records[source], manifest)
        assert mask.shape == (64 // f, 64 // f) and mask.dtype == torch.uint8
        assert (mask[:, : 32 // f - blur] == 0).all() and (mask[:, 32 // f + blur :] == 255).all()  # the halves
    assert grid(records["d.png"], manifest) is None
    assert {n["source"]: n["reason"] for n in manifest["notes"]}["d.png"].startswith("no mask for it in")
    skipped = {s["source"]: s["reason"] for s in manifest["skipped"]}
    assert "e.png" not in records and f"its mask {masks / 'e.png'} is 64x32, the image 64x64" in skipped["e.png"]
    assert "3 with a loss mask" in caplog.text

    # A mask edited afterwards re-encodes its image on the next run (and only that one)
    half_mask(64, 64).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(masks / "a.webp")
    caplog.clear()
    records, manifest = precompute(tiny_model_dir, data, tmp_path / "cache", "--mask_dir", masks)
    assert "(1 new, 3 kept)" in caplog.text
    assert (grid(records["a.png"], manifest)[:, : 32 // f] == 255).all()


def test_masks_kept_inside_the_image_folder_are_not_trained_as_images(tiny_model_dir, tmp_path):
    data = tmp_path / "images"
    (data / "masks").mkdir(parents=True)
    Image.new("RGB", (64, 64), (200, 30, 30)).save(data / "red.png")
    half_mask(64, 64).save(data / "masks" / "red.png")
    records, manifest = precompute(
        tiny_model_dir, data, tmp_path / "cache", "--mask_dir", data / "masks", "--default_caption", "a red square"
    )
    assert list(records) == ["red.png"] and manifest["num_masked"] == 1


def test_a_datasets_mask_column_gives_the_masks(tiny_model_dir, tmp_path):
    features = datasets.Features(
        {"picture": datasets.Image(), "text": datasets.Value("string"), "matte": datasets.Image()}
    )
    red = Image.new("RGB", (64, 64), (200, 30, 30))
    rows = {
        "picture": [red] * 3,
        "text": ["one", "two", "three"],
        "matte": [half_mask(64, 64), None, half_mask(64, 32)],
    }
    saved = tmp_path / "dataset"
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(saved))
    flags = ["--dataset_name", saved, "--image_column", "picture", "--mask_column", "matte"]
    precompute_embeddings.main(
        precompute_embeddings.parse_args(
            ["--pretrained_model_name_or_path", str(tiny_model_dir), "--output_dir", str(tmp_path / "cache")]
            + ["--resolution", "64", "--dataloader_num_workers", "0", *map(str, flags)]
        )
    )
    data, manifest = cache_lib.load_cache(tmp_path / "cache")
    records = {r["source"]: r for r in data}
    f = manifest["fingerprint"]["vae_downsample"]
    mask = grid(records[f"{saved}[0]"], manifest)
    assert (mask[:, : 32 // f] == 0).all() and (mask[:, 32 // f :] == 255).all()
    assert grid(records[f"{saved}[1]"], manifest) is None and manifest["fingerprint"]["masks"] == "mask_column"
    skipped = {s["source"]: s["reason"] for s in manifest["skipped"]}
    assert skipped[f"{saved}[2]"].startswith(f"its mask {saved}[2][matte] is 64x32, the image 64x64")
    with pytest.raises(SystemExit):
        precompute_embeddings.parse_args(
            ["--pretrained_model_name_or_path", "m", "--output_dir", "o", *map(str, flags), "--alpha_mask"]
        )


def test_the_alpha_channel_of_a_transparent_image_is_its_mask(tiny_model_dir, tmp_path):
    data = tmp_path / "images"
    data.mkdir()
    rgba = np.full((64, 96, 4), 255, dtype=np.uint8)
    rgba[:, :48, 3] = 0  # transparent left half
    Image.fromarray(rgba, "RGBA").save(data / "cut_out.png")
    Image.new("RGBA", (96, 64), (0, 0, 255, 255)).save(data / "opaque.png")  # an alpha channel, all opaque
    for name in ("cut_out", "opaque"):
        (data / f"{name}.txt").write_text("a thing")

    records, manifest = precompute(tiny_model_dir, data, tmp_path / "cache", "--alpha_mask")
    f = manifest["fingerprint"]["vae_downsample"]
    mask = grid(records["cut_out.png"], manifest)
    bucket = records["cut_out.png"]["bucket_height"], records["cut_out.png"]["bucket_width"]
    assert mask.shape == (bucket[0] // f, bucket[1] // f) and bucket[1] // f % 2 == 0  # the whole width is kept
    half = mask.shape[1] // 2
    assert (mask[:, :half] == 0).all() and (mask[:, half:] == 255).all()
    assert grid(records["opaque.png"], manifest) is None and manifest["num_masked"] == 1


def test_mask_dir_is_refused_with_a_dataset_or_when_missing(tmp_path, capsys):
    for extra in (["--dataset_name", "x", "--mask_dir", str(tmp_path)], ["--train_data_dir", "x", "--mask_dir", "no"]):
        with pytest.raises(SystemExit):
            precompute_embeddings.parse_args(["--pretrained_model_name_or_path", "m", "--output_dir", "o", *extra])
    assert "--mask_dir no is not a folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        precompute_embeddings.parse_args(
            ["--pretrained_model_name_or_path", "m", "--output_dir", "o"]
            + ["--train_data_dir", str(tmp_path), "--mask_dir", f"{tmp_path}/"]
        )
    assert "--mask_dir is the image folder" in capsys.readouterr().err


def test_a_16_bit_mask_keeps_its_greys_and_two_masks_for_one_image_are_refused(tmp_path):
    from zimage_utils.images import BadImageError, ImageItem, find_mask, load_mask

    Image.fromarray(np.full((8, 8), 32768, np.uint16)).save(tmp_path / "a.png")
    mask = load_mask(ImageItem("a.png", path=str(tmp_path / "a.png")), "a.png", (8, 8))
    assert mask.mode == "L" and set(np.asarray(mask).flat) == {round(32768 / 257)}  # half weight, not white
    Image.new("L", (8, 8), 255).save(tmp_path / "a.jpg")
    with pytest.raises(BadImageError, match=r"2 masks in .* \(a\.jpg, a\.png\): keep one"):
        find_mask("a.png", tmp_path)


def test_the_masked_loss_is_the_mean_squared_error_over_the_weighted_latent_pixels():
    pred, target = torch.randn(2, 16, 4, 6), torch.randn(2, 16, 4, 6)
    whole = torch.ones(2, 1, 4, 6)
    torch.testing.assert_close(fm.flow_matching_loss(pred, target, mask=whole), fm.flow_matching_loss(pred, target))

    right = whole.clone()
    right[..., :3] = 0
    loss, per_sample = fm.flow_matching_loss(pred, target, mask=right)
    expected = (pred[..., 3:] - target[..., 3:]).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(per_sample, expected)
    torch.testing.assert_close(loss, expected.mean())

    # Grey weighs in between; an all-black mask contributes nothing
    grey = torch.full_like(whole, 0.25)
    torch.testing.assert_close(
        fm.flow_matching_loss(pred, target, mask=grey)[1], fm.flow_matching_loss(pred, target)[1]
    )
    assert fm.flow_matching_loss(pred, target, mask=torch.zeros_like(whole))[1].eq(0).all()


class ZeroPrediction(torch.nn.Module):
    """Predicts a zero velocity: the loss is then the (masked) mean of (x1 − x0)²."""

    def __init__(self):
        super().__init__()
        self.frozen = torch.nn.Parameter(torch.zeros(1), requires_grad=False)

    def forward(self, x, t, captions, return_dict=False):
        return ([torch.zeros_like(item) for item in x],)


def test_a_mirrored_item_is_masked_by_its_mirrored_mask_and_mask_floor_one_ignores_masks():
    mask = torch.zeros(1, 1, 4, 6, dtype=torch.uint8)
    mask[..., :3] = 255  # the left half is learned
    latents = torch.zeros(1, 16, 4, 6)
    batch = {"latents": latents, "latents_flipped": latents, "caption_embeds": [torch.zeros(3, 8)], "masks": mask}
    x0 = torch.randn(16, 4, 6, generator=torch.Generator().manual_seed(7))  # the step's noise for seed 7

    def loss(**config):
        return flow_matching_step(ZeroPrediction(), batch, StepConfig(**config), [7])["per_sample"]

    torch.testing.assert_close(loss(), x0[..., :3].pow(2).mean().reshape(1))
    torch.testing.assert_close(loss(flip_prob=1.0), x0[..., 3:].pow(2).mean().reshape(1))
    torch.testing.assert_close(loss(mask_floor=1.0), x0.pow(2).mean().reshape(1))


class OnlyTheLoraPredicts(torch.nn.Module):
    """Predicts 1 everywhere with its adapter, 0 with it disabled (as PEFT's `disable_adapters` does)."""

    def __init__(self):
        super().__init__()
        self.frozen = torch.nn.Parameter(torch.zeros(1), requires_grad=False)
        self.adapted, self.disabled = True, 0

    def disable_adapters(self):
        self.adapted, self.disabled = False, self.disabled + 1

    def enable_adapters(self):
        self.adapted = True

    def forward(self, x, t, captions, return_dict=False):
        return ([torch.full_like(item, float(self.adapted)) for item in x],)


def test_the_mask_prior_holds_the_background_to_the_base_models_prediction():
    """--mask_prior_weight: outside its mask each item's prediction is pulled to the model's without the LoRA, by
    the squared difference averaged over the background (black weighing 1, grey less); white adds nothing."""
    mask = torch.full((2, 1, 4, 6), 255, dtype=torch.uint8)
    mask[0, ..., :3] = 0  # the first item's left half is background; the second item has none
    batch = {"latents": torch.zeros(2, 16, 4, 6), "caption_embeds": [torch.zeros(3, 8)] * 2, "masks": mask}
    model = OnlyTheLoraPredicts()
    plain = flow_matching_step(model, batch, StepConfig(), [1, 2])
    prior = flow_matching_step(model, batch, StepConfig(mask_prior_weight=0.5), [1, 2])
    assert model.disabled == 1 and model.adapted  # one forward without the LoRA, which is back on after it
    assert prior["mask_prior"] == 0.5  # (1 − 0)² over item 0's background, 0 for item 1: their mean
    torch.testing.assert_close(prior["loss"], plain["loss"] + 0.5 * 0.5)
    torch.testing.assert_close(prior["per_sample"], plain["per_sample"])  # the data's loss is unchanged
    mask[0, ..., :3] = 191  # a light grey background: a quarter of the weight, the same mean difference
    assert flow_matching_step(model, batch, StepConfig(mask_prior_weight=0.5), [1, 2])["mask_prior"] == 0.5
    mask.fill_(255)  # no background in the batch: no forward without the LoRA, no term
    assert "mask_prior" not in flow_matching_step(model, batch, StepConfig(mask_prior_weight=0.5), [1, 2])
    assert model.disabled == 2


def test_collate_gives_unmasked_items_a_white_mask_and_no_masks_stay_none():
    item = {"index": 0, "latents": torch.zeros(16, 4, 6), "latents_flipped": None, "caption_embeds": torch.zeros(3, 8)}
    masked = {**item, "index": 1, "mask": torch.zeros(1, 4, 6, dtype=torch.uint8)}
    assert collate([{**item, "mask": None}])["masks"] is None
    masks = collate([{**item, "mask": None}, masked])["masks"]
    assert masks.shape == (2, 1, 4, 6) and masks[0].eq(255).all() and masks[1].eq(0).all()


def test_an_all_black_mask_teaches_the_lora_nothing(tiny_model_dir, tiny_data_dir, tmp_path):
    masks = tmp_path / "masks"
    for image in tiny_data_dir.glob("*.png"):
        masks.mkdir(exist_ok=True)
        with Image.open(image) as opened:
            Image.new("L", opened.size, 0).save(masks / image.name)
    precompute(tiny_model_dir, tiny_data_dir, tmp_path / "cache", "--mask_dir", masks)

    def lora_b(output_dir, **flags):
        log = train(tiny_model_dir, tmp_path / "cache", output_dir, max_train_steps=3, **flags)
        state = load_file(str(Path(output_dir) / "pytorch_lora_weights.safetensors"))
        return [r["loss"] for r in log if "loss" in r], [v for k, v in state.items() if "lora_B" in k]

    losses, black = lora_b(tmp_path / "black")
    assert losses == [0.0] * 3 and all(b.eq(0).all() for b in black)  # zero loss: lora_B keeps its zero init
    losses, floor = lora_b(tmp_path / "floor", mask_floor=0.5)  # black now weighs 0.5
    assert min(losses) > 0 and any(b.abs().max() > 0 for b in floor)


def test_a_cache_made_before_masks_and_variants_still_trains(tiny_cache_dir, tmp_path):
    old = shutil.copytree(tiny_cache_dir, tmp_path / "v1")
    new_columns = ["mask", "caption_variants", "variant_embeds", "variant_lengths"]
    datasets.load_from_disk(str(old / "data")).remove_columns(new_columns).save_to_disk(str(tmp_path / "data"))
    shutil.rmtree(old / "data")
    shutil.move(tmp_path / "data", old / "data")
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["num_masked"], manifest["fingerprint"]["masks"], manifest["fingerprint"]["caption_variants"]
    (old / "manifest.json").write_text(json.dumps({**manifest, "format_version": 1}))

    train, _, info = load_caches([str(old)], expected={})
    assert train[0]["mask"] is None and info["num_masked"] == 0 and train[0]["caption_variants"] == []
    assert collate([train[0]])["masks"] is None and collate([train[0]])["caption_variants"] is None
    lengths = train.columns(
        ["caption_length", "variant_lengths"], defaults={"variant_lengths": []}
    )  # (--max_memory_gb)
    assert lengths["variant_lengths"] == [[]] * len(train) and min(lengths["caption_length"]) > 0


def test_the_contact_sheet_dims_what_a_mask_leaves_out(tiny_model_dir, tmp_path):
    data, masks = tmp_path / "images", tmp_path / "masks"
    data.mkdir()
    masks.mkdir()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(data / "red.png")
    (data / "red.txt").write_text("a red square")
    half_mask(64, 64).save(masks / "red.png")
    precompute(tiny_model_dir, data, tmp_path / "cache", "--mask_dir", masks, "--contact_sheet")

    with Image.open(tmp_path / "cache" / contact_sheet.CONTACT_SHEET_NAME) as sheet:
        sheet = sheet.convert("RGB")
    # The one tile's crop thumbnail: THUMB x THUMB, right of the original, under the bucket's header
    left, top = 2 * contact_sheet.PAD + contact_sheet.THUMB, contact_sheet.TEXT_H + 3 * contact_sheet.PAD
    middle = top + contact_sheet.THUMB // 2
    learned = sheet.getpixel((left + 3 * contact_sheet.THUMB // 4, middle))
    ignored = sheet.getpixel((left + contact_sheet.THUMB // 4, middle))
    assert learned == (200, 30, 30)  # as encoded
    assert all(abs(i - 0.45 * c) <= 1 for i, c in zip(ignored, learned))  # dimmed, as the original outside the crop


def test_mask_floor_on_a_cache_without_masks_says_it_does_nothing(tiny_model_dir, tiny_cache_dir, tmp_path, caplog):
    caplog.set_level("INFO", logger="train")
    train(tiny_model_dir, tiny_cache_dir, tmp_path, max_train_steps=1, mask_floor=0.5)
    assert "no loss masks in the cache(s), so --mask_floor does nothing" in caplog.text


def test_the_mask_prior_keeps_the_background_where_the_base_model_has_it(tiny_model_dir, tiny_data_dir, tmp_path):
    """The same memorising run on images whose left halves are masked out, without and with --mask_prior_weight:
    with it, the LoRA changes the model's predictions on the masked-out halves far less, and on the learned halves
    about as much."""
    from diffusers import ZImagePipeline

    masks = tmp_path / "masks"
    masks.mkdir()
    for image in tiny_data_dir.glob("*.png"):
        with Image.open(image) as opened:
            half_mask(*opened.size).save(masks / image.name)
    records, manifest = precompute(tiny_model_dir, tiny_data_dir, tmp_path / "cache", "--mask_dir", masks)
    flags = dict(max_train_steps=60, learning_rate=5e-3, rank=8, lora_targets="all", train_batch_size=2)
    base = ZImagePipeline.from_pretrained(tiny_model_dir).transformer
    changes = {}
    for weight in (0.0, 1.0):
        log = train(
            tiny_model_dir, tmp_path / "cache", tmp_path / f"prior_{weight}", mask_prior_weight=weight, **flags
        )
        assert ("loss/mask_prior" in log[-1]) == (weight > 0)
        pipe = ZImagePipeline.from_pretrained(tiny_model_dir)
        pipe.load_lora_weights(tmp_path / f"prior_{weight}")
        change = torch.zeros(2)  # squared difference from the base model's prediction: [masked out, learned]
        for i, record in enumerate(records.values()):
            item = cache_lib.decode_record(record, manifest)
            latents, mask = item["latents"].float(), item["mask"][0].float() / 255
            noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(i))
            x = [(0.5 * latents + 0.5 * noise).unsqueeze(1)]
            caption = [item["caption_embeds"].float()]
            with torch.no_grad():
                lora, plain = (
                    m(x, torch.tensor([0.5]), caption, return_dict=False)[0][0][:, 0] for m in (pipe.transformer, base)
                )
            squared = (lora - plain).pow(2).mean(0)
            change += torch.stack(
                [(squared * (1 - mask)).sum() / (1 - mask).sum(), (squared * mask).sum() / mask.sum()]
            )
        changes[weight] = (change / len(records)).tolist()
    (masked_out, learned), (masked_out_prior, learned_prior) = changes[0.0], changes[1.0]
    assert masked_out_prior < 0.4 * masked_out, changes  # measured 0.088 vs 0.304
    assert learned_prior > 0.4 * learned, changes  # measured 0.162 vs 0.314 (attention mixes the halves)
