"""HF models in and out through Megatron-Bridge, checked against transformers on gloo workers.

- the Megatron model built from a tiny HF folder gives transformers' logits (fp32, within 1e-5) for
  Qwen3, Qwen3-MoE and Llama at TP1, TP2+SP, PP2, EP2 and TP2 x EP2 (layouts of one world size share a
  launch);
- import-hf under TP2 x EP2 then export-hf on one process gives back every input tensor bit for bit;
- a run that starts from an HF folder (with its own tokenizer) trains under TP2, exports through
  ``checkpoint.export_hf_every``, and transformers' logits of the export equal the trained Megatron model's.
"""

from __future__ import annotations

import glob
from pathlib import Path

import pytest
import torch

from tests.hf_fixtures import build_hf_model, hf_logits, logits_worker, megatron_logits
from vespo_megatron.models.hf import auto_bridge_class
from vespo_megatron.runtime.local_workers import run_local_workers

auto_bridge_class()  # imported once here (about 10 s), inherited by the forked workers

pytestmark = pytest.mark.slow
TOKENS = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
TP2_SP = ["parallel.tp=2", "parallel.sequence_parallel=true"]
LAYOUTS = {  # world size -> family -> layouts run in one launch
    2: {
        "qwen3": [[], TP2_SP, ["parallel.pp=2"]],
        "llama": [[], TP2_SP, ["parallel.pp=2"]],
        "qwen3_moe": [[], ["parallel.ep=2"], ["parallel.pp=2"]],
    },
    4: {"qwen3_moe": [TP2_SP + ["parallel.ep=2"]]},
}
CASES = [(world, family) for world, families in LAYOUTS.items() for family in families]


def _base(hf_dir: Path, world: int) -> list[str]:
    return [f"model.hf_path={hf_dir}", "model.max_seq_length=16", "train.micro_batch_size=2",
            f"train.global_batch_size={2 * world}", "logging.tensorboard=false", "logging.progress_bar=false"]


@pytest.mark.parametrize("world,family", CASES, ids=[f"{f}-world{w}" for w, f in CASES])
def test_imported_logits_equal_transformers(tmp_path, world, family):
    hf_dir = build_hf_model(tmp_path / family, family)
    expected = hf_logits(hf_dir, TOKENS)
    layouts = LAYOUTS[world][family]
    results = run_local_workers(logits_worker, world, [(_base(hf_dir, world) + lay, TOKENS) for lay in layouts],
                                timeout_s=600)
    for index, layout in enumerate(layouts):
        got = [rank_out[index] for rank_out in results if rank_out[index] is not None]
        assert got, f"no last-stage logits for {layout}"
        for logits in got:
            err = (logits - expected).abs().max().item()
            assert err < 1e-5, f"{family} {layout or 'tp1'}: max |megatron - transformers| = {err}"


def _import_worker(rank, world, hf_dir, ckpt, overrides):
    from vespo_megatron.hf_commands import import_hf

    import_hf(hf_dir, ckpt, None, overrides)


def _export_worker(rank, world, ckpt, out, shard_bytes):
    from vespo_megatron.hf_commands import export_hf

    export_hf(ckpt, out, [], max_shard_bytes=shard_bytes)


def _tensors(folder) -> dict:
    from safetensors.torch import load_file

    out = {}
    for file in sorted(glob.glob(f"{folder}/*.safetensors")):
        out.update(load_file(file))
    return out


def test_import_then_export_is_bit_exact(tmp_path):
    import transformers

    hf_dir = build_hf_model(tmp_path / "src", "qwen3_moe", with_tokenizer=True)
    ckpt, out = tmp_path / "ckpt", tmp_path / "out"
    run_local_workers(_import_worker, 4, str(hf_dir), str(ckpt), _base(hf_dir, 4)[1:] + TP2_SP + ["parallel.ep=2"],
                      timeout_s=600)
    run_local_workers(_export_worker, 1, str(ckpt), str(out), 40_000, timeout_s=600)  # several shards + index
    source, exported = _tensors(hf_dir), _tensors(out)
    assert set(exported) == set(source)
    for name, tensor in source.items():
        assert exported[name].dtype == tensor.dtype and torch.equal(exported[name], tensor), name
    assert (out / "model.safetensors.index.json").is_file()
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()
    model = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    assert type(model).__name__ == "Qwen3MoeForCausalLM"
    transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)


def _train_worker(rank, world, overrides):
    from vespo_megatron.rl.loop import run
    from vespo_megatron.run_config import load_run_config

    trainer = run(load_run_config(None, overrides))
    context = trainer.context
    return {"logits": megatron_logits(context.engine, TOKENS), "history": trainer.state.history,
            "eos": context.tokenizer.stop_ids, "kind": type(context.tokenizer).__name__}


def test_train_from_hf_then_export_reloads_in_transformers(tmp_path):
    hf_dir = build_hf_model(tmp_path / "src", "qwen3", with_tokenizer=True)
    ckpt = tmp_path / "ckpt"
    overrides = [
        f"model.hf_path={hf_dir}", "model.max_seq_length=48", *TP2_SP,
        "rollout.prompts_per_step=2", "rollout.group_size=2", "rollout.max_new_tokens=4",
        "train.micro_batch_size=2", "train.global_batch_size=4", "train.steps=2", "rl.sft_warmup_steps=1",
        "task.options={max_operand: 5, seed: 3}", "task.chat_template=true", "optimizer.lr=1e-2",
        f"logging.run_dir={tmp_path / 'run'}", "logging.tensorboard=false", "logging.progress_bar=false",
        f"checkpoint.dir={ckpt}", "checkpoint.export_hf_every=2",
    ]
    results = run_local_workers(_train_worker, 2, overrides, timeout_s=600)
    assert results[0]["kind"] == "HFTokenizer" and len(results[0]["eos"]) == 2
    exported = ckpt / "hf" / "step_00000002"
    assert (exported / "config.json").is_file()
    before, after = _tensors(hf_dir), _tensors(exported)
    assert any(not torch.equal(before[k], after[k]) for k in before), "training left every weight unchanged"
    expected = hf_logits(exported, TOKENS)
    for rank_result in results:
        err = (rank_result["logits"] - expected).abs().max().item()
        assert err < 1e-5, f"exported model's logits differ from the trained Megatron model's by {err}"


def test_train_resumes_from_an_import_hf_checkpoint(tmp_path):
    hf_dir = build_hf_model(tmp_path / "src", "llama", with_tokenizer=True)
    ckpt = tmp_path / "ckpt"
    common = ["model.max_seq_length=16", "train.micro_batch_size=2", "train.global_batch_size=2",
              "logging.tensorboard=false", "logging.progress_bar=false", f"logging.run_dir={tmp_path / 'run'}",
              "parallel.pp=2"]
    run_local_workers(_import_worker, 2, str(hf_dir), str(ckpt), common, timeout_s=600)
    assert (ckpt / "step_00000000").is_dir() and (ckpt / "hf_config" / "tokenizer.json").is_file()
    # The train config points at the checkpoint's own HF metadata (no weights there): the weights can only
    # come from the resumed checkpoint, and with train.steps=0 they are exactly the imported ones.
    resume = [f"model.hf_path={ckpt / 'hf_config'}", f"checkpoint.dir={ckpt}", "train.steps=0", *common]
    results = run_local_workers(_train_worker, 2, resume, timeout_s=600)
    expected = hf_logits(hf_dir, TOKENS)
    got = [r["logits"] for r in results if r["logits"] is not None]
    assert len(got) == 1 and (got[0] - expected).abs().max().item() < 1e-5


LLAMA3_SCALING = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192}  # Llama 3.2's values


def test_llama3_rope_scaling_logits_equal_transformers_past_the_original_context(tmp_path):
    """Llama 3.1/3.2 RoPE scaling through Megatron-Core's own llama3 scaling: one sequence of 8200 positions
    (past the original 8192) at TP1 and TP2+SP; the same weights without the scaling give other logits (so the
    comparison can fail)."""
    long = 8200
    hf_dir = build_hf_model(tmp_path / "llama3", "llama", max_position_embeddings=16384,
                            rope_scaling=dict(LLAMA3_SCALING))
    plain_dir = build_hf_model(tmp_path / "plain", "llama", max_position_embeddings=16384)
    tokens = torch.randint(0, 96, (1, long), generator=torch.Generator().manual_seed(1))
    expected = hf_logits(hf_dir, tokens)
    assert (hf_logits(plain_dir, tokens) - expected).abs().max().item() > 1e-4  # 10x the tolerance below
    base = [f"model.hf_path={hf_dir}", f"model.max_seq_length={long}", "train.micro_batch_size=1",
            "train.global_batch_size=2", "logging.tensorboard=false", "logging.progress_bar=false",
            "loss.chunk_size=1024"]
    layouts = [[], TP2_SP]
    results = run_local_workers(logits_worker, 2, [(base + lay, tokens) for lay in layouts], timeout_s=900)
    errors = []
    for index in range(len(layouts)):
        got = [rank_out[index] for rank_out in results if rank_out[index] is not None]
        errors.append(max((logits - expected).abs().max().item() for logits in got))
    assert errors[0] < 1e-5 and errors[1] < 1e-5, errors
