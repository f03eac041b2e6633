"""The transformer modules against direct formulas: RMSNorm, RoPE, causal/GQA attention, the
KV cache, and the decoder's argument checks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import devices

from qlora_ext.models.llama2 import llama2
from qlora_ext.modules import KVCache, MultiHeadAttention, RMSNorm, RotaryPositionalEmbeddings


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rms_norm_matches_formula(dtype):
    norm = RMSNorm(64, eps=1e-5)
    with torch.no_grad():
        norm.scale.copy_(torch.rand(64) + 0.5)
    norm = norm.to(dtype)
    x = torch.randn(3, 5, 64, dtype=dtype) * 4
    x32 = x.float()
    want = (x32 / torch.sqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype) * norm.scale
    got = norm(x)
    assert got.dtype == dtype
    torch.testing.assert_close(got, want, rtol=1e-6 if dtype == torch.float32 else 0, atol=1e-6 if dtype == torch.float32 else 0)


def _first_and_second_derivatives(fn, inputs, grad_out, probe):
    """fn's output, d(out . grad_out)/d inputs, and the derivative of (those . probe) again."""
    out = fn(*inputs)
    firsts = torch.autograd.grad(out, inputs, grad_out, create_graph=True)
    seconds = torch.autograd.grad(sum((f * p).sum() for f, p in zip(firsts, probe)), inputs, allow_unused=True)
    return out, firsts, seconds


def test_rms_norm_float32_backward_matches_formula():
    # float32 takes a hand-written autograd function; its first and second derivatives are the
    # formula's (which autograd differentiates).
    norm = RMSNorm(48, eps=1e-5)
    with torch.no_grad():
        norm.scale.copy_(torch.rand(48) + 0.5)
    x = (torch.randn(2, 7, 48) * 3).requires_grad_()
    scale = norm.scale

    def formula(x, scale):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * scale

    grad_out, probe = torch.randn(2, 7, 48), (torch.randn(2, 7, 48), torch.randn(48))
    got = _first_and_second_derivatives(lambda x, s: norm(x), (x, scale), grad_out, probe)
    want = _first_and_second_derivatives(formula, (x, scale), grad_out, probe)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    for g, w in zip(got[1] + got[2], want[1] + want[2]):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    # Without create_graph (the training path, in place), the same first derivatives.
    x.grad = scale.grad = None
    norm(x).backward(grad_out)
    torch.testing.assert_close(x.grad, want[1][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scale.grad, want[1][1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("positions", ["default", "per_row"])
def test_rope_float32_backward_matches_formula(positions):
    rope = RotaryPositionalEmbeddings(16, max_seq_len=32)
    x = torch.randn(2, 5, 3, 16, requires_grad=True)
    pos = None if positions == "default" else torch.tensor([[4, 5, 6, 7, 8], [0, 2, 4, 6, 8]])
    cos = (rope.cos[:5] if pos is None else rope.cos[pos]).unsqueeze(-2)
    sin = (rope.sin[:5] if pos is None else rope.sin[pos]).unsqueeze(-2)

    def formula(x):
        return x * cos + torch.cat((-x[..., 8:], x[..., :8]), dim=-1) * sin

    grad_out = torch.randn(2, 5, 3, 16, requires_grad=True)
    got = rope(x, input_pos=pos)
    want = formula(x)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    (got_grad,) = torch.autograd.grad(got, x, grad_out, create_graph=True)
    (want_grad,) = torch.autograd.grad(want, x, grad_out, create_graph=True)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-6, atol=1e-6)
    # Differentiable again: linear in grad_out, so the derivative of (grad . probe) is the rotation of probe.
    probe = torch.randn(2, 5, 3, 16)
    torch.testing.assert_close(
        torch.autograd.grad((got_grad * probe).sum(), grad_out)[0], torch.autograd.grad((want_grad * probe).sum(), grad_out)[0],
        rtol=1e-6, atol=1e-6,
    )


def test_rms_norm_and_rope_under_torch_func_match_their_eager_gradients(no_vmap_fallback):
    # Their float32 autograd functions had no setup_context: torch.func refused them ("it must
    # override the setup_context staticmethod"), and a dual tensor found no jvp; they take the
    # formula there, which gives what the functions give eagerly.
    torch.manual_seed(0)
    norm, rope = RMSNorm(32), RotaryPositionalEmbeddings(32, max_seq_len=8)
    with torch.no_grad():
        norm.scale.copy_(torch.rand(32) + 0.5)
    xs = torch.randn(4, 1, 6, 2, 32)  # 4 samples of [b=1, s=6, heads=2, d=32]

    def loss(x):
        return rope(norm(x)).pow(2).sum()

    per_sample = torch.func.vmap(torch.func.grad(loss))(xs)
    for i in range(4):
        x = xs[i].clone().requires_grad_()
        torch.testing.assert_close(per_sample[i], torch.autograd.grad(loss(x), x)[0], rtol=1e-5, atol=1e-5)
    t = torch.randn_like(xs[0])
    _, tangent = torch.func.jvp(lambda x: rope(norm(x)), (xs[0],), (t,))
    with torch.autograd.forward_ad.dual_level():
        dual = rope(norm(torch.autograd.forward_ad.make_dual(xs[0], t)))
        torch.testing.assert_close(torch.autograd.forward_ad.unpack_dual(dual).tangent, tangent)
    eps = 1e-3  # against central differences
    torch.testing.assert_close(tangent, (rope(norm(xs[0] + eps * t)) - rope(norm(xs[0] - eps * t))) / (2 * eps), rtol=1e-2, atol=1e-2)


def test_rope_rotates_halves_by_position_angle():
    dim, base = 16, 10_000.0
    rope = RotaryPositionalEmbeddings(dim, max_seq_len=32, base=base)
    x = torch.randn(2, 7, 3, dim)
    got = rope(x)
    half = dim // 2
    for pos in range(7):
        for i in range(half):
            theta = pos * base ** (-2 * i / dim)
            a, b = x[:, pos, :, i], x[:, pos, :, i + half]
            torch.testing.assert_close(got[:, pos, :, i], a * math.cos(theta) - b * math.sin(theta), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got[:, pos, :, i + half], b * math.cos(theta) + a * math.sin(theta), rtol=1e-5, atol=1e-5)
    # Explicit positions (per batch row) pick the same table rows.
    pos = torch.tensor([[3, 4, 5, 6, 7, 8, 9], [0, 1, 2, 3, 4, 5, 6]])
    shifted = rope(x, input_pos=pos)
    torch.testing.assert_close(shifted[1], got[1])
    torch.testing.assert_close(shifted[0, 0], rope(x[0:1, 0:1], input_pos=torch.tensor([3]))[0, 0])
    assert not torch.allclose(shifted[0, 0], got[0, 0])


def test_rope_scores_depend_on_relative_position_only():
    rope = RotaryPositionalEmbeddings(32, max_seq_len=64)
    q, k = torch.randn(1, 1, 1, 32), torch.randn(1, 1, 1, 32)

    def score(pq, pk):
        return (rope(q, input_pos=torch.tensor([pq])) * rope(k, input_pos=torch.tensor([pk]))).sum()

    torch.testing.assert_close(score(5, 2), score(40, 37), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(score(5, 2), score(5, 4))


def test_rope_rejects_bad_dims():
    with pytest.raises(ValueError, match=r"argument 'dim' must be a positive even number; got 7"):
        RotaryPositionalEmbeddings(7)
    with pytest.raises(ValueError, match=r"argument 'max_seq_len' must be positive; got 0"):
        RotaryPositionalEmbeddings(8, max_seq_len=0)
    for base in (0.0, -1.0, float("nan"), float("inf")):  # each made NaN tables
        with pytest.raises(ValueError, match=rf"argument 'base' must be a finite number > 0; got {base}"):
            RotaryPositionalEmbeddings(8, base=base)
    for eps in (-1e-6, float("nan")):
        with pytest.raises(ValueError, match=rf"RMSNorm: argument 'eps' must be a finite number >= 0; got {eps}"):
            RMSNorm(8, eps=eps)


def _naive_attention(x, attn, mask=None):
    b, s, _ = x.shape
    q = attn.q_proj(x).view(b, s, attn.num_heads, attn.head_dim)
    k = attn.k_proj(x).view(b, s, attn.num_kv_heads, attn.head_dim)
    v = attn.v_proj(x).view(b, s, attn.num_kv_heads, attn.head_dim)
    q, k = attn.pos_embeddings(q), attn.pos_embeddings(k)
    group = attn.num_heads // attn.num_kv_heads
    out = torch.empty(b, s, attn.num_heads, attn.head_dim)
    for h in range(attn.num_heads):
        scores = q[:, :, h] @ k[:, :, h // group].transpose(1, 2) / math.sqrt(attn.head_dim)  # [b, s, s]
        allowed = torch.ones(s, s, dtype=torch.bool).tril() if mask is None else mask
        scores = scores.masked_fill(~allowed, float("-inf"))
        out[:, :, h] = F.softmax(scores, dim=-1) @ v[:, :, h // group]
    return attn.output_proj(out.reshape(b, s, -1))


def _attention(num_heads=4, num_kv_heads=2, dim=64, max_seq_len=32):
    hd = dim // num_heads
    def lin(i, o):
        return torch.nn.Linear(i, o, bias=False)

    return MultiHeadAttention(
        embed_dim=dim, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=hd,
        q_proj=lin(dim, num_heads * hd), k_proj=lin(dim, num_kv_heads * hd), v_proj=lin(dim, num_kv_heads * hd),
        output_proj=lin(num_heads * hd, dim), pos_embeddings=RotaryPositionalEmbeddings(hd, max_seq_len), max_seq_len=max_seq_len,
    )


@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=lambda n: f"kv{n}")
def test_attention_matches_naive_causal_gqa(kv_heads):
    attn = _attention(num_kv_heads=kv_heads).eval()
    x = torch.randn(2, 9, 64)
    with torch.no_grad():
        torch.testing.assert_close(attn(x), _naive_attention(x, attn), rtol=1e-5, atol=1e-5)
        # An explicit mask replaces the causal one.
        mask = torch.rand(9, 9) > 0.4
        mask |= torch.eye(9, dtype=torch.bool)
        torch.testing.assert_close(attn(x, mask=mask.expand(2, 9, 9)), _naive_attention(x, attn, mask), rtol=1e-5, atol=1e-5)
    # Training (no mask: shared heads read in place by SDPA's GQA) gives the naive gradients.
    grads = []
    for forward in (attn, lambda t: _naive_attention(t, attn)):
        xg = x.clone().requires_grad_()
        forward(xg).pow(2).sum().backward()
        grads.append((xg.grad, attn.k_proj.weight.grad.clone(), attn.v_proj.weight.grad.clone()))
        attn.zero_grad()
    for ours, naive in zip(*grads):
        torch.testing.assert_close(ours, naive, rtol=1e-4, atol=1e-5)


def test_attention_with_a_cache_and_no_mask_is_causal_over_the_cache():
    # Used alone (not through TransformerDecoder), a decode step without a mask must see the
    # cached positions up to its own; SDPA's is_causal would let it see only the first one.
    attn = _attention().eval()
    x = torch.randn(2, 9, 64)
    with torch.no_grad():
        full = attn(x)
        attn.setup_cache(2, torch.float32, 12)
        parts = [attn(x[:, :5], input_pos=torch.arange(5))]
        parts += [attn(x[:, i : i + 1], input_pos=torch.tensor([i])) for i in range(5, 9)]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)


def test_attention_rejects_bad_heads():
    with pytest.raises(ValueError, match=r"'num_kv_heads' must be positive and divide num_heads=4; got 3"):
        _attention(num_kv_heads=3)


def test_kv_cache_writes_at_positions_and_checks_batch():
    cache = KVCache(batch_size=2, max_seq_len=8, num_kv_heads=2, head_dim=4, dtype=torch.float32)
    k, v = torch.randn(2, 2, 3, 4), torch.randn(2, 2, 3, 4)
    kc, vc = cache.update(k, v, torch.tensor([2, 3, 4]))
    torch.testing.assert_close(kc[:, :, 2:5], k)
    torch.testing.assert_close(vc[:, :, 2:5], v)
    assert kc[:, :, :2].abs().sum() == 0 and kc[:, :, 5:].abs().sum() == 0
    # Per-row positions.
    k1 = torch.randn(2, 2, 1, 4)
    kc, _ = cache.update(k1, k1, torch.tensor([[6], [7]]))
    torch.testing.assert_close(kc[0, :, 6], k1[0, :, 0])
    torch.testing.assert_close(kc[1, :, 7], k1[1, :, 0])
    cache.reset()
    assert cache.k_cache.abs().sum() == 0
    with pytest.raises(ValueError, match=r"argument 'k_val' must have batch size 2 \(the cache's\); got 3"):
        cache.update(torch.randn(3, 2, 1, 4), torch.randn(3, 2, 1, 4), torch.tensor([0]))


def test_kv_cache_update_without_positions_writes_at_the_next_free_ones():
    # torchtune's KVCache.update(k_val, v_val): sequential writes, counted by size
    cache = KVCache(batch_size=2, max_seq_len=6, num_kv_heads=2, head_dim=4, dtype=torch.float32)
    assert cache.size == 0
    k, v = torch.randn(2, 2, 4, 4), torch.randn(2, 2, 4, 4)
    cache.update(k[:, :, :3], v[:, :, :3])
    kc, vc = cache.update(k[:, :, 3:], v[:, :, 3:])
    assert cache.size == 4
    torch.testing.assert_close(kc[:, :, :4], k)
    torch.testing.assert_close(vc[:, :, :4], v)
    assert kc[:, :, 4:].abs().sum() == 0
    cache.update(torch.randn(2, 2, 1, 4), torch.randn(2, 2, 1, 4), torch.tensor([5]))  # given positions: not counted
    assert cache.size == 4
    with pytest.raises(ValueError, match=r"argument 'k_val' must fit in the cache's 2 free positions \(max_seq_len=6, 4 written\); got 3"):
        cache.update(torch.randn(2, 2, 3, 4), torch.randn(2, 2, 3, 4))
    cache.reset()
    assert cache.size == 0 and cache.k_cache.abs().sum() == 0
    cache.update(k[:, :, :1], v[:, :, :1])
    torch.testing.assert_close(cache.k_cache[:, :, 0], k[:, :, 0])
    cache.cache_pos.fill_(-7)  # as uninitialized memory after to_empty() leaves it
    cache.reset()
    assert cache.cache_pos.tolist() == list(range(6))


def test_attention_takes_torchtunes_y_and_kv_cache_arguments():
    attn = _attention().eval()
    x = torch.randn(2, 9, 64)
    with torch.no_grad():
        full = attn(x)
        torch.testing.assert_close(attn(x, x), full)  # torchtune's layers call attn(h, h)
        with pytest.raises(ValueError, match=r"argument 'y' must be x itself or None .*cross-attention is not supported.*shape \[2, 9, 64\]"):
            attn(x, x.clone())
        # A cache given to the constructor, used once enabled (torchtune's pattern)
        cached = MultiHeadAttention(
            embed_dim=64, num_heads=4, num_kv_heads=2, head_dim=16, q_proj=attn.q_proj, k_proj=attn.k_proj,
            v_proj=attn.v_proj, output_proj=attn.output_proj, pos_embeddings=attn.pos_embeddings, max_seq_len=32,
            kv_cache=KVCache(batch_size=2, max_seq_len=12, num_kv_heads=2, head_dim=16, dtype=torch.float32),
        ).eval()
        assert not cached.cache_enabled
        cached.cache_enabled = True
        prompt = x[:, :5]
        parts = [cached(prompt, prompt, input_pos=torch.arange(5))]
        parts += [cached(x[:, i : i + 1], input_pos=torch.tensor([i])) for i in range(5, 9)]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)


def test_rope_init_on_the_meta_device_follows_the_default_device():
    # torchtune's recipes build on meta, then call rope_init() inside `with torch.device(...)`
    with torch.device("meta"):
        rope = RotaryPositionalEmbeddings(16, max_seq_len=8)
    assert rope.cos.device.type == "meta"
    with torch.device("cpu"):
        rope.rope_init()
    assert rope.cos.device.type == "cpu" and rope.sin.device.type == "cpu"
    torch.testing.assert_close(rope.cos, RotaryPositionalEmbeddings(16, max_seq_len=8).cos, rtol=0, atol=0)
    rope.rope_init()  # from a real device: stays there
    assert rope.cos.device.type == "cpu"


def _tiny(**kw):
    args = dict(vocab_size=64, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64, max_seq_len=16, intermediate_dim=96)
    return llama2(**{**args, **kw}).eval()


@pytest.mark.parametrize("device", devices())
def test_kv_cache_prefill_then_steps_equals_full_forward(device):
    model = _tiny().to(device)
    tokens = torch.randint(0, 64, (2, 11), device=device)
    with torch.no_grad():
        full = model(tokens)
        model.setup_caches(2, torch.float32, max_seq_len=12)
        assert model.caches_are_enabled() and model.caches_are_setup()
        parts = [model(tokens[:, :6], input_pos=torch.arange(6, device=device))]
        for i in range(6, 11):
            parts.append(model(tokens[:, i : i + 1], input_pos=torch.tensor([i], device=device)))
        torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)
        model.reset_caches()
        torch.testing.assert_close(model(tokens[:, :3], input_pos=torch.arange(3, device=device)), full[:, :3], rtol=1e-5, atol=1e-5)
        model.remove_caches()
    assert not model.caches_are_enabled()


def test_decoder_argument_errors():
    model = _tiny()
    with pytest.raises(ValueError, match=r"argument 'tokens' must be 2-D \[batch, seq\]; got shape \[5\]"):
        model(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"argument 'tokens' must be at most max_seq_len=16 long; got 17"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match=r"argument 'input_pos' must have shape \[4\] or \[1, 4\]; got \[3\]"):
        model(torch.zeros(1, 4, dtype=torch.long), input_pos=torch.arange(3))
    with pytest.raises(ValueError, match=r"argument 'max_seq_len' must be in \[1, 16\] \(the model's max_seq_len\); got 17"):
        model.setup_caches(1, torch.float32, max_seq_len=17)
    with pytest.raises(RuntimeError, match=r"no KV caches are set up"):
        model.reset_caches()
    model.setup_caches(1, torch.float32)
    with pytest.raises(ValueError, match=r"argument 'input_pos' is required while KV caches are enabled"):
        model(torch.zeros(1, 4, dtype=torch.long))


def test_layer_and_decoder_take_torchtunes_cache_calls():
    model = _tiny()
    tokens = torch.randint(0, 64, (1, 7))
    layer = model.layers[0]
    with torch.no_grad():
        full = model(tokens)
        assert not layer.caches_are_setup() and not layer.caches_are_enabled()
        # torchtune's generate recipe: setup_caches(batch_size=, dtype=, decoder_max_seq_len=)
        model.setup_caches(batch_size=1, dtype=torch.float32, decoder_max_seq_len=9, encoder_max_seq_len=None)
        assert model.decoder_max_cache_seq_len == 9 and model.encoder_max_cache_seq_len is None
        assert layer.caches_are_setup() and layer.caches_are_enabled()
        assert layer.attn.kv_cache.max_seq_len == 9
        out = torch.cat([model(tokens[:, :4], input_pos=torch.arange(4)), model(tokens[:, 4:], input_pos=torch.arange(4, 7))], 1)
        torch.testing.assert_close(out, full, rtol=1e-5, atol=1e-5)
        layer.reset_cache()
        assert layer.attn.kv_cache.k_cache.abs().sum() == 0
        with pytest.raises(ValueError, match=r"arguments 'max_seq_len' and 'decoder_max_seq_len' name the same length; got 8 and 9"):
            model.setup_caches(1, torch.float32, max_seq_len=8, decoder_max_seq_len=9)
        with pytest.raises(ValueError, match=r"argument 'decoder_max_seq_len' must be in \[1, 16\] \(the model's max_seq_len\); got 32"):
            model.setup_caches(1, torch.float32, decoder_max_seq_len=32)
        model.remove_caches()
        assert model.decoder_max_cache_seq_len is None and not model.caches_are_setup()
        # Caches set up layer by layer (torchtune's layer calls) are the decoder's too
        for each in model.layers:
            each.setup_caches(1, torch.float32, encoder_max_seq_len=None, decoder_max_seq_len=5)
        assert layer.attn.kv_cache.max_seq_len == 5 and layer.caches_are_enabled()
        assert model.caches_are_setup() and model.caches_are_enabled() and model.decoder_max_cache_seq_len == 5
        torch.testing.assert_close(model(tokens[:, :4], input_pos=torch.arange(4)), full[:, :4], rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match=r"must hold positions in \[0, 5\) \(the KV caches' length\); got 9"):
            model(tokens[:, :1], input_pos=torch.tensor([9]))


def test_self_attention_layer_takes_attn_and_mlp_by_position_and_no_norms():
    from qlora_ext.modules import FeedForward, TransformerSelfAttentionLayer

    attn = _attention().eval()
    mlp = FeedForward(gate_proj=torch.nn.Linear(64, 96, bias=False), down_proj=torch.nn.Linear(96, 64, bias=False),
                      up_proj=torch.nn.Linear(64, 96, bias=False))
    layer = TransformerSelfAttentionLayer(attn, mlp)  # torchtune's norms default to none (nn.Identity)
    assert isinstance(layer.sa_norm, torch.nn.Identity) and isinstance(layer.mlp_norm, torch.nn.Identity)
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        h = x + attn(x)
        torch.testing.assert_close(layer(x), h + mlp(h))


def test_decoding_step_takes_one_position_per_row_and_caches_refuse_repeated_positions():
    model = _tiny()
    tokens = torch.randint(0, 64, (2, 6))
    with torch.no_grad():
        full = model(tokens)
        model.setup_caches(2, torch.float32, max_seq_len=8)
        model(tokens[:, :5], input_pos=torch.arange(5))
        # torchtune's generate passes a decoding step's positions as [b]
        step = model(tokens[:, 5:], input_pos=torch.tensor([5, 5]))
        torch.testing.assert_close(step, full[:, 5:], rtol=1e-5, atol=1e-5)
        # torchtune's generate passes a one-token prompt's position as a 0-d tensor
        model.reset_caches()
        torch.testing.assert_close(model(tokens[:, :1], input_pos=torch.arange(6)[None][:, :1].squeeze()), full[:, :1])
        # Left padding at one position (torchtune's generate) would share a cache slot: refused
        with pytest.raises(ValueError, match=r"argument 'input_pos' must increase along each row while KV caches are "
                           r"enabled \(each position is one cache slot\); got \[0, 2, 2, 3\] in row 1\. Pad prompts on the right"):
            model(tokens[:, :4], input_pos=torch.tensor([[0, 1, 2, 3], [0, 2, 2, 3]]))
        with pytest.raises(ValueError, match=r"argument 'input_pos' must have shape \[4\], \[1, 4\] or \[2, 4\]; got \[2\]"):
            model(tokens[:, :4], input_pos=torch.tensor([0, 1]))
        with pytest.raises(ValueError, match=r"must have shape \[1\], \[1, 1\], \[2, 1\], \[2\] or \[\]; got \[3\]"):
            model(tokens[:, :1], input_pos=torch.tensor([0, 1, 2]))
        model.remove_caches()
        model(tokens[:, :4], input_pos=torch.tensor([[0, 0, 1, 2], [0, 1, 2, 3]]))  # without caches: positions only rotate
        # and [1, s]: the same positions for every row
        torch.testing.assert_close(model(tokens, input_pos=torch.arange(6)[None]), full)


def test_decoder_returns_chunked_logits_after_set_num_output_chunks():
    # torchtune's recipes: model.set_num_output_chunks(loss_fn.num_output_chunks) for CEWithChunkedOutputLoss
    model = _tiny()
    tokens = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        full = model(tokens)
        model.set_num_output_chunks(4)
        chunks = model(tokens)
    assert isinstance(chunks, list) and [c.shape[1] for c in chunks] == [3, 3, 3, 1]
    torch.testing.assert_close(torch.cat(chunks, 1).float(), full)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match=r"argument 'num_output_chunks' must be a whole number >= 0; got"):
            model.set_num_output_chunks(bad)
    model.set_num_output_chunks(0)
    assert isinstance(model(tokens), torch.Tensor)


_TINY = dict(vocab_size=64, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64, max_seq_len=32, intermediate_dim=128)


def test_attention_dropout_acts_in_training_mode_only():
    """Mutant A3 (modules/attention.py): ``dropout_p=self.attn_dropout`` also in eval mode.
    The builder documents attn_dropout as "attention dropout (training only)": an eval model with
    attn_dropout > 0 must give the logits of the same weights with attn_dropout=0, every call."""
    torch.manual_seed(0)
    dropped = llama2(**_TINY, attn_dropout=0.5)
    plain = llama2(**_TINY)
    plain.load_state_dict(dropped.state_dict())
    tokens = torch.randint(0, 64, (2, 16))
    dropped.eval(), plain.eval()
    with torch.no_grad():
        want = plain(tokens)
        torch.testing.assert_close(dropped(tokens), want, rtol=0, atol=0)
        torch.testing.assert_close(dropped(tokens), want, rtol=0, atol=0)
        dropped.train()
        assert not torch.equal(dropped(tokens), want)  # and it does drop in training mode
