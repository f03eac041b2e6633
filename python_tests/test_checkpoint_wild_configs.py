"""config.json / params.json spellings of published Llama-family checkpoints: each either loads with
transformers' logits (fp32) or is refused naming the field and its value. Regression guard for
variants the other checkpoint tests do not spell (helper-144)."""

from __future__ import annotations

import json
import re

import pytest
import torch
from llama_helpers import hf_to_meta_state, rel_error, transformers

from qlora_ext.checkpoint import read_checkpoint_config
from qlora_ext.models.llama2 import llama2_from_checkpoint

BASE = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=384, hidden_size=128, intermediate_size=344,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096, rms_norm_eps=1e-5,
            rope_theta=10000.0, rope_scaling=None, hidden_act="silu", tie_word_embeddings=False, attention_bias=False,
            pretraining_tp=1, torch_dtype="float16")
DROP = object()


def _write(folder, config):
    tf = transformers()
    (folder / "config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(tf.AutoConfig.from_pretrained(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
    model.save_pretrained(folder)
    (folder / "config.json").write_text(json.dumps(config))  # the published spelling, not transformers' rewrite
    return model


def _config(**over):
    return {k: v for k, v in {**BASE, **over}.items() if v is not DROP}


LOADS = {
    "codellama": dict(vocab_size=32016, hidden_size=64, intermediate_size=172, rope_theta=1000000, max_position_embeddings=16384),
    "tinyllama_gqa": dict(num_attention_heads=32, num_key_value_heads=4, hidden_size=256, intermediate_size=688, max_position_embeddings=2048),
    "kv_heads_absent": dict(num_key_value_heads=DROP),
    "rope_scaling_typed_default": dict(rope_scaling={"rope_type": "default"}),
    "rope_parameters_theta_over_top_level": dict(rope_theta=10000.0, rope_scaling=DROP, rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
    "rope_parameters_without_theta": dict(rope_theta=1e6, rope_scaling=DROP, rope_parameters={"rope_type": "default"}),
    "pretraining_tp_2": dict(pretraining_tp=2),
    "sliding_window_on_llama": dict(sliding_window=16),
    "head_dim_explicit_same": dict(head_dim=32),
    "llama3_shape": dict(vocab_size=501, rope_theta=500000.0, num_key_value_heads=2, max_position_embeddings=8192),
    "architectures_absent": dict(architectures=DROP),
}


@pytest.mark.parametrize("name", sorted(LOADS))
def test_published_spellings_load_with_transformers_logits(tmp_path, name):
    config = _config(**LOADS[name])
    _write(tmp_path, config)
    hf = transformers().AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    tokens = torch.randint(0, 384, (2, 60), generator=torch.Generator().manual_seed(1))  # long enough for the RoPE base to tell
    ours = llama2_from_checkpoint(tmp_path, dtype=torch.float32)
    with torch.no_grad():
        assert rel_error(ours(tokens), hf(tokens).logits) <= 1e-5


REFUSED = {
    "rope_dynamic": (dict(rope_scaling={"type": "dynamic", "factor": 2.0}), "type must be 'default', got 'dynamic'"),
    "rope_llama3": (dict(rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 8192, "rope_type": "llama3"}), "type must be 'default', got 'llama3'"),
    "rope_yarn": (dict(rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024}), "got 'yarn'"),
    "attention_bias": (dict(attention_bias=True), "'attention_bias' must be False, got True"),
    "mlp_bias": (dict(mlp_bias=True), "'mlp_bias' must be False, got True"),
    "head_dim_other": (dict(head_dim=64), "'head_dim' must be 32, got 64"),
    "mistral": (dict(model_type="mistral", architectures=["MistralForCausalLM"], sliding_window=None), "'model_type' must be 'llama', got 'mistral'"),
    "qwen2": (dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"]), "'model_type' must be 'llama', got 'qwen2'"),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_published_spellings_not_implemented_are_named(tmp_path, name):
    over, text = REFUSED[name]
    _write(tmp_path, _config(**over))
    with pytest.raises(ValueError, match=re.escape(text)):
        llama2_from_checkpoint(tmp_path)


def _ffn(dim, mult, multiple_of):  # transformers' convert_llama_weights_to_hf.compute_intermediate_size
    return multiple_of * ((int((mult or 1) * int(8 * dim / 3)) + multiple_of - 1) // multiple_of)


@pytest.mark.parametrize("params, kv, theta, max_seq_len", [
    ({"multiple_of": 256, "ffn_dim_multiplier": 1.0, "rope_theta": 1000000, "vocab_size": 384}, 4, 1e6, 16384),  # Code Llama 7B
    ({"multiple_of": 4096, "ffn_dim_multiplier": 1.3, "n_kv_heads": 2, "vocab_size": -1}, 2, 1e4, 4096),  # Llama-2 70B
    ({"multiple_of": 1024, "ffn_dim_multiplier": 1.3, "n_kv_heads": 2, "rope_theta": 500000.0, "use_scaled_rope": False,
      "vocab_size": 384}, 2, 5e5, None),  # Llama 3 8B (its context length is not pinned: Llama 3 is outside the Llama-2 family)
], ids=["codellama", "llama2_70b", "llama3_8b"])
def test_meta_params_of_published_models_load_with_transformers_logits(tmp_path, params, kv, theta, max_seq_len):
    tf = transformers()
    inter = _ffn(128, params.get("ffn_dim_multiplier"), params["multiple_of"])
    cfg = tf.LlamaConfig(vocab_size=384, hidden_size=128, intermediate_size=inter, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=kv, rms_norm_eps=1e-5, rope_theta=theta, tie_word_embeddings=False)
    torch.manual_seed(0)
    hf = tf.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
    torch.save(hf_to_meta_state(hf), tmp_path / "consolidated.00.pth")
    (tmp_path / "params.json").write_text(json.dumps({"dim": 128, "n_layers": 2, "n_heads": 4, "norm_eps": 1e-5, **params}))
    read = read_checkpoint_config(tmp_path)
    assert (read.intermediate_dim, read.num_kv_heads, read.rope_base) == (inter, kv, theta)
    assert max_seq_len is None or read.max_seq_len == max_seq_len
    tokens = torch.randint(0, 384, (2, 60), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert rel_error(llama2_from_checkpoint(tmp_path, dtype=torch.float32)(tokens), hf(tokens).logits) <= 1e-5
    (tmp_path / "params.json").write_text(json.dumps({"dim": 128, "n_layers": 2, "n_heads": 4, **params, "use_scaled_rope": True}))
    with pytest.raises(ValueError, match=r"'use_scaled_rope' must be false or absent, got True"):
        llama2_from_checkpoint(tmp_path)
