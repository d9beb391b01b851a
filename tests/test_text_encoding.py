"""Caption embeddings: bit for bit what ZImagePipeline.encode_prompt gives, plus truncation reporting."""

import pytest
import torch
from conftest import SCRIPT_DEVICE, SCRIPT_DTYPE

from zimage_utils.text_encoding import count_tokens, encode_captions, mask_to_slice
from zimage_utils.tiny import make_tiny_pipeline

CAPTIONS = [
    "",
    "a red circle",
    "a large purple triangle on a white background",
    "a small blue square on a green background, " * 60,  # far over 512 tokens
]


@pytest.fixture(scope="module")
def pipe():
    """On a GPU host, in the dtype the scripts use there (bf16): equal there too, not only in fp32 on the CPU."""
    return make_tiny_pipeline(seed=0).to(SCRIPT_DEVICE, SCRIPT_DTYPE)


@pytest.mark.parametrize("max_sequence_length", [512, 32])
def test_embeddings_equal_the_pipeline_bit_for_bit(pipe, max_sequence_length):
    captions = list(CAPTIONS)
    ours, truncated = encode_captions(captions, pipe.tokenizer, pipe.text_encoder, max_sequence_length)
    # The pipeline overwrites the list it is given with the templated prompts, so give it a copy.
    reference, _ = pipe.encode_prompt(
        list(CAPTIONS), do_classifier_free_guidance=False, max_sequence_length=max_sequence_length
    )

    assert captions == CAPTIONS
    assert len(ours) == len(reference) == len(CAPTIONS)
    for mine, theirs in zip(ours, reference):
        assert mine.shape == theirs.shape and mine.shape[1] == pipe.text_encoder.config.hidden_size
        assert torch.equal(mine, theirs)

    counts = count_tokens(CAPTIONS, pipe.tokenizer)
    assert [emb.shape[0] for emb in ours] == [min(n, max_sequence_length) for n in counts]
    assert truncated == [n > max_sequence_length for n in counts]


def test_only_the_over_long_caption_is_flagged_truncated(pipe):
    _, truncated = encode_captions(CAPTIONS, pipe.tokenizer, pipe.text_encoder, max_sequence_length=32)
    assert truncated == [False, False, False, True]
    counts = count_tokens(CAPTIONS, pipe.tokenizer)
    assert counts[0] > 0  # "" still carries the chat template's tokens
    assert counts[-1] > 512 and max(counts[:-1]) <= 32


def test_a_caption_embeds_the_same_alone_or_in_a_batch(pipe):
    # Padding to max_sequence_length makes each row independent of its batch mates (here: fp32 on the CPU), so a
    # cache built in batches holds what encoding one caption at a time would give.
    batched, _ = encode_captions(CAPTIONS, pipe.tokenizer, pipe.text_encoder)
    for caption, embedding in zip(CAPTIONS, batched):
        alone, _ = encode_captions([caption], pipe.tokenizer, pipe.text_encoder)
        assert torch.equal(alone[0], embedding)


def test_empty_list_and_no_grad(pipe):
    assert encode_captions([], pipe.tokenizer, pipe.text_encoder) == ([], [])
    embeddings, _ = encode_captions(["a red circle"], pipe.tokenizer, pipe.text_encoder)
    assert not embeddings[0].requires_grad and not embeddings[0].is_inference()


def test_left_padded_captions_also_equal_the_pipeline_bit_for_bit(pipe):
    # Kept tokens are cut out with a slice worked out on the host (no wait for the accelerator); with left padding
    # the run of kept tokens ends the row instead of starting it.
    pipe.tokenizer.padding_side = "left"
    try:
        ours, _ = encode_captions(CAPTIONS[:3], pipe.tokenizer, pipe.text_encoder, 64)
        reference, _ = pipe.encode_prompt(
            list(CAPTIONS[:3]), do_classifier_free_guidance=False, max_sequence_length=64
        )
    finally:
        pipe.tokenizer.padding_side = "right"
    for mine, theirs in zip(ours, reference):
        assert torch.equal(mine, theirs)


@pytest.mark.parametrize(
    "mask, kept",
    [([1, 1, 1, 0, 0], slice(0, 3)), ([0, 0, 1, 1, 1], slice(2, 5)), ([1, 1], slice(0, 2)), ([1, 0, 1], None)],
)
def test_mask_to_slice_gives_the_masked_rows_or_none_for_a_mask_with_holes(mask, kept):
    assert mask_to_slice(mask) == kept
    hidden = torch.randn(len(mask), 4)
    if kept is not None:
        assert torch.equal(hidden[kept], hidden[torch.tensor(mask).bool()])
