"""Finding training images and loading them robustly: what a user sees for each kind of file in their folder."""

import hashlib
import json
import logging
import os
import random

import numpy as np
import pytest
from PIL import Image

from zimage_utils import cli
from zimage_utils.images import (
    BadImageError,
    ImageItem,
    Skipped,
    content_hash,
    conversion_note,
    discover_folder,
    items_from_dataset,
    load_image,
    read_image_size,
    resolve_caption,
)


def _noise(width, height, mode="RGB", seed=0):
    """A noisy image (PIL size is (width, height)); noise keeps JPEGs large enough to truncate meaningfully."""
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode)


@pytest.fixture
def messy_folder(tmp_path):
    """A training folder holding one of each case a user's data can contain."""
    root = tmp_path / "data"
    (root / "sub").mkdir(parents=True)

    _noise(40, 30).save(root / "good.png")
    (root / "good.txt").write_text("  a red fox  \n")
    _noise(32, 32).save(root / "sub" / "photo.jpg", quality=90)
    (root / "sub" / "photo.txt").write_text("a photo")

    (root / "corrupt.jpg").write_bytes(random.Random(0).randbytes(2000))
    full = root / "full.jpg"
    _noise(256, 256).save(full, quality=95)
    (root / "truncated.jpg").write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    full.unlink()

    Image.new("CMYK", (24, 16), (0, 255, 255, 0)).save(root / "cmyk.jpg")  # pure red in CMYK

    rgba = Image.new("RGBA", (20, 20), (255, 0, 0, 255))
    rgba.paste((0, 0, 0, 0), (0, 0, 10, 20))  # left half fully transparent
    rgba.save(root / "rgba.png")

    Image.new("L", (16, 16), 128).save(root / "gray.png")

    palette = Image.new("P", (16, 16), 0)
    palette.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)  # index 0 black, index 1 blue
    palette.paste(1, (8, 0, 16, 16))  # right half blue, left half index 0 = transparent
    palette.save(root / "palette.png", transparency=0)

    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display": phones store portraits like this
    _noise(40, 20).save(root / "rotated.jpg", exif=exif)  # stored 40 wide × 20 high

    _noise(16, 16).save(root / "empty_caption.png")
    (root / "empty_caption.txt").write_text("   \n")
    _noise(16, 16).save(root / "no_caption.PNG")  # upper-case extension still counts

    (root / "notes.md").write_text("not an image")
    (root / "._good.png").write_bytes(b"macOS resource fork")  # hidden junk is ignored
    return root


def _by_source(root):
    return {item.source: item for item in discover_folder(root)}


# ----------------------------------------------------------------------------------------------------------
# Finding items


def test_discover_folder_lists_images_recursively_in_sorted_order(messy_folder):
    items = discover_folder(messy_folder)
    sources = [item.source for item in items]
    assert sources == sorted(sources)
    assert set(sources) == {
        "cmyk.jpg",
        "corrupt.jpg",
        "empty_caption.png",
        "good.png",
        "gray.png",
        "no_caption.PNG",
        "palette.png",
        "rgba.png",
        "rotated.jpg",
        "sub/photo.jpg",
        "truncated.jpg",
    }
    good = items[sources.index("good.png")]
    assert good.path == str(messy_folder / "good.png") and good.row is None


def test_captions_come_from_txt_sidecars(messy_folder):
    items = _by_source(messy_folder)
    assert items["good.png"].caption == "  a red fox  \n"  # raw; resolve_caption cleans it
    assert items["sub/photo.jpg"].caption == "a photo"
    assert items["empty_caption.png"].caption == "   \n"
    assert items["no_caption.PNG"].caption is None


def test_other_caption_extension(tmp_path):
    _noise(8, 8).save(tmp_path / "a.png")
    (tmp_path / "a.caption").write_text("from .caption")
    assert discover_folder(tmp_path, caption_extension=".caption")[0].caption == "from .caption"


def test_an_upper_case_caption_extension_is_found_too(tmp_path):
    _noise(8, 8).save(tmp_path / "A.PNG")
    (tmp_path / "A.TXT").write_text("from A.TXT")
    assert discover_folder(tmp_path)[0].caption == "from A.TXT"


def test_every_caption_file_that_is_not_utf8_is_named_in_one_error(tmp_path):
    for name in ("a", "sub/b", "c"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        _noise(8, 8).save(tmp_path / f"{name}.png")
    (tmp_path / "a.txt").write_bytes("café".encode("latin-1"))
    (tmp_path / "sub/b.txt").write_bytes("naïve".encode("latin-1"))
    (tmp_path / "c.txt").write_bytes("\ufeffa BOM from Notepad".encode())  # UTF-8 with a BOM is fine
    with pytest.raises(ValueError, match=r"2 caption file\(s\) in .* are not UTF-8 text \(a\.txt, sub/b\.txt\)"):
        discover_folder(tmp_path)
    (tmp_path / "a.txt").write_text("café")
    (tmp_path / "sub/b.txt").write_text("naïve")
    assert [i.caption for i in discover_folder(tmp_path)] == ["café", "a BOM from Notepad", "naïve"]


def test_a_cache_and_masks_inside_the_data_folder_are_not_images_to_train(tmp_path):
    for name in ("a.png", "masks/a.png", "cache/contact_sheet.png"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        _noise(8, 8).save(tmp_path / name)
    found = discover_folder(tmp_path, exclude=[tmp_path / "masks", tmp_path / "cache"])
    assert [item.source for item in found] == ["a.png"]
    # a cache folder that holds the data folder excludes nothing
    assert len(discover_folder(tmp_path / "masks", exclude=[tmp_path, tmp_path / "masks"])) == 1


def test_what_a_folder_holds_but_training_cannot_use_is_named_not_dropped_silently(tmp_path, caplog):
    """GIF, TIFF and AVIF images are read (a GIF's first frame); linked folders are followed, once; HEIC images,
    links to nothing and names that are not UTF-8 are left out, each kind named in a warning."""
    for name in ("a.gif", "b.tif", "c.avif", "d.png"):
        _noise(8, 8).save(tmp_path / name)
        (tmp_path / name).with_suffix(".txt").write_text(f"caption {name}")
    (tmp_path / "phone.heic").write_bytes(b"not read here")
    elsewhere = tmp_path.parent / f"{tmp_path.name}_elsewhere"
    elsewhere.mkdir()
    _noise(8, 8).save(elsewhere / "e.png")
    (tmp_path / "linked").symlink_to(elsewhere, target_is_directory=True)
    (elsewhere / "loop").symlink_to(tmp_path, target_is_directory=True)  # (back up the tree: walked once)
    (tmp_path / "gone.png").symlink_to(tmp_path / "nowhere.png")
    _noise(8, 8).save(os.path.join(os.fsencode(tmp_path), b"caf\xe9.png").decode("utf-8", "surrogateescape"))
    with caplog.at_level("WARNING"):
        found = discover_folder(tmp_path)
    assert [i.source for i in found] == ["a.gif", "b.tif", "c.avif", "d.png", "linked/e.png"]
    assert found[0].caption == "caption a.gif" and load_image(found[0]).size == (8, 8)
    warnings = caplog.text
    assert "1 image(s) in" in warnings and "(.heic; phone.heic)" in warnings
    assert "1 link(s)" in warnings and "gone.png" in warnings
    assert "1 image name(s)" in warnings and r"caf\xe9.png" in warnings and "rename them" in warnings

    caplog.clear()  # the processes of a launch after the first leave the warnings to it
    assert len(discover_folder(tmp_path, warn=False)) == 5 and not caplog.text


def test_processes_after_the_first_of_a_launch_log_warnings_but_not_notes(caplog, monkeypatch):
    saved = {name: logging.getLogger(name).level for name in ("precompute", "zimage_utils")}
    monkeypatch.setenv("RANK", "1")
    try:
        cli.setup_logging("precompute")
        with caplog.at_level("INFO"):
            logging.getLogger("zimage_utils.images").info("a note every process would repeat")
            logging.getLogger("precompute").warning("out of memory on this process")
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)
    assert caplog.messages == ["out of memory on this process"]


def test_a_metadata_file_names_what_it_lacks_line_by_line(tmp_path, caplog):
    _noise(8, 8).save(tmp_path / "a.png")
    _noise(8, 8).save(tmp_path / "b.png")
    (tmp_path / "b.txt").write_text("a sidecar the metadata file hides")
    meta = tmp_path / "metadata.jsonl"
    for lines, message in (
        (['{"file_name": "a.png", "text": "x"}', "5"], "line 2 is a JSON int, not an object"),
        (['{"file_name": "a.png", "text": "x"}', '{"text": "y"}'], "a row without a file_name"),
        (['{"file_name": "a.png", "text": {"en": "x"}}'], "the caption of a.png is a dict"),
    ):
        meta.write_text("\n".join(lines) + "\n")
        with pytest.raises(ValueError, match=message):
            discover_folder(tmp_path)
    meta.write_text('{"file_name": "a.png", "text": "x"}\n')
    with caplog.at_level("WARNING"):
        assert [i.caption for i in discover_folder(tmp_path)] == ["x", None]
    assert "1 image(s) in" in caplog.text and "no row in metadata.jsonl" in caplog.text and "b.png" in caplog.text
    meta.unlink()
    (tmp_path / "metadata.csv").write_bytes("file_name,text\na.png,café\n".encode("latin-1"))
    with pytest.raises(ValueError, match="metadata.csv is not UTF-8 text"):
        discover_folder(tmp_path)


def test_a_caption_saved_as_utf16_without_its_mark_is_not_read_as_text(tmp_path):
    _noise(8, 8).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_bytes("a caption".encode("utf-16-le"))
    with pytest.raises(ValueError, match=r"not UTF-8 text \(a\.txt\).*-f utf-16"):
        discover_folder(tmp_path)


def test_missing_folder_names_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        discover_folder(tmp_path / "nope")


def test_folder_without_images_says_what_was_searched(tmp_path):
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(ValueError, match=r"no images found in .*\.png"):
        discover_folder(tmp_path)


def test_two_metadata_rows_for_one_image_are_refused(tmp_path):
    _noise(8, 8).save(tmp_path / "a.png")
    rows = [{"file_name": "a.png", "text": "first"}, {"file_name": "./a.png", "text": "second"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(ValueError, match="metadata.jsonl has two rows for a.png: keep one"):
        discover_folder(tmp_path)


def test_metadata_jsonl_captions_override_sidecars(tmp_path):
    (tmp_path / "sub").mkdir()
    _noise(8, 8).save(tmp_path / "a.png")
    _noise(8, 8).save(tmp_path / "sub" / "b.jpg")
    _noise(8, 8).save(tmp_path / "c.png")
    (tmp_path / "a.txt").write_text("sidecar is ignored when metadata exists")
    rows = [{"file_name": "a.png", "text": "caption a"}, {"file_name": "sub/b.jpg", "text": "caption b"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")

    items = _by_source(tmp_path)
    assert items["a.png"].caption == "caption a"
    assert items["sub/b.jpg"].caption == "caption b"
    assert items["c.png"].caption is None  # no row for it


def test_metadata_csv_with_a_custom_caption_column(tmp_path):
    _noise(8, 8).save(tmp_path / "a.png")
    (tmp_path / "metadata.csv").write_text('file_name,prompt\na.png,"a cat, sitting"\n')
    assert discover_folder(tmp_path, caption_column="prompt")[0].caption == "a cat, sitting"


def test_metadata_without_the_caption_column_lists_columns_and_the_flag(tmp_path):
    _noise(8, 8).save(tmp_path / "a.png")
    (tmp_path / "metadata.csv").write_text("file_name,prompt\na.png,a cat\n")
    with pytest.raises(ValueError, match=r"'text'.*\['file_name', 'prompt'\].*--caption_column"):
        discover_folder(tmp_path)


# ----------------------------------------------------------------------------------------------------------
# Captions


def test_caption_is_stripped():
    assert resolve_caption("  a red fox \n", None, None) == ("a red fox", None)


def test_missing_caption_without_default_is_flagged_for_skipping():
    caption, note = resolve_caption(None, "sks", None)
    assert caption is None and "--default_caption" in note and "missing" in note


def test_empty_caption_falls_back_to_the_default():
    assert resolve_caption("  \n", None, "a photo") == ("a photo", "empty caption, used --default_caption")


def test_trigger_word_is_prepended_once():
    assert resolve_caption("a dog", "sks", None) == ("sks, a dog", None)
    assert resolve_caption("sks dog on grass", "sks", None) == ("sks dog on grass", None)
    assert resolve_caption("a photo of sks dog", "sks", None) == ("a photo of sks dog", None)  # already there
    assert resolve_caption("sksdog", "sks", None) == ("sks, sksdog", None)  # a different word
    assert resolve_caption("a photo of sks person", "sks person", None)[0] == "a photo of sks person"
    assert resolve_caption("", "sks", "a photo")[0] == "sks, a photo"


def test_trigger_placeholder_takes_the_trigger_word_where_the_caption_puts_it():
    """ai-toolkit's "[trigger]": replaced, not prepended; without --caption_prefix it stays, with a note."""
    assert resolve_caption("[trigger] on a beach, [trigger] smiling", "sks person", None) == (
        "sks person on a beach, sks person smiling",
        None,
    )
    caption, note = resolve_caption("[trigger] on a beach", None, None)
    assert caption == "[trigger] on a beach" and "pass --caption_prefix" in note


# ----------------------------------------------------------------------------------------------------------
# Loading images


def test_good_images_load_as_rgb_with_nothing_to_report(messy_folder):
    items = _by_source(messy_folder)
    for source in ("good.png", "sub/photo.jpg"):
        image = load_image(items[source])
        assert image.mode == "RGB"
        assert conversion_note(image) is None
    assert load_image(items["good.png"]).size == (40, 30)
    assert read_image_size(items["good.png"]) == (30, 40)  # (height, width)


def test_corrupt_file_is_a_bad_image_naming_the_file_and_fix(messy_folder):
    item = _by_source(messy_folder)["corrupt.jpg"]
    for read in (read_image_size, load_image):
        with pytest.raises(BadImageError) as info:
            read(item)
        assert "corrupt.jpg" in str(info.value)
        assert "delete it" in info.value.reason


def test_truncated_jpeg_fails_at_load_not_silently(messy_folder):
    item = _by_source(messy_folder)["truncated.jpg"]
    assert read_image_size(item) == (256, 256)  # the header is intact
    with pytest.raises(BadImageError, match="truncated or corrupt") as info:
        load_image(item)
    skipped = info.value.to_skipped()
    assert skipped == Skipped("truncated.jpg", info.value.reason)
    assert str(skipped).startswith("truncated.jpg: cannot decode image")


def test_cmyk_jpeg_is_converted_to_rgb(messy_folder):
    image = load_image(_by_source(messy_folder)["cmyk.jpg"])
    assert image.mode == "RGB" and image.size == (24, 16)
    r, g, b = image.getpixel((12, 8))
    assert r > 200 and g < 60 and b < 60
    assert conversion_note(image) == "CMYK → RGB"


def test_transparent_png_is_composited_onto_white(messy_folder):
    image = load_image(_by_source(messy_folder)["rgba.png"])
    assert image.mode == "RGB"
    assert image.getpixel((2, 10)) == (255, 255, 255)  # was transparent
    assert image.getpixel((15, 10)) == (255, 0, 0)  # was opaque red
    assert "composited onto white" in conversion_note(image)


def test_palette_png_with_transparency_is_composited_onto_white(messy_folder):
    image = load_image(_by_source(messy_folder)["palette.png"])
    assert image.getpixel((2, 2)) == (255, 255, 255)  # transparent index, not black
    assert image.getpixel((12, 2)) == (0, 0, 255)
    assert conversion_note(image).startswith("P → RGB")


def test_grayscale_png_becomes_three_equal_channels(messy_folder):
    image = load_image(_by_source(messy_folder)["gray.png"])
    assert image.mode == "RGB" and image.getpixel((0, 0)) == (128, 128, 128)
    assert conversion_note(image) == "L → RGB"


def test_16_bit_grayscale_is_rescaled_not_clipped_to_white(tmp_path):
    Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16)).save(tmp_path / "deep.png")
    image = load_image(ImageItem(source="deep.png", path=str(tmp_path / "deep.png")))
    assert image.getpixel((0, 0)) == (128, 128, 128)
    assert "8-bit RGB" in conversion_note(image)


def test_exif_rotated_jpeg_is_loaded_upright(messy_folder):
    item = _by_source(messy_folder)["rotated.jpg"]
    # Stored 40 wide × 20 high with orientation 6: displayed (and trained) 20 wide × 40 high.
    assert read_image_size(item) == (40, 20)
    image = load_image(item)
    assert image.size == (20, 40)
    assert "EXIF orientation 6" in conversion_note(image)


def test_missing_file_is_a_bad_image(tmp_path):
    item = ImageItem(source="gone.png", path=str(tmp_path / "gone.png"))
    with pytest.raises(BadImageError, match="gone.png: file not found"):
        load_image(item)


def test_a_whole_folder_sorts_into_usable_and_skipped(messy_folder):
    """What a caching script does with these helpers: every bad file becomes one readable line."""
    usable, skipped = [], []
    for item in discover_folder(messy_folder):
        try:
            load_image(item)
        except BadImageError as e:
            skipped.append(e.to_skipped())
            continue
        caption, note = resolve_caption(item.caption, None, None)
        if caption is None:
            skipped.append(Skipped(item.source, note))
            continue
        usable.append(item.source)
    assert usable == ["good.png", "sub/photo.jpg"]  # the converted images have no caption here
    reasons = {s.source: s.reason for s in skipped}
    assert "empty caption" in reasons["empty_caption.png"]
    assert "missing caption" in reasons["no_caption.PNG"]
    assert "corrupt" in reasons["corrupt.jpg"] and "truncated" in reasons["truncated.jpg"]


def test_content_hash_is_the_sha256_of_the_file(messy_folder):
    item = _by_source(messy_folder)["good.png"]
    assert content_hash(item) == hashlib.sha256((messy_folder / "good.png").read_bytes()).hexdigest()


# ----------------------------------------------------------------------------------------------------------
# datasets


@pytest.fixture
def saved_dataset(tmp_path):
    from datasets import Dataset, Features, Value
    from datasets import Image as ImageFeature

    features = Features({"picture": ImageFeature(), "prompt": Value("string")})
    data = {
        "picture": [_noise(24, 16, seed=1), _noise(16, 16, "RGBA", seed=2)],
        "prompt": ["first image", None],
    }
    path = tmp_path / "ds"
    Dataset.from_dict(data, features=features).save_to_disk(str(path))
    return str(path)


def test_saved_dataset_rows_become_items(saved_dataset):
    dataset, items = items_from_dataset(saved_dataset, image_column="picture", caption_column="prompt")
    assert [item.source for item in items] == [f"{saved_dataset}[0]", f"{saved_dataset}[1]"]
    assert [item.caption for item in items] == ["first image", None]
    assert [item.row for item in items] == [0, 1] and items[0].path is None

    assert read_image_size(items[0], dataset) == (16, 24)
    image = load_image(items[0], dataset)
    assert image.mode == "RGB" and image.size == (24, 16)
    transparent = load_image(items[1], dataset)  # noise RGBA: some pixels are see-through
    assert transparent.mode == "RGB" and "composited onto white" in conversion_note(transparent)

    hashes = {content_hash(item, dataset) for item in items}
    assert len(hashes) == 2 and all(len(h) == 64 for h in hashes)


def test_wrong_dataset_column_lists_the_columns_and_the_flag(saved_dataset):
    with pytest.raises(ValueError, match=r"'image'.*\['picture', 'prompt'\].*--image_column"):
        items_from_dataset(saved_dataset, caption_column="prompt")
    with pytest.raises(ValueError, match=r"'text'.*--caption_column"):
        items_from_dataset(saved_dataset, image_column="picture")


def test_dataset_row_needs_its_dataset(saved_dataset):
    _, items = items_from_dataset(saved_dataset, image_column="picture", caption_column="prompt")
    with pytest.raises(ValueError, match="pass the dataset"):
        load_image(items[0])
