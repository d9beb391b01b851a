"""Images + captions → VAE latents and frozen Qwen3 caption embeddings, cached once in a `datasets` Arrow folder.

    accelerate launch precompute_embeddings.py --pretrained_model_name_or_path Tongyi-MAI/Z-Image-Turbo \
        --train_data_dir my_photos --output_dir my_cache --resolution 1024 --caption_prefix "sks person"

Each process encodes its share of the images; the main process merges the shares. Re-running adds only new or
changed images; an interrupted run keeps its finished shards. The cache layout is documented in
docs/CACHE_FORMAT.md and defined in zimage_utils/cache.py.
"""

import argparse
import contextlib
import logging
import os
import shutil
import time
from collections import Counter
from functools import partial
from pathlib import Path

import datasets
import psutil
import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from zimage_utils import cache as cache_lib
from zimage_utils import cli
from zimage_utils.buckets import make_buckets
from zimage_utils.cache_folder import (
    drop_set_aside,
    prepare_output_dir,
    prepare_output_dir_readonly,
    restore_set_aside,
)
from zimage_utils.contact_sheet import CONTACT_SHEET_NAME, write_contact_sheet
from zimage_utils.distributed import check_process_group
from zimage_utils.images import check_image_folder, discover_folder, items_from_dataset
from zimage_utils.model_loading import (
    component_config_hash,
    load_text_encoder_and_tokenizer,
    load_vae,
    read_component_config,
    require_zimage,
    run_dtype,
)
from zimage_utils.precompute import (
    KEY_COLUMNS,
    CaptionGroups,
    PixelDataset,
    ScanDataset,
    ShardWriter,
    add_caption_flags,
    cache_notes,
    carry_over_from_cache,
    check_caption_limit,
    check_validation_prompts,
    duplicate_notes,
    encode_ahead,
    encode_batch,
    encode_validation_prompts,
    gpu_memory_report,
    load_shards,
    merge,
    plan_batches,
    record_key,
    refuse_an_empty_cache,
    summarise,
)
from zimage_utils.step_options import raise_recompile_limit
from zimage_utils.text_encoding import encode_captions, offload_text_encoder
from zimage_utils.vae_attention import use_chunked_attention


def process_age() -> float:
    """Seconds since this process started: on Linux from /proc against the boot clock its start time counts in
    (10 ms resolution; no wall-clock step can make it negative), else from psutil's wall-clock start time (whole
    seconds of boot time make it ~1 s coarse)."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])  # field 22, starttime
        return time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return max(0.0, time.time() - psutil.Process().create_time())


logger = logging.getLogger("precompute")
IMPORT_SECONDS = process_age()  # the start-up figure: process start → here is Python and the imports above


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_argument_group("Model")
    group.add_argument("--pretrained_model_name_or_path", required=True, help="Z-Image diffusers folder or hub id.")
    group.add_argument("--revision", default=None, help="Hub revision of the model.")
    group.add_argument(
        "--dtype",
        choices=["auto", "bf16", "fp16", "fp32"],
        default="auto",
        help="Precision the VAE and text encoder run in (auto: bf16 on GPU, fp32 on CPU).",
    )
    group = parser.add_argument_group("Data")
    group.add_argument(
        "--train_data_dir",
        default=None,
        help="Folder of images with .txt captions (recursive), or with metadata.jsonl/metadata.csv.",
    )
    group.add_argument("--dataset_name", default=None, help="A `datasets` dataset: hub id or save_to_disk folder.")
    group.add_argument("--dataset_split", default="train")
    group.add_argument("--image_column", default="image")
    group.add_argument("--caption_column", default="text")
    group.add_argument("--caption_extension", default=".txt", help="Sidecar caption file extension.")
    add_caption_flags(group)
    group.add_argument(
        "--mask_dir",
        default=None,
        help="Loss masks: a folder mirroring --train_data_dir with a grayscale image per image, same name, any image "
        "extension (white = learn, black = ignore, e.g. the background). Images without one are trained whole.",
    )
    group.add_argument(
        "--mask_column",
        default=None,
        help="With --dataset_name: the Image column holding each row's loss mask (an empty cell: trained whole).",
    )
    group.add_argument(
        "--alpha_mask",
        action="store_true",
        help="Use each transparent image's alpha channel as its loss mask (opaque = learn).",
    )
    group.add_argument(
        "--validation_prompts",
        nargs="*",
        default=None,
        help="Prompts whose embeddings are cached for validation images during training ([trigger] becomes "
        "--caption_prefix). A prompt may end in "
        "settings of its own, as in kohya's and musubi-tuner's sample prompts: '--w 832 --h 1216' (size), '--d 42' "
        "(seed), '--s 8' (steps), '--l 4' (guidance), '--n blurry' (negative prompt, encoded too); the trainer's "
        "--validation_* flags give the rest.",
    )
    group.add_argument(
        "--validation_prompt_file",
        default=None,
        help="A text file of such prompts, one per line (blank lines and # comments skipped; a kohya or musubi-tuner "
        "sample prompt file works), after any --validation_prompts.",
    )
    group = parser.add_argument_group("Buckets and encoding")
    group.add_argument("--resolution", type=int, default=1024, help="Target side in pixels; buckets keep ~res² area.")
    group.add_argument("--max_aspect", type=float, default=4.0, help="Widest bucket aspect ratio (both ways).")
    group.add_argument(
        "--max_upscale",
        type=float,
        default=2.0,
        help="Skip images that would need more than this upscaling to fill their bucket.",
    )
    group.add_argument("--crop", choices=["center", "random"], default="center", help="Crop inside the bucket.")
    group.add_argument("--cache_flipped", action="store_true", help="Also cache latents of the mirrored image.")
    group.add_argument(
        "--latent_sampling",
        choices=["mode", "sample"],
        default="mode",
        help="VAE posterior mode (deterministic) or a seeded sample per image.",
    )
    group.add_argument("--max_sequence_length", type=int, default=512, help="Caption tokens kept (Z-Image: 512).")
    group.add_argument(
        "--text_padding",
        choices=["max_length", "longest"],
        default="max_length",
        help="max_length: embeddings bit-identical to ZImagePipeline.encode_prompt; longest: pad each batch only to "
        "its longest caption (faster for short captions, equal up to kernel rounding).",
    )
    group.add_argument(
        "--cache_dtype",
        choices=["bf16", "fp16", "fp32"],
        default="bf16",
        help="Storage dtype of latents and embeddings.",
    )
    group = parser.add_argument_group("Run")
    group.add_argument("--output_dir", required=True, help="Cache folder (created; re-runs add to it).")
    group.add_argument("--overwrite", action="store_true", help="Delete an existing cache and rebuild it.")
    group.add_argument(
        "--dry_run",
        action="store_true",
        help="Only scan: print the buckets, the images that would be skipped (and why) and how many a run would "
        "encode, without loading the encoders or writing anything (but the --contact_sheet of the crops, if asked).",
    )
    group.add_argument(
        "--keep_missing",
        action="store_true",
        help="Keep cached items whose image is gone from the folder or dataset, or unreadable now (default: a re-run "
        "drops them, listing them, so that the cache holds what the data holds).",
    )
    group.add_argument("--batch_size", type=int, default=8, help="Images per VAE batch.")
    group.add_argument(
        "--text_batch_size",
        type=int,
        default=None,
        help="Captions per text-encoder call, rounded down to whole image batches (default: --batch_size). Larger is "
        "faster where memory allows, e.g. 64 on 40-80 GB GPUs; embeddings equal to ZImagePipeline's up to kernel "
        "rounding then, as with --text_padding longest.",
    )
    group.add_argument("--dataloader_num_workers", type=int, default=2, help="Processes decoding images (0 = main).")
    group.add_argument("--shard_size", type=int, default=256, help="Records per finished part (crash granularity).")
    group.add_argument(
        "--text_encoder_offload",
        action="store_true",
        help="Keep the text encoder (8 GB in bf16) in pinned host RAM and move each layer's weights to the GPU only "
        "while it runs, the next one copied while the current one computes (diffusers' group offloading): for cards "
        "under ~16 GB (on 8 GB with --batch_size 2). The same embeddings, only slower: every text-encoder call moves "
        "all 8 GB, so a larger --text_batch_size (32-64) makes fewer of them. Setting up takes 8 GB more of free host "
        "RAM per process for the pinned copy; with less, each layer is pinned as it moves (slower, not timed).",
    )
    group.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the VAE encoder: faster on large datasets (see docs/BENCHMARKS.md), after one compile "
        "per bucket size; not worth it for a few dozen images.",
    )
    group.add_argument("--seed", type=int, default=0, help="Seeds random crops and latent sampling per image.")
    group.add_argument(
        "--contact_sheet",
        type=int,
        nargs="?",
        const=64,
        default=0,
        metavar="MAX_IMAGES",
        help="Write OUTPUT/contact_sheet.png: each image's crop outlined on its original, grouped by bucket, for up to "
        "MAX_IMAGES images (64 when the number is left out; 0 = none).",
    )
    args = cli.parse_with_config(parser, input_args)
    if (args.train_data_dir is None) == (args.dataset_name is None):
        parser.error("pass exactly one of --train_data_dir or --dataset_name")
    if args.mask_dir and (args.alpha_mask or args.dataset_name):
        parser.error("--mask_dir goes with --train_data_dir and without --alpha_mask (masks come from one place)")
    if args.mask_column and (args.alpha_mask or args.train_data_dir):
        parser.error("--mask_column goes with --dataset_name and without --alpha_mask (masks come from one place)")
    if args.mask_dir and not Path(args.mask_dir).is_dir():
        parser.error(f"--mask_dir {args.mask_dir} is not a folder: point it at the folder holding the masks")
    if args.mask_dir and args.train_data_dir and Path(args.mask_dir).resolve() == Path(args.train_data_dir).resolve():
        parser.error(
            "--mask_dir is the image folder (each image would be its own mask): keep the masks in a folder of their own"
        )
    if not args.caption_extension.startswith("."):
        parser.error(f"--caption_extension {args.caption_extension}: give it with its dot, e.g. .txt")
    if args.preservation_class and not (args.caption_prefix or "").strip():
        parser.error("--preservation_class replaces the trigger word: give it with --caption_prefix")
    if args.keep_tokens and args.shuffle_caption < 2:
        parser.error(
            "--keep_tokens says which tags --shuffle_caption leaves in front: add --shuffle_caption N (N >= 2)"
        )
    check_validation_prompts(parser, args)
    return args


def keep_as_is(item):
    """DataLoader collate for datasets that already return whole batches (a module-level function, so workers
    started with spawn can pickle it)."""
    return item


def make_fingerprint(args: argparse.Namespace) -> dict:
    """Everything that changes what the cache holds; a trainer or a re-run compares against it."""
    vae_config = read_component_config(args.pretrained_model_name_or_path, "vae", args.revision)
    text_config = read_component_config(args.pretrained_model_name_or_path, "text_encoder", args.revision)
    return {
        "model": args.pretrained_model_name_or_path,
        "component_config_hash": component_config_hash(args.pretrained_model_name_or_path, revision=args.revision),
        "resolution": args.resolution,
        "max_aspect": args.max_aspect,
        "crop": args.crop,
        "cache_flipped": args.cache_flipped,
        "latent_sampling": args.latent_sampling,
        "max_sequence_length": args.max_sequence_length,
        "text_padding": args.text_padding,
        "latent_dtype": args.cache_dtype,
        "embedding_dtype": args.cache_dtype,
        "scaling_factor": vae_config["scaling_factor"],
        "shift_factor": vae_config["shift_factor"],
        "latent_channels": vae_config["latent_channels"],
        "vae_downsample": 2 ** (len(vae_config["block_out_channels"]) - 1),
        "embed_dim": text_config["hidden_size"],
        "seed": args.seed,
        # where loss masks come from: the flag that gave them
        "masks": next((flag for flag in ("mask_dir", "mask_column", "alpha_mask") if getattr(args, flag)), "none"),
        "caption_variants": args.caption_variants,
    }


def main(args: argparse.Namespace) -> dict | None:
    """`build_cache(args)`, with CUDA running out of memory turned into one line saying what to change."""
    use_expandable_segments()
    try:
        with contextlib.ExitStack() as held:  # (the cache folder's lock, once taken)
            return build_cache(args, held)
    except BaseException as error:
        # (not when another run holds the folder: the cache set aside is that run's to restore)
        if (
            args.overwrite
            and not args.dry_run
            and PartialState().is_main_process
            and not isinstance(error, cli.FolderInUse)
        ):
            restore_set_aside(Path(args.output_dir))  # the cache this run was replacing stays
        if not isinstance(error, torch.OutOfMemoryError):
            raise
        changes = []
        if args.batch_size > 1:
            text_batch = f" and --text_batch_size {args.text_batch_size // 2}" if args.text_batch_size else ""
            changes.append(f"--batch_size {args.batch_size // 2}{text_batch}")
        if not args.text_encoder_offload:
            changes.append("--text_encoder_offload (the text encoder's 8 GB then wait in host RAM)")
        changes.append("a lower --resolution")
        raise cli.OutOfGPUMemory(
            f"out of GPU memory while encoding batches of {args.batch_size} images at about {args.resolution} px a "
            f"side: give {', or '.join(changes)}. The parts finished so far are kept: a re-run encodes only the rest."
        ) from error


def use_expandable_segments() -> None:
    """Let PyTorch's CUDA allocator grow its segments (unless the user configured it): VAE batches of several bucket
    shapes otherwise leave GiBs reserved that no later batch fits in. H200, batches of 8 at 1024² in 4 buckets: 29.0
    GiB reserved for 12.2 allocated, 15.2 with it, no slower (docs/BENCHMARKS.md, session 14). Read when CUDA first
    allocates, so before the model loads."""
    if not (os.environ.get("PYTORCH_ALLOC_CONF") or os.environ.get("PYTORCH_CUDA_ALLOC_CONF")):
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"


def build_cache(args: argparse.Namespace, held: contextlib.ExitStack) -> dict | None:
    """Build or extend the cache, holding its folder's lock in `held`. Returns the run's figures on the main process
    (None on the others): images encoded, seconds per phase (scan, load, encode, merge, total), images/s overall and
    in the encode loop, and the start-up before them (Python and imports, then accelerate's process and device
    set-up), with the wall-clock times the process started and `main` finished (for a launcher to tell its own and the
    exit's share)."""
    cli.setup_logging("precompute")
    datasets.disable_progress_bars()
    started_at, accelerate_from = time.time() - process_age(), time.perf_counter()
    accelerator = Accelerator()
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    start = time.perf_counter()
    startup = {"imports": IMPORT_SECONDS, "accelerator": start - accelerate_from}
    check_process_group(accelerator)

    # Check the model and the cache we add to
    require_zimage(args.pretrained_model_name_or_path)
    check_caption_limit(args)
    cli.check_output_dir(args.output_dir)
    for note in carry_over_from_cache(args, None if args.overwrite else cache_lib.read_manifest(args.output_dir)):
        accelerator.print(f"note: {note}")
    if args.train_data_dir:  # before the output folder is made
        check_image_folder(args.train_data_dir)
    fingerprint = make_fingerprint(args)
    if args.dry_run:  # reads what is there; checks, deletes and writes nothing
        existing = None if args.overwrite else prepare_output_dir_readonly(args.output_dir)
    else:
        created = not Path(args.output_dir).exists()  # for the main process; the others read it only
        if accelerator.is_main_process:  # one precompute at a time in a cache (two shrank it to what one wrote)
            held.enter_context(cli.folder_lock(args.output_dir, "precompute_embeddings.py"))
        existing = prepare_output_dir(args, fingerprint) if accelerator.is_main_process else None
        accelerator.wait_for_everyone()
        if not accelerator.is_main_process:
            existing = prepare_output_dir_readonly(args.output_dir)
    # An item is re-encoded when its image bytes or its final captions (edited .txt, new --caption_prefix) changed.
    existing = cache_lib.add_missing_columns(existing) if existing is not None else None  # (an older format's)
    done = {
        record_key(r)
        for part in [existing, *load_shards(args.output_dir)]
        if part is not None
        for r in part.select_columns(list(KEY_COLUMNS))
    }

    # Find items; this process takes every world-th one
    hf_dataset = None
    if args.train_data_dir:
        exclude = [args.mask_dir, args.output_dir]
        items = discover_folder(
            args.train_data_dir, args.caption_extension, args.caption_column, exclude, accelerator.is_main_process
        )
    else:
        hf_dataset, items = items_from_dataset(
            args.dataset_name, args.image_column, args.caption_column, args.dataset_split, args.mask_column
        )
    mine = items[rank::world]

    # Scan headers and hashes in workers: bucket, crop box, or a reason to skip
    buckets = make_buckets(args.resolution, max_aspect=args.max_aspect)
    scan = torch.utils.data.DataLoader(
        ScanDataset(mine, buckets, args, hf_dataset),
        batch_size=None,
        num_workers=args.dataloader_num_workers,
        collate_fn=keep_as_is,
    )
    planned, skipped, notes, fitted = [], [], [], []
    for result in tqdm(scan, desc="scan", disable=not accelerator.is_local_main_process):
        notes += [
            {"source": result.get("source") or result["planned"].item.source, "reason": n} for n in result["notes"]
        ]
        if "skipped" in result:
            skipped.append({"source": result["source"], "reason": result["skipped"]})
            continue
        fitted.append(result["planned"])
        if result["planned"].key not in done:
            planned.append(result["planned"])

    scanned = time.perf_counter()
    if args.dry_run:
        report = report_dry_run(accelerator, args, fitted, skipped, notes, len(planned), items, hf_dataset)
        accelerator.end_training()  # as a full run does: the process group ends before the interpreter does
        return report
    reports = gather_object([{"kept": len(fitted) - len(planned), "planned": len(planned), "skipped": skipped}])
    kept = sum(r["kept"] for r in reports) if existing is None or not args.keep_missing else 1
    if not kept and not sum(r["planned"] for r in reports):
        refuse_an_empty_cache(accelerator, args.output_dir, created, by_source(reports, "skipped"), notes)

    # Load the encoders, while DataLoader workers start decoding the first batches
    planned_batches = plan_batches(planned, args.batch_size)
    pixels = torch.utils.data.DataLoader(
        PixelDataset(
            planned_batches,
            args.cache_flipped,
            hf_dataset,
            alpha_masks=args.alpha_mask,
            downsample=fingerprint["vae_downsample"],
        ),
        batch_size=None,
        num_workers=args.dataloader_num_workers,
        collate_fn=keep_as_is,
        pin_memory=device.type == "cuda",  # lets the copy to the GPU overlap with the previous batch's encoding
    )
    batches = iter(pixels)
    dtype = run_dtype(args.dtype, device)
    vae = load_vae(args.pretrained_model_name_or_path, dtype, device, revision=args.revision)
    use_chunked_attention(vae)  # same arithmetic as SDPA's fallback for head dim 512, faster (vae_attention.py)
    vae_loaded = time.perf_counter()
    text_encoder, tokenizer = load_text_encoder_and_tokenizer(
        args.pretrained_model_name_or_path,
        dtype,
        "cpu" if args.text_encoder_offload else device,
        revision=args.revision,
    )
    if args.text_encoder_offload:
        offload_text_encoder(text_encoder, device)
    if args.compile:
        raise_recompile_limit(len(buckets) + 8)
        vae.encoder = torch.compile(vae.encoder, dynamic=False)  # compiled once per bucket size
    text_stream = None  # on a GPU the text encoder gets a CUDA stream of its own, to run beside the VAE
    if device.type == "cuda":
        text_stream = torch.cuda.Stream(device)
        text_stream.wait_stream(torch.cuda.current_stream(device))  # for the weights just loaded
    loaded = time.perf_counter()

    # Encode new items bucket by bucket, saving finished parts as we go
    store = cache_lib.DTYPES[args.cache_dtype]
    shapes_seen, compile_s = set(), 0.0
    caption_groups = None
    if args.text_batch_size and args.text_batch_size > args.batch_size:
        caption_groups = CaptionGroups(
            planned_batches,
            args.text_batch_size // args.batch_size,
            partial(
                encode_captions,
                tokenizer=tokenizer,
                text_encoder=text_encoder,
                max_sequence_length=args.max_sequence_length,
                device=device,
                padding=args.text_padding,
            ),
        )

    def encode(batch):
        nonlocal compile_s
        begin = time.perf_counter()
        queued = encode_batch(
            batch, vae, tokenizer, text_encoder, args, device, (store, store), text_stream, caption_groups
        )
        # A compiled encoder blocks the host on the first batch of each shape while it compiles.
        if args.compile and batch["pixels"].shape not in shapes_seen:
            shapes_seen.add(batch["pixels"].shape)
            compile_s += time.perf_counter() - begin
        return queued

    encoded, truncated = 0, []
    progress = tqdm(total=len(planned), desc=f"encode (process {rank})", disable=not accelerator.is_local_main_process)
    with ShardWriter(args.output_dir, rank, args.shard_size) as writer:
        for batch, records in encode_ahead(batches, encode):
            skipped += [{"source": s, "reason": r} for s, r in batch["skipped"]]
            notes += [{"source": s, "reason": r} for s, r in batch["notes"]]
            writer.add(records)
            encoded += len(records)
            truncated += [r["source"] for r in records if r["caption_truncated"]]
            progress.update(len(batch["planned"]) + len(batch["skipped"]))
    progress.close()

    # Merge every process's parts into one sorted dataset
    reports = gather_object([{"skipped": skipped, "notes": notes, "encoded": encoded, "truncated": truncated}])
    accelerator.wait_for_everyone()
    encoded_all = time.perf_counter()  # every process has finished encoding
    if not kept and not sum(r["encoded"] for r in reports):  # every image failed to decode
        refuse_an_empty_cache(accelerator, args.output_dir, created, by_source(reports, "skipped"), notes)
    stats = None
    if accelerator.is_main_process:
        empty, _ = encode_captions([""], tokenizer, text_encoder, args.max_sequence_length, device)
        validation = encode_validation_prompts(
            args.validation_prompts, tokenizer, text_encoder, args.max_sequence_length, device, args.caption_prefix
        )
        cache_lib.save_prompt_embeddings(args.output_dir, empty[0], validation, store)
        parts = load_shards(args.output_dir)
        all_skipped = by_source(reports, "skipped")
        current = {i.source for i in items} - {s["source"] for s in all_skipped}
        merged, dropped = merge(existing, parts, None if args.keep_missing else current)
        if dropped:
            logger.info(
                f"dropped {len(dropped)} cached item(s) whose image is gone or now skipped (--keep_missing keeps "
                f"them): {', '.join(dropped[:10])}{' …' if len(dropped) > 10 else ''}"
            )
        fresh = {source for part in parts for source in part["source"]} | set(dropped)
        previous = cache_lib.read_manifest(args.output_dir) or {}
        cache_lib.save_dataset_atomic(merged, Path(args.output_dir) / cache_lib.DATA_DIR)
        all_notes = cache_notes(previous.get("notes", []), fresh, [n for r in reports for n in r["notes"]], merged)
        by_bucket = Counter(zip(merged["bucket_height"], merged["bucket_width"]))
        new = sum(r["encoded"] for r in reports)
        end = time.perf_counter()
        seconds = {
            "scan": scanned - start,
            "load": loaded - scanned,
            "encode": encoded_all - loaded,
            "merge": end - encoded_all,
            "total": end - start,
        }
        stats = {
            "images": new,
            "dropped": dropped,
            "startup_seconds": startup,
            "seconds": seconds,
            "load_seconds": {"vae": vae_loaded - scanned, "text_encoder": loaded - vae_loaded},
            "process_started_at": started_at,
            "finished_at": time.time(),
            "compile_seconds": compile_s,
            "images_per_s": new / seconds["total"],
            "encode_images_per_s": new / max(seconds["encode"], 1e-9),
            "processes": world,
        }
        gpu_memory, gpu_memory_line = gpu_memory_report(device, args.batch_size, args.resolution)
        if gpu_memory:
            stats["gpu_memory_gib"] = gpu_memory
        num_masked = cache_lib.count_masked(merged)
        cache_lib.write_json_atomic(
            Path(args.output_dir) / cache_lib.MANIFEST_NAME,
            {
                "format_version": cache_lib.CACHE_FORMAT_VERSION,
                "fingerprint": fingerprint,
                "num_items": len(merged),
                "num_masked": num_masked,
                "buckets": {f"{h}x{w}": n for (h, w), n in sorted(by_bucket.items())},
                "validation_prompts": args.validation_prompts,
                "caption_prefix": args.caption_prefix,
                "skipped": all_skipped,
                "notes": all_notes,
                "last_run": stats,
            },
        )
        # the parts only once the manifest marks data/ finished: a kill before that re-merges them, not re-encodes
        shutil.rmtree(Path(args.output_dir) / cache_lib.SHARDS_DIR, ignore_errors=True)
        drop_set_aside(Path(args.output_dir))  # (--overwrite: the cache this one replaces)
        # `--config CACHE/precompute_config.yaml` runs it again (without --overwrite): only new or changed images encode
        cli.write_config(Path(args.output_dir) / cache_lib.CONFIG_NAME, args, leave_out=("overwrite",))
        if args.contact_sheet:
            sheet, shown = write_contact_sheet(
                merged, items, hf_dataset, Path(args.output_dir) / CONTACT_SHEET_NAME, args.contact_sheet
            )
            logger.info(f"contact sheet of {shown} images (what each crop kept): {sheet}")
        logger.info(summarise(by_bucket, all_skipped, all_notes))
        if cut := sorted(source for r in reports for source in r["truncated"]):
            logger.info(
                f"captions cut at --max_sequence_length {args.max_sequence_length} tokens (the rest is not trained on): "
                f"{', '.join(cut[:10])}{' …' if len(cut) > 10 else ''}"
            )
        logger.info(
            f"cache {args.output_dir}: {len(merged)} items ({new} new, {len(merged) - new} kept), "
            f"{len(all_skipped)} skipped, {sum(len(r['truncated']) for r in reports)} captions truncated to "
            f"{args.max_sequence_length} tokens, {num_masked} with a loss mask; {stats['images_per_s']:.1f} images/s "
            f"over {seconds['total']:.1f} s "
            f"on {world} process(es)"
        )
        compiling = f", {compile_s:.1f} s of it compiling {len(shapes_seen)} batch shape(s)" if args.compile else ""
        logger.info(
            f"time: start-up {sum(startup.values()):.1f} s (Python and imports {startup['imports']:.1f}, accelerate "
            f"{startup['accelerator']:.1f}), scan {seconds['scan']:.1f} s, model load {seconds['load']:.1f} s (VAE and "
            f"decode workers {stats['load_seconds']['vae']:.1f}, text encoder {stats['load_seconds']['text_encoder']:.1f}), "
            f"encode {seconds['encode']:.1f} s ({stats['encode_images_per_s']:.1f} images/s{compiling}), "
            f"merge and write {seconds['merge']:.1f} s"
        )
        if gpu_memory_line:
            logger.info(gpu_memory_line)
    accelerator.end_training()
    return stats


def report_dry_run(accelerator, args, fitted, skipped, notes, to_encode: int, items, hf_dataset) -> dict | None:
    """--dry_run: what the scan found on every process (`fitted`: the Planned items that fit a bucket, new or cached;
    the skipped images, the notes), and how many images a run would encode; with --contact_sheet also the crops it
    would take (no loss masks: those are cut while encoding). Loads no encoder and writes nothing else. Returns the
    figures on the main process."""
    scanned = [
        {"source": p.item.source, "bucket_height": p.bucket[0], "bucket_width": p.bucket[1],
         "crop_box": list(p.crop.to_original(*p.original_size)), "content_hash": p.content_hash}
        for p in fitted
    ]  # fmt: skip
    reports = gather_object([{"scanned": scanned, "skipped": skipped, "notes": notes, "to_encode": to_encode}])
    if not accelerator.is_main_process:
        return None
    records = [r for report in reports for r in report["scanned"]]
    by_bucket = Counter((r["bucket_height"], r["bucket_width"]) for r in records)
    copies = duplicate_notes([r["source"] for r in records], [r["content_hash"] for r in records])
    all_skipped, all_notes = by_source(reports, "skipped"), by_source([*reports, {"notes": copies}], "notes")
    new = sum(r["to_encode"] for r in reports)
    logger.info(summarise(by_bucket, all_skipped, all_notes))
    if args.contact_sheet:
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        path = Path(args.output_dir) / CONTACT_SHEET_NAME
        sheet, shown = write_contact_sheet(records, items, hf_dataset, path, args.contact_sheet)
        logger.info(f"contact sheet of {shown} images (the crops a run would take): {sheet}")
    logger.info(
        f"dry run: {len(records)} images fit their buckets, {len(all_skipped)} skipped; a run would encode {new} "
        f"(new or changed) into {args.output_dir}. Nothing {'else ' if args.contact_sheet else ''}was written."
    )
    return {"buckets": dict(by_bucket), "skipped": all_skipped, "notes": all_notes, "to_encode": new}


def by_source(reports: list[dict], key: str) -> list[dict[str, str]]:
    """Every process's `key` entries ({"source", "reason"}: skipped images or notes), in source order."""
    return sorted((entry for report in reports for entry in report[key]), key=lambda entry: entry["source"])


if __name__ == "__main__":
    cli.run(main, parse_args)
