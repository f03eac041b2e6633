"""Rewrites the results section of bench/README.md from the JSON files under bench/results/.

The section lies between two marker lines; everything outside them is left as it is. Nothing in
it is typed by hand: ``python -m bench readme`` (or any run with ``--update-readme``) renders it
from the stored results, one subsection per machine, one table per benchmark.
"""

from __future__ import annotations

import json
from pathlib import Path

from bench import registry
from bench.report import render_markdown, validate

BEGIN = "<!-- bench-results:begin"
END = "<!-- bench-results:end -->"
BEGIN_LINE = f"{BEGIN} (written by `python -m bench readme` from bench/results/; do not edit by hand) -->"
SKIP_DIRS = {"tmp"}  # scratch results (.gitignore'd), e.g. smoke runs


def _order(path: Path) -> tuple[int, str]:
    names = list(registry.BENCHMARKS)
    return (names.index(path.stem) if path.stem in names else len(names), path.stem)


def render_results(results_dir: Path) -> str:
    """Markdown for every ``<results_dir>/<machine>/<benchmark>.json``."""
    parts = []
    machines = sorted(p for p in results_dir.iterdir() if p.is_dir() and p.name not in SKIP_DIRS) if results_dir.is_dir() else []
    for machine_dir in machines:
        files = sorted(machine_dir.glob("*.json"), key=_order)
        if not files:
            continue
        parts.append(f"### {machine_dir.name}\n")
        for path in files:
            parts.append(f"#### {path.stem}\n")
            try:
                result = json.loads(path.read_text())
                validate(result)
            except (ValueError, OSError) as e:
                parts.append(f"(unreadable result {path.relative_to(results_dir)}: {e})\n")
                continue
            parts.append(render_markdown(result))
    return "\n".join(parts) if parts else "(no results stored yet)\n"


def rewrite(readme: Path, results_dir: Path) -> bool:
    """Replaces the marked section of ``readme``; True when the file changed.

    Raises:
        ValueError: the markers are missing or out of order.
    """
    text = readme.read_text()
    begin = text.find(BEGIN)
    end = text.find(END)
    if begin < 0 or end < 0 or end < begin:
        raise ValueError(f"{readme}: needs a line starting with '{BEGIN}' and a later line '{END}' around the results section")
    new = text[:begin] + BEGIN_LINE + "\n\n" + render_results(results_dir) + "\n" + text[end:]
    if new == text:
        return False
    readme.write_text(new)
    return True
