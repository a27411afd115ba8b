"""Reading JSON and JSONL that may be damaged: a run killed mid-write, a hostile or broken data file.

Every malformed input becomes a ValueError with a short reason, never a RecursionError (a line nested 200,000
deep) or a traceback from inside the parser; a 5,000-digit integer is already a ValueError in Python.
"""

from __future__ import annotations

import json
from pathlib import Path


def parse_json(text: str | bytes):
    """json.loads, with every way it can fail on bad input turned into ValueError.

    Example: parse_json('{"step": 1}') == {"step": 1}; parse_json("[" * 200000) raises ValueError("nested too deeply")
    """
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc.msg})") from None
    except RecursionError:
        raise ValueError("not valid JSON (nested too deeply)") from None
    except ValueError as exc:  # e.g. an integer longer than Python's 4300-digit conversion limit
        raise ValueError(f"not valid JSON ({str(exc).splitlines()[0][:80]})") from None


def read_log(path: Path) -> tuple[list[dict], int]:
    """The rows of a JSONL log written by train.py, and how many torn trailing lines were dropped.

    Appends are the only writes, so a crash (kill -9, a full disk) can only leave the *last* lines unfinished:
    those are dropped. A bad line followed by a good one is not crash damage and raises ValueError naming it.
    A row must be a JSON object with an integer "step".
    Example: lines '{"step": 1}', '{"step": 2, "lo' -> ([{"step": 1}], 1)
    """
    lines = Path(path).read_bytes().split(b"\n")
    rows, bad = [], []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = parse_json(line)
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                raise ValueError('not a JSON object with an integer "step"')
        except ValueError as exc:
            bad.append((number, str(exc)))
            continue
        if bad:
            number, reason = bad[0]
            raise ValueError(f"{path}:{number}: {reason}, and valid lines follow it (not a torn last line)")
        rows.append(row)
    return rows, len(bad)


def write_log(path: Path, rows: list[dict]) -> None:
    """Replace a JSONL log atomically (write a temporary file, then rename): a crash leaves the old or the new."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
    tmp.replace(path)
