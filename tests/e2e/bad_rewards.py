"""Reward functions for the jsonl task in the RL-loop tests (``task.options.reward_fn=tests.e2e.bad_rewards:NAME``)."""

from __future__ import annotations


def exact(response_text: str, record: dict) -> float:
    """1.0 when the response is the record's answer."""
    return float(response_text.strip() == str(record["answer"]))


def raises(response_text: str, record: dict) -> float:
    """A reward with a bug: it reads a key the records do not have."""
    return float(record["target"] == response_text)


def returns_nan(response_text: str, record: dict) -> float:
    """A reward that divides by zero the floating-point way."""
    return float("nan")


def response_length(response_text: str, record: dict) -> float:
    """A dense reward for untrained models (whose answers are never right): the response's length / 10."""
    return len(response_text) / 10.0
