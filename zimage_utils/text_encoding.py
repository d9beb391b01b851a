"""Caption embeddings exactly as `ZImagePipeline.encode_prompt` makes them, for caching and training.

Qwen3 chat template (`enable_thinking=True`, generation prompt) -> tokens padded to `max_sequence_length` ->
`hidden_states[-2]` -> only the positions the attention mask keeps, so each caption gives `[L_i, hidden]`.

Padding stays at `max_sequence_length`, as in the pipeline. Padding only to the longest caption of the batch would
save compute, but it is not bit-identical even in fp32 on the CPU: on the tiny model the caption that fills the
batch came out ~4e-9 off (other pad lengths happened to match: a property of the attention kernels, not something to
rely on), and a cache should hold what the pipeline itself would feed the transformer.
"""

import logging
from collections.abc import Sequence

import torch

logger = logging.getLogger(__name__)


def apply_chat_template(tokenizer, caption: str) -> str:
    """The templated text the pipeline tokenises for one caption."""
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": caption}], tokenize=False, add_generation_prompt=True, enable_thinking=True
    )


def count_tokens(captions: list[str], tokenizer) -> list[int]:
    """Token count of each templated caption, before truncation (compare with `max_sequence_length`)."""
    texts = [apply_chat_template(tokenizer, caption) for caption in captions]
    # verbose=False: counting long captions is the point here, so skip the "longer than model_max_length" warning.
    return [len(ids) for ids in tokenizer(texts, padding=False, truncation=False, verbose=False)["input_ids"]]


def encode_captions(
    captions: list[str],
    tokenizer,
    text_encoder,
    max_sequence_length: int = 512,
    device: str | torch.device | None = None,
    padding: str = "max_length",
) -> tuple[list[torch.Tensor], list[bool]]:
    """Embed captions in one forward pass, bit for bit as `ZImagePipeline.encode_prompt(captions)` does.

    Args:
        captions: raw captions (the chat template is applied here); "" is allowed.
        tokenizer / text_encoder: the pipeline's Qwen tokenizer and `Qwen3Model`.
        max_sequence_length: tokens per templated caption, template included (the pipeline's default is 512).
        device: where the encoder runs; defaults to the encoder's device.
        padding: "max_length" (as the pipeline: bit-identical) or "longest" (pad to the batch's longest caption:
            up to ~4x less text-encoder work for short captions, equal to "max_length" only up to kernel rounding).

    Returns:
        embeddings: one `[L_i, hidden]` tensor per caption (hidden = 2560 for the real model) in the encoder's
            dtype on `device`, where L_i = min(templated tokens, max_sequence_length). They are views into the
            batch's `[B, S, hidden]` hidden states, cut without waiting for the accelerator.
        truncated: per caption, whether its templated token count exceeded `max_sequence_length`.
    """
    if not captions:
        return [], []
    device = torch.device(device) if device is not None else text_encoder.device
    texts = [apply_chat_template(tokenizer, caption) for caption in captions]
    lengths = [len(ids) for ids in tokenizer(texts, padding=False, truncation=False, verbose=False)["input_ids"]]
    if padding not in ("max_length", "longest"):
        raise ValueError(f"padding must be 'max_length' or 'longest', got {padding!r}")
    inputs = tokenizer(texts, padding=padding, max_length=max_sequence_length, truncation=True, return_tensors="pt")
    # The kept positions are known here, on the host: slicing `hidden` with them queues a view instead of the
    # pipeline's `hidden[i][masks[i]]`, whose output size the host would have to wait for the accelerator to learn.
    kept = [mask_to_slice(row) for row in inputs.attention_mask.tolist()]
    input_ids, masks = _to_device(inputs.input_ids, device), _to_device(inputs.attention_mask, device).bool()
    # no_grad rather than inference_mode: embeddings made on the fly may feed a LoRA-wrapped layer whose backward
    # needs to save them, which inference tensors forbid.
    with torch.no_grad():
        hidden = text_encoder(input_ids=input_ids, attention_mask=masks, output_hidden_states=True).hidden_states[-2]
    embeddings = [hidden[i, k] if k is not None else hidden[i][masks[i]] for i, k in enumerate(kept)]
    return embeddings, [length > max_sequence_length for length in lengths]


def offload_text_encoder(text_encoder, device: str | torch.device) -> None:
    """Keep the (CPU-loaded) `text_encoder`'s weights in host RAM and bring one decoder layer at a time to `device`
    while it runs: diffusers' group offloading. On CUDA the weights wait in pinned memory and the next layer is copied
    on a side stream while the current one computes, so the GPU holds about two layers (~0.2 GB each for Qwen3-4B)
    plus the embeddings (0.8 GB) instead of 8 GB. The same arithmetic as the resident model.

    Pinning copies every weight before the unpinned originals are freed, so setting up needs the weights' size again
    in free host RAM (8 GB for Qwen3-4B). Where less is available, each layer is pinned as it moves instead
    (diffusers' `low_cpu_mem_usage`): no second copy, slower transfers."""
    from diffusers.hooks import apply_group_offloading

    from .model_loading import pin_as_needed

    device = torch.device(device)
    low_ram = pin_as_needed(text_encoder)
    if low_ram and device.type == "cuda":
        logger.warning(
            "--text_encoder_offload: too little free host RAM to pin a copy of the text encoder up front (its size "
            "again); each layer is pinned as it moves instead (slower)"
        )
    apply_group_offloading(
        text_encoder,
        onload_device=device,
        offload_device="cpu",
        offload_type="block_level",
        num_blocks_per_group=1,
        use_stream=device.type == "cuda",
        low_cpu_mem_usage=low_ram,
    )


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor.to(device)` without waiting for the work already queued there. A plain `.to("cuda")` waits for the
    CUDA stream to drain; a non-blocking copy from pinned memory does not, and PyTorch's pinned-memory cache keeps
    the buffer until the copy is done."""
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def mask_to_slice(mask: Sequence[int]) -> slice | None:
    """The positions one row of an attention mask keeps, as a slice, or None when they are not one run.

    Left or right padding keeps one run ([0, 0, 1, 1] -> slice(2, 4)), so `hidden[i, mask_to_slice(row)]` holds the
    same rows as `hidden[i][row.bool()]`; a mask with holes ([1, 0, 1]) gives None and needs the boolean index.
    """
    ones = [i for i, m in enumerate(mask) if m]
    if not ones or ones[-1] - ones[0] + 1 != len(ones):
        return None
    return slice(ones[0], ones[-1] + 1)
