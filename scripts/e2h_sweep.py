"""The paper's comparison at laptop scale: hard-only, balanced (plain GRPO on all levels), E2H-C (cosine), E2H-G
(gaussian, beta 0.5, sigma 0.5) and the adaptive schedule (sec), the same step and sample budget each, several
seeds, then per-level means with 95% bootstrap intervals and the paired differences from balanced.

    python scripts/e2h_sweep.py                 # 5 schedules x 5 seeds on the schedule testbed (CPU, see README)
    python scripts/e2h_sweep.py --quick         # 1 seed, 40 steps: a first look in a few minutes
    python scripts/e2h_sweep.py --long          # the paper's budget: balanced, gaussian, sec x 3 seeds x 1,600
                                                # steps, pass@1/4/16 at every evaluation (hours; resumable)
    python scripts/e2h_sweep.py --model Qwen2.5-1.5B --jobs 1 --threads 0 --total-steps 1600   # on a GPU

The default model is the testbed (`tiny-testbed`: the tiny model trained further so that its hard level is out
of greedy reach but inside pass@16; README: Results); every run gets TESTBED_SETTINGS and the model's preset,
nothing per schedule. Flags after the sweep's own (e.g. `--total-steps 800`) go to every train.py run.
Each run is `python train.py --schedule S --seed N --out-dir OUT/S-sN ...` in its own process; `--jobs` runs
that many at once, each with `--threads` torch threads (for the tiny model two single-thread runs use two cores
better than one run with two threads). A finished run (OUT/S-sN/final exists) is not run again and an
interrupted one resumes from its last checkpoint, so an interrupted sweep continues where it stopped. Each run
is deterministic (seeded, one thread), so the same command on the same code reproduces the table exactly. The
summary is `python -m e2h_min.analysis.report` over every run, plus the expected number of prompts per level under each
schedule (from e2h_min.rl.curriculum).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from e2h_min.errors import OneLineErrorParser, UserError, check_output_dir  # noqa: E402
from e2h_min.run.presets import resolve_config  # noqa: E402
from e2h_min.rl.curriculum import expected_level_counts  # noqa: E402

SCHEDULES = ["hard", "balanced", "cosine", "gaussian", "sec"]
# The testbed's budget, the same for every schedule (README: Results). The rest comes from the model's preset
# (the demo preset for a tiny build: lr 1e-4, 16 prompts x 8 samples, 64 new tokens, no KL); eval on 200
# problems per level (one problem = 0.5 points).
TESTBED_SETTINGS = ["--total-steps", "400", "--eval-every", "100", "--eval-problems", "200", "--save-every", "100"]
# --long: the paper's step budget (1,600), evaluated every 200 steps with pass@k tracked over training; the flags
# given after TESTBED_SETTINGS win (argparse keeps the last). Three schedules: the baseline, E2H-G and sec. pass@k
# on L1-L3 only (L0 is at ~100% and OOD at 0% pass@16 before RL): 9,600 completions per evaluation.
# The long sweep spans sessions: its prompts' date is pinned (the day it started), so that runs started on other days
# are comparable (the report compares only runs whose settings differ in schedule and seed).
LONG_SETTINGS = ["--total-steps", "1600", "--eval-every", "200", "--save-every", "100", "--eval-pass-k", "1", "4",
                 "16", "--eval-samples", "16", "--eval-pass-k-levels", "L1,L2,L3", "--chat-date", "2026-12-02"]
LONG_SCHEDULES = ["balanced", "gaussian", "sec"]


def run_args(schedule: str, seed: int, out: Path, args, extra: list[str]) -> list[str]:
    """The train.py command of one run: an interrupted run continues from its last checkpoint, one killed before
    its first checkpoint starts over (train.py reuses a run directory only when told which of the two is meant)."""
    run_dir = out / f"{schedule}-s{seed}"
    cmd = [sys.executable, str(ROOT / "train.py"), "--model", args.model, "--task", args.task, "--schedule",
           schedule, "--seed", str(seed), "--threads", str(args.threads)]
    if args.model in ("tiny", "tiny-testbed"):
        cmd += TESTBED_SETTINGS
    if args.long:
        cmd += LONG_SETTINGS
    if args.quick:
        cmd += ["--total-steps", str(args.quick_steps)]
    checkpointed = any((run_dir / "checkpoints").glob("step_*"))
    return cmd + extra + (["--resume", str(run_dir)] if checkpointed else ["--out-dir", str(run_dir), "--overwrite"])


def train_log(run_dir: Path) -> Path:
    """OUT/<run>.log, beside the run's folder: inside it, a file train.py did not write would make the
    --overwrite of a run killed before its first checkpoint refuse, and the sweep could never restart it."""
    return Path(run_dir).parent / f"{Path(run_dir).name}.log"


def run_one(schedule: str, seed: int, out: Path, args, extra: list[str]) -> tuple[str, float, int]:
    run_dir = out / f"{schedule}-s{seed}"
    if (run_dir / "final").is_dir():
        return str(run_dir), 0.0, 0
    cmd = run_args(schedule, seed, out, args, extra)
    start = time.perf_counter()
    with open(train_log(run_dir), "a") as log:
        code = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    return str(run_dir), time.perf_counter() - start, code


def level_table(out: Path, schedules: list[str], seeds: list[int], total_steps: int, prompts: int,
                levels: int) -> str:
    """Markdown: prompts per level over the run under each schedule, expected from p_t (gaussian with its
    defaults; sec is adaptive, so its p_t is not known in advance) and drawn (from metrics.jsonl's level_counts,
    mean over the seeds)."""
    lines = ["| schedule | " + " | ".join(f"expected L{k}" for k in range(levels)) + " | "
             + " | ".join(f"drawn L{k}" for k in range(levels)) + " |", "|---|" + "---:|" * (2 * levels)]
    for schedule in schedules:
        expected = (["adaptive"] * levels if schedule == "sec" else
                    [f"{c:.0f}" for c in expected_level_counts(schedule, total_steps, prompts, levels)])
        drawn = np.zeros(levels)
        for seed in seeds:
            rows = [json.loads(line) for line in (out / f"{schedule}-s{seed}" / "metrics.jsonl").open()]
            drawn += np.sum([row["level_counts"][:levels] for row in rows], axis=0) / len(seeds)
        lines.append(f"| {schedule} | " + " | ".join(expected) + " | " + " | ".join(f"{c:.0f}" for c in drawn) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = OneLineErrorParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-testbed")
    parser.add_argument("--task", default="countdown")
    parser.add_argument("--schedules", nargs="+")
    parser.add_argument("--seeds", nargs="+", type=int)
    parser.add_argument("--out")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--quick", action="store_true", help="one seed, --quick-steps steps")
    parser.add_argument("--quick-steps", type=int, default=40)
    parser.add_argument("--long", action="store_true", help="balanced, gaussian, sec x seeds 0-2 x 1,600 steps, "
                                                            "pass@1/4/16 every 200 steps (LONG_SETTINGS)")
    args, extra = parser.parse_known_args()
    extra = [x for x in extra if x != "--"]
    args.schedules = args.schedules or (LONG_SCHEDULES if args.long else SCHEDULES)
    args.seeds = args.seeds or ([0, 1, 2] if args.long else [0, 1, 2, 3, 4])
    args.out = args.out or ("runs/sweep-long" if args.long else "runs/sweep")
    if args.quick:
        args.seeds = args.seeds[:1]
        args.out = args.out + "-quick"
    if args.jobs < 1 or args.threads < 0 or args.quick_steps < 1:
        print("error: --jobs and --quick-steps must be >= 1 and --threads >= 0", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()  # train.py runs from the repository: its --out-dir must not depend on cwd
    jobs = [(s, seed) for seed in args.seeds for s in args.schedules]
    try:  # every run's settings are checked here, once, before any run starts (one line, exit 2 if bad)
        for schedule in args.schedules:
            resolve_config(run_args(schedule, args.seeds[0], out, args, extra)[2:])
        check_output_dir(out, "--out")
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    print(f"{len(jobs)} runs -> {out} ({args.jobs} at a time, {args.threads} thread(s) each)")
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for run_dir, seconds, code in pool.map(lambda j: run_one(j[0], j[1], out, args, extra), jobs):
            status = "done" if code == 0 else f"FAILED (exit {code}, see {train_log(run_dir)})"
            print(f"  {run_dir}: {status}" + (f" in {seconds / 60:.1f} min" if seconds else " (already there)"))
            if code:
                pool.shutdown(wait=True, cancel_futures=True)  # the queued runs would fail the same way
                last = train_log(run_dir).read_text(errors="replace").strip().splitlines()[-1:]
                print(f"{run_dir}: {last[0] if last else f'exit {code}'}", file=sys.stderr)
                return code
    runs = [str(out / f"{s}-s{seed}") for seed in args.seeds for s in args.schedules]
    code = subprocess.call([sys.executable, "-m", "e2h_min.analysis.report", *runs, "--out", str(out / "report")],
                           cwd=ROOT)
    config = json.loads((out / f"{args.schedules[0]}-s{args.seeds[0]}" / "config.json").read_text())
    table = level_table(out, args.schedules, args.seeds, config["total_steps"], config["prompts_per_step"], 4)
    (out / "report" / "levels.md").write_text(table + "\n")
    print("\nprompts per level over the run:\n" + table)
    return code


if __name__ == "__main__":
    sys.exit(main())
