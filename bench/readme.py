"""Rewrites the results section of bench/README.md, and the target lines in the top-level
README.md's status, from the JSON files under bench/results/.

The section lies between two marker lines; everything outside them is left as it is. Nothing in
it is typed by hand: ``python -m bench readme`` (or any run with ``--update-readme``) renders it
from the stored results, one subsection per machine, one table per benchmark.
"""

from __future__ import annotations

import json
from pathlib import Path

from bench import registry
from bench.files import write_text_atomic
from bench.report import short_revision, render_markdown, target_lines, validate

BEGIN = "<!-- bench-results:begin"
END = "<!-- bench-results:end -->"
BEGIN_LINE = f"{BEGIN} (written by `python -m bench readme` from bench/results/; do not edit by hand) -->"
# The top-level README's status: every target line of the stored results, per machine.
STATUS_BEGIN = "<!-- bench-status:begin"
STATUS_END = "<!-- bench-status:end -->"
STATUS_BEGIN_LINE = f"{STATUS_BEGIN} (written by `python -m bench readme` from bench/results/; do not edit by hand) -->"
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
                parts.append(render_markdown(result))
            except (ValueError, OSError, TypeError, KeyError, AttributeError) as e:  # (a file edited or damaged by hand)
                parts.append(f"(unreadable result {path.relative_to(results_dir)}: {type(e).__name__}: {e})\n")
    return "\n".join(parts) if parts else "(no results stored yet)\n"


def render_status(results_dir: Path) -> str:
    """Markdown list of every target of every stored result, per machine, with its run's date and
    revision: what the top-level README's status quotes, never typed by hand."""
    parts = []
    machines = sorted(p for p in results_dir.iterdir() if p.is_dir() and p.name not in SKIP_DIRS) if results_dir.is_dir() else []
    for machine_dir in machines:
        lines = []
        for path in sorted(machine_dir.glob("*.json"), key=_order):
            try:
                result = json.loads(path.read_text())
                validate(result)
                targets = target_lines(result)
            except (ValueError, OSError, TypeError, KeyError, AttributeError):
                continue  # render_results reports it
            if targets:
                lines.append(f"- {path.stem} ({result['mode']} run of {result['date'][:10]}, git {short_revision(result['git_revision'])}):")
                lines.extend(f"  - {line}" for line in targets)
        if lines:
            parts.append(f"On {machine_dir.name} (bench/README.md has the tables):\n\n" + "\n".join(lines) + "\n")
    return "\n".join(parts) if parts else "(no results with targets stored yet)\n"


def rewrite(readme: Path, results_dir: Path, *, status: bool = False) -> bool:
    """Replaces the marked section of ``readme``: the results (bench/README.md) or, with
    ``status``, the target lines (README.md). True when the file changed.

    Raises:
        ValueError: the markers are missing or out of order.
    """
    return rewrite_pages([(readme, status)], results_dir)[0]


def rewrite_pages(pages: list[tuple[Path, bool]], results_dir: Path) -> list[bool]:
    """``rewrite`` of each (page, status), all or none: every page is rendered and its markers
    found before any is written. True for each page that changed.

    Raises:
        ValueError: a page's markers are missing or out of order (no page written).
    """
    texts = []
    for readme, status in pages:
        begin_mark, end_mark, begin_line = (STATUS_BEGIN, STATUS_END, STATUS_BEGIN_LINE) if status else (BEGIN, END, BEGIN_LINE)
        body = render_status(results_dir) if status else render_results(results_dir)
        text = readme.read_text()
        begin = text.find(begin_mark)
        end = text.find(end_mark)
        if begin < 0 or end < 0 or end < begin:
            raise ValueError(f"{readme}: needs a line starting with '{begin_mark}' and a later line '{end_mark}' around the generated section")
        texts.append((text, text[:begin] + begin_line + "\n\n" + body + "\n" + text[end:]))
    for (readme, _), (text, new) in zip(pages, texts):
        if new != text:
            write_text_atomic(readme, new)
    return [new != text for text, new in texts]
