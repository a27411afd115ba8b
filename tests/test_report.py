"""e2h_min.analysis.report on synthetic run directories (no model needed): series helpers, the table, the PNGs, errors."""

import json
import math

import numpy as np
import pytest

from e2h_min.analysis import report
from tests.optional import needs

LEVELS = ["L0", "L1", "L2", "L3", "OOD"]


def write_run(path, schedule="gaussian", seed=0, steps=30, final_acc=(0.9, 0.7, 0.5, 0.3, 0.1), beta=0.0,
              pass16=None):
    """A run directory shaped like train.py's output: config.json, metrics.jsonl, eval.jsonl."""
    path.mkdir(parents=True)
    config = {"model": "tiny", "task": "countdown", "schedule": schedule, "seed": seed, "total_steps": steps,
              "schedule_beta": 0.5, "sigma": 0.5, "beta": beta, "out_dir": str(path), "eval_problems": 10}
    (path / "config.json").write_text(json.dumps(config))
    rng = np.random.default_rng(seed)
    with open(path / "metrics.jsonl", "w") as handle:
        for t in range(steps):
            x = t / steps
            probs = np.array([1 - x, x, x * x, x ** 3]) + 0.1
            probs = probs / probs.sum()
            counts = np.bincount(rng.choice(4, size=8, p=probs), minlength=4)
            row = {"step": t + 1, "reward_mean": 0.2 + 0.5 * x, "completion_length_mean": 30 - 10 * x,
                   "entropy": 1.5 - x, "frac_reward_zero_std": 0.25 + 0.5 * x, "level_probs": probs.round(6).tolist(), "level_counts": counts.tolist()}
            if beta > 0:
                row["kl"] = 0.01 * x
            for k in np.flatnonzero(counts):  # like train.py: only levels drawn this step
                row[f"accuracy/L{k}"] = float(rng.uniform(0, 1))
            handle.write(json.dumps(row) + "\n")
    with open(path / "eval.jsonl", "w") as handle:
        for step, scale in ((0, 0.5), (steps // 2, 0.8), (steps, 1.0)):
            row = {"step": step}
            for name, acc in zip(LEVELS, final_acc):
                row.update({f"{name}/accuracy": acc * scale, f"{name}/reward": 0.1 + 0.9 * acc * scale,
                            f"{name}/format_rate": 1.0})
            for name, value in zip(["L1", "L2", "L3"], pass16 or []):  # train.py --eval-pass-k on three levels
                row.update({f"{name}/pass@16": value * scale, f"{name}/pass@1": value * scale / 4})
            handle.write(json.dumps(row) + "\n")
    return path


def test_moving_average_matches_a_naive_loop_and_skips_missing_steps():
    values = np.array([1.0, math.nan, 3.0, 5.0, math.nan, math.nan, math.nan, 2.0])
    for window in (1, 2, 3, 10):
        got = report.moving_average(values, window)
        for i in range(len(values)):
            recent = [v for v in values[max(0, i + 1 - window):i + 1] if not math.isnan(v)]
            expected = sum(recent) / len(recent) if recent else math.nan
            assert got[i] == pytest.approx(expected, nan_ok=True)
    assert report.moving_average(values, 2).tolist()[:4] == [1.0, 1.0, 3.0, 4.0]


def test_series_drawn_shares_and_level_names():
    rows = [{"step": 1, "a": 2.0, "level_counts": [3, 1]}, {"step": 2, "level_counts": [0, 0]}]
    steps, values = report.series(rows, "a")
    assert steps.tolist() == [1, 2] and values[0] == 2.0 and math.isnan(values[1])
    assert report.drawn_shares(rows).tolist() == [[0.75, 0.25], [0.0, 0.0]]
    assert report.eval_level_names([{"step": 0, "L0/accuracy": 1, "L0/reward": 1, "OOD/accuracy": 0}]) == ["L0", "OOD"]


def test_mean_std_is_the_sample_standard_deviation():
    assert report.mean_std([1.0, 3.0]) == pytest.approx((2.0, math.sqrt(2.0)))
    assert report.mean_std([0.4]) == (0.4, 0.0)


def test_table_has_one_row_per_run_and_mean_std_over_seed_replicates(tmp_path):
    runs = [report.load_run(write_run(tmp_path / "g0", seed=0, final_acc=(0.9, 0.7, 0.5, 0.4, 0.2))),
            report.load_run(write_run(tmp_path / "b0", schedule="balanced", seed=0)),
            report.load_run(write_run(tmp_path / "g1", seed=1, final_acc=(0.8, 0.7, 0.6, 0.5, 0.1)))]
    report.label_runs(runs)
    lines = report.accuracy_table(runs).splitlines()
    assert lines[0] == "| run | step | L0 | L1 | L2 | L3 | OOD |"
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ")[1:] for line in lines[2:]}
    assert rows["gaussian(β=0.5,σ=0.5) s0"] == ["30", "90.0", "70.0", "50.0", "40.0", "20.0 |"]
    assert rows["balanced s0"] == ["30", "90.0", "70.0", "50.0", "30.0", "10.0 |"]
    mean_row = rows["**gaussian(β=0.5,σ=0.5)** mean ± std (2 seeds)"]
    # L3: seeds 40 and 50 -> mean 45.0, sample std 7.07
    assert mean_row[4] == "45.0 ± 7.1" and mean_row[1] == "85.0 ± 7.1" and mean_row[2] == "70.0 ± 0.0"
    assert not any("balanced" in key and "mean" in key for key in rows)  # a single seed has no mean row
    # replicates are listed together, their mean row right after them
    assert [key.split(" ")[0] for key in rows][:3] == ["gaussian(β=0.5,σ=0.5)"] * 2 + ["**gaussian(β=0.5,σ=0.5)**"]


def test_runs_that_differ_in_more_than_the_seed_are_not_averaged(tmp_path):
    a = write_run(tmp_path / "a", seed=0)
    b = write_run(tmp_path / "b", seed=1)
    config = json.loads((b / "config.json").read_text())
    (b / "config.json").write_text(json.dumps({**config, "sigma": 0.25}))
    runs = [report.load_run(a), report.load_run(b)]
    report.label_runs(runs)
    assert "mean ± std" not in report.accuracy_table(runs)


def test_main_writes_the_table_without_plots(tmp_path, capsys):
    runs = [write_run(tmp_path / "g0"), write_run(tmp_path / "g1", seed=1)]
    result = report.main([str(r) for r in runs] + ["--no-plots", "--out", str(tmp_path / "out")])
    table = (tmp_path / "out" / "table.md").read_text()
    assert table == result["table"] and "mean ± std (2 seeds)" in table
    assert table in capsys.readouterr().out
    assert not list((tmp_path / "out").glob("*.png"))


@pytest.mark.parametrize("existing, fragment", [
    ({"table.md": "MY NOTES"}, "holds table.md, which the report did not write"),
    ({"accuracy.png": "mine"}, "holds accuracy.png, which the report did not write"),
    ({"config.json": "{}"}, "holds a run or a model"),
])
def test_an_out_folder_holding_what_the_report_did_not_write_is_left_alone(tmp_path, capsys, existing, fragment):
    run, out = write_run(tmp_path / "g0"), tmp_path / "out"
    out.mkdir()
    for name, text in existing.items():
        (out / name).write_text(text)
    with pytest.raises(SystemExit) as exc:
        report.main([str(run), "--no-plots", "--out", str(out)])
    assert exc.value.code == 2 and fragment in capsys.readouterr().err
    assert {p.name: p.read_text() for p in out.iterdir()} == existing


def test_the_report_rewrites_its_own_output(tmp_path):
    run, out = write_run(tmp_path / "g0"), tmp_path / "out"
    first = report.main([str(run), "--no-plots", "--out", str(out)])
    assert report.main([str(run), "--no-plots", "--out", str(out)])["table"] == first["table"]


def test_a_torn_last_line_is_dropped(tmp_path):
    run = write_run(tmp_path / "r")
    with open(run / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 31, "rew')
    assert len(report.load_run(run).metrics) == 30


@needs("matplotlib")
def test_main_writes_pngs_for_one_run_and_for_several(tmp_path):
    one = write_run(tmp_path / "g0", beta=0.01)
    report.main([str(one), "--smooth", "3"])
    for name in ("accuracy.png", "training.png", "curriculum.png", "table.md"):
        assert (one / "report" / name).stat().st_size > 1000 or name == "table.md"
    several = [one, write_run(tmp_path / "b0", schedule="balanced"), write_run(tmp_path / "g1", seed=1)]
    result = report.main([str(r) for r in several] + ["--out", str(tmp_path / "cmp")])
    pngs = sorted(p.name for p in (tmp_path / "cmp").glob("*.png"))
    assert pngs == ["accuracy.png", "curriculum.png", "training.png"]
    for png in pngs:
        assert (tmp_path / "cmp" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(result["files"]) == 4


@pytest.mark.parametrize("make_args, fragment", [
    (lambda tmp: [str(tmp / "missing")], "no such run directory"),
    (lambda tmp: [str(tmp)], "no config.json"),
    (lambda tmp: [str(write_run(tmp / "r")), "--smooth", "-1"], "--smooth must be in [0, 10,000,000], got -1"),
    (lambda tmp: [], "arguments are required: RUN_DIR"),
    (lambda tmp: [str(write_run(tmp / "r")), "--baseline", "bogus"], "--baseline bogus: no run given has that"),
])
def test_bad_input_gives_one_line_and_exit_code_2(make_args, fragment, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        report.main(make_args(tmp_path) + ["--no-plots"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and fragment in err and err.count("\n") == 1


def test_without_matplotlib_it_writes_the_table_and_says_the_plots_need_it(tmp_path, capsys, monkeypatch):
    """The README's install (requirements.txt alone) has no matplotlib: the report is the table, exit 0."""
    monkeypatch.setattr(report, "matplotlib_available", lambda: False)
    result = report.main([str(write_run(tmp_path / "r"))])
    err = capsys.readouterr().err
    assert "plots need matplotlib" in err and "requirements-optional.txt" in err and err.count("\n") == 1
    assert result["files"] == [str(tmp_path / "r" / "report" / "table.md")]
    assert (tmp_path / "r" / "report" / "table.md").read_text() == result["table"]


def test_interval_table_gives_bootstrap_intervals_and_paired_differences(tmp_path):
    accs = {"balanced": [(0.9, 0.5, 0.10, 0.0, 0.0), (0.8, 0.4, 0.20, 0.0, 0.0), (0.85, 0.6, 0.15, 0.01, 0.0)],
            "cosine": [(0.9, 0.6, 0.15, 0.0, 0.0), (0.8, 0.5, 0.30, 0.02, 0.0), (0.85, 0.6, 0.20, 0.01, 0.0)]}
    runs = [report.load_run(write_run(tmp_path / f"{s}{seed}", schedule=s, seed=seed, final_acc=acc))
            for s, per_seed in accs.items() for seed, acc in enumerate(per_seed)]
    table = report.interval_table(runs)
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ")[1:] for line in table.splitlines()
            if line.startswith("| ") and not line.startswith("| schedule")}
    # three seeds: the 95% interval of the mean is the seeds' range (stats module doc)
    assert rows["balanced"][:4] == ["3", "30", "85.0 [80.0, 90.0]", "50.0 [40.0, 60.0]"]
    assert rows["balanced"][-1] == "49% |"  # zero-std share: mean over steps of 0.25 + 0.5 t/30, t = 0..29
    assert rows["(step 0)"][2] == "42.5"  # the eval at step 0 scales final_acc by 0.5: mean of 85% * 0.5
    # paired by seed: cosine - balanced on L2 is +5, +10, +5 points -> mean +6.7 in [+5.0, +10.0]
    assert rows["cosine"][0] == "3" and rows["cosine"][3] == "+6.7 [+5.0, +10.0]"
    assert rows["cosine"][1] == "+0.0 [+0.0, +0.0]"  # L0 equal on every seed


def test_interval_table_refuses_arms_that_differ_in_another_setting(tmp_path):
    runs = [write_run(tmp_path / "b0", schedule="balanced"), write_run(tmp_path / "b1", schedule="balanced", seed=1),
            write_run(tmp_path / "c0", schedule="cosine")]
    config = json.loads((runs[2] / "config.json").read_text())
    (runs[2] / "config.json").write_text(json.dumps({**config, "total_steps": 99}))
    table = report.interval_table([report.load_run(r) for r in runs])
    assert "differ in total_steps" in table and "[" not in table


def test_pass_at_k_tables_and_curves_per_schedule(tmp_path):
    pass16 = {"balanced": [(0.8, 0.5, 0.2), (0.6, 0.3, 0.1)], "sec": [(0.9, 0.6, 0.4), (0.7, 0.4, 0.2)]}
    runs = [report.load_run(write_run(tmp_path / f"{s}{seed}", schedule=s, seed=seed, pass16=p))
            for s, per_seed in pass16.items() for seed, p in enumerate(per_seed)]
    assert report.pass_at_k_metrics([row for r in runs for row in r.evals]) == ["pass@1", "pass@16"]
    table = report.interval_table(runs, metric="pass@16")
    assert "Final pass@16 (temperature 1)" in table and "| schedule | seeds | step | L1 | L2 | L3 |" in table
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ")[1:] for line in table.splitlines()
            if line.startswith("| ") and not line.startswith("| schedule")}
    assert rows["(step 0)"][2] == "37.5"  # step 0 halves the final values: L1 (80 + 60 + 90 + 70) / 4 / 2
    assert rows["sec"][0] == "2" and rows["sec"][2] == "+10.0 [+10.0, +10.0]"  # L2: +10 on both seeds
    # curves: per arm, mean and band over the seeds at every evaluated step, as a naive loop computes them
    curves = report.arm_curves(runs, "L3/pass@16")
    for arm, members in (("balanced", runs[:2]), ("sec", runs[2:])):
        steps, mean, low, high = curves[arm]
        naive = [[row["L3/pass@16"] for row in r.evals] for r in members]
        assert steps.tolist() == [0, 15, 30]
        assert mean.tolist() == pytest.approx([sum(c) / 2 for c in zip(*naive)])
        assert low.tolist() == [min(c) for c in zip(*naive)] and high.tolist() == [max(c) for c in zip(*naive)]
    out = report.main([str(r.path) for r in runs] + ["--out", str(tmp_path / "rep"), "--no-plots"])
    assert "Final pass@1 " in out["table"] and "Final pass@16 " in out["table"]


@needs("matplotlib")
def test_pass_at_k_curves_are_plotted(tmp_path):
    runs = [write_run(tmp_path / f"{s}0", schedule=s, pass16=(0.8, 0.5, 0.2)) for s in ("balanced", "sec")]
    out = report.main([str(r) for r in runs] + ["--out", str(tmp_path / "rep")])
    png = tmp_path / "rep" / "pass_at_k.png"
    assert str(png) in out["files"] and png.stat().st_size > 0


def test_training_plot_leaves_out_what_no_run_logged(tmp_path):
    no_kl = report.load_run(write_run(tmp_path / "a", beta=0.0))
    with_kl = report.load_run(write_run(tmp_path / "b", beta=0.01))
    assert [p[0] for p in report.training_panels([no_kl])] == ["reward_mean", "completion_length_mean", "entropy"]
    assert "kl" in [p[0] for p in report.training_panels([no_kl, with_kl])]
    assert all(unit for _, _, unit in report.TRAINING_PANELS)  # every panel's y axis is labelled
