"""Differential output preservation: precompute's `--preservation_class` caches each caption with the trigger replaced
by the class, and the trainer's `--preservation_weight` holds the LoRA's prediction for those captions to the base
model's, so the LoRA learns the trigger without changing the class."""

import datasets
import pytest
import torch
from diffusers import ZImagePipeline
from test_lora_io import transformer_output
from test_trainer import one_thread, precompute, train  # noqa: F401 (one_thread: an autouse fixture)

from zimage_utils import cache as cache_lib
from zimage_utils.images import preservation_caption
from zimage_utils.lora import add_lora
from zimage_utils.memory_budget import item_shapes, worst_case_batch
from zimage_utils.train_data import collate, load_caches
from zimage_utils.training_step import StepConfig, flow_matching_step, preservation_target


def test_the_trigger_is_replaced_as_whole_words_only():
    assert preservation_caption("sks person, smiling", "sks person", "person") == "person, smiling"
    assert preservation_caption("a photo of sks, and sks again", "sks", "a dog") == "a photo of a dog, and a dog again"
    assert preservation_caption("sksdog on grass", "sks", "dog") is None  # not the trigger as a word
    assert preservation_caption("a cat", "sks", "dog") is None


@pytest.fixture(scope="module")
def caches(tiny_model_dir, tiny_data_dir, tmp_path_factory):
    """The tiny data with the trigger "sks" and preservation class "shape"; and with the prefix "shape" alone, whose
    captions are what the first cache's preservation captions must be."""
    root = tmp_path_factory.mktemp("preservation")
    sks = precompute(
        tiny_model_dir, tiny_data_dir, root / "sks", "--caption_prefix", "sks", "--preservation_class", "shape"
    )
    shape = precompute(tiny_model_dir, tiny_data_dir, root / "shape", "--caption_prefix", "shape")
    return sks, shape


def records(cache) -> list[dict]:
    return datasets.load_from_disk(str(cache / cache_lib.DATA_DIR)).to_list()


def test_preservation_captions_are_encoded_as_the_class_caption_would_be(caches):
    sks, shape = (records(c) for c in caches)
    assert [r["source"] for r in sks] == [r["source"] for r in shape]
    for with_trigger, with_class in zip(sks, shape):
        assert with_trigger["caption"].startswith("sks, ")
        assert with_trigger["preservation_caption"] == with_class["caption"]
        assert with_trigger["preservation_length"] == with_class["caption_length"]
        assert with_trigger["preservation_embeds"] == with_class["caption_embeds"]  # bit for bit
        assert with_trigger["latents"] == with_class["latents"]
    assert all(r["preservation_embeds"] == b"" and r["preservation_length"] == 0 for r in shape)


def test_a_new_class_re_encodes_and_the_same_one_does_not(tiny_model_dir, tiny_data_dir, tmp_path, text_encoder_calls):
    flags = ["--caption_prefix", "sks", "--preservation_class"]
    precompute(tiny_model_dir, tiny_data_dir, tmp_path, *flags, "shape")
    first = len(text_encoder_calls)
    precompute(tiny_model_dir, tiny_data_dir, tmp_path, *flags, "shape")
    assert len(text_encoder_calls) == first + 1  # the empty caption only: every item was current
    precompute(tiny_model_dir, tiny_data_dir, tmp_path, *flags, "figure")
    assert all(r["preservation_caption"].startswith("figure, ") for r in records(tmp_path))


def test_precompute_is_refused_a_class_without_a_trigger(tiny_model_dir, tiny_data_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        precompute(tiny_model_dir, tiny_data_dir, tmp_path, "--preservation_class", "shape")
    assert "give it with --caption_prefix" in capsys.readouterr().err


def test_an_older_cache_is_extended_in_place(tiny_model_dir, tiny_data_dir, tmp_path):
    """A version-2 cache (no preservation columns) gets new images without re-encoding its own, and reads as 3."""
    cache = precompute(tiny_model_dir, tiny_data_dir, tmp_path / "cache")
    data = datasets.load_from_disk(str(cache / cache_lib.DATA_DIR))
    old = data.remove_columns(["preservation_caption", "preservation_embeds", "preservation_length"])
    old = old.filter(lambda r: r["source"] != data[0]["source"])  # one image new since
    cache_lib.save_dataset_atomic(old, cache / cache_lib.DATA_DIR)
    manifest = cache_lib.read_manifest(cache)
    cache_lib.write_json_atomic(cache / cache_lib.MANIFEST_NAME, {**manifest, "format_version": 2})

    precompute(tiny_model_dir, tiny_data_dir, cache)
    assert cache_lib.read_manifest(cache)["last_run"]["images"] == 1
    assert cache_lib.read_manifest(cache)["format_version"] == 3
    for now, before in zip(records(cache), data.to_list()):
        changed = {k for k in now if now[k] != before[k]}
        # the kept items are as they were; the new one's latents come from a batch of its own (other float sums)
        assert changed <= ({"latents"} if now["source"] == data[0]["source"] else set()), now["source"]


def test_the_base_prediction_is_the_model_without_the_lora_which_stays_on(tiny_model_dir):
    transformer = ZImagePipeline.from_pretrained(tiny_model_dir).transformer
    base = transformer_output(transformer)
    add_lora(transformer, rank=4, targets="all")
    for name, p in transformer.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)  # a LoRA that changes the output
    with_lora = transformer_output(transformer)
    assert (with_lora - base).abs().max() > 1e-2
    g = torch.Generator().manual_seed(123)  # transformer_output's inputs
    x = [torch.randn(16, 1, 4, 4, generator=g) for _ in range(2)]
    captions = [torch.randn(5, 16, generator=g), torch.randn(9, 16, generator=g)]
    target = preservation_target(transformer, x, torch.tensor([0.3, 0.8]), captions)
    torch.testing.assert_close(target, base.squeeze(2), rtol=0, atol=1e-6)
    torch.testing.assert_close(transformer_output(transformer), with_lora, rtol=0, atol=0)  # the LoRA is back on
    assert all(p.requires_grad for n, p in transformer.named_parameters() if "lora_" in n)


def lora_and_batch(model_dir, cache) -> tuple[torch.nn.Module, dict]:
    """The tiny transformer with a non-zero LoRA, and a batch of two of the cache's items with preservation captions."""
    transformer = ZImagePipeline.from_pretrained(model_dir).transformer
    torch.manual_seed(0)  # the LoRA's initial values, whatever ran before in this process
    add_lora(transformer, rank=4, targets="all")
    for name, p in transformer.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    train_set, _, _ = load_caches([cache], {})
    items = [train_set[i] for i in range(len(train_set))]
    items = [it for it in items if it["latents"].shape == items[0]["latents"].shape][:2]  # one bucket
    batch = collate(items)
    assert all(e is not None for e in batch["preservation_embeds"])
    return transformer, batch


def test_the_step_adds_the_weighted_preservation_loss_and_trains_through_it(tiny_model_dir, caches):
    transformer, batch = lora_and_batch(tiny_model_dir, caches[0])
    plain = flow_matching_step(transformer, batch, StepConfig(), [1, 2])
    weighted = flow_matching_step(transformer, batch, StepConfig(preservation_weight=0.5), [1, 2])
    assert "preservation" not in plain and weighted["preservation"] > 0
    torch.testing.assert_close(weighted["per_sample"], plain["per_sample"], rtol=0, atol=1e-5)
    torch.testing.assert_close(weighted["loss"], plain["loss"] + 0.5 * weighted["preservation"], rtol=1e-5, atol=0)
    weighted["loss"].backward()
    assert all(
        p.grad is not None and p.grad.abs().sum() > 0 for n, p in transformer.named_parameters() if "lora_" in n
    )


def test_blank_preservation_is_preservation_with_the_empty_caption_for_every_item(tiny_model_dir, caches):
    transformer, batch = lora_and_batch(tiny_model_dir, caches[0])
    empty, _ = cache_lib.load_prompt_embeddings(caches[0])
    blank = flow_matching_step(transformer, batch, StepConfig(blank_preservation_weight=0.5), [1, 2], empty)
    as_captions = dict(batch, preservation_embeds=[empty, empty])
    expected = flow_matching_step(transformer, as_captions, StepConfig(preservation_weight=0.5), [1, 2])
    assert blank["preservation"] > 0
    torch.testing.assert_close(blank["loss"], expected["loss"], rtol=0, atol=0)
    torch.testing.assert_close(blank["preservation"], expected["preservation"], rtol=0, atol=0)
    # with both, each item is preserved twice: the class caption's term and the empty caption's, each weighted
    config = StepConfig(preservation_weight=0.5, blank_preservation_weight=0.25)
    both = flow_matching_step(transformer, batch, config, [1, 2], empty)
    dop = flow_matching_step(transformer, batch, StepConfig(preservation_weight=0.5), [1, 2])
    terms = (both["loss"] - dop["loss"], 0.5 * (blank["loss"] - blank["per_sample"].mean()))
    torch.testing.assert_close(*terms, rtol=1e-5, atol=0)
    with pytest.raises(ValueError, match="empty-caption embedding"):
        flow_matching_step(transformer, batch, StepConfig(blank_preservation_weight=0.5), [1, 2])


def test_with_its_own_backward_the_step_runs_the_preservation_pass_after_the_batchs_backward(tiny_model_dir, caches):
    """What the trainer does outside DeepSpeed: the batch's forward and backward, then the preservation captions',
    so a step never holds the activations of both (the memory of a step without preservation); the gradients are
    those of the one forward pass over both."""
    transformer, batch = lora_and_batch(tiny_model_dir, caches[0])
    config = StepConfig(preservation_weight=0.5)
    together = flow_matching_step(transformer, batch, config, [1, 2])
    together["loss"].backward()
    lora = {n: p for n, p in transformer.named_parameters() if "lora_" in n}
    expected = {n: p.grad.clone() for n, p in lora.items()}
    transformer.zero_grad(set_to_none=True)

    events = []
    hook = transformer.register_forward_pre_hook(
        lambda module, args: events.append(("forward", len(args[0]), torch.is_grad_enabled()))
    )

    def backward(loss: torch.Tensor) -> None:
        events.append(("backward",))
        loss.backward()

    apart = flow_matching_step(transformer, batch, config, [1, 2], backward=backward)
    hook.remove()
    base_pass, batch_pass, preservation_pass = ("forward", 2, False), ("forward", 2, True), ("forward", 2, True)
    assert events == [base_pass, batch_pass, ("backward",), preservation_pass, ("backward",)]
    assert not apart["loss"].requires_grad
    torch.testing.assert_close(apart["loss"], together["loss"].detach(), rtol=1e-5, atol=0)
    torch.testing.assert_close(apart["preservation"], together["preservation"], rtol=1e-5, atol=0)
    for name, p in lora.items():  # equal up to the rounding of sums taken in another order: 1e-5 of the largest
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-4, atol=1e-5 * float(expected[name].abs().max()))


def test_the_memory_budget_measures_a_batch_with_preservation_captions(caches):
    train_set, _, _ = load_caches([caches[0]], {})
    buckets, lengths = item_shapes(train_set)
    assert max(lengths) == max(r["preservation_length"] for r in records(caches[0]))  # "shape" is the longer word
    batch = worst_case_batch(buckets, lengths, 2, 16, 16, preservation=True)
    assert [e.shape[0] for e in batch["preservation_embeds"]] == [max(lengths)] * 2


def test_training_with_preservation_needs_a_cache_that_has_it(tiny_model_dir, caches, tmp_path):
    with pytest.raises(ValueError, match="--preservation_class") as error:
        train(tiny_model_dir, caches[1], tmp_path, preservation_weight=1.0)
    assert str(caches[1]) in str(error.value)


def output_change(pipe_with_lora, base, cache, column=None, length_column=None, caption=None) -> float:
    """Mean squared difference between the LoRA model's and the base model's predictions over the cache's items at
    t = 0.5 (fixed noise), with each item's caption from `column` (or `caption` [L, D] for every item)."""
    fp = cache_lib.read_manifest(cache)["fingerprint"]
    total = 0.0
    rows = records(cache)
    for i, r in enumerate(rows):
        latents = cache_lib.bytes_to_tensor(r["latents"], torch.bfloat16, (16, r["bucket_height"] // 8, -1)).float()
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(i))
        x = [(0.5 * latents + 0.5 * noise).unsqueeze(1)]
        if column:
            caption = cache_lib.bytes_to_tensor(r[column], torch.bfloat16, (r[length_column], fp["embed_dim"]))
        with torch.no_grad():
            outs = [
                m(x, torch.tensor([0.5]), [caption.float()], return_dict=False)[0][0] for m in (pipe_with_lora, base)
            ]
        total += float((outs[0] - outs[1]).pow(2).mean())
    return total / len(rows)


def test_preservation_keeps_the_class_where_the_base_model_has_it(tiny_model_dir, caches, tmp_path):
    """The same memorising run without preservation, with --preservation_weight and with --blank_preservation_weight:
    with each, the LoRA changes the model's predictions for the captions preserved (the class captions; the empty
    caption) far less, and for the trigger captions about as much."""
    flags = dict(max_train_steps=120, learning_rate=5e-3, rank=8, lora_targets="all", train_batch_size=2)
    empty, _ = cache_lib.load_prompt_embeddings(caches[0])
    changes = {}
    for name, preserving in {
        "none": {},
        "class": {"preservation_weight": 1.0},
        "blank": {"blank_preservation_weight": 1.0},
    }.items():
        log = train(tiny_model_dir, caches[0], tmp_path / name, **preserving, **flags)
        assert ("loss/preservation" in log[-1]) == bool(preserving)
        base = ZImagePipeline.from_pretrained(tiny_model_dir).transformer
        pipe = ZImagePipeline.from_pretrained(tiny_model_dir)
        pipe.load_lora_weights(tmp_path / name)  # the saved file, as users load it
        changes[name] = {
            "class": output_change(pipe.transformer, base, caches[0], "preservation_embeds", "preservation_length"),
            "trigger": output_change(pipe.transformer, base, caches[0], "caption_embeds", "caption_length"),
            "empty": output_change(pipe.transformer, base, caches[0], caption=empty),
        }
    assert changes["class"]["class"] < 0.25 * changes["none"]["class"], changes  # measured 0.056 vs 0.383
    assert changes["class"]["trigger"] > 0.5 * changes["none"]["trigger"], changes  # measured 0.260 vs 0.394
    assert changes["blank"]["empty"] < 0.25 * changes["none"]["empty"], changes  # measured 0.052 vs 0.404
    assert changes["blank"]["trigger"] > 0.5 * changes["none"]["trigger"], changes  # measured 0.288 vs 0.394
