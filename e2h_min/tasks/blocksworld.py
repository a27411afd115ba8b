"""Blocksworld: write a plan that rearranges the blocks into the goal arrangement (spec sections 2, 6, 7).

Levels 0..3 need optimal plans of 1, 2, 4, 6 actions, the OOD level (4) needs 8. An instance is a random walk of
that many legal actions from a random arrangement, never revisiting a state; its goal text lists only the blocks
whose position changed. Breadth-first search then checks that no shorter plan satisfies that goal text (else the
instance is redrawn), which also makes the walk's final state exactly that many actions away. Blocks carry the
names of one name set (colours, fruits, Greek letters, animals) drawn per problem.

Reward (format reward 1.0, so accuracy = reward > 1.0), with n the plan's length and n_ref the optimum:
    0.0                  format fails, a line is not an action, an action is illegal, or more than 100 actions
    1.0                  a legal plan that misses the goal
    2 + min(1, n_ref/n)  a legal plan that reaches the goal: 3.0 when optimal, 2.5 for 4 actions when 2 suffice

"Reaches the goal" has two modes (constructor flag reward_mode):
  - "exact" (default): the final state equals the final state of the reference plan, as in the paper's code.
    Kept as default so that rewards and accuracies compare with the published numbers. Its cost: the goal text
    names only the moved blocks, so a legal plan that satisfies every stated fact but leaves an unmentioned
    block somewhere else (or ends holding a block) is scored as a miss.
  - "goal": the final state satisfies the goal text's facts (each listed block at its listed position); any
    valid alternative plan counts. Because generation checks the optimum against the goal text, n_ref is the
    optimum in both modes. The modes differ only on plans that meet the goal text the long way round: on 1,000
    generated instances (200 per level) no optimal-length plan met the goal text in a state other than the
    reference final state, so a 3.0 means the same thing in both modes.

Problem `index` of a split is generated from its own seeded RNG. Train and test are disjoint: an instance
belongs to the split picked by a hash of its (initial state, goal), and each split keeps only its own.
"""

from __future__ import annotations

import hashlib
import random
import re

from e2h_min.tasks.rewards import parse_think_answer
from e2h_min.tasks.base import SYSTEM_PROMPT, THINK_ANSWER_INSTRUCTION, Problem, Task
from e2h_min.tasks.blocksworld_strips import (
    HAND, TABLE, VERB_ARITY, Action, State, apply_action, changed_positions, legal_actions, make_state, satisfies,
    shortest_plan_length, simulate,
)

PLAN_LENGTHS = [1, 2, 4, 6, 8]  # optimal plan length per level; the last one is the OOD level
BLOCK_COUNTS = [(3, 4), (3, 4), (3, 5), (4, 5), (4, 5)]  # (min, max) blocks per level; 3 blocks reach 6 at most
NAME_SETS = [  # one word each, none of them a filler word of the parser (below)
    ["red", "blue", "orange", "yellow", "white", "magenta", "black", "cyan", "green", "violet", "silver", "gold"],
    ["apple", "banana", "cherry", "grape", "lemon", "lime", "mango", "melon", "peach", "pear", "plum", "kiwi"],
    ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda", "sigma"],
    ["cat", "dog", "fox", "owl", "bear", "wolf", "lion", "tiger", "horse", "mouse", "eagle", "zebra"],
]
MAX_PLAN_ACTIONS = 100  # longer answers score 0 without further parsing
MAX_LINE_CHARS = 200
FORMAT_REWARD = 1.0
REWARD_MODES = ("exact", "goal")
_SPLIT_SALT = {"train": 0, "test": 1_000_003, "eval": 1_000_003}

DOMAIN_TEXT = (
    "I am playing with a set of blocks. Each block sits either on the table or on top of exactly one other "
    "block, and I move them with one hand, one block at a time, using four actions:\n"
    "pick up a block\n"
    "unstack a block from on top of another block\n"
    "put down a block\n"
    "stack a block on top of another block\n\n"
    "A block is clear when no block is on top of it and I am not holding it. The actions follow these rules:\n"
    "I can pick up a block only when my hand is empty and the block is on the table and clear. Afterwards I am "
    "holding it.\n"
    "I can unstack a block from on top of another block only when my hand is empty, the first block really is "
    "on top of the second, and the first block is clear. Afterwards I am holding the first block and the second "
    "block is clear.\n"
    "I can put down a block only when I am holding it. Afterwards it is on the table and clear, and my hand is "
    "empty.\n"
    "I can stack a block on top of another block only when I am holding the first block and the second block is "
    "clear. Afterwards the first block is on top of the second and clear, the second block is no longer clear, "
    "and my hand is empty.\n"
)


# ---------------------------------------------------------------- generation


def random_state(rng: random.Random, names: list[str]) -> State:
    """A random arrangement with an empty hand: shuffle the blocks, then each one either starts a new stack on
    the table or goes on top of the block before it (probability 1/2 each).

    Example: order [red, blue, cyan] and coins (new, on) give {red: table, blue: table, cyan: blue}.
    """
    order = rng.sample(names, len(names))
    positions = {order[0]: TABLE}
    for below, block in zip(order, order[1:]):
        positions[block] = TABLE if rng.random() < 0.5 else below
    return make_state(positions)


def random_walk(rng: random.Random, start: State, length: int) -> list[Action] | None:
    """`length` uniformly chosen legal actions that never return to a state already visited; None if stuck.

    Example: from red on blue, a walk of 2 might be [unstack red blue, put-down red].
    """
    state, seen, plan = start, {start}, []
    for _ in range(length):
        options = [(a, s) for a in legal_actions(state) if (s := apply_action(state, a)) not in seen]
        if not options:
            return None
        action, state = rng.choice(options)
        seen.add(state)
        plan.append(action)
    return plan


def instance_split(start: State, goal: dict[str, str]) -> str:
    """"train" or "test", from a stable hash of the instance (half each), so the two splits never share one.

    Example: instance_split(start, {"red": "table"}) is the same string in every process.
    """
    key = repr((start, sorted(goal.items()))).encode()
    return "test" if hashlib.sha256(key).digest()[0] % 2 else "train"


def generate_instance(rng: random.Random, plan_length: int, block_counts: tuple[int, int], split: str
                      ) -> tuple[State, list[Action], State, dict[str, str]]:
    """(start, reference plan, final state, goal) with optimal plan length exactly `plan_length`.

    Draws a name set, a number of blocks in block_counts, a random arrangement and a random walk; the goal is
    the changed positions. Redraws until the instance hashes to `split` and BFS finds no plan shorter than the
    walk that satisfies the goal. Since the walk's final state satisfies the goal, that also fixes the BFS
    distance to the final state itself at plan_length.
    """
    while True:
        names = rng.sample(rng.choice(NAME_SETS), rng.randint(*block_counts))
        start = random_state(rng, names)
        plan = random_walk(rng, start, plan_length)
        if plan is None:
            continue
        final = simulate(start, plan)
        goal = changed_positions(start, final)
        if instance_split(start, goal) != split:
            continue
        if shortest_plan_length(start, lambda state: satisfies(state, goal), plan_length) == plan_length:
            return start, plan, final, goal


# ---------------------------------------------------------------- text


def position_text(block: str, position: str) -> str:
    """Example: position_text("red", "blue") == "the red block is on top of the blue block"."""
    if position == TABLE:
        return f"the {block} block is on the table"
    if position == HAND:
        return f"the hand is holding the {block} block"
    return f"the {block} block is on top of the {position} block"


def join_facts(facts: list[str]) -> str:
    """Example: join_facts(["a", "b", "c"]) == "a, b and c"."""
    return facts[0] if len(facts) == 1 else ", ".join(facts[:-1]) + " and " + facts[-1]


def describe_state(state: State) -> str:
    """Hand, clear blocks, then each block's position (blocks in name order). Example: red on blue ->
    "the hand is empty, the red block is clear, the blue block is on the table and the red block is on top of
    the blue block"."""
    positions = dict(state)
    facts = [] if HAND in positions.values() else ["the hand is empty"]
    facts += [f"the {b} block is clear" for b, p in state if p != HAND and b not in positions.values()]
    facts += [position_text(b, p) for b, p in state]
    return join_facts(facts)


def describe_goal(goal: dict[str, str]) -> str:
    """Example: describe_goal({"red": "table"}) == "the red block is on the table"."""
    return join_facts([position_text(b, p) for b, p in sorted(goal.items())])


def action_text(action: Action) -> str:
    """The prompt's wording of an action.

    Example: action_text(Action("unstack", "red", "blue")) == "unstack the red block from on top of the blue block"
    """
    verb, block, target = action
    return {
        "pick-up": f"pick up the {block} block",
        "unstack": f"unstack the {block} block from on top of the {target} block",
        "put-down": f"put down the {block} block",
        "stack": f"stack the {block} block on top of the {target} block",
    }[verb]


def blocksworld_prompt(start: State, goal: dict[str, str], example: tuple[str, str]) -> str:
    """Domain rules, the [Problem] statement, then the think/answer instruction with a two-action example plan
    over the two block names in `example` (names of the same set that are not in the problem)."""
    x, y = example
    example_plan = f"pick up the {x} block\nstack the {x} block on top of the {y} block"
    return (
        f"{DOMAIN_TEXT}\n[Problem] Here is the initial state of the blocks: {describe_state(start)}. "
        f"Here is the goal state of the blocks: {describe_goal(goal)}. {THINK_ANSWER_INSTRUCTION}, "
        f"with one action per line, for example <answer>\n{example_plan}\n</answer>."
    )


# ---------------------------------------------------------------- parsing and reward

_ENUMERATOR = re.compile(r"(?:step\s*\d{1,3}\s*[:.)]|\d{1,3}\s*[:.)]|[-*])\s*")
_ACTION_CHARS = re.compile(r"[a-z \t-]*")
_FILLER_WORDS = {"the", "a", "an", "block", "from", "on", "top", "of", "onto", "off"}
_VERB_WORDS = [(("pick", "up"), "pick-up"), (("pick-up",), "pick-up"), (("pickup",), "pick-up"),
               (("put", "down"), "put-down"), (("put-down",), "put-down"), (("putdown",), "put-down"),
               (("unstack",), "unstack"), (("stack",), "stack")]


def parse_action(line: str, blocks: set[str]) -> Action | None:
    """One action from one line, or None. Case-insensitive; ASCII only (look-alike letters are rejected).

    Accepted: an optional enumerator ("3.", "3)", "Step 3:", "-", "*"), then a verb (pick up, unstack,
    put down, stack; also PDDL's pick-up / pickup / put-down / putdown), then the block names in order, with
    the filler words the / a / an / block / from / on / top / of / onto / off anywhere after the verb, an
    optional trailing '.', ',' or ';'; or the whole action in parentheses, PDDL style.
    Example: parse_action("2. Stack the red block on top of the blue block.", {"red", "blue"})
             == Action("stack", "red", "blue")
             parse_action("(unstack red blue)", {"red", "blue"}) == Action("unstack", "red", "blue")
             parse_action("pick up the red block from the table", {"red"}) == Action("pick-up", "red")
             parse_action("stack the red block on the table", ...) is None   ("table" is no block)
    """
    if len(line) > MAX_LINE_CHARS or not line.isascii():
        return None
    text = line.strip().lower()
    enumerator = _ENUMERATOR.match(text)
    if enumerator:
        text = text[enumerator.end():]
    text = text.rstrip(".,;").strip()
    if text.startswith("(") and text.endswith(")"):
        text = text[1:-1]
    if not _ACTION_CHARS.fullmatch(text):
        return None
    words = text.split()
    for prefix, verb in _VERB_WORDS:
        if tuple(words[:len(prefix)]) == prefix:
            names = [w for w in words[len(prefix):] if w not in _FILLER_WORDS]
            if VERB_ARITY[verb] == 1 and names[1:] == ["table"] and "table" not in blocks:
                names = names[:1]  # "put down the red block on the table": the table is where put-down puts it
            if len(names) != VERB_ARITY[verb] or not all(name in blocks for name in names):
                return None
            return Action(verb, *names)
    return None


def parse_plan(answer: str, blocks: set[str]) -> list[Action] | None:
    """The actions of an answer, one per non-blank line; None if any line fails, the plan is empty, or it has
    more than MAX_PLAN_ACTIONS actions. Example: parse_plan("pick up the red block\\nstack red blue", ...)
    == [Action("pick-up", "red"), Action("stack", "red", "blue")]."""
    plan = []
    for line in answer.splitlines():
        if not line.strip():
            continue
        action = parse_action(line, blocks) if len(plan) < MAX_PLAN_ACTIONS else None
        if action is None:
            return None
        plan.append(action)
    return plan or None


def blocksworld_reward(completion: str, start: State, final: State, goal: dict[str, str], optimal_length: int,
                       reward_mode: str = "exact") -> float:
    """0.0, 1.0, 2 + optimal_length / n (n > optimal_length) or 3.0; see the module docstring.

    `final` is the reference plan's final state (used by "exact"), `goal` the goal text's facts (used by
    "goal"). Example, red on blue on the table, goal {red: table}, optimum 2:
        " ...</think>\\n<answer>\\nunstack red from blue\\nput down red\\n</answer>"  -> 3.0
        " ...</think>\\n<answer>\\nput down red\\n</answer>"                          -> 0.0 (illegal)
    """
    answer = parse_think_answer(completion)
    if answer is None:
        return 0.0
    plan = parse_plan(answer, {block for block, _ in start})
    if plan is None:
        return 0.0
    reached = simulate(start, plan)
    if reached is None:
        return 0.0
    success = reached == final if reward_mode == "exact" else satisfies(reached, goal)
    if not success:
        return FORMAT_REWARD
    return FORMAT_REWARD + 1.0 + min(1.0, optimal_length / len(plan))


# ---------------------------------------------------------------- task


class BlocksworldTask(Task):
    name = "blocksworld"
    num_levels = 4
    has_ood = True
    format_reward = FORMAT_REWARD
    system_prompt = SYSTEM_PROMPT.replace("thinks", "think")  # the paper's Blocksworld prompt says "think"

    def __init__(self, seed: int = 0, reward_mode: str = "exact"):
        if reward_mode not in REWARD_MODES:
            raise ValueError(f"reward_mode must be one of {REWARD_MODES}, got {reward_mode!r}")
        self.seed = seed
        self.reward_mode = reward_mode

    def problem(self, level: int, index: int, split: str = "train") -> Problem:
        if not 0 <= level < len(PLAN_LENGTHS):
            raise ValueError(f"blocksworld has levels 0..{len(PLAN_LENGTHS) - 1}, got {level}")
        salt = _SPLIT_SALT.get(split)
        if salt is None:
            raise ValueError(f"unknown split {split!r}; use 'train' or 'test'")
        rng = random.Random(f"blocksworld/{self.seed}/{salt}/{level}/{index}")
        start, plan, final, goal = generate_instance(rng, PLAN_LENGTHS[level], BLOCK_COUNTS[level],
                                                     "train" if split == "train" else "test")
        blocks = sorted(block for block, _ in start)
        name_set = next(names for names in NAME_SETS if set(blocks) <= set(names))
        example = tuple(rng.sample([n for n in name_set if n not in blocks], 2))
        data = {
            "blocks": blocks,
            "init": dict(start),
            "goal": goal,
            "final": dict(final),
            "plan": [list(action) for action in plan],
            "optimal_length": len(plan),
        }
        return Problem(level, index, blocksworld_prompt(start, goal, example), data)

    def score(self, problem: Problem, completion: str) -> float:
        data = problem.data
        return blocksworld_reward(completion, make_state(data["init"]), make_state(data["final"]), data["goal"],
                                  data["optimal_length"], self.reward_mode)

    def demonstration(self, problem: Problem) -> str:
        """The goal, then the reference plan (optimal by construction), ending right after </answer>.

        Example: " The goal is: the red block is on the table. A shortest plan takes 2 actions.</think>\\n
        <answer>\\nunstack the red block from on top of the blue block\\nput down the red block\\n</answer>"
        """
        plan = [action_text(Action(*action)) for action in problem.data["plan"]]
        return (f" The goal is: {describe_goal(problem.data['goal'])}. A shortest plan takes {len(plan)} "
                f"action{'s' if len(plan) > 1 else ''}.</think>\n<answer>\n" + "\n".join(plan) + "\n</answer>")
