"""The staleness manager, the worker pace bound, the disaggregated config checks and loss.behaviour=sampler."""

from __future__ import annotations

import math

import pytest
import torch

from vespo_megatron.config import ConfigError, load_config, validate
from vespo_megatron.config.rl import default_lookahead, worst_staleness
from vespo_megatron.rl.staleness import StalenessManager


def _simulated_worst(lookahead: int, n: int, s: int, steps: int = 200) -> int:
    """The protocol played out step by step: step i samples with the last push at or before header i-1-L."""
    pushed = {-1: 0}  # header index -> version pushed with it
    last_push = 0
    worst = 0
    for i in range(steps):
        version_now = i * n
        header = i - 1 - lookahead
        sampled_with = max(v for h, v in pushed.items() if h <= max(header, -1))
        worst = max(worst, version_now - sampled_with)
        after = (i + 1) * n
        if after // s > last_push // s:
            pushed[i] = after
            last_push = after
    return worst


@pytest.mark.parametrize("lookahead, n, s", [(0, 1, 1), (1, 1, 1), (2, 1, 1), (0, 2, 1), (1, 2, 3), (0, 3, 2),
                                             (2, 2, 4), (1, 4, 6)])
def test_worst_staleness_bounds_the_simulated_protocol(lookahead, n, s):
    simulated = _simulated_worst(lookahead, n, s)
    assert simulated <= worst_staleness(lookahead, n, s)
    if s % n == 0 or n % s == 0:  # pushes land exactly on multiples of s: the bound is reached
        assert simulated == worst_staleness(lookahead, n, s)


def test_default_lookahead_is_the_largest_within_the_bound():
    for k in range(6):
        for n in (1, 2, 3):
            for s in (1, 2, 3):
                if worst_staleness(0, n, s) > k:
                    continue
                lookahead = default_lookahead(k, n, s)
                assert worst_staleness(lookahead, n, s) <= k
                assert worst_staleness(lookahead + 1, n, s) > k
    assert default_lookahead(None, 2, 1) == 1
    assert worst_staleness(0, 4, 6) == 6 - math.gcd(4, 6)


def test_manager_admits_drops_counts_and_round_trips():
    manager = StalenessManager(max_staleness=2, num_minibatches=2)
    assert manager.admit(behaviour_version=5, current_version=7, num_sequences=8)
    assert not manager.admit(behaviour_version=4, current_version=7, num_sequences=8)
    manager.record_update(5, 7, 4)
    manager.record_update(5, 8, 4)
    metrics = manager.step_metrics()
    assert metrics["staleness/hist_2"] == 4 and metrics["staleness/hist_3"] == 4
    assert metrics["staleness/hist_0"] == 0 and metrics["staleness/mean"] == 2.5 and metrics["staleness/max"] == 3
    assert metrics["staleness/dropped_rollouts"] == 1 and metrics["staleness/dropped_sequences"] == 8
    assert manager.step_metrics()["staleness/dropped_rollouts"] == 0  # per-step counts reset
    state = manager.state_dict()
    other = StalenessManager(max_staleness=2, num_minibatches=2)
    other.load_state_dict(state)
    assert other.state_dict() == state and other.total_dropped_rollouts == 1
    with pytest.raises(ValueError, match="run ahead"):
        manager.admit(behaviour_version=9, current_version=7, num_sequences=1)


def test_unbounded_manager_never_drops():
    manager = StalenessManager(max_staleness=None)
    assert manager.admit(0, 10_000, 4)
    assert manager.step_metrics()["staleness/dropped_rollouts"] == 0


TINY = ["model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=4", "model.num_query_groups=2",
        "model.ffn_hidden_size=64", "rollout.prompts_per_step=4", "rollout.group_size=2",
        "train.micro_batch_size=2", "train.global_batch_size=8"]  # fmt: skip


@pytest.mark.parametrize("overrides, world, message", [
    (["parallel.rollout_ranks=2"], 2, "leaves no trainer rank"),
    (["parallel.rollout_ranks=3", "rollout.parallel.tp=2"], 4, "not divisible by rollout.parallel.tp=2"),
    (["parallel.rollout_ranks=3", "rollout.parallel.tp=3"], 4, "rollout.parallel.tp=3 does not divide"),
    (["parallel.rollout_ranks=1", "rl.max_staleness=0", "rl.sync_every=2"], 2, "staleness 1 > rl.max_staleness=0"),
    (["parallel.rollout_ranks=1", "rl.async_lag=1"], 2, "rl.async_lag=1 simulates"),
    (["rl.async_lag=1", "rl.num_minibatches=2", "rl.max_staleness=1"], 1, "every rollout would be dropped"),
    (["parallel.rollout_ranks=1", "parallel.tp=2"], 2, "world size 1 is not divisible by parallel.tp"),
], ids=["no_trainer", "replica_split", "rollout_tp_heads", "sync_vs_bound", "async_lag", "colocated_lag",
        "trainer_grid"])
def test_disaggregated_config_errors_name_the_fix(overrides, world, message):
    with pytest.raises(ConfigError, match=message):
        validate(load_config(None, TINY + overrides), world)


def test_disaggregated_trainer_grid_excludes_rollout_ranks():
    config = load_config(None, TINY + ["parallel.rollout_ranks=2", "parallel.tp=2", "rollout.parallel.tp=2"])
    validate(config, 4)
    assert config.parallel.dp(4) == 1


def test_sampler_behaviour_uses_the_sampler_logprobs():
    from vespo_megatron.rl.batch import Rollout
    from vespo_megatron.rl.behaviour import use_sampler_logprobs

    sampler = torch.tensor([[0.0, -0.5, -1.0, -2.0, 0.0], [0.0, 0.0, -0.25, -0.75, -3.0]])
    rollout = Rollout(sequences=torch.zeros(2, 5, dtype=torch.long), prompt_lengths=torch.tensor([1, 2]),
                      response_lengths=torch.tensor([3, 2]), sampler_logprobs=sampler, rewards=torch.zeros(2),
                      advantages=torch.zeros(2))
    use_sampler_logprobs(rollout, token_level=True)
    assert rollout.old_logprob_sums.tolist() == [-3.5, -1.0]
    # per label: label t is token t + 1, so the log-prob of token t + 1 sits at index t; masked outside
    assert rollout.old_token_logprobs.tolist() == [[-0.5, -1.0, -2.0, 0.0], [0.0, -0.25, -0.75, 0.0]]
