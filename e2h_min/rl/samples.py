"""The samples of one optimizer step as flat per-sample lists, grouped G at a time (sample i in group i // G)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class StepSamples:
    """problems / prompt_ids are repeated per sample; rewards float64 [N]; finished bool [N] (False = truncated)."""

    group_size: int
    problems: list
    prompt_ids: list[list[int]]
    completions: list[list[int]]
    sampler_logprobs: list[list[float]]
    texts: list[str]
    rewards: np.ndarray
    finished: np.ndarray

    @property
    def num_groups(self) -> int:
        return len(self.completions) // self.group_size

    @property
    def levels(self) -> np.ndarray:
        return np.array([p.level for p in self.problems], dtype=np.int64)

    def informative_groups(self) -> list[int]:
        """Groups whose rewards are not all equal: the only ones with a non-zero group-relative advantage."""
        return np.flatnonzero(self.rewards.reshape(-1, self.group_size).std(axis=1) > 0).tolist()

    def concat(self, other: StepSamples) -> StepSamples:
        return StepSamples(self.group_size, self.problems + other.problems, self.prompt_ids + other.prompt_ids,
                           self.completions + other.completions, self.sampler_logprobs + other.sampler_logprobs,
                           self.texts + other.texts, np.concatenate([self.rewards, other.rewards]),
                           np.concatenate([self.finished, other.finished]))

    def select(self, rows: list[int]) -> StepSamples:
        """The samples at `rows` (for whole groups, pass every row of each group, in order)."""
        return StepSamples(self.group_size, [self.problems[i] for i in rows], [self.prompt_ids[i] for i in rows],
                           [self.completions[i] for i in rows], [self.sampler_logprobs[i] for i in rows],
                           [self.texts[i] for i in rows], self.rewards[rows], self.finished[rows])

    def group_rows(self, groups: list[int]) -> list[int]:
        return [g * self.group_size + j for g in groups for j in range(self.group_size)]
