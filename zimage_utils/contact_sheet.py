"""CACHE/contact_sheet.png: what the precompute did to each image, for a user to check at a glance.

One tile per image, grouped under a header per bucket: on the left the original with the kept area outlined (the
rest dimmed), on the right the crop that was encoded (with a loss mask, what the mask leaves out dimmed the same
way), below the item's source. The originals are decoded again from the cache records' `source` and `crop_box`, so
the sheet costs nothing during encoding. The PNG's text chunk "sources" lists the sources shown, in tile order (the
names under the tiles are shortened to fit).
"""

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont, ImageOps
from PIL.PngImagePlugin import PngInfo

from .images import BadImageError, ImageItem, load_image

CONTACT_SHEET_NAME = "contact_sheet.png"
THUMB = 128  # px, the longer side of each thumbnail
COLUMNS = 4  # tiles per row
PAD = 6  # px
TEXT_H = 16  # px, a line of text
TILE_W, TILE_H = 2 * THUMB + 3 * PAD, THUMB + TEXT_H + 2 * PAD
CROP_COLOUR = (255, 40, 40)


def _bucket(record: dict[str, Any]) -> tuple[int, int]:
    return record["bucket_height"], record["bucket_width"]


def pick_records(records: list[dict[str, Any]], limit: int) -> list[dict[str, Any]]:
    """At most `limit` records, taken from the buckets in turn so that every bucket shows up (when `limit` ≥ the
    number of buckets), ordered by bucket (h, w) then source."""
    by_bucket: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for r in sorted(records, key=lambda r: r["source"]):
        by_bucket.setdefault(_bucket(r), []).append(r)
    queues = [by_bucket[b] for b in sorted(by_bucket)]
    picked: list[dict[str, Any]] = []
    for round_index in range(max((len(q) for q in queues), default=0)):
        picked += [q[round_index] for q in queues if round_index < len(q)][: limit - len(picked)]
    return sorted(picked, key=lambda r: (_bucket(r), r["source"]))


def write_contact_sheet(
    cache_data, items: list[ImageItem], hf_dataset: Any, path: str | Path, limit: int = 64
) -> tuple[Path, int]:
    """Draw up to `limit` items of a cache (`cache_data`: its `datasets.Dataset`, or a list of records with
    source, bucket_height, bucket_width and crop_box) into `path`, COLUMNS tiles of TILE_W x TILE_H pixels a row,
    under a header line per bucket. `items` and `hf_dataset` are what `discover_folder` / `items_from_dataset`
    returned, to find each source's image; a source no longer there gets a grey tile.
    Returns (path, number of images shown)."""
    if hasattr(cache_data, "select_columns"):  # a datasets.Dataset: leave the latents on disk
        columns = ["source", "bucket_height", "bucket_width", "crop_box"]
        cache_data = cache_data.select_columns(columns + ["mask"] * ("mask" in cache_data.column_names)).to_list()
    totals = Counter(_bucket(r) for r in cache_data)
    picked = pick_records(list(cache_data), limit)
    groups: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for r in picked:
        groups.setdefault(_bucket(r), []).append(r)
    by_source = {item.source: item for item in items}

    header_h = TEXT_H + 2 * PAD
    height = sum(header_h + math.ceil(len(g) / COLUMNS) * TILE_H for g in groups.values())
    sheet = Image.new("RGB", (COLUMNS * TILE_W, max(height, TILE_H)), (245, 245, 245))
    draw = ImageDraw.Draw(sheet)
    header_font, font = ImageFont.load_default(size=13), ImageFont.load_default(size=11)
    y = 0
    for (bh, bw), group in groups.items():
        shown = f"{len(group)} of {totals[(bh, bw)]}" if len(group) < totals[(bh, bw)] else f"{len(group)}"
        draw.text((PAD, y + PAD), f"bucket {bh}x{bw} (h x w): {shown} images", fill="black", font=header_font)
        y += header_h
        for i, record in enumerate(group):
            x, top = (i % COLUMNS) * TILE_W, y + (i // COLUMNS) * TILE_H
            original, crop = _thumbnails(record, by_source.get(record["source"]), hf_dataset)
            # Each thumbnail centred in its THUMB x THUMB square: the original left, the crop right
            for left, thumb in ((x + PAD, original), (x + 2 * PAD + THUMB, crop)):
                corner = (left + (THUMB - thumb.width) // 2, top + PAD + (THUMB - thumb.height) // 2)
                sheet.paste(thumb, corner)
                frame = (corner[0] - 1, corner[1] - 1, corner[0] + thumb.width, corner[1] + thumb.height)
                draw.rectangle(frame, outline=(190, 190, 190))  # white images stay visible on the background
            name = _fit(draw, record["source"], font, TILE_W - 2 * PAD)
            draw.text((x + PAD, top + PAD + THUMB + 2), name, fill="black", font=font)
        y += math.ceil(len(group) / COLUMNS) * TILE_H

    path = Path(path)
    info = PngInfo()
    info.add_text("sources", json.dumps([r["source"] for r in picked]))
    tmp = path.with_name(f".{path.name}.tmp.png")
    sheet.save(tmp, pnginfo=info)
    tmp.replace(path)
    return path, len(picked)


def _thumbnails(record: dict[str, Any], item: ImageItem | None, hf_dataset: Any) -> tuple[Image.Image, Image.Image]:
    """(original with the crop outlined, the crop at the bucket's aspect), each fitting THUMB x THUMB."""
    bh, bw = record["bucket_height"], record["bucket_width"]
    scale = THUMB / max(bh, bw)
    crop_size = (max(1, round(bw * scale)), max(1, round(bh * scale)))
    try:
        image = load_image(item, hf_dataset) if item is not None else None
    except BadImageError:  # deleted or damaged since it was cached: its tile still says so
        image = None
    if image is None:
        missing = Image.new("RGB", (THUMB, THUMB), (200, 200, 200))
        ImageDraw.Draw(missing).text((PAD, THUMB // 2), "image not found", fill="black")
        return missing, Image.new("RGB", crop_size, (200, 200, 200))
    # The crop box is in the original's pixels (after EXIF rotation, as load_image returns it)
    crop = image.resize(crop_size, Image.Resampling.BICUBIC, box=tuple(record["crop_box"]))
    thumb = ImageOps.contain(image, (THUMB, THUMB), Image.Resampling.BICUBIC)  # enlarges small originals too
    box = [round(v * thumb.width / image.width) for v in record["crop_box"]]
    dimmed = Image.blend(thumb, Image.new("RGB", thumb.size), 0.55)
    dimmed.paste(thumb.crop(box), box[:2])
    ImageDraw.Draw(dimmed).rectangle(box, outline=CROP_COLOUR, width=2)
    if record.get("mask"):  # stored on the latent grid: its side is the bucket's over the VAE's downsampling
        f = round(math.sqrt(bh * bw / len(record["mask"])))
        mask = Image.frombytes("L", (bw // f, bh // f), record["mask"]).resize(crop_size, Image.Resampling.BILINEAR)
        crop = Image.composite(crop, Image.blend(crop, Image.new("RGB", crop_size), 0.55), mask)
    return dimmed, crop


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """`text`, shortened from the left with "…" until it fits `width` pixels (the file name is what matters)."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength("…" + text, font=font) > width:
        text = text[1:]
    return "…" + text
