"""``vespo-megatron demo`` argument handling and the ``--seeds`` summary, without starting workers."""

from __future__ import annotations

import json

import pytest

from vespo_megatron.demo import DemoRun, build_parser, check_args, demo_overrides, summary, summary_line


def _args(*argv: str):
    args = build_parser().parse_args(list(argv))
    check_args(args)
    return args


def test_every_flag_is_in_help():
    text = build_parser().format_help()
    for flag in ("--steps", "--tp", "--loss", "--run-dir", "--config", "--seeds", "--threads", "--json"):
        assert flag in text, flag


@pytest.mark.parametrize("argv, names", [
    (["--seeds", "0"], "--seeds"),
    (["--seeds", "2", "train.seed=3"], "train.seed"),
    (["--threads", "0"], "--threads"),
    (["--steps", "-1"], "--steps"),
])
def test_bad_flags_name_the_flag(argv, names):
    with pytest.raises(ValueError, match=names):
        _args(*argv)


def test_overrides_order_user_last_then_seed():
    args = _args("--steps", "7", "--seeds", "2", "rl.eval_prompts=16")
    overrides = demo_overrides(args, "runs/x/seed_1", 1)
    assert overrides[-1] == "train.seed=1"
    assert overrides[-2] == "rl.eval_prompts=16"
    assert "train.steps=7" in overrides and "logging.run_dir=runs/x/seed_1" in overrides
    assert demo_overrides(_args(), "runs/demo", None)[-1] == "logging.run_dir=runs/demo"


def test_summary_fields():
    runs = [DemoRun(seed=s, before=0.25, after=0.25 + 0.1 * (s + 1), history=[], seconds=10.0 + s, plots=[])
            for s in range(3)]
    data = json.loads(json.dumps(summary(runs)))
    assert data["seeds"] == [0, 1, 2]
    assert data["improvement"] == pytest.approx([0.1, 0.2, 0.3])
    assert data["min_improvement"] == pytest.approx(0.1)
    assert data["seconds"] == [10.0, 11.0, 12.0]
    assert len(data["loadavg"]) == 3
    line = summary_line(runs)
    assert "min +0.100" in line and "max +0.300" in line and "spread 0.200" in line
