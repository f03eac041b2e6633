"""torch.compile(fullgraph=True) of quantized LoRALinear layers: no graph breaks, outputs and
gradients equal to eager, no recompilation for the same shapes, dynamic batch sizes."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch._dynamo.testing
from conftest import devices
from torch import nn

from qlora_ext import LoRALinear


class Block(nn.Module):
    """RMSNorm -> LoRALinear -> SiLU -> LoRALinear, with a residual: a QLoRA MLP in miniature."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm = nn.RMSNorm(dim)
        self.up = LoRALinear(dim, hidden, rank=8, alpha=16, quantize_base=True)
        self.down = LoRALinear(hidden, dim, rank=8, alpha=16, quantize_base=True)

    def forward(self, x):
        return x + self.down(torch.nn.functional.silu(self.up(self.norm(x))))


def make_model(kind: str, device: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "lora_linear":
        model = LoRALinear(256, 192, rank=8, alpha=16, quantize_base=True)
    else:
        model = nn.Sequential(Block(128, 320), Block(128, 320))
    for name, p in model.named_parameters():
        if "lora_b" in name:  # non-zero adapters, so their gradients are non-trivial
            nn.init.normal_(p, std=0.02)
    return model.to(device)


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["lora_linear", "stack"])
@pytest.mark.parametrize("device", devices())
def test_compiled_matches_eager_without_breaks_or_recompiles(kind, device):
    torch._dynamo.reset()
    eager = make_model(kind, device)
    compiled_model = make_model(kind, device)  # same seed: identical weights
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    compiled = torch.compile(compiled_model, fullgraph=True, backend=counter)
    in_dim = 256 if kind == "lora_linear" else 128

    for step, batch in enumerate([4, 4, 7, 9]):
        x = torch.randn(batch, 5, in_dim, device=device)
        x_eager, x_comp = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        y_eager, y_comp = eager(x_eager), compiled(x_comp)
        torch.testing.assert_close(y_comp, y_eager, rtol=1e-4, atol=1e-4)
        grad_y = torch.randn_like(y_eager)
        y_eager.backward(grad_y)
        y_comp.backward(grad_y)
        torch.testing.assert_close(x_comp.grad, x_eager.grad, rtol=1e-4, atol=1e-4)
        g_eager, g_comp = grads(eager), grads(compiled_model)
        assert g_eager.keys() == g_comp.keys() and any("lora_a" in n for n in g_eager)
        for name in g_eager:
            torch.testing.assert_close(g_comp[name], g_eager[name], rtol=1e-4, atol=1e-4)
        eager.zero_grad()
        compiled_model.zero_grad()
        if step == 1:
            assert counter.frame_count == 1, "the same shapes compiled twice"
    # A new batch size compiles once more, as a dynamic graph; later sizes reuse it.
    assert counter.frame_count == 2


@pytest.mark.parametrize("how", ["whole", "layers"])
def test_generate_with_a_compiled_model_reuses_its_graphs(how):
    """generate() on a compiled model (torch.compile(model), or each layer's .compile() as the
    trainer's compile=True does): prompts of other lengths and other max_new_tokens reuse the
    same few graphs (a prefill, made dynamic once, and a decoding step), and decode as eager does.
    Caches sized per call had compiled two graphs a call, up to torch's recompile limit."""
    from qlora_ext.generation import generate
    from qlora_ext.models.llama2 import lora_llama2

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = lora_llama2(["q_proj", "v_proj"], vocab_size=128, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64,
                        max_seq_len=64, intermediate_dim=128, lora_rank=4, lora_alpha=8, quantize_base=True).eval()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    if how == "whole":
        compiled = torch.compile(model, fullgraph=True, backend=counter)
    else:
        compiled = model
        for layer in model.layers:
            layer.compile(fullgraph=True, backend=counter)
    calls = [([[5, 6, 7, 8], [9, 10]], 3), ([[1, 2, 3], [4, 5, 6, 7, 8]], 6), ([[11] * 7, [12] * 2], 2),
             ([[3, 1], [4, 1, 5]], 9), ([[2] * 10, [7] * 9], 5), ([[8, 9, 10, 11, 12], [13]], 4)]
    graphs = []
    for prompt, max_new_tokens in calls:
        got = generate(compiled, prompt, max_new_tokens=max_new_tokens, temperature=0.0)
        with torch.compiler.set_stance("force_eager"):
            want = generate(model, prompt, max_new_tokens=max_new_tokens, temperature=0.0)
        assert torch.equal(got, want)
        assert not model.caches_are_setup()  # generate's own caches are removed again
        graphs.append(counter.frame_count)
    assert graphs[-1] <= 3 and graphs[2] == graphs[-1], f"graphs compiled after each call: {graphs}"


def test_generate_on_a_compiled_model_runs_past_the_recompile_limit():
    # Each new batch size compiles a prefill and a decoding graph; with fullgraph=True torch
    # failed hard (FailOnRecompileLimitHit) at the fifth one. generate runs that call eagerly.
    from qlora_ext.generation import generate
    from qlora_ext.models.llama2 import lora_llama2

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = lora_llama2(["q_proj", "v_proj"], vocab_size=128, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64,
                        max_seq_len=64, intermediate_dim=128, lora_rank=4, lora_alpha=8, quantize_base=True).eval()
    for layer in model.layers:
        layer.compile(fullgraph=True, backend="aot_eager")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for b in range(1, 8):
            prompt = [[1 + i, 2, 3] for i in range(b)]
            got = generate(model, prompt, max_new_tokens=4, temperature=0.0)
            with torch.compiler.set_stance("force_eager"):
                assert torch.equal(got, generate(model, prompt, max_new_tokens=4, temperature=0.0)), b
    eager_calls = [str(w.message) for w in caught if "recompile limit" in str(w.message)]
    assert eager_calls and all("this call runs eagerly" in m for m in eager_calls)
    assert not model.caches_are_setup()


def test_a_merged_then_disabled_layer_compiles_with_fullgraph():
    """A disabled adapter takes itself out of a merged base in forward (as PEFT does); compiled
    with fullgraph=True that must trace too (the rounding warning is eager-only) and give eager's
    output and weights."""
    import warnings

    torch._dynamo.reset()
    layers = []
    for _ in range(2):
        torch.manual_seed(0)
        layer = LoRALinear(128, 64, rank=4, alpha=8, quantize_base=True)
        nn.init.normal_(layer.lora_b.weight, std=0.05)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            layer.merge_()
        layer.disabled = True
        layers.append(layer)
    eager, compiled_layer = layers
    x = torch.randn(3, 128)
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = eager(x)
    got = torch.compile(compiled_layer, fullgraph=True, backend=counter)(x)
    assert counter.frame_count == 1 and not compiled_layer.merged
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(compiled_layer.weight.dequantize(), eager.weight.dequantize(), rtol=0, atol=0)


def test_force_eager_runs_compiled_code_eagerly_without_torch_2_12s_warning():
    from qlora_ext._eager import NO_COMPILED_FRAMES, force_eager

    backend = torch._dynamo.testing.CompileCounter()
    f = torch.compile(lambda x: x.sin() + 1, fullgraph=True, backend=backend)

    @force_eager()
    def evaluate(x):
        # torch 2.12 warns here that the fullgraph=True call compiled nothing; stand in for it
        warnings.warn(f"{NO_COMPILED_FRAMES}. The frame was likely skipped", UserWarning)
        return f(x)

    x = torch.randn(3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.testing.assert_close(evaluate(x), x.sin() + 1)
        with force_eager():
            f(x)
            warnings.warn("another warning", UserWarning)  # only that one is silenced
    assert backend.frame_count == 0  # nothing was compiled
    assert [str(w.message) for w in caught] == ["another warning"]
    f(x)
    assert backend.frame_count == 1  # outside, the stance is back to compiling


@pytest.mark.parametrize("transform", ["jvp", "per_sample_grad"])
def test_torch_func_transforms_under_compile_match_eager(transform):
    # Traced by torch.compile, the transforms take the same forward-mode functions as in eager:
    # else the NF4 linear gives jvp a zero tangent, and the fused LoRA function has no jvp.
    torch._dynamo.reset()
    model = make_model("lora_linear", "cpu")
    x, t = torch.randn(3, 5, 256), torch.randn(3, 5, 256)
    if transform == "jvp":
        def f(x, t):
            return torch.func.jvp(model, (x,), (t,))[1]
    else:
        def f(x, t):
            return torch.func.vmap(torch.func.grad(lambda x: model(x).pow(2).sum()))(x + t)
    torch.testing.assert_close(torch.compile(f, backend="aot_eager")(x, t), f(x, t), rtol=1e-4, atol=1e-4)
