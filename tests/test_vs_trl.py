"""bench/vs_trl.py without trl installed: one line naming the missing package and the fix, exit code 2."""

import importlib.util
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
