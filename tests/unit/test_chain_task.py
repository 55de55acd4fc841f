"""The `chain` task: worked solutions, reward parsing, determinism, the train/eval split, lengths, config wiring."""

from __future__ import annotations

import math
import operator
import re
from pathlib import Path

import pytest

from vespo_megatron.config import load_config, validate
from vespo_megatron.tasks import TASKS, ArithmeticTask, ChainArithmeticTask, build_task, chain_reward
from vespo_megatron.tasks.chain_arithmetic import (
    final_answer,
    is_well_formed,
    problem_split,
    slipped_solution,
    solve,
)
from vespo_megatron.tokenizer import load_tokenizer

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _reference_value(prompt: str) -> int:
    """The prompt's value computed by Python itself (same precedence: `*` first, then left to right)."""
    assert re.fullmatch(r"[0-9+\-*]+=", prompt), prompt
    return eval(prompt[:-1])  # noqa: S307 - digits and + - * only, checked above


def _steps(solution: str) -> list[tuple[str, str, str, str]]:
    body, _, _ = solution.rpartition("#")
    return re.findall(r"(-?[0-9]+)([+*-])(-?[0-9]+)=(-?[0-9]+);", body)


# ---------------------------------------------------------------- worked solutions
def test_prompt_and_solution_format():
    task = ChainArithmeticTask(seed=3)
    for s in task.prompts().next_batch(200):
        operands = [int(x) for x in re.findall(r"[0-9]+", s.prompt)]
        assert 4 <= len(operands) <= 8 and all(0 <= x <= 99 for x in operands)
        assert s.answer.endswith(f"#{_reference_value(s.prompt)}")
        steps = _steps(s.answer)
        assert len(steps) == len(operands) - 1
        assert "".join(f"{a}{op}{b}={c};" for a, op, b, c in steps) + f"#{steps[-1][3]}" == s.answer
        # + and - only: the chain runs left to right, each step's left side is the previous result
        left = operands[0]
        for (a, op, b, c), right in zip(steps, operands[1:]):
            assert (int(a), int(b)) == (left, right) and op in "+-"
            left = left + right if op == "+" else left - right
            assert int(c) == left >= 0


def test_multiplication_steps_follow_precedence():
    task = ChainArithmeticTask(operators="+-*", max_operand=12, allow_negative=True, seed=5)
    samples = task.prompts().next_batch(200)
    assert any("*" in s.prompt for s in samples) and any(int(final_answer(s.answer)) < 0 for s in samples)
    for s in samples:
        assert int(final_answer(s.answer)) == _reference_value(s.prompt)
        steps = _steps(s.answer)
        for a, op, b, c in steps:
            assert int(c) == {"+": operator.add, "-": operator.sub, "*": operator.mul}[op](int(a), int(b))
        ops = [op for _, op, _, _ in steps]
        assert ops == sorted(ops, key=lambda op: op != "*"), "every multiplication comes before any + or -"
    assert solve([2, 3, 4, 5], ["+", "*", "-"]) == [(3, "*", 4, 12), (2, "+", 12, 14), (14, "-", 5, 9)]


def test_negative_intermediates_are_redrawn_unless_allowed():
    strict = ChainArithmeticTask(operators="+-", max_operand=9, seed=1).prompts().next_batch(300)
    assert all(int(c) >= 0 for s in strict for *_, c in _steps(s.answer))
    loose = ChainArithmeticTask(operators="+-", max_operand=9, allow_negative=True, seed=1).prompts().next_batch(300)
    assert any(int(c) < 0 for s in loose for *_, c in _steps(s.answer))


# ---------------------------------------------------------------- reward
SOLUTION = "17+25=42;42+38=80;#80"


@pytest.mark.parametrize(
    "response, plain, with_format",
    [
        (SOLUTION, 1.0, 1.0),
        ("#80", 1.0, 1.0),  # the reward reads the final answer only
        ("  17+25=42;42+38=80;#80\n", 1.0, 1.0),
        ("17+25=41;41+38=79;#80", 1.0, 1.0),  # wrong steps, right final answer
        ("17+25=42;42+38=81;#81", 0.0, 0.1),  # well-formed, wrong answer: format credit only
        ("1+1=2;2-5=-3;#-3", 0.0, 0.1),  # negative numbers are well-formed
        ("17+25=42;#80x", 0.0, 0.0),
        ("17+25=42;#81", 0.0, 0.0),  # one step short of the two the problem needs
        ("17+25=42;42+38=80;80+0=80;#79", 0.0, 0.0),  # one step too many
        ("17 + 25=42;42+38=80;#79", 0.0, 0.0),  # spaces are not part of the format
        ("17+25=42;42+38=80#79", 0.0, 0.0),
        ("17+25=42;42+38=80;#080", 0.0, 0.1),  # numbers compare as written
        ("17+25=42;42+38=80;#+80", 0.0, 0.0),
        ("17+25=42;42+38=80;# 80", 0.0, 0.0),
        ("17+25=42;42+38=80;#80;", 0.0, 0.0),
        ("17+25=42;42+38=80;#8０", 0.0, 0.0),  # a non-ASCII digit
        ("80", 0.0, 0.0),
        ("", 0.0, 0.0),
        ("#", 0.0, 0.0),
        ("##", 0.0, 0.0),
        ("#80#81", 0.0, 0.0),  # the last mark counts
        ("#81#80", 1.0, 1.0),
        ("=;#-", 0.0, 0.0),
        ("#" + "9" * 20000, 0.0, 0.0),  # longer than int() would parse
    ],
)
def test_chain_reward_table(response, plain, with_format):
    assert chain_reward(response, SOLUTION) == plain
    assert chain_reward(response, SOLUTION, format_reward=0.1) == with_format


def test_task_reward_on_sampled_problems_against_reference():
    task = ChainArithmeticTask(format_reward=0.25, seed=9)
    for s in task.prompts().next_batch(100):
        value = _reference_value(s.prompt)
        assert task.reward(s.answer, s) == 1.0
        assert task.reward(f"#{value}", s) == 1.0
        wrong_chain = s.answer.rpartition("#")[0] + f"#{value + 1}"
        assert task.reward(wrong_chain, s) == 0.25
        assert task.reward(f"{value}", s) == 0.0
        assert task.reward(s.answer[:-1] + "x", s) == 0.0


def test_rewards_of_random_text_are_finite_and_never_partial_without_format_credit():
    import random

    rng = random.Random(0)
    task = ChainArithmeticTask(seed=2)
    samples = task.prompts().next_batch(50)
    alphabet = "0123456789+-*=;# \nx"
    for s in samples:
        for _ in range(20):
            text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
            r = task.reward(text, s)
            assert math.isfinite(r) and r in (0.0, 1.0)


def test_well_formed_and_final_answer():
    assert is_well_formed("1+2=3;3*4=12;#12", 2) and not is_well_formed("1+2=3;3*4=12;#12", 1)
    assert not is_well_formed("1+2=3;;#3", 1) and not is_well_formed("#3", 1) and is_well_formed("#3", 0)
    assert final_answer("a#-12 ") == "-12" and final_answer("#12a") is None and final_answer("12") is None


# ---------------------------------------------------------------- streams and splits
def test_deterministic_seeded_and_resumable():
    a = ChainArithmeticTask(seed=4).prompts().next_batch(30)
    assert a == ChainArithmeticTask(seed=4).prompts().next_batch(30)
    assert [s.prompt for s in a] != [s.prompt for s in ChainArithmeticTask(seed=5).prompts().next_batch(30)]
    assert [s.index for s in a] == list(range(30))
    task = ChainArithmeticTask(seed=4)
    stream = task.prompts()
    stream.next_batch(11)
    resumed = task.prompts()
    resumed.load_state_dict(stream.state_dict())
    assert resumed.next_batch(5) == stream.next_batch(5) == a[11:16]
    with pytest.raises(ValueError, match="seed, split"):
        ChainArithmeticTask(seed=4, split="eval").prompts().load_state_dict(stream.state_dict())
    with pytest.raises(ValueError, match="kind 'arithmetic'"):
        task.prompts().load_state_dict(ArithmeticTask().prompts().state_dict())


def test_train_and_eval_splits_are_disjoint_and_cover_a_small_problem_space():
    # 2 operands 0..9 with +: exactly 100 problems, so both streams repeat problems many times over.
    options = dict(min_operands=2, max_operands=2, max_operand=9, operators="+", eval_fraction=0.2)
    train = {s.prompt for s in ChainArithmeticTask(**options, seed=0).prompts().next_batch(3000)}
    held_out = ChainArithmeticTask(**options, seed=0).held_out(10_000)
    assert held_out.split == "eval" and held_out.seed == 10_000
    evals = {s.prompt for s in held_out.prompts().next_batch(3000)}
    assert not train & evals
    assert len(train | evals) == 100 and 5 <= len(evals) <= 40
    assert all(problem_split(p, 0.2) == "eval" for p in evals)


def test_default_held_out_is_the_seed_offset():
    task = ArithmeticTask(max_operand=9, seed=2)
    assert task.held_out(100).prompts().next_batch(5) == ArithmeticTask(max_operand=9, seed=102).prompts().next_batch(5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(operators="+/"), "chain.operators"),
        (dict(min_operands=1), "chain.min_operands=1"),
        (dict(min_operands=5, max_operands=4), "chain.max_operands=4"),
        (dict(min_operand=-1), "chain.min_operand=-1"),
        (dict(min_operand=10, max_operand=5), "chain.max_operand=5"),
        (dict(format_reward=1.0), "chain.format_reward"),
        (dict(split="test"), "chain.split='test'"),
        (dict(eval_fraction=0.0), "chain.eval_fraction"),
        (dict(teacher_slip_rate=1.5), "chain.teacher_slip_rate=1.5"),
    ],
)
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=re.escape(match)):
        ChainArithmeticTask(**kwargs)


def test_teacher_slip_answers_with_the_first_step_at_the_given_rate_and_leaves_the_reward_alone():
    assert slipped_solution("4+7=11;11+2=13;#13") == "4+7=11;11+2=13;#11"
    assert slipped_solution("9-4=5;5*3=15;15-2=13;#13") == "9-4=5;5*3=15;15-2=13;#5"
    exact = ChainArithmeticTask(min_operands=3, max_operands=3, max_operand=9, operators="+")
    slipping = ChainArithmeticTask(min_operands=3, max_operands=3, max_operand=9, operators="+", teacher_slip_rate=0.6)
    samples = slipping.prompts().next_batch(2000)
    assert samples == exact.prompts().next_batch(2000)  # the problems do not change, only the demonstrations
    shown = [slipping.demonstration(s) for s in samples]
    assert all(exact.demonstration(s) == s.answer for s in samples)
    slipped = [d != s.answer for d, s in zip(shown, samples)]
    # a slip is invisible where the first and last results agree (the last operand is 0)
    visible = [final_answer(s.answer) != s.answer.split("=")[1].split(";")[0] for s in samples]
    assert sum(slipped) / sum(visible) == pytest.approx(0.6, abs=0.04)
    for demo, sample in zip(shown, samples):
        assert is_well_formed(demo, 2) and demo.rpartition("#")[0] == sample.answer.rpartition("#")[0]
        assert slipping.reward(demo, sample) == (1.0 if demo == sample.answer else 0.0)
    assert shown == [slipping.demonstration(s) for s in samples]  # deterministic per stream position
    always = ChainArithmeticTask(min_operands=3, max_operands=3, operators="+", teacher_slip_rate=1.0)
    assert all(always.demonstration(s) == slipped_solution(s.answer) for s in always.prompts().next_batch(50))


def test_impossible_problem_set_is_an_error_naming_the_fix():
    with pytest.raises(ValueError, match="allow_negative=True"):
        ChainArithmeticTask(operators="-", min_operand=1, max_operand=1, min_operands=3, max_operands=3).sample(0)


# ---------------------------------------------------------------- tokenized lengths
def test_default_responses_are_20_to_100_tokens_under_the_shipped_tokenizer():
    tok = load_tokenizer()
    samples = ChainArithmeticTask(seed=0).prompts().next_batch(1000)
    lengths = []
    for s in samples:
        ids = tok.encode(s.answer)
        assert tok.unk_id not in ids and tok.encode(s.prompt) + ids == tok.encode(s.prompt + s.answer)
        lengths.append(len(ids) + 1)  # the eos the policy emits
    assert 20 <= min(lengths) and max(lengths) <= 100
    assert 40 <= sum(lengths) / len(lengths) <= 65


@pytest.mark.parametrize("overrides", [[], ["model.max_seq_length=128", "rollout.max_new_tokens=96",
                                            "task.options.max_operands=8", "task.options.max_operand=99"]])
def test_shipped_config_context_fits_its_task(overrides):
    """The shipped config, and its documented overrides for the task's default difficulty, fit every response."""
    tok = load_tokenizer()
    config = load_config(CONFIGS / "tiny_chain_cpu.yaml", overrides)
    validate(config, 2)
    samples = build_task(config.task.name, **config.task.options).prompts().next_batch(1000)
    longest_response = max(len(tok.encode(s.answer)) + 1 for s in samples)
    longest_prompt = max(len(tok.encode(s.prompt)) + 1 for s in samples)
    assert 20 < longest_response <= config.rollout.max_new_tokens
    assert longest_prompt + config.rollout.max_new_tokens <= config.seq_length + 1


# ---------------------------------------------------------------- registry and config
def test_registry_and_config_wiring():
    assert TASKS["chain"] is ChainArithmeticTask
    config = load_config(CONFIGS / "tiny_chain_cpu.yaml",
                         ["task.options.min_operands=2", "task.options.max_operands=3", "task.options.seed=7"])
    validate(config, 2)
    task = build_task(config.task.name, **config.task.options)
    assert isinstance(task, ChainArithmeticTask)
    assert (task.min_operands, task.max_operands, task.seed, task.format_reward) == (2, 3, 7, 0.1)
    assert task.operators == ("+", "-")
    with pytest.raises(ValueError, match="no option.*'operands'"):
        build_task("chain", operands=3)
    bad = load_config(CONFIGS / "tiny_chain_cpu.yaml", ["task.options.max_operands=1"])
    with pytest.raises(ValueError, match="chain.max_operands=1"):
        build_task(bad.task.name, **bad.task.options)
