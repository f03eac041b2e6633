"""Configs: a YAML file (a bundled name or a path) plus ``key=value`` overrides, checked against
``config_schema.SCHEMA`` and completed with its defaults.

    cfg = load_config("tiny_qlora", ["model.lora_rank=16", "compile=True"])
    cfg.model.lora_rank          # 16
    print(cfg.to_yaml())         # the resolved config, every key

Every mistake raises ``ConfigError`` with the key, the rule and the value (and the valid choices).
"""

from __future__ import annotations

import difflib
import math
import os
import re
from pathlib import Path
from typing import Any

import yaml

from qlora_ext._arguments import parse_error_text
from qlora_ext.training.config_schema import ARCH_KEYS, GENERIC_BUILDERS, REQUIRED, SCHEMA, Opt
from qlora_ext.training.interpolation import InterpolationError, resolve_interpolations
from qlora_ext.training.torchtune_config import TorchtuneConfigError, is_torchtune_config, launch_recipe, our_override_for, translate

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"

# Override keys in torchtune's spelling (the seed tutorial's) that ours names differently.
KEY_ALIASES = {"tokenizer_checkpoint": "tokenizer.path"}


class ConfigError(ValueError):
    """A config file, key or value the trainer cannot use."""


class Config:
    """A resolved config section: attribute access to its keys (sections are Configs too)."""

    def __init__(self, values: dict[str, Any]):
        object.__setattr__(self, "_values", {k: Config(v) if isinstance(v, dict) else v for k, v in values.items()})

    def __getattr__(self, name: str) -> Any:
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(f"config has no key '{name}'; keys: {', '.join(self._values)}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("a resolved Config is read-only; pass overrides to load_config instead")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Config) and self.to_dict() == other.to_dict()

    def to_dict(self) -> dict[str, Any]:
        return {k: v.to_dict() if isinstance(v, Config) else v for k, v in self._values.items()}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)


def available_configs() -> list[str]:
    """Names of the configs shipped in ``qlora_ext/configs``."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def load_config(name_or_path: str, overrides: list[str] | tuple[str, ...] = (), notes: list[str] | None = None) -> Config:
    """Reads a bundled config by name (or a YAML file by path), applies overrides, validates.

    Args:
        name_or_path: a name from ``available_configs()`` (or torchtune's spelling of it,
            ``llama2/7B_qlora_single_device``) or the path of a YAML file, ours or a torchtune
            recipe config (``_component_`` sections, read by ``torchtune_config``).
        overrides: ``"dotted.key=value"`` strings; values are parsed as YAML (``16``, ``True``,
            ``null``, ``[q_proj,v_proj]``), except that string and path keys take the text as
            written, less one pair of quotes around it all (``parse_value``); later ones win. The seed tutorial's
            ``tokenizer_checkpoint=PATH`` sets ``tokenizer.path`` (``KEY_ALIASES``). On a
            torchtune config they use its keys, as ``tune run`` would, before it is translated.
        notes: if given, gets a line for each torchtune setting that is read differently here,
            and for a legal setting under which training changes nothing (``model.lora_alpha=0``).

    Raises:
        ConfigError: unknown config name, unreadable YAML, unknown key, bad value.
    """
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        # torchtune's names work too: llama2/7B_qlora_single_device -> llama2_7b_qlora_single_device,
        # and the short 7B_qlora_single_device of its config comments
        name = name_or_path.replace("/", "_").lower()
        candidates = [CONFIG_DIR / f"{n}.yaml" for n in (name, f"llama2_{name}")]
        bundled = next((c for c in candidates if c.is_file()), None)
        if bundled is None:
            raise ConfigError(
                f"--config: '{name_or_path}' is neither a file nor a bundled config; "
                f"bundled configs: {', '.join(available_configs())}"
            )
        path = bundled
    try:
        text = path.read_text(encoding="utf-8")
        raw = yaml.load(text, Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"--config: {path} is not valid YAML: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--config: {path} cannot be read as UTF-8 YAML text: {e}") from None
    except (ValueError, RecursionError) as e:  # an integer of over 4300 digits; nesting
        raise ConfigError(f"--config: {path} cannot be read: {parse_error_text(e)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"--config: {path} must hold a mapping of keys to values; got {type(raw).__name__}")
    if is_torchtune_config(raw):
        for override in overrides:
            _set_raw(raw, override)
        try:
            raw, torchtune_notes = translate(resolve_interpolations(raw), launched_by=launch_recipe(text))
        except (InterpolationError, TorchtuneConfigError) as e:
            raise ConfigError(f"--config: {path} (a torchtune config): {e}") from None
        except RecursionError:
            raise ConfigError(f"--config: {path} (a torchtune config): its interpolations chain too deeply") from None
        if notes is not None:
            notes.extend(torchtune_notes)
        _check_known_keys(raw, SCHEMA, prefix="", where=f"in {path} or its overrides (read as a torchtune config)")
    else:
        _check_known_keys(raw, SCHEMA, prefix="", where=f"in {path}")
        for override in overrides:
            _apply_override(raw, override)
        try:  # ${output_dir}/logs and the like, as in torchtune configs
            raw = resolve_interpolations(raw, defaults=_defaults(SCHEMA))
        except InterpolationError as e:
            raise ConfigError(f"--config: {path} or its overrides: {e}") from None
        except RecursionError:
            raise ConfigError(f"--config: {path} or its overrides: its interpolations chain too deeply") from None
    values = _resolve(raw, SCHEMA, prefix="")
    _check_cross_keys(values)
    if notes is not None and values["model"]["lora_alpha"] == 0:
        notes.append("model.lora_alpha=0 scales every adapter's output by 0 (scale = alpha / rank): training will not "
                     "change what the model computes")
    if notes is not None and values["clip_grad_norm"] == 0:  # (torch clips to norm 0; HF's Trainer reads 0 as no clipping)
        notes.append("clip_grad_norm=0 clips every gradient to zero: training will not change what the model computes "
                     "(clip_grad_norm=null turns clipping off)")
    return Config(values)


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load's loader, refusing a key given twice in one mapping (the later one would
    silently replace the earlier, a whole section included), as torchtune's loader (OmegaConf) does;
    keys a ``<<`` merge brings in may be overridden, as YAML intends. Dates stay text (below)."""

    def construct_mapping(self, node, deep=False):  # noqa: ANN001
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, Any] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=deep)
                try:
                    if key in seen:
                        raise yaml.constructor.ConstructorError(
                            "while reading a mapping", node.start_mark, f"found the key {key!r} twice (first on line {seen[key].line + 1})",
                            key_node.start_mark)
                    seen[key] = key_node.start_mark
                except TypeError:  # an unhashable key: the base class names it
                    pass
        return super().construct_mapping(node, deep=deep)


# A date-like value (2024-06-01, a folder's name) is text, as OmegaConf, torchtune's config loader, reads it;
# YAML 1.1 would make it a datetime.date, which no key takes (and 2024-13-45 an error naming no key).
_UniqueKeyLoader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def parse_override(text: str, kind: str | None = None) -> tuple[str, Any]:
    """``"a.b=value"`` -> ``("a.b", parsed value)``; see ``parse_value`` for ``kind``."""
    key, value = _split_override(text)
    return key, parse_value(value, kind)


def parse_value(text: str, kind: str | None = None, nullable: bool = True) -> Any:
    """An override's value: parsed as YAML (``16``, ``true``, ``[q_proj,v_proj]``), except for a key
    of schema kind ``str`` or ``path``, and ``path|list[path]`` unless written as a ``[...]`` list,
    whose value is the text as written (YAML would cut ``/runs/a #2`` at `` #``), less one pair of quotes around it all (``output_dir="runs/x"``
    written in a list of arguments, as OmegaConf, and so ``tune run``, reads it). Empty, ``null``
    or ``~`` is null for every kind, and Python's ``None`` (or ``none``) too, except for a string
    or path key that may not be null (``output_dir=none`` is a folder). For an int or float key,
    digits are read in base 10 (YAML 1.1 reads ``010`` as 8), and YAML's other integer forms
    (``0x10``, ``0b11``, ``1:30``) and base-60 floats (``1:30.0``) are left as text, which the key's
    type check refuses."""
    if text.strip() in ("", "null", "Null", "NULL", "~"):
        return None
    if text.strip() in ("None", "none") and (nullable or kind not in ("str", "path", "path|list[path]")):
        return None
    if kind in ("str", "path") or (kind == "path|list[path]" and not text.lstrip().startswith("[")):
        quoted = text.strip()
        if len(quoted) >= 2 and quoted[0] == quoted[-1] and quoted[0] in "'\"" and quoted[0] not in quoted[1:-1]:
            return quoted[1:-1]
        return text
    if kind in ("int", "float") and re.fullmatch(r"\s*[+-]?\d[\d_]*\s*", text):
        return int(text.replace("_", ""))  # in base 10 (1_000 too): YAML 1.1 reads 010 as 8
    try:
        value = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError:
        return text
    if kind in ("int", "float") and isinstance(value, int) and not isinstance(value, bool):
        return text  # 0b11, 0x1f, 1:30 (base 60): YAML's other integer forms, named by the type check
    if kind == "float" and isinstance(value, float) and ":" in text:
        return text  # 1:30.0, YAML 1.1's base-60 float (90.0)
    return value


def _split_override(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    key = key.strip().removeprefix("--")
    if key.startswith("~"):
        raise ConfigError(f"override '{text}': '~key' (torchtune's deletion of a key) applies to torchtune config files; "
                          "in this one set the key to a value instead (null where it may be null)")
    if not sep and "." not in key and (key in ("tune", "run") or key.endswith(("_single_device", "_distributed"))):
        # `tune run lora_finetune_single_device --config ...` with only `tune` replaced
        raise ConfigError(f"'{text}' is a word of torchtune's command line: python -m qlora_ext.finetune stands for "
                          "`tune run RECIPE` as a whole; drop it (python -m qlora_ext.finetune --config NAME key=value ...)")
    if not sep or not key:
        raise ConfigError(f"override '{text}': must have the form key=value (e.g. model.lora_rank=16)")
    return key, value


def _override_value(text: str, value: str, opt: Any) -> Any:
    """``parse_value`` of an override's value, for a key of schema entry ``opt`` (or of none)."""
    try:
        return parse_value(value, opt.kind, opt.nullable) if isinstance(opt, Opt) else parse_value(value)
    except (RecursionError, ValueError) as e:  # ([[[[... thousands deep; an integer of over 4300 digits)
        raise ConfigError(f"override '{text:.80}': its value cannot be read: {parse_error_text(e)}") from None


def _apply_override(raw: dict, text: str) -> None:
    key, value = _split_override(text)
    key = KEY_ALIASES.get(key, key)
    parts = key.split(".")
    node, schema = raw, SCHEMA
    for depth, part in enumerate(parts):
        here = ".".join(parts[: depth + 1])
        if not isinstance(schema, dict) or part not in schema:
            parent = ".".join(parts[:depth])
            raise ConfigError(_unknown_key_message(here, schema, parent, where=f"in override '{text}'") + _torchtune_hint(key, value))
        if depth == len(parts) - 1:
            if isinstance(schema[part], dict):
                raise ConfigError(
                    f"override '{text}': '{here}' is a section; set one of its keys: "
                    f"{', '.join(f'{here}.{k}' for k in schema[part])}{_torchtune_hint(key, value)}"
                )
            node[part] = _override_value(text, value, schema[part])
        else:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{text}': '{here}' in the config file is not a section")
            schema = schema[part]


def _torchtune_hint(key: str, value: str) -> str:
    """The override to give instead of one in torchtune's keys, this config being in ours."""
    ours = our_override_for(key, value)
    return f" (that is torchtune's key, and this config is in this trainer's keys: {ours})" if ours else ""


def _set_raw(raw: dict, text: str) -> None:
    """An override set with no schema to check it against yet (a torchtune config's keys), as
    ``tune run`` sets it: ``~key`` deletes a key, ``section=COMPONENT`` sets a section's
    ``_component_``, and ``max_filename`` keeps its leading zeros; a value for a key our schema
    has too is read as that key's kind (a path as written, not cut at `` #``)."""
    if text.strip().startswith("~"):
        _delete_raw(raw, text)
        return
    key, value = _split_override(text)
    parts = KEY_ALIASES.get(key, key).split(".")
    opt: Any = SCHEMA
    for part in parts:
        opt = opt.get(part) if isinstance(opt, dict) else None
    if parts[-1] == "max_filename":  # "00002": YAML would read 2 (and 00010 as 8)
        value = value.strip()
    else:
        value = _override_value(text, value, opt)
    node = raw
    for depth, part in enumerate(parts[:-1]):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{text}': '{'.'.join(parts[: depth + 1])}' in the config file is not a section")
    if isinstance(node.get(parts[-1]), dict) and "_component_" in node[parts[-1]]:
        node[parts[-1]]["_component_"] = value
    else:
        node[parts[-1]] = value


def _delete_raw(raw: dict, text: str) -> None:
    """torchtune's ``~dotted.key``: the key leaves the config (a component may not)."""
    dotted = text.strip()[1:].partition("=")[0].strip()
    parts, node = dotted.split("."), raw
    for part in parts[:-1]:
        node = node.get(part) if isinstance(node, dict) else None
    if not isinstance(node, dict) or parts[-1] not in node:
        raise ConfigError(f"override '{text}': the config has no key '{dotted}' to remove")
    if parts[-1] == "_component_" or (isinstance(node[parts[-1]], dict) and "_component_" in node[parts[-1]]):
        raise ConfigError(f"override '{text}': a component cannot be removed (as with tune run); override it with another")
    del node[parts[-1]]


def _unknown_key_message(key: str, schema: Any, parent: str, where: str) -> str:
    if not isinstance(schema, dict):
        return f"unknown config key '{key}' {where}: '{parent}' is a value, not a section"
    name = key.rsplit(".", 1)[-1]
    valid = ", ".join(schema)
    hint = difflib.get_close_matches(name, list(schema), n=1)
    hint_text = f"; did you mean '{(parent + '.') if parent else ''}{hint[0]}'?" if hint else ""
    nested = [f"{section}.{name}" for section, keys in schema.items() if isinstance(keys, dict) and name in keys]
    if nested and not parent:  # lr for optimizer.lr, lora_rank for model.lora_rank; an exact section key
        # beats difflib's near top-level key (num_heads is model.num_heads, not num_threads)
        hint_text = f"; did you mean {' or '.join(repr(k) for k in nested)}?"
    if name == "_component_":  # a torchtune spelling on one of our configs
        hint_text = (
            "; this config has qlora_ext's keys, not torchtune's _component_ (a torchtune recipe config file given with "
            f"--config takes its _component_ sections){'; a metric logger is chosen with metric_logger.type' if parent == 'metric_logger' else ''}"
        )
    return f"unknown config key '{key}' {where}{hint_text} (valid keys{' under ' + repr(parent) if parent else ''}: {valid})"


def _check_known_keys(raw: dict, schema: dict, prefix: str, where: str) -> None:
    for key, value in raw.items():
        full = f"{prefix}{key}"
        if key not in schema:
            raise ConfigError(_unknown_key_message(full, schema, prefix.rstrip("."), where))
        if isinstance(schema[key], dict):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{full}' {where} must be a section (a mapping); got {value!r}")
            _check_known_keys(value, schema[key], f"{full}.", where)


def _defaults(schema: dict) -> dict[str, Any]:
    """The schema's default values, nested as the config is (required keys left out)."""
    out: dict[str, Any] = {}
    for key, spec in schema.items():
        if isinstance(spec, dict):
            out[key] = _defaults(spec)
        elif spec.default is not REQUIRED:
            out[key] = spec.default
    return out


def _resolve(raw: dict, schema: dict, prefix: str) -> dict[str, Any]:
    out = {}
    for key, spec in schema.items():
        full = f"{prefix}{key}"
        if isinstance(spec, dict):
            out[key] = _resolve(raw.get(key) or {}, spec, f"{full}.")
        elif key in raw:
            out[key] = _check_value(full, spec, raw[key])
        elif spec.default is REQUIRED:
            raise ConfigError(f"config key '{full}' is required ({spec.doc}); set it with {full}=...")
        else:
            out[key] = spec.default
    return out


def _check_value(key: str, spec: Opt, value: Any) -> Any:
    if value is None:
        if spec.nullable:
            return None
        raise ConfigError(f"config key '{key}' must not be null ({spec.doc})")
    kind = spec.kind
    if kind == "path|list[path]":
        kind = "list[path]"
        if isinstance(value, str):  # one path, named as given (not as element [0] of a list)
            return [_check_scalar(key, Opt("path", None, spec.doc, choices=spec.choices), value)]
    if kind.startswith("list["):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' must be a list ({spec.doc}); got {value!r}")
        element = Opt(kind[5:-1], None, spec.doc, choices=spec.choices)
        return [_check_scalar(f"{key}[{i}]", element, v) for i, v in enumerate(value)]
    return _check_scalar(key, spec, value)


def _check_scalar(key: str, spec: Opt, value: Any) -> Any:
    kind = spec.kind
    if kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}' must be true or false; got {value!r}")
    elif kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}' must be an integer ({spec.doc}); got {value!r}")
    elif kind == "float":
        # YAML 1.1 reads "3e-4" (no dot) as a string, so numeric strings are accepted here.
        given = value
        try:
            if isinstance(value, bool):
                raise ValueError
            value = float(value)
        except OverflowError:  # an int past float's range
            raise ConfigError(f"config key '{key}' must be a number within float's range (about 1.8e308) ({spec.doc}); "
                              f"got an integer of {len(str(abs(value)))} digits") from None
        except (TypeError, ValueError):
            raise ConfigError(f"config key '{key}' must be a number ({spec.doc}); got {value!r}") from None
        if not math.isfinite(value):  # NaN passes every range check below; 1e400 is given, inf is not
            raise ConfigError(f"config key '{key}' must be a finite number ({spec.doc}); got {given if isinstance(given, str) else repr(value)}")
    elif kind in ("str", "path"):
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}' must be a string ({spec.doc}); got {value!r}")
        if kind == "path" and not value.strip():  # (output_dir="" was the working directory, its step_* folders swept)
            if spec.nullable:  # as null (metric_logger.log_dir: "" always meant the default)
                return None
            raise ConfigError(f"config key '{key}' must be a path, not empty ({spec.doc}); got {value!r}")
        if kind == "path":
            value = value.replace("{assets}", str(ASSETS_DIR))
            value = os.path.expanduser(value)
    if spec.choices is not None and value not in spec.choices:
        raise ConfigError(f"config key '{key}' must be one of {', '.join(map(str, spec.choices))}; got {value!r}")
    if spec.minimum is not None and value < spec.minimum:
        raise ConfigError(f"config key '{key}' must be >= {spec.minimum} ({spec.doc}); got {value!r}")
    if spec.maximum is not None and value > spec.maximum:
        raise ConfigError(f"config key '{key}' must be <= {spec.maximum} ({spec.doc}); got {value!r}")
    return value


def _check_cross_keys(values: dict) -> None:
    model = values["model"]
    if model["builder"] not in GENERIC_BUILDERS:
        fixed = [k for k in ARCH_KEYS if model[k] is not None]
        if fixed:
            raise ConfigError(
                f"config key 'model.{fixed[0]}' can only be set with a generic builder "
                f"({', '.join(GENERIC_BUILDERS)}); model.builder={model['builder']} fixes the architecture"
            )
    if values["dataset"]["data_files"] == []:
        raise ConfigError("config key 'dataset.data_files' must name at least one JSON or JSONL file; got []")
    if values["checkpointer"]["checkpoint_files"] == []:
        raise ConfigError("config key 'checkpointer.checkpoint_files' must name at least one file, or be null (the files are then "
                          "found from the index file or the standard names); got []")
    if len(set(model["lora_attn_modules"])) != len(model["lora_attn_modules"]):
        raise ConfigError(f"config key 'model.lora_attn_modules' must not repeat a module; got {model['lora_attn_modules']}")
    if len(values["optimizer"]["betas"]) != 2 or not all(0.0 <= b < 1.0 for b in values["optimizer"]["betas"]):
        raise ConfigError(f"config key 'optimizer.betas' must be two numbers in [0, 1); got {values['optimizer']['betas']}")
