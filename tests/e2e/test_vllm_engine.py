"""rollout.engine=vllm against real vLLM servers (the CPU build that ``bash launch/setup_env.sh vllm`` installs).

Two servers are started once for the module over a tiny Qwen3 with head size 32 (the CPU attention's
smallest); every test that uses them pushes its own trainer's weights first.

- a trainer under TP2 pushes weights the HF folder never had: the servers' greedy tokens and per-token
  log-probs equal the trainer's own forward on those tokens within 1e-5 (MoE models are refused with CPU servers:
  the CPU build's in-place reload fails on its fused-MoE kernel tensors, found by running the EP2 push);
- three RL steps on the engine: after each push the served log-probs of fixed tokens equal the trainer's,
  the sampler's log-probs equal the trainer's as each rollout enters training, and the losses equal those
  of a colocated run that trains on the same tokens with loss.behaviour=recompute (lag 0);
- an async run with rl.max_staleness=2 trains every step index once with staleness <= 2, and a run resumed
  from a checkpoint taken with steps in flight trains the same steps with the same rewards and losses;
- a killed server's rows go to the other (same tokens: one seed per row); with none left the error names them;
- bad configs fail before any process group with one-line errors naming the key.

Skipped, with the reason, when the engine is not installed; the bad-config tests need no engine.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch

from tests.e2e.rl_fixtures import write_jsonl
from tests.hf_fixtures import build_hf_model, megatron_logits
from vespo_megatron.config import ConfigError, config_from_dict, load_config, load_config_data, validate
from vespo_megatron.models.hf import resolve_hf_model
from vespo_megatron.run_config import load_run_config
from vespo_megatron.config.rl import VllmConfig
from vespo_megatron.runtime.local_workers import run_local_workers

REPO = Path(__file__).resolve().parents[2]
OVERLAY = REPO / ".vllm" / "site"
ENGINE_MISSING = not (OVERLAY / "vllm" / "__init__.py").is_file()
needs_engine = pytest.mark.skipif(ENGINE_MISSING, reason=f"the vLLM CPU engine is not installed in {OVERLAY}; "
                                                         "run `bash launch/setup_env.sh vllm`")
HEAD32 = dict(hidden_size=64, num_attention_heads=2, num_key_value_heads=2, head_dim=32, vocab_size=92)
"""Head size 32 (the CPU attention's smallest), two KV heads (TP2 splits them); the vocabulary is the tiny
tokenizer's own 92 tokens."""
FIXED = [[2, 17, 33, 41, 5, 60, 71, 12, 9, 88, 3, 24]]
TOL = 1e-5
REWARD = "tests.e2e.bad_rewards:response_length"


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    return build_hf_model(tmp_path_factory.mktemp("vllm") / "qwen3", "qwen3", with_tokenizer=True, **HEAD32)


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    """Arithmetic prompts scored by response length: an untrained model's rewards differ within a group."""
    return write_jsonl(tmp_path_factory.mktemp("prompts") / "prompts.jsonl",
                       [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(4) for b in range(4)])


@pytest.fixture(scope="module")
def servers(hf_dir, tmp_path_factory):
    from vespo_megatron.rollout.vllm.servers import LocalServers

    if ENGINE_MISSING:
        pytest.skip(f"the vLLM CPU engine is not installed in {OVERLAY}; run `bash launch/setup_env.sh vllm`")
    started = LocalServers.start(VllmConfig(env_path=str(OVERLAY), servers=2, kv_cache_bytes=64 * 1024**2,
                                            startup_timeout_s=900), str(hf_dir), 49,
                                 tmp_path_factory.mktemp("vllm-logs"))
    yield started
    started.stop()


def _common(hf_dir: Path, run_dir: Path, urls: list[str], prompts: Path) -> list[str]:
    return [f"model.hf_path={hf_dir}", "task.name=jsonl", f"task.options={{path: {prompts}, reward_fn: '{REWARD}'}}",
            "model.max_seq_length=48", "rollout.engine=vllm",
            f"rollout.vllm.urls=[{','.join(urls)}]", "rollout.prompts_per_step=2", "rollout.group_size=4",
            "rollout.max_new_tokens=6", "train.micro_batch_size=4", "train.global_batch_size=8",
            "optimizer.lr=3e-2", "logging.tensorboard=false",
            "logging.progress_bar=false", f"logging.run_dir={run_dir}", "checkpoint.dir=null"]


def _token_logprobs(engine, tokens: list[list[int]]) -> torch.Tensor | None:
    """The trainer's log-prob of each of ``tokens[:, 1:]`` (teacher forced), on the last stage."""
    batch = torch.tensor(tokens)
    logits = megatron_logits(engine, batch)
    if logits is None:
        return None
    return torch.log_softmax(logits.double(), -1)[:, :-1].gather(-1, batch[:, 1:, None])[..., 0]


def _served_logprobs(client, tokens: list[list[int]]) -> torch.Tensor:
    return torch.tensor([client.prompt_logprobs(row)[0] for row in tokens], dtype=torch.float64)


# ------------------------------------------------------------------- (a) push from TP2, greedy + log-probs


def _push_worker(rank, world, overrides):
    from vespo_megatron.rl.loop import build_trainer
    from vespo_megatron.rollout.vllm.client import SamplingSettings

    trainer = build_trainer(load_run_config(None, overrides))
    engine, served = trainer.context.engine, trainer.served
    with torch.no_grad():  # weights the HF folder never had; replicated parameters stay equal over TP
        for index, (name, param) in enumerate(sorted(engine.chunks[0].named_parameters())):
            noise = torch.randn(param.shape, generator=torch.Generator().manual_seed(index))
            param.add_(0.2 * noise)
    report = served.push()
    # even prompt lengths: prompt + 10 tokens is what the TP2 trainer's forward splits over its ranks (SP)
    prompts = [[2, 7, 19, 30], [2, 44], [2, 80, 81, 82, 83, 5]]  # ids below the vocabulary of 92
    out = {"bytes": report.bytes, "tokens": None}
    if served.client is not None:
        done = served.client.complete_all(prompts, SamplingSettings(max_tokens=10, temperature=0.0), [0, 1, 2])
        out["tokens"] = [p + c.tokens for p, c in zip(prompts, done)]
        out["served"] = [c.logprobs for c in done]
    full = run_local_broadcast(out["tokens"])
    out["trainer"] = [_token_logprobs(engine, [row]) for row in full]
    out["argmax"] = [None if (lg := megatron_logits(engine, torch.tensor([row]))) is None else lg.argmax(-1)[0]
                     for row in full]
    served.close()
    return out


def run_local_broadcast(obj):
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _assert_push_matches(results: list[dict]) -> None:
    """Every trainer rank's forward on the served tokens: log-probs within TOL, greedy tokens its argmax."""
    first = results[0]
    assert first["bytes"] > 0
    for rank_result in results:
        for row, tokens in enumerate(first["tokens"]):
            prompt_len = len(tokens) - len(first["served"][row])
            trainer = rank_result["trainer"][row][0, prompt_len - 1:]
            served = torch.tensor(first["served"][row], dtype=torch.float64)
            err = (trainer - served).abs().max().item()
            assert err < TOL, f"row {row}: served log-probs differ from the trainer's by {err}"
            greedy = rank_result["argmax"][row][prompt_len - 1:-1].tolist()
            assert greedy == tokens[prompt_len:], f"row {row}: served greedy tokens are not the trainer's argmax"


@needs_engine
def test_push_from_tp2_gives_the_trainers_greedy_tokens_and_logprobs(hf_dir, servers, prompts, tmp_path):
    overrides = _common(hf_dir, tmp_path / "run", servers.urls[:1], prompts) + ["parallel.tp=2",
                                                                       "parallel.sequence_parallel=true"]
    _assert_push_matches(run_local_workers(_push_worker, 2, overrides, timeout_s=900))


# ------------------------------------------------------------------- (b) three steps, weights and losses


def _three_steps_worker(rank, world, overrides):
    from vespo_megatron.rl.loop import build_trainer
    from vespo_megatron.rl.step import run_step

    trainer = build_trainer(load_run_config(None, overrides))
    context, state, served = trainer.context, trainer.state, trainer.served
    taken, steps = [], []
    original_take = served.take

    def spy(loop_state):  # what the trainer received from the servers, for the colocated replay below
        fields = original_take(loop_state)
        taken.append(fields)
        return fields

    served.take = spy
    served.push()
    served.issue(state, steps_done=0)
    for _ in range(3):
        metrics = run_step(context, state, served=served)
        state.step += 1
        steps.append({"metrics": metrics, "pushed": served.pushed_version,
                      "served": _served_logprobs(served.client, FIXED),
                      "trainer": _token_logprobs(context.engine, FIXED)})
    served.close()
    return {"steps": steps, "taken": taken}


def _replay_worker(rank, world, overrides):
    from vespo_megatron.rl.loop import run

    trainer = run(load_run_config(None, overrides))
    return trainer.state.history


def _jsonl_rows(taken: list[dict]) -> list[dict]:
    rows = []
    for fields in taken:
        for row in range(fields["sequences"].shape[0]):
            start, length = int(fields["prompt_lengths"][row]), int(fields["response_lengths"][row])
            rows.append({"prompt_tokens": fields["sequences"][row, :start].tolist(),
                         "response_tokens": fields["sequences"][row, start:start + length].tolist(),
                         "sampler_logprobs": fields["sampler_logprobs"][row, start:start + length].tolist(),
                         "reward": float(fields["rewards"][row])})
    return rows


@needs_engine
def test_three_steps_follow_the_trainer_and_match_the_colocated_loss(hf_dir, servers, prompts, tmp_path):
    overrides = _common(hf_dir, tmp_path / "run", servers.urls, prompts) + ["train.steps=3", "rl.sync_every=1",
                                                                            "rl.lookahead=0"]
    result = run_local_workers(_three_steps_worker, 1, overrides, timeout_s=900)[0]
    for step, record in enumerate(result["steps"]):
        metrics = record["metrics"]
        assert record["pushed"] == step + 1, "a push after every update"
        assert metrics["sync/bytes"] > 0 and metrics["staleness/policy_lag"] == 0
        err = (record["served"] - record["trainer"][0]).abs().max().item()
        assert err < TOL, f"step {step}: the servers' weights differ from the trainer's (log-probs by {err})"
        assert metrics["mismatch/seq_abs_log_ratio_max"] < TOL * 8, metrics  # a sum over <= 6 tokens
    assert [int(f["index"]) for f in result["taken"]] == [0, 1, 2]
    assert [int(f["version"]) for f in result["taken"]] == [0, 1, 2]
    # The same tokens trained by the colocated loop, mu recomputed by the trainer: the same losses.
    jsonl = write_jsonl(tmp_path / "served.jsonl", _jsonl_rows(result["taken"]))
    replay = [o for o in overrides if not o.startswith(("rollout.engine", "rollout.vllm", "logging.run_dir"))]
    replay += ["rollout.source=jsonl", f"rollout.jsonl_path={jsonl}", "loss.behaviour=recompute",
               f"logging.run_dir={tmp_path / 'replay'}"]
    run_local_workers(_replay_worker, 1, replay, timeout_s=900)
    colocated = [json.loads(line) for line in (tmp_path / "replay" / "metrics.jsonl").read_text().splitlines()]
    for step, record in enumerate(result["steps"]):
        served_loss, colocated_loss = record["metrics"]["loss/value"], colocated[step]["loss/value"]
        # mu comes from another engine: its sequence log-probs differ from the trainer's by up to the mismatch bound
        # above (8 x TOL), and the loss moves with log W through phi' * A * S / tokens, of order one here
        assert abs(served_loss - colocated_loss) < TOL * 8, f"step {step}: {served_loss} vs colocated {colocated_loss}"
        assert record["metrics"]["reward/mean"] == pytest.approx(colocated[step]["reward/mean"])


# ------------------------------------------------------------------------- (c) async, staleness, resume


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


@needs_engine
def test_async_run_keeps_the_bound_and_resumes_with_steps_in_flight(hf_dir, servers, prompts, tmp_path):
    ckpt = tmp_path / "ckpt"
    overrides = _common(hf_dir, tmp_path / "run", servers.urls, prompts) + [
        "train.steps=4", "rl.max_staleness=2", "rl.sync_every=1", f"checkpoint.dir={ckpt}",
        "checkpoint.save_every=2"]
    config = load_run_config(None, overrides)
    assert config.rl.lookahead_steps == 2
    run_local_workers(_replay_worker, 1, overrides, timeout_s=900)
    records = _metrics(tmp_path / "run")
    assert [int(r["rl/step_index"]) for r in records] == [0, 1, 2, 3], "every step index trained once"
    assert max(r["staleness/max"] for r in records) <= 2
    assert max(r["staleness/policy_lag"] for r in records) > 0, "the servers never ran ahead of the trainer"
    assert sum(r["staleness/dropped_rollouts"] for r in records) == 0
    # Resume from the step-2 checkpoint, taken with steps 2 and 3 already issued to the servers.
    import shutil

    shutil.rmtree(ckpt / "step_00000004")
    resumed_overrides = [o for o in overrides if not o.startswith("logging.run_dir")]
    resumed_overrides.append(f"logging.run_dir={tmp_path / 'resumed'}")
    run_local_workers(_replay_worker, 1, resumed_overrides, timeout_s=900)
    resumed = _metrics(tmp_path / "resumed")
    assert [int(r["rl/step_index"]) for r in resumed] == [2, 3]
    for before, after in zip(records[2:], resumed):
        assert after["reward/mean"] == before["reward/mean"]
        assert after["staleness/policy_lag"] == before["staleness/policy_lag"]
        assert abs(after["loss/value"] - before["loss/value"]) < TOL


# ----------------------------------------------------------------------------- (e) bad configs, one line


def _config_error(overrides: list[str], environment: bool = False) -> str:
    """The one-line error of ``overrides``: from validation of the resolved config (no engine needed), or with
    ``environment`` from ``load_run_config``'s probes of the engine's install and URLs."""
    with pytest.raises(ConfigError) as caught:
        if environment:
            load_run_config(None, overrides)
        else:
            data = load_config_data(None, overrides)
            validate(resolve_hf_model(config_from_dict(data), given_keys=data.get("model") or {}), 1)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_bad_vllm_configs_fail_before_any_process_group(tmp_path):
    head16 = build_hf_model(tmp_path / "head16", "qwen3", hidden_size=32, num_attention_heads=2,
                            num_key_value_heads=1, head_dim=16)
    head32 = build_hf_model(tmp_path / "head32", "qwen3", **HEAD32)
    base = ["rollout.engine=vllm", "model.max_seq_length=48", f"rollout.vllm.env_path={OVERLAY}"]
    message = _config_error(base + [f"model.hf_path={head16}"])
    assert "head size 16" in message and "rollout.vllm.device" in message
    message = _config_error(base + [f"model.hf_path={head32}", f"rollout.vllm.env_path={tmp_path / 'none'}"],
                            environment=True)
    assert message.startswith("rollout.vllm.env_path=") and "setup_env.sh vllm" in message
    from vespo_megatron.rollout.vllm.servers import free_port

    url = f"http://127.0.0.1:{free_port()}"
    message = _config_error(base + [f"model.hf_path={head32}", f"rollout.vllm.urls=[{url}]"], environment=True)
    assert message.startswith(f"rollout.vllm.urls[0]='{url}' is unreachable")
    message = _config_error(base + [f"model.hf_path={head32}", "loss.behaviour=recompute"])
    assert "loss.behaviour=sampler" in message
    moe32 = build_hf_model(tmp_path / "moe32", "qwen3_moe", **HEAD32)
    message = _config_error(base + [f"model.hf_path={moe32}"])
    assert "MoE model" in message and "rollout.engine=kv" in message and "rollout.vllm.device=gpu" in message
    message = _config_error(["rollout.engine=vllm"])
    assert "model.hf_path" in message
    with pytest.raises(ConfigError, match="rollout.vllm.servers=0"):
        load_config(None, ["rollout.vllm.servers=0"])


# --------------------------------------------------------------- (d) a server dies: failover, then none


@needs_engine
def test_killed_server_rows_go_to_the_other_then_none_left_names_them(hf_dir, servers):
    from vespo_megatron.rollout.vllm.client import NoServerLeft, SamplingSettings, VllmClient

    client = VllmClient(servers.urls, timeout_s=120)
    client.reload_weights(str(hf_dir))  # both servers hold the same weights
    prompts = [[2, 10 + row, 20, 30] for row in range(6)]
    settings = SamplingSettings(max_tokens=6, temperature=1.0)
    seeds = list(range(100, 106))
    before = client.complete_all(prompts, settings, seeds)
    assert {c.server for c in before} == set(servers.urls), "rows are spread over both servers"
    dead, survivor = servers.servers[1], servers.servers[0]
    os.killpg(dead.process.pid, signal.SIGKILL)
    dead.process.wait()
    after = client.complete_all(prompts, settings, seeds)
    assert {c.server for c in after} == {survivor.url}
    assert [c.tokens for c in after] == [c.tokens for c in before], "a row's seed gives it the same tokens anywhere"
    assert list(client.failed) == [dead.url]
    os.killpg(survivor.process.pid, signal.SIGKILL)
    survivor.process.wait()
    with pytest.raises(NoServerLeft) as caught:
        client.complete_all(prompts, settings, seeds)
    assert dead.url in str(caught.value) and survivor.url in str(caught.value)
