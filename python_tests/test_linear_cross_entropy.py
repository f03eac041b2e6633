"""The chunked linear + cross entropy against F.linear + F.cross_entropy: loss and the gradient of
the hidden states, over chunk boundaries, ignored rows, dtypes and devices; bad arguments."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import FLOAT_DTYPES, devices, dtype_id
from qlora_ext.modules import linear_cross_entropy as lce

IGNORE = -100


def _reference(hidden, weight, targets):
    logits = F.linear(hidden, weight).float()
    return F.cross_entropy(logits.reshape(-1, weight.shape[0]), targets.reshape(-1), ignore_index=IGNORE, reduction="sum")


def _case(device, dtype, shape=(3, 37), d=48, vocab=301, ignored=0.3):
    hidden = torch.randn(*shape, d, device=device).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, d, device=device) / d**0.5).to(dtype)
    targets = torch.randint(0, vocab, shape, device=device)
    targets[torch.rand(shape, device=device) < ignored] = IGNORE
    return hidden, weight, targets


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("device", devices())
def test_matches_linear_then_cross_entropy(device, dtype, monkeypatch):
    # 64-row chunks (the smallest allowed) over 111 rows: two chunks, the last one partial.
    monkeypatch.setitem(lce._CHUNK_BYTES, device, 1)
    hidden, weight, targets = _case(device, dtype)
    want = _reference(hidden, weight, targets)
    (want_grad,) = torch.autograd.grad(want, hidden)
    got = lce.linear_cross_entropy_sum(hidden, weight, targets, ignore_index=IGNORE)
    (got_grad,) = torch.autograd.grad(got * 0.5, hidden)  # the upstream gradient scales it
    assert got.dtype == torch.float32 and got.shape == ()
    rtol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}[dtype]
    torch.testing.assert_close(got, want, rtol=rtol, atol=0)
    torch.testing.assert_close(got_grad.float(), 0.5 * want_grad.float(), rtol=rtol, atol=rtol * float(want_grad.abs().max()))
    assert got_grad.dtype == dtype
    assert not got_grad[targets == IGNORE].any()  # ignored rows get no gradient


def test_targets_whose_probability_underflows_keep_an_exact_loss():
    # Logits hundreds apart: the target's softmax probability is 0 in float32, yet its loss (about
    # the gap to the row's largest logit) is finite and as exact as log_softmax's.
    hidden, weight, targets = _case("cpu", torch.float32, ignored=0.0)
    hidden = (hidden.detach() * 60.0).requires_grad_()
    want = _reference(hidden, weight, targets)
    got = lce.linear_cross_entropy_sum(hidden, weight, targets)
    (want_grad,) = torch.autograd.grad(want, hidden)
    (got_grad,) = torch.autograd.grad(got, hidden)
    probs = torch.softmax(F.linear(hidden.detach(), weight), dim=-1)
    assert (probs.gather(-1, targets[..., None]) == 0).sum() > 10  # the case is really there
    assert torch.isfinite(got)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-5)


def test_cpu_workspace_is_kept_and_grown_between_calls(monkeypatch):
    # The CPU chunk buffer outlives a call: a later, larger call grows it, a smaller one uses a view
    # of it, and neither sees the previous call's values.
    monkeypatch.setattr(lce, "_cpu_workspace", type(lce._cpu_workspace)())
    largest = 0
    for shape, vocab in [((2, 20), 301), ((3, 37), 517), ((1, 9), 100)]:
        hidden, weight, targets = _case("cpu", torch.float32, shape=shape, vocab=vocab, ignored=0.0)
        want = _reference(hidden, weight, targets)
        (want_grad,) = torch.autograd.grad(want, hidden)
        got = lce.linear_cross_entropy_sum(hidden, weight, targets)
        (got_grad,) = torch.autograd.grad(got, hidden)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
        torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-6)
        largest = max(largest, hidden.shape[0] * hidden.shape[1] * vocab)
        assert lce._cpu_workspace.buffer.numel() == largest  # the largest so far, kept


def test_without_grad_and_with_no_counted_rows():
    hidden, weight, targets = _case("cpu", torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(lce.linear_cross_entropy_sum(hidden, weight, targets), _reference(hidden, weight, targets))
    targets.fill_(IGNORE)
    loss = lce.linear_cross_entropy_sum(hidden, weight, targets)
    loss.backward()
    assert float(loss.detach()) == 0.0 and not hidden.grad.any()


def test_second_derivatives_are_refused():
    # once_differentiable let create_graph=True through when the upstream gradient needed none: the
    # gradient came back without history, dropping the second-order term silently.
    hidden, weight, targets = _case("cpu", torch.float32)
    loss = lce.linear_cross_entropy_sum(hidden, weight, targets, ignore_index=IGNORE)
    with pytest.raises(RuntimeError, match=r"^linear_cross_entropy_sum: second derivatives \(backward with create_graph=True\) "
                                           r"are not supported"):
        torch.autograd.grad(loss, hidden, create_graph=True)


def test_compiles_with_inductor():
    # The CPU softmax written over its input (out= itself) failed in inductor: KeyError 'buf1'.
    torch._dynamo.reset()
    hidden, weight, targets = _case("cpu", torch.float32, ignored=0.0)
    got = torch.compile(lce.linear_cross_entropy_sum)(hidden, weight, targets)
    (got_grad,) = torch.autograd.grad(got, hidden)
    want = _reference(hidden, weight, targets)
    (want_grad,) = torch.autograd.grad(want, hidden)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-6)


def test_under_torch_func_it_is_the_formula(no_vmap_fallback):
    # Its autograd function had no setup_context (torch.func refused it), and it picks the counted
    # rows by value (nonzero, min), which vmap cannot batch: per-sample gradients failed.
    torch.manual_seed(0)
    hidden, weight, targets = _case("cpu", torch.float32, shape=(4, 9))
    hidden = hidden.detach()
    per_sample = torch.func.vmap(torch.func.grad(lambda h, t: lce.linear_cross_entropy_sum(h, weight, t, ignore_index=IGNORE)))
    want = torch.func.vmap(torch.func.grad(_reference), in_dims=(0, None, 0))(hidden, weight, targets)
    torch.testing.assert_close(per_sample(hidden, targets), want)
    t = torch.randn_like(hidden)
    got = torch.func.jvp(lambda h: lce.linear_cross_entropy_sum(h, weight, targets, ignore_index=IGNORE), (hidden,), (t,))
    torch.testing.assert_close(got, torch.func.jvp(lambda h: _reference(h, weight, targets), (hidden,), (t,)))


def test_under_torch_func_the_weights_tangent_autocast_and_bad_targets_are_as_without(no_vmap_fallback):
    # A dual output weight found the chunked function (no jvp); under CPU autocast the formula's
    # product was rounded to bf16 while the chunked one stays float32 (per-sample losses 2e-4 off
    # the eager ones); a target out of range gave torch's IndexError, not this function's error.
    torch.manual_seed(0)
    hidden, weight, targets = _case("cpu", torch.float32, shape=(4, 9))
    hidden = hidden.detach()
    t = torch.randn_like(weight)
    want = torch.func.jvp(lambda w: _reference(hidden, w, targets), (weight,), (t,))[1]
    with torch.autograd.forward_ad.dual_level():
        loss = lce.linear_cross_entropy_sum(hidden, torch.autograd.forward_ad.make_dual(weight, t), targets, ignore_index=IGNORE)
        torch.testing.assert_close(torch.autograd.forward_ad.unpack_dual(loss).tangent, want)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # (the losses; a backward run under autocast is the caller's)
        per_sample = torch.func.vmap(lambda h, t: lce.linear_cross_entropy_sum(h, weight, t, ignore_index=IGNORE))(hidden, targets)
        for i in range(4):
            eager = lce.linear_cross_entropy_sum(hidden[i], weight, targets[i], ignore_index=IGNORE)
            torch.testing.assert_close(per_sample[i], eager, rtol=1e-6, atol=1e-5)
    targets[0, 0] = 301
    message = r"argument 'targets' must be in \[0, 301\) or ignore_index=-100; got 301"
    with pytest.raises(ValueError, match=message):
        torch.func.grad(lambda h: lce.linear_cross_entropy_sum(h, weight, targets, ignore_index=IGNORE))(hidden)
    with pytest.raises(ValueError, match=message):
        torch.func.jvp(lambda h: lce.linear_cross_entropy_sum(h, weight, targets, ignore_index=IGNORE), (hidden,), (hidden,))


def test_bad_arguments_are_named():
    hidden, weight, targets = _case("cpu", torch.float32)
    with pytest.raises(ValueError, match=r"argument 'weight' must be \[vocab, 48\].*got shape \[301, 47\]"):
        lce.linear_cross_entropy_sum(hidden, weight[:, :47], targets)
    with pytest.raises(ValueError, match=r"argument 'targets' must have hidden's shape.*\[3, 37\]; got \[3, 36\]"):
        lce.linear_cross_entropy_sum(hidden, weight, targets[:, :36])
    with pytest.raises(ValueError, match=r"argument 'weight' must be frozen \(requires_grad=False\)"):
        lce.linear_cross_entropy_sum(hidden, weight.clone().requires_grad_(), targets)
    # an int weight would truncate the hidden states cast to its dtype; float targets are no class ids
    with pytest.raises(TypeError, match=r"argument 'weight' must be floating point; got torch.int64"):
        lce.linear_cross_entropy_sum(hidden, weight.long(), targets)
    with pytest.raises(TypeError, match=r"argument 'targets' must hold integer class ids; got torch.float32"):
        lce.linear_cross_entropy_sum(hidden, weight, targets.float())
    targets[1, 5] = 301
    with pytest.raises(ValueError, match=r"argument 'targets' must be in \[0, 301\) or ignore_index=-100; got 301"):
        lce.linear_cross_entropy_sum(hidden, weight, targets)
