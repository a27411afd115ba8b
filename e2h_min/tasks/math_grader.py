r"""Checking a MATH answer against the gold answer (spec section 7): extract, normalise, compare.

1. Extract (`extract_boxed_answer`): the content of the last \boxed{...} (or \fbox{...}) in the answer text, or the
   whole answer text when it has no box (the prompt asks for a box; a bare answer is accepted, not punished).
2. Normalise (`normalize_math_answer`, Minerva-style): drop $ and \( \) delimiters, \left \right, spacing
   commands, \displaystyle, degree signs, percent signs, \text{...} wrappers (keeping the text), trailing units
   ("5 cm", "12 square inches"), a "x =" or "x \in" prefix (two answers that both name a variable must name the
   same one), trailing '.', whitespace; \dfrac -> \frac; \frac12 -> \frac{1}{2}; thousands separators (an
   unspaced "1,000"; "1, 100" is a list); "(C)" -> "C"; a mixed number 2\frac{1}{4} -> (2+\frac{1}{4}). Equal
   normal forms are a match. An answer written as words in \text{} ("\text{odd}") is compared as text only, without
   case. One \pm is the list of its two values (1\pm\sqrt2 == "1+\sqrt2, 1-\sqrt2").
3. Compare values. Both normal forms are parsed with a small LaTeX grammar of our own (never eval, never sympify):
       expr  := term (('+' | '-') term)*
       term  := unary (('*' | \cdot | \times | '/' | \div)? unary)*        (no operator = implicit product)
       unary := ('+' | '-') unary | atom ('^' exponent)?
       atom  := number | letter | \alpha..\omega | \pi | \infty | '(' expr ')' | '{' expr '}'
                | \frac{expr}{expr} | \sqrt[expr]{expr}      (an argument may be one token, as in \frac\pi2)
   'i' is the imaginary unit, other letters are variables; two words of two or more letters ("odd", "even") are
   compared as text only. Then
   - two rational constants are compared exactly (fractions.Fraction): 0.5 == \frac{1}{2} == 2/4;
   - otherwise both are evaluated with mpmath at 40 significant digits, as constants (\frac{\sqrt2}{2} ==
     \frac{1}{\sqrt2}) or at 3 fixed points of their variables ((x+1)^2 == x^2+2x+1), and must agree within a
     relative 1e-20 wherever both are defined; +-\infty only equals itself. A power whose exponent the precision
     cannot hold (a rational one longer than it; any too large for a negative or complex base) has no value.
   Tuples and intervals match element by element with the same brackets; bare comma lists ("1, 2"), sets
   (\{1, 2\}, equal to the list "1, 2"; \{2\} is 2) and \cup unions as multisets.

Why numeric identity testing, not sympy. The usual check, sympy.simplify(a - b) == 0, has no time bound, and even
sympy's evalf is exponential in nesting on some inputs (we measured 20 nested divisions at 38 s). Our evaluator
does one fixed-precision mpmath operation per tree node, so its time is linear in the (capped) input. The cost is
that equality of expressions with variables is probabilistic (agreement at 3 generic points), which is the
standard polynomial-identity trade-off; a false match needs two different MATH answers to agree to 20 digits at
all three points. mpmath ships with sympy (pip install sympy, or pip install mpmath) and is optional: without it
step 3 keeps the exact rational comparison and warns once that radicals, pi and variables are compared as
normalised strings only.

Time bound. Step 3 runs only on normal forms of at most MAX_VALUE_CHARS characters with at most MAX_ELEMENTS
elements; the grammar caps nesting depth and literal length and refuses powers and indexed roots inside exponents
and root indices (no towers such as 9^{9^{9}} or 2^{\sqrt[10^{-10}]{10}}). A cooperative deadline (checked between
elements) and, in the main thread, a SIGALRM timer (setitimer, only when no other real-time timer is set) stop the
step at `time_limit` seconds (default 1 s); other threads rely on the input caps alone. A timeout or any
parse/evaluation failure means "not equal", never an exception.
"""

from __future__ import annotations

import contextlib
import re
import signal
import threading
import time
import warnings
from fractions import Fraction

MAX_ANSWER_CHARS = 2000  # longer answers are compared unnormalised (no real MATH answer comes close)
MAX_VALUE_CHARS = 300  # normal forms longer than this skip step 3
MAX_ELEMENTS = 16  # tuple / list / set elements compared in step 3
MAX_DEPTH = 40  # parser recursion
MAX_LITERAL_DIGITS = 30
MAX_RATIONAL_BITS = 4096  # exact arithmetic gives up (-> mpmath) past this numerator/denominator size
SYMBOLIC_TIME_LIMIT_S = 1.0
EVAL_DIGITS = 40  # significant digits of the numeric comparison
RELATIVE_TOLERANCE = Fraction(1, 10**20)

# ----------------------------------------------------------------------------------------------------------------
# 1. Extraction


def extract_boxed_answer(text: str) -> str | None:
    r"""Content of the last \boxed{...} / \fbox{...} in `text`; the whole stripped text if there is none.

    None when the last box is never closed. Braces escaped as \{ \} do not count as grouping.
    Example: extract_boxed_answer(r"so \boxed{\frac{1}{2}}.") == r"\frac{1}{2}";
             extract_boxed_answer("42") == "42"; extract_boxed_answer(r"\boxed 7") == "7";
             extract_boxed_answer(r"\boxed{1") is None
    """
    start, command = max((text.rfind(c), c) for c in ("\\boxed", "\\fbox"))
    if start < 0:
        return text.strip()
    i = start + len(command)
    if text.startswith("{", i):
        return _braced_content(text, i)
    rest = text[i:].split("$")[0].split()  # "\boxed 7": the next word
    return rest[0] if rest else None


def _braced_content(text: str, open_at: int) -> str | None:
    r"""Text between the '{' at open_at and its matching '}'; None if unmatched or longer than MAX_ANSWER_CHARS.

    Example: _braced_content("{a{b}}c", 0) == "a{b}"
    """
    depth, i, end = 0, open_at, min(len(text), open_at + MAX_ANSWER_CHARS + 2)
    while i < end:
        ch = text[i]
        if ch == "\\":
            i += 2  # an escaped character (\{, \}, \\) never opens or closes a group
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[open_at + 1:i]
        i += 1
    return None


# ----------------------------------------------------------------------------------------------------------------
# 2. Normalisation

_UNIT_WORDS = (
    "units unit square squared sq cubic cm mm km meters meter metres metre centimeters centimeter kilometers "
    "inches inch feet foot ft yards yard miles mile mph seconds second minutes minute hours hour days day weeks "
    "week months month years year dollars dollar cents cent degrees degree pounds pound ounces ounce grams gram "
    "kilograms kg liters liter litres litre gallons gallon points point ways people students digits digit edges "
    "edge integers integer multiples meals"
).split()
_TRAILING_UNIT = re.compile(r"(?<=[\d})\s])\s*(?:" + "|".join(_UNIT_WORDS) + r")(?:\^\{?[23]\}?)?\s*$")
_TEXT_COMMANDS = r"\\(?:text|textbf|textit|textrm|textnormal|textup|mbox|mathrm|mathbf|mathit|mathsf|rm|bf)"
_TEXT_WRAPPER = re.compile(_TEXT_COMMANDS + r"\s*\{([^{}]*)\}")
_SIZING = re.compile(r"\\(?:left|right|bigl|bigr|Bigl|Bigr|biggl|biggr|big|Big|bigg|Bigg)(?![a-zA-Z])")
_SPACING = re.compile(r"(?<!\\)\\[!,;: ]|\\q?quad(?![a-zA-Z])|\\displaystyle(?![a-zA-Z])|~")
_DEGREES = re.compile(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|\\circ(?![a-zA-Z])|\\degree(?![a-zA-Z])|°")
_RELATION = re.compile(r"=|\\in(?![a-zA-Z])")
_VARIABLE_PREFIX = re.compile(r"^(?:[a-zA-Z]|\\[a-zA-Z]+)(?:_\{?[a-zA-Z0-9]+\}?)?(?:=|\\in(?![a-zA-Z]))(?=.)")


def normalize_math_answer(answer: str) -> str:
    r"""Minerva-style normal form of a final answer, so that equal answers written differently compare equal.

    See the module docstring for the list of rewrites. Over-long inputs (> MAX_ANSWER_CHARS) are only stripped.
    Example: normalize_math_answer(r"$x = \dfrac{1}{2}$.") == r"\frac{1}{2}";
             normalize_math_answer(r"12\text{ square inches}") == "12";
             normalize_math_answer(r"\left( 1, 2 \right]") == "(1,2]"; normalize_math_answer("90^\circ") == "90"
    """
    return _normal_form(answer)[1]


def _normal_form(answer: str) -> tuple[str, str]:
    r"""(the variable a leading "x =" or "x \in" named, or "", the normal form). Example: "y = 2x" -> ("y", "2x")."""
    s = answer.strip().replace("\u2212", "-")
    if len(s) > MAX_ANSWER_CHARS:
        return "", s
    s = re.sub(r"\s+", " ", s)  # one space per blank run keeps every later \s* short (no quadratic regex time)
    s = _strip_text_and_units(_strip_markup(s))
    if re.fullmatch(r" ?-?\d{1,3}(?:,\d{3})+(?:\.\d+)?\.? ?", s):  # "1,000" is one number; "1, 100" (spaced) two
        s = s.replace(",", "")
    s = _drop_spaces(s).rstrip(".")
    prefix = _VARIABLE_PREFIX.match(s) if len(_RELATION.findall(s)) == 1 else None  # "x = 5", "x \in [2, 5)"
    variable = _RELATION.split(prefix.group())[0] if prefix else ""
    s = s[prefix.end():] if prefix else s
    return variable, re.sub(r"^\(([A-Za-z])\)$", r"\1", _canonical_numbers(s))  # "(C)" -> "C"


def _strip_markup(s: str) -> str:
    r"""Drop whole-answer boxes, $ and \( \) delimiters, \left \right, spacing commands, degree and percent signs.

    Example: _strip_markup(r"$\left( 90^\circ, 5\% \right)$") == "( 90, 5 )"
    """
    while s.startswith(("\\boxed{", "\\fbox{")) and _braced_content(s, s.index("{")) == s[s.index("{") + 1:-1]:
        s = s[s.index("{") + 1:-1].strip()
    s = re.sub(r"^\$+|\$+$|^\\[(\[]|\\[)\]]$", "", s.strip()).replace("\\$", "").replace("$", "")
    s = _SIZING.sub("", re.sub(r"\\(?:left|right)\.", "", s))
    s = re.sub(r"(?<=\d),\\!(?=\d{3})", ",", s)  # MATH's thousands separator "10,\!000": no space, so one number
    s = _SPACING.sub(" ", s)
    s = re.sub(r"\\[dt](frac|binom)(?![a-zA-Z])", r"\\\1", s)
    return _DEGREES.sub("", s).replace("\\%", "").replace("%", "")


def _strip_text_and_units(s: str) -> str:
    r"""\text{ and } -> ','; unwrap \text{...}-like wrappers (keeping their text); drop trailing unit words.

    Example: _strip_text_and_units(r"12\text{ square inches}") == "12";
             _strip_text_and_units(r"\text{Tuesday}") == "Tuesday"
    """
    s = re.sub(r",?\s*\\(?:text|mbox)\{\s*and\s*\}\s*", ",", s)
    while True:  # innermost wrappers first, until none is left
        unwrapped = _TEXT_WRAPPER.sub(r"\1", s)
        if unwrapped == s:
            break
        s = unwrapped
    while True:  # one unit word per pass, from the end
        unit = _TRAILING_UNIT.search(s, max(0, len(s) - 40))  # units are short: look at the tail only
        if unit is None or not s[:unit.start()].strip():
            return s
        s = s[:unit.start()]


def _canonical_numbers(s: str) -> str:
    r"""\frac12 -> \frac{1}{2}, \sqrt2 -> \sqrt{2}, 1{,}000 -> 1000, .5 -> 0.5, 2.50 -> 2.5.

    Example: _canonical_numbers(r"\frac12+\sqrt3") == r"\frac{1}{2}+\sqrt{3}"
    """
    s = re.sub(r"\\frac ?(\d)(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac ?(\d)\{", r"\\frac{\1}{", s)
    s = re.sub(r"\\frac\{([^{}]*)\} ?(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\sqrt ?([0-9a-zA-Z])", r"\\sqrt{\1}", s)
    s = s.replace("{,}", "")
    s = re.sub(r"(?<![\d}])\.(\d)", r"0.\1", s)
    if re.fullmatch(r"-?\d+\.\d*", s):
        s = s.rstrip("0").rstrip(".")
    return _MIXED_NUMBER.sub(_mixed_number, s)


# A whole number written right before a proper fraction of whole numbers is a mixed number (MATH's golds write
# "137\frac{1}{2}" for 137 1/2), not a product: read as a product, 68.5 would score and 275/2 would not.
_MIXED_NUMBER = re.compile(r"(?<![\w.}\]^_\\])(\d+)\\frac\{(\d+)\}\{(\d+)\}(?![\w{^(]|\\(?!\}))")  # \} may follow


def _mixed_number(match: re.Match) -> str:
    r"""2\frac{1}{4} -> (2+\frac{1}{4}) when the fraction is proper (1 <= numerator < denominator); else unchanged.

    Example: _MIXED_NUMBER.sub(_mixed_number, r"-2\frac{1}{4}") == r"-(2+\frac{1}{4})"
    """
    whole, numerator, denominator = match.groups()
    if not 0 < int(numerator) < int(denominator):
        return match.group(0)
    return f"({whole}+\\frac{{{numerator}}}{{{denominator}}})"


def _drop_spaces(s: str) -> str:
    r"""Remove whitespace, except one space where a command meets a letter ("\pi r" must not become "\pir").

    Example: _drop_spaces(r" 2 \pi r ^ 2 ") == r"2\pi r^2"; _drop_spaces(r"\frac 1 2") == r"\frac12"
    """
    def replace(match: re.Match) -> str:
        command = match.group(1) or ""
        before_letter = s[match.end():match.end() + 1].isalpha()
        return command + " " if command and before_letter else command

    return re.sub(r"(\\[a-zA-Z]+)?\s+", replace, s)


# ----------------------------------------------------------------------------------------------------------------
# 3a. Parsing a normal form into a small expression tree (tuples), never through eval

_TOKEN = re.compile(r"\s+|[0-9]+(?:\.[0-9]+)?|\.[0-9]+|\\[a-zA-Z]+|\\[{}]|.", re.DOTALL)
_NUMBER_START = set("0123456789.")  # ASCII only: str.isdigit() is also true for '²' and '٣' 
_GREEK = frozenset(
    "alpha beta gamma delta epsilon varepsilon zeta eta theta vartheta iota kappa lambda mu nu xi rho sigma tau "
    "upsilon phi varphi chi psi omega Gamma Delta Theta Lambda Xi Sigma Phi Psi Omega".split())
_PRODUCT = {"*", "\\cdot", "\\times"}
_QUOTIENT = {"/", "\\div"}
_ATOM_START = {"(", "{", "\\frac", "\\sqrt", "\\pi", "\\infty"} | {"\\" + g for g in _GREEK}


class _Unparsable(Exception):
    """Internal: the text is outside the grammar or a bound; parse_math_expression returns None."""


def parse_math_expression(text: str) -> tuple | None:
    r"""Expression tree of a normalised answer under the module grammar, or None if outside it.

    Nodes: ("num", Fraction), ("var", name), ("pi",), ("inf",), ("i",), ("add"|"sub"|"mul"|"div"|"pow", a, b),
    ("neg", a), ("root", radicand, index or None).
    Example: parse_math_expression(r"2\sqrt{3}") == ("mul", ("num", Fraction(2)), ("root", ("num", Fraction(3)), None))
             parse_math_expression(r"\sin x") is None   (functions are outside the grammar)
    """
    if not text or len(text) > MAX_VALUE_CHARS or re.search(r"\d\.\d*\.", text):  # "2.5.3" is no number
        return None
    tokens = [t for t in _TOKEN.findall(text) if not t.isspace()]
    try:
        parser = _Parser(tokens)
        tree = parser.expr(0)
        return tree if parser.pos == len(tokens) else None
    except (_Unparsable, IndexError):
        return None


class _Parser:
    """Recursive descent over the token list of the grammar in the module docstring."""

    def __init__(self, tokens: list[str]):
        self.tokens, self.pos = tokens, 0

    def peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self, expected: str | None = None) -> str:
        token = self.tokens[self.pos]  # IndexError at the end: the caller treats it as unparsable
        if expected is not None and token != expected:
            raise _Unparsable
        self.pos += 1
        return token

    def expr(self, depth: int) -> tuple:
        if depth > MAX_DEPTH:
            raise _Unparsable
        tree = self.term(depth)
        while self.peek() in ("+", "-"):
            op = "add" if self.take() == "+" else "sub"
            tree = (op, tree, self.term(depth))
        return tree

    def term(self, depth: int) -> tuple:
        tree = self.unary(depth)
        while True:
            token = self.peek()
            if token in _PRODUCT or token in _QUOTIENT:
                self.take()
                tree = ("mul" if token in _PRODUCT else "div", tree, self.unary(depth))
            elif token is not None and (token in _ATOM_START or token[0] in _NUMBER_START or token.isalpha()):
                tree = ("mul", tree, self.power(depth))  # implicit product: 2x, 2\pi, x(x+1)
            else:
                return tree

    def unary(self, depth: int) -> tuple:
        if depth > MAX_DEPTH:
            raise _Unparsable
        if self.peek() in ("+", "-"):
            sign = self.take()
            operand = self.unary(depth + 1)
            return ("neg", operand) if sign == "-" else operand
        return self.power(depth)

    def power(self, depth: int) -> tuple:
        base = self.atom(depth)
        if self.peek() != "^":
            return base
        self.take()
        exponent = self.unary(depth + 1)  # x^23 and x^0.5 read as x^{23}, x^{0.5}: how answers typed as text mean it
        if _raises_to_a_power(exponent) or self.peek() == "^":
            raise _Unparsable  # towers like 9^{9^{9}} are refused: their values cannot be bounded
        return ("pow", base, exponent)

    def atom(self, depth: int) -> tuple:
        token = self.take()
        if token[0] in _NUMBER_START and token != ".":
            digits = token.replace(".", "")
            if len(digits) > MAX_LITERAL_DIGITS:
                raise _Unparsable
            return ("num", Fraction(token))
        if len(token) == 1 and token.isascii() and token.isalpha():
            return ("i",) if token == "i" else ("var", token)
        if token in ("(", "{"):
            inner = self.expr(depth + 1)
            self.take(")" if token == "(" else "}")
            return inner
        if token == "\\frac":
            return ("div", self.group(depth), self.group(depth))
        if token == "\\sqrt":
            index = None
            if self.peek() == "[":
                self.take()
                index = self.expr(depth + 1)
                self.take("]")
                if _raises_to_a_power(index):  # the index is an exponent too: \sqrt[n]{x} = x^{1/n}
                    raise _Unparsable
            return ("root", self.group(depth), index)
        if token == "\\pi":
            return ("pi",)
        if token == "\\infty":
            return ("inf",)
        if token[1:] in _GREEK and token[0] == "\\":
            return ("var", token[1:])
        raise _Unparsable

    def group(self, depth: int) -> tuple:
        r"""A braced argument, or as in LaTeX one token: a digit, a letter or a constant (\frac\pi2)."""
        if self.peek() != "{":
            token = self.peek()
            if token is None or not (len(token) == 1 and token.isascii() and token.isalnum()
                                     or token in ("\\pi", "\\infty") or token[1:] in _GREEK):
                raise _Unparsable  # a longer number such as \frac\pi23 would be 2 then 3 in LaTeX: refused
            return self.atom(depth)
        self.take("{")
        inner = self.expr(depth + 1)
        self.take("}")
        return inner


def _raises_to_a_power(tree: tuple) -> bool:
    r"""True if the tree has a power or a root with an index (x^{1/n}). Neither may stand in an exponent or a
    root's index: there they make numbers of unbounded size, such as 9^{9^{9}} or 2^{\sqrt[10^{-10}]{10}}
    (2 to the 10^{10^{10}}, which mpmath would spend gigabytes on), so the parser refuses them.
    Example: _raises_to_a_power(parse_math_expression(r"\sqrt[3]{2}")) is True; ... r"\sqrt{2}" ... is False"""
    return _contains(tree, lambda node: node[0] == "pow" or (node[0] == "root" and node[2] is not None))


def _contains(tree: tuple, test) -> bool:
    """True if any node of `tree` passes test(node). Example: _contains(("neg", ("inf",)), _is("inf")) is True."""
    return test(tree) or any(isinstance(child, tuple) and _contains(child, test) for child in tree[1:])


def _is(kind: str):
    return lambda node: node[0] == kind


# ----------------------------------------------------------------------------------------------------------------
# 3b. Values: exact rationals first, then numeric evaluation with mpmath


def rational_value(tree: tuple) -> Fraction | None:
    r"""Exact value of a tree that only uses numbers, + - * / and integer powers; None otherwise.

    None also for division by zero and for numbers past MAX_RATIONAL_BITS (the caller then evaluates numerically).
    Example: rational_value(parse_math_expression(r"\frac{3}{6}+0.25")) == Fraction(3, 4)
             rational_value(parse_math_expression(r"\sqrt{2}")) is None
    """
    kind = tree[0]
    if kind == "num":
        return tree[1]
    if kind == "neg":
        value = rational_value(tree[1])
        return None if value is None else -value
    if kind not in ("add", "sub", "mul", "div", "pow"):
        return None
    left, right = rational_value(tree[1]), rational_value(tree[2])
    if left is None or right is None:
        return None
    if kind == "pow":
        if right.denominator != 1 or (left == 0 and right < 0):
            return None
        size = max(left.numerator.bit_length(), left.denominator.bit_length())
        if size * abs(right.numerator) > MAX_RATIONAL_BITS:
            return None
        value = left ** right.numerator
    elif kind == "div":
        if right == 0:
            return None
        value = left / right
    else:
        value = {"add": left + right, "sub": left - right, "mul": left * right}[kind]
    if max(value.numerator.bit_length(), value.denominator.bit_length()) > MAX_RATIONAL_BITS:
        return None
    return value


_mpmath_module = None
_mpmath_checked = False
_contexts = threading.local()  # one private mpmath context per thread: mpmath's global `mp` is shared state


def load_mpmath():
    """The mpmath module (it comes with sympy), or None, warning once, when it is not installed."""
    global _mpmath_module, _mpmath_checked
    if not _mpmath_checked:
        _mpmath_checked = True
        try:
            import mpmath
            _mpmath_module = mpmath
        except ImportError:
            warnings.warn("mpmath is not installed: MATH answers with radicals, pi or variables are compared as "
                          "normalised strings only (pip install sympy, which brings mpmath)", stacklevel=2)
    return _mpmath_module


def _context(mpmath):
    """This thread's mpmath context, working at EVAL_DIGITS significant digits."""
    ctx = getattr(_contexts, "ctx", None)
    if ctx is None:
        ctx = _contexts.ctx = mpmath.MPContext()
        ctx.dps = EVAL_DIGITS
    return ctx


def evaluate(tree: tuple, ctx, values: dict):
    r"""Numeric value of a tree: one fixed-precision mpmath operation per node, so time is linear in its size.

    Roots are principal (complex for negative radicands) except odd integer roots of negative reals, which are
    real: \sqrt[3]{-8} = -2. Raises (ZeroDivisionError, ...) where the value is undefined, and ValueError for
    a rational exponent longer than the working precision (its rounding would change the value past any tolerance).
    Example: evaluate(parse_math_expression(r"x^2+\frac{1}{2}"), ctx, {"x": 3}) == 9.5
    """
    kind = tree[0]
    if kind == "num":
        return ctx.mpf(tree[1].numerator) / tree[1].denominator
    if kind == "var":
        return values[tree[1]]
    if kind in ("pi", "inf", "i"):
        return {"pi": ctx.pi, "inf": ctx.inf, "i": ctx.mpc(0, 1)}[kind]
    if kind == "neg":
        return -evaluate(tree[1], ctx, values)
    if kind == "root":
        radicand = evaluate(tree[1], ctx, values)
        index = 2 if tree[2] is None else evaluate(tree[2], ctx, values)
        odd = ctx.isint(index) and int(index) % 2 == 1
        if odd and ctx.im(radicand) == 0 and ctx.re(radicand) < 0:
            return -ctx.power(-radicand, 1 / ctx.mpf(index))
        return _power(radicand, 1 / ctx.convert(index), ctx)
    left, right = evaluate(tree[1], ctx, values), evaluate(tree[2], ctx, values)
    if kind == "add":
        return left + right
    if kind == "sub":
        return left - right
    if kind == "mul":
        return left * right
    if kind == "div":
        return left / right
    exact = rational_value(tree[2])
    if exact is not None and max(exact.numerator.bit_length(), exact.denominator.bit_length()) > ctx.prec - 8:
        raise ValueError("an exponent the working precision cannot hold")  # rounded, (-1)^{even + 1} would be 1
    return _power(left, right, ctx)


def _power(base, exponent, ctx):
    """base^exponent, refused (ValueError) when a negative or complex base meets an exponent too large for the
    working precision: the result's phase, pi * exponent for base -1, is then lost to rounding, and
    (-1)^{sqrt(2) * 10^59} would come out exactly 1."""
    if not (ctx.im(base) == 0 and ctx.re(base) >= 0) and abs(exponent) >= ctx.mpf(2) ** (ctx.prec - 8):
        raise ValueError("an exponent the working precision cannot hold")
    return ctx.power(base, exponent)


def _variables(tree: tuple) -> set[str]:
    """Names of the variables in a tree. Example: _variables(parse_math_expression("x^2+y")) == {"x", "y"}."""
    if tree[0] == "var":
        return {tree[1]}
    return set().union(*(_variables(child) for child in tree[1:] if isinstance(child, tuple)))


def _test_point(names: list[str], point: int, ctx) -> dict:
    """Fixed, unremarkable values for the variables at test point 0, 1, 2 (never 0, +-1 or an integer)."""
    return {name: ctx.mpf((-1) ** point * (1000 + 739 * k + 1291 * point)) / 1009 for k, name in enumerate(names)}


def _numbers_close(x, y, ctx) -> bool | None:
    """Equal within RELATIVE_TOLERANCE of max(1, |x|, |y|) (complex allowed); None if either is not finite."""
    if not (ctx.isfinite(x) and ctx.isfinite(y)):
        return None
    scale = max(ctx.mpf(1), abs(x), abs(y))
    return abs(x - y) <= scale * RELATIVE_TOLERANCE.numerator / RELATIVE_TOLERANCE.denominator


def _values_equal(a: tuple, b: tuple, mpmath) -> bool:
    """Numeric identity test: equal at EVAL_DIGITS (constants) or at every test point (variables) where both are
    defined and, if they differ there, both real; at least one test point must agree."""
    ctx = _context(mpmath)
    names = sorted(_variables(a) | _variables(b))
    verdicts = []
    for point in range(3 if names else 1):
        values = _test_point(names, point, ctx)
        try:
            value_a, value_b = evaluate(a, ctx, values), evaluate(b, ctx, values)
            verdict = _numbers_close(value_a, value_b, ctx)
        except (ZeroDivisionError, ValueError, OverflowError):
            verdict = None  # undefined at this point (e.g. 1/(x-x)); try the others
        if verdict is False and names and (ctx.im(value_a) != 0 or ctx.im(value_b) != 0):
            verdict = None  # off the real domain two forms may take other branches: \sqrt{8x^3}, 2x\sqrt{2x} at x < 0
        if verdict is False:
            return False
        verdicts.append(verdict)
    return True in verdicts


def _infinity_sign(tree: tuple) -> int:
    r"""+1 for \infty, -1 for -\infty (any number of signs), 0 for anything else. Example: --\infty -> +1."""
    if tree[0] == "neg":
        return -_infinity_sign(tree[1])
    return 1 if tree[0] == "inf" else 0


def _is_word(s: str) -> bool:
    """Two or more ASCII letters and nothing else. Example: _is_word("odd") is True; _is_word("2x") is False."""
    return len(s) > 1 and s.isascii() and s.isalpha()


def expressions_equal(a: str, b: str) -> bool:
    r"""True if two normalised single expressions are equal strings or have equal values (module docstring).

    Example: expressions_equal("0.5", r"\frac{1}{2}") is True; expressions_equal(r"2\sqrt{2}", r"\sqrt{8}") is
             True when mpmath is installed; expressions_equal("x", "y") is False.
    """
    if a == b:
        return True
    if _is_word(a) and _is_word(b):
        return False  # two words ("odd", "Tuesday") are compared as text: as products of letters "on" would be "no"
    tree_a, tree_b = parse_math_expression(a), parse_math_expression(b)
    if tree_a is None or tree_b is None:
        return False
    if _contains(tree_a, _is("inf")) or _contains(tree_b, _is("inf")):
        return _infinity_sign(tree_a) == _infinity_sign(tree_b) != 0  # only a bare +-infinity means anything
    exact_a, exact_b = rational_value(tree_a), rational_value(tree_b)
    if exact_a is not None and exact_b is not None:
        return exact_a == exact_b
    mpmath = load_mpmath()
    return mpmath is not None and _values_equal(tree_a, tree_b, mpmath)


# ----------------------------------------------------------------------------------------------------------------
# 3c. Structure: unions, tuples / intervals, sets and lists


def _split_top_level(s: str, separator: str) -> list[str]:
    r"""Split at `separator` outside all brackets. Example: _split_top_level("(1,2),3", ",") == ["(1,2)", "3"]."""
    parts, depth, start, i = [], 0, 0, 0
    while i < len(s):
        if s[i] in "([{":
            depth += 1
        elif s[i] in ")]}":
            depth -= 1
        elif depth == 0 and s.startswith(separator, i):
            parts.append(s[start:i])
            i += len(separator)
            start = i
            continue
        i += 1
    parts.append(s[start:])
    return parts


def _structure(s: str) -> tuple:
    r"""How an answer is compared, recursively: ("union", parts) | ("set", items) | ("seq", open, close, items)
    | ("list", items) | ("expr", text), where parts and items are structures again
    (a one-element set is its element).

    Example: _structure("(1,2]") == ("seq", "(", "]", [("expr", "1"), ("expr", "2")]);
             _structure("1,2") == ("list", [("expr", "1"), ("expr", "2")]); _structure("(3)") == ("expr", "(3)")
    """
    parts = _split_top_level(s, "\\cup")
    if len(parts) > 1:
        return ("union", [_structure(part) for part in parts])
    if s.startswith("\\{") and s.endswith("\\}") and len(s) >= 4 and _encloses(s, 2):
        items = [_structure(item) for item in _split_top_level(s[2:-2], ",")]
        return ("set", items) if len(items) > 1 else items[0]  # \{2\} names the one solution 2
    if s[:1] in "([" and s[-1:] in ")]" and len(s) > 1 and _encloses(s, 1):
        items = _split_top_level(s[1:-1], ",")
        if len(items) > 1:
            return ("seq", s[0], s[-1], [_structure(item) for item in items])
    items = _split_top_level(s, ",")
    return ("list", [_structure(item) for item in items]) if len(items) > 1 else ("expr", s)


def _encloses(s: str, width: int) -> bool:
    """True if the opening bracket (first `width` chars) closes only at the very end. Example: "(1)(2)" -> False."""
    depth = 0
    for ch in s[width:-width]:
        depth += (ch in "([{") - (ch in ")]}")
        if depth < 0:
            return False
    return depth == 0


def _multiset_kind(kind: str) -> str:
    return "list" if kind == "set" else kind


def _structures_equal(a: tuple, b: tuple, deadline: float) -> bool:
    """Same kind and brackets; tuples/intervals item by item in order, unions, sets and lists as multisets (a set
    may equal a list: "\\{2, 3\\}" and "2, 3" name the same solutions)."""
    if _multiset_kind(a[0]) != _multiset_kind(b[0]) or time.monotonic() > deadline:
        return False
    if a[0] == "expr":
        return expressions_equal(a[1], b[1])
    if a[0] == "seq" and a[1:3] != b[1:3]:
        return False
    items_a, items_b = a[-1], b[-1]
    if len(items_a) != len(items_b) or len(items_a) > MAX_ELEMENTS:
        return False
    if a[0] == "seq":
        return all(_structures_equal(x, y, deadline) for x, y in zip(items_a, items_b))
    unmatched = list(items_b)
    for x in items_a:
        match = next((i for i, y in enumerate(unmatched) if _structures_equal(x, y, deadline)), None)
        if match is None:
            return False
        unmatched.pop(match)
    return True


# ----------------------------------------------------------------------------------------------------------------
# The entry point


class _TimeLimitExceeded(Exception):
    pass


@contextlib.contextmanager
def _time_limit(seconds: float):
    """Raise _TimeLimitExceeded inside the block after `seconds` (SIGALRM): only in the main thread of a POSIX
    process whose real-time interval timer is free; elsewhere a no-op (the input caps then bound the work)."""
    usable = (hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
              and signal.getitimer(signal.ITIMER_REAL)[0] == 0.0)
    if not usable:
        yield
        return
    state = {"armed": True}

    def on_alarm(signum, frame):
        if state["armed"]:  # a late signal after the block has ended does nothing
            state["armed"] = False
            raise _TimeLimitExceeded

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        state["armed"] = False
        try:
            signal.setitimer(signal.ITIMER_REAL, 0)
        finally:
            signal.signal(signal.SIGALRM, previous)


# An answer written as words in \text{} ("\text{odd}", "\text{no solution}"): the other must be the same words.
_TEXT_ANSWER = re.compile(_TEXT_COMMANDS + r"\s*\{\s*[A-Za-z]+(?: [A-Za-z]+)*\s*\}")


_PLUS_MINUS = re.compile(r"\\(?:pm|mp)(?![a-zA-Z])")  # not \pmod


def _expand_plus_minus(s: str) -> str:
    r"""One \pm (or \mp) in an answer that is not a list: the list of its two values. Example: "1\pm\sqrt{2}" ->
    "1+\sqrt{2},1-\sqrt{2}"."""
    if len(_PLUS_MINUS.findall(s)) != 1 or _split_top_level(s, ",") != [s]:
        return s
    return f"{_PLUS_MINUS.sub('+', s)},{_PLUS_MINUS.sub('-', s)}"


def math_answers_equivalent(prediction: str, gold: str, time_limit: float = SYMBOLIC_TIME_LIMIT_S) -> bool:
    r"""True if the predicted final answer equals the gold one after normalisation, or in value (docstring).

    Both arguments are final answers (already taken out of \boxed{}). Never raises; a timeout means False.
    Example: math_answers_equivalent(r"\dfrac12", "0.5") is True; math_answers_equivalent("[1,2)", "(1,2)")
             is False; math_answers_equivalent(r"\text{(B)}", "B") is True
    """
    (pred_variable, pred), (ref_variable, ref) = _normal_form(prediction), _normal_form(gold)
    if pred_variable and ref_variable and pred_variable != ref_variable:
        return False  # "x = 2x + 3" is not "y = 2x + 3"
    if pred == ref:
        return True
    if any(_TEXT_ANSWER.fullmatch(_strip_markup(a.strip())) for a in (prediction, gold)):
        return pred.lower() == ref.lower()  # words: compared as text ("od^2" is not "odd", "{no}" not "on")
    pred, ref = _expand_plus_minus(pred), _expand_plus_minus(ref)
    if not pred or not ref or len(pred) > MAX_VALUE_CHARS or len(ref) > MAX_VALUE_CHARS:
        return False
    deadline = time.monotonic() + time_limit
    try:
        with _time_limit(time_limit):
            return _structures_equal(_structure(pred), _structure(ref), deadline)
    except Exception:  # _TimeLimitExceeded, RecursionError, or anything mpmath raises on odd input
        return False
