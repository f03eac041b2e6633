"""python -m bench [codec|linear|model|model_<name>|all|readme ...] [--device cpu|cuda] [--quick|--smoke]
                  [--out DIR] [--update-readme]

Runs benchmarks from the repository root, prints each one's table and writes it as JSON to
``DIR/<machine>/<benchmark>.json`` (default DIR: bench/results; bench/results/tmp for --smoke).
``readme`` only rewrites bench/README.md's results section (and README.md's status lines) from
bench/results/.

Exit status: 0 when every benchmark ran; 1 when one failed (crashed, or its result could not be
written) or --update-readme failed; 2 for a usage error (an argument that cannot be used here); 3 with
--fail-on-missed-targets when a speed target was missed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
README = REPO / "bench" / "README.md"
TOP_README = REPO / "README.md"  # its status quotes the target lines


def _prefer_built_qlora_ext() -> None:
    # `python -m bench` puts the checkout first on sys.path. Where the checkout's qlora_ext has no
    # compiled library (the package was pip-installed, as gpu_check.sh and CI do), the source
    # folder would shadow the installed package: drop the checkout from the path. The bench
    # package itself is already imported, so its submodules still resolve.
    if (REPO / "qlora_ext" / "_C.so").exists():
        return
    sys.path[:] = [p for p in sys.path if Path(p or os.getcwd()).resolve() != REPO]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from bench import registry

    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    names = [*registry.choices(), "readme"]
    p.add_argument("benchmark", nargs="*", metavar="BENCHMARK", help=f"one or more of {', '.join(names)} (default: all)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when the extension has CUDA kernels and a GPU is present, else cpu")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="fewer shapes and repetitions (a few minutes per benchmark on a 2-core CPU)")
    mode.add_argument("--smoke", action="store_true", help="tiny shapes, two calls each: proves the benchmarks run (CI); numbers mean nothing")
    p.add_argument("--out", type=Path, default=None, help="results folder (default bench/results, or bench/results/tmp with --smoke)")
    p.add_argument("--update-readme", action="store_true", help="afterwards rewrite bench/README.md's results section (and README.md's status lines) from bench/results/")
    p.add_argument("--cpu-isa", choices=("auto", "avx512", "avx2", "portable"), default=None, help="which CPU kernels of qlora_ext to benchmark")
    p.add_argument("--ring-mib", type=int, default=None, help="size of the rotating input rings (default: twice the last-level cache)")
    p.add_argument("--fail-on-missed-targets", action="store_true", help="exit with status 3 when a speed target is missed")
    args = p.parse_args(argv)
    if args.ring_mib is not None and args.ring_mib < 1:
        p.error(f"argument --ring-mib must be at least 1 (MiB); got {args.ring_mib}")
    args.benchmark = args.benchmark or ["all"]
    for name in args.benchmark:
        if name not in names:
            p.error(f"argument BENCHMARK: invalid choice {name!r} (choose from {', '.join(names)})")
    return args


def _import_qlora_ext():
    try:
        import qlora_ext._extension as ext
    except ImportError as e:
        sys.exit(
            f"python -m bench: cannot import qlora_ext ({e}).\nBuild it in place "
            "(cmake -S . -B build/dev -G Ninja -DQLORA_INPLACE=ON && cmake --build build/dev) or install it (pip install .)."
        )
    return ext


def _device(requested: str | None, ext) -> str:
    """The device to run on.

    Raises:
        ValueError: ``cuda`` asked for where it cannot run.
    """
    import torch

    usable = bool(ext.WITH_CUDA) and torch.cuda.is_available()
    if requested == "cuda" and not usable:
        why = "no CUDA GPU is visible" if not torch.cuda.is_available() else f"qlora_ext was built without CUDA kernels ({ext.BUILD_KIND})"
        raise ValueError(f"argument --device: cuda, but {why}")
    return requested or ("cuda" if usable else "cpu")


def _usage_error(message: str) -> int:
    print(f"python -m bench: error: {message}", file=sys.stderr)
    return 2


def run_one(name: str, module: str, ctx, out_root: Path) -> dict | None:
    """Runs one benchmark and returns its result (``store`` writes it); None when it was a script
    that measured nothing on this device (model_seed_7b on a CPU: its output says why)."""
    from bench import machine, model
    from bench.report import SCHEMA_VERSION, validate

    slug_dir = out_root / machine.machine_slug(ctx.device)  # (a script's scratch folder goes in it)
    slug_dir.mkdir(parents=True, exist_ok=True)
    revision = machine.git_revision()  # of the code that runs, before anything can change it
    load_start = os.getloadavg()[0]
    start = time.perf_counter()
    report = model.runner(module, slug_dir)(ctx)
    if report.script is not None and not report.script["results"]:
        ctx.log(f"{name} measured nothing on {ctx.device}; no result written")
        return None
    if ctx.smoke:  # tiny shapes on purpose: a target met or missed there would say nothing
        for t in report.targets:
            t.met, t.note = None, "smoke run: not evaluated"
    result = {
        "schema": SCHEMA_VERSION,
        "benchmark": name,
        "date": machine.now_iso(),
        "git_revision": revision,
        "device": ctx.device,
        "mode": ctx.mode,
        "duration_s": round(time.perf_counter() - start, 1),
        # other work on the machine makes timings noisy: the 1-minute load average, before and after
        "load_avg_1m": [round(load_start, 2), round(os.getloadavg()[0], 2)],
        **machine.describe(ctx.device),
        "memory_bandwidth": ctx.bandwidth_dict(),
        "ring_bytes": ctx.ring_bytes,
        **report.to_dict(),
    }
    validate(result)
    return result


def store(result: dict, out_root: Path) -> Path:
    """Writes a result as ``out_root/<machine>/<benchmark>.json`` (atomically); returns the path."""
    from bench.files import write_text_atomic

    path = out_root / result["machine"]["slug"] / f"{result['benchmark']}.json"
    write_text_atomic(path, json.dumps(result, indent=1) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    _prefer_built_qlora_ext()
    args = parse_args(argv)
    from bench import readme, registry

    pages = [(README, False), (TOP_README, True)]
    if "readme" in args.benchmark:
        if args.benchmark != ["readme"]:
            return _usage_error("'readme' only re-renders bench/README.md and README.md's status; give it alone")
        given = [flag for flag, value in (("--device", args.device), ("--quick", args.quick), ("--smoke", args.smoke),
                                          ("--out", args.out), ("--cpu-isa", args.cpu_isa), ("--ring-mib", args.ring_mib)) if value]
        if given:
            return _usage_error(f"'readme' renders bench/results/ as stored and takes none of {', '.join(given)}")
        try:
            changed = readme.rewrite_pages(pages, RESULTS)
        except (ValueError, OSError) as e:
            print(f"python -m bench readme: {e}; no page rewritten", file=sys.stderr)
            return 1
        for (page, _), did in zip(pages, changed):
            print(f"{page}: {'rewritten' if did else 'already up to date'}")
        return 0

    ext = _import_qlora_ext()
    from bench import machine
    from bench.context import Context
    from bench.report import render_text
    from qlora_ext import ops

    if args.cpu_isa:
        try:
            ops.set_cpu_kernel_isa(args.cpu_isa)
        except (ValueError, RuntimeError) as e:
            return _usage_error(f"argument --cpu-isa: {e}")
    mode = "quick" if args.quick else "smoke" if args.smoke else "full"
    try:
        device = _device(args.device, ext)
    except ValueError as e:
        return _usage_error(str(e))
    ctx = Context(device, mode, ring_bytes=args.ring_mib << 20 if args.ring_mib else None)
    # Absolute: a model_* script runs in the checkout, not in the caller's folder.
    out_root = (args.out or (RESULTS / "tmp" if mode == "smoke" else RESULTS)).resolve()
    slug_dir = out_root / machine.machine_slug(ctx.device)
    try:
        slug_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return _usage_error(f"argument --out: cannot make the results folder {slug_dir}: {e.strerror or e}")
    todo = list(dict.fromkeys(pair for name in args.benchmark for pair in registry.resolve(name)))
    asked = " ".join(args.benchmark)
    if not todo:
        print(f"python -m bench {asked}: nothing to run (no bench/model_*.py yet)")
    failed, empty, missed, readme_failed = [], [], 0, False
    for name, module in todo:
        ctx.log(f"=== {name} on {ctx.device} ({mode}; rings of {ctx.ring_bytes >> 20} MiB)")
        try:
            result = run_one(name, module, ctx, out_root)
        except Exception:
            traceback.print_exc()
            print(f"\nBENCHMARK FAILED: {name}\n", flush=True)
            failed.append(name)
            continue
        if result is None:
            empty.append(name)
            continue
        print("\n" + render_text(result), flush=True)  # (before the file: a failed write keeps the numbers on screen)
        missed += sum(t["met"] is False for t in result["targets"])
        try:
            path = store(result, out_root)
        except OSError as e:  # (named by the result's path: e.filename is the temporary beside it)
            path = out_root / result["machine"]["slug"] / f"{name}.json"
            print(f"\nBENCHMARK RESULT NOT WRITTEN: {name}: cannot write {path}: {e.strerror or e}\n", flush=True)
            failed.append(name)
            continue
        ctx.log(f"wrote {path}")
    if args.update_readme:
        if args.out and args.out.resolve() != RESULTS.resolve():
            print(f"note: --update-readme renders bench/results/, not {args.out}")
        try:
            readme.rewrite_pages(pages, RESULTS)
            print(f"rewrote the results section of {README} and the status lines of {TOP_README}")
        except (ValueError, OSError) as e:
            print(f"--update-readme: {e}; no page rewritten", file=sys.stderr)
            readme_failed = True
    nothing = f", {len(empty)} measured nothing here ({', '.join(empty)})" if empty else ""
    print(f"python -m bench {asked}: {len(todo) - len(failed) - len(empty)} ran, {len(failed)} failed"
          f"{' (' + ', '.join(failed) + ')' if failed else ''}{nothing}; {missed} target(s) missed")
    if failed or readme_failed:
        return 1
    return 3 if missed and args.fail_on_missed_targets else 0


if __name__ == "__main__":
    sys.exit(main())
