"""``${dotted.key}`` references in a config (OmegaConf's syntax, as in ``log_dir: ${output_dir}/logs``),
resolved before the values are checked: in torchtune configs and in ours alike."""

from __future__ import annotations

import re
from typing import Any

_INTERPOLATION = re.compile(r"\$\{([^}]*)\}")
# A value that grows past this through interpolation (keys that each repeat the one before) is a
# mistake or an attack; each key is also resolved once, whatever refers to it how often.
MAX_RESOLVED_CHARS = 1_000_000


class InterpolationError(ValueError):
    """A reference to a key that does not exist, to itself, or a resolver (``ConfigError`` wraps it)."""


def resolve_interpolations(raw: dict, defaults: dict | None = None) -> dict:
    """A copy with every ``${a.b}`` replaced by the value at ``a.b`` (a value that is exactly one
    interpolation keeps its type; one inside a longer string is formatted into it). A key absent
    from ``raw`` is looked up in ``defaults`` (same nesting), if given. A null value cannot be
    formatted into a longer string, nor can a section or a list. Values are resolved once each: a
    YAML alias used many times (shared, not copied, by the loader) is resolved once and shared.

    Raises:
        InterpolationError: a missing key, a cycle, a resolver, a section, list or null inside a
            longer string, or a string that grows past ``MAX_RESOLVED_CHARS``.
    """
    keys: dict[str, Any] = {}  # dotted key -> its resolved value
    objects: dict[int, Any] = {}  # id of a dict or list in raw -> its resolved copy (kept alive by raw)

    def lookup(key: str, chain: tuple[str, ...]) -> Any:
        if key in keys:
            return keys[key]
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
                keys[key] = resolve(node, chain + (key,))
                return keys[key]
        raise InterpolationError(f"interpolation '${{{key}}}': the config has no key '{key}'")

    def formatted(key: str, chain: tuple[str, ...]) -> str:
        value = lookup(key, chain)
        if value is None or isinstance(value, (dict, list)):
            what = "null" if value is None else f"a {'section' if isinstance(value, dict) else 'list'}"
            raise InterpolationError(f"interpolation '${{{key}}}': '{key}' is {what}, which cannot be part of a longer value")
        return str(value)

    def resolve(value: Any, chain: tuple[str, ...]) -> Any:
        if isinstance(value, (dict, list)):
            if id(value) not in objects:
                items = value.items() if isinstance(value, dict) else enumerate(value)
                resolved = {k: resolve(v, chain) for k, v in items}
                objects[id(value)] = resolved if isinstance(value, dict) else list(resolved.values())
            return objects[id(value)]
        if not isinstance(value, str) or "${" not in value:
            return value
        if any("${" in m.group(1) for m in _INTERPOLATION.finditer(value)):  # (read as a key named 'a.${b')
            raise InterpolationError(f"interpolation in {value[:80]!r}: nested references (${{a.${{b}}}}) are not supported; "
                                     "write the key out")
        whole = _INTERPOLATION.fullmatch(value)
        if whole:
            return lookup(whole.group(1), chain)
        text = _INTERPOLATION.sub(lambda m: formatted(m.group(1), chain), value)
        if len(text) > MAX_RESOLVED_CHARS:
            raise InterpolationError(f"interpolation in {value[:80]!r}: the value grows to {len(text)} characters, "
                                     f"more than {MAX_RESOLVED_CHARS}")
        return text

    return resolve(raw, ())
