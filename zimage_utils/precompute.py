"""The phases of `precompute_embeddings.py`: scan items, decode and crop them in DataLoader workers, encode batches
on the accelerator, write per-process shards, merge them into the cache.

The encode loop keeps the accelerator busy: `encode_ahead` queues batch N+1 before it turns batch N into records;
`encode_batch` runs the text encoder on a CUDA stream of its own, beside the VAE, and copies outputs to pinned host
memory without waiting for them; `ShardWriter` saves parts in a background thread. Records and their order are the
same as encoding and writing one batch at a time.

Determinism across process counts: items are sorted by source and split `rank::world`; anything random (random
crop, `--latent_sampling sample`) is seeded per item from `seed` and the item's source, so a 2-process run
writes the same records as a 1-process run: the same items, crops and noise. The VAE's float output can still differ
in the last bits, because convolution kernels pick their algorithm by batch size and thread count (on the CPU a
batch of 6 and a batch of 1 differ by ~1e-7); with `--batch_size 1` and equal threads the records are identical.
"""

import argparse
import hashlib
import logging
import os
import random
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import datasets
import torch
from PIL import Image, ImageOps

from .buckets import CropBox, assign_bucket, plan_crop, resize_and_crop, upscale_factor
from .cache import FEATURES, SHARDS_DIR, CachedPrompt, add_missing_columns, records_to_dataset, tensor_to_bytes
from .cache_folder import restore_set_aside
from .images import (
    DATASET_MASK_COLUMN,
    TRIGGER_PLACEHOLDER,
    BadImageError,
    ImageItem,
    alpha_channel,
    content_hash,
    conversion_note,
    find_mask,
    holds_trigger,
    kohya_folder,
    load_image,
    load_mask,
    preservation_caption,
    read_image_size,
    resolve_caption,
    shuffled_tags,
)
from .latents import encode_images, pil_to_tensor
from .model_loading import longest_caption, transformer_config
from .sample_prompts import parse_prompts, read_prompt_file
from .text_encoding import encode_captions

logger = logging.getLogger(__name__)

# GPU memory the VAE's encoder takes per image of a batch, per 2^20 pixels: 12.2 GiB for 8 images at 1024² (H200,
# docs/BENCHMARKS.md, session 14); the text encoder's activations peak lower.
VAE_GIB_PER_MEGAPIXEL = 1.5


def item_seed(seed: int, source: str) -> int:
    """A 63-bit seed that depends only on the run's seed and the item, not on which process or batch it is in."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{source}".encode()).digest()[:8], "little") >> 1


@dataclass
class Planned:
    """An item that passed the scan: where it goes and how it is cropped."""

    item: ImageItem
    caption: str
    content_hash: str
    original_size: tuple[int, int]  # (h, w) pixels after EXIF orientation
    bucket: tuple[int, int]  # (h, w) pixels
    crop: CropBox
    mask: ImageItem | None = None  # its loss mask: a file (--mask_dir) or a dataset cell (--mask_column)
    variants: tuple[str, ...] = ()  # its other captions (--caption_variants)
    preservation: str = ""  # its caption with the trigger replaced by the class (--preservation_class); "": none

    @property
    def key(self) -> tuple:
        """What makes its cached record current (`record_key`): an item whose key changed is encoded again."""
        return (self.item.source, self.content_hash, self.caption, self.preservation, *self.variants)

    @property
    def texts(self) -> list[str]:
        """Every caption to encode for this item: the first one, its variants, its preservation caption."""
        return [self.caption, *self.variants] + ([self.preservation] if self.preservation else [])


KEY_COLUMNS = ("source", "content_hash", "caption", "preservation_caption", "caption_variants")


def record_key(record: dict[str, Any]) -> tuple:
    """A cache record's `Planned.key` (`record` holds at least KEY_COLUMNS)."""
    return (*(record[c] for c in KEY_COLUMNS[:-1]), *record["caption_variants"])


def add_caption_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """precompute_embeddings.py's flags for what each item's captions become (`ScanDataset` reads them): the trigger
    word, captions for images without one, variants, tag shuffles and preservation captions. `parser`: the parser or
    one of its argument groups."""
    parser.add_argument(
        "--caption_prefix",
        default=None,
        help='Trigger word: prepended to captions that do not hold it ("sks, ..."), and put in place of [trigger].',
    )
    parser.add_argument(
        "--default_caption",
        default=None,
        help="Caption for images without one (default: such images are skipped and reported).",
    )
    parser.add_argument(
        "--folder_captions",
        action="store_true",
        help="kohya-style folders: an image without a caption under a top folder named N_words ('10_sks woman/') is "
        "captioned with its words ('sks woman'); the trainer's --folder_repeats reads the N.",
    )
    parser.add_argument(
        "--caption_variants",
        action="store_true",
        help="Each line of a caption is a variant (a list in metadata.jsonl or a dataset column gives one per item): "
        "all are cached, and training draws one per item per epoch.",
    )
    parser.add_argument(
        "--shuffle_caption",
        type=int,
        default=0,
        metavar="N",
        help="Cache N orderings of each caption's comma-separated tags (the caption and N-1 seeded shuffles) as its "
        "variants, one drawn per item per epoch: kohya's shuffle_caption, with the orderings fixed at caching. "
        "Each costs one more text encoding and embedding (0 = off).",
    )
    parser.add_argument(
        "--keep_tokens",
        type=int,
        default=0,
        help="With --shuffle_caption: the first K tags of a caption stay in front (kohya's keep_tokens). A trigger "
        "that --caption_prefix adds stays in front; one already in the caption is a tag like the others.",
    )
    parser.add_argument(
        "--preservation_class",
        default=None,
        help='With --caption_prefix: also cache each caption with the trigger replaced by this class ("sks person, '
        'smiling" -> "person, smiling"), for the trainer\'s --preservation_weight (ai-toolkit\'s differential '
        "output preservation).",
    )


class ScanDataset(torch.utils.data.Dataset):
    """Reads headers and hashes files in DataLoader workers (with --dry_run decodes them too, as encoding would).
    Yields a Planned item, or (source, reason, kind) with kind "skipped" or "note" (a conversion worth reporting)."""

    def __init__(self, items, buckets, args, hf_dataset=None):
        self.items, self.buckets, self.args, self.hf_dataset = items, buckets, args, hf_dataset

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        item, args = self.items[i], self.args
        notes = []
        lines = [line for line in (item.caption or "").splitlines() if line.strip()] if args.caption_variants else []
        raw = lines[0] if lines else item.caption
        if args.shuffle_caption > 1 and (raw or "").strip():
            # the shuffles are variants too, drawn from the item's seed: a re-run draws the same (nothing re-encoded)
            rng = random.Random(item_seed(args.seed, item.source) + 1)
            lines = lines or [raw]
            lines += [
                s for line in lines for s in shuffled_tags(line, args.shuffle_caption - 1, args.keep_tokens, rng)
            ]
        folder = kohya_folder(item.source) if args.folder_captions and not (raw or "").strip() else None
        default, source = (folder[1], "its folder's name") if folder else (args.default_caption, "--default_caption")
        caption, note = resolve_caption(raw, args.caption_prefix, default, source)
        if note:
            notes.append(note)
        if caption is None:
            return {"source": item.source, "skipped": note, "notes": []}
        resolved = [resolve_caption(line, args.caption_prefix, None) for line in lines[1:]]
        variants = tuple(variant for variant, _ in resolved)
        if any(TRIGGER_PLACEHOLDER in (v or "") for v in variants) and TRIGGER_PLACEHOLDER not in (note or ""):
            notes.append(f"a caption variant's {TRIGGER_PLACEHOLDER} left as it is: pass --caption_prefix")
        preservation = ""
        if args.preservation_class:
            preservation = preservation_caption(caption, args.caption_prefix, args.preservation_class) or ""
            if not preservation:
                notes.append(f"caption holds no {args.caption_prefix!r}: no preservation caption for it")
        try:
            digest = content_hash(item, self.hf_dataset)
            height, width = read_image_size(item, self.hf_dataset)
            mask = self.find_mask(item)
            if mask is not None:  # a changed mask re-encodes the item on the next run, as a changed image does
                mask_digest = content_hash(mask, self.hf_dataset, DATASET_MASK_COLUMN)
                digest = hashlib.sha256(f"{digest} {mask_digest}".encode()).hexdigest()
            if args.dry_run:  # the encode pass's full decode, so that a truncated image or a mask of another shape
                image = load_image(item, self.hf_dataset)  # is skipped here as a run would skip it
                if mask is not None:
                    load_mask(mask, item.source, image.size, self.hf_dataset)
                notes += [note] if (note := conversion_note(image)) else []
        except BadImageError as e:
            return {"source": item.source, "skipped": e.reason, "notes": []}
        if mask is None and (args.mask_dir or args.mask_column):
            notes.append(f"no mask for it in {args.mask_dir or args.mask_column}: trained on the whole image")
        bucket = assign_bucket(height, width, self.buckets)
        factor = upscale_factor(height, width, bucket)
        if factor > args.max_upscale:
            reason = (
                f"image is {width}x{height}, smaller than its {bucket[1]}x{bucket[0]} bucket (needs x{factor:.1f} "
                f"upscaling, limit --max_upscale {args.max_upscale}): use a larger image or a lower --resolution"
            )
            return {"source": item.source, "skipped": reason, "notes": []}
        rng = random.Random(item_seed(args.seed, item.source))
        crop = plan_crop(height, width, bucket, args.crop, rng)
        if (kept := crop.height * crop.width / (crop.resized_h * crop.resized_w)) < 0.5:  # beyond --max_aspect
            notes.append(
                f"the {bucket[1]}x{bucket[0]} crop keeps {kept:.0%} of the {width}x{height} image: crop it yourself, "
                "or raise --max_aspect"
            )
        planned = Planned(item, caption, digest, (height, width), bucket, crop, mask, variants, preservation)
        return {"planned": planned, "notes": notes}

    def find_mask(self, item: ImageItem) -> ImageItem | None:
        """The item's loss mask, named for messages: a file in --mask_dir, or its cell of --mask_column."""
        if self.args.mask_dir:
            path = find_mask(item.source, self.args.mask_dir)
            return ImageItem(str(path), path=str(path)) if path is not None else None
        if self.args.mask_column and self.hf_dataset[item.row][DATASET_MASK_COLUMN] is not None:
            return ImageItem(f"{item.source}[{self.args.mask_column}]", row=item.row)
        return None


def mask_to_latent_grid(mask: Image.Image, crop: CropBox, downsample: int) -> bytes:
    """A loss mask (the image's size) over the image's crop, averaged over the area each latent pixel covers:
    uint8 [bucket_h / downsample, bucket_w / downsample] as raw bytes (the cache's `mask` column). Area averaging in
    one step, not the image's LANCZOS resize, which rings at a mask's hard edges (255 → 254 beside a black region)."""
    box = crop.to_original(mask.height, mask.width)
    grid = mask.resize((crop.width // downsample, crop.height // downsample), Image.Resampling.BOX, box=box)
    return grid.tobytes()


class PixelDataset(torch.utils.data.Dataset):
    """Decodes, converts, resizes and crops one batch (a list of Planned of one bucket) in a DataLoader worker.

    Each item gets its loss mask on the latent grid (`mask_to_latent_grid`, latent pixels `downsample`² image
    pixels): its Planned's mask, or with `alpha_masks` the image's alpha channel; b"" for an item without one."""

    def __init__(
        self, batches: list[list[Planned]], flip: bool, hf_dataset=None, alpha_masks: bool = False, downsample: int = 8
    ):
        self.batches, self.flip, self.hf_dataset = batches, flip, hf_dataset
        self.alpha_masks, self.downsample = alpha_masks, downsample

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> dict[str, Any]:
        good, pixels, flipped, masks, skipped, notes = [], [], [], [], [], []
        for planned in self.batches[i]:
            try:
                image = load_image(planned.item, self.hf_dataset)
                mask = alpha_channel(image) if self.alpha_masks else None
                if planned.mask is not None:
                    mask = load_mask(planned.mask, planned.item.source, image.size, self.hf_dataset)
            except BadImageError as e:
                skipped.append((planned.item.source, e.reason))
                continue
            if note := conversion_note(image):
                notes.append((planned.item.source, note))
            cropped = resize_and_crop(image, planned.crop)
            good.append(planned)
            masks.append(mask_to_latent_grid(mask, planned.crop, self.downsample) if mask is not None else b"")
            pixels.append(pil_to_tensor(cropped))
            if self.flip:
                flipped.append(pil_to_tensor(ImageOps.mirror(cropped)))
        return {
            "index": i,  # in the planned batches: which group of captions it belongs to (`CaptionGroups`)
            "planned": good,
            "pixels": torch.stack(pixels) if pixels else None,
            "flipped": torch.stack(flipped) if flipped else None,
            "masks": masks,  # bytes per good item (b"": none)
            "skipped": skipped,
            "notes": notes,
        }


def plan_batches(planned: list[Planned], batch_size: int) -> list[list[Planned]]:
    """Batches of at most `batch_size` items sharing one bucket (the VAE needs one size per batch), each made of
    captions of similar length: the text encoder pads a batch to its longest caption (which changes no bit of the
    embeddings, only the work), so grouping by length wastes less of it."""
    by_bucket: dict[tuple[int, int], list[Planned]] = {}
    for p in sorted(planned, key=lambda p: len(p.caption)):  # stable: equal lengths keep their order
        by_bucket.setdefault(p.bucket, []).append(p)
    return [
        group[i : i + batch_size] for _, group in sorted(by_bucket.items()) for i in range(0, len(group), batch_size)
    ]


def encode_texts(
    encode: Callable[[list[str]], tuple[list, list]], planned: list[Planned]
) -> tuple[list[torch.Tensor], list[bool]]:
    """`encode` over every item's `texts` in order, at most one text per item in each call: with caption variants the
    text encoder then sees batches no larger than without (its memory grows with them)."""
    texts = [text for p in planned for text in p.texts]
    embeds, truncated = [], []
    for start in range(0, len(texts), max(1, len(planned))):
        e, t = encode(texts[start : start + len(planned)])
        embeds += e
        truncated += t
    return embeds, truncated


class CaptionGroups:
    """Caption embeddings for the planned batches, made `group` batches at a time: the text encoder is far faster on
    64 captions than on 8 (on an H100, 316 vs ~150 captions/s), while the VAE's batch is held down by its activation
    memory. `take(index, planned)` gives the embeddings of one batch's items (those that decoded), each item's
    `texts` in order, encoding the group that holds it on first use and dropping the groups before it."""

    def __init__(self, batches: list[list[Planned]], group: int, encode: Callable[[list[str]], tuple[list, list]]):
        self.batches, self.group, self.encode = batches, max(1, group), encode
        # (source, index in its texts) → (embedding, truncated), for the current group
        self.ready: dict[tuple[str, int], tuple[torch.Tensor, bool]] = {}
        self.current = -1

    def take(self, index: int, planned: list[Planned]) -> tuple[list[torch.Tensor], list[bool]]:
        if index // self.group != self.current:
            self.current = index // self.group
            members = [p for b in self.batches[self.current * self.group : (self.current + 1) * self.group] for p in b]
            keys = [(p.item.source, i) for p in members for i in range(len(p.texts))]
            embeds, truncated = encode_texts(self.encode, members)
            self.ready = {key: (e, t) for key, e, t in zip(keys, embeds, truncated)}
        keys = [(p.item.source, i) for p in planned for i in range(len(p.texts))]
        return [self.ready[key][0] for key in keys], [self.ready[key][1] for key in keys]


@dataclass
class EncodedBatch:
    """One batch's encoder outputs on their way to the host, already in the cache's storage dtypes. On a GPU the
    copies may still be running when `encode_batch` returns; `records()` waits for them."""

    planned: list[Planned]
    latents: torch.Tensor  # [B, C, h, w] on the CPU
    flipped: torch.Tensor | None  # [B, C, h, w] latents of the mirrored images, or None
    embeds: torch.Tensor  # [sum(lengths), D] on the CPU: the kept tokens of each item's `texts`, one after the other
    lengths: list[int]  # caption tokens kept per text
    truncated: list[bool]  # per text
    copied: torch.cuda.Event | None  # recorded after the copies to the host; None when they were synchronous
    masks: list[bytes] | None = None  # the `mask` column per item (see `PixelDataset`); None: no masks

    def records(self) -> list[dict[str, Any]]:
        """Cache records (FEATURES), one per item in the batch's order."""
        if self.copied is not None:
            self.copied.synchronize()
        embeds, lengths, truncated = list(self.embeds.split(self.lengths)), list(self.lengths), list(self.truncated)
        records = []
        for i, p in enumerate(self.planned):
            flipped = tensor_to_bytes(self.flipped[i], self.flipped.dtype) if self.flipped is not None else b""
            n = len(p.texts)  # this item's captions: the first, its variants, its preservation caption
            mine, embeds = embeds[:n], embeds[n:]
            mine_lengths, lengths = lengths[:n], lengths[n:]
            mine_truncated, truncated = truncated[:n], truncated[n:]
            records.append(
                {
                    "source": p.item.source,
                    "content_hash": p.content_hash,
                    "caption": p.caption,
                    "bucket_height": p.bucket[0],
                    "bucket_width": p.bucket[1],
                    "original_height": p.original_size[0],
                    "original_width": p.original_size[1],
                    "crop_box": list(p.crop.to_original(*p.original_size)),
                    "latents": tensor_to_bytes(self.latents[i], self.latents.dtype),
                    "latents_flipped": flipped,
                    "caption_embeds": tensor_to_bytes(mine[0], mine[0].dtype),
                    "caption_length": mine_lengths[0],
                    "caption_truncated": any(mine_truncated),
                    "mask": self.masks[i] if self.masks else b"",
                    "caption_variants": list(p.variants),
                    "variant_embeds": b"".join(tensor_to_bytes(e, e.dtype) for e in mine[1 : 1 + len(p.variants)]),
                    "variant_lengths": mine_lengths[1 : 1 + len(p.variants)],
                    "preservation_caption": p.preservation,
                    "preservation_embeds": tensor_to_bytes(mine[-1], mine[-1].dtype) if p.preservation else b"",
                    "preservation_length": mine_lengths[-1] if p.preservation else 0,
                }
            )
        return records


@torch.no_grad()
def encode_batch(
    batch: dict[str, Any],
    vae,
    tokenizer,
    text_encoder,
    args,
    device,
    dtypes,
    text_stream: torch.cuda.Stream | None = None,
    caption_groups: CaptionGroups | None = None,
) -> EncodedBatch:
    """Queue caption embeddings and VAE latents of one bucket batch, and their copies to the host.

    `dtypes` = (latent storage dtype, embedding storage dtype). On a GPU this returns once the work is queued;
    `.records()` of the result waits for it. On other devices everything is done on return. `text_stream` (CUDA):
    run the text encoder on this stream, beside the VAE on the current one; the caller makes it wait for the
    current stream once, after loading the models. `caption_groups`: take the captions' embeddings from there
    (encoded several batches at a time) instead of encoding this batch's alone.
    """
    planned: list[Planned] = batch["planned"]
    latent_dtype, embed_dtype = dtypes
    on_gpu = device.type == "cuda"

    def to_host(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        # Cast on the device (the same rounding as on the host) and copy in one piece; from a GPU the copy lands in
        # pinned memory without blocking the host, and the event recorded below marks when it has.
        return tensor.to(dtype).to("cpu", non_blocking=on_gpu)

    def captions() -> tuple[list[torch.Tensor], list[bool], torch.Tensor]:
        if caption_groups is not None:
            embeds, truncated = caption_groups.take(batch["index"], planned)
        else:
            embeds, truncated = encode_texts(
                lambda texts: encode_captions(
                    texts, tokenizer, text_encoder, args.max_sequence_length, device, args.text_padding
                ),
                planned,
            )
        return embeds, truncated, to_host(torch.cat(embeds), embed_dtype)

    def images() -> tuple[torch.Tensor, torch.Tensor | None]:
        generators = None
        if args.latent_sampling == "sample":
            generators = [
                torch.Generator(device=device).manual_seed(item_seed(args.seed, p.item.source)) for p in planned
            ]
        latents = encode_images(vae, batch["pixels"].to(device, non_blocking=True), args.latent_sampling, generators)
        if batch["flipped"] is None:
            return to_host(latents, latent_dtype), None
        flipped = encode_images(vae, batch["flipped"].to(device, non_blocking=True), args.latent_sampling, generators)
        return to_host(latents, latent_dtype), to_host(flipped, latent_dtype)

    # transformers reads the attention mask on the host (to pick SDPA's causal fast path), which waits for all the
    # work queued before it on its stream.
    if text_stream is None:
        # So captions go first: the wait is then for the previous batch, not for this batch's VAE.
        embeds, truncated, host_embeds = captions()
        host_latents, host_flipped = images()
    else:
        # The wait is only for earlier captions: this batch's VAE queues behind the previous one, and the text
        # encoder runs beside them. The current stream then waits for the captions, so that one event covers both.
        host_latents, host_flipped = images()
        with torch.cuda.stream(text_stream):
            embeds, truncated, host_embeds = captions()
        torch.cuda.current_stream(device).wait_stream(text_stream)
    copied = torch.cuda.Event() if on_gpu else None
    if copied is not None:
        copied.record()
    lengths = [int(e.shape[0]) for e in embeds]
    return EncodedBatch(
        planned, host_latents, host_flipped, host_embeds, lengths, truncated, copied, batch.get("masks")
    )


def encode_ahead(
    batches: Iterable[dict[str, Any]], encode: Callable[[dict[str, Any]], EncodedBatch]
) -> Iterator[tuple[dict[str, Any], list[dict[str, Any]]]]:
    """(batch, its records) for each batch, in order; a batch without items gets no `encode` call and no records.

    Batch N+1 is queued on the accelerator before batch N's records are built and handed to the caller, so that
    host work (records, writing, the next DataLoader batch) overlaps the encoders instead of idling them.
    """

    def finished(batch: dict[str, Any], queued: EncodedBatch | None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        return batch, queued.records() if queued is not None else []

    previous = None
    for batch in batches:
        queued = encode(batch) if batch["planned"] else None
        if previous is not None:
            yield finished(*previous)
        previous = (batch, queued)
    if previous is not None:
        yield finished(*previous)


class ShardWriter:
    """Buffers records and saves every `shard_size` of them as a finished part under shards/, so a crash loses at
    most one part's work. A background thread saves each part (to a temporary name, then renamed) while encoding
    goes on, one part at a time. Use it in a `with` block: leaving it saves the rest and waits for the thread."""

    def __init__(self, cache_dir: str | Path, rank: int, shard_size: int):
        self.dir = Path(cache_dir) / SHARDS_DIR
        self.dir.mkdir(parents=True, exist_ok=True)
        self.rank, self.shard_size, self.buffer = rank, shard_size, []
        self.part = len(list(self.dir.glob(f"rank{rank:03d}-*")))
        self._saver = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer")
        self._saving: Future | None = None

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        try:
            if exc_type is None:
                self.flush()
            # After an error the parts already handed over are still finished; the buffer is lost with the run.
            self.wait()
        finally:
            self._saver.shutdown()

    def add(self, records: list[dict[str, Any]]) -> None:
        self.buffer.extend(records)
        if len(self.buffer) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        """Hand the buffered records to the saving thread, once it has finished the previous part."""
        if not self.buffer:
            return
        self.wait()  # also bounds memory: at most one part saving and one filling
        # Named here, in order: load_shards sorts parts by the time in their name.
        name = f"rank{self.rank:03d}-{self.part:05d}-{time.time_ns()}"
        self._saving = self._saver.submit(self._save, self.buffer, name)
        self.part += 1
        self.buffer = []

    def wait(self) -> None:
        """Block until the part being saved is on disk (re-raising its error, e.g. a full disk)."""
        saving, self._saving = self._saving, None
        if saving is not None:
            saving.result()

    def _save(self, records: list[dict[str, Any]], name: str) -> None:
        tmp = self.dir / f".{name}.tmp"
        records_to_dataset(records, fingerprint=name).save_to_disk(str(tmp))
        os.replace(tmp, self.dir / name)


def load_shards(cache_dir: str | Path) -> list[datasets.Dataset]:
    """Finished parts left by this or an interrupted run (temporary, half-written ones are ignored)."""
    shard_dir = Path(cache_dir) / SHARDS_DIR
    if not shard_dir.exists():
        return []
    # Oldest first (names end in time_ns), so merge() lets a re-encoded item's newest record win whatever rank made it.
    parts = sorted((p for p in shard_dir.glob("rank*") if p.is_dir()), key=lambda p: int(p.name.rsplit("-", 1)[1]))
    return [add_missing_columns(datasets.load_from_disk(str(p))) for p in parts]  # (an older version's parts too)


def merge(
    existing: datasets.Dataset | None, parts: list[datasets.Dataset], current: set[str] | None = None
) -> tuple[datasets.Dataset, list[str]]:
    """One dataset sorted by source; a newer record of a source (re-encoded after its file changed) wins. With
    `current` (the sources the dataset holds now, less those skipped this run), records of other sources are
    dropped. Returns (dataset, the dropped sources, sorted)."""
    pieces = ([existing] if existing is not None else []) + parts
    merged = datasets.concatenate_datasets(pieces) if pieces else datasets.Dataset.from_list([], features=FEATURES)
    last: dict[str, int] = {}
    for i, source in enumerate(merged["source"]):
        last[source] = i
    dropped = sorted(s for s in last if current is not None and s not in current)
    keep = [last[s] for s in sorted(last) if current is None or s in current]
    return merged.select(keep), dropped


def check_caption_limit(args: argparse.Namespace) -> None:
    """--max_sequence_length within the caption tokens the model's transformer can place (a folder without a
    transformer config is not checked: the trainer checks the cache against the model it trains)."""
    try:
        config = transformer_config(args.pretrained_model_name_or_path, revision=args.revision)
    except (OSError, ValueError):
        return
    if args.max_sequence_length > (limit := longest_caption(config)):
        raise ValueError(
            f"--max_sequence_length {args.max_sequence_length}: {args.pretrained_model_name_or_path}'s transformer "
            f"places at most {limit} caption tokens; give {limit} or less"
        )


def check_validation_prompts(parser, args: argparse.Namespace) -> None:
    """`parser.error` for a validation prompt whose settings do not parse, or that holds [trigger] without a
    --caption_prefix, before any model loads. --validation_prompt_file's lines join --validation_prompts (read once:
    the --config a run writes lists the prompts themselves)."""
    try:
        parse_prompts(args.validation_prompts or [], "--validation_prompts")
        if args.validation_prompt_file:
            lines = read_prompt_file(args.validation_prompt_file, "--validation_prompt_file")
            parse_prompts(lines, f"--validation_prompt_file {args.validation_prompt_file}")
            args.validation_prompts, args.validation_prompt_file = (args.validation_prompts or []) + lines, None
    except (OSError, ValueError) as e:
        parser.error(str(e))
    if (
        any(TRIGGER_PLACEHOLDER in line for line in args.validation_prompts or [])
        and not (args.caption_prefix or "").strip()
    ):
        parser.error("a validation prompt holds [trigger], which --caption_prefix replaces: give --caption_prefix")


def carry_over_from_cache(args: argparse.Namespace, manifest: dict | None) -> list[str]:
    """A re-run that leaves out --caption_prefix or --validation_prompts keeps the cache's (a re-run adds new images
    to a cache; it does not quietly strip the trigger from every caption or drop the prompts); an empty value
    (`--caption_prefix ""`, `--validation_prompts` with none) drops them. In place on `args`; returns notes saying
    what was kept."""
    notes = []
    if manifest and args.caption_prefix is None and manifest.get("caption_prefix"):
        args.caption_prefix = manifest["caption_prefix"]
        notes.append(f"--caption_prefix {args.caption_prefix!r} kept from the cache (--caption_prefix '' drops it)")
    if manifest and args.validation_prompts is None and manifest.get("validation_prompts"):
        args.validation_prompts = list(manifest["validation_prompts"])
        notes.append(
            f"the cache's {len(args.validation_prompts)} validation prompt(s) kept (--validation_prompts with none "
            "drops them)"
        )
    args.validation_prompts = args.validation_prompts or []
    return notes


def encode_validation_prompts(
    lines: list[str], tokenizer, text_encoder, max_sequence_length: int, device, trigger: str | None = None
):
    """--validation_prompts (with any --validation_prompt_file lines) as the cache stores them: each line's text,
    [trigger] in it replaced by `trigger` (--caption_prefix, as in captions), and its --n negative prompt encoded,
    its settings kept. Notes prompts that would not show the trigger's effect. Returns [CachedPrompt]."""
    prompts = parse_prompts(lines, "--validation_prompts")
    if trigger := (trigger or "").strip():
        prompts = [replace(p, text=p.text.replace(TRIGGER_PLACEHOLDER, trigger)) for p in prompts]
        if prompts and not any(holds_trigger(p.text, trigger) for p in prompts):
            logger.info(
                f"note: no --validation_prompts holds the trigger {trigger!r} (or [trigger]): the samples will not "
                "show what the LoRA learns for it"
            )
    negatives = list(dict.fromkeys(p.negative for p in prompts if p.negative))
    texts = [p.text for p in prompts] + negatives
    embeds, _ = encode_captions(texts, tokenizer, text_encoder, max_sequence_length, device) if texts else ([], [])
    by_negative = dict(zip(negatives, embeds[len(prompts) :], strict=True))
    return [CachedPrompt(p, e, by_negative.get(p.negative)) for p, e in zip(prompts, embeds, strict=False)]


def gpu_memory_report(device: torch.device, batch_size: int, resolution: int) -> tuple[dict | None, str]:
    """On CUDA, the process's peak GPU memory (GiB allocated and reserved, and the card's total) and a line saying it,
    with what one more image per batch costs, so a user can size --batch_size to their card; else (None, "")."""
    if device.type != "cuda":
        return None, ""
    gib = {
        "allocated": torch.cuda.max_memory_allocated(device) / 2**30,
        "reserved": torch.cuda.max_memory_reserved(device) / 2**30,
        "card": torch.cuda.get_device_properties(device).total_memory / 2**30,
    }
    # the VAE's activations, measured on an H200 at 1024² (docs/BENCHMARKS.md, session 14), scale with the area
    per_image = VAE_GIB_PER_MEGAPIXEL * resolution**2 / 2**20
    return gib, (
        f"GPU memory (this process): peak {gib['allocated']:.1f} GiB allocated, {gib['reserved']:.1f} reserved, of "
        f"the card's {gib['card']:.1f}; at --batch_size {batch_size} and {resolution} px each image of a batch takes "
        f"~{per_image:.1f} GiB"
    )


DUPLICATE_NOTE = "the same image file as "  # how a duplicate's note starts (a re-run recomputes these notes)


def duplicate_notes(sources: list[str], hashes: list[str]) -> list[dict[str, str]]:
    """A note for each cached item whose image (with its mask) is byte for byte another's (`content_hash`): every
    copy but the first (in source order) is named, with the first. Copies train as often as they are copies, which a
    data set gathered from several folders rarely means to do."""
    groups: dict[str, list[str]] = {}
    for source, digest in zip(sources, hashes, strict=True):
        groups.setdefault(digest, []).append(source)
    notes = []
    for group in groups.values():
        first, *copies = sorted(group)
        notes += [
            {
                "source": copy,
                "reason": f"{DUPLICATE_NOTE}{first}: the image trains {len(group)}x as often as one without copies "
                "(delete the copies, unless that is what you want)",
            }
            for copy in copies
        ]
    return notes


def cache_notes(previous: list[dict], fresh: set[str], new: list[dict], merged: datasets.Dataset) -> list[dict]:
    """The notes of a finished cache, in source order, each once: the previous run's for items kept as they were
    (conversion notes come from decoding, so kept items carry theirs over; re-encoded and dropped `fresh` ones lose
    them), this run's `new` ones, and the duplicates among all `merged` items (found anew each run)."""
    kept = [n for n in previous if n["source"] not in fresh and not n["reason"].startswith(DUPLICATE_NOTE)]
    notes = kept + new + duplicate_notes(merged["source"], merged["content_hash"])
    return sorted({(n["source"], n["reason"]): n for n in notes}.values(), key=lambda n: n["source"])


def summarise(records_by_bucket: Counter, skipped: list[dict[str, str]], notes: list[dict[str, str]]) -> str:
    lines = [
        "buckets (h x w: items): " + ", ".join(f"{h}x{w}: {n}" for (h, w), n in sorted(records_by_bucket.items()))
    ]
    if notes:
        lines.append(f"{len(notes)} note(s):")
        lines += [f"  {n['source']}: {n['reason']}" for n in notes]
    if skipped:
        lines.append(f"{len(skipped)} skipped:")
        lines += [f"  {s['source']}: {s['reason']}" for s in skipped]
    return "\n".join(lines)


def refuse_an_empty_cache(
    accelerator, output_dir: str | Path, created: bool, skipped: list[dict[str, str]], notes: list[dict[str, str]]
) -> None:
    """No image can be cached (every one skipped, none kept from before), so every process raises; the main process
    first lists why and leaves the output folder as it was before this run (removed if this run made it). An empty
    dataset on disk would be one that neither the trainer nor a later precompute could open. `skipped`: every
    process's; `notes`: this process's."""
    out = Path(output_dir)
    if not accelerator.is_main_process:
        raise ValueError(f"no image could be cached in {out} (the main process lists why)")
    logger.info(summarise(Counter(), skipped, notes))
    if created:
        shutil.rmtree(out, ignore_errors=True)
    elif not restore_set_aside(out):  # (--overwrite: the cache it was to replace comes back)
        shutil.rmtree(out / SHARDS_DIR, ignore_errors=True)
    first = f", the first: {skipped[0]['source']}: {skipped[0]['reason']}" if skipped else ""
    raise ValueError(
        f"no image could be cached in {out}: all {len(skipped)} were skipped (each is listed above{first}). "
        f"Nothing was written{'' if created else ', and the cache there is as it was'}. --dry_run checks a fix "
        "without encoding."
    )
