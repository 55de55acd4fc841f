"""Prompt sources and reward rules for the RL loop (docs/tasks.md)."""

from vespo_megatron.tasks.arithmetic import ArithmeticTask, arithmetic_reward
from vespo_megatron.tasks.base import PromptStream, RewardError, Sample, Task
from vespo_megatron.tasks.chain_arithmetic import ChainArithmeticTask, chain_reward
from vespo_megatron.tasks.jsonl import EpochStream, JsonlTask, MathTask, load_jsonl, load_reward_fn
from vespo_megatron.tasks.math_verify import answers_match, extract_answer, math_reward, parse_number
from vespo_megatron.tasks.registry import TASKS, build_task, task_options

__all__ = [
    "TASKS",
    "ArithmeticTask",
    "ChainArithmeticTask",
    "EpochStream",
    "JsonlTask",
    "MathTask",
    "PromptStream",
    "RewardError",
    "Sample",
    "Task",
    "answers_match",
    "arithmetic_reward",
    "build_task",
    "chain_reward",
    "extract_answer",
    "load_jsonl",
    "load_reward_fn",
    "math_reward",
    "parse_number",
    "task_options",
]
