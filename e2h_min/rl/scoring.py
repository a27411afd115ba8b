"""Prompts in, rewards out: the chat prompts a task's problems become and the float64 rewards of the completions
sampled for them, the same in training (train.py), evaluation (analysis/evaluation.py) and eval.py."""

from __future__ import annotations

from datetime import date, datetime, timezone
from typing import NamedTuple

import numpy as np

from e2h_min.engine.sampler import Generation, StopChecker


class Chat(NamedTuple):
    """How problems become token prompts and sampled tokens become scored text: the tokenizer, the chat-template
    variables that pin the prompts' date (chat_date_variables), the stop string checker, the ids that end a turn
    (eos_token_ids) and the padding id."""

    tokenizer: object
    template_vars: dict
    stop_checker: StopChecker
    eos: list[int]
    pad: int


def today() -> str:
    """Today's date in UTC, YYYY-MM-DD: a new run's chat date (--chat-date)."""
    return datetime.now(timezone.utc).date().isoformat()


def chat_date_variables(chat_date: str | None) -> dict:
    """Template variables that pin the date a chat template writes, for a date in YYYY-MM-DD.

    Llama 3.1 / 3.2 / 3.3 templates write "Today Date: <date_string>" into the system turn, with date_string
    = strftime_now("%d %b %Y") unless the caller passes one; templates without a date ignore the variable.
    None pins nothing (the template's own clock decides).
    Example: chat_date_variables("2024-07-26") == {"date_string": "26 Jul 2024"}
    """
    if chat_date is None:
        return {}
    day = date.fromisoformat(chat_date)
    return {"date_string": f"{day.day:02d} {_MONTHS[day.month - 1]} {day.year}"}  # no locale-dependent %b


_MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]


def encode_prompts(tokenizer, task, problems, template_vars: dict | None = None) -> list[list[int]]:
    """Chat-template each problem (system, user, assistant prefill continued), tokenized as rendered (with any BOS
    the template writes). template_vars: chat_date_variables(a run's date) pins a Llama 3 prompt's date."""
    texts = [tokenizer.apply_chat_template(task.messages(p), tokenize=False, continue_final_message=True,
                                           **(template_vars or {})) for p in problems]
    return [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]


def cut_at_stop(text: str, stop_strings: list[str]) -> str:
    """The text up to and including its earliest stop string (as vLLM's `stop`): the token that completes one can
    carry more text. Example: ("<answer> 1 + 2 </answer>.", ["</answer>"]) -> "<answer> 1 + 2 </answer>"."""
    ends = [text.find(s) + len(s) for s in stop_strings if s and s in text]
    return text[:min(ends)] if ends else text


def completion_texts(tokenizer, rollout: Generation, stop_strings: list[str]) -> list[str]:
    """Every sample's scored text (all rewards use it): its completion decoded without special tokens, cut at stop."""
    texts = tokenizer.batch_decode(rollout.completion_token_lists(), skip_special_tokens=True)
    return [cut_at_stop(text, stop_strings) for text in texts]


def score_rollout(task, problems, tokenizer, rollout: Generation, stop_strings: list[str]) -> tuple[list[str], np.ndarray]:
    """Score every sample's text (completion_texts) against its prompt's problem. Rewards are float64."""
    texts = completion_texts(tokenizer, rollout, stop_strings)
    rewards = np.array([task.score(problems[i // rollout.num_samples], text) for i, text in enumerate(texts)],
                       dtype=np.float64)
    return texts, rewards


def eos_token_ids(tokenizer, model) -> list[int]:
    """Every id that ends a turn: the tokenizer's EOS plus the model's generation EOS ids (Llama has several)."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    return sorted(i for i in ids if i is not None)
