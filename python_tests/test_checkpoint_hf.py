"""HF checkpoints in: our logits match transformers' LlamaForCausalLM on the same random
checkpoint (MHA and GQA; single, sharded and .bin files), NF4 loading quantizes on arrival,
and config or key problems are reported with everything that is wrong."""

from __future__ import annotations

import json
import os
import re
import shutil
import zipfile

import pytest
import torch
from llama_helpers import TouchesWhenUnpickled, hf_llama, hf_logits, rel_error, transformers

from qlora_ext import NF4Tensor
from qlora_ext.checkpoint import Llama2Config, load_checkpoint, read_checkpoint_config
from qlora_ext.checkpoint.config import read_json
from qlora_ext.models.llama2 import llama2, llama2_from_checkpoint, lora_llama2

ALL_ATTN = ["q_proj", "k_proj", "v_proj", "output_proj"]


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    transformers()
    out = {}
    for kv in (4, 2):
        model = hf_llama(num_kv_heads=kv, seed=kv)
        folder = tmp_path_factory.mktemp(f"hf_kv{kv}")
        model.save_pretrained(folder)
        out[kv] = (model, str(folder))
    return out


@pytest.mark.parametrize("kv", [4, 2], ids=["mha", "gqa"])
def test_logits_match_transformers(hf_models, kv):
    hf, folder = hf_models[kv]
    tokens = torch.randint(0, 320, (2, 23))
    ours = llama2_from_checkpoint(folder).eval()
    assert ours.layers[0].attn.num_kv_heads == kv
    with torch.no_grad():
        assert rel_error(ours(tokens), hf_logits(hf, tokens)) <= 1e-5


def test_rope_base_and_norm_eps_are_read_from_config_json(tmp_path):
    hf = hf_llama(num_kv_heads=2, seed=5, rope_theta=500_000.0, rms_norm_eps=1e-6)
    hf.save_pretrained(tmp_path)
    ours = llama2_from_checkpoint(tmp_path).eval()
    assert ours.layers[0].attn.pos_embeddings.base == 500_000.0
    assert ours.layers[0].sa_norm.eps == 1e-6 and ours.norm.eps == 1e-6
    tokens = torch.randint(0, 320, (2, 40))  # long enough for the RoPE base to matter
    with torch.no_grad():
        got = ours(tokens)
        assert rel_error(got, hf_logits(hf, tokens)) <= 1e-5
        ours.layers[0].attn.pos_embeddings.base = 10_000.0  # the comparison can tell bases apart
        ours.layers[0].attn.pos_embeddings.rope_init()
        assert rel_error(ours(tokens), got) > 1e-4


def test_absent_config_fields_take_transformers_defaults(tmp_path):
    # transformers' LlamaConfig defaults: rms_norm_eps 1e-6, max_position_embeddings 2048,
    # rope_theta 10000; a config.json without them means those.
    hf = hf_llama(num_kv_heads=2, seed=6, rms_norm_eps=1e-6)
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for key in ("rms_norm_eps", "max_position_embeddings", "rope_theta", "rope_parameters", "rope_scaling"):
        config.pop(key, None)
    (tmp_path / "config.json").write_text(json.dumps(config))
    defaults = transformers().LlamaConfig()
    assert (defaults.rms_norm_eps, defaults.max_position_embeddings) == (1e-6, 2048)
    read = read_checkpoint_config(tmp_path)
    assert (read.norm_eps, read.max_seq_len, read.rope_base) == (1e-6, 2048, 10_000.0)
    hf_again = transformers().LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert hf_again.config.rms_norm_eps == 1e-6 and hf_again.config.max_position_embeddings == 2048
    ours = llama2_from_checkpoint(tmp_path).eval()
    assert ours.norm.eps == 1e-6 and ours.layers[0].sa_norm.eps == 1e-6 and ours.max_seq_len == 2048
    tokens = torch.randint(0, 320, (2, 9))
    with torch.no_grad():
        assert rel_error(ours(tokens), hf_logits(hf_again, tokens)) <= 1e-5


@pytest.mark.parametrize("layout", ["sharded_safetensors", "bin", "sharded_bin"])
def test_other_hf_file_layouts(hf_models, tmp_path, layout):
    hf, _ = hf_models[2]
    if layout == "sharded_safetensors":
        hf.save_pretrained(tmp_path, max_shard_size="400KB")
        assert os.path.exists(tmp_path / "model.safetensors.index.json")
    else:
        # transformers 5 only writes safetensors: write .bin files (+ index) as older versions did.
        state = hf.state_dict()
        hf.config.save_pretrained(tmp_path)
        if layout == "bin":
            torch.save(state, tmp_path / "pytorch_model.bin")
        else:
            names = sorted(state)
            halves = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
            for file, keys in halves.items():
                torch.save({k: state[k] for k in keys}, tmp_path / file)
            index = {"weight_map": {k: f for f, keys in halves.items() for k in keys}}
            (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    tokens = torch.randint(0, 320, (1, 17))
    ours = llama2_from_checkpoint(tmp_path).eval()
    with torch.no_grad():
        assert rel_error(ours(tokens), hf_logits(hf, tokens)) <= 1e-5


def test_nf4_weights_quantized_on_arrival_into_meta_model(hf_models):
    hf, folder = hf_models[2]
    config = read_checkpoint_config(folder)
    with torch.device("meta"):
        model = lora_llama2(ALL_ATTN, True, **config.builder_kwargs(), lora_rank=4, lora_alpha=8, quantize_base=True)
    assert load_checkpoint(model, folder) == "hf"
    state = hf.state_dict()
    q = model.layers[1].attn.q_proj
    assert isinstance(q.weight, NF4Tensor) and q.weight.device.type == "cpu"
    from qlora_ext import to_nf4

    want = to_nf4(state["model.layers.1.self_attn.q_proj.weight"])
    for got, exp in zip(q.weight.components(), want.components()):
        assert torch.equal(got, exp)
    # Dense weights are exact, adapters are fresh (lora_b = 0), RoPE tables rebuilt.
    assert torch.equal(model.tok_embeddings.weight, state["model.embed_tokens.weight"])
    assert torch.equal(model.layers[0].sa_norm.scale, state["model.layers.0.input_layernorm.weight"])
    assert model.layers[0].attn.q_proj.lora_b.weight.abs().sum() == 0
    assert model.layers[0].attn.q_proj.lora_a.weight.abs().sum() > 0
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    tokens = torch.randint(0, 320, (1, 9))
    with torch.no_grad():
        # NF4 rounding, not a layout error: a few percent, far below a wrong-weight mismatch.
        assert rel_error(model(tokens), hf_logits(hf, tokens)) < 0.3


def test_from_checkpoint_names_a_dtype_it_cannot_build(hf_models):
    # torch.set_default_dtype's own message ("only floating-point types are supported as the default
    # type"), or to_nf4's about an argument the caller never passed
    _, folder = hf_models[2]
    for bad in (torch.int32, "bfloat16", torch.float8_e4m3fn):  # (float8: "couldn't find storage object Float8_e4m3fnStorage")
        with pytest.raises(TypeError, match=rf"^llama2_from_checkpoint: argument 'dtype' must be float32, bfloat16, float16, float64 "
                                            rf"or None; got {re.escape(repr(bad))}$"):
            llama2_from_checkpoint(folder, dtype=bad)
    with pytest.raises(TypeError, match=r"^llama2_from_checkpoint: argument 'dtype' must be float32, bfloat16 or float16 with "
                                        r"quantize_base=True \(what NF4 weights dequantize to\); got torch.float64$"):
        llama2_from_checkpoint(folder, ["q_proj"], quantize_base=True, dtype=torch.float64)
    assert llama2_from_checkpoint(folder, ["q_proj"], dtype=torch.float64).tok_embeddings.weight.dtype == torch.float64


def test_from_checkpoint_names_lora_attn_modules_given_as_one_string(hf_models):
    # It was shown split into characters: "got ['q', '_', 'p', 'r', 'o', 'j']"
    _, folder = hf_models[2]
    with pytest.raises(ValueError, match=r"argument 'lora_attn_modules' must be a list .*; got 'q_proj' \(a str\)$"):
        llama2_from_checkpoint(folder, "q_proj")


def test_loading_into_materialized_model_copies_in_place(hf_models):
    _, folder = hf_models[4]
    config = read_checkpoint_config(folder)
    model = lora_llama2(["q_proj"], **config.builder_kwargs(), lora_rank=4, lora_alpha=8, quantize_base=True).eval()
    weight_before = model.layers[0].attn.q_proj.weight
    lora_a = model.layers[0].attn.q_proj.lora_a.weight.clone()
    load_checkpoint(model, folder)
    assert model.layers[0].attn.q_proj.weight is weight_before  # same parameter object
    assert torch.equal(model.layers[0].attn.q_proj.lora_a.weight, lora_a)  # adapters untouched
    tokens = torch.randint(0, 320, (1, 7))
    fresh = llama2_from_checkpoint(folder, ["q_proj"], lora_rank=4, lora_alpha=8, quantize_base=True).eval()
    with torch.no_grad():
        assert torch.equal(model(tokens), fresh(tokens))


@pytest.mark.parametrize("fmt", ["hf", "meta"])
def test_a_folder_replaced_while_it_is_read_is_named(hf_models, tmp_path, monkeypatch, fmt):
    # A trainer's save swaps its epoch folder for a new one (two renames): a reader between reading
    # the config (and index) and opening the shards got tensors of two saves, silently, or a folder not there.
    from qlora_ext.checkpoint import load as load_module
    from qlora_ext.checkpoint import save_meta_checkpoint

    folder = tmp_path / "epoch_0"
    if fmt == "hf":
        shutil.copytree(hf_models[4][1], folder)
    else:
        model = llama2(**read_checkpoint_config(hf_models[4][1]).builder_kwargs())
        load_checkpoint(model, hf_models[4][1])
        save_meta_checkpoint(model, folder)
    shutil.copytree(folder, tmp_path / "staged")
    real = load_module.TensorFiles

    class SavedMeanwhile(real):  # the save commits right after the reader opened the files
        def __init__(self, paths):
            super().__init__(paths)
            if (tmp_path / "staged").exists():
                os.rename(folder, tmp_path / "epoch_0.old")
                os.rename(tmp_path / "staged", folder)

    model = llama2(**read_checkpoint_config(folder).builder_kwargs())
    monkeypatch.setattr(load_module, "TensorFiles", SavedMeanwhile)
    with pytest.raises(FileNotFoundError, match=rf"checkpoint {folder} was replaced while it was being read \(a save into it"):
        load_checkpoint(model, folder)
    load_checkpoint(model, folder)  # once the save is done


def test_a_non_finite_weight_is_named(hf_models, tmp_path):
    from safetensors.torch import load_file, save_file

    _, folder = hf_models[4]
    state = load_file(os.path.join(folder, "model.safetensors"))
    state["model.layers.1.self_attn.q_proj.weight"][5, 7] = float("nan")
    save_file(state, tmp_path / "model.safetensors")
    shutil.copy(os.path.join(folder, "config.json"), tmp_path / "config.json")
    with pytest.raises(ValueError, match=r"load_checkpoint: .*: entry model.layers.1.self_attn.q_proj.weight cannot be loaded: "
                       r".*to_nf4: argument 'tensor' must hold only finite values.*The model now holds \d+ of the checkpoint's \d+ tensors: rebuild it"):
        llama2_from_checkpoint(tmp_path, ["q_proj"], lora_rank=4, lora_alpha=8, quantize_base=True)
    # A dense weight with a NaN is refused alike (it was loaded as it was, and the model output garbage).
    with pytest.raises(ValueError, match=r"load_checkpoint: .*: entry model.layers.1.self_attn.q_proj.weight cannot be loaded: "
                       r"it holds NaN or Inf. The model now holds \d+ of the checkpoint's \d+ tensors: rebuild it"):
        llama2_from_checkpoint(tmp_path)
    state["model.layers.1.self_attn.q_proj.weight"][5, 7] = 0.0
    state["model.norm.weight"][3] = float("-inf")
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"entry model.norm.weight cannot be loaded: it holds NaN or Inf"):
        llama2_from_checkpoint(tmp_path)


def test_a_weight_beyond_the_model_dtype_is_named(hf_models, tmp_path):
    # A finite 1e6 in a float32 checkpoint loaded as float16 became inf, silently (dense or NF4).
    from safetensors.torch import load_file, save_file

    _, folder = hf_models[4]
    state = load_file(os.path.join(folder, "model.safetensors"))
    shutil.copy(os.path.join(folder, "config.json"), tmp_path / "config.json")
    for key in ("model.layers.1.self_attn.q_proj.weight", "model.layers.0.input_layernorm.weight"):
        bad = dict(state)
        bad[key] = bad[key].clone()
        bad[key].view(-1)[3] = -1e6
        save_file(bad, tmp_path / "model.safetensors")
        for quantize_base in (False, True):
            with pytest.raises(ValueError, match=rf"entry {key} cannot be loaded: it holds -1e\+06, beyond the range of float16 \(the "
                                                 r"model's dtype; largest finite 65504\), where it would be inf; load the model in a wider dtype"):
                llama2_from_checkpoint(tmp_path, ["q_proj"], lora_rank=4, quantize_base=quantize_base, dtype=torch.float16)
        assert llama2_from_checkpoint(tmp_path, dtype=torch.bfloat16).layers[0] is not None  # in range there
    bad[key].view(-1)[3] = 65510.0  # past the largest float16, short of the rounding to inf: taken (as 65504)
    save_file(bad, tmp_path / "model.safetensors")
    assert llama2_from_checkpoint(tmp_path, dtype=torch.float16).layers[0].sa_norm.scale.view(-1)[3] == 65504


def test_key_and_shape_problems_are_listed(hf_models, tmp_path):
    from safetensors.torch import load_file, save_file

    _, folder = hf_models[4]
    state = load_file(os.path.join(folder, "model.safetensors"))
    del state["model.layers.1.mlp.up_proj.weight"]
    state["model.layers.0.self_attn.extra.weight"] = torch.zeros(2)
    state["model.norm.weight"] = torch.ones(255)
    # an int weight (as an int dtype passed to a save once wrote) would load as the truncated values
    state["model.layers.0.self_attn.o_proj.weight"] = state["model.layers.0.self_attn.o_proj.weight"].to(torch.int64)
    save_file(state, tmp_path / "model.safetensors")
    shutil.copy(os.path.join(folder, "config.json"), tmp_path / "config.json")
    with torch.device("meta"):
        model = llama2(**read_checkpoint_config(tmp_path).builder_kwargs())
    with pytest.raises(ValueError) as err:
        load_checkpoint(model, tmp_path)
    msg = str(err.value)
    assert "missing keys (1): ['model.layers.1.mlp.up_proj.weight']" in msg  # as the checkpoint names it
    assert "unexpected keys (1): ['model.layers.0.self_attn.extra.weight']" in msg
    assert "wrong shapes (1): ['model.norm.weight: checkpoint [255] vs model [256]']" in msg
    assert "not floating point (1): ['model.layers.0.self_attn.o_proj.weight: torch.int64']" in msg


def test_architecture_mismatch_and_unsupported_config(hf_models, tmp_path):
    _, folder = hf_models[2]
    with torch.device("meta"):
        model = llama2(**{**read_checkpoint_config(folder).builder_kwargs(), "num_kv_heads": 4})
    with pytest.raises(ValueError, match=r"another architecture than the model \(checkpoint vs model\): num_kv_heads: 2 vs 4"):
        load_checkpoint(model, folder)

    config = read_json(os.path.join(folder, "config.json"))
    bad = {**config, "hidden_act": "gelu", "tie_word_embeddings": True, "rope_scaling": {"rope_type": "linear", "factor": 2.0}}
    bad.pop("rope_parameters", None)
    with pytest.raises(ValueError) as err:
        Llama2Config.from_hf(bad)
    for part in ("'hidden_act' must be 'silu', got 'gelu'", "'tie_word_embeddings' must be False, got True",
                 "'rope_scaling' (or 'rope_parameters') type must be 'default', got 'linear' (RoPE scaling is not implemented)"):
        assert part in str(err.value)
    # A legacy rope_scaling added beside the rope_parameters transformers 5 writes is the one transformers applies.
    both = {**config, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}, "rope_scaling": {"type": "linear", "factor": 4.0}}
    with pytest.raises(ValueError, match=re.escape("'rope_scaling' (or 'rope_parameters') type must be 'default', got 'linear' (RoPE scaling is not implemented)")):
        Llama2Config.from_hf(both)
    with pytest.raises(ValueError, match=re.escape("'rope_scaling' (or 'rope_parameters') type must be 'default', got 'linear' (RoPE scaling is not implemented)")):
        Llama2Config.from_hf({**both, "rope_scaling": None, "rope_parameters": {"rope_type": "linear", "factor": 4.0}})
    assert Llama2Config.from_hf({**config, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}}).rope_base == 5e5
    # sizes and numbers of the wrong kind are named as config.json fields (were passed on to the
    # builder, or crashed in float()); an integral float size and a null num_key_value_heads are read
    # as transformers reads them
    plain = {k: v for k, v in config.items() if k not in ("rope_parameters", "rope_scaling")}
    wrong = {**plain, "max_position_embeddings": None, "vocab_size": "96", "rms_norm_eps": None, "rope_theta": None}
    with pytest.raises(ValueError) as err:
        Llama2Config.from_hf(wrong)
    for part in ("'vocab_size' must be a positive integer, got '96'", "'max_position_embeddings' must be a positive integer, got None",
                 "'rms_norm_eps' must be a positive number, got None", "'rope_theta' must be a positive number, got None"):
        assert part in str(err.value)
    # A rope_scaling that is no object, and sizes past any Llama-2 that a damaged config gives (building
    # them took minutes, or 14 GB for a RoPE table of 30 million positions), are named.
    with pytest.raises(ValueError, match=r"unsupported config.json: 'rope_scaling' must be a JSON object or null, got 'linear'$"):
        Llama2Config.from_hf({**plain, "rope_scaling": "linear"})
    with pytest.raises(ValueError, match=r"'num_hidden_layers' must be at most 1024, got 100000; 'max_position_embeddings' must be "
                                         r"at most 1048576 \(the RoPE table holds every position\), got 30000000$"):
        Llama2Config.from_hf({**plain, "num_hidden_layers": 100_000, "max_position_embeddings": 3e7})
    # widths past int64 element counts (torch.empty overflowed) and a rope_theta past float's range
    # (float() overflowed) are named too
    with pytest.raises(ValueError, match=r"config.json: 'rope_theta' must be a positive number within float's range \(about 1.8e308\), got an "
                                         r"integer of 1163 bits; 'vocab_size' must be at most 16777216, got 10{30}; 'intermediate_size' must "
                                         r"be at most 16777216, got 4611686018427387904$"):
        Llama2Config.from_hf({**plain, "vocab_size": 10**30, "intermediate_size": 2**62, "rope_theta": 10**50 * 10**300})
    with pytest.raises(ValueError, match=r"'rope_theta' must be a positive number within float's range .*, got an integer of 16610 bits$"):
        Llama2Config.from_hf({**plain, "rope_theta": 10**5000})  # (from Python: str() of it would pass Python's 4300 digits)
    read = Llama2Config.from_hf({**plain, "max_position_embeddings": 512.0, "num_key_value_heads": None})
    assert read.max_seq_len == 512 and type(read.max_seq_len) is int and read.num_kv_heads == read.num_heads
    # only a null or absent num_key_value_heads means one per head (0 and false were read so, as
    # another model), and head counts the builders refuse are named by config.json's fields
    for kv in (0, False):
        with pytest.raises(ValueError, match=rf"'num_key_value_heads' must be a positive integer, got {kv}$"):
            Llama2Config.from_hf({**plain, "num_key_value_heads": kv})
    with pytest.raises(ValueError, match=r"config.json: 'hidden_size' must be a multiple of 'num_attention_heads' \(4\), got 30; "
                                         r"'num_key_value_heads' must divide 'num_attention_heads' \(4\), got 3$"):
        Llama2Config.from_hf({**plain, "hidden_size": 30, "num_attention_heads": 4, "num_key_value_heads": 3})
    with pytest.raises(ValueError, match=r"'hidden_size' / 'num_attention_heads' \(the head size, rotated in pairs by RoPE\) must be "
                                         r"even, got 12 / 4 = 3$"):
        Llama2Config.from_hf({**plain, "hidden_size": 12, "num_attention_heads": 4, "num_key_value_heads": 2})
    with pytest.raises(ValueError, match=r"missing field 'hidden_size'"):
        Llama2Config.from_hf({k: v for k, v in config.items() if k != "hidden_size"})
    # another quantization is named by its setting, not by a dump of its whole config
    int8 = {"quant_method": "bitsandbytes", "load_in_8bit": True, "load_in_4bit": False, "bnb_4bit_quant_type": "fp4"}
    with pytest.raises(ValueError, match=r"'quantization_config' must be bitsandbytes 4-bit \(load_in_4bit=True\) or absent, "
                                         r"got bitsandbytes 8-bit \(load_in_8bit=True\)$"):
        Llama2Config.from_hf({**config, "quantization_config": int8})
    with pytest.raises(ValueError, match=r"or absent, got quant_method='gptq'$"):
        Llama2Config.from_hf({**config, "quantization_config": {"quant_method": "gptq", "bits": 4}})
    with pytest.raises(ValueError, match=r"or absent, got \['load_in_4bit'\]$"):
        Llama2Config.from_hf({**config, "quantization_config": ["load_in_4bit"]})
    with pytest.raises(FileNotFoundError, match=r"neither a HF checkpoint \(config.json\) nor a Meta one"):
        read_checkpoint_config(tmp_path)


def test_hf_config_round_trip(hf_models):
    _, folder = hf_models[2]
    config = read_checkpoint_config(folder)
    assert config == Llama2Config(vocab_size=320, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=256, intermediate_dim=768, max_seq_len=128)
    assert Llama2Config.from_hf(config.to_hf(dtype=torch.bfloat16)) == config
    # transformers 4 spelling (Llama-2-7b-hf's config.json): rope_theta absent, rope_scaling null.
    old = {"architectures": ["LlamaForCausalLM"], "hidden_act": "silu", "hidden_size": 4096, "intermediate_size": 11008,
           "max_position_embeddings": 4096, "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32,
           "num_key_value_heads": 32, "rms_norm_eps": 1e-05, "rope_scaling": None, "tie_word_embeddings": False,
           "torch_dtype": "float16", "vocab_size": 32000}
    assert Llama2Config.from_hf(old).builder_kwargs() == dict(
        vocab_size=32000, num_layers=32, num_heads=32, num_kv_heads=32, embed_dim=4096, intermediate_dim=11008,
        max_seq_len=4096, norm_eps=1e-5, rope_base=10000.0,
    )


def test_malformed_json_index_and_safetensors_header_are_named(tmp_path):
    import struct

    from qlora_ext.checkpoint.readers import hf_weight_files
    from qlora_ext.checkpoint.safetensors_io import SafetensorsReader

    (tmp_path / "config.json").write_text('{"vocab_size": 32, oops}')
    with pytest.raises(ValueError, match=rf"{tmp_path / 'config.json'} is not valid JSON: Expecting property name"):
        read_json(tmp_path / "config.json")
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"config.json must hold a JSON object; got list"):
        read_json(tmp_path / "config.json")
    # nesting past Python's recursion limit, and a number of more digits than Python converts (whose
    # advice to raise that limit is not the reader's), were a RecursionError and a bare message
    (tmp_path / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match=r"config.json is not valid JSON: it nests its values too deeply to read$"):
        read_json(tmp_path / "config.json")
    with pytest.raises(ValueError, match=r"'.*config\\x00.json' cannot be opened: embedded null byte$"):  # (not "not valid JSON")
        read_json(str(tmp_path / "config\0.json"))
    (tmp_path / "config.json").write_text('{"vocab_size": ' + "1" * 5000 + "}")
    with pytest.raises(ValueError, match=r"config.json is not valid JSON: Exceeds the limit \(4300 digits\) for integer string "
                                         r"conversion: value has 5000 digits$"):
        read_json(tmp_path / "config.json")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    with pytest.raises(ValueError, match=r"model.safetensors.index.json must map tensor names to shard files under 'weight_map'; got None"):
        hf_weight_files(str(tmp_path))
    header = json.dumps({"w": {"shape": [2], "data_offsets": [0, 8]}}).encode()
    (tmp_path / "bad.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(8))
    with pytest.raises(ValueError, match=r"bad.safetensors is not a safetensors file: tensor 'w' must have dtype, shape and data_offsets"):
        SafetensorsReader(str(tmp_path / "bad.safetensors"))

    def damaged(header_text: str, data: bytes = bytes(16), length: int | None = None) -> str:
        encoded = header_text.encode()
        path = tmp_path / "damaged.safetensors"
        path.write_bytes(struct.pack("<Q", len(encoded) if length is None else length) + encoded + data)
        return str(path)

    def f32(offsets, shape=(2,), dtype="F32"):
        return {"dtype": dtype, "shape": list(shape) if isinstance(shape, tuple) else shape, "data_offsets": offsets}

    two = {"a": f32([0, 8]), "b": f32([8, 16])}
    assert SafetensorsReader(damaged(json.dumps(two))).keys() == ["a", "b"]  # as written, it reads
    for header_text, kwargs, needle in [
        ("{}", {"length": 2**60}, r"its header length field says 1152921504606846976 bytes, more than the file's 18 bytes after it"),
        ("{}", {"length": 2**64 - 1}, r"its header length field says 18446744073709551615 bytes"),
        ("[1, 2]", {}, r"its header must be a JSON object; got list"),
        ("[" * 100_000 + "]" * 100_000, {}, r"it nests its values too deeply to read$"),
        ('{"a": ' + "1" * 5000 + "}", {}, r"Exceeds the limit \(4300 digits\) for integer string conversion: value has 5000 digits$"),
        ('{"a": %s, "a": %s}' % (json.dumps(f32([0, 8])), json.dumps(f32([8, 16]))), {}, r"the header names tensors more than once: \['a'\]"),
        (json.dumps({"a": f32([0, 8]), "b": f32([0, 8])}), {"data": bytes(8)}, r"tensor '[ab]' has data offsets \[0, 8\] that overlap the tensor before it"),
        (json.dumps({"a": f32([0, 8]), "b": f32([12, 20])}), {"data": bytes(20)}, r"tensor 'b' has data offsets \[12, 20\] that leave bytes 8 to 12 unused"),
        (json.dumps(two), {"data": bytes(24)}, r"its tensors end at data byte 16, but the file has 24 data bytes"),
        (json.dumps({"a": f32([0])}), {}, r"tensor 'a' must have data_offsets \[start, end\] of two integers >= 0; got \[0\]"),
        (json.dumps({"a": f32(["0", "8"])}), {}, r"tensor 'a' must have data_offsets \[start, end\] of two integers >= 0; got \['0', '8'\]"),
        (json.dumps({"a": f32([0, 8], shape=[2.0])}), {}, r"tensor 'a' must have a shape that is a list of sizes >= 0; got \[2.0\]"),
        (json.dumps({"a": f32([0, 8], shape="ab")}), {}, r"tensor 'a' must have a shape that is a list of sizes >= 0; got 'ab'"),
        (json.dumps({"a": f32([0, 8], dtype=["F32"])}), {}, r"tensor 'a' has dtype \['F32'\], which this reader does not support"),
        (json.dumps({"__metadata__": [1], **two}), {}, r"its __metadata__ must be a JSON object; got \[1\]"),
    ]:
        with pytest.raises(ValueError, match=r"damaged.safetensors(:| is not a safetensors file:) " + needle):
            SafetensorsReader(damaged(header_text, **kwargs))


def test_a_dangling_config_link_is_not_taken_for_a_config(tmp_path):
    # a HF cache snapshot whose blob is missing: a dangling config.json beside a Meta params.json
    # is the Meta checkpoint (as before 723cb77), and alone it is named
    from qlora_ext.checkpoint import checkpoint_format

    (tmp_path / "config.json").symlink_to(tmp_path / "missing-blob")
    with pytest.raises(FileNotFoundError, match=r"found \['config.json'\] \(config.json: a link to a missing file\)$"):
        checkpoint_format(tmp_path)
    (tmp_path / "params.json").write_text("{}")
    assert checkpoint_format(tmp_path) == "meta"


def test_unreadable_checkpoint_files_are_named(hf_models, tmp_path):
    """A folder where a file should be, a truncated or empty .bin (an interrupted download), a
    text file, an index entry naming a folder: each a ValueError or FileNotFoundError naming the
    file, never a raw IsADirectoryError / RuntimeError / EOFError / KeyError."""
    from qlora_ext.checkpoint.peft_adapter import read_adapter_config
    from qlora_ext.checkpoint.readers import hf_weight_files
    from qlora_ext.checkpoint.safetensors_io import SafetensorsReader

    (tmp_path / "config.json").mkdir()
    with pytest.raises(ValueError, match=rf"{tmp_path / 'config.json'} cannot be read as a JSON file: Is a directory"):
        read_json(tmp_path / "config.json")
    (tmp_path / "model.safetensors").mkdir()
    with pytest.raises(ValueError, match=r"model.safetensors cannot be read as a safetensors file: Is a directory"):
        SafetensorsReader(str(tmp_path / "model.safetensors"))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{")
    with pytest.raises(ValueError, match=r"adapter_config.json is not valid JSON"):
        read_adapter_config(adapter)
    (adapter / "adapter_config.json").write_text("[]")
    with pytest.raises(ValueError, match=r"adapter_config.json must hold a JSON object; got list"):
        read_adapter_config(adapter)

    folder = tmp_path / "bin"
    folder.mkdir()
    model, source = hf_models[2]
    shutil.copy(os.path.join(source, "config.json"), folder / "config.json")
    weights = folder / "pytorch_model.bin"
    torch.save(model.state_dict(), weights)
    llama2_from_checkpoint(folder)  # whole, it loads
    whole = weights.read_bytes()
    for name, content in (("truncated", whole[: len(whole) // 2]), ("empty", b""), ("text", b"not a checkpoint\n")):
        weights.write_bytes(content)
        with pytest.raises(ValueError, match=rf"checkpoint file {weights} cannot be read as a torch state dict \(truncated, or not a checkpoint\): "):
            llama2_from_checkpoint(folder)
    # A pickle naming a class besides the tensors is refused as such, not called truncated.
    torch.save({**model.state_dict(), "optimizer": torch.optim.SGD(model.parameters(), lr=0.1)}, weights)
    with pytest.raises(ValueError, match=rf"checkpoint file {weights} holds Python objects besides tensors, and loading them "
                       r"could run code \(torch.load\(weights_only=True\) refuses to unpickle torch.optim.sgd.SGD\)"):
        llama2_from_checkpoint(folder)
    # One whose unpickling would run a blocked module's function: refused alike, and torch's advice to
    # load it with weights_only=False is not passed on.
    marker = tmp_path / "ran"
    torch.save({**model.state_dict(), "x": TouchesWhenUnpickled(marker)}, weights)
    with pytest.raises(ValueError, match=r"holds Python objects besides tensors, .* refuses to unpickle posix.system\); save") as refused:
        llama2_from_checkpoint(folder)
    assert "weights_only` set to `False`" not in str(refused.value) and not marker.exists()
    # A training checkpoint wrapping the weights is named as such (it was a list of missing keys).
    torch.save({"state_dict": model.state_dict(), "step": 10}, weights)
    with pytest.raises(ValueError, match=rf"checkpoint file {weights} holds no tensors at its top level, only 'state_dict' \(OrderedDict\), "
                                         r"'step' \(int\) \(a training checkpoint wrapping the weights\?\); save the model's state_dict\(\) alone"):
        llama2_from_checkpoint(folder)
    # A record shorter than its pickle says, the zip's directory intact: torch.load(mmap=True) took
    # the missing bytes from the next record, and the model loaded with wrong weights, silently.
    torch.save(model.state_dict(), tmp_path / "whole.bin")
    with zipfile.ZipFile(tmp_path / "whole.bin") as source, zipfile.ZipFile(weights, "w", zipfile.ZIP_STORED) as damaged:
        for info in source.infolist():
            data = source.read(info.filename)
            damaged.writestr(info.filename, data[: len(data) // 2] if info.filename.endswith("/data/1") else data)
    with pytest.raises(ValueError, match=rf"checkpoint file {weights} cannot be read: its record data/1 holds \d+ bytes where its "
                                         r"tensor data needs \d+ \(the file is damaged inside\)"):
        llama2_from_checkpoint(folder)
    weights.unlink()
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {"a": "."}}))
    with pytest.raises(FileNotFoundError, match=r"names shards that do not exist \(or are no files\): \['\.'\]"):
        hf_weight_files(str(folder))
    # An index may only name shards inside the checkpoint's folder.
    (tmp_path / "outside.bin").write_bytes(whole)
    for shard in ("../outside.bin", str(tmp_path / "outside.bin"), "sub/../../outside.bin"):
        (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {"a": shard}}))
        with pytest.raises(ValueError, match=rf"pytorch_model.bin.index.json names shard files outside {folder}: \['{re.escape(shard)}'\]"):
            hf_weight_files(str(folder))
    (folder / "pytorch_model.bin.index.json").unlink()
    # A pipe where a file should be is refused, not opened (reading it would wait forever).
    os.mkfifo(folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match=rf"{weights} cannot be read as a checkpoint file: it is not a regular file"):
        llama2_from_checkpoint(folder)
    (folder / "config.json").unlink()
    os.mkfifo(folder / "config.json")
    with pytest.raises(ValueError, match=r"config.json cannot be read as a JSON file: it is not a regular file"):
        llama2_from_checkpoint(folder)
