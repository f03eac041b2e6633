"""Generation: cached decoding equals uncached decoding, sampling honours temperature / top-k,
stop tokens end rows, and ``python -m qlora_ext.generate`` prints what the Python API produces."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import devices
from llama_helpers import hf_llama, train_tokenizer, transformers

from qlora_ext.checkpoint import save_peft_adapter
from qlora_ext.generation import generate, sample
from qlora_ext.models.llama2 import llama2_from_checkpoint, llama2_tokenizer, lora_llama2
from qlora_ext.training.data import alpaca_prompt, prompt_tokens

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _model(device="cpu"):
    model = lora_llama2(
        ["q_proj", "v_proj"], vocab_size=96, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64,
        max_seq_len=48, intermediate_dim=128, lora_rank=4, lora_alpha=8, quantize_base=True,
    )
    with torch.no_grad():
        model.output.weight.mul_(30)  # peaked next-token distributions: greedy paths without near-ties
    return model.to(device).eval()


@pytest.mark.parametrize("device", devices())
def test_cached_greedy_equals_uncached(device):
    model = _model(device)
    prompt = torch.randint(0, 96, (3, 7), device=device)
    cached = generate(model, prompt, max_new_tokens=20, temperature=0.0)
    uncached = generate(model, prompt, max_new_tokens=20, temperature=0.0, use_cache=False)
    assert cached.shape == (3, 27)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached[:, :7], prompt)
    assert not model.caches_are_setup()  # caches made for the call are gone
    # Caches set up by the caller are reset and reused.
    model.setup_caches(3, torch.float32, max_seq_len=40)
    assert torch.equal(generate(model, prompt, max_new_tokens=20, temperature=0.0), cached)
    assert model.caches_are_enabled()
    with pytest.raises(ValueError, match=r"prompt length 7 \+ max_new_tokens 40 must be at most 40 .*; got 47"):
        generate(model, prompt, max_new_tokens=40)
    with pytest.raises(ValueError, match=r"argument 'prompt' holds 2 prompts but the model's KV caches were set up for batch size 3"):
        generate(model, prompt[:2], max_new_tokens=4)


def test_disabled_or_partial_caches_decode_right_or_are_refused():
    # generate decided on layer 0's cache alone: with caches disabled (torchtune's
    # disable_kv_cache) or on some layers only, it fed one token a step to layers without one.
    model = _model()
    prompt = torch.randint(0, 96, (2, 5))
    want = generate(model, prompt, max_new_tokens=10, temperature=0.0, use_cache=False)
    model.setup_caches(2, torch.float32, max_seq_len=20)
    for layer in model.layers:
        layer.attn.cache_enabled = False
    assert torch.equal(generate(model, prompt, max_new_tokens=10, temperature=0.0), want)  # decoded without them
    assert torch.equal(generate(model, prompt, max_new_tokens=10, temperature=0.0, use_cache=False), want)
    model.layers[0].attn.cache_enabled = True
    with pytest.raises(ValueError, match=r"argument 'model' has its KV caches enabled on 1 of its 2 layers; enable them on all, "
                                         r"or disable them on all"):
        generate(model, prompt, max_new_tokens=10, temperature=0.0)
    model.remove_caches()
    model.layers[0].setup_caches(2, torch.float32, decoder_max_seq_len=20)  # torchtune's per-layer call
    with pytest.raises(ValueError, match=r"argument 'model' has KV caches on 1 of its 2 layers; set them up on all"):
        generate(model, prompt, max_new_tokens=10, temperature=0.0)


def test_caches_set_up_under_inference_mode_are_named_outside_it():
    # generate outside inference mode failed in torch ("Inplace update to inference tensor outside InferenceMode")
    model = _model()
    prompt = torch.randint(0, 96, (1, 5))
    want = generate(model, prompt, max_new_tokens=6, temperature=0.0, use_cache=False)
    with torch.inference_mode():
        model.setup_caches(1, torch.float32, max_seq_len=20)
        assert torch.equal(generate(model, prompt, max_new_tokens=6, temperature=0.0), want)
    with pytest.raises(ValueError, match=r"argument 'model' has KV caches set up under torch.inference_mode\(\), which cannot be "
                                         r"written outside it; call generate inside torch.inference_mode\(\), or set them up again"):
        generate(model, prompt, max_new_tokens=6, temperature=0.0)
    for layer in model.layers:  # disabled, they are not written: decoded without them
        layer.attn.cache_enabled = False
    assert torch.equal(generate(model, prompt, max_new_tokens=6, temperature=0.0), want)


def test_any_output_mode_generates_from_logits_of_the_sampled_positions_only():
    # A model left in a training output mode generated from hidden states (skip_output_layer)
    # or failed (chunked logits); and the prefill kept float32 logits of every prompt position.
    model = _model()
    prompt = [[1, 2, 3, 4, 5, 6], [7, 8]]
    want = generate(model, prompt, max_new_tokens=6, temperature=0.0)
    seen = []
    model.output.register_forward_hook(lambda module, args, out: seen.append(tuple(args[0].shape)))
    for mode in ((True, 0), (False, 3)):
        model.skip_output_layer, model.num_output_chunks = mode
        for use_cache in (True, False):
            seen.clear()
            assert torch.equal(generate(model, prompt, max_new_tokens=6, temperature=0.0, use_cache=use_cache), want)
            assert seen == [(2, 64)] * 6  # one [batch, embed_dim] row per sequence and step
        assert (model.skip_output_layer, model.num_output_chunks) == mode  # restored


def test_non_finite_logits_are_named():
    # sampling failed in torch.multinomial, greedy returned garbage (an fp16 overflow, say)
    model = _model()
    with torch.no_grad():
        model.output.weight[3, 0] = float("inf")  # (not an NF4 weight: output has no LoRA here)
    for temperature in (0.0, 0.7):
        with pytest.raises(ValueError, match=r"generate: the model's logits for new token 1 hold NaN or infinity; in float16 "
                                             r"activations overflow past 65504"):
            generate(model, [1, 2, 3], max_new_tokens=4, temperature=temperature)


def test_positions_outside_the_model_or_its_caches_are_named():
    # a raw index error from the cache's scatter or the RoPE table before; negative positions
    # wrapped around silently without caches
    model = _model()
    x = torch.randint(0, 96, (1, 3))
    with pytest.raises(ValueError, match=r"argument 'input_pos' must hold positions in \[0, 48\) \(max_seq_len\); got -3"):
        model(x, input_pos=torch.tensor([-3, -2, -1]))
    with pytest.raises(ValueError, match=r"must hold positions in \[0, 48\) \(max_seq_len\); got 50"):
        model(x, input_pos=torch.tensor([48, 49, 50]))
    model.setup_caches(1, torch.float32, max_seq_len=10)
    with pytest.raises(ValueError, match=r"must hold positions in \[0, 10\) \(the KV caches' length\); got 10"):
        model(x[:, :1], input_pos=torch.tensor([10]))
    assert model(x[:, :1], input_pos=torch.tensor([9])).shape == (1, 1, 96)
    model.remove_caches()


def test_single_prompt_list_and_top_k_one_is_greedy():
    model = _model()
    grad_modes = []
    model.register_forward_hook(lambda *_: grad_modes.append(torch.is_grad_enabled()))
    greedy = generate(model, [5, 6, 7], max_new_tokens=8, temperature=0.0)
    assert grad_modes and not any(grad_modes)  # decoding records no autograd graph
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(generate(model, [5, 6, 7], max_new_tokens=8, temperature=0.8, top_k=1, generator=gen), greedy)


def test_sampling_temperature_and_top_k():
    gen = torch.Generator().manual_seed(1)
    logits = torch.log(torch.tensor([[1.0, 3.0, 0.0001, 0.0001]])).expand(4000, 4)
    draws = sample(logits, temperature=1.0, generator=gen)
    assert abs((draws == 1).float().mean().item() - 0.75) < 0.03
    # Temperature 0.5 squares the odds: 9 : 1.
    draws = sample(logits, temperature=0.5, generator=gen)
    assert abs((draws == 1).float().mean().item() - 0.9) < 0.03
    wide = torch.randn(500, 50)
    draws = sample(wide, temperature=2.0, top_k=3, generator=gen)
    top3 = wide.topk(3, dim=-1).indices
    assert (top3 == draws[:, None]).any(-1).all()
    with pytest.raises(ValueError, match=r"argument 'top_k' must be a positive integer or None; got 0"):
        sample(wide, top_k=0)
    for bad in (-1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=rf"argument 'temperature' must be finite and >= 0; got {bad}"):
            sample(wide, temperature=bad)
    with pytest.raises(ValueError, match=r"argument 'logits' must be a \[batch, vocab\] tensor \(one row per sequence\); got shape \[50\]"):
        sample(wide[0], top_k=3)


def test_tiny_temperature_is_greedy():
    # Dividing the raw scores by 1e-30 made every one +-inf and the softmax NaN (multinomial failed).
    wide = torch.randn(300, 50) * 10
    gen = torch.Generator().manual_seed(2)
    for temperature in (1e-30, 1e-45, 1e-6, 1e-46, 1e-300):  # the last two are 0 in float32: no 0 / 0
        assert torch.equal(sample(wide, temperature=temperature, top_k=5, generator=gen), wide.argmax(-1))


def test_temperature_with_an_overflowing_reciprocal_is_greedy_without_dividing():
    # On CUDA x / t is x * float32(1 / t): for t in (2**-150, ~2.9e-39] that is inf, and the best
    # score 0 * inf = NaN. Such temperatures take the greedy path on every device: no draw.
    wide = torch.randn(4, 50)
    for temperature in (1e-45, 1e-40, 2e-39):
        gen = torch.Generator().manual_seed(3)
        state = gen.get_state()
        assert torch.equal(sample(wide, temperature=temperature, generator=gen), wide.argmax(-1))
        assert torch.equal(gen.get_state(), state), temperature
    gen = torch.Generator().manual_seed(3)
    state = gen.get_state()
    sample(wide, temperature=3e-39, generator=gen)  # a finite reciprocal: sampled (from a one-hot softmax)
    assert not torch.equal(gen.get_state(), state)


def test_prompt_and_pad_id_outside_the_vocabulary_are_named():
    model = _model()
    vocab = model.tok_embeddings.num_embeddings
    for prompt, needle in [
        ([5, vocab], rf"argument 'prompt' must hold token ids in \[0, {vocab}\); got \[{vocab}\]"),
        (torch.tensor([[3, -1]]), r"argument 'prompt' must hold token ids in \[0, \d+\); got \[-1\]"),
        (torch.ones(1, 3), r"argument 'prompt' must hold integer token ids \(8 to 64 bits\); got dtype torch.float32"),
        ([1, [2]], r"argument 'prompt' must be a \[batch, seq\] tensor, one prompt as a list of ints, or a list of such lists "
                   r"\(prompts of any lengths\); got a list holding \['int', 'list'\]"),
        ([], r"argument 'prompt' must be .*; got an empty list"),
        ([[1, 2], []], r"argument 'prompt' must be .*; prompt 1 is empty"),
        ([[1, 2], [3, 4.0]], r"argument 'prompt' must be .*; prompt 1 holds \['float', 'int'\]"),
        ([[1, 2], [3, vocab]], rf"argument 'prompt' must hold token ids in \[0, {vocab}\); got \[{vocab}\]"),
        ([[1, 2], [2**70]], rf"argument 'prompt' must hold token ids in \[0, {vocab}\); got \[{2**70}\]"),  # (not an overflow)
        (torch.zeros(0, 3, dtype=torch.long), r"argument 'prompt' must be \[batch, seq\] \(or one \[seq\]\) with batch and seq >= 1; got shape \[0, 3\]"),
        (torch.nested.nested_tensor([torch.tensor([1, 2]), torch.tensor([3])], layout=torch.jagged), r"argument 'prompt' must be a dense tensor; got a nested tensor"),
    ]:
        with pytest.raises(ValueError, match=needle):
            generate(model, prompt, max_new_tokens=2, temperature=0.0)
    with pytest.raises(ValueError, match=rf"argument 'pad_id' must be a token id in \[0, {vocab}\); got -1"):
        generate(model, [1, 2], max_new_tokens=2, pad_id=-1)
    for kwargs, needle in [
        ({"max_new_tokens": 3.0}, r"argument 'max_new_tokens' must be an integer >= 1; got 3.0"),
        ({"max_new_tokens": 2, "stop_tokens": [2.5]}, r"argument 'stop_tokens' must hold integer token ids \(int64\); got \[2.5\]"),
        ({"max_new_tokens": 2, "stop_tokens": [2**70]}, rf"argument 'stop_tokens' must hold integer token ids \(int64\); got \[{2**70}\]"),
        ({"max_new_tokens": 2, "top_k": 5.0}, r"generate: argument 'top_k' must be a positive integer or None; got 5.0"),
        ({"max_new_tokens": 2, "top_k": True}, r"generate: argument 'top_k' must be a positive integer or None; got True"),
        ({"max_new_tokens": 2, "temperature": -0.5}, r"generate: argument 'temperature' must be finite and >= 0; got -0.5"),
        ({"max_new_tokens": 2, "stop_tokens": "2"}, r"argument 'stop_tokens' must hold integer token ids \(int64\); got \['2'\]"),
        ({"max_new_tokens": 2, "stop_tokens": 3.0}, r"argument 'stop_tokens' must hold integer token ids \(int64\); got \[3.0\]"),
        ({"max_new_tokens": 2, "temperature": None}, r"generate: argument 'temperature' must be finite and >= 0; got None"),
        ({"max_new_tokens": 2, "temperature": True}, r"generate: argument 'temperature' must be finite and >= 0; got True"),
        ({"max_new_tokens": 2, "generator": "seed"}, r"generate: argument 'generator' must be a torch.Generator or None; got str"),
    ]:
        with pytest.raises(ValueError, match=needle):
            generate(model, [1, 2], **kwargs)
    # stop tokens as a tensor are taken as a list
    want = generate(model, [1, 2], max_new_tokens=4, temperature=0.0, stop_tokens=[3, 4])
    assert torch.equal(generate(model, [1, 2], max_new_tokens=4, temperature=0.0, stop_tokens=torch.tensor([3, 4])), want)
    one = generate(model, [1, 2], max_new_tokens=4, temperature=0.0, stop_tokens=[3])
    for stop in (3, torch.tensor(3), torch.tensor([[3]])):  # one id as an int or a tensor of any shape
        assert torch.equal(generate(model, [1, 2], max_new_tokens=4, temperature=0.0, stop_tokens=stop), one)
    model.setup_caches(1, torch.float32, max_seq_len=8)
    with pytest.raises(ValueError, match=r"argument 'use_cache' is False but the model has KV caches; call model.remove_caches\(\) first"):
        generate(model, [1, 2], max_new_tokens=2, use_cache=False)
    model.remove_caches()


def test_prompts_of_different_lengths_decode_as_each_alone():
    model = _model()
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 96, (n,), generator=gen).tolist() for n in (7, 2, 5, 1)]
    alone = [generate(model, p, max_new_tokens=10, temperature=0.0)[0] for p in prompts]
    cached = generate(model, prompts, max_new_tokens=10, temperature=0.0, pad_id=95)
    uncached = generate(model, prompts, max_new_tokens=10, temperature=0.0, pad_id=95, use_cache=False)
    assert cached.shape == (4, 7 + 10)
    assert torch.equal(cached, uncached)
    for row, want in zip(cached, alone):
        n = len(want)  # prompt + 10 new tokens, then pads up to the longest prompt's width
        assert torch.equal(row[:n], want)
        assert (row[n:] == 95).all()
    # Rows given as 1-D tensors, and a batch of equal lengths, take the same path as a [b, s] tensor.
    assert torch.equal(generate(model, [torch.tensor(p) for p in prompts], max_new_tokens=10, temperature=0.0, pad_id=95), cached)
    assert torch.equal(generate(model, [np.array(p) for p in prompts], max_new_tokens=10, temperature=0.0, pad_id=95), cached)
    # Caches kept in another dtype than the model's activations are read in the activations' dtype.
    model.setup_caches(4, torch.bfloat16, max_seq_len=17)
    try:
        assert generate(model, prompts, max_new_tokens=10, temperature=0.0, pad_id=95).shape == (4, 17)
    finally:
        model.remove_caches()
    # One prompt as a [seq] tensor, as torchtune's generate takes it: a batch of one.
    assert torch.equal(generate(model, torch.tensor(prompts[0]), max_new_tokens=6, temperature=0.0),
                       generate(model, [prompts[0]], max_new_tokens=6, temperature=0.0))
    square = torch.tensor([prompts[0], prompts[0][::-1]])
    assert torch.equal(generate(model, square.tolist(), max_new_tokens=6, temperature=0.0), generate(model, square, max_new_tokens=6, temperature=0.0))
    # The longest prompt bounds the length; a stop token ends one row and the batch ends when all did.
    with pytest.raises(ValueError, match=r"prompt length 7 \+ max_new_tokens 42 must be at most 48"):
        generate(model, prompts, max_new_tokens=42)
    stop = int(alone[1][2])  # the short prompt's first new token
    out = generate(model, [prompts[1], prompts[3]], max_new_tokens=10, temperature=0.0, stop_tokens=[stop], pad_id=95)
    assert torch.equal(out[0, :3], alone[1][:3]) and (out[0, 3:] == 95).all()
    free = alone[3][1:].tolist()
    if stop in free:
        assert out.shape[1] == 2 + free.index(stop) + 1
    else:
        assert torch.equal(out[1, :11], alone[3])


def test_stop_tokens_end_rows_and_pad():
    model = _model()
    prompt = torch.randint(0, 96, (2, 5))
    free = generate(model, prompt, max_new_tokens=12, temperature=0.0)
    stop = int(free[0, 5 + 2])  # row 0's third new token
    if stop in free[1, 5:].tolist():
        pytest.skip("both rows emit the chosen stop token; nothing row-specific to check")
    out = generate(model, prompt, max_new_tokens=12, temperature=0.0, stop_tokens=[stop], pad_id=95)
    assert torch.equal(out[1], free[1])  # row 1 never stops early
    first = free[0, 5:].tolist().index(stop)
    assert torch.equal(out[0, : 5 + first + 1], free[0, : 5 + first + 1])
    assert (out[0, 5 + first + 1 :] == 95).all()
    # Every row stopped: generation ends early.
    both = generate(model, prompt[:1], max_new_tokens=12, temperature=0.0, stop_tokens=[stop])
    assert both.shape[1] == 5 + first + 1


@pytest.fixture(scope="module")
def checkpoint_with_tokenizer(tmp_path_factory):
    transformers()
    folder = tmp_path_factory.mktemp("gen_ckpt")
    hf = hf_llama(num_kv_heads=2, seed=5)
    with torch.no_grad():
        hf.lm_head.weight.mul_(30)
    hf.save_pretrained(folder)
    spm_dir = tmp_path_factory.mktemp("spm")
    shutil.copy(train_tokenizer(str(spm_dir)), folder / "tokenizer.model")
    return str(folder)


def _cli(*args):
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-m", "qlora_ext.generate", *args], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.rstrip("\n"), out.stderr


def _expected(folder, prompt, adapter_dir=None, n=6, temperature=0.0, top_k=None, seed=0, quantize_base=False):
    tokenizer = llama2_tokenizer(os.path.join(folder, "tokenizer.model"))
    model = llama2_from_checkpoint(folder, adapter_dir=adapter_dir, quantize_base=quantize_base).eval()
    ids = tokenizer.encode(prompt, add_eos=False)
    generator = torch.Generator().manual_seed(seed)
    tokens = generate(model, ids, max_new_tokens=n, temperature=temperature, top_k=top_k, stop_tokens=[tokenizer.eos_id], generator=generator)
    new = tokens[0, len(ids) :].tolist()
    new = new[: new.index(tokenizer.eos_id)] if tokenizer.eos_id in new else new
    return tokenizer.decode(ids + new)


def test_cli_matches_python(checkpoint_with_tokenizer, tmp_path):
    folder = checkpoint_with_tokenizer
    stdout, stderr = _cli("--checkpoint-dir", folder, "--prompt", "The quick fox", "--temperature", "0", "--max-new-tokens", "6")
    assert stdout == _expected(folder, "The quick fox")
    assert stdout.startswith("The quick fox") and "tokens/s" in stderr
    # Several prompts decode in one batch and print in order; greedy, each is what it alone gives.
    both, _ = _cli("--checkpoint-dir", folder, "--prompt", "The quick fox", "--prompt", "A", "--temperature", "0", "--max-new-tokens", "6")
    assert both == _expected(folder, "The quick fox") + "\n---\n" + _expected(folder, "A")

    model = llama2_from_checkpoint(folder, ["q_proj", "v_proj"], apply_lora_to_mlp=True, lora_rank=4, lora_alpha=8)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_b" in name:
                p.normal_(std=0.5)
    save_peft_adapter(model, tmp_path / "adapter")
    adapted, _ = _cli(
        "--checkpoint-dir", folder, "--adapter-dir", str(tmp_path / "adapter"), "--prompt", "The quick fox",
        "--temperature", "0", "--max-new-tokens", "6",
    )
    assert adapted == _expected(folder, "The quick fox", adapter_dir=str(tmp_path / "adapter"))
    assert adapted != stdout  # the adapter was applied

    sampled, _ = _cli(
        "--checkpoint-dir", folder, "--adapter-dir", str(tmp_path / "adapter"), "--quantize-base", "--prompt", "The quick fox",
        "--temperature", "0.8", "--top-k", "5", "--seed", "3", "--max-new-tokens", "8",
    )
    want = _expected(folder, "The quick fox", str(tmp_path / "adapter"), n=8, temperature=0.8, top_k=5, seed=3, quantize_base=True)
    assert sampled == want
    again, _ = _cli(
        "--checkpoint-dir", folder, "--adapter-dir", str(tmp_path / "adapter"), "--quantize-base", "--prompt", "The quick fox",
        "--temperature", "0.8", "--top-k", "5", "--seed", "4", "--max-new-tokens", "8",
    )
    assert again == _expected(folder, "The quick fox", str(tmp_path / "adapter"), n=8, temperature=0.8, top_k=5, seed=4, quantize_base=True)
    assert again != sampled  # the seed reaches the sampler

    # A trainer checkpoint's model has its run's adapter merged: another adapter goes on top, with a warning;
    # the adapter trained on that very folder goes on quietly.
    run = tmp_path / "run" / "epoch_0"
    shutil.copytree(folder, run)
    (run / "training_config.yaml").write_text("seed: 0\n")
    _, stderr = _cli("--checkpoint-dir", str(run), "--adapter-dir", str(tmp_path / "adapter"), "--prompt", "x", "--max-new-tokens", "1")
    assert f"warning: --checkpoint-dir '{run}' is a trainer checkpoint" in stderr and "an unrecorded base" in stderr
    save_peft_adapter(model, tmp_path / "adapter_on_run", base_model_name_or_path=str(run))
    _, stderr = _cli("--checkpoint-dir", str(run), "--adapter-dir", str(tmp_path / "adapter_on_run"), "--prompt", "x", "--max-new-tokens", "1")
    assert "warning" not in stderr


def test_cli_reads_weight_files_named_with_checkpoint_files(checkpoint_with_tokenizer, tmp_path):
    # torchtune's checkpointers write weights under other names (hf_model_0001_0.pt in the seed's
    # torchtune): found by no name, they are read when named.
    folder = tmp_path / "torchtune_out"
    shutil.copytree(checkpoint_with_tokenizer, folder)
    (folder / "model.safetensors").rename(folder / "hf_model_0001_0.safetensors")
    args = ("--checkpoint-dir", str(folder), "--prompt", "The quick fox", "--temperature", "0", "--max-new-tokens", "6")
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    refused = subprocess.run([sys.executable, "-m", "qlora_ext.generate", *args], capture_output=True, text=True, env=env, timeout=300)
    assert refused.returncode == 1 and "no HF weights in" in refused.stderr
    assert "weight files of other names are read when named: checkpoint_files=[...]" in refused.stderr
    assert "--checkpoint-files for the generate CLI" in refused.stderr
    stdout, _ = _cli(*args, "--checkpoint-files", "hf_model_0001_0.safetensors")
    assert stdout == _expected(checkpoint_with_tokenizer, "The quick fox")
    # a usage error names the flag, exit 2 (it was load_checkpoint's wording, exit 1)
    for files, message in ((["model.safetensors"], "argument --checkpoint-files must name weight files in --checkpoint-dir; "
                                                    f"'model.safetensors' is not a file in '{folder}', which holds ["),
                           (["hf_model_0001_0.safetensors"] * 2, "argument --checkpoint-files must name each file once"),
                           (["hf_model_0001_0.safetensors", "./hf_model_0001_0.safetensors"], "must name each file once"),
                           (["hf_model_0001_0.safetensors", str(folder / "hf_model_0001_0.safetensors")], "must name each file once")):
        refused = subprocess.run([sys.executable, "-m", "qlora_ext.generate", *args, "--checkpoint-files", *files], capture_output=True,
                                 text=True, env=env, timeout=300)
        assert refused.returncode == 2 and message in refused.stderr, refused.stderr


def test_cli_gives_each_prompt_the_room_it_has(checkpoint_with_tokenizer):
    # A prompt near max_seq_len (128) gets the new tokens that fit, with a note; a short prompt
    # batched with it still gets --max-new-tokens, as alone (it was cut to the long one's room).
    folder = checkpoint_with_tokenizer
    tokenizer = llama2_tokenizer(os.path.join(folder, "tokenizer.model"))
    words = ("The quick fox " * 60).split()
    while len(tokenizer.encode(" ".join(words), add_eos=False)) > 125:
        words.pop()
    long = " ".join(words)
    room = 128 - len(tokenizer.encode(long, add_eos=False))
    assert 0 < room < 6
    both, stderr = _cli("--checkpoint-dir", folder, "--prompt", "A", "--prompt", long, "--temperature", "0", "--max-new-tokens", "6")
    assert both == _expected(folder, "A") + "\n---\n" + _expected(folder, long, n=room)
    assert (f"note: prompt 2 is {128 - room} tokens: {room} new tokens fit within the model's max_seq_len 128, "
            "not --max-new-tokens 6") in stderr
    assert "prompt 1" not in stderr


def test_cli_alpaca_template(checkpoint_with_tokenizer, tmp_path):
    """--template alpaca: the prompt (and --input) inside the trainer's Alpaca prompt."""
    folder = tmp_path / "long"  # the fixture's model, with room for the template's ~200 tokens
    shutil.copytree(checkpoint_with_tokenizer, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 512}))
    templated, _ = _cli(
        "--checkpoint-dir", str(folder), "--template", "alpaca", "--prompt", "Name a colour.", "--input", "The sky",
        "--temperature", "0", "--max-new-tokens", "6",
    )
    assert templated == _expected(str(folder), alpaca_prompt({"instruction": "Name a colour.", "input": "The sky"}))
    assert "### Instruction:\nName a colour.\n\n### Input:\nThe sky" in templated
    chat, _ = _cli(
        "--checkpoint-dir", str(folder), "--template", "llama2_chat", "--prompt", "Name a colour.", "--temperature", "0", "--max-new-tokens", "6",
    )
    assert chat.startswith("[INST] Below is an instruction") and "### Instruction:\nName a colour.\n\n### Response:\n  [/INST]" in chat
    tokenizer = llama2_tokenizer(str(folder / "tokenizer.model"))
    prompt = prompt_tokens(tokenizer, {"instruction": "Name a colour.", "input": ""}, "llama2_chat")
    model = llama2_from_checkpoint(str(folder)).eval()
    new = generate(model, prompt, max_new_tokens=6, temperature=0.0, stop_tokens=[tokenizer.eos_id])[0, len(prompt) :].tolist()
    assert chat == tokenizer.decode(prompt + (new[: new.index(tokenizer.eos_id)] if tokenizer.eos_id in new else new))


def test_cli_argument_errors(checkpoint_with_tokenizer, tmp_path):
    env = {**os.environ, "PYTHONPATH": REPO}
    out = subprocess.run(
        [sys.executable, "-m", "qlora_ext.generate", "--checkpoint-dir", checkpoint_with_tokenizer, "--prompt", "x", "--temperature", "-1"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert out.returncode == 2 and "argument --temperature must be finite and >= 0; got -1.0" in out.stderr
    out = subprocess.run(
        [sys.executable, "-m", "qlora_ext.generate", "--checkpoint-dir", checkpoint_with_tokenizer, "--prompt", "x", "--temperature", "nan"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert out.returncode == 2 and "argument --temperature must be finite and >= 0; got nan" in out.stderr
    out = subprocess.run(  # was "Overflow when unpacking long long", naming no argument
        [sys.executable, "-m", "qlora_ext.generate", "--checkpoint-dir", checkpoint_with_tokenizer, "--prompt", "x", "--seed", str(10**23)],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert out.returncode == 2 and f"argument --seed must be in [0, 2**63); got {10**23}" in out.stderr
    for device, needle in (("tpu", "argument --device must be cpu, cuda or cuda:N; got 'tpu'"),
                           ("cuda", None if torch.cuda.is_available() else "argument --device: cuda was asked for but torch sees no CUDA GPU")):
        if needle is None:
            continue
        out = subprocess.run(
            [sys.executable, "-m", "qlora_ext.generate", "--checkpoint-dir", checkpoint_with_tokenizer, "--prompt", "x", "--device", device],
            capture_output=True, text=True, env=env, timeout=120,
        )
        assert out.returncode == 2 and needle in out.stderr, out.stderr[-2000:]
    # A prompt filling the model's max_seq_len (128) leaves no room: named, not "max_new_tokens ... got -N".
    out = subprocess.run(
        [sys.executable, "-m", "qlora_ext.generate", "--checkpoint-dir", checkpoint_with_tokenizer, "--prompt", "The quick fox " * 60],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert out.returncode == 2, out.stderr[-2000:]  # a usage error, as argparse's
    assert re.search(r"error: argument --prompt must leave room for new tokens: it is \d+ tokens \(with BOS\) and the model's max_seq_len is 128", out.stderr)
    out = subprocess.run(
        [sys.executable, "-m", "qlora_ext.generate", "--checkpoint-dir", checkpoint_with_tokenizer, "--prompt", "x", "--quantize-base"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert out.returncode == 2 and "argument --quantize-base needs --adapter-dir" in out.stderr
    missing = os.path.join(checkpoint_with_tokenizer, "nowhere")
    trained = tmp_path / "epoch_0"  # as the trainer writes one: the merged model, its adapter in adapter/
    shutil.copytree(checkpoint_with_tokenizer, trained)
    (trained / "adapter").mkdir()
    (trained / "training_config.yaml").write_text("{}\n")  # (what marks a training checkpoint)
    adapter_only = tmp_path / "adapter_only"
    adapter_only.mkdir()
    (adapter_only / "adapter_config.json").write_text("{}")
    no_tokenizer = tmp_path / "no_tokenizer"
    shutil.copytree(checkpoint_with_tokenizer, no_tokenizer, ignore=shutil.ignore_patterns("tokenizer.model"))
    for args, needle in (
        (["--checkpoint-dir", missing], f"argument --checkpoint-dir must be a checkpoint folder; '{missing}' is not a folder"),
        (["--checkpoint-dir", checkpoint_with_tokenizer, "--input", "y"], "argument --input needs --template alpaca or llama2_chat"),
        (["--checkpoint-dir", str(trained), "--adapter-dir", str(trained / "adapter")],
         f"argument --adapter-dir: '{trained / 'adapter'}' is the adapter of the training checkpoint '{trained}', whose model has "
         "it merged already"),
        (["--checkpoint-dir", str(tmp_path)], f"argument --checkpoint-dir must be a HF (config.json) or Meta (params.json) "
         f"checkpoint folder; '{tmp_path}' holds neither (checkpoint folders inside it: epoch_0, no_tokenizer)"),
        (["--checkpoint-dir", str(adapter_only)], "holds neither (it holds a PEFT adapter: pass the base model's folder as "
         "--checkpoint-dir and this one as --adapter-dir)"),
        (["--checkpoint-dir", str(no_tokenizer)], f"argument --tokenizer is needed: the checkpoint folder '{no_tokenizer}' holds "
         "no tokenizer.model"),
    ):
        out = subprocess.run([sys.executable, "-m", "qlora_ext.generate", *args, "--prompt", "x"], capture_output=True, text=True, env=env,
                             timeout=120)
        assert out.returncode == 2 and needle in out.stderr, out.stderr[-2000:]


def test_cli_names_missing_paths_and_text_that_is_not_utf8(checkpoint_with_tokenizer, tmp_path, capsys):
    # A missing --tokenizer or --adapter-dir ended with exit 1 under the API's argument names; a
    # prompt holding bytes that are not UTF-8 (surrogate-escaped by Python) with a traceback.
    from qlora_ext import generate as cli

    base = ["--checkpoint-dir", checkpoint_with_tokenizer]
    for args, needle in (
        (["--tokenizer", str(tmp_path / "none.model"), "--prompt", "x"],
         f"argument --tokenizer must be a SentencePiece tokenizer.model file; '{tmp_path / 'none.model'}' does not exist"),
        (["--tokenizer", str(tmp_path), "--prompt", "x"], f"'{tmp_path}' is a folder"),
        (["--adapter-dir", str(tmp_path / "none"), "--prompt", "x"],
         f"argument --adapter-dir must be a PEFT adapter folder; '{tmp_path / 'none'}' does not exist"),
        (["--prompt", "ok", "--prompt", "caf\udce9 au lait"],
         "argument --prompt must be UTF-8 text; got 'caf' followed by a character that is not (the byte 0xe9)"),
        (["--prompt", "x", "--template", "alpaca", "--input", "\ud800"], "argument --input must be UTF-8 text; got '' followed by"),
    ):
        with pytest.raises(SystemExit) as exited:
            cli.main(base + args)
        assert exited.value.code == 2 and needle in capsys.readouterr().err


def test_cli_names_a_tokenizer_or_adapter_folder_it_cannot_use(checkpoint_with_tokenizer, tmp_path, capsys):
    # A --tokenizer that is no SentencePiece model (a HF tokenizer.json) or an --adapter-dir without the
    # adapter's files ended with exit 1 under the API's argument names ('path', 'adapter_dir').
    from qlora_ext import generate as cli

    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE"}}')
    (tmp_path / "empty").mkdir()
    (tmp_path / "config_only").mkdir()
    (tmp_path / "config_only" / "adapter_config.json").write_text("{}")
    base = ["--checkpoint-dir", checkpoint_with_tokenizer, "--prompt", "x", "--max-new-tokens", "2"]
    assert cli.main(base + ["--tokenizer", str(tmp_path / "tokenizer.json")]) == 2
    assert (f"error: argument --tokenizer must be a readable SentencePiece model file; '{tmp_path / 'tokenizer.json'}' is not: "
            in capsys.readouterr().err)
    (tmp_path / "model").mkdir()
    shutil.copy(os.path.join(checkpoint_with_tokenizer, "config.json"), tmp_path / "model")
    for folder, lacks in (("empty", "adapter_config.json nor adapter weights"), ("config_only", "adapter weights"),
                          ("model", "adapter_config.json nor adapter weights (it holds a model checkpoint: pass it as --checkpoint-dir)")):
        with pytest.raises(SystemExit) as exited:
            cli.main(base + ["--adapter-dir", str(tmp_path / folder)])
        assert exited.value.code == 2
        assert (f"argument --adapter-dir must be a PEFT adapter folder (adapter_config.json and adapter_model.safetensors or .bin); "
                f"'{tmp_path / folder}' has no {lacks}\n") in capsys.readouterr().err
    # a trainer's checkpoint folder (its adapter in adapter/): the subfolder is named, as the API names it
    (tmp_path / "epoch_0" / "adapter").mkdir(parents=True)
    (tmp_path / "epoch_0" / "adapter" / "adapter_config.json").write_text("{}")
    shutil.copy(os.path.join(checkpoint_with_tokenizer, "config.json"), tmp_path / "epoch_0")
    with pytest.raises(SystemExit):
        cli.main(base + ["--adapter-dir", str(tmp_path / "epoch_0")])
    assert f"has no adapter_config.json nor adapter weights; its subfolder '{tmp_path / 'epoch_0' / 'adapter'}' holds one" in capsys.readouterr().err
    # the checkpoint folder itself, without an adapter: no advice to pass it as --checkpoint-dir, which it is
    with pytest.raises(SystemExit):
        cli.main(base + ["--adapter-dir", checkpoint_with_tokenizer])
    err = capsys.readouterr().err
    assert "has no adapter_config.json nor adapter weights\n" in err and "pass it as --checkpoint-dir" not in err


def test_cli_names_a_checkpoint_folder_it_cannot_read(checkpoint_with_tokenizer, monkeypatch, capsys):
    # A folder without read permission ended in a PermissionError traceback (the tests run as root,
    # for whom permissions do not apply: listing it fails here as it would for a user).
    from qlora_ext import generate as cli

    listdir = os.listdir
    monkeypatch.setattr(os, "listdir", lambda p=".": (_ for _ in ()).throw(PermissionError(13, "Permission denied"))
                        if os.fspath(p) == checkpoint_with_tokenizer else listdir(p))
    with pytest.raises(SystemExit) as exited:
        cli.main(["--checkpoint-dir", checkpoint_with_tokenizer, "--prompt", "x"])
    assert exited.value.code == 2
    assert f"argument --checkpoint-dir: checkpoint folder {checkpoint_with_tokenizer} cannot be read: Permission denied" in capsys.readouterr().err


def test_cli_names_a_tokenizer_larger_than_the_model(tmp_path, capsys):
    # exit 1 and no file named, where an argument the loaded model shows unusable is a usage error
    from safetensors.torch import load_file, save_file

    from qlora_ext import generate as cli
    from qlora_ext.training.config import ASSETS_DIR

    weights = load_file(str(ASSETS_DIR / "tiny_llama2" / "model.safetensors"))
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        weights[key] = weights[key][:512].contiguous()
    save_file(weights, str(tmp_path / "model.safetensors"))
    config = json.loads((ASSETS_DIR / "tiny_llama2" / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "vocab_size": 512}))
    tokenizer = str(ASSETS_DIR / "tokenizer.model")
    assert cli.main(["--checkpoint-dir", str(tmp_path), "--tokenizer", tokenizer, "--prompt", "hi", "--max-new-tokens", "2"]) == 2
    assert (f"error: argument --tokenizer must be the model's: {tokenizer} has 1024 pieces but the model in {tmp_path} only 512 "
            "embeddings; pass the matching --tokenizer") in capsys.readouterr().err
    shutil.copy(tokenizer, tmp_path / "tokenizer.model")  # the folder's own, with no --tokenizer given: not blamed on it
    assert cli.main(["--checkpoint-dir", str(tmp_path), "--prompt", "hi", "--max-new-tokens", "2"]) == 2
    assert (f"error: the checkpoint folder's tokenizer.model must be the model's: {tmp_path / 'tokenizer.model'} has 1024 pieces "
            "but the model") in capsys.readouterr().err


def test_cli_under_an_ascii_locale_takes_utf8_prompts(checkpoint_with_tokenizer):
    # LC_ALL=C with PYTHONUTF8=0: the UTF-8 bytes of "café" were refused as text that is not UTF-8
    # (Python had decoded them as ASCII), and output the terminal cannot encode was a codec error
    env = {**{k: v for k, v in os.environ.items() if k not in ("PYTHONIOENCODING", "LANG", "LC_CTYPE")},
           "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0", "PYTHONPATH": REPO}
    command = [sys.executable, "-m", "qlora_ext.generate", "--checkpoint-dir", checkpoint_with_tokenizer,
               "--prompt", "What is the opposite of caf\u00e9?", "--max-new-tokens", "3", "--temperature", "0"]
    out = subprocess.run(command, capture_output=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(b"What is the opposite of caf\\xe9?"), out.stdout  # (escaped: stdout is ASCII)


def test_cli_output_that_cannot_be_written(checkpoint_with_tokenizer):
    # A full device or a reader gone away: named, or quiet, never a traceback.
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full (Linux's always-full device)")
    env = {**os.environ, "PYTHONPATH": REPO}
    command = [sys.executable, "-m", "qlora_ext.generate", "--checkpoint-dir", checkpoint_with_tokenizer, "--prompt", "x",
               "--max-new-tokens", "3"]
    with open("/dev/full", "w") as full:
        out = subprocess.run(command, stdout=full, stderr=subprocess.PIPE, text=True, env=env, timeout=120)
    assert out.returncode == 1 and out.stderr.strip().splitlines()[-1] == (
        "error: cannot write the generated text to standard output: No space left on device"), out.stderr
    reader_gone = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    reader_gone.stdout.close()
    assert reader_gone.wait(timeout=120) == 1
    assert reader_gone.stderr.read() == ""
    reader_gone.stderr.close()


def test_a_padded_vocabulary_generates_only_ids_the_tokenizer_decodes(tmp_path):
    """A HF checkpoint whose embedding has more rows than its tokenizer.model has pieces (padded,
    which the trainer accepts): the padding ids, here the likeliest, are never generated, so
    generate (Python and CLI) and the trainer's answers decode (SentencePiece raised on them)."""
    transformers()
    from qlora_ext.training.evaluation import answer

    folder = tmp_path / "padded"
    hf = hf_llama(num_kv_heads=2, seed=7, vocab_size=400, max_position_embeddings=256)  # room for the Alpaca prompt
    spm_dir = tmp_path / "spm"
    spm_dir.mkdir()
    tokenizer_path = train_tokenizer(str(spm_dir))
    tokenizer = llama2_tokenizer(tokenizer_path)
    assert tokenizer.vocab_size == 320
    with torch.no_grad():
        hf.lm_head.weight[320:] = hf.lm_head.weight[320:].sign() * 5 + hf.model.norm.weight.sign() * 5  # padding rows win
    hf.save_pretrained(folder)
    shutil.copy(tokenizer_path, folder / "tokenizer.model")
    model = llama2_from_checkpoint(folder).eval()
    ids = tokenizer.encode("the cat", add_eos=False)
    unlimited = generate(model, ids, max_new_tokens=6, temperature=0.0)
    assert (unlimited[0, len(ids):] >= 320).any()  # without the limit, padding ids come out
    limited = generate(model, ids, max_new_tokens=6, temperature=0.0, vocab_limit=tokenizer.vocab_size)
    assert (limited[0, len(ids):] < 320).all()
    for temperature in (0.0, 1.0):
        sampled = generate(model, [ids, ids[:1]], max_new_tokens=6, temperature=temperature, top_k=50,
                           generator=torch.Generator().manual_seed(0), vocab_limit=320)
        assert (sampled < 320).all()
    with pytest.raises(ValueError, match=r"argument 'vocab_limit' must be an integer in \[1, 400\] \(the model's vocabulary\) or None; got 401"):
        generate(model, ids, max_new_tokens=2, vocab_limit=401)
    stdout, _ = _cli("--checkpoint-dir", str(folder), "--prompt", "the cat", "--temperature", "0", "--max-new-tokens", "6")
    assert stdout == tokenizer.decode(limited[0].tolist())
    records = [{"instruction": "Name a color.", "input": "", "output": ""}]
    assert answer(model, tokenizer, records, 6, torch.device("cpu"), torch.float32) == [
        tokenizer.decode(generate(model, prompt_tokens(tokenizer, records[0], "alpaca"), max_new_tokens=6, temperature=0.0,
                                  stop_tokens=[tokenizer.eos_id], vocab_limit=320)[0].tolist()[len(prompt_tokens(tokenizer, records[0], "alpaca")):]).strip()
    ]


def test_cli_refuses_a_model_larger_than_the_free_memory(checkpoint_with_tokenizer, monkeypatch, capsys):
    """A dense model that cannot fit (a 7B in float32, the CPU default, is 27 GB) is refused with
    its size and the smaller dtypes, before any weight is read; the OS would kill the process."""
    from qlora_ext import generate as cli
    from qlora_ext.models import llama2 as builders

    count = transformers().LlamaForCausalLM.from_pretrained(checkpoint_with_tokenizer).num_parameters()
    monkeypatch.setattr(cli, "_available_bytes", lambda device: count * 2 - 1)  # fp32 needs count * 4, bf16 count * 2
    loads = []
    monkeypatch.setattr(builders, "llama2_from_checkpoint", lambda *a, **k: loads.append(a))
    assert cli.main(["--checkpoint-dir", checkpoint_with_tokenizer, "--prompt", "hi", "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert re.search(rf"error: the model in --checkpoint-dir has {count / 1e9:.2f} B parameters: {count * 4 / 1e9:.1f} GB in float32, "
                     rf"more than the {(count * 2 - 1) / 1e9:.1f} GB of memory available on cpu; pass --dtype bfloat16 \({count * 2 / 1e9:.1f} GB\), "
                     r"or --quantize-base with the --adapter-dir of a QLoRA run", err), err
    assert loads == []  # refused before loading
    assert cli.main(["--checkpoint-dir", checkpoint_with_tokenizer, "--prompt", "hi", "--device", "cpu", "--dtype", "bfloat16"]) == 1
    assert "available on cpu; it fits at no --dtype; pass --quantize-base with the --adapter-dir of a QLoRA run" in capsys.readouterr().err
    monkeypatch.setattr(cli, "_available_bytes", lambda device: count * 4 - 1)

    def load_then_stop(*args, **kwargs):
        loads.append(args)
        raise ValueError("loaded")

    monkeypatch.setattr(builders, "llama2_from_checkpoint", load_then_stop)  # bfloat16 fits: it loads
    assert cli.main(["--checkpoint-dir", checkpoint_with_tokenizer, "--prompt", "hi", "--device", "cpu", "--dtype", "bfloat16"]) == 1
    assert "error: loaded" in capsys.readouterr().err and len(loads) == 1


def test_cli_ctrl_c_ends_quietly(checkpoint_with_tokenizer, monkeypatch, capsys):
    from qlora_ext import generate as cli
    from qlora_ext.models import llama2 as builders

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(builders, "llama2_from_checkpoint", interrupted)  # Ctrl-C while loading
    assert cli.main(["--checkpoint-dir", checkpoint_with_tokenizer, "--prompt", "hi", "--device", "cpu"]) == 130
    assert capsys.readouterr().err == "\nInterrupted (Ctrl-C).\n"


# argument checks of generate() / sample() and the CLI's tokenizer hint (helper-149)
def _small_lora_model(device=None):
    kwargs = dict(vocab_size=96, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64, max_seq_len=48, intermediate_dim=128,
                  lora_rank=4, lora_alpha=8)
    if device is not None:
        with torch.device(device):
            return lora_llama2(["q_proj", "v_proj"], **kwargs).eval()
    torch.manual_seed(0)
    model = lora_llama2(["q_proj", "v_proj"], **kwargs)
    with torch.no_grad():
        model.output.weight.mul_(30)
    return model.eval()


def test_a_model_on_the_meta_device_is_named():
    with pytest.raises(ValueError, match=r"generate: argument 'model' has weights on the meta device"):
        generate(_small_lora_model("meta"), [1, 2, 3], max_new_tokens=2)


def test_a_model_that_is_no_decoder_is_named():
    hf = hf_llama(num_kv_heads=2)
    with pytest.raises(ValueError, match=r"generate: argument 'model' must be a qlora_ext TransformerDecoder .*got LlamaForCausalLM"):
        generate(hf, [1, 2, 3], max_new_tokens=2)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16])
def test_prompt_tensors_of_any_integer_dtype_decode_as_int64(dtype):
    model = _small_lora_model()
    want = generate(model, torch.tensor([1, 5, 7]), max_new_tokens=3, temperature=0.0)
    assert torch.equal(generate(model, torch.tensor([1, 5, 7], dtype=dtype), max_new_tokens=3, temperature=0.0), want)
    with pytest.raises(ValueError, match=r"must hold integer token ids \(8 to 64 bits\); got dtype torch.bool"):
        generate(model, torch.tensor([True, False]), max_new_tokens=3)
    with pytest.raises(ValueError, match=r"must hold integer token ids \(8 to 64 bits\); got dtype torch.uint4"):
        generate(model, torch.empty(3, dtype=torch.uint4), max_new_tokens=3)  # (sub-byte ints: torch cannot copy them)


@pytest.mark.parametrize("value", ["no", None, 1])
def test_use_cache_must_be_a_bool(value):
    with pytest.raises(ValueError, match=rf"generate: argument 'use_cache' must be True or False; got {value!r}"):
        generate(_small_lora_model(), [1, 2, 3], max_new_tokens=2, use_cache=value)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_sample_names_logits_it_cannot_sample_from(temperature, bad):
    with pytest.raises(ValueError, match=r"sample: argument 'logits' must hold no NaN or \+infinity.*row 1"):
        sample(torch.tensor([[0.0, 1.0], [bad, 1.0]]), temperature=temperature)
    with pytest.raises(ValueError, match=r"row 0"):
        sample(torch.full((1, 3), float("-inf")), temperature=temperature)
    # -inf masks a token out, as in HF's logits processors
    assert sample(torch.tensor([[float("-inf"), 1.0]]), temperature=temperature).tolist() == [1]


def test_cli_names_the_tokenizer_kept_beside_a_trainer_adapter(tmp_path):
    # The default run's base (qlora_ext/assets/tiny_llama2) holds no tokenizer.model; the trainer's
    # checkpoint folder around adapter/ does: README's `--checkpoint-dir BASE --adapter-dir folder/adapter`.
    base = tmp_path / "base"
    hf_llama(num_kv_heads=2).save_pretrained(base)
    run = tmp_path / "epoch_0"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_config.json").write_text("{}")
    (run / "adapter" / "adapter_model.safetensors").write_bytes(b"")
    spm = tmp_path / "spm"
    spm.mkdir()
    shutil.copy(train_tokenizer(str(spm)), run / "tokenizer.model")
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-m", "qlora_ext.generate", "--checkpoint-dir", str(base), "--adapter-dir",
                          str(run / "adapter"), "--prompt", "x"], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 2
    assert f"pass --tokenizer {run / 'tokenizer.model'}" in out.stderr, out.stderr


# review of the argument checks above (helper-153)
_GEN_ARCH = dict(vocab_size=96, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64, max_seq_len=48,
                 intermediate_dim=128, lora_rank=4, lora_alpha=8, quantize_base=True)


def test_generate_names_meta_rope_buffers_left_by_assign_load():
    # generate's own advice for a meta model (load_state_dict(..., assign=True)) leaves RoPE's
    # non-persistent cos/sin on meta: a RuntimeError "Tensor on device meta is not on the expected device cpu!"
    real = lora_llama2(["q_proj", "v_proj"], **_GEN_ARCH).eval()
    with torch.device("meta"):
        model = lora_llama2(["q_proj", "v_proj"], **_GEN_ARCH)
    model.load_state_dict(real.state_dict(), assign=True)
    with pytest.raises(ValueError, match=r"argument 'model' has .*meta device.*pos_embeddings.*rope_init"):
        generate(model.eval(), [1, 2, 3], max_new_tokens=2, temperature=0.0)
    # and following the message makes it decode as the real model
    for layer in model.layers:
        layer.attn.pos_embeddings.rope_init("cpu")
    assert torch.equal(generate(model, [1, 2, 3], max_new_tokens=3, temperature=0.0),
                       generate(real, [1, 2, 3], max_new_tokens=3, temperature=0.0))


def test_sample_names_the_nan_it_refuses():
    logits = torch.zeros(2, 32000)
    logits[1, 20000] = float("nan")
    # the message showed row 1's first 8 scores, [0.0, ... 0.0], not the NaN
    with pytest.raises(ValueError, match=r"row 1 has nan at column 20000"):
        sample(logits)


def test_sample_refuses_an_empty_vocabulary_by_name():
    for t in (0.0, 1.0):
        with pytest.raises(ValueError, match=r"sample: argument 'logits'"):  # was IndexError / RuntimeError
            sample(torch.zeros(2, 0), temperature=t)


def test_generate_names_an_out_of_range_uint64_id_as_given():
    model = lora_llama2(["q_proj"], **_GEN_ARCH).eval()
    prompt = torch.tensor([[2**64 - 1, 4]], dtype=torch.uint64)
    with pytest.raises(ValueError, match=r"in \[0, 96\); got \[18446744073709551615\]"):  # was "got [-1]"
        generate(model, prompt, max_new_tokens=1)


def test_kv_caches_left_on_meta_are_named_as_caches():
    real = lora_llama2(["q_proj", "v_proj"], **_GEN_ARCH).eval()
    with torch.device("meta"):
        model = lora_llama2(["q_proj", "v_proj"], **_GEN_ARCH)
        model.setup_caches(1, torch.float32)  # torchtune's recipes set caches up inside a device context
    model.load_state_dict(real.state_dict(), assign=True)
    for layer in model.layers:
        layer.attn.pos_embeddings.rope_init("cpu")  # as the RoPE message asks
    with pytest.raises(ValueError) as e:
        generate(model.eval(), [1, 2, 3], max_new_tokens=2, temperature=0.0)
    msg = str(e.value)
    assert "kv_cache" in msg and "setup_caches" in msg, msg
    assert "rope_init" not in msg, msg  # (it was just called: not the remedy)
    model.setup_caches(1, torch.float32)  # following the message decodes as the real model
    assert torch.equal(generate(model, [1, 2, 3], max_new_tokens=3, temperature=0.0),
                       generate(real, [1, 2, 3], max_new_tokens=3, temperature=0.0))
