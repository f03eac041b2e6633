"""The decoder-only transformer: pre-norm self-attention layers between an embedding and an
output projection (torchtune's ``TransformerDecoder`` names and call signature)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from qlora_ext._arguments import is_int
from qlora_ext.modules.attention import MultiHeadAttention, causal_cache_mask


class TransformerSelfAttentionLayer(nn.Module):
    """``h = x + attn(sa_norm(x)); out = h + mlp(mlp_norm(h))``.

    Args:
        attn: the self-attention module.
        mlp: the feed-forward module.
        sa_norm: normalization before attention (default none: ``nn.Identity``, as torchtune's).
        mlp_norm: normalization before the feed-forward (default none).
    """

    def __init__(
        self, attn: MultiHeadAttention, mlp: nn.Module, *, sa_norm: nn.Module | None = None, mlp_norm: nn.Module | None = None
    ):
        super().__init__()
        self.attn = attn
        self.mlp = mlp
        self.sa_norm = sa_norm if sa_norm is not None else nn.Identity()
        self.mlp_norm = mlp_norm if mlp_norm is not None else nn.Identity()

    # torchtune's per-layer cache calls (TransformerDecoder's own go through attn directly).
    def setup_caches(
        self, batch_size: int, dtype: torch.dtype, *, encoder_max_seq_len: int | None = None, decoder_max_seq_len: int, device=None
    ) -> None:
        """Gives ``attn`` a KV cache of ``decoder_max_seq_len`` positions (``encoder_max_seq_len``
        is ignored, as torchtune's self-attention layer ignores it)."""
        self.attn.setup_cache(batch_size, dtype, decoder_max_seq_len, device)

    def caches_are_setup(self) -> bool:
        return self.attn.kv_cache is not None

    def caches_are_enabled(self) -> bool:
        return self.attn.kv_cache is not None and self.attn.cache_enabled

    def reset_cache(self) -> None:
        self.attn.reset_cache()

    def forward(self, x: Tensor, *, mask: Tensor | None = None, input_pos: Tensor | None = None) -> Tensor:
        h = x + self.attn(self.sa_norm(x), mask=mask, input_pos=input_pos)
        return h + self.mlp(self.mlp_norm(h))


class TransformerDecoder(nn.Module):
    """Token ids in, next-token logits out.

    Args:
        tok_embeddings: vocab_size -> embed_dim embedding.
        layers: the transformer layers, in order.
        max_seq_len: longest sequence the model accepts (and the default KV-cache length).
        num_heads: query heads per layer (for shape bookkeeping).
        head_dim: per-head dimension.
        norm: final normalization.
        output: embed_dim -> vocab_size projection (nn.Linear or LoRALinear).

    With ``skip_output_layer`` set (torchtune's attribute), forward returns the final normalized
    hidden states [b, s, embed_dim] instead of logits, for a loss that applies ``output`` itself
    (``qlora_ext.modules.linear_cross_entropy``). After ``set_num_output_chunks(n)`` (torchtune's,
    for its ``CEWithChunkedOutputLoss``) it returns the logits as a list of n chunks along the
    sequence, in the output layer's dtype (that loss upcasts each).
    """

    def __init__(
        self,
        *,
        tok_embeddings: nn.Embedding,
        layers: list[nn.Module] | nn.ModuleList,
        max_seq_len: int,
        num_heads: int,
        head_dim: int,
        norm: nn.Module,
        output: nn.Module,
    ):
        super().__init__()
        self.tok_embeddings = tok_embeddings
        self.layers = layers if isinstance(layers, nn.ModuleList) else nn.ModuleList(layers)
        self.max_seq_len = max_seq_len
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.norm = norm
        self.output = output
        self.skip_output_layer = False
        self.num_output_chunks = 0
        self.encoder_max_cache_seq_len: int | None = None  # torchtune's name; no encoder here

    def set_num_output_chunks(self, num_output_chunks: int) -> None:
        """Makes forward return its logits in ``num_output_chunks`` chunks along the sequence
        (0: one float32 tensor), as torchtune's decoder does for ``CEWithChunkedOutputLoss``."""
        if not is_int(num_output_chunks) or num_output_chunks < 0:
            raise ValueError(
                f"TransformerDecoder.set_num_output_chunks: argument 'num_output_chunks' must be a whole number >= 0; "
                f"got {num_output_chunks!r}"
            )
        self.num_output_chunks = int(num_output_chunks)

    def chunked_output(self, last_hidden_state: Tensor) -> list[Tensor]:
        """The output projection of [b, s, embed_dim] hidden states in ``num_output_chunks`` chunks
        along s (torch.chunk's sizes)."""
        return [self.output(chunk) for chunk in last_hidden_state.chunk(self.num_output_chunks, dim=1)]

    # -- KV caches (generation) -------------------------------------------------------------------

    def setup_caches(
        self,
        batch_size: int,
        dtype: torch.dtype,
        *,
        max_seq_len: int | None = None,
        device=None,
        encoder_max_seq_len: int | None = None,
        decoder_max_seq_len: int | None = None,
    ) -> None:
        """Gives every layer a KV cache of ``max_seq_len`` positions (default: the model's).

        Forward then requires ``input_pos`` and attends over the cache. torchtune's spelling
        works too: ``decoder_max_seq_len`` is ``max_seq_len``, and ``encoder_max_seq_len`` is
        ignored (no cross-attention layers, where torchtune ignores it as well).

        Raises:
            ValueError: ``max_seq_len`` exceeds the model's or differs from a given
                ``decoder_max_seq_len``, or ``batch_size`` is not positive.
        """
        if decoder_max_seq_len is not None and max_seq_len is not None and decoder_max_seq_len != max_seq_len:
            raise ValueError(
                "TransformerDecoder.setup_caches: arguments 'max_seq_len' and 'decoder_max_seq_len' name the same "
                f"length; got {max_seq_len} and {decoder_max_seq_len}"
            )
        max_seq_len = max_seq_len if max_seq_len is not None else decoder_max_seq_len
        max_seq_len = self.max_seq_len if max_seq_len is None else max_seq_len
        if not 0 < max_seq_len <= self.max_seq_len:
            name = "decoder_max_seq_len" if decoder_max_seq_len is not None else "max_seq_len"
            raise ValueError(
                f"TransformerDecoder.setup_caches: argument '{name}' must be in [1, {self.max_seq_len}] "
                f"(the model's max_seq_len); got {max_seq_len}"
            )
        if batch_size <= 0:
            raise ValueError(f"TransformerDecoder.setup_caches: argument 'batch_size' must be positive; got {batch_size}")
        device = device if device is not None else self.tok_embeddings.weight.device
        for layer in self.layers:
            layer.attn.setup_cache(batch_size, dtype, max_seq_len, device)

    @property
    def decoder_max_cache_seq_len(self) -> int | None:
        """The KV caches' length (torchtune's name), None without caches; read from the first
        layer's, as torchtune's decoder asks its first layer, so caches set up per layer count."""
        cache = self.layers[0].attn.kv_cache
        return None if cache is None else cache.max_seq_len

    def caches_are_setup(self) -> bool:
        return self.layers[0].attn.kv_cache is not None

    def caches_are_enabled(self) -> bool:
        """True when caches exist and forward uses them."""
        return all(layer.attn.kv_cache is not None and layer.attn.cache_enabled for layer in self.layers)

    def reset_caches(self) -> None:
        """Zeroes every KV cache, ready for new sequences.

        Raises:
            RuntimeError: no caches were set up.
        """
        if not self.caches_are_setup():
            raise RuntimeError("TransformerDecoder.reset_caches: no KV caches are set up; call setup_caches() first")
        for layer in self.layers:
            layer.attn.reset_cache()

    def remove_caches(self) -> None:
        """Frees the KV caches; forward goes back to plain causal attention."""
        for layer in self.layers:
            layer.attn.remove_cache()

    # -- forward ----------------------------------------------------------------------------------

    def forward(self, tokens: Tensor, *, mask: Tensor | None = None, input_pos: Tensor | None = None) -> Tensor:
        """Computes logits for every position.

        Args:
            tokens: [b, s] int64 token ids.
            mask: optional boolean [b, s, s] (with caches: [b, s, cache_len]), True = may attend;
                by default attention is causal.
            input_pos: [s] or [b, s] positions of the tokens (default ``arange(s)``; also [1, s],
                and for one token per row [b], or a single position for all rows, as torchtune's
                generate passes them); required when caches are enabled, and then increasing
                along each row (a position is a cache slot).

        Returns:
            float32 logits [b, s, vocab_size]; with ``skip_output_layer`` the normalized hidden
            states [b, s, embed_dim] instead; with ``num_output_chunks`` a list of logit chunks.

        Raises:
            ValueError: ``tokens`` is not 2-D or longer than max_seq_len, or ``input_pos`` is
                missing while caches are enabled, has the wrong shape or a position outside
                [0, max_seq_len) (with caches: [0, their length)), or, with caches, a row whose
                positions do not increase.
        """
        if tokens.dim() != 2:
            raise ValueError(f"TransformerDecoder: argument 'tokens' must be 2-D [batch, seq]; got shape {list(tokens.shape)}")
        b, s = tokens.shape
        # torchtune's generate also passes [b] (one token per row), [1, s] (the same for every
        # row), and for a one-token prompt a 0-d position
        if input_pos is not None and s == 1 and input_pos.dim() == 0:
            input_pos = input_pos.reshape(1)
        elif input_pos is not None and s == 1 and input_pos.shape == (b,):
            input_pos = input_pos[:, None]
        elif input_pos is not None and input_pos.shape == (1, s):
            input_pos = input_pos[0]
        if s > self.max_seq_len:
            raise ValueError(
                f"TransformerDecoder: argument 'tokens' must be at most max_seq_len={self.max_seq_len} long; got {s}"
            )
        if input_pos is not None and input_pos.shape not in ((s,), (b, s)):
            shapes = list(dict.fromkeys(str(list(t)) for t in ((s,), (1, s), (b, s)) + (((b,), ()) if s == 1 else ())))
            raise ValueError(
                f"TransformerDecoder: argument 'input_pos' must have shape {', '.join(shapes[:-1])} or {shapes[-1]}; "
                f"got {list(input_pos.shape)}"
            )
        if input_pos is not None and input_pos.numel() and not torch.compiler.is_compiling():
            # (one host sync, in eager calls with positions only: generation's steps, never training's)
            limit = self.decoder_max_cache_seq_len if self.caches_are_enabled() else self.max_seq_len
            steps = input_pos.diff(dim=-1)
            lo, hi, least_step = torch.stack((*torch.aminmax(input_pos), steps.min() if steps.numel() else input_pos.new_ones(()))).tolist()
            if lo < 0 or hi >= limit:
                what = "the KV caches' length" if self.caches_are_enabled() else "max_seq_len"
                raise ValueError(
                    f"TransformerDecoder: argument 'input_pos' must hold positions in [0, {limit}) ({what}); "
                    f"got {lo if lo < 0 else hi}"
                )
            if least_step < 1 and self.caches_are_enabled():
                # Each position is a cache slot here: a repeated one (torchtune's generate gives left
                # padding the position of the first token) would overwrite another token's keys.
                rows = input_pos.reshape(-1, s)
                row = int((rows.diff(dim=-1) < 1).any(dim=-1).nonzero()[0])
                raise ValueError(
                    "TransformerDecoder: argument 'input_pos' must increase along each row while KV caches are enabled "
                    f"(each position is one cache slot); got {rows[row].tolist()}"
                    + (f" in row {row}" if input_pos.dim() == 2 else "")
                    + ". Pad prompts on the right, as qlora_ext.generation.generate does, or decode without caches"
                )
        if self.caches_are_enabled():
            if input_pos is None:
                raise ValueError("TransformerDecoder: argument 'input_pos' is required while KV caches are enabled; got None")
            if mask is None:  # built once for all layers
                mask = causal_cache_mask(input_pos.to(tokens.device), b, self.decoder_max_cache_seq_len)

        h = self.tok_embeddings(tokens)  # [b, s, d]
        for layer in self.layers:
            h = layer(h, mask=mask, input_pos=input_pos)
        h = self.norm(h)
        if self.skip_output_layer:
            return h  # [b, s, d]
        if self.num_output_chunks > 0:
            return self.chunked_output(h)
        return self.output(h).float()  # [b, s, vocab]
