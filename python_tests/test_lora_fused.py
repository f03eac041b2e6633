"""LoRALinear's fused training path (qlora_ext.modules.lora_fused) against the composed formula
``base(x) + scaling * lora_b(lora_a(dropout(x)))``: outputs and every gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import devices
from torch import nn

from qlora_ext import LoRALinear
from qlora_ext.modules.lora_fused import lora_linear

TOL = {torch.float32: {"rtol": 1e-5, "atol": 1e-5}, torch.bfloat16: {"rtol": 2e-2, "atol": 2e-2}}


def composed(lin: LoRALinear, x: torch.Tensor, x_lora: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The module-by-module formula, with the adapter cast to dtype as autocast would."""
    base_w = lin.weight.dequantize(dtype) if lin._quantize_base else lin.weight.to(dtype)
    a, b = lin.lora_a.weight.to(dtype), lin.lora_b.weight.to(dtype)
    return F.linear(x, base_w, lin.bias) + lin.scaling * F.linear(F.linear(x_lora, a), b)


def grads(out: torch.Tensor, grad_out: torch.Tensor, *tensors: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(out, [t for t in tensors if t.requires_grad], grad_out))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("quantize_base", [True, False], ids=["nf4", "dense"])
@pytest.mark.parametrize("device", devices())
def test_fused_forward_and_gradients_match_the_composed_formula(quantize_base, dtype, device):
    torch.manual_seed(0)
    lin = LoRALinear(192, 136, rank=8, alpha=16.0, quantize_base=quantize_base, use_bias=True).to(device, dtype)
    nn.init.normal_(lin.lora_b.weight)
    x = torch.randn(2, 3, 5, 192, device=device, dtype=dtype, requires_grad=True)  # 3 leading dims
    grad_y = torch.randn(5, 2, 3, 136, device=device, dtype=dtype).permute(1, 2, 0, 3)  # non-contiguous
    params = (x, lin.lora_a.weight, lin.lora_b.weight)

    got = lin(x)
    want = composed(lin, x, x, dtype)
    torch.testing.assert_close(got, want, **TOL[dtype])
    for g, w in zip(grads(got, grad_y, *params), grads(want, grad_y, *params)):
        torch.testing.assert_close(g, w, **TOL[dtype])


def test_dropout_mask_is_applied_to_the_adapter_input_only():
    lin = LoRALinear(128, 64, rank=4, alpha=8.0, dropout=0.5, quantize_base=True).train()
    nn.init.normal_(lin.lora_b.weight)
    x = torch.randn(6, 128, requires_grad=True)
    grad_y = torch.randn(6, 64)
    params = (x, lin.lora_a.weight, lin.lora_b.weight)

    torch.manual_seed(7)
    got = lin(x)
    torch.manual_seed(7)
    want = composed(lin, x, F.dropout(x, 0.5, training=True), torch.float32)
    torch.testing.assert_close(got, want)
    for g, w in zip(grads(got, grad_y, *params), grads(want, grad_y, *params)):
        torch.testing.assert_close(g, w)
    lin.eval()  # no dropout in eval
    torch.testing.assert_close(lin(x), composed(lin, x, x, torch.float32))


@pytest.mark.parametrize("base", ["nf4_bf16", "dense_fp32_with_bias", "nf4_fp32_with_bias"])
def test_autocast_bf16_runs_fp32_adapters_in_bf16_with_fp32_gradients(base):
    # The trainer's QLoRA (a bf16 NF4 base, fp32 adapters) and plain LoRA under AMP (an fp32 dense
    # base: its backward used to multiply the bf16 output gradient by the fp32 weight and fail); an
    # fp32 NF4 base's fp32 bias met the bf16 input uncast ("'bias' must have the dtype of 'x'").
    torch.manual_seed(0)
    if base == "nf4_bf16":
        lin = LoRALinear(128, 96, rank=8, alpha=16.0, quantize_base=True).to(torch.bfloat16)
        lin.lora_a.float(), lin.lora_b.float()  # the trainer's fp32 adapters
    else:
        lin = LoRALinear(128, 96, rank=8, alpha=16.0, use_bias=True, quantize_base=base.startswith("nf4"))
        nn.init.normal_(lin.bias)
        lin.bias.requires_grad_(True)
    nn.init.normal_(lin.lora_b.weight)
    x = torch.randn(4, 128, dtype=torch.bfloat16, requires_grad=True)
    grad_y = torch.randn(4, 96, dtype=torch.bfloat16)
    params = (x, lin.lora_a.weight, lin.lora_b.weight) + ((lin.bias,) if lin.bias is not None else ())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = lin(x)
        want = composed(lin, x, x, torch.bfloat16)  # under autocast too: it casts an fp32 bias as for lin
    assert got.dtype == torch.bfloat16
    got_grads = grads(got, grad_y, *params)
    assert [g.dtype for g in got_grads] == [torch.bfloat16, torch.float32, torch.float32] + [torch.float32] * (len(params) - 3)
    torch.testing.assert_close(got, want, **TOL[torch.bfloat16])
    for g, w in zip(got_grads, grads(want, grad_y, *params)):
        torch.testing.assert_close(g.float(), w.float(), **TOL[torch.bfloat16])


def test_input_without_grad_and_trainable_bias():
    lin = LoRALinear(64, 32, rank=4, alpha=4.0, use_bias=True, quantize_base=True)
    lin.bias.requires_grad_(True)
    nn.init.normal_(lin.lora_b.weight)
    x = torch.randn(3, 7, 64)  # e.g. the first layer's input: no gradient wanted
    grad_y = torch.randn(3, 7, 32)
    lin(x).backward(grad_y)
    torch.testing.assert_close(lin.bias.grad, grad_y.sum((0, 1)))
    a_grad, b_grad = lin.lora_a.weight.grad, lin.lora_b.weight.grad
    want = grads(composed(lin, x, x, torch.float32), grad_y, lin.lora_a.weight, lin.lora_b.weight)
    torch.testing.assert_close([a_grad, b_grad], want)


def test_trainable_dense_base_takes_the_composed_path_and_gets_its_gradient():
    lin = LoRALinear(64, 32, rank=4, alpha=4.0)
    lin.weight.requires_grad_(True)
    x = torch.randn(5, 64)
    lin(x).sum().backward()
    assert lin.weight.grad is not None
    torch.testing.assert_close(lin.weight.grad, torch.ones(5, 32).t() @ x)


def test_lora_linear_function_never_gives_the_weight_a_gradient():
    w = torch.randn(32, 64, requires_grad=True)
    a = torch.randn(4, 64, requires_grad=True)
    b = torch.randn(32, 4, requires_grad=True)
    lora_linear(torch.randn(3, 64), w, None, a, b, 2.0).sum().backward()
    assert w.grad is None and a.grad is not None and b.grad is not None


def test_double_backward_matches_the_composed_formula():
    # A dense float64 base: gradgradcheck needs float64, which the NF4 ops do not take.
    lin = LoRALinear(24, 16, rank=4, alpha=8.0).double()
    nn.init.normal_(lin.lora_b.weight)
    x = torch.randn(5, 24, dtype=torch.float64, requires_grad=True)
    a, b = lin.lora_a.weight, lin.lora_b.weight
    assert torch.autograd.gradgradcheck(lambda x, a, b: lora_linear(x, lin.weight, None, a, b, lin.scaling), (x, a, b))

    # NF4 base, fp32: the gradient of a function of the input gradient reaches the adapter.
    lin = LoRALinear(64, 32, rank=4, alpha=8.0, quantize_base=True)
    nn.init.normal_(lin.lora_b.weight)
    x = torch.randn(3, 64, requires_grad=True)
    params = (lin.lora_a.weight, lin.lora_b.weight)
    results = []
    for out in (lin(x), composed(lin, x, x, torch.float32)):
        (grad_x,) = torch.autograd.grad(out.pow(2).sum(), x, create_graph=True)
        results.append(torch.autograd.grad(grad_x.pow(2).sum(), params))
    torch.testing.assert_close(results[0], results[1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("quantize_base", [True, False], ids=["nf4", "dense"])
def test_per_sample_gradients_with_torch_func(quantize_base, no_vmap_fallback):
    # torch.func refused the fused function ("it must override the setup_context staticmethod"),
    # even for a dense base, where torchtune's and PEFT's LoRA (plain ops) give per-sample gradients.
    # Then vmap ran its addmm_ and the NF4 ops sample by sample (no batching rules).
    torch.manual_seed(0)
    lin = LoRALinear(128, 64, rank=4, alpha=8.0, quantize_base=quantize_base)
    nn.init.normal_(lin.lora_b.weight)
    params = {name: p.detach() for name, p in lin.named_parameters() if "lora" in name}
    xs = torch.randn(3, 5, 128)

    def loss(p, x):
        return torch.func.functional_call(lin, p, (x,)).pow(2).sum()

    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, xs)
    for i in range(3):
        want = torch.autograd.grad(lin(xs[i]).pow(2).sum(), [lin.lora_a.weight, lin.lora_b.weight])
        # Both sides sum in float32 in whatever order BLAS splits them among the threads (with 2
        # threads they differed by 2.4e-4 on values up to 3.6e3): the tolerance scales with the gradient.
        for got, expected in zip([per_sample["lora_a.weight"][i], per_sample["lora_b.weight"][i]], want):
            torch.testing.assert_close(got, expected, rtol=1.3e-6, atol=1e-6 * expected.abs().max().item())



@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("quantize_base", [True, False], ids=["nf4", "dense"])
@pytest.mark.parametrize("device", devices())
def test_forward_mode_ad_matches_the_composed_formula(quantize_base, dtype, device, no_vmap_fallback):
    # The fused function had no jvp: torch.func.jvp, jacfwd and dual tensors raised "You must
    # implement the jvp function", where torchtune's and PEFT's LoRA (plain ops) work.
    torch.manual_seed(0)
    lin = LoRALinear(192, 136, rank=8, alpha=16.0, quantize_base=quantize_base, use_bias=True).to(device, dtype)
    nn.init.normal_(lin.lora_b.weight)
    base_w = lin.weight.dequantize(dtype) if quantize_base else lin.weight.detach()
    x, x_lora = (torch.randn(2, 5, 192, device=device, dtype=dtype) for _ in range(2))
    primals = (x, x_lora, lin.lora_a.weight.detach(), lin.lora_b.weight.detach(), lin.bias.detach())
    tangents = tuple(torch.randn_like(p) for p in primals)

    def fused(x, x_lora, a, b, bias):
        return lora_linear(x, lin.weight, bias, a, b, lin.scaling, x_lora)

    def formula(x, x_lora, a, b, bias):
        return F.linear(x, base_w, bias) + lin.scaling * F.linear(F.linear(x_lora, a), b)

    for without in (None, 0, 1, 2, 3, 4):  # every tangent, then each one left out (zero)
        t = tuple(torch.zeros_like(v) if i == without else v for i, v in enumerate(tangents))
        got, want = (torch.func.jvp(f, primals, t) for f in (fused, formula))
        torch.testing.assert_close(got, want, **TOL[dtype])
    # the adapter sees x itself (no dropout), through a dual level
    want = torch.func.jvp(lambda x: formula(x, x, *primals[2:]), (x,), (tangents[0],))[1]
    with torch.autograd.forward_ad.dual_level():
        y = lin(torch.autograd.forward_ad.make_dual(x, tangents[0]))
        torch.testing.assert_close(torch.autograd.forward_ad.unpack_dual(y).tangent, want, **TOL[dtype])


@pytest.mark.parametrize("quantize_base", [True, False], ids=["nf4", "dense"])
def test_jvp_of_vmap_matches_the_composed_formula(quantize_base, no_vmap_fallback):
    # jvp(vmap(...)) (and hessian of a loss vmapped over samples) hit torch's internal assert
    # "Expected both tensor and its forward grad to be floating point" on the adapter's intermediate.
    torch.manual_seed(0)
    lin = LoRALinear(64, 32, rank=4, alpha=8.0, quantize_base=quantize_base)
    nn.init.normal_(lin.lora_b.weight)
    x, t = torch.randn(3, 5, 64), torch.randn(3, 5, 64)
    base_w = lin.weight.dequantize(torch.float32) if quantize_base else lin.weight.detach()
    a, b = lin.lora_a.weight.detach(), lin.lora_b.weight.detach()

    def formula(x):
        return F.linear(x, base_w) + lin.scaling * F.linear(F.linear(x, a), b)

    got, want = (torch.func.jvp(torch.func.vmap(f), (x,), (t,)) for f in (lin, formula))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    got, want = (torch.func.hessian(lambda x: torch.func.vmap(f)(x).pow(2).sum())(x[:, :1]) for f in (lin, formula))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_forward_mode_ad_through_a_dense_base_weight():
    # A tangent on the frozen dense weight (jvp over every parameter, as an NTK computation does)
    # was dropped: the fused function detaches its base. PEFT's LoRA (plain ops) gives it.
    torch.manual_seed(0)
    lin = LoRALinear(64, 32, rank=4, alpha=8.0, use_bias=True)
    nn.init.normal_(lin.lora_b.weight)
    params = {name: p.detach() for name, p in lin.named_parameters()}
    tangents = {name: torch.randn_like(p) for name, p in params.items()}
    x = torch.randn(3, 64)

    def formula(p):
        return F.linear(x, p["weight"], p["bias"]) + lin.scaling * F.linear(F.linear(x, p["lora_a.weight"]), p["lora_b.weight"])

    got = torch.func.jvp(lambda p: torch.func.functional_call(lin, p, (x,)), (params,), (tangents,))
    torch.testing.assert_close(got, torch.func.jvp(formula, (params,), (tangents,)), rtol=1e-5, atol=1e-5)
    with torch.autograd.forward_ad.dual_level():
        dual = {name: torch.autograd.forward_ad.make_dual(p, tangents[name]) for name, p in params.items()}
        y = torch.func.functional_call(lin, dual, (x,))
        torch.testing.assert_close(torch.autograd.forward_ad.unpack_dual(y).tangent, got[1], rtol=1e-5, atol=1e-5)


def test_an_open_dual_level_leaves_ordinary_calls_as_they_were(monkeypatch):
    # Dual levels are process-wide: one open (in another thread, or around code whose tensors carry
    # no tangent) sent every LoRALinear through the forward-mode function, which torch.compile
    # refuses ("Unsupported custom jvp").
    from qlora_ext.modules import lora_fused

    lin = LoRALinear(64, 32, rank=4, alpha=8.0, quantize_base=True)
    x = torch.randn(3, 64, requires_grad=True)
    want = lin(x)

    def refused(*args):
        raise AssertionError("the forward-mode function was taken")

    monkeypatch.setattr(lora_fused._LoRALinearForwardAD, "apply", refused)
    compiled = torch.compile(lin, fullgraph=True, backend="aot_eager")
    with torch.autograd.forward_ad.dual_level():
        torch.testing.assert_close(lin(x), want)
        torch.testing.assert_close(compiled(x), want)


def test_an_nf4_weight_given_to_a_transform_is_named():
    lin = LoRALinear(64, 32, rank=4, alpha=8.0, quantize_base=True)
    x = torch.randn(3, 64)
    params = dict(lin.named_parameters())
    with pytest.raises(TypeError, match=r"^LoRALinear: a torch.func transform was given the frozen NF4 weight .* with the "
                                        r"transform over trainable only$"):
        torch.func.grad(lambda p: torch.func.functional_call(lin, p, (x,)).sum())(params)
    # as the message says: the NF4 weight apart, the transform over the adapter only
    trainable = {name: p.detach() for name, p in params.items() if "lora" in name}
    frozen = {name: p for name, p in params.items() if "lora" not in name}
    per_sample = torch.func.vmap(torch.func.grad(lambda p, x: torch.func.functional_call(lin, (p, frozen), (x,)).sum()),
                                 in_dims=(None, 0))(trainable, x)
    want = torch.autograd.grad(lin(x[1]).sum(), lin.lora_a.weight)[0]
    torch.testing.assert_close(per_sample["lora_a.weight"][1], want)
