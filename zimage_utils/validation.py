"""Validation during training: images for the cached prompts through diffusers' own `ZImagePipeline`, and a
loss on held-out items at fixed timesteps and fixed noise (comparable from one validation to the next)."""

from pathlib import Path

import torch
from PIL import Image

from .training_step import StepConfig, flow_matching_step

# Z-Image-Turbo is distilled for ~8 steps without CFG; the base model wants ~50 steps with guidance.
SAMPLING_DEFAULTS = {"turbo": {"steps": 8, "guidance": 0.0}, "base": {"steps": 50, "guidance": 4.0}}
VALIDATION_SIGMAS = (0.1, 0.3, 0.5, 0.7, 0.9)


def model_variant(model_name_or_path: str) -> str:
    """ "turbo" when the model's name says so (Z-Image-Turbo and its de-turbo-free derivatives), else "base"."""
    return "turbo" if "turbo" in str(model_name_or_path).lower() else "base"


@torch.no_grad()
def sample_images(
    transformer,
    vae,
    scheduler,
    prompt_embeds: list[torch.Tensor],
    negative_embeds: torch.Tensor,
    height: int,
    width: int,
    steps: int,
    guidance: float,
    seed: int,
) -> list[Image.Image]:
    """One image per prompt embedding ([L_i, D] each), each from its own seeded generator."""
    from diffusers import ZImagePipeline

    pipe = ZImagePipeline(transformer=transformer, vae=vae, scheduler=scheduler, text_encoder=None, tokenizer=None)
    pipe.set_progress_bar_config(disable=True)
    device, dtype = vae.device, transformer.dtype
    images = []
    for i, embeds in enumerate(prompt_embeds):
        generator = torch.Generator(device=device).manual_seed(seed + i)
        images += pipe(
            prompt_embeds=[embeds.to(device, dtype)],
            negative_prompt_embeds=[negative_embeds.to(device, dtype)] if guidance > 0 else None,
            height=height,
            width=width,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=generator,
        ).images
    return images


def save_grid(images: list[Image.Image], path: str | Path, columns: int | None = None) -> Path:
    """Paste images (same size) into one PNG, `columns` per row."""
    columns = columns or len(images)
    rows = (len(images) + columns - 1) // columns
    w, h = images[0].size
    grid = Image.new("RGB", (w * columns, h * rows), "white")
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * w, (i // columns) * h))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    grid.save(tmp)
    tmp.replace(path)
    return path


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


class Validator:
    """Samples the cached validation prompts into one PNG grid per call. Loads the VAE and scheduler on first use
    (the text encoder never: the prompts were encoded by precompute_embeddings.py)."""

    def __init__(self, model_path, revision, prompts, empty_embeds, out_dir, size, steps=None, guidance=None, seed=0):
        defaults = SAMPLING_DEFAULTS[model_variant(model_path)]
        self.model_path, self.revision, self.prompts, self.empty = model_path, revision, prompts, empty_embeds
        self.out_dir, self.size, self.seed = Path(out_dir), size, seed
        self.steps = steps or defaults["steps"]
        self.guidance = defaults["guidance"] if guidance is None else guidance
        self.vae = self.scheduler = None

    def sample_grid(self, transformer, step: int, device, save: bool = True) -> Path | None:
        if not self.prompts:
            return None
        from .model_loading import load_scheduler, load_vae

        if self.vae is None:
            self.vae = load_vae(self.model_path, torch.float32, device, revision=self.revision)
            self.scheduler = load_scheduler(self.model_path, revision=self.revision)
        images = sample_images(
            transformer,
            self.vae,
            self.scheduler,
            [e for _, e in self.prompts],
            self.empty,
            self.size,
            self.size,
            self.steps,
            self.guidance,
            self.seed,
        )
        return save_grid(images, self.out_dir / f"step_{step:06d}.png") if save else None
