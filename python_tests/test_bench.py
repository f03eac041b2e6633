"""The benchmark harness (bench/): statistics, ratios, the result schema, the README section it
writes, the model slot, and gpu_check.sh's dry run. No timing is asserted here: speed targets
live in the benchmarks' output."""

from __future__ import annotations

import datetime
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
# Appended, not prepended: an installed qlora_ext must still win over the source folder.
if str(REPO) not in sys.path:
    sys.path.append(str(REPO))

from bench import harness, machine, readme, registry  # noqa: E402
from bench.__main__ import parse_args, run_one, store  # noqa: E402
from bench.context import Context  # noqa: E402
from bench.model import runner, script_targets  # noqa: E402
from bench.report import Report, Target, render_markdown, render_text, table_rows, target_lines, validate  # noqa: E402

# -- statistics --------------------------------------------------------------------------------


def test_median_odd_even_and_empty():
    assert harness.median([3.0, 1.0, 2.0]) == 2.0
    assert harness.median([4.0, 1.0, 3.0, 2.0]) == 2.5
    assert harness.median([7.0]) == 7.0
    with pytest.raises(ValueError, match="argument 'xs' must be non-empty"):
        harness.median([])


def test_quantile_matches_numpy():
    np = pytest.importorskip("numpy")
    xs = torch.rand(37, dtype=torch.float64).tolist()
    for q in (0.0, 0.1, 0.25, 0.5, 0.75, 1.0):
        assert harness.quantile(xs, q) == pytest.approx(float(np.quantile(xs, q)), rel=1e-12)
    with pytest.raises(ValueError, match="0 <= q <= 1"):
        harness.quantile(xs, 1.5)


def test_stats_and_spread():
    s = harness.Stats.of([1.0, 2.0, 3.0, 4.0, 10.0])
    assert (s.median_s, s.min_s, s.q1_s, s.q3_s, s.reps) == (3.0, 1.0, 2.0, 4.0, 5)
    assert s.spread == pytest.approx(2.0 / 3.0)


def test_ratio():
    assert harness.ratio(6.0, 2.0) == 3.0
    assert harness.ratio(None, 2.0) is None
    assert harness.ratio(1.0, None) is None
    assert harness.ratio(1.0, 0.0) is None


def test_ring_length():
    assert harness.ring_length(item_bytes=10, ring_bytes=95) == 10
    assert harness.ring_length(item_bytes=10, ring_bytes=100) == 10
    assert harness.ring_length(item_bytes=1000, ring_bytes=10) == 2  # never a single item
    assert harness.ring_length(item_bytes=1, ring_bytes=10**9, max_items=64) == 64


@pytest.mark.parametrize("target_s, min_reps, max_reps, expected", [(0.0, 3, 10, 3), (1e9, 3, 5, 5)])
def test_time_calls_counts_and_rotates(target_s, min_reps, max_reps, expected):
    seen = []
    budget = harness.Budget(warmup_s=0.0, warmup_calls=2, min_reps=min_reps, max_reps=max_reps, target_s=target_s)
    stats = harness.time_calls(seen.append, ["a", "b", "c"], "cpu", budget)
    assert stats.reps == expected
    assert seen == (["a", "b", "c"] * 4)[: 2 + expected]  # warm-up calls, then the timed ones
    assert 0 <= stats.min_s <= stats.q1_s <= stats.median_s <= stats.q3_s


def test_time_in_turns_alternates_and_splits_the_budget():
    seen = []
    budget = harness.Budget(warmup_s=0.0, warmup_calls=1, min_reps=6, max_reps=6, target_s=0.0)
    calls = [(lambda item: seen.append("a" + item), ["0", "1"]), (lambda item: seen.append("b" + item), ["0"])]
    stats = harness.time_in_turns(calls, "cpu", budget, rounds=3)
    assert [s.reps for s in stats] == [6, 6]  # 2 timed calls per turn, 3 turns
    # each turn: one warm-up call, then two timed ones; the order reverses every other round
    assert "".join(x[0] for x in seen) == "aaabbb" + "bbbaaa" + "aaabbb"
    assert seen[:3] == ["a0", "a1", "a0"]  # each turn walks its ring round-robin


def test_timing_an_empty_ring_is_an_error():
    budget = harness.Budget(warmup_s=0.0, warmup_calls=1, min_reps=1, max_reps=1, target_s=0.0)
    with pytest.raises(ValueError, match="argument 'ring' must hold at least one input"):
        harness.time_calls(lambda item: None, [], "cpu", budget)
    with pytest.raises(ValueError, match="argument 'ring' must hold at least one input"):
        harness.time_in_turns([(lambda item: None, ["a"]), (lambda item: None, [])], "cpu", budget)


def test_budget_share():
    b = harness.Budget(warmup_s=0.2, warmup_calls=1, min_reps=5, max_reps=50, target_s=1.5, max_s=5.0)
    turn = b.share(3)
    assert (turn.warmup_s, turn.warmup_calls, turn.min_reps, turn.max_reps) == (0.0, 1, 2, 17)
    assert turn.target_s == pytest.approx(0.5) and turn.max_s == pytest.approx(5.0 / 3)
    assert turn.done(1, 2.0) and not turn.done(1, 1.0)  # a slow call: one per turn, three in all


def test_budget_gives_slow_calls_three_reps():
    b = harness.Budget(warmup_s=0.0, warmup_calls=1, min_reps=5, max_reps=50, target_s=1.5, max_s=5.0)
    assert not b.done(2, 10.0)  # never fewer than three
    assert b.done(3, 6.0)
    assert not b.done(4, 1.0)
    assert b.done(5, 1.5)
    assert b.done(50, 0.0)


def test_target_check():
    assert Target.check("t", 0.3, "<=", 0.4, "x").met is True
    assert Target.check("t", 0.5, "<=", 0.4, "x").met is False
    assert Target.check("t", 25.0, ">=", 20, "x").met is True
    missing = Target.check("t", None, ">=", 20, "x", "torchao skipped: not installed")
    assert missing.met is None and missing.note == "torchao skipped: not installed"
    with pytest.raises(ValueError, match="'sense' must be"):
        Target.check("t", 1.0, "<", 2.0, "x")


def test_machine_slug():
    assert machine.slugify("Intel(R) Xeon(R) Processor") == "intel-xeon-processor"
    assert machine.slugify("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert machine.machine_slug("cpu").endswith(f"-{machine.cpu_count()}c")


# -- a tiny synthetic benchmark through the whole pipeline ---------------------------------------


def _synthetic_run(ctx: Context) -> Report:
    report = Report()
    a = ctx.ring(lambda i: torch.full((1024,), float(i)), 4096)
    ours = ctx.time(lambda t: t * 2, a)
    other = ctx.time(lambda t: t.clone().mul_(2).clone(), a)
    report.rows.append(ctx.row("scale 1024 fp32", "ours", torch.float32, ours, bytes_moved=8192, op="scale"))
    report.rows.append(ctx.row("scale 1024 fp32", "other", torch.float32, other, bytes_moved=8192, op="scale"))
    report.skip("torchao", "not installed (pip install torchao)")
    report.targets.append(Target.check("scale: ours / other", harness.ratio(ours.median_s, other.median_s), "<=", 1e9, "x"))
    report.targets.append(Target.check("absent", None, "<=", 1.0, "x", report.missing_reason("torchao")))
    return report


@pytest.fixture
def synthetic_result(tmp_path, monkeypatch):
    module = types.ModuleType("bench_synthetic_for_tests")
    module.run = _synthetic_run
    monkeypatch.setitem(sys.modules, module.__name__, module)
    ctx = Context("cpu", "smoke", ring_bytes=1 << 16)
    result = run_one("synthetic", module.__name__, ctx, tmp_path / "results")
    assert store(result, tmp_path / "results") == tmp_path / "results" / result["machine"]["slug"] / "synthetic.json"
    return result, tmp_path / "results"


def test_result_json_schema(synthetic_result):
    result, results_dir = synthetic_result
    files = list(results_dir.glob("*/synthetic.json"))
    assert len(files) == 1 and files[0].parent.name == result["machine"]["slug"]
    stored = json.loads(files[0].read_text())
    validate(stored)
    assert stored == json.loads(json.dumps(result))
    assert stored["benchmark"] == "synthetic" and stored["device"] == "cpu" and stored["mode"] == "smoke"
    # The code's revision (HEAD, "+dirty" with local changes) and a UTC ISO-8601 time of this run.
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    if head.returncode == 0:
        assert stored["git_revision"] in (head.stdout.strip(), head.stdout.strip() + "+dirty")
    when = datetime.datetime.fromisoformat(stored["date"])
    assert when.utcoffset() == datetime.timedelta(0)
    assert abs((datetime.datetime.now(datetime.timezone.utc) - when).total_seconds()) < 3600
    assert stored["machine"]["cpu_cores"] >= 1 and stored["machine"]["llc_bytes"] > 0
    assert stored["software"]["torch"] == torch.__version__
    assert stored["software"]["cpu_kernel_isa"] in ("avx512", "avx2", "portable")
    assert stored["memory_bandwidth"]["bytes_per_s"] > 0
    assert len(stored["load_avg_1m"]) == 2
    assert [r["impl"] for r in stored["rows"]] == ["ours", "other"]
    row = stored["rows"][0]
    assert row["reps"] == 2 and row["min_ms"] <= row["median_ms"]
    assert row["floor_ms"] == pytest.approx(8192 / stored["memory_bandwidth"]["bytes_per_s"] * 1e3)
    # a smoke run's targets are never judged
    assert [t["met"] for t in stored["targets"]] == [None, None]
    broken = dict(stored, rows=[{"impl": "ours"}])
    with pytest.raises(ValueError, match=r"rows\[0\] must have keys"):
        validate(broken)
    with pytest.raises(ValueError, match="key 'git_revision' is missing"):
        validate({k: v for k, v in stored.items() if k != "git_revision"})


def _result_with(rows, targets=()):
    base = {
        "schema": 1, "benchmark": "t", "date": "2025-01-01T00:00:00+00:00", "git_revision": "abc", "device": "cpu",
        "mode": "full", "duration_s": 1.0, "load_avg_1m": [0.5, 0.7], "memory_bandwidth": {"bytes_per_s": 1e10}, "ring_bytes": 1,
        "machine": {"cpu": "cpu", "cpu_cores": 2, "gpu": None}, "software": {"torch": "x", "cpu_kernel_isa": "avx512"},
        "rows": rows, "targets": list(targets), "skipped": [], "notes": [],
    }
    return base


def _row(group, impl, median_ms, floor_ms=None, flops=None, bytes_moved=None):
    return {"group": group, "impl": impl, "dtype": "float32", "median_ms": median_ms, "min_ms": median_ms, "q1_ms": median_ms,
            "q3_ms": median_ms, "reps": 3, "bytes_moved": bytes_moved, "flops": flops, "floor_ms": floor_ms, "params": {}}


def test_table_ratio_math():
    result = _result_with([
        _row("g1", "dense", 6.0, floor_ms=1.5, flops=12 * 10**9),
        _row("g1", "ours", 2.0, floor_ms=0.5),
        _row("g2", "other", 3.0),  # no reference in this group
    ], [{"name": "n", "value": 0.31, "limit": 0.4, "sense": "<=", "unit": "x", "met": True, "note": ""}])
    (g1, rows1), (g2, rows2) = table_rows(result)
    assert (g1, g2) == ("g1", "g2")
    dense, ours = rows1
    assert dense[0] == "dense" and dense[3] == "3.00x" and dense[5] == "4.00x" and dense[6] == "2 TFLOP/s"
    assert ours[3] == "1.00x" and ours[5] == "4.00x"
    assert rows2[0][3] == "-"
    assert target_lines(result) == ["[MET] n: 0.31x (target <= 0.4x)"]
    text, md = render_text(result), render_markdown(result)
    assert "load average 0.5 -> 0.7" in text and "3.00x" in text and "| g1 | dense | 6.00 |" in md and md.count("| g1 |") == 1


def test_readme_rewrite(synthetic_result, tmp_path):
    result, results_dir = synthetic_result
    page = tmp_path / "README.md"
    page.write_text(f"# Bench\n\nhand-written intro\n\n{readme.BEGIN} old -->\nstale table\n{readme.END}\n\nhand-written outro\n")
    assert readme.rewrite(page, results_dir) is True
    text = page.read_text()
    assert "stale table" not in text
    assert text.startswith("# Bench\n\nhand-written intro\n\n" + readme.BEGIN_LINE)
    assert text.endswith(f"{readme.END}\n\nhand-written outro\n")
    assert f"### {result['machine']['slug']}" in text and "#### synthetic" in text
    assert render_markdown(result) in text
    assert readme.rewrite(page, results_dir) is False  # idempotent
    page.write_text("no markers\n")
    with pytest.raises(ValueError, match="needs a line starting with"):
        readme.rewrite(page, results_dir)
    # Pages are rewritten all or none: the first is left as it was when the second has no markers.
    page.write_text(f"{readme.BEGIN} old -->\nstale table\n{readme.END}\n")
    (tmp_path / "no_markers.md").write_text("none\n")
    with pytest.raises(ValueError, match="needs a line starting with"):
        readme.rewrite_pages([(page, False), (tmp_path / "no_markers.md", True)], results_dir)
    assert "stale table" in page.read_text()
    # A stored result damaged by hand is named in its place; the others are rendered.
    machine_dir = next(p for p in results_dir.iterdir() if p.is_dir())
    broken = json.loads((machine_dir / "synthetic.json").read_text())
    broken["rows"][0]["median_ms"] = None
    (machine_dir / "broken.json").write_text(json.dumps(broken))
    (machine_dir / "five.json").write_text("5")
    text = readme.render_results(results_dir)
    assert "broken.json: TypeError: " in text and "five.json: ValueError: benchmark result: must be a JSON object; got int" in text
    assert render_markdown(result) in text
    readme.render_status(results_dir)  # (skips them)


def test_readme_status_lists_every_target(synthetic_result, tmp_path):
    result, results_dir = synthetic_result
    page = tmp_path / "README.md"
    page.write_text(f"# Top\n\n## Status\n\n{readme.STATUS_BEGIN} -->\nhand-typed numbers\n{readme.STATUS_END}\n\nprose\n")
    assert readme.rewrite(page, results_dir, status=True) is True
    text = page.read_text()
    assert "hand-typed numbers" not in text and text.endswith(f"{readme.STATUS_END}\n\nprose\n")
    assert f"On {result['machine']['slug']} (bench/README.md has the tables):" in text
    assert "- synthetic (smoke run of " in text
    for line in target_lines(result):
        assert f"  - {line}\n" in text
    assert readme.rewrite(page, results_dir, status=True) is False  # idempotent
    with pytest.raises(ValueError, match="needs a line starting with '<!-- bench-results:begin'"):
        readme.rewrite(page, results_dir)  # the results section's markers are not there: named


@pytest.mark.parametrize("page, status", [("bench/README.md", False), ("README.md", True)])
def test_committed_readme_matches_committed_results(tmp_path, page, status):
    copy = tmp_path / "README.md"
    copy.write_text((REPO / page).read_text())
    assert readme.rewrite(copy, REPO / "bench" / "results", status=status) is False, f"{page} is stale: run `python -m bench readme`"


# -- registry and the model slot ---------------------------------------------------------------


def test_registry_resolves(monkeypatch, tmp_path):
    (tmp_path / "model_build.py").write_text("")
    (tmp_path / "model_train.py").write_text("")
    monkeypatch.setattr(registry, "_HERE", tmp_path)
    assert registry.resolve("codec") == [("codec", "bench.codec")]
    assert registry.resolve("model") == [("model_build", "bench.model_build"), ("model_train", "bench.model_train")]
    assert [name for name, _ in registry.resolve("all")] == ["codec", "linear", "model_build", "model_train"]
    assert registry.resolve("model_train") == [("model_train", "bench.model_train")]
    with pytest.raises(ValueError, match="unknown benchmark 'nope'; choose from codec, linear, model, all"):
        registry.resolve("nope")


def test_model_slot_runs_plain_scripts(tmp_path, monkeypatch):
    script = tmp_path / "model_fake_for_tests.py"
    script.write_text(textwrap.dedent("""
        import argparse, json, os, sys
        if __name__ == "__main__":
            p = argparse.ArgumentParser()
            p.add_argument("--device"); p.add_argument("--out"); p.add_argument("--quick", action="store_true"); p.add_argument("--smoke", action="store_true")
            a = p.parse_args()
            print(f"table of the fake benchmark on {a.device}, quick={a.quick}")
            with open(os.path.join(a.out, "model_fake_for_tests.json"), "w") as f:
                json.dump({"tokens_per_s": 123, "targets": [
                    {"name": "fast", "value": 2.5, "sense": ">=", "limit": 2.0, "unit": "x", "note": "at most 3x"},
                    {"name": "small", "value": None, "sense": "<=", "limit": 1.0, "unit": "GB"}]}, f)
            sys.exit(3 if a.smoke else 0)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "out"
    out.mkdir()
    report = runner("model_fake_for_tests", out)(Context("cpu", "quick", ring_bytes=1 << 16))
    assert report.script["results"]["model_fake_for_tests.json"]["tokens_per_s"] == 123
    # the script's targets are the benchmark's: judged, or "not measured" without a value
    assert [(t.name, t.met) for t in report.targets] == [("fast", True), ("small", None)]
    assert report.targets[1].note == "not measured in this run"
    assert report.targets[0].note == "at most 3x"  # a measured target keeps the script's note
    assert report.script["stdout"] == "table of the fake benchmark on cpu, quick=True\n"
    assert report.script["command"] == "python bench/model_fake_for_tests.py --device cpu --quick --out DIR"
    assert list(out.iterdir()) == []  # the script's scratch folder is gone; the harness writes the result
    text = render_markdown(_result_with([]) | report.to_dict())
    assert "```\ntable of the fake benchmark on cpu, quick=True\n```" in text
    with pytest.raises(RuntimeError, match="exited with status 3"):
        runner("model_fake_for_tests", out)(Context("cpu", "smoke", ring_bytes=1 << 16))


def test_a_script_that_measures_nothing_leaves_no_result(tmp_path, monkeypatch):
    """model_seed_7b on a CPU only says that its figures are GPU figures: no result file for that."""
    script = tmp_path / "model_gpu_only_for_tests.py"
    script.write_text(textwrap.dedent("""
        import argparse
        if __name__ == "__main__":
            p = argparse.ArgumentParser()
            p.add_argument("--device"); p.add_argument("--out"); p.add_argument("--quick", action="store_true")
            p.parse_args()
            print("GPU figures: nothing to compare on a CPU")
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    results = tmp_path / "results"
    ctx = Context("cpu", "quick", ring_bytes=1 << 16)
    assert run_one("model_gpu_only_for_tests", "model_gpu_only_for_tests", ctx, results) is None
    assert [p for p in results.rglob("*") if p.is_file()] == []


# -- the command line and gpu_check.sh ---------------------------------------------------------


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH"), str(REPO)) if p)
    return env


def test_cli_arguments():
    assert parse_args([]).benchmark == ["all"]
    args = parse_args(["codec", "linear", "--smoke", "--device", "cpu"])
    assert args.benchmark == ["codec", "linear"] and args.smoke and args.device == "cpu"
    with pytest.raises(SystemExit):
        parse_args(["nope"])
    with pytest.raises(SystemExit):
        parse_args(["--quick", "--smoke"])
    for bad in ("0", "-5"):  # 0 silently meant the default; -5 was stored as a negative ring size
        with pytest.raises(SystemExit):
            parse_args(["codec", "--ring-mib", bad])
    assert parse_args(["codec", "--ring-mib", "3"]).ring_mib == 3


def test_result_files_are_written_whole(tmp_path, monkeypatch):
    from bench.files import write_text_atomic

    path = tmp_path / "codec.json"
    write_text_atomic(path, "old\n")

    def interrupted(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_text_atomic(path, "new, cut short\n")
    monkeypatch.undo()
    assert path.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["codec.json"]
    write_text_atomic(path, "new\n")
    assert path.read_text() == "new\n"


def test_cli_refuses_gpu_device_without_one():
    import qlora_ext._extension as ext

    if ext.WITH_CUDA and torch.cuda.is_available():
        pytest.skip("a CUDA device is usable here")
    proc = subprocess.run([sys.executable, "-m", "bench", "codec", "--device", "cuda"], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2  # a usage error, not a failed benchmark (1) nor a missed target (3)
    assert "python -m bench: error: argument --device: cuda, but" in proc.stderr


def test_cli_usage_errors_are_named_with_status_2(tmp_path, capsys):
    from bench.__main__ import main

    (tmp_path / "a_file").write_text("")
    for argv, needle in (
        (["readme", "--quick"], "'readme' renders bench/results/ as stored and takes none of --quick"),
        (["readme", "codec"], "'readme' only re-renders bench/README.md and README.md's status; give it alone"),
        (["codec", "--smoke", "--device", "cpu", "--out", str(tmp_path / "a_file")],
         f"argument --out: cannot make the results folder {tmp_path / 'a_file'}/"),
    ):
        assert main(argv) == 2, argv
        assert f"python -m bench: error: {needle}" in capsys.readouterr().err


def test_a_result_that_cannot_be_written_keeps_its_table_and_a_relative_out_is_the_callers(tmp_path, monkeypatch, capsys):
    # A write failure lost the measured table with a traceback; a model script, run in the
    # checkout, wrote a relative --out there while the harness looked in the caller's folder.
    import bench.__main__ as cli

    module = types.ModuleType("bench_synthetic_for_tests")
    module.run = _synthetic_run
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setattr(registry, "resolve", lambda name: [(name, module.__name__)])
    monkeypatch.chdir(tmp_path)
    assert cli.main(["codec", "--smoke", "--device", "cpu", "--out", "rel"]) == 0
    stored = list((tmp_path / "rel").glob("*/codec.json"))
    assert len(stored) == 1 and json.loads(stored[0].read_text())["benchmark"] == "codec"
    capsys.readouterr()

    def full(result, out_root):
        raise OSError(28, "No space left on device", str(out_root / "x" / "codec.json"))

    monkeypatch.setattr(cli, "store", full)
    assert cli.main(["codec", "--smoke", "--device", "cpu", "--out", "rel"]) == 1
    out = capsys.readouterr()
    assert "scale 1024 fp32" in out.out  # the table
    slug = machine.machine_slug("cpu")  # the result's path, not the temporary the error names
    assert f"BENCHMARK RESULT NOT WRITTEN: codec: cannot write {tmp_path / 'rel' / slug / 'codec.json'}: No space left on device" in out.out
    assert "Traceback" not in out.out + out.err


def test_a_model_script_runs_with_the_harness_qlora_ext_and_cpu_kernels(monkeypatch):
    # The scripts put the checkout first: with the package installed and no in-place build they
    # failed to import it; and --cpu-isa reached the harness only, while the header credited them.
    import qlora_ext
    from bench.model import _script_environment
    from qlora_ext import ops

    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    env = _script_environment()
    assert env["PYTHONPATH"].split(os.pathsep) == [str(Path(qlora_ext.__file__).resolve().parent.parent), "/elsewhere"]
    assert env["QLORA_CPU_ISA"] == ops.cpu_kernel_isa()


def test_the_git_revision_is_the_checkouts_own(tmp_path, monkeypatch):
    # QLORA_BENCH_GIT_REVISION named a revision even in a checkout with local changes, and a copy
    # inside another repository took that repository's HEAD.
    monkeypatch.setenv("QLORA_BENCH_GIT_REVISION", "copied-sha")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    if head.returncode == 0 and Path(subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=REPO, capture_output=True,
                                                    text=True).stdout.strip()).resolve() == REPO.resolve():
        assert machine.git_revision() in (head.stdout.strip(), head.stdout.strip() + "+dirty")
    if shutil.which("git") is None:
        pytest.skip("no git")
    outer = tmp_path / "outer"
    (outer / "copy").mkdir(parents=True)
    subprocess.run(["git", "init", "-q", str(outer)], check=True)
    monkeypatch.setattr(machine, "REPO", outer / "copy")
    assert machine.git_revision() == "copied-sha"
    monkeypatch.delenv("QLORA_BENCH_GIT_REVISION")
    assert machine.git_revision() == "unknown (no git checkout)"


def test_a_test_that_needs_a_gpu_must_be_named_cuda():
    # gpu_check.sh runs `pytest -k cuda`: a GPU test without "cuda" in its name would never run.
    import conftest

    class Item:  # what the collection hook reads of a pytest item
        nodeid = name = "test_moves_to_the_gpu"

        def iter_markers(self, name):
            return [conftest.needs_cuda.mark] if name == "skipif" else []

    with pytest.raises(pytest.UsageError, match="test_moves_to_the_gpu"):
        conftest.pytest_collection_modifyitems(None, [Item()])
    Item.name = "test_moves_to_cuda"
    conftest.pytest_collection_modifyitems(None, [Item()])


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    env = _env()
    env["PYTHON"] = sys.executable
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--dry-run", str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "gpu_check: all steps passed" in proc.stdout
    results = sorted(tmp_path.glob("results/*/*.json"))
    assert {p.stem for p in results} >= {"codec", "linear"}
    for path in results:
        validate(json.loads(path.read_text()))


@pytest.mark.slow
def test_training_benchmarks_run(tmp_path):
    # Smoke runs of the two training benchmarks (the GPU check's last steps), every stack: ours
    # eager and compiled give the same losses on the same weights and batch, and the JSON says so.
    env = _env()
    for script, extra in (("model_train.py", []), ("model_seed_7b.py", [])):
        proc = subprocess.run([sys.executable, str(REPO / "bench" / script), "--smoke", "--out", str(tmp_path), *extra],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    train = json.loads((tmp_path / "model_train.json").read_text())["configs"]["tiny"]
    assert train["qlora_ext"]["tokens_per_s"] > 0 and train["qlora_ext_compiled"]["first_step_s"] > 0
    targets = json.loads((tmp_path / "model_train.json").read_text())["targets"]
    assert [(t["name"], t["limit"]) for t in targets] == [
        ("train tiny qlora_ext: tokens/s over hf_peft_bnb", 2.0), ("train tiny qlora_ext_compiled: tokens/s over hf_peft_bnb", 2.0)
    ]
    # HF + PEFT + bitsandbytes (test dependencies) runs too, so its stack cannot rot unnoticed; where
    # one of them is not installed (the GPU image has no bitsandbytes until bench/stage_gpu_deps.sh
    # carries it) the row says how to install it and the targets have no value.
    hf = train["hf_peft_bnb"]
    hf_installed = all(importlib.util.find_spec(name) for name in ("transformers", "peft", "bitsandbytes"))
    if hf_installed:
        assert hf.get("tokens_per_s", 0) > 0 and 0 < hf["peak_memory_gb"] < 20, hf
        assert all(t["value"] > 0 for t in targets), targets
    else:
        assert hf["status"] == "skipped" and "pip install transformers peft bitsandbytes" in hf["reason"], hf
        assert all(t["value"] is None for t in targets), targets
    # torchtune is not a test dependency (it pulls in datasets): it runs, or says how to install it
    tune = train["torchtune_torchao"]
    assert tune.get("tokens_per_s", 0) > 0 and train["ratio_vs_torchtune_torchao"] > 0 or (
        tune["status"] == "skipped" and "pip install torchtune" in tune["reason"]), tune
    for stack in ("qlora_ext", "lora_dense"):
        assert 0 < train[stack]["peak_memory_gb"] < 20
    assert train["ratio_vs_lora_dense"] > 0
    # the floor: our step's FLOPs (the same as plain LoRA's) at the measured matrix rate
    assert train["flops_per_step"]["qlora_ext"] == train["flops_per_step"]["lora_dense"] > 0
    # (floor_s below the measured step is a timing, which tests do not judge: on a loaded machine the
    # matrix rate behind the floor and the step are measured at different moments)
    assert train["floor_s"] > 0
    if hf_installed:  # the largest ratio over HF that a step of our FLOPs can reach at that rate
        assert train["best_ratio_vs_hf_peft_bnb"] > 0 and "at most" in targets[0]["note"]
    seed = json.loads((tmp_path / "model_seed_7b.json").read_text())
    eager, compiled = seed["cases"]["eager"], seed["cases"]["compiled"]
    assert seed["arch"] == "tiny" and eager["it_per_s"] > 0 and compiled["it_per_s"] > 0
    assert eager["losses"] == pytest.approx(compiled["losses"], rel=1e-4)
    # Both files are what the harness reads (python -m bench model_*, as gpu_check.sh runs them).
    for name, content in (("model_train.json", json.loads((tmp_path / "model_train.json").read_text())), ("model_seed_7b.json", seed)):
        assert len(script_targets(name.replace(".json", ".py"), name, content)) == len(content["targets"])


def test_seed_7b_gpu_targets_are_read_by_the_harness():
    # On a GPU the seed benchmark judges its memory targets; the harness used to fail on them
    # (a dict where it reads a list) after both 7B runs had finished.
    from bench.model_seed_7b import TARGETS, harness_targets

    measured = {"reserved_after_init_gb": 3.9, "reserved_training_gb": 7.5}
    targets = script_targets("model_seed_7b.py", "model_seed_7b.json", {"targets": harness_targets("eager", measured)})
    assert [(t.name, t.value, t.limit, t.met) for t in targets] == [
        ("seed 7B eager: reserved_after_init", 3.9, TARGETS["reserved_after_init_gb"], True),
        ("seed 7B eager: reserved_training", 7.5, TARGETS["reserved_training_gb"], False),
    ]
    with pytest.raises(RuntimeError, match=r"model_seed_7b.py wrote model_seed_7b.json with 'targets' that is not a list"):
        script_targets("model_seed_7b.py", "model_seed_7b.json", {"targets": TARGETS})


def test_training_speedup_is_judged_on_the_lower_of_median_and_fastest_steps():
    from bench.model_train import judged_speedup

    def result(steps):
        return {"step_s": steps, "tokens_per_s": 512 / sorted(steps)[len(steps) // 2]}

    steady_ours = [result([1.0, 1.01, 1.02]), result([1.0, 1.0, 1.03]), result([1.01, 1.02, 1.0])]
    # HF's steps wander in two of three rounds: the median steps would give 1.8x, the fastest 1.2x.
    wandering = [result([2.2, 1.2, 1.8, 1.9]), result([1.2, 1.85, 2.0]), result([1.21, 1.22, 1.2])]
    judged, by_median, by_fastest, per_round, fastest = judged_speedup(steady_ours, wandering)
    assert by_median == pytest.approx(1.8, rel=0.03) and by_fastest == pytest.approx(1.2, rel=0.01)
    assert judged == by_fastest and len(per_round) == len(fastest) == 3
    # the other way round: our own wandering steps do not count for us either
    judged, by_median, by_fastest, _, _ = judged_speedup(wandering, steady_ours)
    assert judged == by_median == pytest.approx(1 / 1.8, rel=0.03) and by_fastest > judged


def test_flop_count_of_qlora_linear_ops_and_cpu_attention():
    # bench/flops.py teaches torch's FlopCounterMode the ops it does not know: the NF4 linear, its
    # input gradient (2 * M * in * out each) and CPU flash attention (causal: half the product).
    import qlora_ext
    from bench import flops

    w = qlora_ext.to_nf4(torch.randn(96, 128))
    x = torch.randn(2, 3, 128, requires_grad=True)
    assert flops.count(lambda: qlora_ext.linear_nf4(x, w)) == 2 * 6 * 128 * 96
    assert flops.count(lambda: qlora_ext.linear_nf4(x, w).sum().backward()) == 2 * (2 * 6 * 128 * 96)
    q, k, v = (torch.randn(2, 4, 32, 16, requires_grad=True) for _ in range(3))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    full = flops.count(lambda: sdpa(q, k, v))
    assert full == 2 * (2 * 8 * 32 * 32 * 16)  # q @ k^T and p @ v
    assert flops.count(lambda: sdpa(q, k, v, is_causal=True)) == full // 2
    backward = 5 * full // 2  # torch's formula: the scores recomputed, then four products
    assert flops.count(lambda: sdpa(q, k, v, is_causal=True).sum().backward()) == (full + backward) // 2
    # Grouped-query heads (enable_gqa, as MultiHeadAttention passes them) count as the expanded
    # heads, on every torch (2.11's own formulas refuse the shapes)
    k2, v2 = (torch.randn(2, 2, 32, 16, requires_grad=True) for _ in range(2))
    assert flops.count(lambda: sdpa(q, k2, v2, is_causal=True, enable_gqa=True).sum().backward()) == (full + backward) // 2


def test_flop_count_of_a_qlora_training_step_equals_plain_loras(monkeypatch):
    # The floor of bench/model_train.py counts our QLoRA step; the same model with a dense base
    # (aten matmuls, which torch counts itself) must come to the same FLOPs.
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    from bench import flops
    from model_train import qlora_ext_step

    arch = dict(vocab_size=64, num_layers=1, num_heads=2, num_kv_heads=1, embed_dim=64, intermediate_dim=128)
    counts = []
    for quantize in (True, False):
        step, _ = qlora_ext_step(arch, 2, 16, torch.device("cpu"), torch.float32, quantize_base=quantize)
        counts.append(flops.count(step))
    assert counts[0] == counts[1] > 4 * 2 * 16 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128 + 64 * 64)


def test_matrix_rate_is_measured():
    from bench import flops

    rate = flops.matrix_rate(torch.device("cpu"), size=128, reps=2)
    assert rate["flops_per_s"] > 1e6 and "torch.mm 128x128 float32" in rate["how"]


def test_fuzz_ops_passes_its_cases_and_reports_a_wrong_result(monkeypatch, capsys):
    # bench/fuzz_ops.py (run by gpu_check.sh on the GPU): random cases pass on this CPU, and a
    # forward that is off by 1% fails, naming the case and how to run it again.
    from bench import fuzz_ops

    assert fuzz_ops.main(["--cases", "25", "--seed", "11"]) == 0
    assert "25 cases from seed 11" in capsys.readouterr().out
    # 464 x 100 at 6 rows: our BLAS call on the decoded weight erred 2.3x torch's F.linear on the
    # 2-core EPYC, a different blocking of the same sum; against torch's worst of four orders, in.
    assert fuzz_ops.main(["--cases", "1", "--seed", "0", "--first", "1102"]) == 0
    real = fuzz_ops.linear_nf4
    monkeypatch.setattr(fuzz_ops, "linear_nf4", lambda x, nf4, bias=None: real(x, nf4, bias) * 1.01)
    assert fuzz_ops.main(["--cases", "2", "--seed", "11", "--first", "5"]) == 1
    out = capsys.readouterr().out
    assert "case 5 (--seed 11 --first 5 --cases 1)" in out and "forward: error" in out
