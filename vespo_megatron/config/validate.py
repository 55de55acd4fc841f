"""Cross-section checks that run before any process group exists."""

from __future__ import annotations

import math

from vespo_megatron.config.errors import divisors, require
from vespo_megatron.config.model import ModelConfig
from vespo_megatron.config.parallel import ParallelConfig
from vespo_megatron.config.rl import VLLM_CPU_HEAD_SIZES, worst_staleness
from vespo_megatron.config.run import Config


def validate(config: Config, world_size: int) -> None:
    """Reject every layout that would fail or hang once process groups exist.

    Runs in pure Python (no torch.distributed); raises :class:`ConfigError` naming fields and a fix.
    """
    require(world_size >= 1, f"world_size={world_size} must be >= 1")
    _validate_disaggregated(config, world_size)
    trainers = config.parallel.trainer_world(world_size)  # the layout checks are the trainer's
    _validate_grid(config.parallel, trainers)
    _validate_model_split(config.parallel, config.model)
    _validate_experts(config.parallel, config.model, trainers)
    _validate_batch(config, world_size)
    _validate_rl(config, world_size)
    _validate_hf(config)
    _validate_vllm(config)


def _validate_disaggregated(config: Config, world_size: int) -> None:
    """Disaggregated mode: the rank split, the rollout layout and the staleness schedule."""
    par, rl, rollout_tp = config.parallel, config.rl, config.rollout.parallel.tp
    if config.rl.max_staleness is not None and not par.rollout_ranks:
        lag = rl.async_lag * rl.num_minibatches
        require(lag <= rl.max_staleness,
                 f"rl.async_lag={rl.async_lag} trains every rollout {lag} updates late (num_minibatches="
                 f"{rl.num_minibatches}), beyond rl.max_staleness={rl.max_staleness}: every rollout would be "
                 f"dropped; raise max_staleness to >= {lag} or lower async_lag")
    require(not config.rollout.partial or par.rollout_ranks > 0,
             "rollout.partial=true needs rollout workers (parallel.rollout_ranks > 0); set rollout.partial=false")
    if not par.rollout_ranks:
        return
    workers = par.rollout_ranks
    require(workers < world_size,
             f"parallel.rollout_ranks={workers} leaves no trainer rank in a world of {world_size}; "
             f"use rollout_ranks <= {world_size - 1}")
    require(workers % rollout_tp == 0,
             f"parallel.rollout_ranks={workers} is not divisible by rollout.parallel.tp={rollout_tp}; "
             "each rollout replica holds tp ranks")
    model = config.model
    require(model.num_attention_heads % rollout_tp == 0 and model.query_groups % rollout_tp == 0
             and model.ffn_size % rollout_tp == 0,
             f"rollout.parallel.tp={rollout_tp} does not divide model.num_attention_heads="
             f"{model.num_attention_heads}, num_query_groups={model.query_groups} and ffn_hidden_size="
             f"{model.ffn_size}; use a rollout tp in {divisors(math.gcd(model.num_attention_heads, model.query_groups))}")
    if model.is_moe:
        expert_ffn = model.moe_ffn_hidden_size or model.ffn_size
        require(expert_ffn % rollout_tp == 0,
                 f"rollout.parallel.tp={rollout_tp} does not divide model.moe_ffn_hidden_size={expert_ffn}")
        # the workers' MoE layers run with sequence parallelism and expert tp = tp
        require(rollout_tp == 1 or config.seq_length % rollout_tp == 0,
                 f"train.seq_length={config.seq_length} must be divisible by rollout.parallel.tp={rollout_tp} "
                 "(MoE rollout workers with tp > 1 use sequence parallelism)")
        require(rollout_tp == 1 or not model.add_bias_linear,
                 f"rollout.parallel.tp={rollout_tp} > 1 splits the experts, which needs model.add_bias_linear=false")
    require(config.rollout.source == "model",
             "parallel.rollout_ranks > 0 needs rollout.source=model (external JSONL rollouts need no workers); "
             "set parallel.rollout_ranks=0")
    require(not config.rollout.routing_replay,
             "rollout.routing_replay=true is not available with parallel.rollout_ranks > 0 (the workers' experts "
             "are laid out differently); set routing_replay=false")
    _require_sync_within_bound(rl)
    require(rl.async_lag == 0,
             f"rl.async_lag={rl.async_lag} simulates asynchrony in colocated mode; with parallel.rollout_ranks > 0 "
             "use rl.lookahead / rl.max_staleness instead and set async_lag=0")
    loss = config.loss
    if config.rollout.partial:
        require(loss.behaviour == "sampler",
                 f"rollout.partial=true samples a sequence's tokens with several policy versions, so mu must be the "
                 f"sampler's per-token log-probs; set loss.behaviour=sampler (not {loss.behaviour})")
        require(config.rollout.engine == "kv" and rollout_tp == 1,
                 f"rollout.partial=true needs rollout.engine=kv and rollout.parallel.tp=1 (a worker replica of one "
                 f"rank applies a push between two of its own decode steps); got engine={config.rollout.engine}, "
                 f"tp={rollout_tp}")
    lag = rl.max_admitted_lag
    require(loss.behaviour != "recompute" or lag == 0 or loss.correction.mode != "none" or loss.allow_uncorrected_lag,
             f"loss.behaviour=recompute with rollouts up to {lag} versions behind the trainer (rl.lookahead="
             f"{rl.lookahead_steps}, rl.max_staleness={rl.max_staleness}) and loss.correction.mode=none makes log W 0 "
             "whatever the lag; use loss.behaviour=sampler, set loss.correction.mode=tis|mis, or opt in with "
             "loss.allow_uncorrected_lag=true")


def _require_sync_within_bound(rl) -> None:
    """Pushes every rl.sync_every updates must keep even lookahead-0 rollouts within rl.max_staleness."""
    worst = worst_staleness(0, rl.num_minibatches, rl.sync_every)
    require(rl.max_staleness is None or worst <= rl.max_staleness,
            f"rl.sync_every={rl.sync_every} with rl.num_minibatches={rl.num_minibatches} lets rollouts reach "
            f"staleness {worst} > rl.max_staleness={rl.max_staleness} even without lookahead; lower sync_every "
            f"or raise max_staleness")


def _validate_grid(par: ParallelConfig, world_size: int) -> None:
    dense = par.model_parallel
    require(
        world_size % dense == 0,
        f"world size {world_size} is not divisible by parallel.tp*pp*cp = {par.tp}*{par.pp}*{par.cp} = {dense}; "
        f"use a world size that is a multiple of {dense} or change tp/pp/cp",
    )
    expert = par.expert_tp * par.ep * par.pp
    require(
        world_size % expert == 0,
        f"world size {world_size} is not divisible by parallel.etp*ep*pp = {par.expert_tp}*{par.ep}*{par.pp} "
        f"= {expert} (the expert grid); change ep or etp",
    )
    require(
        par.vpp is None or par.pp > 1,
        f"parallel.vpp={par.vpp} needs parallel.pp > 1 (got pp={par.pp}); set vpp=null or raise pp",
    )
    require(
        not (par.vpp and par.pp == 2 and par.batch_p2p_comm),
        "parallel.batch_p2p_comm=true with pp=2 and vpp set mismatches messages (prev and next stage are the "
        "same peer); set parallel.batch_p2p_comm=false or null",
    )


def _validate_model_split(par: ParallelConfig, model: ModelConfig) -> None:
    require(
        model.num_attention_heads % par.tp == 0,
        f"model.num_attention_heads={model.num_attention_heads} is not divisible by parallel.tp={par.tp}; "
        f"use tp in {divisors(model.num_attention_heads)}",
    )
    require(
        model.query_groups % par.tp == 0,
        f"model.num_query_groups={model.query_groups} is not divisible by parallel.tp={par.tp}; "
        f"use tp in {divisors(model.query_groups)} or raise num_query_groups",
    )
    require(
        model.ffn_size % par.tp == 0,
        f"model.ffn_hidden_size={model.ffn_size} is not divisible by parallel.tp={par.tp}",
    )
    stages = par.pp * (par.vpp or 1)
    require(
        model.num_layers % stages == 0,
        f"model.num_layers={model.num_layers} is not divisible by parallel.pp*vpp = {par.pp}*{par.vpp or 1} = "
        f"{stages}; use num_layers a multiple of {stages} or pp*vpp in {divisors(model.num_layers)}",
    )
    require(
        model.num_layers // stages >= 1,
        f"model.num_layers={model.num_layers} leaves an empty pipeline chunk with pp*vpp={stages}",
    )
    if par.cp > 1:
        require(
            model.max_seq_length % (2 * par.cp) == 0,
            f"model.max_seq_length={model.max_seq_length} must be divisible by 2*parallel.cp={2 * par.cp} "
            "(context parallelism splits every sequence into 2*cp chunks)",
        )
    if par.sequence_parallel:
        require(
            model.max_seq_length % (par.tp * par.cp * 2 if par.cp > 1 else par.tp) == 0,
            f"model.max_seq_length={model.max_seq_length} must be divisible by parallel.tp={par.tp}"
            + (f" * 2*cp={2 * par.cp}" if par.cp > 1 else "")
            + " with sequence_parallel=true",
        )


def _validate_experts(par: ParallelConfig, model: ModelConfig, world_size: int) -> None:
    if not model.is_moe:
        require(
            par.ep == 1 and par.etp in (None, par.tp),
            f"parallel.ep={par.ep} / parallel.etp={par.etp} are set but model.num_experts is null (a dense model); "
            "set ep=1 and etp=null, or set model.num_experts",
        )
        return
    require(
        model.num_experts % par.ep == 0,
        f"parallel.ep={par.ep} does not divide model.num_experts={model.num_experts}; "
        f"use ep in {divisors(model.num_experts)}",
    )
    require(
        par.tp == 1 or par.sequence_parallel,
        f"MoE with parallel.tp={par.tp} requires parallel.sequence_parallel=true (Megatron's MoE layer needs it)",
    )
    require(
        par.expert_tp == 1 or not model.add_bias_linear,
        f"parallel.etp={par.expert_tp} > 1 requires model.add_bias_linear=false",
    )
    require(
        not (par.ep == 1 and par.expert_tp != par.tp),
        f"parallel.ep=1 with parallel.etp={par.expert_tp} != tp={par.tp} leaves replicated expert weights "
        "un-reduced across tensor-parallel ranks (wrong gradients); set etp=null (= tp) or raise ep",
    )
    expert_ffn = model.moe_ffn_hidden_size or model.ffn_size
    require(
        expert_ffn % par.expert_tp == 0,
        f"model.moe_ffn_hidden_size={expert_ffn} is not divisible by parallel.etp={par.expert_tp}",
    )
    shared = model.moe_shared_expert_intermediate_size
    require(
        shared is None or shared % par.tp == 0,
        f"model.moe_shared_expert_intermediate_size={shared} is not divisible by parallel.tp={par.tp} "
        "(the shared expert is tensor-parallel like a dense MLP)",
    )


def _validate_batch(config: Config, world_size: int) -> None:
    dp = config.parallel.dp(world_size)
    train = config.train
    per_update = train.micro_batch_size * dp
    require(
        train.global_batch_size % per_update == 0,
        f"train.global_batch_size={train.global_batch_size} is not divisible by train.micro_batch_size*dp = "
        f"{train.micro_batch_size}*{dp} = {per_update}; use a multiple of {per_update}",
    )
    num_micro = train.global_batch_size // per_update
    vpp = config.parallel.vpp
    if vpp:
        require(
            num_micro % config.parallel.pp == 0,
            f"the interleaved schedule needs micro-batches per update ({num_micro} = global_batch_size / "
            f"(micro_batch_size*dp)) to be a multiple of parallel.pp={config.parallel.pp}",
        )
    require(
        config.seq_length <= config.model.max_seq_length,
        f"train.seq_length={config.seq_length} exceeds model.max_seq_length={config.model.max_seq_length}",
    )
    # The batches are padded to train.seq_length, which the model.max_seq_length checks do not cover.
    par, seq = config.parallel, config.seq_length
    if par.cp > 1:
        require(
            seq % (2 * par.cp) == 0,
            f"train.seq_length={seq} must be divisible by 2*parallel.cp={2 * par.cp} "
            "(context parallelism splits every sequence into 2*cp chunks)",
        )
    if par.sequence_parallel:
        require(
            seq % (par.tp * par.cp) == 0,
            f"train.seq_length={seq} must be divisible by parallel.tp*cp={par.tp * par.cp} with "
            "sequence_parallel=true (each tensor-parallel rank holds seq_length/(tp*cp) tokens)",
        )


def _validate_rl(config: Config, world_size: int) -> None:
    dp = config.parallel.dp(world_size)
    rollout, rl, micro = config.rollout, config.rl, config.train.micro_batch_size
    require(
        rollout.prompts_per_step % dp == 0,
        f"rollout.prompts_per_step={rollout.prompts_per_step} is not divisible by the data-parallel size {dp}; "
        "every data-parallel rank samples its own share of prompts",
    )
    sequences = rollout.prompts_per_step * rollout.group_size // dp
    if config.train.max_tokens_per_microbatch is not None:
        _validate_token_budget(config, sequences)
        _validate_rl_losses(config)
        return
    per_update = rl.num_minibatches * micro
    require(
        sequences % per_update == 0,
        f"each data-parallel rank holds rollout.prompts_per_step*group_size/dp = {sequences} sequences per step, "
        f"not divisible by rl.num_minibatches*train.micro_batch_size = {rl.num_minibatches}*{micro}; "
        "change prompts_per_step, group_size, num_minibatches or micro_batch_size",
    )
    if config.parallel.vpp:
        micro_per_update = sequences // per_update
        require(
            micro_per_update % config.parallel.pp == 0,
            f"the interleaved schedule needs micro-batches per RL update ({micro_per_update}) to be a multiple of "
            f"parallel.pp={config.parallel.pp}",
        )
    _validate_rl_losses(config)


def _validate_rl_losses(config: Config) -> None:
    rollout, rl = config.rollout, config.rl
    require(
        not (config.loss.name == "gspo" and config.parallel.cp > 1),
        "loss.name=gspo needs each sequence's mean log-ratio on one rank; it does not support parallel.cp > 1 "
        "(use vespo, grpo, sapo or cispo with context parallelism)",
    )
    require(
        config.loss.correction.level == "sequence" or config.loss.name != "vespo",
        "loss.correction.level=token is not available with loss.name=vespo, whose sequence-parallel path only "
        "has per-sequence sums; use loss.correction.level=sequence",
    )
    require(
        not (rl.kl_coef > 0 and config.loss.name != "vespo" and config.parallel.cp > 1),
        f"rl.kl_coef > 0 with loss.name={config.loss.name} needs whole sequences per rank; it does not support "
        "parallel.cp > 1 (VESPO's sequence-parallel path does)",
    )
    require(
        not (rollout.routing_replay and config.loss.behaviour == "sampler"),
        "rollout.routing_replay=true records experts in the recompute pass, which loss.behaviour=sampler skips; "
        "set loss.behaviour=recompute or routing_replay=false",
    )
    require(
        not rollout.routing_replay or config.model.is_moe,
        "rollout.routing_replay=true needs an MoE model (model.num_experts is null)",
    )


def _validate_token_budget(config: Config, sequences: int) -> None:
    """RL micro-batches by token budget (train.max_tokens_per_microbatch), optionally packed."""
    train, par, rl = config.train, config.parallel, config.rl
    require(
        sequences % rl.num_minibatches == 0,
        f"each data-parallel rank holds rollout.prompts_per_step*group_size/dp = {sequences} sequences per step, "
        f"not divisible by rl.num_minibatches={rl.num_minibatches}; change prompts_per_step, group_size or "
        "num_minibatches",
    )
    require(
        not par.vpp or (sequences // rl.num_minibatches) % par.pp == 0,
        f"train.max_tokens_per_microbatch with parallel.vpp={par.vpp}: the interleaved schedule runs a multiple of "
        f"parallel.pp={par.pp} micro-batches, so each rank's {sequences // rl.num_minibatches} sequences per "
        "mini-batch (rollout.prompts_per_step*group_size/dp/rl.num_minibatches) must be a multiple of it too "
        "(no micro-batch without a sequence); change prompts_per_step, group_size or num_minibatches",
    )
    require(
        not par.vpp or train.pack_sequences,
        f"train.max_tokens_per_microbatch with parallel.vpp={par.vpp} needs train.pack_sequences=true: the "
        "interleaved schedule sends activations of one shape, which packed rows padded to the budget have and "
        "padded token-budget micro-batches do not; set pack_sequences=true (or parallel.vpp=null)",
    )
    require(
        not (train.pack_sequences and par.cp > 1),
        f"train.pack_sequences=true does not support parallel.cp={par.cp} yet (packed rows are not split into "
        "per-sequence 2*cp chunks); set pack_sequences=false (token-budget rows padded per micro-batch work with CP)",
    )
    require(
        not config.rollout.routing_replay,
        "rollout.routing_replay=true records experts per padded row of train.micro_batch_size sequences; set "
        "train.max_tokens_per_microbatch=null or routing_replay=false",
    )
    require(
        not (par.pp > 1 and not par.vpp and config.model.is_moe and config.model.moe_token_dispatcher == "allgather"),
        "train.max_tokens_per_microbatch with parallel.pp > 1 sends micro-batches of varying shape "
        "(variable_seq_lengths), which Megatron's allgather token dispatcher refuses; set "
        "model.moe_token_dispatcher=alltoall",
    )


def _validate_hf(config: Config) -> None:
    every = config.checkpoint.export_hf_every
    require(
        not every or (config.model.hf_path and config.checkpoint.dir),
        f"checkpoint.export_hf_every={every} needs model.hf_path (the HF config to export against) and "
        f"checkpoint.dir; got hf_path={config.model.hf_path!r}, dir={config.checkpoint.dir!r}",
    )
    require(
        not config.task.chat_template or config.model.hf_path or config.task.tokenizer,
        "task.chat_template=true needs a Hugging Face tokenizer with a chat template: set model.hf_path (a folder "
        "with tokenizer files) or task.tokenizer (an HF tokenizer folder)",
    )


def _validate_vllm(config: Config) -> None:
    """rollout.engine=vllm: what the servers need (the engine's install and the URLs are probed by
    :func:`vespo_megatron.run_config.load_run_config`, which may touch the network)."""
    if config.rollout.engine != "vllm":
        return
    rollout, rl, settings, model = config.rollout, config.rl, config.rollout.vllm, config.model
    require(bool(model.hf_path),
             "rollout.engine=vllm needs model.hf_path (the servers load that HF folder, then take the trainer's "
             "weights); set model.hf_path or use rollout.engine=kv")
    require(not config.parallel.rollout_ranks,
             f"rollout.engine=vllm generates on vLLM servers, not on rollout ranks; set parallel.rollout_ranks=0 "
             f"(got {config.parallel.rollout_ranks})")
    require(rollout.source == "model", "rollout.engine=vllm needs rollout.source=model; set rollout.engine=kv "
                                        "for external JSONL rollouts")
    require(config.loss.behaviour == "sampler",
             f"rollout.engine=vllm takes mu from the servers' log-probs; set loss.behaviour=sampler (or leave it "
             f"null), not {config.loss.behaviour}")
    require(not rollout.partial, "rollout.partial=true is not available with rollout.engine=vllm (the push waits "
                                  "for the requests in flight); set rollout.partial=false")
    require(not rollout.routing_replay,
             "rollout.routing_replay=true is not available with rollout.engine=vllm (its servers do not return "
             "the routed experts); set routing_replay=false")
    require(not rollout.stop, f"rollout.stop={rollout.stop!r} is not available with rollout.engine=vllm (the "
                               "servers run without a tokenizer; stop token ids still end responses); set stop=[]")
    require(rollout.sampler_dtype == "fp32",
             "rollout.sampler_dtype applies to the Megatron decoders; with rollout.engine=vllm set "
             "rollout.vllm.dtype instead and leave sampler_dtype=fp32")
    require(rl.async_lag == 0, f"rl.async_lag={rl.async_lag} simulates asynchrony with the Megatron decoders; with "
                                "rollout.engine=vllm use rl.max_staleness / rl.lookahead and set async_lag=0")
    _require_sync_within_bound(rl)
    needed = config.seq_length + 1
    require(settings.max_model_len is None or settings.max_model_len >= needed,
             f"rollout.vllm.max_model_len={settings.max_model_len} is shorter than train.seq_length + 1 = {needed} "
             f"(a prompt plus its response); raise it or leave it null")
    require(settings.device != "cpu" or not model.is_moe,
            f"rollout.engine=vllm with an MoE model (model.num_experts={model.num_experts}) and "
            "rollout.vllm.device=cpu: the CPU build of vLLM cannot reload expert weights in place (its layerwise "
            "reload fails on the CPU fused-MoE kernel's processed tensors), so the first weight push would fail; "
            "use rollout.engine=kv for MoE on CPU, or rollout.vllm.device=gpu")
    head_dim = model.kv_channels or model.hidden_size // model.num_attention_heads
    require(settings.device != "cpu" or head_dim in VLLM_CPU_HEAD_SIZES,
            f"model head size {head_dim} (model.kv_channels, or hidden_size/num_attention_heads) is not one the "
            f"CPU vLLM engine runs {VLLM_CPU_HEAD_SIZES}; use such a model, or rollout.vllm.device=gpu for GPU "
            "servers")
