"""The numeric pieces of a step: token loss and its normalization over an accumulation window,
activation checkpointing (same gradients, same names), device and dtype choice."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

from qlora_ext import generation
from qlora_ext.models.llama2 import lora_llama2
from qlora_ext.modules.peft import get_adapter_params, set_trainable_params
from qlora_ext.training import evaluation, steps
from qlora_ext.training.config import ConfigError
from qlora_ext.training.data import IGNORE_INDEX


def _labels(b, s, vocab, masked_prefix):
    labels = torch.randint(0, vocab, (b, s))
    for row, n in enumerate(masked_prefix):
        labels[row, :n] = IGNORE_INDEX
    return labels


def test_token_loss_is_shifted_masked_cross_entropy():
    logits = torch.randn(2, 6, 11)
    labels = _labels(2, 6, 11, [3, 1])
    got = steps.token_loss_sum(logits, labels) / steps.num_loss_tokens(labels)
    keep = labels[:, 1:] != IGNORE_INDEX
    want = F.cross_entropy(logits[:, :-1][keep], labels[:, 1:][keep])
    torch.testing.assert_close(got, want)
    assert steps.num_loss_tokens(labels) == int(keep.sum()) == (6 - 3) + (6 - 1)  # labels after the masked prefix


def test_accumulation_normalizes_by_all_tokens_of_the_window():
    """Two micro-batches with different token counts give the gradient of the whole batch's
    mean token loss (not the mean of the two micro-batch means)."""
    w = torch.randn(8, 11, requires_grad=True)
    x = torch.randn(4, 6, 8)
    labels = _labels(4, 6, 11, [5, 5, 0, 1])  # few tokens in the first half, many in the second
    F.cross_entropy((x @ w)[:, :-1][labels[:, 1:] != IGNORE_INDEX], labels[:, 1:][labels[:, 1:] != IGNORE_INDEX]).backward()
    want = w.grad.clone()
    w.grad = None
    total = steps.num_loss_tokens(labels)
    for half in (slice(0, 2), slice(2, 4)):
        (steps.token_loss_sum(x[half] @ w, labels[half]) / total).backward()
    torch.testing.assert_close(w.grad, want)


def _tiny_lora(seed=0, lora_dropout=0.0):
    torch.manual_seed(seed)
    model = lora_llama2(["q_proj", "v_proj", "output_proj"], True, False, vocab_size=64, num_layers=2, num_heads=4,
                        num_kv_heads=2, embed_dim=64, max_seq_len=32, intermediate_dim=128, lora_rank=4, lora_alpha=8.0,
                        lora_dropout=lora_dropout, quantize_base=True)
    adapter = get_adapter_params(model)
    for p in adapter.values():
        torch.nn.init.normal_(p, std=0.05)  # lora_b starts at zero; make both get gradients
    set_trainable_params(model, adapter)
    return model, adapter


def test_activation_checkpointing_same_gradients_and_names():
    tokens = torch.randint(0, 64, (2, 16))
    grads = []
    for ckpt in (False, True):
        model, adapter = _tiny_lora()
        names = [n for n, _ in model.named_parameters()]
        if ckpt:
            steps.enable_activation_checkpointing(model)
            assert [n for n, _ in model.named_parameters()] == names
        steps.token_loss_sum(model(tokens), tokens).backward()
        grads.append({n: p.grad.clone() for n, p in adapter.items()})
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n])


def test_compiled_layers_serve_training_only(monkeypatch):
    # compile_layers compiles each layer (fullgraph); the same loss and gradients as eager, and
    # validation and generation run eagerly: they add no graph, nor does a second step.
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: real_compile(fn, backend="aot_eager", **kwargs))
    torch._dynamo.reset()
    counters.clear()
    model, adapter = _tiny_lora()
    tokens = torch.randint(0, 64, (2, 16))
    want = steps.token_loss_sum(model(tokens), tokens)
    want_grads = torch.autograd.grad(want, list(adapter.values()))
    steps.enable_activation_checkpointing(model)
    steps.compile_layers(model)
    got = steps.token_loss_sum(model(tokens), tokens)
    for w, g in zip(want_grads, torch.autograd.grad(got, list(adapter.values()))):
        torch.testing.assert_close(g, w)
    torch.testing.assert_close(got, want)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1 and not counters["graph_break"]

    class Tokenizer:  # what evaluation.answer uses of one
        bos_id, eos_id, vocab_size = 1, 2, 64

        def encode(self, text, add_bos, add_eos, trim_leading_whitespace=False):
            return [1, 5, 6, 7][0 if add_bos else 1 :]

        def decode(self, ids):
            return " ".join(map(str, ids))

    cpu = torch.device("cpu")
    steps.validation_loss(model, [{"tokens": tokens, "labels": tokens}], cpu, torch.float32)
    cache_lengths = []
    real_setup = model.setup_caches
    model.setup_caches = lambda *a, **k: (cache_lengths.append(k["max_seq_len"]), real_setup(*a, **k))[1]
    evaluation.answer(model, Tokenizer(), [{"instruction": "count", "input": ""}], 3, cpu, torch.float32)
    prompt = evaluation.prompt_tokens(Tokenizer(), {"instruction": "count", "input": ""}, "alpaca")
    assert cache_lengths == [len(prompt) + 3] and not model.caches_are_setup()  # sized for the answers, not max_seq_len
    del model.setup_caches
    steps.token_loss_sum(model(tokens), tokens).backward()
    assert counters["stats"]["unique_graphs"] == graphs
    torch._dynamo.reset()


def test_bf16_autocast_with_fp32_adapters_on_cpu():
    model, adapter = _tiny_lora()
    tokens = torch.randint(0, 64, (2, 16))
    with steps.autocast(torch.device("cpu"), torch.bfloat16):
        logits = model(tokens)
    steps.token_loss_sum(logits, tokens).backward()
    assert all(p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32 for p in adapter.values())


def test_device_and_dtype_resolution():
    cpu = torch.device("cpu")
    assert steps.resolve_dtype("auto", cpu) == torch.float32
    assert steps.resolve_dtype("bf16", cpu) == torch.bfloat16
    if not torch.cuda.is_available():
        assert steps.resolve_device("auto") == cpu
        with pytest.raises(ConfigError, match="config key 'device' is cuda but no CUDA GPU is available"):
            steps.resolve_device("cuda")


def test_validation_loss_restores_train_mode():
    model, _ = _tiny_lora()
    model.train()
    tokens = torch.randint(0, 64, (2, 16))
    loss = steps.validation_loss(model, [{"tokens": tokens, "labels": tokens}], torch.device("cpu"), torch.float32)
    assert model.training and loss > 0


def _tiny_qlora_frozen_output(seed=0):
    torch.manual_seed(seed)
    model = lora_llama2(["q_proj", "v_proj"], True, False, vocab_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
                        embed_dim=64, max_seq_len=32, intermediate_dim=128, lora_rank=4, lora_alpha=8.0, quantize_base=True)
    adapter = get_adapter_params(model)
    for p in adapter.values():
        torch.nn.init.normal_(p, std=0.05)
    set_trainable_params(model, adapter)
    return model, adapter


def test_fused_output_loss_same_loss_and_gradients():
    """The loss applying the frozen output projection itself (hidden states out of the model) gives
    the logits path's loss and adapter gradients; a LoRA output keeps the logits path."""
    tokens = torch.randint(0, 96, (3, 20))
    labels = _labels(3, 20, 96, [7, 0, 19])
    results = []
    for fused in (False, True):
        model, adapter = _tiny_qlora_frozen_output()
        output_weight = steps.fused_output_weight(model)
        assert output_weight is model.output.weight
        with steps.hidden_state_outputs(model, fused):
            outputs = model(tokens)
        assert outputs.shape == ((3, 20, 64) if fused else (3, 20, 96))  # hidden states (dim 64) or logits
        assert model.skip_output_layer is False  # restored
        loss = steps.token_loss_sum(outputs, labels, output_weight if fused else None)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in adapter.items()}))
    torch.testing.assert_close(results[0][0], results[1][0])
    for n in results[0][1]:
        torch.testing.assert_close(results[0][1][n], results[1][1][n])
    lora_output = lora_llama2(["q_proj"], False, True, vocab_size=96, num_layers=1, num_heads=4, num_kv_heads=2,
                              embed_dim=64, max_seq_len=32, intermediate_dim=128, lora_rank=4, lora_alpha=8.0)
    assert steps.fused_output_weight(lora_output) is None  # LoRA on the output: it trains, the logits path stays


def test_skip_output_layer_returns_normed_hidden_states():
    model, _ = _tiny_qlora_frozen_output()
    tokens = torch.randint(0, 96, (2, 9))
    logits = model(tokens)
    with steps.hidden_state_outputs(model, True):
        hidden = model(tokens)
    torch.testing.assert_close(model.output(hidden), logits)


def test_validation_loss_fused_equals_logits_path():
    model, _ = _tiny_qlora_frozen_output()
    tokens = torch.randint(0, 96, (2, 16))
    batches = [{"tokens": tokens, "labels": tokens}]
    fused = steps.validation_loss(model, batches, torch.device("cpu"), torch.float32)
    with torch.no_grad():
        want = float(steps.token_loss_sum(model(tokens), tokens)) / steps.num_loss_tokens(tokens)
    assert fused == pytest.approx(want, rel=1e-5)


def test_answers_fit_prompts_of_any_length_into_max_seq_len():
    # Held-out prompts near or over the model's max_seq_len (32 here): the run's before/after
    # answers get as many new tokens as fit, or a line saying the prompt fills it; no crash.
    model, _ = _tiny_lora()

    class Tokenizer:  # a token per word
        bos_id, eos_id, vocab_size = 1, 2, 64

        def encode(self, text, add_bos, add_eos, trim_leading_whitespace=False):
            return [1] * add_bos + [5 + len(w) % 50 for w in text.split()]

        def decode(self, ids):
            return " ".join(map(str, ids))

    def record(words):
        return {"instruction": " ".join(["w"] * words), "input": ""}

    tokenizer, cpu = Tokenizer(), torch.device("cpu")
    lengths = {n: len(evaluation.prompt_tokens(tokenizer, record(n), "alpaca")) for n in (1, 10, 40)}
    assert lengths[1] + 8 <= 32 < lengths[10] + 8 and lengths[10] < 32 <= lengths[40]
    calls = []
    real_generate = generation.generate
    with mock.patch.object(generation, "generate", lambda model, prompts, **k: (calls.append((len(prompts), k["max_new_tokens"])),
                                                                               real_generate(model, prompts, **k))[1]):
        answers = evaluation.answer(model, tokenizer, [record(1), record(40), record(10), record(1)], 8, cpu, torch.float32)
    assert sorted(calls) == [(1, 32 - lengths[10]), (2, 8)]  # the short prompts in one batch, the longer one with what fits
    assert answers[1] == f"(not answered: its prompt of {lengths[40]} tokens fills the model's max_seq_len 32)"
    alone = evaluation.answer(model, tokenizer, [record(1)], 8, cpu, torch.float32)
    assert answers[0] == answers[3] == alone[0] and len(answers[2].split()) <= 32 - lengths[10]
    assert evaluation.answer(model, tokenizer, [], 8, cpu, torch.float32) == [] and not model.caches_are_setup()


def test_compiled_dropout_draws_as_eager():
    # The same seed gives the same dropout masks compiled and eager (fallback_random), so a
    # resumed compiled run, which restores the RNG state, repeats the uninterrupted one.
    tokens = torch.randint(0, 64, (2, 16))
    results = []
    for compiled in (False, True):
        model, adapter = _tiny_lora(lora_dropout=0.3)
        if compiled:
            steps.compile_layers(model)
        torch.manual_seed(5)
        loss = steps.token_loss_sum(model(tokens), tokens)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in adapter.items()}))
    assert any(isinstance(m, torch.nn.Dropout) and m.p == 0.3 for m in model.modules())
    torch.testing.assert_close(results[1][0], results[0][0])
    for n in results[0][1]:
        torch.testing.assert_close(results[1][1][n], results[0][1][n])
    torch._dynamo.reset()


# mode and precision of the steps (helper-148's surviving mutants)
def test_validation_loss_runs_in_eval_mode_and_restores_either_mode():
    """Mutants S3 (``model.train(True)`` in place of ``model.train(was_training)``) and S5 (no
    ``model.eval()``) in training/steps.py: a held-out loss is deterministic (no dropout) and an eval
    model stays in eval mode."""
    model, _ = _tiny_lora(lora_dropout=0.5)
    tokens = torch.randint(0, 64, (2, 16))
    batches = [{"tokens": tokens, "labels": tokens}]
    cpu = torch.device("cpu")
    model.eval()
    want = steps.validation_loss(model, batches, cpu, torch.float32)
    assert not model.training and all(not m.training for m in model.modules())
    model.train()
    got = [steps.validation_loss(model, batches, cpu, torch.float32) for _ in range(3)]
    assert got == [want] * 3  # no dropout in the held-out loss
    assert model.training and all(m.training for m in model.modules())


def test_bf16_autocast_runs_the_model_in_bf16():
    """Mutant S4 (training/steps.py ``autocast`` returning a null context for bf16): the existing
    test checks only that the fp32 adapters get fp32 gradients, which they also do without
    autocast. Under ``steps.autocast(cpu, bf16)`` the projections must compute in bf16."""
    model, _ = _tiny_lora()
    seen = []
    hook = model.layers[0].attn.q_proj.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    tokens = torch.randint(0, 64, (2, 16))
    with steps.autocast(torch.device("cpu"), torch.bfloat16):
        model(tokens)
    with steps.autocast(torch.device("cpu"), torch.float32):
        model(tokens)
    hook.remove()
    assert seen == [torch.bfloat16, torch.float32]
