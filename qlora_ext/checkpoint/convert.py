"""Parameter names in HF, Meta and PEFT checkpoints vs this package's (torchtune's) names, and the
Meta -> HF row permutation of the rotary projections."""

from __future__ import annotations

import re

from torch import Tensor, nn

# (HF name, our name) with {} for the layer index. HF's rotary inv_freq (old checkpoints) is
# derived data and dropped.
_HF_LAYER = (
    ("self_attn.q_proj.weight", "attn.q_proj.weight"),
    ("self_attn.k_proj.weight", "attn.k_proj.weight"),
    ("self_attn.v_proj.weight", "attn.v_proj.weight"),
    ("self_attn.o_proj.weight", "attn.output_proj.weight"),
    ("mlp.gate_proj.weight", "mlp.w1.weight"),
    ("mlp.down_proj.weight", "mlp.w2.weight"),
    ("mlp.up_proj.weight", "mlp.w3.weight"),
    ("input_layernorm.weight", "sa_norm.scale"),
    ("post_attention_layernorm.weight", "mlp_norm.scale"),
)
_HF_TOP = (
    ("model.embed_tokens.weight", "tok_embeddings.weight"),
    ("model.norm.weight", "norm.scale"),
    ("lm_head.weight", "output.weight"),
)
_META_LAYER = (
    ("attention.wq.weight", "attn.q_proj.weight"),
    ("attention.wk.weight", "attn.k_proj.weight"),
    ("attention.wv.weight", "attn.v_proj.weight"),
    ("attention.wo.weight", "attn.output_proj.weight"),
    ("feed_forward.w1.weight", "mlp.w1.weight"),
    ("feed_forward.w2.weight", "mlp.w2.weight"),
    ("feed_forward.w3.weight", "mlp.w3.weight"),
    ("attention_norm.weight", "sa_norm.scale"),
    ("ffn_norm.weight", "mlp_norm.scale"),
)
_META_TOP = (
    ("tok_embeddings.weight", "tok_embeddings.weight"),
    ("norm.weight", "norm.scale"),
    ("output.weight", "output.weight"),
)
# Our module path -> HF module path (PEFT target names are the last component).
_HF_MODULES = {
    "attn.q_proj": "self_attn.q_proj",
    "attn.k_proj": "self_attn.k_proj",
    "attn.v_proj": "self_attn.v_proj",
    "attn.output_proj": "self_attn.o_proj",
    "mlp.w1": "mlp.gate_proj",
    "mlp.w2": "mlp.down_proj",
    "mlp.w3": "mlp.up_proj",
}
_DECODER_LINEAR_WEIGHTS = {f"{module}.weight" for module in _HF_MODULES}
_HF_IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")
_META_IGNORED = re.compile(r"rope\.freqs")
# Wrappers that rename submodules (torch.compile, activation checkpointing, FSDP) are invisible
# in checkpoint names.
_WRAPPER_PARTS = re.compile(r"(^|\.)(_orig_mod|_checkpoint_wrapped_module|_fsdp_wrapped_module)(?=\.|$)")
_LAYER = re.compile(r"^(?P<prefix>model\.layers|layers)\.(?P<i>\d+)\.(?P<rest>.+)$")


def unwrap_parallel(model: nn.Module) -> nn.Module:
    """The model a ``DistributedDataParallel`` (or ``DataParallel``) wrapper holds, through
    ``torch.compile``'s wrapper on either side, as accelerate's ``unwrap_model`` gives it: the
    checkpoint functions take the wrapper as the model itself."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # (torch.compile's OptimizedModule)
            model = model._orig_mod
        else:
            return model


def strip_wrappers(name: str) -> str:
    """Removes the name parts that compile/checkpoint/FSDP wrappers insert."""
    return _WRAPPER_PARTS.sub("", name).lstrip(".")


def _translate(name: str, layer_table, top_table, layer_prefix_in: str, layer_prefix_out: str) -> str | None:
    match = _LAYER.match(name)
    if match and match["prefix"] == layer_prefix_in:
        for src, dst in layer_table:
            if match["rest"] == src:
                return f"{layer_prefix_out}.{match['i']}.{dst}"
        return None
    return dict(top_table).get(name)


def hf_to_ours(name: str) -> str | None:
    """Our parameter name for a HF ``LlamaForCausalLM`` key; "" for keys to drop; None if unknown."""
    if _HF_IGNORED.fullmatch(name):
        return ""
    return _translate(name, _HF_LAYER, _HF_TOP, "model.layers", "layers")


def ours_to_hf(name: str) -> str | None:
    """The HF key of one of our parameter names; None if it has no HF counterpart."""
    name = strip_wrappers(name)
    return _translate(name, [(b, a) for a, b in _HF_LAYER], [(b, a) for a, b in _HF_TOP], "layers", "model.layers")


def meta_to_ours(name: str) -> str | None:
    """Our parameter name for a key of Meta's ``consolidated.*.pth``; "" to drop; None if unknown."""
    if _META_IGNORED.fullmatch(name):
        return ""
    return _translate(name, _META_LAYER, _META_TOP, "layers", "layers")


def ours_to_meta(name: str) -> str | None:
    """The Meta key of one of our parameter names; None if it has no Meta counterpart."""
    name = strip_wrappers(name)
    return _translate(name, [(b, a) for a, b in _META_LAYER], [(b, a) for a, b in _META_TOP], "layers", "layers")


def hf_module_name(module_name: str) -> str | None:
    """HF module path of one of our linear modules (``layers.0.attn.q_proj`` ->
    ``model.layers.0.self_attn.q_proj``, ``output`` -> ``lm_head``); None if it has none."""
    module_name = strip_wrappers(module_name)
    if module_name == "output":
        return "lm_head"
    match = _LAYER.match(module_name)
    if match and match["prefix"] == "layers" and match["rest"] in _HF_MODULES:
        return f"model.layers.{match['i']}.{_HF_MODULES[match['rest']]}"
    return None


def meta_to_hf_rotary(weight: Tensor, num_heads: int) -> Tensor:
    """Reorders the rows of Meta's wq / wk ([num_heads * head_dim, in]) for HF's rotary layout.

    Meta rotates adjacent pairs (rows 2j, 2j+1 of a head); HF rotates the two halves (rows j and
    j + head_dim/2). Row ``c * head_dim/2 + j`` of a head in HF is row ``2j + c`` in Meta.
    """
    out_dim, in_dim = weight.shape
    return weight.view(num_heads, out_dim // num_heads // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def hf_to_meta_rotary(weight: Tensor, num_heads: int) -> Tensor:
    """The inverse of ``meta_to_hf_rotary``."""
    out_dim, in_dim = weight.shape
    return weight.view(num_heads, 2, out_dim // num_heads // 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


# Meta's model-parallel shards split each weight along one dim (fairscale's Column/RowParallel
# and ParallelEmbedding); norms are replicated.
META_SHARD_DIM = {
    "tok_embeddings.weight": 1,
    "output.weight": 0,
    "attention.wq.weight": 0,
    "attention.wk.weight": 0,
    "attention.wv.weight": 0,
    "attention.wo.weight": 1,
    "feed_forward.w1.weight": 0,
    "feed_forward.w3.weight": 0,
    "feed_forward.w2.weight": 1,
}


def meta_shard_dim(name: str) -> int | None:
    """The dim Meta's shards of ``name`` are concatenated along; None for replicated tensors."""
    match = _LAYER.match(name)
    return META_SHARD_DIM.get(match["rest"] if match else name)


def is_rotary_projection(our_name: str) -> bool:
    return our_name.endswith(("attn.q_proj.weight", "attn.k_proj.weight"))


def is_decoder_linear_weight(our_name: str) -> bool:
    """True for the weight of an attention or MLP projection (what bitsandbytes quantizes)."""
    match = _LAYER.match(our_name)
    return bool(match) and match["prefix"] == "layers" and match["rest"] in _DECODER_LINEAR_WEIGHTS
