"""The samples of one optimizer step (StepSamples: the one name for a step's data) as flat per-sample lists,
grouped G at a time (sample i in group i // G), and --dynamic-sampling's redraws."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import numpy as np

from e2h_min.engine.distributed import DistInfo, gather_lists


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


class SamplingStats(NamedTuple):
    """How a step's samples were drawn (for its metrics row): --dynamic-sampling's redraws, which of all the
    groups this rank rolled out had rewards that were not all equal, and how many groups it rolled out."""

    resample_rounds: int
    informative_groups: list[int]
    sampled_groups: int


def resample_until_informative(samples: StepSamples, draw: list, collect: Callable[[list], StepSamples],
                               sampler, step: int, prompts_per_step: int, max_rounds: int, dist_info: DistInfo
                               ) -> tuple[StepSamples, SamplingStats]:
    """--dynamic-sampling (DAPO): redraw prompts (same p_t) until every group of the step is informative or the
    rounds run out, then keep the informative groups first, topped up with the others. `collect` rolls out and
    scores a list of problems (this rank's share). Each of this rank's groups keeps its place in the step's draws,
    (round, slot): the choice of groups is taken on every rank's groups in that order, so it is the same on every
    rank and the same as one process holding the whole batch."""
    slots = [(0, dist_info.shard_start(len(draw)) + j) for j in range(samples.num_groups)]
    rounds = 0
    while rounds < max_rounds:
        missing = prompts_per_step - sum(gather_lists([len(samples.informative_groups())], dist_info))
        if missing <= 0:
            break
        rounds += 1
        extra = collect(sampler.sample(step, missing))  # every rank draws, each rolls out its share
        samples = samples.concat(extra)
        slots += [(rounds, dist_info.shard_start(missing) + j) for j in range(extra.num_groups)]
    informative = samples.informative_groups()
    sampled_groups = samples.num_groups
    step_groups = sorted(gather_lists([(slot, g in set(informative)) for g, slot in enumerate(slots)], dist_info))
    ranked = [s for s, useful in step_groups if useful] + [s for s, useful in step_groups if not useful]
    chosen = set(ranked[:prompts_per_step])
    samples = samples.select(samples.group_rows([g for g, slot in enumerate(slots) if slot in chosen]))
    return samples, SamplingStats(rounds, informative, sampled_groups)
