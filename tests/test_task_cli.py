"""`train.py --task NAME` end to end on the tiny model for every task, and one-line errors for bad data files."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

import train
from e2h_min.engine.models import TINY_MODEL_DIR
from e2h_min.tasks import make_task

FIXTURES = Path(__file__).parent / "fixtures"
requires_tiny = pytest.mark.skipif(not (TINY_MODEL_DIR / "model.safetensors").exists(),
                                   reason="embedded tiny model not built (python scripts/build_tiny_model.py)")
TINY_ARGS = ["--total-steps", "1", "--prompts-per-step", "2", "--num-generations", "2", "--max-new-tokens", "16",
             "--eval-problems", "1", "--eval-every", "0", "--save-every", "0", "--threads", "1"]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def restore_threads():
    """train.main sets the process-wide torch thread count (--threads 1); put it back for the other tests."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def long_context_tiny(path: Path, context: int) -> Path:
    """A copy of the tiny model whose config declares a longer context (RoPE positions are computed, not looked
    up, so the weights run unchanged at any length; only the declared limit differs)."""
    shutil.copytree(TINY_MODEL_DIR, path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "max_position_embeddings": context}))
    return path


@requires_tiny
@pytest.mark.parametrize("task_name, data", [
    ("blocksworld", None),
    ("countdown", None),
    ("gsm8k", "gsm8k.jsonl"),
    ("math", "math.jsonl"),
    ("aqua", "aqua.jsonl"),
])
def test_train_runs_one_step_on_every_task(task_name, data, tmp_path, restore_threads):
    data_args = ["--data", str(FIXTURES / data)] if data else []
    if task_name == "blocksworld":  # its ~1,100-token prompts need more than the tiny model's 512-token context
        data_args += ["--model", str(long_context_tiny(tmp_path / "tiny-2048", 2048))]
    result = train.main(["--task", task_name, *data_args, *TINY_ARGS, "--out-dir", str(tmp_path / "run")])
    tmp_path = tmp_path / "run"

    task = make_task(task_name, data=str(FIXTURES / data) if data else None)
    (row,) = read_jsonl(tmp_path / "metrics.jsonl")
    assert row["step"] == 1 and len(row["level_counts"]) == task.num_levels and sum(row["level_counts"]) == 2
    assert math.isfinite(row["loss"]) and math.isfinite(row["reward_mean"]) and 0.0 <= row["accuracy"] <= 1.0
    assert [e["step"] for e in read_jsonl(tmp_path / "eval.jsonl")] == [0, 1]
    # The held-out evaluation covers exactly the levels that have test rows. The file fixtures have few: the 5%
    # hash split leaves GSM8K and MATH with none at all (their eval is empty) and AQuA with one, at level 2.
    names = task.level_names()
    with_test_rows = {names[k] for k in task.eval_levels if task.num_problems(k, "test") != 0}
    assert set(result["last_eval"]) == with_test_rows
    assert all(summary["n"] == 1 for summary in result["last_eval"].values())
    assert (tmp_path / "final" / "model.safetensors").exists()


def test_fixture_test_splits_are_as_documented():
    """Pins the split facts the test above relies on (no model needed)."""
    def test_rows(name):
        task = make_task(name, data=str(FIXTURES / f"{name}.jsonl"))
        return [task.num_problems(k, "test") for k in task.eval_levels]
    assert test_rows("gsm8k") == [0, 0, 0, 0]
    assert test_rows("math") == [0, 0, 0, 0, 0]
    assert test_rows("aqua") == [0, 0, 1, 0]


@pytest.mark.parametrize("task_name, data, fragments", [
    ("gsm8k", "no_such_file.jsonl", ["no_such_file.jsonl: no such file", "question (str), answer"]),
    ("gsm8k", str(FIXTURES / "malformed.jsonl"), ["malformed.jsonl:3: not valid JSON", "question (str), answer"]),
    ("math", str(FIXTURES / "aqua.jsonl"),
     ["aqua.jsonl:1: missing column 'answer' or 'solution'", "problem (str), solution"]),
    ("aqua", str(FIXTURES / "gsm8k.jsonl"), ["gsm8k.jsonl:1: missing column 'options'", "options (list of str"]),
])
def test_bad_data_file_gives_one_line_naming_the_file_and_exit_code_2(task_name, data, fragments, tmp_path,
                                                                      capsys):
    data = data if "/" in data else str(tmp_path / data)
    with pytest.raises(SystemExit) as exc:
        train.main(["--task", task_name, "--data", data, "--out-dir", str(tmp_path / "run")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert all(fragment in err for fragment in fragments), err
    assert not (tmp_path / "run").exists()  # nothing is written before the data is known to be good
