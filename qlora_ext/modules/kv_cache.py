"""KVCache: the keys and values of past positions, so generation computes each token once."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class KVCache(nn.Module):
    """Per-layer key/value storage of shape [batch_size, num_kv_heads, max_seq_len, head_dim].

    Entries are written at the positions of the tokens being processed, so a prompt can be
    prefilled in one call and then extended one token at a time. Positions never written stay
    zero; attention masks them out by position (see ``TransformerDecoder``). As torchtune's,
    ``update`` without positions writes at the next free ones, and ``size`` counts the positions
    so written since the last ``reset``.

    Args:
        batch_size: sequences decoded together.
        max_seq_len: positions the cache holds (prompt plus generated tokens).
        num_kv_heads: key/value heads (fewer than query heads under GQA).
        head_dim: per-head dimension.
        dtype: storage dtype, normally the model's activation dtype.
        device: where the cache lives.
    """

    def __init__(
        self,
        batch_size: int,
        max_seq_len: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        for name, value in (("batch_size", batch_size), ("max_seq_len", max_seq_len)):
            if value <= 0:
                raise ValueError(f"KVCache: argument '{name}' must be positive; got {value}")
        shape = (batch_size, num_kv_heads, max_seq_len, head_dim)
        self.batch_size = batch_size
        self.max_seq_len = max_seq_len
        # Non-persistent: a cache is scratch state, never saved with the model.
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        # torchtune's: the positions from the next free one on (cache_pos[0] is ``size``), kept as a
        # tensor so that compiled decoding steps neither sync nor recompile on it.
        self.register_buffer("cache_pos", torch.arange(max_seq_len, device=device), persistent=False)

    @property
    def size(self) -> int:
        """Positions written by ``update`` without ``input_pos`` since the last ``reset`` (one host
        sync); writes at given positions (``TransformerDecoder``'s generation) leave it alone."""
        return int(self.cache_pos[0])

    def reset(self) -> None:
        """Forgets every cached position."""
        self.k_cache.zero_()
        self.v_cache.zero_()
        self.cache_pos.copy_(torch.arange(self.max_seq_len, device=self.cache_pos.device))

    def update(self, k_val: Tensor, v_val: Tensor, input_pos: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Writes new keys/values at ``input_pos`` (default: the next free positions, as
        torchtune's ``update(k_val, v_val)`` does) and returns the whole caches.

        Args:
            k_val: [b, n_kv, s, head_dim], b equal to the cache's batch size.
            v_val: same shape as ``k_val``.
            input_pos: [s] or [b, s] positions of the s new entries, or None.

        Returns:
            (k_cache, v_cache), each [b, n_kv, max_seq_len, head_dim].

        Raises:
            ValueError: the batch size differs from the cache's, or (without ``input_pos``) the
                s entries do not fit after the ``size`` written ones.
        """
        if k_val.shape[0] != self.batch_size:
            raise ValueError(
                f"KVCache.update: argument 'k_val' must have batch size {self.batch_size} (the cache's); "
                f"got {k_val.shape[0]}"
            )
        if input_pos is not None:
            return self._write(k_val, v_val, input_pos)
        seq_len = k_val.shape[2]
        if not torch.compiler.is_compiling() and self.size + seq_len > self.max_seq_len:
            raise ValueError(
                f"KVCache.update: argument 'k_val' must fit in the cache's {self.max_seq_len - self.size} free "
                f"positions (max_seq_len={self.max_seq_len}, {self.size} written); got {seq_len} new ones"
            )
        caches = self._write(k_val, v_val, self.cache_pos[:seq_len])
        self.cache_pos.add_(seq_len)  # after the write, which read its first seq_len positions
        return caches

    def _write(self, k_val: Tensor, v_val: Tensor, input_pos: Tensor) -> tuple[Tensor, Tensor]:
        # scatter_ along the sequence dim handles per-row positions and stays one traced op.
        index = input_pos.expand(k_val.shape[0], -1) if input_pos.dim() == 1 else input_pos
        index = index[:, None, :, None].expand_as(k_val)  # [b, n_kv, s, d]
        self.k_cache.scatter_(2, index, k_val.to(self.k_cache.dtype))
        self.v_cache.scatter_(2, index, v_val.to(self.v_cache.dtype))
        return self.k_cache, self.v_cache
