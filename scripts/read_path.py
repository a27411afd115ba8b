"""Count the lines a reader goes through for one default GRPO step (README: Read the code in this order).

    python scripts/read_path.py            # this checkout
    python scripts/read_path.py PATH       # another checkout of the project (e.g. an older commit)

It runs step 1 of `python train.py --total-steps 1 --eval-problems 1` (the CPU demo's defaults otherwise) with a
profiler from the loop's `seed_step` call to its `check_not_diverged` call: curriculum draw -> rollout -> reward
-> advantages -> loss -> optimizer step. Counted:
- train.py's `train` (the function that holds the step loop), whole;
- every function of the project that runs in that window, once, whole (decorators, signature, docstring,
  comments and blank lines inside), except
- the engine layers a reader takes on their word: the sampler (rollout.py, decoders.py), the log-prob kernel
  (logprobs.py), the work savings (update_batches.py), the diagnostics (diagnostics.py), the collectives
  (distributed.py, fsdp.py) and the Countdown expression parser. Where a non-engine function calls into one of
  them, the callee counts for its signature and docstring only (its interface); what the engine calls
  internally is not counted.
The same rules apply to any checkout, so two commits' figures compare.
"""

from __future__ import annotations

import ast
import os
import sys
from collections import defaultdict

ENGINE_FILES = {"e2h_min/engine/sampler.py", "e2h_min/engine/decoders.py", "e2h_min/engine/logprobs.py", "e2h_min/engine/batching.py",
                "e2h_min/rl/diagnostics.py", "e2h_min/engine/distributed.py", "e2h_min/engine/fsdp.py"}
PARSER = {"_tokenize", "__init__", "peek", "take", "expr", "term", "factor", "_bounded", "evaluate_expression",
          "safe_arith"}  # the Countdown grader's parser (tasks/countdown.py; rewards.py before issue 16)
PARSER_FILES = {"e2h_min/tasks/countdown.py", "e2h_min/tasks/rewards.py"}


def function_table(path: str) -> dict[int, tuple[str, int, int, int]]:
    """first line (decorator or def) -> (name, first line, last line, last line of the docstring or signature)."""
    table = {}
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            start = min([node.lineno] + [d.lineno for d in node.decorator_list])
            body = node.body[0]
            has_doc = isinstance(body, ast.Expr) and isinstance(getattr(body, "value", None), ast.Constant) \
                and isinstance(body.value.value, str)
            interface_end = body.end_lineno if has_doc else body.lineno - 1
            table[start] = table[node.lineno] = (node.name, start, node.end_lineno, interface_end)
    return table


def loop_lines(path: str) -> tuple[int, int]:
    """(lines of the function `train`, lines of its `for step in ...` loop)."""
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.FunctionDef) and node.name == "train":
            start = min([node.lineno] + [d.lineno for d in node.decorator_list])
            for stmt in ast.walk(node):
                if isinstance(stmt, ast.For) and isinstance(stmt.target, ast.Name) and stmt.target.id == "step":
                    return node.end_lineno - start + 1, stmt.end_lineno - stmt.lineno + 1
    raise SystemExit("no function train() with a `for step in ...` loop in train.py")


def main() -> None:
    repo = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), ".."))
    sys.path.insert(0, repo)
    os.chdir(repo)
    import train

    tables: dict[str, dict] = {}
    counted: dict[tuple[str, str, int], int] = {}
    active = False

    def where(code) -> tuple[str, tuple] | None:
        path = os.path.abspath(code.co_filename)
        if not path.startswith(repo + os.sep) or not path.endswith(".py") or os.sep + "." in path[len(repo):]:
            return None
        rel = os.path.relpath(path, repo)
        if rel.startswith(("tests", "scripts")):
            return None
        if rel not in tables:
            tables[rel] = function_table(path)
        entry = tables[rel].get(code.co_firstlineno)
        return (rel, entry) if entry else None

    def is_engine(rel: str, name: str) -> bool:
        return rel in ENGINE_FILES or (rel in PARSER_FILES and name in PARSER)

    def profile(frame, event, arg):
        if event != "call" or not active:
            return
        callee = where(frame.f_code)
        if callee is None:
            return
        rel, (name, start, end, interface_end) = callee
        if not is_engine(rel, name):
            counted[(rel, name, start)] = end - start + 1
            return
        caller, back = None, frame.f_back
        while back is not None and caller is None:  # the nearest project frame (skips torch's decorators)
            caller, back = where(back.f_code), back.f_back
        if caller is None or is_engine(caller[0], caller[1][0]):
            return  # inside an engine layer
        counted.setdefault((rel, name, start), interface_end - start + 1)

    seeds = []
    real_seed, real_check = train.seed_step, train.check_not_diverged

    def seed_step(*args, **kwargs):
        nonlocal active
        real_seed(*args, **kwargs)
        seeds.append(1)
        active = len(seeds) == 2  # the first call seeds the setup, the second opens step 1

    def check_not_diverged(*args, **kwargs):
        nonlocal active
        active = False
        return real_check(*args, **kwargs)

    train.seed_step, train.check_not_diverged = seed_step, check_not_diverged
    out_dir = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"read_path_run_{os.getpid()}")
    sys.setprofile(profile)
    try:
        train.main(["--total-steps", "1", "--eval-every", "0", "--eval-problems", "1", "--save-every", "0",
                    "--out-dir", out_dir])
    finally:
        sys.setprofile(None)
    by_file = defaultdict(list)
    for (rel, name, start), n in counted.items():
        by_file[rel].append((start, name, n))
    whole, loop = loop_lines(os.path.join(repo, "train.py"))
    print(f"train.py: train {whole} lines (its step loop: {loop})")
    total = whole
    for rel in sorted(by_file):
        functions = sorted(by_file[rel])
        lines = sum(n for _, _, n in functions)
        total += lines
        tag = " (interfaces only)" if rel in ENGINE_FILES else ""
        print(f"{rel}{tag}: {lines} lines: " + ", ".join(f"{name} {n}" for _, name, n in functions))
    print(f"read path of one default GRPO step: {total} lines in {len(set(by_file) | {'train.py'})} files")


if __name__ == "__main__":
    main()
