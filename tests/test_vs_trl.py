"""bench/vs_trl.py without trl installed: one line naming the missing package and the fix, exit code 2."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(importlib.util.find_spec("trl") is not None, reason="trl is installed: the script would run")
def test_missing_trl_is_one_line_exit_2():
    run = subprocess.run([sys.executable, "bench/vs_trl.py"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "trl is not installed" in lines[0] and "pip install" in lines[0]


def test_our_worker_steps_when_told_and_reports_each_step(tmp_path):
    """The worker's hooks into train.py (its rollout and its step logging) still exist: two steps, then stop."""
    run = subprocess.run([sys.executable, "bench/vs_trl.py", "--worker", "ours", "--settings", "demo",
                          "--work", str(tmp_path)], cwd=ROOT, input="go\ngo\nstop\n", capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    reports = [json.loads(line[3:]) for line in run.stdout.splitlines() if line.startswith("@@ ")]
    assert [r["kind"] for r in reports] == ["ready", "step", "step"]
    assert all(r["seconds"] > 0 and r["mean_length"] > 0 and len(r["prompts"]) == 10 for r in reports[1:])
    assert reports[1]["prompts"] != reports[2]["prompts"]  # each step reports its own draw
