"""bitsandbytes 4-bit HF checkpoints, in and out: transformers + bitsandbytes quantize a random
checkpoint (NF4, double quantization, on CPU) and save it; we load it into NF4Tensors exactly as
stored (no re-quantization) and match HF + bitsandbytes logits, also from bfloat16 quant storage;
unsupported quantization settings and bad storage tensors are reported by name before anything is
loaded. Out: ``save_hf_checkpoint(..., bnb_4bit=True)`` writes the keys transformers
writes, with bitsandbytes' 4-bit codes, and transformers loads it in 4 bits with our logits.

On a CPU with AVX512-BF16, bitsandbytes 0.50's ``Linear4bit`` runs inference (eval, no grad)
through a bf16 kernel (``support_avx512bf16_for_cpu``: weights repacked, activations in bf16),
whatever ``bnb_4bit_compute_dtype`` says. Against that path logits agree to bf16 precision only
(torch.testing's bf16 rtol); with it switched off bitsandbytes dequantizes and multiplies in
fp32, and the logits agree exactly, as the dequantized weights are bit-identical.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from llama_helpers import hf_llama, hf_logits, rel_error, transformers

from qlora_ext import NF4Tensor, to_nf4
from qlora_ext.checkpoint import load_checkpoint, save_hf_checkpoint
from qlora_ext.checkpoint.safetensors_io import SafetensorsReader
from qlora_ext.models.llama2 import llama2_from_checkpoint, lora_llama2
from qlora_ext.modules.peft import disable_adapter

ALL_ATTN = ["q_proj", "k_proj", "v_proj", "output_proj"]
BF16_TOLERANCE = 1.6e-2  # torch.testing's default rtol for bfloat16


@pytest.fixture(scope="module")
def bnb_checkpoint(tmp_path_factory):
    tf = transformers()
    pytest.importorskip("bitsandbytes")
    dense_dir = tmp_path_factory.mktemp("dense")
    bnb_dir = tmp_path_factory.mktemp("bnb4")
    hf_llama(num_kv_heads=2, seed=7).save_pretrained(dense_dir)
    quant = tf.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32
    )
    hf4 = tf.LlamaForCausalLM.from_pretrained(dense_dir, quantization_config=quant, device_map="cpu").eval()
    hf4.save_pretrained(bnb_dir)
    hf4_fp32 = tf.LlamaForCausalLM.from_pretrained(dense_dir, quantization_config=quant, device_map="cpu").eval()
    for module in hf4_fp32.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return {"default": hf4, "fp32": hf4_fp32}, str(dense_dir), str(bnb_dir)


def _stored(bnb_dir):
    from safetensors.torch import load_file

    return load_file(os.path.join(bnb_dir, "model.safetensors"))


def test_bnb_state_becomes_nf4_without_requantizing(bnb_checkpoint):
    _, _, bnb_dir = bnb_checkpoint
    stored = _stored(bnb_dir)
    model = llama2_from_checkpoint(bnb_dir, ALL_ATTN, apply_lora_to_mlp=True, quantize_base=True)
    for ours, theirs in (("layers.0.attn.q_proj", "model.layers.0.self_attn.q_proj"), ("layers.1.mlp.w2", "model.layers.1.mlp.down_proj")):
        w = model.get_submodule(ours).weight
        assert isinstance(w, NF4Tensor)
        state = json.loads(bytes(stored[f"{theirs}.weight.quant_state.bitsandbytes__nf4"].tolist()))
        assert torch.equal(w.packed, stored[f"{theirs}.weight"].view(-1))
        assert torch.equal(w.absmax_codes, stored[f"{theirs}.weight.absmax"])
        assert torch.equal(w.absmax_scales, stored[f"{theirs}.weight.nested_absmax"])
        assert w.absmax_offset.item() == torch.tensor(state["nested_offset"], dtype=torch.float32).item()
        assert list(w.shape) == state["shape"]


@pytest.mark.parametrize("bnb_path", ["fp32", "default"])
def test_logits_match_transformers_bitsandbytes(bnb_checkpoint, bnb_path):
    hf4, _, bnb_dir = bnb_checkpoint
    tokens = torch.randint(0, 320, (2, 15))
    want = hf_logits(hf4[bnb_path], tokens)
    tolerance = 1e-5 if bnb_path == "fp32" else BF16_TOLERANCE
    nf4_model = llama2_from_checkpoint(bnb_dir, ALL_ATTN, apply_lora_to_mlp=True, quantize_base=True).eval()
    # Linears without LoRA stay dense: their bnb weights are dequantized on load.
    dense_model = llama2_from_checkpoint(bnb_dir).eval()
    with torch.no_grad():
        assert rel_error(nf4_model(tokens), want) <= tolerance
        assert rel_error(dense_model(tokens), want) <= tolerance


def test_quantizing_the_dense_checkpoint_matches_bitsandbytes(bnb_checkpoint):
    hf4, dense_dir, bnb_dir = bnb_checkpoint
    stored = _stored(bnb_dir)
    model = llama2_from_checkpoint(dense_dir, ALL_ATTN, apply_lora_to_mlp=True, quantize_base=True).eval()
    # The 4-bit codes are bitsandbytes' exactly; the 8-bit absmax codes may differ on near-ties.
    w = model.layers[0].attn.v_proj.weight
    assert torch.equal(w.packed, stored["model.layers.0.self_attn.v_proj.weight"].view(-1))
    tokens = torch.randint(0, 320, (1, 11))
    with torch.no_grad():
        # Near-tie absmax codes differ by one step in ~0.2% of blocks: ~2e-4 here.
        assert rel_error(model(tokens), hf_logits(hf4["fp32"], tokens)) <= 1e-3
        assert rel_error(model(tokens), hf_logits(hf4["default"], tokens)) <= BF16_TOLERANCE


def _rewrite(bnb_dir, tmp_path, edit):
    from safetensors.torch import save_file

    stored = _stored(bnb_dir)
    edit(stored)
    save_file(stored, tmp_path / "model.safetensors")
    shutil.copy(os.path.join(bnb_dir, "config.json"), tmp_path / "config.json")
    return tmp_path


def _edit_state(key, **changes):
    def edit(stored):
        state = json.loads(bytes(stored[key].tolist()))
        state.update(changes)
        stored[key] = torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8)

    return edit


QS = "model.layers.0.self_attn.q_proj.weight.quant_state.bitsandbytes__nf4"


@pytest.mark.parametrize(
    "edit, message",
    [
        (_edit_state(QS, blocksize=128), r"'model.layers.0.self_attn.q_proj.weight' cannot be read as NF4: blocksize must be 64; got 128"),
        (_edit_state(QS, nested_blocksize=512), r"nested_blocksize must be 256; got 512"),
        (
            lambda s: s.__setitem__("model.layers.0.self_attn.q_proj.weight.quant_map", torch.linspace(-1, 1, 16)),
            r"model.layers.0.self_attn.q_proj.weight.quant_map must equal this package's table \(qlora_ext._tables\); "
            r"it differs at 14 of 16 entries, first at index 1: ",
        ),
        (  # what bitsandbytes 0.46 to 0.49 wrote when they quantized on a CPU
            lambda s: s["model.layers.0.self_attn.q_proj.weight.nested_quant_map"].__setitem__(0, -1.0),
            r"nested_quant_map must equal this package's table \(qlora_ext._tables\); it differs at 1 of 256 entries, first "
            r"at index 0: -1.0 where the table has -0.99296\d+ \(bitsandbytes 0.46 to 0.49 quantized with -1.0 there on a CPU: "
            r"save the model again with bitsandbytes >= 0.50, or load its unquantized checkpoint",
        ),
        (
            lambda s: s.__setitem__("model.layers.0.self_attn.q_proj.weight.nested_quant_map", torch.zeros(128)),
            r"nested_quant_map must equal this package's table \(qlora_ext._tables\); it has 128 entries, the table 256",
        ),
        (
            lambda s: s.__setitem__(QS.replace("nf4", "fp4"), s.pop(QS)),
            r"quant_type must be 'nf4'; got 'fp4'",
        ),
        (
            lambda s: (s.pop("model.layers.0.self_attn.q_proj.weight.nested_absmax"), s.pop("model.layers.0.self_attn.q_proj.weight.nested_quant_map")),
            r"double quantization is required \(bnb_4bit_use_double_quant=True\)",
        ),
        (
            lambda s: s.pop("model.layers.0.self_attn.q_proj.weight.absmax"),
            r"cannot be read as NF4: missing keys \['model.layers.0.self_attn.q_proj.weight.absmax'\]$",
        ),
        (  # was a bare KeyError
            lambda s: s.pop("model.layers.0.self_attn.q_proj.weight"),
            r"cannot be read as NF4: missing keys \['model.layers.0.self_attn.q_proj.weight'\]$",
        ),
        (  # was a bare JSONDecodeError
            lambda s: s.__setitem__(QS, s[QS][:-5]),
            rf"cannot be read as NF4: '{QS}' is not a UTF-8 JSON quant state: ",
        ),
        (  # was a RecursionError; and Python's advice on long numbers is left out
            lambda s: s.__setitem__(QS, torch.tensor(list(b"[" * 50_000 + b"]" * 50_000), dtype=torch.uint8)),
            rf"'{QS}' is not a UTF-8 JSON quant state: it nests its values too deeply to read$",
        ),
        (
            lambda s: s.__setitem__(QS, torch.tensor(list(b'{"nested_offset": ' + b"1" * 5000 + b"}"), dtype=torch.uint8)),
            rf"'{QS}' is not a UTF-8 JSON quant state: Exceeds the limit \(4300 digits\) for integer string conversion: value has "
            r"5000 digits$",
        ),
        (  # LLM.int8 row scales (a load_in_8bit save): named as such, not as unexpected keys and int8 weights
            lambda s: s.__setitem__("model.layers.0.self_attn.k_proj.SCB", torch.ones(256)),
            r"bitsandbytes 8-bit weights \(load_in_8bit; keys like 'model.layers.0.self_attn.k_proj.SCB'\) are not supported",
        ),
        (_edit_state(QS, quant_type="fp4"), r"the quant_state's quant_type must be 'nf4'; got 'fp4'"),  # bitsandbytes reads this one
        (_edit_state(QS, nested_offset=float("nan")), r"the quant_state's nested_offset must be a finite number; got nan"),
        (_edit_state(QS, nested_offset="abc"), r"the quant_state's nested_offset must be a finite number; got 'abc'"),
        (_edit_state(QS, dtype=["float32"]), r"dtype must be one of \[.*\]; got \['float32'\]"),  # (was a TypeError: unhashable)
        (
            lambda s: s["model.layers.0.self_attn.q_proj.weight.nested_absmax"].__setitem__(0, float("inf")),
            r"model.layers.0.self_attn.q_proj.weight.nested_absmax must hold finite scales; it has NaN or Inf",
        ),
        (
            lambda s: s.__setitem__(QS, s[QS].float()),
            rf"'{QS}' must be a 1-D uint8 tensor \(UTF-8 JSON bytes\); got torch.float32 of shape \[\d+\]",
        ),
    ],
    ids=["blocksize", "nested_blocksize", "quant_map", "nested_map_of_bnb_0.49_on_cpu", "nested_map_length", "fp4", "no_double_quant",
         "no_absmax", "no_packed_codes", "bad_json", "deep_json", "long_number_json", "int8", "json_fp4", "nan_offset", "text_offset", "list_dtype", "inf_nested_absmax", "float_state"],
)
def test_unsupported_bnb_settings_are_named(bnb_checkpoint, tmp_path, edit, message):
    _, _, bnb_dir = bnb_checkpoint
    folder = _rewrite(bnb_dir, tmp_path, edit)
    with pytest.raises(ValueError, match=message):
        llama2_from_checkpoint(folder, ALL_ATTN, quantize_base=True)


def test_bfloat16_quant_storage_is_read_as_the_same_bytes(bnb_checkpoint, tmp_path):
    # bnb_4bit_quant_storage=bfloat16 (FSDP-QLoRA) stores the packed uint8 codes reinterpreted as
    # bfloat16 ([numel / 4, 1]); transformers + bitsandbytes write it, we read the same NF4 storage.
    tf = transformers()
    _, dense_dir, bnb_dir = bnb_checkpoint
    quant = tf.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_storage=torch.bfloat16,
    )
    tf.LlamaForCausalLM.from_pretrained(dense_dir, quantization_config=quant, device_map="cpu").save_pretrained(tmp_path)
    stored, uint8_stored = _stored(tmp_path), _stored(bnb_dir)
    key = "model.layers.0.self_attn.q_proj.weight"
    assert stored[key].dtype == torch.bfloat16 and stored[key].shape == (uint8_stored[key].shape[0] // 2, 1)
    assert torch.equal(stored[key].view(torch.uint8), uint8_stored[key].view(-1, 2))  # the same bytes
    ours = llama2_from_checkpoint(tmp_path, ALL_ATTN, apply_lora_to_mlp=True, quantize_base=True).eval()
    want = llama2_from_checkpoint(bnb_dir, ALL_ATTN, apply_lora_to_mlp=True, quantize_base=True).eval()
    for name in ("layers.0.attn.q_proj", "layers.1.mlp.w2"):
        got, expected = ours.get_submodule(name).weight, want.get_submodule(name).weight
        assert all(torch.equal(a, b) for a, b in zip(got.components(), expected.components())), name
    tokens = torch.randint(0, 320, (2, 9))
    with torch.no_grad():
        assert torch.equal(ours(tokens), want(tokens))
        assert torch.equal(llama2_from_checkpoint(tmp_path).eval()(tokens), llama2_from_checkpoint(bnb_dir).eval()(tokens))


UP1 = "model.layers.1.mlp.up_proj.weight"


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda s: s.__setitem__(UP1, s[UP1].view(-1).view(torch.int32).reshape(-1, 1)), rf"'{UP1}' must be stored as one of \[.*\] \(bnb_4bit_quant_storage\); got torch.int32"),
        (lambda s: s.__setitem__(UP1, s[UP1][:-8]), rf"'{UP1}' must hold 98304 bytes \(two codes per byte\) for shape \[768, 256\]; got 98296"),
        (lambda s: s.__setitem__(UP1 + ".absmax", s[UP1 + ".absmax"].float()), rf"'{UP1}.absmax' must be torch.uint8 with 3072 elements .*; got torch.float32 with 3072"),
        (lambda s: s.__setitem__(UP1 + ".nested_absmax", s[UP1 + ".nested_absmax"][:1]), rf"'{UP1}.nested_absmax' must be .* with 12 elements .*; got torch.float32 with 1"),
    ],
    ids=["storage_dtype", "packed_size", "absmax_dtype", "nested_absmax_size"],
)
def test_bad_storage_is_refused_before_anything_is_loaded(bnb_checkpoint, tmp_path, edit, message):
    # The bad weight is one of the last: every tensor is checked before any is assigned, so the
    # model is left as it was, not half overwritten.
    _, dense_dir, bnb_dir = bnb_checkpoint
    folder = _rewrite(bnb_dir, tmp_path, edit)
    model = llama2_from_checkpoint(dense_dir, ALL_ATTN, quantize_base=True).eval()
    before = {name: t.clone() for name, t in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        load_checkpoint(model, folder)
    after = model.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_truncated_file_is_refused_before_anything_is_loaded(bnb_checkpoint, tmp_path):
    _, dense_dir, _ = bnb_checkpoint
    shutil.copy(os.path.join(dense_dir, "config.json"), tmp_path / "config.json")
    data = Path(dense_dir, "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-100])  # the last tensor's end is missing
    model = llama2_from_checkpoint(dense_dir).eval()
    before = {name: t.clone() for name, t in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"model.safetensors: tensor '.*' \(F32 \[.*\]\) has data offsets .* do not fit .* \(a truncated or corrupt file\)"):
        load_checkpoint(model, tmp_path)
    assert all(torch.equal(before[name], t) for name, t in model.state_dict().items())


def test_dense_source_quantization_is_ours(bnb_checkpoint):
    # The NF4 weights of a dense load are exactly to_nf4 of the checkpoint tensor.
    _, dense_dir, _ = bnb_checkpoint
    from safetensors.torch import load_file

    dense = load_file(os.path.join(dense_dir, "model.safetensors"))
    model = llama2_from_checkpoint(dense_dir, ["k_proj"], quantize_base=True)
    want = to_nf4(dense["model.layers.1.self_attn.k_proj.weight"])
    assert all(torch.equal(a, b) for a, b in zip(model.layers[1].attn.k_proj.weight.components(), want.components()))


@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["own_dtype", "bf16"])
def test_bnb_4bit_save_is_what_transformers_writes_and_loads(bnb_checkpoint, tmp_path, dtype):
    _, dense_dir, bnb_dir = bnb_checkpoint
    theirs = _stored(bnb_dir)
    # LoRA on q/v and the MLP: their bases are NF4 (written as stored), k/o are dense (quantized on save)
    model = llama2_from_checkpoint(dense_dir, ["q_proj", "v_proj"], apply_lora_to_mlp=True, quantize_base=True).eval()
    for name, p in model.named_parameters():
        if "lora_b" in name:
            p.data.normal_()  # an adapter that changes the output: it must not reach the base file
    save_hf_checkpoint(model, tmp_path, merge_adapters=False, bnb_4bit=True, dtype=dtype)
    mine = _stored(tmp_path)
    assert set(mine) == set(theirs)
    for key, value in theirs.items():  # a quant state's JSON length depends on its offset's digits
        quantized = "proj.weight" in key  # the codes and their tables keep their dtypes, the rest is cast
        assert mine[key].dtype == (value.dtype if quantized else dtype or value.dtype), key
        assert key.endswith(".bitsandbytes__nf4") or mine[key].shape == value.shape, key
    dense = _stored(dense_dir)
    for key, value in theirs.items():
        if key.endswith(("proj.weight", "quant_map")):  # the 4-bit codes and tables: bitsandbytes' exactly
            if dtype is not None and key.endswith(("k_proj.weight", "o_proj.weight")):  # dense: cast, then quantized
                value = to_nf4(dense[key].to(dtype)).packed.view(-1, 1)
            assert torch.equal(mine[key], value), key
        if key.endswith(".bitsandbytes__nf4"):
            state = json.loads(bytes(mine[key].tolist()))
            assert state["dtype"] == str(dtype or torch.float32).removeprefix("torch.")
            assert list(state) == list(json.loads(bytes(value.tolist())))
    q = model.layers[1].attn.q_proj.weight
    assert torch.equal(mine["model.layers.1.self_attn.q_proj.weight.absmax"], q.absmax_codes)
    assert torch.equal(mine["model.layers.1.self_attn.q_proj.weight.nested_absmax"], q.absmax_scales)
    assert mine["model.norm.weight"].dtype == (dtype or torch.float32)

    config = json.loads((tmp_path / "config.json").read_text())
    their_config = json.loads((Path(bnb_dir) / "config.json").read_text())["quantization_config"]
    want = {k: v for k, v in their_config.items() if not k.startswith("_")}
    want["bnb_4bit_compute_dtype"] = str(dtype or torch.float32).removeprefix("torch.")
    assert config["quantization_config"] == want

    hf4 = transformers().LlamaForCausalLM.from_pretrained(tmp_path, device_map="cpu", torch_dtype=torch.float32).eval()
    assert type(hf4.model.layers[0].self_attn.k_proj).__name__ == "Linear4bit"
    for module in hf4.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False  # bitsandbytes' fp32 path: the same dequantized weights
    back = llama2_from_checkpoint(tmp_path, ALL_ATTN, apply_lora_to_mlp=True, quantize_base=True).eval()
    assert torch.equal(back.layers[1].attn.q_proj.weight.packed, q.packed)  # the base, not base + adapter
    tokens = torch.randint(0, 320, (2, 13))
    with torch.no_grad():
        assert rel_error(back(tokens), hf_logits(hf4, tokens)) <= (1e-5 if dtype is None else BF16_TOLERANCE)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, r"bnb_4bit=True needs merge_adapters=False .* save_peft_adapter"),
        (
            {"merge_adapters": False, "dtype": torch.float64},
            r"argument 'dtype' must be None \(each weight's own\) or one of \[torch.float32, torch.bfloat16, torch.float16\] "
            r"with bnb_4bit=True; got torch.float64",
        ),
    ],
    ids=["merge", "float64"],
)
def test_bnb_4bit_save_refuses_what_it_cannot_write(bnb_checkpoint, tmp_path, kwargs, message):
    _, dense_dir, _ = bnb_checkpoint
    model = llama2_from_checkpoint(dense_dir, ["q_proj"], quantize_base=True)
    with pytest.raises(ValueError, match=message):
        save_hf_checkpoint(model, tmp_path / "out", bnb_4bit=True, **kwargs)
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")


def test_bnb_4bit_save_of_a_float64_model_names_the_weight(bnb_checkpoint, tmp_path):
    # dtype=None keeps each weight's own: float64, which bitsandbytes' quant state cannot name.
    _, dense_dir, _ = bnb_checkpoint
    model = llama2_from_checkpoint(dense_dir, [], quantize_base=False).double()
    model.tok_embeddings.float()  # the quant state's dtype is fine; a linear's own is not
    with pytest.raises(ValueError, match=r"save_hf_checkpoint: bnb_4bit=True writes 4-bit weights that dequantize to one of "
                                         r"\[torch.float32, torch.bfloat16, torch.float16\] .*; parameter 'layers.0.attn.q_proj.weight' "
                                         r"is torch.float64: pass dtype=torch.float32"):
        save_hf_checkpoint(model, tmp_path / "out", bnb_4bit=True)
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")
    # A QLoRA model made float64: its NF4 linears stay float32, the embedding's dtype is float64
    qlora = llama2_from_checkpoint(dense_dir, ["q_proj", "v_proj"], apply_lora_to_mlp=True, quantize_base=True).double()
    with pytest.raises(ValueError, match=r"bnb_4bit=True records the model's dtype, that of tok_embeddings.weight, .* it is "
                                         r"torch.float64: pass dtype=torch.float32"):
        save_hf_checkpoint(qlora, tmp_path / "out", bnb_4bit=True, merge_adapters=False)
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")


# the saved 4-bit weights decode to the model's own base weights (helper-148's mutant: nested_offset written as 0.0)
def test_bnb_4bit_save_keeps_each_weights_offset_and_the_base_logits(tmp_path):
    torch.manual_seed(0)
    model = lora_llama2(ALL_ATTN, True, False, vocab_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                        embed_dim=64, max_seq_len=32, intermediate_dim=128, lora_rank=4, lora_alpha=8.0,
                        quantize_base=True).eval()
    for name, p in model.named_parameters():
        if "lora_b" in name:
            p.data.normal_()  # an adapter that changes the output: it must not reach the base file
    save_hf_checkpoint(model, tmp_path, merge_adapters=False, bnb_4bit=True)

    q = model.layers[1].attn.q_proj.weight
    reader = SafetensorsReader(str(next(tmp_path.glob("*.safetensors"))))
    try:
        state = json.loads(bytes(reader.get("model.layers.1.self_attn.q_proj.weight.quant_state.bitsandbytes__nf4").tolist()))
    finally:
        reader.close()
    assert torch.tensor(state["nested_offset"], dtype=torch.float32).item() == q.absmax_offset.item() != 0.0

    back = llama2_from_checkpoint(tmp_path, ALL_ATTN, apply_lora_to_mlp=True, quantize_base=True).eval()
    for a, b in zip(back.layers[1].attn.q_proj.weight.components(), q.components()):
        assert torch.equal(a, b)
    tokens = torch.randint(0, 64, (2, 13))
    with torch.no_grad(), disable_adapter(model):
        want = model(tokens)
    with torch.no_grad():
        torch.testing.assert_close(back(tokens), want, rtol=1e-5, atol=1e-5)
