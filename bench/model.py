"""The model slot: runs each ``bench/model_*.py`` (model build, training throughput, ...).

Contract for such a file (others write them; this keeps them in one harness):

- Preferred: a module with ``run(ctx: bench.context.Context) -> bench.report.Report``. It gets
  the device, the mode (``ctx.quick`` / ``ctx.smoke`` must shrink the work: a smoke run is part of
  CI and of ``gpu_check.sh --dry-run``), ``ctx.time(fn, ring)`` for timing and ``ctx.row(...)``
  for rows; its result is stored as ``<out>/<slug>/model_<name>.json`` like any benchmark's.
- Otherwise a plain script: it is run as ``python bench/model_<name>.py --device D [--quick]
  [--smoke] --out DIR`` and passes when it exits with status 0. Its standard output (its table)
  and the JSON files it writes into DIR are kept in the result under ``script``, so that
  bench/README.md shows them like any other benchmark's; a JSON file's ``targets`` list
  (``name``, ``value``, ``sense``, ``limit``, ``unit``) becomes the benchmark's targets.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench.context import Context
from bench.report import Report, Target

REPO = Path(__file__).resolve().parent.parent


def runner(module_name: str, out_dir: Path) -> Callable[[Context], Report]:
    """The callable that runs benchmark ``module_name`` (a ``run(ctx)`` module, or a script)."""
    module = importlib.import_module(module_name)
    if hasattr(module, "run"):
        return module.run
    return lambda ctx: _run_script(ctx, Path(module.__file__), out_dir)


def script_targets(script_name: str, file_name: str, content) -> list[Target]:
    """The targets a script wrote in one JSON file (a list of {name, value, sense, limit, unit,
    note?} under "targets"), judged.

    Raises:
        RuntimeError: "targets" is not such a list.
    """
    targets = content.get("targets", []) if isinstance(content, dict) else []
    if not isinstance(targets, list):
        raise RuntimeError(f"{script_name} wrote {file_name} with 'targets' that is not a list: {targets!r}")
    out = []
    for t in targets:
        try:
            target = Target.check(t["name"], t["value"], t["sense"], t["limit"], t["unit"], t.get("note", ""))
            if target.value is not None:
                target.note = t.get("note", "")  # e.g. what limits the value
            out.append(target)
        except (KeyError, TypeError, ValueError) as e:
            raise RuntimeError(f"{script_name} wrote {file_name} with a malformed target {t!r}: {e}") from None
    return out


def _script_environment() -> dict[str, str]:
    """The environment of a script: the qlora_ext this harness imported (the checkout's in-place
    build, or the installed package) first on its path, and the CPU kernels this harness uses
    (``--cpu-isa``), so that what the result's header says of them holds for the script too."""
    import qlora_ext
    from qlora_ext import ops

    home = str(Path(qlora_ext.__file__).resolve().parent.parent)
    path = [home] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != home]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path), "QLORA_CPU_ISA": ops.cpu_kernel_isa()}


def _run_script(ctx: Context, path: Path, out_dir: Path) -> Report:
    with tempfile.TemporaryDirectory(prefix=f"{path.stem}-", dir=out_dir) as scratch:
        cmd = [sys.executable, str(path), "--device", ctx.device, "--out", scratch]
        if ctx.mode != "full":
            cmd.append(f"--{ctx.mode}")
        ctx.log(f"running script {' '.join(cmd)}")
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=_script_environment())
        elapsed = time.perf_counter() - start
        ctx.log(f"{path.name} output:\n{proc.stdout}{proc.stderr}")
        if proc.returncode != 0:
            raise RuntimeError(f"{path.name} exited with status {proc.returncode} after {elapsed:.0f} s: {proc.stderr.strip()[-2000:]}")
        results = {}
        for file in sorted(Path(scratch).glob("*.json")):
            try:
                results[file.name] = json.loads(file.read_text())
            except ValueError as e:
                raise RuntimeError(f"{path.name} wrote {file.name}, which is not JSON: {e}") from None
    report = Report()
    report.notes.append(f"bench/{path.name} ran as a script ({elapsed:.0f} s); its output and JSON follow")
    for file_name, content in results.items():  # a script's own targets, judged like any benchmark's
        report.targets += script_targets(path.name, file_name, content)
    mode_flag = "" if ctx.mode == "full" else f" --{ctx.mode}"
    report.script = {
        "command": f"python bench/{path.name} --device {ctx.device}{mode_flag} --out DIR",
        "stdout": proc.stdout,
        "results": results,  # file name -> content, as the script wrote them
    }
    return report
