r"""GSM8K, MATH and AQuA: file-backed tasks whose difficulty levels come from the data (spec sections 2, 6, 7).

Data sources (the task's `data` argument, the CLI's --data):
- a JSONL file: one JSON object per line, blank lines skipped;
- a Parquet file (name ending in .parquet): needs pyarrow (or pandas with a Parquet engine);
- "hf:NAME[:CONFIG][@SPLIT]", e.g. "hf:openai/gsm8k:main@train": needs the `datasets` package and hub access.

Columns (others are ignored):
- GSM8K: question (str); answer (str whose gold number follows "####", as in the official files, or a plain
  number); level (optional, int 0..3 from the difficulty labelling); split (optional).
- MATH: problem (str); answer (str), or solution (str, gold = the content of its last \boxed{}); level
  ("Level 3" as in the official files, or int 1..5); split (optional).
- AQuA: question (str); options (list of str, "A)12" as in the official files, or unlabelled texts lettered
  A, B, ... in order); correct (the option letter); level (optional, 0..3); rationale (optional); split (optional).

Levels. MATH: official Level 1..4 are training levels 0..3 and Level 5 is the OOD level 4 (evaluation only); rows
marked "Level ?" (a handful in the official train set) are skipped and counted in `skipped_rows`. GSM8K and AQuA:
4 levels from the `level` column, no OOD. A file without a `level` column is ONE level (num_levels = 1, all rows
level 0): we do not invent difficulty labels; label the file first to get a curriculum. A column present in some
rows and not others is an error.

Splits. An explicit `split` column ("train", or "test" / "eval") pins each row. Without it a row is a test row when
the SHA-256 of its question text falls in the first TEST_FRACTION (5%) of the hash range: stable under row
reordering and across seeds, and duplicate questions always land on the same side. problem(level, index, split)
is the index-th row of that (split, level) in file order; the curriculum sampler does the shuffling.

Errors. A missing file, a bad JSON line, a missing or malformed column, or no rows at all raises TaskDataError with
one line naming the file (and line), what is wrong and the expected columns.

Rewards: 0.0 when the format fails (e2h_min.tasks.rewards.parse_think_answer), else 0.1, plus 0.9 when correct:
- GSM8K: the first number of the answer text (commas removed; a '-' right before it is its sign unless a letter
  or digit precedes the '-') is within 1e-5 of the gold number.
- AQuA: the chosen letter, read by the first rule that applies: (1) the answer is a lone letter, possibly in
  brackets / \boxed{} / \text{} ("C", "(c)", "C."); (2) it starts "C)" / "(C)" / "C." / "C:" and labels no other
  option "X)"; (3) the last "answer is C" / "answer: C" / "option C" / "choice C" phrase; (4) exactly one distinct
  capital option letter stands alone in the text ("I pick C"). Anything else (two letters, only the option's
  value) is no choice, hence wrong: the prompt asks for the letter.
- MATH: e2h_min.tasks.math_grader (last \boxed{} of the answer, Minerva normalisation, value comparison).
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
import re
import sys
from collections import Counter

from e2h_min.tasks.rewards import ANSWER_REWARD, FORMAT_REWARD, parse_think_answer
from e2h_min.jsonl import parse_json
from e2h_min.errors import TaskDataError
from e2h_min.tasks.base import THINK_ANSWER_INSTRUCTION, Problem, Task
from e2h_min.tasks.math_grader import extract_boxed_answer, load_mpmath, math_answers_equivalent

TEST_FRACTION = 0.05
GSM8K_TOLERANCE = 1e-5
MAX_NUMBER_CHARS = 400  # a longer digit run is no GSM8K answer; it scores as wrong without float conversion
_SPLITS = {"train": "train", "test": "test", "eval": "test"}
MAX_FIELD_CHARS = 100_000  # a longer question or answer cannot fit any model's prompt: the row is skipped
MAX_LINE_BYTES = 64 * 2**20  # a longer JSONL line is not a data row: the file is refused

# ----------------------------------------------------------------------------------------------------------------
# Reading rows


def read_rows(source: str, expected: str) -> list[tuple[str, dict]]:
    """(location, row) pairs from a JSONL file, a Parquet file or an "hf:" dataset; location is "path:line".

    Raises TaskDataError (one line: the file, the problem, `expected`) for a missing file, a line that is not a
    JSON object, unreadable bytes, a missing optional reader, or no rows at all.
    Example: read_rows("tests/fixtures/gsm8k.jsonl", "question, answer")[0][0] == "tests/fixtures/gsm8k.jsonl:1"
    """
    if source.startswith("hf:"):
        rows = _read_hub(source, expected)
    elif not os.path.isfile(source):
        raise TaskDataError(f"{source}: no such file; expected a JSONL or Parquet file with columns {expected}")
    elif source.endswith(".parquet"):
        rows = _read_parquet(source, expected)
    else:
        rows = _read_jsonl(source, expected)
    if not rows:
        raise TaskDataError(f"{source}: no rows; expected one row per problem with columns {expected}")
    return rows


def _read_jsonl(path: str, expected: str) -> list[tuple[str, dict]]:
    """Line by line in bytes, so that a bad byte, bad JSON (nested too deeply, a 5,000-digit number) or an
    over-long line is reported at its own line number."""
    rows = []
    with open(path, "rb") as f:
        for line_number in range(1, 2**63):
            raw = f.readline(MAX_LINE_BYTES + 1)
            if not raw:
                break
            if len(raw) > MAX_LINE_BYTES:
                raise TaskDataError(f"{path}:{line_number}: a line longer than {MAX_LINE_BYTES:,} bytes (the limit); "
                                    f"expected one JSON object per line with columns {expected}")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise TaskDataError(f"{path}:{line_number}: not UTF-8 text; expected a JSONL file with columns "
                                    f"{expected}") from None
            if not line.strip():
                continue
            try:
                row = parse_json(line)
            except ValueError as exc:
                raise TaskDataError(f"{path}:{line_number}: {exc}; expected one JSON object per line with columns "
                                    f"{expected}") from None
            if not isinstance(row, dict):
                raise TaskDataError(f"{path}:{line_number}: a JSON {type(row).__name__}, not an object; "
                                    f"expected one JSON object per line with columns {expected}")
            rows.append((f"{path}:{line_number}", row))
    return rows


def _read_parquet(path: str, expected: str) -> list[tuple[str, dict]]:
    try:
        import pyarrow.parquet
        records = pyarrow.parquet.read_table(path).to_pylist()
    except ImportError:
        try:
            import pandas
            records = pandas.read_parquet(path).to_dict("records")
        except ImportError:
            raise TaskDataError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow); or convert it to "
                                f"JSONL with columns {expected}") from None
    except Exception as exc:  # pyarrow's errors for a corrupt file have no common base class
        raise TaskDataError(f"{path}: unreadable Parquet ({str(exc).splitlines()[0][:120]}); expected columns "
                            f"{expected}") from None
    return [(f"{path}:row {i + 1}", dict(record)) for i, record in enumerate(records)]


def _read_hub(source: str, expected: str) -> list[tuple[str, dict]]:
    try:
        import datasets
    except ImportError:
        raise TaskDataError(f"{source}: loading from the Hugging Face hub needs the `datasets` package (pip "
                            f"install datasets); or pass a local JSONL file with columns {expected}") from None
    name, _, split = source[len("hf:"):].partition("@")
    name, _, config = name.partition(":")
    try:
        dataset = datasets.load_dataset(name, config or None, split=split or "train")
    except Exception as exc:  # network, unknown name, unknown split...
        raise TaskDataError(f"{source}: could not load ({str(exc).splitlines()[0][:120]}); expected "
                            f"hf:NAME[:CONFIG][@SPLIT] with columns {expected}") from None
    return [(f"{source}:row {i + 1}", dict(row)) for i, row in enumerate(dataset)]


class _BadRow(ValueError):
    """Internal: one row is malformed; the task turns it into a TaskDataError with the location."""


class _Unscorable(ValueError):
    """Internal: a well-formed row that can never be scored (a NaN/inf answer, an over-long field): skipped and
    counted by reason, never silently kept."""


def _text(row: dict, column: str) -> str:
    """row[column] as a non-empty string. Example: _text({"q": " 2+2 "}, "q") == "2+2"."""
    if column not in row:
        raise _BadRow(f"missing column {column!r}")
    value = row[column]
    if not isinstance(value, str) or not value.strip():
        raise _BadRow(f"column {column!r} must be a non-empty string, got {value!r:.60}")
    _check_length(value, column)
    return value.strip()


def _check_length(value: str, column: str) -> None:
    if len(value) > MAX_FIELD_CHARS:
        raise _Unscorable(f"a field over {MAX_FIELD_CHARS:,} characters")


def _small_int(value, column: str, low: int, high: int) -> int:
    """An int in low..high from an int, an integral float or a digit string. Example: ("2", "level", 0, 3) -> 2."""
    if isinstance(value, bool):  # JSON true/false is a Python int: never read as level 1/0
        raise _BadRow(f"column {column!r} must be an integer {low}..{high}, got the boolean {str(value).lower()}")
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d{1,3}\s*", value):
        value = int(value)
    if isinstance(value, numbers.Integral):
        number = int(value)
    elif isinstance(value, numbers.Real) and float(value).is_integer():
        number = int(value)
    else:
        raise _BadRow(f"column {column!r} must be an integer {low}..{high}, got {value!r:.60}")
    if not low <= number <= high:
        raise _BadRow(f"column {column!r} must be an integer {low}..{high}, got {number}")
    return number


def _row_split(row: dict) -> str | None:
    """The row's pinned split ("train" or "test"), or None when it has no `split` column."""
    if "split" not in row:
        return None
    split = _SPLITS.get(str(row["split"]).strip().lower())
    if split is None:
        raise _BadRow(f"column 'split' must be 'train' or 'test', got {row['split']!r:.60}")
    return split


def hash_split(question: str) -> str:
    """"test" for the TEST_FRACTION of questions whose SHA-256 is smallest in hash space, else "train".

    Example: hash_split(q) is the same on every machine and every run, whatever the row order or seed.
    """
    bucket = int.from_bytes(hashlib.sha256(question.encode("utf-8")).digest()[:8], "big") / 2.0**64
    return "test" if bucket < TEST_FRACTION else "train"


# ----------------------------------------------------------------------------------------------------------------
# Answer extraction and rewards

_THOUSANDS_COMMA = re.compile(r"(?<=[0-9]),(?=[0-9]{3}(?![0-9]))")
_FIRST_NUMBER = re.compile(r"(?:(?<![0-9A-Za-z])-)?(?:[0-9]+(?:\.[0-9]+)?|\.[0-9]+)")


def first_number(text: str) -> float | None:
    """The first number in `text` after removing thousands separators; None if there is none.

    Only a comma between a digit and exactly three digits is a separator: "2,3" is 2 then 3, not 23.
    Example: first_number("The total is $1,250.50.") == 1250.5; first_number("x = -3") == -3.0;
             first_number("step-2 gives 7") == 2.0; first_number("2,3") == 2.0; first_number("none") is None
    """
    match = _FIRST_NUMBER.search(_THOUSANDS_COMMA.sub("", text).replace("\u2212", "-"))
    if match is None:
        return None
    if len(match.group()) > MAX_NUMBER_CHARS:
        return float("inf")
    return float(match.group())


def parse_gold_number(value) -> float:
    """The gold number of a GSM8K `answer` cell: the text after the last '####', or the cell as a number.

    Example: parse_gold_number("48/2 = <<48/2=24>>24 ...\\n#### 72") == 72.0; parse_gold_number(7) == 7.0
    """
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, str):
        raise _BadRow(f"column 'answer' must be a string or a number, got {value!r:.60}")
    gold = value.rsplit("####", 1)[-1].strip().replace(",", "")
    try:
        return float(gold)
    except ValueError:
        raise _BadRow(f"column 'answer' must end in '#### <number>' or be a number, got {gold!r:.60}") from None


_UNWRAP = re.compile(r"\\(?:boxed|text|textbf|mathrm|mathbf)\{([^{}]*)\}")
_LONE_LETTER = re.compile(r"[\s(\[{*$]*([A-Za-z])[\s)\]}.:*$]*")
_LEADING_LETTER = re.compile(r"\s*[(\[]?([A-Z])\s*[)\].:](?![0-9])")
_LABELLED_LETTER = re.compile(r"(?<![A-Za-z])[(\[]?([A-Z])\)")
# Each \s* is followed by a required token, never by another optional \s*: linear time on long blank runs.
_ANSWER_PHRASE = re.compile(r"(?i:answer\s*(?:is|:)|option|choice)(?:\s*is)?(?:\s*[:(\[])?\s*([A-Z])(?![A-Za-z])")
_STANDALONE_LETTER = re.compile(r"(?<![A-Za-z])([A-Z])(?![A-Za-z])")


def extract_option_letter(answer: str, letters: str = "ABCDE") -> str | None:
    """The option letter chosen in an answer text, by the four rules of the module docstring; None if unclear.

    Example: extract_option_letter("(c)") == "C"; extract_option_letter("C) 12 km") == "C";
             extract_option_letter("so the answer is B") == "B"; extract_option_letter("A or B") is None;
             extract_option_letter("12 km") is None
    """
    text = _UNWRAP.sub(r"\1", answer)
    lone = _LONE_LETTER.fullmatch(text)
    if lone:
        letter = lone.group(1).upper()
        return letter if letter in letters else None
    leading = _LEADING_LETTER.match(text)
    if leading and leading.group(1) in letters:
        labelled = {m.group(1) for m in _LABELLED_LETTER.finditer(text)} & set(letters)
        if labelled <= {leading.group(1)}:
            return leading.group(1)
    phrases = [m.group(1) for m in _ANSWER_PHRASE.finditer(text) if m.group(1) in letters]
    if phrases:
        return phrases[-1]
    standalone = {m.group(1) for m in _STANDALONE_LETTER.finditer(text)} & set(letters)
    return standalone.pop() if len(standalone) == 1 else None


def _reward(correct: bool) -> float:
    return FORMAT_REWARD + ANSWER_REWARD if correct else FORMAT_REWARD


def gsm8k_reward(completion: str, gold: float) -> float:
    """0.0 (bad format), 0.1 (wrong) or 1.0 (first number of the answer within 1e-5 of gold). Total over str.

    Example: gsm8k_reward(" 24 + 48 = 72</think>\\n<answer> 72 clips </answer>", 72.0) == 1.0
    """
    answer = _answer_or_none(completion)
    if answer is None:
        return 0.0
    number = first_number(answer)
    return _reward(number is not None and abs(number - gold) < GSM8K_TOLERANCE)


def aqua_reward(completion: str, correct: str, letters: str = "ABCDE") -> float:
    """0.0 (bad format), 0.1 (wrong or unclear choice) or 1.0 (the chosen letter is `correct`). Total over str.

    Example: aqua_reward(" 12 km.</think>\\n<answer> (C) </answer>", "C") == 1.0
    """
    answer = _answer_or_none(completion)
    if answer is None:
        return 0.0
    return _reward(extract_option_letter(answer, letters) == correct)


def math_reward(completion: str, gold: str) -> float:
    r"""0.0 (bad format), 0.1 (wrong) or 1.0 (the last \boxed{} of the answer matches gold). Total over str.

    Example: math_reward(" ...</think>\n<answer> \boxed{\dfrac{1}{2}} </answer>", "0.5") == 1.0
    """
    answer = _answer_or_none(completion)
    if answer is None:
        return 0.0
    final = extract_boxed_answer(answer)
    return _reward(final is not None and math_answers_equivalent(final, gold))


def _answer_or_none(completion: str) -> str | None:
    if not isinstance(completion, str):
        raise TypeError(f"completion must be str, got {type(completion).__name__}; decode tokens first")
    return parse_think_answer(completion)


# ----------------------------------------------------------------------------------------------------------------
# Prompts


def gsm8k_prompt(question: str) -> str:
    """The GSM8K user prompt (spec section 6). Example: gsm8k_prompt("What is 2 + 3?") starts "Solve the ..."."""
    return (f"Solve the following math problem.\n\n{question}\n\n"
            f"{THINK_ANSWER_INSTRUCTION}, for example <answer> 42 </answer>.")


def math_prompt(problem: str) -> str:
    r"""The MATH user prompt: the final answer goes in \boxed{} inside the answer tags."""
    return (f"Solve the following math problem.\n\n{problem}\n\n"
            f"{THINK_ANSWER_INSTRUCTION}, inside \\boxed{{}}, "
            f"for example <answer> \\boxed{{\\frac{{1}}{{2}}}} </answer>.")


def aqua_prompt(question: str, options: list[str], letters: str) -> str:
    """The AQuA user prompt: the question, one "X) text" option per line, and the letter-only answer format.

    Example: aqua_prompt("2 + 3 = ?", ["4", "5"], "AB") contains "\\nA) 4\\nB) 5\\n"
    """
    listed = "\n".join(f"{letter}) {text}" for letter, text in zip(letters, options))
    return (f"Solve the following math problem and choose an answer from the given options.\n\n{question}\n\n"
            f"Options:\n{listed}\n\n{THINK_ANSWER_INSTRUCTION}, giving only the letter of your choice, "
            f"for example <answer> C </answer>.")


# ----------------------------------------------------------------------------------------------------------------
# Tasks


class _FileTask(Task):
    """Rows of a data file indexed by (split, level); subclasses parse a row, write its prompt and score it."""

    expected_columns = ""
    labelled_levels = True  # False: the `level` column is optional (GSM8K, AQuA)

    def __init__(self, data: str, seed: int = 0):
        self.data = str(data)
        self.seed = seed  # kept for the registry's signature: neither the split nor the row order depends on it
        records = self._load_records()
        if not self.labelled_levels:
            self._settle_optional_levels(records)
        self._rows = {split: [[] for _ in self.eval_levels] for split in ("train", "test")}
        for record in records:
            self._rows[record["split"]][record["level"]].append(record)

    def fingerprint(self) -> str:
        """sha256 of every parsed row (split, level, question, gold, ...), in file order: the problems themselves,
        whatever the file's formatting."""
        if not hasattr(self, "_fingerprint"):
            digest = hashlib.sha256()
            for split in sorted(self._rows):
                for rows in self._rows[split]:
                    for record in rows:
                        fields = {k: v for k, v in record.items() if k != "row"}  # where it sits, not what it is
                        digest.update(json.dumps(fields, sort_keys=True, default=str).encode() + b"\n")
            self._fingerprint = digest.hexdigest()
        return self._fingerprint

    def _load_records(self) -> list[dict]:
        """Parsed rows with their split and location; skipped rows are counted in `skipped_rows`."""
        rows = read_rows(self.data, self.expected_columns)
        has_split = "split" in rows[0][1]
        records, self.skipped_rows, self.unscorable = [], 0, Counter()
        for where, row in rows:
            try:
                if ("split" in row) != has_split:
                    raise _BadRow("column 'split' is in some rows but not in others")
                record = self.parse_row(row)
                if record is not None:
                    record.update(split=_row_split(row) or hash_split(record["question"]), row=where)
            except _BadRow as exc:
                raise TaskDataError(f"{where}: {exc}; expected columns {self.expected_columns}") from None
            except _Unscorable as exc:
                self.unscorable[str(exc)] += 1
                record = None
            if record is None:
                self.skipped_rows += 1
            else:
                records.append(record)
        if self.unscorable:
            print(f"note: {self.data}: skipped {sum(self.unscorable.values())} row(s) that can never be scored ("
                  + ", ".join(f"{n} with {why}" for why, n in sorted(self.unscorable.items())) + ")", file=sys.stderr)
        if not records:
            raise TaskDataError(f"{self.data}: every row was skipped; expected columns {self.expected_columns}")
        return records

    def _settle_optional_levels(self, records: list[dict]) -> None:
        """All rows labelled: 4 levels. None labelled: 1 level (all 0). Mixed: TaskDataError at the first gap."""
        labelled = [record["level"] is not None for record in records]
        if all(labelled):
            self.num_levels = 4
        elif not any(labelled):
            self.num_levels = 1
            for record in records:
                record["level"] = 0
        else:
            gap = records[labelled.index(not labelled[0])]["row"]
            raise TaskDataError(f"{gap}: column 'level' is in some rows but not in others; expected columns "
                                f"{self.expected_columns}")

    def parse_row(self, row: dict) -> dict | None:
        """The fields a problem needs, with "question" and "level" (None = unlabelled); None skips the row."""
        raise NotImplementedError

    def prompt(self, record: dict) -> str:
        raise NotImplementedError

    def _level_rows(self, level: int, split: str) -> list[dict]:
        if split not in _SPLITS:
            raise ValueError(f"unknown split {split!r}; use 'train' or 'test'")
        if not 0 <= level < len(self.eval_levels):
            raise ValueError(f"{self.name} has levels 0..{len(self.eval_levels) - 1}, got {level}")
        return self._rows[_SPLITS[split]][level]

    def num_problems(self, level: int, split: str = "train") -> int:
        return len(self._level_rows(level, split))

    def drop_problems(self, level: int, split: str, indices: list[int]) -> None:
        """Remove those problems of (split, level), e.g. prompts too long for the model (prompt_fit.py); the rows
        left keep their file order, so `problem(level, i)` indexes them."""
        rows, dropped = self._level_rows(level, split), set(indices)
        rows[:] = [row for i, row in enumerate(rows) if i not in dropped]

    def problem(self, level: int, index: int, split: str = "train") -> Problem:
        rows = self._level_rows(level, split)
        if not 0 <= index < len(rows):
            raise IndexError(f"{self.name} {split} level {level} has {len(rows)} problems; index {index} is out "
                             f"of range (check num_problems first)")
        record = rows[index]
        return Problem(level, index, self.prompt(record), dict(record))

    def _checked(self, problem: Problem, completion: str | None) -> str | None:
        """The demonstration if it scores full marks under this task's own grader, else None."""
        return completion if completion is not None and self.score(problem, completion) == 1.0 else None


def _optional_level(row: dict) -> int | None:
    return None if "level" not in row else _small_int(row["level"], "level", 0, 3)


class GSM8KTask(_FileTask):
    name = "gsm8k"
    num_levels = 4
    has_ood = False
    labelled_levels = False
    expected_columns = "question (str), answer (str ending '#### <number>', or a number), level (int 0..3, optional)"

    def parse_row(self, row: dict) -> dict:
        if "answer" not in row:
            raise _BadRow("missing column 'answer'")
        answer = row["answer"]
        reasoning = answer.rsplit("####", 1)[0].strip() if isinstance(answer, str) and "####" in answer else ""
        question, gold = _text(row, "question"), parse_gold_number(answer)
        if not math.isfinite(gold):  # no completion's number is ever within tolerance of NaN or inf
            raise _Unscorable("a NaN or infinite answer")
        if isinstance(answer, str):
            _check_length(answer, "answer")
        return {"question": question, "gold": gold, "reasoning": re.sub(r"<<[^<>]*>>", "", reasoning),
                "level": _optional_level(row)}

    def prompt(self, record: dict) -> str:
        return gsm8k_prompt(record["question"])

    def score(self, problem: Problem, completion: str) -> float:
        return gsm8k_reward(completion, problem.data["gold"])

    def demonstration(self, problem: Problem) -> str | None:
        """The reference reasoning (calculator notes <<...>> removed) and the gold number; None without one."""
        gold = problem.data["gold"]
        shown = str(int(gold)) if gold.is_integer() else repr(gold)
        reasoning = problem.data["reasoning"]
        return self._checked(problem, f" {reasoning}</think>\n<answer> {shown} </answer>" if reasoning else None)


class MATHTask(_FileTask):
    name = "math"
    num_levels = 4
    has_ood = True  # Level 5
    expected_columns = ("problem (str), solution (str with a \\boxed{} answer) or answer (str), "
                        "level ('Level 1'..'Level 5' or int 1..5)")

    def __init__(self, data: str, seed: int = 0):
        super().__init__(data, seed=seed)
        load_mpmath()  # import now rather than inside the first score(); warns once if it is missing

    def parse_row(self, row: dict) -> dict | None:
        if "level" not in row:
            raise _BadRow("missing column 'level'")
        level = row["level"]
        if isinstance(level, str) and level.strip() == "Level ?":
            return None  # unlabelled in the official data: not usable for a curriculum
        if isinstance(level, str) and level.strip().startswith("Level "):
            level = level.strip()[len("Level "):]
        solution = row.get("solution") if isinstance(row.get("solution"), str) else ""
        _check_length(solution, "solution")
        if row.get("answer") not in (None, ""):
            gold = row["answer"] if isinstance(row["answer"], str) else str(row["answer"])
        elif solution:
            gold = extract_boxed_answer(solution) if "\\boxed" in solution or "\\fbox" in solution else None
            if not gold:
                raise _BadRow("column 'solution' has no complete \\boxed{} answer (and there is no 'answer')")
        else:
            raise _BadRow("missing column 'answer' or 'solution'")
        _check_length(gold, "answer")
        return {"question": _text(row, "problem"), "gold": gold.strip(), "solution": solution.strip(),
                "level": _small_int(level, "level", 1, 5) - 1}

    def prompt(self, record: dict) -> str:
        return math_prompt(record["question"])

    def score(self, problem: Problem, completion: str) -> float:
        return math_reward(completion, problem.data["gold"])

    def demonstration(self, problem: Problem) -> str | None:
        """The reference solution as the think text and its boxed answer; None when the row has no solution."""
        solution, gold = problem.data["solution"], problem.data["gold"]
        return self._checked(problem, f" {solution}</think>\n<answer> \\boxed{{{gold}}} </answer>"
                             if solution else None)


_OPTION_LABEL = re.compile(r"\s*\(?([A-Z])\s*\)\s*")


class AQuATask(_FileTask):
    name = "aqua"
    num_levels = 4
    has_ood = False
    labelled_levels = False
    expected_columns = ("question (str), options (list of str like 'A)12'), correct (option letter), "
                        "level (int 0..3, optional)")

    def parse_row(self, row: dict) -> dict:
        if "options" not in row:
            raise _BadRow("missing column 'options'")
        options = row["options"]
        if hasattr(options, "tolist"):  # a numpy array from Parquet
            options = options.tolist()
        if not isinstance(options, (list, tuple)) or not 2 <= len(options) <= 26 or \
                not all(isinstance(option, str) for option in options):
            raise _BadRow(f"column 'options' must be a list of 2..26 strings, got {options!r:.60}")
        _check_length("".join(options), "options")
        labels = [_OPTION_LABEL.match(option) for option in options]
        if all(labels):
            letters = "".join(label.group(1) for label in labels)
            texts = [option[label.end():].strip() for option, label in zip(options, labels)]
            if len(set(letters)) != len(letters):
                raise _BadRow(f"column 'options' repeats a letter: {letters}")
        else:
            letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[:len(options)]
            texts = [option.strip() for option in options]
        correct = _text(row, "correct").upper()
        if correct not in letters:
            raise _BadRow(f"column 'correct' must be one of the option letters {letters}, got {correct!r:.20}")
        rationale = row.get("rationale") if isinstance(row.get("rationale"), str) else ""
        _check_length(rationale, "rationale")
        return {"question": _text(row, "question"), "options": texts, "letters": letters, "correct": correct,
                "rationale": rationale.strip(), "level": _optional_level(row)}

    def prompt(self, record: dict) -> str:
        return aqua_prompt(record["question"], record["options"], record["letters"])

    def score(self, problem: Problem, completion: str) -> float:
        return aqua_reward(completion, problem.data["correct"], problem.data["letters"])

    def demonstration(self, problem: Problem) -> str | None:
        """The reference rationale and the correct letter; None when the row has no rationale."""
        rationale = problem.data["rationale"]
        return self._checked(problem, f" {rationale}</think>\n<answer> {problem.data['correct']} </answer>"
                             if rationale else None)
