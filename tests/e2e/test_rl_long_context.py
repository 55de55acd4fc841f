"""An RL run at a real context length: 256-token context, responses of up to 200 tokens (KV-cache decoder).

Two steps of the tiny dense model on one worker; the untrained policy samples the stop token about
once in a hundred tokens, so responses run long. Checked: the run completes and every logged step
reports mean response lengths within the budget and far beyond the 16-token test contexts.
"""

from __future__ import annotations

import json

import pytest

from tests.e2e.rl_fixtures import overrides, run_workers

pytestmark = pytest.mark.slow

LONG = [
    "model.max_seq_length=256",
    "rollout.max_new_tokens=200",
    "rollout.prompts_per_step=2",
    "rollout.group_size=2",
    "train.micro_batch_size=4",
    "train.global_batch_size=4",
    "train.steps=2",
    "rollout.engine=kv",
]


def test_rl_run_with_200_token_responses_completes(tmp_path):
    result = run_workers(1, overrides(tmp_path, *LONG), timeout_s=600)[0]
    assert result["step"] == 2
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
               if line.strip()]
    lengths = [r["response/length_mean"] for r in records if "response/length_mean" in r]
    assert len(lengths) == 2
    assert all(0 < length <= 200 for length in lengths)
    assert max(lengths) > 16, lengths  # far beyond what the 16-token test contexts can hold
