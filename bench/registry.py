"""The benchmarks ``python -m bench NAME`` runs.

A benchmark is a module of this package with ``run(ctx: bench.context.Context) -> bench.report.Report``.
Adding one: write the module, add its line to ``BENCHMARKS``. The ``model`` slot needs not even
the line: it runs every ``bench/model_*.py`` there is (see bench/model.py).
"""

from __future__ import annotations

from pathlib import Path

BENCHMARKS: dict[str, str] = {
    "codec": "bench.codec",  # issue 2: NF4 quantize / dequantize vs bitsandbytes, torchao, clone()
    "linear": "bench.linear",  # issue 3: linear_nf4 forward / backward vs dense, bitsandbytes, torchao
    "model": "bench.model",  # the slot for bench/model_*.py (model build, training throughput, ...)
}
GROUPS = {"all": ("codec", "linear", "model")}

_HERE = Path(__file__).resolve().parent


def model_scripts() -> dict[str, str]:
    """{"model_train": "bench.model_train", ...} for each bench/model_*.py present."""
    return {p.stem: f"bench.{p.stem}" for p in sorted(_HERE.glob("model_*.py"))}


def choices() -> list[str]:
    return [*BENCHMARKS, *GROUPS, *model_scripts()]


def resolve(name: str) -> list[tuple[str, str]]:
    """[(result name, module)] that ``name`` stands for; "model" expands to the model scripts."""
    if name in GROUPS:
        return [pair for member in GROUPS[name] for pair in resolve(member)]
    if name == "model":
        return list(model_scripts().items())
    if name in BENCHMARKS:
        return [(name, BENCHMARKS[name])]
    scripts = model_scripts()
    if name in scripts:
        return [(name, scripts[name])]
    raise ValueError(f"unknown benchmark {name!r}; choose from {', '.join(choices())}")
