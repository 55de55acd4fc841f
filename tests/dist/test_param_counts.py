"""The rank grid and parameter counts that check-config reports equal what Megatron really builds.

Each case starts gloo workers, builds Megatron's process groups and the model for a tiny dense or MoE
layout, and compares (a) every group's membership with ``vespo_megatron.layout`` and (b) each rank's
``count_parameters`` with ``vespo_megatron.estimates``; the distinct parameters summed over ranks must
equal a single-process tp=1 build.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import megatron.core.parallel_state  # noqa: F401  (imported once here so forked workers start warm)
from vespo_megatron import estimates
from vespo_megatron.config import load_config
from vespo_megatron.layout import build_layout
from vespo_megatron.runtime.local_workers import run_local_workers

pytestmark = pytest.mark.slow

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
TOKENIZER_VOCAB = 100  # the shipped tiny tokenizer


def _megatron_groups() -> dict:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    getters = {
        "tp": ps.get_tensor_model_parallel_group,
        "cp": ps.get_context_parallel_group,
        "dp": lambda: ps.get_data_parallel_group(),
        "pp": ps.get_pipeline_model_parallel_group,
        "dp_cp": lambda: ps.get_data_parallel_group(with_context_parallel=True),
        "tp_cp": ps.get_tensor_and_context_parallel_group,
        "model_parallel": ps.get_model_parallel_group,
        "tp_dp": lambda: ps.get_tensor_and_data_parallel_group(),
        "tp_dp_cp": lambda: ps.get_tensor_and_data_parallel_group(with_context_parallel=True),
        "ep": ps.get_expert_model_parallel_group,
        "etp": ps.get_expert_tensor_parallel_group,
        "etp_ep": ps.get_expert_tensor_and_model_parallel_group,
        "etp_ep_pp": ps.get_expert_tensor_model_pipeline_parallel_group,
        "expert_dp": ps.get_expert_data_parallel_group,
    }
    groups = {name: dist.get_process_group_ranks(get()) for name, get in getters.items()}
    if ps.is_rank_in_embedding_group():
        groups["embedding"] = dist.get_process_group_ranks(ps.get_embedding_group())
    if ps.is_rank_in_position_embedding_group():
        groups["position_embedding"] = dist.get_process_group_ranks(ps.get_position_embedding_group())
    return groups


def _distinct_share(config, chunks, world_size: int) -> float:
    """This rank's share of the model's distinct parameters (1/replicas of each tensor it holds)."""
    from vespo_megatron.models.gpt import unwrap

    par = config.parallel
    dp_cp = par.dp(world_size) * par.cp
    share = 0.0
    for chunk in chunks:
        model = unwrap(chunk)
        for name, param in model.named_parameters():
            if name == "output_layer.weight" and config.model.tie_embeddings and not model.pre_process:
                continue  # the last stage's copy of the tied embedding
            split = getattr(param, "tensor_model_parallel", False)
            if ".experts." in name:
                replicas = par.expert_dp(world_size) * (1 if split and par.expert_tp > 1 else par.expert_tp)
            else:
                replicas = dp_cp * (1 if split else par.tp)
            share += param.numel() / replicas
    return share


def _build_and_report(rank, world_size, config_path, overrides):
    from megatron.core import parallel_state as ps

    from vespo_megatron.models.gpt import build_model, count_parameters
    from vespo_megatron.runtime.distributed import initialize

    config = load_config(config_path, overrides)
    initialize(config)
    built = build_model(config, TOKENIZER_VOCAB)
    return {
        "groups": _megatron_groups(),
        "pp_rank": ps.get_pipeline_model_parallel_rank(),
        "count": count_parameters(built.chunks),
        "share": _distinct_share(config, built.chunks, world_size),
    }


CASES = {
    # name: (config, extra overrides, world size)
    "dense_tp2": ("tiny_dense_cpu.yaml", [], 2),
    "moe_ep2": ("tiny_moe_cpu.yaml", [], 2),
    "dense_pp2_vpp2_tied": (
        "tiny_dense_cpu.yaml",
        ["parallel.tp=1", "parallel.pp=2", "parallel.vpp=2", "model.num_layers=4", "model.tie_embeddings=true"],
        2,
    ),
    "dense_tp2_cp2": ("tiny_dense_cpu.yaml", ["parallel.cp=2", "train.global_batch_size=4"], 4),
    "moe_tp2_sp_ep2_etp1_pp2": (
        "tiny_moe_cpu.yaml",
        ["parallel.tp=2", "parallel.sequence_parallel=true", "parallel.pp=2", "model.num_layers=2"],
        4,
    ),
}


@pytest.mark.parametrize("vocab_override", [[], ["model.vocab_size=128"]], ids=["tokenizer_vocab", "vocab128"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_groups_and_parameter_counts_match_megatron(name, vocab_override):
    config_name, overrides, world = CASES[name]
    overrides = overrides + vocab_override
    path = CONFIGS / config_name
    config = load_config(path, overrides)
    reports = run_local_workers(_build_and_report, world, path, overrides, timeout_s=240)

    layout = build_layout(config.parallel, world)
    per_stage = estimates.parameters_per_rank(config, TOKENIZER_VOCAB)
    for rank, report in enumerate(reports):
        for group, ranks in report["groups"].items():
            assert ranks == layout.group_of(group, rank), (name, rank, group)
        assert set(report["groups"]) | {"embedding", "position_embedding"} == set(layout.groups)
        assert report["pp_rank"] == layout.coordinates(rank)["pp"]
        assert report["count"] == per_stage[report["pp_rank"]].total, (name, rank)

    distinct = sum(r["share"] for r in reports)
    assert distinct == pytest.approx(estimates.total_parameters(config, TOKENIZER_VOCAB), abs=1e-6)
    if vocab_override:
        # 128 is padded to 128 for every tp here, so the sharded model has exactly the tp=1 model's tensors.
        single = ["parallel.tp=1", "parallel.sequence_parallel=false", "parallel.pp=1", "parallel.vpp=null",
                  "parallel.cp=1", "parallel.ep=1", "parallel.etp=null", "train.global_batch_size=2"]
        (reference,) = run_local_workers(_build_and_report, 1, path, overrides + single, timeout_s=240)
        assert distinct == pytest.approx(reference["count"], abs=1e-6)
        assert reference["count"] == estimates.total_parameters(load_config(path, overrides + single), 0)


VARIANTS = {
    "layernorm_bias_gelu_learned_positions": [
        "model.normalization=LayerNorm", "model.add_bias_linear=true", "model.swiglu=false",
        "model.position_embedding=learned_absolute",
    ],
    "qk_layernorm_kv_channels_tied": ["model.qk_layernorm=true", "model.kv_channels=24", "model.tie_embeddings=true"],
    "moe_shared_expert": ["model.num_experts=4", "model.moe_ffn_hidden_size=48",
                          "model.moe_shared_expert_intermediate_size=32", "model.qk_layernorm=true"],
    "moe_bias_layernorm": ["model.num_experts=2", "model.normalization=LayerNorm", "model.add_bias_linear=true"],
}


def _single_count(rank, world_size, overrides):
    return _build_and_report(rank, world_size, None, overrides)["count"]


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_single_process_variants_match_estimate(name):
    overrides = VARIANTS[name] + ["model.vocab_size=100"]
    (count,) = run_local_workers(_single_count, 1, overrides, timeout_s=240)
    assert count == estimates.total_parameters(load_config(None, overrides), 0)
