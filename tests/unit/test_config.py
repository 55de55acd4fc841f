"""Config loading, overrides and validation: every bad layout fails before any process group exists."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from vespo_megatron.config import (
    Config,
    ConfigError,
    config_from_dict,
    config_to_dict,
    load_config,
    parse_overrides,
    validate,
)

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"

# Each shipped config and the world size it is meant for (nodes x GPUs per node).
SHIPPED = {
    "tiny_dense_cpu.yaml": 2,
    "tiny_moe_cpu.yaml": 2,
    "tiny_chain_cpu.yaml": 2,
    "qwen3_30b_a3b_moe.yaml": 32,
    "qwen3_8b_dense.yaml": 8,
    "llama3_2_3b_dense.yaml": 8,
}

MOE = ["model.num_experts=4", "model.moe_ffn_hidden_size=32"]

# (overrides, world size, substrings the message must contain)
BUDGET = ["train.max_tokens_per_microbatch=64"]

INVALID = {
    "packing_with_cp": (BUDGET + ["train.pack_sequences=true", "parallel.cp=2"], 2,
                        ["train.pack_sequences=true", "parallel.cp=2", "pack_sequences=false"]),
    "budget_with_routing_replay": (BUDGET + MOE + ["rollout.routing_replay=true"], 1,
                                   ["rollout.routing_replay=true", "max_tokens_per_microbatch=null"]),
    "budget_pp_allgather": (BUDGET + MOE + ["parallel.pp=2", "model.moe_token_dispatcher=allgather"], 2,
                            ["variable_seq_lengths", "moe_token_dispatcher=alltoall"]),
    "packed_budget_vpp_odd_minibatch": (BUDGET + ["train.pack_sequences=true", "model.num_layers=4", "parallel.pp=2",
                                                  "parallel.vpp=2", "rollout.prompts_per_step=3",
                                                  "rollout.group_size=2", "rl.num_minibatches=2"], 2,
                                        ["parallel.vpp=2", "multiple of parallel.pp=2", "3 sequences"]),
    "padded_budget_with_vpp": (BUDGET + ["model.num_layers=4", "parallel.pp=2", "parallel.vpp=2"], 2,
                               ["parallel.vpp=2", "train.pack_sequences=true", "one shape"]),
    "world_vs_tp_pp_cp": (["parallel.tp=2", "parallel.pp=2"], 6, ["world size 6", "tp*pp*cp = 2*2*1 = 4"]),
    "world_vs_cp": (["parallel.cp=4", "train.global_batch_size=2", "train.micro_batch_size=1"], 6,
                    ["world size 6", "= 4"]),
    "expert_grid": (MOE + ["parallel.ep=4", "parallel.pp=2"], 4, ["parallel.etp*ep*pp = 1*4*2 = 8", "expert grid"]),
    "layers_vs_pp": (["model.num_layers=3", "parallel.pp=2", "train.global_batch_size=4"], 2,
                     ["model.num_layers=3", "parallel.pp*vpp = 2*1 = 2"]),
    "layers_vs_pp_vpp": (["model.num_layers=4", "parallel.pp=2", "parallel.vpp=4", "train.global_batch_size=4"], 2,
                         ["model.num_layers=4", "2*4 = 8"]),
    "heads_vs_tp": (["model.num_attention_heads=6", "model.hidden_size=48", "parallel.tp=4",
                     "train.global_batch_size=2"], 4, ["model.num_attention_heads=6", "parallel.tp=4", "[1, 2, 3, 6]"]),
    "query_groups_vs_tp": (["model.num_query_groups=2", "parallel.tp=4", "train.global_batch_size=2"], 4,
                           ["model.num_query_groups=2", "parallel.tp=4"]),
    "ffn_vs_tp": (["model.ffn_hidden_size=100", "parallel.tp=8", "model.num_attention_heads=8",
                   "train.global_batch_size=2"], 8, ["model.ffn_hidden_size=100", "parallel.tp=8"]),
    "experts_vs_ep": (["model.num_experts=6", "parallel.ep=4", "train.global_batch_size=8"], 4,
                      ["parallel.ep=4 does not divide model.num_experts=6", "[1, 2, 3, 6]"]),
    "moe_tp_needs_sp": (MOE + ["parallel.tp=2"], 2, ["parallel.tp=2", "sequence_parallel=true"]),
    "etp_needs_no_bias": (MOE + ["parallel.ep=2", "parallel.etp=2", "model.add_bias_linear=true",
                                 "train.global_batch_size=4"], 4, ["parallel.etp=2", "add_bias_linear=false"]),
    "ep1_etp_ne_tp": (MOE + ["parallel.tp=2", "parallel.sequence_parallel=true", "parallel.etp=1"], 2,
                      ["parallel.ep=1", "etp=1 != tp=2"]),
    "ep_without_experts": (["parallel.ep=2"], 2, ["parallel.ep=2", "model.num_experts is null"]),
    "expert_ffn_vs_etp": (MOE + ["model.moe_ffn_hidden_size=33", "parallel.ep=2", "parallel.etp=2",
                                 "parallel.tp=2", "parallel.sequence_parallel=true"], 4,
                          ["model.moe_ffn_hidden_size=33", "parallel.etp=2"]),
    "batch_vs_micro_dp": (["train.global_batch_size=6", "train.micro_batch_size=2"], 2,
                          ["train.global_batch_size=6", "micro_batch_size*dp = 2*2 = 4"]),
    "vpp_needs_pp": (["parallel.vpp=2"], 1, ["parallel.vpp=2", "pp > 1"]),
    "interleaved_micro_vs_pp": (["model.num_layers=4", "parallel.pp=2", "parallel.vpp=2", "train.global_batch_size=6",
                                 "train.micro_batch_size=2"], 2, ["micro-batches per update (3", "parallel.pp=2"]),
    "vpp_pp2_batch_p2p": (["model.num_layers=4", "parallel.pp=2", "parallel.vpp=2", "parallel.batch_p2p_comm=true"],
                          2, ["batch_p2p_comm=true", "batch_p2p_comm=false"]),
    "cp_vs_seq": (["parallel.cp=4", "model.max_seq_length=36", "train.global_batch_size=2"], 4,
                  ["model.max_seq_length=36", "2*parallel.cp=8"]),
    "sp_vs_seq": (["parallel.tp=4", "parallel.sequence_parallel=true", "model.max_seq_length=66",
                   "train.global_batch_size=2"], 4, ["model.max_seq_length=66", "parallel.tp=4"]),
    "train_seq_vs_cp": (["parallel.cp=2", "train.seq_length=30", "train.global_batch_size=2"], 2,
                        ["train.seq_length=30", "2*parallel.cp=4"]),
    "train_seq_vs_sp": (["parallel.tp=4", "parallel.sequence_parallel=true", "train.seq_length=30",
                         "train.global_batch_size=2"], 4, ["train.seq_length=30", "tp*cp=4"]),
    "train_seq_too_long": (["train.seq_length=128"], 1, ["train.seq_length=128", "model.max_seq_length=64"]),
    "shared_expert_vs_tp": (MOE + ["model.moe_shared_expert_intermediate_size=30", "parallel.tp=4",
                                   "parallel.sequence_parallel=true", "train.global_batch_size=2"], 4,
                            ["model.moe_shared_expert_intermediate_size=30", "parallel.tp=4"]),
    "world_zero": ([], 0, ["world_size=0"]),
}

# Rejected while the sections are built (single-section checks and parsing), before validate.
INVALID_ON_LOAD = {
    "sp_without_tp": (["parallel.sequence_parallel=true"], ["sequence_parallel=true", "parallel.tp > 1"]),
    "tp_zero": (["parallel.tp=0"], ["parallel.tp=0", ">= 1"]),
    "etp_zero": (["parallel.etp=0"], ["parallel.etp=0"]),
    "grouped_gemm_needs_bf16": (MOE + ["model.moe_grouped_gemm=true"], ["moe_grouped_gemm=true", "dtype=bf16"]),
    "topk_gt_experts": (MOE + ["model.moe_router_topk=5"], ["model.moe_router_topk=5", "num_experts=4"]),
    "topk_one": (MOE + ["model.moe_router_topk=1"], ["model.moe_router_topk=1", ">= 2"]),
    "shared_expert_bias": (MOE + ["model.moe_shared_expert_intermediate_size=32", "model.add_bias_linear=true"],
                           ["moe_shared_expert_intermediate_size", "add_bias_linear=false"]),
    "shared_expert_zero": (MOE + ["model.moe_shared_expert_intermediate_size=0"],
                           ["moe_shared_expert_intermediate_size=0", ">= 1"]),
    "heads_vs_groups": (["model.num_query_groups=3"], ["num_attention_heads=4", "num_query_groups=3"]),
    "hidden_vs_heads": (["model.hidden_size=66"], ["model.hidden_size=66", "kv_channels"]),
    "vocab_multiple_zero": (["model.make_vocab_size_divisible_by=0"], ["make_vocab_size_divisible_by=0"]),
    "unknown_section": (["rollouts.n=4"], ["unknown key(s)", "rollouts"]),
    "unknown_key": (["parallel.tpp=2"], ["unknown key(s)", "parallel.tpp", "valid keys"]),
    "wrong_type_int": (["parallel.tp=two"], ["parallel.tp='two'", "integer"]),
    "wrong_type_bool": (["parallel.sequence_parallel=3"], ["parallel.sequence_parallel=3", "true or false"]),
    "float_for_int": (["model.num_layers=2.5"], ["model.num_layers=2.5", "integer"]),
    "bad_literal": (["model.dtype=fp16"], ["model.dtype='fp16'", "['fp32', 'bf16']"]),
    "section_not_mapping": (["parallel=4"], ["parallel must be a mapping"]),
    "override_without_equals": (["parallel.tp"], ["override 'parallel.tp'", "section.key=value"]),
    "override_empty_key": (["=3"], ["override '=3'", "section.key=value"]),
    "override_conflict": (["parallel=1", "parallel.tp=2"], ["conflicts with another override"]),
    "overlap_param_gather_needs_distopt": (["optimizer.overlap_param_gather=true"],
                                           ["overlap_param_gather=true", "use_distributed_optimizer=true"]),
    "lr_nonpositive": (["optimizer.lr=0"], ["optimizer.lr=0"]),
    "micro_batch_zero": (["train.micro_batch_size=0"], ["train.micro_batch_size=0"]),
    "keep_last_zero": (["checkpoint.keep_last=0"], ["checkpoint.keep_last=0"]),
    "token_budget_zero": (["train.max_tokens_per_microbatch=0"], ["train.max_tokens_per_microbatch=0", ">= 1"]),
    "packing_without_budget": (["train.pack_sequences=true"], ["train.pack_sequences=true",
                                                               "train.max_tokens_per_microbatch"]),
}

VALID = {
    "defaults_one_rank": ([], 1),
    "tp2_dp2": (["parallel.tp=2"], 4),
    "tp2_sp": (["parallel.tp=2", "parallel.sequence_parallel=true"], 2),
    "pp2_vpp": (["model.num_layers=4", "parallel.pp=2", "parallel.vpp=2"], 2),
    "packed_budget_pp2_vpp": (BUDGET + ["train.pack_sequences=true", "model.num_layers=4", "parallel.pp=2",
                                        "parallel.vpp=2"], 2),
    "pp4": (["model.num_layers=4", "parallel.pp=4", "train.global_batch_size=4"], 4),
    "cp2": (["parallel.cp=2"], 2),
    "tp2_cp2_sp": (["parallel.tp=2", "parallel.cp=2", "parallel.sequence_parallel=true"], 4),
    "moe_ep2": (MOE + ["parallel.ep=2"], 2),
    "moe_ep4_dp4": (MOE + ["parallel.ep=4"], 4),
    "moe_tp2_sp_ep2_etp1": (MOE + ["parallel.tp=2", "parallel.sequence_parallel=true", "parallel.ep=2",
                                   "parallel.etp=1"], 2),
    "moe_tp2_etp2_ep2": (MOE + ["parallel.tp=2", "parallel.sequence_parallel=true", "parallel.ep=2"], 4),
    "moe_pp2_ep2": (MOE + ["parallel.pp=2", "parallel.ep=2", "train.global_batch_size=4"], 4),
    "moe_shared_expert": (MOE + ["model.moe_shared_expert_intermediate_size=32", "parallel.ep=2"], 2),
    "explicit_train_seq": (["train.seq_length=32", "parallel.cp=2"], 2),
    "budget_cp2_padded": (BUDGET + ["parallel.cp=2"], 2),
    "budget_packed_tp2_sp_pp2": (BUDGET + ["train.pack_sequences=true", "model.num_layers=4", "parallel.tp=2",
                                           "parallel.sequence_parallel=true", "parallel.pp=2"], 4),
    "budget_ignores_micro_batch_size": (BUDGET + ["train.micro_batch_size=3", "train.global_batch_size=3"], 1),
}


def _load(overrides: list[str]) -> Config:
    return load_config(None, overrides)


def _check_message(err: Exception, needles: list[str]) -> None:
    message = str(err)
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"


@pytest.mark.parametrize("name", sorted(INVALID))
def test_invalid_layout_is_rejected_by_validate(name):
    overrides, world, needles = INVALID[name]
    config = _load(overrides)  # builds fine: only the cross-section check sees the problem
    with pytest.raises(ConfigError) as info:
        validate(config, world)
    _check_message(info.value, needles)


@pytest.mark.parametrize("name", sorted(INVALID_ON_LOAD))
def test_invalid_value_is_rejected_on_load(name):
    overrides, needles = INVALID_ON_LOAD[name]
    with pytest.raises(ConfigError) as info:
        _load(overrides)
    _check_message(info.value, needles)


def test_enough_invalid_layouts_are_covered():
    assert len(INVALID) + len(INVALID_ON_LOAD) >= 40


def test_validate_needs_no_process_group():
    import sys

    if "torch" in sys.modules:
        import torch.distributed as dist

        assert not dist.is_initialized()
    config = _load(["parallel.tp=2", "parallel.pp=2"])
    with pytest.raises(ConfigError):
        validate(config, 6)


@pytest.mark.parametrize("name", sorted(VALID))
def test_valid_layout_passes(name):
    overrides, world = VALID[name]
    validate(_load(overrides), world)


def test_error_names_the_fix():
    with pytest.raises(ConfigError, match=r"use ep in \[1, 2, 3, 6\]"):
        validate(_load(["model.num_experts=6", "parallel.ep=4", "train.global_batch_size=8"]), 4)


# ------------------------------------------------------------------------------------------------ shipped
def test_every_shipped_config_is_listed():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(SHIPPED)


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_config_loads_and_validates(name):
    path = CONFIGS / name
    config = load_config(path)
    validate(config, SHIPPED[name])
    assert path.read_text().startswith("#"), "each shipped config starts with a comment block"
    raw = yaml.safe_load(path.read_text())
    assert set(raw) <= {f.name for f in dataclasses.fields(Config)}


def test_shipped_model_shapes():
    moe = load_config(CONFIGS / "qwen3_30b_a3b_moe.yaml")
    assert (moe.model.num_layers, moe.model.hidden_size, moe.model.num_experts) == (48, 2048, 128)
    assert (moe.model.moe_router_topk, moe.model.moe_ffn_hidden_size) == (8, 768)
    assert (moe.parallel.tp, moe.parallel.sequence_parallel, moe.parallel.ep, moe.parallel.expert_tp) == (
        2, True, 8, 1)
    assert moe.parallel.pp == 1 and moe.optimizer.use_distributed_optimizer and moe.optimizer.lr == 1e-6
    assert (moe.rollout.prompts_per_step, moe.rollout.group_size, moe.rl.num_minibatches) == (256, 8, 4)
    assert moe.rollout.prompts_per_step * moe.rollout.group_size // moe.rl.num_minibatches == moe.train.global_batch_size
    dense = load_config(CONFIGS / "qwen3_8b_dense.yaml")
    assert (dense.model.num_layers, dense.model.ffn_hidden_size, dense.model.tie_embeddings) == (36, 12288, False)
    llama = load_config(CONFIGS / "llama3_2_3b_dense.yaml")
    assert (llama.model.vocab_size, llama.model.tie_embeddings, llama.model.rotary_base) == (128256, True, 500000)
    tiny = load_config(CONFIGS / "tiny_dense_cpu.yaml")
    assert tiny.model.vocab_size is None and tiny.parallel.tp == 2


# ------------------------------------------------------------------------------------------------ yaml
@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_yaml_round_trip(name, tmp_path):
    config = load_config(CONFIGS / name)
    out = tmp_path / "saved.yaml"
    out.write_text(yaml.safe_dump(config_to_dict(config)))
    assert load_config(out) == config
    assert config_from_dict(config_to_dict(config)) == config


def test_defaults_without_a_file():
    assert load_config(None) == Config()


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(CONFIGS / "nope.yaml")


def test_top_level_must_be_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(path)


# ------------------------------------------------------------------------------------------------ overrides
def test_overrides_apply_over_the_file():
    config = load_config(CONFIGS / "tiny_dense_cpu.yaml", ["parallel.tp=1", "optimizer.lr=3e-4", "model.vocab_size=50"])
    assert config.parallel.tp == 1 and config.optimizer.lr == 3e-4 and config.model.vocab_size == 50
    assert config.model.hidden_size == 64  # untouched keys keep the file's value


def test_override_values_are_yaml():
    nested = parse_overrides(["a.b=1", "a.c=true", "a.d=null", "a.e=x=y", "a.f=", "a.g=[1, 2]"])
    assert nested == {"a": {"b": 1, "c": True, "d": None, "e": "x=y", "f": None, "g": [1, 2]}}


def test_override_to_null_and_int_to_float():
    config = _load(["parallel.etp=null", "optimizer.lr=1"])
    assert config.parallel.etp is None and isinstance(config.optimizer.lr, float)


def test_later_override_wins():
    assert _load(["parallel.tp=2", "parallel.tp=4"]).parallel.tp == 4


def test_exponent_floats_without_a_dot(tmp_path):
    # YAML 1.1 reads 1e-6 as a string; float fields accept it, and still refuse words.
    path = tmp_path / "lr.yaml"
    path.write_text("optimizer:\n  lr: 1e-6\n")
    assert load_config(path).optimizer.lr == 1e-6
    assert _load(["optimizer.lr=3e-4"]).optimizer.lr == 3e-4
    with pytest.raises(ConfigError, match="optimizer.lr='fast' must be a number"):
        _load(["optimizer.lr=fast"])
