"""HF folders that cannot be used fail early with the file or key named; the HF tokenizer interface.

Single process, no process group: the model section is derived (and checked) by ``load_run_config``, the
step after the pure ``load_config`` that every entry point takes.
"""

from __future__ import annotations

import json
import shutil

import pytest

from tests.hf_fixtures import build_hf_model
from vespo_megatron.config import ConfigError, load_config
from vespo_megatron.models import hf
from vespo_megatron.run_config import load_run_config


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory):
    return build_hf_model(tmp_path_factory.mktemp("hf") / "qwen3", "qwen3", with_tokenizer=True)


def test_model_section_is_derived_from_the_hf_config(qwen3_dir):
    model = load_run_config(None, [f"model.hf_path={qwen3_dir}"]).model
    config = json.loads((qwen3_dir / "config.json").read_text())
    assert (model.num_layers, model.hidden_size, model.ffn_size) == (
        config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"])
    assert (model.num_attention_heads, model.query_groups, model.kv_channels) == (
        config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"])
    assert model.vocab_size == config["vocab_size"] and model.norm_epsilon == config["rms_norm_eps"]
    assert model.qk_layernorm and not model.tie_embeddings and model.num_experts is None


def test_load_config_reads_no_model_files(tmp_path):
    config = load_config(None, [f"model.hf_path={tmp_path / 'nowhere'}", "model.hidden_size=64"])
    assert config.model.hidden_size == 64  # as written: resolving is load_run_config's step
    assert hf.resolve_hf_model(load_config(None, [])) == load_config(None, [])


def test_agreeing_yaml_key_is_accepted_and_a_contradicting_one_names_both_values(qwen3_dir):
    load_run_config(None, [f"model.hf_path={qwen3_dir}", "model.hidden_size=32"])
    with pytest.raises(ConfigError, match=r"model\.hidden_size=64 contradicts .*config\.json, which gives 32"):
        load_run_config(None, [f"model.hf_path={qwen3_dir}", "model.hidden_size=64"])


def test_missing_config_json_is_named(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty/config\.json does not exist"):
        load_run_config(None, [f"model.hf_path={folder}"])
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        load_run_config(None, [f"model.hf_path={tmp_path / 'nowhere'}"])


def test_missing_weights_are_named(tmp_path, qwen3_dir):
    import transformers

    single = tmp_path / "single"
    shutil.copytree(qwen3_dir, single)
    (single / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"single/model\.safetensors does not exist"):
        hf.weight_files(single)
    sharded = tmp_path / "sharded"
    model = transformers.AutoModelForCausalLM.from_pretrained(qwen3_dir, local_files_only=True)
    model.save_pretrained(sharded, max_shard_size="20KB")
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[1].unlink()
    with pytest.raises(FileNotFoundError, match=rf"{shards[1].name} does not exist \(listed in .*index\.json\)"):
        hf.weight_files(sharded)


def test_unsupported_architecture_is_named(tmp_path):
    import transformers

    folder = tmp_path / "gpt2"
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32)
    config.architectures = ["GPT2LMHeadModel"]
    config.save_pretrained(folder)
    with pytest.raises(ConfigError, match=r"architectures=\['GPT2LMHeadModel'\] is not supported by Megatron-Bridge"):
        load_run_config(None, [f"model.hf_path={folder}"])
    config = transformers.PhiConfig(num_hidden_layers=1, hidden_size=16, num_attention_heads=2, vocab_size=32)
    config.architectures = ["PhiForCausalLM"]  # the right suffix, but no bridge is registered for it
    config.save_pretrained(folder)
    with pytest.raises(ConfigError, match=r"architectures=\['PhiForCausalLM'\] is not supported"):
        load_run_config(None, [f"model.hf_path={folder}"])


def test_feature_our_builder_lacks_is_named(tmp_path):
    import transformers

    from tests.hf_fixtures import _common

    folder = tmp_path / "qwen2"
    config = transformers.Qwen2Config(**_common(intermediate_size=64))
    config.architectures = ["Qwen2ForCausalLM"]
    config.save_pretrained(folder)
    with pytest.raises(ConfigError, match=r"add_qkv_bias=True, which vespo_megatron's builder does not support"):
        load_run_config(None, [f"model.hf_path={folder}"])


def _llama_config_folder(folder, **scaling):
    import transformers

    from tests.hf_fixtures import hf_config

    config = hf_config("llama", max_position_embeddings=16384, rope_scaling={
        "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192, **scaling})
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(folder)
    assert isinstance(config, transformers.LlamaConfig)
    return folder


def test_llama3_rope_scaling_is_derived_and_other_llama3_values_are_refused(tmp_path):
    folder = _llama_config_folder(tmp_path / "llama32")
    assert load_run_config(None, [f"model.hf_path={folder}"]).model.rope_scaling_factor == 32.0
    odd = _llama_config_folder(tmp_path / "odd", high_freq_factor=2.0)
    with pytest.raises(ConfigError, match=r"rope_scaling high_freq_factor=2.0 is not Megatron-Core's llama3 value 4.0"):
        load_run_config(None, [f"model.hf_path={odd}"])
    plain = build_hf_model(tmp_path / "plain", "llama")
    assert load_run_config(None, [f"model.hf_path={plain}"]).model.rope_scaling_factor is None


def test_rope_scaling_factor_is_validated():
    with pytest.raises(ConfigError, match=r"model.rope_scaling_factor=0.5 needs model.position_embedding=rope and a "
                                          r"factor >= 1"):
        load_config(None, ["model.rope_scaling_factor=0.5"])


def test_export_every_needs_hf_path():
    with pytest.raises(ConfigError, match="checkpoint.export_hf_every=2 needs model.hf_path"):
        from vespo_megatron.config import validate

        validate(load_config(None, ["checkpoint.export_hf_every=2", "checkpoint.dir=/tmp/x"]), 1)


def test_hf_tokenizer_interface_and_chat_template(qwen3_dir):
    import transformers

    from vespo_megatron.models.hf_tokenizer import HFTokenizer
    from vespo_megatron.tokenizer import load_run_tokenizer

    reference = transformers.AutoTokenizer.from_pretrained(qwen3_dir, local_files_only=True)
    plain = load_run_tokenizer(load_run_config(None, [f"model.hf_path={qwen3_dir}"]))
    assert isinstance(plain, HFTokenizer)
    assert plain.vocab_size == len(reference)
    assert (plain.bos_id, plain.pad_id) == (reference.bos_token_id, reference.pad_token_id)
    assert plain.stop_ids == [reference.eos_token_id, reference.convert_tokens_to_ids("<|end|>")]
    assert plain.encode("1+2=3") == reference.encode("1+2=3", add_special_tokens=False)
    assert plain.decode(plain.encode("1+2=3")) == "1+2=3"
    assert plain.encode_prompt("4+5=") == [reference.bos_token_id] + reference.encode("4+5=", add_special_tokens=False)
    chat = load_run_tokenizer(load_run_config(None, [f"model.hf_path={qwen3_dir}", "task.chat_template=true"]))
    rendered = "<|user|> 4+5=<|assistant|> "
    assert chat.encode_prompt("4+5=") == reference.encode(rendered, add_special_tokens=False)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        plain.decode([plain.vocab_size])


def test_chat_template_with_sentencepiece_is_refused():
    with pytest.raises(ConfigError, match="task.chat_template=true needs a Hugging Face tokenizer"):
        from vespo_megatron.config import validate

        validate(load_config(None, ["task.chat_template=true"]), 1)


def test_check_config_resolves_the_hf_model_before_validating(qwen3_dir, tmp_path, capsys):
    from vespo_megatron import estimates
    from vespo_megatron.check_config import main as check_config_main

    run = tmp_path / "run.yaml"
    run.write_text(f"model:\n  hf_path: {qwen3_dir}\n")
    assert check_config_main([str(run), "--nodes", "1", "--gpus-per-node", "1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    hf_config = json.loads((qwen3_dir / "config.json").read_text())
    assert report["ok"] and report["vocab_size"] == hf_config["vocab_size"]  # the HF model's, not the default
    assert report["parameters"]["total"] == estimates.total_parameters(load_run_config(run), hf_config["vocab_size"])
    assert report["parameters"]["total"] != estimates.total_parameters(load_config(run), hf_config["vocab_size"])
