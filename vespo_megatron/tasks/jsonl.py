"""Prompt sets read from JSONL: the math task and any task scored by a reward function given as `module:function`."""

from __future__ import annotations

import importlib
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vespo_megatron.tasks.base import PromptStream, Sample, Task
from vespo_megatron.tasks.math_verify import math_reward


def parse_jsonl_record(line: str, where: str, required_keys: Sequence[str] = ()) -> dict[str, Any]:
    """One JSONL line as a dict holding ``required_keys``; errors start with ``where`` (``file:line``)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: malformed JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for key in required_keys:
        if key not in record:
            raise ValueError(
                f"{where}: missing key {key!r} (keys present: {sorted(record)}); every record needs {list(required_keys)}"
            )
    return record


def load_jsonl(path: str | Path, required_keys: Sequence[str] = (), string_keys: Sequence[str] = ()
               ) -> list[dict[str, Any]]:
    """Records of a JSONL file, one JSON object a line (blank lines skipped); errors name the file and line.

    The values of ``string_keys`` must be JSON strings (a number or true/false there is an error).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"JSONL prompt file {str(path)!r} does not exist")
    records = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            record = parse_jsonl_record(line, f"{path}:{line_no}", required_keys)
            for key in string_keys:
                if key in record and not isinstance(record[key], str):
                    raise ValueError(f"{path}:{line_no}: {key!r} is {record[key]!r} ({type(record[key]).__name__}); "
                                     "it must be a JSON string")
            records.append(record)
    if not records:
        raise ValueError(f"JSONL prompt file {str(path)!r} holds no records; it needs at least one JSON object line")
    return records


def records_to_samples(records: list[dict[str, Any]], prompt_key: str, answer_key: str | None) -> list[Sample]:
    def answer(record: dict[str, Any]) -> str:
        return "" if answer_key is None or answer_key not in record else str(record[answer_key])

    return [Sample(prompt=str(r[prompt_key]), answer=answer(r), index=i, data=r) for i, r in enumerate(records)]


class EpochStream(PromptStream):
    """Cycles through a fixed list of samples, reshuffled each epoch from `(seed, epoch)` when `shuffle`."""

    def __init__(self, samples: list[Sample], *, seed: int = 0, shuffle: bool = True, source: str = ""):
        if not samples:
            raise ValueError(f"cannot stream prompts from an empty dataset {source!r}")
        self.samples = samples
        self.seed = seed
        self.shuffle = shuffle
        self.source = source
        self.epoch = 0
        self.position = 0
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> list[int]:
        order = list(range(len(self.samples)))
        if self.shuffle:
            random.Random(f"{self.seed}:{epoch}").shuffle(order)
        return order

    def __next__(self) -> Sample:
        if self.position == len(self.samples):
            self.epoch += 1
            self.position = 0
            self._order = self._epoch_order(self.epoch)
        sample = self.samples[self._order[self.position]]
        self.position += 1
        return sample

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": "epoch",
            "source": self.source,
            "num_samples": len(self.samples),
            "seed": self.seed,
            "shuffle": self.shuffle,
            "epoch": self.epoch,
            "position": self.position,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "epoch":
            raise ValueError(f"prompt-stream state of kind {state.get('kind')!r} cannot resume a JSONL stream")
        saved = (state["num_samples"], state["seed"], state["shuffle"])
        if saved != (len(self.samples), self.seed, self.shuffle):
            raise ValueError(
                f"prompt-stream state (num_samples, seed, shuffle)={saved} was saved from {state.get('source')!r} "
                f"but this stream has {(len(self.samples), self.seed, self.shuffle)} from {self.source!r}; "
                f"resume with the same dataset and task config"
            )
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self._order = self._epoch_order(self.epoch)


def load_reward_fn(import_path: str) -> Callable[[str, dict[str, Any]], Any]:
    """The callable named by `"package.module:function"` (dotted attributes after the colon are followed)."""
    module_name, sep, attr_path = import_path.partition(":")
    if not sep or not module_name or not attr_path:
        raise ValueError(f"reward={import_path!r} must look like 'package.module:function'")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"reward={import_path!r}: cannot import module {module_name!r} ({err})") from err
    for attr in attr_path.split("."):
        if not hasattr(obj, attr):
            raise ValueError(f"reward={import_path!r}: {obj.__name__!r} has no attribute {attr!r}")
        obj = getattr(obj, attr)
    if not callable(obj):
        raise ValueError(f"reward={import_path!r} names a {type(obj).__name__}, not a function")
    return obj


@dataclass(kw_only=True)
class _JsonlTaskBase(Task):
    path: str
    """JSONL file, one `{"prompt": ..., "answer": ...}` object a line."""
    prompt_key: str = "prompt"
    """Key of the prompt text in each record."""
    shuffle: bool = True
    """Reshuffle the records every epoch."""
    seed: int = 0
    """Seed of the shuffle."""

    def _load(self, answer_key: str | None, require_answer: bool) -> list[Sample]:
        required = [self.prompt_key] + ([answer_key] if require_answer and answer_key else [])
        return records_to_samples(load_jsonl(self.path, required, string_keys=[self.prompt_key]), self.prompt_key,
                                  answer_key)

    def prompts(self) -> EpochStream:
        return EpochStream(self.samples, seed=self.seed, shuffle=self.shuffle, source=str(self.path))


@dataclass(kw_only=True)
class MathTask(_JsonlTaskBase):
    """Math word problems from JSONL, scored by `math_verify.math_reward` (1.0 right, 0.0 otherwise)."""

    answer_key: str = "answer"
    """Key of the ground-truth answer in each record."""

    name = "math"

    def __post_init__(self) -> None:
        self.samples = self._load(self.answer_key, require_answer=True)

    def score(self, response_text: str, sample: Sample) -> float:
        return math_reward(response_text, sample.answer)


@dataclass(kw_only=True)
class JsonlTask(_JsonlTaskBase):
    """Any JSONL prompt set scored by `reward`, a `module:function` called as fn(response_text, record)."""

    reward_fn: str
    """Import path `package.module:function` of the reward; it gets the response text and the raw record dict."""
    answer_key: str | None = "answer"
    """Key copied into `Sample.answer` when a record has it (optional here; the reward reads the record)."""

    name = "jsonl"

    def __post_init__(self) -> None:
        self._fn = load_reward_fn(self.reward_fn)
        self.samples = self._load(self.answer_key, require_answer=False)

    @property
    def reward_name(self) -> str:
        return self.reward_fn

    def score(self, response_text: str, sample: Sample) -> float:
        return self._fn(response_text, sample.data)
