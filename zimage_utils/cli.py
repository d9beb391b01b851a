"""How the scripts end on a user's mistake: one line naming the problem and the fix, not a traceback."""

import logging
import os
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


def check_output_dir(path, flag: str = "--output_dir") -> None:
    """A folder to write into must not be a file (else mkdir ends in a traceback)."""
    if Path(path).exists() and not Path(path).is_dir():
        raise ValueError(f"{flag} {path} is a file: give a folder")


def setup_logging(script_logger: str) -> None:
    """Plain lines: the script's own logger and ours at INFO, other libraries' at WARNING (accelerate would print four
    lines per checkpoint it saves, e.g. "[RANK 0] Optimizer state saved in ...")."""
    logging.basicConfig(format="%(message)s", level=logging.WARNING)
    for name in (script_logger, "zimage_utils"):
        logging.getLogger(name).setLevel(logging.INFO)
