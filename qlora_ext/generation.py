"""Autoregressive decoding with a KV cache: greedy, temperature and top-k sampling, stop tokens.

    tokens = generate(model, prompt_ids, max_new_tokens=64, temperature=0.0)  # greedy

The prompt is processed in one forward (prefill) that fills each layer's cache; every later
step feeds only the newest token. ``use_cache=False`` recomputes the whole sequence each step
(slow; the reference the cached path is tested against).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from qlora_ext._arguments import is_int


def sample(logits: Tensor, *, temperature: float = 1.0, top_k: int | None = None, generator: torch.Generator | None = None) -> Tensor:
    """Picks one token per row of ``logits`` [b, vocab].

    Args:
        logits: unnormalized scores.
        temperature: 0 picks the most likely token (greedy); otherwise scores are divided by it
            before the softmax (below 1 sharpens, above 1 flattens).
        top_k: sample among the k most likely tokens only.
        generator: random source for reproducible sampling.

    Returns:
        int64 token ids [b].

    Raises:
        ValueError: a negative or non-finite ``temperature``, or a ``top_k`` that is not a
            positive integer.
    """
    if not (0 <= temperature < math.inf):  # also refuses NaN
        raise ValueError(f"sample: argument 'temperature' must be finite and >= 0; got {temperature}")
    if top_k is not None and (not is_int(top_k) or top_k <= 0):
        raise ValueError(f"sample: argument 'top_k' must be a positive integer or None; got {top_k!r}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float()
    # Scores relative to the row's best before dividing: a tiny temperature then sends the others
    # to -inf (greedy in the limit) instead of every score to +-inf and the softmax to NaN.
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # [b, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: nn.Module,
    prompt: Tensor | list[int],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    stop_tokens: list[int] | None = None,
    pad_id: int = 0,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> Tensor:
    """Extends each prompt by up to ``max_new_tokens`` tokens.

    Args:
        model: a ``TransformerDecoder``, normally in eval mode (dropout stays as the caller set
            it). If it has no KV caches, caches sized for this call are set up and removed
            afterwards; caches set up by the caller are reset and reused.
        prompt: [b, s] token ids (prompts of equal length) or one prompt as a list of ints.
            There is no attention mask: a prompt padded to the length of others would have its
            pads attended, so generate prompts of different lengths one at a time.
        max_new_tokens: most tokens to add.
        temperature, top_k, generator: as for ``sample`` (temperature 0 = greedy).
        stop_tokens: token ids (a list, or a 1-D tensor); a row stops after emitting one of
            these, and its later positions get ``pad_id``.
            Generation ends when every row has stopped.
        pad_id: filler after a row's stop token.
        use_cache: False recomputes the full sequence each step (a reference; slow) and needs a
            model without KV caches.

    Returns:
        [b, s + n] int64: the prompts followed by the n <= max_new_tokens generated tokens.

    Raises:
        ValueError: an empty prompt, token ids or ``pad_id`` outside the vocabulary,
            ``max_new_tokens`` not an integer >= 1, stop tokens that are not integers, prompt plus
            new tokens longer than the model's max_seq_len (or than caches set up by the caller),
            ``use_cache=False`` on a model with KV caches.
    """
    device = model.tok_embeddings.weight.device
    if not isinstance(prompt, Tensor):
        prompt = list(prompt)
        if not all(is_int(t) for t in prompt):
            raise ValueError("generate: argument 'prompt' must be a [batch, seq] tensor or one prompt as a list of ints; "
                             f"got a list holding {sorted({type(t).__name__ for t in prompt})}")
        prompt = torch.tensor([[int(t) for t in prompt]], dtype=torch.long)
    prompt = prompt.to(device)
    if prompt.dim() != 2 or prompt.shape[1] == 0:
        raise ValueError(f"generate: argument 'prompt' must be [batch, seq] with seq >= 1; got shape {list(prompt.shape)}")
    vocab = model.tok_embeddings.num_embeddings
    if prompt.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"generate: argument 'prompt' must hold integer token ids; got dtype {prompt.dtype}")
    outside = (prompt < 0) | (prompt >= vocab)
    if bool(outside.any()):
        raise ValueError(f"generate: argument 'prompt' must hold token ids in [0, {vocab}); got {prompt[outside][:5].tolist()}")
    if not 0 <= pad_id < vocab:
        raise ValueError(f"generate: argument 'pad_id' must be a token id in [0, {vocab}); got {pad_id}")
    if not is_int(max_new_tokens) or max_new_tokens < 1:
        raise ValueError(f"generate: argument 'max_new_tokens' must be an integer >= 1; got {max_new_tokens!r}")
    stop_ids = [] if stop_tokens is None else (stop_tokens.tolist() if isinstance(stop_tokens, Tensor) else list(stop_tokens))
    if not all(is_int(t) for t in stop_ids):
        raise ValueError(f"generate: argument 'stop_tokens' must hold integer token ids; got {stop_ids}")
    if not use_cache and model.caches_are_setup():
        raise ValueError("generate: argument 'use_cache' is False but the model has KV caches; call model.remove_caches() first")
    b, s = prompt.shape
    total = s + max_new_tokens
    limit = model.max_seq_len
    own_caches = use_cache and not model.caches_are_setup()
    if use_cache and not own_caches:
        limit = min(limit, model._cache_len)
    if total > limit:
        raise ValueError(
            f"generate: prompt length {s} + max_new_tokens {max_new_tokens} must be at most {limit} "
            f"(the model's max_seq_len or its cache length); got {total}"
        )
    stop = torch.tensor(stop_ids, dtype=torch.long, device=device)

    if own_caches:
        model.setup_caches(b, model.tok_embeddings.weight.dtype, max_seq_len=total)
    elif use_cache:
        model.reset_caches()
    try:
        if use_cache:
            logits = model(prompt, input_pos=torch.arange(s, device=device))[:, -1]
        else:
            logits = model(prompt)[:, -1]
        tokens = [prompt]
        done = torch.zeros(b, dtype=torch.bool, device=device)
        for step in range(max_new_tokens):
            nxt = sample(logits, temperature=temperature, top_k=top_k, generator=generator)
            nxt = nxt.masked_fill(done, pad_id)
            tokens.append(nxt[:, None])
            done |= torch.isin(nxt, stop)
            if step == max_new_tokens - 1 or bool(done.all()):
                break
            if use_cache:
                logits = model(nxt[:, None], input_pos=torch.tensor([s + step], device=device))[:, -1]
            else:
                logits = model(torch.cat(tokens, dim=1))[:, -1]
    finally:
        if own_caches:
            model.remove_caches()
    return torch.cat(tokens, dim=1)
