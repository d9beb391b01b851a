"""caption_images.py: a vision-language model's captions as the .txt sidecars precompute reads, through
transformers' own chat template, processor and generate (a tiny random LLaVA-NeXT stands in for Qwen-VL:
its captions are noise, but each must be what transformers gives for that image alone)."""

import os
import subprocess
import sys

import pytest
import torch
from conftest import LAUNCHES_CPU_PROCESSES
from PIL import Image
from test_precompute import REPO_ROOT, _free_port

import caption_images
from zimage_utils.captioning import DEFAULT_INSTRUCTION, clean_caption, fit_pixels
from zimage_utils.tiny import make_synthetic_dataset

MAX_TOKENS = 12


@pytest.fixture
def captioner_dir(tiny_captioner_dir):
    return tiny_captioner_dir


def half_captioned(folder):
    """6 shape images: 0, 4 and 5 keep their captions, 1 and 2 have none, 3 an empty file; and a broken PNG."""
    data = make_synthetic_dataset(folder, num_images=6)
    for i in (1, 2):
        (data / f"shape_{i:03d}.txt").unlink()
    (data / "shape_003.txt").write_text(" \n")
    (data / "broken.png").write_bytes(b"not a png")
    return data


def reference_caption(model_dir, image_path, max_new_tokens=MAX_TOKENS):
    """transformers' own captioning of one image, greedy: (text, token ids)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
    image = Image.open(image_path).convert("RGB")
    messages = [
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": DEFAULT_INSTRUCTION}]}
    ]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    ids = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)[0, inputs["input_ids"].shape[1] :]
    return processor.decode(ids, skip_special_tokens=True), ids.tolist(), model.generation_config.eos_token_id


def run(data, model_dir, *flags):
    return caption_images.main(
        caption_images.parse_args(
            ["--train_data_dir", str(data), "--model", str(model_dir), "--max_new_tokens", str(MAX_TOKENS), *flags]
        )
    )


def test_uncaptioned_images_get_transformers_own_caption_and_captions_already_there_are_kept(
    captioner_dir, tmp_path, capsys
):
    data = half_captioned(tmp_path / "data")
    kept = {i: (data / f"shape_{i:03d}.txt").read_bytes() for i in (0, 4, 5)}
    # One batch of three images of different shapes, so different token counts: padded on the left, each captioned as
    # it would be alone
    report = run(data, captioner_dir, "--batch_size", "3")
    assert (report["captioned"], report["kept"]) == (3, 3)
    assert report["skipped"] == [
        "broken.png: not an image PIL can read (corrupt or wrong extension): re-export or delete it"
    ]
    assert {i: (data / f"shape_{i:03d}.txt").read_bytes() for i in (0, 4, 5)} == kept
    truncated = []
    for i in (1, 2, 3):
        text, ids, eos = reference_caption(captioner_dir, data / f"shape_{i:03d}.png")
        caption = (data / f"shape_{i:03d}.txt").read_text(encoding="utf-8")
        assert caption == clean_caption(text) + "\n" and caption.count("\n") == 1 and caption.strip()
        truncated += [f"shape_{i:03d}.png"] if len(ids) == MAX_TOKENS and eos not in ids else []
    assert report["truncated"] == truncated
    assert not (data / "broken.txt").exists() and not list(data.glob(".*"))  # no temporary files left
    out = capsys.readouterr().out
    assert "captioned 3 image(s)" in out and "3 already had a caption, kept (--overwrite replaces them)" in out
    assert "skipped 1 image(s) that could not be read:\n  broken.png: not an image PIL can read" in out

    # Run again once the broken file is gone: nothing left to caption, no model loaded
    (data / "broken.png").unlink()
    again = run(data, tmp_path / "no_model_needed")
    assert (again["captioned"], again["kept"]) == (0, 6)


def test_a_dry_run_lists_and_writes_nothing_and_overwrite_recaptions_everything(captioner_dir, tmp_path, capsys):
    data = half_captioned(tmp_path / "data")
    (data / "broken.png").unlink()
    before = sorted(p.name for p in data.iterdir())
    assert run(data, tmp_path / "no_model", "--dry_run") == {"to_caption": 3, "kept": 3}
    assert sorted(p.name for p in data.iterdir()) == before
    assert "dry run: 3 image(s) to caption, 3 already captioned (kept)\n  shape_001.png\n" in capsys.readouterr().out
    assert run(data, captioner_dir, "--overwrite", "--dry_run")["to_caption"] == 6
    report = run(data, captioner_dir, "--overwrite", "--max_new_tokens", "3")
    assert (report["captioned"], report["kept"]) == (6, 0)
    assert "a black circle" not in (data / "shape_000.txt").read_text()  # the synthetic caption was replaced


def test_what_cannot_work_is_named_before_a_model_loads(captioner_dir, tmp_path, monkeypatch):
    data = make_synthetic_dataset(tmp_path / "data", num_images=2)
    (data / "metadata.jsonl").write_text('{"file_name": "shape_000.png", "text": "a shape"}\n')
    with pytest.raises(ValueError, match="metadata.jsonl holds this folder's captions, and precompute_embeddings.py"):
        run(data, captioner_dir)
    with pytest.raises(FileNotFoundError, match="does not exist or is not a folder"):
        run(tmp_path / "nowhere", captioner_dir)
    for flags in (["--caption_extension", "txt"], ["--batch_size", "0"]):
        with pytest.raises(SystemExit):
            caption_images.parse_args(["--train_data_dir", str(data), *flags])

    # A Qwen-VL processor without torchvision: the message says what to install
    from transformers import AutoProcessor

    def no_video_processor(*args, **kwargs):
        raise AttributeError("type object 'VIDEO_PROCESSOR_MAPPING' has no attribute '_extra_content'")

    (data / "metadata.jsonl").unlink()
    (data / "shape_000.txt").unlink()
    with pytest.raises(FileNotFoundError, match="--model .*nope: no such folder, and not a hub id"):
        run(data, tmp_path / "nope")
    (tmp_path / "not_a_model").mkdir()
    with pytest.raises(ValueError, match="could not be loaded .*(vision-language model)"):
        run(data, tmp_path / "not_a_model")
    monkeypatch.setattr(AutoProcessor, "from_pretrained", no_video_processor)
    monkeypatch.setitem(sys.modules, "torchvision", None)  # not installed
    with pytest.raises(
        ValueError, match="may need torchvision: `pip install torchvision` \\(the build for your torch\\)"
    ):
        run(data, captioner_dir)


def test_a_caption_is_one_line_of_the_answer():
    assert clean_caption("<think>It is red.\nA circle.</think>\n\nA red circle\non white.") == "A red circle on white."
    assert clean_caption("The image shows a red  circle,\r\n\tcentred\x06.") == "A red circle, centred."
    assert clean_caption("This photograph depicts sks.") == "Sks."
    assert clean_caption("Theimage shows") == "Theimage shows"
    assert clean_caption("<think>\nOkay, the user wants a caption. Let me look at the") == ""  # (cut off)


def test_images_sharing_a_caption_file_and_empty_answers_write_nothing_over_each_other(
    captioner_dir, tmp_path, monkeypatch, capsys
):
    data = make_synthetic_dataset(tmp_path / "data", num_images=2)
    for caption in data.glob("*.txt"):
        caption.unlink()
    Image.open(data / "shape_000.png").convert("RGB").save(data / "shape_000.jpg")
    answers = iter([("", False), ("a caption", False)])
    monkeypatch.setattr(
        caption_images.FittingBatches, "__call__", lambda self, images: [next(answers) for _ in images]
    )
    report = run(data, captioner_dir, "--batch_size", "1")
    assert (report["captioned"], report["empty"]) == (1, ["shape_000.jpg"])
    assert report["shared"] == [
        "shape_000.png shares shape_000.txt with shape_000.jpg: captioned from that one only (rename one of them to "
        "give each its own caption)"
    ]
    assert not (data / "shape_000.txt").exists() and (data / "shape_001.txt").read_text() == "a caption\n"
    assert "1 image(s) got no caption from the model" in capsys.readouterr().out


def test_large_images_are_downscaled_to_the_pixel_budget_and_small_ones_kept():
    small = Image.new("RGB", (64, 96))
    assert fit_pixels(small, 64 * 96) is small
    big = fit_pixels(Image.new("RGB", (4000, 3000)), 1024 * 1024)
    assert big.size == (1182, 887) and big.width * big.height <= 1024 * 1024 * 1.01


@LAUNCHES_CPU_PROCESSES
def test_two_processes_caption_half_each_and_write_what_one_does(captioner_dir, tmp_path):
    one, two = half_captioned(tmp_path / "one"), half_captioned(tmp_path / "two")
    run(one, captioner_dir)
    launch = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--main_process_port", str(_free_port()),
        "--num_cpu_threads_per_process", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "caption_images.py", "--train_data_dir", str(two), "--model", str(captioner_dir),
        "--max_new_tokens", str(MAX_TOKENS),
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "1"}
    result = subprocess.run(launch, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "captioned 3 image(s)" in result.stdout and "broken.png" in result.stdout
    assert result.stdout.count("captioned 3 image(s)") == 1  # the main process reports for both
    for i in range(6):
        name = f"shape_{i:03d}.txt"
        assert (two / name).read_text() == (one / name).read_text(), name


def test_a_batch_out_of_gpu_memory_is_captioned_again_in_halves(captioner_dir, tmp_path, monkeypatch, caplog):
    """A card that holds one image's generation but not three: the same captions, one at a time after a warning."""
    from zimage_utils import captioning

    one, two = half_captioned(tmp_path / "one"), half_captioned(tmp_path / "two")
    for folder in (one, two):
        (folder / "broken.png").unlink()
    run(one, captioner_dir, "--batch_size", "1")
    real, sizes = captioning.caption_images, []

    def small_card(model, processor, images, *args):
        sizes.append(len(images))
        if len(images) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (a stand-in)")
        return real(model, processor, images, *args)

    monkeypatch.setattr(captioning, "caption_images", small_card)
    run(two, captioner_dir, "--batch_size", "3")
    assert sizes == [3, 1, 1, 1]  # halved to 1, and kept
    assert "out of GPU memory at a batch of 3: captioning 1 at once" in caplog.text
    assert all((two / f"shape_{i:03d}.txt").read_text() == (one / f"shape_{i:03d}.txt").read_text() for i in range(6))

    monkeypatch.setattr(captioning, "caption_images", lambda *a: (_ for _ in ()).throw(torch.OutOfMemoryError("x")))
    (two / "shape_001.txt").unlink()
    with pytest.raises(ValueError, match="out of GPU memory captioning a single image: lower --max_pixels"):
        run(two, captioner_dir, "--batch_size", "1")
