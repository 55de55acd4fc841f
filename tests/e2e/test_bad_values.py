"""Bad values fail loudly on the real training path: non-finite policy log-probs name the update, rank and rows.

A rollout is sampled with healthy weights; then one weight of the output layer is set to NaN, which makes
every policy log-prob NaN. The next update must stop with NonFiniteLogprobsError naming the RL step, the
update, the rank and the rollout rows, for the sequence path (VESPO) and the token path (GRPO) alike.
"""

from __future__ import annotations

import pytest

from tests.e2e.rl_fixtures import load, overrides
from vespo_megatron.runtime.local_workers import run_local_workers


def _poisoned_update_worker(rank, world, overrides_):
    import torch

    from vespo_megatron.models.gpt import unwrap
    from vespo_megatron.rl.heads import NonFiniteLogprobsError
    from vespo_megatron.rl.loop import build_trainer
    from vespo_megatron.rl.step import next_local_rollout, train_on_rollout

    trainer = build_trainer(load(overrides_))
    context, state = trainer.context, trainer.state
    state.step = 5
    rollout = next_local_rollout(context, state)
    with torch.no_grad():
        unwrap(context.engine.chunks[-1]).output_weight()[3, 0] = float("nan")
    try:
        train_on_rollout(context.config, context.engine, rollout, state.step)
    except NonFiniteLogprobsError as err:
        return str(err)
    return None


@pytest.mark.parametrize("loss", ["vespo", "grpo"])
def test_nan_policy_logprobs_name_step_update_rank_and_rows(tmp_path, loss):
    message = run_local_workers(_poisoned_update_worker, 1, overrides(tmp_path, f"loss.name={loss}"), timeout_s=600)[0]
    assert message is not None, "a NaN output weight trained without an error"
    assert "RL step 5, update 0, rank 0, rollout rows [0, 1, 2, 3" in message, message
    assert "non-finite" in message, message
