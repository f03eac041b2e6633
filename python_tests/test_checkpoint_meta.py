"""Meta checkpoints in (consolidated.*.pth + params.json): the q/k rotary layout is converted so
our logits match both transformers' LlamaForCausalLM and an independent Meta-style reference
forward; model-parallel shards are concatenated; params.json sizing rules. And out
(``save_meta_checkpoint``): the same keys, layout and params.json back."""

from __future__ import annotations

import json
import re

import pytest
import torch
from llama_helpers import hf_llama, hf_logits, hf_to_meta_state, meta_params, meta_reference_logits, rel_error, transformers

from qlora_ext.checkpoint import Llama2Config, read_checkpoint_config
from qlora_ext.checkpoint.convert import hf_to_meta_rotary, meta_to_hf_rotary
from qlora_ext.checkpoint.load import stored_dtype
from qlora_ext.models.llama2 import llama2_from_checkpoint

# fairscale's layout: column-parallel weights split rows, row-parallel ones and the embedding
# split columns, norms are replicated.
_SPLIT_DIM = {"wq": 0, "wk": 0, "wv": 0, "wo": 1, "w1": 0, "w3": 0, "w2": 1, "tok_embeddings": 1, "output": 0}


def _write_meta(folder, model, shards: int = 1):
    state, params = hf_to_meta_state(model), meta_params(model)
    (folder / "params.json").write_text(json.dumps(params))
    for i in range(shards):
        shard = {}
        for name, t in state.items():
            key = name.split(".")[-2] if name.startswith("layers.") else name.split(".")[0]
            dim = _SPLIT_DIM.get(key)
            shard[name] = t if dim is None or shards == 1 else t.chunk(shards, dim)[i].clone()
        torch.save(shard, folder / f"consolidated.{i:02d}.pth")
    return state, params


@pytest.mark.parametrize(
    "kv, settings",
    [(4, {}), (2, {}), (2, {"rope_theta": 500_000.0, "rms_norm_eps": 1e-6})],
    ids=["mha", "gqa", "gqa-rope5e5-eps1e-6"],
)
def test_meta_checkpoint_matches_hf_and_meta_reference(tmp_path, kv, settings):
    transformers()
    hf = hf_llama(num_kv_heads=kv, seed=10 + kv, **settings)
    state, params = _write_meta(tmp_path, hf)
    if settings:  # they reach params.json, and from there our model
        assert (params["rope_theta"], params["norm_eps"]) == (settings["rope_theta"], settings["rms_norm_eps"])
        config = read_checkpoint_config(tmp_path)
        assert (config.rope_base, config.norm_eps) == (settings["rope_theta"], settings["rms_norm_eps"])
    tokens = torch.randint(0, 320, (2, 19))
    want = hf_logits(hf, tokens)
    # The test's own Meta conversion is right: Meta's forward on it reproduces HF.
    assert rel_error(meta_reference_logits(state, params, tokens), want) <= 1e-5
    ours = llama2_from_checkpoint(tmp_path).eval()
    with torch.no_grad():
        got = ours(tokens)
    assert rel_error(got, want) <= 1e-5
    # Undoing the permutation makes the logits far off: the comparison can tell layouts apart.
    with torch.no_grad():
        for layer in ours.layers:
            for proj, heads in ((layer.attn.q_proj, 4), (layer.attn.k_proj, kv)):
                proj.weight.copy_(hf_to_meta_rotary(proj.weight, heads))
        err = rel_error(ours(tokens), want)  # about 5e-2 here
        assert err > 1e-3


def test_meta_model_parallel_shards_are_concatenated(tmp_path):
    transformers()
    hf = hf_llama(num_kv_heads=2, seed=3)
    _write_meta(tmp_path, hf, shards=2)
    assert stored_dtype(tmp_path) == torch.float32  # what a merged save of it is written in (Meta declares none)
    tokens = torch.randint(0, 320, (1, 13))
    ours = llama2_from_checkpoint(tmp_path).eval()
    with torch.no_grad():
        assert rel_error(ours(tokens), hf_logits(hf, tokens)) <= 1e-5


def test_meta_shards_go_by_their_rank_and_must_all_agree(tmp_path):
    # consolidated.NN.pth is rank NN: listed in any order they load the same; a gap, a shard too
    # many, or shards that differ where they must agree are refused by name, before anything loads.
    import shutil

    from qlora_ext.checkpoint import load_checkpoint

    transformers()
    hf = hf_llama(num_kv_heads=2, seed=4)
    _write_meta(tmp_path, hf, shards=2)
    tokens = torch.randint(0, 320, (1, 7))
    want = hf_logits(hf, tokens)
    ours = llama2_from_checkpoint(tmp_path).eval()
    load_checkpoint(ours, tmp_path, checkpoint_files=["consolidated.01.pth", "consolidated.00.pth"])
    with torch.no_grad():
        assert rel_error(ours(tokens), want) <= 1e-5

    def refused(folder, needle, **kwargs):
        before = [p.detach().clone() for p in ours.parameters()]
        with pytest.raises(ValueError) as err:
            load_checkpoint(ours, folder, **kwargs)
        assert needle in str(err.value), str(err.value)
        assert all(torch.equal(a, b) for a, b in zip(before, ours.parameters()))  # nothing loaded

    gap = tmp_path / "gap"
    shutil.copytree(tmp_path, gap)
    (gap / "consolidated.01.pth").rename(gap / "consolidated.02.pth")
    refused(gap, "no shard for model-parallel rank(s) [1] (consolidated.01.pth); ranks 0 to 2 need one file each; "
                 "found ['consolidated.00.pth', 'consolidated.02.pth']")
    refused(tmp_path, "argument 'checkpoint_files' names each file once; got './consolidated.01.pth' twice",
            checkpoint_files=["consolidated.00.pth", "consolidated.01.pth", "./consolidated.01.pth"])
    twice = tmp_path / "twice"
    shutil.copytree(tmp_path, twice, ignore=shutil.ignore_patterns("gap"))
    shutil.copy(twice / "consolidated.01.pth", twice / "consolidated.1.pth")
    refused(twice, "are both model-parallel rank 1", checkpoint_files=["consolidated.00.pth", "consolidated.01.pth", "consolidated.1.pth"])
    extra = tmp_path / "extra"
    shutil.copytree(tmp_path, extra)
    shutil.copy(extra / "consolidated.01.pth", extra / "consolidated.02.pth")
    refused(extra, "of layers.0.attention.wq.weight, so the checkpoint was cut into 2 model-parallel shards; found 3: "
                   "['consolidated.00.pth', 'consolidated.01.pth', 'consolidated.02.pth']")
    odd = tmp_path / "odd"
    shutil.copytree(tmp_path, odd)
    shutil.copy(odd / "consolidated.01.pth", odd / "consolidated.old.pth")
    refused(odd, f"Meta checkpoint file {odd / 'consolidated.old.pth'}: the shards of a model-parallel checkpoint must be named "
                 "consolidated.NN.pth")
    for key, cut in (("layers.1.attention.wv.weight", lambda t: t[:, :-8]), ("norm.weight", lambda t: t[:-1])):
        bad = tmp_path / f"bad_{key}"
        shutil.copytree(tmp_path, bad)
        shard = torch.load(bad / "consolidated.01.pth")
        shard[key] = cut(shard[key]).clone()
        torch.save(shard, bad / "consolidated.01.pth")
        refused(bad, f"Meta checkpoint: '{key}' is {list(shard[key].shape)} in {bad / 'consolidated.01.pth'}")


def test_rotary_permutation_round_trip_and_pairing():
    w = torch.arange(2 * 8 * 3, dtype=torch.float32).reshape(16, 3)  # 2 heads of dim 8
    hf = meta_to_hf_rotary(w, num_heads=2)
    assert torch.equal(hf_to_meta_rotary(hf, num_heads=2), w)
    # Head 0: Meta rows (0,1),(2,3),(4,5),(6,7) are pairs; HF puts pair j at rows j and j + 4.
    assert torch.equal(hf[:8, 0], w[[0, 2, 4, 6, 1, 3, 5, 7], 0])
    assert torch.equal(hf[8:, 0], w[[8, 10, 12, 14, 9, 11, 13, 15], 0])


def test_params_json_sizes():
    # Llama-2 70B's params.json: the FFN width comes from ffn_dim_multiplier and multiple_of.
    p70 = {"dim": 8192, "multiple_of": 4096, "ffn_dim_multiplier": 1.3, "n_heads": 64, "n_kv_heads": 8, "n_layers": 80, "norm_eps": 1e-05, "vocab_size": -1}
    c = Llama2Config.from_meta(p70, vocab_size=32000)
    assert (c.intermediate_dim, c.num_kv_heads, c.vocab_size) == (28672, 8, 32000)
    p7 = {"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32, "norm_eps": 1e-05, "vocab_size": -1}
    assert Llama2Config.from_meta(p7, vocab_size=32000).intermediate_dim == 11008
    with pytest.raises(ValueError, match=r"argument 'vocab_size' is needed because params.json has vocab_size -1; got None"):
        Llama2Config.from_meta(p7)
    with pytest.raises(ValueError, match=r"params.json lacks required fields \['n_layers'\]"):
        Llama2Config.from_meta({"dim": 8, "n_heads": 2})
    # Llama 3.1's scaled RoPE (and other settings this model lacks) are refused, all named.
    with pytest.raises(
        ValueError, match=r"unsupported params.json: 'use_scaled_rope' must be false or absent, got True; 'moe' must be absent, got"
    ):
        Llama2Config.from_meta({**p7, "use_scaled_rope": True, "moe": {"experts": 8}}, vocab_size=32000)
    # Fields of the wrong kind are named as params.json's (they were TypeErrors or ZeroDivisionErrors).
    wrong = {**p7, "dim": "4096", "multiple_of": 0, "n_kv_heads": 2.5, "rope_theta": "abc", "ffn_dim_multiplier": "1.3",
             "norm_eps": None, "vocab_size": "320", "n_layers": 5000}
    with pytest.raises(ValueError) as err:
        Llama2Config.from_meta(wrong, vocab_size=32000)
    assert str(err.value) == (
        "Llama2Config.from_meta: unsupported params.json: 'dim' must be a positive integer, got '4096'; "
        "'n_kv_heads' must be a positive integer, got 2.5; 'multiple_of' must be a positive integer, got 0; "
        "'norm_eps' must be a positive number, got None; 'rope_theta' must be a positive number, got 'abc'; "
        "'ffn_dim_multiplier' must be a positive number, got '1.3'; 'vocab_size' must be a positive integer or -1 "
        "(the tokenizer's), got '320'; 'n_layers' must be at most 1024, got 5000"
    )
    # widths past int64 element counts, and an FFN multiplier whose product is past float's range, are
    # named (torch.empty, or int(inf), raised)
    with pytest.raises(ValueError, match=r"params.json: 'vocab_size' must be at most 16777216, got 10{30}; 'dim' must be at most "
                                         r"16777216, got 10{20}$"):
        Llama2Config.from_meta({**p7, "vocab_size": 10**30, "dim": 10**20}, vocab_size=32000)
    for multiplier in (1e308, 1e4):
        with pytest.raises(ValueError, match=rf"params.json: 'dim' 4096, 'ffn_dim_multiplier' {re.escape(repr(multiplier))} and 'multiple_of' "
                                             r"256 give an FFN width \(Meta's rule\) above 16777216$"):
            Llama2Config.from_meta({**p7, "ffn_dim_multiplier": multiplier}, vocab_size=32000)
    with pytest.raises(ValueError, match=r"params.json: 'dim' 8388608 and 'multiple_of' 256 give an FFN width \(Meta's rule\) above 16777216$"):
        Llama2Config.from_meta({**p7, "dim": 8388608, "n_heads": 1}, vocab_size=32000)  # (8/3 of dim, no multiplier)
    with pytest.raises(ValueError, match=r"params.json: 'rope_theta' must be a positive number within float's range \(about 1.8e308\), got "
                                         r"an integer of 1329 bits$"):
        Llama2Config.from_meta({**p7, "rope_theta": 10**400}, vocab_size=32000)
    assert Llama2Config.from_meta({**p7, "n_kv_heads": None, "vocab_size": None, "dim": 4096.0}, vocab_size=32000) == \
        Llama2Config.from_meta(p7, vocab_size=32000)
    # head counts the builders refuse are named by params.json's fields, not the builders' arguments
    with pytest.raises(ValueError, match=r"params.json: 'dim' must be a multiple of 'n_heads' \(32\), got 4100; "
                                         r"'n_kv_heads' must divide 'n_heads' \(32\), got 3$"):
        Llama2Config.from_meta({**p7, "dim": 4100, "n_kv_heads": 3}, vocab_size=32000)
    with pytest.raises(ValueError, match=r"'n_kv_heads' must divide 'n_heads' \(32\), got 64$"):
        Llama2Config.from_meta({**p7, "n_kv_heads": 64}, vocab_size=32000)


def test_context_length_of_meta_and_saved_hf_configs():
    # Meta records none: Code Llama (rope_theta above 10000) gets 16384, as HF's conversion script
    # gives it, Llama-2 4096; a HF save keeps the base's length over a shorter training cap.
    p7 = {"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32, "norm_eps": 1e-05, "vocab_size": -1}
    assert Llama2Config.from_meta(p7, vocab_size=32000).max_seq_len == 4096
    code = Llama2Config.from_meta({**p7, "rope_theta": 1e6}, vocab_size=32016)
    assert code.max_seq_len == 16384 and Llama2Config.from_meta(p7, vocab_size=32000, max_seq_len=1024).max_seq_len == 1024
    import dataclasses

    capped = dataclasses.replace(code, max_seq_len=256)
    assert capped.to_hf(base={"max_position_embeddings": 16384})["max_position_embeddings"] == 16384
    assert capped.to_hf(base={"max_position_embeddings": 16384.0})["max_position_embeddings"] == 16384
    assert capped.to_hf(base={"max_position_embeddings": None})["max_position_embeddings"] == 256
    assert capped.to_hf()["max_position_embeddings"] == 256
    assert code.to_hf(base={"max_position_embeddings": 2048})["max_position_embeddings"] == 16384


def test_vocab_size_read_from_embedding(tmp_path):
    transformers()
    _write_meta(tmp_path, hf_llama(num_kv_heads=4, seed=1))
    assert read_checkpoint_config(tmp_path).vocab_size == 320
    # Under a name of the user's (torchtune's checkpoint_files): the named file is read.
    (tmp_path / "consolidated.00.pth").rename(tmp_path / "model.pth")
    params = json.loads((tmp_path / "params.json").read_text())
    (tmp_path / "params.json").write_text(json.dumps({**params, "vocab_size": -1}))
    assert read_checkpoint_config(tmp_path, ["model.pth"]).vocab_size == 320
    assert stored_dtype(tmp_path, ["model.pth"]) == torch.float32
    with pytest.raises(FileNotFoundError, match=r"no Meta weights in .*: looked for consolidated"):
        read_checkpoint_config(tmp_path)


def test_llama2_from_checkpoint_reads_named_weight_files(tmp_path):
    # torchtune 0.6's FullModelMetaCheckpointer writes model-00001-of-00001.bin beside params.json
    transformers()
    hf = hf_llama(num_kv_heads=2, seed=3)
    _write_meta(tmp_path, hf)
    tokens = torch.randint(0, 320, (1, 7))
    with torch.no_grad():
        want = llama2_from_checkpoint(tmp_path)(tokens)
    (tmp_path / "consolidated.00.pth").rename(tmp_path / "model-00001-of-00001.bin")
    with pytest.raises(FileNotFoundError, match=r"no Meta weights in .*; weight files of other names are read when named: "
                                                r"checkpoint_files=\[...\] \(load_checkpoint, llama2_from_checkpoint\)"):
        llama2_from_checkpoint(tmp_path)
    with torch.no_grad():
        got = llama2_from_checkpoint(tmp_path, checkpoint_files=["model-00001-of-00001.bin"])(tokens)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_meta_keys_missing_are_named_as_meta_names_them(tmp_path):
    transformers()
    state, _ = _write_meta(tmp_path, hf_llama(num_kv_heads=2, seed=4))
    del state["layers.1.feed_forward.w3.weight"]
    torch.save(state, tmp_path / "consolidated.00.pth")
    with pytest.raises(ValueError, match=r"missing keys \(1\): \['layers.1.feed_forward.w3.weight'\]"):
        llama2_from_checkpoint(tmp_path)
    # Without the embedding, and vocab_size -1 in params.json, the size cannot be told: the file is named.
    del state["tok_embeddings.weight"]
    torch.save(state, tmp_path / "consolidated.00.pth")
    params = json.loads((tmp_path / "params.json").read_text())
    for declared in (-1, 0, None):
        (tmp_path / "params.json").write_text(json.dumps({**params, "vocab_size": declared}))
        with pytest.raises(ValueError, match=rf"consolidated.00.pth holds no tok_embeddings.weight, and params.json gives no vocab_size \(it has {declared}\)"):
            read_checkpoint_config(tmp_path)


@pytest.mark.parametrize("kv, settings", [(4, {}), (2, {"rope_theta": 500_000.0})], ids=["mha", "gqa-rope5e5"])
def test_meta_save_is_what_meta_reads(tmp_path, kv, settings):
    # A model read from a Meta checkpoint and saved again gives back the same tensors under the
    # same keys (wq / wk in Meta's rotary layout again) and a params.json of the same model;
    # Meta's own forward on the saved file reproduces transformers' logits.
    from qlora_ext.checkpoint import save_meta_checkpoint

    transformers()
    hf = hf_llama(num_kv_heads=kv, seed=20 + kv, **settings)
    (tmp_path / "src").mkdir()
    state, params = _write_meta(tmp_path / "src", hf, shards=2)
    ours = llama2_from_checkpoint(tmp_path / "src")
    paths = save_meta_checkpoint(ours, tmp_path / "out")
    assert paths == [str(tmp_path / "out" / "consolidated.00.pth"), str(tmp_path / "out" / "params.json")]
    saved = torch.load(tmp_path / "out" / "consolidated.00.pth", weights_only=True)
    assert saved.keys() == state.keys() and all(torch.equal(saved[k], state[k]) for k in state)
    saved_params = json.loads((tmp_path / "out" / "params.json").read_text())
    assert Llama2Config.from_meta(saved_params) == Llama2Config.from_meta(params, vocab_size=320)
    assert saved_params.get("rope_theta") == settings.get("rope_theta") and ("n_kv_heads" in saved_params) == (kv != 4)
    tokens = torch.randint(0, 320, (2, 11))
    assert rel_error(meta_reference_logits(saved, saved_params, tokens), hf_logits(hf, tokens)) <= 1e-5
    back = llama2_from_checkpoint(tmp_path / "out").eval()
    with torch.no_grad():
        assert torch.equal(back(tokens), ours.eval()(tokens))


def test_meta_save_merges_adapters_or_keeps_the_base(tmp_path):
    # A QLoRA model: merged, the saved model computes what the adapted one does; with
    # merge_adapters=False, the base (its NF4 weights dequantized); stale shards of an earlier,
    # larger save in the folder are deleted, and a bad dtype is refused before anything is written.
    from qlora_ext.checkpoint import save_meta_checkpoint

    transformers()
    (tmp_path / "src").mkdir()
    _write_meta(tmp_path / "src", hf_llama(num_kv_heads=2, seed=5))
    model = llama2_from_checkpoint(tmp_path / "src", ["q_proj", "k_proj", "v_proj"], apply_lora_to_mlp=True, quantize_base=True, lora_rank=4)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_b" in name:
                p.normal_(0, 0.05)
    out = tmp_path / "out"
    out.mkdir()
    _write_meta(out, hf_llama(num_kv_heads=2, seed=6), shards=2)  # an earlier save: consolidated.00 and .01
    with pytest.raises(ValueError, match=r"save_meta_checkpoint: argument 'dtype' must be None \(each weight's own\) or one of "
                                         r"\[torch.float32, torch.bfloat16, torch.float16, torch.float64\]; got torch.int8"):
        save_meta_checkpoint(model, out, dtype=torch.int8)
    assert sorted(p.name for p in out.iterdir()) == ["consolidated.00.pth", "consolidated.01.pth", "params.json"]
    save_meta_checkpoint(model, out)
    assert sorted(p.name for p in out.iterdir()) == ["consolidated.00.pth", "params.json"]
    tokens = torch.randint(0, 320, (2, 9))
    merged = llama2_from_checkpoint(out).eval()
    with torch.no_grad():
        assert rel_error(merged(tokens), model.eval()(tokens)) <= 1e-5
    # beside a HF checkpoint (config.json), which loaders would read instead: refused
    from qlora_ext.checkpoint import save_hf_checkpoint

    save_hf_checkpoint(model, tmp_path / "hf")
    with pytest.raises(ValueError, match=r"save_meta_checkpoint: argument 'out_dir' holds a HF checkpoint \(config.json, model.safetensors\)"):
        save_meta_checkpoint(model, tmp_path / "hf")
    assert not (tmp_path / "hf" / "params.json").exists()
    save_meta_checkpoint(model, out, merge_adapters=False, dtype=torch.bfloat16)
    base = torch.load(out / "consolidated.00.pth", weights_only=True)
    assert {t.dtype for t in base.values()} == {torch.bfloat16}
    v_proj = model.layers[1].attn.v_proj
    assert torch.equal(base["layers.1.attention.wv.weight"], v_proj.weight.dequantize(torch.bfloat16))


@pytest.mark.parametrize(
    "dim, hidden, spelling",
    [
        (4096, 11008, {"multiple_of": 256}),  # 7B
        (5120, 13824, {"multiple_of": 256}),  # 13B
        (8192, 28672, {"ffn_dim_multiplier": 1.3, "multiple_of": 4096}),  # 70B
        (256, 1000, {"multiple_of": 1000}),  # wider than 8/3 dim, no rule of Meta's gives it
        (768, 1500, None),  # narrower than 8/3 dim: a multiplier below 1
    ],
)
def test_params_json_spells_the_ffn_width_in_metas_rule(dim, hidden, spelling):
    config = Llama2Config(vocab_size=32000, num_layers=2, num_heads=8, num_kv_heads=8, embed_dim=dim, intermediate_dim=hidden)
    params = config.to_meta()
    assert Llama2Config.from_meta(params) == config
    assert params["vocab_size"] == 32000 and "n_kv_heads" not in params and "rope_theta" not in params
    if spelling is not None:
        assert {k: params[k] for k in ("ffn_dim_multiplier", "multiple_of") if k in params} == spelling
