"""LoRA on the Z-Image transformer with PEFT: which Linears to adapt, and adding the adapter for training.

Module names in `ZImageTransformer2DModel` (diffusers 0.42), per transformer block:

    attention.to_q / to_k / to_v / to_out.0      (dim → dim)
    feed_forward.w1 / w3 (dim → ffn), w2 (ffn → dim)     SwiGLU, ffn = 10240 in the real model
    adaLN_modulation.0                           (256 → 4·dim; absent in the context refiner)

The blocks live in `layers.*` (30 main blocks), `noise_refiner.*` (image tokens only, before the joint blocks)
and `context_refiner.*` (caption tokens only). A suffix like `to_q` matches all three; targets are therefore
resolved here to full module names, so the refiners can be dropped precisely. Older ComfyUI builds do not map the
refiners' attention keys of a Z-Image LoRA and report them as "lora key not loaded": `exclude_refiners=True`
avoids that, at the cost of not adapting the refiners.
"""

import functools
from collections.abc import Iterable

import torch
from diffusers.training_utils import cast_training_params
from peft import LoKrConfig, LoraConfig
from peft.tuners.lokr.layer import Linear as LoKrLinear

ADAPTERS = ("lora", "lokr", "dora")
MAGNITUDE = "lora_magnitude_vector"  # a DoRA module's trained norms (PEFT's name, and diffusers' in a file)
ATTENTION_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
FFN_TARGETS = ["feed_forward.w1", "feed_forward.w2", "feed_forward.w3"]
LORA_TARGET_PRESETS: dict[str, list[str]] = {
    "attention": ATTENTION_TARGETS,
    "attention_ffn": ATTENTION_TARGETS + FFN_TARGETS,
    # Every Linear inside the blocks. The embedders and the final layer stay frozen: they are shared by all
    # tokens of every image, and adapting them shifts the whole model rather than adding a concept.
    "all": ATTENTION_TARGETS + FFN_TARGETS + ["adaLN_modulation.0"],
}
# `siglip_refiner` exists only in the Omni variant; dropping it with the others keeps the flag's meaning.
REFINER_PREFIXES = ("noise_refiner.", "context_refiner.", "siglip_refiner.")


def _matches(module_name: str, target: str) -> bool:
    # PEFT's own rule for a list of target names: exact, or a suffix starting at a module boundary.
    return module_name == target or module_name.endswith("." + target)


def lora_target_modules(
    transformer: torch.nn.Module, targets: str | list[str] = "attention", exclude_refiners: bool = False
) -> list[str]:
    """Full names of the Linear modules that get a LoRA, e.g. "layers.0.attention.to_q".

    Args:
        transformer: the (un-adapted) `ZImageTransformer2DModel`.
        targets: a preset name from `LORA_TARGET_PRESETS`, a comma-separated string of module names, or a list of
            module names; a name matches a Linear whose full name equals it or ends with "." + name.
        exclude_refiners: drop modules under `noise_refiner.` / `context_refiner.` (and `siglip_refiner.`).

    Returns:
        In model order (`named_modules`); raises ValueError for an unknown preset or a name that matches no Linear.
    """
    if isinstance(targets, str):
        # Anything that is not a preset is read as module names, so a misspelt preset fails below with the list.
        names = LORA_TARGET_PRESETS.get(targets) or [n.strip() for n in targets.split(",") if n.strip()]
    else:
        names = list(targets)

    linears = [n for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)]
    unmatched = [t for t in names if not any(_matches(n, t) for n in linears)]
    if unmatched:
        block_suffixes = sorted({n.split(".", 2)[2] for n in linears if n.startswith("layers.")})
        raise ValueError(
            f"LoRA target(s) {unmatched} are neither a preset nor the name of a Linear in "
            f"{type(transformer).__name__}; presets: {sorted(LORA_TARGET_PRESETS)}; "
            f"Linear names in a block: {block_suffixes}"
        )
    selected = [n for n in linears if any(_matches(n, t) for t in names)]
    if exclude_refiners:
        selected = [n for n in selected if not n.startswith(REFINER_PREFIXES)]
    return selected


def add_lora(
    transformer: torch.nn.Module,
    rank: int,
    alpha: float | None = None,
    dropout: float = 0.0,
    targets: str | list[str] = "attention",
    exclude_refiners: bool = False,
    init_lora_weights: bool | str = "gaussian",
    adapter: str = "lora",
    lokr_factor: int = 4,
) -> LoraConfig | LoKrConfig:
    """Freeze the transformer and add a trainable LoRA adapter ("default") to it, in place.

    The base weights keep their dtype (bf16 for training); the LoRA weights are cast to float32 so that AdamW's
    small updates are not rounded away.

    Args:
        transformer: `ZImageTransformer2DModel` (diffusers' `PeftAdapterMixin`).
        rank: LoRA rank r.
        alpha: LoRA alpha; the update is scaled by alpha / r. None = rank (scale 1).
        dropout: dropout on the LoRA input, 0 = off.
        targets, exclude_refiners: see `lora_target_modules`.
        init_lora_weights: PEFT's init; "gaussian" (as diffusers' training examples) or True (kaiming). Either
            way lora_B starts at zero, so the adapted model starts equal to the base.
        adapter: "lora", or "lokr" (PEFT's LoKr, as LyCORIS and ai-toolkit train it): each update is the Kronecker
            product w1 ⊗ w2, w1 of size f × f for `lokr_factor` f (-1: near-square) and w2 of the rest. w2 is a full
            matrix when `rank` is at least half its larger side, else w2_a @ w2_b of that rank (scaled by
            alpha / rank). lokr_w1 starts at zero, so the model starts equal to the base. Or "dora" (PEFT's DoRA):
            a LoRA whose adapted weight W + s·BA is rescaled to a trained norm per output row,
            m · (W + s·BA) / ||W + s·BA|| (m starts at ||W||, so again the model starts equal to the base).

    Returns:
        The `LoraConfig` (or `LoKrConfig`) used (the one `transformer.peft_config["default"]` holds). PEFT rewrites its
        `target_modules` into the shortest suffixes selecting the same modules (e.g. {"to_q", "0.adaLN_modulation.0"})
        when given many names; `lora_target_modules` gives the full list.
    """
    target_modules = lora_target_modules(transformer, targets, exclude_refiners)
    if adapter == "lokr":
        if dropout:
            raise ValueError("--lora_dropout is for LoRA; LoKr trains without it (set it to 0)")
        config = LoKrConfig(
            r=rank,
            alpha=rank if alpha is None else alpha,
            decompose_factor=lokr_factor,
            init_weights=True,
            target_modules=target_modules,
        )
    elif adapter in ("lora", "dora"):
        config = LoraConfig(
            r=rank,
            lora_alpha=rank if alpha is None else alpha,
            lora_dropout=dropout,
            init_lora_weights=init_lora_weights,
            target_modules=target_modules,
            use_dora=adapter == "dora",
        )
    else:
        raise ValueError(f"unknown adapter {adapter!r}: choose from {ADAPTERS}")
    transformer.requires_grad_(False)
    transformer.add_adapter(config)
    if adapter == "lokr":
        for module in transformer.modules():
            if type(module) is LoKrLinear:
                module.__class__ = _LoKrLinearWithoutModuleDropout
                module.train()  # (stays in eval mode)
    cast_training_params(transformer, dtype=torch.float32)
    return config


def add_lora_dropouts(
    transformer: torch.nn.Module, network: float = 0.0, rank: float = 0.0, module: float = 0.0
) -> int:
    """kohya's LoRA regularisers on the "default" LoRA (or DoRA) of `transformer`, as forward hooks on each layer's
    factors, so its parameters and saved keys stay PEFT's. In training mode only: `network` drops elements of the
    down projection's output (dropout, kept ones scaled by 1/(1−p)); `rank` drops whole rank channels, one draw per
    sample shared by its tokens (scaled the same); `module` leaves out a layer's whole update for the batch with
    probability p (unscaled, as kohya). Draws are tensors on the layer's device (no host sync, nothing for
    `torch.compile` to branch on). Returns the number of layers hooked."""
    from peft.tuners.lora import LoraLayer

    if not (network or rank or module):
        return 0
    hooked = 0
    for layer in transformer.modules():
        if isinstance(layer, LoraLayer) and "default" in layer.lora_A:
            if network or rank:
                layer.lora_A["default"].register_forward_hook(functools.partial(_down_dropout, network, rank))
            if module:
                layer.lora_B["default"].register_forward_hook(functools.partial(_module_dropout, module))
            hooked += 1
    return hooked


def _down_dropout(p: float, rank_p: float, down: torch.nn.Module, inputs, out: torch.Tensor) -> torch.Tensor:
    if not down.training:
        return out
    if p:
        out = torch.nn.functional.dropout(out, p)
    if rank_p:  # [B, ..., r]: a channel kept or dropped for all of a sample's tokens
        keep = torch.rand(out.shape[0], *[1] * (out.dim() - 2), out.shape[-1], device=out.device) >= rank_p
        out = out * keep.to(out.dtype) / (1 - rank_p)
    return out


def _module_dropout(p: float, up: torch.nn.Module, inputs, out: torch.Tensor) -> torch.Tensor:
    if not up.training:
        return out
    return out * (torch.rand((), device=out.device) >= p).to(out.dtype)


class _LoKrLinearWithoutModuleDropout(LoKrLinear):
    """PEFT's LoKr Linear with two changes that leave its result the same:

    - always in eval mode: in training mode its forward draws `torch.rand(1)` from the global RNG to decide module
      dropout, even at dropout 0 (which `torch.compile(fullgraph=True)` refuses as a data-dependent branch);
    - the update applied without building it: PEFT materialises w1 ⊗ w2 (out × in) for every call and multiplies
      by it, as much work as the frozen layer itself, and autograd keeps that matrix for backward. With x split into
      (c, d) blocks, x (w1 ⊗ w2)ᵀ = w1 · x · w2ᵀ: for a 3840 × 3840 projection at factor 4 that is 4× fewer
      multiply-adds and no 3840 × 3840 matrix (fewer still with w2 = w2_a · w2_b).

    The products are associative, so the order is free: w2 (or w2_b, down to its rank) first, then w1, then w2_a.
    With a decomposed w2, every tensor kept for backward past the input is then rank-sized; w1 first kept a
    full-size one per layer (on an H200 at 1024², LoKr r32 on attention took 3.6 GiB more than LoRA r32).
    """

    def train(self, mode: bool = True):
        return super().train(False)

    def _get_delta_activations(self, adapter_name: str, input: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if adapter_name in self.lokr_w1:
            w1 = self.lokr_w1[adapter_name]
        else:
            w1 = self.lokr_w1_a[adapter_name] @ self.lokr_w1_b[adapter_name]
        x = self._cast_input_dtype(input, w1.dtype).unflatten(-1, (w1.shape[1], -1))  # (..., in) as (..., c, d)
        if adapter_name in self.lokr_w2:  # (..., c, b), then (..., a, b)
            x = torch.matmul(w1, torch.matmul(x, self.lokr_w2[adapter_name].t()))
        else:  # w2 = w2_a (b × r) · w2_b (r × d): (..., c, r), then (..., a, r), then (..., a, b)
            x = torch.matmul(w1, torch.matmul(x, self.lokr_w2_b[adapter_name].t()))
            x = torch.matmul(x, self.lokr_w2_a[adapter_name].t())
        return x.flatten(-2) * self.scaling[adapter_name]


def init_lora_from(
    transformer: torch.nn.Module, path: str, config: LoraConfig | LoKrConfig, targets: list[str]
) -> list[str]:
    """Start the adapter added by `add_lora` from a saved one instead of from zero: each module's update equals
    the file's at strength 1, whatever the alpha of either (lora_A, or LoKr's w1, is divided by this adapter's
    alpha / r).

    Args:
        path: anything `lora_io.read_lora` reads (ours, ComfyUI/ai-toolkit, kohya; file, folder or hub id), holding
            a LoRA for a LoRA adapter or a LoKr for a LoKr one; a DoRA adapter takes a DoRA (its norms too) or a
            plain LoRA (the norms then made to fit it: `match_norms_to_lora_`).
        config, targets: what `add_lora` returned, and `lora_target_modules` for the same arguments.

    Returns:
        The targeted modules the file has no weights for (they start from zero as usual). Raises ValueError,
        naming the file and the flag to change, when the file is of the other kind, adapts modules not targeted, or
        its rank is above the run's (LoKr: its factor shapes differ); a LoRA module at a lower rank is padded
        (`pad_lower_ranks_`).
    """
    from peft.utils import set_peft_model_state_dict

    from .lora_io import DIFFUSERS_PREFIX, read_lora

    lokr, dora = isinstance(config, LoKrConfig), getattr(config, "use_dora", False)
    marker, kind, other = (".lokr_", "LoKr", "lora") if lokr else (".lora_", "LoRA", "lokr")
    state = {k.removeprefix(DIFFUSERS_PREFIX): v for k, v in read_lora(path).items()}
    if not all(marker in k for k in state):
        raise ValueError(f"{path} does not hold a {kind}: train with --adapter {other} to start from it")
    file_dora = any(k.endswith(MAGNITUDE) for k in state)
    if file_dora and not dora:
        raise ValueError(f"{path} holds a DoRA (its norms too): train with --adapter dora to start from it")
    modules = {k.rsplit(marker, 1)[0] for k in state}
    extra = sorted(modules - set(targets))
    if extra:
        raise ValueError(
            f"{path} adapts {len(extra)} module(s) this run does not target (e.g. {extra[0]}): pass --lora_targets "
            "covering them (attention, attention_ffn, all, or module names) and drop --lora_exclude_refiners if set"
        )
    if lokr:
        own = {n.removesuffix(".default"): tuple(p.shape) for n, p in transformer.named_parameters() if marker in n}
        different = [k for k in state if own.get(k) != tuple(state[k].shape)]
        if different:
            k = different[0]
            raise ValueError(
                f"{path} has LoKr factors this run does not (e.g. {k}: {tuple(state[k].shape)}, here "
                f"{own.get(k)}): pass the --lokr_factor and --rank it was trained with"
            )
        scale, first_factor = config.alpha / config.r, (".lokr_w1", ".lokr_w1_a")
    else:
        top = max(state[f"{m}.lora_A.weight"].shape[0] for m in modules)
        if top > config.r:
            raise ValueError(
                f"{path} has LoRA rank {top}, this run {config.r}: pass --rank {top}, or shrink the file first "
                f"(python lora_tools.py resize {path} --rank {config.r} --output_dir NEW_FOLDER)"
            )
        scale, first_factor = config.lora_alpha / config.r, (".lora_A.weight",)
    # PEFT multiplies the update by `scale`
    state = {k: v.float() / scale if k.endswith(first_factor) else v.float() for k, v in state.items()}
    if not lokr:
        pad_lower_ranks_(transformer, state, config.r)
    set_peft_model_state_dict(transformer, state, adapter_name="default")
    if dora and not file_dora:
        match_norms_to_lora_(transformer, modules)
    return [m for m in targets if m not in modules]


def match_norms_to_lora_(transformer: torch.nn.Module, modules: Iterable[str]) -> None:
    """A DoRA started from a plain LoRA: each module's norms set to those of its weight with the LoRA's update,
    ||W + s·BA|| per row (PEFT's DoRA initialisation, given those factors), so the model starts equal to the base with
    the LoRA applied."""
    for name in modules:
        layer = transformer.get_submodule(name)
        layer.lora_magnitude_vector["default"].update_layer(
            base_layer=layer.get_base_layer(),
            lora_A=layer.lora_A["default"].weight.detach(),
            lora_B=layer.lora_B["default"].weight.detach(),
            scaling=layer.scaling["default"],
        )


def pad_lower_ranks_(transformer: torch.nn.Module, state: dict[str, torch.Tensor], rank: int) -> None:
    """A module the file holds at a rank k below the run's (a file made smaller by `lora_tools.py resize`) gets
    rows k.. of A from the adapter's own initialisation and zero columns of B beside the file's: the update starts as
    the file's, and the rank it lacks trains as a new LoRA's does. In place, on `state` (keys without the prefix)."""
    for key in [k for k in state if k.endswith(".lora_A.weight")]:
        down, module = state[key], key.removesuffix(".lora_A.weight")
        if down.shape[0] < rank:
            own = transformer.get_submodule(module).lora_A["default"].weight
            up = state[f"{module}.lora_B.weight"]
            state[key] = torch.cat([down.to(own.device), own.detach()[down.shape[0] :].float()])
            state[f"{module}.lora_B.weight"] = torch.cat([up, up.new_zeros(up.shape[0], rank - up.shape[1])], dim=1)


def count_trainable_parameters(model: torch.nn.Module) -> int:
    """Number of parameters with `requires_grad` (after `add_lora`: the LoRA weights only)."""
    # DeepSpeed ZeRO-3 leaves an empty shard in `p` and records the full size in `ds_numel`.
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)
