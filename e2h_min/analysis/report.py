"""A run's story at a glance, and several runs side by side: PNG plots and a Table-2-shaped markdown table.

    python -m e2h_min.analysis.report runs/countdown-gaussian-s0                       # -> runs/countdown-gaussian-s0/report/
    python -m e2h_min.analysis.report runs/countdown-balanced-s* runs/countdown-gaussian-s* --out report
    python -m e2h_min.analysis.report RUN [RUN ...] --no-plots                         # the table only (no matplotlib needed)

Reads what train.py writes into a run directory: config.json, metrics.jsonl (one line per optimizer step) and
eval.jsonl (one line per greedy evaluation). Writes into --out:
- accuracy.png   one panel per level (OOD included): greedy eval accuracy (solid, markers) and the accuracy of
                 the training samples drawn at that level (dashed, moving average), one colour per run;
- training.png   mean reward (training samples, and greedy eval as dots), completion length, KL to the reference
                 and entropy over steps, raw (faint) and moving average (the legend says which); a quantity no
                 run logged (KL with --beta 0) gets no panel;
- pass_at_k.png  with train.py --eval-pass-k: greedy accuracy and each pass@k per level against the step, one
                 line per schedule (mean over seeds) with a band from the lowest to the highest seed;
- curriculum.png one panel per run: the schedule's p_t as a stacked area, the share of prompts actually drawn per
                 level (dashed, moving average) on top, and drawn vs expected counts in the legend;
- table.md       final greedy accuracy per level (%), rows = runs labelled schedule + seed, plus mean ± std (sample
                 std, ddof=1) over runs that differ only in their seed; per schedule the mean with its 95%
                 bootstrap interval and the paired difference from --baseline, for greedy accuracy and each
                 logged pass@k; then the eval.py results found in RUN/eval/*/ (greedy accuracy and pass@k).
matplotlib is optional (requirements-optional.txt): without it the table is written and one line says that the
plots need matplotlib.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from e2h_min.errors import MAX_STEPS, OneLineErrorParser, UserError, check_output_dir, exit_on_user_error
from e2h_min.jsonl import parse_json, read_log
from e2h_min.analysis.stats import paired_difference, percentile_interval

TABLE_HEADER = "| run | step |"  # table.md's first line starts so: a table.md that does not is not the report's
REPORT_FILES = ("table.md", "accuracy.png", "training.png", "curriculum.png", "pass_at_k.png")  # what main writes

# Config fields that do not change what a run computes: runs differing only in these and the seed are replicates.
BOOKKEEPING_FIELDS = {"seed", "out_dir", "resume", "device", "threads", "save_every", "keep_checkpoints",
                      "log_completions_every", "micro_batch_size", "eval_every", "log_every", "report_to"}
# What tells two arms of a schedule comparison apart: the schedule and its own parameters. Every other setting
# must be equal across the arms, or the comparison would credit the schedule with another setting's effect.
SCHEDULE_FIELDS = {"schedule", "schedule_beta", "sigma", "min_prob", "sec_temperature", "sec_ema"}


@dataclass
class Run:
    path: Path
    config: dict
    metrics: list[dict]  # metrics.jsonl, one dict per optimizer step
    evals: list[dict]  # eval.jsonl, one dict per evaluation
    label: str = ""
    torn: dict[str, int] = field(default_factory=dict)  # log file -> torn last lines dropped (said after the report)


# ---------------------------------------------------------------------------------------------------------------
# Reading runs


def read_jsonl(path: Path) -> tuple[list[dict], int]:
    """(parsed lines of a JSONL log, torn last lines dropped: a run killed mid-write). Any other bad line, a file
    none of whose lines is a step's row, or a row whose figures are not numbers, is a UserError naming it."""
    try:
        rows, torn = read_log(path)
    except ValueError as exc:
        raise UserError(f"{exc}; is this a train.py run directory?") from None
    if torn and not rows:
        raise UserError(f'{path}: none of its {torn} line(s) is a JSON object with an integer "step"; is this a '
                        f"train.py run directory?")
    for row in rows:
        for key, value in row.items():
            values = value if key in ("level_probs", "level_counts") and isinstance(value, list) else [value]
            if not all(v is None or isinstance(v, (int, float)) for v in values):
                raise UserError(f"{path}: step {row['step']}: {key} is {value!r:.40}, not a number; is this a "
                                f"train.py run directory?")
    widths = {len(row["level_counts"]) for row in rows if isinstance(row.get("level_counts"), list)}
    if len(widths) > 1:
        raise UserError(f"{path}: level_counts lists of different lengths {sorted(widths)}; lines from two runs?")
    return rows, torn


def load_run(path: str | Path) -> Run:
    """A train.py run directory: config.json and metrics.jsonl required, eval.jsonl optional."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path}: no such run directory")
    for name in ("config.json", "metrics.jsonl"):
        if not (path / name).is_file():
            raise UserError(f"{path}: no {name}; pass a run directory written by train.py")
    evals, torn_evals = read_jsonl(path / "eval.jsonl") if (path / "eval.jsonl").is_file() else ([], 0)
    try:
        config = parse_json((path / "config.json").read_bytes())
    except ValueError as exc:
        raise UserError(f"{path / 'config.json'}: {exc}; is this a train.py run directory?") from None
    if not isinstance(config, dict):
        raise UserError(f"{path / 'config.json'}: not a JSON object; is this a train.py run directory?")
    metrics, torn_metrics = read_jsonl(path / "metrics.jsonl")
    torn = {str(path / name): n for name, n in (("metrics.jsonl", torn_metrics), ("eval.jsonl", torn_evals)) if n}
    run = Run(path, config, metrics, evals, torn=torn)
    if not run.metrics and not run.evals:
        raise UserError(f"{path}: metrics.jsonl and eval.jsonl are empty; the run has not logged a step yet")
    return run


def run_label(config: dict) -> str:
    """Schedule (with its parameters when it has any) and seed. Example: 'gaussian(β=0.5,σ=0.5) s1'."""
    schedule = config.get("schedule", "?")
    if schedule == "gaussian":
        schedule += f"(β={config.get('schedule_beta')},σ={config.get('sigma')})"
    return f"{schedule} s{config.get('seed', '?')}"


def label_runs(runs: list[Run]) -> None:
    """Give each run its label; runs whose labels clash get their directory name appended."""
    labels = [run_label(r.config) for r in runs]
    for run, label in zip(runs, labels):
        run.label = label if labels.count(label) == 1 else f"{label} [{run.path.name}]"


def replicate_key(config: dict, ignore: set = BOOKKEEPING_FIELDS) -> str:
    """Everything that changes a run's result except the seed (and the fields in `ignore`): runs with equal keys
    are seed replicates; with ignore = BOOKKEEPING_FIELDS | SCHEDULE_FIELDS, arms of one schedule comparison."""
    return json.dumps({k: v for k, v in sorted(config.items()) if k not in ignore}, sort_keys=True)


# ---------------------------------------------------------------------------------------------------------------
# Series and summaries (pure)


def eval_level_names(evals: list[dict]) -> list[str]:
    """Level names in the order eval.jsonl lists them. Example: [{"step": 0, "L0/accuracy": .5, ...}] -> ["L0"]."""
    names = []
    for row in evals:
        for key in row:
            if key.endswith("/accuracy") and key[:-len("/accuracy")] not in names:
                names.append(key[:-len("/accuracy")])
    return names


def series(rows: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of `key` over rows, NaN where a row lacks it. Example: [{step 1, a 2}, {step 2}] -> [1,2],
    [2, nan]."""
    steps = np.array([r["step"] for r in rows], dtype=float)
    values = np.array([r.get(key, math.nan) if r.get(key) is not None else math.nan for r in rows], dtype=float)
    return steps, values


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean of the finite values among the last `window` entries (NaN when there are none).

    NaNs (steps where a level was not drawn) are skipped rather than counted as zero.
    Example: moving_average([1, nan, 3, 5], 2) -> [1, 1, 3, 4].
    """
    values = np.asarray(values, dtype=float)
    finite = np.isfinite(values)
    sums = np.concatenate([[0.0], np.cumsum(np.where(finite, values, 0.0))])
    counts = np.concatenate([[0], np.cumsum(finite)])
    hi = np.arange(1, len(values) + 1)
    lo = np.maximum(0, hi - window)
    n = counts[hi] - counts[lo]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, (sums[hi] - sums[lo]) / np.maximum(n, 1), math.nan)


def drawn_shares(metrics: list[dict]) -> np.ndarray:
    """Share of each step's prompts drawn at each level, [T, K], from level_counts. Example: [3, 1] -> [.75, .25]."""
    counts = np.array([r["level_counts"] for r in metrics], dtype=float)
    return counts / np.maximum(counts.sum(axis=1, keepdims=True), 1.0)


def final_accuracy(run: Run, metric: str = "accuracy") -> tuple[int | None, dict[str, float]]:
    """(step, {level name: value}) of `metric` (accuracy, pass@16, ...) in the run's last evaluation line, for the
    levels that line has it for; (None, {}) without an evaluation."""
    if not run.evals:
        return None, {}
    last = run.evals[-1]
    return last["step"], {name: last[f"{name}/{metric}"] for name in eval_level_names([last])
                          if last.get(f"{name}/{metric}") is not None}


def pass_at_k_metrics(evals: list[dict]) -> list[str]:
    """The pass@k fields of eval.jsonl rows (train.py --eval-pass-k), by k. Example: L1/pass@16, L1/pass@4 ->
    ["pass@4", "pass@16"]."""
    found = {key.split("/", 1)[1] for row in evals for key in row if "/pass@" in key}
    return sorted(found, key=lambda metric: int(metric.split("@")[1]))


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value). Example: [1, 3] -> (2, 1.414...)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def accuracy_table(runs: list[Run]) -> str:
    """Markdown table of final greedy accuracy (%) per level, runs as rows, Table 2 of the paper in shape.

    Runs that differ only in their seed are grouped together, followed by a 'mean ± std (n seeds)' row when the
    group has several runs evaluated at the same final step. Missing figures show as '–'.
    """
    levels = []
    for run in runs:
        levels += [name for name in eval_level_names(run.evals) if name not in levels]
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(replicate_key(run.config), []).append(run)

    def cell(value: float | None) -> str:
        return "–" if value is None else f"{100 * value:.1f}"

    lines = [TABLE_HEADER + " " + " | ".join(levels) + " |", "|---|---:|" + "---:|" * len(levels)]
    for members in groups.values():
        finals = [final_accuracy(run) for run in members]
        for run, (step, acc) in zip(members, finals):
            lines.append(f"| {run.label} | {'–' if step is None else step} | "
                         + " | ".join(cell(acc.get(name)) for name in levels) + " |")
        steps = {step for step, _ in finals}
        if len(members) > 1 and len(steps) == 1 and None not in steps:
            cells = []
            for name in levels:
                values = [acc[name] for _, acc in finals if name in acc]
                mean, std = mean_std(values) if len(values) == len(members) else (None, None)
                cells.append("–" if mean is None else f"{100 * mean:.1f} ± {100 * std:.1f}")
            name = run_label(members[0].config).rsplit(" s", 1)[0]
            lines.append(f"| **{name}** mean ± std ({len(members)} seeds) | {steps.pop()} | "
                         + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def arm_label(config: dict) -> str:
    """A comparison arm: the run label without its seed. Example: 'gaussian(β=0.5,σ=0.5)'."""
    return run_label(config).rsplit(" s", 1)[0]


def _points(value: float, signed: bool = False) -> str:
    return f"{100 * value:+.1f}" if signed else f"{100 * value:.1f}"


def interval_table(runs: list[Run], baseline: str = "balanced", confidence: float = 0.95,
                   metric: str = "accuracy") -> str:
    """Markdown: per schedule, the final greedy accuracy (or another eval.jsonl metric: pass@16, ...) per level as
    mean [95% bootstrap interval] over seeds and the share of groups with no GRPO signal (all G rewards equal;
    mean over steps and seeds), then each schedule's paired difference from `baseline` (same seed) with its
    interval (e2h_min.analysis.stats).

    Only runs that share every setting but the schedule, its parameters and the seed are compared (else the line
    names the setting that differs); each arm's runs must end at the same step. Empty string for < 2 seeds in
    every arm (nothing to put an interval on).
    """
    evaluated = [run for run in runs if run.evals]
    if not evaluated:
        return ""
    others = BOOKKEEPING_FIELDS | SCHEDULE_FIELDS
    keys = {replicate_key(r.config, others) for r in evaluated}
    if len(keys) > 1:
        first = evaluated[0].config
        differ = sorted({k for r in evaluated for k, v in r.config.items() if k not in others and first.get(k) != v})
        return (f"\n(no interval table: the runs differ in {', '.join(differ)} as well as the schedule; compare arms "
                f"that share every other setting)\n")
    arms: dict[str, dict[int, dict[str, float]]] = {}
    arm_steps: dict[str, set] = {}
    no_signal: dict[str, list[float]] = {}  # per run: mean share of groups whose samples all got one reward
    for run in evaluated:
        step, acc = final_accuracy(run, metric)
        arms.setdefault(arm_label(run.config), {})[run.config.get("seed", 0)] = acc
        arm_steps.setdefault(arm_label(run.config), set()).add(step)
        shares = [row["frac_reward_zero_std"] for row in run.metrics if row.get("frac_reward_zero_std") is not None]
        if shares:
            no_signal.setdefault(arm_label(run.config), []).append(float(np.mean(shares)))
    if max(len(seeds) for seeds in arms.values()) < 2:
        return ""
    levels = [name for name in eval_level_names([row for run in evaluated for row in run.evals])
              if any(name in acc for by_seed in arms.values() for acc in by_seed.values())]
    pct = f"{100 * confidence:g}%"
    start = [run.evals[0] for run in evaluated if run.evals[0]["step"] == 0]
    what = "greedy accuracy" if metric == "accuracy" else f"{metric} (temperature 1)"
    lines = [f"\nFinal {what} (%): mean over seeds [{pct} bootstrap interval]", "",
             "| schedule | seeds | step | " + " | ".join(levels) + " | zero-std groups |",
             "|---|---:|---:|" + "---:|" * (len(levels) + 1)]
    if start and all(f"{name}/{metric}" in row for row in start for name in levels):
        lines.append(f"| (step 0) | {len(start)} runs | 0 | " + " | ".join(
            _points(float(np.mean([row[f"{name}/{metric}"] for row in start]))) for name in levels) + " | |")
    for arm, by_seed in arms.items():
        steps = arm_steps[arm]
        cells = []
        for name in levels:
            values = [acc[name] for acc in by_seed.values() if name in acc]
            if len(values) < 2 or len(steps) > 1:
                cells.append(_points(values[0]) if len(values) == 1 else "–")
                continue
            mean, low, high = percentile_interval(values, confidence)
            cells.append(f"{_points(mean)} [{_points(low)}, {_points(high)}]")
        wasted = f"{100 * np.mean(no_signal[arm]):.0f}%" if arm in no_signal else "–"
        lines.append(f"| {arm} | {len(by_seed)} | {'/'.join(str(s) for s in sorted(steps))} | "
                     + " | ".join(cells) + f" | {wasted} |")
    if baseline in arms and len(arms) > 1:
        lines += ["", f"Paired difference from {baseline} (same seed), points [{pct} bootstrap interval]", "",
                  f"| schedule − {baseline} | seeds | " + " | ".join(levels) + " |",
                  "|---|---:|" + "---:|" * len(levels)]
        for arm, by_seed in arms.items():
            if arm == baseline:
                continue
            cells, paired = [], 0
            for name in levels:
                treated = {s: acc[name] for s, acc in by_seed.items() if name in acc}
                base = {s: acc[name] for s, acc in arms[baseline].items() if name in acc}
                if not set(treated) & set(base):
                    cells.append("–")
                    continue
                mean, low, high, paired = paired_difference(treated, base, confidence)
                cells.append(f"{_points(mean, True)} [{_points(low, True)}, {_points(high, True)}]")
            lines.append(f"| {arm} | {paired} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def find_eval_reports(run_dir: Path) -> list[tuple[str, dict]]:
    """eval.py's report.json files written next to a run: (what was evaluated, report), in folder order.

    RUN/eval/<final | step_N | ...>/report.json (eval.py's default), and the older RUN/eval/report.json and
    RUN/eval-step_N/report.json layouts. A file that cannot be read or is not shaped like eval.py's report is
    skipped with one line on stderr naming it and why.
    """
    found = []
    paths = sorted(run_dir.glob("eval/*/report.json")) + sorted(run_dir.glob("eval/report.json")) \
        + sorted(run_dir.glob("eval-*/report.json"))
    for path in paths:
        try:
            report = parse_json(path.read_bytes())
            damage = report_damage(report)
        except (OSError, ValueError) as exc:
            damage = str(exc)
        if damage:
            print(f"note: skipped {path}: {damage} (not eval.py's report; run eval.py again to rewrite it)",
                  file=sys.stderr)
            continue
        name = path.parent.name if path.parent.name != "eval" else "final"
        found.append((name.removeprefix("eval-"), report))
    return found


def report_damage(report) -> str | None:
    """What makes `report` unlike eval.py's report.json (the fields eval_results_table reads), or None.
    Example: report_damage({"greedy": {"L0": {"accuracy": "x"}}}) == "greedy.L0.accuracy is not a number"."""
    def number(value) -> bool:
        return value is None or isinstance(value, (int, float)) and not isinstance(value, bool)

    if not isinstance(report, dict):
        return f"a JSON {type(report).__name__}, not an object"
    if not isinstance(report.get("greedy"), dict):
        return "no greedy results"
    for name, row in report["greedy"].items():
        if not isinstance(row, dict) or not number(row.get("accuracy")):
            return f"greedy.{name}.accuracy is not a number"
    for key in ("step", "n"):
        if not number(report.get(key)):
            return f"{key} is not a number"
    passk = report.get("pass_at_k")
    if passk is None:
        return None
    if not isinstance(passk, dict) or not isinstance(passk.get("by_level") or {}, dict):
        return "pass_at_k is not an object with by_level"
    for name, row in (passk.get("by_level") or {}).items():
        if not isinstance(row, dict):
            return f"pass_at_k.by_level.{name} is not an object"
        for key, value in row.items():
            if key.startswith("pass@") and (not key[5:].isdigit() or not number(value)):
                return f"pass_at_k.by_level.{name}.{key[:20]} is not pass@<k>: <number>"
    return None


def eval_results_table(entries: list[tuple[str, str, dict]]) -> str:
    """Markdown section of eval.py results, (run label, what was evaluated, report) per entry: one row for greedy
    accuracy and one per pass@k, levels as columns, in %; '' when there are none.

    Example row: '| gaussian s0 | final | 200 | countdown | 100 | pass@8 (8 samples) | 91.0 | 40.0 |'
    """
    if not entries:
        return ""
    levels = []
    for _, _, report in entries:
        levels += [name for name in report["greedy"] if name not in levels]

    def cells(values: dict) -> str:
        return " | ".join("–" if values.get(name) is None else f"{100 * values[name]:.1f}" for name in levels)

    lines = ["", "## eval.py results", "",
             "| run | evaluated | step | task | problems | metric | " + " | ".join(levels) + " |",
             "|---|---|---:|---|---:|---|" + "---:|" * len(levels)]
    for label, what, report in entries:
        head = (f"| {label} | {what} | {'–' if report.get('step') is None else report['step']} | "
                f"{report.get('task', '?')} | {report.get('n', '?')} |")
        lines.append(f"{head} greedy accuracy | " + cells({k: v["accuracy"] for k, v in report["greedy"].items()})
                     + " |")
        passk = report.get("pass_at_k") or {}
        by_level = passk.get("by_level") or {}
        ks = sorted({key for row in by_level.values() for key in row if key.startswith("pass@")},
                    key=lambda key: int(key.split("@")[1]))
        for k in ks:
            lines.append(f"{head} {k} ({passk.get('samples')} samples) | "
                         + cells({name: row.get(k) for name, row in by_level.items()}) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# Plots (matplotlib imported inside: it is optional)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    return plt


def _run_colors(n: int) -> list:
    return [_pyplot().get_cmap("tab10")(i % 10) for i in range(n)]


def plot_accuracy(runs: list[Run], path: Path, window: int) -> None:
    """One panel per level: greedy eval accuracy (solid, markers) and smoothed training-sample accuracy (dashed)."""
    plt = _pyplot()
    levels = []
    for run in runs:
        levels += [name for name in eval_level_names(run.evals) if name not in levels]
    levels = levels or sorted({k.split("/")[1] for r in runs for row in r.metrics for k in row
                               if k.startswith("accuracy/")})
    fig, axes = plt.subplots(1, len(levels), figsize=(3.2 * len(levels), 3.2), squeeze=False, sharey=True)
    for ax, name in zip(axes[0], levels):
        for run, color in zip(runs, _run_colors(len(runs))):
            if run.metrics:
                steps, train_acc = series(run.metrics, f"accuracy/{name}")
                if np.isfinite(train_acc).any():
                    ax.plot(steps, 100 * moving_average(train_acc, window), "--", color=color, alpha=0.6, lw=1)
            if run.evals:
                steps, acc = series(run.evals, f"{name}/accuracy")
                ax.plot(steps, 100 * acc, "o-", color=color, ms=3, label=run.label)
        ax.set(title=name, xlabel="optimizer step", ylim=(-2, 102))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy (%)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    from matplotlib.lines import Line2D

    handles += [Line2D([], [], color="gray", marker="o", ms=3), Line2D([], [], color="gray", ls="--")]
    labels += ["greedy eval (held-out)", f"training samples (avg over {window} steps)"]
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06 + 0.04 * ((len(labels) - 1) // 4), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


TRAINING_PANELS = [("reward_mean", "mean reward", "reward"), ("completion_length_mean", "completion length", "tokens"),
                   ("kl", "KL(policy || reference)", "KL per token (nats)"), ("entropy", "entropy per token", "nats")]


def logged(run: Run, key: str) -> bool:
    """Whether the run logged `key` at some step (KL under beta = 0 never: no reference; older runs logged 0)."""
    return (bool(run.metrics) and not (key == "kl" and run.config.get("beta") == 0)
            and bool(np.isfinite(series(run.metrics, key)[1]).any()))


def training_panels(runs: list[Run]) -> list[tuple[str, str, str]]:
    """The (key, title, unit) panels of training.png that some run has data for: an empty panel is left out."""
    return [panel for panel in TRAINING_PANELS if any(logged(run, panel[0]) for run in runs)]


def plot_training(runs: list[Run], path: Path, window: int) -> None:
    """Reward, completion length, KL and entropy over steps: raw (faint) and moving average, one colour per run.

    The reward panel also shows each greedy evaluation's reward averaged over its levels (dots).
    """
    plt = _pyplot()
    panels = training_panels(runs)
    cols = min(2, len(panels))
    fig, axes = plt.subplots(math.ceil(len(panels) / cols), cols, figsize=(5 * cols, 3.25 * math.ceil(
        len(panels) / cols)), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (key, title, unit) in zip(axes.flat, panels):
        for run, color in zip(runs, _run_colors(len(runs))):
            if not logged(run, key):
                continue
            steps, values = series(run.metrics, key)
            ax.plot(steps, values, color=color, alpha=0.2, lw=0.8)
            ax.plot(steps, moving_average(values, window), color=color, lw=1.5, label=run.label)
            if key == "reward_mean" and run.evals:  # greedy held-out reward, averaged over the evaluated levels
                names = eval_level_names(run.evals)
                eval_steps = [row["step"] for row in run.evals]
                eval_reward = [np.mean([row[f"{n}/reward"] for n in names]) for row in run.evals]
                ax.plot(eval_steps, eval_reward, "o:", color=color, ms=3, lw=1)
        ax.set(title=title, xlabel="optimizer step", ylabel=unit)
        ax.grid(alpha=0.3)
    from matplotlib.lines import Line2D

    handles, labels = axes.flat[0].get_legend_handles_labels()
    handles += [Line2D([], [], color="gray", alpha=0.3, lw=0.8), Line2D([], [], color="gray", lw=1.5)]
    labels += ["raw (every step)", f"smoothed (moving average over {window} steps)"]
    if any(run.evals for run in runs) and panels[0][0] == "reward_mean":
        handles.append(Line2D([], [], color="gray", marker="o", ms=3, ls=":"))
        labels.append("greedy eval reward (mean over levels)")
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.05 + 0.035 * ((len(labels) - 1) // 4), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def arm_curves(runs: list[Run], key: str) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Per arm (runs that differ only in their seed): (steps, mean, min, max over the seeds) of eval.jsonl's
    `key`, at the steps every seed evaluated. Example: seeds with L3/pass@16 [.2, .1] and [.4, .3] at steps 0, 200
    -> steps [0, 200], mean [.3, .2], min [.2, .1], max [.4, .3]."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(replicate_key(run.config), []).append(run)
    curves = {}
    for members in groups.values():
        by_step = [{row["step"]: row[key] for row in run.evals if row.get(key) is not None} for run in members]
        steps = sorted(set.intersection(*(set(values) for values in by_step)))
        if steps:
            values = np.array([[seed[step] for step in steps] for seed in by_step])  # [seeds, steps]
            curves[arm_label(members[0].config)] = (np.array(steps), values.mean(0), values.min(0), values.max(0))
    return curves


def plot_pass_at_k(runs: list[Run], path: Path, metrics: list[str]) -> None:
    """Rows: greedy accuracy, then each pass@k; columns: the levels pass@k was logged for. One line per schedule
    (mean over its seeds) with a band from the lowest to the highest seed."""
    plt = _pyplot()
    levels = [name for name in eval_level_names([row for run in runs for row in run.evals])
              if any(f"{name}/{metrics[-1]}" in row for run in runs for row in run.evals)]
    rows = ["accuracy"] + metrics
    fig, axes = plt.subplots(len(rows), len(levels), figsize=(3.3 * len(levels), 2.8 * len(rows)), squeeze=False)
    for i, metric in enumerate(rows):
        for j, name in enumerate(levels):
            ax = axes[i][j]
            curves = arm_curves(runs, f"{name}/{metric}")
            for (arm, (steps, mean, low, high)), color in zip(curves.items(), _run_colors(len(curves))):
                ax.plot(steps, 100 * mean, "o-", color=color, ms=3, label=arm)
                ax.fill_between(steps, 100 * low, 100 * high, color=color, alpha=0.15, lw=0)
            what = "greedy accuracy" if metric == "accuracy" else metric
            ax.set(title=f"{name} {what}", xlabel="optimizer step", ylabel=f"{what} (%)", ylim=(-2, 102))
            ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8, frameon=False,
               title="mean over seeds; band: lowest to highest seed", title_fontsize=8)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curriculum(runs: list[Run], path: Path, window: int) -> None:
    """Per run: p_t over levels as a stacked area; the drawn shares' cumulative boundaries as dashed lines."""
    plt = _pyplot()
    runs = [r for r in runs if r.metrics]
    cols = min(3, len(runs))
    rows = math.ceil(len(runs) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 4.4 * rows), squeeze=False)
    for ax in axes.flat[len(runs):]:
        ax.axis("off")
    for ax, run in zip(axes.flat, runs):
        steps = np.array([r["step"] for r in run.metrics])
        probs = np.array([r["level_probs"] for r in run.metrics])  # [T, K]
        counts = np.array([r["level_counts"] for r in run.metrics])  # [T, K]
        expected = (probs * counts.sum(axis=1, keepdims=True)).sum(axis=0)
        k = probs.shape[1]
        colors = [plt.get_cmap("viridis")(0.15 + 0.75 * i / max(1, k - 1)) for i in range(k)]
        labels = [f"L{i}: {counts[:, i].sum()} drawn / {expected[i]:.0f} expected" for i in range(k)]
        ax.stackplot(steps, probs.T, colors=colors, alpha=0.75, labels=labels)
        shares = np.stack([moving_average(col, window) for col in drawn_shares(run.metrics).T], axis=1)
        for i, boundary in enumerate(np.cumsum(shares, axis=1)[:, :-1].T):
            ax.plot(steps, boundary, "--", color="black", lw=1,
                    label=f"drawn share (avg over {window} steps)" if i == 0 else None)
        ax.set(title=run.label, xlabel="optimizer step", ylabel="p(level)", ylim=(0, 1),
               xlim=(steps.min(), steps.max()))
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, fontsize=7, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------------
# CLI


def matplotlib_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def check_report_folder(out: Path) -> None:
    """An --out of the user's choosing is written only where the report replaces nothing but its own output: no
    run or model lives there (config.json, metrics.jsonl, checkpoints/), and any table or plot there comes with a
    table.md the report wrote (its first line is the table's header). Else a UserError; nothing is written."""
    if not out.is_dir():
        return
    if any((out / name).exists() for name in ("config.json", "metrics.jsonl", "checkpoints")):
        raise UserError(f"--out {out} holds a run or a model; the report would write into it: pass another --out")
    table = out / "table.md"
    ours = table.is_file() and table.read_text(errors="replace").startswith(TABLE_HEADER)
    present = [name for name in REPORT_FILES if (out / name).exists()]
    if present and not ours:
        raise UserError(f"--out {out} holds {', '.join(present)}, which the report did not write; nothing was "
                        f"changed: pass another --out, or move them")


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict:
    parser = OneLineErrorParser(prog="python -m e2h_min.analysis.report", description="Plots and a table of train.py runs.")
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories written by train.py")
    parser.add_argument("--out", help="output directory (default RUN_DIR/report for one run, ./report for several)")
    parser.add_argument("--smooth", type=int, default=0,
                        help="moving-average window in steps (0 = steps/25, at least 5)")
    parser.add_argument("--no-plots", action="store_true", help="write only the table (what happens without "
                                                                "matplotlib)")
    parser.add_argument("--baseline", default="balanced",
                        help="the schedule every other one is compared with, seed by seed (default: balanced)")
    args = parser.parse_args(argv)
    plots = not args.no_plots and matplotlib_available()
    if not 0 <= args.smooth <= MAX_STEPS:
        raise UserError(f"--smooth must be in [0, {MAX_STEPS:,}], got {args.smooth}")
    runs = [load_run(path) for path in args.runs]
    schedules = sorted({run.config.get("schedule") for run in runs} - {None})
    if args.baseline != parser.get_default("baseline") and args.baseline not in schedules:
        raise UserError(f"--baseline {args.baseline}: no run given has that schedule (they have: "
                        f"{', '.join(schedules)})")
    label_runs(runs)
    out = Path(args.out) if args.out else (runs[0].path / "report" if len(runs) == 1 else Path("report"))
    if out != runs[0].path / "report":  # a run's own report/ is the report's (runlog.foreign_files checks it)
        check_report_folder(out)
    check_output_dir(out, "--out")
    pass_k = pass_at_k_metrics([row for run in runs for row in run.evals])
    table = (accuracy_table(runs) + interval_table(runs, args.baseline)
             + "".join(interval_table(runs, args.baseline, metric=metric) for metric in pass_k)
             + eval_results_table([(run.label, what, report) for run in runs for what, report
                                   in find_eval_reports(run.path)]))
    (out / "table.md").write_text(table)
    written = [out / "table.md"]
    if plots:
        longest = max(len(r.metrics) for r in runs)
        # a step draws only a few prompts, so per-step shares are noisy: smooth over at least 5 steps
        window = args.smooth or min(max(longest, 1), max(5, round(longest / 25)))
        for name, plot in (("accuracy.png", plot_accuracy), ("training.png", plot_training),
                           ("curriculum.png", plot_curriculum)):
            if name == "curriculum.png" and not any(r.metrics for r in runs):
                continue
            plot(runs, out / name, window)
            written.append(out / name)
        if pass_k:
            plot_pass_at_k(runs, out / "pass_at_k.png", pass_k)
            written.append(out / "pass_at_k.png")
    print(table, end="")
    print("wrote " + ", ".join(str(p) for p in written))
    for run in runs:
        for log, n in run.torn.items():
            print(f"note: {log}: skipped {n} torn line(s) at the end (a run killed while writing them)",
                  file=sys.stderr)
    if not plots and not args.no_plots:
        print("note: the plots need matplotlib (pip install -r requirements-optional.txt); wrote the table only",
              file=sys.stderr)
    return {"table": table, "files": [str(p) for p in written]}


if __name__ == "__main__":
    main()
