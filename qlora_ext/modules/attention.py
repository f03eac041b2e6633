"""Multi-head self-attention with grouped-query heads, rotary positions and an optional KV cache."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qlora_ext.modules.kv_cache import KVCache


class MultiHeadAttention(nn.Module):
    """Causal self-attention (torchtune's names): MHA when ``num_kv_heads == num_heads``, GQA when
    fewer key/value heads each serve ``num_heads / num_kv_heads`` query heads.

    Args:
        embed_dim: model dimension.
        num_heads: query heads.
        num_kv_heads: key/value heads; divides ``num_heads``.
        head_dim: per-head dimension.
        q_proj: embed_dim -> num_heads * head_dim (nn.Linear or LoRALinear).
        k_proj: embed_dim -> num_kv_heads * head_dim.
        v_proj: embed_dim -> num_kv_heads * head_dim.
        output_proj: num_heads * head_dim -> embed_dim.
        pos_embeddings: applied to queries and keys (e.g. RotaryPositionalEmbeddings), or None.
        kv_cache: a KVCache to use once ``cache_enabled`` is set (torchtune's argument); usually
            left None and made by ``setup_cache``.
        max_seq_len: longest sequence, the default KV-cache length.
        attn_dropout: dropout on the attention weights, in training mode only.

    Raises:
        ValueError: ``num_heads`` is not a multiple of ``num_kv_heads``, or ``attn_dropout`` is
            outside [0, 1).
    """

    def __init__(
        self,
        *,
        embed_dim: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        q_proj: nn.Module,
        k_proj: nn.Module,
        v_proj: nn.Module,
        output_proj: nn.Module,
        pos_embeddings: nn.Module | None = None,
        kv_cache: KVCache | None = None,
        max_seq_len: int = 4096,
        attn_dropout: float = 0.0,
    ):
        super().__init__()
        if num_kv_heads <= 0 or num_heads % num_kv_heads:
            raise ValueError(
                f"MultiHeadAttention: argument 'num_kv_heads' must be positive and divide num_heads={num_heads}; "
                f"got {num_kv_heads}"
            )
        if not 0.0 <= attn_dropout < 1.0:
            raise ValueError(f"MultiHeadAttention: argument 'attn_dropout' must be in [0, 1); got {attn_dropout}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.max_seq_len = max_seq_len
        self.attn_dropout = attn_dropout
        self.q_proj = q_proj
        self.k_proj = k_proj
        self.v_proj = v_proj
        self.output_proj = output_proj
        self.pos_embeddings = pos_embeddings
        self.kv_cache: KVCache | None = kv_cache
        self.cache_enabled = False

    def setup_cache(self, batch_size: int, dtype: torch.dtype, max_seq_len: int, device=None) -> None:
        """Allocates a KV cache (replacing any) and enables it."""
        device = device if device is not None else self.output_proj.weight.device
        self.kv_cache = KVCache(batch_size, max_seq_len, self.num_kv_heads, self.head_dim, dtype, device)
        self.cache_enabled = True

    def reset_cache(self) -> None:
        """Zeroes the KV cache, if any."""
        if self.kv_cache is not None:
            self.kv_cache.reset()

    def remove_cache(self) -> None:
        """Frees the KV cache and disables it: the module is as built (no ``kv_cache`` submodule
        slot left behind, which torch.compile's guards would tell apart from the start)."""
        del self.kv_cache
        self.kv_cache = None
        self.cache_enabled = False

    def forward(
        self, x: Tensor, y: Tensor | None = None, *, mask: Tensor | None = None, input_pos: Tensor | None = None
    ) -> Tensor:
        """Attends each position to itself and earlier positions.

        Args:
            x: [b, s, embed_dim].
            y: x itself or None: torchtune's layers call ``attn(h, h)``; its cross-attention
                (keys and values from another sequence) is not supported.
            mask: optional boolean [b, s, kv_len] (True = may attend), kv_len = s without a
                cache and the cache length with one; replaces the built-in causal mask (with a
                cache, each query sees the cached positions up to its own ``input_pos``).
            input_pos: [s] or [b, s] positions of the tokens; required with an enabled cache.

        Returns:
            [b, s, embed_dim].

        Raises:
            ValueError: ``y`` is another tensor than ``x``, or the cache is enabled and
                ``input_pos`` is None.
        """
        if y is not None and y is not x:
            raise ValueError(
                "MultiHeadAttention: argument 'y' must be x itself or None (self-attention; cross-attention is not "
                f"supported); got another tensor of shape {list(y.shape)}"
            )
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(b, s, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, s, self.num_kv_heads, self.head_dim)
        if self.pos_embeddings is not None:
            q = self.pos_embeddings(q, input_pos=input_pos)
            k = self.pos_embeddings(k, input_pos=input_pos)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [b, heads, s, head_dim]

        if self.kv_cache is not None and self.cache_enabled:
            if input_pos is None:
                raise ValueError("MultiHeadAttention: argument 'input_pos' is required while the KV cache is enabled; got None")
            k, v = self.kv_cache.update(k, v, input_pos)  # [b, n_kv, cache_len, head_dim]
            k, v = k.to(q.dtype), v.to(q.dtype)  # a cache kept in another dtype than the activations
            if mask is None:  # is_causal would align the queries with the cache's first positions
                mask = causal_cache_mask(input_pos.to(k.device), b, k.shape[2])

        # Shared key/value heads: causal attention without a mask (training, a prefill without a
        # cache) lets SDPA read them as they are (enable_gqa: the CPU kernel and CUDA's flash
        # kernel, bf16/fp16, take it; no expanded copies of k and v, which autograd would keep per
        # layer). Elsewhere CUDA's memory-efficient kernel, which has no GQA, would give way to the
        # math one, so the heads are expanded into a copy and every backend sees plain MHA.
        native_gqa = (
            self.num_kv_heads != self.num_heads
            and mask is None
            and (q.device.type == "cpu" or q.dtype in (torch.bfloat16, torch.float16))
        )
        if self.num_kv_heads != self.num_heads and not native_gqa:
            groups = self.num_heads // self.num_kv_heads
            k = k.unsqueeze(2).expand(-1, -1, groups, -1, -1).flatten(1, 2)
            v = v.unsqueeze(2).expand(-1, -1, groups, -1, -1).flatten(1, 2)

        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=None if mask is None else mask.unsqueeze(1),  # broadcast over heads
            dropout_p=self.attn_dropout if self.training else 0.0,
            is_causal=mask is None,
            enable_gqa=native_gqa,
        )  # [b, n_heads, s, head_dim]
        out = out.transpose(1, 2).reshape(b, s, self.num_heads * self.head_dim)
        return self.output_proj(out)


def causal_cache_mask(input_pos: Tensor, batch_size: int, cache_len: int) -> Tensor:
    """Boolean [b, s, cache_len] mask letting each query at ``input_pos`` ([s] or [b, s]) attend
    to every cache position up to and including its own."""
    key_pos = torch.arange(cache_len, device=input_pos.device)
    pos = input_pos if input_pos.dim() == 2 else input_pos.expand(batch_size, -1)
    return key_pos[None, None, :] <= pos[:, :, None]
