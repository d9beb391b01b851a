"""Caption variants: precompute_embeddings.py --caption_variants caches every line of a caption (or every caption of a
metadata list) as the pipeline would encode it, and the trainer draws one of them per item per epoch."""

import json
import logging
import random

import pytest
import torch
from conftest import pipeline_embeddings, script_pipeline
from PIL import Image
from test_masks import precompute
from test_trainer import train

from zimage_utils import cache as cache_lib
from zimage_utils.images import shuffled_tags
from zimage_utils.memory_budget import item_shapes
from zimage_utils.train_data import collate, load_caches
from zimage_utils.training_step import StepConfig, flow_matching_step, variant_choices


@pytest.fixture
def folder(tmp_path):
    data = tmp_path / "images"
    data.mkdir()
    for i, name in enumerate(("a", "b", "c")):
        Image.new("RGB", (64, 64), (40 * i, 90, 200)).save(data / f"{name}.png")
    (data / "a.txt").write_text("a blue square\n\n  a square, blue, on its own  \nsks style\n")
    (data / "b.txt").write_text("one caption only\n")
    (data / "c.txt").write_text("a green square\nsquare\n")
    return data


def test_each_line_is_a_variant_encoded_as_the_pipeline_encodes_a_prompt(tiny_model_dir, folder, tmp_path):
    flags = ["--caption_variants", "--caption_prefix", "sks", "--cache_dtype", "fp32"]
    records, manifest = precompute(tiny_model_dir, folder, tmp_path / "cache", *flags)
    a = records["a.png"]
    assert a["caption"] == "sks, a blue square"  # the first line; blank lines dropped, the prefix on every variant
    assert a["caption_variants"] == ["sks, a square, blue, on its own", "sks style"]
    assert records["b.png"]["caption_variants"] == [] and manifest["fingerprint"]["caption_variants"]
    assert a["variant_lengths"] == [len(e) for e in cache_lib.decode_record(a, manifest)["caption_variants"]]

    pipe = script_pipeline(tiny_model_dir)
    tensors = cache_lib.decode_record(a, manifest)
    for text, embeds in zip(
        [a["caption"], *a["caption_variants"]], [tensors["caption_embeds"], *tensors["caption_variants"]]
    ):
        assert torch.equal(embeds, pipeline_embeddings(pipe, text))


def test_without_the_flag_a_multi_line_caption_stays_one_caption(tiny_model_dir, folder, tmp_path):
    records, _ = precompute(tiny_model_dir, folder, tmp_path / "cache")
    assert records["c.png"]["caption"] == "a green square\nsquare" and records["c.png"]["caption_variants"] == []


def test_a_variants_trigger_placeholder_without_a_trigger_word_is_noted(tiny_model_dir, folder, tmp_path):
    (folder / "c.txt").write_text("a green square\n[trigger] square\n")
    records, manifest = precompute(tiny_model_dir, folder, tmp_path / "cache", "--caption_variants")
    assert records["c.png"]["caption_variants"] == ["[trigger] square"]
    notes = [n["reason"] for n in manifest["notes"] if n["source"] == "c.png"]
    assert notes == ["a caption variant's [trigger] left as it is: pass --caption_prefix"]


def test_a_metadata_list_gives_the_variants_and_an_edited_variant_is_re_encoded(
    tiny_model_dir, folder, tmp_path, caplog
):
    rows = [
        {"file_name": "a.png", "text": ["first", "second"]},
        {"file_name": "b.png", "text": "only one"},
        {"file_name": "c.png", "text": ["third"]},
    ]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    caplog.set_level(logging.INFO, logger="precompute")
    records, _ = precompute(tiny_model_dir, folder, tmp_path / "cache", "--caption_variants")
    assert [(r["caption"], r["caption_variants"]) for r in records.values()] == [
        ("first", ["second"]),
        ("only one", []),
        ("third", []),
    ]

    rows[0]["text"][1] = "a better second"
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    caplog.clear()
    records, _ = precompute(tiny_model_dir, folder, tmp_path / "cache", "--caption_variants")
    assert "(1 new, 2 kept)" in caplog.text and records["a.png"]["caption_variants"] == ["a better second"]


def test_every_variant_is_drawn_from_the_items_seed():
    seeds = list(range(600))
    chosen = variant_choices(seeds, [2] * 600)
    assert chosen == variant_choices(seeds, [2] * 600)  # the same seed, the same caption
    assert 150 < min(chosen.count(k) for k in range(3))  # each of the three about a third of the time
    assert variant_choices(seeds, [0] * 600) == [0] * 600


class CaptionRecorder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.frozen = torch.nn.Parameter(torch.zeros(1), requires_grad=False)
        self.seen = []

    def forward(self, x, t, captions, return_dict=False):
        self.seen.append(captions)
        return ([torch.zeros_like(item) for item in x],)


def test_the_step_trains_each_item_on_its_drawn_caption_and_dropout_still_applies():
    first = [torch.full((3, 8), 1.0), torch.full((2, 8), 2.0)]
    variants = [[torch.full((4, 8), 10.0), torch.full((5, 8), 11.0)], []]
    items = [
        {"index": i, "latents": torch.zeros(16, 4, 4), "latents_flipped": None, "caption_embeds": first[i]}
        for i in range(2)
    ]
    batch = collate([{**it, "caption_variants": v} for it, v in zip(items, variants)])
    assert collate(items)["caption_variants"] is None

    model, empty = CaptionRecorder(), torch.zeros(1, 8)
    for seed in range(20):
        flow_matching_step(model, batch, StepConfig(), [seed, seed + 100])
        k = variant_choices([seed], [2])[0]
        expected = first[0] if k == 0 else variants[0][k - 1]
        assert torch.equal(model.seen[-1][0], expected) and torch.equal(model.seen[-1][1], first[1])
    assert {float(c[0][0, 0]) for c in model.seen} == {1.0, 10.0, 11.0}

    flow_matching_step(model, batch, StepConfig(caption_dropout=1.0), [3, 4], empty_embeds=empty)
    assert all(torch.equal(c, empty) for c in model.seen[-1])


def test_the_trainer_trains_on_a_cache_with_variants(tiny_model_dir, folder, tmp_path):
    records, _ = precompute(tiny_model_dir, folder, tmp_path / "cache", "--caption_variants")
    # --max_memory_gb measures a batch with the longest caption of any variant
    items, _, _ = load_caches([str(tmp_path / "cache")], expected={})
    buckets, lengths = item_shapes(items)
    assert buckets == [(64, 64)] * 3
    assert lengths == [max([r["caption_length"], *r["variant_lengths"]]) for r in records.values()]
    assert lengths != [r["caption_length"] for r in records.values()]  # a variant is the longest somewhere
    log = train(tiny_model_dir, tmp_path / "cache", tmp_path / "out", max_train_steps=4, caption_dropout=0.2)
    losses = [r["loss"] for r in log if "loss" in r]
    assert len(losses) == 4 and all(0 < loss < 10 for loss in losses)


def test_variants_encoded_several_batches_at_a_time_give_the_same_cache(tiny_model_dir, folder, tmp_path):
    # --text_batch_size 3 with image batches of 1: one text-encoder call holds three items' captions and variants
    flags = ["--caption_variants", "--cache_dtype", "fp32", "--batch_size", "1"]
    grouped, _ = precompute(tiny_model_dir, folder, tmp_path / "grouped", *flags, "--text_batch_size", "3")
    alone, manifest = precompute(tiny_model_dir, folder, tmp_path / "alone", *flags)
    assert grouped.keys() == alone.keys()
    for source, record in alone.items():
        assert grouped[source]["caption_variants"] == record["caption_variants"]
        assert grouped[source]["variant_lengths"] == record["variant_lengths"]
        ours, theirs = (cache_lib.decode_record(r, manifest) for r in (grouped[source], record))
        for a, b in zip(
            [ours["caption_embeds"], *ours["caption_variants"]],
            [theirs["caption_embeds"], *theirs["caption_variants"]],
        ):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_the_text_encoder_gets_no_more_texts_per_call_than_without_variants(
    tiny_model_dir, folder, tmp_path, text_encoder_calls
):
    records, _ = precompute(tiny_model_dir, folder, tmp_path / "alone", "--caption_variants", "--batch_size", "2")
    # 3 + 1 + 2 texts, two at most a call (+ the empty caption, for caption dropout)
    assert max(text_encoder_calls) <= 2 and sum(text_encoder_calls) == 6 + 1
    text_encoder_calls.clear()
    flags = ["--caption_variants", "--batch_size", "1", "--text_batch_size", "2"]  # captions of 2 batches at once
    grouped, _ = precompute(tiny_model_dir, folder, tmp_path / "grouped", *flags)
    assert max(text_encoder_calls) <= 2 and sum(text_encoder_calls) == 6 + 1
    assert [r["variant_lengths"] for r in grouped.values()] == [r["variant_lengths"] for r in records.values()]


def test_shuffled_tags_keep_the_first_tags_and_draw_distinct_orderings():
    rng = random.Random(0)
    orderings = shuffled_tags("sks, red hair,  smiling , outdoors,, night", 5, keep=1, rng=rng)
    assert len(orderings) == 5 and len(set(orderings)) == 5
    for ordering in orderings:
        tags = ordering.split(", ")
        assert tags[0] == "sks" and sorted(tags[1:]) == ["night", "outdoors", "red hair", "smiling"]
        assert ordering != "sks, red hair, smiling, outdoors, night"  # other orderings than the caption's own
    assert shuffled_tags("a, b", 5, keep=0, rng=rng) == ["b, a"]  # all the orderings there are
    assert shuffled_tags("a photo of a cat", 3, keep=0, rng=rng) == []  # one tag: nothing to shuffle


def test_shuffle_caption_caches_seeded_orderings_as_variants_and_a_re_run_encodes_nothing(
    tiny_model_dir, folder, tmp_path, caplog
):
    (folder / "a.txt").write_text("blue, square, plain background, centered\n")
    flags = ["--shuffle_caption", "3", "--keep_tokens", "1", "--caption_prefix", "sks", "--cache_dtype", "fp32"]
    records, manifest = precompute(tiny_model_dir, folder, tmp_path / "cache", *flags)
    a = records["a.png"]
    assert a["caption"] == "sks, blue, square, plain background, centered"
    assert len(a["caption_variants"]) == 2 and len(set(a["caption_variants"])) == 2
    for variant in a["caption_variants"]:  # the trigger in front, then the kept tag, then the rest in another order
        assert variant.startswith("sks, blue, ") and variant != a["caption"]
        assert sorted(variant.split(", ")) == sorted(a["caption"].split(", "))
    assert records["b.png"]["caption_variants"] == []  # "one caption only": a single tag

    pipe = script_pipeline(tiny_model_dir)
    for text, embeds in zip(a["caption_variants"], cache_lib.decode_record(a, manifest)["caption_variants"]):
        assert torch.equal(embeds, pipeline_embeddings(pipe, text))

    caplog.set_level(logging.INFO, logger="precompute")
    again, _ = precompute(tiny_model_dir, folder, tmp_path / "cache", *flags)
    assert "(0 new, 3 kept)" in caplog.text and again["a.png"]["caption_variants"] == a["caption_variants"]


def test_keep_tokens_without_shuffle_caption_is_refused(tiny_model_dir, folder, tmp_path, capsys):
    import precompute_embeddings

    with pytest.raises(SystemExit):
        precompute_embeddings.parse_args(
            ["--pretrained_model_name_or_path", str(tiny_model_dir), "--train_data_dir", str(folder)]
            + ["--output_dir", str(tmp_path / "cache"), "--keep_tokens", "1"]
        )
    assert "add --shuffle_caption N" in capsys.readouterr().err
