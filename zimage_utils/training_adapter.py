"""The Z-Image-Turbo "training adapter": a LoRA that undoes the step distillation, merged into the base at +scale
while training so that our LoRA learns only the new concept, and applied at −scale when sampling so that the
merged base is Turbo again and few-step sampling keeps working. Everything goes through diffusers/PEFT, except a
plain LoRA's merge into the base (`LinearUpdates`): PEFT merges a whole model where it lies, on the CPU for a base made
fp8 Linear by Linear on the GPU, or swapped into host memory: 10.3 GiB of host memory for the full model
(docs/BENCHMARKS.md). Ours adds each Linear's update on the GPU, just before it is quantised, or once it has landed."""

import warnings
from contextlib import contextmanager

import torch

from .block_swap import move_except_swapped
from .lora_edit import lora_factors
from .lora_io import read_lora

ADAPTER_NAME = "training_adapter"


def merge_training_adapter(
    transformer, path: str | dict[str, torch.Tensor], scale: float = 1.0
) -> dict[str, torch.Tensor]:
    """Fold the adapter (a file, or `read_lora`'s state dict of one) into the base weights at +scale, where they are (no
    LoRA layers remain). Call before adding the LoRA being trained. Returns the adapter's state dict, to apply at
    −scale when sampling."""
    state_dict = read_lora(path) if isinstance(path, str) else path
    transformer.load_lora_adapter(dict(state_dict), prefix="transformer", adapter_name=ADAPTER_NAME)
    transformer.fuse_lora(lora_scale=scale, adapter_names=[ADAPTER_NAME])
    transformer.unload_lora()  # keeps the fused weights, removes the adapter layers
    return state_dict


@contextmanager
def training_adapter_removed(
    transformer,
    state_dict: dict[str, torch.Tensor] | None,
    scale: float = 1.0,
    trained_adapter: str = "default",
    device: torch.device | str | None = None,
):
    """Within the block the model is base + trained LoRA: the merged adapter is cancelled by applying it again at
    −scale as a second adapter, whose layers go to `device` (default: beside each base weight, as PEFT puts them).
    Without a training adapter (state_dict None) this does nothing."""
    if state_dict is None:
        yield transformer
        return
    with warnings.catch_warnings():  # a second adapter beside the trained one is what this wants
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute", category=UserWarning)
        transformer.load_lora_adapter(dict(state_dict), prefix="transformer", adapter_name=f"{ADAPTER_NAME}_inverse")
    if device is not None:  # PEFT made a swapped block's beside its base weights, in host memory
        move_except_swapped(transformer, device)
    transformer.set_adapters([trained_adapter, f"{ADAPTER_NAME}_inverse"], [1.0, -scale])
    try:
        yield transformer
    finally:
        transformer.delete_adapters(f"{ADAPTER_NAME}_inverse")
        # set_adapters also restores requires_grad on the trained LoRA parameters
        transformer.set_adapters([trained_adapter], [1.0])


class LinearUpdates:
    """A plain LoRA's updates, added to base weights as they pass by: `store_fp8_` calls it with each Linear's bf16
    weight on the GPU just before quantising it, and `finish` adds the rest once the weights are in place. The
    sum is PEFT's merge on a CPU, bit for bit: A and B in the weight's dtype, B @ A · scale in fp32, rounded to that
    dtype, then added."""

    def __init__(self, updates: dict[str, tuple[torch.Tensor, torch.Tensor]], scale: float):
        self.updates, self.scale = dict(updates), scale

    @classmethod
    def of(cls, state_dict: dict[str, torch.Tensor], scale: float) -> "LinearUpdates | None":
        """From `read_lora`'s layout (`transformer.<module>.lora_A.weight` / `.lora_B.weight`); None for anything
        else (a LoKr), which `merge_training_adapter` merges."""
        try:
            return cls(lora_factors(state_dict, "the training adapter"), scale)
        except ValueError:
            return None

    def __call__(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """`weight` (of the Linear `name`) with its update added, if it has one (once: it is then used up)."""
        if name not in self.updates:
            return weight
        up, down = (t.to(weight.device, weight.dtype).float() for t in self.updates.pop(name))
        return weight + ((up @ down) * self.scale).to(weight.dtype)

    def finish(self, transformer: torch.nn.Module, device: torch.device | str | None = None) -> None:
        """Add the updates not used yet to their Linears' weights in place, wherever those are (a swapped block's in
        its pinned host buffer), computing on `device` (default: where each weight is)."""
        for name in list(self.updates):
            try:
                linear = transformer.get_submodule(name)
            except AttributeError:
                raise ValueError(f"the training adapter updates {name}, which this transformer lacks") from None
            weight = linear.weight.data
            weight.copy_(self(name, weight.to(device or weight.device)))
