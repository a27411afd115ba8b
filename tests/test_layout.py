"""The layout shows the architecture, and the imports keep to it: each part of e2h_min imports only itself and the
parts below it, and no module imports itself back through others (read from the source, nothing is imported).

    errors.py, jsonl.py   the leaves: import nothing from e2h_min
    tasks/                the tasks, their data and graders
    engine/               the sampler, decoders, log-probs, the update's micro-batches, ranks, FSDP, model loading
    rl/                   the RL math: advantages, losses, the updates (fast, plain, PPO), curriculum, samples
    analysis/             evaluation, pass@k, statistics, the report, the KL table, the labelling tool
    run/                  a run's bookkeeping: config, presets, set-up, checkpoints, logs, trackers, the finish
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["errors", "jsonl", "tasks", "engine", "rl", "analysis", "run"]  # low to high
RANK = {"errors": 0, "jsonl": 0, "tasks": 1, "engine": 2, "rl": 3, "analysis": 4, "run": 5}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every e2h_min module that `path` imports, at module level or inside a function."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.startswith("e2h_min"):
                for alias in node.names:  # `from e2h_min.run import setup` imports the module e2h_min.run.setup
                    sub = f"{node.module}.{alias.name}"
                    out.add(sub if (ROOT / (sub.replace(".", "/") + ".py")).exists() else node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("e2h_min"))
    return out


MODULES = {module_name(p): p for p in (ROOT / "e2h_min").rglob("*.py")}
GRAPH = {name: imports_of(path) & set(MODULES) for name, path in MODULES.items()}


def part(module: str) -> str:
    return module.split(".")[1]


def test_every_module_sits_in_a_known_part():
    assert {part(m) for m in MODULES if m != "e2h_min"} <= set(LAYERS)


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m != "e2h_min"))
def test_no_module_imports_a_higher_part(module):
    upward = sorted(m for m in GRAPH[module] if m != "e2h_min" and RANK[part(m)] > RANK[part(module)])
    assert not upward, f"{module} imports {upward}, above its part {part(module)}"


def test_the_leaves_import_nothing_from_the_package():
    assert GRAPH["e2h_min.errors"] == set() and GRAPH["e2h_min.jsonl"] == set()


def test_no_import_cycle():
    """Depth-first search over the module graph; a back edge is a cycle."""
    state: dict[str, int] = {}  # 1 on the stack, 2 done

    def visit(module, stack):
        state[module] = 1
        for dep in sorted(GRAPH[module]):
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(dep):] + [dep]))
            if dep not in state:
                visit(dep, stack + [dep])
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])


def test_the_check_finds_a_cycle_and_an_upward_import(monkeypatch):
    """The two checks above can fail: a planted engine -> run edge is both."""
    monkeypatch.setitem(GRAPH, "e2h_min.engine.sampler", GRAPH["e2h_min.engine.sampler"] | {"e2h_min.run.setup"})
    with pytest.raises(AssertionError, match="above its part"):
        test_no_module_imports_a_higher_part("e2h_min.engine.sampler")
    with pytest.raises(AssertionError, match="import cycle"):
        test_no_import_cycle()


def long_functions(path: Path, limit: int = 80) -> list[str]:
    return [f"{path.relative_to(ROOT)}:{node.name} {node.end_lineno - node.lineno + 1} lines"
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - min([node.lineno] + [d.lineno for d in node.decorator_list]) + 1 > limit]


def test_no_function_over_80_lines_in_the_trainer_the_evaluator_or_the_package():
    paths = [ROOT / "train.py", ROOT / "eval.py", *sorted((ROOT / "e2h_min").rglob("*.py"))]
    assert [entry for p in paths for entry in long_functions(p)] == []


def test_train_py_is_the_loop_first_and_short():
    source = (ROOT / "train.py").read_text()
    functions = [n.name for n in ast.parse(source).body if isinstance(n, ast.FunctionDef)]
    assert len(source.splitlines()) <= 300 and functions[0] == "train"
