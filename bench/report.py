"""A benchmark's result: rows of measurements and speed targets, as JSON and as a table.

The table (plain text on the terminal, Markdown in bench/README.md) is always rendered from the
JSON form, so what is printed, stored and published is one and the same.

In a table, rows are grouped by what they compute (e.g. "fwd 4096x4096 M=1 bf16"); the row of
our implementation is the group's reference, and every other row shows its time as a multiple of
ours ("vs ours": 3.00x means three times as slow as ours). "floor" is the time the bytes the row
must move would take at the memory bandwidth measured in the same run.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

# The packages compared against, whose versions a result records (``software``, None: not installed).
ALTERNATIVE_PACKAGES = ("bitsandbytes", "torchao", "transformers", "peft", "torchtune")

SCHEMA_VERSION = 1
REFERENCE_IMPL = "ours"

# Keys every result carries, and their types: the tests check results against this.
RESULT_KEYS = {
    "schema": int,
    "benchmark": str,
    "date": str,
    "git_revision": str,
    "device": str,
    "mode": str,
    "duration_s": float,
    "load_avg_1m": list,
    "machine": dict,
    "software": dict,
    "memory_bandwidth": dict,
    "ring_bytes": int,
    "rows": list,
    "targets": list,
    "skipped": list,
    "notes": list,
}
ROW_KEYS = {"group", "impl", "dtype", "median_ms", "min_ms", "q1_ms", "q3_ms", "reps", "bytes_moved", "flops", "floor_ms", "params"}
TARGET_KEYS = {"name", "value", "limit", "sense", "unit", "met", "note"}


@dataclass
class Row:
    """One measurement: ``impl`` computing ``group`` (times in milliseconds)."""

    group: str
    impl: str
    dtype: str
    median_ms: float
    min_ms: float
    q1_ms: float
    q3_ms: float
    reps: int
    bytes_moved: int | None = None  # bytes the op must read + write at the least
    flops: int | None = None
    floor_ms: float | None = None  # bytes_moved at the measured memory bandwidth
    params: dict = field(default_factory=dict)


@dataclass
class Target:
    """A speed target: ``value`` compared with ``limit`` (``sense`` is "<=" or ">=")."""

    name: str
    value: float | None
    limit: float
    sense: str
    unit: str
    met: bool | None  # None: not evaluated (see note)
    note: str = ""

    @classmethod
    def check(cls, name: str, value: float | None, sense: str, limit: float, unit: str, missing: str = "") -> Target:
        if sense not in ("<=", ">="):
            raise ValueError(f"Target.check: argument 'sense' must be '<=' or '>='; got {sense!r}")
        if value is None:
            return cls(name, None, limit, sense, unit, None, missing or "not measured in this run")
        met = value <= limit if sense == "<=" else value >= limit
        return cls(name, value, limit, sense, unit, met)


@dataclass
class Report:
    """What a benchmark's ``run(ctx)`` returns."""

    rows: list[Row] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)  # {"impl": ..., "reason": ...}
    notes: list[str] = field(default_factory=list)
    script: dict | None = None  # a plain-script benchmark's output (bench/model.py)

    def find(self, group: str, impl: str) -> Row | None:
        return next((r for r in self.rows if r.group == group and r.impl == impl), None)

    def median_ms(self, group: str, impl: str) -> float | None:
        row = self.find(group, impl)
        return row.median_ms if row else None

    def skip(self, impl: str, reason: str) -> None:
        if not any(s["impl"] == impl for s in self.skipped):
            self.skipped.append({"impl": impl, "reason": reason})

    def missing_reason(self, impl: str) -> str:
        for s in self.skipped:
            if s["impl"] == impl:
                return f"{impl} skipped: {s['reason']}"
        return f"{impl} not measured in this run"

    def to_dict(self) -> dict:
        return {
            "rows": [asdict(r) for r in self.rows],
            "targets": [asdict(t) for t in self.targets],
            "skipped": list(self.skipped),
            "notes": list(self.notes),
            **({"script": self.script} if self.script is not None else {}),
        }


def validate(result: dict) -> None:
    """Raises ValueError naming the first key of a result that is missing or of the wrong type."""
    if not isinstance(result, dict):
        raise ValueError(f"benchmark result: must be a JSON object; got {type(result).__name__}")
    for key, kind in RESULT_KEYS.items():
        if key not in result:
            raise ValueError(f"benchmark result: key '{key}' is missing")
        if not isinstance(result[key], kind) and not (kind is float and isinstance(result[key], int)):
            raise ValueError(f"benchmark result: key '{key}' must be {kind.__name__}; got {type(result[key]).__name__}")
    if result["schema"] != SCHEMA_VERSION:
        raise ValueError(f"benchmark result: schema {SCHEMA_VERSION} expected; got {result['schema']}")
    for i, row in enumerate(result["rows"]):
        if set(row) != ROW_KEYS:
            raise ValueError(f"benchmark result: rows[{i}] must have keys {sorted(ROW_KEYS)}; got {sorted(row)}")
    for i, target in enumerate(result["targets"]):
        if set(target) != TARGET_KEYS:
            raise ValueError(f"benchmark result: targets[{i}] must have keys {sorted(TARGET_KEYS)}; got {sorted(target)}")


# -- rendering ---------------------------------------------------------------------------------

COLUMNS = ("impl", "median ms", "iqr", "vs ours", "floor ms", "vs floor", "rate")


def _ms(v: float | None) -> str:
    if v is None:
        return "-"
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    if v >= 1:
        return f"{v:.2f}"
    return f"{v:.3g}"


def _times(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _rate(row: dict) -> str:
    if row["median_ms"] <= 0:
        return "-"
    if row["flops"]:
        return f"{row['flops'] / (row['median_ms'] * 1e-3) / 1e12:.3g} TFLOP/s"
    if row["bytes_moved"]:
        return f"{row['bytes_moved'] / (row['median_ms'] * 1e-3) / 1e9:.3g} GB/s"
    return "-"


def table_rows(result: dict) -> list[tuple[str, list[list[str]]]]:
    """[(group, [cells per row])] in the order the groups first appear."""
    groups: dict[str, list[dict]] = {}
    for row in result["rows"]:
        groups.setdefault(row["group"], []).append(row)
    out = []
    for group, rows in groups.items():
        ref = next((r for r in rows if r["impl"] == REFERENCE_IMPL), None)
        cells = []
        for r in rows:
            vs_ours = r["median_ms"] / ref["median_ms"] if ref and ref["median_ms"] > 0 else None
            vs_floor = r["median_ms"] / r["floor_ms"] if r["floor_ms"] else None
            spread = (r["q3_ms"] - r["q1_ms"]) / r["median_ms"] if r["median_ms"] > 0 else 0.0
            cells.append([r["impl"], _ms(r["median_ms"]), f"{100 * spread:.0f}%", _times(vs_ours), _ms(r["floor_ms"]), _times(vs_floor), _rate(r)])
        out.append((group, cells))
    return out


def target_lines(result: dict) -> list[str]:
    lines = []
    for t in result["targets"]:
        status = {True: "MET", False: "MISSED", None: "n/a"}[t["met"]]
        if t["value"] is None:
            lines.append(f"[{status}] {t['name']}: {t['note']}")
            continue
        line = f"[{status}] {t['name']}: {t['value']:.3g}{t['unit']} (target {t['sense']} {t['limit']:g}{t['unit']})"
        lines.append(line + (f"; {t['note']}" if t["note"] else ""))
    return lines


def header_line(result: dict) -> str:
    m, s = result["machine"], result["software"]
    where = m["gpu"]["name"] if m.get("gpu") else f"{m['cpu']}, {m['cpu_cores']} cores"
    bw = result["memory_bandwidth"].get("bytes_per_s")
    bw_text = f"{bw / 1e9:.1f} GB/s" if bw else "not measured"
    alternatives = [f"{name} {s[name]}" for name in ALTERNATIVE_PACKAGES if s.get(name)]
    return (
        f"{result['benchmark']} on {result['device']} ({where}); {result['mode']} run of {result['date']}; "
        f"torch {s['torch']}, CPU kernels {s['cpu_kernel_isa']}{' with bf16 BLAS tiles' if s.get('cpu_bf16_gemm') else ''}, git {short_revision(result['git_revision'])}; "
        + (f"installed: {', '.join(alternatives)}; " if alternatives else "") +
        f"copy bandwidth {bw_text}" + (", load average {:.1f} -> {:.1f}".format(*result["load_avg_1m"]) if "load_avg_1m" in result else "")
    )


def short_revision(revision: str) -> str:
    head, dirty, _ = revision.partition("+dirty")
    return head[:12] + dirty if re.fullmatch(r"[0-9a-f]{40}", head) else revision


def render_text(result: dict) -> str:
    """The terminal table."""
    widths = [28, 10, 5, 8, 9, 9, 16]
    fmt = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    lines = [header_line(result), ""]
    for group, rows in table_rows(result):
        lines.append(group)
        lines.append("  " + fmt(list(COLUMNS)))
        lines.extend("  " + fmt(cells) for cells in rows)
        lines.append("")
    for s in result["skipped"]:
        lines.append(f"skipped {s['impl']}: {s['reason']}")
    lines.extend(f"note: {n}" for n in result["notes"])
    lines.extend(target_lines(result))
    if result.get("script"):
        lines += ["", f"output of {result['script']['command']}:", result["script"]["stdout"].rstrip()]
    return "\n".join(lines).rstrip() + "\n"


def render_markdown(result: dict) -> str:
    """The same, as Markdown for bench/README.md: one table, the group in the first column."""
    lines = [header_line(result) + ".", ""]
    if result["rows"]:
        lines += ["| case | " + " | ".join(COLUMNS) + " |", "|" + "---|" * (len(COLUMNS) + 1)]
    for group, rows in table_rows(result):
        for i, cells in enumerate(rows):
            lines.append(f"| {group if i == 0 else ''} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.extend(f"- skipped {s['impl']}: {s['reason']}" for s in result["skipped"])
    lines.extend(f"- note: {n}" for n in result["notes"])
    lines.extend(f"- {line}" for line in target_lines(result))
    if result.get("script"):
        lines += ["", f"Output of `{result['script']['command']}`:", "", "```", result["script"]["stdout"].rstrip(), "```"]
    return "\n".join(lines).rstrip() + "\n"
