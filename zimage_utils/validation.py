"""Validation during training: images for the cached prompts through diffusers' own `ZImagePipeline`, and a
loss on held-out items at fixed timesteps and fixed noise (comparable from one validation to the next).

Samples land in OUTPUT/samples/: step_NNNNNN.png per validation (the prompts side by side) and grid.png, rebuilt
from those files each time, with one row per prompt and one column per validation step so far."""

import argparse
import contextlib
import gc
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm

from .model_spec import THUMBNAIL_KEY, thumbnail
from .training_step import StepConfig, flow_matching_step

if TYPE_CHECKING:  # (generate.py imports this module; the cache's `datasets` import is not needed there)
    from .cache import CachedPrompt

# Z-Image-Turbo is distilled for ~8 steps without CFG; the base model wants ~50 steps with guidance.
SAMPLING_DEFAULTS = {"turbo": {"steps": 8, "guidance": 0.0}, "base": {"steps": 50, "guidance": 4.0}}
VALIDATION_SIGMAS = (0.1, 0.3, 0.5, 0.7, 0.9)
GRID_NAME = "grid.png"
# The grid shrinks its cells so that many validations still make a PNG viewers open (≤ ~16k pixels wide); the
# step_*.png files keep the full size.
GRID_MAX_CELL, GRID_MAX_WIDTH = 512, 16384
LANCZOS = Image.Resampling.LANCZOS
# Under a memory budget the VAE decodes in bf16 tiles of this many pixels a side: a full-frame fp32 decode at 1024²
# adds 4.8 GiB to a training process, fp32 tiles 1.2, bf16 tiles 0.6 (docs/BENCHMARKS.md, session 13); a tile's cost
# does not grow with the image.
LOW_MEMORY_TILE = 512
_STEP_FILE = re.compile(r"step_(\d+)\.png")
logger = logging.getLogger(__name__)


def model_variant(model_name_or_path: str) -> str:
    """ "turbo" when the model's name says so (Z-Image-Turbo), else "base" — including the community "de-turbo"
    checkpoints, which undo the distillation and sample like the base model."""
    name = str(model_name_or_path).lower().replace("_", "-")
    return "turbo" if "turbo" in name and "de-turbo" not in name and "deturbo" not in name else "base"


@torch.no_grad()
def sample_images(
    transformer,
    vae,
    scheduler,
    prompts: "list[CachedPrompt]",
    negative_embeds: torch.Tensor,
    size: tuple[int, int],
    steps: int,
    guidance: float,
    seed: int,
    progress: bool = False,
) -> list[Image.Image]:
    """One image per cached prompt, each from its own seeded generator. The settings a prompt line gave (size, seed,
    steps, guidance, negative prompt) override these: `size` (height, width) pixels, `steps`, `guidance`, `seed + i`
    for the i-th prompt, `negative_embeds` [L, D] (the empty caption's). `progress` shows a bar ticking once per
    prompt."""
    from diffusers import ZImagePipeline

    pipe = ZImagePipeline(transformer=transformer, vae=vae, scheduler=scheduler, text_encoder=None, tokenizer=None)
    pipe.set_progress_bar_config(disable=True)
    device, dtype = vae.device, transformer.dtype
    images = []
    for i, (prompt, embeds, negative) in enumerate(
        tqdm(prompts, desc="validation samples", disable=not progress, leave=False)
    ):
        height, width = prompt.size(size)
        scale = guidance if prompt.guidance is None else prompt.guidance
        negative = negative_embeds if negative is None else negative
        generator = torch.Generator(device=device).manual_seed(seed + i if prompt.seed is None else prompt.seed)
        latents = pipe(
            prompt_embeds=[embeds.to(device, dtype)],
            negative_prompt_embeds=[negative.to(device, dtype)] if scale > 0 else None,
            height=height,
            width=width,
            num_inference_steps=prompt.steps or steps,
            guidance_scale=scale,
            generator=generator,
            output_type="latent",
        ).images
        images += decode_latents(pipe, latents)
    return images


def decode_latents(pipe, latents: torch.Tensor) -> list[Image.Image]:
    """`ZImagePipeline`'s own decode of its `output_type="latent"` output ([B, 16, H/8, W/8]) into PIL images, except
    that a full-frame decode which runs out of GPU memory is done again in `LOW_MEMORY_TILE` tiles, and the VAE
    decodes in tiles from then on (as ComfyUI does): the sampling steps before it are not repeated, so under ZeRO-3
    the ranks' collective forwards stay in step."""
    vae = pipe.vae
    latents = latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor

    def decode() -> list[Image.Image]:
        return pipe.image_processor.postprocess(vae.decode(latents, return_dict=False)[0], output_type="pil")

    try:
        return decode()
    except torch.OutOfMemoryError:
        if vae.use_tiling:
            raise
    # Out of the handler, whose traceback held the failed decode's tensors
    height, width = (8 * side for side in latents.shape[-2:])
    logger.warning(
        f"validation: decoding a {width}x{height} sample ran out of GPU memory; decoding in {LOW_MEMORY_TILE}-px "
        f"tiles from now on (--max_memory_gb does so from the start, --validation_resolution samples smaller)"
    )
    release_cached_memory()
    decode_in_tiles(vae, LOW_MEMORY_TILE)
    return decode()


def decode_in_tiles(vae, tile_px: int = LOW_MEMORY_TILE) -> None:
    """Make `vae.decode` (diffusers' `AutoencoderKL`) work in overlapping `tile_px`-pixel tiles, blended at the seams
    (diffusers' own tiling; its default tile is the config's sample_size, 1024 for Z-Image, which never tiles a 1024²
    image)."""
    vae.enable_tiling()
    vae.tile_sample_min_size = tile_px
    vae.tile_latent_min_size = tile_px // 2 ** (len(vae.config.block_out_channels) - 1)


def release_cached_memory() -> None:
    """Collect unreachable tensors and hand the CUDA allocator's free cached blocks back (a no-op off CUDA)."""
    gc.collect()
    torch.cuda.empty_cache()


@contextlib.contextmanager
def released_cache(device):
    """`release_cached_memory` before and after the block, on CUDA: what validation allocates then reuses the memory
    the training step left free, instead of adding to it."""
    cuda = torch.device(device).type == "cuda"
    if cuda:
        release_cached_memory()
    try:
        yield
    finally:
        if cuda:
            release_cached_memory()


def save_grid(images: list[Image.Image], path: str | Path, columns: int | None = None) -> Path:
    """Paste images into one PNG, `columns` per row, in cells of the largest width and height (`same_size`)."""
    images = same_size(images)
    columns = columns or len(images)
    rows = (len(images) + columns - 1) // columns
    w, h = images[0].size
    grid = Image.new("RGB", (w * columns, h * rows), "white")
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * w, (i // columns) * h))
    return save_png_atomic(grid, path)


def same_size(images: list[Image.Image]) -> list[Image.Image]:
    """Images of several sizes (prompts with sizes of their own) each centred on white in a cell of the largest
    width and height, unscaled; images of one size are returned as they are."""
    width, height = max(i.width for i in images), max(i.height for i in images)
    fitted = []
    for image in images:
        if image.size != (width, height):
            cell = Image.new("RGB", (width, height), "white")
            cell.paste(image, ((width - image.width) // 2, (height - image.height) // 2))
            image = cell
        fitted.append(image)
    return fitted


def save_png_atomic(image: Image.Image, path: str | Path) -> Path:
    """Write to a temporary name, then rename: a viewer or a crash never sees half a PNG. A name ending in .jpg or
    .webp gets that format instead."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format=Image.registered_extensions().get(path.suffix.lower(), "PNG"))
    tmp.replace(path)
    return path


def grid_label_height(cell_width: int) -> int:
    """Pixels of the step-label strip above the grid, for cells `cell_width` pixels wide."""
    return _label_font_size(cell_width) + 8


def _label_font_size(cell_width: int) -> int:
    return max(12, cell_width // 32)


def rebuild_sample_grid(samples_dir: str | Path, num_prompts: int, up_to_step: int | None = None) -> Path | None:
    """samples_dir/grid.png from the step_*.png files there: row i = prompt i, one column per step (oldest left),
    each labelled with its step. Steps after `up_to_step` are left out: after a resume from an earlier checkpoint
    they belong to the abandoned run (and are overwritten when the run gets there again). Returns the path, or
    None when there are no step files."""
    samples_dir = Path(samples_dir)
    steps = sorted((int(m.group(1)), p) for p in samples_dir.glob("step_*.png") if (m := _STEP_FILE.fullmatch(p.name)))
    steps = [(step, p) for step, p in steps if up_to_step is None or step <= up_to_step]
    if not steps or num_prompts < 1:
        return None
    with Image.open(steps[-1][1]) as newest:
        cell_w, cell_h = newest.width // num_prompts, newest.height
    scale = min(1.0, GRID_MAX_CELL / max(cell_w, cell_h), max(GRID_MAX_WIDTH // len(steps), 64) / cell_w)
    cell_w, cell_h = max(1, round(cell_w * scale)), max(1, round(cell_h * scale))
    columns = []
    for _, path in steps:
        with Image.open(path) as row:
            row = row.convert("RGB")
        # A step file holds the prompts side by side in equal cells; older files may be of another size (e.g. a
        # resume with another --validation_resolution), so each cell is resized to the newest one's.
        width = row.width // num_prompts
        cells = [row.crop((i * width, 0, (i + 1) * width, row.height)) for i in range(num_prompts)]
        columns.append([c if c.size == (cell_w, cell_h) else c.resize((cell_w, cell_h), LANCZOS) for c in cells])
    return save_png_atomic(labelled_grid(columns, [f"step {step}" for step, _ in steps]), samples_dir / GRID_NAME)


def labelled_grid(columns: list[list[Image.Image]], labels: list[str]) -> Image.Image:
    """Columns of images side by side (the first image of each in the top row), each under its label, in cells of
    the largest width and height (`same_size`)."""
    fitted = iter(same_size([image for column in columns for image in column]))
    columns = [[next(fitted) for _ in column] for column in columns]
    cell_w, cell_h = columns[0][0].size
    label_h = grid_label_height(cell_w)
    grid = Image.new("RGB", (cell_w * len(columns), label_h + cell_h * max(len(c) for c in columns)), "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default(size=_label_font_size(cell_w))
    for x, (column, label) in enumerate(zip(columns, labels, strict=True)):
        for y, cell in enumerate(column):
            grid.paste(cell, (x * cell_w, label_h + y * cell_h))
        draw.text((x * cell_w + 4, 4), label, fill="black", font=font)
    return grid


@torch.no_grad()
def validation_loss(transformer, dataset, collate, seed: int) -> dict[str, float]:
    """Mean loss over held-out items at each of VALIDATION_SIGMAS, with noise fixed per (item, sigma).
    Returns {"val/loss": mean, "val/loss_sigma_0.1": ..., ...}."""
    fixed = StepConfig(timestep_sampling="uniform", loss_weighting="none")
    device = next(transformer.parameters()).device
    sums = {s: 0.0 for s in VALIDATION_SIGMAS}
    for index in range(len(dataset)):
        batch = collate([dataset[index]])
        for k, sigma in enumerate(VALIDATION_SIGMAS):
            t = torch.full((1,), 1.0 - sigma, device=device)
            out = flow_matching_step(transformer, batch, fixed, [seed + 1000 * index + k], timesteps=t)
            sums[sigma] += float(out["loss"])
    n = max(len(dataset), 1)
    result = {f"val/loss_sigma_{s:.1f}": v / n for s, v in sums.items()}
    result["val/loss"] = sum(result.values()) / len(VALIDATION_SIGMAS)
    return result


def sample_size(text: str) -> tuple[int, int]:
    """`--validation_resolution`: "1024" → (1024, 1024), "832x1216" (width x height) → (1216, 832), as (height,
    width). A malformed one raises argparse's ArgumentTypeError, which argparse prints as a usage error."""
    parts = text.lower().replace("×", "x").split("x")
    if len(parts) not in (1, 2) or not all(p.strip().isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"{text!r}: give one side (1024) or WIDTHxHEIGHT (832x1216)")
    width, height = int(parts[0]), int(parts[-1])
    if width % 16 or height % 16 or not width or not height:
        raise argparse.ArgumentTypeError(
            f"{text!r}: both sides must be positive multiples of 16 (VAE and 2x2 patches)"
        )
    return height, width


def add_validation_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """The trainer's flags for when and how it samples its validation prompts, on `parser` (or an argument group)."""
    parser.add_argument(
        "--validation_steps",
        type=int,
        default=0,
        help="Validate every N steps (0 = only at the end): samples/grid.png (prompts x steps), loss_per_sigma.png.",
    )
    parser.add_argument(
        "--validation_epochs",
        type=int,
        default=0,
        help="Also validate when every N-th epoch is done, at its last optimiser step (kohya's sample_every_n_epochs; "
        "0 = off).",
    )
    parser.add_argument(
        "--validation_at_start",
        action="store_true",
        help="Also validate before the first step of a new run: the untrained model's samples (and held-out loss) as "
        "the baseline, the grid's first column (kohya's --sample_at_first).",
    )
    parser.add_argument("--validation_num_inference_steps", type=int, default=None, help="Default: 8 Turbo, 50 base.")
    parser.add_argument("--validation_guidance_scale", type=float, default=None, help="Default: 0 Turbo, 4 base.")
    parser.add_argument(
        "--validation_resolution",
        type=sample_size,
        default=None,
        help="Pixels of the samples: one side (square) or WIDTHxHEIGHT, e.g. 832x1216 for portraits; multiples of 16. "
        "Default: the largest cache's resolution, square.",
    )


class Validator:
    """Samples the cached validation prompts ([cache.CachedPrompt]) into one PNG per call (step_NNNNNN.png) and
    rebuilds grid.png (prompts x steps). Samples are `size` (height, width) pixels, with `steps`, `guidance` and
    `seed + i`, except where a prompt line gave its own (`sample_prompts`); a prompt of another size sits centred in
    a cell of the largest. Loads the VAE and scheduler on first use (the text encoder never: the prompts were
    encoded by precompute_embeddings.py).

    `low_memory` (the trainer's --max_memory_gb): the VAE decodes in bf16 (else fp32), in `LOW_MEMORY_TILE` tiles,
    and waits on the CPU between validations. `raised_peak_gib`: on CUDA, the process's peak reserved GiB when sampling last raised it
    (else None), so an over-budget warning can tell validation's excess from the training step's."""

    def __init__(
        self,
        model_path,
        revision,
        prompts,
        empty_embeds,
        out_dir,
        size,
        steps=None,
        guidance=None,
        seed=0,
        low_memory=False,
    ):
        defaults = SAMPLING_DEFAULTS[model_variant(model_path)]
        self.model_path, self.revision, self.prompts, self.empty = model_path, revision, prompts, empty_embeds
        self.out_dir, self.size, self.seed, self.low_memory = Path(out_dir), size, seed, low_memory
        self.steps = steps or defaults["steps"]
        self.guidance = defaults["guidance"] if guidance is None else guidance
        self.vae = self.scheduler = None
        self.raised_peak_gib = None
        self.first_sample: tuple[int, Image.Image] | None = None  # (step, the first prompt's image), main process

    @classmethod
    def for_run(cls, args, caches: dict, empty_embeds, out_dir) -> "Validator":
        """The trainer's validator: its flags (`--validation_*`, `--max_memory_gb`, `--seed`), the caches' prompts,
        and by default the largest cache's resolution, square."""
        return cls(
            args.pretrained_model_name_or_path,
            args.revision,
            caches["validation_prompts"],
            empty_embeds,
            out_dir,
            size=args.validation_resolution or (caches["resolutions"][-1],) * 2,
            steps=args.validation_num_inference_steps,
            guidance=args.validation_guidance_scale,
            seed=args.seed,
            low_memory=bool(args.max_memory_gb),
        )

    def thumbnail(self, step: int) -> dict[str, str]:
        """{model spec thumbnail key: the first prompt's sample} when the last validation saved was at `step`."""
        if self.first_sample is None or self.first_sample[0] != step:
            return {}
        return {THUMBNAIL_KEY: thumbnail(self.first_sample[1])}

    def sample_grid(self, transformer, step: int, device, save: bool = True, trackers=()) -> Path | None:
        """Sample every prompt at `step`; with `save` (the main process) write step_NNNNNN.png, rebuild grid.png,
        show a progress bar and log the images to `trackers` (accelerate's). Returns the grid's path, or None when
        nothing was written."""
        if not self.prompts:
            return None
        from .model_loading import load_scheduler, load_vae

        if self.vae is None:
            dtype = torch.bfloat16 if self.low_memory else torch.float32
            self.vae = load_vae(self.model_path, dtype, device, revision=self.revision)
            self.scheduler = load_scheduler(self.model_path, revision=self.revision)
            if self.low_memory:
                decode_in_tiles(self.vae, LOW_MEMORY_TILE)
        cuda = torch.device(device).type == "cuda"
        peak_before = torch.cuda.max_memory_reserved(device) if cuda else 0
        with released_cache(device):
            images = sample_images(
                transformer,
                self.vae.to(device),
                self.scheduler,
                self.prompts,
                self.empty,
                self.size,
                self.steps,
                self.guidance,
                self.seed,
                progress=save,
            )
            if self.low_memory:
                self.vae.to("cpu")
        if cuda and torch.cuda.max_memory_reserved(device) > peak_before:
            self.raised_peak_gib = torch.cuda.max_memory_reserved(device) / 2**30
        if not save:
            return None
        save_grid(images, self.out_dir / f"step_{step:06d}.png")
        self.first_sample = (step, images[0])
        log_samples(trackers, images, [p.prompt.text for p in self.prompts], step)
        return rebuild_sample_grid(self.out_dir, len(images), up_to_step=step)


def log_samples(trackers, images: list[Image.Image], prompts: list[str], step: int) -> None:
    """A validation's samples to the run's trackers under "validation": TensorBoard gets them as one image batch
    (accelerate's `log_images`), Weights & Biases one image per prompt, captioned with it. Others get none."""
    for tracker in trackers:
        if tracker.name == "tensorboard":
            batch = np.stack([np.asarray(image.convert("RGB")) for image in same_size(images)])  # [N, H, W, 3] uint8
            tracker.log_images({"validation": batch}, step=step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"validation": [wandb.Image(i, caption=p) for i, p in zip(images, prompts)]}, step=step)
