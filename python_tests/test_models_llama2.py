"""Llama-2 builders: torchtune's module names, which weights are NF4, sizes of 7B/13B/70B (built
on the meta device), argument errors, forward/backward, and torch.compile parity."""

from __future__ import annotations

import pytest
import torch
from conftest import devices
from torch import nn

from qlora_ext import LoRALinear, NF4Tensor
from qlora_ext.models.llama2 import (
    llama2,
    llama2_7b,
    llama2_13b,
    llama2_70b,
    llama2_tiny,
    lora_llama2,
    qlora_llama2_7b,
    qlora_llama2_13b,
    qlora_llama2_70b,
    qlora_llama2_tiny,
    scale_hidden_dim_for_mlp,
)
from qlora_ext.modules import get_adapter_params, set_trainable_params


def test_seed_snippet_runs_unchanged():
    # The seed tutorial's lines, on the meta device so the 7B weights are not allocated.
    with torch.device("meta"):
        qlora_model = qlora_llama2_7b(lora_attn_modules=["q_proj", "v_proj"])
    attn = qlora_model.layers[0].attn
    assert type(attn.q_proj.weight) is NF4Tensor
    assert type(attn.v_proj.weight) is NF4Tensor
    assert type(attn.k_proj.weight) is nn.Parameter
    assert type(attn.output_proj.weight) is nn.Parameter
    assert type(qlora_model.layers[0].mlp.w1.weight) is nn.Parameter


def test_lora_builders_take_torchtunes_arguments_in_its_order():
    # torchtune's lora_llama2_7b(lora_attn_modules, apply_lora_to_mlp, apply_lora_to_output,
    # lora_rank, lora_alpha, lora_dropout, use_dora, quantize_base): a positional call meaning
    # use_dora=False built a QLoRA model here (quantize_base sat in its place); DoRA is refused.
    import inspect

    from qlora_ext.models.llama2 import lora_llama2_7b, lora_llama2_13b, lora_llama2_70b, lora_llama2_tiny

    order = ["lora_attn_modules", "apply_lora_to_mlp", "apply_lora_to_output", "lora_rank", "lora_alpha", "lora_dropout",
             "use_dora", "quantize_base"]
    for builder in (lora_llama2_7b, lora_llama2_13b, lora_llama2_70b, lora_llama2_tiny):
        assert list(inspect.signature(builder).parameters)[:8] == order
    with torch.device("meta"):
        model = lora_llama2_7b(["q_proj", "v_proj"], False, False, 8, 16, 0.0, False)
        assert type(model.layers[0].attn.q_proj.weight) is nn.Parameter  # LoRA, dense base
        assert type(lora_llama2_7b(["q_proj"], False, False, 8, 16, 0.0, False, True).layers[0].attn.q_proj.weight) is NF4Tensor
        for call in (lambda: lora_llama2_7b(["q_proj"], False, False, 8, 16, 0.0, True), lambda: qlora_llama2_7b(["q_proj"], use_dora=1)):
            with pytest.raises(ValueError, match=r"argument 'use_dora' must be False: DoRA is not supported here"):
                call()


@pytest.mark.parametrize(
    "builder, params, layers, heads, kv_heads, hidden",
    [
        (llama2_7b, 6_738_415_616, 32, 32, 32, 11008),
        (llama2_13b, 13_015_864_320, 40, 40, 40, 13824),
        (llama2_70b, 68_976_648_192, 80, 64, 8, 28672),
    ],
    ids=["7b", "13b", "70b"],
)
def test_sizes_match_llama2(builder, params, layers, heads, kv_heads, hidden):
    with torch.device("meta"):
        model = builder()
    # Parameter counts of the published Llama-2 checkpoints.
    assert sum(p.numel() for p in model.parameters()) == params
    assert len(model.layers) == layers
    attn = model.layers[0].attn
    assert (attn.num_heads, attn.num_kv_heads) == (heads, kv_heads)
    assert model.layers[0].mlp.w1.weight.shape[0] == hidden
    assert attn.k_proj.weight.shape[0] == kv_heads * attn.head_dim


@pytest.mark.parametrize("builder", [qlora_llama2_7b, qlora_llama2_13b, qlora_llama2_70b], ids=["7b", "13b", "70b"])
def test_qlora_builders_quantize_exactly_the_lora_linears(builder):
    with torch.device("meta"):
        model = builder(["q_proj", "k_proj"], apply_lora_to_mlp=True, lora_rank=16, lora_alpha=32)
    layer = model.layers[-1]
    for lin in (layer.attn.q_proj, layer.attn.k_proj, layer.mlp.w1, layer.mlp.w2, layer.mlp.w3):
        assert isinstance(lin, LoRALinear) and isinstance(lin.weight, NF4Tensor) and lin.rank == 16 and lin.alpha == 32
    for lin in (layer.attn.v_proj, layer.attn.output_proj, model.output):
        assert type(lin) is nn.Linear
    # GQA: k_proj's NF4 weight has num_kv_heads * head_dim rows.
    assert layer.attn.k_proj.weight.shape == (layer.attn.num_kv_heads * layer.attn.head_dim, layer.attn.embed_dim)


def test_tiny_defaults():
    model = llama2_tiny()
    assert (model.tok_embeddings.num_embeddings, model.max_seq_len, len(model.layers)) == (512, 512, 4)
    assert (model.layers[0].attn.num_heads, model.layers[0].attn.num_kv_heads, model.tok_embeddings.embedding_dim) == (4, 2, 256)
    assert llama2_tiny(vocab_size=320).output.weight.shape == (320, 256)


def test_scale_hidden_dim():
    assert scale_hidden_dim_for_mlp(4096) == 11008
    assert scale_hidden_dim_for_mlp(5120) == 13824
    assert scale_hidden_dim_for_mlp(256) == 768


def test_module_and_state_dict_names_follow_torchtune():
    model = qlora_llama2_tiny(["q_proj", "k_proj", "v_proj", "output_proj"], apply_lora_to_mlp=True, apply_lora_to_output=True)
    names = set(model.state_dict())
    for want in (
        "tok_embeddings.weight",
        "layers.0.attn.q_proj.weight",
        "layers.0.attn.q_proj.lora_a.weight",
        "layers.0.attn.q_proj.lora_b.weight",
        "layers.3.attn.output_proj.weight",
        "layers.0.mlp.w1.weight",
        "layers.0.mlp.w2.weight",
        "layers.0.mlp.w3.weight",
        "layers.0.sa_norm.scale",
        "layers.0.mlp_norm.scale",
        "norm.scale",
        "output.weight",
        "output.lora_a.weight",
    ):
        assert want in names
    # Non-persistent buffers (RoPE tables) stay out of checkpoints.
    assert not any("cos" in n or "sin" in n for n in names)
    # Every LoRA linear is quantized, nothing else; state_dict gives them dense.
    state = model.state_dict()
    lora = [name for name, module in model.named_modules() if isinstance(module, LoRALinear)]
    assert len(lora) == 4 * 7 + 1
    for name in lora:
        assert isinstance(model.get_submodule(name).weight, NF4Tensor), name
        assert type(state[f"{name}.weight"]) is torch.Tensor
    assert type(model.tok_embeddings.weight) is nn.Parameter


def test_only_lora_linears_are_quantized():
    model = qlora_llama2_tiny(["k_proj"], apply_lora_to_mlp=False)
    layer = model.layers[0]
    assert isinstance(layer.attn.k_proj.weight, NF4Tensor)
    for other in (layer.attn.q_proj, layer.attn.v_proj, layer.attn.output_proj, layer.mlp.w1, layer.mlp.w2, model.output):
        assert isinstance(other, nn.Linear) and type(other.weight) is nn.Parameter


def test_builder_errors_name_the_argument():
    base = dict(vocab_size=64, num_layers=1, num_heads=4, num_kv_heads=2, embed_dim=64, max_seq_len=16)
    with pytest.raises(ValueError, match=r"argument 'lora_attn_modules' must be a list drawn from .*; got \['q_proj', 'wq'\]"):
        lora_llama2(["q_proj", "wq"], **base, lora_rank=4, lora_alpha=8)
    with pytest.raises(ValueError, match=r"argument 'lora_attn_modules' must be a list .*; got 'q_proj'"):
        lora_llama2("q_proj", **base, lora_rank=4, lora_alpha=8)
    with pytest.raises(ValueError, match=r"argument 'num_kv_heads' must divide num_heads=4; got 3"):
        llama2(**{**base, "num_kv_heads": 3})
    with pytest.raises(ValueError, match=r"argument 'embed_dim' must be a multiple of num_heads=4; got 66"):
        llama2(**{**base, "embed_dim": 66})
    with pytest.raises(ValueError, match=r"argument 'num_layers' must be a positive int; got 0"):
        llama2(**{**base, "num_layers": 0})
    with pytest.raises(ValueError, match=r"argument 'num_heads' must be a positive int; got True"):
        llama2(**{**base, "num_heads": True})
    with pytest.raises(ValueError, match=r"argument 'lora_attn_modules' must be a list .*; got None"):
        lora_llama2(None, **base, lora_rank=4, lora_alpha=8)
    with pytest.raises(ValueError, match=r"LoRALinear: argument 'alpha' must be a finite number; got nan"):
        lora_llama2(["q_proj"], **base, lora_rank=4, lora_alpha=float("nan"))
    with pytest.raises(ValueError, match=r"argument 'base' must be a finite number > 0; got -1.0"):
        llama2(**base, rope_base=-1.0)
    model = llama2(**base)
    with pytest.raises(ValueError, match=r"set_trainable_params: argument 'adapter_params' must name parameters of the model; these are not: \['typo'\]"):
        set_trainable_params(model, {"typo": None})
    assert all(p.requires_grad for p in model.parameters())  # nothing changed
    with pytest.raises(ValueError, match=r"quantize_base=True needs .* multiple of 64; output is 5 x 72"):
        lora_llama2([], apply_lora_to_output=True, **{**base, "vocab_size": 5, "embed_dim": 72}, lora_rank=4, lora_alpha=8, quantize_base=True)


@pytest.mark.parametrize("device", devices())
def test_tiny_forward_backward_trains_only_adapters(device):
    model = qlora_llama2_tiny(["q_proj", "v_proj"], apply_lora_to_mlp=True, vocab_size=128).to(device)
    adapters = get_adapter_params(model)
    set_trainable_params(model, adapters)
    tokens = torch.randint(0, 128, (2, 12), device=device)
    logits = model(tokens)
    assert logits.shape == (2, 12, 128) and logits.dtype == torch.float32
    torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 128), tokens[:, 1:].reshape(-1)).backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads == set(adapters)
    # lora_b starts at zero, so only lora_b gets a nonzero gradient at first.
    assert all(adapters[n].grad.abs().sum() > 0 for n in adapters if "lora_b" in n)


def test_bf16_model_gives_float32_logits():
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = qlora_llama2_tiny(["q_proj"], vocab_size=64)
    finally:
        torch.set_default_dtype(torch.float32)
    assert model.tok_embeddings.weight.dtype == torch.bfloat16
    assert model.layers[0].attn.q_proj.weight.dtype == torch.bfloat16  # NF4Tensor's original dtype
    assert model(torch.randint(0, 64, (1, 5))).dtype == torch.float32


def test_per_sample_adapter_gradients_of_a_float32_qlora_model():
    # Opacus-style per-sample gradients (torch.func.vmap over grad): RMSNorm's and RoPE's float32
    # autograd functions had no setup_context, so torch.func refused any fp32 model.
    torch.manual_seed(0)
    model = qlora_llama2_tiny(["q_proj", "v_proj"], apply_lora_to_mlp=True)
    for name, p in model.named_parameters():
        if "lora_b" in name:
            nn.init.normal_(p, std=0.02)
    trainable = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    frozen = {name: p for name, p in model.named_parameters() if not p.requires_grad}
    tokens = torch.randint(0, 512, (3, 1, 7))  # 3 samples of one 7-token row

    def loss(params, t):
        return torch.func.functional_call(model, (params, frozen), (t,)).logsumexp(-1).sum()

    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(trainable, tokens)
    for i in range(3):
        model.zero_grad()
        model(tokens[i]).logsumexp(-1).sum().backward()
        for name, p in model.named_parameters():
            if p.requires_grad:
                torch.testing.assert_close(per_sample[name][i], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = lora_llama2(
        ["q_proj", "k_proj", "v_proj", "output_proj"], apply_lora_to_mlp=True, apply_lora_to_output=True,
        vocab_size=128, num_layers=1, num_heads=4, num_kv_heads=2, embed_dim=128, max_seq_len=64, intermediate_dim=256,
        lora_rank=4, lora_alpha=8, quantize_base=True,
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_b" in name:
                p.normal_(std=0.05)  # so adapters change the output and get full gradients
    set_trainable_params(model, get_adapter_params(model))
    tokens = torch.randint(0, 128, (2, 16))

    def step(m):
        model.zero_grad(set_to_none=True)
        logits = m(tokens)
        logits.logsumexp(-1).mean().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    eager_logits, eager_grads = step(model)
    compiled = torch.compile(model, fullgraph=True)
    compiled_logits, compiled_grads = step(compiled)
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
    torch.testing.assert_close(compiled_logits, eager_logits, rtol=1e-4, atol=1e-5)
    assert eager_grads.keys() == compiled_grads.keys() and len(eager_grads) == 2 * (7 + 1)
    for name in eager_grads:
        torch.testing.assert_close(compiled_grads[name], eager_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_fast_qlora_linear_is_a_plain_quantized_lora_linear():
    from qlora_ext.modules.lora_init import qlora_linear, uniform_parallel_

    torch.manual_seed(0)
    a = qlora_linear(256, 128, rank=8, alpha=16)
    torch.manual_seed(0)
    b = qlora_linear(256, 128, rank=8, alpha=16)
    assert all(torch.equal(x, y) for x, y in zip(a.weight.components(), b.weight.components()))  # reproducible
    torch.manual_seed(0)
    scratch = torch.full((300 * 128,), float("nan"))
    c = qlora_linear(256, 128, rank=8, alpha=16, scratch=scratch)  # drawn in a reused buffer: same weight
    assert all(torch.equal(x, y) for x, y in zip(a.weight.components(), c.weight.components()))
    assert not scratch[: 256 * 128].isnan().any() and scratch[256 * 128 :].isnan().all()
    ref = LoRALinear(256, 128, rank=8, alpha=16, quantize_base=True)
    assert type(a) is LoRALinear and isinstance(a.weight, NF4Tensor) and not a.weight.requires_grad
    assert [(n, p.shape, p.requires_grad) for n, p in a.named_parameters()] == [(n, p.shape, p.requires_grad) for n, p in ref.named_parameters()]
    assert a.state_dict().keys() == ref.state_dict().keys() and type(a.state_dict()["weight"]) is torch.Tensor
    assert a.lora_b.weight.abs().sum() == 0 and a.lora_a.weight.abs().sum() > 0
    # nn.Linear's init distribution: U(-1/sqrt(in), 1/sqrt(in)), filled by several threads.
    w = uniform_parallel_(torch.empty(4_000_000), 0.5)
    assert w.min() >= -0.5 and w.max() <= 0.5
    assert abs(w.mean().item()) < 2e-3 and abs(w.var().item() - 0.25 / 3) < 2e-3
    halves = w.view(2, -1)
    assert not torch.equal(halves[0][:100], halves[1][:100])  # threads draw different streams
