"""The interface every task follows, and the prompt layout shared by all of them.

A task is a set of difficulty levels 0..num_levels-1 used for training, plus an optional out-of-distribution
level (index num_levels) that is only evaluated. Problems are addressed by (split, level, index): generated
tasks build problem `index` deterministically from a seed, file-backed tasks index into the rows of that level.
This makes the curriculum sampler's state plain integers (see e2h_min/rl/curriculum.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from e2h_min.errors import TaskDataError  # noqa: F401  (the tasks raise it; re-exported)

SYSTEM_PROMPT = (
    "You are a helpful assistant. You first thinks about the reasoning process in the mind and then provides "
    "the user with the answer.\n"
)  # verbatim from the paper's code, grammar included (spec section 6)
PREFILL = "Let me solve this step by step.\n<think>"
THINK_ANSWER_INSTRUCTION = (
    "Show your work in <think> </think> tags. And return the final answer in <answer> </answer> tags"
)


@dataclass(frozen=True)
class Problem:
    """One prompt with what its verifier needs.

    Example: Problem(level=1, index=7, user_prompt="Using the numbers [44, 19, 35], ...",
                     data={"numbers": [44, 19, 35], "target": 98})
    """

    level: int
    index: int
    user_prompt: str
    data: dict[str, Any] = field(default_factory=dict)


class Task:
    """Base class: subclasses set the class attributes and implement `problem` and `score`."""

    name: str = ""
    num_levels: int = 0  # training levels 0..num_levels-1
    has_ood: bool = False  # if True, level `num_levels` is the out-of-distribution level (eval only)
    system_prompt: str = SYSTEM_PROMPT
    prefill: str = PREFILL
    format_reward: float = 0.1  # reward of a well-formatted but wrong answer; accuracy means reward > this

    def level_names(self) -> list[str]:
        names = [f"L{k}" for k in range(self.num_levels)]
        return names + ["OOD"] if self.has_ood else names

    @property
    def eval_levels(self) -> list[int]:
        return list(range(self.num_levels + int(self.has_ood)))

    def num_problems(self, level: int, split: str = "train") -> int | None:
        """Rows available at this level, or None for a generator that never runs out."""
        return None

    def problem(self, level: int, index: int, split: str = "train") -> Problem:
        raise NotImplementedError

    def fingerprint(self) -> str | None:
        """A digest of the problems where they are read from a file, so data changed under a run is caught on
        resume; None for a generated task, whose problems its seed and the code fix."""
        return None

    def score(self, problem: Problem, completion: str) -> float:
        """Reward of `completion` (the text generated after the prefill). Total: never raises."""
        raise NotImplementedError

    def is_correct(self, reward: float) -> bool:
        return reward > self.format_reward + 1e-9

    def demonstration(self, problem: Problem) -> str | None:
        """A correct completion (after the prefill) for supervised warm starts; None if the task has none."""
        return None

    def messages(self, problem: Problem) -> list[dict[str, str]]:
        """Chat messages: system, user, and the assistant prefill that generation continues."""
        return [{"role": "system", "content": self.system_prompt}, {"role": "user", "content": problem.user_prompt},
                {"role": "assistant", "content": self.prefill}]
