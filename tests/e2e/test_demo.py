"""The quick start's promise: ``vespo-megatron demo`` raises greedy accuracy on held-out problems by at least 0.20.

Run exactly as a user runs it (two TP workers, the shipped settings), at the README's seed and one of the five
seeds docs/rl.md reports, on whatever processor CI has: the bound must not depend on either.
"""

from __future__ import annotations

import json

import pytest

from vespo_megatron.cli import main as cli_main

pytestmark = pytest.mark.slow

IMPROVEMENT_BOUND = 0.20


@pytest.mark.parametrize("seed", [None, 3])  # None: the config's train.seed, the README's first command
def test_demo_raises_held_out_greedy_accuracy_by_the_promised_bound(seed, tmp_path, capsys):
    argv = ["demo", "--json", "--run-dir", str(tmp_path / "demo")] + ([f"train.seed={seed}"] if seed is not None else [])
    assert cli_main(argv) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    before, after = result["before"][0], result["after"][0]
    assert 0.0 <= before < after <= 1.0
    assert after - before >= IMPROVEMENT_BOUND, result
    assert (tmp_path / "demo" / "plots").is_dir()
