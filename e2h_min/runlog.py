"""The run directory's bookkeeping: JSONL logs, the resume check, sampled completions."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from pathlib import Path

from e2h_min.config import Config, UserError
from e2h_min.samples import StepSamples

# Fields that may differ when resuming: they change bookkeeping or speed, not what the run computes.
RESUME_SAFE_FIELDS = {"resume", "out_dir", "eval_every", "eval_problems", "eval_max_new_tokens", "save_every",
                      "keep_checkpoints", "log_completions_every", "device", "threads", "micro_batch_size",
                      "micro_batch_tokens", "share_prompt_forward", "skip_zero_advantage", "gradient_checkpointing",
                      "max_nonfinite_steps", "save_merged", "log_every", "report_to"}


def check_resume_config(saved: dict, cfg: Config) -> None:
    """Refuse to resume with a changed config unless every changed field is bookkeeping (RESUME_SAFE_FIELDS)."""
    current = dataclasses.asdict(cfg)
    changed = [k for k in current if k not in RESUME_SAFE_FIELDS and saved.get(k) != current[k]]
    if changed:
        k = changed[0]
        raise UserError(f"--resume: {k} was {saved.get(k)!r} in the saved run but is {current[k]!r} now; "
                        f"resume with the same value (only {', '.join(sorted(RESUME_SAFE_FIELDS))} may change)")


def append_jsonl(path: Path, row: dict) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps(row) + "\n")


def truncate_jsonl(path: Path, step: int) -> None:
    """Keep only lines of steps <= `step` (work after the checkpoint is redone by the resumed run)."""
    if path.exists():
        kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in kept))


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
