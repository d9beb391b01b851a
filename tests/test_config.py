"""`--config FILE`: flags from a YAML file, checked as typed ones, the command line winning; and the trainer's
run_config.yaml, which repeats a run."""

from pathlib import Path

import pytest
import yaml

import generate
import precompute_embeddings
import train_zimage_lora
from zimage_utils.cli import write_config

REQUIRED = ["--pretrained_model_name_or_path", "model", "--precomputed_dir", "cache", "--output_dir", "out"]


def write_yaml(path, text: str):
    path.write_text(text)
    return str(path)


def test_the_files_flags_come_first_and_the_command_line_wins(tmp_path):
    config = write_yaml(
        tmp_path / "run.yaml",
        "pretrained_model_name_or_path: model\nprecomputed_dir: [a, b]\noutput_dir: out\nrank: 8\n"
        "learning_rate: 3e-4\ngradient_checkpointing: true\ncompile: false\nsigma_range: [0.2, 0.9]\n",
    )
    args = train_zimage_lora.parse_args(["--config", config, "--rank", "4"])
    assert args.rank == 4 and args.precomputed_dir == ["a", "b"] and args.learning_rate == 3e-4
    assert args.gradient_checkpointing is True and args.compile is False and args.sigma_range == [0.2, 0.9]
    assert train_zimage_lora.parse_args(["--config", config]).rank == 8


def test_no_name_turns_off_what_the_file_turns_on(tmp_path):
    config = write_yaml(
        tmp_path / "run.yaml",
        "gradient_checkpointing: true\ncompile: true\ninit_lora: old_lora\nlora_alpha: 8\nrank: 8\n",
    )
    args = train_zimage_lora.parse_args(REQUIRED + ["--config", config, "--no_compile", "--no_init_lora"])
    assert args.compile is False and args.init_lora is None  # back to the defaults
    assert args.gradient_checkpointing is True and args.lora_alpha == 8 and args.rank == 8  # the rest as the file says
    assert train_zimage_lora.parse_args(REQUIRED + ["--config", config, "--no_lora_alpha"]).lora_alpha is None
    # the later flag wins, as for any flag given twice
    assert train_zimage_lora.parse_args(REQUIRED + ["--no_compile", "--compile"]).compile is True
    sample = write_yaml(tmp_path / "sample.yaml", "pretrained_model_name_or_path: model\ncpu_offload: model\n")
    assert generate.parse_args(["--config", sample]).cpu_offload == "model"
    assert generate.parse_args(["--config", sample, "--no_cpu_offload"]).cpu_offload is None
    # a flag with a value of its own is changed by giving another one: it has no --no_ form
    for flag in ("--no_rank", "--no_seed"):
        with pytest.raises(SystemExit):
            train_zimage_lora.parse_args(REQUIRED + [flag])


@pytest.mark.parametrize("line", ["optimizer: adamw9bit", "rank: many", "rank: 0"])
def test_the_files_values_go_through_the_parsers_checks(tmp_path, line, capsys):
    config = write_yaml(tmp_path / "run.yaml", line + "\n")
    with pytest.raises(SystemExit):
        train_zimage_lora.parse_args(REQUIRED + ["--config", config])
    assert "error:" in capsys.readouterr().err


def test_the_trainer_names_flags_that_belong_to_the_caching(capsys):
    with pytest.raises(SystemExit):
        train_zimage_lora.parse_args(REQUIRED + ["--caption_prefix", "sks"])
    assert "--caption_prefix is set when caching (precompute_embeddings.py" in capsys.readouterr().err


def test_a_switch_given_as_a_string_names_the_key(tmp_path):
    config = write_yaml(tmp_path / "run.yaml", 'gradient_checkpointing: "false"\n')
    with pytest.raises(ValueError, match="run.yaml: gradient_checkpointing: 'false'; a switch takes true or false"):
        train_zimage_lora.parse_args(REQUIRED + ["--config", config])


def test_an_unknown_key_names_the_file_and_the_nearest_flag(tmp_path):
    config = write_yaml(tmp_path / "run.yaml", "learning_rat: 1e-4\n")
    with pytest.raises(ValueError, match=r"run\.yaml: 'learning_rat' is not a flag .*did you mean 'learning_rate'"):
        train_zimage_lora.parse_args(REQUIRED + ["--config", config])
    with pytest.raises(ValueError, match="give a mapping"):
        train_zimage_lora.parse_args(REQUIRED + ["--config", write_yaml(tmp_path / "list.yaml", "- rank\n")])
    with pytest.raises(FileNotFoundError, match="missing.yaml: no such file"):
        train_zimage_lora.parse_args(REQUIRED + ["--config", str(tmp_path / "missing.yaml")])


def test_the_precompute_and_generate_take_a_config_too(tmp_path):
    config = write_yaml(
        tmp_path / "cache.yaml",
        "pretrained_model_name_or_path: model\ntrain_data_dir: images\noutput_dir: cache\nresolution: 512\n"
        "contact_sheet: true\ncaption_variants: true\n",
    )
    args = precompute_embeddings.parse_args(["--config", config])
    assert args.resolution == 512 and args.caption_variants is True
    assert (
        args.contact_sheet == precompute_embeddings.parse_args(["--config", config, "--contact_sheet"]).contact_sheet
    )
    assert precompute_embeddings.parse_args(["--config", config, "--contact_sheet", "9"]).contact_sheet == 9
    sample = write_yaml(tmp_path / "sample.yaml", "pretrained_model_name_or_path: model\nprompt: a red circle\n")
    assert generate.parse_args(["--config", sample, "--seed", "3"]).prompt == ["a red circle"]


def test_a_list_flag_on_the_command_line_replaces_the_files_and_no_name_empties_it(tmp_path):
    """(generate.py's --lora and --prompt gather values: the command line's would otherwise add to the file's)"""
    lines = "pretrained_model_name_or_path: model\nlora: [a.safetensors, b.safetensors]\nprompt: [one, two]\n"
    config = write_yaml(tmp_path / "sample.yaml", lines)
    args = generate.parse_args(["--config", config])
    assert (args.lora, args.prompt) == (["a.safetensors", "b.safetensors"], ["one", "two"])
    args = generate.parse_args(["--config", config, "--lora", "c.safetensors:0.5", "--prompt", "three"])
    assert (args.lora, args.prompt) == (["c.safetensors:0.5"], ["three"])
    assert generate.parse_args(["--config", config, "--no_lora"]).lora == []


def test_a_written_config_repeats_the_parsed_flags(tmp_path):
    argv = REQUIRED + ["--precomputed_dir", "a", "b", "--repeats", "1", "3", "--rank", "32", "--compile"]
    argv += ["--sigma_range", "0.1", "0.8", "--learning_rate", "2.5e-5", "--lora_targets", "attention_ffn"]
    argv += ["--resume_from_checkpoint", "latest", "--max_train_steps_this_run", "2"]
    args = train_zimage_lora.parse_args(argv)
    path = tmp_path / "run_config.yaml"
    write_config(path, args, leave_out=("max_train_steps_this_run",))
    assert not (tmp_path / "run_config.yaml.tmp").exists()
    written = yaml.safe_load(path.read_text())
    assert written["precomputed_dir"] == ["a", "b"] and written["compile"] is True and "config" not in written
    assert "dry_run" not in written and "max_train_steps_this_run" not in written  # off, and left out
    again = train_zimage_lora.parse_args(["--config", str(path)])
    assert {**vars(again), "config": None, "max_train_steps_this_run": 2} == vars(args)


PRESETS = sorted((Path(__file__).resolve().parents[1] / "presets").glob("*.yaml"))


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_each_card_preset_is_a_config_its_script_takes_and_its_usage_line_names_it(preset):
    script = precompute_embeddings if preset.name.startswith("precompute") else train_zimage_lora
    required = (
        ["--pretrained_model_name_or_path", "model", "--train_data_dir", "images", "--output_dir", "cache"]
        if script is precompute_embeddings
        else REQUIRED
    )
    args = script.parse_args(required + ["--config", str(preset)])
    flags = yaml.safe_load(preset.read_text())
    assert flags and all(getattr(args, k) == v for k, v in flags.items()), flags
    usage = preset.read_text().split("\n\n")[0]
    assert f"{script.__name__}.py" in usage and f"--config presets/{preset.name}" in usage


def test_the_readme_points_each_card_to_its_preset():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert len(PRESETS) >= 5 and all(f"presets/{p.name}" in readme for p in PRESETS)
