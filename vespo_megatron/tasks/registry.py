"""Task names to task classes, and building a task from a name and its options."""

from __future__ import annotations

import dataclasses
from typing import Any

from vespo_megatron.tasks.arithmetic import ArithmeticTask
from vespo_megatron.tasks.base import Task
from vespo_megatron.tasks.chain_arithmetic import ChainArithmeticTask
from vespo_megatron.tasks.jsonl import JsonlTask, MathTask

TASKS: dict[str, type[Task]] = {
    "arithmetic": ArithmeticTask, "chain": ChainArithmeticTask, "math": MathTask, "jsonl": JsonlTask,
}


def task_options(name: str) -> list[str]:
    """The option names `build_task(name, ...)` accepts."""
    return [f.name for f in dataclasses.fields(_task_class(name))]


def build_task(name: str, **options: Any) -> Task:
    """`TASKS[name](**options)`, with errors that list the known tasks and options."""
    cls = _task_class(name)
    known = task_options(name)
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"task {name!r} has no option(s) {unknown}; its options are {known}")
    return cls(**options)


def _task_class(name: str) -> type[Task]:
    if name not in TASKS:
        raise ValueError(f"task={name!r} is not a known task; use one of {sorted(TASKS)}")
    return TASKS[name]
