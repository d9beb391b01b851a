"""Sample prompts with settings of their own, written as kohya's sd-scripts and musubi-tuner write them in their
sample prompt files, so that those files work here unchanged:

    a photo of sks person, smiling --w 832 --h 1216 --d 42 --s 8 --l 0 --n blurry, low quality

    --w, --h   width, height in pixels (multiples of 16)
    --d        seed
    --s        sampling steps
    --l, --g   guidance (CFG) scale (musubi's --g; Z-Image has no separate embedded guidance)
    --n        negative prompt (used when the guidance scale is above 0)

What a line leaves out comes from the run's flags. The trainer samples validation prompts this way (their text and
negative are encoded once by precompute_embeddings.py) and generate.py its --prompt / --prompt_file prompts."""

import argparse
import dataclasses
import re
from pathlib import Path

# An option is " --" and letters at a word's end, so "a -- b" or "--no-dash-words" inside a prompt stay text
_OPTION = re.compile(r"\s--([A-Za-z]+)(?=\s|$)")
OPTION_FIELDS = {
    "w": "width",
    "h": "height",
    "d": "seed",
    "s": "steps",
    "l": "guidance",
    "g": "guidance",
    "n": "negative",
}
KNOWN_OPTIONS = "--w, --h, --d, --s, --l (or --g), --n"


@dataclasses.dataclass(frozen=True)
class SamplePrompt:
    """One prompt line: its text and the settings it gives (None: the run's)."""

    text: str
    negative: str | None = None
    width: int | None = None
    height: int | None = None
    seed: int | None = None
    steps: int | None = None
    guidance: float | None = None

    def options(self) -> dict:
        """The settings the line gave, by field name (what a cache stores beside the text)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "text" and v is not None}

    def size(self, default: tuple[int, int]) -> tuple[int, int]:
        """(height, width): the line's, each side it leaves out from `default` (height, width)."""
        return (self.height or default[0], self.width or default[1])


def parse_prompt(line: str, where: str = "prompt") -> SamplePrompt:
    """A prompt line (text, then any options) as a SamplePrompt. `where` names the line in errors ("--prompt_file
    my.txt line 3"). Raises ValueError naming the option and the fix."""
    parts = _OPTION.split(" " + line.strip())
    text, options = parts[0].strip(), {}
    for flag, value in zip(parts[1::2], parts[2::2], strict=True):
        value = value.strip()
        field = OPTION_FIELDS.get(flag)
        if field is None:
            raise ValueError(f"{where}: unknown option --{flag}; a prompt takes {KNOWN_OPTIONS} (kohya's syntax)")
        if field in options:
            raise ValueError(f"{where}: {'--l/--g' if field == 'guidance' else '--' + flag} is given twice")
        options[field] = _option_value(field, flag, value, where)
    if not text:
        raise ValueError(f"{where}: the line has options but no prompt before them")
    return SamplePrompt(text, **options)


def side_problem(pixels: int) -> str | None:
    """What is wrong with an image side of `pixels` for Z-Image (its VAE's 8x and the 2x2 patches), with the nearest
    good one; None when it is right."""
    if pixels > 0 and pixels % 16 == 0:
        return None
    return f"sides are positive multiples of 16 (VAE and 2x2 patches), e.g. {max(16, round(pixels / 16) * 16)}"


def image_side(value: str) -> int:
    """argparse type of a --height/--width: a positive multiple of 16."""
    try:
        pixels = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number of pixels") from None
    if problem := side_problem(pixels):
        raise argparse.ArgumentTypeError(f"{value}: {problem}")
    return pixels


def _option_value(field: str, flag: str, value: str, where: str):
    if field == "negative":
        if not value:
            raise ValueError(f"{where}: --n needs the negative prompt after it")
        return value
    try:
        number = float(value) if field == "guidance" else int(value)
    except ValueError:
        kind = "a number" if field == "guidance" else "a whole number"
        raise ValueError(f"{where}: --{flag} takes {kind}, not {value!r}") from None
    if field in ("width", "height") and (problem := side_problem(number)):
        raise ValueError(f"{where}: --{flag} {value}: {problem}")
    if field == "steps" and number < 1:
        raise ValueError(f"{where}: --s {value}: at least 1 sampling step")
    if field == "guidance" and number < 0:
        raise ValueError(f"{where}: --{flag} {value}: the guidance scale is 0 (none) or more")
    return number


def parse_prompts(lines: list[str], source: str = "--prompt") -> list[SamplePrompt]:
    """Each line parsed; an error names `source` and the line."""
    return [parse_prompt(line, f"{source}, prompt {i} ({line[:40]!r})") for i, line in enumerate(lines, 1)]


def read_prompt_file(path: str | Path, flag: str = "--prompt_file") -> list[str]:
    """A prompt file's lines, stripped, without blank ones and # comments (UTF-8, a BOM allowed)."""
    try:
        lines = Path(path).read_text(encoding="utf-8-sig").splitlines()
    except FileNotFoundError:
        raise FileNotFoundError(f"{flag} {path}: no such file") from None
    except UnicodeDecodeError:
        raise ValueError(f"{flag} {path} is not UTF-8 text: save it as UTF-8") from None
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise ValueError(f"{flag} {path} holds no prompt: write one per line")
    return prompts
