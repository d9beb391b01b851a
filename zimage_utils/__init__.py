"""Shared code for the Z-Image LoRA scripts."""
