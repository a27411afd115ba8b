"""The E2H curriculum: which difficulty level each prompt slot gets at optimizer step t (spec sections 3 and 4).

- `level_probs(schedule, t, T, K, **params)` is the schedule p_t over levels 0..K-1: a pure function of the step.
  t is the OPTIMIZER step, 0..T-1 during a run (the public code fed a data-loader index, so with 2 GPUs its clock
  ran at half speed and its classic schedule never reached the hard level). Steps past T hold the value at T.
- `expected_level_counts` sums p_t * prompts_per_step over t = 0..T-1: the number of prompts each level gets over a
  run. gaussian(0.5, 0.5), K=4, 1600 steps x 8 prompts -> 3,580 hard prompts of 12,800 (balanced: 3,200).
- `LevelSampler` draws each slot's level i.i.d. from p_t and serves the next problem of that level: generated tasks
  count indices 0, 1, 2, ...; file-backed tasks walk a seeded permutation of their rows, a fresh one each epoch.
  Its state (RNG, per-level cursors, counts) is plain JSON, so a resumed run draws exactly what an unbroken one would.
- "sec" (Self-Evolving Curriculum, Chen et al. 2025, beyond the E2H paper): a bandit over levels whose value is an
  exponential moving average of the mean |advantage| seen at that level, sampled by a softmax with a temperature;
  the trainer feeds it through `LevelSampler.update` (under --schedule sec only).

CLI: python -m e2h_min.rl.curriculum --schedule gaussian --beta 0.5 --sigma 0.5 --levels 4 --steps 1600
     python -m e2h_min.rl.curriculum --schedule all --steps 1600 --prompts-per-step 8
"""

from __future__ import annotations

import argparse
import copy
import math
import numbers
import sys
from typing import Any

import numpy as np

from e2h_min.errors import OneLineErrorParser, UserError, check_output_file
from e2h_min.tasks.base import Problem, Task

# ----------------------------------------------------------------------------------------------------------------
# Schedules: each returns p_t as a list of K floats summing to 1.


def _progress(step: int, total_steps: int) -> float:
    """t/T clamped to [0, 1]: steps past the end hold the schedule's final value."""
    return min(step / total_steps, 1.0)


def classic_probs(step: int, total_steps: int, num_levels: int) -> list[float]:
    """All mass on level min(floor(t*K/T), K-1): K equal phases, no replay of earlier levels.

    Example: T=1600, K=4 -> level 0 for t < 400, ..., level 3 from t = 1200 to the last step t = 1599.
    """
    level = min(step * num_levels // total_steps, num_levels - 1)
    return [1.0 if k == level else 0.0 for k in range(num_levels)]


def balanced_probs(step: int, total_steps: int, num_levels: int) -> list[float]:
    """p_k = 1/K at every step: plain GRPO on all levels mixed. Example: K=4 -> [.25, .25, .25, .25]."""
    return [1.0 / num_levels] * num_levels


def hard_probs(step: int, total_steps: int, num_levels: int) -> list[float]:
    """All mass on level K-1 at every step: the "GRPO on the hard split alone" baseline. K=4 -> [0, 0, 0, 1]."""
    return [0.0] * (num_levels - 1) + [1.0]


def cosine_probs(step: int, total_steps: int, num_levels: int) -> list[float]:
    """E2H-C as the published runs used it: a cosine blend of a falling and a rising linear profile,
    a = 0.5 * (1 + cos(pi * t/T));  p_k = a * e_k + (1 - a) * l_k,  e_k = (K-k)/S,  l_k = (k+1)/S,  S = K(K+1)/2.
    Example: K=4 -> [.4, .3, .2, .1] at t=0, [.25]*4 at t=T/2, [.1, .2, .3, .4] at t=T.
    """
    a = 0.5 * (1.0 + math.cos(math.pi * _progress(step, total_steps)))
    s = num_levels * (num_levels + 1) / 2
    return [(a * (num_levels - k) + (1 - a) * (k + 1)) / s for k in range(num_levels)]


def cosine_literal_probs(step: int, total_steps: int, num_levels: int) -> list[float]:
    """E2H-C as the paper's equation reads: w_k = a * (K-k-1) + (1-a) * k, normalised; a as in `cosine_probs`.

    The hardest level gets nothing at t=0 and the easiest nothing at t=T. K=1 has all weights 0 -> [1.0].
    Example: K=4 -> [.5, .333, .167, 0] at t=0, [0, .167, .333, .5] at t=T.
    """
    a = 0.5 * (1.0 + math.cos(math.pi * _progress(step, total_steps)))
    weights = [a * (num_levels - k - 1) + (1 - a) * k for k in range(num_levels)]
    total = sum(weights)
    return [w / total for w in weights] if total > 0 else [1.0]


def gaussian_probs(step: int, total_steps: int, num_levels: int, beta: float = 0.5, sigma: float = 0.5,
                   min_prob: float | None = None) -> list[float]:
    """E2H-G: a Gaussian bump over levels whose centre moves from level 0 to level K-1, with a floor.

    x_t = (t/T)^beta * (K-1);  q_k = exp(-(k - x_t)^2 / (2 sigma^2)) / sum_j(...);  p_k = p_min + (1 - K p_min) q_k.
    min_prob=None is the published floor p_min = 2/(K(K+1)) (0.1 for K=4); min_prob=0 is the paper's Eq. 1 (p = q).
    Small beta moves the centre early (fast ramp), large beta late; small sigma concentrates on one level.
    Example: K=4, beta=sigma=0.5 -> [.628, .172, .100, .100] at t=0 and [.105, .395, .395, .105] at t/T=0.25.
    """
    p_min = 2.0 / (num_levels * (num_levels + 1)) if min_prob is None else min_prob
    centre = _progress(step, total_steps) ** beta * (num_levels - 1)
    exponents = [-((k - centre) ** 2) / (2 * sigma ** 2) for k in range(num_levels)]
    top = max(exponents)  # shifting by the max cancels in the normalisation and keeps tiny sigmas from underflow
    bump = [math.exp(e - top) for e in exponents]
    total = sum(bump)
    return [p_min + (1 - num_levels * p_min) * b / total for b in bump]


def sec_probs(step: int, total_steps: int, num_levels: int, values: list[float] | None = None,
              temperature: float = 1.0) -> list[float]:
    """Self-Evolving Curriculum's Boltzmann policy: p_k = exp(Q_k / tau) / sum_j exp(Q_j / tau).

    Q_k (`values`) is the running value of level k (the sampler keeps it: an EMA of mean |advantage|);
    None means all zeros, i.e. uniform. The step does not enter. Example: Q=[0, ln 3], tau=1 -> [.25, .75].
    """
    values = [0.0] * num_levels if values is None else list(values)
    top = max(values)  # subtract the max so exp never overflows
    weights = [math.exp((v - top) / temperature) for v in values]
    total = sum(weights)
    return [w / total for w in weights]


_SCHEDULE_FUNCTIONS = {
    "classic": classic_probs,
    "balanced": balanced_probs,
    "cosine": cosine_probs,
    "cosine_literal": cosine_literal_probs,
    "gaussian": gaussian_probs,
    "hard": hard_probs,
    "sec": sec_probs,
}
SCHEDULES = tuple(_SCHEDULE_FUNCTIONS)
TIME_SCHEDULES = tuple(s for s in SCHEDULES if s != "sec")  # those that depend on the step alone
# The keyword parameters each schedule accepts (LevelSampler also takes "ema" for sec). A trainer with flags for
# every schedule passes {name: value for name in SCHEDULE_PARAMS[schedule]}.
SCHEDULE_PARAMS = {"gaussian": ("beta", "sigma", "min_prob"), "sec": ("values", "temperature")}


MIN_SIGMA = 1e-3
CLI_MAX_STEPS = 1_000_000  # the CLI sums p_t over every step in Python (~1 s per 100k steps and schedule)
CLI_MAX_LEVELS = 100


def _check_int(name: str, value: Any, minimum: int, maximum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum:,} (the limit), got {value!r}")


def _check_params(schedule: str, num_levels: int, params: dict) -> None:
    """Reject unknown schedules, stray parameters and out-of-range values with a message naming the fix."""
    if schedule not in _SCHEDULE_FUNCTIONS:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    allowed = SCHEDULE_PARAMS.get(schedule, ())
    stray = sorted(set(params) - set(allowed))
    if stray:
        takes = f"takes only {', '.join(allowed)}" if allowed else "takes no parameters"
        raise ValueError(f"schedule {schedule!r} {takes}; remove {', '.join(stray)}")

    def finite(name: str, default: float) -> float:
        value = params.get(name, default)
        if not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise ValueError(f"{schedule} {name} must be a finite number, got {value!r}")
        return value

    if schedule == "gaussian":
        if finite("sigma", 0.5) < MIN_SIGMA:  # sigma**2 underflows to 0 near 1e-154; 0.001 is already one level
            raise ValueError(f"gaussian sigma must be >= {MIN_SIGMA} (e.g. 0.5), got {params['sigma']}")
        if finite("beta", 0.5) < 0:
            raise ValueError(f"gaussian beta must be >= 0 (e.g. 0.5), got {params['beta']}")
        if params.get("min_prob") is not None:
            p_min = finite("min_prob", 0.0)
            if not 0.0 <= p_min <= 1.0 / num_levels + 1e-12:
                raise ValueError(f"gaussian min_prob must be in [0, 1/K] = [0, {1 / num_levels:.4g}] "
                                 f"(None = the published 2/(K(K+1))), got {p_min}")
    if schedule == "sec":
        if finite("temperature", 1.0) <= 0:
            raise ValueError(f"sec temperature must be > 0 (e.g. 1.0), got {params['temperature']}")
        values = params.get("values")
        if values is not None and (len(values) != num_levels or not all(math.isfinite(v) for v in values)):
            raise ValueError(f"sec values must be {num_levels} finite numbers (one per level), got {values!r}")


def level_probs(schedule: str, step: int, total_steps: int, num_levels: int, **params: Any) -> list[float]:
    """p_t: the probability of each level 0..K-1 at optimizer step `step` of `total_steps` (spec section 3).

    Example: level_probs("cosine", 0, 1600, 4) -> [0.4, 0.3, 0.2, 0.1];
             level_probs("gaussian", 400, 1600, 4, beta=0.5, sigma=0.5) -> [.105, .395, .395, .105].
    """
    _check_int("step", step, 0)
    _check_int("total_steps", total_steps, 1)
    _check_int("num_levels", num_levels, 1)
    _check_params(schedule, num_levels, params)
    return _SCHEDULE_FUNCTIONS[schedule](int(step), int(total_steps), int(num_levels), **params)


def expected_level_counts(schedule: str, total_steps: int, prompts_per_step: int, num_levels: int,
                          **params: Any) -> list[float]:
    """Expected prompts per level over a run: sum over t = 0..T-1 of prompts_per_step * p_t.

    t stops at T-1 because a run of T optimizer steps has steps 0..T-1; this is the convention that gives the
    spec's 3,580 hard prompts for gaussian(0.5, 0.5), 1600 x 8 (summing t = 0..T would count 12,808 prompts).
    Example: expected_level_counts("balanced", 1600, 8, 4) -> [3200.0, 3200.0, 3200.0, 3200.0].
    """
    _check_int("prompts_per_step", prompts_per_step, 0)
    totals = [0.0] * num_levels
    for step in range(total_steps):
        for k, p in enumerate(level_probs(schedule, step, total_steps, num_levels, **params)):
            totals[k] += prompts_per_step * p
    return totals


# ----------------------------------------------------------------------------------------------------------------
# The sampler: levels from p_t, then the next problem of each level.


def epoch_permutation(seed: int, level: int, epoch: int, num_rows: int) -> list[int]:
    """The order in which a file-backed level's rows are served in one epoch: a permutation of 0..num_rows-1.

    Derived from (seed, level, epoch) alone, so a checkpoint stores only (epoch, cursor), never the permutation.
    Example: epoch_permutation(0, 2, 0, 5) is some fixed ordering of [0, 1, 2, 3, 4]; epoch 1 is another.
    """
    return np.random.default_rng([seed, level, epoch]).permutation(num_rows).tolist()


class LevelSampler:
    """Draws a step's prompts: level ~ p_t i.i.d. per slot, then the next problem of that level.

    Levels with 0 rows get probability 0 (the rest renormalised). For schedule "sec", `update` feeds the bandit:
    Q_k <- (1 - ema) Q_k + ema * mean|A|_k for each level seen in the step, and p_t = softmax(Q / temperature).
    The sec defaults (temperature 1.0, ema 0.5) are our choice; with GRPO's normalised advantages mean |A| is
    in [0, ~1], so temperatures well below 1 are needed for a sharp preference.

    Example: sampler = LevelSampler(CountdownTask(), "gaussian", total_steps=1600, seed=0, beta=0.5, sigma=0.5)
             batch = sampler.sample(step, 8)   # 8 Problems; checkpoint sampler.state_dict() with the model
    """

    STATE_VERSION = 1

    def __init__(self, task: Task, schedule: str, total_steps: int, seed: int = 0, split: str = "train",
                 **schedule_params: Any):
        _check_int("seed", seed, 0)  # numpy seeds must be non-negative
        self.task, self.schedule, self.total_steps = task, schedule, total_steps
        self.seed, self.split = int(seed), split
        self.num_levels = int(task.num_levels)
        if "values" in schedule_params:
            raise ValueError("LevelSampler keeps the sec values itself; remove values= (feed them via update)")
        self.ema = schedule_params.pop("ema", 0.5) if schedule == "sec" else 0.5
        if not 0.0 < self.ema <= 1.0:
            raise ValueError(f"sec ema must be in (0, 1] (e.g. 0.5), got {self.ema}")
        self.schedule_params = schedule_params
        self.rows = [task.num_problems(k, split) for k in range(self.num_levels)]  # None = generated, no end
        if all(n == 0 for n in self.rows):
            raise ValueError(f"task {task.name!r} has no {split!r} problems at any level; check its data file")
        self.rng = np.random.default_rng(self.seed)
        self.epoch = [0] * self.num_levels
        self.cursor = [0] * self.num_levels  # generated: next index; file-backed: position in this epoch's order
        self.counts = [0] * self.num_levels  # levels drawn so far
        self.sec_values = [0.0] * self.num_levels
        self._orders: dict[int, tuple[int, list[int]]] = {}  # level -> (epoch, permutation); a cache only
        sec = {"values": self.sec_values} if schedule == "sec" else {}
        level_probs(schedule, 0, total_steps, self.num_levels, **schedule_params, **sec)  # checked once, here
        self._schedule = _SCHEDULE_FUNCTIONS[schedule]  # so `probs` calls it without the checks
        self.probs(0)

    def probs(self, step: int) -> list[float]:
        """p_t (step an int >= 0) with empty levels zeroed and the rest renormalised: what `sample` draws from."""
        sec = {"values": self.sec_values} if self.schedule == "sec" else {}
        p = self._schedule(step, self.total_steps, self.num_levels, **self.schedule_params, **sec)
        p = [0.0 if n == 0 else pk for pk, n in zip(p, self.rows)]
        total = sum(p)
        if total <= 0:
            raise ValueError(f"schedule {self.schedule!r} puts all mass at step {step} on levels with no "
                             f"{self.split!r} problems (rows per level: {self.rows}); add data or change schedule")
        return [pk / total for pk in p]

    def check_every_step_drawable(self, max_checks: int = 100_000) -> None:
        """Raise ValueError now if the schedule would, at some step of the run, put all its mass on levels with no
        rows (probs would fail there, mid-run). Only runs when a level is empty; at most max_checks evenly
        spaced steps (the schedules change smoothly or in K phases, so a gap cannot hide between them)."""
        if all(n != 0 for n in self.rows):
            return
        stride = max(1, self.total_steps // max_checks)
        for step in [*range(0, self.total_steps, stride), self.total_steps - 1]:
            self.probs(step)

    def _next_index(self, level: int) -> int:
        """Advance level's stream by one and return the problem index it serves (generated: 0, 1, 2, ...)."""
        if self.rows[level] is not None:
            return self._next_row(level)
        self.cursor[level] += 1
        return self.cursor[level] - 1

    def _next_row(self, level: int) -> int:
        """A file-backed level's next row: this epoch's permutation in order, then a new epoch with a new one."""
        n_rows = self.rows[level]
        if self.cursor[level] == n_rows:  # wrap around: a new epoch with a new order
            self.epoch[level] += 1
            self.cursor[level] = 0
        cached = self._orders.get(level)
        if cached is None or cached[0] != self.epoch[level]:
            cached = (self.epoch[level], epoch_permutation(self.seed, level, self.epoch[level], n_rows))
            self._orders[level] = cached
        index = cached[1][self.cursor[level]]
        self.cursor[level] += 1
        return index

    def sample(self, step: int, n: int) -> list[Problem]:
        """n problems for optimizer step `step`: levels drawn i.i.d. from `probs(step)`, in slot order."""
        levels = self.rng.choice(self.num_levels, size=n, p=np.asarray(self.probs(step)))
        problems = []
        for level in levels.tolist():
            self.counts[level] += 1
            problems.append(self.task.problem(level, self._next_index(level), self.split))
        return problems

    def update(self, level_to_mean_abs_adv: dict[int, float]) -> None:
        """Feed the sec bandit one step's mean |advantage| per level drawn: Q_k <- (1-ema) Q_k + ema * r_k.

        Levels absent from the dict keep their value. Only sec reads Q (train.py feeds it under --schedule sec).
        Example: ema=0.5, Q=[0, 0], update({1: 0.8}) -> Q=[0, 0.4].
        """
        for level, reward in level_to_mean_abs_adv.items():
            if not 0 <= level < self.num_levels or not math.isfinite(reward):
                raise ValueError(f"update takes {{level in 0..{self.num_levels - 1}: finite mean |advantage|}}, "
                                 f"got {{{level!r}: {reward!r}}}")
            self.sec_values[level] = (1 - self.ema) * self.sec_values[level] + self.ema * float(reward)

    def state_dict(self) -> dict:
        """Plain JSON-serialisable state: RNG, per-level (epoch, cursor), counts, sec values, and the config."""
        return {
            "version": self.STATE_VERSION,
            "schedule": self.schedule,
            "total_steps": self.total_steps,
            "seed": self.seed,
            "num_levels": self.num_levels,
            "rows": list(self.rows),
            "rng": copy.deepcopy(self.rng.bit_generator.state),
            "epoch": list(self.epoch),
            "cursor": list(self.cursor),
            "counts": list(self.counts),
            "sec_values": list(self.sec_values),
            "data": self.task.fingerprint(),  # None for a generated task
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()`; refuses a state whose seed, levels or row counts differ from this sampler's."""
        self.check_state(state)
        self.rng.bit_generator.state = copy.deepcopy(state["rng"])
        self.epoch, self.cursor = list(state["epoch"]), list(state["cursor"])
        self.counts, self.sec_values = list(state["counts"]), [float(v) for v in state["sec_values"]]
        self._orders.clear()

    def check_state(self, state: dict) -> None:
        """ValueError unless `state` (a state_dict()) fits this sampler: same version, seed, levels and rows."""
        if state.get("version") != self.STATE_VERSION:
            raise ValueError(f"sampler state version {state.get('version')!r} != {self.STATE_VERSION}; "
                             f"resume with the code version that wrote the checkpoint")
        for key, mine in (("seed", self.seed), ("num_levels", self.num_levels), ("rows", self.rows)):
            if state[key] != mine:
                raise ValueError(f"sampler state has {key}={state[key]!r} but this run has {mine!r}; "
                                 f"resume with the same task data and seed")
        data = self.task.fingerprint()
        if state.get("data") not in (None, data):  # checkpoints of earlier versions have no fingerprint
            where = getattr(self.task, "data", "the task data")
            raise ValueError(f"{where} holds other problems than when the run started (sha256 of its rows "
                             f"{state['data'][:12]}... then, {str(data)[:12]}... now); resume with the same file")


# ----------------------------------------------------------------------------------------------------------------
# CLI: print (and optionally plot) a schedule.

TABLE_POINTS = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0)


def _params_for(schedule: str, args: argparse.Namespace) -> dict:
    return {"beta": args.beta, "sigma": args.sigma, "min_prob": args.min_prob} if schedule == "gaussian" else {}


def _print_schedule(args: argparse.Namespace) -> None:
    params = _params_for(args.schedule, args)
    names = [f"L{k}" for k in range(args.levels)]
    shown = " ".join(f"{name}={value}" for name, value in params.items())
    print(f"schedule {args.schedule} {shown + ' ' if shown else ''}K={args.levels} T={args.steps}")
    print("t/T    step  " + " ".join(f"{n:>7}" for n in names))
    for frac in TABLE_POINTS:
        step = round(frac * args.steps)
        p = level_probs(args.schedule, step, args.steps, args.levels, **params)
        print(f"{frac:<5.2f} {step:>5}  " + " ".join(f"{x:7.3f}" for x in p))
    counts = expected_level_counts(args.schedule, args.steps, args.prompts_per_step, args.levels, **params)
    print(f"expected prompts per level over steps 0..{args.steps - 1} x {args.prompts_per_step} per step:")
    print("              " + " ".join(f"{n:>7}" for n in names) + "   total")
    print("              " + " ".join(f"{c:7.0f}" for c in counts) + f" {sum(counts):7.0f}")


def _print_all(args: argparse.Namespace) -> None:
    print(f"expected prompts per level, K={args.levels}, steps 0..{args.steps - 1} x {args.prompts_per_step}"
          f" per step (gaussian: beta={args.beta} sigma={args.sigma} min_prob={args.min_prob})")
    print(f"{'level':<7}" + " ".join(f"{s:>15}" for s in TIME_SCHEDULES))
    table = [expected_level_counts(s, args.steps, args.prompts_per_step, args.levels, **_params_for(s, args))
             for s in TIME_SCHEDULES]
    for k in range(args.levels):
        print(f"{'L' + str(k):<7}" + " ".join(f"{col[k]:15.0f}" for col in table))
    print(f"{'total':<7}" + " ".join(f"{sum(col):15.0f}" for col in table))


def _plot(args: argparse.Namespace) -> None:
    import matplotlib  # optional dependency; main checks it is importable before calling

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    schedules = TIME_SCHEDULES if args.schedule == "all" else (args.schedule,)
    fig, axes = plt.subplots(1, len(schedules), figsize=(4 * len(schedules), 3), squeeze=False)
    steps = np.arange(args.steps)
    for ax, schedule in zip(axes[0], schedules):
        params = _params_for(schedule, args)
        p = np.array([level_probs(schedule, int(t), args.steps, args.levels, **params) for t in steps])  # [T, K]
        ax.stackplot(steps, p.T, labels=[f"L{k}" for k in range(args.levels)])
        ax.set(title=schedule, xlabel="optimizer step", ylim=(0, 1), xlim=(0, args.steps - 1))
    axes[0][0].set_ylabel("p(level)")
    axes[0][-1].legend(loc="upper left", bbox_to_anchor=(1, 1))
    fig.tight_layout()
    fig.savefig(args.plot)
    print(f"wrote {args.plot}")


def main(argv: list[str] | None = None) -> int:
    parser = OneLineErrorParser(prog="python -m e2h_min.rl.curriculum",
                            description="Print the E2H level schedule p_t and the expected prompts per level.")
    parser.add_argument("--schedule", default="gaussian", choices=TIME_SCHEDULES + ("all",))
    parser.add_argument("--levels", type=int, default=4, help="K, the number of training levels")
    parser.add_argument("--steps", type=int, default=1600, help="T, optimizer steps in the run")
    parser.add_argument("--prompts-per-step", type=int, default=8)
    # gaussian (E2H-G) parameters
    parser.add_argument("--beta", type=float, default=0.5, help="pace of the centre: x_t = (t/T)^beta (K-1)")
    parser.add_argument("--sigma", type=float, default=0.5, help="width of the bump over levels")
    parser.add_argument("--min-prob", type=float, default=None, help="floor per level; default 2/(K(K+1)), 0 = Eq. 1")
    parser.add_argument("--plot", metavar="PNG", help="also save a stacked-area chart of p_t (needs matplotlib)")
    args = parser.parse_args(argv)
    if args.plot:
        try:
            check_output_file(args.plot, "--plot")
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        try:
            import matplotlib  # noqa: F401  (checked first so a missing plot library fails before any output)
        except ImportError:
            print("--plot needs matplotlib: pip install matplotlib", file=sys.stderr)
            return 2
    try:
        _check_int("--levels", args.levels, 1, CLI_MAX_LEVELS)
        _check_int("--steps", args.steps, 1, CLI_MAX_STEPS)
        _check_int("--prompts-per-step", args.prompts_per_step, 0, 10**9)
        _check_params("gaussian", args.levels, _params_for("gaussian", args))  # checked even if unused: typos show
        (_print_all if args.schedule == "all" else _print_schedule)(args)
        if args.plot:
            _plot(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
