"""Rank grid vs Megatron's rank generator, parameter/memory/communication estimates, check-config, docs."""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path

import pytest

from vespo_megatron import estimates
from vespo_megatron.check_config import EXIT_INVALID, EXIT_OUT_OF_MEMORY, main as check_config_main
from vespo_megatron.config import Config, ConfigError, ParallelConfig, load_config
from vespo_megatron.layout import GROUP_NAMES, build_layout, grid_groups

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"
SHIPPED = {  # config: (nodes, gpus per node) it is meant for
    "tiny_dense_cpu.yaml": (1, 2),
    "tiny_moe_cpu.yaml": (1, 2),
    "qwen3_30b_a3b_moe.yaml": (4, 8),
    "qwen3_8b_dense.yaml": (1, 8),
    "llama3_2_3b_dense.yaml": (1, 8),
}


# ------------------------------------------------------------------------------------------------ layout
def _grids():
    for tp, cp, pp, ep, etp, world in itertools.product([1, 2, 4], [1, 2], [1, 2, 3], [1, 2, 4], [1, 2], [8, 12, 24]):
        if world % (tp * cp * pp) == 0 and world % (etp * ep * pp) == 0:
            yield tp, cp, pp, ep, etp, world


def test_layout_matches_megatron_rank_generator():
    from megatron.core.parallel_state import RankGenerator  # a pure function of sizes; no process group

    count = 0
    for tp, cp, pp, ep, etp, world in _grids():
        layout = build_layout(ParallelConfig(tp=tp, cp=cp, pp=pp, ep=ep, etp=etp), world)
        dense = RankGenerator(tp=tp, ep=1, dp=world // (tp * cp * pp), pp=pp, cp=cp, order="tp-cp-ep-dp-pp")
        expert = RankGenerator(tp=etp, ep=ep, dp=world // (etp * ep * pp), pp=pp, cp=1, order="tp-cp-ep-dp-pp")
        for name, (grid, kind) in GROUP_NAMES.items():
            reference = (dense if grid == "dense" else expert).get_ranks(kind)
            assert layout.groups[name] == reference, (name, tp, cp, pp, ep, etp, world)
        count += 1
    assert count > 100


def test_groups_partition_the_world_and_coordinates_agree():
    layout = build_layout(ParallelConfig(tp=2, cp=2, pp=2, ep=2, etp=1), 16)
    for name, groups in layout.groups.items():
        if name in ("embedding", "position_embedding"):
            continue
        assert sorted(r for g in groups for r in g) == list(range(16)), name
    for rank in range(16):
        coords = layout.coordinates(rank)
        assert layout.group_of("tp", rank)[coords["tp"]] == rank
        assert layout.group_of("pp", rank)[coords["pp"]] == rank
        assert layout.group_of("dp", rank)[coords["dp"]] == rank
        assert layout.group_of("cp", rank)[coords["cp"]] == rank
        assert layout.group_of("ep", rank)[coords["ep"]] == rank
        assert layout.group_of("expert_dp", rank)[coords["expert_dp"]] == rank
    assert layout.groups["tp"][:2] == [[0, 1], [2, 3]]
    assert layout.groups["pp"][0] == [0, 8]
    assert layout.groups["embedding"][0] == [0, 8] and layout.groups["position_embedding"][0] == [0]


def test_grid_groups_small_example():
    assert grid_groups({"tp": 2, "dp": 2, "pp": 2}, "dp") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert grid_groups({"tp": 2, "dp": 2, "pp": 2}, "tp-pp") == [[0, 1, 4, 5], [2, 3, 6, 7]]
    with pytest.raises(ValueError, match="not in"):
        grid_groups({"tp": 2}, "ep")


def test_groups_crossing_nodes():
    layout = build_layout(ParallelConfig(tp=2, sequence_parallel=True, ep=8, etp=1), 32)
    crossing = layout.groups_crossing_nodes(8)
    assert "tp" not in crossing and "ep" not in crossing and "expert_dp" in crossing
    assert "tp" in build_layout(ParallelConfig(tp=4), 8).groups_crossing_nodes(2)


# ------------------------------------------------------------------------------------------------ parameters
def test_tiny_dense_count_by_hand():
    config = Config()  # 2 layers, h 64, 4 heads (MHA), swiglu ffn 192, untied; vocab 100 -> 104
    per_layer = 2 * 64 + 192 * 64 + 64 * 64 + 2 * 192 * 64 + 64 * 192
    assert estimates.total_parameters(config, 100) == 104 * 64 + 2 * per_layer + 64 + 104 * 64


def test_public_model_sizes():
    moe = load_config(CONFIGS / "qwen3_30b_a3b_moe.yaml")
    assert 30.4e9 < estimates.total_parameters(moe, 0) < 30.6e9  # "30.5B total"
    assert 3.3e9 < estimates.active_parameters(moe, 0) < 3.4e9  # "3.3B activated"
    assert 8.1e9 < estimates.total_parameters(load_config(CONFIGS / "qwen3_8b_dense.yaml"), 0) < 8.3e9
    assert 3.1e9 < estimates.total_parameters(load_config(CONFIGS / "llama3_2_3b_dense.yaml"), 0) < 3.3e9


def test_per_rank_counts_split_over_tp_and_ep():
    base = ["model.num_experts=8", "model.moe_ffn_hidden_size=32", "model.vocab_size=128"]
    one = estimates.parameters_per_rank(load_config(None, base), 0)[0]
    split = estimates.parameters_per_rank(
        load_config(None, base + ["parallel.ep=4", "parallel.tp=2", "parallel.sequence_parallel=true",
                                  "parallel.etp=1"]), 0)[0]
    assert split.expert * 4 == one.expert
    assert one.dense // 2 < split.dense < one.dense  # norms and router are replicated over tp


def test_pipeline_stages_hold_embedding_and_output():
    config = load_config(None, ["model.num_layers=4", "parallel.pp=2", "model.vocab_size=128"])
    first, last = estimates.parameters_per_rank(config, 0)
    assert first.total + last.total == estimates.total_parameters(config, 0)
    tied = load_config(None, ["model.num_layers=4", "parallel.pp=2", "model.vocab_size=128",
                              "model.tie_embeddings=true"])
    first, last = estimates.parameters_per_rank(tied, 0)
    # The last stage keeps its own copy of the tied embedding; the model has it once.
    assert first.total + last.total == estimates.total_parameters(tied, 0) + 128 * 64


# ------------------------------------------------------------------------------------------------ memory
def _peak(overrides, world, path=None):
    config = load_config(path, overrides)
    return estimates.peak_memory(estimates.estimate_memory(config, world, 100, overhead_gb=0))


def test_distributed_optimizer_shards_adam_state():
    path = CONFIGS / "qwen3_8b_dense.yaml"
    sharded = _peak([], 8, path)
    whole = _peak(["optimizer.use_distributed_optimizer=false", "optimizer.overlap_param_gather=false"], 8, path)
    assert whole.optimizer == pytest.approx(4 * sharded.optimizer, rel=1e-6)  # dp = 4
    assert sharded.optimizer == pytest.approx(12 * sharded.parameters / 4, rel=1e-6)  # fp32 master + 2 moments
    assert sharded.weights == 2 * sharded.parameters and sharded.grads == 4 * sharded.parameters


def test_fp32_model_widths():
    m = _peak([], 1)
    assert m.weights == 4 * m.parameters and m.grads == 4 * m.parameters and m.optimizer == 8 * m.parameters


def test_activations_scale_with_sequence_and_tp():
    path = CONFIGS / "qwen3_8b_dense.yaml"
    padded = ["train.max_tokens_per_microbatch=null", "train.pack_sequences=false"]
    base = _peak(padded, 8, path).activations
    longer = _peak(padded + ["model.max_seq_length=16384"], 8, path).activations
    assert longer == pytest.approx(2 * base, rel=0.05)
    tp4 = _peak(padded + ["parallel.tp=4"], 8, path).activations
    assert tp4 == pytest.approx(base / 2, rel=0.05)
    no_sp = _peak(padded + ["parallel.sequence_parallel=false"], 8, path).activations
    assert no_sp > base


def test_a_token_budget_sizes_the_training_micro_batch():
    """With train.max_tokens_per_microbatch the activations follow the budget, not micro_batch_size x seq_length."""
    base = ["model.transformer_impl=transformer_engine", "model.max_seq_length=64", "train.micro_batch_size=4"]
    padded = load_config(None, base)
    assert estimates.training_micro_batch_shape(padded) == (64, 4)
    packed = load_config(None, base + ["train.max_tokens_per_microbatch=96", "train.pack_sequences=true"])
    assert estimates.training_micro_batch_shape(packed) == (96, 1)
    binned = load_config(None, base + ["train.max_tokens_per_microbatch=160"])
    assert estimates.training_micro_batch_shape(binned) == (64, 2)
    # without the quadratic local-attention term the per-layer elements are linear in the tokens
    per_token = estimates.activation_elements_per_layer(padded) / (64 * 4)
    assert estimates.activation_elements_per_layer(packed) == pytest.approx(96 * per_token)
    assert estimates.activation_elements_per_layer(binned) == pytest.approx(128 * per_token)
    assert estimates.activation_elements_per_layer(packed, tokens=64, sequences=4) == \
        estimates.activation_elements_per_layer(padded)  # the rollout's prefill passes its own shape


def test_activation_formula_dense_small():
    config = load_config(None, ["model.transformer_impl=transformer_engine", "train.micro_batch_size=1"])
    s, h, f = 64, 64, 192
    expected = 4 * s * h + s * h * 3 + s * h + s * f * 3  # norms, Q/K/V, attention output, SwiGLU MLP
    assert estimates.activation_elements_per_layer(config) == expected


# ------------------------------------------------------------------------------------------------ rollout
def test_30b_rollout_includes_the_kv_cache_and_fits_only_micro_batched():
    path = CONFIGS / "qwen3_30b_a3b_moe.yaml"
    per_sequence = 48 * 8192 * (4 // 2) * 128 * 2 * 2  # layers x positions x KV heads per TP rank x d x K,V x bf16
    assert estimates.kv_cache_bytes_per_sequence(load_config(path)) == per_sequence == 0.375 * estimates.GIB
    batched = _peak([], 32, path)  # the config decodes 64 of each rank's 128 sequences at a time
    assert batched.rollout_batch == 64 and batched.kv_cache == 64 * per_sequence
    assert batched.peak_phase == "rollout" and batched.rollout > batched.training
    assert batched.rollout == batched.resident + batched.kv_cache + batched.rollout_transient
    assert batched.total < 80 * estimates.GIB - 2 * estimates.GIB  # with check-config's 2 GiB overhead
    whole = _peak(["rollout.max_batch_sequences=null"], 32, path)  # today's one batch of 128
    assert whole.rollout_batch == 128 and whole.kv_cache == 48 * estimates.GIB
    assert whole.total > 80 * estimates.GIB
    assert whole.training == batched.training  # training is not affected


def test_check_config_refuses_a_rollout_that_does_not_fit_and_proposes_the_batch(capsys):
    argv = [str(CONFIGS / "qwen3_30b_a3b_moe.yaml"), "--nodes", "4", "--gpus-per-node", "8",
            "rollout.max_batch_sequences=null"]
    assert check_config_main(argv) == EXIT_OUT_OF_MEMORY
    captured = capsys.readouterr()
    assert "(rollout) DOES NOT FIT" in captured.out
    error = captured.err.strip()
    assert "\n" not in error and error.startswith("error: the estimated peak")
    assert "KV cache 48.00 GiB for 128 sequences" in error and "set rollout.max_batch_sequences=" in error
    proposed = int(error.rsplit("rollout.max_batch_sequences=", 1)[1].split()[0])
    assert 64 <= proposed < 128
    assert check_config_main(argv[:-1] + [f"rollout.max_batch_sequences={proposed}"]) == 0
    assert check_config_main(argv[:-1] + [f"rollout.max_batch_sequences={proposed + 1}"]) == EXIT_OUT_OF_MEMORY
    capsys.readouterr()
    assert check_config_main(argv[:-1] + ["--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["peak_phase"] == "rollout" and report["rollout_batch_sequences"] == 64
    assert report["memory_gib"][0]["kv_cache"] == 24.0


def test_rollout_workers_leave_the_trainer_ranks_without_a_rollout_phase():
    config = load_config(CONFIGS / "tiny_dense_cpu.yaml", ["parallel.rollout_ranks=2"])
    peak = estimates.peak_memory(estimates.estimate_memory(config, 6, 100, overhead_gb=0))
    assert peak.rollout_batch == 0 and peak.kv_cache == 0 and peak.total == peak.training


def test_rollout_batch_size_is_validated():
    with pytest.raises(ConfigError, match=r"rollout.max_batch_sequences=0 must be >= 1 \(null decodes one batch\)"):
        load_config(None, ["rollout.max_batch_sequences=0"])


def test_logit_chunk_rows_agree_with_the_decoder():
    from vespo_megatron.rollout.common import LOGIT_CHUNK_ROWS

    assert estimates.LOGIT_CHUNK_ROWS == LOGIT_CHUNK_ROWS


# ------------------------------------------------------------------------------------------------ comm
def test_loss_communication_sums_vs_gather():
    config = load_config(CONFIGS / "qwen3_30b_a3b_moe.yaml")
    comm = estimates.loss_communication(config, 32)
    assert comm.group_size == 2 and comm.micro_batches == 32
    assert comm.sums_bytes_per_micro_batch == 2 * 1 * 4
    assert comm.gather_bytes_per_micro_batch == 8192 * 4
    assert comm.gather_bytes_per_update / comm.sums_bytes_per_update == 8192 / 2
    assert estimates.loss_communication(Config(), 1).sums_bytes_per_update == 0


# ------------------------------------------------------------------------------------------------ check-config
@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_check_config_accepts_every_shipped_config(name, capsys):
    nodes, gpus = SHIPPED[name]
    assert check_config_main([str(CONFIGS / name), "--nodes", str(nodes), "--gpus-per-node", str(gpus)]) == 0
    out = capsys.readouterr().out
    assert "memory per GPU" in out and "parameters:" in out and "tp " in out


NODE_TABLE = [
    # config, nodes, gpus/node, overrides, exit, message fragment
    ("qwen3_30b_a3b_moe.yaml", 2, 8, [], 0, "fits"),
    ("qwen3_30b_a3b_moe.yaml", 8, 8, [], 0, "fits"),
    ("qwen3_30b_a3b_moe.yaml", 1, 6, [], EXIT_INVALID, "etp*ep*pp = 1*8*1 = 8"),
    ("qwen3_30b_a3b_moe.yaml", 3, 8, [], EXIT_INVALID, "train.global_batch_size=512"),
    ("qwen3_30b_a3b_moe.yaml", 1, 8, [], EXIT_OUT_OF_MEMORY, "exceeds --gpu-memory-gb=80"),
    ("qwen3_30b_a3b_moe.yaml", 3, 8, ["parallel.ep=6"], EXIT_INVALID, "parallel.ep=6 does not divide"),
    ("qwen3_8b_dense.yaml", 2, 8, [], 0, "fits"),
    ("qwen3_8b_dense.yaml", 3, 8, ["parallel.tp=3"], EXIT_INVALID, "heads=32 is not divisible by parallel.tp=3"),
    ("qwen3_8b_dense.yaml", 1, 8, ["parallel.pp=5"], EXIT_INVALID, "tp*pp*cp"),
    ("llama3_2_3b_dense.yaml", 1, 8, ["parallel.vpp=2"], EXIT_INVALID, "parallel.vpp=2"),
    ("llama3_2_3b_dense.yaml", 1, 8, ["model.max_seq_length=65536"], EXIT_OUT_OF_MEMORY, "exceeds"),
    ("tiny_dense_cpu.yaml", 1, 1, [], EXIT_INVALID, "world size 1"),
    ("tiny_dense_cpu.yaml", 1, 4, [], 0, "fits"),
    ("tiny_moe_cpu.yaml", 1, 3, ["parallel.ep=3"], EXIT_INVALID, "parallel.ep=3 does not divide"),
    ("tiny_moe_cpu.yaml", 1, 2, ["parallel.tpp=1"], EXIT_INVALID, "unknown key"),
    ("tiny_moe_cpu.yaml", 0, 2, [], EXIT_INVALID, "--nodes=0"),
]


@pytest.mark.parametrize("row", NODE_TABLE, ids=lambda r: f"{r[0]}-{r[1]}x{r[2]}-{'-'.join(r[3])}")
def test_check_config_node_table(row, capsys):
    name, nodes, gpus, overrides, code, fragment = row
    argv = [str(CONFIGS / name), "--nodes", str(nodes), "--gpus-per-node", str(gpus), *overrides]
    assert check_config_main(argv) == code
    captured = capsys.readouterr()
    assert fragment in captured.out + captured.err


def test_check_config_json(capsys):
    argv = [str(CONFIGS / "tiny_moe_cpu.yaml"), "--nodes", "1", "--gpus-per-node", "2", "--json"]
    assert check_config_main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["layout"]["groups"]["ep"] == [[0, 1]]
    assert report["parameters"]["per_rank"][0]["expert"] > 0 and report["world_size"] == 2
    assert check_config_main(argv + ["parallel.ep=3"]) == EXIT_INVALID
    bad = json.loads(capsys.readouterr().out)
    assert bad["ok"] is False and "parallel.etp*ep*pp" in bad["error"]


def test_check_config_needs_no_megatron_or_process_group():
    import subprocess
    import sys

    code = (
        "import sys; from vespo_megatron.check_config import main; "
        f"rc = main([{str(CONFIGS / 'qwen3_30b_a3b_moe.yaml')!r}, '--nodes', '4', '--gpus-per-node', '8']); "
        "assert 'megatron' not in sys.modules, 'megatron imported'; "
        "dist = sys.modules.get('torch.distributed'); "
        "assert dist is None or not dist.is_initialized(); sys.exit(rc)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


# ------------------------------------------------------------------------------------------------ docs
def test_docs_configs_md_is_generated_and_current():
    from vespo_megatron.config_docs import DOC_PATH, render_markdown

    assert DOC_PATH.read_text() == render_markdown(), "regenerate with: python -m vespo_megatron.config_docs --write"


def test_reference_lists_every_key_of_every_section():
    from vespo_megatron.config_docs import render_reference

    text = render_reference()
    for section in dataclasses.fields(Config):
        for key in dataclasses.fields(section.default_factory()):
            assert f"`{section.name}.{key.name}`" in text
