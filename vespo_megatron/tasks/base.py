"""What every task shares: a prompt `Sample`, a resumable `PromptStream`, the `Task` interface and reward checks."""

from __future__ import annotations

import dataclasses
import math
import numbers
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

RewardFn = Callable[[str, "Sample"], float]


class RewardError(RuntimeError):
    """A reward function raised, or returned something that is not a finite number."""


@dataclass(frozen=True)
class Sample:
    """One prompt: the text given to the policy, its ground-truth answer, and where it came from.

    `index` is the position in the task's data (the generator index for synthetic tasks, the record number for
    JSONL), so an error can point at it. `data` is the raw record (the JSONL dict; empty for synthetic tasks).
    """

    prompt: str
    answer: str
    index: int
    data: dict[str, Any] = field(default_factory=dict)


class PromptStream(ABC):
    """An endless, deterministic iterator of samples whose position can be saved and restored.

    `load_state_dict(s.state_dict())` on a fresh stream of the same task makes it yield what `s` would yield next.
    """

    def __iter__(self) -> Iterator[Sample]:
        return self

    @abstractmethod
    def __next__(self) -> Sample: ...

    def next_batch(self, n: int) -> list[Sample]:
        return [next(self) for _ in range(n)]

    @abstractmethod
    def state_dict(self) -> dict[str, Any]: ...

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def check_operators(task: str, operators, allowed: tuple) -> tuple:
    """``operators`` as a tuple; a ValueError naming ``task.operators`` unless it is a non-empty subset of ``allowed``."""
    operators = tuple(operators)
    unknown = [op for op in operators if op not in allowed]
    if not operators or unknown:
        raise ValueError(f"{task}.operators={operators!r} must be a non-empty subset of {allowed}")
    return operators


def check_reward_value(value: Any, fn_name: str, sample: Sample) -> float:
    """`value` as a float, or a RewardError naming the function and the sample index."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise RewardError(
            f"reward function {fn_name} returned {value!r} ({type(value).__name__}) for sample index {sample.index}; "
            f"it must return a finite float"
        )
    value = float(value)
    if not math.isfinite(value):
        raise RewardError(
            f"reward function {fn_name} returned {value} for sample index {sample.index} "
            f"(prompt {sample.prompt[:60]!r}); rewards must be finite"
        )
    return value


def call_reward(fn: RewardFn, fn_name: str, response_text: str, sample: Sample) -> float:
    """Call `fn(response_text, sample)`; wrap anything it raises and check what it returns."""
    try:
        value = fn(response_text, sample)
    except Exception as err:
        raise RewardError(
            f"reward function {fn_name} raised {type(err).__name__}: {err} on sample index {sample.index} "
            f"(prompt {sample.prompt[:60]!r}, response {response_text[:60]!r})"
        ) from err
    return check_reward_value(value, fn_name, sample)


class Task(ABC):
    """A source of prompts and the rule that scores a response to one of them.

    `reward(response_text, sample)` takes the decoded response up to (not including) the end-of-sequence token and
    returns a finite float; errors in the scoring rule come out as RewardError naming the rule and `sample.index`.
    """

    name: str = "task"

    @abstractmethod
    def prompts(self) -> PromptStream:
        """A fresh stream starting at the first sample; restore a position with `load_state_dict`."""

    @abstractmethod
    def score(self, response_text: str, sample: Sample) -> float:
        """The raw scoring rule; `reward` wraps it with the checks."""

    def held_out(self, seed_offset: int) -> Task:
        """The task the loop's greedy evaluation draws from: by default this one with `seed + seed_offset`.

        Tasks that can keep evaluation prompts apart from training prompts (the `chain` task) override it.
        """
        return dataclasses.replace(self, seed=self.seed + seed_offset)

    def demonstration(self, sample: Sample) -> str:
        """The response the supervised warm-up imitates for ``sample``: its answer, unless the task models an
        imperfect teacher (the `chain` task's ``teacher_slip_rate``)."""
        return sample.answer

    @property
    def reward_name(self) -> str:
        return f"{type(self).__module__}.{type(self).__qualname__}.score"

    def reward(self, response_text: str, sample: Sample) -> float:
        return call_reward(self.score, self.reward_name, response_text, sample)

    def rewards(self, responses: list[str], samples: list[Sample]) -> list[float]:
        if len(responses) != len(samples):
            raise ValueError(f"got {len(responses)} responses for {len(samples)} samples; pass one response per sample")
        return [self.reward(r, s) for r, s in zip(responses, samples)]
