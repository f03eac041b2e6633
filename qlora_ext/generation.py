"""Autoregressive decoding with a KV cache: greedy, temperature and top-k sampling, stop tokens.

    tokens = generate(model, prompt_ids, max_new_tokens=64, temperature=0.0)  # greedy
    tokens = generate(model, [ids_a, ids_b], max_new_tokens=64, stop_tokens=[eos])  # a ragged batch

The prompt is processed in one forward (prefill) that fills each layer's cache; every later
step feeds only the newest token. ``use_cache=False`` recomputes the whole sequence each step
(slow; the reference the cached path is tested against).
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from qlora_ext._arguments import is_finite_real, is_int
from qlora_ext._eager import force_eager, is_compile_wrapper


class NonFiniteLogitsError(ValueError):
    """The model's logits for a new token hold NaN or infinity."""


def sample(logits: Tensor, *, temperature: float = 1.0, top_k: int | None = None, generator: torch.Generator | None = None) -> Tensor:
    """Picks one token per row of ``logits`` [b, vocab].

    Args:
        logits: unnormalized scores.
        temperature: 0 picks the most likely token (greedy); otherwise scores are divided by it
            before the softmax (below 1 sharpens, above 1 flattens).
        top_k: sample among the k most likely tokens only (and any tied with the k-th, as in HF).
        generator: random source for reproducible sampling.

    Returns:
        int64 token ids [b].

    Raises:
        ValueError: ``logits`` that are not a 2-D tensor, a negative or non-finite
            ``temperature``, or a ``top_k`` that is not a positive integer.
    """
    if not isinstance(logits, Tensor) or logits.dim() != 2:
        got = f"shape {list(logits.shape)}" if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"sample: argument 'logits' must be a [batch, vocab] tensor (one row per sequence); got {got}")
    if not is_finite_real(temperature) or temperature < 0:  # also refuses NaN, None and bools
        raise ValueError(f"sample: argument 'temperature' must be finite and >= 0; got {temperature!r}")
    if top_k is not None and (not is_int(top_k) or top_k <= 0):
        raise ValueError(f"sample: argument 'top_k' must be a positive integer or None; got {top_k!r}")
    if logits.shape[-1] == 0:
        raise ValueError(f"sample: argument 'logits' must have a vocabulary of at least 1 score per row; got shape {list(logits.shape)}")
    if logits.numel():
        bad = torch.isnan(logits) | (logits == float("inf"))
        dead = (logits == float("-inf")).all(dim=-1)
        if bool(bad.any() | dead.any()):
            row = int((bad.any(dim=-1) | dead).nonzero()[0])
            if bool(bad[row].any()):
                col = int(bad[row].nonzero()[0])
                what = f"row {row} has {logits[row, col].item()} at column {col}"
            else:
                what = f"row {row} is -infinity throughout"
            raise ValueError(f"sample: argument 'logits' must hold no NaN or +infinity, and a finite score in each row "
                             f"(-infinity masks a token out); {what}")
    return _sample(logits, temperature, top_k, generator)


def _sample(logits: Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None) -> Tensor:
    """sample() on checked arguments (generate checks its logits itself)."""
    # 0, or a temperature whose float32 reciprocal overflows (below about 2.9e-39): CUDA divides a
    # tensor by a Python scalar as a product with float32(1 / t), so the best score would be 0 * inf = NaN
    if temperature < 1.0 / torch.finfo(torch.float32).max:
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


_TOKEN_ID_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.uint16, torch.int32, torch.uint32, torch.int64, torch.uint64)


def _prompt_rows(prompt: Tensor | list, pad_id: int, vocab: int) -> tuple[Tensor, Tensor]:
    """The prompts as a right-padded [b, s] int64 tensor and their lengths [b] (on the CPU)."""
    if isinstance(prompt, Tensor) and prompt.is_nested:
        raise ValueError("generate: argument 'prompt' must be a dense tensor; got a nested tensor: pass its rows as a list "
                         "(prompt.unbind()) for prompts of different lengths")
    if isinstance(prompt, Tensor):
        if prompt.dim() == 1:  # one prompt [seq], as torchtune's generate takes it
            prompt = prompt[None]
        if prompt.dim() != 2 or prompt.shape[0] == 0 or prompt.shape[1] == 0:
            raise ValueError(f"generate: argument 'prompt' must be [batch, seq] (or one [seq]) with batch and seq >= 1; "
                             f"got shape {list(prompt.shape)}")
        if prompt.dtype not in _TOKEN_ID_DTYPES:  # (not bool, float, complex, nor the sub-byte ints torch cannot copy)
            raise ValueError(f"generate: argument 'prompt' must hold integer token ids (8 to 64 bits); got dtype {prompt.dtype}")
        rows = prompt.long()
        lengths = torch.full((rows.shape[0],), rows.shape[1], dtype=torch.long)
    else:
        prompt = list(prompt)
        # Rows: lists, tuples, or 1-D arrays (torch or numpy).
        nested = len(prompt) > 0 and all(isinstance(p, (list, tuple)) or getattr(p, "ndim", None) == 1 for p in prompt)
        lists = [list(p) if isinstance(p, (list, tuple)) else p.tolist() for p in prompt] if nested else [prompt]
        for i, row in enumerate(lists):
            if row and all(is_int(t) for t in row):
                continue
            kinds = sorted({type(t).__name__ for t in row})
            if nested:
                what = f"prompt {i} is empty" if not row else f"prompt {i} holds {kinds}"
            else:
                what = "got an empty list" if not row else f"got a list holding {kinds}"
            raise ValueError(
                "generate: argument 'prompt' must be a [batch, seq] tensor, one prompt as a list of ints, "
                f"or a list of such lists (prompts of any lengths); {what}"
            )
        outside = [int(t) for row in lists for t in row if not 0 <= t < vocab]  # (before a tensor: a 2**70 would overflow it)
        if outside:
            raise ValueError(f"generate: argument 'prompt' must hold token ids in [0, {vocab}); got {outside[:5]}")
        lengths = torch.tensor([len(row) for row in lists], dtype=torch.long)
        rows = torch.full((len(lists), int(lengths.max())), pad_id, dtype=torch.long)
        for i, row in enumerate(lists):
            rows[i, : len(row)] = torch.tensor([int(t) for t in row], dtype=torch.long)
    outside = (rows < 0) | (rows >= vocab)
    if bool(outside.any()):  # (the values given: a uint64 id past 2**63 is negative in rows)
        given = prompt[outside] if isinstance(prompt, Tensor) else rows[outside]
        raise ValueError(f"generate: argument 'prompt' must hold token ids in [0, {vocab}); got {given[:5].tolist()}")
    return rows, lengths


def _cache_state(model: nn.Module) -> str:
    """"none", "enabled" (every layer has a KV cache in use) or "disabled" (every layer has one,
    none in use: torchtune's ``disable_kv_cache``).

    Raises:
        ValueError: caches on some layers only, or enabled on some only (a step fed one token
            would then reach the layers without a cache alone, and decode wrongly); caches made
            under inference mode and enabled, outside it.
    """
    layers = list(model.layers)
    have = sum(layer.attn.kv_cache is not None for layer in layers)
    used = sum(layer.attn.kv_cache is not None and layer.attn.cache_enabled for layer in layers)
    if have == 0:
        return "none"
    if have < len(layers):
        raise ValueError(f"generate: argument 'model' has KV caches on {have} of its {len(layers)} layers; set them up on all "
                         "(model.setup_caches) or remove them (model.remove_caches)")
    if used == len(layers):
        if layers[0].attn.kv_cache.k_cache.is_inference() and not torch.is_inference_mode_enabled():
            raise ValueError("generate: argument 'model' has KV caches set up under torch.inference_mode(), which cannot be "
                             "written outside it; call generate inside torch.inference_mode(), or set them up again outside it "
                             "(model.remove_caches(), then model.setup_caches)")
        return "enabled"
    if used == 0:
        return "disabled"
    raise ValueError(f"generate: argument 'model' has its KV caches enabled on {used} of its {len(layers)} layers; enable "
                     "them on all, or disable them on all to decode without them")


def _is_compiled(model: nn.Module) -> bool:
    """Whether ``torch.compile`` wraps the model (``torch.compile(model)``) or any of its modules
    (``module.compile()``, as ``compile=True`` in the trainer does to each layer)."""
    return any(is_compile_wrapper(m) or getattr(m, "_compiled_call_impl", None) is not None for m in model.modules())


@torch.no_grad()
def generate(
    model: nn.Module,
    prompt: Tensor | list[int] | list[list[int]],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    stop_tokens: list[int] | None = None,
    pad_id: int = 0,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    vocab_limit: int | None = None,
) -> Tensor:
    """Extends each prompt by up to ``max_new_tokens`` tokens.

    Args:
        model: a ``TransformerDecoder``, normally in eval mode (dropout stays as the caller set
            it), or one compiled with ``torch.compile`` (whole, or module by module). If it has
            no KV caches, caches are set up for this call and removed afterwards: sized for it,
            or for the model's ``max_seq_len`` when it is compiled, so that every call of a batch
            size has the same cache shapes and reuses the same graphs (a prefill and a decoding
            step; sized per call, each call would compile anew). Each new batch size compiles
            two more; a call that meets torch's recompile limit (which a ``fullgraph=True`` model
            would fail on) runs eagerly, with a warning. Caches set up by the caller are reset
            and reused.
        prompt: [b, s] token ids (prompts of equal length), one prompt as a [s] tensor or a list
            of ints, or a list of such lists: prompts of different lengths, decoded together in
            one batch.
            Each row starts at position 0 and its new tokens follow its own last prompt token;
            the pads after a shorter prompt come later in the sequence, where causal attention
            keeps them from its tokens, and new tokens overwrite them (no attention mask needed).
        max_new_tokens: most tokens to add.
        temperature, top_k, generator: as for ``sample`` (temperature 0 = greedy).
        stop_tokens: token ids (a list, a tensor, or one int); a row stops after emitting one of
            these, and its later positions get ``pad_id``.
            Generation ends when every row has stopped.
        pad_id: filler after a row's stop token, and after the new tokens of a prompt shorter
            than the longest.
        use_cache: False recomputes the full sequence each step (a reference; slow) and needs a
            model without KV caches in use. A model whose caches are disabled (torchtune's
            ``disable_kv_cache``) decodes so too.
        vocab_limit: only ids below it are generated: a tokenizer's size, where the model's
            embedding has more rows than the tokenizer has pieces (padded, as some HF
            checkpoints are), so that every new id decodes. None: the model's whole vocabulary.

    Returns:
        [b, s + n] int64, s the longest prompt and n <= max_new_tokens the decoding steps run:
        row i holds prompt i, its new tokens from position ``len(prompt i)``, then ``pad_id``.

    Raises:
        ValueError: an empty prompt, token ids or ``pad_id`` outside the vocabulary,
            ``max_new_tokens`` not an integer >= 1, stop tokens that are not integers, the longest
            prompt plus new tokens longer than the model's max_seq_len (or than caches set up by
            the caller), a batch size other than that of caches set up by the caller,
            ``use_cache=False`` on a model with KV caches, ``vocab_limit`` not in [1, vocabulary],
            KV caches on (or enabled on) some layers only.
        NonFiniteLogitsError: NaN or infinite logits (a ValueError too).
    """
    if not all(hasattr(model, name) for name in ("tok_embeddings", "layers", "output", "setup_caches")):
        raise ValueError(f"generate: argument 'model' must be a qlora_ext TransformerDecoder (llama2_from_checkpoint, "
                         f"llama2_7b, lora_llama2 ...), with tok_embeddings, layers and output; got {type(model).__name__}")
    meta = next((name for name, p in model.named_parameters() if p.is_meta), None)
    if meta is not None:
        raise ValueError(f"generate: argument 'model' has weights on the meta device (shapes without values), {meta} among "
                         "them; load a checkpoint into it (qlora_ext.checkpoint.load_checkpoint, or load_state_dict(..., "
                         "assign=True) and then each pos_embeddings.rope_init(device)) or build it on a real device")
    # RoPE's cos/sin are not in a state dict: load_state_dict(..., assign=True) leaves them on meta
    meta_buffers = [name for name, b in model.named_buffers() if b.is_meta]
    meta = next((name for name in meta_buffers if ".kv_cache." not in f".{name}"), None)
    if meta is not None:
        raise ValueError(f"generate: argument 'model' has buffers on the meta device, {meta} among them (RoPE's cos and sin, "
                         "which no state dict holds, after a build on the meta device); call each layer's "
                         "attn.pos_embeddings.rope_init(device), or load with qlora_ext.checkpoint.load_checkpoint")
    if meta_buffers:  # caches set up while the model was on meta (inside `with torch.device("meta")`)
        raise ValueError(f"generate: argument 'model' has KV caches on the meta device, {meta_buffers[0]} among them "
                         "(set up before its weights were loaded); call model.setup_caches(batch_size, dtype) again, or "
                         "model.remove_caches() to let generate size them")
    if not isinstance(use_cache, bool):
        raise ValueError(f"generate: argument 'use_cache' must be True or False; got {use_cache!r}")
    device = model.tok_embeddings.weight.device
    vocab = model.tok_embeddings.num_embeddings
    if not is_int(pad_id) or not 0 <= pad_id < vocab:
        raise ValueError(f"generate: argument 'pad_id' must be a token id in [0, {vocab}); got {pad_id!r}")
    rows, lengths = _prompt_rows(prompt, pad_id, vocab)
    if not is_int(max_new_tokens) or max_new_tokens < 1:
        raise ValueError(f"generate: argument 'max_new_tokens' must be an integer >= 1; got {max_new_tokens!r}")
    if stop_tokens is None:
        stop_ids = []
    elif isinstance(stop_tokens, Tensor):
        stop_ids = stop_tokens.reshape(-1).tolist()
    elif is_int(stop_tokens):
        stop_ids = [stop_tokens]
    else:
        try:
            stop_ids = list(stop_tokens)
        except TypeError:
            stop_ids = [stop_tokens]  # refused below, by its value
    if not all(is_int(t) and -(2**63) <= t < 2**63 for t in stop_ids):
        raise ValueError(f"generate: argument 'stop_tokens' must hold integer token ids (int64); got {stop_ids}")
    if not is_finite_real(temperature) or temperature < 0:  # as sample() checks, before the prefill rather than after it
        raise ValueError(f"generate: argument 'temperature' must be finite and >= 0; got {temperature!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generate: argument 'generator' must be a torch.Generator or None; got {type(generator).__name__}")
    if top_k is not None and (not is_int(top_k) or top_k <= 0):
        raise ValueError(f"generate: argument 'top_k' must be a positive integer or None; got {top_k!r}")
    if vocab_limit is not None and (not is_int(vocab_limit) or not 1 <= vocab_limit <= vocab):
        raise ValueError(f"generate: argument 'vocab_limit' must be an integer in [1, {vocab}] (the model's vocabulary) or None; got {vocab_limit!r}")
    caches = _cache_state(model)
    if not use_cache and caches == "enabled":
        raise ValueError("generate: argument 'use_cache' is False but the model has KV caches; call model.remove_caches() first")
    if caches == "disabled":  # as torchtune's generate, inside its disable_kv_cache(model): no incremental decoding
        use_cache = False
    b, s = rows.shape
    total = s + max_new_tokens
    limit = model.max_seq_len
    own_caches = use_cache and caches == "none"
    if use_cache and not own_caches:
        limit = min(limit, model.decoder_max_cache_seq_len)
        cache_batch = model.layers[0].attn.kv_cache.batch_size
        if cache_batch != b:
            raise ValueError(
                f"generate: argument 'prompt' holds {b} prompts but the model's KV caches were set up for batch size "
                f"{cache_batch}; call model.setup_caches({b}, ...) again, or model.remove_caches() to let generate size them"
            )
    if total > limit:
        raise ValueError(
            f"generate: prompt length {s} + max_new_tokens {max_new_tokens} must be at most {limit} "
            f"(the model's max_seq_len or its cache length); got {total}"
        )
    stop = torch.tensor(stop_ids, dtype=torch.long, device=device)
    lengths = lengths.to(device)
    rows = rows.to(device).contiguous()  # the prefill's input: contiguous, whatever max_new_tokens (a view of out has out's strides)
    compiled = _is_compiled(model)
    if own_caches:
        model.setup_caches(b, model.tok_embeddings.weight.dtype, max_seq_len=limit if compiled else total)
    args = (model, rows, lengths, total, max_new_tokens, temperature, top_k, stop, pad_id, generator, use_cache, vocab_limit)
    rng = generator.get_state() if generator is not None else None
    # The decoder returns hidden states here, whatever output mode training left it in; the
    # output layer is applied to the one position per row that is sampled from (the prefill's
    # [b, s, vocab] float32 logits were GBs for long prompts).
    decoder = getattr(model, "_orig_mod", model)  # (torch.compile's wrapper reads, not writes, the module's attributes)
    output_mode = decoder.skip_output_layer, decoder.num_output_chunks
    decoder.skip_output_layer, decoder.num_output_chunks = True, 0
    try:
        try:
            return _decode(*args)
        except Exception as e:
            # Each new batch size compiles a prefill and a decoding graph; past torch's recompile
            # limit a fullgraph=True model fails instead of running eagerly. Rerun this call eagerly.
            if not compiled or type(e).__name__ != "FailOnRecompileLimitHit":
                raise
            warnings.warn(
                f"generate: the compiled model reached torch's recompile limit at batch size {b} (each new batch size "
                "compiles new graphs); this call runs eagerly", stacklevel=3,
            )
            if rng is not None:
                generator.set_state(rng)
            with force_eager():
                return _decode(*args)
    finally:
        decoder.skip_output_layer, decoder.num_output_chunks = output_mode
        if own_caches:
            model.remove_caches()


def _decode(
    model: nn.Module, rows: Tensor, lengths: Tensor, total: int, max_new_tokens: int, temperature: float, top_k: int | None,
    stop: Tensor, pad_id: int, generator: torch.Generator | None, use_cache: bool, vocab_limit: int | None,
) -> Tensor:
    """generate's prefill and decoding steps, on checked arguments and caches set up (reset here):
    rows [b, s] right-padded prompts of ``lengths`` [b]; returns generate's result."""
    b, s = rows.shape
    device = rows.device
    batch = torch.arange(b, device=device)
    # Every row right-padded to s + max_new_tokens; row i's step t writes position lengths[i] + t.
    # Pads after a shorter prompt sit at later positions than its real tokens, so causal attention
    # never lets them in: each is overwritten by a new token before any query can reach it.
    out = torch.full((b, total), pad_id, dtype=torch.long, device=device)
    out[:, :s] = rows
    if use_cache:
        model.reset_caches()
        # [b, s] positions, as the decoding steps pass [b, 1]: one input rank, for compiled models
        hidden = model(rows, input_pos=torch.arange(s, device=device).expand(b, s))
    else:
        hidden = model(rows)
    hidden = hidden[batch, lengths - 1]  # [b, d]: after each row's last prompt token
    done = torch.zeros(b, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        logits = _next_logits(model, hidden, vocab_limit, step)
        nxt = _sample(logits, temperature, top_k, generator)
        nxt = nxt.masked_fill(done, pad_id)
        pos = lengths + step  # [b]: where each row's new token goes
        out[batch, pos] = nxt
        done |= torch.isin(nxt, stop)
        if step == max_new_tokens - 1 or bool(done.all()):
            break
        if use_cache:
            hidden = model(nxt[:, None], input_pos=pos[:, None])[:, -1]
        else:
            hidden = model(out[:, : s + step + 1])[batch, pos]
    return out[:, : s + step + 1]


def _next_logits(model: nn.Module, hidden: Tensor, vocab_limit: int | None, step: int) -> Tensor:
    """float32 logits [b, vocab] (or [b, vocab_limit]) of the normalized hidden states [b, d].

    Raises:
        NonFiniteLogitsError: a logit is NaN or infinite (sampling would fail on it, argmax pick garbage).
    """
    logits = model.output(hidden).float()
    if vocab_limit is not None:
        logits = logits[:, :vocab_limit]
    if not bool(torch.isfinite(logits).all()):  # (one host sync per token: the stop check makes one too)
        raise NonFiniteLogitsError(
            f"generate: the model's logits for new token {step + 1} hold NaN or infinity; in float16 activations overflow "
            "past 65504 (bfloat16 or float32 avoid that), otherwise the model's weights hold them"
        )
    return logits
