"""Data parallelism: torchrun with 2 gloo ranks on CPU gives the same update as one process."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from e2h_min.distributed import DistInfo
from tests.dist_update_worker import run

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_two_rank_update_equals_single_process(tmp_path, loss_type):
    single = tmp_path / "single.pt"
    run(str(single), loss_type, DistInfo())
    ranked = tmp_path / "ranked.pt"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(ROOT / "tests" / "dist_update_worker.py"), str(ranked), loss_type],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    a, b = torch.load(single), torch.load(ranked)
    for p, q in zip(a["params"], b["params"]):
        assert torch.allclose(p, q, atol=1e-5)
    for key in ("loss", "kl", "entropy", "grad_norm", "clip_ratio"):
        assert a["stats"][key] == pytest.approx(b["stats"][key], rel=1e-5, abs=1e-6), key
    assert a["stats"]["grad_norm"] > 0
