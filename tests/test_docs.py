"""The docs tell the truth: every flag README.md and docs/TRAINING_GUIDE.md mention exists in the script it belongs
to, every command they show parses, the accelerate configs are what they claim to be, and the README's demo
(`bash run_training.sh`) runs and writes the files it prints.

A flag belongs to the command it appears in: in `accelerate launch --num_processes 2 train_zimage_lora.py --rank 16`,
`--num_processes` is accelerate's and `--rank` the trainer's. A flag mentioned in prose (a table, a sentence) has no
command around it, so it only has to exist in one of our scripts or in `accelerate launch`.
"""

import argparse
import contextlib
import functools
import io
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import pytest
import yaml
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.commands.launch import launch_command_parser
from PIL import Image
from safetensors import safe_open

import caption_images
import generate
import import_config
import lora_tools
import precompute_embeddings
import train_zimage_lora
from zimage_utils.sample_prompts import OPTION_FIELDS

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCS = [REPO_ROOT / "README.md", REPO_ROOT / "docs" / "TRAINING_GUIDE.md"]
SCRIPTS = {
    "caption_images.py": caption_images,
    "import_config.py": import_config,
    "train_zimage_lora.py": train_zimage_lora,
    "precompute_embeddings.py": precompute_embeddings,
    "generate.py": generate,
    "lora_tools.py": lora_tools,
}
ACCELERATE = "accelerate launch"
# run_training.sh passes these variables' contents to the named script.
EXTRA_ARGS_VARIABLES = {
    "EXTRA_PRECOMPUTE_ARGS": "precompute_embeddings.py",
    "EXTRA_TRAIN_ARGS": "train_zimage_lora.py",
}
# Other programs the docs show with their own flags (`tensorboard --logdir ...`): not ours to check.
OTHER_PROGRAMS = {"tensorboard", "pip", "pytest"}
SHELL_FENCES = {"", "bash", "sh", "shell", "console"}
# What a prompt line may end in (`"sks --w 832 --h 1216"`, kohya's syntax): settings inside a prompt, not flags
PROMPT_OPTIONS = frozenset(f"--{option}" for option in OPTION_FIELDS)
FLAG = re.compile(r"(?<![\w-])--[A-Za-z][\w-]*")
ENV_ASSIGNMENT = re.compile(r"([A-Za-z_]\w*)=(.*)", re.S)


# ----------------------------------------------------------------------------------------------------------------
# The parsers a flag can belong to


@functools.cache
def option_strings(owner: str) -> frozenset[str]:
    """Every option string of a script's parser (as `--help` lists them; a script with subcommands: theirs too), or
    of `accelerate launch`."""
    if owner == ACCELERATE:
        return frozenset(launch_command_parser()._option_string_actions)
    parser = script_parser(owner)
    subcommands = [a.choices.values() for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return frozenset(parser._option_string_actions).union(
        *(sub._option_string_actions for s in subcommands for sub in s)
    )


def script_parser(script: str) -> argparse.ArgumentParser:
    """The ArgumentParser a script's `parse_args` builds, caught just before it parses anything."""

    class Caught(Exception):
        pass

    def catch(parser, *args, **kwargs):
        caught["parser"] = parser
        raise Caught

    caught = {}
    with mock.patch.object(argparse.ArgumentParser, "parse_args", catch), contextlib.suppress(Caught):
        SCRIPTS[script].parse_args([])
    return caught["parser"]


def all_options() -> frozenset[str]:
    return frozenset().union(*(option_strings(owner) for owner in [*SCRIPTS, ACCELERATE]))


# ----------------------------------------------------------------------------------------------------------------
# Reading commands and flags out of Markdown


@dataclass
class Command:
    """One command line of a doc, split into who gets which arguments."""

    line: int
    text: str
    env: dict[str, str] = field(default_factory=dict)
    program: str = ""  # "python", "accelerate launch", "bash run_training.sh", or another program's name
    launcher_args: list[str] = field(default_factory=list)  # accelerate's own arguments
    script: str | None = None  # one of SCRIPTS
    script_args: list[str] = field(default_factory=list)

    def flags(self) -> list[tuple[str, str | None]]:
        """(flag, owner) for every flag on the line; owner None = any of ours or accelerate's."""
        if self.program in OTHER_PROGRAMS:
            return []
        found = [(f, EXTRA_ARGS_VARIABLES.get(name)) for name, value in self.env.items() for f in FLAG.findall(value)]
        found += [(f, ACCELERATE) for a in self.launcher_args for f in FLAG.findall(a)]
        found += [(f, self.script) for a in self.script_args for f in FLAG.findall(a)]
        return found


def split_command(text: str, line: int) -> Command:
    """`A=1 accelerate launch --cpu generate.py --seed 7` → env, launcher args, script and script args."""
    try:
        tokens = shlex.split(text, comments=True)
    except ValueError:  # unbalanced quotes in a prose fragment: words are good enough for finding flags
        tokens = text.split()
    command = Command(line, text)
    while tokens and (m := ENV_ASSIGNMENT.fullmatch(tokens[0])):
        command.env[m.group(1)] = m.group(2)
        tokens = tokens[1:]
    if tokens[:2] == ["accelerate", "launch"]:
        command.program, tokens = ACCELERATE, tokens[2:]
        at = next((i for i, t in enumerate(tokens) if t.endswith(".py")), len(tokens))
        command.launcher_args, tokens = tokens[:at], tokens[at:]
    elif tokens[:1] == ["python"]:
        command.program, tokens = "python", tokens[1:]
    elif tokens[:2] == ["bash", "run_training.sh"]:
        command.program, tokens = "bash run_training.sh", tokens[2:]
    elif tokens and not tokens[0].startswith("-") and Path(tokens[0]).name not in SCRIPTS:
        command.program = tokens[0]
    if tokens and Path(tokens[0]).name in SCRIPTS:
        command.script, command.script_args = Path(tokens[0]).name, tokens[1:]
    else:
        command.script_args = tokens  # flags here have no script: owner None
    return command


def read_doc(path: Path) -> tuple[list[Command], list[tuple[int, str, str | None]]]:
    """The shell commands of a doc's fenced blocks (backslash continuations joined, comments dropped), and every
    (line, flag, owner) the doc mentions anywhere, commands included."""
    commands, mentions = [], []
    fence, pending, pending_line = None, "", 0
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        stripped = line.strip()
        if stripped.startswith("```"):
            fence = stripped[3:].strip().lower() if fence is None else None
            continue
        if fence in SHELL_FENCES and not stripped.startswith("#"):
            if not pending:
                pending_line = number
            pending += stripped.removesuffix("\\") + " "
            if stripped.endswith("\\"):
                continue
            if pending.strip():
                commands.append(split_command(pending, pending_line))
                mentions += [(pending_line, flag, owner) for flag, owner in commands[-1].flags()]
            pending = ""
            # A trailing "# comment" is prose: shlex dropped it, so its flags are checked below.
            line = line.partition(" #")[2]
        # Prose, comments and non-shell blocks: an inline `code span` is a command of its own, the rest is text.
        for span in re.findall(r"`([^`\n]+)`", line):
            mentions += [(number, flag, owner) for flag, owner in split_command(span, number).flags()]
        mentions += [(number, flag, None) for flag in FLAG.findall(re.sub(r"`[^`\n]+`", "", line))]
    return commands, mentions


# ----------------------------------------------------------------------------------------------------------------
# Flags and commands


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_flag_in_the_docs_exists(doc):
    """A user copying a flag from the docs never meets "unrecognized arguments"."""
    wrong = []
    for line, flag, owner in read_doc(doc)[1]:
        allowed = (option_strings(owner) if owner else all_options()) | PROMPT_OPTIONS
        if flag not in allowed:
            wrong.append(f"{doc.name}:{line}: {flag} is not an option of {owner or 'any script'}")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_command_in_the_docs_parses(doc):
    """Each `python SCRIPT ...` / `accelerate launch ... SCRIPT ...` of the fenced blocks is accepted by the script's
    own parse_args (and accelerate's), exactly as written: nothing is run."""
    commands = [c for c in read_doc(doc)[0] if c.script]
    if doc.name == "README.md":  # the extractor works: the README shows a command for every script
        assert {c.script for c in commands} == set(SCRIPTS)
    for command in commands:
        where = f"{doc.name}:{command.line}: {command.text.strip()}"
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            try:
                if command.program == ACCELERATE:
                    launch_command_parser().parse_args([*command.launcher_args, command.script, *command.script_args])
                SCRIPTS[command.script].parse_args(command.script_args)
            except SystemExit:
                error = stderr.getvalue().strip().splitlines()[-1]  # argparse's "error: ..." line
                pytest.fail(f"{where}\ndoes not parse: {error}")
        # argparse accepts unambiguous prefixes (--lora_a for --lora_alpha); the docs must spell flags out.
        for arg in command.script_args:
            flag = arg.split("=", 1)[0]
            assert not flag.startswith("--") or flag in option_strings(command.script), f"{where}\n{flag}?"
        config = dict(zip(command.launcher_args, command.launcher_args[1:])).get("--config_file")
        assert config is None or (REPO_ROOT / config).is_file(), f"{where}\nno such config {config}"


def test_readme_flag_table_defaults_match_the_parsers():
    """The README's "Key flags" table: each documented default is the parser's ("off" = false/0/None, "–" = None,
    "= rank" = None, resolved later). One default for several flags applies to each of them."""
    table = re.findall(r"^\| (`--.+?) \| (.+?) \|.*\|$", (REPO_ROOT / "README.md").read_text(), re.M)
    assert len(table) > 10, "the README's Key flags table was not found"
    wrong = []
    for flags_cell, defaults_cell in table:
        flags = re.findall(r"`(--[\w-]+)", flags_cell)
        defaults = [d.strip() for d in defaults_cell.split(",")]
        defaults = defaults * len(flags) if len(defaults) == 1 else defaults
        assert len(defaults) == len(flags), f"README table row {flags_cell!r}: {len(flags)} flags, {defaults}"
        for flag, documented in zip(flags, defaults):
            # (lora_tools.py's subcommands' flags are not the table's: its --rank is not the trainer's)
            for script in [s for s in SCRIPTS if flag in script_parser(s)._option_string_actions]:
                actual = script_parser(script)._option_string_actions[flag].default
                if not default_matches(documented, actual):
                    wrong.append(f"{flag} ({script}): README says {documented!r}, the parser's default is {actual!r}")
    assert not wrong, "\n".join(wrong)


def default_matches(documented: str, actual) -> bool:
    if documented == "off":
        return actual in (False, None, 0)
    if documented in ("–", "-") or documented.startswith("="):
        return actual is None
    if isinstance(actual, list):  # nargs: "0 1" for [0.0, 1.0]
        return [float(x) for x in documented.split()] == [float(x) for x in actual]
    try:
        return float(documented) == float(actual)
    except (TypeError, ValueError):
        return documented == str(actual)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_run_training_variables_in_the_docs_exist(doc):
    """`MODEL=... STEPS=... bash run_training.sh`: every variable the docs set is one the script reads."""
    script = (REPO_ROOT / "run_training.sh").read_text()
    for command in read_doc(doc)[0]:
        if command.program == "bash run_training.sh":
            for name in command.env:
                assert f"${{{name}" in script, f"{doc.name}:{command.line}: run_training.sh does not read {name}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_files_the_docs_point_at_exist(doc):
    """Relative Markdown links (and their #section anchors) and the accelerate configs named in the text are there."""
    text = doc.read_text()
    missing = []
    for target, anchor in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)", text):
        if "://" in target:
            continue
        linked = doc.parent / target if target else doc
        if not linked.exists():
            missing.append(target)
        elif anchor and anchor not in heading_anchors(linked):
            missing.append(f"{target}#{anchor}")
    for name in re.findall(r"(?<![\w/.-])(?:accelerate_configs/)?([\w-]+\.yaml)\b", text):
        if not (REPO_ROOT / "accelerate_configs" / name).is_file():
            missing.append(f"accelerate_configs/{name}")
    assert not missing, f"{doc.name} points at missing files: {missing}"


def heading_anchors(markdown: Path) -> set[str]:
    """GitHub's anchors for a file's headings: "## Which accelerate config" → "which-accelerate-config"."""
    headings = re.findall(r"^#+\s+(.+?)\s*$", markdown.read_text(), re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


# ----------------------------------------------------------------------------------------------------------------
# Accelerate configs


@pytest.mark.parametrize("config", sorted((REPO_ROOT / "accelerate_configs").glob("*.yaml")), ids=lambda p: p.name)
def test_accelerate_config_is_commented_and_loads(config):
    """Each config opens with the command that uses it, comments every key, and accelerate itself loads it."""
    lines = config.read_text().splitlines()
    assert isinstance(yaml.safe_load(config.read_text()), dict)
    header = []
    for line in lines:
        if not line.startswith("#"):
            break
        header.append(line)
    usage = f"accelerate launch --config_file accelerate_configs/{config.name}"
    assert any(usage in line for line in header), f"{config.name}: the opening comment should show `{usage} ...`"
    # A section header (`deepspeed_config:`) needs no comment of its own: the keys under it carry theirs.
    keys = [line for line in lines if line.strip() and not line.lstrip().startswith("#")]
    uncommented = [line for line in keys if " #" not in line and not re.fullmatch(r"\s*[\w-]+:\s*", line)]
    assert not uncommented, f"{config.name}: keys without a comment: {uncommented}"
    load_config_from_file(str(config))  # what `accelerate launch --config_file` does with it


# ----------------------------------------------------------------------------------------------------------------
# The README's demo


def test_run_training_demo_runs_end_to_end(tmp_path):
    """`bash run_training.sh` (6 steps instead of 60) builds the tiny model and data, caches, trains and samples,
    and every path it prints at the end exists: the LoRA in both formats, the validation samples, sample.png."""
    out = tmp_path / "demo"
    # Variables run_training.sh reads (MODEL, LORA_RANK, ...) are cleared, so that a RANK or MODEL exported in the calling
    # shell (torchrun and SLURM wrappers export RANK) cannot change the demo.
    reads = set(re.findall(r"\$\{(\w+)", (REPO_ROOT / "run_training.sh").read_text()))
    env = {k: v for k, v in os.environ.items() if k not in reads}
    # OUT relative to where the script is run from, as a user gives it, not to the script's folder
    env.update(OUT="demo", STEPS="6", HF_HUB_OFFLINE="1", PATH=f"{Path(sys.executable).parent}:{env['PATH']}")
    run = functools.partial(subprocess.run, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    result = run(["bash", str(REPO_ROOT / "run_training.sh")])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert out.is_dir() and not (REPO_ROOT / "demo").exists()

    printed = dict(re.findall(r"^([\w ()]+):\s+(\S+)$", result.stdout.split("== 3/3")[-1], re.M))
    assert set(printed) == {"LoRA (diffusers)", "LoRA (ComfyUI)", "validation samples", "sample image"}, printed
    for label, path in printed.items():
        assert Path(path).exists(), f"run_training.sh printed {label}: {path}, which does not exist"
    for label, prefix in [("LoRA (diffusers)", "transformer."), ("LoRA (ComfyUI)", "diffusion_model.")]:
        with safe_open(printed[label], "pt") as f:
            keys = list(f.keys())
        assert keys and all(k.startswith(prefix) for k in keys), f"{label}: {keys[:3]}"
    assert list(Path(printed["validation samples"]).glob("*.png"))
    with Image.open(printed["sample image"]) as image:
        assert image.size == (64, 64)  # the demo's RESOLUTION

    # a DATA folder that is not there, relative to where the script runs, is named before anything starts
    missing = run(["bash", str(REPO_ROOT / "run_training.sh")], env={**env, "DATA": "my_photos"})
    assert (
        missing.returncode == 2
        and f"DATA=my_photos is not a folder (relative paths are taken from {tmp_path})" in (missing.stderr)
    )
