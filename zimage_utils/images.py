"""Finding training items (image + caption) and loading their images robustly.

Two sources are supported:
- a folder of images, captioned by `.txt` sidecars or by a `metadata.jsonl` / `metadata.csv` file (the
  `datasets` imagefolder convention), see `discover_folder`;
- a Hugging Face `datasets` dataset (saved with `save_to_disk`, or loadable by `load_dataset`), see
  `items_from_dataset`.

Both yield `ImageItem`s. Images are only opened by `read_image_size` (header only), `load_image` (full decode)
and `content_hash`; a bad image raises `BadImageError`, whose reason says what is wrong and how to fix it, so the
caller can turn it into a `Skipped` entry and carry on.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import random
import re
import struct
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from PIL import Image, ImageOps

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".avif")  # (a GIF: frame 1)
# Image formats Pillow does not read by itself: named when a folder holds them, not left out silently
UNREAD_IMAGE_EXTENSIONS = (".heic", ".heif", ".jxl", ".psd", ".svg", ".dng", ".cr2", ".cr3", ".nef", ".arw", ".raw")
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
# `items_from_dataset` returns a dataset holding only this column, so the loaders know where to look.
DATASET_IMAGE_COLUMN = "image"
DATASET_MASK_COLUMN = "mask"  # and the loss masks' column, with `mask_column`
# Key in `Image.info` where `load_image` records what it changed; read it with `conversion_note`.
CONVERSION_INFO_KEY = "zimage_conversion"
# Key in `Image.info` where `load_image` keeps the alpha channel it composited away; read it with `alpha_channel`.
ALPHA_INFO_KEY = "zimage_alpha"

# PIL decoders raise many exception types on damaged files (struct.error from TIFF/EXIF parsing,
# SyntaxError from some plugins, OSError for truncation); all of them mean "this file is bad".
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error)
_CORRUPT = "cannot decode image (truncated or corrupt file): re-export it or delete it"
_EXIF_SWAPS_SIDES = (5, 6, 7, 8)  # EXIF orientations that rotate by 90° or 270°


@dataclass
class ImageItem:
    """One training image and its raw caption.

    `source` is what messages show: the path relative to the data root in POSIX form (``"cats/01.jpg"``) or
    ``"{dataset}[{row}]"`` for a dataset row. Exactly one of `path` (absolute file path) and `row` (dataset row
    index) is set. `caption` is the raw caption: None when there is none, "" when it is empty.
    """

    source: str
    caption: str | None = None
    path: str | None = None
    row: int | None = None


@dataclass
class Skipped:
    """An item left out of training, with a short reason that names the problem and the fix."""

    source: str
    reason: str

    def __str__(self) -> str:
        return f"{self.source}: {self.reason}"


class BadImageError(Exception):
    """An image that cannot be used. `reason` names the problem and the fix; `str()` adds the file."""

    def __init__(self, source: str, reason: str):
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason

    def to_skipped(self) -> Skipped:
        return Skipped(self.source, self.reason)


# ----------------------------------------------------------------------------------------------------------
# Finding items


def check_image_folder(root: str | os.PathLike) -> Path:
    """`root` resolved, or a FileNotFoundError when it is not a folder (the precompute asks before making its output
    folder, so a wrong data path leaves nothing behind)."""
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist or is not a folder: check the data path")
    return root


def discover_folder(
    root: str | os.PathLike,
    caption_extension: str = ".txt",
    caption_column: str = "text",
    exclude: str | os.PathLike | list | None = None,
    warn: bool = True,
) -> list[ImageItem]:
    """All images under `root` (recursive), sorted by relative path so the order is the same on every machine.

    Captions come from `root/metadata.jsonl` or `root/metadata.csv` when one exists (a `file_name` column
    relative to `root`, the caption in `caption_column`); otherwise from a sidecar with the image's stem and
    `caption_extension` next to it (``cats/01.jpg`` → ``cats/01.txt``). No caption → `caption=None`.
    Files and folders whose name starts with "." are ignored (macOS ``._*`` files, ``.ipynb_checkpoints``), and so
    are the folders `exclude` (one or a list) when they lie inside `root` (loss masks kept beside the images, a cache
    written inside the data folder with its contact sheet: not images to train). Linked folders are followed (each
    once). What is left out otherwise is named in a warning: images in a format not read here (HEIC, ...), links to
    nothing, names that are not UTF-8 (`warn=False`: none, for the processes of a launch other than the first).
    """
    root = check_image_folder(root)

    found, broken = _walk_files(root)
    paths = sorted(
        (p for p in found if p.suffix.lower() in IMAGE_EXTENSIONS), key=lambda p: p.relative_to(root).as_posix()
    )
    unread = [p for p in found if p.suffix.lower() in UNREAD_IMAGE_EXTENSIONS]
    badly_named = [p for p in paths if not _is_utf8(p.relative_to(root).as_posix())]
    paths = [p for p in paths if p not in set(badly_named)]
    if warn:
        _warn_left_out(root, unread, broken, badly_named)
    for folder in exclude if isinstance(exclude, list) else [exclude]:
        if (
            folder is not None
            and (folder := Path(folder).expanduser().resolve()).is_relative_to(root)
            and folder != root
        ):
            paths = [p for p in paths if not p.is_relative_to(folder)]
    if not paths:
        raise ValueError(
            f"no images found in {root} (searched recursively for {', '.join(IMAGE_EXTENSIONS)}): "
            "point the data path at the folder that holds your images"
        )

    metadata = _read_metadata(root, caption_column)
    items, not_utf8, sidecars_unread = [], [], []
    for path in paths:
        source = path.relative_to(root).as_posix()
        if metadata is not None:
            caption = metadata.pop(source, None)
            if caption is None and path.with_suffix(caption_extension).is_file():
                sidecars_unread.append(source)
        else:
            sidecar = path.with_suffix(caption_extension)
            if not sidecar.is_file():  # a.PNG + a.TXT, as some cameras and Windows tools name them
                sidecar = path.with_suffix(caption_extension.upper())
            try:
                caption = _read_sidecar(sidecar)
            except UnicodeDecodeError:
                not_utf8.append(sidecar)
                continue
        items.append(ImageItem(source=source, caption=caption, path=str(path)))
    if not_utf8:  # all of them at once: a data set re-saved in one go, not one file per failed run
        shown = ", ".join(str(p.relative_to(root)) for p in not_utf8[:5]) + (", ..." if len(not_utf8) > 5 else "")
        raise ValueError(
            f"{len(not_utf8)} caption file(s) in {root} are not UTF-8 text ({shown}): save them as UTF-8 "
            "(e.g. `iconv -f latin1 -t utf-8` for Latin-1, `iconv -f utf-16 -t utf-8` for UTF-16) and run again"
        )
    if sidecars_unread and warn:
        logger.warning(
            "%d image(s) in %s have a %s caption but no row in %s, which captions this folder (e.g. %s): add rows "
            "for them, or remove the metadata file to use the %s files",
            len(sidecars_unread), root, caption_extension, _metadata_name(root), sidecars_unread[0], caption_extension,
        )  # fmt: skip
    if metadata and warn:
        # Not fatal: the rows are useless without their files, and the rest of the data set is fine.
        missing = sorted(metadata)
        logger.warning(
            "%d rows of the metadata file in %s name images that are not there (e.g. %s): fix their file_name",
            len(missing),
            root,
            ", ".join(missing[:3]),
        )
    return items


def _walk_files(root: Path) -> tuple[list[Path], list[Path]]:
    """(the files under `root`, broken links), following linked folders once each; names starting with "." are
    left out, folders and files."""
    files, broken, seen = [], [], set()
    for folder, folders, names in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:  # (a link back up the tree, or a second link to one folder)
            folders[:] = []
            continue
        seen.add(real)
        folders[:] = [name for name in folders if not name.startswith(".")]
        for name in names:
            path = Path(folder) / name
            if name.startswith("."):
                continue
            if path.is_file():
                files.append(path)
            elif path.is_symlink() and not path.exists():
                broken.append(path)
    return files, broken


def _is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")  # (an undecodable byte in a file name comes through as a lone surrogate)
    except UnicodeEncodeError:
        return False
    return True


def _warn_left_out(root: Path, unread: list[Path], broken: list[Path], badly_named: list[Path]) -> None:
    def shown(paths: list[Path]) -> str:
        names = [repr(p.relative_to(root).as_posix().encode("utf-8", "surrogateescape"))[2:-1] for p in paths[:3]]
        return ", ".join(names) + (", ..." if len(paths) > 3 else "")

    if unread:
        kinds = ", ".join(sorted({p.suffix.lower() for p in unread}))
        logger.warning(
            f"{len(unread)} image(s) in {root} are in a format not read here ({kinds}; {shown(unread)}), left out: "
            "convert them to PNG, JPEG or WebP (HEIC: e.g. `pip install pillow-heif`, then re-save them)"
        )
    if broken:
        logger.warning(f"{len(broken)} link(s) in {root} point at nothing ({shown(broken)}), left out")
    if badly_named:
        logger.warning(
            f"{len(badly_named)} image name(s) in {root} are not UTF-8 ({shown(badly_named)}), left out: rename them"
        )


def _metadata_name(root: Path) -> str:
    return next(name for name in METADATA_FILES if (root / name).is_file())


def _read_sidecar(path: Path) -> str | None:
    if not path.is_file():
        return None
    text = path.read_text(encoding="utf-8-sig")  # -sig: editors on Windows add a BOM
    if "\x00" in text:  # (UTF-16 without its byte-order mark reads as "UTF-8" with NULs between the letters)
        raise UnicodeDecodeError("utf-8", b"\x00", 0, 1, "a NUL character: not UTF-8 text")
    return text


def _read_metadata(root: Path, caption_column: str) -> dict[str, str | None] | None:
    """{relative POSIX path: caption} from root's metadata file, or None when there is none."""
    present = [root / name for name in METADATA_FILES if (root / name).is_file()]
    if not present:
        return None
    if len(present) > 1:
        raise ValueError(f"{root} has both metadata.jsonl and metadata.csv: keep only one")
    meta_path = present[0]

    try:
        rows, columns = _metadata_rows(meta_path)
    except UnicodeDecodeError:
        raise ValueError(f"{meta_path} is not UTF-8 text: save it as UTF-8 and run again") from None

    if "file_name" not in columns:
        raise ValueError(f"{meta_path} has no file_name column (columns: {columns}): add one with each image's path")
    if caption_column not in columns:
        raise ValueError(
            f"{meta_path} has no caption column {caption_column!r} (columns: {columns}): "
            "pass --caption_column with the right name"
        )
    captions = {}
    for row in rows:
        if not row.get("file_name"):
            raise ValueError(f"{meta_path} has a row without a file_name ({row}): give each row its image's path")
        # Normalise "./a.png" and Windows "sub\\a.png" to the POSIX relative paths used as item sources.
        name = PurePosixPath(str(row["file_name"]).replace("\\", "/")).as_posix()
        if name in captions:
            raise ValueError(
                f"{meta_path} has two rows for {name}: keep one (several captions for an image go in one row as a list, "
                "with --caption_variants)"
            )
        caption = row.get(caption_column)
        if not (caption is None or isinstance(caption, str | int | float | list | tuple)):
            raise ValueError(
                f"{meta_path}: the caption of {name} is a {type(caption).__name__}: give text, or a list of texts"
            )
        captions[name] = _caption_text(caption)
    return captions


def _metadata_rows(meta_path: Path) -> tuple[list[dict], list[str]]:
    """(rows, column names) of a metadata.jsonl / metadata.csv, each JSON line an object."""
    if meta_path.suffix == ".csv":
        with meta_path.open(encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f)
            return list(reader), list(reader.fieldnames or [])
    rows = []
    with meta_path.open(encoding="utf-8-sig") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{meta_path} line {line_no} is not valid JSON ({e.msg}): fix or remove it") from e
            if not isinstance(row, dict):
                raise ValueError(
                    f"{meta_path} line {line_no} is a JSON {type(row).__name__}, not an object: write each image as "
                    '{"file_name": "a.png", "text": "its caption"}'
                )
            rows.append(row)
    return rows, sorted({key for row in rows for key in row})


def _caption_text(value: Any) -> str | None:
    """A caption cell as text: a list of captions (variants) becomes one per line."""
    if isinstance(value, list | tuple):
        return "\n".join(str(v) for v in value)
    return None if value is None else str(value)


def items_from_dataset(
    name_or_path: str,
    image_column: str = "image",
    caption_column: str = "text",
    split: str = "train",
    mask_column: str | None = None,
) -> tuple[Any, list[ImageItem]]:
    """Items for a Hugging Face `datasets` dataset: a folder written by `save_to_disk`, or anything
    `datasets.load_dataset` accepts (a hub name honours HF_HUB_OFFLINE / the local cache).

    Returns `(dataset, items)`. The returned dataset holds only the image column, renamed to `DATASET_IMAGE_COLUMN`
    (and `mask_column`, a column of loss masks, as `DATASET_MASK_COLUMN`), left undecoded, so reading a row is cheap
    and a corrupt image fails inside `load_image` (as a `BadImageError`) rather than inside `datasets`. Pass it to
    `read_image_size`, `load_image` and `content_hash` along with an item. Item sources are
    ``"{name_or_path}[{row}]"``.
    """
    import datasets  # imported here: it is slow to import and folder-only runs never need it

    if Path(name_or_path).is_dir() and any(
        (Path(name_or_path) / marker).is_file() for marker in ("dataset_dict.json", "state.json")
    ):
        dataset = datasets.load_from_disk(name_or_path)
        if isinstance(dataset, datasets.DatasetDict):
            if split not in dataset:
                raise ValueError(
                    f"dataset {name_or_path} has no split {split!r} (splits: {list(dataset)}): choose one of these"
                )
            dataset = dataset[split]
    else:
        try:
            dataset = datasets.load_dataset(name_or_path, split=split)
        except (FileNotFoundError, ConnectionError) as e:
            # datasets raises ConnectionError for hub names it cannot fetch under HF_HUB_OFFLINE=1.
            raise FileNotFoundError(
                f"cannot find dataset {name_or_path!r} ({e}): give a folder saved with save_to_disk, a local "
                "dataset folder, or a hub name that is already in the local cache when offline"
            ) from e

    columns = list(dataset.column_names)
    named = [("--image_column", image_column), ("--caption_column", caption_column), ("--mask_column", mask_column)]
    for flag, column in named:
        if column is not None and column not in columns:
            raise ValueError(
                f"dataset {name_or_path} has no column {column!r} (columns: {columns}): pass {flag} with one of these"
            )
    for flag, column in (named[0], named[2]):
        if column is not None and not isinstance(dataset.features[column], datasets.Image):
            raise ValueError(
                f"column {column!r} of dataset {name_or_path} holds {dataset.features[column]}, not images: "
                f"pass {flag} naming an Image column, or cast it with datasets.Image()"
            )

    # Reading just the caption column never touches the (possibly large) image bytes.
    captions = dataset.select_columns([caption_column])[caption_column]
    items = [
        ImageItem(source=f"{name_or_path}[{row}]", caption=_caption_text(c), row=row) for row, c in enumerate(captions)
    ]

    kept = {image_column: DATASET_IMAGE_COLUMN, **({mask_column: DATASET_MASK_COLUMN} if mask_column else {})}
    images = dataset.select_columns(list(kept))
    for column in kept:
        images = images.cast_column(column, datasets.Image(decode=False))
    return images.rename_columns({k: v for k, v in kept.items() if k != v}), items


# ----------------------------------------------------------------------------------------------------------
# Captions


TRIGGER_PLACEHOLDER = "[trigger]"
KOHYA_FOLDER = re.compile(r"(\d+)_(.+)")


def kohya_folder(source: str) -> tuple[int, str] | None:
    """kohya's dataset convention: an item under a top folder named `N_words` (`10_sks woman/01.jpg`) is repeated N
    times an epoch and, without a caption of its own, captioned `words`. (N, words), or None for other paths."""
    top, sep, _ = source.partition("/")
    match = KOHYA_FOLDER.fullmatch(top) if sep else None
    return (int(match.group(1)), match.group(2).strip()) if match else None


def resolve_caption(
    raw: str | None, prefix: str | None, default_caption: str | None, default_from: str = "--default_caption"
) -> tuple[str | None, str | None]:
    """The caption to train on, and a note for the report (None when there is nothing to say).

    Whitespace is stripped. An empty or missing caption becomes `default_caption` when one is given (the note says
    it came from `default_from`);
    otherwise the caption is None and the caller should skip the item. A `prefix` (trigger word) takes the place
    of every ``[trigger]`` in the caption (ai-toolkit's placeholder); a caption without one gets it prepended as
    ``"prefix, caption"`` unless the trigger already appears in it as whole words ("a photo of sks person").
    """
    caption = raw.strip() if raw is not None else None
    default_caption = (default_caption or "").strip() or None
    note = None
    if not caption:
        what = "empty caption" if raw is not None else "missing caption"
        if default_caption is None:
            fix = "write one" if raw is not None else "add a caption file beside it (or a metadata row)"
            return None, f"{what}: {fix} or pass --default_caption"
        caption, note = default_caption, f"{what}, used {default_from}"

    prefix = (prefix or "").strip()
    if TRIGGER_PLACEHOLDER in caption:
        if prefix:
            caption = caption.replace(TRIGGER_PLACEHOLDER, prefix)
        else:
            missing = f"{TRIGGER_PLACEHOLDER} left as it is: pass --caption_prefix to put a trigger word there"
            note = f"{note}; {missing}" if note else missing
    elif prefix and not _whole_words(prefix).search(caption):
        # "sks dog" and "a photo of sks dog" hold the trigger "sks"; "sksdog" does not
        caption = f"{prefix}, {caption}"
    return caption, note


def shuffled_tags(caption: str, count: int, keep: int, rng: random.Random) -> list[str]:
    """Up to `count` other orderings of a caption's comma-separated tags, the first `keep` left in front (kohya's
    shuffle_caption and keep_tokens, drawn once for the cache rather than every step). Fewer when the tags have
    fewer orderings; none for a caption of one tag."""
    tags = [tag.strip() for tag in caption.split(",") if tag.strip()]
    head, tail = tags[:keep], tags[keep:]
    seen, orderings = {tuple(tail)}, []
    for _ in range(10 * count):  # enough draws to find `count` new orderings when the tags have that many
        if len(orderings) == count:
            break
        order = rng.sample(tail, len(tail))
        if tuple(order) not in seen:
            seen.add(tuple(order))
            orderings.append(", ".join(head + order))
    return orderings


def _whole_words(text: str) -> re.Pattern:
    return re.compile(rf"(?<!\w){re.escape(text)}(?!\w)")


def holds_trigger(text: str, trigger: str) -> bool:
    """Whether `text` holds the trigger as whole words ("a photo of sks dog" holds "sks"; "sksdog" does not)."""
    return bool(_whole_words(trigger.strip()).search(text))


def preservation_caption(caption: str, trigger: str, class_words: str) -> str | None:
    """The caption with every whole-word `trigger` replaced by `class_words` ("sks person, smiling" → "person,
    smiling"): what the base model should still draw for it (differential output preservation). None when the
    caption does not hold the trigger."""
    trigger, class_words = trigger.strip(), class_words.strip()
    found = _whole_words(trigger)
    return found.sub(lambda _: class_words, caption) if trigger and found.search(caption) else None


# ----------------------------------------------------------------------------------------------------------
# Reading images


def _open(item: ImageItem, dataset: Any = None, column: str = DATASET_IMAGE_COLUMN) -> Image.Image:
    """Lazily open an item's image (only the header is read); `column`: the dataset column it is in. Raises
    BadImageError."""
    if item.path is not None:
        file: str | io.BytesIO = item.path
    else:
        if dataset is None:
            raise ValueError(f"{item.source} is a dataset row: pass the dataset returned by items_from_dataset")
        value = dataset[item.row][column]
        if isinstance(value, Image.Image):  # a decoding dataset was passed: nothing left to open
            return value
        if value is None:
            raise BadImageError(item.source, "the image cell is empty: fill it or drop the row")
        file = io.BytesIO(value["bytes"]) if value.get("bytes") is not None else value["path"]
    try:
        return Image.open(file)
    except FileNotFoundError as e:
        raise BadImageError(item.source, "file not found: it was moved or deleted after the data was listed") from e
    except Image.DecompressionBombError as e:
        raise BadImageError(item.source, f"image is too large to decode safely ({e}): downscale it") from e
    except Image.UnidentifiedImageError as e:
        raise BadImageError(
            item.source, "not an image PIL can read (corrupt or wrong extension): re-export or delete it"
        ) from e
    except _DECODE_ERRORS as e:
        raise BadImageError(item.source, _CORRUPT) from e


def read_image_size(item: ImageItem, dataset: Any = None) -> tuple[int, int]:
    """(height, width) in pixels as the image will be loaded, i.e. after EXIF orientation, reading only the
    file header. A truncated file can pass here and still fail in `load_image`."""
    image = _open(item, dataset)
    try:
        width, height = image.size
        orientation = image.getexif().get(0x0112)
    except _DECODE_ERRORS as e:
        raise BadImageError(item.source, _CORRUPT) from e
    finally:
        image.close()
    return (width, height) if orientation in _EXIF_SWAPS_SIDES else (height, width)


def load_image(item: ImageItem, dataset: Any = None) -> Image.Image:
    """Fully decode an item's image as upright 8-bit RGB.

    EXIF orientation is applied. Transparent images (RGBA, LA, palette with transparency) are composited onto
    white; CMYK, grayscale, palette and 16-bit/float images are converted to RGB (embedded ICC profiles are
    ignored). What changed is recorded on the returned image; read it with `conversion_note(image)`.
    Raises `BadImageError` for files that cannot be decoded, including truncated ones.
    """
    image = _open(item, dataset)
    try:
        # load() forces the full decode here, so truncated files fail now rather than later in a worker.
        image.load()
        orientation = image.getexif().get(0x0112)
        upright = ImageOps.exif_transpose(image)
    except _DECODE_ERRORS as e:
        raise BadImageError(item.source, _CORRUPT) from e
    finally:
        image.close()
    try:
        rgb, conversion = _to_rgb(upright)
    except ValueError as e:  # a mode PIL cannot convert without a color management step, e.g. LAB
        raise BadImageError(item.source, f"unsupported color mode {upright.mode}: re-export it as RGB") from e

    notes = [f"rotated upright (EXIF orientation {orientation})"] if orientation in range(2, 9) else []
    notes += [conversion] if conversion else []
    rgb.info[CONVERSION_INFO_KEY] = "; ".join(notes) or None
    return rgb


def conversion_note(image: Image.Image) -> str | None:
    """What `load_image` changed, e.g. "RGBA → RGB (transparent pixels composited onto white)", or None."""
    return image.info.get(CONVERSION_INFO_KEY)


def alpha_channel(image: Image.Image) -> Image.Image | None:
    """The alpha channel (mode "L", 0 = transparent) of a transparent image `load_image` composited onto white, or
    None when the image had no transparency."""
    return image.info.get(ALPHA_INFO_KEY)


def find_mask(source: str, mask_dir: str | os.PathLike) -> Path | None:
    """The loss mask of the image `source` (relative to the image folder): the file in `mask_dir` with the same
    relative path and name, any image extension (``cats/01.jpg`` → ``MASKS/cats/01.png``), or None."""
    stem = Path(mask_dir) / PurePosixPath(source).with_suffix("")
    if not stem.parent.is_dir():
        return None
    found = sorted(p for p in stem.parent.iterdir() if p.stem == stem.name and p.suffix.lower() in IMAGE_EXTENSIONS)
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise BadImageError(source, f"it has {len(found)} masks in {stem.parent} ({names}): keep one")
    return found[0] if found else None


def load_mask(mask_item: ImageItem, source: str, size: tuple[int, int], dataset: Any = None) -> Image.Image:
    """A loss mask (a file, or a cell of the dataset's DATASET_MASK_COLUMN; `mask_item.source` names it) as upright
    8-bit grayscale (mode "L": white = trained on, black = ignored, grey = in between) at the image's `size` (width,
    height) after EXIF orientation: a mask of another size but the same aspect ratio (within 1%) is resized to it.
    Raises `BadImageError` for the image `source`, naming the mask, for any other."""
    path = mask_item.source
    try:
        opened = _open(mask_item, dataset, DATASET_MASK_COLUMN)
        with opened:
            opened.load()
            upright = ImageOps.exif_transpose(opened)
            # 16-bit and float masks rescaled to 8 bits as images are (convert("L") would clip them to white)
            mask = (_to_rgb(upright)[0] if upright.mode.startswith("I") or upright.mode == "F" else upright).convert(
                "L"
            )
    except BadImageError as e:
        raise BadImageError(source, f"its mask {path}: {e.reason}") from e
    except _DECODE_ERRORS as e:
        raise BadImageError(source, f"cannot decode its mask {path}: re-export it as a grayscale PNG") from e
    if mask.size != tuple(size) and abs(mask.width * size[1] / (mask.height * size[0]) - 1) <= 0.01:
        mask = mask.resize(tuple(size), Image.Resampling.BILINEAR)
    if mask.size != tuple(size):
        raise BadImageError(
            source,
            f"its mask {path} is {mask.size[0]}x{mask.size[1]}, the image {size[0]}x{size[1]}: save the mask at the "
            "image's size (or its aspect ratio)",
        )
    return mask


def _to_rgb(image: Image.Image) -> tuple[Image.Image, str | None]:
    """(RGB image, note on what was converted or None)."""
    mode = image.mode
    if mode == "RGB":
        return image, None
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        rgb = Image.alpha_composite(white, rgba).convert("RGB")
        has_holes = rgba.getchannel("A").getextrema()[0] < 255
        if has_holes:
            rgb.info[ALPHA_INFO_KEY] = rgba.getchannel("A")
        return rgb, f"{mode} → RGB" + (" (transparent pixels composited onto white)" if has_holes else "")
    if mode.startswith("I") or mode == "F":
        # convert("RGB") would clip 16-bit values at 255 (an all-white image), so rescale to 8 bits first.
        values = np.asarray(image, dtype=np.float64)
        if mode.startswith("I;16") or (mode == "I" and values.max() > 255):
            values = values / 257.0  # 65535 → 255
        elif mode == "F" and values.max() <= 1.0:
            values = values * 255.0  # floats in [0, 1]
        gray = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8))
        return gray.convert("RGB"), f"{mode} → 8-bit RGB"
    return image.convert("RGB"), f"{mode} → RGB"


def content_hash(item: ImageItem, dataset: Any = None, column: str = DATASET_IMAGE_COLUMN) -> str:
    """sha256 hex digest of the image's encoded bytes (file or dataset cell; `column`: the dataset column), e.g. to
    detect duplicates or changed files in a cache. Falls back to hashing mode, size and pixels when only a decoded
    image exists."""
    digest = hashlib.sha256()
    if item.path is not None:
        try:
            with open(item.path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
        except FileNotFoundError as e:
            raise BadImageError(
                item.source, "file not found: it was moved or deleted after the data was listed"
            ) from e
        return digest.hexdigest()

    if dataset is None:
        raise ValueError(f"{item.source} is a dataset row: pass the dataset returned by items_from_dataset")
    value = dataset[item.row][column]
    if isinstance(value, dict) and value.get("bytes") is not None:
        digest.update(value["bytes"])
    elif isinstance(value, dict) and value.get("path"):
        return content_hash(ImageItem(source=item.source, path=value["path"]))
    else:
        image = load_image(item, dataset) if column == DATASET_IMAGE_COLUMN else _open(item, dataset, column)
        digest.update(f"{image.mode} {image.size}".encode())
        digest.update(image.tobytes())
    return digest.hexdigest()
