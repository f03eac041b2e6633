"""Smoothed training-loss curves of one or more runs in one picture (as the seed tutorial compares
LoRA with QLoRA):

    python -m qlora_ext.plot RUN_DIR [RUN_DIR ...] [-o loss_curves.png] [--smoothing 0.9]
        [--labels lora qlora]

A RUN_DIR is a trainer ``output_dir``: its ``logs/metrics.jsonl`` is read, or the one in the
``metric_logger.log_dir`` its ``config.yaml`` names. Uses matplotlib when installed, else a built-in
PNG writer.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from qlora_ext._arguments import is_finite_real, is_int
from qlora_ext._console import print_out, tolerant_console
from qlora_ext._paths import why_not_a_folder
from qlora_ext.training.loss_plot import Curve, builtin_renderer_note, plot_loss_curves
from qlora_ext.training.metric_logging import LOG_SUBDIR, METRICS_FILE, metrics_file, read_metrics


def _check_text_log(run_dir: str) -> None:
    """A RUN_DIR that is a file must be a metrics log (JSON lines, UTF-8 text): a run's binary
    files (recipe_state.pt holds its log as pickled text) gave a curve of fragments."""
    path = Path(run_dir)
    if not path.is_file():
        return
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    if head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"{"):  # JSON lines, maybe with a damaged line (read_metrics skips it)
        return
    binary = b"\0" in head
    if not binary:
        try:
            head.decode("utf-8")
        except UnicodeDecodeError as e:
            binary = e.start < len(head) - 4  # (not a multi-byte character cut by the read)
    if binary:
        raise ValueError(f"RUN_DIR '{run_dir}' is a binary file, not a metrics log: give a training run's output_dir, "
                         f"or its {METRICS_FILE}")


def load_curve(run_dir: str, label: str | None = None) -> Curve:
    """The (step, loss) records of a run's metrics log (those with an int64 step and a finite loss)."""
    _check_text_log(run_dir)
    records = [r for r in _read_run(read_metrics, run_dir)
               if is_int(r.get("step")) and -(2**63) <= r["step"] < 2**63 and is_finite_real(r.get("loss"))]
    if not records:
        raise ValueError(f"RUN_DIR '{run_dir}': its metrics log has no records with a step and a finite loss yet")
    return Curve(label or _run_name(Path(run_dir)), [r["step"] for r in records], [r["loss"] for r in records])


def _read_run(read, run_dir: str):
    """``read(run_dir)``, an OSError of the file system (a folder or log that cannot be read)
    naming the RUN_DIR."""
    try:
        return read(run_dir)
    except OSError as e:
        if e.strerror is None:  # metrics_file's own message (no metrics file), which names the folders
            raise
        raise OSError(f"RUN_DIR '{run_dir}': cannot read {e.filename or 'its metrics log'}: {e.strerror}") from None


def _loss_text(v: float) -> str:
    return f"{v:.4f}" if v == 0 or 1e-3 <= abs(v) < 1e6 else f"{v:.4g}"


def _run_folder(path: Path) -> Path:
    """The run folder, also when ``path`` is its metrics file or its ``logs`` folder."""
    path = path.resolve()
    if path.is_file():
        path = path.parent
    return path.parent if path.name == LOG_SUBDIR and path.parent.name else path


def _run_name(path: Path) -> str:
    return _run_folder(path).name


def run_labels(run_dirs: list[str]) -> list[str]:
    """Each run's folder name, with as many of its parent folders as it takes to tell apart runs
    of the same name (``lora/run1`` and ``qlora/run1``); a metrics file given by a name of its own
    (``exp/lr1e-4.jsonl``) goes by that name."""
    folders = [_run_folder(Path(run)).parts + _own_name(Path(run)) for run in run_dirs]
    labels = []
    for parts in folders:
        k = 1
        while k < len(parts) and any(other != parts and other[-k:] == parts[-k:] for other in folders):
            k += 1
        labels.append(str(Path(*parts[-k:])))
    return labels


def _own_name(path: Path) -> tuple[str, ...]:
    """(the file's stem,) for a metrics file not named metrics.jsonl, else ()."""
    return (path.stem,) if path.is_file() and path.name != METRICS_FILE else ()


def _same_run_twice(run_dirs: list[str]) -> str | None:
    """An error naming two RUN_DIRs that are one run (one metrics file), or None."""
    files = [_read_run(metrics_file, run).resolve() for run in run_dirs]
    for i, file in enumerate(files):
        if file in files[:i]:
            return f"RUN_DIR '{run_dirs[files.index(file)]}' and '{run_dirs[i]}' are the same run ({file}); give each run once"
    return None


def main(argv: list[str] | None = None) -> int:
    tolerant_console()
    paragraphs = (__doc__ or "").split("\n\n", 2)  # (python -OO leaves no docstring)
    parser = argparse.ArgumentParser(
        prog="python -m qlora_ext.plot", description=paragraphs[0].rstrip(":") + "." if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog="\n\n".join(paragraphs[2:]),
    )
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="trainer output_dir(s)")
    parser.add_argument("-o", "--output", default="loss_curves.png", help="PNG to write (default: %(default)s)")
    parser.add_argument("--smoothing", type=float, default=None, help="EMA weight in [0, 1) (default: by curve length)")
    parser.add_argument("--labels", nargs="+", default=None,
                        help="one legend label per RUN_DIR (default: folder names, with parent folders where two are alike)")
    parser.add_argument("--title", default="training loss")
    args = parser.parse_args(argv)
    if args.smoothing is not None and not 0.0 <= args.smoothing < 1.0:
        parser.error(f"argument --smoothing: must be in [0, 1); got {args.smoothing}")
    if args.labels is not None and len(args.labels) != len(args.runs):
        parser.error(f"argument --labels: needs one label per RUN_DIR ({len(args.runs)}); got {len(args.labels)}")
    try:
        twice = _same_run_twice(args.runs)
        if twice:
            print(f"error: {twice}", file=sys.stderr)
            return 2
        labels = args.labels or run_labels(args.runs)
        curves = [load_curve(run, label) for run, label in zip(args.runs, labels)]
    except (OSError, ValueError) as e:  # missing or unreadable logs, logs without losses
        print(f"error: {e}", file=sys.stderr)
        return 2
    output = Path(args.output)
    if output.is_dir():
        parser.error(f"argument -o/--output: '{args.output}' is a folder; give the path of the PNG file to write")
    if output.suffix.lower() != ".png":  # (Path(".png").suffix is "": a name that is only the extension)
        parser.error(f"argument -o/--output: the picture is a PNG, so the name must be a name ending in .png; got '{args.output}'")
    output = Path(os.path.realpath(output))  # a link (latest.png) is written through, as matplotlib's savefig does
    try:
        output.parent.mkdir(parents=True, exist_ok=True)  # as the trainer creates its output_dir
        renderer = plot_loss_curves(curves, output, smoothing=args.smoothing, title=args.title)
    except OSError as e:
        print(f"error: argument -o/--output: cannot write '{args.output}': {why_not_a_folder(output.parent, e)}", file=sys.stderr)
        return 2
    note = "" if renderer == "matplotlib" else f" ({builtin_renderer_note()})"
    lines = [f"wrote {args.output}{note}"] + [
        f"  {c.label}: {len(c.losses)} step{'' if len(c.losses) == 1 else 's'}, loss {_loss_text(c.losses[0])} -> {_loss_text(c.losses[-1])}"
        for c in curves]
    return print_out("\n".join(lines))  # (the picture is written either way)


if __name__ == "__main__":
    sys.exit(main())
