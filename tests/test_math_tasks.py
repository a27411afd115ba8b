"""GSM8K / MATH / AQuA: loaders on the fixture files, answer extraction, the MATH grader, totality and time bounds."""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
import warnings
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from e2h_min.tasks import make_task
from e2h_min.tasks import math_grader
from e2h_min.errors import TaskDataError
from e2h_min.tasks.base import THINK_ANSWER_INSTRUCTION
from e2h_min.tasks.math_grader import (extract_boxed_answer, math_answers_equivalent, normalize_math_answer,
                                       parse_math_expression, rational_value)
from e2h_min.tasks.math_tasks import (AQuATask, GSM8KTask, MATHTask, aqua_reward, extract_option_letter,
                                      first_number, gsm8k_reward, hash_split, math_reward)

FIXTURES = Path(__file__).parent / "fixtures"
REWARDS = {0.0, 0.1, 1.0}


def formatted(answer: str) -> str:
    """A well-formatted completion (the text after the "<think>" prefill) whose answer is `answer`."""
    return f" some reasoning</think>\n<answer> {answer} </answer>"


def write_jsonl(path: Path, rows: list) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.fixture(scope="module")
def tasks():
    return {name: make_task(name, data=str(FIXTURES / f"{name}.jsonl")) for name in ("gsm8k", "math", "aqua")}


# ----------------------------------------------------------------------------------------------------------------
# MATH grader: a table of equivalent and non-equivalent answer pairs (mpmath, from sympy, is in the test venv)

MATH_PAIRS = [
    # fractions and decimals
    (r"\frac12", r"\frac{1}{2}", True),
    ("1/2", r"\frac{1}{2}", True),
    ("0.5", r"\frac{1}{2}", True),
    (r"\dfrac{1}{2}", "0.5", True),
    (r"\tfrac{3}{4}", "0.75", True),
    (r"\frac{10}{4}", r"\frac{5}{2}", True),
    (r"\frac{-1}{2}", r"-\frac{1}{2}", True),
    (".5", "0.5", True),
    ("5.0", "5", True),
    ("14.", "14", True),
    ("0.333", r"\frac13", False),
    ("7", "-7", False),
    # radicals and pi
    (r"\sqrt{8}", r"2\sqrt{2}", True),
    (r"5\sqrt2", r"\sqrt{50}", True),
    (r"\frac{1}{\sqrt{2}}", r"\frac{\sqrt{2}}{2}", True),
    (r"\frac{\sqrt3}{2}", r"\frac{1}{2}\sqrt{3}", True),
    (r"\frac{1}{\sqrt{2}+1}", r"\sqrt{2}-1", True),
    (r"\sqrt[3]{27}", "3", True),
    (r"\sqrt{2}", r"\sqrt{3}", False),
    (r"9\pi", r"9 \pi", True),
    (r"\pi r^2", r"r^2\pi", True),
    ("3.14", r"\pi", False),
    (r"2\pi", r"\pi", False),
    # intervals, tuples, sets, lists
    ("[1, 4)", "[1,4)", True),
    (r"\left[ 1, 4 \right)", "[1,4)", True),
    ("(1,4]", "[1,4)", False),
    ("[1,4)", "(1,4)", False),
    (r"(-\infty, 2) \cup (3, \infty)", r"(3,\infty)\cup(-\infty,2)", True),
    (r"(-\infty, 2]", r"(-\infty, 2)", False),
    (r"-\infty", r"\infty", False),
    (r"\left( 3, \frac{1}{2} \right)", "(3,0.5)", True),
    ("(2,3)", "(3,2)", False),
    ("2, 3", "3,2", True),
    ("2, 3", "2, 3, 4", False),
    (r"2 \text{ and } 3", "2,3", True),
    (r"\{1,2\}", r"\{2,1\}", True),
    ("(1,2)", "1,2", False),
    (r"\{2,3\}", "2, 3", True),  # a set and a list of the same solutions
    (r"\{2\}", "2", True),
    (r"x \in \{-1\}", "-1", True),
    (r"\{2\}", "3", False),
    (r"x \in [2,5)", "[2,5)", True),
    (r"x \in (-\infty, 3)", r"(-\infty,3)", True),
    # units, degrees, percent, money, thousands
    ("5 cm", "5", True),
    (r"12\text{ square inches}", "12", True),
    (r"5\text{ cm}^2", "5", True),
    (r"5\text{ edges}", "5", True),
    (r"4\text{ digits}", "4", True),
    (r"90^\circ", "90", True),
    (r"720^{\circ}", "720", True),
    (r"50\%", "50", True),
    (r"\$18.90", "18.9", True),
    ("1,000", "1000", True),
    (r"10,\!000", "10000", True),  # MATH's own thousands separator
    (r"1,\!000,\!000", "1000000", True),
    ("1{,}000", "1000", True),
    # text answers, multiple choice, boxes, prefixes
    (r"\text{Tuesday}", "Tuesday", True),
    (r"\text{Monday}", r"\text{Tuesday}", False),
    (r"\text{even}", r"\text{odd}", False),
    # words are text, not products of letters: an anagram is another word
    (r"\text{on}", r"\text{no}", False),
    ("dod", "odd", False),
    ("Tusedya", "Tuesday", False),
    ("2xy", "2yx", True),  # with a number it is an expression
    (r"x\cdot y", "xy", True),  # one side a word, the other not: values
    ("yx", "xy", False),  # two letter-only answers are words: the price of "on" != "no"
    ("a*b", "ab", True),
    # mixed numbers (MATH writes 137 1/2 as 137\frac{1}{2}): read as a product, 68.5 would earn the reward
    (r"137\frac{1}{2}", r"\frac{275}{2}", True),
    (r"137\frac{1}{2}", "137.5", True),
    (r"137\frac12", "68.5", False),
    (r"2\frac{1}{4}", r"\frac{1}{2}", False),
    (r"-2\frac{1}{4}", r"-\frac{9}{4}", True),
    (r"6\frac{1}{4}", r"\frac{3}{2}", False),
    (r"3\frac{\sqrt{2}}{2}", r"\frac{3\sqrt{2}}{2}", True),  # a radical is no mixed number: a product
    (r"\{1,3\frac{1}{4}\}", r"\{1,\frac{13}{4}\}", True),  # last in a set, before \}
    (r"\{1,3\frac{1}{4}\}", r"\{1,\frac{3}{4}\}", False),
    (r"\{1,3\frac{1}{4}\}", r"\{3\frac{1}{4},1\}", True),
    # an exponent past the 40-digit precision is refused, not rounded: rounded, the parity of (-1)^n is lost
    (r"(-1)^{999999999999999999999999999999\cdot999999999999999999999999999999}", "1", False),
    (r"i^{999999999999999999999999999999\cdot999999999999999999999999999999}", "1", False),
    # one-token arguments, as LaTeX reads them
    (r"\frac\pi2", r"\frac{\pi}{2}", True),
    (r"\frac{\sqrt{3}}2", r"\frac{\sqrt{3}}{2}", True),
    (r"\text{(C)}", "C", True),
    ("(C)", r"\textbf{(C)}", True),
    (r"\boxed{\boxed{7}}", "7", True),
    (r"$\frac{3}{4}$", "3/4", True),
    ("x = 3", "3", True),
    (r"k=\frac{2}{3}", r"\frac23", True),
    ("y = 2x+3", "2x + 3", True),
    # expressions with variables, complex numbers, powers
    ("x^2+4x+4", "(x+2)^2", True),
    ("x^2+4x+5", "(x+2)^2", False),
    (r"\frac{x}{2}", "0.5x", True),
    (r"\frac{1}{x}", "x^{-1}", True),
    ("x", "y", False),
    ("x^2", "x", False),
    ("3+4i", "4i+3", True),
    ("i^2", "-1", True),
    ("10^{10}", "10000000000", True),
    ("x^.5", r"\sqrt{x}", True),
    (r"\sqrt[3]{-8}", "-2", True),
    ("", "0", False),
    # undefined at every test point: equal to nothing, not even to each other (else 1/0 would earn any gold)
    ("1/0", "2/0", False),
    (r"\frac{1}{0}", r"\frac{2}{0}", False),
    ("0/0", "1/0", False),
    ("1/(x-x)", "2/(x-x)", False),
    (r"\frac{1}{x-x}", "3", False),
    (r"\frac{x}{0}", r"\frac{2x}{0}", False),
    # a spaced comma separates list items; only an unspaced one is a thousands separator
    ("1, 100", "1100", False),
    ("1, 000", "1000", False),
    ("100, 1", "1, 100", True),
    ("1,000", "1000", True),
    (r"10,\!000", "10000", True),  # MATH's own thousands separator
    (r"1,\!000,\!000", "1000000", True),
    # a huge exponent of a negative or complex base: its phase is lost to rounding, so no value
    (r"(-1)^{\sqrt{2}\cdot" + "9" * 30 + r"\cdot" + "9" * 30 + "}", "1", False),
    (r"i^{\sqrt{2}\cdot" + "9" * 30 + r"\cdot" + "9" * 30 + "}", "1", False),
    (r"\sqrt[\frac{\pi}{" + "9" * 30 + r"\cdot" + "9" * 30 + r"}]{-1}", "1", False),
    (r"(-1)^{\frac{1}{" + "9" * 30 + r"\cdot" + "9" * 30 + "}}", "1", False),  # a rational exponent: rounded, ~1
    # words in \text{} are compared as text, whatever the other side looks like, without case
    ("{no}", r"\text{on}", False),
    ("od^2", r"\text{odd}", False),
    ("1dod", r"\text{odd}", False),
    ("odd", r"\text{odd}", True),
    ("od^2", r"\mathbf{odd}", False),  # every wrapper the normal form drops marks words
    (r"\text{Even}", r"\text{even}", True),
    (r"\text{No solution}", r"\text{no solution}", True),
    # a row break followed by a space is a row break
    (r"\begin{pmatrix}-1/3\\1/3\end{pmatrix}", r"\begin{pmatrix} -1/3 \\ 1/3 \end{pmatrix}", True),
    # one \pm is the list of its two values
    (r"\pm 2", "2, -2", True),
    (r"1\pm\sqrt{2}", r"1+\sqrt2, 1-\sqrt2", True),
    (r"\frac{1\pm\sqrt5}{2}", r"\frac{1-\sqrt5}{2}, \frac{1+\sqrt5}{2}", True),
    (r"\pm 2", "2", False),
    ("3+od{7},3-od{7}", r"3\pmod{7}", False),  # \pmod is no \pm
    # the variable an equation names must be the same; a number has one decimal point
    ("x=2x+3", "y=2x+3", False),
    ("y=2x+3", "2x+3", True),
    ("2.5.3", "0.75", False),
    # radicals of variables compare where both sides are real: other branches at negative test points do not count
    (r"\sqrt{8x^3}", r"2x\sqrt{2x}", True),
    (r"\sqrt{x^3}", r"x\sqrt{x}", True),
    (r"\sqrt[3]{x}", r"x^{\frac13}", True),
    (r"\sqrt{x^2}", "x", False),  # both real at x < 0, and different there
    (r"\sqrt{x^3}", r"-x\sqrt{x}", False),
    (r"\sqrt{x}", r"\sqrt{-x}", False),  # never both real: no test point agrees
    ("ix", "-ix", False),
]


@pytest.mark.parametrize("prediction, gold, expected", MATH_PAIRS)
def test_math_pairs(prediction, gold, expected):
    assert math_answers_equivalent(prediction, gold) is expected
    assert math_answers_equivalent(gold, prediction) is expected  # the relation is symmetric


@pytest.mark.parametrize("text, expected", [
    (r"so the answer is \boxed{\frac{1}{2}}.", r"\frac{1}{2}"),
    (r"\boxed{1} then \boxed{2}", "2"),
    (r"\fbox{3}", "3"),
    (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),
    (r"\boxed 7$", "7"),
    ("42", "42"),
    (r"\boxed{1", None),
    (r"\boxed{\boxed{5}}", "5"),
])
def test_extract_boxed_answer(text, expected):
    assert extract_boxed_answer(text) == expected


@pytest.mark.parametrize("raw, normal", [
    (r"$x = \dfrac{1}{2}$.", r"\frac{1}{2}"),
    (r"\left( 1, 2 \right]", "(1,2]"),
    (r"2 \pi r", r"2\pi r"),
    (r"\frac 1 2", r"\frac{1}{2}"),
    (r"\sqrt2", r"\sqrt{2}"),
    (r"3\,000", "3000"),
    ("2.50", "2.5"),
    (r"\text{(B)}", "B"),
    (r"137\frac{1}{2}", r"(137+\frac{1}{2})"),
    (r"-2 \frac14", r"-(2+\frac{1}{4})"),
    (r"2\frac{5}{4}", r"2\frac{5}{4}"),  # not a proper fraction: no mixed number
    (r"3\frac{1}{2}\pi", r"3\frac{1}{2}\pi"),  # followed by a factor: left as written (a product)
])
def test_normalize_math_answer(raw, normal):
    assert normalize_math_answer(raw) == normal


def test_parser_builds_the_expected_tree_and_refuses_what_it_cannot_bound():
    assert parse_math_expression(r"2\sqrt{3}") == ("mul", ("num", Fraction(2)), ("root", ("num", Fraction(3)), None))
    assert parse_math_expression("x^23") == ("pow", ("var", "x"), ("num", Fraction(23)))
    assert parse_math_expression("x^2y") == ("mul", ("pow", ("var", "x"), ("num", Fraction(2))), ("var", "y"))
    assert rational_value(parse_math_expression(r"\frac{3}{6}+0.25")) == Fraction(3, 4)
    assert rational_value(parse_math_expression(r"2^{-2}")) == Fraction(1, 4)
    assert rational_value(parse_math_expression(r"\frac{1}{0}")) is None
    assert parse_math_expression(r"9^{9^{9}}") is None  # towers
    # a root's index is an exponent too (x^{1/n}): a tiny index inside an exponent is a tower in disguise, one
    # that took mpmath 15 s and 8.5 GB before the parser refused it (2 to the 10^{10^{10}})
    assert parse_math_expression(r"2^{\sqrt[0.0000000001]{10}}") is None
    assert parse_math_expression(r"\sqrt[\frac{1}{\sqrt[0.0000000001]{10}}]{2}") is None
    assert parse_math_expression(r"\sqrt[3]{2}") is not None and parse_math_expression(r"2^{\sqrt{3}}") is not None
    assert not math_answers_equivalent(r"2^{\sqrt[0.0000000001]{10}}", r"\sqrt{2}")
    assert parse_math_expression(r"\frac\pi23") is None  # LaTeX would read 2 then 3: refused, not guessed
    assert parse_math_expression(r"\sin x") is None  # functions are outside the grammar
    assert parse_math_expression("1" * 31) is None  # literal too long
    assert parse_math_expression("(" * 60 + "1" + ")" * 60) is None  # too deep


def test_without_mpmath_exact_rationals_still_compare_and_a_warning_is_given_once(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpmath", None)  # makes `import mpmath` raise ImportError
    monkeypatch.setattr(math_grader, "_mpmath_checked", False)
    monkeypatch.setattr(math_grader, "_mpmath_module", None)
    with pytest.warns(UserWarning, match="mpmath is not installed"):
        assert math_answers_equivalent(r"2\sqrt{2}", r"\sqrt{8}") is False  # needs mpmath: strings differ
    assert math_answers_equivalent("0.5", r"\frac{1}{2}") is True  # exact rationals need no mpmath
    assert math_answers_equivalent(r"\sqrt{2}", r"\sqrt2") is True  # equal normal forms
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math_answers_equivalent(r"\pi", r"\pi+0") is False  # no second warning (it would raise here)


def test_time_limit_interrupts_the_main_thread_and_restores_the_handler():
    previous = signal.getsignal(signal.SIGALRM)
    with pytest.raises(math_grader._TimeLimitExceeded):
        with math_grader._time_limit(0.05):
            give_up = time.monotonic() + 5.0
            while time.monotonic() < give_up:
                pass
    assert signal.getsignal(signal.SIGALRM) is previous
    assert signal.getitimer(signal.ITIMER_REAL)[0] == 0.0


def test_grader_works_off_the_main_thread():
    results = []
    worker = threading.Thread(target=lambda: results.append(math_answers_equivalent(r"\sqrt{8}", r"2\sqrt2")))
    worker.start()
    worker.join(timeout=10)
    assert results == [True]


# ----------------------------------------------------------------------------------------------------------------
# GSM8K and AQuA answer extraction


@pytest.mark.parametrize("text, expected", [
    ("72", 72.0),
    ("$1,250.50", 1250.5),
    ("The answer is 18 dollars.", 18.0),
    ("-7", -7.0),
    ("x = -3", -3.0),
    ("\u22124", -4.0),
    ("5-3", 5.0),
    ("step-2 gives 7", 2.0),
    (".5", 0.5),
    ("1.2.3", 1.2),
    ("2,3", 2.0),  # a comma is a thousands separator only before exactly three digits
    ("10,000,000", 1e7),
    ("no number here", None),
])
def test_first_number(text, expected):
    assert first_number(text) == expected


@pytest.mark.parametrize("answer, gold, reward", [
    ("72", 72.0, 1.0),
    ("72 clips", 72.0, 1.0),
    ("72.000001", 72.0, 1.0),
    ("72.0001", 72.0, 0.1),
    ("seventy-two", 72.0, 0.1),
    ("1,000,000", 1e6, 1.0),
    ("-7 degrees", -7.0, 1.0),
    ("3 then 72", 72.0, 0.1),
])
def test_gsm8k_reward(answer, gold, reward):
    assert gsm8k_reward(formatted(answer), gold) == reward


def test_gsm8k_reward_needs_the_format():
    assert gsm8k_reward("72", 72.0) == 0.0
    assert gsm8k_reward(" think</think>\n72", 72.0) == 0.0


@pytest.mark.parametrize("answer, expected", [
    ("C", "C"), ("(c)", "C"), ("C.", "C"), ("[C]", "C"), (r"\boxed{C}", "C"), (r"\text{C}", "C"),
    ("C) 60 km/h", "C"), ("(C) 60", "C"), ("C. 60 km/h", "C"), ("C: 60", "C"),
    ("The answer is D", "D"), ("answer: B", "B"), ("Option E", "E"), ("I choose option (B)", "B"),
    ("The answer is C, not A", "C"), ("I pick C", "C"),
    ("A or B", None), ("A) 40 or B) 50", None), ("60 km/h", None), ("F", None), ("A train goes fast, so C", None),
])
def test_extract_option_letter(answer, expected):
    assert extract_option_letter(answer) == expected


def test_extract_option_letter_uses_the_row_letters():
    assert extract_option_letter("F", letters="ABCDEF") == "F"
    assert extract_option_letter("E", letters="ABCD") is None


def test_aqua_reward():
    assert aqua_reward(formatted("(C)"), "C") == 1.0
    assert aqua_reward(formatted("B"), "C") == 0.1
    assert aqua_reward("C", "C") == 0.0


def test_math_reward_reads_the_last_box():
    assert math_reward(formatted(r"first \boxed{3}, finally \boxed{\dfrac{1}{2}}"), "0.5") == 1.0
    assert math_reward(formatted(r"\frac{1}{2}"), "0.5") == 1.0  # no box: the whole answer text
    assert math_reward(formatted(r"\boxed{\frac{1}{3}}"), "0.5") == 0.1
    assert math_reward(formatted(r"\boxed{0.5"), "0.5") == 0.1  # unclosed box
    assert math_reward(r"\boxed{0.5}", "0.5") == 0.0


# ----------------------------------------------------------------------------------------------------------------
# Loading the fixture files


def test_fixture_levels_and_counts(tasks):
    gsm8k, math, aqua = tasks["gsm8k"], tasks["math"], tasks["aqua"]
    assert (gsm8k.num_levels, gsm8k.has_ood) == (4, False)
    assert [gsm8k.num_problems(k) + gsm8k.num_problems(k, "test") for k in range(4)] == [3, 3, 3, 3]
    assert (math.num_levels, math.has_ood, math.eval_levels) == (4, True, [0, 1, 2, 3, 4])
    assert [math.num_problems(k) + math.num_problems(k, "test") for k in range(5)] == [2, 3, 2, 2, 2]
    assert math.skipped_rows == 1  # the "Level ?" row
    assert [aqua.num_problems(k) + aqua.num_problems(k, "test") for k in range(4)] == [2, 2, 2, 2]


def test_problem_is_the_indexth_row_of_its_level(tasks):
    gsm8k = tasks["gsm8k"]
    rows = [json.loads(line) for line in (FIXTURES / "gsm8k.jsonl").read_text().splitlines()]
    level_1 = [row for row in rows if row["level"] == 1 and hash_split(row["question"]) == "train"]
    for index, row in enumerate(level_1):
        problem = gsm8k.problem(1, index)
        assert (problem.level, problem.index) == (1, index)
        assert row["question"] in problem.user_prompt
        assert problem.data["gold"] == float(row["answer"].split("####")[1])


def test_math_gold_and_ood(tasks):
    math = tasks["math"]
    golds = {math.problem(4, i, split).data["gold"] for split in ("train", "test")
             for i in range(math.num_problems(4, split))}
    assert golds == {r"720^\circ", r"\sqrt{2}-1"}  # the Level 5 rows
    answer_column = [math.problem(1, i).data["gold"] for i in range(math.num_problems(1))]
    assert r"\frac{5}{6}" in answer_column  # gold from the `answer` column, level given as int 2


def test_prompts(tasks):
    for task in tasks.values():
        prompt = task.problem(0, 0).user_prompt
        assert prompt.startswith("Solve the following math problem")
        assert THINK_ANSWER_INSTRUCTION in prompt
    assert "\\boxed{}" in tasks["math"].problem(0, 0).user_prompt
    aqua_prompt = tasks["aqua"].problem(0, 0).user_prompt
    assert "choose an answer from the given options" in aqua_prompt
    assert "\nA) 40 km/h\nB) 50 km/h\nC) 60 km/h\nD) 70 km/h\nE) 80 km/h\n" in aqua_prompt


def test_every_demonstration_scores_full_marks_and_wrong_answers_do_not(tasks):
    for task in tasks.values():
        for level in task.eval_levels:
            for split in ("train", "test"):
                for index in range(task.num_problems(level, split)):
                    problem = task.problem(level, index, split)
                    demonstration = task.demonstration(problem)
                    assert demonstration is not None or problem.data.get("solution") == ""
                    if demonstration is not None:
                        assert task.score(problem, demonstration) == 1.0
                    assert task.score(problem, formatted("no idea")) == 0.1
                    assert task.score(problem, "no idea") == 0.0


def test_bad_arguments(tasks):
    gsm8k = tasks["gsm8k"]
    with pytest.raises(IndexError, match="has 3 problems"):
        gsm8k.problem(0, 3)
    with pytest.raises(ValueError, match="levels 0..3"):
        gsm8k.problem(4, 0)
    with pytest.raises(ValueError, match="unknown split"):
        gsm8k.num_problems(0, "valid")


def one_line_error(data: str, task=GSM8KTask) -> str:
    with pytest.raises(TaskDataError) as info:
        task(data)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_file_names_the_file_and_columns(tmp_path):
    message = one_line_error(str(tmp_path / "nope.jsonl"))
    assert "nope.jsonl" in message and "question" in message and "answer" in message


def test_bad_json_line_names_file_and_line():
    message = one_line_error(str(FIXTURES / "malformed.jsonl"))
    assert "malformed.jsonl:3" in message and "not valid JSON" in message and "question" in message


@pytest.mark.parametrize("row, task, expected", [
    ({"question": "q"}, GSM8KTask, "missing column 'answer'"),
    ({"question": "q", "answer": "no number"}, GSM8KTask, "'#### <number>'"),
    ({"question": "q", "answer": "#### 3", "level": 7}, GSM8KTask, "'level' must be an integer 0..3"),
    ({"problem": "p", "solution": "no box", "level": "Level 1"}, MATHTask, "no complete \\boxed{}"),
    ({"problem": "p", "answer": "1", "level": "Level 9"}, MATHTask, "'level' must be an integer 1..5"),
    ({"problem": "p", "answer": "1"}, MATHTask, "missing column 'level'"),
    ({"question": "q", "options": ["A)1", "B)2"], "correct": "C"}, AQuATask, "one of the option letters AB"),
    ({"question": "q", "options": "A)1 B)2", "correct": "A"}, AQuATask, "'options' must be a list"),
    ({"question": "q", "answer": "#### 3", "split": "dev"}, GSM8KTask, "'split' must be 'train' or 'test'"),
    (["q", 3], GSM8KTask, "not an object"),
])
def test_malformed_rows(tmp_path, row, task, expected):
    path = write_jsonl(tmp_path / "data.jsonl", [row])
    message = one_line_error(path, task)
    assert "data.jsonl:1" in message and expected in message


@pytest.mark.parametrize("content", ["", "\n  \n"])
def test_empty_file_is_an_error(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    assert "no rows" in one_line_error(str(path))


def test_optional_columns_must_be_all_or_nothing(tmp_path):
    rows = [{"question": "a", "answer": "#### 1", "level": 0}, {"question": "b", "answer": "#### 2"}]
    assert "data.jsonl:2" in one_line_error(write_jsonl(tmp_path / "data.jsonl", rows))
    rows = [{"question": "a", "answer": "#### 1", "split": "test"}, {"question": "b", "answer": "#### 2"}]
    assert "data.jsonl:2" in one_line_error(write_jsonl(tmp_path / "data.jsonl", rows))


def test_without_level_column_everything_is_level_zero(tmp_path):
    rows = [{"question": f"What is {i} + 1?", "answer": f"#### {i + 1}"} for i in range(30)]
    task = GSM8KTask(write_jsonl(tmp_path / "data.jsonl", rows))
    assert (task.num_levels, task.eval_levels, task.level_names()) == (1, [0], ["L0"])
    assert task.num_problems(0, "train") + task.num_problems(0, "test") == 30


def test_split_column_pins_rows(tmp_path):
    rows = [{"question": f"q{i}", "answer": f"#### {i}", "split": "test" if i < 3 else "train"} for i in range(10)]
    task = GSM8KTask(write_jsonl(tmp_path / "data.jsonl", rows))
    assert (task.num_problems(0, "test"), task.num_problems(0, "eval"), task.num_problems(0, "train")) == (3, 3, 7)
    assert task.problem(0, 0, "test").data["gold"] == 0.0


def test_hash_split_is_about_five_percent_and_ignores_row_order(tmp_path):
    rows = [{"question": f"Question number {i}?", "answer": f"#### {i}"} for i in range(400)]
    forward = GSM8KTask(write_jsonl(tmp_path / "a.jsonl", rows))
    backward = GSM8KTask(write_jsonl(tmp_path / "b.jsonl", rows[::-1]), seed=3)
    test_questions = {forward.problem(0, i, "test").data["question"] for i in range(forward.num_problems(0, "test"))}
    assert 5 <= len(test_questions) <= 40  # binomial(400, 0.05): mean 20, sd 4.4
    assert test_questions == {backward.problem(0, i, "test").data["question"]
                              for i in range(backward.num_problems(0, "test"))}


def test_optional_readers_explain_what_is_missing(tmp_path):
    parquet = tmp_path / "data.parquet"
    parquet.write_bytes(b"PAR1")
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        assert "pyarrow" in one_line_error(str(parquet))
    try:
        import datasets  # noqa: F401
    except ImportError:
        assert "pip install datasets" in one_line_error("hf:openai/gsm8k:main@train")


def test_registry_builds_the_file_tasks():
    assert isinstance(make_task("aqua", data=str(FIXTURES / "aqua.jsonl")), AQuATask)
    with pytest.raises(TaskDataError, match="--data"):
        make_task("math")


# ----------------------------------------------------------------------------------------------------------------
# Totality and time bounds on hostile input

HOSTILE = [
    "9" * 10_000, "1" + "0" * 9_999, "{" * 5_000 + "}" * 5_000, "\\boxed{" * 1_400, "\x00" * 10_000,
    "<answer>" * 1_000, "</think>" * 1_000, "(" * 10_000, "\\frac" * 2_000, "2^" * 5_000, "-" * 10_000,
    "." * 10_000, "A)" * 5_000, "answer is " * 1_000, "\\text{" * 1_600, "x" * 10_000, "\\sqrt{" * 1_600,
    "1," * 5_000, "\\{" * 5_000, "\\cup" * 2_500, "$" * 10_000, " " * 10_000, "\ud800\u202e\ufeff" * 3_000,
    "9^{9^{9^{9}}}", "(1+x)^{99999}", "x^{999999999999999999999999999999}", "\\sqrt{" * 30 + "2" + "}" * 30,
    "+".join(["\\sqrt{2}"] * 37), ",".join(["\\sqrt{x}"] * 16), "((((((((((" * 3 + "1" + "))))))))))" * 3,
    "(" + ",".join(["2^{1000}"] * 16) + ")", "10^{" + "9" * 30 + "}-10^{" + "9" * 30 + "}",
    # long blank runs after a keyword: the shape that makes a careless regex quadratic
    "option" + " " * 9_990 + "1", "answer is" + " " * 9_990, ", " + " " * 1_990 + "\\text{and}", " " * 1_990 + "x",
    "^" + " " * 1_990 + "{", "\\text{" + " " * 1_990,
]
MATH_GOLDS = [r"\frac{3}{4}", r"(1+x)^{99999}", "9" * 10_000, r"(" + ",".join(["2^{1000}"] * 16) + ")", "0"]


def hostile_completions(text: str) -> list[str]:
    return [text, formatted(text), formatted("\\boxed{" + text + "}"), " t</think><answer>" + text]


def fastest_of_three(call):
    """(result, seconds) of the fastest of three calls: the inputs are deterministic, so a slow grader is slow
    every time, while a preemption by another process on a shared machine only hits one of the three."""
    best, result = float("inf"), None
    for _ in range(3):
        start = time.perf_counter()
        result = call()
        best = min(best, time.perf_counter() - start)
    return result, best


def test_hostile_inputs_give_valid_rewards_quickly(tasks):
    worst = {"gsm8k": 0.0, "aqua": 0.0, "math": 0.0}
    for text in HOSTILE:
        for completion in hostile_completions(text):
            for name, score in (("gsm8k", lambda c: gsm8k_reward(c, 72.0)), ("aqua", lambda c: aqua_reward(c, "C"))):
                reward, seconds = fastest_of_three(lambda: score(completion))
                assert reward in REWARDS
                worst[name] = max(worst[name], seconds)
            for gold in MATH_GOLDS:
                reward, seconds = fastest_of_three(lambda: math_reward(completion, gold))
                assert reward in REWARDS
                worst["math"] = max(worst["math"], seconds)
    assert worst["gsm8k"] < 0.05 and worst["aqua"] < 0.05, worst
    assert worst["math"] < 1.0, worst


def test_million_digit_numbers():
    huge = "9" * 1_000_000
    assert gsm8k_reward(formatted(huge), 72.0) == 0.1
    assert gsm8k_reward(formatted("72 " + huge), 72.0) == 1.0
    assert aqua_reward(formatted(huge), "C") == 0.1
    assert math_reward(formatted(huge), huge) == 1.0  # equal strings, even past the normalisation cap
    assert math_reward(formatted("\\boxed{" + huge + "}"), "9") == 0.1


# ----------------------------------------------------------------------------------------------------------------
# Properties


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=300), st.sampled_from(["C", "72", r"\frac{1}{2}", "(1,2]"]))
def test_rewards_are_total_on_any_text(text, gold):
    for completion in (text, formatted(text), formatted("\\boxed{" + text + "}")):
        assert gsm8k_reward(completion, 72.0) in REWARDS
        assert aqua_reward(completion, "C") in REWARDS
        assert math_reward(completion, gold) in REWARDS


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=200))
def test_math_equivalence_is_reflexive(text):
    assert math_answers_equivalent(text, text)


@settings(max_examples=100, deadline=None)
@given(st.integers(-10**6, 10**6), st.integers(1, 10**4), st.integers(1, 50), st.integers(-10**6, 10**6))
def test_fractions_compare_by_value(numerator, denominator, factor, other):
    fraction = rf"\frac{{{numerator}}}{{{denominator}}}"
    assert math_answers_equivalent(fraction, f"{numerator * factor}/{denominator * factor}")
    equal = Fraction(numerator, denominator) == other
    assert math_answers_equivalent(fraction, str(other)) is equal


@settings(max_examples=100, deadline=None)
@given(st.integers(-10**9, 10**9), st.booleans())
def test_gsm8k_reads_numbers_with_thousands_separators(number, dollars):
    answer = f"{'$' if dollars else ''}{number:,}"
    assert gsm8k_reward(formatted(f"The answer is {answer}."), float(number)) == 1.0
    assert gsm8k_reward(formatted(answer), float(number + 1)) == 0.1


@settings(max_examples=100, deadline=None)
@given(st.sampled_from("ABCDE"), st.sampled_from(["{}", "({})", "{})", "{}) 42", "The answer is {}",
                                                   "answer: ({})", r"\boxed{{{}}}", "I choose option {}"]))
def test_aqua_reads_the_letter_in_common_forms(letter, template):
    assert extract_option_letter(template.format(letter)) == letter
