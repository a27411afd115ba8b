"""Count the lines a reader goes through to trust one step of the default `python train.py` (README: the reading
order).

    python scripts/read_path.py            # this checkout
    python scripts/read_path.py PATH       # another checkout of the project (one with this layout)

It runs `python train.py --total-steps 1 --eval-every 0 --eval-problems 1 --save-every 0` (the CPU demo's
settings otherwise) under a profiler and watches step 1 of the loop, from its `seed_step` call to the end of the
iteration. The rule:
- every function of the project (train.py, e2h_min/) that runs in that step counts once, whole: decorators,
  signature, docstring, comments and blank lines inside; the loop's own function, `train`, counts whole too;
- two kinds count for their signature and docstring only, and what they call is not counted:
  1. the kernels: the sampler's per-token decode (e2h_min/engine/decoders.py) and the log-prob kernel
     (completion_logprobs and the chunked log-softmax under it, e2h_min/engine/logprobs.py);
  2. bookkeeping the loop calls in one line and a learner may skip, provided it lives in e2h_min/run/: the
     metrics row and the console/tracker logging (RunBook.log_step), the divergence probe (RunBook.check_update)
     and the evaluation/checkpoint scheduling (RunBook.evaluate_and_save_every). Nothing else in e2h_min/run/
     is skipped: what the step runs there (the OOM retry, the FSDP copy's refresh) counts whole.
"""

from __future__ import annotations

import ast
import os
import sys
from collections import defaultdict

KERNEL_FILES = {"e2h_min/engine/decoders.py"}
KERNELS = {("e2h_min/engine/logprobs.py", name)
           for name in ("completion_logprobs", "local_completion_logprobs", "_chunk_logprobs_entropy")}
BOOKKEEPING = {("e2h_min/run/bookkeeping.py", name)
               for name in ("log_step", "check_update", "evaluate_and_save_every")}


def function_table(path: str) -> dict[int, tuple[str, int, int, int]]:
    """def line -> (name, first line (decorator or def), last line, last line of the docstring or signature)."""
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


def main() -> None:
    repo = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), ".."))
    if len(sys.argv) > 2 or not os.path.isfile(os.path.join(repo, "train.py")):
        sys.exit(f"error: usage: python scripts/read_path.py [REPO]: {repo} is not a checkout holding train.py")
    sys.path.insert(0, repo)
    os.chdir(repo)
    import train

    tables: dict[str, dict] = {}
    counted: dict[tuple[str, str, int], int] = {}
    state = {"active": False, "skipping": None}  # skipping: the frame of a kernel / bookkeeping call

    def where(code) -> tuple[str, tuple] | None:
        path = os.path.abspath(code.co_filename)
        if not path.startswith(repo + os.sep) or not path.endswith(".py") or os.sep + "." in path[len(repo):]:
            return None
        rel = os.path.relpath(path, repo)
        if rel.startswith(("tests", "scripts", "bench")):
            return None
        if rel not in tables:
            tables[rel] = function_table(path)
        entry = tables[rel].get(code.co_firstlineno)
        return (rel, entry) if entry and entry[0] == code.co_name else None

    def profile(frame, event, arg):
        code = frame.f_code
        if event == "call" and code.co_name in ("seed_step", "finish") and frame.f_back is not None \
                and frame.f_back.f_code is train.train.__code__:
            state["active"] = code.co_name == "seed_step" and not state["active"]
            return
        if not state["active"]:
            return
        if event == "return" and frame is state["skipping"]:
            state["skipping"] = None
            return
        if event != "call" or state["skipping"] is not None:
            return
        callee = where(code)
        if callee is None:
            return
        rel, (name, start, end, interface_end) = callee
        if rel in KERNEL_FILES or (rel, name) in KERNELS or (rel, name) in BOOKKEEPING:
            counted.setdefault((rel, name, start), interface_end - start + 1)
            state["skipping"] = frame
            return
        counted[(rel, name, start)] = end - start + 1

    out_dir = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"read_path_run_{os.getpid()}")
    sys.setprofile(profile)
    try:
        train.main(["--total-steps", "1", "--eval-every", "0", "--eval-problems", "1", "--save-every", "0",
                    "--out-dir", out_dir])
    finally:
        sys.setprofile(None)
    loop = function_table(os.path.join(repo, "train.py"))[train.train.__code__.co_firstlineno]
    counted[("train.py", "train", loop[1])] = loop[2] - loop[1] + 1
    by_file = defaultdict(list)
    for (rel, name, start), n in counted.items():
        by_file[rel].append((start, name, n))
    total = 0
    for rel in sorted(by_file, key=lambda r: -sum(n for _, _, n in by_file[r])):
        functions = sorted(by_file[rel])
        lines = sum(n for _, _, n in functions)
        total += lines
        print(f"{rel}: {lines} lines: " + ", ".join(f"{name} {n}" for _, name, n in functions))
    print(f"read path of one default step: {total} lines in {len(by_file)} files")


if __name__ == "__main__":
    main()
