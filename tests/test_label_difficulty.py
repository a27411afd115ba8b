"""Difficulty labelling: rank quartiles against a naive reference, row bookkeeping, and the CLI end to end."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from e2h_min.engine.models import TINY_MODEL_DIR
from e2h_min.tasks import make_task
from e2h_min.analysis.label_difficulty import (error_rate, group_error_rates, labelled_rows, load_rows_and_problems,
                                            main, quartile_levels, sample_error_rates)

FIXTURES = Path(__file__).parent / "fixtures"
UNLABELLED = str(FIXTURES / "gsm8k_unlabelled.jsonl")  # 8 GSM8K rows, no level column, 6 train + 2 test
requires_tiny = pytest.mark.skipif(not (TINY_MODEL_DIR / "model.safetensors").exists(),
                                   reason="embedded tiny model not built (python scripts/build_tiny_model.py)")


def unlabelled_lines():
    return [line for line in Path(UNLABELLED).read_text().splitlines() if line.strip()]


def naive_quartile_levels(error_rates):
    """Reference: rank = how many problems come strictly before (lower rate, or same rate and earlier)."""
    n = len(error_rates)
    levels = []
    for i, e in enumerate(error_rates):
        rank = sum(1 for j, f in enumerate(error_rates) if f < e or (f == e and j < i))
        levels.append(4 * rank // n)
    return levels


# ----------------------------------------------------------------------------- quartile_levels


def test_quartile_levels_hand_worked():
    # the docstring's case: four problems tie at 0 and are split between trivial and easy in input order
    assert quartile_levels([0.5, 0.0, 0.0, 1.0, 0.0, 0.0, 0.25, 1.0]) == [2, 0, 0, 3, 1, 1, 2, 3]
    assert quartile_levels([0.9, 0.1, 0.5, 0.3]) == [3, 0, 2, 1]
    assert quartile_levels([]) == []
    assert quartile_levels([0.7]) == [0]
    # 5 problems: ranks 0..4 -> floor(4r/5) = 0, 0, 1, 2, 3
    assert quartile_levels([0.0, 0.2, 0.4, 0.6, 0.8]) == [0, 0, 1, 2, 3]


def test_all_equal_error_rates_still_fill_four_levels_in_input_order():
    # the case that breaks quartile *value* thresholds (every cut point is 1.0): ranks keep 4 non-empty levels
    assert quartile_levels([1.0] * 8) == [0, 0, 1, 1, 2, 2, 3, 3]


twentieths = st.integers(0, 20).map(lambda k: k / 20)  # what 20 samples can give: many ties


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(twentieths, st.floats(0, 1)), max_size=60))
def test_quartile_levels_match_naive_reference_and_are_balanced_and_monotone(rates):
    levels = quartile_levels(rates)
    assert levels == naive_quartile_levels(rates)
    n = len(rates)
    sizes = Counter(levels)
    assert all(n // 4 <= sizes[k] <= -(-n // 4) for k in range(4))
    for i in range(n):
        for j in range(n):
            if rates[i] < rates[j]:
                assert levels[i] <= levels[j]


def test_error_rate_is_the_share_not_correct():
    assert error_rate([True, False, False, False]) == 0.75
    assert error_rate([True, True]) == 0.0 and error_rate([False] * 20) == 1.0


def test_group_error_rates_score_each_completion_against_its_own_problem():
    task, _, problems = load_rows_and_problems("gsm8k", UNLABELLED)
    p = [problem for _, problem in problems[:3]]
    right = [task.demonstration(problem) for problem in p]  # the reference reasoning and gold number
    wrong = " no idea</think>\n<answer> -1 </answer>"
    # sample i belongs to problem i // 3; problem 1's right answer under problem 0 is wrong (different gold)
    texts = [right[0], right[0], right[1],
             right[1], right[1], right[1],
             wrong, right[2], wrong]
    assert group_error_rates(task, p, texts, samples=3) == pytest.approx([1 / 3, 0.0, 2 / 3])
    with pytest.raises(ValueError, match="8 completions for 3 problems x 3 samples"):
        group_error_rates(task, p, texts[:8], samples=3)


# ----------------------------------------------------------------------------- rows


def test_every_row_of_both_splits_is_loaded_in_file_order():
    task, rows, problems = load_rows_and_problems("gsm8k", UNLABELLED)
    assert task.num_levels == 1 and len(rows) == 8
    assert [i for i, _ in problems] == list(range(8))  # the 2 test-split rows (lines 3 and 6) included
    for i, problem in problems:
        assert rows[i]["question"] in problem.user_prompt
        assert problem.data["row"].endswith(f":{i + 1}")


def test_labelled_rows_keep_columns_and_record_an_overwritten_level():
    rows = [{"question": "a", "answer": "1", "level": 3, "extra": [1, 2]}, {"question": "b", "answer": "2"},
            {"question": "c", "answer": "3"}, {"question": "d", "answer": "4"}, {"question": "skipped"}]
    out = labelled_rows("gsm8k", rows, [0, 1, 2, 3], [1.0, 0.0, 0.5, 0.25])
    assert out[0] == {"question": "a", "answer": "1", "level": 3, "source_level": 3, "extra": [1, 2],
                      "error_rate": 1.0}
    assert [r["level"] for r in out[:4]] == [3, 0, 2, 1]
    assert out[4] == {"question": "skipped"}  # rows the loader does not use are written unchanged
    assert "level" not in rows[1]  # the input is not modified
    math_out = labelled_rows("math", rows, [0, 1, 2, 3], [1.0, 0.0, 0.5, 0.25])
    assert [r["level"] for r in math_out[:4]] == [4, 1, 3, 2]  # MATH's 1-based convention


def test_math_skipped_rows_are_written_unchanged(tmp_path):
    source = [json.loads(line) for line in (FIXTURES / "math.jsonl").read_text().splitlines() if line.strip()]
    source.append({"problem": "What is 1 + 1?", "solution": "$\\boxed{2}$", "level": "Level ?"})
    data = tmp_path / "math.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in source))
    task, rows, problems = load_rows_and_problems("math", str(data))
    assert len(rows) == len(source) and task.skipped_rows >= 1 and len(problems) == len(rows) - task.skipped_rows
    skipped = set(range(len(rows))) - {i for i, _ in problems}
    out = labelled_rows("math", rows, [i for i, _ in problems], [0.5] * len(problems))
    assert all(out[i] == source[i] for i in skipped) and len(source) - 1 in skipped


# ----------------------------------------------------------------------------- CLI errors (no model needed)


@pytest.mark.parametrize("argv, fragment", [
    (["--task", "gsm8k", "--data", "no/such/file.jsonl"], "no/such/file.jsonl: no such file"),
    (["--task", "gsm8k", "--data", str(FIXTURES / "malformed.jsonl")], "malformed.jsonl:3: not valid JSON"),
    (["--task", "countdown", "--data", UNLABELLED], "invalid choice: 'countdown'"),
    (["--task", "gsm8k", "--data", UNLABELLED, "--samples", "1"], "--samples must be >= 2"),
    (["--task", "gsm8k", "--data", UNLABELLED, "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
])
def test_bad_input_gives_one_line_and_exit_code_2(argv, fragment, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["--model", "tiny", "--out", str(tmp_path / "out.jsonl")] + argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "out.jsonl").exists()


def test_an_existing_out_file_is_never_written_over(capsys, tmp_path):
    """--out may be anything, another run's metrics.jsonl included: an existing file is refused, left as it was."""
    out = tmp_path / "metrics.jsonl"
    out.write_text('{"step": 1}\n')
    with pytest.raises(SystemExit) as exc:
        main(["--model", "tiny", "--task", "gsm8k", "--data", UNLABELLED, "--out", str(out)])
    assert exc.value.code == 2 and "exists" in capsys.readouterr().err
    assert out.read_text() == '{"step": 1}\n'


def test_fewer_problems_than_levels_is_refused(capsys, tmp_path):
    data = tmp_path / "three.jsonl"
    data.write_text("".join(line + "\n" for line in unlabelled_lines()[:3]))
    with pytest.raises(SystemExit) as exc:
        main(["--model", "tiny", "--task", "gsm8k", "--data", str(data), "--out", str(tmp_path / "o.jsonl")])
    assert exc.value.code == 2 and "3 usable problems; need at least 4" in capsys.readouterr().err


# ----------------------------------------------------------------------------- on the tiny model


@pytest.fixture
def one_thread():
    """One torch thread (the shared 2-core machine is faster that way); the process setting is restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@requires_tiny
def test_sampled_error_rates_keep_problem_order_across_generation_calls(one_thread):
    """A grader that passes problems on odd file lines only: the rates are known exactly whatever is sampled."""
    from e2h_min.engine.models import load_model, load_tokenizer

    task, _, problems = load_rows_and_problems("gsm8k", UNLABELLED)
    odd_line = lambda problem: int(problem.data["row"].rsplit(":", 1)[1]) % 2 == 1  # noqa: E731
    task.score = lambda problem, completion: 1.0 if odd_line(problem) else 0.0
    model = load_model("tiny", torch.device("cpu"), trainable=False)
    tokenizer = load_tokenizer("tiny")
    # batch_size 6 with 2 samples: 3 prompts per generation call, so 3 calls for 8 problems
    rates = sample_error_rates(model, tokenizer, task, [p for _, p in problems], samples=2, max_new_tokens=4,
                               batch_size=6, progress=False)
    assert rates == [0.0, 1.0] * 4


@requires_tiny
def test_label_difficulty_end_to_end_on_the_tiny_model(tmp_path, capsys, one_thread, monkeypatch):
    from e2h_min.analysis import label_difficulty
    dates, real_encode = [], label_difficulty.encode_prompts
    monkeypatch.setattr(label_difficulty, "today", lambda: "2025-01-31")  # the pass starts on this day
    monkeypatch.setattr(label_difficulty, "encode_prompts",
                        lambda tokenizer, task, problems, template_vars=None: dates.append(template_vars["date_string"])
                        or real_encode(tokenizer, task, problems, template_vars))
    out = tmp_path / "labelled.jsonl"
    main(["--model", "tiny", "--task", "gsm8k", "--data", UNLABELLED, "--samples", "2", "--max-new-tokens", "16",
          "--out", str(out), "--device", "cpu", "--threads", "1", "--quiet", "--batch-size", "4"])
    assert len(dates) > 1 and set(dates) == {"31 Jan 2025"}  # every chunk's prompts carry the pass's one date
    written = [json.loads(line) for line in out.read_text().splitlines()]
    source = [json.loads(line) for line in unlabelled_lines()]
    assert len(written) == len(source) == 8
    for row, original in zip(written, source):
        assert {k: row[k] for k in original} == original  # every original column kept, rows in input order
        assert row["level"] in (0, 1, 2, 3) and isinstance(row["level"], int)
        assert 0.0 <= row["error_rate"] <= 1.0 and row["error_rate"] * 2 == int(row["error_rate"] * 2)
    assert [row["level"] for row in written] == quartile_levels([row["error_rate"] for row in written])
    reloaded = make_task("gsm8k", data=str(out))
    assert reloaded.num_levels == 4
    assert [reloaded.num_problems(k, "train") + reloaded.num_problems(k, "test") for k in range(4)] == [2, 2, 2, 2]
    assert "wrote 8 rows" in capsys.readouterr().out
