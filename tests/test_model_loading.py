"""What a model path holds, loading the Z-Image components, and the config fingerprint that guards caches."""

import copy
import json
import logging
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from zimage_utils.model_loading import (
    component_config_hash,
    component_weight_files,
    detect_model_type,
    load_scheduler,
    load_text_encoder_and_tokenizer,
    load_transformer,
    load_vae,
    require_zimage,
    stored_dtype,
)
from zimage_utils.tiny import make_tiny_pipeline


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(folder, pipeline): the tiny Z-Image saved as a diffusers folder, and the in-memory original."""
    pipe = make_tiny_pipeline(seed=0)
    folder = tmp_path_factory.mktemp("tiny") / "zimage"
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder, pipe


def write_index(folder, index: dict):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


SDXL_INDEX = {
    "_class_name": "StableDiffusionXLPipeline",
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
SD15_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "text_encoder": ["transformers", "CLIPTextModel"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
FLUX_INDEX = {
    "_class_name": "FluxPipeline",
    "transformer": ["diffusers", "FluxTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def test_saved_tiny_zimage_is_detected(tiny):
    folder, _ = tiny
    assert detect_model_type(str(folder)) == "zimage"
    require_zimage(str(folder))  # no error


@pytest.mark.parametrize(
    "index, expected, described",
    [
        (SDXL_INDEX, "sdxl", "Stable Diffusion XL model (model_index.json _class_name=StableDiffusionXLPipeline"),
        (SD15_INDEX, "sd15", "Stable Diffusion 1.x/2.x model (model_index.json _class_name=StableDiffusionPipeline"),
        (FLUX_INDEX, "unknown", "not a Z-Image model (model_index.json _class_name=FluxPipeline"),
    ],
)
def test_other_models_are_named_in_the_error(tmp_path, index, expected, described):
    folder = write_index(tmp_path / "other_model", index)
    assert detect_model_type(str(folder)) == expected
    with pytest.raises(ValueError) as error:
        require_zimage(str(folder))
    message = str(error.value)
    assert str(folder) in message and described in message
    assert "needs a Z-Image model such as Tongyi-MAI/Z-Image-Turbo" in message


def test_component_classes_decide_without_a_class_name(tmp_path):
    zimage = {"transformer": ["diffusers", "ZImageTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"]}
    sdxl = {k: v for k, v in SDXL_INDEX.items() if k != "_class_name"}
    assert detect_model_type(str(write_index(tmp_path / "z", zimage))) == "zimage"
    assert detect_model_type(str(write_index(tmp_path / "x", sdxl))) == "sdxl"


def test_missing_folder_file_or_index_is_a_clear_error(tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(ValueError, match="no such folder") as error:
        require_zimage(str(missing))
    assert str(missing) in str(error.value)

    empty = tmp_path / "empty_folder"
    empty.mkdir()
    with pytest.raises(ValueError, match="has no model_index.json"):
        require_zimage(str(empty))

    checkpoint = tmp_path / "model.safetensors"
    checkpoint.write_bytes(b"")
    with pytest.raises(ValueError, match="is a file, not a diffusers model folder"):
        detect_model_type(str(checkpoint))


def test_hub_id_offline_and_not_cached_is_a_clear_error():
    with pytest.raises(ValueError, match="not in the Hugging Face cache") as error:
        detect_model_type("nobody-here/not-a-model")
    assert "nobody-here/not-a-model" in str(error.value)


def test_component_loaders_load_the_tiny_folder(tiny):
    folder, pipe = tiny
    text_encoder, tokenizer = load_text_encoder_and_tokenizer(str(folder), dtype=torch.float32, device="cpu")
    vae = load_vae(str(folder), dtype=torch.float32, device="cpu")
    transformer = load_transformer(str(folder), dtype=torch.float32, device="cpu")
    scheduler = load_scheduler(str(folder))

    assert type(text_encoder).__name__ == "Qwen3Model" and not text_encoder.training
    assert tokenizer.chat_template == pipe.tokenizer.chat_template
    for model in (text_encoder, vae, transformer):
        assert not any(p.requires_grad for p in model.parameters())
    for loaded, original in ((text_encoder, pipe.text_encoder), (vae, pipe.vae), (transformer, pipe.transformer)):
        expected = original.state_dict()
        assert all(torch.equal(t, expected[name]) for name, t in loaded.state_dict().items())
    assert scheduler.config.shift == pipe.scheduler.config.shift

    bf16 = load_transformer(str(folder), dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16


def test_stored_dtype_reads_a_single_or_a_sharded_components_files(tiny, tmp_path):
    folder, pipe = tiny
    assert stored_dtype(str(folder), "transformer") == stored_dtype(str(folder), "text_encoder") == torch.float32
    sharded = tmp_path / "sharded"
    copy.deepcopy(pipe.transformer).to(torch.bfloat16).save_pretrained(sharded / "transformer", max_shard_size="200KB")
    assert len(list((sharded / "transformer").glob("*.safetensors"))) > 1
    assert stored_dtype(str(sharded), "transformer") == torch.bfloat16
    assert stored_dtype(str(sharded), "vae") is None  # no weights there
    # every tensor's file, which lora_tools' extract reads one tensor at a time
    expected = pipe.transformer.state_dict()
    for model, dtype in ((folder, torch.float32), (sharded, torch.bfloat16)):
        files = component_weight_files(str(model), "transformer")
        shards = 1 if model == folder else len(list((sharded / "transformer").glob("*.safetensors")))
        assert files.keys() == expected.keys() and len(set(files.values())) == shards
        for name, file in files.items():
            with safe_open(str(file), "pt") as f:
                assert torch.equal(f.get_tensor(name), expected[name].to(dtype))
    assert component_weight_files(str(sharded), "vae") == {}


def to_original_layout(state_dict: dict, prefix: str = "") -> dict:
    """diffusers -> original Z-Image keys (fused qkv, `final_layer`, `attention.out`), the inverse of diffusers'
    `convert_z_image_transformer_checkpoint_to_diffusers`."""
    renames = {
        "all_final_layer.2-1.": "final_layer.",
        "all_x_embedder.2-1.": "x_embedder.",
        ".attention.to_out.0.": ".attention.out.",
        ".attention.norm_k.": ".attention.k_norm.",
        ".attention.norm_q.": ".attention.q_norm.",
    }
    original = {}
    for key, tensor in state_dict.items():
        if key.endswith(".attention.to_k.weight") or key.endswith(".attention.to_v.weight"):
            continue
        if key.endswith(".attention.to_q.weight"):
            base = key[: -len("to_q.weight")]
            fused = torch.cat(
                [state_dict[base + "to_q.weight"], state_dict[base + "to_k.weight"], state_dict[base + "to_v.weight"]]
            )
            original[prefix + base + "qkv.weight"] = fused
            continue
        for old, new in renames.items():
            key = key.replace(old, new)
        original[prefix + key] = tensor
    return original


@pytest.mark.parametrize("layout", ["diffusers", "original", "original_prefixed"])
def test_single_file_transformer_loads_either_key_layout(tiny, tmp_path, layout):
    folder, pipe = tiny
    expected = {name: t.contiguous() for name, t in pipe.transformer.state_dict().items()}
    if layout == "diffusers":
        saved = expected
    else:
        saved = to_original_layout(expected, prefix="model.diffusion_model." if layout == "original_prefixed" else "")
        assert "layers.0.attention.to_q.weight" not in saved  # really the fused original layout
    checkpoint = tmp_path / "z_image_transformer.safetensors"
    save_file(saved, checkpoint)

    transformer = load_transformer(str(folder), dtype=torch.float32, single_file=str(checkpoint))
    loaded = transformer.state_dict()
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[name], expected[name]) for name in expected)


def test_single_file_of_another_model_is_refused(tiny, tmp_path):
    folder, pipe = tiny
    checkpoint = tmp_path / "vae.safetensors"
    save_file({k: v.contiguous() for k, v in pipe.vae.state_dict().items()}, checkpoint)
    with pytest.raises(ValueError, match="lacks weights of the Z-Image transformer"):
        load_transformer(str(folder), dtype=torch.float32, single_file=str(checkpoint))
    with pytest.raises(ValueError, match="does not exist"):
        load_transformer(str(folder), single_file=str(tmp_path / "missing.safetensors"))


def copy_configs(src, dst):
    """Copy a model folder without its weights: the hash must not need them."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors"))
    return dst


def edit_json(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data, indent=4))


def test_config_hash_fingerprints_vae_text_encoder_and_template(tiny, tmp_path):
    folder, _ = tiny
    reference = component_config_hash(str(folder))
    assert len(reference) == 64 and component_config_hash(str(folder)) == reference
    assert component_config_hash(str(copy_configs(folder, tmp_path / "configs_only"))) == reference

    # A newer library re-saving the same model must not invalidate caches.
    resaved = copy_configs(folder, tmp_path / "resaved")
    edit_json(resaved / "vae" / "config.json", _diffusers_version="9.9.9")
    assert component_config_hash(str(resaved)) == reference

    other_vae = copy_configs(folder, tmp_path / "other_vae")
    edit_json(other_vae / "vae" / "config.json", scaling_factor=0.5)
    assert component_config_hash(str(other_vae)) != reference
    # The transformer is not part of the default fingerprint: caches outlive a transformer swap.
    other_transformer = copy_configs(folder, tmp_path / "other_transformer")
    edit_json(other_transformer / "transformer" / "config.json", n_layers=3)
    assert component_config_hash(str(other_transformer)) == reference
    assert component_config_hash(str(other_transformer), components=("transformer",)) != component_config_hash(
        str(folder), components=("transformer",)
    )

    other_encoder = copy_configs(folder, tmp_path / "other_encoder")
    edit_json(other_encoder / "text_encoder" / "config.json", num_hidden_layers=3)
    assert component_config_hash(str(other_encoder)) != reference

    other_template = copy_configs(folder, tmp_path / "other_template")
    template = other_template / "tokenizer" / "chat_template.jinja"
    template.write_text(template.read_text().replace("<|im_start|>assistant", "<|im_start|>model"))
    assert component_config_hash(str(other_template)) != reference

    with pytest.raises(ValueError, match="unknown components"):
        component_config_hash(str(folder), components=("unet",))


def test_optional_libraries_import_notes_are_quieted_and_their_other_messages_pass(caplog):
    import zimage_utils  # noqa: F401  (installs the filters)

    caplog.set_level(logging.WARNING)
    logging.getLogger("torchao").warning("Failed to load /site-packages/torchao/_C_mxfp8.so")
    logging.getLogger("torch.utils._pytree").warning("<enum 'KernelPreference'> is an Enum subclass ...")
    logging.getLogger("torchao").warning("a quantisation that went wrong")
    assert [r.getMessage() for r in caplog.records] == ["a quantisation that went wrong"]
