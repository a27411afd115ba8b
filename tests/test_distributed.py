"""Data parallelism: torchrun with 2 gloo ranks on CPU gives the same steps as one process holding the whole batch.

One torchrun launch runs every check of tests/dist_worker.py (process start-up dominates); one in-process run
gives the single-process results. Updates are plain SGD steps (see the worker), so what is compared is the
gradient, not AdamW's normalisation of it.

Tolerances, from the measured margin: two ranks sum their gradients in a different order than one process
does, which moved the SGD weight changes by at most 1.2e-7 (one float32 ulp of weights of size ~1; the changes
themselves are ~3e-2) and the logged metrics by at most 1.3e-6 relative (PPO's value diagnostics); the checks
use 1e-5, 8x and more above that noise, far below a wrong gradient (a rank's samples counted twice or dropped
moves the changes by ~1e-2).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from e2h_min.engine.distributed import DistInfo
from e2h_min.engine.models import TINY_MODEL_DIR
from tests.dist_worker import LOOP_VARIANTS, UPDATE_LOSSES, run_all

ROOT = Path(__file__).resolve().parents[1]
TIMING_FIELDS = {"rollout_seconds", "update_seconds", "tokens_per_second"}
TOL = 1e-5

pytestmark = pytest.mark.skipif(not (TINY_MODEL_DIR / "model.safetensors").exists(), reason="tiny model missing")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, one_torch_thread):
    """(single-process results dir, 2-rank results dir)."""
    single, ranked = tmp_path_factory.mktemp("single"), tmp_path_factory.mktemp("ranked")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(ROOT / "tests" / "dist_worker.py"), str(ranked)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run_all(str(single), DistInfo())  # while the ranks run
    _, err = proc.communicate(timeout=400)
    assert proc.returncode == 0, err[-3000:]
    return single, ranked


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_close_fields(a: dict, b: dict, where: str):
    assert set(a) == set(b), f"{where}: fields differ: {set(a) ^ set(b)}"
    for key in set(a) - TIMING_FIELDS:
        x, y = (a[key], b[key]) if isinstance(a[key], list) else ([a[key]], [b[key]])
        assert y == pytest.approx(x, rel=TOL, abs=TOL), f"{where}: {key}"


@pytest.mark.parametrize("loss_type", UPDATE_LOSSES)
def test_update_with_a_rank_that_runs_no_sample_equals_one_process(runs, loss_type):
    """Rank 0's advantages are all exactly 0, so it runs nothing; its gradient and diagnostics must still meet
    rank 1's in every collective (a key set built from what a rank ran used to crash gloo here)."""
    a, b = (torch.load(d / "updates.pt", weights_only=False)[f"update/{loss_type}"] for d in runs)
    assert_close_fields(a["stats"], b["stats"], loss_type)
    assert a["stats"]["grad_norm"] > 0 and a["stats"]["update_sample_share"] == 0.5
    for p, q in zip(a["update"], b["update"]):
        assert torch.allclose(p, q, rtol=0, atol=TOL)


@pytest.mark.parametrize("variant", LOOP_VARIANTS)
def test_training_steps_on_two_ranks_equal_one_process(runs, variant):
    """Two steps of the real loop, rank 0's groups all with equal rewards: every logged field but the timings,
    the evaluations and the weight changes equal one process's."""
    a, b = (d / variant for d in runs)
    rows_a, rows_b = read_jsonl(a / "metrics.jsonl"), read_jsonl(b / "metrics.jsonl")
    assert [r["step"] for r in rows_a] == [r["step"] for r in rows_b] == [1, 2]
    for x, y in zip(rows_a, rows_b):
        assert_close_fields(x, y, f"{variant} step {x['step']}")
    assert 0 < rows_a[0]["frac_reward_zero_std"] < 1  # the fixture did produce equal-reward groups
    assert read_jsonl(a / "eval.jsonl") == read_jsonl(b / "eval.jsonl")
    start = load_file(TINY_MODEL_DIR / "model.safetensors")
    end_a, end_b = load_file(a / "final" / "model.safetensors"), load_file(b / "final" / "model.safetensors")
    assert max(float((end_a[k] - start[k]).abs().max()) for k in start) > 100 * TOL  # the steps moved weights
    for k in start:
        assert torch.allclose(end_a[k] - start[k], end_b[k] - start[k], rtol=0, atol=TOL), k


def test_dynamic_sampling_redraws_shard_unevenly_and_still_fill_the_step(runs):
    """The fixture's redraws leave 1 prompt for 2 ranks (one rank rolls out nothing that round)."""
    rows = read_jsonl(runs[1] / "dynamic_sampling" / "metrics.jsonl")
    assert [r["resample_rounds"] for r in rows] == [3, 3]
    assert all(sum(r["level_counts"]) == 4 for r in rows)


def test_sharded_evaluation_equals_one_process(runs):
    """Each rank decodes half of the held-out problems; the gathered records and per-level figures are one
    process's (the tiny model solves some of these, so the accuracies are not trivially 0)."""
    a, b = (torch.load(d / "updates.pt", weights_only=False)["eval"] for d in runs)
    assert len(a["records"]) == 20 and a["records"] == b["records"]
    assert a["summary"] == b["summary"]
    assert any(level["accuracy"] > 0 for level in a["summary"].values())


def test_fsdp_run_killed_after_a_checkpoint_resumes_to_the_same_metrics_and_weights(runs):
    """FSDP2 on 2 ranks with AdamW: its sharded optimizer state goes through the checkpoint and back."""
    ranked = runs[1]
    full, resumed = ranked / "resume_full", ranked / "resume_broken"
    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in rows]  # noqa: E731
    assert (resumed / "stopped").exists()  # the second run did stop after step 1
    assert strip(read_jsonl(resumed / "metrics.jsonl")) == strip(read_jsonl(full / "metrics.jsonl"))
    a, b = load_file(full / "final" / "model.safetensors"), load_file(resumed / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_fsdp_saves_one_model_transformers_loads_and_holds_half_the_training_state_per_rank(runs):
    from transformers import AutoModelForCausalLM

    final = runs[1] / "fsdp" / "final"
    assert [p.name for p in final.glob("*.safetensors")] == ["model.safetensors"]
    model = AutoModelForCausalLM.from_pretrained(final)
    n_params = sum(p.numel() for p in model.parameters())
    figures = json.loads((runs[1] / "fsdp_memory.json").read_text())
    print(f"fsdp memory: {figures['rank_bytes']} bytes per rank vs {figures['one_process_bytes']} in one process")
    assert figures["one_process_bytes"] == 16 * n_params  # fp32 weights + gradients + AdamW's 2 moments
    assert 0.45 < figures["rank_bytes"] / figures["one_process_bytes"] < 0.55


@pytest.mark.parametrize("argv, fragment", [
    (["--parallel", "zero3"], "--parallel must be ddp or fsdp"),
    (["--parallel", "fsdp", "--lora-r", "8"], "--parallel fsdp shards full fine-tuning"),
    (["--parallel", "fsdp", "--advantage", "ppo"], "--parallel fsdp does not support --advantage ppo"),
])
def test_bad_parallel_settings_give_one_line_and_exit_code_2(argv, fragment, capsys, tmp_path):
    import train

    with pytest.raises(SystemExit) as exc:
        train.main(argv + ["--out-dir", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and fragment in err and len(err.splitlines()) == 1
