"""The reward format every task shares (spec section 7), written to be total and safe on any model output.

Format. The reward is checked on "<think>" + completion: the prompt's prefill ends in "<think>", and the
completion is the text generated after it. The text passes when
  - it starts with <think> and ends with </answer>; only whitespace may follow </answer> (the scored text is
    cut right after the first </answer>, even inside a merged token such as ">.", by
    evaluation.completion_texts, and an EOS token is never part of the decoded text);
  - each of <think>, </think>, <answer>, </answer> occurs exactly once (tags are case-sensitive), in that order;
  - the think content and the answer content are non-empty after stripping whitespace;
  - only whitespace lies between </think> and <answer>.

Rewards: 0.0 when the format fails, else FORMAT_REWARD (0.1) plus ANSWER_REWARD (0.9) when the task's grader
finds the answer correct, so a reward is exactly 0.0, 0.1 or 1.0. Each grader lives with its task (Countdown:
tasks/countdown.py; GSM8K / MATH / AQuA: tasks/math_tasks.py and tasks/math_grader.py; Blocksworld:
tasks/blocksworld.py).
"""

from __future__ import annotations

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
TAGS = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)

FORMAT_REWARD = 0.1  # a well-formatted answer, right or wrong
ANSWER_REWARD = 0.9  # added when the answer is correct: 0.1 + 0.9 == 1.0 exactly in float


def parse_think_answer(completion: str) -> str | None:
    """The stripped answer if "<think>" + completion is well formatted (module docstring), else None. Example:
    " 3 + 5 = 8</think>\\n<answer> 3 + 5 </answer>" -> "3 + 5"; None with text between the blocks or empty think."""
    text = (THINK_OPEN + completion).rstrip()
    if any(text.count(tag) != 1 for tag in TAGS) or not text.endswith(ANSWER_CLOSE):
        return None
    think_end, answer_start = text.index(THINK_CLOSE), text.index(ANSWER_OPEN)
    if answer_start < think_end:  # <think> is at 0 and </answer> at the end, so this fixes the order
        return None
    think = text[len(THINK_OPEN):think_end]
    between = text[think_end + len(THINK_CLOSE):answer_start]
    answer = text[answer_start + len(ANSWER_OPEN):len(text) - len(ANSWER_CLOSE)]
    if not think.strip() or between.strip() or not answer.strip():
        return None
    return answer.strip()
