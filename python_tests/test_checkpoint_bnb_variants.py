"""bitsandbytes 4-bit HF checkpoints as transformers writes them with settings other than
test_checkpoint_bnb.py's: other quant storages, fp16/bf16 quant states and compute dtypes, modules
left dense or lm_head quantized, sharded and .bin files, a partial last group of nested scales.
Each loads as stored (the NF4 storage is the file's, nothing re-quantized) with the logits of the
bitsandbytes-dequantized weights; what our format cannot hold (fp4, no double quantization,
blocksizes other than 64, sizes not a multiple of 64) is refused by name, though transformers loads it.
"""

from __future__ import annotations

import copy
import glob
import json
import os
import shutil

import pytest
import torch
from llama_helpers import hf_llama, rel_error, transformers

from qlora_ext import NF4Tensor
from qlora_ext.checkpoint import load_checkpoint
from qlora_ext.checkpoint import readers
from qlora_ext.checkpoint.convert import hf_to_ours
from qlora_ext.models.llama2 import llama2_from_checkpoint

ALL_ATTN = ["q_proj", "k_proj", "v_proj", "output_proj"]
BF16_TOLERANCE = 1.6e-2
STATE = ".quant_state.bitsandbytes__"


@pytest.fixture(scope="module")
def bnb_variant(tmp_path_factory):
    """variant(name, dense_overrides=None, torch_dtype=fp32, save_kwargs=None, **BitsAndBytesConfig) -> folder."""
    tf = transformers()
    pytest.importorskip("bitsandbytes")
    root = tmp_path_factory.mktemp("bnb_wild")
    dense_dirs = {}

    def dense(dense_overrides=None, torch_dtype=torch.float32):
        key = json.dumps(dense_overrides or {}, sort_keys=True) + str(torch_dtype)
        if key not in dense_dirs:
            dense_dirs[key] = root / f"dense{len(dense_dirs)}"
            hf_llama(num_kv_heads=2, seed=7, **(dense_overrides or {})).to(torch_dtype).save_pretrained(dense_dirs[key])
        return dense_dirs[key]

    def variant(name, dense_overrides=None, torch_dtype=torch.float32, save_kwargs=None, **quant):
        source = dense(dense_overrides, torch_dtype)
        folder = root / name
        quant = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
                 "bnb_4bit_compute_dtype": torch.float32, **quant}
        hf4 = tf.LlamaForCausalLM.from_pretrained(source, quantization_config=tf.BitsAndBytesConfig(**quant),
                                                  device_map="cpu", dtype=torch_dtype)
        hf4.save_pretrained(folder, **(save_kwargs or {}))
        return folder

    variant.dense = dense
    return variant


def _stored(folder):
    from safetensors.torch import load_file

    stored = {}
    for path in glob.glob(os.path.join(folder, "*.safetensors")):
        stored.update(load_file(path))
    for path in glob.glob(os.path.join(folder, "*.bin")):
        stored.update(torch.load(path, weights_only=True))
    return stored


def _bnb_models(folder):
    """HF + bitsandbytes (its fp32 path), and the same model with every 4-bit weight dequantized by
    bitsandbytes in float32 into a dense fp32 LlamaForCausalLM."""
    tf = transformers()
    import bitsandbytes as bnb

    hf4 = tf.LlamaForCausalLM.from_pretrained(folder, device_map="cpu").eval()
    for module in hf4.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    config = copy.deepcopy(hf4.config)
    del config.quantization_config
    dense = tf.LlamaForCausalLM(config).float().eval()
    state = {}
    for name, module in hf4.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            qs = copy.copy(module.weight.quant_state)
            qs.dtype = torch.float32
            state[name + ".weight"] = bnb.functional.dequantize_4bit(module.weight.data, qs)
        elif isinstance(module, (torch.nn.Linear, torch.nn.Embedding)) or name.endswith("norm"):
            state[name + ".weight"] = module.weight.detach().float()
    dense.load_state_dict(state, strict=False)
    return hf4, dense


def _to_bin(folder):
    """The same checkpoint as one pytorch_model.bin (safe_serialization=False)."""
    stored = _stored(folder)
    out = f"{folder}_bin"
    os.makedirs(out)
    torch.save(stored, os.path.join(out, "pytorch_model.bin"))
    shutil.copy(os.path.join(folder, "config.json"), out)
    return out


VARIANTS = {
    "storage_float16": dict(bnb_4bit_quant_storage=torch.float16),
    "storage_float32": dict(bnb_4bit_quant_storage=torch.float32),
    "storage_float64": dict(bnb_4bit_quant_storage=torch.float64),
    "storage_int8": dict(bnb_4bit_quant_storage=torch.int8),
    "compute_bfloat16": dict(bnb_4bit_compute_dtype=torch.bfloat16),
    "compute_float16": dict(bnb_4bit_compute_dtype=torch.float16),
    # quant_state dtype "bfloat16" / "float16": the model was quantized from a bf16 / fp16 checkpoint
    "model_bfloat16": dict(torch_dtype=torch.bfloat16, bnb_4bit_compute_dtype=torch.bfloat16),
    "model_float16": dict(torch_dtype=torch.float16, bnb_4bit_compute_dtype=torch.float16),
    "o_proj_and_lm_head_dense": dict(llm_int8_skip_modules=["o_proj", "lm_head"]),
    "lm_head_quantized": dict(llm_int8_skip_modules=[]),
    "sharded": dict(save_kwargs={"max_shard_size": "200KB"}),
    "pytorch_model_bin": dict(storage="bin"),
    # 192 wide: 576 absmax blocks per square weight, a partial last group of 256 nested scales
    "partial_nested_group": dict(dense_overrides=dict(hidden_size=192, intermediate_size=512)),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_transformers_bnb_variants_load_as_stored(bnb_variant, name):
    kwargs = dict(VARIANTS[name])
    as_bin = kwargs.pop("storage", None) == "bin"
    folder = bnb_variant(name, **kwargs)
    if as_bin:
        folder = _to_bin(folder)
    stored = _stored(folder)
    weights = sorted(k.split(STATE)[0] for k in stored if STATE in k)
    assert len(weights) == {"o_proj_and_lm_head_dense": 12, "lm_head_quantized": 15}.get(name, 14)
    hf4, dequantized = _bnb_models(folder)
    vocab = json.loads(open(os.path.join(folder, "config.json")).read())["vocab_size"]
    tokens = torch.randint(0, vocab, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, want_hf = dequantized(tokens).logits, hf4(tokens).logits.float()
    exact = "bfloat16" not in name and "float16" not in name or "storage" in name
    lora_output = name == "lm_head_quantized"
    nf4 = llama2_from_checkpoint(folder, ALL_ATTN, True, lora_output, quantize_base=True).eval()
    for key in weights:
        w = nf4.get_submodule(hf_to_ours(key).rsplit(".", 1)[0]).weight
        assert isinstance(w, NF4Tensor), key
        state = json.loads(bytes(stored[key + STATE + "nf4"].tolist()))
        assert torch.equal(w.packed, stored[key].reshape(-1).view(torch.uint8)), key
        assert torch.equal(w.absmax_codes, stored[key + ".absmax"]), key
        assert torch.equal(w.absmax_scales, stored[key + ".nested_absmax"]), key
        assert w.absmax_offset.item() == torch.tensor(state["nested_offset"], dtype=torch.float32).item(), key
    dense = llama2_from_checkpoint(folder).eval()
    with torch.no_grad():
        for model in (nf4, dense) if name != "o_proj_and_lm_head_dense" else (dense,):  # (o_proj NF4-quantized on load)
            got = model(tokens)
            assert rel_error(got, want) <= 1e-5
            assert rel_error(got, want_hf) <= (1e-5 if exact else BF16_TOLERANCE)


def _rewrite_blocksize(folder, dense_folder, out, blocksize):
    """Every 4-bit weight quantized again by bitsandbytes at another blocksize (what Params4bit(blocksize=...)
    or bitsandbytes on ROCm, whose default is 128, writes); transformers reads the blocksize from the quant state."""
    import bitsandbytes.functional as F
    from safetensors.torch import save_file

    stored, dense = _stored(folder), _stored(dense_folder)
    for key in sorted({k.split(STATE)[0] for k in stored if STATE in k}):
        for k in [k for k in stored if k == key or k.startswith(key + ".")]:
            del stored[k]
        packed, state = F.quantize_4bit(dense[key], blocksize=blocksize, compress_statistics=True, quant_type="nf4")
        stored[key] = packed
        stored.update({f"{key}.{k}": v for k, v in state.as_dict(packed=True).items()})
    os.makedirs(out)
    save_file(stored, os.path.join(out, "model.safetensors"))
    shutil.copy(os.path.join(folder, "config.json"), out)
    return out


KEY = "model.layers.0.mlp.down_proj.weight"


@pytest.mark.parametrize(
    "name, message",
    [
        ("fp4", rf"'{KEY}' cannot be read as NF4: quant_type must be 'nf4'; got 'fp4'$"),
        ("no_double_quant", rf"'{KEY}' cannot be read as NF4: double quantization is required \(bnb_4bit_use_double_quant=True\): "
                            rf"missing \['{KEY}.nested_absmax', '{KEY}.nested_quant_map', 'nested_offset \(in the quant_state\)'\]$"),
        ("blocksize_128", rf"'{KEY}' cannot be read as NF4: blocksize must be 64; got 128"),
        ("blocksize_256", rf"'{KEY}' cannot be read as NF4: blocksize must be 64; got 256"),
        ("not_multiple_of_64", rf"'{KEY}' cannot be read as NF4: the quant_state's shape \[40, 52\] must have a number of "
                               r"elements divisible by 64; got 2080$"),
    ],
)
def test_transformers_bnb_settings_outside_our_format_are_refused_by_name(bnb_variant, tmp_path, name, message):
    if name.startswith("blocksize"):
        base = bnb_variant("base_for_blocksize")
        folder = _rewrite_blocksize(base, bnb_variant.dense(), tmp_path / name, int(name.split("_")[1]))
    else:
        quant = {"fp4": dict(bnb_4bit_quant_type="fp4"), "no_double_quant": dict(bnb_4bit_use_double_quant=False)}.get(name, {})
        overrides = dict(hidden_size=40, intermediate_size=52) if name == "not_multiple_of_64" else None
        folder = bnb_variant(name, dense_overrides=overrides, **quant)
    hf4, dequantized = _bnb_models(folder)  # a checkpoint transformers + bitsandbytes load
    with pytest.raises(ValueError, match=message):
        llama2_from_checkpoint(folder)


def test_quantization_config_without_quant_method_is_bitsandbytes(bnb_variant, tmp_path):
    # transformers (AutoQuantizationConfig.from_dict) takes a quantization_config with load_in_4bit and no
    # quant_method as bitsandbytes 4-bit, as hand-written or pre-quant_method configs spell it.
    folder = bnb_variant("no_quant_method")
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True}
    (folder / "config.json").write_text(json.dumps(config))
    hf4, dequantized = _bnb_models(folder)
    tokens = torch.randint(0, 320, (1, 7))
    model = llama2_from_checkpoint(folder, ALL_ATTN, quantize_base=True).eval()
    with torch.no_grad():
        assert rel_error(model(tokens), dequantized(tokens).logits) <= 1e-5
    # a null quant_method alike (load_in_4bit decides, for transformers)
    config["quantization_config"]["quant_method"] = None
    (folder / "config.json").write_text(json.dumps(config))
    with torch.no_grad():
        assert rel_error(llama2_from_checkpoint(folder, ALL_ATTN, quantize_base=True).eval()(tokens), dequantized(tokens).logits) <= 1e-5


class _OrderedKeys(set):
    """A key set that iterates in a fixed order (the loader's choices must not depend on it)."""

    def __init__(self, keys, reverse):
        super().__init__(keys)
        self.reverse = reverse

    def __iter__(self):
        return iter(sorted(set.__iter__(self), reverse=self.reverse))


@pytest.mark.parametrize("reverse", [False, True], ids=["fp4_state_first", "nf4_state_first"])
def test_two_quant_states_for_one_weight_are_refused(bnb_variant, tmp_path, monkeypatch, reverse):
    # bitsandbytes' QuantState.from_dict: "There should be exactly one `quant_state` item"; ours took
    # whichever the key set's (hash-seeded) order gave first: loaded under some PYTHONHASHSEEDs.
    from safetensors.torch import save_file

    folder = bnb_variant("two_states")
    stored = _stored(folder)
    key = "model.layers.0.self_attn.q_proj.weight" + STATE
    state = json.loads(bytes(stored[key + "nf4"].tolist()))
    stored[key + "fp4"] = torch.tensor(list(json.dumps({**state, "quant_type": "fp4"}).encode()), dtype=torch.uint8)
    save_file(stored, folder / "model.safetensors")
    monkeypatch.setattr(readers.TensorFiles, "keys", lambda self: _OrderedKeys(self.shapes, reverse))
    # (the message names both quant-state keys, whichever came first)
    with pytest.raises(ValueError, match=r"^(?=.*'model.layers.0.self_attn.q_proj.weight')(?=.*bitsandbytes__fp4)(?=.*bitsandbytes__nf4)"):
        llama2_from_checkpoint(folder, ["q_proj"], quantize_base=True)


def test_materialized_qlora_model_takes_the_stored_storage(bnb_variant):
    folder = bnb_variant("materialized", bnb_4bit_quant_storage=torch.bfloat16)
    model = llama2_from_checkpoint(bnb_variant.dense(), ALL_ATTN, True, quantize_base=True)  # NF4 from the dense weights
    load_checkpoint(model, folder)
    stored = _stored(folder)
    w = model.layers[1].mlp.w2.weight
    assert torch.equal(w.packed, stored["model.layers.1.mlp.down_proj.weight"].view(-1).view(torch.uint8))
    assert torch.equal(w.absmax_scales, stored["model.layers.1.mlp.down_proj.weight.nested_absmax"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_nested_absmax_of_another_dtype_than_the_quant_states_is_refused(bnb_variant, dtype):
    # the quant state says nested_dtype "float32" and bitsandbytes reads the buffer's bytes as float32 (garbage
    # for bf16 ones), where its values were read: two tools, two models from one file
    from safetensors.torch import save_file

    folder = bnb_variant(f"nested_{dtype}")
    stored = _stored(folder)
    key = "model.layers.0.self_attn.q_proj.weight.nested_absmax"
    stored[key] = stored[key].to(dtype)
    save_file(stored, folder / "model.safetensors")
    with pytest.raises(ValueError, match=rf"'{key}' must be torch.float32 with \d+ elements for shape \[\d+, \d+\]; got {dtype} with \d+"):
        llama2_from_checkpoint(folder, ["q_proj"], quantize_base=True)
