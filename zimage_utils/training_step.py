"""One flow-matching training step on Z-Image: batch in → loss out. The trainer, the benchmarks and the tests all
call this function, so an optimisation made here is one the trainer really runs."""

import argparse
import random
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import flow_matching as fm


@dataclass
class StepConfig:
    timestep_sampling: str = "logit_normal"  # uniform | logit_normal | shift | flux_shift
    logit_mean: float = 0.0
    logit_std: float = 1.0
    timestep_shift: float = 3.0
    loss_weighting: str = "none"  # none | sigma_sqrt | cosmap
    caption_dropout: float = 0.0  # probability of training an item on the empty caption
    flip_prob: float = 0.0  # probability of using the cached mirrored latents
    mask_floor: float = 0.0  # loss weight of a loss mask's black pixels (1 = masks ignored)
    sigma_range: tuple[float, float] = (0.0, 1.0)  # noise levels trained on (see flow_matching.sample_timesteps)
    preservation_weight: float = 0.0  # weight of the preservation loss (`preservation_target`); 0 = off
    blank_preservation_weight: float = 0.0  # the same with the empty caption, for every item; 0 = off
    mask_prior_weight: float = 0.0  # weight of the base model's prediction as the target outside loss masks; 0 = off
    loss_type: str = "mse"  # mse | huber | l1 (flow_matching.flow_matching_loss), of the data's term only
    huber_c: float = 0.1

    @classmethod
    def from_flags(cls, args) -> "StepConfig":
        """From train_zimage_lora.py's flags of the same names (flip_prob is --random_flip)."""
        names = ("timestep_sampling", "logit_mean", "logit_std", "timestep_shift", "loss_weighting", "caption_dropout")
        return cls(
            **{n: getattr(args, n) for n in names},
            flip_prob=args.random_flip,
            mask_floor=args.mask_floor,
            sigma_range=tuple(args.sigma_range),
            preservation_weight=args.preservation_weight,
            blank_preservation_weight=args.blank_preservation_weight,
            mask_prior_weight=args.mask_prior_weight,
            loss_type=args.loss_type,
            huber_c=args.huber_c,
        )


def add_step_flags(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """train_zimage_lora.py's flags that `StepConfig.from_flags` reads, on the argparse parser `p` (or one of its
    argument groups)."""
    p.add_argument(
        "--timestep_sampling", choices=["uniform", "logit_normal", "shift", "flux_shift"], default="logit_normal"
    )
    p.add_argument("--logit_mean", type=float, default=0.0)
    p.add_argument("--logit_std", type=float, default=1.0)
    p.add_argument("--timestep_shift", type=float, default=3.0, help="sigma shift for --timestep_sampling shift.")
    p.add_argument(
        "--sigma_range",
        type=float,
        nargs=2,
        default=[0.0, 1.0],
        metavar=("LO", "HI"),
        help="Train only noise levels sigma in [LO, HI] (0 = clean, 1 = pure noise; kohya/musubi's min_timestep "
        "and max_timestep / 1000), the sampling's shape kept within: e.g. 0 0.4 for detail, 0.6 1 for composition.",
    )
    p.add_argument("--loss_weighting", choices=["none", "sigma_sqrt", "cosmap"], default="none")
    p.add_argument(
        "--loss_type",
        choices=fm.LOSS_TYPES,
        default="mse",
        help="huber: kohya's pseudo-Huber loss with --huber_c (squared error near 0, linear far out: outliers pull "
        "less); l1: the absolute error. The preservation terms and the held-out loss stay mse.",
    )
    p.add_argument("--huber_c", type=float, default=0.1, help="--loss_type huber's c (kohya's default; constant).")
    p.add_argument("--caption_dropout", type=float, default=0.0, help="Probability of the empty caption (0 = off).")
    p.add_argument(
        "--random_flip",
        type=float,
        default=0.0,
        help="Probability of the mirrored latents (needs a cache made with --cache_flipped).",
    )
    p.add_argument(
        "--mask_floor",
        type=float,
        default=0.0,
        help="Loss weight of black pixels of the cache's loss masks (precompute --mask_dir/--alpha_mask): 0 = not "
        "learned at all, e.g. 0.1 = a little background; 1 = masks ignored.",
    )
    p.add_argument(
        "--preservation_weight",
        type=float,
        default=0.0,
        help="Differential output preservation (ai-toolkit's): with the trigger replaced by the class (a cache made "
        "with --preservation_class), the LoRA must predict what the base model does, weighted this much (e.g. 1); "
        "keeps the LoRA from changing every person, not only yours. Each step then trains the batch twice, one pass "
        "after the other: ~2.4x the time, no more memory (under DeepSpeed in one pass: +16 GiB at 1024²). 0 = off.",
    )
    p.add_argument(
        "--blank_preservation_weight",
        type=float,
        default=0.0,
        help="Blank prompt preservation (ai-toolkit's): with the empty caption, the LoRA must predict what the base "
        "model does, weighted this much (e.g. 1); keeps the LoRA out of the unconditional prediction that "
        "classifier-free guidance (the base model's) steers away from. Costs as --preservation_weight does; with "
        "both, each item is preserved twice. 0 = off.",
    )
    p.add_argument(
        "--mask_prior_weight",
        type=float,
        default=0.0,
        help="Inverted mask prior (ai-toolkit's): outside the cache's loss masks, the LoRA must predict what the base "
        "model does, weighted this much (ai-toolkit's default 0.5), so the background stays as the base model draws "
        "it instead of being merely untrained. Costs a forward pass without gradient for each batch with a mask. "
        "0 = off.",
    )


def compute_device_and_dtype(transformer: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    """Where the transformer runs and the dtype its activations take: that of its first frozen floating-point
    weight (a LoRA parameter is fp32; an NF4 weight is stored as uint8 but computes in bf16, like the layers kept
    in bf16; an fp8 weight reports bf16). Stops at the first match: this runs every step."""
    param = next(
        (p for p in transformer.parameters() if not p.requires_grad and p.dtype.is_floating_point),
        next(transformer.parameters()),
    )
    return param.device, param.dtype


def per_item_choices(seeds: list[int], config: StepConfig, has_flipped: bool) -> tuple[list[bool], list[bool]]:
    """Caption-dropout and flip decisions, drawn on the host from each item's seed (no device sync)."""
    drop, flip = [], []
    for seed in seeds:
        rng = random.Random(seed)
        drop.append(rng.random() < config.caption_dropout)
        flip.append(has_flipped and rng.random() < config.flip_prob)
    return drop, flip


def variant_choices(seeds: list[int], counts: list[int]) -> list[int]:
    """Which caption each item trains on: 0 = its first, k = its k-th variant, drawn from the item's seed (so a new one
    each epoch) on a stream of its own, which leaves the dropout and flip draws as they are without variants."""
    return [random.Random(f"variant:{seed}").randrange(n + 1) if n else 0 for seed, n in zip(seeds, counts)]


def flow_matching_step(
    transformer: torch.nn.Module,
    batch: dict,
    config: StepConfig,
    seeds: list[int],
    empty_embeds: torch.Tensor | None = None,
    timesteps: torch.Tensor | None = None,
    backward: Callable[[torch.Tensor], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Loss of `transformer` on one batch.

    batch: "latents" [B, C, h, w] clean latents (x1), "caption_embeds" list of B [L_i, D], optionally
    "latents_flipped" [B, C, h, w], "masks" uint8 [B, 1, h, w] (loss masks, 255 = full weight) and
    "caption_variants" (per item, a list of other captions' [L, D]; one caption per item is drawn), "loss_weights" [B]
    (each item's weight in the batch's loss, e.g. a regularisation set's), "preservation_embeds" (per item, its
    preservation caption's [L, D] or None; used when config.preservation_weight > 0). seeds: one int per item; noise,
    timestep, dropout, flip and caption of item i depend only on seeds[i]. empty_embeds: the empty caption's [L, D]
    (--caption_dropout, --blank_preservation_weight). timesteps: fixed t [B] (validation loss)
    instead of sampling. backward: when given (e.g. `accelerator.backward`), the step runs the backward pass itself
    and returns the loss detached; with preservation it then runs the preservation captions' forward and backward
    after the batch's backward, so that the two never hold their activations at once (the same gradients as one pass
    over the batch twice, at the memory of one batch). DeepSpeed, which takes one backward a step, needs None.
    Returns "loss" (scalar, fp32, grad unless `backward` ran), "per_sample" [B] and "sigma" [B] (detached), and with
    preservation "preservation" (the mean preservation loss of the items that have it, detached; not weighted), and
    with config.mask_prior_weight and a mask below white "mask_prior" (the batch's mean of each item's squared
    difference from the base model's prediction averaged over its background, black weighing 1; detached).
    """
    device, dtype = compute_device_and_dtype(transformer)
    # Non-blocking copies (the trainer's DataLoader pins its batches): the host queues the step without waiting
    # for the previous one to finish, so the GPU never idles between steps.
    x1 = batch["latents"].to(device, non_blocking=True).float()
    drop, flip = per_item_choices(seeds, config, batch.get("latents_flipped") is not None)
    if any(flip):  # chosen per item on the host: indexing, not a mask tensor copied to the device
        flipped = batch["latents_flipped"].to(device, non_blocking=True).float()
        x1 = torch.stack([flipped[i] if f else x1[i] for i, f in enumerate(flip)])
    mask = batch.get("masks")
    # (decided on the host: the batch's masks are still there)
    prior = bool(config.mask_prior_weight) and mask is not None and bool((mask < 255).any())
    if mask is not None:  # black weighs mask_floor, white 1; a mirrored item takes its mask mirrored too
        mask = mask.to(device, non_blocking=True).float() / 255
        if any(flip):
            mask = torch.stack([m.flip(-1) if f else m for m, f in zip(mask, flip)])
        background = 1 - mask
        mask = config.mask_floor + (1 - config.mask_floor) * mask
    captions = batch["caption_embeds"]
    if batch.get("caption_variants"):
        chosen = variant_choices(seeds, [len(v) for v in batch["caption_variants"]])
        captions = [e if k == 0 else v[k - 1] for e, v, k in zip(captions, batch["caption_variants"], chosen)]
    captions = [empty_embeds if d else e for d, e in zip(drop, captions)]
    if any(drop) and empty_embeds is None:
        raise ValueError("caption_dropout needs the cached empty-caption embedding")

    # Noise x0 ~ N(0, I) and t per item, each from the item's own generator
    generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
    x0 = torch.stack([torch.randn(x1.shape[1:], generator=g, device=device) for g in generators])
    if timesteps is None:
        image_seq_len = (x1.shape[-2] // 2) * (x1.shape[-1] // 2)  # 2x2 patches
        timesteps = torch.cat(
            [
                fm.sample_timesteps(
                    1,
                    config.timestep_sampling,
                    generator=g,
                    device=device,
                    logit_mean=config.logit_mean,
                    logit_std=config.logit_std,
                    shift=config.timestep_shift,
                    image_seq_len=image_seq_len,
                    sigma_range=config.sigma_range,
                )
                for g in generators
            ]
        )
    t = timesteps.to(device, torch.float32)

    # x_t = t·x1 + (1−t)·x0; the transformer predicts x1 − x0 (t = 1 is clean)
    x_t = fm.interpolate(x1, x0, t)
    inputs = list(x_t.to(dtype).unsqueeze(2).unbind(0))  # B × [C, 1, h, w]: Z-Image takes a frame axis
    captions = [c.to(device, non_blocking=True).to(dtype) for c in captions]
    preserved = preserved_items(batch, config, empty_embeds)
    batch_inputs = (inputs, t, captions)
    if prior:  # the base model's prediction for the batch itself, the target outside its masks
        prior_pred = preservation_target(transformer, inputs, t, captions)
    if preserved:  # the same noisy latents again, with the preservation captions
        index = [i for i, _, _ in preserved]
        kept = [caption.to(device, non_blocking=True).to(dtype) for _, caption, _ in preserved]
        preserved_inputs = ([inputs[i] for i in index], t[index], kept)
        base_pred = preservation_target(transformer, *preserved_inputs)
        if backward is None:  # in the same forward pass as the batch
            batch_inputs = (inputs + preserved_inputs[0], torch.cat([t, preserved_inputs[1]]), captions + kept)
    # t in fp32, as the pipeline passes it: bf16 would quantise the timestep
    out = transformer(*batch_inputs, return_dict=False)[0]
    pred = torch.stack(out[: len(x1)]).squeeze(2)
    sigma = 1.0 - t
    weights = None if config.loss_weighting == "none" else fm.loss_weighting(sigma, config.loss_weighting)
    if batch.get("loss_weights") is not None:
        item_weights = batch["loss_weights"].to(device, non_blocking=True).float()
        weights = item_weights if weights is None else weights * item_weights
    target = fm.velocity_target(x1, x0)
    loss, per_sample = fm.flow_matching_loss(pred, target, weights, mask, config.loss_type, config.huber_c)
    result = {"loss": loss, "per_sample": per_sample.detach(), "sigma": sigma.detach()}
    if prior:  # each item's squared difference averaged over its background (0 for an item without one)
        mask_prior, _ = fm.flow_matching_loss(pred, prior_pred, None, background)
        loss = result["loss"] = loss + config.mask_prior_weight * mask_prior
        result["mask_prior"] = mask_prior.detach()
    if backward is not None:
        backward(loss)
        result["loss"] = loss.detach()
    if preserved:
        if backward is not None:  # the batch's activations are freed: now the preservation captions'
            out = transformer(*preserved_inputs, return_dict=False)[0]
        per_item = (
            (torch.stack(out[-len(preserved) :]).squeeze(2).float() - base_pred.float()).pow(2).flatten(1).mean(1)
        )
        # each preserved item weighs what a trained item does; items without a preservation caption add nothing
        weights = torch.tensor([weight for *_, weight in preserved], device=device)
        preservation = (weights * per_item).sum() / len(x1)
        if backward is not None:
            backward(preservation)
            preservation = preservation.detach()
        result["loss"] = result["loss"] + preservation
        result["preservation"] = per_item.mean().detach()
    return result


def preserved_items(batch: dict, config: StepConfig, empty_embeds=None) -> list[tuple[int, torch.Tensor, float]]:
    """The batch's preservation passes, (item, caption [L, D], loss weight) each: every item that has a preservation
    caption (--preservation_weight), and every item with the empty caption `empty_embeds`
    (--blank_preservation_weight)."""
    entries = []
    embeds = batch.get("preservation_embeds")
    if config.preservation_weight and embeds is not None:
        entries += [(i, e, config.preservation_weight) for i, e in enumerate(embeds) if e is not None]
    if config.blank_preservation_weight:
        if empty_embeds is None:
            raise ValueError("blank_preservation_weight needs the cached empty-caption embedding")
        entries += [(i, empty_embeds, config.blank_preservation_weight) for i in range(len(batch["latents"]))]
    return entries


@torch.no_grad()
def preservation_target(transformer, inputs: list, t: torch.Tensor, captions: list) -> torch.Tensor:
    """Differential output preservation (ai-toolkit's): what the model without the trained LoRA predicts for the
    preserved items' noisy latents with their preservation captions (the trigger replaced by the class, e.g.
    "person"). The step's loss then pulls the LoRA's prediction for those captions towards it, so that the LoRA
    changes what the trigger draws and leaves the class as the base model draws it. With the empty caption (blank
    prompt preservation) it leaves the unconditional prediction as it was. [P, C, h, w] for P inputs."""
    model = getattr(transformer, "module", transformer)  # DDP and DeepSpeed wrap it; the adapters are inside
    model.disable_adapters()
    try:
        out = transformer(inputs, t, captions, return_dict=False)[0]
    finally:
        model.enable_adapters()
    return torch.stack(out).squeeze(2)
