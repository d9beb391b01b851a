"""Shared code for the Z-Image LoRA scripts.

Importing it (the scripts do, before anything loads a diffusers model) quiets the import-time notes of optional
libraries that say nothing about the run: torchao's and bitsandbytes' optional kernels that this platform lacks
("Failed to load ..."), and torch's deprecation note on torchao's enums. Every other message of theirs passes."""

import logging


class _ImportNoise(logging.Filter):
    PREFIXES = ("Failed to load", "<enum '")

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.PREFIXES)


for _name in ("torchao", "bitsandbytes.backends.cpu.ops", "torch.utils._pytree"):
    logging.getLogger(_name).addFilter(_ImportNoise())
