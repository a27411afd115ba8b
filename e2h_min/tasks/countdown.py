"""Countdown: combine the given numbers with + - * / to reach the target (spec sections 2, 6, 7).

Levels 0..3 use 2..5 numbers, the OOD level (4) uses 6. Problem `index` of a split is generated from its own
seeded RNG, so any problem can be rebuilt from (seed, split, level, index) alone.

Reward (the grader, below): 0.0 when the format fails (e2h_min.tasks.rewards.parse_think_answer), else 0.1 for the
format plus 0.9 when the answer is correct, so the reward is exactly 0.0, 0.1 or 1.0. Correct means: the answer
is an arithmetic expression over ASCII digits, + - * / ( ) and the space character; its integer literals equal
the given numbers as a multiset (each used exactly once); and its exact rational value equals the target. (The
paper accepts a value within 1e-5 of the target because its code evaluates in floats; in exact arithmetic a
correct answer equals the target, so the tolerance would only admit wrong ones, and a policy can build them:
"40 / (47 * 48 * 81 * 88)" is about 1e-7, so within 1e-5 of a target 0, and the same trick, the target plus the
smallest number over the product of the rest, fits about 2% of level-3 problems and 9% of OOD ones.) A
division by zero, a syntax error or any other reject is simply a wrong answer (0.1): it never removes the format
reward.

Why no eval(). The public code checks the answer with a character filter and then eval()s it. Its filter admits
'**' and '//' (both are made of allowed characters), so '2**3' or '7//2' score as correct answers and '9**9**9'
stalls the trainer (a 370-million-digit power). Here a small recursive-descent parser admits exactly this grammar
and nothing else:

    expr   := term (('+' | '-') term)*
    term   := factor (('*' | '/') factor)*
    factor := ('+' | '-') factor | '(' expr ')' | integer
    integer:= '0' | [1-9][0-9]*            (ASCII digits only, at most 12 of them)

Unary signs are allowed because Python's grammar (hence the paper's eval) allows them; for our inputs (positive
numbers, target >= 0) they add no reachable targets, and allowing them means this parser gives Python's value on
every string both accept. Literals with a leading zero ('05') are rejected, as Python rejects them. Arithmetic is
exact (fractions.Fraction) with true division, and every input is bounded: length, nesting depth, literal size
and intermediate size are all capped, so each call costs well under a millisecond whatever the input.
"""

from __future__ import annotations

import random
from fractions import Fraction

from e2h_min.tasks.rewards import ANSWER_REWARD, FORMAT_REWARD, parse_think_answer
from e2h_min.tasks.base import THINK_ANSWER_INSTRUCTION, Problem, Task

NUMBERS_PER_LEVEL = [2, 3, 4, 5, 6]  # the last one is the OOD level
_SPLIT_SALT = {"train": 0, "test": 1_000_003, "eval": 1_000_003}


def generate_countdown(rng: random.Random, n_numbers: int, max_target: int = 100) -> tuple[list[int], int, list]:
    """(numbers uniform in 1..100, a target in 0..max_target reached by a left-to-right chain of random operations
    (exact division only), the chain): chain [19, ('+', 44), ('-', 35)] means ((19 + 44) - 35) = 28."""
    while True:
        numbers = [rng.randint(1, 100) for _ in range(n_numbers)]
        order = numbers[:]
        rng.shuffle(order)
        value, chain = order[0], [order[0]]
        for n in order[1:]:
            op = rng.choice(["+", "-", "*"] + (["/"] if value % n == 0 else []))
            value = {"+": value + n, "-": value - n, "*": value * n, "/": value // n if n else 0}[op]
            chain.append((op, n))
        if 0 <= value <= max_target:
            return numbers, value, chain


def chain_expression(chain: list) -> str:
    """((a op b) op c) as text: chain_expression([19, ('+', 44), ('-', 35)]) == '(19 + 44) - 35'."""
    expr = str(chain[0])
    for i, (op, n) in enumerate(chain[1:]):
        expr = f"({expr}) {op} {n}" if i > 0 else f"{expr} {op} {n}"
    return expr


def countdown_prompt(numbers: list[int], target: int) -> str:
    """The paper's user prompt, verbatim (spec section 6)."""
    return (f"Using the numbers {numbers}, create an equation that equals {target}. You can use basic arithmetic "
            f"operations (+, -, *, /) and each number can only be used once. {THINK_ANSWER_INSTRUCTION}, "
            f"for example <answer> (1 + 2) / 3 </answer>.")


# ---------------------------------------------------------------- the grader: a safe arithmetic parser
MAX_EXPRESSION_CHARS = 512
MAX_NESTING = 50  # parentheses plus unary signs; keeps recursion far below Python's limit
MAX_LITERAL_DIGITS = 12
MAX_MAGNITUDE = 10**60  # bound on |numerator| and denominator of every intermediate value

_DIGITS = "0123456789"  # str.isdigit() would also accept '٣' and '３'
_OPERATORS = "+-*/()"


class _Reject(Exception):
    """Internal: the expression is outside the grammar or a bound; safe_arith turns it into None."""


def _tokenize(expr: str) -> list[int | str]:
    """Split into int literals and single-character operators; spaces separate, anything else rejects.

    Example: _tokenize("(19 + 44) - 35") == ['(', 19, '+', 44, ')', '-', 35]
    """
    tokens: list[int | str] = []
    i, n = 0, len(expr)
    while i < n:
        ch = expr[i]
        if ch == " ":
            i += 1
        elif ch in _OPERATORS:
            tokens.append(ch)
            i += 1
        elif ch in _DIGITS:
            j = i
            while j < n and expr[j] in _DIGITS and j - i <= MAX_LITERAL_DIGITS:  # stop early on huge literals
                j += 1
            literal = expr[i:j]
            if len(literal) > MAX_LITERAL_DIGITS or (len(literal) > 1 and literal[0] == "0"):
                raise _Reject
            tokens.append(int(literal))
            i = j
        else:
            raise _Reject
    return tokens


class _Parser:
    """Recursive descent over the token list; collects the literals it reads (for the multiset check)."""

    def __init__(self, tokens: list[int | str]):
        self.tokens = tokens
        self.pos = 0
        self.literals: list[int] = []

    def peek(self) -> int | str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self) -> int | str | None:
        token = self.peek()
        self.pos += 1
        return token

    def expr(self, depth: int) -> Fraction:
        value = self.term(depth)
        while self.peek() in ("+", "-"):
            op = self.take()
            right = self.term(depth)
            value = _bounded(value + right if op == "+" else value - right)
        return value

    def term(self, depth: int) -> Fraction:
        value = self.factor(depth)
        while self.peek() in ("*", "/"):
            op = self.take()
            right = self.factor(depth)
            if op == "/" and right == 0:
                raise _Reject
            value = _bounded(value * right if op == "*" else value / right)
        return value

    def factor(self, depth: int) -> Fraction:
        if depth >= MAX_NESTING:
            raise _Reject
        token = self.take()
        if token in ("+", "-"):
            value = self.factor(depth + 1)
            return -value if token == "-" else value
        if token == "(":
            value = self.expr(depth + 1)
            if self.take() != ")":
                raise _Reject
            return value
        if isinstance(token, int):
            self.literals.append(token)
            return Fraction(token)
        raise _Reject  # ')', a binary operator, or end of input where a number belongs


def _bounded(value: Fraction) -> Fraction:
    """value itself, or a reject once its numerator or denominator passes MAX_MAGNITUDE (stops 9*9*...*9)."""
    if abs(value.numerator) > MAX_MAGNITUDE or value.denominator > MAX_MAGNITUDE:
        raise _Reject
    return value


def evaluate_expression(expr: str, max_len: int = MAX_EXPRESSION_CHARS) -> tuple[Fraction, list[int]] | None:
    """(exact value, integer literals in order) of an arithmetic expression, or None if rejected: a character
    other than ASCII digits, + - * / ( ) and ' ', a syntax error ('**', '//', '2(3)'), division by zero, a cap
    passed (module docstring). Example: "(19 + 44) - 35" -> (Fraction(28), [19, 44, 35]); "2 ** 3" -> None."""
    if len(expr) > max_len:
        return None
    try:
        parser = _Parser(_tokenize(expr))
        value = parser.expr(depth=0)
        if parser.peek() is not None:  # e.g. a stray ')' or a second number
            return None
        return value, parser.literals
    except _Reject:
        return None


def safe_arith(expr: str, max_len: int = MAX_EXPRESSION_CHARS) -> Fraction | None:
    """Exact value of an arithmetic expression under the grammar of the module docstring, or None.

    Example: safe_arith("7 / 2 - -1") == Fraction(9, 2); safe_arith("1 / (2 - 2)") is None;
             safe_arith("9**9**9") is None; safe_arith("３ + 1") is None (fullwidth digit).
    """
    result = evaluate_expression(expr, max_len)
    return None if result is None else result[0]


def countdown_reward(completion: str, numbers: list[int], target: int) -> float:
    """0.0 (bad format), 0.1 (formatted, wrong) or 1.0 (correct) for the text generated after the "<think>" prefill;
    never raises for a str. Example, numbers [44, 19, 35], target 28: an answer "<answer> (19 + 44) - 35 </answer>"
    after " 19 + 44 = 63, 63 - 35 = 28</think>\\n" -> 1.0; "<answer> 44 - 19 </answer>" -> 0.1 (35 unused)."""
    if not isinstance(completion, str):
        raise TypeError(f"completion must be str, got {type(completion).__name__}; decode tokens first")
    answer = parse_think_answer(completion)
    if answer is None:
        return 0.0
    result = evaluate_expression(answer)
    if result is None:
        return FORMAT_REWARD
    value, literals = result
    if sorted(literals) != sorted(numbers) or value != target:
        return FORMAT_REWARD
    return FORMAT_REWARD + ANSWER_REWARD


class CountdownTask(Task):
    name = "countdown"
    num_levels = 4
    has_ood = True
    format_reward = 0.1

    def __init__(self, seed: int = 0):
        self.seed = seed

    def problem(self, level: int, index: int, split: str = "train") -> Problem:
        if not 0 <= level < len(NUMBERS_PER_LEVEL) or split not in _SPLIT_SALT:
            raise ValueError(f"countdown has levels 0..{len(NUMBERS_PER_LEVEL) - 1} and splits 'train', 'test'; "
                             f"got level {level}, split {split!r}")
        # One RNG per problem: string seeds hash deterministically (sha512) across processes.
        rng = random.Random(f"countdown/{self.seed}/{_SPLIT_SALT[split]}/{level}/{index}")
        numbers, target, chain = generate_countdown(rng, NUMBERS_PER_LEVEL[level])
        data = {"numbers": numbers, "target": target, "chain": chain}
        return Problem(level, index, countdown_prompt(numbers, target), data)

    def score(self, problem: Problem, completion: str) -> float:
        return countdown_reward(completion, problem.data["numbers"], problem.data["target"])

    def demonstration(self, problem: Problem) -> str:
        """A short think trace of the chain's steps, then the answer, ending right after </answer>.

        Example: " 19 + 44 = 63, 63 - 35 = 28.</think>\n<answer> (19 + 44) - 35 </answer>"
        """
        chain = problem.data["chain"]
        value, steps = chain[0], []
        for op, n in chain[1:]:
            new = {"+": value + n, "-": value - n, "*": value * n, "/": value // n if n else 0}[op]
            steps.append(f"{value} {op} {n} = {new}")
            value = new
        return f" {', '.join(steps)}.</think>\n<answer> {chain_expression(chain)} </answer>"
