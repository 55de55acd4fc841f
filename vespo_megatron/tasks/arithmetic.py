"""Synthetic arithmetic for CPU demos: prompts like `"12+7="`, answers like `"19"`, exact-answer reward.

Sample `i` of seed `s` is drawn from its own `random.Random(f"{s}:{i}")`, so the stream's whole state is the next
index: saving and restoring a position is O(1) and the same seed gives the same problems in every process.
Rules are in docs/tasks.md.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from vespo_megatron.tasks.base import PromptStream, Sample, Task, check_operators

OPERATORS = ("+", "-", "*")
_INTEGER = re.compile(r"[+-]?\d+")
_MAX_DRAWS = 1000


def evaluate(operands: Sequence[int], operators: Sequence[str]) -> int:
    """Value of `o0 op0 o1 op1 o2 ...` with `*` binding tighter than `+` and `-`, left to right otherwise."""
    terms = [operands[0]]
    signs = [1]
    for op, value in zip(operators, operands[1:]):
        if op == "*":
            terms[-1] *= value
        else:
            terms.append(value)
            signs.append(1 if op == "+" else -1)
    return sum(s * t for s, t in zip(signs, terms))


def arithmetic_reward(response_text: str, answer: str, format_reward: float = 0.0) -> float:
    """1.0 if the stripped response equals `answer`; `format_reward` if it is some other integer; else 0.0."""
    text = response_text.strip()
    if text == answer:
        return 1.0
    if format_reward and _INTEGER.fullmatch(text):
        return float(format_reward)
    return 0.0


@dataclass(kw_only=True)
class ArithmeticTask(Task):
    """Problems `a<op>b<op>c...=` over non-negative integer operands, with the integer result as the answer."""

    min_operand: int = 0
    """Smallest operand (inclusive, >= 0)."""
    max_operand: int = 20
    """Largest operand (inclusive)."""
    operators: Sequence[str] = ("+", "-")
    """Operators drawn uniformly per position, from '+', '-', '*'; a string like "+-*" works too."""
    num_operands: int = 2
    """Operands per problem (>= 2)."""
    allow_negative: bool = False
    """Keep problems whose result is negative; when False they are redrawn."""
    format_reward: float = 0.0
    """Reward for a wrong answer that is still a bare integer (0.0 disables it)."""
    seed: int = 0
    """Seed of the problem stream."""

    name = "arithmetic"

    def __post_init__(self) -> None:
        self.operators = check_operators("arithmetic", self.operators, OPERATORS)
        if self.min_operand < 0:
            raise ValueError(f"arithmetic.min_operand={self.min_operand} must be >= 0 (prompts print no signs)")
        if self.max_operand < self.min_operand:
            raise ValueError(
                f"arithmetic.max_operand={self.max_operand} is below min_operand={self.min_operand}; swap them"
            )
        if self.num_operands < 2:
            raise ValueError(f"arithmetic.num_operands={self.num_operands} must be >= 2")
        if not 0.0 <= self.format_reward < 1.0:
            raise ValueError(f"arithmetic.format_reward={self.format_reward} must be in [0, 1)")

    def sample(self, index: int) -> Sample:
        """The problem at position `index` of this task's stream."""
        rng = random.Random(f"{self.seed}:{index}")
        for _ in range(_MAX_DRAWS):
            operands = [rng.randint(self.min_operand, self.max_operand) for _ in range(self.num_operands)]
            ops = [rng.choice(self.operators) for _ in range(self.num_operands - 1)]
            result = evaluate(operands, ops)
            if self.allow_negative or result >= 0:
                break
        else:
            raise ValueError(
                f"arithmetic task drew {_MAX_DRAWS} problems with negative results in a row "
                f"(operators={self.operators}, operands {self.min_operand}..{self.max_operand}); "
                f"set allow_negative=True or add '+'"
            )
        prompt = "".join(f"{a}{op}" for a, op in zip(operands, ops)) + f"{operands[-1]}="
        return Sample(prompt=prompt, answer=str(result), index=index)

    def prompts(self) -> ArithmeticStream:
        return ArithmeticStream(self)

    def score(self, response_text: str, sample: Sample) -> float:
        return arithmetic_reward(response_text, sample.answer, self.format_reward)


class ArithmeticStream(PromptStream):
    def __init__(self, task: ArithmeticTask):
        self.task = task
        self.position = 0

    def __next__(self) -> Sample:
        sample = self.task.sample(self.position)
        self.position += 1
        return sample

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "arithmetic", "seed": self.task.seed, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "arithmetic":
            raise ValueError(f"prompt-stream state of kind {state.get('kind')!r} cannot resume an arithmetic stream")
        if state["seed"] != self.task.seed:
            raise ValueError(
                f"prompt-stream state was saved with seed={state['seed']} but this task has seed={self.task.seed}; "
                f"resume with the same task config"
            )
        self.position = int(state["position"])
