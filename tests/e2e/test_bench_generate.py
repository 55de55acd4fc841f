"""``vespo-megatron bench generate`` at a tiny size: every figure present, the KV-cache size by formula, and the
transformers model holding our weights (same prompt logits, same greedy tokens); the HF reference, exported
by Megatron-Bridge, also reproduces the Megatron logits of tiny Qwen3 and Llama models read from HF folders."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.hf_fixtures import build_hf_model
from vespo_megatron.cli import main as cli_main
from vespo_megatron.runtime.local_workers import run_local_workers

pytestmark = pytest.mark.slow

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny_dense_cpu.yaml"


def test_bench_generate_json(capsys):
    code = cli_main(["bench", "generate", str(CONFIG), "--lengths", "24,40", "--batch", "3", "--prompt-length", "8",
                     "--recompute-steps", "2", "--threads", "1", "--json"])
    assert code == 0
    rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["results"]
    assert [r["length"] for r in rows] == [24, 40]
    for r in rows:
        for key in ("kv_tokens_per_s", "recompute_tokens_per_s", "hf_tokens_per_s", "kv_tokens_per_cpu_s",
                    "recompute_tokens_per_cpu_s", "hf_tokens_per_cpu_s", "peak_rss_mib"):
            assert math.isfinite(r[key]) and r[key] > 0, key
        # 2 (K, V) x 2 layers x 3 sequences x (L - 1) cached positions x 2 KV heads x head dim 16 x 4 bytes
        assert r["kv_cache_bytes"] == 2 * 2 * 3 * (r["length"] - 1) * 2 * 16 * 4
        assert r["hf_max_logit_diff"] < 1e-5
        assert r["hf_same_tokens"] == 1.0


def test_bench_generate_rejects_lengths_not_above_the_prompt():
    with pytest.raises(SystemExit):
        cli_main(["bench", "generate", "--lengths", "8", "--prompt-length", "8"])


def test_bench_generate_engine_rows(capsys):
    """``--engines megatron,hf``: one row per engine; each engine's own log-probs of its greedy tokens equal the
    trainer's forward on them, and the transformers copy decodes the same tokens."""
    code = cli_main(["bench", "generate", str(CONFIG), "--lengths", "24", "--batch", "3", "--prompt-length", "8",
                     "--threads", "1", "--engines", "megatron,hf", "--json"])
    assert code == 0
    rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["results"]
    assert [(r["engine"], r["length"], r["batch"]) for r in rows] == [("megatron", 24, 3), ("hf", 24, 3)]
    for r in rows:
        assert math.isfinite(r["tokens_per_s"]) and r["tokens_per_s"] > 0
        assert r["max_logprob_diff_vs_trainer"] < 1e-5, r
        assert r["same_tokens_as_megatron"] == 1.0


def test_bench_generate_rejects_unknown_engines():
    with pytest.raises(SystemExit):
        cli_main(["bench", "generate", "--engines", "megatron,sglang"])


def _reference_worker(rank, world, hf_dir):
    from vespo_megatron.bench.generate import RESET, hf_reference, prompt_logits
    from vespo_megatron.run_config import load_run_config
    from vespo_megatron.runtime.distributed import initialize
    from vespo_megatron.train.engine import build_engine

    config = load_run_config(None, RESET + [f"model.hf_path={hf_dir}", "model.max_seq_length=16"])
    engine = build_engine(config, initialize(config), vocab_size=config.model.vocab_size)
    hf = hf_reference(engine, config)
    ids = torch.randint(3, config.model.vocab_size, (3, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (hf(ids).logits[:, -1].float() - prompt_logits(engine, ids)).abs().max()
    return {"kind": type(hf).__name__, "max_logit_diff": float(diff)}


@pytest.mark.parametrize("family,kind", [("qwen3", "Qwen3ForCausalLM"), ("llama", "LlamaForCausalLM")])
def test_hf_reference_from_the_bridge_reproduces_megatron_logits(tmp_path, family, kind):
    hf_dir = build_hf_model(tmp_path / family, family)
    out = run_local_workers(_reference_worker, 1, str(hf_dir), timeout_s=600)[0]
    assert out["kind"] == kind
    assert out["max_logit_diff"] < 1e-5
