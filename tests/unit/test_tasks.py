"""Arithmetic stream, math verifier, JSONL loading, import-path rewards and reward checks."""

import json
import math
import sys
import types

import pytest

from vespo_megatron.tasks import (
    TASKS,
    ArithmeticTask,
    JsonlTask,
    MathTask,
    RewardError,
    Sample,
    arithmetic_reward,
    build_task,
    extract_answer,
    load_jsonl,
    load_reward_fn,
    math_reward,
    parse_number,
)
from vespo_megatron.tasks.arithmetic import evaluate

# ---------------------------------------------------------------- arithmetic


def test_arithmetic_prompt_format_and_answer():
    for s in ArithmeticTask(seed=3).prompts().next_batch(50):
        assert s.prompt.endswith("=")
        assert s.answer == str(eval(s.prompt[:-1]))  # the prompt is a Python expression with the same precedence
        assert int(s.answer) >= 0


def test_arithmetic_is_deterministic_and_seeded():
    a = [s.prompt for s in ArithmeticTask(seed=1).prompts().next_batch(20)]
    b = [s.prompt for s in ArithmeticTask(seed=1).prompts().next_batch(20)]
    c = [s.prompt for s in ArithmeticTask(seed=2).prompts().next_batch(20)]
    assert a == b and a != c


def test_arithmetic_options():
    task = ArithmeticTask(min_operand=10, max_operand=12, operators="*", num_operands=3, seed=0)
    for s in task.prompts().next_batch(20):
        operands = [int(x) for x in s.prompt[:-1].split("*")]
        assert len(operands) == 3 and all(10 <= x <= 12 for x in operands)
    negatives = ArithmeticTask(operators="-", allow_negative=True).prompts().next_batch(100)
    assert any(s.answer.startswith("-") for s in negatives)


def test_evaluate_precedence():
    assert evaluate([2, 3, 4], ["+", "*"]) == 14
    assert evaluate([10, 2, 3], ["-", "-"]) == 5
    assert evaluate([2, 3, 4, 5], ["*", "-", "*"]) == -14


def test_arithmetic_state_save_restore():
    stream = ArithmeticTask(seed=7).prompts()
    stream.next_batch(13)
    state = json.loads(json.dumps(stream.state_dict()))  # checkpoints store it as plain data
    expected = stream.next_batch(5)
    resumed = ArithmeticTask(seed=7).prompts()
    resumed.load_state_dict(state)
    assert resumed.next_batch(5) == expected
    with pytest.raises(ValueError, match="seed=7"):
        ArithmeticTask(seed=8).prompts().load_state_dict(state)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"operators": "+/"}, "operators"),
        ({"min_operand": 5, "max_operand": 2}, "max_operand=2"),
        ({"num_operands": 1}, "num_operands=1"),
        ({"min_operand": -1}, "min_operand=-1"),
    ],
)
def test_arithmetic_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ArithmeticTask(**kwargs)


@pytest.mark.parametrize(
    "response, reward",
    [("19", 1.0), (" 19 \n", 1.0), ("19 ", 1.0), ("20", 0.0), ("19+1", 0.0), ("", 0.0), ("019", 0.0), ("1 9", 0.0)],
)
def test_arithmetic_reward(response, reward):
    assert arithmetic_reward(response, "19") == reward


def test_arithmetic_format_reward():
    task = ArithmeticTask(format_reward=0.1)
    sample = Sample(prompt="12+7=", answer="19", index=0)
    assert task.reward("19", sample) == 1.0
    assert task.reward("18", sample) == 0.1
    assert task.reward("eighteen", sample) == 0.0


# ---------------------------------------------------------------- math verifier

MATH_CASES = [
    # response, answer, expected reward
    ("The answer is 19.", "19", 1.0),
    ("So we get 19", "19.0", 1.0),
    ("\\boxed{19}", "19", 1.0),
    ("first 3 then \\boxed{7} and finally 9", "7", 1.0),  # a box wins over a later number
    ("\\boxed{\\frac{3}{4}}", "0.75", 1.0),
    ("\\boxed{\\dfrac{3}{4}}", "3/4", 1.0),
    ("\\boxed{\\tfrac{6}{8}}", "\\frac{3}{4}", 1.0),
    ("x = 0.75", "3/4", 1.0),
    ("the result is .5", "1/2", 1.0),
    ("the result is 3/4", "0.75", 1.0),
    ("\\boxed{\\frac{1}{3}}", "0.333", 0.0),  # exact comparison
    ("It costs $1,234,567.", "1234567", 1.0),
    ("\\boxed{1{,}000}", "1,000", 1.0),
    ("it is 1 000", "1000", 0.0),  # a space is not a thousands separator in running text
    ("the total is 50%", "50", 1.0),
    ("\\boxed{50\\%}", "50%", 1.0),
    ("x = -3", "-3", 1.0),
    ("x=-3", "-3", 1.0),
    ("we compute 10-3", "-3", 0.0),  # binary minus, not a sign
    ("we compute 10-3", "3", 1.0),
    ("answer: −7", "-7", 1.0),  # unicode minus
    ("answer: (-7)", "-7", 1.0),
    ("\\boxed{-\\frac{3}{4}}", "-0.75", 1.0),
    ("\\boxed{\\frac{-3}{4}}", "-3/4", 1.0),
    ("\\boxed{-3/4}", "3/4", 0.0),  # sign matters
    ("\\boxed{+5}", "5", 1.0),
    ("\\boxed{ 42 }", "42", 1.0),
    ("\\boxed{\\frac{\\frac{1}{2}}{1}}", "1/2", 0.0),  # nested fractions are not parsed: no credit, no crash
    ("\\boxed{{12}}", "12", 1.0),  # nested braces
    ("\\boxed{x = 5}", "5", 1.0),
    ("\\boxed{\\text{Paris}}", "Paris", 1.0),  # non-numeric answers compare as text
    ("\\boxed{Paris}", "London", 0.0),
    ("I do not know", "5", 0.0),
    ("", "0", 0.0),
    ("1, 2, 3", "3", 1.0),
    ("7 apples and 2 pears so 5", "5", 1.0),
    ("the answer is 5.", "5.00", 1.0),
    ("2.50", "5/2", 1.0),
    ("\\boxed{1/0}", "0", 0.0),  # zero denominator never matches
    ("$\\frac{7}{2}$", "3.5", 1.0),
]


@pytest.mark.parametrize("response, answer, expected", MATH_CASES)
def test_math_verifier_table(response, answer, expected):
    assert math_reward(response, answer) == expected


def test_parse_number_and_extract():
    assert parse_number("-1,234.5") == pytest.approx(-1234.5)
    assert parse_number("\\frac{3}{0}") is None
    assert parse_number("abc") is None
    assert extract_answer("a \\boxed{\\frac{1}{2}} b") == "\\frac{1}{2}"
    assert extract_answer("no digits") is None


# ---------------------------------------------------------------- JSONL


def write_jsonl(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_math_task_from_jsonl(tmp_path):
    lines = ['{"prompt": "1+1?", "answer": 2}', "", '{"prompt": "half?", "answer": "1/2"}']
    path = write_jsonl(tmp_path / "m.jsonl", lines)
    task = MathTask(path=str(path), shuffle=False)
    first, second = task.prompts().next_batch(2)
    assert (first.prompt, first.answer, first.index) == ("1+1?", "2", 0)
    assert task.reward("\\boxed{2}", first) == 1.0
    assert task.reward("it is 0.5", second) == 1.0


def test_jsonl_malformed_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", ['{"prompt": "a", "answer": "1"}', '{"prompt": "b", "answer": '])
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: malformed JSON"):
        load_jsonl(path)


def test_jsonl_not_an_object(tmp_path):
    path = write_jsonl(tmp_path / "list.jsonl", ["[1, 2]"])
    with pytest.raises(ValueError, match=r"list\.jsonl:1: expected a JSON object"):
        load_jsonl(path)


def test_jsonl_missing_key_names_key_file_line(tmp_path):
    path = write_jsonl(tmp_path / "k.jsonl", ['{"prompt": "a", "answer": "1"}', '{"prompt": "b"}'])
    with pytest.raises(ValueError, match=r"k\.jsonl:2: missing key 'answer'"):
        MathTask(path=str(path))


def test_jsonl_empty_and_missing_file(tmp_path):
    path = write_jsonl(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(ValueError, match="holds no records"):
        MathTask(path=str(path))
    with pytest.raises(FileNotFoundError, match="absent.jsonl"):
        MathTask(path=str(tmp_path / "absent.jsonl"))


def test_jsonl_stream_epochs_and_resume(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [json.dumps({"prompt": f"p{i}", "answer": str(i)}) for i in range(5)])
    task = MathTask(path=str(path), seed=3)
    stream = task.prompts()
    first_epoch = [s.index for s in stream.next_batch(5)]
    assert sorted(first_epoch) == list(range(5))
    stream.next_batch(2)
    state = json.loads(json.dumps(stream.state_dict()))
    expected = stream.next_batch(7)
    resumed = task.prompts()
    resumed.load_state_dict(state)
    assert resumed.next_batch(7) == expected
    other = write_jsonl(tmp_path / "e.jsonl", ['{"prompt": "x", "answer": "1"}'])
    with pytest.raises(ValueError, match="same dataset"):
        MathTask(path=str(other), seed=3).prompts().load_state_dict(state)


# ---------------------------------------------------------------- import-path rewards


@pytest.fixture
def reward_module(monkeypatch):
    mod = types.ModuleType("vespo_test_rewards")
    mod.contains = lambda response, record: float(record["target"] in response)
    mod.nan = lambda response, record: math.nan
    mod.inf = lambda response, record: math.inf
    mod.text = lambda response, record: "1.0"

    def boom(response, record):
        raise KeyError("score")

    mod.boom = boom
    mod.not_callable = 3
    monkeypatch.setitem(sys.modules, "vespo_test_rewards", mod)
    return mod


@pytest.fixture
def records(tmp_path):
    lines = ['{"prompt": "say hi", "target": "hi"}', '{"prompt": "bye", "target": "bye"}']
    return str(write_jsonl(tmp_path / "r.jsonl", lines))


def test_import_path_reward(reward_module, records):
    task = JsonlTask(path=records, reward_fn="vespo_test_rewards:contains", shuffle=False)
    first, second = task.prompts().next_batch(2)
    assert first.answer == "" and first.data == {"prompt": "say hi", "target": "hi"}
    assert task.rewards(["oh hi there", "hello"], [first, second]) == [1.0, 0.0]


def test_reward_that_raises_names_function_and_index(reward_module, records):
    task = JsonlTask(path=records, reward_fn="vespo_test_rewards:boom", shuffle=False)
    samples = task.prompts().next_batch(2)
    with pytest.raises(RewardError, match=r"vespo_test_rewards:boom raised KeyError.*sample index 1"):
        task.reward("x", samples[1])


@pytest.mark.parametrize("fn, match", [("nan", "returned nan"), ("inf", "returned inf"), ("text", "returned '1.0'")])
def test_non_finite_or_non_number_reward(reward_module, records, fn, match):
    task = JsonlTask(path=records, reward_fn=f"vespo_test_rewards:{fn}", shuffle=False)
    with pytest.raises(RewardError, match=match + r".*sample index 0"):
        task.reward("x", task.prompts().next_batch(1)[0])


@pytest.mark.parametrize(
    "import_path, match",
    [
        ("vespo_test_rewards.contains", "must look like"),
        ("no_such_module_xyz:f", "cannot import module"),
        ("vespo_test_rewards:missing", "no attribute 'missing'"),
        ("vespo_test_rewards:not_callable", "not a function"),
    ],
)
def test_bad_import_path(reward_module, import_path, match):
    with pytest.raises(ValueError, match=match):
        load_reward_fn(import_path)


def test_reward_from_real_module():
    fn = load_reward_fn("vespo_megatron.tasks.math_verify:math_reward")
    assert fn("\\boxed{3}", "3") == 1.0


# ---------------------------------------------------------------- registry


def test_build_task(tmp_path):
    assert set(TASKS) == {"arithmetic", "chain", "math", "jsonl"}
    task = build_task("arithmetic", max_operand=5, seed=1)
    assert isinstance(task, ArithmeticTask) and task.max_operand == 5
    with pytest.raises(ValueError, match="no option.*'max_operands'"):
        build_task("arithmetic", max_operands=5)
    with pytest.raises(ValueError, match="use one of"):
        build_task("gsm9k")


def test_shipped_tokenizer_covers_arithmetic_prompts():
    from vespo_megatron.tokenizer import load_tokenizer

    tok = load_tokenizer()
    task = ArithmeticTask(max_operand=99, operators="+-*", num_operands=3, allow_negative=True)
    for s in task.prompts().next_batch(50):
        ids = tok.encode(s.prompt + s.answer)
        assert tok.unk_id not in ids and len(ids) == len(s.prompt + s.answer)


def test_prompt_values_must_be_strings_not_booleans_or_numbers(tmp_path):
    from vespo_megatron.tasks.jsonl import load_jsonl

    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "1+1=", "answer": "2"}\n{"prompt": true, "answer": "2"}\n')
    with pytest.raises(ValueError, match=r"prompts.jsonl:2: 'prompt' is True \(bool\); it must be a JSON string"):
        load_jsonl(path, ["prompt"], string_keys=["prompt"])
    path.write_text('{"prompt": 12, "answer": "2"}\n')
    with pytest.raises(ValueError, match=r"prompts.jsonl:1: 'prompt' is 12 \(int\)"):
        load_jsonl(path, ["prompt"], string_keys=["prompt"])
