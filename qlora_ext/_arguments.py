"""Predicates for argument checks: what counts as an integer or a finite number (Python's and
numpy's; never a bool, which Python counts as an int); and why a JSON or YAML text did not parse.
The callers raise their own errors, naming the argument, the rule and the value."""

from __future__ import annotations

import math
import numbers


def is_int(value: object) -> bool:
    """An integral number (int, numpy integer), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def lone_surrogate_at(text: str) -> int | None:
    """The index of the first lone surrogate in ``text`` (U+D800..U+DFFF: bytes that were not UTF-8,
    decoded with ``errors="surrogateescape"``, or a ``\\ud800`` JSON escape without its pair), or
    None for Unicode text that every encoder (UTF-8, SentencePiece) takes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return e.start
    return None


def is_finite_real(value: object) -> bool:
    """A real number (int, float, numpy scalar) that is neither a bool, NaN nor infinite, nor an
    int too large for a float (one that float arithmetic would overflow on)."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond float's range (a 400-digit one)
        return False


def parse_error_text(error: Exception) -> str:
    """Why ``json.load`` or ``yaml.safe_load`` failed, for a message: its own error (invalid JSON or
    UTF-8; a number of over 4300 digits, less Python's advice to raise that limit, which is no
    reader's to take), or, for a RecursionError, the nesting."""
    if isinstance(error, RecursionError):
        return "it nests its values too deeply to read"
    return str(error).split("; use sys.set_int_max_str_digits()")[0]
