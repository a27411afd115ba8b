"""Countdown: combine the given numbers with + - * / to reach the target (spec sections 2, 6, 7).

Levels 0..3 use 2..5 numbers, the OOD level (4) uses 6. Problem `index` of a split is generated from its own
seeded RNG, so any problem can be rebuilt from (seed, split, level, index) alone.
"""

from __future__ import annotations

import random

from e2h_min.rewards import countdown_reward
from e2h_min.tasks.base import THINK_ANSWER_INSTRUCTION, Problem, Task

NUMBERS_PER_LEVEL = [2, 3, 4, 5, 6]  # the last one is the OOD level
_SPLIT_SALT = {"train": 0, "test": 1_000_003, "eval": 1_000_003}


def generate_countdown(rng: random.Random, n_numbers: int, max_target: int = 100) -> tuple[list[int], int, list]:
    """Draw numbers uniform in 1..100 and a target reachable by a left-to-right chain of random operations.

    Returns (numbers, target, chain) where chain = [first, (op, n), (op, n), ...] in the order applied.
    Division is only used when exact; the target must land in 0..max_target (retried until it does).
    Example: chain [19, ('+', 44), ('-', 35)] means ((19 + 44) - 35) = 28.
    """
    while True:
        numbers = [rng.randint(1, 100) for _ in range(n_numbers)]
        order = numbers[:]
        rng.shuffle(order)
        value, chain = order[0], [order[0]]
        for n in order[1:]:
            ops = ["+", "-", "*"] + (["/"] if value % n == 0 else [])
            op = rng.choice(ops)
            value = {"+": value + n, "-": value - n, "*": value * n, "/": value // n if n else 0}[op]
            chain.append((op, n))
        if 0 <= value <= max_target:
            return numbers, value, chain


def chain_expression(chain: list) -> str:
    """((a op b) op c) as text: chain_expression([19, ('+', 44), ('-', 35)]) == '(19 + 44) - 35'."""
    expr = str(chain[0])
    for i, (op, n) in enumerate(chain[1:]):
        expr = f"({expr}) {op} {n}" if i > 0 else f"{expr} {op} {n}"
    return expr


def countdown_prompt(numbers: list[int], target: int) -> str:
    """The paper's user prompt, verbatim (spec section 6)."""
    return (
        f"Using the numbers {numbers}, create an equation that equals {target}. You can use basic arithmetic "
        f"operations (+, -, *, /) and each number can only be used once. {THINK_ANSWER_INSTRUCTION}, "
        f"for example <answer> (1 + 2) / 3 </answer>."
    )


class CountdownTask(Task):
    name = "countdown"
    num_levels = 4
    has_ood = True
    format_reward = 0.1

    def __init__(self, seed: int = 0):
        self.seed = seed

    def problem(self, level: int, index: int, split: str = "train") -> Problem:
        if not 0 <= level < len(NUMBERS_PER_LEVEL):
            raise ValueError(f"countdown has levels 0..{len(NUMBERS_PER_LEVEL) - 1}, got {level}")
        salt = _SPLIT_SALT.get(split)
        if salt is None:
            raise ValueError(f"unknown split {split!r}; use 'train' or 'test'")
        # One RNG per problem: string seeds hash deterministically (sha512) across processes.
        rng = random.Random(f"countdown/{self.seed}/{salt}/{level}/{index}")
        numbers, target, chain = generate_countdown(rng, NUMBERS_PER_LEVEL[level])
        return Problem(level, index, countdown_prompt(numbers, target),
                       {"numbers": numbers, "target": target, "chain": chain})

    def score(self, problem: Problem, completion: str) -> float:
        return countdown_reward(completion, problem.data["numbers"], problem.data["target"])

    def demonstration(self, problem: Problem) -> str:
        """A short think trace of the chain's steps, then the answer, ending right after </answer>.

        Example: " 19 + 44 = 63, 63 - 35 = 28.</think>\n<answer> (19 + 44) - 35 </answer>"
        """
        chain = problem.data["chain"]
        value, steps = chain[0], []
        for op, n in chain[1:]:
            new = {"+": value + n, "-": value - n, "*": value * n, "/": value // n if n else 0}[op]
            steps.append(f"{value} {op} {n} = {new}")
            value = new
        return f" {', '.join(steps)}.</think>\n<answer> {chain_expression(chain)} </answer>"
