"""The scripts' command lines: flags from a `--config` file, and how a run ends on a user's mistake (one line naming
the problem and the fix, not a traceback)."""

import argparse
import contextlib
import difflib
import logging
import os
import socket
import sys
from collections.abc import Callable
from pathlib import Path


class OutOfGPUMemory(MemoryError):
    """A training step ran out of GPU memory; the message says what to change (a bare MemoryError, from the host,
    keeps its traceback)."""


# Raised by our code with a message meant for the user (bad path, wrong model, stale cache, non-finite loss, a training
# step out of GPU memory).
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, FloatingPointError, OutOfGPUMemory)


def run(main: Callable, parse_args: Callable) -> None:
    """`main(parse_args())`; a user error prints "error: ..." and exits with status 2.
    ZIMAGE_DEBUG=1 shows the full traceback instead."""
    try:
        main(parse_args())
    except USER_ERRORS as error:
        if os.environ.get("ZIMAGE_DEBUG"):
            raise
        print(f"error: {error}\n(set ZIMAGE_DEBUG=1 for the traceback)", file=sys.stderr)
        sys.exit(2)


def require_at_least(parser, args, **least: float) -> None:
    """`parser.error` for the first flag (name=least) given below its least value; None (not given) passes."""
    for flag, low in least.items():
        if (value := getattr(args, flag)) is not None and value < low:
            off = " (0 = off)" if low == 0 else ""
            parser.error(f"--{flag} {value}: give {low} or more{off}")


def require_within(parser, args, **ranges: tuple[float, float]) -> None:
    """`parser.error` for the first flag (name=(low, high)) given outside [low, high]; None (not given) passes."""
    for flag, (low, high) in ranges.items():
        if (value := getattr(args, flag)) is not None and not low <= value <= high:
            parser.error(f"--{flag} {value}: give a value from {low:g} to {high:g}")


def check_output_dir(path, flag: str = "--output_dir") -> None:
    """A folder to write into must not be a file (else mkdir ends in a traceback)."""
    if Path(path).exists() and not Path(path).is_dir():
        raise ValueError(f"{flag} {path} is a file: give a folder")


class FolderInUse(ValueError):
    """Another process is writing into the folder this run would write into."""


LOCK_NAME = ".lock"


@contextlib.contextmanager
def folder_lock(folder: str | Path, script: str):
    """Hold `folder`/.lock while the block runs (the kernel's lock: it ends with the process, however that ends), so
    that a second run writing into the same folder is refused (FolderInUse, naming the first) instead of the two
    mixing their files. Makes the folder. Where the OS has no `fcntl` (Windows), nothing is locked."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    path = Path(folder) / LOCK_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # the file may have been removed by a run ending between our open and lock: then it locks nothing
            if not path.exists() or os.stat(path).st_ino != os.fstat(handle.fileno()).st_ino:
                raise BlockingIOError
        except BlockingIOError:
            handle.seek(0)
            raise FolderInUse(
                f"{folder} is being written by {handle.read().strip() or 'another process'}: wait for it to end (or "
                "stop it), or give this run another --output_dir"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{script} (pid {os.getpid()} on {socket.gethostname()})\n")
        handle.flush()
        try:
            yield
        finally:
            path.unlink(missing_ok=True)  # (while still locked; closing the file then releases the lock)


def setup_logging(script_logger: str) -> None:
    """Plain lines: the script's own logger and ours at INFO, other libraries' at WARNING (accelerate would print four
    lines per checkpoint it saves, e.g. "[RANK 0] Optimizer state saved in ..."). Under a launcher, processes other
    than the first (RANK > 0) log warnings only: each would repeat the same notes."""
    logging.basicConfig(format="%(message)s", level=logging.WARNING)
    first = os.environ.get("RANK", "0") == "0"
    for name in (script_logger, "zimage_utils"):
        logging.getLogger(name).setLevel(logging.INFO if first else logging.WARNING)


def parse_with_config(parser: argparse.ArgumentParser, input_args: list[str] | None = None) -> argparse.Namespace:
    """`parser.parse_args`, with `--config FILE` added: a YAML mapping of flags (names without the dashes, as
    `rank: 16`, `gradient_checkpointing: true`, `precomputed_dir: [a, b]`) that comes first, so a flag on the command
    line wins. The file's flags go through the parser as typed ones do: the same types, choices and checks."""
    parser.add_argument(
        "--config",
        default=None,
        help="A YAML file of flags (names without --, e.g. `rank: 16`); flags on the command line override it, and "
        "--no_NAME turns off a flag that is off unless given (e.g. --no_compile, --no_init_lora).",
    )
    add_off_flags(parser)
    argv = sys.argv[1:] if input_args is None else list(input_args)
    find = argparse.ArgumentParser(add_help=False)
    find.add_argument("--config", default=None)
    config = find.parse_known_args(argv)[0].config
    # A flag that gathers values (--lora A --lora B, --prompt A B) given on the command line replaces the file's
    given = {
        parser._option_string_actions[a.split("=")[0]].dest
        for a in argv
        if a.split("=")[0] in parser._option_string_actions
    }
    return parser.parse_args((config_argv(parser, Path(config), replaced=given) if config else []) + argv)


def add_off_flags(parser: argparse.ArgumentParser) -> None:
    """`--no_NAME` for each flag that is off unless given (a switch, or a flag whose default is None): it puts the
    default back, so a flag that a `--config` file sets can be turned off on the command line (the later one wins).
    Left out of `--help`; `--config`'s help names them."""
    for action in list(parser._actions):
        flags = [f for f in action.option_strings if f.startswith("--")]
        if (
            not flags
            or action.required
            or action.dest == "config"
            or not (action.default is None or action.default is False or action.default == [])
        ):
            continue
        off = "--no_" + flags[-1].removeprefix("--")
        if off not in parser._option_string_actions:
            parser.add_argument(
                off,
                action="store_const",
                dest=action.dest,
                const=action.default,
                default=argparse.SUPPRESS,
                help=argparse.SUPPRESS,
            )


def config_argv(parser: argparse.ArgumentParser, path: Path, replaced: set[str] = frozenset()) -> list[str]:
    """The command-line flags a `--config` YAML file stands for (see `parse_with_config`), but for flags that gather
    values (append, extend) whose dest is in `replaced` (given on the command line)."""
    import yaml

    if not path.is_file():
        raise FileNotFoundError(f"--config {path}: no such file")
    try:
        flags = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ValueError(f"--config {path} is not valid YAML: {error}") from error
    if not isinstance(flags, dict):
        raise ValueError(f"--config {path}: give a mapping of flag names to values (e.g. `rank: 16`)")
    known = {name[2:]: action for name, action in parser._option_string_actions.items() if name.startswith("--")}
    argv = []
    for key, value in flags.items():
        action = known.get(str(key).removeprefix("--"))
        if action is None or key in ("config", "help"):
            close = difflib.get_close_matches(str(key), list(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"--config {path}: {key!r} is not a flag of this script{hint}; see --help")
        flag = action.option_strings[-1]
        gathers = isinstance(action, argparse._AppendAction | argparse._ExtendAction)
        if value is None or value is False or (gathers and action.dest in replaced):
            continue  # not given (a switch left off), or given again on the command line
        if action.nargs == 0 and not isinstance(value, bool):  # a switch: `true` or `false` (YAML's, unquoted)
            raise ValueError(f"--config {path}: {key}: {value!r}; a switch takes true or false (unquoted)")
        if value is True:
            argv += [flag] if action.nargs in (0, "?") else [flag, "true"]
        elif isinstance(value, list) and isinstance(action, argparse._AppendAction) and action.nargs is None:
            argv += [part for item in value for part in (flag, str(item))]  # (one value per occurrence)
        elif isinstance(value, list):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    return argv


def write_config(path: Path, args: argparse.Namespace, leave_out: tuple[str, ...] = ()) -> None:
    """The flags of this run as a `--config` file that repeats it: every flag set (None and off switches left out;
    `--config` and `--dry_run` never repeat a run, `leave_out` names more), written to a temporary name first, so the
    file is whole or absent."""
    import yaml

    leave_out = ("config", "dry_run", *leave_out)
    flags = {k: v for k, v in vars(args).items() if k not in leave_out and v is not None and v is not False}
    write_text_atomic(path, yaml.safe_dump(flags, sort_keys=False))


def write_text_atomic(path: str | Path, text: str) -> None:
    """`text` (UTF-8) to a temporary name beside `path`, then renamed: a crash never leaves half a file under the
    name."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
