"""``${dotted.key}`` references in a config (OmegaConf's syntax, as in ``log_dir: ${output_dir}/logs``),
resolved before the values are checked: in torchtune configs and in ours alike."""

from __future__ import annotations

import re
from typing import Any

_INTERPOLATION = re.compile(r"\$\{([^}]*)\}")


class InterpolationError(ValueError):
    """A reference to a key that does not exist, to itself, or a resolver (``ConfigError`` wraps it)."""


def resolve_interpolations(raw: dict, defaults: dict | None = None) -> dict:
    """A copy with every ``${a.b}`` replaced by the value at ``a.b`` (a value that is exactly one
    interpolation keeps its type; one inside a longer string is formatted into it). A key absent
    from ``raw`` is looked up in ``defaults`` (same nesting), if given. A null value cannot be
    formatted into a longer string."""

    def lookup(key: str, chain: tuple[str, ...]) -> Any:
        if ":" in key or not key.strip():
            raise InterpolationError(
                f"interpolation '${{{key}}}': only references to other keys (${{output_dir}}) are supported, not resolvers"
            )
        if key in chain:
            raise InterpolationError(f"interpolation '${{{key}}}' refers to itself through {' -> '.join(chain + (key,))}")
        for table in (raw, defaults or {}):
            node: Any = table
            for part in key.split("."):
                if not isinstance(node, dict) or part not in node:
                    break
                node = node[part]
            else:
                return resolve(node, chain + (key,))
        raise InterpolationError(f"interpolation '${{{key}}}': the config has no key '{key}'")

    def formatted(key: str, chain: tuple[str, ...]) -> str:
        value = lookup(key, chain)
        if value is None:
            raise InterpolationError(f"interpolation '${{{key}}}': '{key}' is null, which cannot be part of a longer value")
        return str(value)

    def resolve(value: Any, chain: tuple[str, ...]) -> Any:
        if isinstance(value, dict):
            return {k: resolve(v, chain) for k, v in value.items()}
        if isinstance(value, list):
            return [resolve(v, chain) for v in value]
        if not isinstance(value, str) or "${" not in value:
            return value
        whole = _INTERPOLATION.fullmatch(value)
        if whole:
            return lookup(whole.group(1), chain)
        return _INTERPOLATION.sub(lambda m: formatted(m.group(1), chain), value)

    return resolve(raw, ())
