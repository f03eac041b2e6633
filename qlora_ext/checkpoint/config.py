"""The architecture numbers of a Llama-2 model, and their spelling in HF's ``config.json``,
Meta's ``params.json`` and a built ``TransformerDecoder``."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import torch
from torch import nn

from qlora_ext._arguments import is_finite_real, is_int, parse_error_text

# Bounds past any Llama-2 (80 layers, 4096 positions; Code Llama 16384) that a damaged config
# would cross: building that many layers takes minutes before the weights are even opened, and
# the RoPE table holds a row per position (30 million rows took 14 GB). Widths (vocabulary, model,
# FFN; Llama-2 70B's largest is 32000 x 28672) are bounded far above any model's, below sizes
# whose products would pass torch's 64-bit element counts.
MAX_LAYERS = 1024
MAX_POSITIONS = 1 << 20
MAX_WIDTH = 1 << 24


_POSITIONS_WHY = " (the RoPE table holds every position)"


def _bound_problems(bounded: dict[str, tuple[object, int, str]]) -> list[str]:
    """``{key: (value, maximum, why)}`` -> a problem for each int value above its maximum."""
    return [f"'{key}' must be at most {maximum}{why}, got {value}"
            for key, (value, maximum, why) in bounded.items() if isinstance(value, int) and value > maximum]


@dataclasses.dataclass(frozen=True)
class Llama2Config:
    """What ``qlora_ext.models.llama2.llama2`` needs to build a model of this architecture.

    ``builder_kwargs()`` gives exactly the keyword arguments of ``llama2`` / ``lora_llama2``.
    """

    vocab_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    embed_dim: int
    intermediate_dim: int
    max_seq_len: int = 4096
    norm_eps: float = 1e-5
    rope_base: float = 10_000.0

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    def builder_kwargs(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # -- HF ---------------------------------------------------------------------------------------

    @classmethod
    def from_hf(cls, config: dict[str, Any]) -> Llama2Config:
        """Reads a HF ``LlamaConfig`` dict (transformers 4 or 5 spelling); a field it lacks has
        ``LlamaConfig``'s default (``rms_norm_eps`` 1e-6, ``max_position_embeddings`` 2048,
        ``rope_theta`` 10000).

        Raises:
            ValueError: listing every missing field, every size or number of the wrong kind or
                past ``MAX_LAYERS`` / ``MAX_POSITIONS`` / ``MAX_WIDTH``, and every setting this model does not
                implement (another architecture, activation, RoPE scaling, biases, tied embeddings,
                a non-bitsandbytes quantization).
        """
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        problems = [f"missing field '{key}'" for key in required if key not in config]
        if problems:
            raise ValueError(f"Llama2Config.from_hf: unsupported config.json: {'; '.join(problems)}")
        problems = [f"'{key}' must be a JSON object or null, got {config[key]!r:.100}" for key in ("rope_scaling", "rope_parameters")
                    if config.get(key) is not None and not isinstance(config[key], dict)]
        if problems:
            raise ValueError(f"Llama2Config.from_hf: unsupported config.json: {'; '.join(problems)}")
        # transformers takes a legacy rope_scaling over rope_parameters (which it also writes, with
        # the default type, into configs it saves): a scaling in either is refused.
        rope = config.get("rope_scaling") or config.get("rope_parameters") or {}
        rope_type = next((t for r in (config.get("rope_scaling"), config.get("rope_parameters")) if isinstance(r, dict)
                          for t in [r.get("rope_type", r.get("type", "default"))] if t != "default"), "default")
        rope_base = rope.get("rope_theta", config.get("rope_theta", 10_000.0))
        # Absent fields mean transformers' LlamaConfig defaults, not Llama-2's own values (a null
        # num_key_value_heads: one per attention head, as LlamaConfig reads it).
        sizes = {key: _int_or(config.get(key, default), -1) for key, default in (
            ("vocab_size", None), ("hidden_size", None), ("intermediate_size", None), ("num_hidden_layers", None),
            ("num_attention_heads", None), ("max_position_embeddings", 2048))}
        kv_heads = config.get("num_key_value_heads")
        sizes["num_key_value_heads"] = sizes["num_attention_heads"] if kv_heads is None else _int_or(kv_heads, -1)
        numbers = {"rms_norm_eps": config.get("rms_norm_eps", 1e-6), "rope_theta": rope_base}
        problems = [f"'{key}' must be a positive integer, got {config.get(key)!r}" for key, value in sizes.items() if value <= 0]
        problems += [problem for key, value in numbers.items() if (problem := _positive_number_problem(key, value))]
        problems += _bound_problems({
            **{key: (sizes[key], MAX_WIDTH, "") for key in ("vocab_size", "hidden_size", "intermediate_size")},
            "num_hidden_layers": (sizes["num_hidden_layers"], MAX_LAYERS, ""),
            "max_position_embeddings": (sizes["max_position_embeddings"], MAX_POSITIONS, _POSITIONS_WHY)})
        if not problems:  # (these divide by the sizes)
            problems += _head_problems(sizes["hidden_size"], "hidden_size", sizes["num_attention_heads"], "num_attention_heads",
                                       sizes["num_key_value_heads"], "num_key_value_heads")
        if problems:
            raise ValueError(f"Llama2Config.from_hf: unsupported config.json: {'; '.join(problems)}")
        head_dim = sizes["hidden_size"] // sizes["num_attention_heads"]
        expected = {
            "model_type": ("llama", config.get("model_type", "llama")),
            "hidden_act": ("silu", config.get("hidden_act", "silu")),
            "attention_bias": (False, config.get("attention_bias", False)),
            "mlp_bias": (False, config.get("mlp_bias", False)),
            "tie_word_embeddings": (False, config.get("tie_word_embeddings", False)),
            "head_dim": (head_dim, config.get("head_dim") or head_dim),
        }
        problems = [f"'{key}' must be {want!r}, got {got!r}" for key, (want, got) in expected.items() if want != got]
        if rope_type != "default":
            problems.append(f"'rope_scaling' (or 'rope_parameters') type must be 'default', got {rope_type!r} (RoPE scaling is not implemented)")
        quant = config.get("quantization_config")
        if isinstance(quant, dict) and quant.get("quant_method") is None and (quant.get("load_in_4bit") or quant.get("load_in_8bit")):
            quant = {**quant, "quant_method": "bitsandbytes"}  # as transformers reads a config without one
        if quant is not None and not (isinstance(quant, dict) and quant.get("quant_method") == "bitsandbytes" and quant.get("load_in_4bit")):
            if isinstance(quant, dict) and quant.get("quant_method") == "bitsandbytes" and quant.get("load_in_8bit"):
                what = "bitsandbytes 8-bit (load_in_8bit=True)"
            elif isinstance(quant, dict) and "quant_method" in quant:
                what = f"quant_method={quant['quant_method']!r}"
            else:
                what = repr(quant)
            problems.append(f"'quantization_config' must be bitsandbytes 4-bit (load_in_4bit=True) or absent, got {what}")
        if problems:
            raise ValueError(f"Llama2Config.from_hf: unsupported config.json: {'; '.join(problems)}")
        return cls(
            vocab_size=sizes["vocab_size"],
            num_layers=sizes["num_hidden_layers"],
            num_heads=sizes["num_attention_heads"],
            num_kv_heads=sizes["num_key_value_heads"],
            embed_dim=sizes["hidden_size"],
            intermediate_dim=sizes["intermediate_size"],
            max_seq_len=sizes["max_position_embeddings"],
            norm_eps=numbers["rms_norm_eps"],
            rope_base=float(rope_base),
        )

    def to_hf(self, *, dtype: torch.dtype | None = None, base: dict[str, Any] | None = None) -> dict[str, Any]:
        """A ``config.json`` dict that transformers' ``LlamaForCausalLM`` (4.x and 5.x) loads.

        Args:
            dtype: recorded as ``torch_dtype`` (the dtype of the saved weights).
            base: an original config.json to keep unrelated fields of (tokens ids, ...);
                its quantization settings are dropped, the architecture fields overwritten, but
                its ``max_position_embeddings`` is kept unless ``max_seq_len`` is longer (a
                shorter one caps a fine-tuning run's sequences, not the model's context).
        """
        config = {k: v for k, v in (base or {}).items() if k not in ("quantization_config", "rope_parameters", "dtype")}
        config.update(
            architectures=["LlamaForCausalLM"],
            model_type="llama",
            vocab_size=self.vocab_size,
            hidden_size=self.embed_dim,
            intermediate_size=self.intermediate_dim,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            # the base's context length, unless this model's is longer (a shorter max_seq_len is a training-time cap)
            max_position_embeddings=max(self.max_seq_len, _int_or(config.get("max_position_embeddings"), 0)),
            rms_norm_eps=self.norm_eps,
            rope_theta=self.rope_base,
            rope_scaling=None,
            hidden_act="silu",
            attention_bias=False,
            mlp_bias=False,
            tie_word_embeddings=False,
        )
        config.setdefault("bos_token_id", 1)
        config.setdefault("eos_token_id", 2)
        config.setdefault("initializer_range", 0.02)
        config.setdefault("pretraining_tp", 1)
        config.setdefault("use_cache", True)
        if dtype is not None:
            config["torch_dtype"] = str(dtype).removeprefix("torch.")
        return config

    # -- Meta -------------------------------------------------------------------------------------

    @classmethod
    def from_meta(cls, params: dict[str, Any], *, vocab_size: int | None = None, max_seq_len: int | None = None) -> Llama2Config:
        """Reads Meta's ``params.json``.

        Args:
            params: the parsed params.json (``dim``, ``n_layers``, ``n_heads``, optional
                ``n_kv_heads``, ``multiple_of``, ``ffn_dim_multiplier``, ``norm_eps``, ``rope_theta``).
            vocab_size: used when params.json says -1 (Llama-2's do: the tokenizer decides).
            max_seq_len: not recorded by Meta; by default as HF's conversion script sets it:
                16384 where ``rope_theta`` is above 10000 (Code Llama), else 4096 (Llama-2).

        Raises:
            ValueError: missing fields or fields of the wrong kind, no usable vocab size, sizes
                past ``MAX_LAYERS`` / ``MAX_POSITIONS`` / ``MAX_WIDTH``, or settings this model does not implement
                (scaled RoPE, MoE), listed.
        """
        missing = [key for key in ("dim", "n_layers", "n_heads") if key not in params]
        if missing:
            raise ValueError(f"Llama2Config.from_meta: params.json lacks required fields {missing}; got keys {sorted(params)}")
        sizes = {key: params.get(key, default) for key, default in (("dim", None), ("n_layers", None), ("n_heads", None),
                                                                   ("n_kv_heads", None), ("multiple_of", 256))}
        problems = [f"'{key}' must be a positive integer, got {value!r:.50}" for key, value in sizes.items()
                    if not (value is None and key == "n_kv_heads") and not (_int_or(value, -1) > 0)]
        numbers = {key: params.get(key, default) for key, default in (("norm_eps", 1e-5), ("rope_theta", 10_000.0),
                                                                     ("ffn_dim_multiplier", None))}
        problems += [problem for key, value in numbers.items()
                     if not (value is None and key == "ffn_dim_multiplier") and (problem := _positive_number_problem(key, value))]
        if not (_int_or(params.get("vocab_size", -1), 0) > 0 or params.get("vocab_size", -1) in (-1, None)):
            problems.append(f"'vocab_size' must be a positive integer or -1 (the tokenizer's), got {params.get('vocab_size')!r:.50}")
        problems += _bound_problems({
            **{key: (_int_or(params.get(key), -1), MAX_WIDTH, "") for key in ("vocab_size", "dim", "multiple_of")},
            "n_layers": (_int_or(sizes["n_layers"], -1), MAX_LAYERS, ""), "max_seq_len": (max_seq_len, MAX_POSITIONS, _POSITIONS_WHY)})
        if not problems:  # (these divide by the sizes)
            heads = _int_or(sizes["n_heads"], -1)
            kv_heads = heads if sizes["n_kv_heads"] is None else _int_or(sizes["n_kv_heads"], -1)
            problems += _head_problems(_int_or(sizes["dim"], -1), "dim", heads, "n_heads", kv_heads, "n_kv_heads")
        if problems:
            raise ValueError(f"Llama2Config.from_meta: unsupported params.json: {'; '.join(problems)}")
        vocab = _int_or(params.get("vocab_size", -1), -1)
        vocab = vocab if vocab > 0 else vocab_size
        if not vocab or vocab <= 0:
            raise ValueError(
                "Llama2Config.from_meta: argument 'vocab_size' is needed because params.json has vocab_size "
                f"{params.get('vocab_size')!r}; got {vocab_size!r}"
            )
        unsupported = [f"'{key}' must be absent, got {params[key]!r}" for key in ("rope_scaling", "moe") if params.get(key)]
        if params.get("use_scaled_rope"):  # Llama 3.1's long-context RoPE, not implemented here
            unsupported.insert(0, f"'use_scaled_rope' must be false or absent, got {params['use_scaled_rope']!r}")
        if unsupported:
            raise ValueError(f"Llama2Config.from_meta: unsupported params.json: {'; '.join(unsupported)}")
        dim, heads, multiple_of = (_int_or(sizes[key], -1) for key in ("dim", "n_heads", "multiple_of"))
        # Meta's FeedForward sizing (llama/model.py), which yields 11008 / 13824 / 28672.
        hidden = _meta_ffn_base(dim)
        if numbers["ffn_dim_multiplier"] is not None:
            scaled = numbers["ffn_dim_multiplier"] * hidden
            hidden = int(scaled) if scaled <= MAX_WIDTH else MAX_WIDTH + 1  # (a float past int's: inf)
        hidden = multiple_of * ((hidden + multiple_of - 1) // multiple_of)
        if hidden > MAX_WIDTH:
            given = f"'dim' {dim}" + (f", 'ffn_dim_multiplier' {numbers['ffn_dim_multiplier']!r:.50}"
                                      if numbers["ffn_dim_multiplier"] is not None else "")
            raise ValueError(f"Llama2Config.from_meta: unsupported params.json: {given} and 'multiple_of' {multiple_of} give an "
                             f"FFN width (Meta's rule) above {MAX_WIDTH}")
        rope_base = float(numbers["rope_theta"])
        return cls(
            vocab_size=vocab,
            num_layers=_int_or(sizes["n_layers"], -1),
            num_heads=heads,
            num_kv_heads=_int_or(sizes["n_kv_heads"], -1) if sizes["n_kv_heads"] is not None else heads,
            embed_dim=dim,
            intermediate_dim=hidden,
            max_seq_len=max_seq_len or (16_384 if rope_base > 10_000.0 else 4096),
            norm_eps=numbers["norm_eps"],
            rope_base=rope_base,
        )

    def to_meta(self) -> dict[str, Any]:
        """Meta's ``params.json`` for this architecture, which ``from_meta`` reads back to it
        (``max_seq_len`` aside: Meta does not record it). Fields Llama-2's own params.json lacks
        are written only where needed (``n_kv_heads`` with GQA, ``rope_theta`` other than 10000),
        and ``vocab_size`` is the model's, not -1. The FFN width is spelled in Meta's sizing rule
        (``from_meta``): ``multiple_of`` 256 where that gives it (7B, 13B), else
        ``ffn_dim_multiplier`` 1.3 with ``multiple_of`` 4096 (70B), else ``multiple_of`` equal to
        the width, or, for a width below 8/3 of ``dim``, a multiplier that gives it.
        """
        params: dict[str, Any] = {"dim": self.embed_dim, "n_layers": self.num_layers, "n_heads": self.num_heads}
        if self.num_kv_heads != self.num_heads:
            params["n_kv_heads"] = self.num_kv_heads
        params.update(vocab_size=self.vocab_size, norm_eps=self.norm_eps)
        if self.rope_base != 10_000.0:
            params["rope_theta"] = self.rope_base
        base = _meta_ffn_base(self.embed_dim)
        spellings = [{"multiple_of": 256}, {"ffn_dim_multiplier": 1.3, "multiple_of": 4096}]
        if self.intermediate_dim >= base:
            spellings.append({"multiple_of": self.intermediate_dim})
        spellings.append({"ffn_dim_multiplier": (self.intermediate_dim + 0.5) / base, "multiple_of": 1})
        for spelling in spellings:
            if Llama2Config.from_meta({**params, **spelling}, max_seq_len=self.max_seq_len) == self:
                return {**params, **spelling}
        raise ValueError(f"Llama2Config.to_meta: no params.json spelling gives intermediate_dim {self.intermediate_dim} for dim {self.embed_dim}")

    # -- a built model ----------------------------------------------------------------------------

    @classmethod
    def from_model(cls, model: nn.Module) -> Llama2Config:
        """The architecture of a ``TransformerDecoder`` built by the llama2 builders.

        Raises:
            TypeError: ``model`` lacks the attributes of such a decoder.
        """
        try:
            attn = model.layers[0].attn
            w1 = model.layers[0].mlp.w1
            return cls(
                vocab_size=model.tok_embeddings.num_embeddings,
                num_layers=len(model.layers),
                num_heads=attn.num_heads,
                num_kv_heads=attn.num_kv_heads,
                embed_dim=model.tok_embeddings.embedding_dim,
                intermediate_dim=w1.out_features if isinstance(w1, nn.Linear) else w1.out_dim,
                max_seq_len=model.max_seq_len,
                norm_eps=model.norm.eps,
                rope_base=float(attn.pos_embeddings.base),
            )
        except (AttributeError, IndexError, TypeError) as e:
            raise TypeError(
                f"Llama2Config.from_model: argument 'model' must be a Llama-2 TransformerDecoder; got "
                f"{type(model).__name__} ({e})"
            ) from None

    def differences(self, other: Llama2Config, *, ignore: tuple[str, ...] = ("max_seq_len",)) -> list[str]:
        """``"field: self=... other=..."`` for every field that differs (``ignore`` aside)."""
        out = []
        for field in dataclasses.fields(self):
            a, b = getattr(self, field.name), getattr(other, field.name)
            if field.name not in ignore and a != b:
                out.append(f"{field.name}: {a!r} vs {b!r}")
        return out


def _head_problems(dim: int, dim_key: str, heads: int, heads_key: str, kv_heads: int, kv_heads_key: str) -> list[str]:
    """What the llama2 builders would refuse in these positive head counts, by the file's names:
    the width split evenly into heads of an even size (RoPE rotates pairs), the heads into groups
    of one key/value head each."""
    problems = []
    if dim % heads:
        problems.append(f"'{dim_key}' must be a multiple of '{heads_key}' ({heads}), got {dim}")
    elif (dim // heads) % 2:
        problems.append(f"'{dim_key}' / '{heads_key}' (the head size, rotated in pairs by RoPE) must be even, got {dim} / {heads} = {dim // heads}")
    if heads % kv_heads:
        problems.append(f"'{kv_heads_key}' must divide '{heads_key}' ({heads}), got {kv_heads}")
    return problems


def _positive_number_problem(key: str, value: Any) -> str | None:
    """What is wrong with ``value`` as a positive, finite number read as a float, if anything."""
    if is_finite_real(value) and value > 0:
        return None
    if is_int(value) and value > 0:  # past float's range: float() would overflow
        return f"'{key}' must be a positive number within float's range (about 1.8e308), got an integer of {value.bit_length()} bits"
    return f"'{key}' must be a positive number, got {value!r:.50}"


def _meta_ffn_base(dim: int) -> int:
    """Meta's FFN width before ffn_dim_multiplier and multiple_of: 2/3 of 4 * dim."""
    return int(2 * (4 * dim) / 3)


def _int_or(value: Any, default: int) -> int:
    """``value`` as an int where it is one (an integral float too, not a bool), else ``default``."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def refuse_special_file(path: str | os.PathLike, what: str) -> None:
    """Raises ValueError where ``path`` is a pipe, socket or device: reading one could block forever."""
    if os.path.exists(path) and not (os.path.isfile(path) or os.path.isdir(path)):
        raise ValueError(f"{os.fspath(path)} cannot be read as {what}: it is not a regular file (a pipe, socket or device)")


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    """A JSON object file (config.json, params.json, an index).

    Raises:
        FileNotFoundError: there is no such file.
        ValueError: a folder or an unreadable file, not valid UTF-8 JSON, or not an object; the
            message names the file.
    """
    refuse_special_file(path, "a JSON file")
    try:
        f = open(path, encoding="utf-8")
    except (IsADirectoryError, PermissionError) as e:
        raise ValueError(f"{os.fspath(path)} cannot be read as a JSON file: {e.strerror}") from None
    except ValueError as e:  # (a path with a NUL character)
        raise ValueError(f"{os.fspath(path)!r} cannot be opened: {e}") from None
    with f:
        try:
            value = json.load(f)
        except (ValueError, RecursionError) as e:
            raise ValueError(f"{os.fspath(path)} is not valid JSON: {parse_error_text(e)}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{os.fspath(path)} must hold a JSON object; got {type(value).__name__}")
    return value


def write_json(path: str | os.PathLike, data: dict[str, Any]) -> None:
    """A JSON file as transformers and PEFT write theirs: indented, keys sorted, a final newline
    (the caller makes the write atomic: ``StagedFiles``)."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
