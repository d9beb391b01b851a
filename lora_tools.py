"""Edit Z-Image LoRA files without loading the model (seconds, on a CPU): convert a LoRA to our two files, shrink its
rank, merge several LoRAs into one, or show what a LoRA holds. And extract a LoRA from a fine-tuned model.

    python lora_tools.py convert kohya_or_comfyui_lora.safetensors --output_dir my_lora     # any layout diffusers reads
    python lora_tools.py resize my_lora --rank 16 --output_dir my_lora_r16                  # the best rank-16 LoRA
    python lora_tools.py resize my_lora --keep 0.95 --output_dir my_lora_small   # per module, 95% of its update kept
    python lora_tools.py merge style.safetensors:0.7 my_lora:1.0 --output_dir merged        # exactly both, one file
    python lora_tools.py show my_lora      # layout, modules, ranks, the rank each module needs, the metadata
    python lora_tools.py extract finetune.safetensors --base Tongyi-MAI/Z-Image-Turbo --rank 64 --output_dir ft_lora

convert, resize and merge each write what the trainer writes: pytorch_lora_weights.safetensors (diffusers: `load_lora_weights(folder)`) and
pytorch_lora_weights_comfyui.safetensors (ComfyUI), with the source's metadata (base model, trigger word, ...), which
--metadata_title / _author / _description / _license and --trigger override, and the SAI model spec's keys.
A LoRA is a folder holding pytorch_lora_weights.safetensors or a .safetensors file in any format diffusers reads
(ours, ComfyUI/ai-toolkit, kohya/musubi-tuner); ":weight" after it scales it in a merge (negative subtracts).
Sizes: `resize` keeps, in each module, the largest singular values of the update B @ A: at --rank r that is the
closest rank-r update there is (its loss is printed as the fraction of each update's norm kept). A merge adds the
updates exactly (the ranks add up) unless --rank or --keep shrink the sum the same way. `extract` loads the
fine-tune (host memory: one model) and reads the base's weights one at a time, and takes each targeted Linear's
weight difference the same way:
at --rank r its best rank-r part (a randomized SVD, minutes on a CPU), with --keep a full SVD of each (much slower
on a CPU; --device cuda). What a LoRA cannot hold (biases, norms, embedders, untargeted Linears) is reported.
"""

import argparse
import collections
import functools
import re
from pathlib import Path

import safetensors
import torch
from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY

from zimage_utils import cli
from zimage_utils.lora import MAGNITUDE, REFINER_PREFIXES, lora_target_modules
from zimage_utils.lora_edit import extract, factors_state_dict, lora_factors, merge, rank_for, resize, update_svd
from zimage_utils.lora_io import (
    COMFYUI_WEIGHT_NAME,
    LORA_FORMATS,
    LORA_WEIGHT_NAME,
    SAVE_DTYPES,
    load_lora_file,
    lora_file,
    lora_metadata,
    read_lora,
    save_lora_state,
    split_strength,
)
from zimage_utils.model_loading import (
    SAFETENSORS_DTYPES,
    component_weight_files,
    load_transformer,
    require_zimage,
    stored_dtype,
)
from zimage_utils.model_spec import (
    HASH_KEY,
    THUMBNAIL_KEY,
    TITLE_KEY,
    add_metadata_flags,
    file_hash,
    given_metadata,
    model_spec,
)

KEEP_LEVELS = (0.9, 0.95, 0.99)
# Metadata that describes a file's layout, not what was trained: written anew for the output.
LAYOUT_METADATA = ("format", "lora_format", "lora_alpha_folded", LORA_ADAPTER_METADATA_KEY, "rank", "alpha")


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    tools = parser.add_subparsers(dest="tool", required=True, metavar="{convert,resize,merge,extract,show}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--output_dir", required=True, help="Folder for the two LoRA files (created if missing).")
    common.add_argument(
        "--save_dtype",
        choices=sorted(SAVE_DTYPES),
        default=None,
        help="Dtype of the written weights. Default: the source's (the widest of a merge's).",
    )
    common.add_argument(
        "--formats",
        nargs="+",
        choices=LORA_FORMATS,
        default=list(LORA_FORMATS),
        help="Which of the two files to write (default both).",
    )
    common.add_argument("--overwrite", action="store_true", help="Replace LoRA files already in --output_dir.")
    add_metadata_flags(common)  # --metadata_title, --metadata_author, --metadata_description, --metadata_license
    common.add_argument(
        "--trigger",
        default=None,
        help="The LoRA's trigger phrase, for its files (LoRA browsers show it; generate.py notes a prompt without it). "
        "Default: the source's.",
    )
    sizes = argparse.ArgumentParser(add_help=False)
    sizes.add_argument("--rank", type=int, default=None, help="At most this rank in every module.")
    sizes.add_argument(
        "--keep",
        type=float,
        default=None,
        help="In each module, the smallest rank whose update keeps this fraction (0-1] of the full update's "
        "Frobenius norm (kohya's sv_fro). With --rank too: whichever is smaller.",
    )
    convert = tools.add_parser("convert", parents=[common], help="Any LoRA layout diffusers reads → our two files.")
    convert.add_argument("lora", help="LoRA folder or .safetensors file.")
    shrink = tools.add_parser("resize", parents=[common, sizes], help="A smaller rank, by SVD of each update.")
    shrink.add_argument("lora", help="LoRA folder or .safetensors file.")
    combine = tools.add_parser("merge", parents=[common, sizes], help="Several LoRAs as one: Σ weight · update.")
    combine.add_argument("loras", nargs="+", metavar="LORA[:WEIGHT]", help="Two or more LoRAs, each with a weight.")
    pull = tools.add_parser(
        "extract", parents=[common, sizes], help="A LoRA from a fine-tuned model: the SVD of each Linear's difference."
    )
    pull.add_argument(
        "tuned",
        help="The fine-tuned transformer: a Z-Image model folder or hub id, or a .safetensors checkpoint of the "
        "transformer alone (ComfyUI / original or diffusers keys).",
    )
    pull.add_argument(
        "--base", required=True, help="The model it was tuned from: a Z-Image folder or hub id (e.g. Z-Image-Turbo)."
    )
    pull.add_argument(
        "--targets",
        default="all",
        help="The Linears the LoRA adapts, as the trainer's --lora_targets (default all: every block Linear).",
    )
    pull.add_argument("--device", default=None, help="Where the SVDs run. Default: cuda when there is a GPU.")
    look = tools.add_parser("show", help="What a LoRA file holds, and the rank each module needs (nothing written).")
    look.add_argument("lora", help="LoRA folder or .safetensors file.")
    args = parser.parse_args(input_args)
    if args.tool in ("resize", "extract") and args.rank is None and args.keep is None:
        parser.error(f"{args.tool} needs --rank R, --keep F or both")
    if getattr(args, "rank", None) is not None and args.rank < 1:
        parser.error(f"--rank {args.rank}: give 1 or more")
    if getattr(args, "keep", None) is not None and not 0 < args.keep <= 1:
        parser.error(f"--keep {args.keep}: give a fraction in (0, 1], e.g. 0.95")
    if args.tool == "merge" and len(args.loras) < 2:
        parser.error("merge needs two or more LoRAs (resize shrinks one)")
    return args


def source_metadata(path: str) -> dict[str, str]:
    """What the LoRA at `path` (file or folder) says about its training, without its layout's keys; {} for a hub id
    or a file without metadata."""
    return {k: v for k, v in lora_metadata(path).items() if k not in LAYOUT_METADATA}


def check_output_dir(args: argparse.Namespace) -> None:
    cli.check_output_dir(args.output_dir)
    names = {"diffusers": LORA_WEIGHT_NAME, "comfyui": COMFYUI_WEIGHT_NAME}
    there = [names[f] for f in args.formats if (Path(args.output_dir) / names[f]).exists()]
    if there and not args.overwrite:
        raise ValueError(f"--output_dir {args.output_dir} already holds {there[0]}: give a new folder, or --overwrite")


def rank_text(ranks: list[int]) -> str:
    return str(ranks[0]) if min(ranks) == max(ranks) else f"{min(ranks)}-{max(ranks)}"


def report_resize(report: dict, what: str = "update") -> str:
    """One line: ranks before → after, the part of each update (or difference) kept: mean, and the module that kept
    least."""
    old, new = [r[0] for r in report.values()], [r[1] for r in report.values()]
    worst = min(report, key=lambda m: report[m][2])
    mean_kept = sum(r[2] for r in report.values()) / len(report)
    return (
        f"{len(report)} modules, rank {rank_text(old)} → {rank_text(new)} (mean {sum(new) / len(new):.1f}); "
        f"{what} norm kept: mean {mean_kept:.1%}, least {report[worst][2]:.1%} ({worst})"
    )


def layout_of(keys: list[str]) -> str:
    if any(k.startswith("lora_unet_") for k in keys):
        return "kohya / musubi-tuner (lora_unet_..., lora_down / lora_up, alpha)"
    if any(k.startswith("diffusion_model.") for k in keys):
        return "ComfyUI / ai-toolkit (diffusion_model.<module>, alpha)"
    if any(k.startswith("transformer.") for k in keys):
        return "diffusers (transformer.<module>)"
    return "another layout diffusers converts"


def module_kind(name: str) -> str:
    for part, kind in ((".attention.", "attention"), (".feed_forward.", "feed-forward"), ("adaLN", "adaLN")):
        if part in name:
            return kind
    return name.split(".")[0]


def describe(path: str) -> str:
    """`show`: a LoRA's layout, dtype and size, its modules by kind and their ranks, the rank each module needs to
    keep 90 / 95 / 99% of its update (what `resize --keep` would give it), and the metadata it carries."""
    state = read_lora(path)  # (first: it names what is wrong with a damaged file)
    file = lora_file(path)
    raw, metadata = load_lora_file(file)
    lokr, dora = any(".lokr_" in k for k in state), any(k.endswith(MAGNITUDE) for k in state)
    modules = sorted({k.removeprefix("transformer.").rsplit(".lora_" if not lokr else ".lokr_", 1)[0] for k in state})
    kinds = collections.Counter(module_kind(m) for m in modules)
    refiners = sum(m.startswith(REFINER_PREFIXES) for m in modules)
    dtypes = sorted({str(v.dtype).removeprefix("torch.") for k, v in raw.items() if not k.endswith(".alpha")})
    lines = [
        f"{file}: {'LoKr' if lokr else 'DoRA' if dora else 'LoRA'}, {len(modules)} modules, {', '.join(dtypes)}, "
        f"{file.stat().st_size / 2**20:.1f} MiB",
        f"  layout: {layout_of(list(raw))}",
        f"  modules: {', '.join(f'{kind} {n}' for kind, n in kinds.most_common())} ({refiners} in the refiners)",
    ]
    if not lokr:  # (a DoRA's factors: its update before the norms)
        factors = lora_factors({k: v for k, v in state.items() if not k.endswith(MAGNITUDE)}, path)
        lines.append(f"  rank: {rank_text(sorted(down.shape[0] for _, down in factors.values()))}")
        spectra = [update_svd(up, down)[1] for up, down in factors.values()]
        for keep in KEEP_LEVELS:
            needed = sorted(rank_for(s, None, keep) for s in spectra)
            lines.append(
                f"  rank needed to keep {keep:.0%} of each update: median {needed[len(needed) // 2]}, "
                f"most {needed[-1]} (resize --keep {keep})"
            )
    shown = {k: v for k, v in metadata.items() if k != LORA_ADAPTER_METADATA_KEY}  # (diffusers' config: rank, modules)
    if THUMBNAIL_KEY in shown:  # an image as text: its kind and size, not the text
        shown[THUMBNAIL_KEY] = f"{shown[THUMBNAIL_KEY].split(';')[0]} ({len(shown[THUMBNAIL_KEY]) / 1024:.1f} kB)"
    order = sorted(shown, key=lambda k: (not k.startswith("modelspec."), k))  # (a file keeps no order) the spec first
    lines += ["  metadata:" if shown else "  metadata: none"] + [f"    {k}: {shown[k]}" for k in order]
    if HASH_KEY in metadata:
        whole = file_hash(file) == metadata[HASH_KEY]
        lines.append(f"  {HASH_KEY}: {'matches the tensors' if whole else 'does NOT match: the file is damaged'}")
    return "\n".join(lines)


def size_flags(args: argparse.Namespace) -> str:
    """ " --rank R --keep F" as given, for the output's `lora_tools` metadata."""
    return "".join(f" --{k} {getattr(args, k)}" for k in ("rank", "keep") if getattr(args, k, None))


def checkpoint_dtype(path: str) -> torch.dtype:
    """The dtype a transformer checkpoint (folder / hub id, or one .safetensors file) stores its weights in."""
    if not path.endswith(".safetensors"):
        return stored_dtype(path, "transformer") or torch.bfloat16
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    with safetensors.safe_open(path, "pt") as f:
        # (a ComfyUI all-in-one file also holds the VAE and text encoder: only the transformer's keys count)
        keys = [k for k in f.keys() if k.startswith("model.diffusion_model.")] or list(f.keys())
        stored = {f.get_slice(k).get_dtype() for k in keys}
    if any(name.startswith("F8") for name in stored):
        raise ValueError(f"{path} stores fp8 weights: extract from the bf16 or fp16 release of that fine-tune")
    dtypes = [SAFETENSORS_DTYPES[name] for name in stored if name in SAFETENSORS_DTYPES]
    return functools.reduce(torch.promote_types, dtypes) if dtypes else torch.bfloat16


def extracted(args: argparse.Namespace) -> tuple[dict, dict[str, str], str, torch.dtype]:
    """`extract`: (the LoRA's factors, its metadata, a summary, the fine-tune's dtype). Only the fine-tune is loaded
    (host memory: one model, 12 GB in bf16); the base's weights are read one at a time from its files. Each
    difference goes to --device in float32 for its SVD, so none is rounded."""
    single = args.tuned.endswith(".safetensors")
    require_zimage(args.base)
    if not single:
        require_zimage(args.tuned)
    dtype = checkpoint_dtype(args.tuned)
    print(f"loading {args.tuned} ({str(dtype).removeprefix('torch.')}); {args.base}'s weights are read one by one")
    tuned = load_transformer(args.base if single else args.tuned, dtype, single_file=args.tuned if single else None)
    tuned_weights, files = tuned.state_dict(), component_weight_files(args.base, "transformer")
    if not files:
        raise ValueError(f"{args.base} holds no safetensors transformer weights (pickle files are not read)")
    base_shapes = {}
    for file in set(files.values()):
        with safetensors.safe_open(str(file), "pt") as f:
            base_shapes |= {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    if base_shapes != {n: tuple(w.shape) for n, w in tuned_weights.items()}:
        raise ValueError(
            f"{args.tuned} is not shaped as {args.base} (other layers or sizes): give as --base the model it was "
            "fine-tuned from"
        )
    modules = lora_target_modules(tuned, args.targets)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    def difference(name: str) -> torch.Tensor:  # tuned − base, float32 on `device`
        with safetensors.safe_open(str(files[name]), "pt") as f:
            return tuned_weights[name].to(device, torch.float32) - f.get_tensor(name).to(device, torch.float32)

    lora, report = extract(((m, difference(f"{m}.weight")) for m in modules), args.rank, args.keep)
    old_ranks = {module: min(tuned_weights[f"{module}.weight"].shape) for module in report}
    lines = [report_resize({m: (old_ranks[m], k, kept) for m, (k, kept) in report.items()}, "difference")]
    if len(lora) < len(modules):
        lines.append(f"{len(modules) - len(lora)} of the {len(modules)} targeted modules equal the base's: left out")
    targeted = {f"{module}.weight" for module in modules}
    changed = {}
    for name, weight in tuned_weights.items():
        if name not in targeted and (delta := difference(name)).any():  # (relative to the base: tuned − delta)
            base = weight.to(delta.device, torch.float32) - delta
            changed[name] = float(torch.linalg.vector_norm(delta) / torch.linalg.vector_norm(base))
    if changed:
        most = max(changed, key=changed.get)
        lines.append(
            f"note: {len(changed)} other tensors differ from the base (the most: {most}, by {changed[most]:.1%} of its "
            f"norm); a LoRA holds only the targeted Linears' weights (--targets {args.targets}), so these stay the base's"
        )
    tool = f"extract {Path(args.tuned).name} --base {args.base}{size_flags(args)}"
    description = f"{Path(args.tuned).name}'s difference to {args.base}, as a LoRA (lora_tools.py extract)."
    metadata = {"base_model": args.base, "lora_tools": tool} | model_spec(
        Path(args.output_dir).name, description=description
    )
    return lora, metadata, "\n".join(lines), dtype


def edited(args: argparse.Namespace) -> tuple[dict, dict[str, str], str, torch.dtype]:
    """`convert`, `resize`, `merge`: (the LoRA's factors, its metadata, a summary, the dtype to save)."""
    specs = [split_strength(spec, "merge") for spec in args.loras] if args.tool == "merge" else [(args.lora, 1.0)]
    # every LoRA read, and refused if it is not a whole plain LoRA, before anything is written
    factors = [(lora_factors(read_lora(path), path), weight) for path, weight in specs]
    dtypes = [t.dtype for lora, _ in factors for pair in lora.values() for t in pair]
    dtype = functools.reduce(torch.promote_types, dtypes)
    sources = [source_metadata(path) for path, _ in specs]
    metadata, others = sources[0], sources[1:]
    titles = [m.get(TITLE_KEY) or Path(p).name.removesuffix(".safetensors") for m, (p, _) in zip(sources, specs)]
    # A converted LoRA keeps its title; a resized or merged one is a new LoRA, named for its folder.
    title = metadata.get(TITLE_KEY) if args.tool == "convert" else None
    spec = model_spec(title or Path(args.output_dir).name, merged_from=", ".join(titles) if len(specs) > 1 else "")
    if args.tool == "merge":
        lora = merge(factors)
        bases = sorted({m["base_model"] for m in [metadata, *others] if m.get("base_model")})
        if len(bases) > 1:
            print(f"note: the LoRAs were trained on different base models ({', '.join(bases)})")
        metadata = {k: v for k, v in metadata.items() if all(other.get(k) == v for other in others)}
        metadata["lora_tools"] = "merge " + " + ".join(f"{w:g} × {Path(p).name}" for p, w in specs)
    else:
        lora = factors[0][0]
        metadata["lora_tools"] = f"{args.tool} {Path(args.lora).name}"
    summary = f"{len(lora)} modules, rank {rank_text([down.shape[0] for _, down in lora.values()])}"
    if getattr(args, "rank", None) is not None or getattr(args, "keep", None) is not None:
        lora, report = resize(lora, args.rank, args.keep)
        summary = report_resize(report)
        metadata["lora_tools"] += size_flags(args)
    return lora, metadata | spec, summary, dtype


def main(args: argparse.Namespace) -> None:
    if args.tool == "show":
        print(describe(args.lora))
        return
    check_output_dir(args)
    lora, metadata, summary, dtype = (extracted if args.tool == "extract" else edited)(args)
    metadata |= given_metadata(args)
    if args.trigger:  # (ours and the spec's key: generate.py and LoRA browsers read either)
        old = metadata.get("trigger_word") or metadata.get("modelspec.trigger_phrase")
        metadata |= {"trigger_word": args.trigger, "modelspec.trigger_phrase": args.trigger}
        if old and "modelspec.usage_hint" in metadata:  # ("...; start the prompt with 'sks'", as the trainer writes)
            metadata["modelspec.usage_hint"] = metadata["modelspec.usage_hint"].replace(
                f"'{old}'", f"'{args.trigger}'"
            )
    dtype = SAVE_DTYPES[args.save_dtype] if args.save_dtype else dtype
    metadata["rank"] = rank_text([down.shape[0] for _, down in lora.values()])
    if "modelspec.description" in metadata and not args.metadata_description:  # (the trainer's names the rank)
        description = re.sub(r"\(rank [^,)]+", f"(rank {metadata['rank']}", metadata["modelspec.description"], count=1)
        metadata["modelspec.description"] = description
    paths = save_lora_state(args.output_dir, factors_state_dict(lora), metadata, args.formats, dtype)
    print(summary)
    for path in paths.values():
        print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB, {str(dtype).removeprefix('torch.')})")


if __name__ == "__main__":
    cli.run(main, parse_args)
