"""Inputs checked before the work (issue 25, item 4 and 7): booleans are not levels, prompts that do not fit the
model's context are skipped (data rows) or refused (generated tasks), damaged logs and reports get one line and
never cost a finished evaluation, and a hub id on an offline machine fails at once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import eval as evaluate_cli
import train
from e2h_min.analysis import report
from e2h_min.engine import models
from e2h_min.errors import UserError
from e2h_min.engine.models import TINY_MODEL_DIR, load_tokenizer
from e2h_min.run.prompt_fit import fit_prompts, prompt_lengths
from e2h_min.tasks import TaskDataError, make_task
from tests.test_report import write_run

FIXTURES = Path(__file__).parent / "fixtures"
requires_tiny = pytest.mark.skipif(not (TINY_MODEL_DIR / "model.safetensors").exists(),
                                   reason="embedded tiny model not built (python scripts/build_tiny_model.py)")
TINY_RUN = ["--total-steps", "1", "--prompts-per-step", "2", "--num-generations", "2", "--max-new-tokens", "16",
            "--eval-problems", "1", "--eval-every", "0", "--save-every", "0", "--log-completions-every", "0",
            "--threads", "1"]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def fails_with_one_line(capsys, fn, *args) -> str:
    """Run an entry point that must stop with one stderr line and exit code 2; return that line."""
    with pytest.raises(SystemExit) as exc:
        fn(*args)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    return err


# ----------------------------------------------------------------------------- booleans are not levels
@pytest.mark.parametrize("task_name, row", [
    ("gsm8k", {"question": "What is 2 + 2?", "answer": "#### 4", "level": True}),
    ("gsm8k", {"question": "What is 2 + 2?", "answer": "#### 4", "level": False}),
    ("aqua", {"question": "2 + 2?", "options": ["A)3", "B)4"], "correct": "B", "level": True}),
    ("math", {"problem": "2 + 2?", "answer": "4", "level": True}),
])
def test_a_boolean_level_is_refused_naming_the_row(task_name, row, tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [{**row, "level": 1}, row])
    with pytest.raises(TaskDataError, match=r"data\.jsonl:2: column 'level' must be an integer .*got the boolean"):
        make_task(task_name, data=str(path))


def test_integer_levels_still_load(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [{"question": f"What is {k} + 2?", "answer": f"#### {k + 2}",
                                                  "level": k, "split": "train"} for k in range(4)])
    task = make_task("gsm8k", data=str(path))
    assert [task.num_problems(k) for k in range(4)] == [1, 1, 1, 1]


# ----------------------------------------------------------------------------- prompts that fit the context
@requires_tiny
def test_data_rows_too_long_for_the_context_are_skipped_with_a_count(tmp_path):
    rows = [{"question": f"What is {k} + 2?", "answer": f"#### {k + 2}", "split": split}
            for k in range(6) for split in ("train", "test")]
    rows.insert(3, {"question": "How many words? " + "word " * 2000, "answer": "#### 2000", "split": "train"})
    rows.insert(7, {"question": "And here? " + "word " * 600, "answer": "#### 400", "split": "test"})
    task = make_task("gsm8k", data=str(write_jsonl(tmp_path / "long.jsonl", rows)))
    tokenizer = load_tokenizer("tiny")
    before_train = [task.problem(0, i).user_prompt for i in range(task.num_problems(0))]
    lines = []
    fit_prompts(task, tokenizer, 512, 64, 64, "2026-12-02", lines.append)
    assert len(lines) == 1 and "skipped 2 row(s)" in lines[0] and "context of 512 tokens" in lines[0]
    assert task.num_problems(0, "train") == 6 and task.num_problems(0, "test") == 6
    kept = [task.problem(0, i).user_prompt for i in range(6)]
    assert kept == [p for p in before_train if "word word" not in p]  # file order kept, only the long row gone
    lengths = prompt_lengths(tokenizer, task, [task.problem(0, i, s) for s in ("train", "test") for i in range(6)])
    assert max(lengths) + 64 <= 512


@requires_tiny
def test_the_test_split_is_fitted_to_the_evaluation_budget_and_the_train_split_to_the_rollouts(tmp_path):
    rows = [{"question": "Count: " + "word " * n, "answer": "#### 1", "split": split}
            for n in (10, 150) for split in ("train", "test")]
    task = make_task("gsm8k", data=str(write_jsonl(tmp_path / "d.jsonl", rows)))
    tokenizer = load_tokenizer("tiny")
    long_prompt = max(prompt_lengths(tokenizer, task, [task.problem(0, i) for i in range(2)]))
    fit_prompts(task, tokenizer, long_prompt + 20, 20, 21, None, lambda line: None)  # test budget 1 token more
    assert (task.num_problems(0, "train"), task.num_problems(0, "test")) == (2, 1)
    with pytest.raises(UserError, match="no training row's prompt fits"):
        fit_prompts(task, tokenizer, 30, 20, 20, None, lambda line: None)


@requires_tiny
def test_blocksworld_on_the_tiny_model_is_refused_before_the_model_loads(tmp_path, capsys, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the prompt check")
    monkeypatch.setattr("e2h_min.run.setup.load_model", no_model)
    err = fails_with_one_line(capsys, train.main, ["--task", "blocksworld", *TINY_RUN, "--out-dir",
                                                   str(tmp_path / "run")])
    assert "task blocksworld: its prompts take up to 1," in err and "context is 512 tokens" in err
    assert "pass a --model with a longer context" in err
    assert not (tmp_path / "run").exists()


@requires_tiny
def test_a_generated_task_whose_prompts_fit_only_a_smaller_budget_names_it(tmp_path, capsys):
    tokenizer = load_tokenizer("tiny")
    task = make_task("countdown")
    longest = max(prompt_lengths(tokenizer, task, [task.problem(k, i) for k in range(4) for i in range(32)]))
    with pytest.raises(UserError, match=f"lower --max-new-tokens to {100 - longest} or less"):
        fit_prompts(task, tokenizer, 100, 100 - longest + 1, 16)
    fit_prompts(task, tokenizer, 100 + 10, 16, 16)  # countdown's OOD prompts are longer: still fits with room


# ----------------------------------------------------------------------------- the report on damaged input
@pytest.mark.parametrize("lines", [
    ['{"reward_mean": 0.5}', '{"reward_mean": 0.6}'],  # no "step"
    ["[1, 2, 3]", "[4]"],  # not objects
    ['{"step": "1"}'],  # a step that is not an integer
])
def test_a_metrics_log_with_no_step_rows_is_refused_not_dropped(lines, tmp_path, capsys):
    run = write_run(tmp_path / "r")
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    err = fails_with_one_line(capsys, report.main, [str(run), "--no-plots"])
    assert "metrics.jsonl: none of its" in err and '"step"' in err


def test_a_torn_last_line_is_skipped_with_a_count(tmp_path, capsys):
    run = write_run(tmp_path / "r")
    with open(run / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 31, "rew')
    report.main([str(run), "--no-plots"])
    assert "skipped 1 torn line(s)" in capsys.readouterr().err


@pytest.mark.parametrize("content", [
    "[" * 100_000 + "]" * 100_000,  # nested beyond the parser's recursion limit
    json.dumps({"greedy": {"L0": {"accuracy": "high"}}}),
    json.dumps({"greedy": {"L0": [0.5]}}),
    json.dumps({"greedy": {"L0": {"accuracy": 0.5}}, "pass_at_k": {"by_level": {"L0": {"pass@x": 1}}}}),
    json.dumps({"greedy": {"L0": {"accuracy": 0.5}}, "pass_at_k": {"by_level": {"L0": {"pass@2": "1"}}}}),
    json.dumps({"greedy": {"L0": {"accuracy": 0.5}}, "pass_at_k": {"by_level": [1]}}),
    json.dumps({"greedy": {"L0": {"accuracy": 0.5}}, "step": {"a": 1}}),
    json.dumps([1, 2, 3]),
])
def test_a_damaged_eval_report_is_skipped_with_one_line(content, tmp_path, capsys):
    run = write_run(tmp_path / "r")
    (run / "eval" / "final").mkdir(parents=True)
    (run / "eval" / "final" / "report.json").write_text(content)
    (run / "eval" / "step_000010").mkdir()
    (run / "eval" / "step_000010" / "report.json").write_text(json.dumps(
        {"step": 10, "task": "countdown", "n": 5, "greedy": {"L0": {"accuracy": 0.25}}, "pass_at_k": None}))
    table = report.main([str(run), "--no-plots"])["table"]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "skipped" in err and "eval/final/report.json" in err
    assert "| step_000010 | 10 | countdown | 5 | greedy accuracy | 25.0 |" in table


# ----------------------------------------------------------------------------- eval.py and the run's own log
def test_run_eval_line_skips_lines_that_are_not_step_rows(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"schedule": "cosine", "total_steps": 4}))
    (run / "eval.jsonl").write_text("[1, 2, 3]\n" + "[" * 100_000 + "\n" + json.dumps({"step": 4, "L0/accuracy": 0.5})
                                    + "\n" + '{"step": 4.5}\n')
    assert evaluate_cli.run_eval_line(str(run / "final"), {"total_steps": 4}, 4) == {"step": 4, "L0/accuracy": 0.5}
    assert "skipped 3 line(s)" in capsys.readouterr().err


@requires_tiny
def test_eval_on_a_run_with_a_damaged_log_keeps_its_results(tmp_path, capsys):
    run = tmp_path / "run"
    train.main([*TINY_RUN, "--out-dir", str(run)])
    with open(run / "eval.jsonl", "a") as handle:
        handle.write("[1, 2, 3]\n" + "[" * 100_000 + "]" * 100_000 + "\n")
    capsys.readouterr()
    result = evaluate_cli.main(["--model", str(run), "--n", "1", "--quiet", "--threads", "1"])
    err = capsys.readouterr().err
    saved = json.loads((run / "eval" / "final" / "report.json").read_text())
    assert saved["greedy"] == result["greedy"] and saved["run_eval"]["step"] == 1
    assert "skipped 2 line(s)" in err and "Traceback" not in err


# ----------------------------------------------------------------------------- an offline hub fails fast
def test_an_unreachable_hub_fails_at_once_and_names_hf_hub_offline(monkeypatch):
    """No network (the connect fails): the one-line error comes without the hub client's retries."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    def no_network(*args, **kwargs):
        raise OSError(101, "Network is unreachable")
    monkeypatch.setattr(models.socket, "create_connection", no_network)
    models.hub_unreachable.cache_clear()
    try:
        with pytest.raises(UserError) as exc:
            models.load_tokenizer("nobody-here/no-such-model")
    finally:
        models.hub_unreachable.cache_clear()
    message = str(exc.value)
    assert "not in the local Hugging Face cache" in message and "Network is unreachable" in message
    assert "HF_HUB_OFFLINE=1" in message and "\n" not in message


def test_hub_unreachable_is_none_when_offline_mode_or_a_proxy_decides(monkeypatch):
    import huggingface_hub.constants as constants

    def must_not_connect(*args, **kwargs):
        raise AssertionError("probed the hub")
    monkeypatch.setattr(models.socket, "create_connection", must_not_connect)
    for offline, proxy in ((True, None), (False, "http://proxy:3128")):
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
        if proxy:
            monkeypatch.setenv("HTTPS_PROXY", proxy)
        models.hub_unreachable.cache_clear()
        assert models.hub_unreachable() is None
    models.hub_unreachable.cache_clear()
