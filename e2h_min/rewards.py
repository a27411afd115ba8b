"""Format check and Countdown reward (spec section 7), written to be total and safe on any model output.

Format. The reward is checked on "<think>" + completion: the prompt's prefill ends in "<think>", and the
completion is the text generated after it. The text passes when
  - it starts with <think> and ends with </answer>; only whitespace may follow </answer> (the scored text is
    cut right after the first </answer>, even inside a merged token such as ">.", by
    evaluation.completion_texts, and an EOS token is never part of the decoded text);
  - each of <think>, </think>, <answer>, </answer> occurs exactly once (tags are case-sensitive), in that order;
  - the think content and the answer content are non-empty after stripping whitespace;
  - only whitespace lies between </think> and <answer>.

Countdown. 0.0 when the format fails, else 0.1 for the format plus 0.9 when the answer is correct, so the reward
is exactly 0.0, 0.1 or 1.0. Correct means: the answer is an arithmetic expression over ASCII digits,
+ - * / ( ) and the space character; its integer literals equal the given numbers as a multiset (each used exactly
once); and its exact rational value is within 1e-5 of the target (strictly, as the paper's code compares).
A division by zero, a syntax error or any other reject is simply a wrong answer (0.1): it never removes the
format reward.

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

from fractions import Fraction

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"

FORMAT_REWARD = 0.1  # a well-formatted answer, right or wrong
ANSWER_REWARD = 0.9  # added when the answer is correct: 0.1 + 0.9 == 1.0 exactly in float
TARGET_TOLERANCE = Fraction(1, 10**5)

MAX_EXPRESSION_CHARS = 512
MAX_NESTING = 50  # parentheses plus unary signs; keeps recursion far below Python's limit
MAX_LITERAL_DIGITS = 12
MAX_MAGNITUDE = 10**60  # bound on |numerator| and denominator of every intermediate value

_DIGITS = "0123456789"  # str.isdigit() would also accept '٣' and '３'
_OPERATORS = "+-*/()"


def parse_think_answer(completion: str) -> str | None:
    """The stripped answer text if "<think>" + completion is well formatted (module docstring), else None.

    Example: parse_think_answer(" 3 + 5 = 8</think>\\n<answer> 3 + 5 </answer>") == "3 + 5"
             parse_think_answer(" 3 + 5 = 8</think> so <answer> 3 + 5 </answer>") is None   (text between)
             parse_think_answer("</think><answer> 3 + 5 </answer>") is None                  (empty think)
    """
    text = (THINK_OPEN + completion).rstrip()
    if not text.endswith(ANSWER_CLOSE):
        return None
    if any(text.count(tag) != 1 for tag in (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)):
        return None
    think_end = text.index(THINK_CLOSE)
    answer_start = text.index(ANSWER_OPEN)
    if answer_start < think_end:  # <think> is at 0 and </answer> at the end, so this fixes the order
        return None
    think = text[len(THINK_OPEN):think_end]
    between = text[think_end + len(THINK_CLOSE):answer_start]
    answer = text[answer_start + len(ANSWER_OPEN):len(text) - len(ANSWER_CLOSE)]
    if not think.strip() or between.strip() or not answer.strip():
        return None
    return answer.strip()


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
    """(exact value, integer literals in reading order) of an arithmetic expression, or None if rejected.

    Rejected: characters other than ASCII digits, + - * / ( ) and ' '; syntax errors (this includes '**', '//'
    and '2(3)'); more than max_len characters; nesting deeper than MAX_NESTING; literals longer than
    MAX_LITERAL_DIGITS digits or with a leading zero; an intermediate value past MAX_MAGNITUDE; division by zero.
    Example: evaluate_expression("(19 + 44) - 35") == (Fraction(28), [19, 44, 35])
             evaluate_expression("2 ** 3") is None
    """
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
    """0.0 (bad format), 0.1 (formatted, wrong) or 1.0 (correct) for a Countdown completion.

    `completion` is the text generated after the prefill (which ends in "<think>"). Total over str: never
    raises for any string content. A non-str completion is a caller bug and raises TypeError.
    Example, numbers [44, 19, 35], target 28:
        " 19 + 44 = 63, 63 - 35 = 28</think>\\n<answer> (19 + 44) - 35 </answer>"  -> 1.0
        " ...</think>\\n<answer> 44 - 19 </answer>"  -> 0.1   (35 unused, value 25)
        " ...</think>\\n(19 + 44) - 35"             -> 0.0   (no answer tags)
    """
    if not isinstance(completion, str):
        raise TypeError(f"completion must be str, got {type(completion).__name__}; decode tokens first")
    answer = parse_think_answer(completion)
    if answer is None:
        return 0.0
    result = evaluate_expression(answer)
    if result is None:
        return FORMAT_REWARD
    value, literals = result
    if sorted(literals) != sorted(numbers) or abs(value - target) >= TARGET_TOLERANCE:
        return FORMAT_REWARD
    return FORMAT_REWARD + ANSWER_REWARD
