"""`--ema_decay`: an exponential moving average of the LoRA weights, by diffusers' `EMAModel`.

Training goes on with the raw weights; the LoRA files written (final and in each checkpoint), the validation
samples and the held-out loss use the average. A checkpoint keeps both: the raw weights in accelerate's state (to resume the optimiser on)
and the average in `ema_lora.safetensors`, so a resumed run averages on exactly as an uninterrupted one.

EMAModel's decay warms up by itself: min(decay, (1 + n) / (10 + n)) after n updates, so the average soon forgets
the initial weights (zero lora_B) instead of dragging them along for ~1 / (1 - decay) steps.
"""

from contextlib import contextmanager
from pathlib import Path

import torch

EMA_STATE_NAME = "ema_lora.safetensors"


def require_ema_state(checkpoint: str | Path) -> Path:
    """The average's file in a checkpoint, or FileNotFoundError saying how to resume one written without it."""
    path = Path(checkpoint) / EMA_STATE_NAME
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing: that checkpoint was written without --ema_decay. Resume without --ema_decay, "
            "or start a new run."
        )
    return path


class LoraEMA:
    """The average of `named_params` (the trainable LoRA parameters, in a fixed order)."""

    def __init__(self, named_params: list[tuple[str, torch.nn.Parameter]], decay: float):
        from diffusers.training_utils import EMAModel

        self.names = [n for n, _ in named_params]
        self.params = [p for _, p in named_params]
        # The average is kept in fp32 even where DeepSpeed holds the LoRA in bf16: there a 0.001 step of the
        # average would round away. foreach (one kernel for all) needs equal dtypes; else one update per tensor.
        fp32 = all(p.dtype == torch.float32 for p in self.params)
        self.ema = EMAModel(self.params, decay=decay, foreach=fp32)
        self.ema.shadow_params = [s.float() for s in self.ema.shadow_params]

    def step(self) -> None:
        """After each optimiser step."""
        self.ema.step(self.params)

    @contextmanager
    def averaged(self):
        """Within the block the model's LoRA holds the average; the raw weights come back after it."""
        self.ema.store(self.params)
        self.ema.copy_to(self.params)
        try:
            yield
        finally:
            self.ema.restore(self.params)

    def save(self, directory: str | Path) -> None:
        from .lora_io import save_safetensors_atomic

        tensors = {
            n: s.detach().to("cpu", torch.float32).contiguous() for n, s in zip(self.names, self.ema.shadow_params)
        }
        metadata = {"updates": str(self.ema.optimization_step)}
        save_safetensors_atomic(tensors, Path(directory) / EMA_STATE_NAME, metadata)

    def load(self, directory: str | Path) -> None:
        from safetensors import safe_open

        path = require_ema_state(directory)
        with safe_open(str(path), "pt") as f:
            missing = set(self.names) - set(f.keys())
            if missing:
                raise ValueError(
                    f"{path} holds another LoRA (no {sorted(missing)[0]}): resume with the same LoRA flags"
                )
            for shadow, name in zip(self.ema.shadow_params, self.names):
                shadow.copy_(f.get_tensor(name))
            self.ema.optimization_step = int(f.metadata()["updates"])


@contextmanager
def averaged_weights(ema: LoraEMA | None):
    """`ema.averaged()`, or nothing when there is no average."""
    if ema is None:
        yield
    else:
        with ema.averaged():
            yield
