"""The embedded default: a tiny random Z-Image pipeline and a synthetic captioned dataset, made offline.

    python -m zimage_utils.tiny --model_dir tiny_model --data_dir tiny_data [--num_images 24]

The pipeline is saved with `save_pretrained` as an ordinary diffusers folder (`model_index.json`), so it loads
through the same code path as the real model. Sizes follow diffusers' own Z-Image LoRA tests, except the VAE,
which keeps the real 8x downsampling (4 blocks) so bucket sizes stay multiples of 16 as with the real model.
"""

import argparse
import json
import math
import random
from pathlib import Path

import torch
from PIL import Image, ImageDraw

# Qwen3's special tokens, and a chat template with the one behaviour the pipeline relies on: `enable_thinking`
# (the pipeline passes True, which adds nothing after the assistant header).
QWEN_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 70),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 60, 190),
    "orange": (240, 140, 30),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle")
# (height, width) in pixels: square, landscape and portrait, all multiples of 16.
SIZES = ((64, 64), (64, 96), (96, 64), (48, 112))

TINY_TRANSFORMER = dict(
    all_patch_size=(2,),
    all_f_patch_size=(1,),
    in_channels=16,
    dim=32,
    n_layers=2,
    n_refiner_layers=1,
    n_heads=2,
    n_kv_heads=2,
    norm_eps=1e-5,
    qk_norm=True,
    cap_feat_dim=16,
    rope_theta=256.0,
    t_scale=1000.0,
    axes_dims=[8, 4, 4],
    axes_lens=[1024, 32, 32],  # (the first as Z-Image's: room for captions of 512 tokens, `longest_caption`)
)
TINY_TEXT_ENCODER = dict(  # Qwen3Config; hidden_size = the transformer's cap_feat_dim
    hidden_size=16,
    intermediate_size=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=512,
)
TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[8, 16, 16, 16],
    layers_per_block=1,
    latent_channels=16,
    norm_num_groups=8,
    sample_size=64,
    scaling_factor=0.3611,
    shift_factor=0.1159,
    use_quant_conv=False,
    use_post_quant_conv=False,
)


def _tokenizer_corpus() -> list[str]:
    words = list(COLOURS) + list(SHAPES) + ["a", "an", "on", "the", "background", "photo", "of", "small", "large"]
    rng = random.Random(0)
    lines = [" ".join(rng.choice(words) for _ in range(8)) for _ in range(400)]
    return lines + ["The quick brown fox jumps over the lazy dog. 0123456789 ,.;:!?'\"()[]{}-_/"]


def make_tokenizer():
    """A byte-level BPE Qwen2Tokenizer trained on a small local corpus, with Qwen's special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(_tokenizer_corpus(), trainer=trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tokenizer = Qwen2Tokenizer(vocab=model["vocab"], merges=merges, model_max_length=512)
    tokenizer.add_special_tokens({"additional_special_tokens": QWEN_SPECIAL_TOKENS[1:]})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def make_tiny_pipeline(seed: int = 0):
    """Build the tiny random `ZImagePipeline` in memory (fp32, CPU)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    tokenizer = make_tokenizer()
    torch.manual_seed(seed)
    transformer = ZImageTransformer2DModel(**TINY_TRANSFORMER)
    # The pad tokens are uninitialised memory in some diffusers versions; a random model must fill them.
    with torch.no_grad():
        transformer.x_pad_token.normal_(std=0.02)
        transformer.cap_pad_token.normal_(std=0.02)
    vae = AutoencoderKL(**TINY_VAE)
    text_encoder = Qwen3Model(
        Qwen3Config(**TINY_TEXT_ENCODER, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    )
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
    return ZImagePipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer
    )


def save_tiny_pipeline(model_dir: str | Path, seed: int = 0) -> Path:
    """Write the tiny pipeline to `model_dir` with `save_pretrained` (safetensors) and return the path."""
    model_dir = Path(model_dir)
    make_tiny_pipeline(seed).save_pretrained(model_dir, safe_serialization=True)
    return model_dir


# A vision-language captioner of the kind caption_images.py loads (LLaVA-NeXT: a SigLIP vision tower and a Qwen2
# text model), tiny and random: its captions are noise, but it goes through transformers' Auto classes, chat
# template, processor and generate exactly as a real one does. As with Qwen-VL, an image's token count depends on
# its shape, so a batch of images is padded; its image processor is the PIL one, which needs no torchvision.
CAPTIONER_IMAGE_TOKEN = "<image>"
CAPTIONER_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def save_tiny_captioner(folder: str | Path, seed: int = 0) -> Path:
    """Write a tiny random LLaVA-NeXT captioner (model + processor, safetensors) to `folder`; returns the path."""
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessorPil,
        LlavaNextProcessor,
    )

    tokenizer = make_tokenizer()
    tokenizer.add_tokens([CAPTIONER_IMAGE_TOKEN], special_tokens=True)
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    tiles = [[32, 32], [32, 64], [64, 32]]  # the grid shapes an image is cut into, by its aspect
    config = LlavaNextConfig(
        vision_config=dict(
            model_type="siglip_vision_model",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        text_config=dict(
            model_type="qwen2",
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=512,
            eos_token_id=end_of_turn,
            pad_token_id=tokenizer.pad_token_id,
        ),
        image_token_index=tokenizer.convert_tokens_to_ids(CAPTIONER_IMAGE_TOKEN),
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        image_grid_pinpoints=tiles,
    )
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config)
    model.generation_config.eos_token_id = end_of_turn
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": 32},
        crop_size={"height": 32, "width": 32},
        image_grid_pinpoints=tiles,
        do_center_crop=False,
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=CAPTIONER_CHAT_TEMPLATE,
        patch_size=8,
        vision_feature_select_strategy="full",
        image_token=CAPTIONER_IMAGE_TOKEN,
        num_additional_image_tokens=0,
    )
    folder = Path(folder)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def _draw_item(index: int, rng: random.Random) -> tuple[Image.Image, str]:
    height, width = SIZES[index % len(SIZES)]
    names = list(COLOURS)
    bg, fg = rng.sample(names, 2)
    shape = SHAPES[index % len(SHAPES)]
    image = Image.new("RGB", (width, height), COLOURS[bg])
    draw = ImageDraw.Draw(image)
    side = min(height, width) * rng.uniform(0.45, 0.7)
    cx, cy = width * rng.uniform(0.35, 0.65), height * rng.uniform(0.35, 0.65)
    box = (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)
    if shape == "circle":
        draw.ellipse(box, fill=COLOURS[fg])
    elif shape == "square":
        draw.rectangle(box, fill=COLOURS[fg])
    else:
        r = side / 2
        points = [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
        draw.polygon(points, fill=COLOURS[fg])
    return image, f"a {fg} {shape} on a {bg} background"


def make_synthetic_dataset(data_dir: str | Path, num_images: int = 24, seed: int = 0) -> Path:
    """Write `num_images` deterministic PNGs of coloured shapes with `.txt` caption sidecars into `data_dir`."""
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i in range(num_images):
        image, caption = _draw_item(i, rng)
        image.save(data_dir / f"shape_{i:03d}.png")
        (data_dir / f"shape_{i:03d}.txt").write_text(caption + "\n")
    return data_dir


def main(input_args: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a tiny random Z-Image pipeline and a synthetic dataset.")
    parser.add_argument("--model_dir", type=str, default=None, help="Where to save the tiny pipeline.")
    parser.add_argument("--data_dir", type=str, default=None, help="Where to write the captioned images.")
    parser.add_argument("--num_images", type=int, default=24, help="Number of synthetic images.")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(input_args)
    if args.model_dir is None and args.data_dir is None:
        parser.error("pass --model_dir and/or --data_dir")
    if args.model_dir:
        print(f"tiny Z-Image pipeline -> {save_tiny_pipeline(args.model_dir, args.seed)}")
    if args.data_dir:
        print(
            f"{args.num_images} synthetic images -> {make_synthetic_dataset(args.data_dir, args.num_images, args.seed)}"
        )


if __name__ == "__main__":
    main()
