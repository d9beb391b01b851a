"""import_config.py: a kohya sd-scripts or musubi-tuner dataset config (TOML), or an ai-toolkit job (YAML), as our
precompute configs, one per image folder (and size), and the trainer's flags, all `--config` files the scripts accept
as they are."""

import pytest
import yaml
from PIL import Image

import import_config
import precompute_embeddings
import train_zimage_lora
from zimage_utils.tiny import make_synthetic_dataset

KOHYA = """
[general]
shuffle_caption = true
caption_extension = ".txt"
keep_tokens = 1

[[datasets]]
resolution = 64
batch_size = 2

  [[datasets.subsets]]
  image_dir = "{subject}"
  class_tokens = "sks shape"
  num_repeats = 3
  flip_aug = true

  [[datasets.subsets]]
  is_reg = true
  image_dir = "{regularisation}"
  class_tokens = "shape"
  color_aug = true
"""


def test_a_kohya_config_becomes_caches_the_trainer_weighs_and_repeats(tiny_model_dir, tmp_path, capsys):
    subject = make_synthetic_dataset(tmp_path / "sks", num_images=2)
    regularisation = make_synthetic_dataset(tmp_path / "reg", num_images=3)
    for folder in (subject, regularisation):  # (class_tokens caption the images without a caption file)
        (folder / "shape_000.txt").unlink()
    config = tmp_path / "dataset.toml"
    config.write_text(KOHYA.format(subject=subject, regularisation=regularisation))
    out = tmp_path / "caches"
    flags = ["--output_dir", str(out), "--pretrained_model_name_or_path", str(tiny_model_dir)]
    result = import_config.main(import_config.parse_args([str(config), *flags, "--prior_loss_weight", "0.5"]))

    precompute_configs = [path for path, _ in result["precompute"]]
    assert [p.name for p in precompute_configs] == ["precompute_00_sks.yaml", "precompute_01_reg.yaml"]
    first = yaml.safe_load(precompute_configs[0].read_text())
    assert first == {
        "train_data_dir": str(subject), "output_dir": str(out / "00_sks"),
        "pretrained_model_name_or_path": str(tiny_model_dir), "resolution": 64, "caption_extension": ".txt",
        "keep_tokens": 1, "default_caption": "sks shape", "shuffle_caption": 4, "cache_flipped": True,
    }  # fmt: skip
    train = yaml.safe_load((out / "train.yaml").read_text())
    assert train == {
        "pretrained_model_name_or_path": str(tiny_model_dir),
        "precomputed_dir": [str(out / "00_sks"), str(out / "01_reg")], "repeats": [3, 1], "loss_weights": [1.0, 0.5],
        "train_batch_size": 2, "random_flip": 0.5,
    }  # fmt: skip
    printed = capsys.readouterr().out
    assert "01_reg: no equivalent here for color_aug; left out" in printed
    assert "flip_aug holds for every folder here (--random_flip is for the whole run)" in printed
    assert f"accelerate launch precompute_embeddings.py --config {precompute_configs[1]}\n" in printed

    # The configs run as they are: both caches, then the trainer on them (a dry run: the data, not the steps)
    for path in precompute_configs:
        precompute_embeddings.main(
            precompute_embeddings.parse_args(["--config", str(path), "--dataloader_num_workers", "0"])
        )
    args = train_zimage_lora.parse_args(
        ["--config", str(out / "train.yaml"), "--pretrained_model_name_or_path", str(tiny_model_dir)]
        + ["--output_dir", str(tmp_path / "lora"), "--dry_run"]
    )
    assert (args.repeats, args.loss_weights, args.random_flip) == ([3, 1], [1.0, 0.5], 0.5)
    train_zimage_lora.main(args)
    captions = precompute_embeddings.cache_lib.load_cache(out / "00_sks")[0]["caption"]
    assert "sks shape" in captions  # the image without a caption file took class_tokens


def test_a_musubi_config_with_width_and_height_keeps_their_area(tmp_path, capsys):
    config = tmp_path / "dataset.toml"
    config.write_text(
        '[general]\nresolution = [960, 544]\ncaption_extension = ".txt"\nbatch_size = 1\nenable_bucket = true\n'
        'bucket_no_upscale = true\n\n[[datasets]]\nimage_directory = "/data/photos"\ncache_directory = "/c"\n'
        "num_repeats = 2\n"
    )
    result = import_config.main(import_config.parse_args([str(config), "--output_dir", str(tmp_path / "o")]))
    [(_, flags)] = result["precompute"]
    assert (flags["resolution"], flags["max_upscale"], flags["train_data_dir"]) == (720, 1.0, "/data/photos")
    assert result["train"] == {"precomputed_dir": [str(tmp_path / "o" / "00_photos")], "repeats": [2]}
    printed = capsys.readouterr().out
    assert "00_photos: resolution [960, 544] became --resolution 720" in printed
    assert "--pretrained_model_name_or_path MODEL" in printed  # not given: the user fills it in


def test_what_cannot_be_imported_is_named(tmp_path):
    config = tmp_path / "dataset.toml"
    config.write_text("[general]\nresolution = 512\n")
    with pytest.raises(ValueError, match="names no image folder"):
        import_config.main(import_config.parse_args([str(config), "--output_dir", str(tmp_path)]))
    config.write_text("[general\nresolution = 512\n")
    with pytest.raises(ValueError, match="is not valid TOML"):
        import_config.main(import_config.parse_args([str(config), "--output_dir", str(tmp_path)]))
    config.write_text('[[datasets]]\nimage_directory = "/x"\nresolution = "big"\n')
    with pytest.raises(ValueError, match="resolution 'big' is not a side or \\[width, height\\] in pixels"):
        import_config.main(import_config.parse_args([str(config), "--output_dir", str(tmp_path)]))


AI_TOOLKIT = """
job: extension
config:
  name: my_lora
  process:
    - type: diffusion_trainer
      training_folder: {output}
      trigger_word: sks
      network: {{type: lora, linear: 8, linear_alpha: 8}}
      save: {{dtype: bf16, save_every: 2, max_step_saves_to_keep: 2}}
      datasets:
        - folder_path: {data}
          caption_ext: txt
          caption_dropout_rate: 0.05
          cache_latents_to_disk: true
          resolution: [64, 64, 96]
      train:
        batch_size: 1
        steps: 2
        gradient_checkpointing: true
        optimizer: adamw8bit
        lr: 0.0001
        optimizer_params: {{weight_decay: 0.01}}
        lr_scheduler: constant
        content_or_style: balanced
        timestep_type: weighted
        diff_output_preservation: true
        blank_prompt_preservation: true
        blank_prompt_preservation_multiplier: 0.5
        inverted_mask_prior: true
        diff_output_preservation_class: shape
      model:
        name_or_path: {model}
        assistant_lora_path: ostris/zimage_turbo_training_adapter/zimage_turbo_training_adapter_v2.safetensors
      sample:
        sample_every: 2
        width: 64
        height: 64
        samples:
          - prompt: "[trigger] on a beach"
          - prompt: a red circle
            width: 32
            height: 48
            seed: 3
        neg: ""
        guidance_scale: 1
        sample_steps: 2
"""


def test_an_ai_toolkit_job_becomes_a_cache_per_size_and_a_run_that_trains(tiny_model_dir, tmp_path, capsys):
    data = make_synthetic_dataset(tmp_path / "data", num_images=4)
    job = tmp_path / "job.yaml"
    job.write_text(AI_TOOLKIT.format(output=tmp_path / "output", data=data, model=tiny_model_dir))
    out = tmp_path / "caches"
    result = import_config.main(import_config.parse_args([str(job), "--output_dir", str(out)]))

    # Each size of the resolution list is a cache (ai-toolkit trains them all), with the trigger, the preservation
    # class and, once, the sample prompts (their own size and seed as --w --h --d)
    (first_path, first), (_, second) = result["precompute"]
    assert first_path.name == "precompute_00_data_64.yaml" and second["output_dir"] == str(out / "01_data_96")
    assert first == {
        "train_data_dir": str(data), "output_dir": str(out / "00_data_64"),
        "pretrained_model_name_or_path": str(tiny_model_dir), "resolution": 64, "caption_extension": ".txt",
        "caption_prefix": "sks", "preservation_class": "shape",
        "validation_prompts": ["[trigger] on a beach", "a red circle --w 32 --h 48 --d 3"],
    }  # fmt: skip
    assert second["resolution"] == 96 and "validation_prompts" not in second
    assert result["train"] == {
        "pretrained_model_name_or_path": str(tiny_model_dir), "output_dir": str(tmp_path / "output" / "my_lora"),
        "adapter": "lora", "lora_targets": "all", "lora_exclude_refiners": True, "rank": 8, "lora_alpha": 8,
        "train_batch_size": 1, "max_train_steps": 2,
        "learning_rate": 0.0001, "gradient_checkpointing": True, "optimizer": "adamw8bit", "adam_weight_decay": 0.01,
        "lr_scheduler": "constant", "preservation_weight": 1.0, "blank_preservation_weight": 0.5, "mask_prior_weight": 0.5,
        "save_dtype": "bf16", "checkpointing_steps": 2,
        "checkpoints_total_limit": 2, "validation_steps": 2, "validation_resolution": "64x64",
        "validation_num_inference_steps": 2, "validation_guidance_scale": 0.0, "validation_at_start": True,
        "precomputed_dir": [str(out / "00_data_64"), str(out / "01_data_96")], "caption_dropout": 0.05,
    }  # fmt: skip
    printed = capsys.readouterr().out
    assert "timestep_type 'weighted' has no equivalent here" in printed
    assert "train: no equivalent here for content_or_style; left out" in printed
    hint = "hf download ostris/zimage_turbo_training_adapter zimage_turbo_training_adapter_v2.safetensors"
    assert hint in printed and "  # + the training flags" not in printed  # the job's settings came along

    # The configs run as written: both caches, then the training itself
    for path, _ in result["precompute"]:
        precompute_embeddings.main(
            precompute_embeddings.parse_args(["--config", str(path), "--dataloader_num_workers", "0"])
        )
    lora = tmp_path / "output" / "my_lora"
    train_zimage_lora.main(train_zimage_lora.parse_args(["--config", str(out / "train.yaml"), "--report_to", "none"]))
    assert (lora / "pytorch_lora_weights.safetensors").is_file() and (lora / "checkpoint-2").is_dir()
    with Image.open(lora / "samples" / "step_000002.png") as samples:  # the two prompts, the second 32x48 in its cell
        assert samples.size == (2 * 64, 64)


def test_a_kohya_training_config_brings_its_dataset_and_its_settings(tmp_path, capsys):
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "dataset.toml").write_text(
        '[[datasets]]\nimage_directory = "/data/photos"\nresolution = 512\n'
    )
    (tmp_path / "cfg" / "prompts.txt").write_text("sks person --w 512 --h 768 --d 1\n")
    training = tmp_path / "cfg" / "train.toml"
    training.write_text(
        'pretrained_model_name_or_path = "Tongyi-MAI/Z-Image-Turbo"\ndataset_config = "dataset.toml"\n'
        'output_dir = "/runs"\noutput_name = "sks"\nnetwork_dim = 32\nnetwork_alpha = 16\n'
        'network_args = ["loraplus_lr_ratio=16"]\noptimizer_type = "AdamW8bit"\n'
        'optimizer_args = ["weight_decay=0.01", "betas=(0.9,0.99)"]\nlearning_rate = 5e-5\nmax_train_steps = 1500\n'
        'save_every_n_steps = 250\nsave_precision = "bf16"\ntimestep_sampling = "shift"\ndiscrete_flow_shift = 3.0\n'
        "min_timestep = 0\nmax_timestep = 400\nfp8_base = true\nsample_every_n_steps = 250\n"
        'sample_prompts = "prompts.txt"\nnoise_offset = 0.1\n'
    )
    out = tmp_path / "caches"
    result = import_config.main(import_config.parse_args([str(training), "--output_dir", str(out)]))
    [(_, flags)] = result["precompute"]
    assert flags == {
        "train_data_dir": "/data/photos", "output_dir": str(out / "00_photos"),
        "pretrained_model_name_or_path": "Tongyi-MAI/Z-Image-Turbo", "resolution": 512,
        "validation_prompt_file": str(tmp_path / "cfg" / "prompts.txt"),  # (relative to the training config)
    }  # fmt: skip
    assert result["train"] == {
        "pretrained_model_name_or_path": "Tongyi-MAI/Z-Image-Turbo", "learning_rate": 5e-5, "max_train_steps": 1500,
        "rank": 32, "lora_alpha": 16, "checkpointing_steps": 250, "validation_steps": 250, "output_dir": "/runs/sks",
        "loraplus_lr_ratio": 16.0, "adam_weight_decay": 0.01, "adam_beta1": 0.9, "adam_beta2": 0.99,
        "optimizer": "adamw8bit", "save_dtype": "bf16", "timestep_sampling": "shift", "timestep_shift": 3.0,
        "sigma_range": [0.0, 0.4], "base_precision": "fp8", "precomputed_dir": [str(out / "00_photos")],
    }  # fmt: skip
    assert "no equivalent here for noise_offset; left out" in capsys.readouterr().out
    # Both files parse as the scripts' own --config files (the precompute reads the prompt file at once)
    precompute_args = precompute_embeddings.parse_args(["--config", str(result["precompute"][0][0])])
    assert precompute_args.validation_prompts == ["sks person --w 512 --h 768 --d 1"]
    args = train_zimage_lora.parse_args(["--config", str(out / "train.yaml")])
    assert (args.rank, args.sigma_range, args.optimizer, args.loraplus_lr_ratio) == (32, [0.0, 0.4], "adamw8bit", 16)


def test_an_ai_toolkit_upload_and_a_kohya_one_become_the_hub_flags():
    notes = []
    save = {"push_to_hub": True, "hf_repo_id": "me/sks-lora", "hf_private": True}
    network = {"type": "lora", "linear": 8, "linear_alpha": 8}
    flags = import_config.ai_toolkit_train_flags({"save": save, "network": network}, None, notes)
    assert (flags["push_to_hub"], flags["hub_model_id"], flags["hub_private"]) == (True, "me/sks-lora", True)
    kohya = {"huggingface_repo_id": "me/sks-lora", "huggingface_repo_visibility": "public"}
    flags = import_config.kohya_train_flags(kohya, notes)
    assert (flags["push_to_hub"], flags["hub_model_id"], flags["hub_private"]) == (True, "me/sks-lora", False)
    assert notes == []


def test_the_other_trainers_lora_defaults_come_along_where_a_config_leaves_them_out():
    """kohya and musubi default network_dim 4 and network_alpha 1, ai-toolkit alpha 1 (a scale of 1/rank, where
    ours is 1); musubi's Z-Image LoRA adapts the main blocks' attention and feed-forward Linears, ai-toolkit's every
    Linear of them; LyCORIS and ai-toolkit factor a LoKr near-square unless told."""
    notes = []
    flags = import_config.kohya_train_flags({"network_module": "networks.lora_zimage", "network_dim": 32}, notes)
    assert flags == {"rank": 32, "lora_alpha": 1.0, "lora_targets": "attention_ffn", "lora_exclude_refiners": True}
    assert notes == [f"network_alpha not set: kohya's and musubi's default 1 is kept ({import_config.SCALE_NOTE})"]
    flags = import_config.kohya_train_flags({"network_alpha": 8, "network_args": ["algo=lokr"]}, notes := [])
    assert flags == {"lora_alpha": 8, "rank": 4, "adapter": "lokr", "lokr_factor": -1}
    assert notes == ["network_dim not set: kohya's and musubi's default 4 is kept"]
    flags = import_config.kohya_train_flags({"network_module": "networks.lokr", "network_dim": 8}, notes := [])
    assert (flags["adapter"], flags["lokr_factor"]) == ("lokr", -1) and "musubi's own LoKr" in notes[1]
    import_config.kohya_train_flags({"network_module": "networks.lora_flux", "network_dim": 8}, notes := [])
    assert "network_module networks.lora_flux: not a Z-Image LoRA module here" in notes[1]
    assert import_config.kohya_train_flags({"learning_rate": 1e-4}, notes := []) == {"learning_rate": 1e-4}
    assert notes == []  # (no network key: the LoRA is given on the command line)

    job = {"network": {"type": "lokr", "linear": 16}}
    flags = import_config.ai_toolkit_train_flags(job, None, notes := [])
    assert flags == {
        "adapter": "lokr", "lora_targets": "all", "lora_exclude_refiners": True, "rank": 16, "lora_alpha": 1.0,
        "lokr_factor": -1,
    }  # fmt: skip
    assert notes == [f"network sets no linear_alpha: ai-toolkit's default 1 is kept ({import_config.SCALE_NOTE})"]
    flags = import_config.ai_toolkit_train_flags({"network": {"type": "lora", "rank": 8, "alpha": 4}}, None, [])
    assert (flags["rank"], flags["lora_alpha"]) == (8, 4)


def test_the_optimiser_and_its_own_arguments_come_along():
    """kohya's and ai-toolkit's optimisers of other packages become --optimizer by import path; the arguments this
    trainer has no flag for pass through --optimizer_args, as those trainers pass them."""
    notes = []
    config = {
        "optimizer_type": "came_pytorch.CAME",
        "optimizer_args": ["weight_decay=0.01", "betas=(0.9,0.999,0.9999)"],
    }
    flags = import_config.kohya_train_flags(config, notes)
    assert flags == {
        "optimizer": "came_pytorch.CAME",
        "adam_weight_decay": 0.01,
        "optimizer_args": ["betas=(0.9,0.999,0.9999)"],
    }
    assert notes == ["optimizer_type came_pytorch.CAME: install its package where you train (pip install ...)"]
    config = {"optimizer_type": "prodigy", "optimizer_args": ["d_coef=0.5", "betas=(0.9,0.99)", "decouple=True"]}
    flags = import_config.kohya_train_flags(config, notes := [])
    assert flags == {
        "optimizer": "prodigy", "adam_beta1": 0.9, "adam_beta2": 0.99, "optimizer_args": ["d_coef=0.5", "decouple=True"],
    }  # fmt: skip
    assert notes == []
    assert import_config.kohya_train_flags({"optimizer_type": "bitsandbytes.optim.Lion8bit"}, [])["optimizer"] == (
        "bitsandbytes.optim.Lion8bit"
    )
    assert import_config.kohya_train_flags({"optimizer_type": "Lion"}, [])["optimizer"] == "lion_pytorch.Lion"
    flags = import_config.kohya_train_flags(
        {"loss_type": "huber", "huber_c": 0.2, "huber_schedule": "snr"}, notes := []
    )
    assert flags == {"loss_type": "huber", "huber_c": 0.2} and notes == [
        "huber_schedule snr: here --huber_c is constant"
    ]
    flags = import_config.ai_toolkit_train_flags({"train": {"loss_type": "mae"}}, None, [])
    assert flags["loss_type"] == "l1"
    import_config.ai_toolkit_train_flags({"train": {"loss_type": "wavelet"}}, None, notes := [])
    assert "loss_type 'wavelet' has no equivalent here: see --loss_type" in notes
    config = {"network_dropout": 0.1, "network_args": ["rank_dropout=0.2", "module_dropout=0.05"]}
    assert import_config.kohya_train_flags(config, []) == {
        "network_dropout": 0.1,
        "rank_dropout": 0.2,
        "module_dropout": 0.05,
    }
    train = {"optimizer": "lion8bit", "optimizer_params": {"weight_decay": 0.1, "betas": [0.95, 0.98]}}
    flags = import_config.ai_toolkit_train_flags({"train": train}, None, notes := [])
    assert (flags["optimizer"], flags["adam_weight_decay"]) == ("bitsandbytes.optim.Lion8bit", 0.1)
    assert flags["optimizer_args"] == ["betas=[0.95, 0.98]"]
    # what they become parses as the trainer's own flags
    given = ["--optimizer", flags["optimizer"], "--optimizer_args", *flags["optimizer_args"]]
    args = train_zimage_lora.parse_args(["--pretrained_model_name_or_path", "m", "--precomputed_dir", "x", *given])
    assert args.optimizer == "bitsandbytes.optim.Lion8bit" and args.optimizer_args == ["betas=[0.95, 0.98]"]


def test_lycoris_dora_in_kohya_network_args_becomes_the_dora_adapter():
    notes = []
    flags = import_config.kohya_train_flags({"network_args": ["algo=lora", "dora_wd=True"]}, notes)
    assert flags["adapter"] == "dora" and notes == []
    flags = import_config.kohya_train_flags({"network_args": ["algo=lokr", "dora_wd=True"]}, notes)
    assert flags["adapter"] == "lokr" and notes == ["network_args: no equivalent here for dora_wd"]


def test_ai_toolkit_prompt_options_and_seeds_become_ours():
    notes = []
    sample = {"prompts": ["[trigger] a --seed 3 --cfg 4 --m 0.8", "b --cfg 1", "c"], "seed": 10, "walk_seed": True}
    assert import_config.ai_toolkit_prompts(sample, "sks", notes) == [
        "[trigger] a --d 3 --l 4",
        "b --l 0 --d 11",
        "c --d 12",
    ]
    assert notes == [
        "sample prompt '[trigger] a --seed 3 --cfg 4 --m 0.8': --m 0.8 left out (samples use the LoRA at strength 1)"
    ]
    prompts = import_config.ai_toolkit_prompts(sample | {"walk_seed": False}, "sks", [])
    assert [p.split(" --d ")[-1].split()[0] for p in prompts] == ["3", "10", "10"]


def test_a_kohya_training_configs_prior_loss_weight_weighs_its_regularisation_images(tmp_path):
    (tmp_path / "dataset.toml").write_text(
        '[[datasets]]\nresolution = 512\n[[datasets.subsets]]\nimage_dir = "/data/sks"\n'
        '[[datasets.subsets]]\nimage_dir = "/data/person"\nis_reg = true\n'
    )
    (tmp_path / "train.toml").write_text(
        'dataset_config = "dataset.toml"\nprior_loss_weight = 0.5\nsave_every_n_steps = 100\nsave_last_n_steps = 250\n'
    )
    result = import_config.main(
        import_config.parse_args([str(tmp_path / "train.toml"), "--output_dir", str(tmp_path / "c")])
    )
    assert result["train"]["loss_weights"] == [1.0, 0.5] and result["train"]["checkpoints_total_limit"] == 3
    assert not any("prior_loss_weight" in n or "save_last_n_steps" in n for n in result["notes"])
    flag = ["--prior_loss_weight", "0.25"]
    again = import_config.main(
        import_config.parse_args([str(tmp_path / "train.toml"), "--output_dir", str(tmp_path / "d"), *flag])
    )
    assert again["train"]["loss_weights"] == [1.0, 0.25]
