"""Training batches from the Arrow cache: one bucket per batch, a seeded shuffle per epoch, sharded across
processes, resumable at the exact next batch.

Batches are planned globally (`batch_size × num_processes` items, all from one bucket) and each process takes its
slice, so N processes at batch size b see the same global batches as one process at batch size N·b. Every random
choice about an item (noise, timestep, caption dropout, flip) is seeded from (seed, epoch, item index): a result
then does not depend on how many processes shared the work.
"""

import bisect
import hashlib
import logging
import random
from typing import Any

import torch

from . import cache as cache_lib
from .cache import decode_record
from .images import kohya_folder

logger = logging.getLogger(__name__)


def item_generator_seed(seed: int, epoch: int, index: int) -> int:
    """63-bit seed for everything random about dataset item `index` in `epoch`."""
    digest = hashlib.sha256(f"{seed}:{epoch}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def folder_repeats(source: str) -> int:
    """kohya's convention (`images.kohya_folder`): N for an item under a top folder named `N_name`, else 1."""
    folder = kohya_folder(source)
    return max(1, folder[0]) if folder else 1


class CachedLatentsDataset(torch.utils.data.Dataset):
    """Decoded records of one or more caches, each seen `repeats` times an epoch, its items' losses weighted by
    `loss_weights` (default 1 each): {"index", "loss_weight", and `cache.decode_record`'s tensors}. With
    `by_folder`, each item's count is also multiplied by its top folder's `N_` prefix (`folder_repeats`).

    Index i runs over the copies: cache 0's first copy of every item, then the second copy of every item counted at
    least twice, and so on, then cache 1's. Every random choice about an item is seeded from its index, so each copy
    of a repeated image gets its own noise and timestep. Caches made at different resolutions mix freely: a batch
    always holds one bucket.
    """

    def __init__(
        self,
        caches: list[tuple[Any, dict[str, Any]]],
        repeats: list[int] | None = None,
        loss_weights: list[float] | None = None,
        by_folder: bool = False,
    ):
        self.caches = caches  # [(datasets.Dataset, manifest)]
        self.repeats = repeats or [1] * len(caches)
        self.loss_weights = loss_weights or [1.0] * len(caches)
        if len(self.repeats) != len(caches) or min(self.repeats) < 1:
            raise ValueError(f"give one repeat count of at least 1 per cache (got {self.repeats} for {len(caches)})")
        if len(self.loss_weights) != len(caches) or min(self.loss_weights) < 0:
            raise ValueError(
                f"give one loss weight of at least 0 per cache (got {self.loss_weights} for {len(caches)})"
            )
        # Per cache, the row of each copy in index order
        self.rows = []
        for (data, _), r in zip(caches, self.repeats):
            counts = [r * folder_repeats(s) for s in data["source"]] if by_folder else [r] * len(data)
            self.rows.append([j for copy in range(max(counts, default=0)) for j, n in enumerate(counts) if n > copy])
        self.starts = [0]
        for rows in self.rows:
            self.starts.append(self.starts[-1] + len(rows))

    def __len__(self) -> int:
        return self.starts[-1]

    def columns(self, names: list[str], defaults: dict[str, Any] | None = None) -> dict[str, list]:
        """Metadata columns over every cache's items, each item once (repeats left out). A column that a cache of
        an older format lacks takes `defaults[name]` for each of its items."""
        defaults, out = defaults or {}, {name: [] for name in names}
        for data, _ in self.caches:
            table = data.select_columns([n for n in names if n in data.column_names]).to_dict()
            for name in names:
                out[name] += table[name] if name in table else [defaults[name]] * len(data)
        return out

    def group_keys(self, by_caption_length: bool) -> list[tuple]:
        """Per index, the key items must share to be batched together: bucket, and caption length if asked
        (equal lengths let the transformer skip its attention mask and use the fastest SDPA kernels)."""
        names = ["bucket_height", "bucket_width"] + (["caption_length"] if by_caption_length else [])
        keys = []
        for (data, _), rows in zip(self.caches, self.rows):
            table = data.select_columns(names).to_dict()
            per_item = list(zip(*(table[c] for c in names)))
            keys += [per_item[j] for j in rows]
        return keys

    def locate(self, index: int) -> tuple[int, int]:
        """(cache, row in it) of dataset index `index`."""
        which = bisect.bisect_right(self.starts, index) - 1
        return which, self.rows[which][index - self.starts[which]]

    def __getitem__(self, index: int) -> dict[str, Any]:
        which, row = self.locate(index)
        data, manifest = self.caches[which]
        return {"index": index, "loss_weight": self.loss_weights[which], **decode_record(data[row], manifest)}


def folder_repeats_summary(dataset: CachedLatentsDataset) -> str:
    """One line on what `by_folder` made of each top folder: 'cache: 10_a 12 images x10, (other paths) 3 x1'."""
    parts = []
    for (data, _), r in zip(dataset.caches, dataset.repeats):
        folders: dict[str, list[int]] = {}
        for source in data["source"]:
            top, sep, _ = source.partition("/")
            folders.setdefault(top if sep and folder_repeats(source) > 1 else "(other paths)", []).append(
                r * folder_repeats(source)
            )
        described = ", ".join(f"{name} {len(n)} images x{n[0]}" for name, n in sorted(folders.items()))
        parts.append(described)
    return "; ".join(parts) + f" (an epoch: {len(dataset)} items)"


def load_caches(
    paths: list[str],
    expected: dict[str, Any],
    repeats: list[int] | None = None,
    validation_split: float = 0.0,
    seed=0,
    loss_weights: list[float] | None = None,
    by_folder: bool = False,
) -> tuple[CachedLatentsDataset, CachedLatentsDataset | None, dict[str, Any]]:
    """(training set, held-out set or None, what the caches hold together) over one or more caches, each checked
    against `expected` (see `cache.load_cache`). `validation_split` holds out that fraction of every cache; the
    held-out loss is not weighted by `loss_weights`. `by_folder`: kohya's `N_name` folder repeats (`folder_repeats`).

    The third item: {"resolutions": sorted distinct, "caption_prefixes": distinct, non-empty, "empty_embeds" [L,D]
    (the first cache's; the same text encoder gives every cache the same), "validation_prompts" [cache.CachedPrompt]
    (each distinct prompt line of any cache, once), "without_flipped_latents": the caches made without --cache_flipped,
    "num_masked": items with a loss mask}.
    """
    train, held_out, manifests, prompts, unflipped = [], [], [], {}, []
    empty = None
    for path in paths:
        data, manifest = cache_lib.load_cache(path, expected)
        if not manifest["fingerprint"].get("cache_flipped"):
            unflipped.append(str(path))
        if validation_split > 0:
            split = data.train_test_split(test_size=validation_split, seed=seed)
            data = split["train"]
            held_out.append((split["test"], manifest))
        train.append((data, manifest))
        manifests.append(manifest)
        cache_empty, cache_prompts = cache_lib.load_prompt_embeddings(path)
        empty = cache_empty if empty is None else empty
        for cached in cache_prompts:
            prompts.setdefault(cached.prompt, cached)
    info = {
        "resolutions": sorted({m["fingerprint"]["resolution"] for m in manifests}),
        "caption_prefixes": list(dict.fromkeys(m["caption_prefix"] for m in manifests if m.get("caption_prefix"))),
        "empty_embeds": empty,
        "validation_prompts": list(prompts.values()),
        "without_flipped_latents": unflipped,
        "num_masked": sum(m.get("num_masked", 0) for m in manifests),
    }
    held_out_set = CachedLatentsDataset(held_out) if held_out else None
    return CachedLatentsDataset(train, repeats, loss_weights, by_folder), held_out_set, info


class BucketBatchSampler(torch.utils.data.Sampler):
    """Yields this process's list of dataset indices for each step of the current epoch.

    Global batches hold `batch_size * num_replicas` items of one group (bucket, optionally caption length);
    a group's remainder that cannot fill a global batch is dropped for this epoch (a different remainder next
    epoch, as the shuffle changes). `set_epoch(epoch, start_batch)` positions it; `start_batch` is how resume
    continues on the exact next batch.
    """

    def __init__(
        self,
        group_keys: list[tuple],
        batch_size: int,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        shuffle: bool = True,
    ):
        self.group_keys, self.batch_size = group_keys, batch_size
        self.num_replicas, self.rank, self.seed, self.shuffle = num_replicas, rank, seed, shuffle
        self.epoch, self.start_batch = 0, 0
        self.global_batch = batch_size * num_replicas
        groups: dict[tuple, list[int]] = {}
        for i, key in enumerate(group_keys):
            groups.setdefault(key, []).append(i)
        self.groups = [groups[k] for k in sorted(groups)]
        if len(self) == 0:
            sizes = ", ".join(str(len(g)) for g in self.groups)
            raise ValueError(
                f"No group of same-size images fills one global batch of {self.global_batch} "
                f"(train_batch_size {batch_size} x {num_replicas} processes; group sizes: {sizes}). "
                "Lower --train_batch_size, use fewer processes, or add images."
            )

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def global_batches(self) -> list[list[int]]:
        """All global batches of the current epoch, in order."""
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        batches = []
        for group in self.groups:
            order = list(group)
            if self.shuffle:
                rng.shuffle(order)
            usable = len(order) - len(order) % self.global_batch
            batches += [order[i : i + self.global_batch] for i in range(0, usable, self.global_batch)]
        if self.shuffle:
            rng.shuffle(batches)
        return batches

    def __len__(self) -> int:
        return sum(len(g) // self.global_batch for g in self.groups)

    def __iter__(self):
        for batch in self.global_batches()[self.start_batch :]:
            yield batch[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack latents [B,C,h,w] (one bucket per batch, so equal shapes); keep caption embeddings as a list of
    [L_i, D], which is what the transformer takes. "masks": uint8 [B,1,h,w] when any item has a loss mask (255
    everywhere for those without), else None. "caption_variants": per item, the list of its other captions'
    embeddings, when any item has one, else None. "loss_weights": [B] float when any item's is not 1, else None.
    "preservation_embeds": per item, its preservation caption's embedding or None, when any item has one, else None."""
    masks = None
    if any(it.get("mask") is not None for it in items):
        whole = torch.full((1, *items[0]["latents"].shape[1:]), 255, dtype=torch.uint8)
        masks = torch.stack([it["mask"] if it.get("mask") is not None else whole for it in items])
    variants = [it.get("caption_variants") or [] for it in items]
    weights = [it.get("loss_weight", 1.0) for it in items]
    preservation = [it.get("preservation_embeds") for it in items]
    return {
        "preservation_embeds": preservation if any(p is not None for p in preservation) else None,
        "loss_weights": torch.tensor(weights) if any(w != 1.0 for w in weights) else None,
        "masks": masks,
        "caption_variants": variants if any(variants) else None,
        "indices": torch.tensor([it["index"] for it in items]),
        "latents": torch.stack([it["latents"] for it in items]),
        "latents_flipped": torch.stack([it["latents_flipped"] for it in items])
        if all(it["latents_flipped"] is not None for it in items)
        else None,
        "caption_embeds": [it["caption_embeds"] for it in items],
    }


def training_data(args, accelerator, expected: dict[str, Any]):
    """The trainer's caches (`--precomputed_dir`, `--repeats`, `--loss_weights`, `--folder_repeats`,
    `--validation_split`), checked against `expected` (see `cache.load_cache`): (training set, held-out set or None,
    this process's `BucketBatchSampler`, what the caches hold together as `load_caches` gives it)."""
    weighting = dict(repeats=args.repeats, loss_weights=args.loss_weights, by_folder=args.folder_repeats)
    train, val_data, caches = load_caches(
        args.precomputed_dir, expected, **weighting, validation_split=args.validation_split, seed=args.seed
    )
    if args.folder_repeats and accelerator.is_main_process:
        logger.info(f"--folder_repeats: {folder_repeats_summary(train)}")
    if args.random_flip > 0 and caches["without_flipped_latents"]:
        raise ValueError(
            f"--random_flip needs mirrored latents, which {', '.join(caches['without_flipped_latents'])} does not "
            "hold: re-run precompute_embeddings.py there with --cache_flipped, or drop --random_flip."
        )
    if args.preservation_weight > 0:
        check_preservation_captions(train, args.precomputed_dir)
    keys = train.group_keys(args.group_by_caption_length)
    sampler = BucketBatchSampler(
        keys, args.train_batch_size, accelerator.num_processes, accelerator.process_index, args.seed
    )
    return train, val_data, sampler, caches


def train_loader(
    train: CachedLatentsDataset, sampler: BucketBatchSampler, args, device
) -> torch.utils.data.DataLoader:
    """The loop's DataLoader over `training_data`'s set and sampler (`--dataloader_num_workers`, `--seed`)."""
    return torch.utils.data.DataLoader(
        train,
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=args.dataloader_num_workers,
        pin_memory=device.type == "cuda",
        # Its own generator: each new iterator draws a seed, and from the global RNG that draw would shift LoRA
        # dropout after a mid-epoch resume (a fresh iterator there, none in the uninterrupted run).
        generator=torch.Generator().manual_seed(args.seed),
    )


def check_caption_lengths(sets: list, prompts: list, limit: int, model: str) -> None:
    """Refuse caches holding a caption (a variant, a preservation caption, a validation prompt) longer than `limit`
    tokens, `model_loading.longest_caption`, which would stop the run with an index error at its batch. `sets`: the
    training and held-out `CachedLatentsDataset`s (None for none); `prompts`: the cached validation prompts."""
    names = ["source", "caption_length", "variant_lengths", "preservation_length"]
    lengths = [(cached.embeds.shape[0], f"validation prompt {cached.prompt!r}") for cached in prompts]
    for data in filter(None, sets):
        columns = data.columns(names, defaults={"variant_lengths": [], "preservation_length": 0})
        for source, n, variants, preservation in zip(*(columns[name] for name in names), strict=True):
            lengths.append((max([n, preservation, *variants]), source))
    longest, source = max(lengths)
    if longest > limit:
        raise ValueError(
            f"{source} has a caption of {longest} tokens; {model}'s transformer places at most {limit}: re-run "
            f"precompute_embeddings.py with --max_sequence_length {limit} (or less) and --overwrite"
        )


def check_preservation_captions(train: CachedLatentsDataset, paths: list[str]) -> None:
    """--preservation_weight needs the preservation captions `precompute_embeddings.py --preservation_class` caches:
    an error when no cache holds any, a note when some items have none (they train without preservation)."""
    lengths = train.columns(["preservation_length"], defaults={"preservation_length": 0})["preservation_length"]
    without = sum(n == 0 for n in lengths)
    if without == len(lengths):
        raise ValueError(
            f"--preservation_weight needs preservation captions, which {', '.join(map(str, paths))} does not hold: "
            "re-run precompute_embeddings.py there with --caption_prefix TRIGGER --preservation_class CLASS (e.g. "
            '"person"), or drop --preservation_weight.'
        )
    if without:
        logger.info(f"--preservation_weight: {without} of {len(lengths)} cached items have no preservation caption")
