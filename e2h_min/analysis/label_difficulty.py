"""Difficulty labels for a dataset without levels: quartiles of a model's error rate (spec section 2).

    python -m e2h_min.analysis.label_difficulty --model Qwen2.5-1.5B --task gsm8k --data gsm8k_train.jsonl \\
        --samples 20 --out gsm8k_levels.jsonl
    python train.py --task gsm8k --data gsm8k_levels.jsonl        # 4 levels, trivial -> hard

The paper labels GSM8K and AQuA by sampling 20 answers per problem from the base model and cutting the error rate
(share of answers that are not correct) at its quartiles over the dataset: level 0 trivial, 1 easy, 2 medium,
3 hard. This script does the same with our own sampler and the task's own grader.

Design choices, in brief:
- Every row of the input is labelled: the task is loaded from the file (so a bad file fails with the loader's
  one-line error), and the problems of both splits and every level are sampled. The output is the input rows in
  input order, every original column kept, plus `level` (int) and `error_rate` (float in [0, 1]). A `level`
  already in the input is overwritten; its old value is kept as `source_level` (unless that column exists).
- Ties. Error rates from 20 samples take only 21 values and many problems share 0 or 1, so cutting at the
  quartile *values* can leave a level empty (if half the problems have error rate 0, the first two cut points
  are both 0) and the curriculum would have a level with no problems. We therefore cut by *rank*: problems are
  sorted by error rate, ties kept in input order (a stable sort), and the r-th of n gets level floor(4 r / n).
  Levels then hold n/4 problems each (sizes differ by at most one) and a lower error rate never gets a higher
  level; the price is that problems with the same error rate may straddle a boundary, decided by input order.
  Equal error rates from 20 draws are equal only up to sampling noise (standard error up to 0.11), so this is
  no loss of information; but if the file is sorted by something (length, source), ties follow that order, so
  shuffle it first if that matters. See `quartile_levels`.
- MATH files use 1-based levels ("Level 1".."Level 5", Level 5 = OOD), so for --task math the written `level`
  is quartile + 1 (1..4): the file loads back as MATH with training levels 0..3 = the quartiles and no OOD rows.
  Rows the MATH loader skips ("Level ?") are written unchanged. The MATH loader needs a level column on input.
- Sampling: `--samples` completions per problem at `--temperature` (1.0, plain sampling, as in training
  rollouts), stopped after </answer>, with one seeded generator (results are reproducible for a given device and
  --batch-size). bf16 autocast on CUDA, fp32 elsewhere, as in train.py.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from e2h_min.errors import (MAX_NEW_TOKENS, MAX_ROLLOUT_ROWS, MAX_SEED, MAX_THREADS, OneLineErrorParser, UserError,
                            check_context, check_output_file, exit_on_user_error)
from e2h_min.errors import is_iso_date
from e2h_min.rl.scoring import chat_date_variables, completion_texts, encode_prompts, eos_token_ids, today
from e2h_min.engine.models import context_length, load_model, load_tokenizer, pick_device
from e2h_min.engine.sampler import StopChecker, generate
from e2h_min.tasks import FILE_TASKS, Problem, Task, make_task
from e2h_min.tasks.math_tasks import read_rows

NUM_LEVELS = 4  # trivial, easy, medium, hard
LEVEL_NAMES = ("trivial", "easy", "medium", "hard")


def quartile_levels(error_rates: Sequence[float]) -> list[int]:
    """Level 0..3 of each problem: the quartile of its error rate's rank, ties broken by position.

    Problems are ranked by (error_rate, position) -- a stable sort, so equal error rates keep their input order --
    and the problem of rank r (0-based) among n gets level floor(4 r / n). Each level holds floor(n/4) or
    ceil(n/4) problems, and error_rates[i] < error_rates[j] implies level[i] <= level[j].
    Example: quartile_levels([0.5, 0.0, 0.0, 1.0, 0.0, 0.0, 0.25, 1.0])
             ranks  [5, 0, 1, 6, 2, 3, 4, 7] -> levels [2, 0, 0, 3, 1, 1, 2, 3]
             (four problems share error rate 0: the first two in input order are trivial, the next two easy)
    """
    n = len(error_rates)
    order = sorted(range(n), key=lambda i: error_rates[i])  # Python's sort is stable: ties stay in input order
    levels = [0] * n
    for rank, i in enumerate(order):
        levels[i] = NUM_LEVELS * rank // n
    return levels


def error_rate(correct: Sequence[bool]) -> float:
    """Share of samples that are not correct. Example: error_rate([True, False, False, False]) == 0.75."""
    return 1.0 - sum(bool(c) for c in correct) / len(correct)


def group_error_rates(task: Task, problems: list[Problem], texts: list[str], samples: int) -> list[float]:
    """Error rate of each problem from its completions, texts[k * samples:(k + 1) * samples] for problem k.

    The sampler's layout: sample i belongs to prompt i // samples. A completion is correct when
    task.is_correct(task.score(problem, text)).
    Example: 2 problems, samples=2, texts [right, wrong, wrong, wrong] -> [0.5, 1.0]
    """
    if len(texts) != len(problems) * samples:
        raise ValueError(f"{len(texts)} completions for {len(problems)} problems x {samples} samples")
    return [error_rate([task.is_correct(task.score(problem, text)) for text in texts[k * samples:(k + 1) * samples]])
            for k, problem in enumerate(problems)]


# ----------------------------------------------------------------------------------------------------------------
# Reading and writing rows


def load_rows_and_problems(task_name: str, data: str) -> tuple[Task, list[dict], list[tuple[int, Problem]]]:
    """(task, every input row in file order, (row index, problem) for each row the task loads, in file order).

    The task is loaded from `data` as training would load it (TaskDataError, one line, for a bad file); its
    problems of both splits and every level are matched back to the raw rows by their "path:line" location.
    Example: for the 12-row GSM8K fixture -> (GSM8KTask, 12 rows, [(0, Problem(...)), ..., (11, Problem(...))])
    """
    task = make_task(task_name, data=data)
    located = read_rows(data, task.expected_columns)
    row_of = {where: i for i, (where, _) in enumerate(located)}
    problems = []
    for split in ("train", "test"):
        for level in task.eval_levels:
            for index in range(task.num_problems(level, split)):
                problem = task.problem(level, index, split)
                problems.append((row_of[problem.data["row"]], problem))
    problems.sort(key=lambda pair: pair[0])  # file order: the tie-break of quartile_levels
    return task, [row for _, row in located], problems


def labelled_rows(task_name: str, rows: list[dict], problem_rows: list[int], error_rates: list[float]) -> list[dict]:
    """Copies of `rows` with `level` and `error_rate` set on the rows in `problem_rows`; other rows unchanged.

    problem_rows[k] is the row index of the k-th labelled problem and error_rates[k] its error rate. For MATH the
    level is written 1-based (quartile + 1), the convention of MATH files; an overwritten `level` is kept as
    `source_level`.
    Example: labelled_rows("gsm8k", [{"question": "q", "answer": "1"}], [0], [0.25]) ->
             [{"question": "q", "answer": "1", "level": 0, "error_rate": 0.25}]   (one problem: rank 0, level 0)
    """
    offset = 1 if task_name == "math" else 0
    out = [dict(row) for row in rows]
    for row_index, level, rate in zip(problem_rows, quartile_levels(error_rates), error_rates):
        row = out[row_index]
        if "level" in row and "source_level" not in row:
            row["source_level"] = row["level"]
        row["level"] = level + offset
        row["error_rate"] = float(rate)
    return out


def _jsonable(value):
    """JSON fallback for values a Parquet reader returns (numpy arrays and scalars)."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"cannot write a {type(value).__name__} to JSON")


def write_jsonl(path: str, rows: list[dict]) -> None:
    """One JSON object per line, written to a temporary file and renamed, so a crash never leaves half a file."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    with open(partial, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False, default=_jsonable) + "\n")
    os.replace(partial, target)


# ----------------------------------------------------------------------------------------------------------------
# Sampling


@torch.no_grad()
def sample_error_rates(model, tokenizer, task: Task, problems: list[Problem], samples: int, max_new_tokens: int,
                       temperature: float = 1.0, batch_size: int = 256, seed: int = 0,
                       progress: bool = True, chat_date: str | None = None) -> list[float]:
    """Error rate of each problem over `samples` sampled completions (share whose reward is not correct).

    Prompts go through the sampler in chunks of max(1, batch_size // samples) prompts (batch_size sequences per
    generation call); completions stop after </answer> or an EOS and are scored by task.score / task.is_correct.
    Example: 3 problems, samples=4, answers right 4/4, 1/4, 0/4 times -> [0.0, 0.75, 1.0]
    """
    device = next(model.parameters()).device
    stop_checker = StopChecker(tokenizer, ["</answer>"], device)
    eos, pad = eos_token_ids(tokenizer, model), tokenizer.pad_token_id
    generator = torch.Generator(device).manual_seed(seed)
    per_call = max(1, batch_size // samples)
    rates, dated = [], chat_date_variables(chat_date)
    with tqdm(total=len(problems), desc="labelling", unit="problem", disable=not progress) as bar:
        for start in range(0, len(problems), per_call):
            chunk = problems[start:start + per_call]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                rollout = generate(model, encode_prompts(tokenizer, task, chunk, dated), samples, max_new_tokens,
                                   eos, pad, stop_checker=stop_checker, temperature=temperature, generator=generator)
            texts = completion_texts(tokenizer, rollout, stop_checker.stop_strings)
            rates += group_error_rates(task, chunk, texts, samples)
            bar.update(len(chunk))
    return rates


# ----------------------------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    p = OneLineErrorParser(prog="python -m e2h_min.analysis.label_difficulty", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="the base model whose error rate defines difficulty (alias, "
                                                  "local directory or hub id)")
    p.add_argument("--data", required=True, help="input rows (JSONL, Parquet or hf:NAME[:CONFIG][@SPLIT])")
    p.add_argument("--task", required=True, choices=sorted(FILE_TASKS), help="which grader and prompt to use")
    p.add_argument("--out", required=True, help="output JSONL: the input rows plus level and error_rate")
    p.add_argument("--samples", type=int, default=20, help="sampled answers per problem (paper: 20)")
    p.add_argument("--max-new-tokens", type=int, default=512, help="completion budget in tokens")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    p.add_argument("--batch-size", type=int, default=256, help="sequences (prompts x samples) per generation call")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling noise")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0 = torch default)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--chat-date", default=None, help="YYYY-MM-DD a date-bearing chat template (Llama 3) writes into "
                   "the prompts (default: today in UTC, fixed for the whole pass)")
    return p


def check_args(args: argparse.Namespace) -> None:
    """Reject values that would make the labels meaningless, as one-line UserErrors."""
    if args.samples < 2:
        raise UserError(f"--samples must be >= 2 (got {args.samples}): one sample gives error rates of only 0 or 1; "
                        f"the paper uses 20")
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1 (got {args.max_new_tokens})")
    if not (args.temperature > 0 and math.isfinite(args.temperature)):
        raise UserError(f"--temperature must be a positive number (got {args.temperature})")
    if args.threads < 0:
        raise UserError(f"--threads must be >= 0 (got {args.threads})")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1 (got {args.batch_size})")
    for flag, value, high in (("--samples", args.samples, MAX_ROLLOUT_ROWS), ("--batch-size", args.batch_size,
                              MAX_ROLLOUT_ROWS), ("--max-new-tokens", args.max_new_tokens, MAX_NEW_TOKENS),
                              ("--threads", args.threads, MAX_THREADS)):
        if value > high:
            raise UserError(f"{flag} must be <= {high:,} (the limit), got {value}")
    if args.chat_date is not None and not is_iso_date(args.chat_date):
        raise UserError(f"--chat-date must be a date YYYY-MM-DD, got {args.chat_date!r}")
    if not 0 <= args.seed <= MAX_SEED:
        raise UserError(f"--seed must be in [0, {MAX_SEED}], got {args.seed}")
    if Path(args.out).resolve() == Path(args.data).resolve():
        raise UserError(f"--out {args.out} is the --data file; write the labelled rows to another file")
    if Path(args.out).is_file():  # it may be anything, another run's log included: never written over
        raise UserError(f"--out {args.out} exists; pass a new file name, or delete it yourself if it is an earlier "
                        f"labelling")
    check_output_file(args.out, "--out")  # an unwritable place fails now, not after hours of sampling


@exit_on_user_error
def main(argv: list[str] | None = None) -> list[dict]:
    """Label every row of --data and write --out; returns the written rows."""
    args = build_parser().parse_args(argv)
    check_args(args)
    check_context(args.max_new_tokens, context_length(args.model))
    task, rows, problems = load_rows_and_problems(args.task, args.data)
    if len(problems) < NUM_LEVELS:
        raise UserError(f"{args.data}: {len(problems)} usable problems; need at least {NUM_LEVELS} to form "
                        f"{NUM_LEVELS} difficulty levels")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model, device, trainable=False)
    rates = sample_error_rates(model, tokenizer, task, [p for _, p in problems], args.samples, args.max_new_tokens,
                               args.temperature, args.batch_size, args.seed, progress=not args.quiet,
                               chat_date=args.chat_date or today())  # one date for every prompt of the pass
    out = labelled_rows(args.task, rows, [i for i, _ in problems], rates)
    write_jsonl(args.out, out)

    levels = np.array(quartile_levels(rates))
    rates_array = np.array(rates)
    for k, name in enumerate(LEVEL_NAMES):
        chosen = rates_array[levels == k]
        span = f"error rate {chosen.min():.2f}..{chosen.max():.2f}" if len(chosen) else "empty"
        print(f"level {k} ({name}): {len(chosen)} problems, {span}")
    skipped = len(rows) - len(problems)
    print(f"wrote {len(out)} rows to {args.out}" + (f" ({skipped} rows the {args.task} loader skips, unchanged)"
                                                    if skipped else ""))
    return out


if __name__ == "__main__":
    main()
