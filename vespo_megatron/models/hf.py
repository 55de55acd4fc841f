"""Hugging Face models in and out through Megatron-Bridge: config, weights, export, tokenizer.

Our code chooses the bridge, feeds it our layout and checks the result; the bridge owns every weight-name
mapping and every reshape (fused QKV, gate/up, expert stacks, vocabulary padding, TP/PP/EP placement):

- :func:`resolve_model_config` derives the ``model`` section from the bridge's Megatron provider for
  ``model.hf_path`` (shapes are never copied by hand); a YAML key that contradicts it is a ConfigError.
  :func:`resolve_hf_model` applies it to a loaded run config (config loading itself reads no model files).
- :func:`load_hf_weights` fills the chunks built by :func:`vespo_megatron.models.gpt.build_model` (our
  layer spec, so CP attention, the SP norm and routing replay keep working) through the bridge's
  mapping, then checks that every parameter of this rank was written.
- :func:`export_hf` streams the bridge's HF tensors one by one into safetensors shards on rank 0 (no
  rank holds the whole model) and copies config, generation config and tokenizer files. The checkpoint
  side (the HF sidecar of a checkpoint root, export from a checkpoint) is
  :mod:`vespo_megatron.checkpoint.sidecar`.
- :mod:`.hf_tokenizer` puts the folder's transformers tokenizer behind our sentencepiece interface.

Nothing here reaches the hub: every transformers call passes ``local_files_only=True`` and a missing
file is an error naming it. docs/models.md describes the families, layouts and commands.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Optional

import torch

from vespo_megatron.config.errors import ConfigError

WEIGHTS_INDEX = "model.safetensors.index.json"
WEIGHTS_SINGLE = "model.safetensors"
_WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json", ".pt", ".pth")
DEFAULT_SHARD_BYTES = 2 * 1024**3

# Our ModelConfig field <- the Megatron TransformerConfig attribute the bridge's provider sets.
_DERIVED_FIELDS = {
    "num_layers": "num_layers", "hidden_size": "hidden_size", "ffn_hidden_size": "ffn_hidden_size",
    "num_attention_heads": "num_attention_heads", "num_query_groups": "num_query_groups",
    "kv_channels": "kv_channels", "vocab_size": "vocab_size", "normalization": "normalization",
    "norm_epsilon": "layernorm_epsilon", "swiglu": "gated_linear_unit",
    "position_embedding": "position_embedding_type", "rotary_base": "rotary_base",
    "tie_embeddings": "share_embeddings_and_output_weights", "add_bias_linear": "add_bias_linear",
    "qk_layernorm": "qk_layernorm", "num_experts": "num_moe_experts",
    # The bridge copies the embedding as is at TP1 and pads it only across TP ranks, so the padding
    # multiple must be its own (the largest power of two <= 128 dividing the vocabulary).
    "make_vocab_size_divisible_by": "make_vocab_size_divisible_by",
}  # fmt: skip
_DERIVED_MOE_FIELDS = {
    "moe_router_topk": "moe_router_topk", "moe_ffn_hidden_size": "moe_ffn_hidden_size",
    "moe_shared_expert_intermediate_size": "moe_shared_expert_intermediate_size",
}  # fmt: skip
# Provider settings our builder does not express: the value it always builds with.
_BUILDER_FIXED = {
    "add_qkv_bias": False, "rotary_percent": 1.0, "rotary_interleaved": False,
    "window_size": None, "seq_len_interpolation_factor": None, "layernorm_zero_centered_gamma": False,
    "apply_residual_connection_post_layernorm": False, "multi_latent_attention": False,
    "mtp_num_layers": None, "moe_router_pre_softmax": False, "moe_router_score_function": "softmax",
    "moe_router_topk_scaling_factor": None, "moe_shared_expert_gate": False, "moe_layer_freq": 1,
    "moe_router_enable_expert_bias": False, "moe_router_num_groups": None,
}  # fmt: skip


# ------------------------------------------------------------------------------------- the bridge


def auto_bridge_class():
    """``megatron.bridge.AutoBridge``, importable without Transformer Engine (runtime/compat.py)."""
    import megatron.core  # noqa: F401 - megatron.core settles its own TE checks before the bridge loads

    from vespo_megatron.runtime.compat import allow_bridge_without_transformer_engine

    allow_bridge_without_transformer_engine()
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    logging.disable(logging.INFO)  # its optional-kernel probes log tracebacks at INFO
    try:
        from megatron.bridge import AutoBridge
    finally:
        logging.disable(logging.NOTSET)
        # The bridge's import installs a root handler at INFO; keep the process's logging as it was.
        root.setLevel(level)
        root.handlers[:] = handlers
        logging.getLogger("megatron.bridge.utils.import_utils").setLevel(logging.WARNING)
    return AutoBridge


def require_hf_dir(hf_path, field: str = "model.hf_path") -> Path:
    """``hf_path`` as a Path; raises naming the missing folder or config.json."""
    path = Path(hf_path)
    if not path.is_dir():
        raise FileNotFoundError(f"{field}={str(path)!r} is not a directory; give a local HF folder "
                                "(config.json + safetensors), nothing is downloaded")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path / 'config.json'} does not exist; {field} must hold the model's config.json")
    return path


def weight_files(hf_path) -> list[Path]:
    """The safetensors files of ``hf_path`` (from the index when sharded); raises naming a missing one."""
    path = require_hf_dir(hf_path)
    index = path / WEIGHTS_INDEX
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [path / name for name in names]
    else:
        files = [path / WEIGHTS_SINGLE]
    for file in files:
        if not file.is_file():
            where = f" (listed in {index})" if index.is_file() else ""
            raise FileNotFoundError(f"weight file {file} does not exist{where}; copy the complete model folder")
    return files


def hf_config(hf_path):
    """The transformers config of ``hf_path`` (local files only)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(require_hf_dir(hf_path)), local_files_only=True)


def bridge_for(hf_path, with_weights: bool = False):
    """An AutoBridge for ``hf_path``; raises a ConfigError naming the architecture when unsupported."""
    auto_bridge = auto_bridge_class()
    path = require_hf_dir(hf_path)
    config = hf_config(path)
    try:
        supported = auto_bridge.supports(config) and auto_bridge.from_hf_config(config) is not None
    except (ValueError, NotImplementedError):
        supported = False
    if not supported:
        arch = getattr(config, "architectures", None)
        raise ConfigError(f"{path / 'config.json'}: architectures={arch} is not supported by Megatron-Bridge; "
                          "docs/models.md lists the families it converts")
    if not with_weights:
        return auto_bridge.from_hf_config(config)
    weight_files(path)
    return auto_bridge.from_hf_pretrained(str(path), local_files_only=True)


def provider_for(hf_path):
    """The bridge's Megatron model provider (a TransformerConfig) for the HF config, without weights."""
    return bridge_for(hf_path).to_megatron_provider(load_weights=False)


# ----------------------------------------------------------------------------------- model config


def _same(ours, theirs) -> bool:
    if isinstance(ours, (int, float)) and isinstance(theirs, (int, float)) and not isinstance(ours, bool):
        return float(ours) == float(theirs)
    return ours == theirs


# Megatron-Core's llama3 RoPE scaling (RotaryEmbedding._apply_scaling) fixes these three; the factor is free.
_LLAMA3_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def _llama3_rope_factor(provider, hf_path, where: str):
    """``model.rope_scaling_factor`` of an HF model: the llama3 factor, None without scaling; refuses the llama3
    variants Megatron-Core cannot express."""
    if not getattr(provider, "rope_scaling", False):
        return None
    import json

    hf_config = json.loads((Path(hf_path) / "config.json").read_text())
    scaling = hf_config.get("rope_scaling") or hf_config.get("rope_parameters") or {}  # transformers 4 / 5
    for key, value in _LLAMA3_FIXED.items():
        if float(scaling.get(key, value)) != value:
            raise ConfigError(f"{where}: rope_scaling {key}={scaling[key]} is not Megatron-Core's llama3 value "
                              f"{value}; only the factor may differ (Llama 3.1/3.2/3.3 use these values)")
    return float(provider.rope_scaling_factor)


def derived_model_fields(hf_path) -> dict:
    """``model`` fields implied by the HF config (via the bridge's provider); raises on features we lack."""
    import torch.nn.functional as F

    provider = provider_for(hf_path)
    where = f"{Path(hf_path) / 'config.json'}"
    for name, value in _BUILDER_FIXED.items():
        theirs = getattr(provider, name, value)
        if not _same(value, theirs):
            raise ConfigError(f"{where}: the model needs Megatron {name}={theirs!r}, which vespo_megatron's builder "
                              f"does not support (it builds {name}={value!r}); use a model without it")
    expected_act = F.silu if provider.gated_linear_unit else F.gelu
    if provider.activation_func is not expected_act:
        raise ConfigError(f"{where}: activation {provider.activation_func.__name__} is not supported (the builder "
                          f"uses {expected_act.__name__} with swiglu={provider.gated_linear_unit})")
    fields = {ours: getattr(provider, theirs) for ours, theirs in _DERIVED_FIELDS.items()}
    if fields["num_experts"] is not None:
        fields.update({ours: getattr(provider, theirs) for ours, theirs in _DERIVED_MOE_FIELDS.items()})
    fields["rope_scaling_factor"] = _llama3_rope_factor(provider, hf_path, where)
    rotary = float(fields["rotary_base"])
    if rotary != int(rotary):
        raise ConfigError(f"{where}: rope theta {rotary} is not an integer; model.rotary_base is an integer")
    fields["rotary_base"] = int(rotary)
    return fields


def resolve_model_config(model, given_keys) -> object:
    """``model`` with every HF-derived field set from ``model.hf_path``.

    ``given_keys`` are the ``model`` keys the user wrote (YAML or overrides); one whose value differs
    from the HF config is a ConfigError naming both values (a key written as null is left to the HF config).
    """
    derived = derived_model_fields(model.hf_path)
    for key in sorted(set(given_keys) & set(derived)):
        ours, theirs = getattr(model, key), derived[key]
        if ours is not None and not _same(ours, theirs):
            raise ConfigError(f"model.{key}={ours!r} contradicts {Path(model.hf_path) / 'config.json'}, which gives "
                              f"{theirs!r}; remove model.{key} (it is derived from model.hf_path) or fix it")
    return replace(model, **derived)


def resolve_hf_model(config, given_keys=()):
    """``config`` with its ``model`` section resolved from ``model.hf_path`` (unchanged without one).

    The step after :func:`vespo_megatron.config.load_config` for a run that names an HF folder
    (:func:`vespo_megatron.run_config.load_run_config` does both); ``given_keys`` are the ``model`` keys
    the user wrote, checked against the HF config as in :func:`resolve_model_config`.
    """
    if not config.model.hf_path:
        return config
    resolved = copy.copy(config)
    resolved.model = resolve_model_config(config.model, given_keys=set(given_keys))
    return resolved


# ------------------------------------------------------------------------------------------ weights


def _unwrapped(chunks) -> list:
    from vespo_megatron.models.gpt import unwrap

    return [unwrap(chunk) for chunk in chunks]


def load_hf_weights(hf_path, chunks) -> None:
    """Copy the weights of ``hf_path`` into this rank's model chunks through the bridge's mapping.

    Every parameter is set to NaN first; one still NaN afterwards was not written by the bridge and
    makes this raise with its name, so a layout or spec the mapping misses can never train silently.
    """
    models = _unwrapped(chunks)
    with torch.no_grad():
        for model in models:
            for param in model.parameters():
                param.fill_(float("nan"))
    bridge = bridge_for(hf_path, with_weights=True)
    bridge.load_hf_weights(models)
    if models[0].share_embeddings_and_output_weights and models[0].config.pipeline_model_parallel_size > 1:
        # The bridge fills the first stage's embedding only; Megatron's own set-up copies it into the last
        # stage's output layer (zero there, then an all-reduce over the embedding group), as at init.
        for model in models:
            model.setup_embeddings_and_output_layer()
    missing = [name for model in models for name, param in model.named_parameters() if torch.isnan(param).any()]
    if missing:
        raise RuntimeError(f"Megatron-Bridge left {len(missing)} parameter(s) of this rank unset when loading "
                           f"{hf_path}: {missing[:6]}; the layer spec and the bridge's mapping disagree")


class _ShardWriter:
    """Writes tensors into numbered safetensors shards of at most ``max_bytes`` (one tensor may exceed it)."""

    def __init__(self, directory: Path, max_bytes: int):
        self.directory, self.max_bytes = directory, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self._flush()
        self.pending[name] = tensor.detach().contiguous().cpu()
        self.pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        save_file(self.pending, str(self.directory / f"part-{len(self.shards):05d}.safetensors"),
                  metadata={"format": "pt"})
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        if self.pending or not self.shards:
            self._flush()
        count = len(self.shards)
        if count == 1:
            os.replace(self.directory / "part-00000.safetensors", self.directory / WEIGHTS_SINGLE)
            return
        weight_map = {}
        for index, names in enumerate(self.shards):
            final = f"model-{index + 1:05d}-of-{count:05d}.safetensors"
            os.replace(self.directory / f"part-{index:05d}.safetensors", self.directory / final)
            weight_map.update({name: final for name in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.directory / WEIGHTS_INDEX).write_text(json.dumps(index, indent=2))


def copy_hf_metadata(source, destination) -> None:
    """Copy the non-weight files of an HF folder (config, generation config, tokenizer, chat template)."""
    destination = Path(destination)
    destination.mkdir(parents=True, exist_ok=True)
    for item in Path(source).iterdir():
        if item.is_file() and not item.name.endswith(_WEIGHT_SUFFIXES):
            shutil.copy2(item, destination / item.name)


def _export_dtype(config) -> Optional[torch.dtype]:
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else None


def _vocabulary_hf_names(bridge) -> set:
    """HF names of the embedding and output weights, from the bridge's own mapping registry.

    The bridge pads these rows on import when Megatron's vocabulary is padded for TP, but exports them
    padded; :func:`export_hf` trims them back to the HF vocabulary.
    """
    registry = bridge._model_bridge.mapping_registry()
    names = set()
    for megatron_name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        mapping = registry.megatron_to_hf_lookup(megatron_name)
        if mapping is not None and isinstance(mapping.hf_param, str):
            names.add(mapping.hf_param)
    return names


def export_hf(chunks, metadata_dir, out_dir, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Optional[Path]:
    """Write this model as an HF folder at ``out_dir``; collective over all ranks, rank 0 writes.

    ``metadata_dir`` holds the source config.json (and tokenizer files, copied along). Tensors come
    from the bridge one at a time, gathered over TP/PP/EP, cast to the config's dtype, and are written
    in shards of at most ``max_shard_bytes``; the folder appears complete (written as ``OUT.tmp``
    and renamed). Returns ``out_dir`` on rank 0, None elsewhere.
    """
    import torch.distributed as dist

    bridge = bridge_for(metadata_dir)
    rank = dist.get_rank() if dist.is_initialized() else 0
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    writer = None
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        writer = _ShardWriter(tmp, max_shard_bytes)
    dtype = _export_dtype(bridge.hf_pretrained)
    vocab, vocab_rows = bridge.hf_pretrained.vocab_size, _vocabulary_hf_names(bridge)
    for name, tensor in bridge.export_hf_weights(_unwrapped(chunks), cpu=True, show_progress=False,
                                                 weight_dtype=dtype):
        if name in vocab_rows and tensor.shape[0] > vocab:
            tensor = tensor[:vocab]  # Megatron's padding rows (vocabulary padded to a multiple of tp)
        if writer is not None:
            writer.add(name, tensor)
    if writer is not None:
        writer.close()
        copy_hf_metadata(metadata_dir, tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    if dist.is_initialized():
        dist.barrier()
    return out_dir if rank == 0 else None
