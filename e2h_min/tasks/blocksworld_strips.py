"""Blocksworld as a STRIPS model: states, the four actions, plan simulation and breadth-first search.

Pure and text-free (the wording lives in blocksworld.py). A state says where every block is: on the table, in
the hand, or on another block. The usual STRIPS facts follow from it:

    on(x, y)    position[x] == y          ontable(x)  position[x] == "table"
    holding(x)  position[x] == "hand"     handempty   no block is in the hand
    clear(x)    x is not in the hand and no block sits on x

Actions (x, y are different blocks):

    pick-up x       needs handempty, ontable(x), clear(x)   ->  holding(x)
    unstack x y     needs handempty, on(x, y), clear(x)     ->  holding(x), y becomes clear
    put-down x      needs holding(x)                        ->  ontable(x), handempty
    stack x y       needs holding(x), clear(y)              ->  on(x, y), handempty, y no longer clear

A state is a tuple of (block, position) pairs sorted by block, so equal arrangements are equal and hashable.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

TABLE, HAND = "table", "hand"
State = tuple[tuple[str, str], ...]  # ((block, position), ...) sorted by block; position: TABLE, HAND or a block
VERBS = ("pick-up", "unstack", "put-down", "stack")
VERB_ARITY = {"pick-up": 1, "unstack": 2, "put-down": 1, "stack": 2}


class Action(NamedTuple):
    """One grounded action: Action("stack", "red", "blue") puts the held red block on the blue block."""

    verb: str
    block: str
    target: str | None = None  # the lower block of unstack / stack, None for pick-up / put-down


def make_state(positions: dict[str, str]) -> State:
    """The canonical state of a {block: position} map.

    Example: make_state({"red": "blue", "blue": "table"}) == (("blue", "table"), ("red", "blue"))
    """
    return tuple(sorted(positions.items()))


def is_clear(positions: dict[str, str], block: str) -> bool:
    """clear(block): not in the hand and nothing on it. Example: is_clear({"r": "b", "b": "table"}, "b") is False."""
    return positions[block] != HAND and block not in positions.values()


def apply_action(state: State, action: Action) -> State | None:
    """The state after `action`, or None when its preconditions fail (or it names an unknown block).

    Example: apply_action((("blue", "table"), ("red", "blue")), Action("unstack", "red", "blue"))
             == (("blue", "table"), ("red", "hand"))
             apply_action((("blue", "table"), ("red", "blue")), Action("pick-up", "blue")) is None  (red is on it)
    """
    positions = dict(state)
    verb, block, target = action
    if block not in positions or (target is not None and (target not in positions or target == block)):
        return None
    hand_empty = HAND not in positions.values()
    if verb == "pick-up" and target is None:
        legal = hand_empty and positions[block] == TABLE and is_clear(positions, block)
        new_position = HAND
    elif verb == "unstack" and target is not None:
        legal = hand_empty and positions[block] == target and is_clear(positions, block)
        new_position = HAND
    elif verb == "put-down" and target is None:
        legal = positions[block] == HAND
        new_position = TABLE
    elif verb == "stack" and target is not None:
        legal = positions[block] == HAND and is_clear(positions, target)
        new_position = target
    else:
        return None
    if not legal:
        return None
    positions[block] = new_position
    return make_state(positions)


def legal_actions(state: State) -> list[Action]:
    """Every applicable action, in a fixed order (blocks sorted), so seeded random choices are reproducible.

    Example: legal_actions((("blue", "table"), ("red", "blue")))
             == [Action("unstack", "red", "blue")]
    """
    positions = dict(state)
    held = [block for block, position in state if position == HAND]
    clear = [block for block, _ in state if is_clear(positions, block)]
    if held:
        x = held[0]
        return [Action("put-down", x)] + [Action("stack", x, y) for y in clear]
    return [Action("pick-up", x) if positions[x] == TABLE else Action("unstack", x, positions[x]) for x in clear]


def simulate(state: State, plan: list[Action]) -> State | None:
    """The state after running `plan` from `state`, or None at the first illegal action.

    Example: simulate(s, [Action("unstack", "red", "blue"), Action("put-down", "red")]) with red on blue on the
             table gives (("blue", "table"), ("red", "table")).
    """
    for action in plan:
        state = apply_action(state, action)
        if state is None:
            return None
    return state


def shortest_plan_length(start: State, is_goal: Callable[[State], bool], max_depth: int) -> int | None:
    """Fewest actions from `start` to a state with is_goal(state), searching at most max_depth actions deep.

    Breadth-first, layer by layer: returns the depth of the first layer holding a goal state, None if none up to
    max_depth. Example: with red on blue, shortest_plan_length(s, lambda t: dict(t)["red"] == "table", 5) == 2.
    """
    frontier, seen = [start], {start}
    for depth in range(max_depth + 1):
        if any(is_goal(state) for state in frontier):
            return depth
        next_frontier = []
        for state in frontier:
            for action in legal_actions(state):
                successor = apply_action(state, action)
                if successor not in seen:
                    seen.add(successor)
                    next_frontier.append(successor)
        frontier = next_frontier
    return None


def satisfies(state: State, goal: dict[str, str]) -> bool:
    """True if every block named in `goal` is at its goal position. Example: satisfies(s, {"red": "table"})."""
    positions = dict(state)
    return all(positions.get(block) == position for block, position in goal.items())


def changed_positions(before: State, after: State) -> dict[str, str]:
    """{block: new position} for the blocks whose position differs between two states of the same blocks.

    Example: changed_positions((("b", "table"), ("r", "b")), (("b", "table"), ("r", "table"))) == {"r": "table"}
    """
    return {block: new for (block, old), (_, new) in zip(before, after) if old != new}
