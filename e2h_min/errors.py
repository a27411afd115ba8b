"""The leaf every entry point imports: the one-line user error, the limits that keep a typo from exhausting the
machine, the argparse parser that prints one line, the entry-point decorator (exit code 2) and the checks that an
output place can be written. Imports nothing from e2h_min."""

from __future__ import annotations

import argparse
import datetime
import errno
import os
import sys


class UserError(Exception):
    """Bad input from the user: printed as one line, exit code 2 (see `exit_on_user_error`)."""


class TaskDataError(ValueError):
    """A data file is missing or malformed; the message names the file and the expected columns."""


# Limits that keep a typo from exhausting memory or hanging (each named in its error line). They are far above any
# real run: the paper uses 1,600 steps, 8 x 8 samples per step, 512 tokens, 100-1,000 eval problems per level.
MAX_STEPS = 10_000_000  # --total-steps (the curriculum clock); curriculum.py --steps
MAX_ROLLOUT_ROWS = 65_536  # --prompts-per-step x --num-generations sequences decoded in one batch
MAX_NEW_TOKENS = 131_072  # any completion budget; the model's own context is checked once its config is read
MAX_EVAL_PROBLEMS = 100_000  # test problems per level (generated tasks build each one)
MAX_SEED = 2**32 - 1  # numpy's seed range
MAX_THREADS = 1024


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse prints the whole usage block on a bad flag; every entry point prints the one line that matters
    (and exits with code 2). Abbreviated flags are refused: a typo must not quietly set another option."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def at_least(minimum: int):
    """An argparse type for counts: an integer >= minimum, else a one-line error naming the flag.
    Example: add_argument("--repeats", type=at_least(1)); "--repeats -1" -> "argument --repeats: must be >= 1, got -1"
    """
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def check_context(max_new_tokens: int, context: int | None, flag: str = "--max-new-tokens") -> None:
    """A completion budget must leave room in the model's context (max_position_embeddings; None = unknown), or
    decoding would index past the position table or allocate for a length the model cannot use."""
    if context is not None and max_new_tokens > context:
        raise UserError(f"{flag} {max_new_tokens} exceeds the model's context of {context} tokens "
                        f"(max_position_embeddings); use less, leaving room for the prompt")


def check_path_name(path, flag: str) -> None:
    """A path the run will write under or record must be UTF-8 (safetensors, JSON and the model card need text) and
    short enough for the filesystem, with room for the run's own names below it (checkpoints/.tmp_step_..._PID/
    tokenizer_config.json); else a UserError, before anything is written.
    Example: check_path_name("runs/\udcffx", "--out-dir") raises "... is not valid UTF-8 ..." """
    from pathlib import Path

    text = str(path)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise UserError(f"{flag} {text.encode('utf-8', 'backslashreplace').decode()}: the path is not valid UTF-8; "
                        f"rename it (or pass another path)") from None
    longest = max((len(os.fsencode(part)) for part in Path(path).parts), default=0)
    if longest > 255:
        raise UserError(f"{flag}: a path component of {longest} bytes is longer than filesystems allow (255); "
                        f"pass a shorter name")
    full = len(os.fsencode(os.path.abspath(text)))
    if full + 100 > 4096:
        raise UserError(f"{flag}: the path is {full} bytes long; with the run's own names below it that passes the "
                        f"4096-byte limit of a path: pass a shorter one")


def check_output_dir(path, flag: str) -> None:
    """Create `path` (a directory the entry point will write into) now and write a scratch file there, or raise a
    UserError saying why not: an unwritable place should fail before the work, not after it."""
    import tempfile
    from pathlib import Path

    check_path_name(path, flag)
    path = Path(path)
    for parent in [path, *path.parents]:
        if parent.exists() and not parent.is_dir():
            raise UserError(f"{flag} {path}: {parent} is a file, not a directory; pass a directory path")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise UserError(f"{flag} {path}: cannot write there ({exc.strerror}); pass a writable directory") from None


def check_output_file(path, flag: str) -> None:
    """`path` can be written: not a directory, and its directory can be created and written (a scratch file is
    written and removed there). Checked before the work."""
    from pathlib import Path

    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path}: a directory; pass a file path")
    check_output_dir(path.parent if str(path.parent) else Path("."), flag + " (its directory)")
    if path.exists() and not os.access(path, os.W_OK):
        raise UserError(f"{flag} {path}: not writable; pass a writable path")


def exit_on_user_error(fn):
    """Decorator for entry points: a UserError (or a task data error) becomes one stderr line and exit code 2."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (UserError, TaskDataError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)
        except OSError as exc:  # a full disk or quota is the user's to fix, not a bug: one line too
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            print(f"error: no space left on the device (writing {exc.filename or 'a file'}); free some space and "
                  f"run again (train.py: --resume RUN_DIR continues from the last intact checkpoint)", file=sys.stderr)
            sys.exit(2)
    return wrapper


def is_iso_date(text: str) -> bool:
    """True for a calendar date written YYYY-MM-DD (the form config.json records). Example: "2024-07-26"."""
    try:
        datetime.date.fromisoformat(text)
    except ValueError:
        return False
    return len(text) == 10
