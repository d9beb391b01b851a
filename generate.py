"""Images from Z-Image with one or more LoRAs, or a LoRA fused into a standalone model folder.

    python generate.py --pretrained_model_name_or_path Tongyi-MAI/Z-Image-Turbo --lora my_lora --prompt "sks person"
    python generate.py ... --lora style.safetensors:0.8 --lora face_lora:1.0 --num_images 4 --output out.png
    python generate.py ... --prompt "sks person" "sks person, oil painting" \
        --compare base my_lora/checkpoint-500 my_lora/checkpoint-1000 my_lora:0.8   # one column each, one model load
    python generate.py ... --lora my_lora --fuse_to my_fused_model        # save base + LoRA as a diffusers folder

A LoRA is a folder holding pytorch_lora_weights.safetensors or a .safetensors file in any format diffusers reads
(diffusers, ComfyUI/ai-toolkit, kohya); ":strength" after it sets its weight (default 1.0).
"""

import argparse
import time
from pathlib import Path

import torch

from zimage_utils import cli
from zimage_utils.lora_io import lora_metadata, read_lora, split_strength, trigger_of
from zimage_utils.model_loading import pin_as_needed, require_zimage, stored_dtype
from zimage_utils.sample_prompts import KNOWN_OPTIONS, image_side, parse_prompts, read_prompt_file
from zimage_utils.validation import SAMPLING_DEFAULTS, labelled_grid, model_variant, save_grid, save_png_atomic


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrained_model_name_or_path", required=True, help="Z-Image diffusers folder or hub id.")
    p.add_argument("--lora", action="append", default=[], help="LoRA folder or file, optionally PATH:STRENGTH.")
    p.add_argument(
        "--prompt",
        action="extend",
        nargs="+",
        default=None,
        help="Text prompt(s), one row of the image each (--prompt A B, or --prompt A --prompt B). Default: a photo. "
        f"A prompt may end in settings of its own, as in kohya's and musubi-tuner's sample prompts ({KNOWN_OPTIONS}: "
        "size, seed, steps, guidance, negative prompt; e.g. 'sks person --w 832 --h 1216 --d 7'); such a prompt is "
        "sampled on its own.",
    )
    p.add_argument(
        "--prompt_file",
        default=None,
        help="A text file of prompts, one per line (blank lines and lines starting with # skipped), after any "
        "--prompt: e.g. the trainer's validation prompts, or a kohya/musubi-tuner sample prompt file.",
    )
    p.add_argument(
        "--compare",
        action="extend",
        nargs="+",
        default=None,
        metavar="LORA",
        help="One column per LoRA (PATH or PATH:STRENGTH, e.g. the checkpoints of a run) or `base` (none), each "
        "sampled with the same seed and prompts and labelled: one model load for all. --lora LoRAs apply in every "
        "column.",
    )
    p.add_argument("--negative_prompt", default=None, help="Used when guidance > 0.")
    p.add_argument("--height", type=image_side, default=1024, help="Pixels, a multiple of 16.")
    p.add_argument("--width", type=image_side, default=1024, help="Pixels, a multiple of 16.")
    p.add_argument("--num_inference_steps", type=int, default=None, help="Default: 8 Turbo, 50 base.")
    p.add_argument("--guidance_scale", type=float, default=None, help="Default: 0 Turbo, 4 base.")
    p.add_argument("--num_images", type=int, default=1, help="Images per prompt (one grid PNG).")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default="sample.png", help="Image path: .png, .jpg or .webp.")
    p.add_argument(
        "--fuse_to",
        default=None,
        help="Instead of sampling: save base + LoRAs fused into this new (or empty) folder (on the CPU).",
    )
    p.add_argument(
        "--cpu_offload",
        nargs="?",
        const="layers",
        choices=["layers", "model"],
        default=None,
        help="Keep the models in host RAM, for cards that cannot hold the 8 GB text encoder and 12 GB transformer "
        "(1024² without offload peaks at 24.5 GiB). `--cpu_offload` (= layers): one block at a time visits the GPU, "
        "the next copied from pinned RAM while the current one runs (diffusers' group offloading): 2.4 GiB at 1024², "
        "1.1x the time without offload on an H200. `--cpu_offload model`: each whole model moves to the GPU only "
        "while it runs (diffusers' model offload): 12.1 GiB, 5.2x the time (docs/BENCHMARKS.md).",
    )
    return cli.parse_with_config(p, input_args)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


BASE = "base"  # --compare's column without a LoRA
DEFAULT_PROMPT = "a photo"


def read_specs(flag: str, specs: list[str], states: dict) -> list[tuple[str, float]]:
    """PATH[:STRENGTH] specs as (path, strength), each LoRA read once (a Z-Image LoRA that is there) into `states`
    (path → what read_lora read); `--compare`'s "base" stays as it is."""
    loras = []
    for spec in specs:
        if flag == "--compare" and spec == BASE:
            loras.append((BASE, 1.0))
            continue
        path, strength = split_strength(spec, flag)
        states[path] = read_lora(path)
        loras.append((path, strength))
    return loras


def check_args(args: argparse.Namespace) -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
    """The mistakes found before the pipeline loads (minutes for the real model): each --lora and --compare LoRA
    read once (into `args.lora_states`, what `load_lora` loads), --prompt_file (its prompts join `args.prompt`),
    --fuse_to, --num_images and --output. Returns the LoRAs and --compare's columns as (path, strength)."""
    args.lora_states = {}
    loras = read_specs("--lora", args.lora, args.lora_states)
    columns = read_specs("--compare", args.compare or [], args.lora_states)
    args.prompts = parse_prompts(args.prompt or ([] if args.prompt_file else [DEFAULT_PROMPT]), "--prompt")
    if args.prompt_file:
        lines = read_prompt_file(args.prompt_file)
        args.prompt = (args.prompt or []) + lines
        args.prompts += parse_prompts(lines, f"--prompt_file {args.prompt_file}")
    for path, _ in [] if args.fuse_to else loras + columns:  # a note, not an error: a prompt without it is a fair test
        trigger = trigger_of(lora_metadata(path)) if path != BASE else ""
        words = [t.strip().lower() for t in trigger.split(",") if t.strip()]  # (several caches: "sks, ohwx")
        lacking = [str(i) for i, p in enumerate(args.prompts, 1) if not any(w in p.text.lower() for w in words)]
        if words and lacking:
            print(f"note: {path} was trained with the trigger '{trigger}', which prompt {', '.join(lacking)} lacks")
    if columns and (args.fuse_to or args.num_images != 1):
        raise ValueError("--compare samples one image per prompt and column: drop --fuse_to and --num_images")
    if args.fuse_to:
        target = Path(args.fuse_to)
        if not args.lora:
            raise ValueError("--fuse_to writes the base model with LoRAs fused in: give at least one --lora")
        if target.exists() and (not target.is_dir() or any(target.iterdir())):
            raise ValueError(
                f"--fuse_to {target} exists and is not an empty folder: give a new folder (a model there, the base "
                "included, is never written over)"
            )
        return loras, columns
    if args.num_images < 1:
        raise ValueError(f"--num_images {args.num_images}: give 1 or more")
    output = Path(args.output)
    if output.is_dir() or output.suffix.lower() not in IMAGE_SUFFIXES:
        raise ValueError(f"--output {output}: give an image file name ending in {', '.join(IMAGE_SUFFIXES)}")
    return loras, columns


def column_label(path: str, strength: float) -> str:
    """A --compare column's label: the LoRA's folder or file name (a checkpoint-N, not pytorch_lora_weights), and its
    strength when not 1."""
    name = Path(path).parent.name if Path(path).name.startswith("pytorch_lora_weights") else Path(path).name
    return name + (f" x{strength:g}" if strength != 1 else "")


def offload_in_layers(pipe, device: str) -> None:
    """Group offloading a block at a time for the transformer and the text encoder (their ModuleLists of blocks and
    layers), the VAE whole: on CUDA from pinned host RAM, the next group copied on a side stream while one runs.
    Pinned up front only where free host RAM holds a second copy of the weights (20 GB more for Z-Image)."""
    low_ram = pin_as_needed(pipe.transformer, pipe.text_encoder, pipe.vae)
    if low_ram and device == "cuda":
        print(
            "--cpu_offload layers: too little free host RAM to pin a copy of the models up front; pinning each "
            "block as it moves (slower)"
        )
    pipe.enable_group_offload(
        onload_device=torch.device(device),
        offload_type="block_level",
        num_blocks_per_group=1,
        use_stream=device == "cuda",
        low_cpu_mem_usage=low_ram,
    )


def load_lora(pipe, path: str, state: dict, name: str) -> None:
    """The LoRA at `path` into `pipe` as adapter `name`: `state`, what read_lora read in check_args, so that a layout
    diffusers misreads (PEFT's own names, alpha in metadata, LyCORIS names) samples as it reads in lora_tools.py and
    --init_lora. What diffusers still cannot load (e.g. a LoKr whose factors no one decompose factor gives) is named."""
    try:
        pipe.load_lora_weights(dict(state), adapter_name=name)  # (a copy: diffusers may pop keys from it)
    except (ValueError, RuntimeError, TypeError, NotImplementedError) as error:
        if isinstance(error, torch.OutOfMemoryError):
            raise
        reason = (str(error).strip().splitlines() or [""])[0]
        raise ValueError(
            f"LoRA {path} was read, but diffusers could not load it ({type(error).__name__}: {reason})"
        ) from error


def main(args: argparse.Namespace) -> None:
    from diffusers import ZImagePipeline

    require_zimage(args.pretrained_model_name_or_path)
    loras, columns = check_args(args)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if args.fuse_to:  # the fused model keeps each component's stored dtype, on any machine
        stored = {
            c: stored_dtype(args.pretrained_model_name_or_path, c) for c in ("transformer", "vae", "text_encoder")
        }
        dtype = {c: d for c, d in stored.items() if d is not None}
    pipe = ZImagePipeline.from_pretrained(args.pretrained_model_name_or_path, dtype=dtype)
    names, weights = [], []
    for i, (path, strength) in enumerate(loras):
        load_lora(pipe, path, args.lora_states[path], f"lora_{i}")
        names.append(f"lora_{i}")
        weights.append(strength)
    for j, (path, _) in enumerate(columns):
        if path != BASE:
            load_lora(pipe, path, args.lora_states[path], f"compare_{j}")
    if names:
        pipe.set_adapters(names, weights)
    if args.fuse_to:
        pipe.fuse_lora(adapter_names=names)
        pipe.unload_lora_weights()
        pipe.save_pretrained(args.fuse_to)
        print(f"fused model written to {args.fuse_to}")
        return
    # Several images decode one at a time (the same pictures): a 1024² bf16 decode adds ~2.4 GiB per image in one
    # batch (docs/BENCHMARKS.md, session 13)
    pipe.vae.enable_slicing()
    if args.cpu_offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif args.cpu_offload == "layers":
        offload_in_layers(pipe, device)
    else:
        pipe.to(device)
    defaults = SAMPLING_DEFAULTS[model_variant(args.pretrained_model_name_or_path)]
    guidance = defaults["guidance"] if args.guidance_scale is None else args.guidance_scale
    prompts = args.prompts
    steps = args.num_inference_steps or defaults["steps"]

    def sample() -> list:  # prompt by prompt, num_images each, from the same noise every call
        if not any(p.options() for p in prompts):  # one batch
            return pipe(
                prompt=[p.text for p in prompts],
                negative_prompt=[args.negative_prompt] * len(prompts)
                if guidance > 0 and args.negative_prompt
                else None,
                height=args.height,
                width=args.width,
                num_inference_steps=steps,
                guidance_scale=guidance,
                num_images_per_prompt=args.num_images,
                generator=torch.Generator(device=device).manual_seed(args.seed),
            ).images
        images = []
        for p in prompts:  # the prompts' own settings: one call each
            height, width = p.size((args.height, args.width))
            scale = guidance if p.guidance is None else p.guidance
            negative = p.negative or args.negative_prompt
            images += pipe(
                prompt=[p.text],
                negative_prompt=[negative] if scale > 0 and negative else None,
                height=height,
                width=width,
                num_inference_steps=p.steps or steps,
                guidance_scale=scale,
                num_images_per_prompt=args.num_images,
                generator=torch.Generator(device=device).manual_seed(args.seed if p.seed is None else p.seed),
            ).images
        return images

    start = time.perf_counter()
    if not columns:
        images = sample()
        print(sampling_report(len(images), time.perf_counter() - start, device))
        print(f"image written to {save_grid(images, args.output, columns=args.num_images)}")
        return
    grid = []
    for j, (path, strength) in enumerate(columns):
        active = (names, weights) if path == BASE else (names + [f"compare_{j}"], weights + [strength])
        if active[0]:
            pipe.enable_lora()
            pipe.set_adapters(*active)
        else:
            pipe.disable_lora()
        grid.append(sample())
    print(sampling_report(len(prompts) * len(columns), time.perf_counter() - start, device))
    image = labelled_grid(grid, [BASE if p == BASE else column_label(p, s) for p, s in columns])
    print(f"image written to {save_png_atomic(image, args.output)} (prompts x --compare)")


def sampling_report(num_images: int, seconds: float, device: str) -> str:
    """How long sampling took (prompt encoding and decoding included, loading not) and, on CUDA, the peak GPU memory
    since the start (what a smaller card must hold)."""
    line = f"sampled {num_images} image(s) in {seconds:.2f} s"
    if device == "cuda":
        gib = 2**30
        line += (
            f"; peak GPU memory {torch.cuda.max_memory_allocated() / gib:.2f} GiB allocated, "
            f"{torch.cuda.max_memory_reserved() / gib:.2f} GiB reserved"
        )
    return line


if __name__ == "__main__":
    cli.run(main, parse_args)
