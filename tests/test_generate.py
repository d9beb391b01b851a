"""generate.py: a LoRA applied at a chosen strength, and fused into a standalone model that needs no LoRA file."""

import numpy as np
import pytest
import torch
from conftest import SCRIPT_DEVICE
from diffusers import ZImagePipeline
from PIL import Image
from safetensors.torch import load_file, save_file
from test_lora_io import stand_in_for_training, transformer_output

import generate
from zimage_utils.lora import add_lora
from zimage_utils.lora_io import save_lora
from zimage_utils.model_spec import model_spec


def write_lora(tiny_model_dir, folder, adapter="lora"):
    """A non-zero rank-4 LoRA (or LoKr) for the tiny transformer (alpha 8: scale 2), as the trainer saves it."""
    transformer = ZImagePipeline.from_pretrained(tiny_model_dir).transformer
    config = add_lora(transformer, rank=4, alpha=8, targets="attention", adapter=adapter)
    stand_in_for_training(transformer, seed=0)
    save_lora(folder, transformer, config, {"base_model": str(tiny_model_dir)})
    return transformer_output(transformer)


def test_strength_parsing_keeps_paths_and_reads_weights():
    assert generate.split_strength("my_lora") == ("my_lora", 1.0)
    assert generate.split_strength("style.safetensors:0.8") == ("style.safetensors", 0.8)
    assert generate.split_strength("C:/loras/x.safetensors") == ("C:/loras/x.safetensors", 1.0)


def test_mistakes_are_refused_before_the_pipeline_loads_and_the_base_is_never_written_over(
    tiny_model_dir, tmp_path, monkeypatch
):
    write_lora(tiny_model_dir, tmp_path / "lora")
    monkeypatch.setattr(ZImagePipeline, "from_pretrained", lambda *a, **k: pytest.fail("loaded before the checks"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "text.safetensors").write_text("not a safetensors file")
    xl = "lora_unet_down_blocks_0_attentions_0_proj_in"  # an SDXL LoRA's key, kohya's layout
    xl_lora = {f"{xl}.lora_down.weight": torch.zeros(4, 8), f"{xl}.lora_up.weight": torch.zeros(8, 4)}
    save_file({**xl_lora, f"{xl}.alpha": torch.tensor(4.0)}, tmp_path / "xl.safetensors")
    lora, base = str(tmp_path / "lora"), str(tiny_model_dir)
    cases = [
        (["--lora", str(tmp_path / "nowhere")], "no such file or folder"),
        (["--lora", f"{lora}:abc"], "write PATH or PATH:STRENGTH with a number"),
        (["--lora", str(tmp_path / "empty")], "holds no pytorch_lora_weights.safetensors"),
        (["--lora", str(tmp_path / "text.safetensors")], "could not be read"),
        (["--lora", str(tmp_path / "xl.safetensors")], "is not a Z-Image LoRA"),
        (["--lora", lora, "--fuse_to", base], "is not an empty folder.*never written over"),
        (["--fuse_to", str(tmp_path / "new")], "give at least one --lora"),
        (["--lora", lora, "--num_images", "0"], "--num_images 0: give 1 or more"),
        (["--lora", lora, "--output", str(tmp_path)], "give an image file name"),
    ]
    for flags, message in cases:
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            generate.main(generate.parse_args(["--pretrained_model_name_or_path", base] + flags))


def test_a_side_not_a_multiple_of_16_is_refused_as_the_flags_are_read(capsys):
    model = ["--pretrained_model_name_or_path", "m"]
    for flags, message in [(["--height", "50"], "--height: 50: sides are positive multiples of 16 (VAE and 2x2 patches), e.g. 48"),
                           (["--width", "1e3"], "--width: '1e3' is not a whole number of pixels")]:  # fmt: skip
        with pytest.raises(SystemExit):
            generate.parse_args(model + flags)
        assert message in capsys.readouterr().err
    assert generate.parse_args(model + ["--height", "832"]).height == 832


def test_prompts_without_the_loras_trigger_get_a_note(tiny_model_dir, tmp_path, capsys):
    transformer = ZImagePipeline.from_pretrained(tiny_model_dir).transformer
    config = add_lora(transformer, rank=4, alpha=4, targets="attention")
    save_lora(tmp_path / "lora", transformer, config, model_spec("people", trigger_phrase="sks person"))
    save_lora(tmp_path / "plain", transformer, config, {"base_model": "tiny"})  # (no trigger: no note)
    prompts = ["A photo of SKS person hiking", "a dog on a beach", "sks person reading"]
    flags = ["--pretrained_model_name_or_path", str(tiny_model_dir), "--lora", str(tmp_path / "plain")]
    args = generate.parse_args(flags + ["--compare", "base", str(tmp_path / "lora"), "--prompt", *prompts])
    generate.check_args(args)
    assert capsys.readouterr().out == (
        f"note: {tmp_path / 'lora'} was trained with the trigger 'sks person', which prompt 2 lacks\n"
    )
    fuse = generate.parse_args(flags[:2] + ["--lora", str(tmp_path / "lora"), "--fuse_to", str(tmp_path / "fused")])
    generate.check_args(fuse)  # (it samples nothing: the default prompt, without the trigger, is not used)
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("adapter", ["lora", "lokr"])
def test_fused_model_equals_base_plus_lora_without_any_lora_file(tiny_model_dir, tmp_path, adapter):
    with_lora = write_lora(tiny_model_dir, tmp_path / "lora", adapter)
    fused_dir = tmp_path / "fused"
    generate.main(
        generate.parse_args(
            [
                "--pretrained_model_name_or_path",
                str(tiny_model_dir),
                "--lora",
                str(tmp_path / "lora"),
                "--fuse_to",
                str(fused_dir),
            ]
        )
    )
    fused = ZImagePipeline.from_pretrained(fused_dir).transformer
    assert not any("lora" in name or "lokr" in name for name, _ in fused.named_parameters())
    base = transformer_output(ZImagePipeline.from_pretrained(tiny_model_dir).transformer)
    assert not torch.allclose(with_lora, base, atol=1e-3)  # the LoRA does change the output
    assert torch.allclose(transformer_output(fused), with_lora, atol=1e-5)


def test_a_fused_model_keeps_each_components_stored_dtype(tiny_model_dir, tmp_path):
    """A bf16 transformer and text encoder stay bf16 and an fp32 VAE fp32, with or without a GPU (sampling loads
    bf16 on a GPU and fp32 on the CPU, which written out would double a bf16 base's size)."""
    from safetensors import safe_open

    base = tmp_path / "base"
    dtypes = {"transformer": torch.bfloat16, "text_encoder": torch.bfloat16, "default": torch.float32}
    ZImagePipeline.from_pretrained(tiny_model_dir, dtype=dtypes).save_pretrained(base)
    write_lora(tiny_model_dir, tmp_path / "lora")
    flags = ["--pretrained_model_name_or_path", str(base), "--lora", str(tmp_path / "lora")]
    generate.main(generate.parse_args(flags + ["--fuse_to", str(tmp_path / "fused")]))

    def file_dtypes(component: str) -> set[str]:
        [path] = (tmp_path / "fused" / component).glob("*.safetensors")
        with safe_open(str(path), "pt") as f:
            return {f.get_slice(key).get_dtype() for key in f.keys()}

    assert file_dtypes("transformer") == file_dtypes("text_encoder") == {"BF16"} and file_dtypes("vae") == {"F32"}
    fused = ZImagePipeline.from_pretrained(tmp_path / "fused", dtype=torch.bfloat16).transformer
    unfused = ZImagePipeline.from_pretrained(base, dtype=torch.bfloat16).transformer
    assert not torch.equal(fused.layers[0].attention.to_q.weight, unfused.layers[0].attention.to_q.weight)


def test_sampling_with_a_lora_at_half_strength_writes_the_image(tiny_model_dir, tmp_path, monkeypatch):
    from diffusers import AutoencoderKL

    decoded = []  # the batch size of each VAE decode
    decode = AutoencoderKL._decode
    monkeypatch.setattr(AutoencoderKL, "_decode", lambda vae, z, **kw: decoded.append(len(z)) or decode(vae, z, **kw))
    write_lora(tiny_model_dir, tmp_path / "lora")
    out = tmp_path / "sample.png"
    generate.main(
        generate.parse_args(
            [
                "--pretrained_model_name_or_path",
                str(tiny_model_dir),
                "--lora",
                f"{tmp_path / 'lora'}:0.5",
                "--prompt",
                "a red circle",
                "--height",
                "64",
                "--width",
                "64",
                "--num_images",
                "2",
                "--output",
                str(out),
            ]
        )
    )
    assert Image.open(out).size == (128, 64)  # two 64x64 images side by side
    assert decoded == [1, 1]  # decoded one at a time: a batch's decode memory is one image's


def test_a_lora_in_peft_names_without_the_prefix_samples_as_ours_does(tiny_model_dir, tmp_path):
    """diffusers loads nothing from a PEFT state dict saved as it is (no `transformer.`); generate.py samples what
    read_lora read, as lora_tools.py and --init_lora do."""
    write_lora(tiny_model_dir, tmp_path / "lora")
    ours = load_file(str(tmp_path / "lora" / "pytorch_lora_weights.safetensors"))
    save_file({k.removeprefix("transformer."): v for k, v in ours.items()}, str(tmp_path / "peft.safetensors"))
    images = []
    for lora in (tmp_path / "lora", tmp_path / "peft.safetensors"):
        out = tmp_path / f"{lora.stem}.png"
        flags = ["--pretrained_model_name_or_path", str(tiny_model_dir), "--lora", str(lora), "--output", str(out)]
        generate.main(generate.parse_args(flags + ["--height", "32", "--width", "32", "--num_inference_steps", "2"]))
        images.append(np.asarray(Image.open(out)))
    assert np.array_equal(*images)

    # A LoKr whose modules no one decompose factor splits (2x16 and 4x8): read, but not loadable in diffusers
    lokr = {"layers.0.attention.to_q": (2, 16), "layers.0.attention.to_k": (4, 8)}
    odd = {f"transformer.{m}.lokr_w{i}": torch.ones(n, n) for m, sides in lokr.items() for i, n in enumerate(sides, 1)}
    save_file(odd, str(tmp_path / "odd_lokr.safetensors"))
    flags = ["--pretrained_model_name_or_path", str(tiny_model_dir), "--lora", str(tmp_path / "odd_lokr.safetensors")]
    with pytest.raises(ValueError, match="odd_lokr.safetensors was read, but diffusers could not load it"):
        generate.main(generate.parse_args(flags + ["--output", str(tmp_path / "odd.png")]))


def test_model_and_layer_offload_sample_the_same_image(tiny_model_dir, tmp_path, monkeypatch):
    """--cpu_offload model and --cpu_offload (layers) go through diffusers' offload hooks (here between the CPU and
    itself: CI has no GPU) and change nothing in the image."""
    offloaded, grouped, hooked = [], [], {}
    model, groups = ZImagePipeline.enable_model_cpu_offload, ZImagePipeline.enable_group_offload
    monkeypatch.setattr(
        ZImagePipeline, "enable_model_cpu_offload", lambda pipe, **kw: offloaded.append(kw) or model(pipe, **kw)
    )
    monkeypatch.setattr(
        ZImagePipeline,
        "enable_group_offload",
        lambda pipe, **kw: grouped.append(kw) or groups(pipe, **kw) or hooked.update(layer_hooks(pipe)),
    )
    write_lora(tiny_model_dir, tmp_path / "lora")
    flags = ["--pretrained_model_name_or_path", str(tiny_model_dir), "--lora", str(tmp_path / "lora")]
    flags += ["--prompt", "a red circle", "--height", "64", "--width", "64", "--num_inference_steps", "2"]
    pictures = []
    for extra in ([], ["--cpu_offload", "model"], ["--cpu_offload"]):  # bare: layers
        out = tmp_path / f"sample{len(pictures)}.png"
        generate.main(generate.parse_args(flags + extra + ["--output", str(out)]))
        pictures.append(np.asarray(Image.open(out)))
        assert (bool(offloaded), bool(grouped)) == [(False, False), (True, False), (True, True)][len(pictures) - 1]
    assert offloaded[0] == {"device": SCRIPT_DEVICE}  # (diffusers then calls itself again with the device it chose)
    [kw] = grouped
    assert kw["offload_type"] == "block_level" and kw["num_blocks_per_group"] == 1
    assert kw["use_stream"] == (SCRIPT_DEVICE == "cuda")  # a CUDA stream overlaps the copies; the CPU has none
    # every transformer block and text-encoder layer is its own group
    assert hooked == {"transformer": True, "text_encoder": True}
    assert pictures[0].std() > 0
    assert np.array_equal(pictures[0], pictures[1]) and np.array_equal(pictures[0], pictures[2])


def layer_hooks(pipe) -> dict:
    """Whether each block of the transformer (`layers`) and each layer of the text encoder carries a hook."""
    blocks = {"transformer": pipe.transformer.layers, "text_encoder": pipe.text_encoder.layers}
    return {name: all(getattr(b, "_diffusers_hook", None) is not None for b in mods) for name, mods in blocks.items()}


def test_compare_samples_each_lora_and_the_base_with_one_load_in_labelled_columns(
    tiny_model_dir, tmp_path, monkeypatch
):
    """--compare base LORA:0.5 LORA with two prompts: one pipeline load, and each column the very images a run with
    that LoRA alone gives (same seed, same prompts)."""
    from zimage_utils.validation import grid_label_height

    write_lora(tiny_model_dir, tmp_path / "lora")
    lora = str(tmp_path / "lora")
    flags = ["--pretrained_model_name_or_path", str(tiny_model_dir), "--prompt", "a red circle", "a blue square"]
    flags += ["--height", "64", "--width", "64", "--num_inference_steps", "2", "--seed", "3"]
    loads = []
    load = ZImagePipeline.from_pretrained.__func__
    monkeypatch.setattr(
        ZImagePipeline, "from_pretrained", classmethod(lambda cls, *a, **k: loads.append(a) or load(cls, *a, **k))
    )

    compared = tmp_path / "compare.png"
    generate.main(generate.parse_args(flags + ["--compare", "base", f"{lora}:0.5", lora, "--output", str(compared)]))
    assert len(loads) == 1
    grid = np.asarray(Image.open(compared).convert("RGB"))
    top = grid_label_height(64)
    assert grid.shape == (top + 2 * 64, 3 * 64, 3)  # a label strip, then prompts x columns
    assert (grid[:top] < 128).any()  # the labels are drawn

    for column, extra in enumerate([[], ["--lora", f"{lora}:0.5"], ["--lora", lora]]):
        alone = tmp_path / f"alone{column}.png"
        generate.main(generate.parse_args(flags + extra + ["--output", str(alone)]))
        rows = np.asarray(Image.open(alone).convert("RGB"))
        assert rows.shape == (2 * 64, 64, 3)  # one row per prompt
        assert np.array_equal(grid[top:, column * 64 : (column + 1) * 64], rows), f"column {column}"
    assert not np.array_equal(grid[top:, :64], grid[top:, 64:128])  # the LoRA changes the image
    assert generate.column_label(f"{tmp_path}/run/checkpoint-500", 1.0) == "checkpoint-500"
    assert generate.column_label(f"{tmp_path}/my_lora/pytorch_lora_weights.safetensors", 0.8) == "my_lora x0.8"


def test_compare_refuses_what_it_cannot_draw(tiny_model_dir, tmp_path):
    write_lora(tiny_model_dir, tmp_path / "lora")
    base = ["--pretrained_model_name_or_path", str(tiny_model_dir), "--compare", "base", str(tmp_path / "lora")]
    for flags, message in [
        (["--num_images", "2"], "one image per prompt and column"),
        (["--fuse_to", str(tmp_path / "fused"), "--lora", str(tmp_path / "lora")], "drop --fuse_to"),
        (["--compare", str(tmp_path / "nowhere")], "no such file or folder"),
    ]:
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            generate.check_args(generate.parse_args(base + flags))


def test_a_prompt_with_settings_of_its_own_is_sampled_with_them(tiny_model_dir, tmp_path):
    """A kohya-style prompt line (the trainer's validation prompts, a sample prompt file) samples as the pipeline
    does with those settings; the other prompt keeps the flags'. The smaller image sits centred in its row's cell."""
    out = tmp_path / "out.png"
    flags = ["--pretrained_model_name_or_path", str(tiny_model_dir), "--output", str(out), "--seed", "3"]
    flags += ["--height", "64", "--width", "64", "--num_inference_steps", "2", "--guidance_scale", "0"]
    flags += ["--negative_prompt", "unused at guidance 0, and the line gives its own"]
    line = "a blue square --w 32 --h 48 --d 5 --s 3 --l 2.5 --n dark"
    generate.main(generate.parse_args(flags + ["--prompt", "a red circle", line]))
    rows = np.asarray(Image.open(out).convert("RGB"))
    assert rows.shape == (2 * 64, 64, 3)

    device = "cuda" if torch.cuda.is_available() else "cpu"  # generate.py's choice of device and dtype
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    pipe = ZImagePipeline.from_pretrained(tiny_model_dir, dtype=dtype).to(device)
    flags_image = pipe(
        prompt=["a red circle"],
        height=64,
        width=64,
        num_inference_steps=2,
        guidance_scale=0.0,
        generator=torch.Generator(device).manual_seed(3),
    ).images[0]
    own_image = pipe(
        prompt=["a blue square"],
        negative_prompt=["dark"],
        height=48,
        width=32,
        num_inference_steps=3,
        guidance_scale=2.5,
        generator=torch.Generator(device).manual_seed(5),
    ).images[0]
    assert np.array_equal(rows[:64], np.asarray(flags_image))
    assert np.array_equal(rows[64 + 8 : 64 + 56, 16:48], np.asarray(own_image)) and np.asarray(own_image).std() > 0
    assert (rows[64 : 64 + 8] == 255).all() and (rows[64:, :16] == 255).all()  # white around it


def test_a_prompt_file_adds_its_lines_after_the_prompts_given(tiny_model_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# portraits\nsks person, studio photo\n\n  sks person, oil painting  \n", encoding="utf-8")
    base = ["--pretrained_model_name_or_path", str(tiny_model_dir), "--output", str(tmp_path / "out.png")]
    args = generate.parse_args(base + ["--prompt", "a photo of sks person", "--prompt_file", str(prompts)])
    generate.check_args(args)
    assert args.prompt == ["a photo of sks person", "sks person, studio photo", "sks person, oil painting"]
    (tmp_path / "empty.txt").write_text("# nothing yet\n\n")
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    (tmp_path / "bad.txt").write_text("a photo\nsks person --w 1000\n")
    bad = f"--prompt_file {tmp_path / 'bad.txt'}, prompt 2 \\('sks person --w 1000'\\): --w 1000: sides are"
    for name, message in [
        ("missing.txt", "no such file"), ("empty.txt", "holds no prompt"), ("latin1.txt", "UTF-8"), ("bad.txt", bad)
    ]:  # fmt: skip
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            generate.check_args(generate.parse_args(base + ["--prompt_file", str(tmp_path / name)]))
