"""Tests for e2h_min/rl/curriculum.py: the spec's test vectors, schedule invariants, the sampler's streams and resume."""

from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import pytest

from e2h_min.rl.curriculum import (
    SCHEDULES,
    TIME_SCHEDULES,
    LevelSampler,
    expected_level_counts,
    level_probs,
    main,
)
from e2h_min.tasks.base import Problem, Task


class FileTask(Task):
    """A fake file-backed task: `rows[k]` problems at level k, problem text = 'k/index'."""

    name = "fake_file"

    def __init__(self, rows: list[int]):
        self.rows = rows
        self.num_levels = len(rows)

    def num_problems(self, level: int, split: str = "train") -> int:
        return self.rows[level]

    def problem(self, level: int, index: int, split: str = "train") -> Problem:
        assert 0 <= index < self.rows[level], (level, index)
        return Problem(level, index, f"{level}/{index}")


class GeneratedTask(Task):
    """A fake generated task (num_problems None), cheap enough for tens of thousands of draws."""

    name = "fake_gen"
    num_levels = 4

    def problem(self, level: int, index: int, split: str = "train") -> Problem:
        return Problem(level, index, f"{level}/{index}")


def close(actual, expected, tol=1e-3):
    return len(actual) == len(expected) and all(abs(a - e) <= tol for a, e in zip(actual, expected))


# --- spec test vectors (section 3), K = 4 -------------------------------------------------------------------------

@pytest.mark.parametrize("step, expected", [(0, [.4, .3, .2, .1]), (800, [.25] * 4), (1600, [.1, .2, .3, .4])])
def test_cosine_vectors(step, expected):
    assert close(level_probs("cosine", step, 1600, 4), expected)


@pytest.mark.parametrize("frac, expected", [
    (0.0, [.628, .172, .100, .100]),
    (0.25, [.105, .395, .395, .105]),
    (0.5, [.100, .138, .560, .201]),
])
def test_gaussian_default_vectors(frac, expected):
    assert close(level_probs("gaussian", int(frac * 1600), 1600, 4, beta=0.5, sigma=0.5), expected)


def test_gaussian_sharp_late_vector():
    assert close(level_probs("gaussian", 400, 1600, 4, beta=0.75, sigma=0.25), [.100, .699, .101, .100])


def test_expected_hard_count_gaussian_and_balanced():
    # The spec's 3,580 is the sum over t = 0..T-1 (T optimizer steps); t = 0..T would give 3,585 of 12,808.
    gaussian = expected_level_counts("gaussian", 1600, 8, 4, beta=0.5, sigma=0.5)
    assert round(gaussian[3]) == 3580 and math.isclose(sum(gaussian), 12800)
    assert close(expected_level_counts("balanced", 1600, 8, 4), [3200.0] * 4, tol=1e-6)


def test_expected_counts_match_naive_sum():
    naive = np.zeros(3)
    for t in range(37):
        naive += 5 * np.array(level_probs("cosine", t, 37, 3))
    assert close(expected_level_counts("cosine", 37, 5, 3), naive.tolist(), tol=1e-9)


def test_cosine_literal_at_start_and_end():
    assert close(level_probs("cosine_literal", 0, 100, 4), [.5, .333, .167, 0.0])
    assert close(level_probs("cosine_literal", 100, 100, 4), [0.0, .167, .333, .5])


def test_min_prob_zero_is_equation_one():
    for t, beta, sigma in [(0, .5, .5), (123, .25, .75), (700, .75, .25), (1000, 1.0, 2.0)]:
        x = (t / 1000) ** beta * 3
        q = np.exp(-(np.arange(4) - x) ** 2 / (2 * sigma ** 2))
        assert close(level_probs("gaussian", t, 1000, 4, beta=beta, sigma=sigma, min_prob=0.0),
                     (q / q.sum()).tolist(), tol=1e-12)


def test_gaussian_floor_is_published_default_and_bounds_every_level():
    for t in range(0, 1601, 50):
        assert min(level_probs("gaussian", t, 1600, 4)) >= 0.1 - 1e-12
        assert min(level_probs("gaussian", t, 1600, 6, min_prob=0.05)) >= 0.05 - 1e-12
    assert close(level_probs("gaussian", 7, 10, 4, min_prob=0.25), [.25] * 4, tol=1e-12)  # floor 1/K = uniform


# --- invariants ---------------------------------------------------------------------------------------------------

def test_every_schedule_is_a_distribution():
    rng = np.random.default_rng(0)
    for schedule in SCHEDULES:
        for total in (1, 2, 7, 100, 1600):
            for levels in (1, 2, 4, 5, 9):
                params = {"values": rng.normal(size=levels).tolist(), "temperature": 0.3} if schedule == "sec" else {}
                for step in sorted({0, 1, total // 3, total // 2, total - 1, total, total + 5}):
                    p = level_probs(schedule, step, total, levels, **params)
                    assert len(p) == levels and min(p) >= 0 and math.isclose(sum(p), 1.0), (schedule, step, p)


def test_classic_reaches_last_level_on_the_optimizer_clock():
    # The public code's clock ran at half speed, so its classic schedule stopped at level 1 of 4.
    assert level_probs("classic", 1599, 1600, 4) == [0, 0, 0, 1]
    assert level_probs("classic", 1199, 1600, 4) == [0, 0, 1, 0]
    assert level_probs("classic", 1200, 1600, 4) == [0, 0, 0, 1]
    phases = [level_probs("classic", t, 10, 4).index(1.0) for t in range(10)]
    assert phases == [0, 0, 0, 1, 1, 2, 2, 2, 3, 3]  # floor(t*K/T) with T not a multiple of K


def test_hard_and_balanced():
    assert level_probs("hard", 0, 10, 4) == [0, 0, 0, 1] and level_probs("hard", 9, 10, 1) == [1]
    assert level_probs("balanced", 3, 10, 5) == [0.2] * 5


def test_sec_softmax():
    assert close(level_probs("sec", 0, 10, 2, values=[0.0, math.log(3)]), [.25, .75], tol=1e-12)
    assert close(level_probs("sec", 0, 10, 3), [1 / 3] * 3, tol=1e-12)
    sharp = level_probs("sec", 0, 10, 2, values=[0.0, 0.1], temperature=0.01)
    assert sharp[1] > 0.99  # low temperature ~ greedy


@pytest.mark.parametrize("call, fragment", [
    (lambda: level_probs("linear", 0, 10, 4), "unknown schedule"),
    (lambda: level_probs("gaussian", 0, 10, 4, sigma=0.0), "sigma"),
    (lambda: level_probs("gaussian", 0, 10, 4, sigma=float("nan")), "sigma"),
    (lambda: level_probs("gaussian", 0, 10, 4, beta=-0.1), "beta"),
    (lambda: level_probs("gaussian", 0, 10, 4, min_prob=0.3), "min_prob"),
    (lambda: level_probs("gaussian", 0, 10, 4, min_prob=-0.01), "min_prob"),
    (lambda: level_probs("cosine", 0, 10, 4, beta=0.5), "remove beta"),
    (lambda: level_probs("gaussian", 0, 10, 4, sgima=0.5), "remove sgima"),
    (lambda: level_probs("cosine", 0, 0, 4), "total_steps"),
    (lambda: level_probs("cosine", -1, 10, 4), "step"),
    (lambda: level_probs("cosine", 0, 10, 0), "num_levels"),
    (lambda: level_probs("sec", 0, 10, 2, temperature=0.0), "temperature"),
    (lambda: level_probs("sec", 0, 10, 2, values=[1.0]), "values"),
])
def test_bad_input_raises_one_line_value_error(call, fragment):
    with pytest.raises(ValueError, match=fragment) as info:
        call()
    assert "\n" not in str(info.value)


# --- sampler ------------------------------------------------------------------------------------------------------

def test_sampler_is_reproducible_and_seed_dependent():
    def draw(seed):
        sampler = LevelSampler(GeneratedTask(), "balanced", 100, seed=seed)
        return [(p.level, p.index) for t in range(20) for p in sampler.sample(t, 8)]

    assert draw(3) == draw(3)
    assert draw(3) != draw(4)


def test_generated_stream_counts_up_per_level_with_countdown():
    from e2h_min.tasks.countdown import CountdownTask

    task = CountdownTask(seed=1)
    sampler = LevelSampler(task, "gaussian", 50, seed=0, beta=0.5, sigma=0.5)
    problems = [p for t in range(0, 50, 5) for p in sampler.sample(t, 4)]
    for level in range(4):
        indices = [p.index for p in problems if p.level == level]
        assert indices == list(range(len(indices)))
    for p in problems[:5]:  # the sampler serves exactly the task's problem for (level, index)
        assert p == task.problem(p.level, p.index)
    assert sampler.counts == [sum(p.level == k for p in problems) for k in range(4)]
    assert len(problems[0].data["numbers"]) == problems[0].level + 2  # countdown level k has k+2 numbers


def test_empirical_frequencies_follow_p_t():
    sampler = LevelSampler(GeneratedTask(), "gaussian", 1600, seed=0, beta=0.5, sigma=0.5)
    for step in (0, 800):
        n = 40_000
        counts = Counter(p.level for p in sampler.sample(step, n))
        for k, p_k in enumerate(level_probs("gaussian", step, 1600, 4)):
            assert abs(counts[k] / n - p_k) < 4.5 * math.sqrt(p_k * (1 - p_k) / n) + 1e-9, (step, k)


def test_file_stream_visits_every_row_once_per_epoch_and_reshuffles():
    rows = [5, 0, 7, 3]
    sampler = LevelSampler(FileTask(rows), "balanced", 10, seed=2)
    served = {k: [] for k in range(4)}
    for t in range(30):
        for p in sampler.sample(t % 10, 6):
            served[p.level].append(p.index)
    assert served[1] == [] and sampler.counts[1] == 0  # an empty level is never drawn
    for level in (0, 2, 3):
        n = rows[level]
        epochs = [served[level][i:i + n] for i in range(0, len(served[level]) - n + 1, n)]
        assert len(epochs) >= 3
        assert all(sorted(e) == list(range(n)) for e in epochs)
        assert len({tuple(e) for e in epochs}) > 1  # a fresh order after wrap-around
    assert close(sampler.probs(0), [1 / 3, 0, 1 / 3, 1 / 3], tol=1e-12)  # renormalised over non-empty levels


def test_all_mass_on_empty_levels_raises():
    with pytest.raises(ValueError, match="no 'train' problems"):
        LevelSampler(FileTask([0, 0]), "balanced", 10)
    sampler = LevelSampler(FileTask([4, 0]), "classic", 10)
    sampler.sample(0, 3)
    with pytest.raises(ValueError, match="all mass"):
        sampler.sample(9, 3)  # classic's second phase is level 1, which is empty


@pytest.mark.parametrize("through_json", [False, True])
def test_resume_from_state_dict_equals_never_stopping(through_json):
    def make():
        return LevelSampler(FileTask([5, 3, 7, 2]), "cosine", 40, seed=11)

    unbroken = make()
    expected = [(p.level, p.index) for t in range(40) for p in unbroken.sample(t, 6)]

    first = make()
    got = [(p.level, p.index) for t in range(17) for p in first.sample(t, 6)]
    state = first.state_dict()
    if through_json:
        state = json.loads(json.dumps(state))
    first.sample(17, 6)  # drawing after saving must not change the saved state
    resumed = make()
    resumed.load_state_dict(state)
    got += [(p.level, p.index) for t in range(17, 40) for p in resumed.sample(t, 6)]
    assert got == expected
    assert resumed.state_dict() == json.loads(json.dumps(unbroken.state_dict()))
    assert sum(resumed.counts) == 40 * 6


def test_load_state_dict_refuses_other_data_or_seed():
    state = LevelSampler(FileTask([5, 3]), "balanced", 10, seed=1).state_dict()
    with pytest.raises(ValueError, match="rows"):
        LevelSampler(FileTask([5, 4]), "balanced", 10, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        LevelSampler(FileTask([5, 3]), "balanced", 10, seed=2).load_state_dict(state)


def test_sec_sampler_updates_values_and_resumes():
    sampler = LevelSampler(GeneratedTask(), "sec", 100, seed=0, temperature=0.1, ema=0.5)
    assert close(sampler.probs(0), [0.25] * 4, tol=1e-12)
    sampler.update({2: 0.8})
    sampler.update({2: 0.4, 0: 0.2})
    assert close(sampler.sec_values, [0.1, 0.0, 0.4, 0.0], tol=1e-12)  # Q <- Q/2 + r/2: 0.4, then 0.4
    assert close(sampler.probs(0), level_probs("sec", 0, 100, 4, values=[0.1, 0, 0.4, 0], temperature=0.1))
    counts = Counter(p.level for p in sampler.sample(0, 2000))
    assert counts.most_common(1)[0][0] == 2  # the level with the largest |advantage| is favoured
    resumed = LevelSampler(GeneratedTask(), "sec", 100, seed=0, temperature=0.1, ema=0.5)
    resumed.load_state_dict(json.loads(json.dumps(sampler.state_dict())))
    assert [(p.level, p.index) for p in resumed.sample(1, 50)] == [(p.level, p.index) for p in sampler.sample(1, 50)]
    with pytest.raises(ValueError, match="update takes"):
        sampler.update({4: 0.1})


def test_sampler_rejects_bad_schedule_at_construction():
    with pytest.raises(ValueError, match="sigma"):
        LevelSampler(GeneratedTask(), "gaussian", 100, sigma=-1.0)
    with pytest.raises(ValueError, match="ema"):
        LevelSampler(GeneratedTask(), "sec", 100, ema=0.0)
    with pytest.raises(ValueError, match="total_steps"):
        LevelSampler(GeneratedTask(), "cosine", 0)
    with pytest.raises(ValueError, match="remove beta"):
        LevelSampler(GeneratedTask(), "cosine", 100, beta=0.5)


def test_sampler_probs_are_the_schedule_checked_once_at_construction():
    sampler = LevelSampler(GeneratedTask(), "gaussian", 100, beta=0.3, sigma=0.7)
    for step in (0, 37, 99, 150):  # past the end: the final value
        assert sampler.probs(step) == level_probs("gaussian", step, 100, 4, beta=0.3, sigma=0.7)


# --- CLI ----------------------------------------------------------------------------------------------------------

def test_cli_table_and_expected_counts(capsys):
    assert main(["--schedule", "gaussian", "--beta", "0.5", "--sigma", "0.5", "--levels", "4", "--steps", "1600"]) == 0
    out = capsys.readouterr().out
    assert "0.628   0.172   0.100   0.100" in out  # t/T = 0 row
    assert out.strip().splitlines()[-1].split() == ["1628", "2997", "4595", "3580", "12800"]


def test_cli_all_lists_every_time_schedule(capsys):
    assert main(["--schedule", "all", "--steps", "1600", "--prompts-per-step", "8"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[1].split() == ["level", *TIME_SCHEDULES]
    assert lines[-2].split()[TIME_SCHEDULES.index("gaussian") + 1] == "3580"
    assert lines[-1].split() == ["total"] + ["12800"] * len(TIME_SCHEDULES)


@pytest.mark.parametrize("argv", [["--sigma", "0"], ["--steps", "x"], ["--schedule", "linear"], ["--levels", "0"],
                                  ["--min-prob", "0.5"], ["--bogus"]])
def test_cli_bad_flags_exit_2_with_one_line(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's own errors exit through our one-line `error`
        code = exit_.code
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    assert len(captured.err.strip().splitlines()) == 1 and "Traceback" not in captured.err


def test_cli_plot_without_matplotlib(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)  # makes `import matplotlib` raise
    assert main(["--plot", str(tmp_path / "p.png")]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip() == "--plot needs matplotlib: pip install matplotlib" and captured.out == ""
