"""Task registry: `make_task("countdown")` finds a task by name. Adding a task = one new file + one line here."""

from __future__ import annotations

import importlib

from e2h_min.errors import TaskDataError
from e2h_min.tasks.base import Problem, Task

# name -> "module:Class"; imported lazily so optional dependencies of one task never slow or break another.
TASKS = {
    "countdown": "e2h_min.tasks.countdown:CountdownTask",
    "blocksworld": "e2h_min.tasks.blocksworld:BlocksworldTask",
    "gsm8k": "e2h_min.tasks.math_tasks:GSM8KTask",
    "math": "e2h_min.tasks.math_tasks:MATHTask",
    "aqua": "e2h_min.tasks.math_tasks:AQuATask",
}
FILE_TASKS = {"gsm8k", "math", "aqua"}  # these read --data; the others are generated


def make_task(name: str, seed: int = 0, data: str | None = None) -> Task:
    """Build a task by registry name. File-backed tasks need `data` (a local JSONL/Parquet path)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(sorted(TASKS))}")
    module_name, class_name = TASKS[name].split(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    if name in FILE_TASKS:
        if not data:
            raise TaskDataError(f"task {name!r} reads a data file: pass --data PATH (JSONL or Parquet)")
        return cls(data, seed=seed)
    return cls(seed=seed)


__all__ = ["TASKS", "FILE_TASKS", "Problem", "Task", "TaskDataError", "make_task"]
