"""Multi-step arithmetic with worked solutions: prompt `17+25+38=`, response `17+25=42;42+38=80;#80`.

The response writes every intermediate result, one `a<op>b=c;` step per operator, then the final value after `#`,
so responses run to tens of tokens under the shipped character tokenizer (one token per character) and the
sequence-level importance weight of VESPO spans a long product of token ratios. `Sample.answer` is the whole
worked solution, which the supervised warm-up trains on; the reward reads only the final `#N` (plus an optional
credit for a well-formed chain). Problems are split into a training and an evaluation set by a hash of the
prompt, so the two streams never share a problem. Rules are in docs/tasks.md.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from vespo_megatron.tasks.base import PromptStream, Sample, Task, check_operators

OPERATORS = ("+", "-", "*")
SPLITS = ("train", "eval")
STEP_END = ";"
ANSWER_MARK = "#"
_INT = r"-?[0-9]+"
_FINAL = re.compile(_INT)
_STEP = rf"{_INT}[-+*]{_INT}={_INT}{STEP_END}"
_MAX_DRAWS = 1000
_SPLIT_SALT = b"vespo-chain-split:"


def solve(operands: Sequence[int], operators: Sequence[str]) -> list[tuple[int, str, int, int]]:
    """The steps `(left, op, right, result)` that reduce `o0 op0 o1 ...` to one number.

    Each step applies the leftmost `*` while one remains, then the leftmost `+`/`-`, so the last result is the
    value under the usual precedence (`*` first, otherwise left to right).
    """
    values, ops = list(operands), list(operators)
    if len(values) != len(ops) + 1:
        raise ValueError(f"{len(values)} operands need {len(values) - 1} operators, got {len(ops)}")
    steps = []
    while ops:
        at = ops.index("*") if "*" in ops else 0
        left, op, right = values[at], ops[at], values[at + 1]
        result = left * right if op == "*" else left + right if op == "+" else left - right
        steps.append((left, op, right, result))
        values[at : at + 2] = [result]
        del ops[at]
    return steps


def worked_solution(steps: Sequence[tuple[int, str, int, int]]) -> str:
    """`"17+25=42;42+38=80;#80"` from the steps of `solve`."""
    body = "".join(f"{a}{op}{b}={c}{STEP_END}" for a, op, b, c in steps)
    return f"{body}{ANSWER_MARK}{steps[-1][3]}"


def final_answer(text: str) -> str | None:
    """The integer after the last `#` when it ends the (stripped) text, as written; None when there is none."""
    head, mark, tail = text.strip().rpartition(ANSWER_MARK)
    return tail if mark and _FINAL.fullmatch(tail) else None


def is_well_formed(text: str, num_steps: int) -> bool:
    """True when the stripped text is exactly `num_steps` steps `a<op>b=c;` then `#N` (the arithmetic unchecked)."""
    head, mark, tail = text.strip().rpartition(ANSWER_MARK)
    if not mark or not _FINAL.fullmatch(tail):
        return False
    return re.fullmatch(f"(?:{_STEP}){{{num_steps}}}", head) is not None


def chain_reward(response_text: str, solution: str, format_reward: float = 0.0) -> float:
    """1.0 if the response's final `#N` equals the solution's; else `format_reward` for a well-formed chain; else 0.

    `solution` is a worked solution (`Sample.answer`); its step count is the number of steps a well-formed
    response must have. Numbers are compared as written, so `#080` does not match `#80`.
    """
    expected = final_answer(solution)
    if expected is None:
        raise ValueError(f"solution {solution[:60]!r} does not end in '#<integer>'")
    if final_answer(response_text) == expected:
        return 1.0
    if format_reward and is_well_formed(response_text, solution.count(STEP_END)):
        return float(format_reward)
    return 0.0


def slipped_solution(solution: str) -> str:
    """A worked solution answered with its first step's result: `"4+7=11;11+2=13;#13"` -> `"4+7=11;11+2=13;#11"`."""
    body, mark, _ = solution.rpartition(ANSWER_MARK)
    first_step = body.split(STEP_END, 1)[0]
    return f"{body}{mark}{first_step.rpartition('=')[2]}"


def problem_split(prompt: str, eval_fraction: float) -> str:
    """'eval' for the fixed share `eval_fraction` of prompts picked by a hash of the prompt text, else 'train'."""
    digest = hashlib.blake2b(_SPLIT_SALT + prompt.encode(), digest_size=8).digest()
    return "eval" if int.from_bytes(digest, "big") < eval_fraction * 2**64 else "train"


@dataclass(kw_only=True)
class ChainArithmeticTask(Task):
    """Problems `a<op>b<op>c...=` answered by a step-by-step chain ending in `#result`."""

    min_operands: int = 4
    """Fewest operands per problem (>= 2); the count is drawn uniformly from [min_operands, max_operands]."""
    max_operands: int = 8
    """Most operands per problem."""
    min_operand: int = 0
    """Smallest operand (inclusive, >= 0)."""
    max_operand: int = 99
    """Largest operand (inclusive)."""
    operators: Sequence[str] = ("+", "-")
    """Operators drawn uniformly per position, from '+', '-', '*'; a string like "+-" works too."""
    allow_negative: bool = False
    """Keep problems with a negative intermediate or final result; when False they are redrawn."""
    format_reward: float = 0.0
    """Reward in [0, 1) for a wrong final answer in a well-formed chain of the right length (0.0 disables it)."""
    split: str = "train"
    """'train' or 'eval': which side of the prompt-hash split this stream draws from."""
    eval_fraction: float = 0.1
    """Share of all problems reserved for the 'eval' split, in (0, 1)."""
    seed: int = 0
    """Seed of the problem stream."""
    teacher_slip_rate: float = 0.0
    """Share of the warm-up's demonstrations whose final `#N` repeats the first step's result instead of the last
    one: a teacher with a systematic slip (`4+7=11;11+2=13;#11`). Drawn per stream position; the reward still
    reads the true answer, so RL has something to unlearn. 0.0: every demonstration is the worked solution."""

    name = "chain"

    def __post_init__(self) -> None:
        self.operators = check_operators("chain", self.operators, OPERATORS)
        if self.min_operands < 2:
            raise ValueError(f"chain.min_operands={self.min_operands} must be >= 2")
        if self.max_operands < self.min_operands:
            raise ValueError(
                f"chain.max_operands={self.max_operands} is below min_operands={self.min_operands}; raise it"
            )
        if self.min_operand < 0:
            raise ValueError(f"chain.min_operand={self.min_operand} must be >= 0 (prompts print no signs)")
        if self.max_operand < self.min_operand:
            raise ValueError(f"chain.max_operand={self.max_operand} is below min_operand={self.min_operand}; swap them")
        if not 0.0 <= self.format_reward < 1.0:
            raise ValueError(f"chain.format_reward={self.format_reward} must be in [0, 1)")
        if self.split not in SPLITS:
            raise ValueError(f"chain.split={self.split!r} must be one of {SPLITS}")
        if not 0.0 <= self.teacher_slip_rate <= 1.0:
            raise ValueError(f"chain.teacher_slip_rate={self.teacher_slip_rate} must be in [0, 1]")
        if not 0.0 < self.eval_fraction < 1.0:
            raise ValueError(f"chain.eval_fraction={self.eval_fraction} must be in (0, 1) so both splits exist")

    def sample(self, index: int) -> Sample:
        """The problem at position `index` of this task's stream (its split only)."""
        rng = random.Random(f"chain:{self.seed}:{index}")
        for _ in range(_MAX_DRAWS):
            count = rng.randint(self.min_operands, self.max_operands)
            operands = [rng.randint(self.min_operand, self.max_operand) for _ in range(count)]
            ops = [rng.choice(self.operators) for _ in range(count - 1)]
            steps = solve(operands, ops)
            if not self.allow_negative and any(result < 0 for *_, result in steps):
                continue
            prompt = "".join(f"{a}{op}" for a, op in zip(operands, ops)) + f"{operands[-1]}="
            if problem_split(prompt, self.eval_fraction) == self.split:
                return Sample(prompt=prompt, answer=worked_solution(steps), index=index)
        raise ValueError(
            f"chain task drew {_MAX_DRAWS} problems in a row that were negative or outside split={self.split!r} "
            f"(operators={self.operators}, operands {self.min_operand}..{self.max_operand}, "
            f"eval_fraction={self.eval_fraction}); set allow_negative=True, add '+', or widen the operand range"
        )

    def prompts(self) -> ChainStream:
        return ChainStream(self)

    def held_out(self, seed_offset: int) -> ChainArithmeticTask:
        """The same difficulty on the 'eval' split, with `seed + seed_offset`: disjoint from training prompts."""
        return dataclasses.replace(self, seed=self.seed + seed_offset, split="eval")

    def score(self, response_text: str, sample: Sample) -> float:
        return chain_reward(response_text, sample.answer, self.format_reward)

    def demonstration(self, sample: Sample) -> str:
        """The worked solution, or with probability `teacher_slip_rate` (per stream position) the same chain
        answered with the first step's result."""
        if not self.teacher_slip_rate or random.Random(f"chain-slip:{self.seed}:{sample.index}").random() >= \
                self.teacher_slip_rate:
            return sample.answer
        return slipped_solution(sample.answer)


class ChainStream(PromptStream):
    def __init__(self, task: ChainArithmeticTask):
        self.task = task
        self.position = 0

    def __next__(self) -> Sample:
        sample = self.task.sample(self.position)
        self.position += 1
        return sample

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "chain", "seed": self.task.seed, "split": self.task.split, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "chain":
            raise ValueError(f"prompt-stream state of kind {state.get('kind')!r} cannot resume a chain stream")
        saved = (state["seed"], state["split"])
        if saved != (self.task.seed, self.task.split):
            raise ValueError(
                f"prompt-stream state was saved with (seed, split)={saved} but this task has "
                f"{(self.task.seed, self.task.split)}; resume with the same task config"
            )
        self.position = int(state["position"])
