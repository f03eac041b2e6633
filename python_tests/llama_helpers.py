"""Shared pieces of the Llama-2 model/checkpoint tests: tiny random HF models written to disk,
Meta-format conversion and an independent Meta-style reference forward, a locally trained
SentencePiece tokenizer, and the error metric the parity tests use."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

TINY = dict(vocab_size=320, hidden_size=256, intermediate_size=768, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128)


def transformers():
    """The transformers package (a test dependency), or skip."""
    return pytest.importorskip("transformers")


def rel_error(got: Tensor, want: Tensor) -> float:
    """||got - want|| / ||want|| over all elements, in float64."""
    got, want = got.double(), want.double()
    return ((got - want).norm() / want.norm()).item()


class TouchesWhenUnpickled:
    """Put in a pickle, it creates ``marker`` when unpickled, through os.system (a module
    torch.load(weights_only=True) blocks): a file that must be refused, never loaded."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def hf_llama(num_kv_heads: int = 4, seed: int = 0, **overrides):
    """A random fp32 ``LlamaForCausalLM`` in eval mode, with non-trivial norm weights."""
    tf = transformers()
    config = tf.LlamaConfig(**{**TINY, "num_key_value_heads": num_kv_heads, "rms_norm_eps": 1e-5, "tie_word_embeddings": False, **overrides})
    torch.manual_seed(seed)
    model = tf.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
    return model


def lora_llama_with_adapter(base_dir, modules=("q_proj", "v_proj")):
    """Our model of the HF checkpoint in ``base_dir`` with LoRA on ``modules``, its lora_b drawn
    nonzero (so that the adapter changes the output)."""
    from qlora_ext.models.llama2 import llama2_from_checkpoint

    model = llama2_from_checkpoint(base_dir, list(modules))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_b" in name:
                p.normal_(0, 0.05)
    return model


def hf_logits(model, tokens: Tensor) -> Tensor:
    with torch.no_grad():
        return model(tokens).logits.float()


# -- Meta format (written independently of qlora_ext.checkpoint, from Meta's conversion rules) --

_META_NAMES = {
    "self_attn.q_proj.weight": "attention.wq.weight",
    "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}


def _hf_rows_to_meta(w: Tensor, heads: int) -> Tensor:
    # HF row (c * half + j) of a head is Meta row (2j + c): interleave the two halves again.
    out_dim, in_dim = w.shape
    half = out_dim // heads // 2
    per_head = w.reshape(heads, 2, half, in_dim)
    return torch.stack((per_head[:, 0], per_head[:, 1]), dim=2).reshape(out_dim, in_dim)


def hf_to_meta_state(model) -> dict[str, Tensor]:
    cfg = model.config
    out = {}
    for name, t in model.state_dict().items():
        t = t.clone()
        if name == "model.embed_tokens.weight":
            out["tok_embeddings.weight"] = t
        elif name == "model.norm.weight":
            out["norm.weight"] = t
        elif name == "lm_head.weight":
            out["output.weight"] = t
        else:
            _, _, i, rest = name.split(".", 3)
            if rest == "self_attn.q_proj.weight":
                t = _hf_rows_to_meta(t, cfg.num_attention_heads)
            elif rest == "self_attn.k_proj.weight":
                t = _hf_rows_to_meta(t, cfg.num_key_value_heads)
            out[f"layers.{i}.{_META_NAMES[rest]}"] = t
    return out


def meta_params(model) -> dict:
    cfg = model.config
    return {
        "dim": cfg.hidden_size,
        "n_layers": cfg.num_hidden_layers,
        "n_heads": cfg.num_attention_heads,
        "n_kv_heads": cfg.num_key_value_heads,
        "multiple_of": 256,
        "norm_eps": cfg.rms_norm_eps,
        "rope_theta": _rope_theta(cfg),
        "vocab_size": -1,
    }


def _rope_theta(cfg) -> float:
    # transformers 4 keeps it as config.rope_theta, 5 inside config.rope_parameters.
    params = getattr(cfg, "rope_parameters", None) or {}
    return float(params.get("rope_theta", getattr(cfg, "rope_theta", 10_000.0)))


def meta_reference_logits(state: dict[str, Tensor], params: dict, tokens: Tensor) -> Tensor:
    """Meta's llama/model.py forward (complex-number RoPE on adjacent pairs), fp32, no cache."""
    n_heads, n_kv, eps = params["n_heads"], params.get("n_kv_heads", params["n_heads"]), params["norm_eps"]
    h = state["tok_embeddings.weight"][tokens]
    b, s, dim = h.shape
    hd = dim // n_heads
    freqs = 1.0 / (params.get("rope_theta", 10_000.0) ** (torch.arange(0, hd, 2)[: hd // 2].float() / hd))
    freqs_cis = torch.polar(torch.ones(s, hd // 2), torch.outer(torch.arange(s).float(), freqs))

    def norm(x, w):
        return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)) * w

    def rotate(x):
        xc = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(xc * freqs_cis[None, :, None, :]).flatten(3)

    causal = torch.full((s, s), float("-inf")).triu(1)
    for i in range(params["n_layers"]):
        p = f"layers.{i}."
        x = norm(h, state[p + "attention_norm.weight"])
        q = rotate((x @ state[p + "attention.wq.weight"].T).view(b, s, n_heads, hd))
        k = rotate((x @ state[p + "attention.wk.weight"].T).view(b, s, n_kv, hd))
        v = (x @ state[p + "attention.wv.weight"].T).view(b, s, n_kv, hd)
        k = k.repeat_interleave(n_heads // n_kv, dim=2)
        v = v.repeat_interleave(n_heads // n_kv, dim=2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        scores = q @ k.transpose(2, 3) / math.sqrt(hd) + causal
        attn = (F.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(b, s, -1)
        h = h + attn @ state[p + "attention.wo.weight"].T
        x = norm(h, state[p + "ffn_norm.weight"])
        ffn = F.silu(x @ state[p + "feed_forward.w1.weight"].T) * (x @ state[p + "feed_forward.w3.weight"].T)
        h = h + ffn @ state[p + "feed_forward.w2.weight"].T
    return norm(h, state["norm.weight"]) @ state["output.weight"].T


# -- tokenizer ------------------------------------------------------------------------------------

_WORDS = " ".join(
    [
        "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches",
        "under pale moonlight and an old river carries stories from distant mountains to the sea",
        "instruction input output response answer question explain describe write list give name",
    ]
).split()


def corpus_lines(n: int = 400, seed: int = 0) -> list[str]:
    gen = torch.Generator().manual_seed(seed)
    lines = []
    for _ in range(n):
        idx = torch.randint(len(_WORDS), (int(torch.randint(5, 15, (1,), generator=gen)),), generator=gen)
        lines.append(" ".join(_WORDS[i] for i in idx.tolist()).capitalize() + ".")
    return lines


def train_tokenizer(folder: str, vocab_size: int = 320) -> str:
    """Trains a SentencePiece BPE model with Llama-2's settings (unk 0, bos 1, eos 2, no pad,
    byte fallback, identity normalization, dummy prefix, split digits) on local text; returns
    the path of ``tokenizer.model``."""
    spm = pytest.importorskip("sentencepiece")
    text = os.path.join(folder, "corpus.txt")
    with open(text, "w", encoding="utf-8") as f:
        f.write("\n".join(corpus_lines()) + "\n")
    spm.SentencePieceTrainer.train(
        input=text,
        model_prefix=os.path.join(folder, "tokenizer"),
        model_type="bpe",
        vocab_size=vocab_size,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        character_coverage=1.0,
        minloglevel=2,
    )
    return os.path.join(folder, "tokenizer.model")
