"""Turn a kohya sd-scripts or musubi-tuner dataset config (TOML) into this suite's: one precompute config per image
folder (subset), and the trainer's data flags for all of them, as `--config` files. Nothing is loaded or encoded.

    python import_dataset_config.py my_dataset.toml --output_dir my_caches \
        --pretrained_model_name_or_path Tongyi-MAI/Z-Image-Turbo

It prints the commands that follow: a precompute per folder, then the trainer with `--config
my_caches/train_data.yaml`. What a key becomes:

    image_dir (kohya), image_directory (musubi)   --train_data_dir, one cache each under --output_dir
    resolution (side, or [width, height])         --resolution (one side; buckets keep the area of width x height)
    caption_extension, caption_prefix, keep_tokens, alpha_mask    the same flags (caption_prefix: the trigger)
    class_tokens                                   --default_caption (the caption of images without a caption file)
    shuffle_caption                                --shuffle_caption 4 (4 cached orderings of the tags)
    flip_aug                                       --cache_flipped, and the trainer's --random_flip 0.5 (for all)
    random_crop                                    --crop random
    bucket_no_upscale                              --max_upscale 1
    num_repeats                                    the trainer's --repeats
    is_reg                                         the trainer's --loss_weights (--prior_loss_weight here, default 1)
    batch_size, caption_dropout_rate               the trainer's --train_batch_size, --caption_dropout (the largest)

Keys without an equivalent here (color_aug, cache_directory, ...) are listed, not dropped silently. A key given in
[general] or a [[datasets]] entry holds for the subsets under it, as in kohya.
"""

import argparse
import math
import sys
from pathlib import Path

import tomllib
import yaml

from zimage_utils import cli

# Keys that need nothing here: bucketing is always on, its sizes follow --resolution, latents are cached once
IGNORED = {"enable_bucket", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps", "cache_directory"}
IGNORED |= {"cache_latents", "cache_latents_to_disk"}
SHUFFLED_ORDERINGS = 4  # kohya shuffles every step; here --shuffle_caption caches this many orderings


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset_config", help="kohya sd-scripts or musubi-tuner dataset config (.toml).")
    parser.add_argument("--output_dir", required=True, help="Where the caches and the --config files go.")
    parser.add_argument(
        "--pretrained_model_name_or_path", default=None, help="Written into the precompute configs if given."
    )
    parser.add_argument(
        "--prior_loss_weight", type=float, default=1.0, help="Loss weight of is_reg subsets (kohya's flag)."
    )
    return parser.parse_args(input_args)


def read_subsets(path: Path) -> list[dict]:
    """Each image folder of the config, with the keys it inherits from [general] and its [[datasets]] entry."""
    try:
        config = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such dataset config") from None
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"{path} is not valid TOML ({error}): fix it, or write the flags yourself") from None
    general = config.get("general", {})
    subsets = []
    for dataset in config.get("datasets", []):
        inherited = {**general, **{k: v for k, v in dataset.items() if k != "subsets"}}
        subsets += [{**inherited, **subset} for subset in dataset.get("subsets", [{}])]
    subsets = [s for s in subsets if s.get("image_dir") or s.get("image_directory")]
    if not subsets:
        raise ValueError(
            f"{path} names no image folder (image_dir in [[datasets.subsets]], or image_directory in [[datasets]]): "
            "only image datasets of folders can be imported"
        )
    return subsets


def side(resolution, where: str) -> int:
    """kohya/musubi `resolution` (a side, or [width, height]) as our one side: a square of the same area."""
    values = resolution if isinstance(resolution, list) else [resolution]
    if not 1 <= len(values) <= 2 or not all(isinstance(v, int) and v > 0 for v in values):
        raise ValueError(f"{where}: resolution {resolution!r} is not a side or [width, height] in pixels")
    area = values[0] * values[-1]
    return max(16, round(math.sqrt(area) / 16) * 16)


def convert(subsets: list[dict], args: argparse.Namespace) -> tuple[list[tuple[Path, dict]], dict, list[str]]:
    """([(cache folder, its precompute flags)], the trainer's data flags, notes on what was not carried over)."""
    output_dir = Path(args.output_dir)
    caches, repeats, weights, notes = [], [], [], []
    batch_sizes, dropouts, flipped = set(), set(), False
    for i, subset in enumerate(subsets):
        folder = Path(subset.get("image_dir") or subset.get("image_directory"))
        name = f"{i:02d}_{folder.name or 'images'}"
        flags = {"train_data_dir": str(folder), "output_dir": str(output_dir / name)}
        if args.pretrained_model_name_or_path:
            flags["pretrained_model_name_or_path"] = args.pretrained_model_name_or_path
        if "resolution" in subset:
            flags["resolution"] = side(subset["resolution"], f"subset {folder}")
        if not isinstance(subset.get("resolution", 1024), int):
            notes.append(f"{name}: resolution {subset['resolution']} became --resolution {flags['resolution']}")
        for key in ("caption_extension", "caption_prefix", "keep_tokens", "alpha_mask"):
            if subset.get(key):
                flags[key] = subset[key]
        if subset.get("class_tokens"):
            flags["default_caption"] = subset["class_tokens"]
        if subset.get("shuffle_caption"):
            flags["shuffle_caption"] = SHUFFLED_ORDERINGS
        elif flags.pop("keep_tokens", None):
            notes.append(f"{name}: keep_tokens without shuffle_caption does nothing; left out")
        if subset.get("flip_aug"):
            flags["cache_flipped"], flipped = True, True
        if subset.get("random_crop"):
            flags["crop"] = "random"
        if subset.get("bucket_no_upscale"):
            flags["max_upscale"] = 1.0
        if subset.get("image_jsonl_file") or subset.get("metadata_file"):
            notes.append(f"{name}: its captions file is not read; captions come from the folder's caption files")
        known = {"image_dir", "image_directory", "resolution", "caption_extension", "caption_prefix", "keep_tokens"}
        known |= {"alpha_mask"}
        known |= {"class_tokens", "shuffle_caption", "flip_aug", "random_crop", "bucket_no_upscale", "num_repeats"}
        known |= {"is_reg", "batch_size", "caption_dropout_rate", "image_jsonl_file", "metadata_file"} | IGNORED
        if other := sorted(set(subset) - known):
            notes.append(f"{name}: no equivalent here for {', '.join(other)}; left out")
        caches.append((output_dir / f"precompute_{name}.yaml", flags))
        repeats.append(int(subset.get("num_repeats", 1)))
        weights.append(args.prior_loss_weight if subset.get("is_reg") else 1.0)
        batch_sizes.add(int(subset.get("batch_size", 1)))
        dropouts.add(float(subset.get("caption_dropout_rate", 0.0)))
    train = {"precomputed_dir": [flags["output_dir"] for _, flags in caches]}
    if set(repeats) != {1}:
        train["repeats"] = repeats
    if set(weights) != {1.0}:
        train["loss_weights"] = weights
    if max(batch_sizes) > 1:
        train["train_batch_size"] = max(batch_sizes)
    if max(dropouts) > 0:
        train["caption_dropout"] = max(dropouts)
    if flipped:  # --random_flip is the run's, and needs every cache mirrored
        train["random_flip"] = 0.5
        if not all(flags.get("cache_flipped") for _, flags in caches):
            notes.append("flip_aug holds for every folder here (--random_flip is for the whole run)")
        for _, flags in caches:
            flags["cache_flipped"] = True
    if len(batch_sizes) > 1 or len(dropouts) > 1:
        notes.append("batch_size and caption_dropout_rate hold for the whole run here: the largest was taken")
    return caches, train, notes


def main(args: argparse.Namespace) -> dict:
    config = Path(args.dataset_config)
    caches, train, notes = convert(read_subsets(config), args)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    for path, flags in caches:
        cli.write_text_atomic(path, yaml.safe_dump(flags, sort_keys=False))
    train_config = output_dir / "train_data.yaml"
    cli.write_text_atomic(train_config, yaml.safe_dump(train, sort_keys=False))
    model = "" if args.pretrained_model_name_or_path else " --pretrained_model_name_or_path MODEL"
    lines = [f"{config}: {len(caches)} image folder(s). Next:"]
    lines += [f"  accelerate launch precompute_embeddings.py --config {path}{model}" for path, _ in caches]
    lines.append(
        f"  accelerate launch train_zimage_lora.py --config {train_config} --pretrained_model_name_or_path "
        f"{args.pretrained_model_name_or_path or 'MODEL'} --output_dir my_lora  # + the training flags"
    )
    lines += [f"note: {n}" for n in notes]
    print("\n".join(lines), file=sys.stdout)
    return {"precompute": caches, "train": train, "notes": notes}


if __name__ == "__main__":
    cli.run(main, parse_args)
