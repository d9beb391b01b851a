"""The Z-Image-Turbo "training adapter": a LoRA that undoes the step distillation, merged into the base at +scale
while training so that our LoRA learns only the new concept, and applied at −scale when sampling so that the
merged base is Turbo again and few-step sampling keeps working. Everything goes through diffusers/PEFT."""

from contextlib import contextmanager

import torch

from .lora_io import read_lora

ADAPTER_NAME = "training_adapter"


def merge_training_adapter(transformer, path: str, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """Fold the adapter into the base weights at +scale (no LoRA layers remain). Call before adding the LoRA
    being trained. Returns the adapter's state dict, to apply at −scale when sampling."""
    state_dict = read_lora(path)
    transformer.load_lora_adapter(dict(state_dict), prefix="transformer", adapter_name=ADAPTER_NAME)
    transformer.fuse_lora(lora_scale=scale, adapter_names=[ADAPTER_NAME])
    transformer.unload_lora()  # keeps the fused weights, removes the adapter layers
    return state_dict


@contextmanager
def training_adapter_removed(
    transformer, state_dict: dict[str, torch.Tensor] | None, scale: float = 1.0, trained_adapter: str = "default"
):
    """Within the block the model is base + trained LoRA: the merged adapter is cancelled by applying it again at
    −scale as a second adapter. Without a training adapter (state_dict None) this does nothing."""
    if state_dict is None:
        yield transformer
        return
    transformer.load_lora_adapter(dict(state_dict), prefix="transformer", adapter_name=f"{ADAPTER_NAME}_inverse")
    transformer.set_adapters([trained_adapter, f"{ADAPTER_NAME}_inverse"], [1.0, -scale])
    try:
        yield transformer
    finally:
        transformer.delete_adapters(f"{ADAPTER_NAME}_inverse")
        # set_adapters also restores requires_grad on the trained LoRA parameters
        transformer.set_adapters([trained_adapter], [1.0])
