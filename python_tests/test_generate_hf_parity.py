"""generate against transformers' LlamaForCausalLM.generate on tiny random checkpoints (MHA and
GQA): greedy token for token (cached and uncached), EOS / several stop ids, ragged batches against
HF's left-padded batch, sampling frequencies against HF's temperature / top-k warpers."""

from __future__ import annotations

import pytest
import torch
from llama_helpers import hf_llama, transformers

from qlora_ext.generation import generate, sample
from qlora_ext.models.llama2 import llama2_from_checkpoint

MAX = 64


@pytest.fixture(scope="module", params=[4, 1], ids=["mha", "gqa"])
def pair(request, tmp_path_factory):
    transformers()
    hf = hf_llama(num_kv_heads=request.param, seed=11 + request.param, max_position_embeddings=MAX)
    with torch.no_grad():
        hf.lm_head.weight.mul_(20)  # peaked distributions: greedy paths without near-ties
    folder = tmp_path_factory.mktemp(f"hf_gen_{request.param}")
    hf.save_pretrained(folder)
    return hf, llama2_from_checkpoint(folder).eval()


def _hf_greedy(hf, prompt, n, eos=None, mask=None):
    mask = torch.ones_like(prompt) if mask is None else mask  # (a prompt holding id 0 is not padding)
    return hf.generate(prompt, attention_mask=mask, max_new_tokens=n, do_sample=False, eos_token_id=eos, pad_token_id=0)


@pytest.mark.parametrize("plen, n", [(1, 1), (1, MAX - 1), (2, 5), (17, 1), (17, MAX - 17), (40, 24), (MAX - 1, 1)])
def test_greedy_equals_hf_generate(pair, plen, n):
    hf, ours = pair
    prompt = torch.randint(0, 320, (1, plen), generator=torch.Generator().manual_seed(plen * 100 + n))
    want = _hf_greedy(hf, prompt, n)
    assert want.shape == (1, plen + n)
    for use_cache in (True, False):
        assert torch.equal(generate(ours, prompt, max_new_tokens=n, temperature=0.0, use_cache=use_cache), want)


def test_stop_tokens_equal_hf_eos_ids(pair):
    hf, ours = pair
    gen = torch.Generator().manual_seed(0)
    for trial in range(6):
        plen = int(torch.randint(1, 20, (1,), generator=gen))
        prompt = torch.randint(0, 320, (1, plen), generator=gen)
        free = _hf_greedy(hf, prompt, 20)[0, plen:].tolist()
        prompt[0, -1] = free[2]  # the stop id in the prompt too: it does not stop there (nor does HF)
        free = _hf_greedy(hf, prompt, 20)[0, plen:].tolist()
        for stops in ([free[2]], [free[4], free[1]]):
            want = _hf_greedy(hf, prompt, 20, eos=stops)
            assert want.shape[1] < plen + 20  # HF stopped early
            assert torch.equal(generate(ours, prompt, max_new_tokens=20, temperature=0.0, stop_tokens=stops, pad_id=0), want)


def test_ragged_batch_equals_hf_left_padded_batch(pair):
    hf, ours = pair
    gen = torch.Generator().manual_seed(1)
    lengths = [9, 1, 23, 4, 23]
    prompts = [torch.randint(3, 320, (n,), generator=gen).tolist() for n in lengths]
    s = max(lengths)
    ids, mask = torch.zeros(5, s, dtype=torch.long), torch.zeros(5, s, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, s - len(p):], mask[i, s - len(p):] = torch.tensor(p), 1
    want = _hf_greedy(hf, ids, 15, mask=mask)[:, s:]
    for use_cache in (True, False):
        got = generate(ours, prompts, max_new_tokens=15, temperature=0.0, pad_id=0, use_cache=use_cache)
        for i, p in enumerate(prompts):
            assert got[i, : len(p)].tolist() == p
            assert torch.equal(got[i, len(p): len(p) + 15], want[i])
            assert (got[i, len(p) + 15:] == 0).all()


def _chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs.double() * counts.sum()
    x = ((counts.double() - expected) ** 2 / expected).sum()
    return torch.special.gammaincc(torch.tensor((len(counts) - 1) / 2, dtype=torch.float64), x / 2).item()


@pytest.mark.parametrize("temperature, top_k", [(1.0, None), (0.3, None), (2.5, 3), (0.7, 5), (1.0, 100)])
def test_sampled_frequencies_follow_hf_warpers(temperature, top_k):
    transformers()
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper

    logits = torch.tensor([3.0, 1.0, 1.0, 1.0, 0.5, -1.0, 2.0, 0.0])  # 1.0 thrice: ties at the 3rd/4th
    scores = TemperatureLogitsWarper(temperature)(None, logits[None].clone())
    if top_k is not None:
        scores = TopKLogitsWarper(top_k)(None, scores)
    probs = torch.softmax(scores, -1)[0]
    n = 200_000
    draws = sample(logits.expand(n, 8).contiguous(), temperature=temperature, top_k=top_k, generator=torch.Generator().manual_seed(5))
    counts = torch.bincount(draws, minlength=8)
    kept = probs > 0
    assert counts[~kept].sum() == 0  # nothing outside HF's top-k (ties with the k-th kept, as HF)
    assert _chi2_pvalue(counts[kept], probs[kept] / probs[kept].sum()) > 1e-4, (counts.tolist(), probs.tolist())


def test_first_sampled_token_of_the_model_follows_hf_softmax(pair):
    hf, ours = pair
    from transformers.generation.logits_process import TopKLogitsWarper

    prompt = [1, 50, 70, 90]
    with torch.no_grad():
        logits = hf(torch.tensor([prompt])).logits[0, -1].float()
    probs = torch.softmax(TopKLogitsWarper(6)(None, (logits / 8.0)[None]), -1)[0]  # T=8 flattens the x20 head
    out = generate(ours, torch.tensor([prompt] * 20_000), max_new_tokens=1, temperature=8.0, top_k=6,
                   generator=torch.Generator().manual_seed(3))
    counts = torch.bincount(out[:, -1], minlength=320)
    kept = probs > 0
    assert counts[~kept].sum() == 0
    assert _chi2_pvalue(counts[kept], probs[kept]) > 1e-4
