"""Caption embeddings exactly as `ZImagePipeline.encode_prompt` makes them, for caching and training.

Qwen3 chat template (`enable_thinking=True`, generation prompt) -> tokens padded to `max_sequence_length` ->
`hidden_states[-2]` -> only the positions the attention mask keeps, so each caption gives `[L_i, hidden]`.

Padding stays at `max_sequence_length`, as in the pipeline. Padding only to the longest caption of the batch would
save compute, but it is not bit-identical even in fp32 on the CPU: on the tiny model the caption that fills the
batch came out ~4e-9 off (other pad lengths happened to match: a property of the attention kernels, not something to
rely on), and a cache should hold what the pipeline itself would feed the transformer.
"""

import torch


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
            dtype on `device`, where L_i = min(templated tokens, max_sequence_length).
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
    input_ids = inputs.input_ids.to(device)
    masks = inputs.attention_mask.to(device).bool()
    # no_grad rather than inference_mode: embeddings made on the fly may feed a LoRA-wrapped layer whose backward
    # needs to save them, which inference tensors forbid.
    with torch.no_grad():
        hidden = text_encoder(input_ids=input_ids, attention_mask=masks, output_hidden_states=True).hidden_states[-2]
    embeddings = [hidden[i][masks[i]] for i in range(len(texts))]
    return embeddings, [length > max_sequence_length for length in lengths]
