"""Which Linears of the Z-Image transformer get a LoRA, and what `add_lora` leaves trainable."""

import copy

import pytest
import torch

from zimage_utils.lora import LORA_TARGET_PRESETS, add_lora, count_trainable_parameters, lora_target_modules
from zimage_utils.tiny import make_tiny_pipeline

ATTENTION = ["attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0"]
FFN = ["feed_forward.w1", "feed_forward.w2", "feed_forward.w3"]


@pytest.fixture(scope="module")
def base_transformer():
    # Tiny model: 2 main layers, 1 noise refiner and 1 context refiner (the latter without adaLN modulation).
    return make_tiny_pipeline(seed=0).transformer


@pytest.fixture
def transformer(base_transformer):
    return copy.deepcopy(base_transformer)


def _in_blocks(blocks: list[str], suffixes: list[str]) -> list[str]:
    return [f"{block}.{suffix}" for block in blocks for suffix in suffixes]


def test_presets_resolve_to_full_module_names(transformer):
    main = ["layers.0", "layers.1"]
    assert lora_target_modules(transformer, "attention", exclude_refiners=True) == _in_blocks(main, ATTENTION)
    assert lora_target_modules(transformer, "attention_ffn", exclude_refiners=True) == _in_blocks(
        main, ATTENTION + FFN
    )
    assert lora_target_modules(transformer, "all", exclude_refiners=True) == _in_blocks(
        main, ATTENTION + FFN + ["adaLN_modulation.0"]
    )


def test_refiners_are_included_unless_excluded(transformer):
    names = lora_target_modules(transformer, "all", exclude_refiners=False)
    assert "noise_refiner.0.attention.to_q" in names
    assert "noise_refiner.0.adaLN_modulation.0" in names
    assert "context_refiner.0.feed_forward.w2" in names
    assert "context_refiner.0.adaLN_modulation.0" not in names  # the context refiner has no modulation
    kept = lora_target_modules(transformer, "all", exclude_refiners=True)
    assert set(names) - set(kept) == {n for n in names if "refiner" in n}
    # The embedders and final layer are never part of a preset.
    assert not any(n.startswith(("t_embedder", "cap_embedder", "all_x_embedder", "all_final_layer")) for n in names)


def test_module_names_can_be_given_directly(transformer):
    assert lora_target_modules(transformer, "to_q,to_v", exclude_refiners=True) == [
        "layers.0.attention.to_q",
        "layers.0.attention.to_v",
        "layers.1.attention.to_q",
        "layers.1.attention.to_v",
    ]
    assert lora_target_modules(transformer, ["layers.1.feed_forward.w2"]) == ["layers.1.feed_forward.w2"]


def test_unknown_target_error_lists_the_choices(transformer):
    with pytest.raises(ValueError) as err:
        lora_target_modules(transformer, "atention")
    message = str(err.value)
    assert "atention" in message
    assert all(preset in message for preset in LORA_TARGET_PRESETS)
    assert "feed_forward.w1" in message
    with pytest.raises(ValueError, match="to_z"):
        lora_target_modules(transformer, ["to_q", "to_z"])


@pytest.mark.parametrize("targets", list(LORA_TARGET_PRESETS))
def test_add_lora_trains_only_fp32_lora_weights(transformer, targets):
    transformer.to(torch.bfloat16)  # as in training: the frozen base in bf16
    config = add_lora(transformer, rank=4, alpha=8, targets=targets, exclude_refiners=False)
    assert config.r == 4 and config.lora_alpha == 8

    trainable = {n: p for n, p in transformer.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert all(p.dtype == torch.float32 for p in trainable.values())
    frozen_dtypes = {p.dtype for n, p in transformer.named_parameters() if not p.requires_grad}
    assert frozen_dtypes == {torch.bfloat16}

    # Each adapted Linear [out, in] gets lora_A [r, in] + lora_B [out, r].
    modules = dict(transformer.named_modules())
    targeted = lora_target_modules(make_tiny_pipeline(seed=0).transformer, targets)
    expected = sum(4 * (modules[n].in_features + modules[n].out_features) for n in targeted)
    count = count_trainable_parameters(transformer)
    print(f"{targets}: {len(targeted)} modules, {count} trainable LoRA parameters")
    assert count == expected
    # lora_B starts at zero: before training the adapted model is the base model.
    assert all(p.abs().sum() == 0 for n, p in trainable.items() if ".lora_B." in n)


def test_exclude_refiners_leaves_refiners_untouched(transformer):
    add_lora(transformer, rank=2, alpha=2, targets="attention", exclude_refiners=True)
    lora_params = [n for n, _ in transformer.named_parameters() if ".lora_" in n]
    assert lora_params and not any("refiner" in n for n in lora_params)


@pytest.mark.parametrize("rank", [64, 2], ids=["w2-full", "w2-decomposed"])
def test_lokr_layers_compute_what_peft_computes_without_building_the_kronecker_product(transformer, rank):
    """Our LoKr Linear applies w1 · x · w2ᵀ per block of x; PEFT's builds w1 ⊗ w2 and multiplies by it. On a
    non-square Linear (the feed-forward's w1), scale alpha / r = 3: the same output and gradients."""
    from peft.tuners.lokr.layer import Linear as PeftLoKrLinear

    add_lora(transformer, rank=rank, alpha=3 * rank, targets=["layers.0.feed_forward.w1"], adapter="lokr")
    layer = transformer.get_submodule("layers.0.feed_forward.w1")
    assert isinstance(layer, PeftLoKrLinear) and type(layer) is not PeftLoKrLinear
    assert layer.in_features != layer.out_features
    assert ("default" in layer.lokr_w2) == (rank == 64)  # a full w2, or w2_a · w2_b
    g = torch.Generator().manual_seed(0)
    params = [p for p in layer.parameters() if p.requires_grad]
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g))
    x = torch.randn(2, 7, layer.in_features, generator=g)

    def output_and_grads(delta):
        out = layer.base_layer(x) + delta(layer, "default", x)
        return out, torch.autograd.grad(out.square().sum(), params)

    ours = output_and_grads(type(layer)._get_delta_activations)
    peft = output_and_grads(PeftLoKrLinear._get_delta_activations)
    torch.testing.assert_close(ours[0], peft[0], rtol=1e-5, atol=1e-4)
    for a, b in zip(ours[1], peft[1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3)


def test_kohyas_dropouts_act_on_the_lora_factors_in_training_only(transformer):
    """--network_dropout drops elements of the down projection's output, --rank_dropout whole rank channels of a
    sample (all its tokens), --module_dropout a layer's whole update; kept values are scaled as kohya scales them."""
    from zimage_utils.lora import add_lora_dropouts

    layers = len(lora_target_modules(transformer, "attention"))
    add_lora(transformer, rank=64, targets="attention")
    assert add_lora_dropouts(transformer, network=0.5, rank=0.25, module=0.5) == layers
    layer = transformer.get_submodule("layers.0.attention.to_q")
    down, up = layer.lora_A["default"], layer.lora_B["default"]
    torch.nn.init.normal_(up.weight)
    x, h = torch.randn(4, 16, layer.in_features), torch.randn(3, 64)
    plain, update = torch.nn.functional.linear(x, down.weight), torch.nn.functional.linear(h, up.weight)
    torch.manual_seed(0)
    transformer.eval()
    assert torch.equal(down(x), plain) and torch.equal(up(h), update)  # nothing outside training
    transformer.train()
    out = down(x)
    kept = out != 0
    torch.testing.assert_close(out[kept], (plain / (0.5 * 0.75))[kept])  # both dropouts' scales on what is kept
    channels = kept.any(dim=1)  # [sample, channel]: a channel some token kept
    assert 0.6 < channels.float().mean() < 0.9  # rank dropout: a quarter of a sample's channels, for all its tokens
    assert 0.3 < kept.float().mean() < 0.45  # and network dropout half of the rest: 3/8 kept
    updates = [up(h) for _ in range(200)]
    assert all(u.eq(0).all() or torch.equal(u, update) for u in updates)  # a layer's update whole or not at all
    assert 60 < sum(bool(u.eq(0).all()) for u in updates) < 140  # left out half the time
