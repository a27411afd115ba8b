"""The run directory's bookkeeping: who owns it, JSONL logs, the resume check, sampled completions.

Ownership. A run directory belongs to one run at a time: the run holds an exclusive flock on RUN/.lock while it
writes (a second run on it stops with the holder's PID). The kernel releases the lock when the holder exits,
however it exits (kill -9 included), so a stale lock never blocks a resume. Nothing of an earlier run is deleted
unless --overwrite says so: a default run directory that holds a run gives way to a fresh name (RUN-2, RUN-3...),
an explicit --out-dir that holds one is refused unless --resume or --overwrite.

What --overwrite deletes. Only a train.py run's own files (OWN_FILES: what train.py, eval.py, the report and the
trackers write into a run directory, and checkpoints/ holding only step_* checkpoints), and only in a folder that
holds nothing else and that this run does not read from (its --model, --data or --resume, or a folder inside or
above them). Anything else there refuses the run with nothing touched: a deleted model cannot be trained again.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import re
import shutil
from collections import Counter
from pathlib import Path

from e2h_min.errors import UserError, check_output_dir, check_path_name
from e2h_min.analysis.report import REPORT_FILES
from e2h_min.run.checkpoint import CHECKPOINT_DIR, MANIFEST, manifest_names
from e2h_min.run.config import Config
from e2h_min.jsonl import read_log, write_log
from e2h_min.rl.samples import StepSamples

LOCK_FILE = ".lock"
# What a train.py run writes into its directory; a directory holding any of these holds a run.
RUN_FILES = ("config.json", "metrics.jsonl", "eval.jsonl", "completions.jsonl", "checkpoints", "final",
             "final-merged")
# What else belongs to a run (written by eval.py, the report and the trackers): --overwrite deletes these too, so
# the new run's report never shows the old run's results.
RUN_EXTRAS = ("eval", "report", "tensorboard", "wandb", "wandb_run_id", "final.partial", "final-merged.partial")
# Every name a run directory may hold; checkpoints/ may hold only what checkpoint.py writes (step_N, the damaged_step_N
# it set aside, the .tmp_step_N_PID of a save that was killed).
OWN_FILES = frozenset(RUN_FILES + RUN_EXTRAS + (LOCK_FILE,))
CHECKPOINT_NAMES = re.compile(r"(damaged_)?step_\d+(\.\d+)?|\.tmp_step_\d+_\d+")
LOGS = ("metrics.jsonl", "eval.jsonl", "completions.jsonl")  # a resumed run keeps the lines up to its checkpoint

# Fields that may differ when resuming: they change bookkeeping or speed, not what the run computes.
RESUME_SAFE_FIELDS = {"resume", "out_dir", "eval_every", "eval_problems", "eval_max_new_tokens", "save_every",
                      "keep_checkpoints", "log_completions_every", "device", "threads", "micro_batch_size",
                      "micro_batch_tokens", "share_prompt_forward", "skip_zero_advantage", "gradient_checkpointing",
                      "max_nonfinite_steps", "save_merged", "overwrite", "save_dtype", "log_every", "report_to"}


def check_resume_config(saved: dict, cfg: Config, checkpoint: Path | None = None,
                        from_config_json: dict | None = None) -> None:
    """Refuse to resume with a changed config unless every changed field is bookkeeping (RESUME_SAFE_FIELDS).
    A field the saved run predates (absent from its config) is not compared: it cannot be given its old value.

    `saved` is the checkpoint's trainer_state.json config; from_config_json the fields cfg took from RUN/config.json
    rather than from a flag. A flag that changes the run is answered "drop those flags"; a field that came from
    config.json and differs from the checkpoint names both files (config.json edited, or a checkpoint of another run).
    """
    current, saved = (json.loads(json.dumps(c)) for c in (dataclasses.asdict(cfg), saved))  # tuples as lists
    changed = [k for k in current if k not in RESUME_SAFE_FIELDS and k in saved and saved[k] != current[k]]
    by_file = [k for k in changed if k in (from_config_json or {})]
    by_flag = [k for k in changed if k not in by_file]
    if by_flag:
        what = "; ".join(f"--{k.replace('_', '-')} was {saved[k]!r}, now {current[k]!r}" for k in by_flag)
        raise UserError(f"--resume: the run's settings changed ({what}); drop those flags (the run's own "
                        f"settings apply) or start a new run")
    if by_file:
        state = Path(checkpoint or "the checkpoint") / "trainer_state.json"
        what = "; ".join(f"{k} {current[k]!r} vs {saved[k]!r}" for k in by_file)
        raise UserError(f"--resume: {cfg.resume}/config.json and {state} disagree ({what}): config.json was edited "
                        f"or the checkpoint comes from another run; restore the file that is wrong, or start a new run")


def check_sampler_state(sampler, state: dict, checkpoint: Path) -> None:
    """The checkpoint's curriculum sampler state fits this run's sampler (the same task data and seed), else a
    UserError naming the checkpoint."""
    try:
        sampler.check_state(state)
    except ValueError as exc:
        raise UserError(f"--resume: checkpoint {checkpoint} does not fit this run's task data (changed under the "
                        f"run?): {exc}") from None


def append_jsonl(path: Path, row: dict) -> None:
    try:
        with open(path, "a") as handle:
            handle.write(json.dumps(row) + "\n")
    except OSError as exc:  # the one-line disk-full message names the file
        raise OSError(exc.errno, exc.strerror, str(path)) from exc


def sync_logs(run_dir: Path) -> None:
    """fsync every log, so that a power loss after a checkpoint cannot take log lines from before it."""
    for path in (Path(run_dir) / name for name in LOGS):
        if path.exists():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def check_logs(run_dir: Path) -> dict[Path, tuple[list[dict], int]]:
    """Every log of the run read, {path: (rows, torn trailing lines)}; damage other than torn trailing lines (a run
    killed mid-write) is a UserError naming the file and line. Nothing is written."""
    read = {}
    for path in (Path(run_dir) / name for name in LOGS):
        if path.exists():
            try:
                read[path] = read_log(path)
            except ValueError as exc:
                raise UserError(f"--resume: {exc}; repair or remove that line") from None
    return read


def truncate_logs(run_dir: Path, step: int, log=print) -> None:
    """Keep only lines of steps <= `step` in every log (work after the checkpoint is redone by the resumed run).

    All logs are checked before any is rewritten (a bad line in eval.jsonl leaves metrics.jsonl as it was); torn
    trailing lines are dropped with a warning. Each file is replaced atomically, so a crash here loses nothing.
    """
    for path, (rows, torn) in check_logs(run_dir).items():
        if torn:
            log(f"warning: {path}: dropped {torn} torn line(s) at the end (the run was killed while writing them)")
        kept = [row for row in rows if row["step"] <= step]
        missing = sorted(set(range(1, step + 1)) - {row["step"] for row in kept}) if path.name == LOGS[0] else []
        if missing:
            log(f"warning: {path} has no line for {len(missing)} step(s) before the checkpoint (steps {missing[0]}"
                f"-{missing[-1]}; lost in a crash?): the run continues from step {step}, and the gap stays")
        write_log(path, kept)


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


def foreign_files(run_dir: Path) -> list[str]:
    """What `run_dir` holds that is not a train.py run's own, as relative paths; [] for a run's folder and nothing
    else. Own: the names of OWN_FILES; in checkpoints/ only checkpoint folders, each holding only what its
    manifest.json lists; in eval/ only eval.py's folders of report.json and completions.jsonl; in report/ only the
    report's table and plots. A config.json that is not a run's (a model's) is foreign, and so is an own name that
    is a symbolic link (deleting it as a folder would fail half-way, or reach outside the run; links deeper down are
    removed, not followed). final/ and the trackers' folders are not checked file by file.
    Example: a run folder with model.safetensors, checkpoints/checkpoint-500 and report/notes.md beside the run's
             files -> ["checkpoints/checkpoint-500", "model.safetensors", "report/notes.md"]"""
    run_dir = Path(run_dir)
    found = [p.name for p in run_dir.iterdir() if p.name not in OWN_FILES]
    if (run_dir / "config.json").exists() and not is_run_config(run_dir):
        found.append("config.json")
    found += [name for name in OWN_FILES if (run_dir / name).is_symlink()]
    if (run_dir / CHECKPOINT_DIR).is_dir():
        for p in (run_dir / CHECKPOINT_DIR).iterdir():
            if not (p.is_dir() and CHECKPOINT_NAMES.fullmatch(p.name)):
                found.append(f"{CHECKPOINT_DIR}/{p.name}")
            elif (listed := manifest_names(p)) is not None:  # unreadable: its files are not checked one by one
                found += [str(f.relative_to(run_dir)) for f in p.rglob("*")
                          if f.is_file() and f.name != MANIFEST and str(f.relative_to(p)) not in listed]
    found += other_runs_inside(run_dir)
    own_inside = {"eval": lambda f: len(f.parts) == 3 and f.name in ("report.json", "completions.jsonl"),
                  "report": lambda f: len(f.parts) == 2 and f.name in REPORT_FILES}
    for folder, is_own in own_inside.items():
        if (run_dir / folder).is_dir():
            found += [str(f.relative_to(run_dir)) for f in (run_dir / folder).rglob("*")
                      if f.is_file() and not is_own(f.relative_to(run_dir))]
    return sorted(set(found))


def other_runs_inside(run_dir: Path) -> list[str]:
    """Folders below run_dir that hold another run (a train.py config.json or a run's lock), as relative paths:
    a run started inside this one (RUN/tensorboard, RUN/final, RUN/checkpoints/step_9) that --overwrite must not
    delete with it. Links are not followed."""
    found = []
    for folder, _, files in os.walk(run_dir):
        path = Path(folder)
        if path != Path(run_dir) and (LOCK_FILE in files or ("config.json" in files and is_run_config(path))):
            found.append(f"{path.relative_to(run_dir)} (another run)")
    return found


def run_folder_around(path: Path) -> Path | None:
    """The run folder that `path` is inside (not `path` itself), else None."""
    path = Path(path).resolve()
    return next((folder for folder in path.parents if is_run_config(folder)), None)


def model_folder_around(path: Path) -> Path | None:
    """The model or adapter folder that `path` is (or is inside), else None: a folder with adapter_config.json, or
    with a config.json that is not a run's beside weights. Writing a run there would break loading it."""
    path = Path(path).resolve()
    for folder in [path, *path.parents]:
        if (folder / "adapter_config.json").is_file():
            return folder
        weights = any(folder.glob("*.safetensors")) or any(folder.glob("pytorch_model*.bin"))
        if weights and (folder / "config.json").is_file() and not is_run_config(folder):
            return folder
    return None


def sources_read(cfg: Config) -> list[tuple[str, Path]]:
    """(flag, local path) of what the run reads: its --model when it is a local folder, --data, --resume."""
    from e2h_min.engine.models import resolve_model_name

    found = [("--model", Path(resolve_model_name(cfg.model))), ("--data", Path(cfg.data or "")),
             ("--resume", Path(cfg.resume or ""))]
    return [(flag, path) for flag, path in found if str(path) != "." and path.exists()]


def check_overwrite(run_dir: Path, cfg: Config) -> None:
    """UserError unless --overwrite may delete run_dir's files: run_dir is a train.py run, holds nothing else, and
    is not (inside or above) a folder this run reads from. Only looks; nothing is written."""
    where = f"--out-dir {run_dir} --overwrite"
    for flag, source in sources_read(cfg):
        a, b = run_dir.resolve(), source.resolve()
        if a == b or a in b.parents or b in a.parents:
            raise UserError(f"{where}: this run reads {flag} {source}, which deleting {run_dir} would destroy; "
                            f"nothing was deleted: pass another --out-dir")
    if not is_run_config(run_dir):
        raise UserError(f"{where}: {run_dir} has no train.py config.json, so it is not known to hold a run; nothing "
                        f"was deleted: empty it yourself or pass another --out-dir")
    foreign = foreign_files(run_dir)
    if foreign:
        more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        raise UserError(f"{where}: {run_dir} holds {', '.join(foreign[:3])}{more}, which train.py did not write; "
                        f"nothing was deleted: move that out or pass another --out-dir")


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


def check_not_inside_model_or_run(run_dir: Path, flag: str) -> None:
    model = model_folder_around(run_dir)
    if model is not None:
        raise UserError(f"{flag} {run_dir} is inside the model folder {model}; a run written there would break "
                        f"loading it: pass an --out-dir outside it")
    run = run_folder_around(run_dir)
    if run is not None:
        raise UserError(f"{flag} {run_dir} is inside the run folder {run}; that run's --overwrite would delete it: "
                        f"pass an --out-dir outside it")


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
    check_path_name(cfg.resume or cfg.out_dir or default_run_dir(cfg), "--resume" if cfg.resume else "--out-dir")
    if cfg.resume:
        run_dir = Path(cfg.resume)
        if not run_dir.is_dir() or not holds_run(run_dir) or holds_other_files(run_dir):  # before the lock
            raise UserError(f"--resume {run_dir}: not a run directory written by train.py; pass one (its "
                            f"config.json names a schedule and total_steps)")
        lock, holder = _lock(run_dir, "--resume")
        if holder is not None:
            raise _in_use(run_dir, holder)
        return run_dir, lock
    if cfg.out_dir:
        run_dir = Path(cfg.out_dir)
        if run_dir.resolve() in (Path(run_dir.resolve().anchor), Path.home().resolve()):
            what = "the filesystem root" if run_dir.resolve() == run_dir.resolve().parent else "your home folder"
            raise UserError(f"--out-dir {run_dir} is {what}; a run writes its files straight into its folder: pass a "
                            f"folder of its own")
        if holds_other_files(run_dir):  # before the lock: nothing is written into a model directory
            raise UserError(f"--out-dir {run_dir} holds a config.json that is not a train.py run's (a model "
                            f"directory?); nothing was changed there: pass another --out-dir")
        check_not_inside_model_or_run(run_dir, "--out-dir")
        if cfg.overwrite and holds_run(run_dir):
            check_overwrite(run_dir, cfg)
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
        check_not_inside_model_or_run(run_dir, "run directory")
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
