"""OUTPUT/README.md, the model card the trainer writes beside the final LoRA, and the LoRA files' metadata
(zimage_utils/model_card.py)."""

import ast
import datetime

from huggingface_hub import ModelCard

import train_zimage_lora
from zimage_utils.model_card import training_metadata, write_model_card

METADATA = {"base_model": "Tongyi-MAI/Z-Image-Turbo", "adapter": "lora", "rank": "16", "steps": "1500"}


def test_the_card_says_how_to_use_the_lora_and_what_trained_it(tmp_path):
    metadata = {**METADATA, "resolution": "1024", "trigger_word": "sks person", "target_modules": "a,b,c"}
    (tmp_path / "my_lora").mkdir()
    path = write_model_card(tmp_path / "my_lora", metadata, ["sks person hiking", "a dog"])
    card = ModelCard.load(path)  # the hub's own parser reads it back
    assert card.data.base_model == "Tongyi-MAI/Z-Image-Turbo" and card.data.instance_prompt == "sks person"
    assert {"lora", "z-image", "text-to-image"} <= set(card.data.tags) and card.data.library_name == "diffusers"
    assert card.data.to_dict()["widget"] == [{"text": "sks person hiking", "output": {"url": "samples/grid.png"}}]
    text = card.text
    assert "# my_lora" in text and "trained for 1500 steps at 1024 px" in text
    # Turbo samples in 8 steps without guidance, as the trainer's validation does
    assert "pipe('sks person hiking', num_inference_steps=8, guidance_scale=0.0)" in text
    assert "pytorch_lora_weights_comfyui.safetensors" in text and "![validation samples" in text
    ast.parse(text.split("```python\n")[1].split("```")[0])  # users paste the example: it must be Python
    assert "| `rank` | 16 |" in text and "target_modules" not in text


def test_a_local_base_model_and_no_prompts_give_a_card_without_hub_fields(tmp_path):
    local = tmp_path / "Z-Image-base"
    local.mkdir()
    card = ModelCard.load(write_model_card(tmp_path, {**METADATA, "base_model": str(local)}, []))
    assert card.data.base_model is None and "widget" not in card.data.to_dict()  # the hub takes only hub ids there
    assert "num_inference_steps=50, guidance_scale=4.0" in card.text and "No trigger word." in card.text
    assert "![validation samples" not in card.text


def test_a_readme_the_user_wrote_is_never_replaced(tmp_path):
    (tmp_path / "README.md").write_text("# my notes\n")
    assert write_model_card(tmp_path, METADATA, []) is None
    assert (tmp_path / "README.md").read_text() == "# my notes\n"
    (tmp_path / "README.md").unlink()
    first = write_model_card(tmp_path, METADATA, [])
    assert write_model_card(tmp_path, {**METADATA, "steps": "3000"}, []) == first  # ours: rewritten by the next run
    assert "trained for 3000 steps" in first.read_text()


def test_the_lora_files_describe_a_turbo_lora_to_lora_browsers_by_the_sai_model_spec(tmp_path):
    flags = ["--pretrained_model_name_or_path", "Tongyi-MAI/Z-Image-Turbo", "--precomputed_dir", str(tmp_path),
             "--output_dir", str(tmp_path / "my_lora"), "--rank", "16"]  # fmt: skip
    caches = {"resolutions": [512, 1024], "caption_prefixes": ["sks person"]}
    metadata = training_metadata(train_zimage_lora.parse_args(flags), ["layers.0.attention.to_q"], 1500, caches)
    spec = {k.removeprefix("modelspec."): v for k, v in metadata.items() if k.startswith("modelspec.")}
    saved_at = datetime.datetime.fromisoformat(spec.pop("date"))
    assert abs(datetime.datetime.now(datetime.timezone.utc) - saved_at) < datetime.timedelta(minutes=5)
    assert spec == {
        "sai_model_spec": "1.0.0",
        "architecture": "z-image/lora",  # SwarmUI's Z-Image LoRA class
        "implementation": "https://github.com/Tongyi-MAI/Z-Image",
        "title": "my_lora, step 1500",
        "resolution": "1024x1024",  # the largest bucket
        "trigger_phrase": "sks person",
        "usage_hint": "8 steps, no CFG; start the prompt with 'sks person'",  # Turbo samples without guidance
        "description": "Z-Image LoRA (rank 16, attention) for Tongyi-MAI/Z-Image-Turbo, trained with "
        "train_zimage_lora.py for 1500 steps.",
    }
    # (the hash is the file's, added as it is written: test_trainer, test_lora_tools)
    (tmp_path / "my_lora").mkdir()
    card = write_model_card(tmp_path / "my_lora", metadata, [])
    assert "modelspec" not in card.read_text()  # the card's settings table keeps to the training settings


def test_the_users_title_author_description_and_licence_go_to_the_files_and_the_card(tmp_path):
    about = {"title": "Ink sketches", "description": "Pen-and-ink line art.", "license": "apache-2.0"}
    flags = ["--pretrained_model_name_or_path", "Tongyi-MAI/Z-Image", "--precomputed_dir", str(tmp_path),
             "--output_dir", str(tmp_path / "run7"), "--metadata_author", "jo"]  # fmt: skip
    args = train_zimage_lora.parse_args(flags + [a for k, v in about.items() for a in (f"--metadata_{k}", v)])
    metadata = training_metadata(
        args, ["layers.0.attention.to_q"], 300, {"resolutions": [768], "caption_prefixes": []}
    )
    assert (metadata["modelspec.title"], metadata["modelspec.author"]) == ("Ink sketches, step 300", "jo")
    assert metadata["modelspec.description"] == "Pen-and-ink line art."
    assert metadata["modelspec.license"] == "apache-2.0" and "modelspec.trigger_phrase" not in metadata
    assert metadata["modelspec.usage_hint"] == "50 steps, CFG 4"  # the base model samples with guidance
    (tmp_path / "run7").mkdir()
    card = ModelCard.load(write_model_card(tmp_path / "run7", metadata, [], about=about))
    assert card.data.license == "apache-2.0"  # in the header the hub indexes
    assert "\n# Ink sketches\n\nPen-and-ink line art.\n\nA Z-Image LoRA for `Tongyi-MAI/Z-Image`" in card.text
