"""Loss curves as a PNG: one or several runs, raw (faint) and smoothed (solid), with matplotlib
when it is installed and with the built-in raster writer (``png_canvas``) when it is not."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path

from qlora_ext.checkpoint.atomic import atomic_path
from qlora_ext.training.png_canvas import Canvas, text_width

_PALETTE = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75), (23, 190, 207)]


@dataclass
class Curve:
    label: str
    steps: list[int]
    losses: list[float]


def smooth(values: list[float], weight: float) -> list[float]:
    """TensorBoard's debiased exponential moving average (weight 0 = no smoothing); a NaN or
    infinite value is passed through and left out of the average, which goes on past it."""
    out, last, norm = [], 0.0, 0.0
    for v in values:
        if not math.isfinite(v):
            out.append(v)
            continue
        last = weight * last + (1.0 - weight) * v
        norm = weight * norm + (1.0 - weight)
        out.append(last / norm)
    return out


def default_smoothing(num_points: int) -> float:
    """More smoothing for longer curves: 0 for a handful of points, up to 0.9."""
    return min(0.9, max(0.0, 1.0 - 10.0 / max(num_points, 1)))


def _matplotlib():
    """(the matplotlib module, "") or (None, why it cannot be used): not installed, or installed but
    failing to import (a matplotlib built against NumPy 1 under NumPy 2, say)."""
    try:
        import matplotlib
    except ImportError as e:
        if isinstance(e, ModuleNotFoundError) and e.name == "matplotlib":
            return None, "matplotlib is not installed"
        return None, f"matplotlib could not be imported ({type(e).__name__}: {e})"
    return matplotlib, ""


def builtin_renderer_note() -> str:
    """Why plot_loss_curves draws with its built-in PNG writer, and what draws a richer plot."""
    why = _matplotlib()[1] or "matplotlib was not used"
    fix = "pip install matplotlib" if why == "matplotlib is not installed" else "pip install -U matplotlib (one built for the installed NumPy)"
    return f"{why}, so the built-in PNG writer drew it; {fix} for a richer plot"


def plot_loss_curves(curves: list[Curve], path: str | Path, smoothing: float | None = None, title: str = "training loss") -> str:
    """Writes the PNG; returns which renderer drew it ("matplotlib" or "built-in")."""
    if not any(math.isfinite(loss) for c in curves for loss in c.losses):
        raise ValueError("plot_loss_curves: argument 'curves' must hold at least one finite loss value; got none")
    matplotlib, _ = _matplotlib()
    if matplotlib is None:
        _plot_builtin(curves, Path(path), smoothing, title)
        return "built-in"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.8), dpi=100)
    for i, c in enumerate(curves):
        color = [v / 255 for v in _PALETTE[i % len(_PALETTE)]]
        w = default_smoothing(len(c.losses)) if smoothing is None else smoothing
        ax.plot(c.steps, c.losses, color=color, alpha=0.25, linewidth=1)
        marker = "o" if sum(map(math.isfinite, c.losses)) == 1 else None  # a lone point draws no line
        ax.plot(c.steps, smooth(c.losses, w), color=color, linewidth=2, marker=marker, label=f"{c.label} (smoothed {w:.2f})")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:  # a failed write leaves no partial file behind
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return "matplotlib"


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About ``count`` round values covering [lo, hi]; a single value (lo == hi) gets a range
    around it, so that a lone point is drawn inside the frame, not on its corner."""
    edge = sys.float_info.max / 8  # values beyond are drawn past the frame: every tick stays finite
    lo, hi = min(max(lo, -edge), edge), min(max(hi, -edge), edge)
    if hi - lo <= 1e-9 * max(abs(lo), abs(hi)):  # one value, or a span too fine for float steps to divide
        mid = lo / 2 + hi / 2
        half = abs(mid) / 2 if mid else 1.0
        lo, hi = mid - half, mid + half
    raw = (hi - lo) / count
    mag = 10.0 ** math.floor(math.log10(raw))  # (a float: 10 ** 307 as an int made every tick an int)
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step) * step
    n = min(math.ceil((hi - start) / step - 1e-9) + 1, 4 * count + 2)  # the last tick >= hi (bounded, whatever rounding does)
    return [float(f"{start + i * step:.12g}") for i in range(n)]  # (float noise rounded off, relative to the value)


def _fmt(v: float) -> str:
    return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.2g}"


def _plot_builtin(curves: list[Curve], path: Path, smoothing: float | None, title: str) -> None:
    width, height, left, right, top, bottom = 800, 480, 80, 24, 56, 56
    canvas = Canvas(width, height)
    steps = [s for c in curves for s in c.steps]
    losses = [v for c in curves for v in c.losses if math.isfinite(v)]
    yticks = nice_ticks(min(losses), max(losses))
    xticks = nice_ticks(min(steps), max(steps))
    x_lo, x_hi, y_lo, y_hi = xticks[0], xticks[-1], yticks[0], yticks[-1]

    def fraction(v: float, lo: float, hi: float) -> float:
        # where v lies in [lo, hi] (halves: no overflow near float's max), kept near the frame: a
        # line to a point far outside it would be walked pixel by pixel
        return min(max((v / 2 - lo / 2) / (hi / 2 - lo / 2), -1.0), 2.0)

    def px(step: float) -> float:
        return left + fraction(step, x_lo, x_hi) * (width - left - right)

    def py(loss: float) -> float:
        return height - bottom - fraction(loss, y_lo, y_hi) * (height - top - bottom)

    for t in yticks:
        canvas.line(left, py(t), width - right, py(t), (230, 230, 230))
        canvas.text(left - 8, round(py(t)) - 5, _fmt(t), anchor="right")
    for t in xticks:
        canvas.line(px(t), top, px(t), height - bottom, (230, 230, 230))
        canvas.text(round(px(t)), height - bottom + 8, _fmt(t), anchor="center")
    canvas.rect(left, top, width - right, height - bottom, (0, 0, 0))
    canvas.text(width // 2, 12, title, scale=3, anchor="center")
    canvas.text(width // 2, height - 22, "step", anchor="center")
    canvas.text(8, top - 20, "loss")

    legend_x = width - right - 8
    for i, c in enumerate(curves):
        color = _PALETTE[i % len(_PALETTE)]
        faint = tuple(255 - (255 - v) // 4 for v in color)
        w = default_smoothing(len(c.losses)) if smoothing is None else smoothing
        points = [(px(s), py(v)) for s, v in zip(c.steps, c.losses) if math.isfinite(v)]
        for (a, b), (d, e) in zip(points, points[1:]):
            canvas.line(a, b, d, e, faint)
        smoothed = [(px(s), py(v)) for s, v in zip(c.steps, smooth(c.losses, w)) if math.isfinite(v)]
        for (a, b), (d, e) in zip(smoothed, smoothed[1:]):
            canvas.line(a, b, d, e, color, width=2)
        if len(smoothed) == 1:  # a lone point draws no line: a square marks it
            a, b = round(smoothed[0][0]), round(smoothed[0][1])
            canvas.rect(a - 3, b - 3, a + 3, b + 3, color, fill=True)
    rows = (height - bottom - top - 20) // 16  # legend lines that fit in the frame (drawn over the curves)
    for i, c in enumerate(curves):
        color = _PALETTE[i % len(_PALETTE)]
        if i < rows - 1 or len(curves) <= rows:
            label = c.label[:40]
            y = top + 10 + 16 * i
            canvas.text(legend_x, y, label, color=color, anchor="right")
            canvas.rect(legend_x - text_width(label) - 24, y + 2, legend_x - text_width(label) - 8, y + 6, color, fill=True)
        elif i == rows - 1:  # the rest are drawn, not named
            canvas.text(legend_x, top + 10 + 16 * i, f"and {len(curves) - i} more", anchor="right")
    canvas.save_png(path)
