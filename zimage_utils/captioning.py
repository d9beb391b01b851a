"""Captions from a vision-language model, for `caption_images.py`: any model transformers loads with
`AutoModelForImageTextToText` and `AutoProcessor` with a chat template (Qwen2.5-VL, Qwen3-VL, LLaVA models, ...),
prompted through the processor's own chat template and decoded greedily, so a caption depends only on its image.

A caption is one line of plain text: precompute_embeddings.py's --caption_variants reads each line of a caption
file as a caption of its own, so the model's line breaks become spaces."""

import logging
import re
import unicodedata
from pathlib import Path

import torch
from PIL import Image

from .cli import write_text_atomic

logger = logging.getLogger(__name__)

DEFAULT_CAPTIONER = "Qwen/Qwen3-VL-8B-Instruct"
_PLAIN = (
    "Write a caption for this image as one paragraph of plain sentences, the way a detailed text-to-image prompt "
    "reads. Say only what is visible. Do not start with 'The image shows' or 'This image', and do not use lists or "
    "headings."
)
# --preset: what the caption covers. What a caption names is not learned into the trigger word, so a person's or a
# style's own traits are left out of their captions (docs/TRAINING_GUIDE.md, "Captions and the trigger word").
INSTRUCTIONS = {
    "general": _PLAIN
    + " Cover the main subject, what it looks like and does, the setting, the lighting, the composition and camera "
    "angle, and the medium or style.",
    "person": _PLAIN
    + " Call the main person only 'the person'. Cover their clothing, pose, expression and what they do, the "
    "setting, the lighting, and the composition and camera angle, but not their face, hair, skin, body or age.",
    "style": _PLAIN
    + " Cover only the content: the subjects, objects, setting and composition. Do not mention the style, medium, "
    "technique, brushwork or colour palette.",
}
DEFAULT_INSTRUCTION = INSTRUCTIONS["general"]
# What a thinking model writes before its answer (Qwen3-VL-Thinking): left out of the caption
_THINKING = re.compile(r"^.*?</think>", re.S)
_LEAD_INS = re.compile(r"^(the|this) (image|picture|photo(graph)?) (shows|depicts|features|is of)\s+", re.I)


def load_captioner(
    model: str,
    device: torch.device | str,
    dtype: torch.dtype,
    revision: str | None = None,
    load_in_4bit: bool = False,
    trust_remote_code: bool = False,
):
    """(model, processor) in eval mode on `device`, the processor padding on the left (batched generation).
    `load_in_4bit`: the weights in bitsandbytes NF4 (CUDA), for cards that cannot hold them in bf16."""
    from transformers import AutoModelForImageTextToText, AutoProcessor, BitsAndBytesConfig

    kwargs = dict(revision=revision, trust_remote_code=trust_remote_code)
    if not Path(model).exists() and (model.count("/") != 1 or model.startswith((".", "/", "~"))):
        raise FileNotFoundError(f"--model {model}: no such folder, and not a hub id (owner/name)")
    try:
        processor = AutoProcessor.from_pretrained(model, padding_side="left", **kwargs)
    except OSError as error:  # not downloaded, offline, or not a model folder
        first = str(error).strip().splitlines()[0]
        raise ValueError(
            f"--model {model} could not be loaded ({first}): give a vision-language model's folder, or a hub id "
            "downloaded beforehand (`hf download ID`) where this machine has no network"
        ) from None
    except (AttributeError, ImportError, ValueError) as error:
        # (a Qwen-VL processor without torchvision fails on its video processor, with an AttributeError)
        hint = _torchvision_hint() if not isinstance(error, ValueError) or "torchvision" in str(error) else ""
        raise ValueError(
            f"the processor of {model} could not be loaded ({error}){hint or '; is it a vision-language model?'}"
        ) from None
    quantization = (
        BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
        if load_in_4bit
        else None
    )
    captioner = AutoModelForImageTextToText.from_pretrained(
        model, dtype=dtype, quantization_config=quantization, device_map={"": str(device)}, **kwargs
    )
    return captioner.eval(), processor


def _torchvision_hint() -> str:
    try:
        import torchvision  # noqa: F401
    except ImportError:
        # transformers' Qwen-VL processors include a video processor, which needs torchvision
        return "; this model's processor may need torchvision: `pip install torchvision` (the build for your torch)"
    return ""


def fit_pixels(image: Image.Image, max_pixels: int) -> Image.Image:
    """`image` downscaled (aspect kept) to at most `max_pixels` pixels: a VLM's cost grows with the image's area,
    and a caption does not need more detail than a training bucket holds."""
    scale = (max_pixels / (image.width * image.height)) ** 0.5
    if scale >= 1:
        return image
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS)


@torch.no_grad()
def caption_images(
    model, processor, images: list[Image.Image], instruction: str, max_new_tokens: int
) -> list[tuple[str, bool]]:
    """One caption per image, generated greedily in one batch: [(caption, reached max_new_tokens)]. The prompt is
    the processor's chat template of one user turn holding the image and `instruction`."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text] * len(images), images=[[i] for i in images], padding=True, return_tensors="pt")
    inputs = inputs.to(model.device)
    if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    generated = output[:, inputs["input_ids"].shape[1] :]
    eos = _stop_tokens(model)
    texts = processor.batch_decode(generated, skip_special_tokens=True)
    return [
        (clean_caption(t), len(g) >= max_new_tokens and not any(int(x) in eos for x in g))
        for t, g in zip(texts, generated, strict=True)
    ]


class FittingBatches:
    """`caption_images` over any number of images in batches of at most `batch_size`; a batch that runs out of GPU
    memory is captioned again in halves, and later batches keep the smaller size (a warning says so). Captions are
    the same whatever the batch (greedy, left-padded)."""

    def __init__(self, model, processor, instruction: str, max_new_tokens: int, batch_size: int):
        self.model, self.processor, self.batch_size = model, processor, batch_size
        self.instruction, self.max_new_tokens = instruction, max_new_tokens

    def __call__(self, images: list[Image.Image]) -> list[tuple[str, bool]]:
        results = []
        while len(results) < len(images):
            part = images[len(results) : len(results) + self.batch_size]
            try:
                results += caption_images(self.model, self.processor, part, self.instruction, self.max_new_tokens)
            except torch.OutOfMemoryError:
                if self.batch_size == 1:
                    raise ValueError(
                        "out of GPU memory captioning a single image: lower --max_pixels or --max_new_tokens, or "
                        "pass --load_in_4bit"
                    ) from None
                self.batch_size //= 2
                logger.warning(f"out of GPU memory at a batch of {len(part)}: captioning {self.batch_size} at once")
                torch.cuda.empty_cache()
        return results


def _stop_tokens(model) -> set[int]:
    eos = model.generation_config.eos_token_id
    return set(eos if isinstance(eos, list) else [] if eos is None else [eos])


def clean_caption(text: str) -> str:
    """A model's answer as one caption line: a thinking model's reasoning dropped, line breaks and runs of spaces
    made single spaces, control characters removed, and a lead-in such as "The image shows" cut."""
    text = _THINKING.sub("", text)
    if text.lstrip().startswith("<think>"):  # reasoning cut off by max_new_tokens before its answer: no caption
        return ""
    text = "".join(" " if c.isspace() else "" if unicodedata.category(c) == "Cc" else c for c in text)
    text = " ".join(text.split())
    if match := _LEAD_INS.match(text):
        text = text[match.end() :]
        text = text[:1].upper() + text[1:]
    return text


def write_caption(path: str | Path, caption: str) -> None:
    """`caption` and a newline into `path` (UTF-8), through a temporary name: never half a file."""
    write_text_atomic(path, caption + "\n")
