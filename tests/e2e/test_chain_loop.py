"""The `chain` task through the RL loop: warm-up on worked solutions, held-out evaluation, RL steps (one worker).

What is checked: ``configs/tiny_chain_cpu.yaml`` runs end to end (shrunk to 2-operand problems); the supervised
warm-up trains on the worked solutions, so greedy responses to held-out prompts are well-formed chains; the
evaluation reads the task's eval split.
"""

from __future__ import annotations

from tests.e2e.rl_fixtures import REPO
from vespo_megatron.runtime.local_workers import run_local_workers

CHAIN_CONFIG = REPO / "configs" / "tiny_chain_cpu.yaml"

SMALL = [
    "parallel.tp=1",
    "model.max_seq_length=32",
    "task.options={min_operands: 2, max_operands: 2, max_operand: 9, format_reward: 0.5, seed: 1}",
    "rollout.prompts_per_step=4",
    "rollout.group_size=4",
    "rollout.max_new_tokens=16",
    "rl.num_minibatches=2",
    "train.micro_batch_size=8",
    "train.global_batch_size=32",
    "rl.sft_warmup_steps=60",
    "rl.sft_lr=3e-3",
    "rl.eval_prompts=16",
    "train.steps=2",
    "logging.tensorboard=false",
    "logging.progress_bar=false",
]


def _chain_worker(rank, world_size, overrides_):
    """Run the loop, then score greedy responses to 32 held-out prompts with the format credit of 0.5."""
    from dataclasses import replace

    import torch

    from vespo_megatron.config import load_config
    from vespo_megatron.rl.loop import run
    from vespo_megatron.rl.sampling import score
    from vespo_megatron.rollout.common import DecodeRequest
    from vespo_megatron.rollout.recompute import generate

    trainer = run(load_config(CHAIN_CONFIG, overrides_))
    context = trainer.context
    cfg, tok = context.config, context.tokenizer
    held_out = context.task.held_out(10_000)
    samples = held_out.prompts().next_batch(32)
    generated = generate(context.engine, [[tok.bos_id] + tok.encode(s.prompt) for s in samples],
                         DecodeRequest(replace(cfg.rollout), seq_length=cfg.seq_length, eos_id=tok.eos_id,
                                       pad_id=tok.pad_id, generator=torch.Generator().manual_seed(0), greedy=True,
                                       vocab_size=tok.vocab_size))
    rewards = score(context.task, tok, generated, samples)
    return {"history": trainer.state.history, "eval_before": trainer.eval_before, "eval_after": trainer.eval_after,
            "held_out_split": held_out.split, "rewards": rewards.tolist(),
            "response_lengths": generated.response_lengths.tolist()}


def test_chain_task_warm_up_and_rl_steps(tmp_path):
    overrides_ = SMALL + [f"logging.run_dir={tmp_path / 'run'}"]
    result = run_local_workers(_chain_worker, 1, overrides_, timeout_s=900)[0]
    assert len(result["history"]) == 2
    assert 0.0 <= result["eval_before"] <= 1.0 and 0.0 <= result["eval_after"] <= 1.0
    assert result["held_out_split"] == "eval"
    rewards = result["rewards"]
    # reward 0.5 = well-formed chain with a wrong answer, 1.0 = right answer; a model warmed up on bare answers
    # (or not at all) writes no chain and scores 0 on almost every prompt
    well_formed = sum(r > 0 for r in rewards) / len(rewards)
    assert well_formed >= 0.75, f"greedy held-out rewards {rewards}"
    # a 2-operand chain is 8-10 characters plus eos: the responses are chains, not bare answers
    lengths = result["response_lengths"]
    assert sum(lengths) / len(lengths) >= 8, lengths
