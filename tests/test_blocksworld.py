"""Tests for e2h_min/tasks/blocksworld.py and blocksworld_strips.py.

Instance lengths are checked by an independent planner written here: classic STRIPS over fact sets with
add / delete lists, sharing no code with the module's position-map simulator.
"""

from __future__ import annotations

import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from e2h_min.tasks import make_task
from e2h_min.tasks.base import SYSTEM_PROMPT, THINK_ANSWER_INSTRUCTION
from e2h_min.tasks.blocksworld import (
    MAX_PLAN_ACTIONS, PLAN_LENGTHS, BlocksworldTask, blocksworld_reward, describe_state, parse_action, parse_plan,
)
from e2h_min.tasks.blocksworld_strips import Action, apply_action, make_state

# ---------------------------------------------------------------- independent STRIPS reference


def facts_of(positions: dict[str, str]) -> frozenset:
    """Fact set of a {block: position} map: on / ontable / holding / clear / handempty."""
    facts = set()
    for block, position in positions.items():
        if position == "table":
            facts.add(("ontable", block))
        elif position == "hand":
            facts.add(("holding", block))
        else:
            facts.add(("on", block, position))
    supports = set(positions.values())
    facts |= {("clear", b) for b, p in positions.items() if p != "hand" and b not in supports}
    if "hand" not in positions.values():
        facts.add(("handempty",))
    return frozenset(facts)


def ground_actions(blocks: list[str]) -> list[tuple[tuple, set, set, set]]:
    """(name, preconditions, add list, delete list) of every grounded STRIPS action."""
    actions = []
    for x in blocks:
        actions.append((("pick-up", x), {("clear", x), ("ontable", x), ("handempty",)}, {("holding", x)},
                        {("clear", x), ("ontable", x), ("handempty",)}))
        actions.append((("put-down", x), {("holding", x)}, {("clear", x), ("ontable", x), ("handempty",)},
                        {("holding", x)}))
        for y in blocks:
            if x != y:
                actions.append((("stack", x, y), {("holding", x), ("clear", y)},
                                {("on", x, y), ("clear", x), ("handempty",)}, {("holding", x), ("clear", y)}))
                actions.append((("unstack", x, y), {("on", x, y), ("clear", x), ("handempty",)},
                                {("holding", x), ("clear", y)}, {("on", x, y), ("clear", x), ("handempty",)}))
    return actions


def reference_run(start: frozenset, plan: list[tuple], actions) -> frozenset | None:
    by_name = {name: (pre, add, delete) for name, pre, add, delete in actions}
    facts = start
    for name in plan:
        pre, add, delete = by_name[name]
        if not pre <= facts:
            return None
        facts = (facts - delete) | add
    return facts


def reference_distances(start: frozenset, final: frozenset, goal: frozenset, actions, limit: int) -> tuple:
    """(BFS distance to `final`, BFS distance to the first state containing `goal`), None where beyond limit."""
    to_final = to_goal = None
    frontier, seen = [start], {start}
    for depth in range(limit + 1):
        if to_goal is None and any(goal <= s for s in frontier):
            to_goal = depth
        if to_final is None and final in frontier:
            to_final = depth
        next_frontier = []
        for facts in frontier:
            for _, pre, add, delete in actions:
                if pre <= facts:
                    successor = (facts - delete) | add
                    if successor not in seen:
                        seen.add(successor)
                        next_frontier.append(successor)
        frontier = next_frontier
    return to_final, to_goal


def goal_facts(goal: dict[str, str]) -> frozenset:
    return frozenset(("ontable", b) if p == "table" else ("holding", b) if p == "hand" else ("on", b, p)
                     for b, p in goal.items())


def wrap(plan_text: str, think: str = " plan it") -> str:
    return f"{think}</think>\n<answer>\n{plan_text}\n</answer>"


TASK = BlocksworldTask(seed=0)
GOAL_TASK = BlocksworldTask(seed=0, reward_mode="goal")

# ---------------------------------------------------------------- generation


@pytest.mark.parametrize("level", range(5))
@pytest.mark.parametrize("split", ["train", "test"])
def test_instances_have_exactly_the_level_optimal_length(level, split):
    count = 12 if level < 4 else 6
    for index in range(count):
        data = TASK.problem(level, index, split).data
        blocks, length = data["blocks"], PLAN_LENGTHS[level]
        actions = ground_actions(blocks)
        start, final = facts_of(data["init"]), facts_of(data["final"])
        plan = [tuple(a for a in action if a is not None) for action in data["plan"]]
        assert len(plan) == data["optimal_length"] == length
        assert reference_run(start, plan, actions) == final
        moved = {b: p for b, p in data["final"].items() if data["init"][b] != p}
        assert data["goal"] == moved  # only the blocks whose position changed
        to_final, to_goal = reference_distances(start, final, goal_facts(data["goal"]), actions, length)
        assert (to_final, to_goal) == (length, length), (level, index, data)


def test_generation_is_deterministic_and_splits_are_disjoint():
    assert TASK.problem(3, 5, "train") == BlocksworldTask(seed=0).problem(3, 5, "train")
    assert TASK.problem(3, 5, "train") != BlocksworldTask(seed=1).problem(3, 5, "train")
    assert TASK.problem(1, 0, "test") == TASK.problem(1, 0, "eval")
    for level in (0, 1):  # the smallest instance spaces, where an overlap would first show
        key = lambda p: (repr(sorted(p.data["init"].items())), repr(sorted(p.data["goal"].items())))
        train = {key(TASK.problem(level, i, "train")) for i in range(300)}
        test = {key(TASK.problem(level, i, "test")) for i in range(300)}
        assert len(train) > 250 and len(test) > 250 and not train & test


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="levels 0..4"):
        TASK.problem(5, 0)
    with pytest.raises(ValueError, match="unknown split"):
        TASK.problem(0, 0, "dev")
    with pytest.raises(ValueError, match="reward_mode"):
        BlocksworldTask(reward_mode="loose")


def test_registry_and_prompt_layout():
    task = make_task("blocksworld", seed=3)
    assert isinstance(task, BlocksworldTask) and task.eval_levels == [0, 1, 2, 3, 4]
    assert task.system_prompt == SYSTEM_PROMPT.replace("You first thinks", "You first think")
    problem = task.problem(2, 1)
    prompt = problem.user_prompt
    for phrase in ("pick up", "unstack", "put down", "stack", "[Problem] Here is the initial state of the blocks: ",
                   "Here is the goal state of the blocks: ", THINK_ANSWER_INSTRUCTION):
        assert phrase in prompt
    example = prompt.split("for example <answer>")[1].split("</answer>")[0].strip().splitlines()
    assert len(example) == 2 and all(parse_action(line, set(problem.data["blocks"]) | set(line.split()))
                                     for line in example)
    goal_text = prompt.split("Here is the goal state of the blocks: ")[1].split(". Show")[0]
    for block in problem.data["blocks"]:  # the goal text places exactly the moved blocks
        placed = f"the {block} block is " in goal_text or f"holding the {block} block" in goal_text
        assert placed == (block in problem.data["goal"])


def test_describe_state_hand_worked():
    state = make_state({"red": "blue", "blue": "table", "green": "hand"})
    assert describe_state(state) == ("the red block is clear, the blue block is on the table, the hand is holding "
                                     "the green block and the red block is on top of the blue block")


# ---------------------------------------------------------------- parser

BLOCKS = {"red", "blue", "green"}


@pytest.mark.parametrize("line, expected", [
    ("pick up the red block", Action("pick-up", "red")),
    ("Pick Up The RED Block.", Action("pick-up", "red")),
    ("1. pick up red", Action("pick-up", "red")),
    ("Step 2: put down the red block", Action("put-down", "red")),
    ("- unstack the red block from on top of the blue block", Action("unstack", "red", "blue")),
    ("unstack red from blue", Action("unstack", "red", "blue")),
    ("stack the red block on top of the blue block", Action("stack", "red", "blue")),
    ("stack a red block onto the blue block;", Action("stack", "red", "blue")),
    ("(unstack red blue)", Action("unstack", "red", "blue")),
    ("(pick-up green)", Action("pick-up", "green")),
    ("(putdown green)", Action("put-down", "green")),
    ("put down the red block on the table", Action("put-down", "red")),  # where put-down puts it: redundant
    ("pick up the green block from the table", Action("pick-up", "green")),
])
def test_parse_action_accepts_the_phrasings(line, expected):
    assert parse_action(line, BLOCKS) == expected


@pytest.mark.parametrize("line", [
    "move the red block to the table",  # no such verb
    "stack the red block on the table",  # "table" is no block
    "put down the red block on the blue block",  # two blocks for a one-block action
    "stack the red block",  # one block for a two-block action
    "pick up the purple block",  # unknown block
    "pick up the rеd block",  # Cyrillic 'е'
    "ｐｉｃｋ up the red block",  # fullwidth letters
    "pic\u212a up the red block",  # Kelvin sign, which str.lower() turns into an ASCII 'k'
    "pick up the red block\x00",
    "then pick up the red block",
    "pick up the red block " + "x" * 300,
])
def test_parse_action_rejects(line):
    assert parse_action(line, BLOCKS) is None


def test_parse_plan_limits():
    assert parse_plan("\n  pick up red\n\n  put down red  \n", BLOCKS) == [Action("pick-up", "red"),
                                                                           Action("put-down", "red")]
    assert parse_plan(" \n \n", BLOCKS) is None  # no action at all
    assert parse_plan("pick up red\nput down red\nhooray", BLOCKS) is None  # one bad line spoils the plan
    ok = "\n".join(["pick up red", "put down red"] * (MAX_PLAN_ACTIONS // 2))
    assert len(parse_plan(ok, BLOCKS)) == MAX_PLAN_ACTIONS
    assert parse_plan(ok + "\npick up red", BLOCKS) is None


def test_every_action_in_every_state_matches_the_strips_reference():
    """The simulator's preconditions and effects against the STRIPS reference, for every grounded action in every
    state of a 3-block world reachable from one tower (all 22 states): a rule that lets a block be stacked onto a
    covered one, or picked from under another, is a reward a policy could earn with an illegal plan."""
    blocks = ["a", "b", "c"]
    actions = ground_actions(blocks)
    start = {"a": "b", "b": "c", "c": "table"}
    states, frontier = {facts_of(start): start}, [start]
    while frontier:
        positions = frontier.pop()
        for name, _, _, _ in actions:
            after = apply_action(make_state(positions), Action(name[0], name[1], name[2] if len(name) > 2 else None))
            expected = reference_run(facts_of(positions), [name], actions)
            assert (after is None) == (expected is None), (positions, name)
            if after is not None:
                assert facts_of(dict(after)) == expected, (positions, name)
                if expected not in states:
                    states[expected] = dict(after)
                    frontier.append(dict(after))
    assert len(states) == 22  # 13 hand-empty arrangements of 3 blocks + 3 blocks in hand x 3 arrangements of 2


# ---------------------------------------------------------------- reward, hand-worked
# Red on blue on the table, green on the table; goal: red on the table (optimal: unstack, put down).

START = make_state({"red": "blue", "blue": "table", "green": "table"})
FINAL = make_state({"red": "table", "blue": "table", "green": "table"})
GOAL = {"red": "table"}


def reward(plan_text: str, mode: str = "exact", completion: str | None = None) -> float:
    return blocksworld_reward(completion if completion is not None else wrap(plan_text), START, FINAL, GOAL, 2, mode)


@pytest.mark.parametrize("plan, expected", [
    ("unstack the red block from on top of the blue block\nput down the red block", 3.0),  # optimal
    ("unstack red from blue\nstack red on green\nunstack red from green\nput down red", 2.5),  # n_ref 2, n 4
    ("unstack red blue\nput down red\npick up green\nput down green", 2.5),  # detour back to the same state
    ("put down the red block\nunstack red blue", 0.0),  # illegal: hand is empty
    ("unstack the blue block from on top of the red block", 0.0),  # illegal: blue is not on red
    ("move red to the table", 0.0),  # unparseable
    ("unstack red from blue\nstack red on green", 1.0),  # legal, wrong final state
    ("pick up green\nstack green on blue", 0.0),  # illegal: red is on blue (a stack onto a covered block)
    ("unstack red from blue\nstack red on green\npick up blue\nstack blue on green", 0.0),  # green holds red
    ("unstack red from blue", 1.0),  # legal, stops holding red
])
def test_reward_hand_worked(plan, expected):
    assert reward(plan) == pytest.approx(expected)
    assert reward(plan, mode="goal") == pytest.approx(expected)


def test_reward_format_failures_and_length_cap():
    good = "unstack red blue\nput down red"
    assert reward("", completion="unstack red blue\nput down red") == 0.0  # no tags
    assert reward("", completion=wrap(good) + " and more") == 0.0  # text after </answer>
    assert reward("", completion=wrap(good, think=" ")) == 0.0  # empty think
    padding = "\npick up green\nput down green" * 49  # 2 + 98 = 100 actions, back to the same final state
    assert reward(good + padding) == pytest.approx(2 + 2 / 100)
    assert reward(good + padding + "\npick up green\nput down green") == 0.0  # 102 actions: over the cap


def test_goal_mode_accepts_valid_alternative_plans():
    moves_green = "unstack red blue\nput down red\npick up green\nstack green on blue"  # green ends on blue
    holds_green = "unstack red blue\nput down red\npick up green"  # ends holding green
    assert reward(moves_green, mode="exact") == 1.0  # final state differs from the reference plan's
    assert reward(moves_green, mode="goal") == pytest.approx(2.5)
    assert reward(holds_green, mode="exact") == 1.0
    assert reward(holds_green, mode="goal") == pytest.approx(2 + 2 / 3)
    assert reward("unstack red blue\nstack red green", mode="goal") == 1.0  # goal fact not met


def test_goal_mode_on_a_generated_problem():
    """Reference plan plus one more pick-up of an unmentioned clear block: the goal facts still hold."""
    checked = 0
    for index in range(10):
        problem = TASK.problem(1, index)
        final, goal = problem.data["final"], problem.data["goal"]
        supports = set(final.values())
        spare = [b for b in sorted(final) if b not in goal and b not in supports]
        if not spare:
            continue
        extra = f"pick up {spare[0]}" if final[spare[0]] == "table" else f"unstack {spare[0]} {final[spare[0]]}"
        plan = [" ".join(word for word in action if word) for action in problem.data["plan"]] + [extra]
        completion = wrap("\n".join(f"({line})" for line in plan))
        assert TASK.score(problem, completion) == 1.0
        assert GOAL_TASK.score(problem, completion) == pytest.approx(2 + 2 / 3)
        checked += 1
    assert checked >= 3


@pytest.mark.parametrize("level", range(5))
def test_demonstrations_score_three(level):
    for index in range(5):
        for task in (TASK, GOAL_TASK):
            problem = task.problem(level, index, "test")
            demo = task.demonstration(problem)
            assert demo.endswith("</answer>")
            assert task.score(problem, demo) == 3.0 and task.is_correct(3.0)
    assert not TASK.is_correct(1.0)


# ---------------------------------------------------------------- totality and speed

PROBLEM = TASK.problem(4, 0)
DEMO = TASK.demonstration(PROBLEM)
BLOCK = PROBLEM.data["blocks"][0]
HOSTILE = [
    "",
    "\x00" * 10_000,
    wrap("\n".join([f"(pick-up {BLOCK})", f"(put-down {BLOCK})"] * 5_000)),  # 10k legal actions
    wrap(f"pick up the {BLOCK} block\n" * 10_000),  # 10k actions, illegal from the second on
    wrap("\n" * 10_000),
    wrap("x" * 10_000),
    wrap("step " * 2_000 + "1: pick up"),
    wrap("(" * 5_000 + ")" * 5_000),
    "<think>" * 1_000 + "</answer>" * 100,
    " a</think><answer>" + "<answer></answer>" * 500 + "</answer>",
    DEMO.replace("a", "а"),  # Cyrillic look-alike
    DEMO.replace("e", "\u0435").replace("o", "\u043e"),
    DEMO.replace("\n", "\u2028"),
    DEMO.replace("\n", "\r\n"),
    DEMO * 20,
    DEMO[:-9] + "\u202e" * 1000 + "</answer>",
    wrap("1. " * 3_000),
    wrap("-" * 10_000),
    wrap("\t \x0b\x0c" * 2_500),
    wrap("🧱" * 2_500),
]


@pytest.mark.parametrize("case", range(len(HOSTILE)))
def test_hostile_inputs_are_scored_fast(case):
    completion = HOSTILE[case]
    timings = []
    for _ in range(3):  # best of three, so a scheduler stall on the shared CPU does not count as the grader's
        begin = time.perf_counter()
        value = TASK.score(PROBLEM, completion)
        timings.append(time.perf_counter() - begin)
    assert value in (0.0, 1.0, 3.0) or 2.0 < value < 3.0
    assert min(timings) < 0.05, timings


ACTION_WORDS = ["pick up", "put down", "unstack", "stack", "the", "block", "from on top of", "on top of", "(", ")",
                "\n", "red", "blue", "green", "table", "1.", "</answer>", "<answer>", "</think>", "<think>"]


def allowed_values(n_ref: int) -> set[float]:
    return {0.0, 1.0, 3.0} | {2 + n_ref / n for n in range(n_ref + 1, MAX_PLAN_ACTIONS + 1)}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.text(max_size=400),
                 st.lists(st.sampled_from(ACTION_WORDS), max_size=40).map(lambda ws: wrap(" ".join(ws))),
                 st.lists(st.sampled_from(ACTION_WORDS), max_size=60).map(" ".join)))
def test_any_text_scores_a_documented_value(text):
    for mode in ("exact", "goal"):
        value = reward("", mode=mode, completion=text)
        assert any(abs(value - allowed) < 1e-12 for allowed in allowed_values(2))
