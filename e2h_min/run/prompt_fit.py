"""Prompts that fit the model, checked before any work: a prompt (chat template applied) plus its completion budget
must fit the model's context (max_position_embeddings), or decoding runs past what the model was trained on and a
long prompt makes every step slow (a 90k-character question is ~25k tokens, attended over at every new token).

- A file-backed task (--data): rows whose prompt does not fit are skipped, with a count in one line, as rows that
  can never be scored are (one long row should not stop a run on a big file). Training rows must fit the rollout
  budget (--max-new-tokens), test rows the evaluation's; the rows kept depend only on the data, the tokenizer and
  those budgets, so a resumed run keeps the same ones (its sampler state records the rows per level).
- A generated task (countdown, blocksworld): its prompt length grows with the level and barely varies within
  one, so the first SAMPLE_PER_LEVEL problems of each level and split stand for all of it; if one does not fit,
  the run is refused (UserError) with the prompt length, the context and the fix.
"""

from __future__ import annotations

import logging

from e2h_min.errors import UserError
from e2h_min.rl.scoring import chat_date_variables, encode_prompts

SAMPLE_PER_LEVEL = 32  # generated tasks: problems encoded per level and split


def prompt_lengths(tokenizer, task, problems, chat_date: str | None = None) -> list[int]:
    """Tokens of each problem's prompt as the model sees it (encode_prompts: template, prefill, any BOS)."""
    transformers_logger = logging.getLogger("transformers")
    level = transformers_logger.level
    transformers_logger.setLevel(logging.ERROR)  # "longer than the maximum sequence length": we say it ourselves
    try:
        return [len(ids) for ids in encode_prompts(tokenizer, task, problems, chat_date_variables(chat_date))]
    finally:
        transformers_logger.setLevel(level)


def fit_prompts(task, tokenizer, context: int | None, train_tokens: int | None, test_tokens: int,
                chat_date: str | None = None, log=print) -> None:
    """Make every prompt of `task` fit `context` tokens with its completion budget (train_tokens for the training
    split, None = not trained; test_tokens for the test split), as the module docstring says: drop the rows of a
    file-backed task that do not fit (one line with the count), refuse a generated task (UserError).
    context None (unknown, e.g. a LoRA adapter directory) checks nothing."""
    if context is None:
        return
    budgets = {"train": train_tokens, "test": test_tokens} if train_tokens is not None else {"test": test_tokens}
    dropped, longest = 0, 0
    for split, budget in budgets.items():
        for level in (task.eval_levels if split == "test" else range(task.num_levels)):
            available = task.num_problems(level, split)
            count = SAMPLE_PER_LEVEL if available is None else available
            if not count:
                continue
            problems = [task.problem(level, i, split) for i in range(count)]
            lengths = prompt_lengths(tokenizer, task, problems, chat_date)
            too_long = [i for i, n in enumerate(lengths) if n + budget > context]
            if too_long and available is None:  # a generated task
                raise UserError(_refusal(task, level, max(lengths), budget, context))
            if too_long:
                task.drop_problems(level, split, too_long)
                dropped += len(too_long)
                longest = max([longest] + [lengths[i] for i in too_long])
    if not dropped:
        return
    if all(task.num_problems(level, "train") == 0 for level in range(task.num_levels)) and train_tokens is not None:
        raise UserError(f"task {task.name}: no training row's prompt fits the model's context of {context:,} "
                        f"tokens with {train_tokens:,} new tokens; lower --max-new-tokens or pass a --model with a "
                        f"longer context")
    log(f"note: {getattr(task, 'data', task.name)}: skipped {dropped} row(s) whose prompt (up to {longest:,} tokens) "
        f"does not fit the model's context of {context:,} tokens with the completion budget")


def _refusal(task, level: int, prompt: int, budget: int, context: int) -> str:
    name = task.level_names()[level]
    head = (f"task {task.name}: its prompts take up to {prompt:,} tokens (level {name}, chat template included) "
            f"and {budget:,} new tokens more, but the model's context is {context:,} tokens")
    if prompt < context:
        return (f"{head}; lower --max-new-tokens to {context - prompt:,} or less, or pass a --model with a longer "
                f"context")
    return f"{head}: no budget fits; pass a --model with a longer context (e.g. --model Qwen2.5-1.5B: 32,768 tokens)"
