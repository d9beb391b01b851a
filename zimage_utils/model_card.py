"""OUTPUT/README.md: a Hugging Face model card for the trained LoRA, what the hub shows when the output folder is
uploaded (`--push_to_hub`, or `hf upload`): how to load it in diffusers and ComfyUI, its trigger words, the validation
samples, and the settings it was trained with. The YAML header (base model, tags, instance prompt, widget) is what
the hub indexes; diffusers' `populate_model_card` adds its tags.
"""

import os
from pathlib import Path

from .model_spec import model_spec
from .validation import SAMPLING_DEFAULTS, model_variant

CARD_NAME = "README.md"
ADAPTER_NAMES = {"lora": "LoRA", "lokr": "LoKr", "dora": "DoRA"}  # --adapter → what cards and descriptions say
MARKER = "<!-- written by train_zimage_lora.py: it rewrites this file after each run -->"


def _is_hub_id(name: str) -> bool:
    # The hub rejects a local path as base_model; "org/name" that is not a folder here is taken for a hub id.
    return name.count("/") == 1 and not Path(name).exists()


def training_metadata(args, targets: list[str], step: int, caches: dict) -> dict[str, str]:
    """The LoRA files' safetensors metadata (str → str): what was trained, on what and how, for users' tools and the
    model card, and the SAI model spec's keys for LoRA browsers. `args`: the trainer's flags; `targets`: the adapted
    module names; `caches`: `load_caches`' summary."""
    base, trigger = args.pretrained_model_name_or_path, ", ".join(caches["caption_prefixes"])
    sampling = SAMPLING_DEFAULTS[model_variant(base)]
    cfg = f"CFG {sampling['guidance']:g}" if sampling["guidance"] > 1 else "no CFG"
    adapter = ADAPTER_NAMES[args.adapter]
    spec = model_spec(
        f"{args.metadata_title or Path(args.output_dir).name}, step {step}",
        resolution=max(caches["resolutions"]),
        trigger_phrase=trigger,
        usage_hint=f"{sampling['steps']} steps, {cfg}" + (f"; start the prompt with '{trigger}'" if trigger else ""),
        description=args.metadata_description
        or f"Z-Image {adapter} (rank {args.rank}, {args.lora_targets}) for {base}, trained with train_zimage_lora.py "
        f"for {step} steps.",
        author=args.metadata_author or "",
        license=args.metadata_license or "",
    )
    return spec | {
        "base_model": args.pretrained_model_name_or_path,
        "adapter": args.adapter,
        "rank": str(args.rank),
        "alpha": str(args.lora_alpha or args.rank),
        "targets": args.lora_targets,
        "target_modules": ",".join(targets),
        "steps": str(step),
        "resolution": ",".join(map(str, caches["resolutions"])),
        "trigger_word": ", ".join(caches["caption_prefixes"]),
        "training_adapter": args.training_adapter or "",
        "init_lora": args.init_lora or "",
        "ema_decay": str(args.ema_decay),
        "optimizer": args.optimizer,
        "learning_rate": str(args.learning_rate),
        "loraplus_lr_ratio": str(args.loraplus_lr_ratio),
        "lr_scheduler": args.lr_scheduler,
        "lr_warmup_steps": str(args.lr_warmup_steps),
        "timestep_sampling": args.timestep_sampling,
        "sigma_range": ",".join(map(str, args.sigma_range)),
    }


def write_model_card(
    output_dir: str | Path,
    metadata: dict[str, str],
    prompts: list[str],
    repo_id: str | None = None,
    about: dict[str, str | None] | None = None,
) -> Path | None:
    """Write OUTPUT/README.md (to a temporary name, then renamed) and return its path; None, writing nothing, when a
    README.md that this function did not write is already there (the user's own is never replaced).

    Args:
        output_dir: the run's output folder, holding the LoRA files (and samples/grid.png when there are prompts).
        metadata: the LoRA files' safetensors metadata (`base_model`, `rank`, `steps`, `trigger_word`, ...).
        prompts: the validation prompts the samples were drawn with (may be empty).
        repo_id: the hub repo the folder is uploaded to (`--push_to_hub`), for the loading example.
        about: the user's "title", "description" and "license" (`--metadata_*`); a missing or None one is left out
            (the title: the folder's name).
    """
    from diffusers.utils.hub_utils import populate_model_card
    from huggingface_hub import ModelCard, ModelCardData

    output_dir = Path(output_dir)
    path = output_dir / CARD_NAME
    if path.exists() and MARKER not in path.read_text(encoding="utf-8", errors="replace"):
        return None
    base, trigger = metadata["base_model"], metadata.get("trigger_word", "")
    sampling = SAMPLING_DEFAULTS[model_variant(base)]
    prompt = prompts[0] if prompts else (trigger or "a photo")
    adapter = ADAPTER_NAMES.get(metadata.get("adapter", "lora"), "LoRA")
    about = {k: v for k, v in (about or {}).items() if v}
    data = ModelCardData(
        license=about.get("license"),
        library_name="diffusers",
        base_model=base if _is_hub_id(base) else None,
        instance_prompt=trigger or None,
        widget=[{"text": p, "output": {"url": "samples/grid.png"}} for p in prompts[:1]] or None,
    )
    shown = {k: v for k, v in metadata.items() if v and k != "target_modules" and not k.startswith("modelspec.")}
    rows = "\n".join(f"| `{k}` | {v} |" for k, v in shown.items())
    samples = (
        "\n## Validation samples\n\n![validation samples, prompts × steps](samples/grid.png)\n" if prompts else ""
    )
    description = f"\n{about['description']}\n" if "description" in about else ""
    load = f'"{repo_id}")' if repo_id else '"path/to/this/folder")  # or its hub id'  # (the comment after the call)
    body = f"""{MARKER}

# {about.get("title", output_dir.name)}
{description}
A Z-Image {adapter} for `{base}`, trained for {metadata.get("steps", "?")} steps at {metadata.get("resolution", "?")} px.
{f"Trigger words: `{trigger}` (start the prompt with them)." if trigger else "No trigger word."}

## Use it

diffusers:

```python
import torch
from diffusers import ZImagePipeline

pipe = ZImagePipeline.from_pretrained("{base}", dtype=torch.bfloat16).to("cuda")
pipe.load_lora_weights({load}
image = pipe({prompt!r}, num_inference_steps={sampling["steps"]}, guidance_scale={sampling["guidance"]}).images[0]
```

ComfyUI: copy `pytorch_lora_weights_comfyui.safetensors` to `ComfyUI/models/loras/` and load it with a
*LoraLoaderModelOnly* node on the Z-Image model (not a bypass LoRA loader: it skips Z-Image's `to_q`/`to_k`/`to_v`).
{samples}
## Training settings

| setting | value |
|---|---|
{rows}
"""
    card = populate_model_card(
        ModelCard(f"---\n{data.to_yaml()}\n---\n{body}"), tags=["z-image", "lora", "text-to-image"]
    )
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    card.save(tmp)
    os.replace(tmp, path)
    return path
