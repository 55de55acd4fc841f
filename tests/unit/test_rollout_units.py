"""Pure pieces of the RL step: sampling filters, group advantages, Rollout masks and batches, JSONL parsing.

No process group and no model: every function here is tensors in, tensors out.
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from vespo_megatron.rl.advantages import group_advantages, informative_groups
from vespo_megatron.rl.batch import Rollout, micro_batches, segment_ids
from vespo_megatron.rollout.common import Generated, concat_generated, shard_logits
from vespo_megatron.rollout.external import ExternalRollouts
from vespo_megatron.rollout.sampling import filter_top_k_top_p, sample_next_tokens

NO_CP = SimpleNamespace(cp=1, cp_rank=0)


# ------------------------------------------------------------------------------------ decoder logits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_rows", [1, 7, 100, 4096])
def test_shard_logits_equal_the_fp32_copy_of_the_whole_shard(dtype, chunk_rows):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(5, 48, generator=gen).to(dtype)
    weight = torch.randn(100, 48, generator=gen).to(dtype)
    expected = hidden.float() @ weight.float().t()  # the decoders' former formula
    got = shard_logits(hidden, weight, chunk_rows)
    assert got.dtype == torch.float32 and got.shape == (5, 100)
    if dtype == torch.float32:  # an fp32 weight is used as it is: today's product exactly
        assert torch.equal(got, expected)
    else:  # bf16 rows converted chunk by chunk: the same fp32 products up to summation order
        assert float(((got - expected).abs() / expected.abs().clamp(min=1.0)).max()) <= 1e-6


def test_concat_generated_keeps_row_order_and_the_largest_cache():
    def part(rows, bytes_):
        return Generated(sequences=torch.full((rows, 4), rows), prompt_lengths=torch.ones(rows, dtype=torch.long),
                         response_lengths=torch.arange(rows), sampler_logprobs=torch.zeros(rows, 4),
                         kv_cache_bytes=bytes_)

    merged = concat_generated([part(2, 10), part(3, 30), part(0, 0)])
    assert merged.sequences[:, 0].tolist() == [2, 2, 3, 3, 3]
    assert merged.response_lengths.tolist() == [0, 1, 0, 1, 2]
    assert merged.kv_cache_bytes == 30 and merged.routing_indices is None and merged.token_versions is None


# ------------------------------------------------------------------------------------ sampling filters


def test_top_k_keeps_the_k_largest():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0, -1.0]])
    kept = torch.isfinite(filter_top_k_top_p(logits, top_k=2))
    assert kept.tolist() == [[False, True, False, True, False]]


def test_top_k_zero_or_at_least_vocab_is_a_no_op():
    logits = torch.randn(3, 6, generator=torch.Generator().manual_seed(0))
    assert torch.equal(filter_top_k_top_p(logits, top_k=0), logits)
    assert torch.equal(filter_top_k_top_p(logits, top_k=6), logits)


def test_top_p_keeps_the_smallest_nucleus_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    # Mass before each token (sorted): 0, .5, .8, .95 -> p=0.8 keeps the first two (mass .8 reached at token 2).
    assert torch.isfinite(filter_top_k_top_p(logits, top_p=0.8)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_top_k_top_p(logits, top_p=0.81)).tolist() == [[True, True, True, False]]
    # A tiny p still keeps the most likely token.
    assert torch.isfinite(filter_top_k_top_p(logits, top_p=1e-6)).tolist() == [[True, False, False, False]]


def test_top_p_works_on_unsorted_rows_independently():
    logits = torch.tensor([[0.0, 5.0, 0.0, 0.0], [5.0, 0.0, 0.0, 4.9]])
    kept = torch.isfinite(filter_top_k_top_p(logits, top_p=0.5)).tolist()
    assert kept == [[False, True, False, False], [True, False, False, False]]


def test_top_k_then_top_p_compose():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    kept = torch.isfinite(filter_top_k_top_p(logits, top_k=3, top_p=0.99)).tolist()
    assert kept == [[True, True, True, False, False]]


def test_sampled_tokens_stay_in_the_filtered_set_and_logprobs_are_untruncated():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(64, 10, generator=gen)
    tokens, logprobs = sample_next_tokens(logits, temperature=0.7, top_k=3, generator=gen)
    top3 = torch.topk(logits, 3, dim=-1).indices
    assert bool((top3 == tokens.unsqueeze(1)).any(dim=1).all())
    # The recorded log-prob is the temperature-scaled full softmax, before truncation (what the trainer evaluates).
    expected = torch.log_softmax(logits / 0.7, dim=-1).gather(1, tokens.unsqueeze(1)).squeeze(1)
    torch.testing.assert_close(logprobs, expected)


def test_sampler_temperature_draws_and_records_mu_at_its_own_temperature():
    """rollout.sampler_temperature: the decoder samples at it and records the log-prob at it (mu), while
    rollout.temperature stays the trainer's; unset, the sampler uses rollout.temperature."""
    from vespo_megatron.config.rl import RolloutConfig
    from vespo_megatron.rollout.common import DecodeRequest, sample_and_share

    logits = torch.randn(512, 10, generator=torch.Generator().manual_seed(4))
    uniforms = torch.rand(512, generator=torch.Generator().manual_seed(5))
    last_stage = SimpleNamespace(is_last_stage=True, pp=1)
    for sampler_temperature, expected_temperature in ((None, 0.8), (2.0, 2.0)):
        settings = RolloutConfig(temperature=0.8, sampler_temperature=sampler_temperature)
        request = DecodeRequest(settings=settings, seq_length=16, eos_id=0, pad_id=0, uniforms=uniforms)
        tokens, logprobs = sample_and_share(logits, 512, uniforms, request, last_stage)
        expected = torch.log_softmax(logits / expected_temperature, dim=-1).gather(1, tokens.unsqueeze(1)).squeeze(1)
        torch.testing.assert_close(logprobs.double(), expected.double())
        reference, _ = sample_next_tokens(logits, temperature=expected_temperature, uniforms=uniforms)
        assert torch.equal(tokens, reference)
    with pytest.raises(ValueError, match="rollout.sampler_temperature"):
        RolloutConfig(sampler_temperature=0.0)


def test_vocabulary_padding_is_never_sampled_or_chosen_greedily():
    logits = torch.zeros(256, 8)
    logits[:, 6:] = 50.0  # padding columns with huge logits
    tokens, _ = sample_next_tokens(logits, vocab_size=6, generator=torch.Generator().manual_seed(0))
    assert int(tokens.max()) < 6
    greedy, _ = sample_next_tokens(logits, vocab_size=6, greedy=True)
    assert int(greedy.max()) < 6


def test_samples_do_not_depend_on_the_vocabulary_padding_width():
    """The padded vocabulary grows with tensor parallelism (a multiple of 8*tp); a seeded draw must not."""
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(32, 100, generator=gen)
    padded_tp1 = torch.cat([logits, torch.randn(32, 4, generator=gen)], dim=1)
    padded_tp2 = torch.cat([logits, torch.randn(32, 12, generator=gen)], dim=1)
    a, _ = sample_next_tokens(padded_tp1, vocab_size=100, top_p=0.9, generator=torch.Generator().manual_seed(7))
    b, _ = sample_next_tokens(padded_tp2, vocab_size=100, top_p=0.9, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_sampling_is_reproducible_with_a_seeded_generator():
    logits = torch.randn(16, 12, generator=torch.Generator().manual_seed(2))
    a, _ = sample_next_tokens(logits, top_p=0.9, generator=torch.Generator().manual_seed(5))
    b, _ = sample_next_tokens(logits, top_p=0.9, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


# ------------------------------------------------------------------------------------- advantages


def test_group_advantages_centre_and_scale_per_group():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [3.0, 3.0, 3.0, 3.0]])
    adv = group_advantages(rewards)
    torch.testing.assert_close(adv[0], torch.tensor([1.0, -1.0, -1.0, 1.0]), atol=1e-5, rtol=0)
    assert torch.equal(adv[1], torch.zeros(4))
    centred = group_advantages(rewards, std_normalize=False)
    torch.testing.assert_close(centred[0], torch.tensor([0.5, -0.5, -0.5, 0.5]))


def test_group_of_one_is_only_centred():
    assert torch.equal(group_advantages(torch.tensor([[2.0], [5.0]])), torch.zeros(2, 1))


def test_group_advantages_refuse_bad_shapes_and_non_finite_rewards():
    with pytest.raises(ValueError, match="num_prompts, group_size"):
        group_advantages(torch.ones(4))
    with pytest.raises(ValueError, match="NaN or inf"):
        group_advantages(torch.tensor([[1.0, math.nan]]))


def test_informative_groups_are_the_non_uniform_ones():
    rewards = torch.tensor([[1.0, 1.0], [0.0, 1.0], [0.0, 0.0], [0.5, 0.25]])
    assert informative_groups(rewards).tolist() == [False, True, False, True]


# ----------------------------------------------------------------------------------------- Rollout


def _rollout() -> Rollout:
    """Three sequences of 8 tokens (seq_length 7): prompts of 2, 3, 1 tokens; responses of 3, 2, 0 tokens."""
    sequences = torch.tensor([
        [2, 10, 11, 12, 13, 3, 0, 0],
        [2, 20, 21, 22, 3, 0, 0, 0],
        [2, 0, 0, 0, 0, 0, 0, 0],
    ])
    prompt_lengths = torch.tensor([2, 3, 1])
    response_lengths = torch.tensor([3, 2, 0])
    sampler = torch.zeros(3, 8)
    sampler[0, 2:5] = torch.tensor([-0.1, -0.2, -0.3])
    sampler[1, 3:5] = torch.tensor([-1.0, -2.0])
    return Rollout(sequences=sequences, prompt_lengths=prompt_lengths, response_lengths=response_lengths,
                   sampler_logprobs=sampler, rewards=torch.tensor([1.0, 0.0, 0.0]),
                   advantages=torch.tensor([0.5, -0.5, 0.0]), old_logprob_sums=torch.tensor([-0.7, -2.5, 0.0]),
                   behaviour_version=4)


def test_response_mask_covers_exactly_the_response_tokens():
    mask = _rollout().response_token_mask()
    assert mask.tolist() == [
        [0, 0, 1, 1, 1, 0, 0, 0],
        [0, 0, 0, 1, 1, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 0],
    ]


def test_sampler_logprob_sums_use_the_response_mask():
    rollout = _rollout()
    rollout.sampler_logprobs[0, 6] = -9.0  # outside the response: ignored
    torch.testing.assert_close(rollout.sampler_logprob_sums(), torch.tensor([-0.6, -3.0, 0.0]))


def test_select_and_state_dict_round_trip():
    rollout = _rollout()
    picked = rollout.select(torch.tensor([2, 0]))
    assert picked.size == 2 and picked.behaviour_version == 4
    assert picked.prompt_lengths.tolist() == [1, 2]
    state = rollout.state_dict()
    assert "old_token_logprobs" not in state  # None fields are left out
    again = Rollout.from_state_dict(state)
    assert torch.equal(again.sequences, rollout.sequences) and again.behaviour_version == 4


def test_micro_batches_shift_labels_and_carry_the_rl_fields():
    rollout = _rollout()
    batches = micro_batches(rollout, torch.tensor([1, 0]), micro_batch_size=1, ctx=NO_CP)
    assert len(batches) == 2
    first = batches[0]  # row 1
    assert first["tokens"].tolist() == [[2, 20, 21, 22, 3, 0, 0]]
    assert first["labels"].tolist() == [[20, 21, 22, 3, 0, 0, 0]]
    # The loss mask marks labels that are response tokens: positions 3, 4 of the sequence -> labels 2, 3.
    assert first["loss_mask"].tolist() == [[0, 0, 1, 1, 0, 0, 0]]
    assert first["sampler_logprobs"].tolist() == [[0, 0, -1.0, -2.0, 0, 0, 0]]
    assert first["advantages"].tolist() == [-0.5]
    assert first["response_lengths"].tolist() == [2]
    torch.testing.assert_close(first["sampler_logprob_sums"], torch.tensor([-3.0]))
    torch.testing.assert_close(first["old_logprob_sums"], torch.tensor([-2.5]))
    assert batches[1]["advantages"].tolist() == [0.5]


def test_micro_batches_refuse_a_ragged_split():
    with pytest.raises(ValueError, match="micro_batch_size=2"):
        micro_batches(_rollout(), torch.arange(3), micro_batch_size=2, ctx=NO_CP)


def test_segment_ids_name_the_row_of_each_response_label():
    loss_mask = torch.tensor([[0.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    ids = segment_ids(loss_mask)
    assert ids.shape == (3, 2)  # [s, b]
    assert ids.tolist() == [[-1, 1], [0, -1], [0, -1]]


# --------------------------------------------------------------------------------- external JSONL


def _line(**overrides) -> str:
    record = {"prompt_tokens": [2, 5], "response_tokens": [6, 3], "sampler_logprobs": [-0.5, -0.1], "reward": 1.0}
    record.update(overrides)
    return json.dumps(record)


def _reader(tmp_path, lines, group_size=2, seq_length=8):
    path = tmp_path / "rollouts.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return ExternalRollouts(path, group_size=group_size, seq_length=seq_length, pad_id=0, vocab_size=100)


def test_external_rollouts_pack_groups_and_wrap_around(tmp_path):
    reader = _reader(tmp_path, [_line(reward=1.0), _line(reward=0.0), "", _line(reward=0.5), _line(reward=0.25)])
    batch = reader.next_groups(1)
    assert batch.sequences.tolist() == [[2, 5, 6, 3, 0, 0, 0, 0, 0]] * 2
    torch.testing.assert_close(batch.sampler_logprobs[0, 2:4], torch.tensor([-0.5, -0.1]))
    assert batch.prompt_lengths.tolist() == [2, 2] and batch.response_lengths.tolist() == [2, 2]
    assert batch.rewards.tolist() == [1.0, 0.0]
    assert reader.next_groups(1).rewards.tolist() == [0.5, 0.25]
    assert reader.next_groups(1).rewards.tolist() == [1.0, 0.0]  # wrapped
    state = reader.state_dict()
    again = _reader(tmp_path, [_line(reward=1.0), _line(reward=0.0), _line(reward=0.5), _line(reward=0.25)])
    again.load_state_dict(state)
    assert again.next_groups(1).rewards.tolist() == [0.5, 0.25]


@pytest.mark.parametrize("bad, message", [
    ("{not json", "malformed JSON"),
    ("[1, 2]", "expected a JSON object"),
    (json.dumps({"prompt_tokens": [2], "response_tokens": [3], "reward": 1.0}), "missing key 'sampler_logprobs'"),
    (_line(response_tokens=[]), "must be non-empty"),
    (_line(sampler_logprobs=[-0.5]), "has 1 values for 2 response tokens"),
    (_line(response_tokens=[6, 100]), r"token ids must be integers in \[0, 100\)"),
    (_line(sampler_logprobs=[-0.5, 0.3]), "finite numbers <= 0"),
    (_line(sampler_logprobs=[-0.5, "nan"]), "finite numbers <= 0"),
    (_line(reward=None), "reward must be a finite number"),
    (_line(reward=True), "reward must be a finite number"),
    (_line(response_tokens=[6, True]), "holds True; token ids must be integers.*true/false"),
    (_line(prompt_tokens=[2, False]), "holds False; token ids must be integers"),
    (_line(sampler_logprobs=[-0.5, False]), "holds False; log-probs must be finite.*true/false"),
    (_line(response_tokens="63"), "response_tokens must be a JSON list"),
])
def test_external_rollouts_name_file_and_line_of_a_bad_record(tmp_path, bad, message):
    with pytest.raises(ValueError, match=message) as err:
        _reader(tmp_path, [_line(), "", bad, _line()])
    assert f"{tmp_path / 'rollouts.jsonl'}:3:" in str(err.value)


def test_external_rollouts_refuse_partial_groups_overlong_lines_empty_and_missing_files(tmp_path):
    with pytest.raises(ValueError, match="not whole groups of rollout.group_size=2"):
        _reader(tmp_path, [_line()] * 3)
    with pytest.raises(ValueError, match=r"rollouts.jsonl:1: prompt \+ response is 12 tokens.*max_seq_length"):
        _reader(tmp_path, [_line(response_tokens=[3] * 10, sampler_logprobs=[-0.1] * 10), _line()])
    with pytest.raises(ValueError, match="no rollouts in the file"):
        _reader(tmp_path, ["", "  "])
    with pytest.raises(FileNotFoundError, match="rollout.jsonl_path="):
        ExternalRollouts(tmp_path / "missing.jsonl", group_size=2, seq_length=8, pad_id=0, vocab_size=100)


def test_external_rollouts_refuse_a_group_whose_lines_answer_different_prompts(tmp_path):
    with pytest.raises(ValueError, match=r"rollouts.jsonl:4: prompt_tokens differ from line 3.*group_size=2"):
        _reader(tmp_path, [_line(), _line(), _line(), _line(prompt_tokens=[2, 7])])
    reader = _reader(tmp_path, [_line(), _line(), _line(prompt_tokens=[2, 7]), _line(prompt_tokens=[2, 7])])
    assert reader.next_groups(2).sequences[:, :2].tolist() == [[2, 5], [2, 5], [2, 7], [2, 7]]


def test_external_rollouts_refuse_a_checkpoint_of_another_file(tmp_path):
    reader = _reader(tmp_path, [_line()] * 4)
    with pytest.raises(ValueError, match="the file changed since the checkpoint"):
        reader.load_state_dict({"position": 2, "num_records": 6})


# ------------------------------------------------------------------------------ mini-batch rows


def test_minibatches_take_contiguous_whole_groups_by_default():
    from vespo_megatron.rl.batch import minibatch_rows

    parts = minibatch_rows(24, group_size=4, num_minibatches=3)
    assert [p.tolist() for p in parts] == [list(range(0, 8)), list(range(8, 16)), list(range(16, 24))]


def test_shuffle_groups_permutes_groups_and_keeps_each_group_in_one_minibatch():
    from vespo_megatron.rl.batch import minibatch_rows

    group = 4
    orders = set()
    for seed in range(8):
        parts = minibatch_rows(32, group_size=group, num_minibatches=4, shuffle_groups=True, seed=seed)
        rows = torch.cat(parts)
        assert sorted(rows.tolist()) == list(range(32))  # every row exactly once
        for part in parts:
            # each mini-batch is two whole groups, each group's rows consecutive and in order
            blocks = part.view(-1, group)
            assert torch.equal(blocks - blocks[:, :1], torch.arange(group).expand_as(blocks))
            assert torch.equal(blocks[:, 0] % group, torch.zeros(len(blocks), dtype=torch.long))
        orders.add(tuple(rows.tolist()))
        again = torch.cat(minibatch_rows(32, group_size=group, num_minibatches=4, shuffle_groups=True, seed=seed))
        assert torch.equal(rows, again)  # the seed fixes the order
    assert len(orders) > 1  # and different seeds give different orders


def test_more_minibatches_than_groups_splits_groups_over_consecutive_updates():
    from vespo_megatron.rl.batch import minibatch_rows

    parts = minibatch_rows(8, group_size=4, num_minibatches=4)
    assert [p.tolist() for p in parts] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    with pytest.raises(ValueError, match="whole groups"):
        minibatch_rows(10, group_size=4, num_minibatches=2)


def test_rollout_minibatches_follow_the_config_and_vary_the_group_order_per_step():
    from types import SimpleNamespace

    from vespo_megatron.rl.step import rollout_minibatches

    rollout = SimpleNamespace(size=16)

    def config(shuffle):
        return SimpleNamespace(rollout=SimpleNamespace(group_size=4), train=SimpleNamespace(seed=1),
                               rl=SimpleNamespace(num_minibatches=2, shuffle_groups=shuffle))

    fixed = [torch.cat(rollout_minibatches(rollout, config(False), step)).tolist() for step in range(4)]
    assert fixed == [list(range(16))] * 4
    shuffled = {tuple(torch.cat(rollout_minibatches(rollout, config(True), step)).tolist()) for step in range(6)}
    assert len(shuffled) > 1
