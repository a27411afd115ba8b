"""scripts/e2h_sweep.py: every schedule gets the same train.py command but for --schedule/--seed, and the
prompts-per-level table."""

import json
import sys
from types import SimpleNamespace

from tests.scripts import load_script

sweep = load_script("e2h_sweep")


def args(**overrides):
    base = dict(model="tiny-testbed", task="countdown", threads=1, quick=False, quick_steps=40, long=False)
    return SimpleNamespace(**{**base, **overrides})


def test_schedules_differ_only_in_schedule_and_seed(tmp_path):
    commands = {s: sweep.run_args(s, 3, tmp_path, args(), ["--lr", "2e-4"]) for s in sweep.SCHEDULES}
    for schedule, cmd in commands.items():
        assert cmd[0] == sys.executable and cmd[cmd.index("--schedule") + 1] == schedule
        assert cmd[cmd.index("--out-dir") + 1] == str(tmp_path / f"{schedule}-s3")
        assert cmd[-5:-3] == ["--lr", "2e-4"]  # the user's flags reach every run
        normalised = [x.replace(schedule, "S") for x in cmd]
        assert normalised == [x.replace("hard", "S") for x in commands["hard"]]
    assert " ".join(sweep.TESTBED_SETTINGS) in " ".join(commands["hard"])
    # a hub model gets its own preset, not the CPU testbed's budget; --quick shortens every run the same way
    assert "--eval-problems" not in sweep.run_args("hard", 0, tmp_path, args(model="Qwen2.5-1.5B"), [])
    quick = sweep.run_args("hard", 0, tmp_path, args(quick=True), [])
    assert quick[quick.index("--total-steps", quick.index("--total-steps") + 1) + 1] == "40"  # the last one wins


def test_long_sweep_runs_the_paper_budget_with_pass_at_k(tmp_path):
    """--long: the settings every run resolves to (the last flag wins), the same for every schedule but its name."""
    from e2h_min.run.presets import resolve_config

    configs = {s: resolve_config(sweep.run_args(s, 1, tmp_path, args(long=True), [])[2:])[0]
               for s in sweep.LONG_SCHEDULES}
    for schedule, cfg in configs.items():
        assert (cfg.total_steps, cfg.eval_every, cfg.eval_problems, cfg.eval_pass_k, cfg.eval_samples) == (
            1600, 200, 200, (1, 4, 16), 16)
        assert cfg.eval_pass_k_levels == "L1,L2,L3" and cfg.chat_date == "2026-12-02"  # runs of any day compare
        assert cfg.schedule == schedule and cfg.seed == 1 and cfg.model == "tiny-testbed"
        others = {k: v for k, v in vars(cfg).items() if k not in ("schedule", "out_dir")}
        assert others == {k: v for k, v in vars(configs["balanced"]).items() if k not in ("schedule", "out_dir")}


def test_an_interrupted_run_resumes_from_its_checkpoint(tmp_path):
    (tmp_path / "gaussian-s0" / "checkpoints" / "step_000100").mkdir(parents=True)
    cmd = sweep.run_args("gaussian", 0, tmp_path, args(), [])
    assert cmd[-2:] == ["--resume", str(tmp_path / "gaussian-s0")] and "--overwrite" not in cmd


def test_a_run_killed_before_its_first_checkpoint_can_start_over(tmp_path, monkeypatch):
    """Its folder holds only what train.py wrote (the sweep's log sits beside it), so the --overwrite that restarts
    it is not refused for a file train.py did not write."""
    from e2h_min.run.runlog import foreign_files
    run = tmp_path / "cosine-s0"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"schedule": "cosine", "total_steps": 3}))
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    calls = []
    monkeypatch.setattr(sweep.subprocess, "call", lambda cmd, stdout, **kw: calls.append(cmd) or stdout.write("x") or 0)
    sweep.run_one("cosine", 0, tmp_path, args(), [])
    assert calls[0][-3:] == ["--out-dir", str(run), "--overwrite"]
    assert (tmp_path / "cosine-s0.log").read_text() == "x" and foreign_files(run) == []


def test_level_table_gives_expected_and_drawn_prompts(tmp_path):
    for schedule, seed, counts in (("balanced", 0, [4, 4, 4, 4]), ("balanced", 1, [2, 6, 4, 4]),
                                   ("sec", 0, [0, 16, 0, 0]), ("sec", 1, [8, 8, 0, 0])):
        run = tmp_path / f"{schedule}-s{seed}"
        run.mkdir()
        (run / "metrics.jsonl").write_text("".join(json.dumps({"step": t + 1, "level_counts": counts}) + "\n"
                                                   for t in range(10)))
    table = sweep.level_table(tmp_path, ["balanced", "sec"], [0, 1], 10, 16, 4).splitlines()
    assert table[2] == "| balanced | 40 | 40 | 40 | 40 | 30 | 50 | 40 | 40 |"  # 10 steps x 16 prompts / 4
    assert table[3] == "| sec | adaptive | adaptive | adaptive | adaptive | 40 | 120 | 0 | 0 |"
