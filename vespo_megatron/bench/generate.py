"""``bench generate``: rollout tokens per second of the KV-cache decoder, the recompute decoder and transformers.

For each context length L one fresh worker process (one rank, no parallelism, ``--threads`` CPU threads)
builds the config's model with ``model.max_seq_length = L`` and decodes ``--batch`` prompts of
``--prompt-length`` random tokens up to the full context (``L - prompt_length`` new tokens each; the
stop token is disabled so every sequence runs to the end), greedily, three ways:

* ``kv``: :func:`vespo_megatron.rollout.decode.decode` (prefill, then one token per step over
  megatron-core's static KV cache);
* ``recompute``: :func:`vespo_megatron.rollout.recompute.generate`, which runs the whole padded context
  every step. Its step costs the same at every position (it always runs all L positions), so
  ``--recompute-steps`` steps give its rate without decoding the whole context (0 skips it: null);
* ``hf``: ``transformers``' ``generate`` (KV cache) on the transformers model of the same family holding the
  same weights, exported from the Megatron model by Megatron-Bridge (any family the bridge converts, in the
  model's dtype: ``model.hf_path``'s family, or for a model built from the YAML shape Llama, Qwen3 with QK
  norm, Qwen3-MoE with experts; null when the bridge has none). ``hf_max_logit_diff`` (prompt logits of the
  two models) and ``hf_same_tokens`` (greedy continuations equal) show the export is faithful.

With ``--engines megatron,vllm,hf`` the same prompts and lengths give one row per engine instead,
``{"engine", "length", "batch", "tokens_per_s", "max_logprob_diff_vs_trainer", ...}``: ``megatron`` is the KV
decoder above, ``hf`` the transformers reference, ``vllm`` a local vLLM server (``rollout.vllm`` settings; needs
``model.hf_path`` and the engine of ``bash launch/setup_env.sh vllm``) that first receives the trainer's weights
through the same push as ``rollout.engine=vllm``. ``max_logprob_diff_vs_trainer`` is the largest gap between an
engine's own per-token log-probs of its greedy tokens and the trainer's forward on those tokens;
``same_tokens_as_megatron`` the share of greedy tokens equal to the KV decoder's. The vLLM server's start-up
and the push are timed apart (``startup_seconds``, ``push_seconds``), not in ``tokens_per_s``.

Figures per length: tokens per second (new tokens of all sequences / wall seconds) and per CPU second of
the worker process (``time.process_time``: on a shared machine far less disturbed by other load than wall
time), the KV-cache bytes the decoder allocated (``2 x layers x batch x cached positions x kv_heads x head_dim x bytes``, with
``cached positions = L - 1``: the last token is sampled, never fed), and the worker's peak resident set
right after the KV decode (model, cache and activations; the later passes are not included).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import time
from pathlib import Path

import torch
from megatron.core.inference.contexts import StaticInferenceContext

from vespo_megatron.rollout.forward import PipelineForward, inference_mode, last_token_logits
from vespo_megatron.run_config import load_run_config
from vespo_megatron.runtime.local_workers import run_local_workers

MIB = 1024**2
DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny_dense_cpu.yaml"
RESET = ["parallel.tp=1", "parallel.sequence_parallel=false", "parallel.pp=1", "parallel.vpp=null",
         "parallel.cp=1", "parallel.ep=1", "parallel.etp=null", "train.seq_length=null"]  # fmt: skip


class _Timer:
    """Wall and process CPU seconds of a block (CPU time is far less disturbed by other load)."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu

    def rates(self, name: str, tokens: int) -> dict:
        return {f"{name}_tokens_per_s": tokens / self.wall, f"{name}_tokens_per_cpu_s": tokens / self.cpu,
                f"{name}_seconds": self.wall}


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MIB  # ru_maxrss is KiB on Linux


def _family_config(model):
    """A default transformers config of the family whose layer layout ``model`` (our YAML shape) has."""
    import transformers

    if model.is_moe:
        return transformers.Qwen3MoeConfig(architectures=["Qwen3MoeForCausalLM"])
    if model.qk_layernorm:
        return transformers.Qwen3Config(architectures=["Qwen3ForCausalLM"])
    return transformers.LlamaConfig(architectures=["LlamaForCausalLM"])


def reference_hf_config(engine, config):
    """The transformers config of the HF reference: ``model.hf_path``'s, or, for a model built from the YAML
    shape, the one Megatron-Bridge's own Megatron->HF config mapping gives for the layout's family; either way
    with Megatron's padded vocabulary (the decoders here pick over all of it). None when the bridge has no
    family for it."""
    from vespo_megatron.models.hf import auto_bridge_class, hf_config

    auto_bridge = auto_bridge_class()
    m = config.model
    if m.hf_path is not None:
        hf = hf_config(m.hf_path)
    else:
        family = _family_config(m)
        if not auto_bridge.supports(family):
            return None
        # The bridge's provider type: our TransformerConfig plus the GPTModel arguments it holds.
        from megatron.bridge.models.gpt_provider import GPTModelProvider  # loadable once the bridge is (above)

        tconfig = engine.built.tconfig
        provider = GPTModelProvider(
            **{f.name: getattr(tconfig, f.name) for f in dataclasses.fields(tconfig) if f.init},
            vocab_size=engine.built.padded_vocab_size, seq_length=m.max_seq_length, rotary_base=m.rotary_base,
            share_embeddings_and_output_weights=m.tie_embeddings)
        fields = auto_bridge.from_hf_config(family)._model_bridge.megatron_to_hf_config(provider)
        hf = type(family)(**{k: v for k, v in fields.items() if k not in ("model_type", "torch_dtype")})
    if not auto_bridge.supports(hf):
        return None
    hf.vocab_size = engine.built.padded_vocab_size
    hf.bos_token_id = hf.eos_token_id = None
    hf.pad_token_id = 0
    return hf


def hf_reference(engine, config):
    """transformers' model of the engine's family holding the engine's weights (one rank), or None.

    The weights come from Megatron-Bridge's export (the bridge owns every name mapping and reshape: fused QKV,
    gate/up, expert stacks), in the model's own dtype.
    """
    import transformers

    from vespo_megatron.models.gpt import unwrap
    from vespo_megatron.models.hf import auto_bridge_class

    hf_config = reference_hf_config(engine, config)
    if hf_config is None:
        return None
    dtype = engine.built.tconfig.params_dtype
    bridge = auto_bridge_class().from_hf_config(hf_config)
    model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=dtype).eval()
    weights = dict(bridge.export_hf_weights([unwrap(chunk) for chunk in engine.chunks], cpu=True,
                                            show_progress=False, weight_dtype=dtype))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = {"lm_head.weight"} if hf_config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"the bridge's export does not fill {type(model).__name__}: missing {sorted(missing)}, "
                           f"unexpected {sorted(unexpected)}")
    model.tie_weights()
    return model


def _measure(rank, world, config_path, overrides, length, batch, prompt_length, recompute_steps, with_hf):
    from vespo_megatron.rollout.common import DecodeRequest
    from vespo_megatron.rollout.decode import decode
    from vespo_megatron.rollout.recompute import generate
    from vespo_megatron.runtime.distributed import initialize
    from vespo_megatron.tokenizer import load_tokenizer
    from vespo_megatron.train.engine import build_engine

    config = load_run_config(config_path, RESET + list(overrides) + [f"model.max_seq_length={length}"])
    vocab = config.model.vocab_size or load_tokenizer(config.task.tokenizer).vocab_size
    engine = build_engine(config, initialize(config), vocab_size=vocab)
    new_tokens = length - prompt_length
    prompts = torch.randint(3, vocab, (batch, prompt_length), generator=torch.Generator().manual_seed(0)).tolist()
    # Greedy over the whole padded vocabulary, as transformers' generate does.
    request = DecodeRequest(dataclasses.replace(config.rollout, max_new_tokens=new_tokens), seq_length=length,
                            eos_id=-1, pad_id=0, generator=torch.Generator().manual_seed(1), greedy=True)
    with _Timer() as timer:
        kv = decode(engine, prompts, request)
    row = {"length": length, "batch": batch, "prompt_length": prompt_length, "new_tokens": new_tokens,
           "kv_cache_bytes": kv.kv_cache_bytes, "peak_rss_mib": _peak_rss_mib()}
    row.update(timer.rates("kv", batch * new_tokens))
    row.update(recompute_tokens_per_s=None, recompute_tokens_per_cpu_s=None)
    if recompute_steps > 0:
        steps = min(recompute_steps, new_tokens)
        with _Timer() as timer:
            generate(engine, prompts, dataclasses.replace(
                request, settings=dataclasses.replace(request.settings, max_new_tokens=steps),
                generator=torch.Generator().manual_seed(1)))
        row.update(timer.rates("recompute", batch * steps))
    row.update(hf_tokens_per_s=None, hf_tokens_per_cpu_s=None)
    hf = hf_reference(engine, config) if with_hf else None
    if hf is not None:
        device = engine.ctx.device
        hf = hf.to(device)
        ids = torch.tensor(prompts, device=device)
        with torch.no_grad():
            ours = prompt_logits(engine, ids)
            row["hf_max_logit_diff"] = float((hf(ids).logits[:, -1].float() - ours).abs().max())
            with _Timer() as timer:
                out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                  min_new_tokens=new_tokens, do_sample=False, use_cache=True, pad_token_id=0).cpu()
            row.update(timer.rates("hf", batch * new_tokens))
        ours = kv.sequences[:, :length]
        row["hf_same_tokens"] = float((out[:, :length] == ours).float().mean())
    return row


def prompt_logits(engine, ids):
    """Our model's last-position logits of the prompts (the HF reference must reproduce them)."""
    with inference_mode(engine):
        context = StaticInferenceContext(ids.shape[0], ids.shape[1])
        positions = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
        return last_token_logits(PipelineForward(engine)(ids, positions, context), engine)


def trainer_token_logprobs(engine, sequences: torch.Tensor) -> torch.Tensor:
    """The trainer's log-prob of each of ``sequences[:, 1:]`` given the tokens before it (one rank), ``[b, s-1]``."""
    from vespo_megatron.models.gpt import unwrap

    ids = sequences.to(engine.ctx.device)
    with inference_mode(engine), torch.no_grad():
        context = StaticInferenceContext(ids.shape[0], ids.shape[1])
        positions = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0).expand_as(ids)
        hidden = PipelineForward(engine)(ids, positions, context)  # [s, b, h]
        logits = hidden.float() @ unwrap(engine.chunks[-1]).output_weight().float().t()
    logprobs = torch.log_softmax(logits.transpose(0, 1).double(), dim=-1)[:, :-1]
    return logprobs.gather(-1, ids[:, 1:, None])[..., 0].cpu()


def _engine_row(name: str, length: int, batch: int, prompt_length: int, tokens: int, timer: "_Timer",
                cpu_timed: bool) -> dict:
    return {"engine": name, "length": length, "batch": batch, "prompt_length": prompt_length,
            "new_tokens": length - prompt_length, "tokens_per_s": tokens / timer.wall,
            "tokens_per_cpu_s": tokens / timer.cpu if cpu_timed else None, "seconds": timer.wall}


def _logprob_gap(engine, sequences: torch.Tensor, own: torch.Tensor, prompt_length: int) -> float:
    """Largest |an engine's log-prob - the trainer's| over the response tokens of ``sequences``."""
    trainer = trainer_token_logprobs(engine, sequences)[:, prompt_length - 1:]
    return float((trainer - own.double()).abs().max())


def _vllm_rows(engine, config, prompts, length, batch, prompt_length, megatron_tokens) -> dict:
    """One local vLLM server with the trainer's weights: greedy rate and log-prob gap (start-up timed apart)."""
    from vespo_megatron.config import ConfigError
    from vespo_megatron.rollout.vllm.client import SamplingSettings, VllmClient
    from vespo_megatron.rollout.vllm.environment import check_engine_installed, check_head_size
    from vespo_megatron.rollout.vllm.servers import start_local_servers
    from vespo_megatron.rollout.vllm.sync import push_weights

    settings = dataclasses.replace(config.rollout.vllm, servers=1)
    if not config.model.hf_path:
        raise ConfigError("bench generate --engines ...vllm needs model.hf_path=DIR (the folder the server loads)")
    check_engine_installed(settings)
    check_head_size(config.model.kv_channels or config.model.hidden_size // config.model.num_attention_heads,
                    settings)
    new_tokens = length - prompt_length
    with _Timer() as startup:
        servers = start_local_servers(settings, config.model.hf_path, length, config.logging.run_dir)
    try:
        client = VllmClient(servers.urls, timeout_s=settings.request_timeout_s)
        push = push_weights(engine, config.model.hf_path, settings.sync_dir, settings.sync_bucket_mb, client)
        greedy = SamplingSettings(max_tokens=new_tokens, temperature=0.0)
        client.complete_all(prompts[:1], dataclasses.replace(greedy, max_tokens=2), [0])  # warm-up
        with _Timer() as timer:
            done = client.complete_all(prompts, greedy, list(range(len(prompts))))
    finally:
        servers.stop()
    row = _engine_row("vllm", length, batch, prompt_length, sum(len(c.tokens) for c in done), timer, cpu_timed=False)
    sequences = torch.tensor([p + c.tokens for p, c in zip(prompts, done)])
    own = torch.tensor([c.logprobs for c in done])
    row.update(max_logprob_diff_vs_trainer=_logprob_gap(engine, sequences, own, prompt_length),
               same_tokens_as_megatron=float((sequences[:, prompt_length:] == megatron_tokens).float().mean()),
               startup_seconds=startup.wall, push_seconds=push.seconds, push_bytes=push.bytes)
    return row


def _measure_engines(rank, world, config_path, overrides, length, batch, prompt_length, engines):
    """One row per engine in ``engines`` for context length ``length`` (one fresh worker process)."""
    from vespo_megatron.rollout.common import DecodeRequest
    from vespo_megatron.rollout.decode import decode
    from vespo_megatron.runtime.distributed import initialize
    from vespo_megatron.tokenizer import load_tokenizer
    from vespo_megatron.train.engine import build_engine

    config = load_run_config(config_path, RESET + list(overrides) + [f"model.max_seq_length={length}"])
    vocab = config.model.vocab_size or load_tokenizer(config.task.tokenizer).vocab_size
    engine = build_engine(config, initialize(config), vocab_size=vocab)
    new_tokens = length - prompt_length
    prompts = torch.randint(3, vocab, (batch, prompt_length), generator=torch.Generator().manual_seed(0)).tolist()
    settings = dataclasses.replace(config.rollout, max_new_tokens=new_tokens, temperature=1.0)
    with _Timer() as timer:  # greedy over the whole (padded) vocabulary, as the trainer's softmax and generate
        kv = decode(engine, prompts, DecodeRequest(settings, seq_length=length, eos_id=-1, pad_id=0,
                                                   generator=torch.Generator().manual_seed(1), greedy=True))
    megatron_tokens = kv.sequences[:, prompt_length:length]
    rows = []
    if "megatron" in engines:
        row = _engine_row("megatron", length, batch, prompt_length, batch * new_tokens, timer, cpu_timed=True)
        own = kv.sampler_logprobs[:, prompt_length:length]
        row.update(max_logprob_diff_vs_trainer=_logprob_gap(engine, kv.sequences[:, :length], own, prompt_length),
                   same_tokens_as_megatron=1.0, kv_cache_bytes=kv.kv_cache_bytes)
        rows.append(row)
    if "hf" in engines:
        hf = hf_reference(engine, config)
        if hf is None:
            rows.append({"engine": "hf", "length": length, "batch": batch, "tokens_per_s": None,
                         "max_logprob_diff_vs_trainer": None, "note": "no transformers model of this family in the bridge"})
        else:
            ids = torch.tensor(prompts)
            with torch.no_grad(), _Timer() as timer:
                out = hf.eval().generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                         min_new_tokens=new_tokens, do_sample=False, use_cache=True, pad_token_id=0,
                                         output_scores=True, return_dict_in_generate=True)
            tokens = out.sequences[:, prompt_length:]
            scores = torch.stack(out.scores, dim=1).double()  # the copy holds Megatron's padded vocabulary
            own = torch.log_softmax(scores, -1).gather(-1, tokens[..., None])[..., 0]
            row = _engine_row("hf", length, batch, prompt_length, batch * new_tokens, timer, cpu_timed=True)
            row.update(max_logprob_diff_vs_trainer=_logprob_gap(engine, out.sequences, own, prompt_length),
                       same_tokens_as_megatron=float((tokens == megatron_tokens).float().mean()))
            rows.append(row)
    if "vllm" in engines:
        rows.append(_vllm_rows(engine, config, prompts, length, batch, prompt_length, megatron_tokens))
    return rows


def format_engine_row(r: dict) -> str:
    """One ``--engines`` row as a line of text."""
    if r.get("tokens_per_s") is None:
        return f"{r['engine']:<9} L={r['length']:<6} B={r['batch']:<4} {r.get('note', 'not measured')}"
    gap = r["max_logprob_diff_vs_trainer"]
    return (f"{r['engine']:<9} L={r['length']:<6} B={r['batch']:<4} {r['tokens_per_s']:10.1f} tok/s  "
            f"max |logprob - trainer| {gap:.1e}  same tokens as megatron {r['same_tokens_as_megatron']:.3f}")



def format_row(r: dict) -> str:
    def rate(value):
        return "      null" if value is None else f"{value:10.1f}"

    extra = f"  hf logit diff {r['hf_max_logit_diff']:.1e}, same tokens {r['hf_same_tokens']:.3f}" \
        if "hf_max_logit_diff" in r else ""
    return (f"L={r['length']:<6} B={r['batch']:<4} kv {rate(r['kv_tokens_per_s'])} tok/s  recompute "
            f"{rate(r['recompute_tokens_per_s'])} tok/s  hf {rate(r['hf_tokens_per_s'])} tok/s  "
            f"(per CPU s: kv {rate(r['kv_tokens_per_cpu_s'])}, recompute {rate(r['recompute_tokens_per_cpu_s'])}, "
            f"hf {rate(r['hf_tokens_per_cpu_s'])})  "
            f"KV {r['kv_cache_bytes'] / MIB:8.2f} MiB  peak RSS {r['peak_rss_mib']:7.0f} MiB{extra}")


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="vespo-megatron bench generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("config", nargs="?", default=str(DEFAULT_CONFIG),
                        help="YAML config (default: the repository's configs/tiny_dense_cpu.yaml); run on one rank")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    parser.add_argument("--lengths", type=lambda t: [int(x) for x in t.split(",") if x], default=[128, 512, 2048],
                        help="comma-separated context lengths L (prompt + new tokens)")
    parser.add_argument("--batch", type=int, default=16, help="sequences decoded together")
    parser.add_argument("--prompt-length", type=int, default=32, help="tokens per prompt (must be < every L)")
    parser.add_argument("--recompute-steps", type=int, default=4,
                        help="steps timed for the recompute decoder (its step cost is position-independent); 0: skip")
    parser.add_argument("--no-hf", action="store_true", help="skip the transformers comparison")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of the worker")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds before a length's worker is killed")
    parser.add_argument("--json", action="store_true", help='print one JSON object {"results": [...]}')
    parser.add_argument("--engines", type=lambda t: [x for x in t.split(",") if x], default=None,
                        help="comma-separated engines among megatron,vllm,hf: one row per engine and length instead "
                             "(vllm needs model.hf_path and the engine of `bash launch/setup_env.sh vllm`)")
    args = parser.parse_intermixed_args(argv)
    unknown = sorted(set(args.engines or []) - {"megatron", "vllm", "hf"})
    if unknown or args.engines == []:
        parser.error(f"--engines {unknown or '(empty)'}: choose among megatron, vllm, hf")
    if args.batch < 1 or args.recompute_steps < 0 or args.prompt_length < 1:
        parser.error("--batch and --prompt-length must be >= 1, --recompute-steps >= 0")
    short = [length for length in args.lengths if length <= args.prompt_length]
    if short:
        parser.error(f"--lengths {short} must exceed --prompt-length={args.prompt_length}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import vespo_megatron.rollout.decode  # noqa: F401 - imported before forking: workers start warm
    import vespo_megatron.train.engine  # noqa: F401

    rows = []
    for length in args.lengths:
        if args.engines:
            found = run_local_workers(_measure_engines, 1, args.config, args.overrides, length, args.batch,
                                      args.prompt_length, args.engines, timeout_s=args.timeout,
                                      threads_per_worker=args.threads)[0]
            rows.extend(found)
            if not args.json:
                for row in found:
                    print(format_engine_row(row), flush=True)
            continue
        row = run_local_workers(_measure, 1, args.config, args.overrides, length, args.batch, args.prompt_length,
                                args.recompute_steps, not args.no_hf, timeout_s=args.timeout,
                                threads_per_worker=args.threads)[0]
        rows.append(row)
        if not args.json:
            print(format_row(row), flush=True)
    if args.json:
        print(json.dumps({"results": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
