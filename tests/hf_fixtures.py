"""Tiny Hugging Face models and a tiny HF tokenizer, built offline inside the tests.

Each builder writes a folder that looks like a hub download (``config.json``, ``model.safetensors``,
``generation_config.json`` and, when asked, tokenizer files) from a transformers config with random
weights, so the conversion tests need no network and no stored fixtures.
"""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 100  # not a multiple of 8: Megatron pads the vocabulary, the bridge pads and trims it
TOKENIZER_TEXT = ["1+2=3", "4+5=9", "12+7=19", "What is 3+4? 7", "hello world", "<|user|> <|assistant|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def _common(**overrides) -> dict:
    base = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                head_dim=8, max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=False)
    base.update(overrides)
    return base


def hf_config(family: str, **overrides):
    """A tiny transformers config of ``family`` ("qwen3", "qwen3_moe" or "llama")."""
    import transformers

    if family == "qwen3":
        return transformers.Qwen3Config(**_common(**{"intermediate_size": 64, **overrides}))
    if family == "qwen3_moe":
        return transformers.Qwen3MoeConfig(**_common(
            intermediate_size=64, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2,
            norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], **overrides))
    if family == "llama":
        # Tied input/output embeddings as in Llama 3.2 1B/3B (under PP the last stage holds a copy).
        return transformers.LlamaConfig(**_common(**{"intermediate_size": 64, "rope_theta": 500000.0,
                                                     "tie_word_embeddings": True, **overrides}))
    raise ValueError(f"unknown family {family!r}")


def build_tokenizer(directory: Path):
    """A WordPiece-free word-level tokenizer trained on a few strings, saved as PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "</s>", "<|end|>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - 8, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet()[:60])
    tok.train_from_iterator(TOKENIZER_TEXT, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(directory)
    return fast


def build_hf_model(directory, family: str = "qwen3", seed: int = 0, with_tokenizer: bool = False,
                   dtype: torch.dtype = torch.float32, **overrides) -> Path:
    """Write a random tiny ``family`` model (and optionally a tokenizer) to ``directory``; return it."""
    import transformers

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    eos = {}
    if with_tokenizer:
        tok = build_tokenizer(directory)
        eos = dict(bos_token_id=tok.bos_token_id, eos_token_id=[tok.eos_token_id, tok.convert_tokens_to_ids("<|end|>")],
                   pad_token_id=tok.pad_token_id)
    config = hf_config(family, **eos, **overrides)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # norms away from 1 so a missed norm weight shows in the logits
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    model.to(dtype).save_pretrained(directory)
    return directory


def hf_logits(directory, tokens: torch.Tensor) -> torch.Tensor:
    """transformers' fp32 logits ``[b, s, vocab]`` for ``tokens`` from the model in ``directory``."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(directory, local_files_only=True, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return model(input_ids=tokens).logits.float()


def _logits_head(ctx, vocab: int):
    """A loss head that reports the full-vocabulary logits ``[b, s, vocab]`` (gathered over TP)."""
    import torch.distributed as dist

    def head(output, batch, model):
        shard = output.detach().float().contiguous()
        if ctx.tp > 1:
            parts = [torch.empty_like(shard) for _ in range(ctx.tp)]
            dist.all_gather(parts, shard, group=ctx.tp_group)
            shard = torch.cat(parts, dim=-1)
        logits = shard[..., :vocab]
        return torch.zeros(()), torch.ones((), dtype=torch.int), {"tok/logits": logits, "tok/shape": torch.tensor(logits.shape)}

    return head


def megatron_logits(engine, tokens: torch.Tensor) -> torch.Tensor | None:
    """The engine's logits for ``tokens`` ``[b, s]`` through Megatron's forward-only schedule.

    Returns ``[b, s, vocab]`` on the last pipeline stage, None on the others.
    """
    from vespo_megatron.train.batches import causal_lm_batch, shard_micro_batch

    ctx, vocab = engine.ctx, engine.config.model.vocab_size
    seqs = torch.cat([tokens, tokens[:, :1]], dim=1)  # one extra column: the batch builder shifts by one
    batch = shard_micro_batch(causal_lm_batch(seqs, torch.ones_like(seqs)), ctx)
    batch.pop("labels")  # without labels the model returns logits instead of the token losses
    reports = engine.forward_only([batch], _logits_head(ctx, vocab), emit_hidden_states=False)
    if not reports:
        return None
    shape = [int(v) for v in reports[0]["tok/shape"]]
    return reports[0]["tok/logits"].view(shape)


def logits_worker(rank, world, runs):
    """For each ``(overrides, tokens)``: build the engine from the HF folder, return its logits (or None)."""
    from vespo_megatron.run_config import load_run_config
    from vespo_megatron.runtime.distributed import initialize
    from vespo_megatron.train.engine import build_engine

    out = []
    for overrides, tokens in runs:
        config = load_run_config(None, overrides)
        engine = build_engine(config, initialize(config), vocab_size=config.model.vocab_size)
        out.append(megatron_logits(engine, tokens))
    return out
