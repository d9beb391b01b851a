"""Caption a folder of training images with a vision-language model: one .txt sidecar per image, the files
precompute_embeddings.py reads. Images that already have a caption are left alone, so a stopped run picks up
where it was, and captions you wrote yourself are never overwritten (unless you pass --overwrite).

    accelerate launch caption_images.py --train_data_dir my_photos       # Qwen3-VL-8B, ~17 GB in bf16; any GPUs
    python caption_images.py --train_data_dir my_photos --load_in_4bit   # NF4 weights, for cards under ~20 GB
    python caption_images.py --train_data_dir my_photos --preset person   # clothing, pose, setting; not the face
    python caption_images.py --train_data_dir my_photos --model Qwen/Qwen2.5-VL-7B-Instruct \
        --instruction "Describe this photo in one paragraph."

The model is any that transformers loads with AutoModelForImageTextToText and a chat template (Qwen2.5-VL,
Qwen3-VL, LLaVA models, ...); Qwen-VL processors need torchvision. Captions are greedy (the same image gets the same
caption) and one line each. Read a few before training: the trigger word is added by precompute_embeddings.py's
--caption_prefix, and whatever a caption names is not learned into the trigger (see docs/TRAINING_GUIDE.md).
"""

import argparse
import time
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from zimage_utils import cli
from zimage_utils.captioning import (
    DEFAULT_CAPTIONER,
    INSTRUCTIONS,
    FittingBatches,
    fit_pixels,
    load_captioner,
    write_caption,
)
from zimage_utils.images import METADATA_FILES, BadImageError, check_image_folder, discover_folder, load_image
from zimage_utils.model_loading import RUN_DTYPES, run_dtype


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train_data_dir", required=True, help="Folder of images (searched recursively).")
    parser.add_argument("--model", default=DEFAULT_CAPTIONER, help="Vision-language model: hub id or folder.")
    parser.add_argument("--revision", default=None, help="Hub revision of the model.")
    parser.add_argument(
        "--trust_remote_code",
        action="store_true",
        help="Run the model repo's own Python code (only for a model you trust that transformers cannot load "
        "without it).",
    )
    parser.add_argument(
        "--preset",
        choices=list(INSTRUCTIONS),
        default="general",
        help="What the model is asked to describe: general (everything visible); person (clothing, pose, setting; "
        "not the face, hair or body, which the trigger word should learn); style (the content, not the style).",
    )
    parser.add_argument("--instruction", default=None, help="Your own request to the model, in place of --preset's.")
    parser.add_argument("--caption_extension", default=".txt", help="Sidecar caption file extension.")
    parser.add_argument(
        "--overwrite", action="store_true", help="Caption every image, replacing the captions already there."
    )
    parser.add_argument(
        "--exclude",
        nargs="+",
        default=[],
        help="Folders inside --train_data_dir not to caption (loss masks, a cache).",
    )
    parser.add_argument("--max_new_tokens", type=int, default=300, help="Longest caption, in tokens.")
    parser.add_argument(
        "--max_pixels",
        type=int,
        default=1024 * 1024,
        help="Images are downscaled to at most this many pixels before the model sees them (its cost grows with "
        "the area).",
    )
    parser.add_argument("--batch_size", type=int, default=4, help="Images captioned at once per process.")
    parser.add_argument(
        "--dtype", choices=["auto", *RUN_DTYPES], default="auto", help="auto: bf16 on GPU, fp32 on the CPU."
    )
    parser.add_argument(
        "--load_in_4bit",
        action="store_true",
        help="Load the model's weights in bitsandbytes NF4 (CUDA): ~a third of bf16's memory, slightly other "
        "captions.",
    )
    parser.add_argument(
        "--dry_run", action="store_true", help="List what would be captioned; load no model, write nothing."
    )
    args = cli.parse_with_config(parser, input_args)
    cli.require_at_least(parser, args, max_new_tokens=1, max_pixels=1, batch_size=1)
    args.instruction = args.instruction or INSTRUCTIONS[args.preset]
    if not args.caption_extension.startswith("."):
        parser.error(f"--caption_extension {args.caption_extension}: give it with its dot, e.g. .txt")
    return args


def images_to_caption(args: argparse.Namespace, warn: bool = True) -> tuple[list, int]:
    """(the items to caption, how many already have a caption and are kept). An empty caption file counts as
    none. Captions in a metadata file would hide the sidecars from precompute, so such a folder is refused. `warn`:
    name what the folder holds that is left out (the first process of a launch)."""
    root = check_image_folder(args.train_data_dir)
    if found := [name for name in METADATA_FILES if (root / name).is_file()]:
        raise ValueError(
            f"{root / found[0]} holds this folder's captions, and precompute_embeddings.py reads them instead of "
            f"{args.caption_extension} files: caption a copy of the folder without it, or add the captions to it"
        )
    exclude = [root / e for e in args.exclude] or None
    items = discover_folder(root, args.caption_extension, exclude=exclude, warn=warn)
    todo = [i for i in items if args.overwrite or not (i.caption or "").strip()]
    return todo, len(items) - len(todo)


def sharing_a_caption_file(todo: list, caption_extension: str) -> tuple[list, list[str]]:
    """(the items to caption, notes on those left out): images that share a caption file (a.jpg and a.png both read
    a.txt) are captioned from the first only, so one caption does not overwrite another."""
    first, kept, notes = {}, [], []
    for item in todo:
        caption_path = Path(item.path).with_suffix(caption_extension)
        if caption_path in first:
            notes.append(
                f"{item.source} shares {caption_path.name} with {first[caption_path]}: captioned from that one only "
                "(rename one of them to give each its own caption)"
            )
            continue
        first[caption_path] = item.source
        kept.append(item)
    return kept, notes


def main(args: argparse.Namespace) -> dict:
    """Caption the images; returns the report (also printed by the main process)."""
    accelerator = Accelerator()
    todo, kept = images_to_caption(args, accelerator.is_main_process)
    rank, world = accelerator.process_index, accelerator.num_processes
    if args.dry_run:
        report = {"to_caption": len(todo), "kept": kept}
        accelerator.print(f"dry run: {len(todo)} image(s) to caption, {kept} already captioned (kept)")
        for item in todo[:20]:
            accelerator.print(f"  {item.source}")
        accelerator.end_training()
        return report
    todo, shared = sharing_a_caption_file(todo, args.caption_extension)
    mine = todo[rank::world]
    captioned, skipped, truncated, empty = 0, [], [], []
    start = time.perf_counter()
    if mine:
        dtype = run_dtype(args.dtype, accelerator.device)
        model, processor = load_captioner(
            args.model, accelerator.device, dtype, args.revision, args.load_in_4bit, args.trust_remote_code
        )
        captioner = FittingBatches(model, processor, args.instruction, args.max_new_tokens, args.batch_size)
        progress = tqdm(total=len(todo), desc="captioning", disable=not accelerator.is_local_main_process)
        for first in range(0, len(mine), args.batch_size):
            batch, images = [], []
            for item in mine[first : first + args.batch_size]:
                try:
                    images.append(fit_pixels(load_image(item), args.max_pixels))
                    batch.append(item)
                except BadImageError as error:
                    skipped.append(str(error))
            if batch:
                for item, (caption, cut) in zip(batch, captioner(images), strict=True):
                    if not caption:  # (nothing is written: a re-run tries it again)
                        empty.append(item.source)
                        continue
                    write_caption(Path(item.path).with_suffix(args.caption_extension), caption)
                    captioned += 1
                    truncated += [item.source] if cut else []
            progress.update(len(mine[first : first + args.batch_size]) * world)
        progress.close()
    reports = gather_object([{"captioned": captioned, "skipped": skipped, "truncated": truncated, "empty": empty}])
    report = {
        "captioned": sum(r["captioned"] for r in reports),
        "kept": kept,
        "skipped": sorted(s for r in reports for s in r["skipped"]),
        "truncated": sorted(s for r in reports for s in r["truncated"]),
        "empty": sorted(s for r in reports for s in r["empty"]),
        "shared": shared,
        "seconds": round(time.perf_counter() - start, 1),
    }
    accelerator.print(summary(report, args))
    accelerator.wait_for_everyone()
    accelerator.end_training()  # the process group ends before the interpreter does (else gloo can abort at exit)
    return report


def summary(report: dict, args: argparse.Namespace) -> str:
    lines = [
        f"captioned {report['captioned']} image(s) in {report['seconds']} s"
        + (f"; {report['kept']} already had a caption, kept (--overwrite replaces them)" if report["kept"] else "")
    ]
    if report["skipped"]:
        lines.append(f"skipped {len(report['skipped'])} image(s) that could not be read:")
        lines += [f"  {s}" for s in report["skipped"]]
    if report["empty"]:
        lines.append(
            f"{len(report['empty'])} image(s) got no caption from the model (nothing was written; a thinking model may "
            f"need a larger --max_new_tokens): {', '.join(report['empty'][:10])}"
        )
    lines += [f"note: {n}" for n in report["shared"]]
    if report["truncated"]:
        lines.append(
            f"{len(report['truncated'])} caption(s) reached --max_new_tokens {args.max_new_tokens} and may end "
            "mid-sentence (raise it, or shorten them): " + ", ".join(report["truncated"][:10])
        )
    return "\n".join(lines)


if __name__ == "__main__":
    cli.run(main, parse_args)
