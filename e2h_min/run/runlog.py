"""The run directory's bookkeeping: who owns it, JSONL logs, the resume check, sampled completions.

Ownership. A run directory belongs to one run at a time: the run holds an exclusive flock on RUN/.lock while it
writes (a second run on it stops with the holder's PID). The kernel releases the lock when the holder exits,
however it exits (kill -9 included), so a stale lock never blocks a resume. Nothing of an earlier run is deleted
unless --overwrite says so: a default run directory that holds a run gives way to a fresh name (RUN-2, RUN-3...),
an explicit --out-dir that holds one is refused unless --resume or --overwrite.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import shutil
from collections import Counter
from pathlib import Path

from e2h_min.errors import UserError, check_output_dir
from e2h_min.run.config import Config
from e2h_min.jsonl import read_log, write_log
from e2h_min.rl.samples import StepSamples

LOCK_FILE = ".lock"
# What a train.py run writes into its directory; a directory holding any of these holds a run.
RUN_FILES = ("config.json", "metrics.jsonl", "eval.jsonl", "completions.jsonl", "checkpoints", "final",
             "final-merged")
# What else belongs to a run (written by eval.py, the report and the trackers): --overwrite deletes these too, so
# the new run's report never shows the old run's results.
RUN_EXTRAS = ("eval", "report", "tensorboard", "wandb", "wandb_run_id")

# Fields that may differ when resuming: they change bookkeeping or speed, not what the run computes.
RESUME_SAFE_FIELDS = {"resume", "out_dir", "eval_every", "eval_problems", "eval_max_new_tokens", "save_every",
                      "keep_checkpoints", "log_completions_every", "device", "threads", "micro_batch_size",
                      "micro_batch_tokens", "share_prompt_forward", "skip_zero_advantage", "gradient_checkpointing",
                      "max_nonfinite_steps", "save_merged", "overwrite", "save_dtype", "log_every", "report_to"}


def check_resume_config(saved: dict, cfg: Config) -> None:
    """Refuse to resume with a changed config unless every changed field is bookkeeping (RESUME_SAFE_FIELDS).
    A field the saved run predates (absent from its config) is not compared: it cannot be given its old value."""
    current, saved = (json.loads(json.dumps(c)) for c in (dataclasses.asdict(cfg), saved))  # tuples as lists
    changed = [k for k in current if k not in RESUME_SAFE_FIELDS and k in saved and saved[k] != current[k]]
    if changed:
        what = "; ".join(f"--{k.replace('_', '-')} was {saved[k]!r}, now {current[k]!r}" for k in changed)
        raise UserError(f"--resume: the run's settings changed ({what}); drop those flags (the run's own "
                        f"settings apply) or start a new run")


def append_jsonl(path: Path, row: dict) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps(row) + "\n")


def truncate_jsonl(path: Path, step: int, log=print) -> None:
    """Keep only lines of steps <= `step` (work after the checkpoint is redone by the resumed run).

    Torn trailing lines (a run killed mid-write) are dropped with a warning; other damage is a UserError.
    The file is replaced atomically, so a crash here loses nothing.
    """
    if not path.exists():
        return
    try:
        rows, torn = read_log(path)
    except ValueError as exc:
        raise UserError(f"--resume: {exc}; repair or remove that line") from None
    if torn:
        log(f"warning: {path}: dropped {torn} torn line(s) at the end (the run was killed while writing them)")
    write_log(path, [row for row in rows if row["step"] <= step])


# ---------------------------------------------------------------------------------------------------------------
# Run-directory ownership


def holds_run(path: Path) -> bool:
    """True when `path` has something a train.py run wrote (an empty or unrelated directory does not). A bare
    config.json counts only when it is a train.py config (a model directory's config.json is not)."""
    path = Path(path)
    return any((path / name).exists() for name in RUN_FILES if name != "config.json") or is_run_config(path)


def is_run_config(path: Path) -> bool:
    """Whether path/config.json is one train.py wrote (it has a schedule and total_steps)."""
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "schedule" in config and "total_steps" in config


def holds_other_files(path: Path) -> bool:
    """A config.json that is not a run's, with no run beside it: a model directory, never to be written into."""
    return (Path(path) / "config.json").exists() and not holds_run(path)


class RunLock:
    """An exclusive, non-blocking flock on RUN/.lock, released on `release()` or when the process ends.

    flock locks belong to an open file, so two runs in one process exclude each other too (the tests use this).
    """

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self._file = None

    def try_acquire(self) -> int | None:
        """Take the lock and record our PID in it; returns None on success, else the holder's PID (0 if unknown).
        OSError (not a directory, not writable) propagates."""
        handle = open(self.run_dir / LOCK_FILE, "a+")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            text = handle.read().strip()
            handle.close()
            return int(text) if text.isdigit() else 0
        handle.truncate(0)
        handle.write(str(os.getpid()))
        handle.flush()
        self._file = handle
        return None

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the file drops the flock
            self._file = None

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _in_use(run_dir: Path, pid: int) -> UserError:
    holder = f"PID {pid}" if pid else "another process"
    return UserError(f"{run_dir} is in use by another run ({holder}); wait for it to finish or stop it, or pass "
                     f"another --out-dir")


def _lock(run_dir: Path, flag: str) -> tuple[RunLock, int | None]:
    lock = RunLock(run_dir)
    try:
        return lock, lock.try_acquire()
    except OSError as exc:
        raise UserError(f"{flag} {run_dir}: cannot write there ({exc.strerror}); pass a writable directory") from None


def default_run_dir(cfg: Config) -> Path:
    return Path(f"runs/{cfg.task}-{cfg.schedule}-s{cfg.seed}")


def eval_logged(run_dir: Path, step: int) -> bool:
    """Whether the run's eval.jsonl holds the held-out evaluation of `step` (a torn last line is ignored)."""
    evals = Path(run_dir) / "eval.jsonl"
    if not evals.is_file():
        return False
    try:
        rows, _ = read_log(evals)
    except ValueError:
        return False
    return any(row.get("step") == step for row in rows)


def finished_run(run_dir: Path, total_steps: int) -> bool:
    """The run wrote its final evaluation (step total_steps) and its final policy."""
    final = Path(run_dir) / "final"
    if not (final / "config.json").is_file() and not (final / "adapter_config.json").is_file():
        return False
    return any(final.glob("*.safetensors")) and eval_logged(run_dir, total_steps)


def remove_if_unused(run_dir: Path) -> None:
    """Remove run_dir if it holds nothing but the lock file (the lock must be released): a run that stopped
    before writing anything leaves no empty folder behind to be mistaken for one."""
    run_dir = Path(run_dir)
    try:
        if [p.name for p in run_dir.iterdir()] == [LOCK_FILE]:
            (run_dir / LOCK_FILE).unlink()
            run_dir.rmdir()
    except OSError:  # gone, not ours to remove, or written meanwhile: leave it
        pass


def claim_run_dir(cfg: Config, log=print) -> tuple[Path, RunLock]:
    """The run directory this run will write, created and locked; raises UserError if it may not be used.

    --resume DIR: DIR must hold a run and be free. --out-dir DIR: DIR must be free and hold no run, unless
    --overwrite (which then deletes the earlier run's files, and only those). No flag: the default
    runs/<task>-<schedule>-s<seed>, or the first of <default>-2, -3, ... that holds no run (said on the console).
    """
    if cfg.resume:
        run_dir = Path(cfg.resume)
        if not run_dir.is_dir() or holds_other_files(run_dir):
            raise UserError(f"--resume {run_dir}: not a run directory written by train.py; pass one (its "
                            f"config.json names a schedule and total_steps)")
        lock, holder = _lock(run_dir, "--resume")
        if holder is not None:
            raise _in_use(run_dir, holder)
        return run_dir, lock
    if cfg.out_dir:
        run_dir = Path(cfg.out_dir)
        if holds_other_files(run_dir):  # before the lock: nothing is written into a model directory
            raise UserError(f"--out-dir {run_dir} holds a config.json that is not a train.py run's (a model "
                            f"directory?); nothing was changed there: pass another --out-dir")
        check_output_dir(run_dir, "--out-dir")
        lock, holder = _lock(run_dir, "--out-dir")
        if holder is not None:
            raise _in_use(run_dir, holder)
        if holds_run(run_dir):
            if not cfg.overwrite:
                lock.release()
                raise UserError(f"--out-dir {run_dir} holds an earlier run; pass --resume {run_dir} to continue "
                                f"it, --overwrite to replace it, or another --out-dir")
            for name in RUN_FILES + RUN_EXTRAS:
                target = run_dir / name
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()
            log(f"--overwrite: deleted the earlier run in {run_dir}")
        return run_dir, lock
    base = default_run_dir(cfg)
    for n in range(1, 10_000):
        run_dir = base if n == 1 else base.with_name(f"{base.name}-{n}")
        if holds_run(run_dir) or holds_other_files(run_dir):
            continue
        check_output_dir(run_dir, "run directory")
        lock, holder = _lock(run_dir, "run directory")
        if holder is not None:
            continue  # another run is starting there right now
        if holds_run(run_dir):  # written between our look and our lock
            lock.release()
            continue
        if n > 1:
            log(f"note: {base} holds an earlier run; this run writes to {run_dir} (pass --out-dir to choose)")
        return run_dir, lock
    raise UserError(f"{base}-2 .. -9999 all hold runs; pass --out-dir")


def log_completions(run_dir: Path, step: int, samples: StepSamples, per_level: int = 2) -> None:
    """A few sampled completions per level drawn this step (the first sample of each chosen prompt)."""
    seen = Counter()
    for i in range(0, len(samples.problems), samples.group_size):
        problem = samples.problems[i]
        if seen[problem.level] < per_level:
            seen[problem.level] += 1
            append_jsonl(run_dir / "completions.jsonl", {
                "step": step, "level": problem.level, "prompt": problem.user_prompt,
                "completion": samples.texts[i], "reward": float(samples.rewards[i])})
