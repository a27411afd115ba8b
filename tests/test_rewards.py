"""Tests for e2h_min/tasks/rewards.py (the format check) and the Countdown grader (e2h_min/tasks/countdown.py):
hand-worked format and Countdown cases, safe_arith against Python's own arithmetic on generated expressions, a
hostile corpus with the per-call time bound, and a property test."""

from __future__ import annotations

import random
import time
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from e2h_min.tasks.rewards import parse_think_answer
from e2h_min.tasks.countdown import (
    MAX_LITERAL_DIGITS,
    MAX_NESTING,
    NUMBERS_PER_LEVEL,
    CountdownTask,
    countdown_reward,
    evaluate_expression,
    safe_arith,
)

ALLOWED = {0.0, 0.1, 1.0}
CALL_LIMIT_S = 0.050  # per-call bound required of graders


def answer(expr: str, think: str = " work it out") -> str:
    """A well-formatted completion (text after the prefill's '<think>') whose answer is `expr`."""
    return f"{think}</think>\n<answer> {expr} </answer>"


# ---------------------------------------------------------------- format


@pytest.mark.parametrize("completion, expected", [
    (" a</think><answer>1 + 2</answer>", "1 + 2"),
    (" a</think>\n \t<answer>\n 1 + 2 \n</answer>", "1 + 2"),
    (" a</think><answer>1</answer>\n  ", "1"),  # trailing whitespace after </answer> is allowed
    (" a</think><answer>x</answer>", "x"),  # the format does not judge the answer's content
])
def test_format_accepts(completion, expected):
    assert parse_think_answer(completion) == expected


@pytest.mark.parametrize("completion, why", [
    (" a</think><answer>1 + 2", "missing </answer>"),
    (" a</think><answer>1 + 2</answer> done", "text after </answer>"),
    (" a</think><answer>1 + 2</answer><|endoftext|>", "special token text after </answer>"),
    (" a<answer>1 + 2</answer>", "missing </think>"),
    (" a</think>1 + 2</answer>", "missing <answer>"),
    ("</think><answer>1 + 2</answer>", "empty think"),
    ("  \n </think><answer>1 + 2</answer>", "whitespace-only think"),
    (" a</think><answer>  </answer>", "empty answer"),
    (" a</think> so <answer>1 + 2</answer>", "text between </think> and <answer>"),
    ("<think> a</think><answer>1 + 2</answer>", "second <think> (the prefill already has one)"),
    (" a</think></think><answer>1 + 2</answer>", "two </think>"),
    (" a</think><answer><answer>1 + 2</answer>", "nested <answer>"),
    (" a</think><answer>1</answer><answer>1 + 2</answer>", "two answers"),
    (" a <answer>1</answer></think><answer>1 + 2</answer>", "answer tags inside think"),
    (" a<answer>1 + 2</think></answer>", "answer before </think>"),
    (" a</Think><answer>1 + 2</answer>", "tags are case-sensitive"),
    (" a</think><аnswer>1 + 2</answer>", "Cyrillic 'а' in <answer>"),
    ("", "empty completion"),
])
def test_format_rejects(completion, why):
    assert parse_think_answer(completion) is None, why


# ---------------------------------------------------------------- safe_arith, hand-worked


@pytest.mark.parametrize("expr, value", [
    ("1 + 2 * 3", Fraction(7)),
    ("(1 + 2) * 3", Fraction(9)),
    ("7 / 2", Fraction(7, 2)),
    ("8 / 4 / 2", Fraction(1)),  # left-associative
    ("10 - 4 - 3", Fraction(3)),
    ("-3 + 5", Fraction(2)),  # unary minus is allowed, as in Python
    ("2 * -3", Fraction(-6)),
    ("- - 4", Fraction(4)),
    ("+4", Fraction(4)),
    ("((((5))))", Fraction(5)),
    ("1 / 3 + 1 / 6", Fraction(1, 2)),
    ("0", Fraction(0)),
    ("9" * MAX_LITERAL_DIGITS, Fraction(int("9" * MAX_LITERAL_DIGITS))),
])
def test_safe_arith_values(expr, value):
    assert safe_arith(expr) == value


@pytest.mark.parametrize("expr, why", [
    ("2 ** 3", "power"),
    ("7 // 2", "floor division"),
    ("9**9**9", "power tower"),
    ("1 / 0", "division by zero"),
    ("5 / (3 - 3)", "division by a zero sub-expression"),
    ("2.5 + 1", "decimal point"),
    ("٣ + 1", "Arabic-Indic digit"),
    ("３ + 1", "fullwidth digit"),
    ("1\t+ 2", "tab is not a space"),
    ("1 + 2 = 3", "equals sign"),
    ("2(3)", "implicit multiplication"),
    ("(1 + 2", "unclosed parenthesis"),
    ("1 + 2)", "stray ')'"),
    ("1 2", "two numbers in a row"),
    ("1 +", "dangling operator"),
    ("", "empty"),
    ("()", "empty parentheses"),
    ("05 + 1", "leading zero"),
    ("9" * (MAX_LITERAL_DIGITS + 1), "literal too long"),
    ("1 + " * 200 + "1", "longer than the length limit"),
    ("(" * MAX_NESTING + "1" + ")" * MAX_NESTING, "nested too deep"),
    ("-" * (MAX_NESTING + 1) + "1", "too many unary signs"),
    ("abs(1)", "letters"),
    ("1\x00+ 2", "NUL byte"),
])
def test_safe_arith_rejects(expr, why):
    assert safe_arith(expr) is None, why


def test_safe_arith_nesting_just_under_the_limit_is_fine():
    depth = MAX_NESTING - 1
    assert safe_arith("(" * depth + "1" + ")" * depth) == 1


def test_safe_arith_magnitude_bound():
    # (10**12 - 1)**5 < 10**60 is kept; one more factor passes the bound and is rejected.
    big = "9" * MAX_LITERAL_DIGITS
    assert safe_arith(" * ".join([big] * 5)) == int(big) ** 5
    assert safe_arith(" * ".join([big] * 6)) is None
    assert safe_arith("1 / " + " / ".join([big] * 6)) is None  # denominators are bounded too


def test_evaluate_expression_reports_literals_in_order():
    assert evaluate_expression("(19 + 44) - 35") == (Fraction(28), [19, 44, 35])
    assert evaluate_expression("-(3) * 3") == (Fraction(-9), [3, 3])


# ---------------------------------------------------------------- safe_arith vs Python arithmetic


def random_expression(rng: random.Random, depth: int) -> str:
    """A random well-formed expression of the grammar, with random spacing, unary signs and parentheses."""
    if depth == 0 or rng.random() < 0.3:
        text = str(rng.randint(0, 120))
    else:
        op = rng.choice("+-*/")
        space = rng.choice(["", " ", "  "])
        text = f"{random_expression(rng, depth - 1)}{space}{op}{space}{random_expression(rng, depth - 1)}"
        if rng.random() < 0.6:
            text = f"({text})"
    if rng.random() < 0.1:
        text = rng.choice("-+") + text
    return text


def python_reference(expr: str) -> Fraction | None:
    """Python's own evaluation of an expression we generated, with every literal made a Fraction."""
    tokens, i = [], 0
    while i < len(expr):
        if expr[i].isdigit():  # safe here: the generator only writes ASCII digits
            j = i
            while j < len(expr) and expr[j].isdigit():
                j += 1
            tokens.append(f"Fraction({expr[i:j]})")
            i = j
        else:
            tokens.append(expr[i])
            i += 1
    try:
        return eval("".join(tokens), {"Fraction": Fraction})  # test-only, on strings this test generated
    except ZeroDivisionError:
        return None


def test_safe_arith_matches_python_on_random_expressions():
    rng = random.Random(0)
    checked_values = checked_zero_division = 0
    for _ in range(3000):
        expr = random_expression(rng, depth=rng.randint(0, 5))
        expected = python_reference(expr)
        assert safe_arith(expr) == expected, expr
        checked_values += expected is not None
        checked_zero_division += expected is None
    assert checked_values > 2000 and checked_zero_division > 10  # both branches were exercised


# ---------------------------------------------------------------- countdown reward, hand-worked


@pytest.mark.parametrize("expr, numbers, target, reward", [
    ("(19 + 44) - 35", [44, 19, 35], 28, 1.0),
    ("44 - 35 + 19", [44, 19, 35], 28, 1.0),  # any order, any bracketing
    ("(100 - 4) / 3", [4, 100, 3], 32, 1.0),
    ("6 / 4 * 2", [2, 4, 6], 3, 1.0),  # non-integer intermediate (3/2) is fine
    ("-3 + 5", [3, 5], 2, 1.0),  # unary minus allowed
    ("7 * 7", [7, 7], 49, 1.0),  # repeated given numbers each used once
    ("1 / 100001", [1, 100001], 0, 0.1),  # within the paper's 1e-5 of the target, but not equal: wrong
    ("40 / (47 * 48 * 81 * 88)", [47, 40, 81, 48, 88], 0, 0.1),  # ~1.2e-7: a policy can build these
    ("7 + 25 / (29 * 31 * 40 * 75)", [7, 40, 29, 25, 31, 75], 7, 0.1),
    ("(1 + 2) / 3 * 3 - 2", [1, 2, 3, 3, 2], 1, 1.0),  # exact rational arithmetic: (3/3)*3 - 2 is exactly 1
    ("(19 + 43) - 34", [44, 19, 35], 28, 0.1),  # right value, numbers not given
    ("19 + 44 - 35", [44, 19, 35], 27, 0.1),  # wrong value
    ("44 - 19 + 19 - 16", [44, 19, 35], 28, 0.1),  # reused number, extra number
    ("63 - 35", [44, 19, 35], 28, 0.1),  # missing numbers
    ("7 * 7", [7], 49, 0.1),  # reused number
    ("5", [5, 3], 5, 0.1),  # missing number
    ("2 ** 3", [2, 3], 8, 0.1),  # the public code scores this 1.0
    ("7 // 2", [7, 2], 3, 0.1),  # the public code scores this 1.0
    ("5 / (3 - 3)", [5, 3, 3], 0, 0.1),  # division by zero is wrong, not unformatted
    ("1 / 0", [1, 0], 0, 0.1),
    ("３ + 5", [3, 5], 8, 0.1),  # fullwidth digit
    ("٣ + 5", [3, 5], 8, 0.1),  # Arabic-Indic digit
    ("(19 + 44) - 35 = 28", [44, 19, 35], 28, 0.1),  # '=' is not allowed
    ("05 + 3", [5, 3], 8, 0.1),  # leading zero
    ("2.0 * 4", [2, 4], 8, 0.1),  # decimal point
])
def test_countdown_reward_hand_worked(expr, numbers, target, reward):
    assert countdown_reward(answer(expr), numbers, target) == reward


@pytest.mark.parametrize("completion", [
    " 19 + 44 = 63</think>\n<answer> (19 + 44) - 35",  # missing </answer>
    "</think>\n<answer> (19 + 44) - 35 </answer>",  # empty think
    " think</think> so <answer> (19 + 44) - 35 </answer>",  # text between </think> and <answer>
    " think</think>\n<answer> <answer> (19 + 44) - 35 </answer> </answer>",  # nested answer tags
    " think</think>\n<answer> 1 </answer>\n<answer> (19 + 44) - 35 </answer>",  # two answers
    " think</think>\n(19 + 44) - 35",  # no answer tags
])
def test_countdown_reward_bad_format_is_zero_even_if_the_expression_is_right(completion):
    assert countdown_reward(completion, [44, 19, 35], 28) == 0.0


def test_countdown_reward_rejects_non_str():
    with pytest.raises(TypeError):
        countdown_reward(None, [1, 2], 3)  # type: ignore[arg-type]


# ---------------------------------------------------------------- generated demonstrations


def test_every_generated_demonstration_scores_one():
    task = CountdownTask(seed=0)
    for level in range(len(NUMBERS_PER_LEVEL)):
        for index in range(300):
            problem = task.problem(level, index)
            assert task.score(problem, task.demonstration(problem)) == 1.0, (level, index)


# ---------------------------------------------------------------- hostile corpus


def hostile_completions() -> list[str]:
    deep = "(" * 5000 + "1" + ")" * 5000
    huge_number = "1" * 10**6
    return [
        answer(deep),
        answer("(" * 5000),
        answer(huge_number),
        answer(huge_number + " + 1"),
        answer("9**9**9"),
        answer("9 ** 9 ** 9 ** 9"),
        answer(" * ".join(["9"] * 2000)),
        answer(" / ".join(["7"] * 2000)),
        answer("-" * 10_000 + "1"),
        answer("1\x00 + 2"),
        "\x00" * 10_000,
        answer("1 + 2", think="\x00" * 10_000),
        "</think><answer>" * 1000 + "1</answer>",
        " a</think>" + "<answer>" * 1000 + "1" + "</answer>" * 1000,
        answer("<answer>" * 1000),
        " a</think><аnswer>1 + 2</аnswer>",  # Cyrillic look-alike letters
        answer("l + O"),  # letters that look like digits
        answer("１２ + ３４"),
        answer("٣" * 10_000),
        answer("𝟗 + 1"),  # mathematical bold digit
        "x" * 10_000,
        answer("(" * 200 + "1" + ")" * 200),
        answer("1" * 12 + "*" + "1" * 12),
        answer("\u202e1 + 2"),  # right-to-left override
        answer("1 +\ud800 2"),  # lone surrogate
    ]


def test_hostile_inputs_are_fast_and_in_range():
    for completion in hostile_completions():
        # min of three runs: the inputs are deterministic, so only scheduling noise differs between runs
        seconds, reward = float("inf"), None
        for _ in range(3):
            start = time.perf_counter()
            reward = countdown_reward(completion, [1, 2, 3], 6)
            seconds = min(seconds, time.perf_counter() - start)
        assert reward in ALLOWED, completion[:60]
        assert seconds < CALL_LIMIT_S, (completion[:60], seconds)


def test_hostile_arithmetic_is_fast():
    for expr in ["(" * 5000 + "1" + ")" * 5000, "9**9**9", "1" * 10**6, " * ".join(["9"] * 100),
                 " / ".join(["999999999999"] * 40), "-" * 500]:
        start = time.perf_counter()
        safe_arith(expr, max_len=10**7)  # even with the length limit lifted, the other bounds hold
        assert time.perf_counter() - start < CALL_LIMIT_S, expr[:60]


# ---------------------------------------------------------------- property tests

EXPRESSION_ALPHABET = "0123456789+-*/() ٣３."
TAG_PIECES = ["<think>", "</think>", "<answer>", "</answer>", " ", "\n", "1", "+", "x"]


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=400))
def test_any_text_gives_an_allowed_reward(text):
    assert countdown_reward(text, [1, 2, 3], 6) in ALLOWED


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(TAG_PIECES), max_size=40).map("".join))
def test_any_tag_soup_gives_an_allowed_reward(text):
    reward = countdown_reward(text, [1, 2, 3], 6)
    assert reward in ALLOWED
    assert (reward > 0) == (parse_think_answer(text) is not None)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=EXPRESSION_ALPHABET, max_size=60))
def test_any_formatted_expression_scores_at_least_the_format_reward(expr):
    assert countdown_reward(answer(expr + "1"), [1, 2, 3], 6) in {0.1, 1.0}
