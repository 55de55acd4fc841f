"""RoPE positions restart at every sequence of a packed row.

RoPE is relative, so attention scores alone would hide positions that ran on across sequences; the test
therefore compares what core attention receives: the rotated queries and keys of the second sequence of a
packed row must equal those of that sequence run alone, and its final hidden states too.
"""

import pytest
import torch

from tests.dist.equivalence_harness import DENSE
from vespo_megatron.config import load_config
from vespo_megatron.runtime.local_workers import run_local_workers

pytestmark = pytest.mark.slow


def _capture_worker(rank, world):
    from vespo_megatron.models.attention import LocalCoreAttention
    from vespo_megatron.models.gpt import unwrap
    from vespo_megatron.runtime.distributed import initialize
    from vespo_megatron.train.batches import causal_lm_batch, packed_lm_batch, packed_seq_params
    from vespo_megatron.train.engine import build_engine

    config = load_config(None, DENSE + ["train.max_tokens_per_microbatch=16", "train.pack_sequences=true"])
    engine = build_engine(config, initialize(config), vocab_size=64)
    model = unwrap(engine.chunks[0])
    model.emit_hidden_states = True
    captured = []
    attention = next(m for m in model.modules() if isinstance(m, LocalCoreAttention))
    attention.register_forward_pre_hook(lambda module, args: captured.append((args[0].clone(), args[1].clone())))
    gen = torch.Generator().manual_seed(3)
    first, second = torch.randint(0, 64, (1, 7), generator=gen), torch.randint(0, 64, (1, 6), generator=gen)
    width = 7
    rows = torch.zeros(2, width, dtype=torch.long)
    rows[0], rows[1, :6] = first[0], second[0]
    packed = packed_lm_batch(rows, torch.ones_like(rows), [6, 5])
    alone = causal_lm_batch(second, torch.ones_like(second))
    with torch.no_grad():
        hidden_packed = model(packed["tokens"], packed["position_ids"], None,
                              packed_seq_params=packed_seq_params(packed))
        hidden_alone = model(alone["tokens"], alone["position_ids"], None)
        running = torch.arange(packed["tokens"].shape[1]).unsqueeze(0)  # the same row, positions running on
        model(packed["tokens"], running, None)
    (query_packed, key_packed), (query_alone, key_alone), (query_running, _) = captured
    return dict(query=(query_packed[6:], query_alone[:, 0]), key=(key_packed[6:], key_alone[:, 0]),
                running=query_running[6:, 0], hidden=(hidden_packed[6:, 0], hidden_alone[:, 0]))


def test_second_packed_sequence_sees_positions_from_zero():
    out = run_local_workers(_capture_worker, 1)[0]
    for name in ("query", "key", "hidden"):
        packed, alone = out[name]
        assert packed.shape == alone.shape
        assert (packed - alone).abs().max().item() <= 1e-5, f"{name} of the second packed sequence differs"
    # positions running on across the row rotate the second sequence's queries differently: not vacuous
    assert (out["running"] - out["query"][1]).abs().max().item() > 1e-3
