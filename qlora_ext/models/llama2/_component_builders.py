"""Component builders: a Llama-2 ``TransformerDecoder`` from its architecture numbers, with or
without LoRA adapters (torchtune's ``llama2`` / ``lora_llama2``).

Layers are built one at a time and every LoRA linear with ``quantize_base=True`` quantizes its
weight as soon as it exists (``qlora_ext.modules.lora_init.qlora_linear``), so a QLoRA model never
holds all its frozen weights in 16/32 bits: at most one dense linear is alive beyond the parts
that stay dense. Under
``with torch.device("meta")`` nothing is allocated at all; ``qlora_ext.checkpoint`` then
materializes the weights one tensor at a time as it reads them.
"""

from __future__ import annotations

from collections.abc import Sequence
from collections.abc import Set as AbstractSet

import torch
from torch import nn

from qlora_ext._arguments import is_int
from qlora_ext.modules.attention import MultiHeadAttention
from qlora_ext.modules.feed_forward import FeedForward
from qlora_ext.modules.lora_init import qlora_linear
from qlora_ext.modules.lora_linear import LoRALinear
from qlora_ext.modules.peft import LORA_ATTN_MODULES
from qlora_ext.modules.position_embeddings import RotaryPositionalEmbeddings
from qlora_ext.modules.rms_norm import RMSNorm
from qlora_ext.modules.transformer import TransformerDecoder, TransformerSelfAttentionLayer

_NF4_BLOCK = 64


def scale_hidden_dim_for_mlp(dim: int, multiple_of: int = 256) -> int:
    """Llama-2's feed-forward width: 2/3 of 4 * dim, rounded up to ``multiple_of`` (4096 -> 11008)."""
    hidden = int(2 * (4 * dim) / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def llama2(
    *,
    vocab_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    embed_dim: int,
    max_seq_len: int,
    intermediate_dim: int | None = None,
    attn_dropout: float = 0.0,
    norm_eps: float = 1e-5,
    rope_base: float = 10_000.0,
) -> TransformerDecoder:
    """A Llama-2 decoder with plain ``nn.Linear`` projections (no adapters).

    Args:
        vocab_size: tokens in the vocabulary.
        num_layers: transformer layers.
        num_heads: query heads.
        num_kv_heads: key/value heads; equal to ``num_heads`` for MHA, a divisor of it for GQA.
        embed_dim: model dimension, a multiple of ``num_heads``.
        max_seq_len: longest sequence (RoPE table and KV-cache length).
        intermediate_dim: feed-forward width; default ``scale_hidden_dim_for_mlp(embed_dim)``.
        attn_dropout: attention dropout (training only).
        norm_eps: RMSNorm epsilon.
        rope_base: RoPE frequency base.

    Returns:
        The ``TransformerDecoder``, in the default dtype and on the default device.

    Raises:
        ValueError: inconsistent or non-positive sizes.
    """
    return lora_llama2(
        [],
        vocab_size=vocab_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        embed_dim=embed_dim,
        max_seq_len=max_seq_len,
        intermediate_dim=intermediate_dim,
        attn_dropout=attn_dropout,
        norm_eps=norm_eps,
        rope_base=rope_base,
        lora_rank=0,
        lora_alpha=0.0,
    )


def lora_llama2(
    lora_attn_modules: Sequence[str],
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    *,
    # llama2 args
    vocab_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    embed_dim: int,
    max_seq_len: int,
    intermediate_dim: int | None = None,
    attn_dropout: float = 0.0,
    norm_eps: float = 1e-5,
    rope_base: float = 10_000.0,
    # LoRA args
    lora_rank: int,
    lora_alpha: float,
    lora_dropout: float = 0.0,
    use_dora: bool = False,
    # QLoRA args
    quantize_base: bool = False,
) -> TransformerDecoder:
    """A Llama-2 decoder whose chosen linears are ``LoRALinear`` (NF4 base if ``quantize_base``).

    Args:
        lora_attn_modules: which attention projections get LoRA, a subset of
            ``("q_proj", "k_proj", "v_proj", "output_proj")``.
        apply_lora_to_mlp: LoRA on the feed-forward's w1, w2 and w3.
        apply_lora_to_output: LoRA on the final output projection.
        vocab_size, num_layers, num_heads, num_kv_heads, embed_dim, max_seq_len,
            intermediate_dim, attn_dropout, norm_eps, rope_base: as for ``llama2``.
        lora_rank: adapter rank.
        lora_alpha: adapter scaling numerator (the update is scaled by alpha / rank).
        lora_dropout: dropout on the adapter input.
        use_dora: torchtune's DoRA switch; DoRA is not supported, so True is refused.
        quantize_base: store the base weights of the LoRA linears (only those) in NF4.

    Returns:
        The ``TransformerDecoder``. Only adapter parameters are trainable in LoRA linears; other
        parameters keep ``requires_grad=True`` (use ``set_trainable_params`` to freeze them).

    Raises:
        ValueError: unknown ``lora_attn_modules`` entries, inconsistent sizes, a quantized
            linear whose element count is not a multiple of 64, or a true ``use_dora``.
    """
    if use_dora:
        raise ValueError(
            f"lora_llama2: argument 'use_dora' must be False: DoRA is not supported here (LoRA and QLoRA are); got {use_dora!r}"
        )
    # Any sequence or set of names (a list, a tuple, omegaconf's ListConfig ...), as torchtune takes; not a str.
    is_list = (
        isinstance(lora_attn_modules, (Sequence, AbstractSet))
        and not isinstance(lora_attn_modules, (str, bytes))
        and all(isinstance(m, str) for m in lora_attn_modules)
    )
    unknown = sorted(set(lora_attn_modules) - set(LORA_ATTN_MODULES)) if is_list else []
    if unknown or not is_list:
        raise ValueError(
            f"lora_llama2: argument 'lora_attn_modules' must be a list drawn from {list(LORA_ATTN_MODULES)}; "
            f"got {lora_attn_modules!r} (a {type(lora_attn_modules).__name__})"
        )
    lora_attn_modules = list(lora_attn_modules)
    _check_sizes(vocab_size, num_layers, num_heads, num_kv_heads, embed_dim, max_seq_len, intermediate_dim)
    head_dim = embed_dim // num_heads
    hidden_dim = intermediate_dim if intermediate_dim is not None else scale_hidden_dim_for_mlp(embed_dim)
    kv_dim = num_kv_heads * head_dim

    def linear(name: str, in_dim: int, out_dim: int, with_lora: bool) -> nn.Module:
        if not with_lora:
            return nn.Linear(in_dim, out_dim, bias=False)
        if quantize_base and (in_dim * out_dim) % _NF4_BLOCK:
            raise ValueError(
                f"lora_llama2: quantize_base=True needs every LoRA linear's in_dim * out_dim to be a multiple of "
                f"{_NF4_BLOCK}; {name} is {out_dim} x {in_dim}"
            )
        if quantize_base:
            return qlora_linear(in_dim, out_dim, lora_rank, lora_alpha, lora_dropout, scratch=scratch)
        return LoRALinear(in_dim, out_dim, rank=lora_rank, alpha=lora_alpha, dropout=lora_dropout)

    attn_lora = set(lora_attn_modules)
    lora_sizes = [embed_dim * num_heads * head_dim] if attn_lora & {"q_proj", "output_proj"} else []
    lora_sizes += [embed_dim * kv_dim] if attn_lora & {"k_proj", "v_proj"} else []
    lora_sizes += [embed_dim * hidden_dim] if apply_lora_to_mlp else []
    lora_sizes += [embed_dim * vocab_size] if apply_lora_to_output else []
    scratch = None
    if quantize_base and lora_sizes and torch.get_default_device().type == "cpu":
        # One buffer to draw every quantized weight in (see qlora_linear), as big as the largest.
        scratch = torch.empty(max(lora_sizes))
    # One RoPE table for all layers (as torchtune): 32 copies of a 4096-position table would be 128 MB.
    rope = RotaryPositionalEmbeddings(head_dim, max_seq_len=max_seq_len, base=rope_base)
    layers = []
    for _ in range(num_layers):
        # Each LoRALinear quantizes inside its constructor, before the next dense weight exists.
        attn = MultiHeadAttention(
            embed_dim=embed_dim,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            q_proj=linear("q_proj", embed_dim, num_heads * head_dim, "q_proj" in attn_lora),
            k_proj=linear("k_proj", embed_dim, kv_dim, "k_proj" in attn_lora),
            v_proj=linear("v_proj", embed_dim, kv_dim, "v_proj" in attn_lora),
            output_proj=linear("output_proj", num_heads * head_dim, embed_dim, "output_proj" in attn_lora),
            pos_embeddings=rope,
            max_seq_len=max_seq_len,
            attn_dropout=attn_dropout,
        )
        mlp = FeedForward(
            gate_proj=linear("w1", embed_dim, hidden_dim, apply_lora_to_mlp),
            down_proj=linear("w2", hidden_dim, embed_dim, apply_lora_to_mlp),
            up_proj=linear("w3", embed_dim, hidden_dim, apply_lora_to_mlp),
        )
        layers.append(
            TransformerSelfAttentionLayer(
                attn=attn,
                mlp=mlp,
                sa_norm=RMSNorm(embed_dim, eps=norm_eps),
                mlp_norm=RMSNorm(embed_dim, eps=norm_eps),
            )
        )
    # Free the buffer as soon as no quantized weight needs it: the output and embedding are the
    # largest dense tensors, and the build's peak is reached while they are created.
    if not apply_lora_to_output:
        scratch = None
    output = linear("output", embed_dim, vocab_size, apply_lora_to_output)
    scratch = None
    return TransformerDecoder(
        tok_embeddings=nn.Embedding(vocab_size, embed_dim),
        layers=layers,
        max_seq_len=max_seq_len,
        num_heads=num_heads,
        head_dim=head_dim,
        norm=RMSNorm(embed_dim, eps=norm_eps),
        output=output,
    )


def _check_sizes(vocab_size, num_layers, num_heads, num_kv_heads, embed_dim, max_seq_len, intermediate_dim) -> None:
    sizes = {
        "vocab_size": vocab_size,
        "num_layers": num_layers,
        "num_heads": num_heads,
        "num_kv_heads": num_kv_heads,
        "embed_dim": embed_dim,
        "max_seq_len": max_seq_len,
        "intermediate_dim": intermediate_dim if intermediate_dim is not None else 1,
    }
    for name, value in sizes.items():
        if not is_int(value) or value <= 0:
            raise ValueError(f"llama2: argument '{name}' must be a positive int; got {value!r}")
    if embed_dim % num_heads:
        raise ValueError(f"llama2: argument 'embed_dim' must be a multiple of num_heads={num_heads}; got {embed_dim}")
    if (embed_dim // num_heads) % 2:
        raise ValueError(
            f"llama2: embed_dim / num_heads (the head dim, rotated in pairs by RoPE) must be even; "
            f"got {embed_dim} / {num_heads} = {embed_dim // num_heads}"
        )
    if num_heads % num_kv_heads:
        raise ValueError(f"llama2: argument 'num_kv_heads' must divide num_heads={num_heads}; got {num_kv_heads}")
