"""OUTPUT/README.md, the model card the trainer writes beside the final LoRA (zimage_utils/model_card.py)."""

from huggingface_hub import ModelCard

from zimage_utils.model_card import write_model_card

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
