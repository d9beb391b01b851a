"""Prompt lines with settings of their own, in kohya's and musubi-tuner's sample prompt syntax: what precompute
caches for validation, and what generate.py samples."""

import pytest

from zimage_utils.sample_prompts import SamplePrompt, parse_prompt, parse_prompts, read_prompt_file


def test_a_kohya_sample_prompt_line_gives_its_settings_and_the_rest_is_left_to_the_run():
    line = "sks person, smiling -- candid --w 832 --h 1216 --d 42 --s 8 --l 3.5 --n blurry, low quality"
    prompt = parse_prompt(line)
    assert prompt == SamplePrompt("sks person, smiling -- candid", "blurry, low quality", 832, 1216, 42, 8, 3.5)
    assert prompt.options() == dict(
        negative="blurry, low quality", width=832, height=1216, seed=42, steps=8, guidance=3.5
    )
    # A line without settings is its text; a side left out comes from the run's size (height, width)
    assert parse_prompt("  a red circle  ") == SamplePrompt("a red circle") and SamplePrompt("x").options() == {}
    assert parse_prompt("a --w 512").size((1024, 768)) == (1024, 512)
    assert parse_prompt("a --g 2").guidance == 2.0  # musubi-tuner's name for the guidance scale


@pytest.mark.parametrize(
    "line, message",
    [
        ("a photo --fs 3", "unknown option --fs; a prompt takes --w, --h, --d, --s, --l (or --g), --n"),
        ("a photo --w 830", "--w 830: sides are positive multiples of 16 (VAE and 2x2 patches), e.g. 832"),
        ("a photo --h 0", "--h 0: sides are positive multiples of 16"),
        ("a photo --d 1.5", "--d takes a whole number, not '1.5'"),
        ("a photo --l high", "--l takes a number, not 'high'"),
        ("a photo --s 0", "--s 0: at least 1 sampling step"),
        ("a photo --l -1", "--l -1: the guidance scale is 0 (none) or more"),
        ("a photo --l 1 --g 2", "--l/--g is given twice"),
        ("a photo --n", "--n needs the negative prompt after it"),
        ("--w 512 --h 512", "the line has options but no prompt before them"),
    ],
)
def test_a_bad_setting_is_named_with_its_line_and_the_fix(line, message):
    with pytest.raises(ValueError, match="samples.txt, prompt 2") as error:
        parse_prompts(["fine", line], "samples.txt")
    assert message in str(error.value)


def test_a_prompt_file_is_its_lines_without_blanks_and_comments(tmp_path):
    # (its errors: test_generate.py's prompt file test)
    path = tmp_path / "samples.txt"
    path.write_text("\ufeff# kohya's sample prompts\n\n  a red circle --w 512 \n  # indented comment\nsks\n", "utf-8")
    assert read_prompt_file(path) == ["a red circle --w 512", "sks"]
