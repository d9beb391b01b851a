"""Training batches from the cache: one bucket per batch, the same global batches however many processes share
them, and a position (epoch, batch) that resume can restart from exactly."""

import shutil

import pytest
import torch
from conftest import TINY_CACHE_VALIDATION_PROMPTS
from test_trainer import precompute, train

from zimage_utils.cache import load_cache
from zimage_utils.train_data import (
    BucketBatchSampler,
    CachedLatentsDataset,
    collate,
    folder_repeats,
    folder_repeats_summary,
    item_generator_seed,
    load_caches,
)

# 15 items in three buckets (height, width) of 7, 5 and 3 items, interleaved as a folder of mixed images would be.
KEYS = [(64, 64), (48, 80), (80, 48)] * 3 + [(64, 64), (48, 80)] * 2 + [(64, 64), (64, 64)]


def test_every_batch_comes_from_one_bucket_and_no_item_repeats_in_an_epoch():
    sampler = BucketBatchSampler(KEYS, batch_size=2)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 3 + 2 + 1  # 7 // 2 + 5 // 2 + 3 // 2
    assert all(len(batch) == 2 and len({KEYS[i] for i in batch}) == 1 for batch in batches)
    items = [i for batch in batches for i in batch]
    assert len(items) == len(set(items)) == 12  # each bucket's remainder waits for another epoch


def test_two_processes_at_batch_1_see_the_batches_of_one_process_at_batch_2():
    single = BucketBatchSampler(KEYS, batch_size=2, seed=3)
    ranks = [BucketBatchSampler(KEYS, batch_size=1, num_replicas=2, rank=r, seed=3) for r in range(2)]
    for epoch in range(3):
        for sampler in [single, *ranks]:
            sampler.set_epoch(epoch)
        assert [a + b for a, b in zip(*(list(s) for s in ranks))] == list(single)


def test_each_epoch_reshuffles_and_set_epoch_resumes_at_the_exact_batch():
    sampler = BucketBatchSampler(KEYS, batch_size=2, seed=0)
    sampler.set_epoch(1)
    epoch_1 = list(sampler)
    sampler.set_epoch(0)
    assert list(sampler) != epoch_1
    restarted = BucketBatchSampler(KEYS, batch_size=2, seed=0)  # a new process after an interruption
    restarted.set_epoch(1, start_batch=4)
    assert list(restarted) == epoch_1[4:]


def test_no_bucket_large_enough_for_a_global_batch_is_explained():
    with pytest.raises(
        ValueError, match=r"global batch of 8 \(train_batch_size 4 x 2 processes; group sizes: 5, 7, 3\)"
    ):
        BucketBatchSampler(KEYS, batch_size=4, num_replicas=2)


def test_item_seeds_depend_on_seed_epoch_and_item_only():
    assert item_generator_seed(0, 1, 5) == item_generator_seed(0, 1, 5)
    assert len({item_generator_seed(0, 1, 5), item_generator_seed(0, 2, 5), item_generator_seed(1, 1, 5)}) == 3
    assert 0 <= item_generator_seed(0, 1, 5) < 2**63  # fits torch.Generator.manual_seed


def test_cached_items_collate_into_a_training_batch(tiny_cache_dir):
    data, manifest = load_cache(tiny_cache_dir)
    dataset = CachedLatentsDataset([(data, manifest)])
    keys = dataset.group_keys(by_caption_length=False)
    indices = next(iter(BucketBatchSampler(keys, batch_size=2)))
    batch = collate([dataset[i] for i in indices])
    height, width = keys[indices[0]]
    assert batch["indices"].tolist() == indices
    assert batch["latents"].shape == (2, 16, height // 8, width // 8)
    assert batch["latents_flipped"] is None  # the cache was made without --cache_flipped
    assert [c.shape[1] for c in batch["caption_embeds"]] == [16, 16]  # a list: caption lengths may differ
    # Grouping by caption length too adds the length to each key
    assert all(len(key) == 3 for key in dataset.group_keys(by_caption_length=True))


def test_repeated_caches_give_each_copy_its_own_index(tiny_cache_dir):
    """A cache given twice, the second seen 3 times an epoch: 4 copies of each item, each under its own index (its
    noise and timestep are seeded from it) and each decoding the same record."""
    data, manifest = load_cache(tiny_cache_dir)
    n = len(data)
    dataset = CachedLatentsDataset([(data, manifest), (data, manifest)], repeats=[1, 3])
    assert len(dataset) == 4 * n
    keys = dataset.group_keys(by_caption_length=False)
    assert keys == CachedLatentsDataset([(data, manifest)]).group_keys(by_caption_length=False) * 4
    copies = [dataset[k * n + 5] for k in range(4)]
    assert [c["index"] for c in copies] == [5, n + 5, 2 * n + 5, 3 * n + 5]
    for copy in copies[1:]:
        torch.testing.assert_close(copy["latents"], copies[0]["latents"])
    # The memory budget sizes its worst batch from each item once, not from the copies
    assert len(dataset.columns(["bucket_height"])["bucket_height"]) == 2 * n


def test_kohya_folder_prefixes_repeat_their_items(tiny_cache_dir):
    """by_folder: `3_cat/…` items come 3 times an epoch, times the cache's repeats; other paths once. The first copy
    of every item comes first, in cache order, so an epoch without such folders is what it was."""
    data, manifest = load_cache(tiny_cache_dir)
    n = len(data)
    sources = [f"3_cat/{i}.png" if i < 4 else f"1_dog/{i}.png" if i < 6 else f"photos/{i}.png" for i in range(n - 1)]
    sources.append("10_flat.png")  # not a folder: once
    data = data.remove_columns("source").add_column("source", sources)
    assert [folder_repeats(s) for s in ("3_cat/a.png", "0_x/a.png", "x_3/a.png", "10_flat.png")] == [3, 1, 1, 1]
    for repeats in (1, 2):
        dataset = CachedLatentsDataset([(data, manifest)], repeats=[repeats], by_folder=True)
        counts = [repeats * (3 if i < 4 else 1) for i in range(n)]
        assert len(dataset) == sum(counts)
        rows = [dataset.locate(i) for i in range(len(dataset))]
        assert {cache for cache, _ in rows} == {0}
        assert [row for _, row in rows[:n]] == list(range(n))  # every item's first copy, in order
        assert [sum(row == j for _, row in rows) for j in range(n)] == counts
        per_item = CachedLatentsDataset([(data, manifest)]).group_keys(by_caption_length=False)
        assert dataset.group_keys(by_caption_length=False) == [per_item[row] for _, row in rows]
    assert CachedLatentsDataset([(data, manifest)], repeats=[2]).rows == [list(range(n)) * 2]  # by_folder off
    summary = folder_repeats_summary(CachedLatentsDataset([(data, manifest)], by_folder=True))
    assert summary == f"(other paths) {n - 4} images x1, 3_cat 4 images x3 (an epoch: {n + 8} items)"


def test_a_kohya_dataset_trains_from_one_cache(tiny_model_dir, tiny_data_dir, tmp_path, caplog):
    """`img/5_shapes/` without caption files and `img/more/` with them: the precompute's --folder_captions captions
    the first folder's images "shapes", and the trainer's --folder_repeats sees them 5 times an epoch."""
    data = tmp_path / "data"
    for i, image in enumerate(sorted(tiny_data_dir.glob("*.png"))[:6]):
        folder = data / ("5_shapes" if i < 2 else "more")
        folder.mkdir(parents=True, exist_ok=True)
        for path in (image,) if i < 2 else (image, image.with_suffix(".txt")):
            shutil.copy(path, folder / path.name)
    with caplog.at_level("INFO"):
        cache = precompute(tiny_model_dir, data, tmp_path / "cache", "--folder_captions")
    assert "missing caption, used its folder's name" in caplog.text
    dataset, _ = load_cache(cache)
    captions = dict(zip(dataset["source"], dataset["caption"]))
    assert len(captions) == 6 and [c for s, c in captions.items() if s.startswith("5_shapes/")] == ["shapes"] * 2
    assert all(
        captions[f"more/{p.name}"] == p.with_suffix(".txt").read_text().strip() for p in (data / "more").glob("*.png")
    )
    caplog.clear()
    with caplog.at_level("INFO"):
        records = train(tiny_model_dir, cache, tmp_path / "out", max_train_steps=1, folder_repeats=True)
    assert "--folder_repeats: (other paths) 4 images x1, 5_shapes 2 images x5 (an epoch: 14 items)" in caplog.text
    assert records and records[-1]["step"] == 1


def test_several_caches_pool_their_prompts_and_hold_out_from_each(tiny_cache_dir):
    train, held_out, info = load_caches([tiny_cache_dir, tiny_cache_dir], {}, validation_split=0.25, seed=0)
    assert (len(train), len(held_out)) == (2 * 9, 2 * 3)  # 12 items each, a quarter of each held out
    assert [p.prompt.text for p in info["validation_prompts"]] == TINY_CACHE_VALIDATION_PROMPTS  # each prompt once
    assert info["resolutions"] == [64] and info["empty_embeds"].ndim == 2


def test_each_caches_loss_weight_reaches_the_batch_and_weighs_its_items_in_the_loss(tiny_cache_dir):
    from test_masks import ZeroPrediction

    from zimage_utils.training_step import StepConfig, flow_matching_step

    train, held_out, _ = load_caches([tiny_cache_dir] * 2, {}, loss_weights=[1.0, 0.25], validation_split=0.25)
    n = len(train) // 2
    assert [train[i]["loss_weight"] for i in (0, n - 1, n, 2 * n - 1)] == [1.0, 1.0, 0.25, 0.25]
    assert held_out[0]["loss_weight"] == 1.0  # the held-out loss stays a plain measurement
    same_bucket = [j for j in range(2 * n) if train[j]["latents"].shape == train[0]["latents"].shape]
    assert collate([train[0], train[same_bucket[1]]])["loss_weights"] is None  # all 1: the step is unchanged

    batch = collate([train[0], train[next(j for j in same_bucket if j >= n)]])  # one item of each cache
    torch.testing.assert_close(batch["loss_weights"], torch.tensor([1.0, 0.25]))
    out = flow_matching_step(ZeroPrediction(), batch, StepConfig(), [3, 4])
    torch.testing.assert_close(out["loss"], (out["per_sample"] * torch.tensor([1.0, 0.25])).mean())
    with pytest.raises(ValueError, match="one loss weight of at least 0 per cache"):
        load_caches([tiny_cache_dir], {}, loss_weights=[1.0, 2.0])


def test_the_start_up_line_says_what_will_not_happen_as_the_flags_suggest():
    from argparse import Namespace

    from zimage_utils.run_plan import run_notes
    from zimage_utils.train_data import BucketBatchSampler

    sampler = BucketBatchSampler([(64, 64)] * 5 + [(48, 96)] * 3, batch_size=4)  # the second bucket fills no batch
    args = Namespace(mask_floor=0.1, mask_prior_weight=0.0, validation_steps=100, validation_epochs=0)
    args.checkpointing_minutes = 0
    args.checkpointing_steps = args.checkpointing_epochs = 0
    args.lr_warmup_steps = 1500
    caches = {"num_masked": 0, "validation_prompts": []}
    assert "no checkpoint will be saved before step 1500: a run stopped" in run_notes(args, caches, sampler, 0, 1500)
    assert "no checkpoint" not in run_notes(args, caches, sampler, 1000, 1500)  # 500 steps to go: cheap to redo
    notes = run_notes(args, caches, sampler, global_step=1500, max_steps=1500)
    assert "no loss masks in the cache(s), so --mask_floor does nothing" in notes
    assert "3 items never train: their buckets hold fewer than a global batch (lower --train_batch_size)" in notes
    assert "validation gives the held-out loss only, no samples" in notes
    assert "the checkpoint is at step 1500: nothing left to train (raise --max_train_steps)" in notes
    assert "--lr_warmup_steps 1500 is not shorter than the run's 1500 steps: the learning rate never reaches" in notes
    args.lr_warmup_steps = 100
    caches = {"num_masked": 8, "validation_prompts": [("a photo", None)]}
    sampler = BucketBatchSampler([(64, 64)] * 8, batch_size=4)
    args.checkpointing_epochs = 1
    assert run_notes(args, caches, sampler, 0, 1500) == "; 8 items with a loss mask"
    assert "; fp16 is untested with Z-Image" in run_notes(args, caches, sampler, 0, 1500, precision="fp16")
