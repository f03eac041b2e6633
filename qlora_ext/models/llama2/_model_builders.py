"""Model builders: Llama-2 7B / 13B / 70B and a tiny configuration, dense, LoRA and QLoRA
(torchtune's names and arguments).

    from qlora_ext.models.llama2 import qlora_llama2_7b
    model = qlora_llama2_7b(lora_attn_modules=["q_proj", "v_proj"])

Building a 7B model on CPU allocates its weights (use ``with torch.device("meta")`` and
``qlora_ext.checkpoint.load_checkpoint`` to fill it from a checkpoint instead).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

from qlora_ext.models.llama2._component_builders import llama2, lora_llama2
from qlora_ext.modules.transformer import TransformerDecoder

# Architecture of each size, as in Meta's params.json / HF's config.json.
LLAMA2_7B = dict(vocab_size=32_000, num_layers=32, num_heads=32, num_kv_heads=32, embed_dim=4096, max_seq_len=4096)
LLAMA2_13B = dict(vocab_size=32_000, num_layers=40, num_heads=40, num_kv_heads=40, embed_dim=5120, max_seq_len=4096)
LLAMA2_70B = dict(
    vocab_size=32_000, num_layers=80, num_heads=64, num_kv_heads=8, embed_dim=8192, max_seq_len=4096, intermediate_dim=28_672
)
# Small enough to train on two CPU cores; GQA (2 kv heads) so that path is always exercised.
LLAMA2_TINY = dict(num_layers=4, num_heads=4, num_kv_heads=2, embed_dim=256, intermediate_dim=768)


def llama2_7b() -> TransformerDecoder:
    """Llama-2 7B: 32 layers, 32 heads, dim 4096, MLP 11008, vocab 32000."""
    return llama2(**LLAMA2_7B)


def llama2_13b() -> TransformerDecoder:
    """Llama-2 13B: 40 layers, 40 heads, dim 5120, MLP 13824, vocab 32000."""
    return llama2(**LLAMA2_13B)


def llama2_70b() -> TransformerDecoder:
    """Llama-2 70B: 80 layers, 64 query heads sharing 8 key/value heads (GQA), dim 8192, MLP 28672."""
    return llama2(**LLAMA2_70B)


def llama2_tiny(*, vocab_size: int = 512, max_seq_len: int = 512) -> TransformerDecoder:
    """A tiny Llama-2 (4 layers, 4 heads, 2 kv heads, dim 256, MLP 768) for tests and benchmarks.

    The default run does not build it: it fine-tunes the bundled pretrained model
    (``qlora_ext/assets/tiny_llama2``, made by ``scripts/make_tiny_assets.py``), whose own small
    size is in its config.json and is read by the generic ``qlora_llama2`` builder.

    Args:
        vocab_size: match it to the tokenizer in use.
        max_seq_len: longest sequence.
    """
    return llama2(**LLAMA2_TINY, vocab_size=vocab_size, max_seq_len=max_seq_len)


def _lora(arch: dict, lora_attn_modules, apply_lora_to_mlp, apply_lora_to_output, lora_rank, lora_alpha, lora_dropout, use_dora, quantize_base):
    return lora_llama2(
        lora_attn_modules,
        apply_lora_to_mlp,
        apply_lora_to_output,
        **arch,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        use_dora=use_dora,
        quantize_base=quantize_base,
    )


def lora_llama2_7b(
    lora_attn_modules: Sequence[str],
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    lora_rank: int = 8,
    lora_alpha: float = 16,
    lora_dropout: float = 0.0,
    use_dora: bool = False,
    quantize_base: bool = False,
) -> TransformerDecoder:
    """Llama-2 7B with LoRA adapters (architecture as ``llama2_7b``).

    Args:
        lora_attn_modules: attention projections with LoRA, from
            ``["q_proj", "k_proj", "v_proj", "output_proj"]``.
        apply_lora_to_mlp: LoRA on the MLP's w1, w2, w3.
        apply_lora_to_output: LoRA on the output projection.
        lora_rank: adapter rank.
        lora_alpha: adapter scaling numerator (scale = alpha / rank).
        lora_dropout: dropout on the adapter input.
        use_dora: torchtune's DoRA switch, in its place among the arguments; DoRA is not
            supported, so True is refused.
        quantize_base: base weights of the LoRA linears in NF4 (QLoRA).
    """
    return _lora(LLAMA2_7B, lora_attn_modules, apply_lora_to_mlp, apply_lora_to_output, lora_rank, lora_alpha, lora_dropout, use_dora, quantize_base)


def lora_llama2_13b(
    lora_attn_modules: Sequence[str],
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    lora_rank: int = 8,
    lora_alpha: float = 16,
    lora_dropout: float = 0.0,
    use_dora: bool = False,
    quantize_base: bool = False,
) -> TransformerDecoder:
    """Llama-2 13B with LoRA adapters; arguments as for ``lora_llama2_7b``."""
    return _lora(LLAMA2_13B, lora_attn_modules, apply_lora_to_mlp, apply_lora_to_output, lora_rank, lora_alpha, lora_dropout, use_dora, quantize_base)


def lora_llama2_70b(
    lora_attn_modules: Sequence[str],
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    lora_rank: int = 8,
    lora_alpha: float = 16,
    lora_dropout: float = 0.0,
    use_dora: bool = False,
    quantize_base: bool = False,
) -> TransformerDecoder:
    """Llama-2 70B (GQA) with LoRA adapters; arguments as for ``lora_llama2_7b``."""
    return _lora(LLAMA2_70B, lora_attn_modules, apply_lora_to_mlp, apply_lora_to_output, lora_rank, lora_alpha, lora_dropout, use_dora, quantize_base)


def lora_llama2_tiny(
    lora_attn_modules: Sequence[str],
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    lora_rank: int = 8,
    lora_alpha: float = 16,
    lora_dropout: float = 0.0,
    use_dora: bool = False,
    quantize_base: bool = False,
    *,
    vocab_size: int = 512,
    max_seq_len: int = 512,
) -> TransformerDecoder:
    """The tiny Llama-2 (``llama2_tiny``) with LoRA adapters.

    Arguments as for ``lora_llama2_7b``, plus ``vocab_size`` and ``max_seq_len`` as for ``llama2_tiny``.
    """
    arch = dict(LLAMA2_TINY, vocab_size=vocab_size, max_seq_len=max_seq_len)
    return _lora(arch, lora_attn_modules, apply_lora_to_mlp, apply_lora_to_output, lora_rank, lora_alpha, lora_dropout, use_dora, quantize_base)


# QLoRA builders are the LoRA ones with NF4 base weights, as in torchtune: the base weights of the
# LoRA linears (only those) are ``NF4Tensor`` parameters; everything else stays dense.
qlora_llama2_7b = partial(lora_llama2_7b, quantize_base=True)
qlora_llama2_7b.__doc__ = """Llama-2 7B for QLoRA: ``lora_llama2_7b(..., quantize_base=True)``."""

qlora_llama2_13b = partial(lora_llama2_13b, quantize_base=True)
qlora_llama2_13b.__doc__ = """Llama-2 13B for QLoRA: ``lora_llama2_13b(..., quantize_base=True)``."""

qlora_llama2_70b = partial(lora_llama2_70b, quantize_base=True)
qlora_llama2_70b.__doc__ = """Llama-2 70B for QLoRA: ``lora_llama2_70b(..., quantize_base=True)``."""

qlora_llama2_tiny = partial(lora_llama2_tiny, quantize_base=True)
qlora_llama2_tiny.__doc__ = """The tiny Llama-2 for QLoRA: ``lora_llama2_tiny(..., quantize_base=True)``."""
