"""Turn another trainer's config into this suite's `--config` files: a kohya sd-scripts or musubi-tuner dataset config
(TOML), or an ai-toolkit job config (YAML, with its training settings). One precompute config per image folder (and
resolution), and the trainer's flags for all of them. Nothing is loaded or encoded.

    python import_config.py my_dataset.toml --output_dir my_caches --pretrained_model_name_or_path Tongyi-MAI/Z-Image-Turbo
    python import_config.py ai_toolkit_job.yaml --output_dir my_caches

It prints the commands that follow: a precompute per folder, then the trainer with `--config my_caches/train.yaml`.
What a kohya / musubi key becomes:

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

A training config's LoRA keeps the other trainer's defaults where it sets none (alpha 1, kohya's rank 4, a LoKr
factored near-square) and the modules its Z-Image LoRA adapts (musubi's networks.lora_zimage, ai-toolkit's network).

An ai-toolkit job's datasets map the same way (folder_path, caption_ext, num_repeats, flip_x, shuffle_tokens,
default_caption; each size of a `resolution` list is a cache of its own, mixed in training, as ai-toolkit trains every
size), its trigger_word becomes --caption_prefix, and its network, train, save, sample and model sections become the
trainer's flags (see AI_TOOLKIT_TRAIN). Keys without an equivalent here (color_aug, cache_directory, timestep_type
weighted, ...) are listed, not dropped silently. In kohya, a key given in [general] or a [[datasets]] entry holds for
the subsets under it.
"""

import argparse
import math
import re
import shlex
import sys
from pathlib import Path

import tomllib
import yaml

from zimage_utils import cli
from zimage_utils.optimizers import IMPORT_PATH, OPTIMIZERS

# Keys that need nothing here: bucketing is always on, its sizes follow --resolution, latents are cached once
IGNORED = {"enable_bucket", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps", "cache_directory"}
IGNORED |= {"cache_latents", "cache_latents_to_disk"}
SHUFFLED_ORDERINGS = 4  # kohya shuffles every step; here --shuffle_caption caches this many orderings


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "config_file", help="kohya sd-scripts or musubi-tuner dataset config (.toml), or ai-toolkit job (.yaml)."
    )
    parser.add_argument("--output_dir", required=True, help="Where the caches and the --config files go.")
    parser.add_argument(
        "--pretrained_model_name_or_path",
        default=None,
        help="Written into the configs (default: an ai-toolkit job's model.name_or_path, else none).",
    )
    parser.add_argument(
        "--prior_loss_weight",
        type=float,
        default=None,
        help="Loss weight of is_reg subsets (kohya's flag; default: the training config's, else 1).",
    )
    return parser.parse_args(input_args)


def load_toml(path: Path) -> dict:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such config") from None
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"{path} is not valid TOML ({error}): fix it, or write the flags yourself") from None


def read_subsets(config: dict, path: Path) -> list[dict]:
    """Each image folder of a kohya/musubi dataset config, with the keys it inherits from [general] and its
    [[datasets]] entry."""
    general = config.get("general", {})
    subsets = []
    for dataset in config.get("datasets", []):
        inherited = {**general, **{k: v for k, v in dataset.items() if k != "subsets"}}
        subsets += [{**inherited, **subset} for subset in dataset.get("subsets", [{}])]
    subsets = [s for s in subsets if s.get("image_dir") or s.get("image_directory")]
    if not subsets:
        raise ValueError(
            f"{path} names no image folder (image_dir in [[datasets.subsets]], or image_directory in [[datasets]]; "
            "a training config names its dataset config in dataset_config): only image folders can be imported"
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
    """([(precompute config file, its flags)], the trainer's data flags, notes on what was not carried over)."""
    output_dir = Path(args.output_dir)
    caches, repeats, weights, notes = [], [], [], []
    batch_sizes, dropouts, flipped = set(), set(), False
    for i, subset in enumerate(subsets):
        folder = Path(subset.get("image_dir") or subset.get("image_directory"))
        name = f"{i:02d}_{folder.name or 'images'}" + (f"_{subset['resolution']}" if subset.get("_sized") else "")
        flags = {"train_data_dir": str(folder), "output_dir": str(output_dir / name)}
        if args.pretrained_model_name_or_path:
            flags["pretrained_model_name_or_path"] = args.pretrained_model_name_or_path
        if "resolution" in subset:
            flags["resolution"] = side(subset["resolution"], f"subset {folder}")
        if not isinstance(subset.get("resolution", 1024), int):
            notes.append(f"{name}: resolution {subset['resolution']} became --resolution {flags['resolution']}")
        for key in ("caption_extension", "caption_prefix", "keep_tokens", "alpha_mask", "mask_dir"):
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
        known |= {"alpha_mask", "mask_dir", "_sized", "_extra"}
        flags.update(subset.get("_extra", {}))  # (ai-toolkit: the preservation class, the sample prompts)
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


# ai-toolkit's names for what the trainer takes here
AI_TOOLKIT_OPTIMIZERS = {"adamw": "adamw", "adamw8bit": "adamw8bit", "prodigy": "prodigy", "adafactor": "adafactor"}
AI_TOOLKIT_OPTIMIZERS |= {  # (other packages' classes, by their import path)
    "lion": "lion_pytorch.Lion", "lion8bit": "bitsandbytes.optim.Lion8bit",
    "ademamix8bit": "bitsandbytes.optim.AdEMAMix8bit",
}  # fmt: skip
AI_TOOLKIT_TIMESTEPS = {"sigmoid": "logit_normal", "linear": "uniform", "shift": "shift"}
AI_TOOLKIT_SAVE_DTYPES = {
    "bf16": "bf16",
    "bfloat16": "bf16",
    "fp16": "fp16",
    "float16": "fp16",
    "fp32": "fp32",
    "float32": "fp32",
}
# What `ai_toolkit_train_flags` reads of each section, and what already holds here (flow matching with an MSE loss,
# the transformer alone trained, the text encoder never loaded in training, each sample prompt's seed walked)
AI_TOOLKIT_READ = {
    "network": {"type", "linear", "linear_alpha", "lokr_factor", "rank", "alpha", "transformer_only",
                "network_kwargs"},
    "train": {"batch_size", "steps", "lr", "gradient_accumulation", "gradient_accumulation_steps", "optimizer",
              "optimizer_params", "lr_scheduler", "ema_config", "diff_output_preservation",
              "diff_output_preservation_multiplier", "diff_output_preservation_class", "blank_prompt_preservation",
              "blank_prompt_preservation_multiplier", "inverted_mask_prior", "inverted_mask_prior_multiplier",
              "timestep_type", "dtype",
              "gradient_checkpointing", "skip_first_sample", "noise_scheduler", "loss_type", "train_unet",
              "train_text_encoder", "unload_text_encoder", "disable_sampling"},
    "save": {"dtype", "save_every", "max_step_saves_to_keep", "save_format", "push_to_hub", "hf_repo_id", "hf_private"},
    "sample": {"sample_every", "width", "height", "samples", "prompts", "neg", "seed", "walk_seed",
               "guidance_scale", "sample_steps", "sampler", "skip_first_sample"},
    "model": {"name_or_path", "arch", "assistant_lora_path", "quantize", "qtype", "quantize_te", "qtype_te",
              "low_vram", "model_kwargs"},
}  # fmt: skip
AI_TOOLKIT_DATASET_KEYS = {  # ai-toolkit dataset key -> the kohya-style key `convert` reads
    "folder_path": "image_dir", "caption_dropout_rate": "caption_dropout_rate", "num_repeats": "num_repeats",
    "flip_x": "flip_aug", "shuffle_tokens": "shuffle_caption", "keep_tokens": "keep_tokens",
    "default_caption": "class_tokens", "is_reg": "is_reg", "mask_path": "mask_dir",
}  # fmt: skip


def read_ai_toolkit(config: dict, path: Path, notes: list[str]) -> tuple[list[dict], dict]:
    """(the job's datasets as kohya-style subsets, one per folder and size, with the trigger, preservation class
    and sample prompts they carry, and the trainer's flags from its network/train/save/sample/model sections)."""
    processes = [p for p in config.get("config", {}).get("process", []) if p.get("datasets")]
    if not processes:
        raise ValueError(f"{path}: no process with datasets under config.process: not an ai-toolkit training job")
    job = processes[0]
    train = ai_toolkit_train_flags(job, config.get("config", {}).get("name"), notes)
    extra = {}
    if trigger := job.get("trigger_word"):
        extra["caption_prefix"] = trigger
    if job.get("train", {}).get("diff_output_preservation"):
        if trigger:
            extra["preservation_class"] = job["train"].get("diff_output_preservation_class", "person")
        else:  # it replaces the trigger word by the class: without one there is nothing to replace
            train.pop("preservation_weight", None)
            notes.append("diff_output_preservation needs the job's trigger_word: left out")
    subsets = []
    for dataset in job["datasets"]:
        subset = {AI_TOOLKIT_DATASET_KEYS.get(k, k): v for k, v in dataset.items()}
        if ext := subset.pop("caption_ext", None):
            subset["caption_extension"] = ext if ext.startswith(".") else f".{ext}"
        sizes = subset.pop("resolution", 1024)
        sizes = list(dict.fromkeys(sizes if isinstance(sizes, list) else [sizes]))
        for size in sizes:  # ai-toolkit trains each size of its list: a cache each, mixed in training
            subsets.append({**subset, "resolution": size, "_sized": len(sizes) > 1, "_extra": dict(extra)})
    if prompts := ai_toolkit_prompts(job.get("sample", {}), trigger, notes):
        subsets[0]["_extra"]["validation_prompts"] = prompts  # (the trainer samples each cache's prompts once)
    return subsets, train


def ai_toolkit_network_flags(network: dict, notes: list[str]) -> dict:
    """The LoRA ai-toolkit's network section makes, with its defaults where the section sets none: alpha 1 (its
    `alpha`, then `linear_alpha`), a LoKr factor of -1, and every Linear of the main blocks (its Z-Image model's
    transformer block names: "layers"), so no refiner."""
    flags = {"adapter": network.get("type", "lora"), "lora_targets": "all", "lora_exclude_refiners": True}
    if (rank := network.get("linear", network.get("rank"))) is not None:
        flags["rank"] = rank
    flags["lora_alpha"] = network.get("linear_alpha", network.get("alpha", 1.0))
    if "linear_alpha" not in network and "alpha" not in network:
        notes.append(f"network sets no linear_alpha: ai-toolkit's default 1 is kept ({SCALE_NOTE})")
    if flags["adapter"] == "lokr":
        flags["lokr_factor"] = network.get("lokr_factor", -1)
    if network.get("transformer_only") is False:
        notes.append("network transformer_only false (the embedders adapted too): only the blocks are, here")
    if kwargs := sorted(network.get("network_kwargs") or {}):
        notes.append(f"network_kwargs {', '.join(kwargs)}: no equivalent here; see --lora_targets")
    return flags


def ai_toolkit_prompts(sample: dict, trigger: str | None, notes: list[str]) -> list[str]:
    """ai-toolkit's sample prompts as lines of ours: [trigger] stays (the precompute replaces it), each prompt's own
    size, seed and the negative prompt as --w/--h/--d/--n, and the options it takes inside a prompt (--seed, --cfg)
    as ours; the sample section's seed (and walk_seed: one more per prompt) for prompts without their own."""
    lines = []
    for i, item in enumerate(sample.get("samples", []) or [{"prompt": p} for p in sample.get("prompts", [])]):
        line = ai_toolkit_prompt_options(item["prompt"] if isinstance(item, dict) else str(item), notes)
        for key, flag in (("width", "w"), ("height", "h"), ("seed", "d")):
            if isinstance(item, dict) and item.get(key) is not None:
                line += f" --{flag} {item[key]}"
        if " --d " not in line and sample.get("seed") is not None:
            line += f" --d {int(sample['seed']) + (i if sample.get('walk_seed') else 0)}"
        negative = (item.get("neg") if isinstance(item, dict) else None) or sample.get("neg")
        lines.append(line + (f" --n {negative}" if negative else ""))
    if lines and not trigger:
        lines = [line.replace("[trigger]", "").strip() for line in lines]
    return lines


def ai_toolkit_prompt_options(prompt: str, notes: list[str]) -> str:
    """A prompt's own ai-toolkit options as ours: --seed N → --d N, --cfg G → --l G (1, no guidance there, is 0 here);
    --m (the LoRA's strength in that sample) is dropped with a note (samples use the LoRA at 1)."""

    def option(match: re.Match) -> str:
        name, value = match[1], match[2]
        if name == "seed":
            return f"--d {value}"
        if name == "cfg":
            return f"--l {value if float(value) > 1 else 0}"
        notes.append(f"sample prompt {prompt!r}: --m {value} left out (samples use the LoRA at strength 1)")
        return ""

    return " ".join(re.sub(r"--(seed|cfg|m)\s+(\S+)", option, prompt).split())


def ai_toolkit_train_flags(job: dict, name: str | None, notes: list[str]) -> dict:
    """The trainer's flags for an ai-toolkit process's network, train, save, sample and model sections."""
    flags, network, train = {}, job.get("network", {}), job.get("train", {})
    save, sample, model = job.get("save", {}), job.get("sample", {}), job.get("model", {})
    if train.get("disable_sampling"):  # (the trainer still samples once, at the end)
        sample = {}
    if model.get("name_or_path"):
        flags["pretrained_model_name_or_path"] = model["name_or_path"]
    if job.get("training_folder") and name:
        flags["output_dir"] = str(Path(job["training_folder"]) / name)
    if not network:
        notes.append("no network section (ai-toolkit would fine-tune the whole transformer): a LoRA is trained")
    elif network.get("type", "lora") in ("lora", "lokr"):
        flags |= ai_toolkit_network_flags(network, notes)
    else:
        notes.append(f"network type {network['type']!r} has no equivalent here; a LoRA is trained")
    for ours, theirs in (("train_batch_size", "batch_size"), ("max_train_steps", "steps"), ("learning_rate", "lr")):
        if theirs in train:
            flags[ours] = train[theirs]
    if accumulation := train.get("gradient_accumulation", train.get("gradient_accumulation_steps")):
        flags["gradient_accumulation_steps"] = accumulation
    if train.get("gradient_checkpointing"):
        flags["gradient_checkpointing"] = True
    if "optimizer" in train:
        if train["optimizer"] in AI_TOOLKIT_OPTIMIZERS:
            flags["optimizer"] = AI_TOOLKIT_OPTIMIZERS[train["optimizer"]]
        else:
            notes.append(f"optimizer {train['optimizer']!r} has no equivalent here: adamw is used (see --optimizer)")
    params = dict(train.get("optimizer_params") or {})
    if "weight_decay" in params:
        flags["adam_weight_decay"] = params.pop("weight_decay")
    if params:  # the optimiser's own arguments, as ai-toolkit passes them
        flags["optimizer_args"] = [f"{k}={v!r}" for k, v in params.items()]
    if train.get("lr_scheduler") in ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts"):
        flags["lr_scheduler"] = train["lr_scheduler"]
    if train.get("ema_config", {}).get("use_ema"):
        flags["ema_decay"] = train["ema_config"].get("ema_decay", 0.99)
    if train.get("diff_output_preservation"):
        flags["preservation_weight"] = train.get("diff_output_preservation_multiplier", 1.0)
    if train.get("blank_prompt_preservation"):
        flags["blank_preservation_weight"] = train.get("blank_prompt_preservation_multiplier", 1.0)
    if train.get("inverted_mask_prior"):
        flags["mask_prior_weight"] = train.get("inverted_mask_prior_multiplier", 0.5)
    if train.get("loss_type") == "mae":
        flags["loss_type"] = "l1"
    elif train.get("loss_type", "mse") != "mse":
        notes.append(f"loss_type {train['loss_type']!r} has no equivalent here: see --loss_type")
    if timesteps := train.get("timestep_type"):
        if timesteps in AI_TOOLKIT_TIMESTEPS:
            flags["timestep_sampling"] = AI_TOOLKIT_TIMESTEPS[timesteps]
        else:
            notes.append(f"timestep_type {timesteps!r} has no equivalent here: see --timestep_sampling")
    if train.get("dtype") in ("bf16", "fp16"):
        flags["mixed_precision"] = train["dtype"]
    if save.get("dtype") in AI_TOOLKIT_SAVE_DTYPES:
        flags["save_dtype"] = AI_TOOLKIT_SAVE_DTYPES[save["dtype"]]
    if "save_every" in save:
        flags["checkpointing_steps"] = save["save_every"]
    if "max_step_saves_to_keep" in save:
        flags["checkpoints_total_limit"] = save["max_step_saves_to_keep"]
    if save.get("push_to_hub"):
        flags["push_to_hub"], flags["hub_private"] = True, bool(save.get("hf_private"))
        if save.get("hf_repo_id"):
            flags["hub_model_id"] = save["hf_repo_id"]
    if "sample_every" in sample:
        flags["validation_steps"] = sample["sample_every"]
    if sample.get("width") and sample.get("height"):
        flags["validation_resolution"] = f"{sample['width']}x{sample['height']}"
    if "sample_steps" in sample:
        flags["validation_num_inference_steps"] = sample["sample_steps"]
    if "guidance_scale" in sample:  # ai-toolkit's 1 is no guidance, as in diffusers; here that is 0
        flags["validation_guidance_scale"] = sample["guidance_scale"] if sample["guidance_scale"] > 1 else 0.0
    if model.get("quantize") and str(model.get("qtype", "qfloat8")) in ("qfloat8", "float8", "fp8"):
        flags["base_precision"] = "fp8"
    if adapter := model.get("assistant_lora_path"):
        if Path(adapter).exists():
            flags["training_adapter"] = adapter
        else:
            repo, _, file = adapter.rpartition("/")
            notes.append(
                f"assistant_lora_path {adapter}: download it (hf download {repo} {file}) and pass the file as "
                "--training_adapter"
            )
    if model.get("low_vram"):
        notes.append("low_vram: use --max_memory_gb (or --blocks_to_swap) for the card's memory")
    if sample and not sample.get("skip_first_sample", train.get("skip_first_sample")):
        flags["validation_at_start"] = True  # ai-toolkit samples the untrained model first unless told not to
    sections = {"network": network, "train": train, "save": save, "sample": sample, "model": model}
    for section, keys in sections.items():
        if other := sorted(set(keys) - AI_TOOLKIT_READ[section]):
            notes.append(f"{section}: no equivalent here for {', '.join(other)}; left out")
    return flags


# kohya/musubi training arguments (a --config_file TOML) -> ours, where the name or the meaning differs
KOHYA_SAME = ("learning_rate", "lr_scheduler", "lr_warmup_steps", "max_train_steps", "train_batch_size", "seed",
              "gradient_accumulation_steps", "gradient_checkpointing", "mixed_precision", "max_grad_norm",
              "blocks_to_swap", "metadata_title", "metadata_author", "metadata_description", "metadata_license",
              "pretrained_model_name_or_path", "network_dropout")  # fmt: skip
KOHYA_RENAMED = {
    "network_dim": "rank", "network_alpha": "lora_alpha", "network_weights": "init_lora",
    "max_train_epochs": "num_train_epochs", "lr_scheduler_num_cycles": "lr_num_cycles", "lr_scheduler_power": "lr_power",
    "save_every_n_steps": "checkpointing_steps", "save_every_n_epochs": "checkpointing_epochs",
    "sample_every_n_steps": "validation_steps", "sample_every_n_epochs": "validation_epochs",
    "sample_at_first": "validation_at_start", "caption_dropout_rate": "caption_dropout", "log_with": "report_to",
    "huggingface_repo_id": "hub_model_id", "dit": "transformer_single_file",
}  # fmt: skip
KOHYA_OPTIMIZERS = {"adamw": "adamw", "adamw8bit": "adamw8bit", "prodigy": "prodigy", "adafactor": "adafactor"}
KOHYA_OPTIMIZERS["adamwschedulefree"] = "adamw_schedulefree"
# kohya's names for classes of other packages, given here by their import path (--optimizer takes any)
KOHYA_OPTIMIZERS |= {
    "lion": "lion_pytorch.Lion", "lion8bit": "bitsandbytes.optim.Lion8bit",
    "pagedlion8bit": "bitsandbytes.optim.PagedLion8bit", "pagedadamw8bit": "bitsandbytes.optim.PagedAdamW8bit",
    "radamschedulefree": "schedulefree.RAdamScheduleFree", "sgdschedulefree": "schedulefree.SGDScheduleFree",
}  # fmt: skip
KOHYA_TIMESTEPS = {"sigmoid": "logit_normal", "shift": "shift", "uniform": "uniform", "flux_shift": "flux_shift"}
KOHYA_READ = set(KOHYA_SAME) | set(KOHYA_RENAMED) | {"optimizer_type", "optimizer_args", "network_args", "output_dir"}
KOHYA_READ |= {"output_name", "save_precision", "timestep_sampling", "discrete_flow_shift", "min_timestep"}
KOHYA_READ |= {"max_timestep", "weighting_scheme", "fp8_base", "sample_prompts", "dataset_config", "network_module"}
KOHYA_READ |= {"loss_type", "huber_c", "huber_schedule"}
KOHYA_READ |= {
    "prior_loss_weight",
    "save_last_n_steps",
    "huggingface_repo_visibility",
    "unet_lr",
    "logging_dir",
    "save_model_as",
    "persistent_data_loader_workers",
}


def kohya_network_flags(config: dict, flags: dict, notes: list[str]) -> dict:
    """What a kohya / musubi training config's network keys mean that our defaults would not give: their defaults
    (network_dim 4, network_alpha 1) where the config sets one of the network keys but not these, and the modules
    musubi's Z-Image LoRA adapts (`networks.lora_zimage`: every Linear of the main blocks but the modulation)."""
    module = config.get("network_module", "")
    if not ({"network_dim", "network_alpha", "network_module"} & set(config)):
        return {}  # (the LoRA is given on the command line: nothing to go by)
    more = {}
    if "rank" not in flags:
        more["rank"] = 4
        notes.append("network_dim not set: kohya's and musubi's default 4 is kept")
    if "lora_alpha" not in flags:
        more["lora_alpha"] = 1.0
        notes.append(f"network_alpha not set: kohya's and musubi's default 1 is kept ({SCALE_NOTE})")
    if module.endswith("lora_zimage"):
        more |= {"lora_targets": "attention_ffn", "lora_exclude_refiners": True}
    elif module.endswith("networks.lokr"):  # musubi's own LoKr
        more |= {"adapter": "lokr", "lokr_factor": -1}
        notes.append(
            "network_module networks.lokr: musubi's own LoKr makes the larger Kronecker factor the full one, LyCORIS' "
            "layout (this trainer's) the smaller: trained as --adapter lokr --lokr_factor -1 (near-square factors, "
            "where the two differ least)"
        )
    elif module and not module.endswith("lycoris.kohya"):
        notes.append(f"network_module {module}: not a Z-Image LoRA module here; --lora_targets' default is used")
    return more


def key_values(pairs: list[str]) -> dict[str, str]:
    """kohya's network_args / optimizer_args ["key=value", ...] as a dict (entries without "=" left out)."""
    return {k.strip(): v.strip() for k, _, v in (p.partition("=") for p in pairs if "=" in p)}


def kohya_optimizer(optimizer_type: str | None, notes: list[str]) -> str | None:
    """kohya's optimizer_type as --optimizer: its names for the optimisers this trainer names, or for other packages'
    classes (`KOHYA_OPTIMIZERS`), and any other class by its import path as given ("came_pytorch.CAME")."""
    if not optimizer_type:
        return None
    name = optimizer_type.lower().replace(".", "").split("bitsandbytesoptim")[-1]
    if name in KOHYA_OPTIMIZERS:
        return KOHYA_OPTIMIZERS[name]
    if IMPORT_PATH.fullmatch(optimizer_type):
        notes.append(f"optimizer_type {optimizer_type}: install its package where you train (pip install ...)")
        return optimizer_type
    notes.append(f"optimizer_type {optimizer_type} has no equivalent here: adamw is used (see --optimizer)")
    return None


def kohya_train_flags(config: dict, notes: list[str]) -> dict:
    """The trainer's flags for a kohya sd-scripts / musubi-tuner training config's top-level arguments."""
    flags = {k: config[k] for k in KOHYA_SAME if k in config}
    flags |= {ours: config[theirs] for theirs, ours in KOHYA_RENAMED.items() if theirs in config}
    if "unet_lr" in config:
        flags["learning_rate"] = config["unet_lr"]
    if config.get("output_dir"):
        flags["output_dir"] = str(Path(config["output_dir"]) / config.get("output_name", ""))
    options, optimizer_options = (key_values(config.get(k, [])) for k in ("network_args", "optimizer_args"))
    flags |= kohya_network_flags(config, flags, notes)
    optimizer = kohya_optimizer(config.get("optimizer_type"), notes)
    if optimizer:
        flags["optimizer"] = optimizer
    try:
        if "loraplus_lr_ratio" in options:
            flags["loraplus_lr_ratio"] = float(options.pop("loraplus_lr_ratio"))
        for dropout in ("rank_dropout", "module_dropout"):
            if dropout in options:
                flags[dropout] = float(options.pop(dropout))
        if options.get("algo") == "lokr":
            flags["adapter"], flags["lokr_factor"] = "lokr", int(options.pop("factor", -1))  # (LyCORIS' default)
            options.pop("algo")
        if options.get("algo") in ("lora", "locon"):  # (LyCORIS' names for a plain LoRA)
            options.pop("algo")
        if options.get("dora_wd", "").lower() == "true" and flags.get("adapter") != "lokr":
            flags["adapter"] = "dora"  # (LyCORIS' DoRA: dora_wd=True with algo=lora or none)
            options.pop("dora_wd")
        if "weight_decay" in optimizer_options:
            flags["adam_weight_decay"] = float(optimizer_options.pop("weight_decay"))
        if "betas" in optimizer_options and flags.get("optimizer", "adamw") in OPTIMIZERS:  # (else the class's own)
            beta1, beta2 = (float(b) for b in optimizer_options.pop("betas").strip("()[] ").split(","))
            flags["adam_beta1"], flags["adam_beta2"] = beta1, beta2
    except ValueError as error:
        raise ValueError(
            f"network_args / optimizer_args: {error}; write them as kohya does (betas=(0.9,0.99))"
        ) from None
    if options:
        notes.append(f"network_args: no equivalent here for {', '.join(sorted(options))}")
    if optimizer_options:  # the optimiser's own arguments, as kohya passes them
        flags["optimizer_args"] = [f"{k}={v}" for k, v in optimizer_options.items()]
    if config.get("save_precision"):
        flags["save_dtype"] = {"float": "fp32"}.get(config["save_precision"], config["save_precision"])
    if timesteps := config.get("timestep_sampling"):
        if timesteps in KOHYA_TIMESTEPS:
            flags["timestep_sampling"] = KOHYA_TIMESTEPS[timesteps]
        else:
            notes.append(f"timestep_sampling {timesteps} has no equivalent here: see --timestep_sampling")
    if flags.get("timestep_sampling") == "shift" and "discrete_flow_shift" in config:
        flags["timestep_shift"] = config["discrete_flow_shift"]
    if "min_timestep" in config or "max_timestep" in config:
        flags["sigma_range"] = [config.get("min_timestep", 0) / 1000, config.get("max_timestep", 1000) / 1000]
    if config.get("weighting_scheme") in ("none", "sigma_sqrt", "cosmap"):
        flags["loss_weighting"] = config["weighting_scheme"]
    elif "weighting_scheme" in config:
        notes.append(f"weighting_scheme {config['weighting_scheme']} has no equivalent here: see --loss_weighting")
    if config.get("loss_type") in ("huber", "l1"):
        flags["loss_type"] = config["loss_type"]
        if config["loss_type"] == "huber":
            flags["huber_c"] = config.get("huber_c", 0.1)
            if config.get("huber_schedule") != "constant":  # (its default: "snr" in sd-scripts)
                notes.append(f"huber_schedule {config.get('huber_schedule', '(default)')}: here --huber_c is constant")
    elif config.get("loss_type", "l2") != "l2":
        notes.append(f"loss_type {config['loss_type']} has no equivalent here: see --loss_type")
    if config.get("fp8_base"):
        flags["base_precision"] = "fp8"
    if "prior_loss_weight" in config:  # (weighs the is_reg subsets of its dataset_config: `convert`)
        flags["_prior_loss_weight"] = float(config["prior_loss_weight"])
    if config.get("save_last_n_steps") and config.get(
        "save_every_n_steps"
    ):  # kohya keeps the saves of the last N steps
        flags["checkpoints_total_limit"] = math.ceil(config["save_last_n_steps"] / config["save_every_n_steps"])
    if flags.get("hub_model_id"):
        flags["push_to_hub"], flags["hub_private"] = True, config.get("huggingface_repo_visibility") == "private"
    if other := sorted(set(config) - KOHYA_READ - {"general", "datasets"}):
        notes.append(f"no equivalent here for {', '.join(other)}; left out")
    return flags


SCALE_NOTE = "a LoRA scale of alpha/rank; this trainer's default alpha is the rank, a scale of 1"


def read_config(path: Path, notes: list[str]) -> tuple[list[dict], dict]:
    """(kohya-style subsets, trainer flags beyond the data's) from a kohya/musubi TOML (a dataset config, or a
    training config naming one in dataset_config) or an ai-toolkit YAML."""
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            config = yaml.safe_load(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no such config") from None
        except yaml.YAMLError as error:
            raise ValueError(f"{path} is not valid YAML ({error}): fix it, or write the flags yourself") from None
        return read_ai_toolkit(config or {}, path, notes)
    config = load_toml(path)
    if "datasets" in config:
        return read_subsets(config, path), kohya_train_flags({}, notes)
    train = kohya_train_flags(config, notes)
    if not config.get("dataset_config"):
        raise ValueError(f"{path} names no image folder and no dataset_config: nothing to cache")
    dataset_path = beside(path, config["dataset_config"])
    subsets = read_subsets(load_toml(dataset_path), dataset_path)
    if config.get("sample_prompts"):  # the precompute reads the file (kohya's syntax) for the first cache
        subsets[0]["_extra"] = {"validation_prompt_file": str(beside(path, config["sample_prompts"]))}
    return subsets, train


def beside(config: Path, named: str) -> Path:
    """A file a config names: as given, or relative to the config's folder when only that is a file."""
    named = Path(named)
    if not named.is_absolute() and not named.is_file() and (config.parent / named).is_file():
        return config.parent / named
    return named


def main(args: argparse.Namespace) -> dict:
    config, notes = Path(args.config_file), []
    subsets, train_flags = read_config(config, notes)
    from_config = train_flags.pop("_prior_loss_weight", 1.0)
    args.prior_loss_weight = from_config if args.prior_loss_weight is None else args.prior_loss_weight
    if args.pretrained_model_name_or_path:
        train_flags["pretrained_model_name_or_path"] = args.pretrained_model_name_or_path
    args.pretrained_model_name_or_path = train_flags.get("pretrained_model_name_or_path")
    caches, train, more_notes = convert(subsets, args)
    train = {**train_flags, **train}
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    for path, flags in caches:
        cli.write_text_atomic(path, yaml.safe_dump(flags, sort_keys=False))
    train_config = output_dir / "train.yaml"
    cli.write_text_atomic(train_config, yaml.safe_dump(train, sort_keys=False))
    model = "" if args.pretrained_model_name_or_path else " --pretrained_model_name_or_path MODEL"
    lines = [f"{config}: {len(caches)} cache(s) to make. Next:"]
    lines += [f"  accelerate launch precompute_embeddings.py --config {shlex.quote(str(p))}{model}" for p, _ in caches]
    rest = "" if train_flags.get("max_train_steps") else "  # + the training flags (rank, learning rate, steps)"
    lines.append(
        f"  accelerate launch train_zimage_lora.py --config {shlex.quote(str(train_config))}{model}"
        + ("" if "output_dir" in train else " --output_dir my_lora")
        + rest
    )
    lines += [f"note: {n}" for n in notes + more_notes]
    print("\n".join(lines), file=sys.stdout)
    return {"precompute": caches, "train": train, "notes": notes + more_notes}


if __name__ == "__main__":
    cli.run(main, parse_args)
