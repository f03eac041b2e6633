"""Schedules, optimizer choice, metric loggers, memory stats, the loss-curve PNG and plot CLI,
atomic writes and the training-state file."""

from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
import struct
import sys
import zlib
from pathlib import Path

import pytest
import torch

from qlora_ext import plot
from qlora_ext.training import checkpoint_folders
from qlora_ext.training import checkpointing as ckpt
from qlora_ext.training.loss_plot import Curve, builtin_renderer_note, plot_loss_curves, smooth
from qlora_ext.training.memory import format_memory_stats, memory_stats
from qlora_ext.training.metric_logging import DiskLogger, MetricLoggers, MissingDependencyError, read_metrics
from qlora_ext.training.optim import build_optimizer, build_scheduler, cosine_with_warmup, warmup_note


def test_warmup_note_when_the_warmup_outlasts_the_run():
    assert warmup_note(num_warmup_steps=100, num_training_steps=101, lr=3e-4) is None
    assert warmup_note(num_warmup_steps=0, num_training_steps=1, lr=3e-4) is None
    # the last step (index 9) runs at 9/20 of the peak, as the schedule gives it
    note = warmup_note(num_warmup_steps=20, num_training_steps=10, lr=2e-3)
    assert note == ("lr_scheduler.num_warmup_steps=20 is not below the run's 10 optimizer steps: the learning rate never "
                    "reaches optimizer.lr=0.002 (the last step runs at 0.0009)")
    assert 2e-3 * cosine_with_warmup(9, num_warmup_steps=20, num_training_steps=10) == pytest.approx(9e-4)
    assert warmup_note(num_warmup_steps=1, num_training_steps=1, lr=1e-3).endswith(
        "the run's 1 optimizer step: the learning rate never reaches optimizer.lr=0.001 (the last step runs at 0, so the adapters do not change)")


def test_cosine_with_warmup_shape():
    f = lambda s: cosine_with_warmup(s, num_warmup_steps=10, num_training_steps=110)  # noqa: E731
    assert f(0) == 0.0 and f(5) == pytest.approx(0.5) and f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.5) and f(110) == pytest.approx(0.0, abs=1e-12)
    assert all(f(s) >= f(s + 1) for s in range(10, 110))


def test_scheduler_drives_lr_and_round_trips():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = build_optimizer([p], lr=1.0, weight_decay=0.0, betas=[0.9, 0.99], eps=1e-8, fused=None, device=torch.device("cpu"))
    assert opt.defaults["fused"] is True  # the fused kernel by default on CPU (and CUDA)
    sched = build_scheduler(opt, "cosine_with_warmup", num_warmup_steps=4, num_training_steps=20, num_cycles=0.5)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:5] == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    opt2 = build_optimizer([p], lr=1.0, weight_decay=0.0, betas=[0.9, 0.99], eps=1e-8, fused=None, device=torch.device("cpu"))
    sched2 = build_scheduler(opt2, "cosine_with_warmup", num_warmup_steps=4, num_training_steps=20, num_cycles=0.5)
    sched2.load_state_dict(sched.state_dict())
    assert sched2.get_last_lr() == sched.get_last_lr()


def test_disk_logger_appends_and_truncates_on_resume(tmp_path):
    log = DiskLogger(tmp_path)
    for s in range(1, 6):
        log.log({"loss": 1.0 / s}, step=s)
    log.close()
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4, 5]
    resumed = DiskLogger(tmp_path, resume_step=3)
    resumed.log({"loss": 9.0}, step=4)
    resumed.close()
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path)][-2:] == [(3, 1 / 3), (4, 9.0)]
    fresh = DiskLogger(tmp_path)  # a new run starts a new file, but only once it logs or closes
    assert len(read_metrics(tmp_path)) == 4  # a run failing in setup leaves the earlier log
    fresh.close()
    assert read_metrics(tmp_path) == []


def test_disk_logger_names_its_file_when_closing_it_fails(tmp_path, monkeypatch):
    # a full disk met by the fsync at the end of a run gave an OSError naming no file
    from qlora_ext.training import metric_logging

    log = DiskLogger(tmp_path)
    log.log({"loss": 1.0}, step=1)

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(metric_logging.os, "fsync", full)
    with pytest.raises(OSError, match=r"No space left on device \(writing the metrics log\)") as raised:
        log.close()
    assert raised.value.filename == str(tmp_path / "metrics.jsonl")
    log.close(failed=True)  # (after a failure: quiet, closed, the records kept)
    assert log._file.closed
    monkeypatch.undo()
    assert [r["step"] for r in read_metrics(tmp_path)] == [1]


def test_a_resume_into_an_empty_log_dir_restores_the_saved_log_quietly(tmp_path, capsys):
    # A new metric_logger.log_dir on resume (logging settings may change), or a deleted log: the
    # checkpoint's records fill it in, with no warning of another run's records.
    saved_log = "".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (1, 2, 3))
    resumed = DiskLogger(tmp_path / "new_logs", resume_step=3, resume_log=saved_log)
    resumed.log({"loss": 0.25}, step=4)
    resumed.close()
    assert capsys.readouterr().err == ""
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "new_logs")] == [(1, 1.0), (2, 0.5), (3, 1 / 3), (4, 0.25)]


def test_metrics_of_a_run_with_its_own_log_dir_are_found(tmp_path, monkeypatch):
    """A run that set metric_logger.log_dir (README: 'metric_logger.log_dir=${output_dir}/tb')
    keeps its metrics there; its output_dir still names the run: read_metrics (and so
    python -m qlora_ext.plot RUN_DIR) follows the run's config.yaml, inside the run folder
    wherever it now is, or to a log_dir outside it."""
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "moved" / "run_b"  # trained as qlora_output/run_b, then moved
    (run / "tb").mkdir(parents=True)
    (run / "config.yaml").write_text("output_dir: qlora_output/run_b\nmetric_logger:\n  type: disk\n  log_dir: qlora_output/run_b/tb\n")
    log = DiskLogger(run / "tb")
    log.log({"loss": 1.5}, step=1)
    log.close()
    assert [r["loss"] for r in read_metrics(run)] == [1.5]
    earlier = DiskLogger(run / "logs")  # an earlier run in the same folder, with the default log_dir
    earlier.log({"loss": 0.5}, step=1)
    earlier.close()
    assert [r["loss"] for r in read_metrics(run)] == [1.5]  # config.yaml is the latest run's
    outside = tmp_path / "elsewhere"
    log = DiskLogger(outside)
    log.log({"loss": 2.5}, step=1)
    log.close()
    (run / "config.yaml").write_text(f"output_dir: qlora_output/run_b\nmetric_logger:\n  log_dir: {outside}\n")
    assert [r["loss"] for r in read_metrics(run)] == [2.5]
    (run / "config.yaml").write_text("output_dir: qlora_output/run_b\nmetric_logger:\n  log_dir: qlora_output/run_b/gone\n")
    assert [r["loss"] for r in read_metrics(run)] == [0.5]  # the configured folder is gone: the run folder's logs/
    (run / "logs" / "metrics.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match=r"no metrics.jsonl in .*run_b, .*run_b/gone \(its config.yaml's metric_logger.log_dir\) or .*run_b/logs: "
                       r"give a training run's output_dir, or the folder holding its metrics.jsonl"):
        read_metrics(run)


def test_a_relative_log_dir_outside_the_run_is_recorded_absolute(tmp_path, monkeypatch):
    # config.yaml kept metric_logger.log_dir=tb as given: the plot, run from another folder, read
    # the run folder's logs/ of an earlier run instead, and said nothing.
    import yaml

    from qlora_ext.training.config import load_config
    from qlora_ext.training.saving import resolved_yaml

    monkeypatch.chdir(tmp_path)
    for log_dir, recorded in (("tb", str(tmp_path / "tb")), ("../tb", str(tmp_path.parent / "tb")),
                              ("runB/tb", "runB/tb"), (str(tmp_path / "abs"), str(tmp_path / "abs"))):
        cfg = load_config("tiny_qlora", ["output_dir=runB", f"metric_logger.log_dir={log_dir}"])
        assert yaml.safe_load(resolved_yaml(cfg, 7))["metric_logger"]["log_dir"] == recorded


def test_disk_logger_survives_a_killed_writer(tmp_path, capsys, monkeypatch):
    log = DiskLogger(tmp_path)
    for s in range(1, 6):
        log.log({"loss": 1.0 / s}, step=s)
    log.close()
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(path.read_bytes()[:-9] + b"\x00\x00\x00")  # killed mid-line (power loss: NULs)
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4]  # the plot still reads it
    assert "skipped 1 line(s) that are not JSON records (lines [5]" in capsys.readouterr().err
    resumed = DiskLogger(tmp_path, resume_step=4)
    assert "skipped 1 line(s)" in capsys.readouterr().err  # said at setup, before the first step's log (under tqdm's bar)
    resumed.log({"loss": 9.0}, step=5)
    assert capsys.readouterr().err == ""
    resumed.close()
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path)][-2:] == [(4, 1 / 4), (5, 9.0)]
    assert b"\x00" not in path.read_bytes()

    # The resume rewrite is atomic: interrupted while writing, the old file is whole.
    before = path.read_bytes()

    def interrupted(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        DiskLogger(tmp_path, resume_step=2).log({"loss": 1.0}, step=3)
    monkeypatch.undo()
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]


@pytest.mark.parametrize("kind, package", [("tensorboard", "tensorboard"), ("wandb", "wandb")])
def test_optional_loggers_say_what_to_install(tmp_path, kind, package, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_optional(name, *args, **kwargs):
        if name.startswith(package) or name == "torch.utils.tensorboard":
            raise ImportError(f"No module named {name}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_optional)
    with pytest.raises(MissingDependencyError, match=rf"metric_logger.type={kind} needs the {package} package: pip install {package}"):
        MetricLoggers(kind, tmp_path)


def test_memory_stats_on_cpu(monkeypatch):
    stats = memory_stats(torch.device("cpu"))
    assert 0.0 < stats["rss_memory"] <= stats["peak_rss_memory"] * 1.01 + 0.01
    # the peak (ru_maxrss) can lag the current size (statm): never reported below it
    from qlora_ext.training import memory

    monkeypatch.setattr(memory, "_peak_rss_bytes", lambda: 100 << 20)
    monkeypatch.setattr(memory, "_current_rss_bytes", lambda: 101 << 20)
    assert memory_stats(torch.device("cpu")) == {"rss_memory": (101 << 20) / 1e9, "peak_rss_memory": (101 << 20) / 1e9}
    # in GB (1e9 bytes), as the seed tutorial's torchtune printed them
    text = format_memory_stats({"peak_memory_reserved": 9.29, "rss_memory": 1.5}, "after model init")
    assert text == "Memory Stats after model init::\nGPU peak memory reserved: 9.29 GB\nCPU resident memory: 1.50 GB"


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and zlib.crc32(data[12 : 16 + length]) & 0xFFFFFFFF == struct.unpack(">I", data[16 + length : 20 + length])[0]
    return struct.unpack(">II", data[16:24])


def test_builtin_png_loss_curve(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda n, *a, **k: (_ for _ in ()).throw(ImportError(n)) if n == "matplotlib" else real_import(n, *a, **k))
    curve = Curve("run", list(range(1, 51)), [3.0 * math.exp(-s / 10) + 0.1 for s in range(1, 51)])
    path = tmp_path / "loss.png"
    assert plot_loss_curves([curve], path) == "built-in"
    assert _png_size(path) == (800, 480)
    # the image is not blank: some pixels carry the first curve's colour
    idat = re.search(rb"IDAT(.*)", path.read_bytes(), re.S).group(1)
    pixels = zlib.decompressobj().decompress(idat)
    assert bytes((31, 119, 180)) in pixels
    # a write that fails (here: a folder holds the name) leaves no partial file behind
    blocked = tmp_path / "blocked"
    (blocked / "loss.png").mkdir(parents=True)
    with pytest.raises(OSError):
        plot_loss_curves([curve], blocked / "loss.png")
    assert [p.name for p in blocked.iterdir()] == ["loss.png"]
    # a run that logged one loss (max_steps_per_epoch=1): its point is drawn, not an empty frame
    lone = tmp_path / "lone.png"
    plot_loss_curves([Curve("run", [6], [2.0])], lone)
    rows = zlib.decompressobj().decompress(re.search(rb"IDAT(.*)", lone.read_bytes(), re.S).group(1))

    def pixel(x, y):  # rows of a filter byte and 800 RGB pixels
        start = y * (1 + 800 * 3) + 1 + 3 * x
        return tuple(rows[start : start + 3])

    # the point sits in the middle of the frame (x ticks 2..10 around step 6, y ticks 1..3 around
    # 2.0), not on its lower left corner: a 7x7 square there
    middle_x, middle_y = (80 + 800 - 24) // 2, (56 + 480 - 56) // 2
    assert all(pixel(middle_x + dx, middle_y + dy) == (31, 119, 180) for dx in range(-3, 4) for dy in range(-3, 4))
    assert pixel(80, 480 - 56) != (31, 119, 180)


def test_the_builtin_renderer_says_why_matplotlib_was_not_used(monkeypatch):
    # Not installed, and installed but failing to import (matplotlib 3.6 built against NumPy 1,
    # under NumPy 2, raised an ImportError at import): each note says which, and what draws more.
    import builtins

    real_import = builtins.__import__

    def importing(error):
        return lambda n, *a, **k: (_ for _ in ()).throw(error) if n == "matplotlib" else real_import(n, *a, **k)

    monkeypatch.setattr(builtins, "__import__", importing(ModuleNotFoundError("No module named 'matplotlib'", name="matplotlib")))
    assert builtin_renderer_note() == (
        "matplotlib is not installed, so the built-in PNG writer drew it; pip install matplotlib for a richer plot"
    )
    monkeypatch.setattr(builtins, "__import__", importing(ImportError("numpy.core.multiarray failed to import")))
    assert builtin_renderer_note() == (
        "matplotlib could not be imported (ImportError: numpy.core.multiarray failed to import), so the built-in PNG "
        "writer drew it; pip install -U matplotlib (one built for the installed NumPy) for a richer plot"
    )
    # a module matplotlib itself needs, missing, is not matplotlib missing
    monkeypatch.setattr(builtins, "__import__", importing(ModuleNotFoundError("No module named 'pyparsing'", name="pyparsing")))
    assert builtin_renderer_note().startswith("matplotlib could not be imported (ModuleNotFoundError: No module named 'pyparsing')")


def test_smoothing():
    assert smooth([1.0, 1.0, 1.0], 0.9) == pytest.approx([1.0, 1.0, 1.0])  # debiased: no pull to zero
    assert smooth([0.0, 10.0], 0.0) == [0.0, 10.0]
    # a NaN is passed through and the average goes on past it
    got = smooth([1.0, float("nan"), 1.0, 3.0], 0.5)
    assert math.isnan(got[1]) and got[0] == got[2] == 1.0 and got[3] == pytest.approx(1.875 / 0.875)


def test_plot_reads_the_metrics_of_a_run_whose_config_or_a_line_is_unreadable(tmp_path, capsys):
    # a config.yaml not in UTF-8, or nested past Python's recursion limit, and a metrics line nested so,
    # were an error naming no file, or a RecursionError: the saved config is only consulted for logs
    (tmp_path / "run" / "logs").mkdir(parents=True)
    lines = [json.dumps({"step": s, "loss": 2.0 / s}) for s in (1, 2)]
    (tmp_path / "run" / "logs" / "metrics.jsonl").write_text("\n".join([lines[0], "[" * 100_000 + "]" * 100_000, lines[1]]) + "\n")
    out = tmp_path / "p.png"
    for config in ("output_dir: caf\xe9\n".encode("latin-1"), b"a: " + b"[" * 5000 + b"]" * 5000 + b"\n"):
        (tmp_path / "run" / "config.yaml").write_bytes(config)
        assert plot.main([str(tmp_path / "run"), "-o", str(out)]) == 0
        captured = capsys.readouterr()
        assert "run: 2 steps, loss 2.0000 -> 1.0000" in captured.out
        assert "metrics.jsonl: skipped 1 line(s) that are not JSON records (lines [2]" in captured.err


def test_plot_cli_two_runs(tmp_path, capsys):
    for name, scale in (("lora", 1.0), ("qlora", 1.2)):
        (tmp_path / name / "logs").mkdir(parents=True)
        with open(tmp_path / name / "logs" / "metrics.jsonl", "w") as f:
            for s in range(1, 21):
                f.write(json.dumps({"step": s, "loss": scale / s, "lr": 0.1}) + "\n")
    out = tmp_path / "both.png"
    assert plot.main([str(tmp_path / "lora"), str(tmp_path / "qlora"), "-o", str(out)]) == 0
    assert out.is_file() and "lora: 20 steps" in capsys.readouterr().out
    # a run given by its logs folder or its metrics file is labelled with the run's name; one step is "1 step"
    assert plot.load_curve(str(tmp_path / "lora" / "logs")).label == "lora"
    assert plot.load_curve(str(tmp_path / "qlora" / "logs" / "metrics.jsonl")).label == "qlora"
    (tmp_path / "one" / "logs").mkdir(parents=True)
    (tmp_path / "one" / "logs" / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n")
    assert plot.main([str(tmp_path / "one"), "-o", str(out)]) == 0
    assert "one: 1 step, loss 2.0000" in capsys.readouterr().out
    assert plot.main([str(tmp_path / "nothing"), "-o", str(out)]) == 2
    # -o in a folder that does not exist yet: created; under a file, or a folder itself: an error naming -o
    assert plot.main([str(tmp_path / "lora"), "-o", str(tmp_path / "new" / "sub" / "lora.png")]) == 0
    assert (tmp_path / "new" / "sub" / "lora.png").is_file()
    capsys.readouterr()
    assert plot.main([str(tmp_path / "lora"), "-o", str(out / "x.png")]) == 2
    assert f"argument -o/--output: cannot write '{out / 'x.png'}': '{out}' exists and is not a folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        plot.main([str(tmp_path / "lora"), "-o", str(tmp_path / "new")])
    assert f"argument -o/--output: '{tmp_path / 'new'}' is a folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        plot.main([str(tmp_path / "lora"), "--smoothing", "1.5"])
    with pytest.raises(SystemExit):
        plot.main([str(tmp_path / "lora"), "-o", str(tmp_path / "curve.svg")])
    assert "the name must be a name ending in .png; got" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # (Path(".png").suffix is "")
        plot.main([str(tmp_path / "lora"), "-o", str(tmp_path / ".png")])
    assert f"the name must be a name ending in .png; got '{tmp_path / '.png'}'" in capsys.readouterr().err
    # A link is written through (it was replaced by a file, its target left stale).
    (tmp_path / "pictures").mkdir()
    (tmp_path / "latest.png").symlink_to(tmp_path / "pictures" / "run.png")
    assert plot.main([str(tmp_path / "lora"), "-o", str(tmp_path / "latest.png")]) == 0
    assert (tmp_path / "latest.png").is_symlink() and (tmp_path / "pictures" / "run.png").is_file()
    # one run given twice (as its folder and as its logs): refused, both named; two runs of one name
    # (in different folders) are labelled with their parent folders
    assert plot.main([str(tmp_path / "lora"), str(tmp_path / "qlora"), str(tmp_path / "lora" / "logs"), "-o", str(out)]) == 2
    assert (f"RUN_DIR '{tmp_path / 'lora'}' and '{tmp_path / 'lora' / 'logs'}' are the same run "
            f"({tmp_path / 'lora' / 'logs' / 'metrics.jsonl'}); give each run once") in capsys.readouterr().err
    (tmp_path / "again" / "lora").mkdir(parents=True)
    shutil.copytree(tmp_path / "lora" / "logs", tmp_path / "again" / "lora" / "logs")
    assert plot.run_labels([str(tmp_path / "lora"), str(tmp_path / "again" / "lora" / "logs"), str(tmp_path / "qlora")]) == [
        f"{tmp_path.name}/lora", "again/lora", "qlora"]
    assert plot.main([str(tmp_path / "lora"), str(tmp_path / "again" / "lora"), "-o", str(out)]) == 0
    assert f"  {tmp_path.name}/lora: 20 steps" in capsys.readouterr().out
    # metrics files of their own names in one folder go by those names
    for name in ("lr1e-4.jsonl", "lr3e-4.jsonl"):
        shutil.copy(tmp_path / "lora" / "logs" / "metrics.jsonl", tmp_path / "again" / name)
    assert plot.run_labels([str(tmp_path / "again" / "lr1e-4.jsonl"), str(tmp_path / "again" / "lr3e-4.jsonl")]) == ["lr1e-4", "lr3e-4"]
    # Logs with no usable loss (foreign or hand-edited): named, not a traceback.
    (tmp_path / "odd" / "logs").mkdir(parents=True)
    (tmp_path / "odd" / "logs" / "metrics.jsonl").write_text(
        '{"step": 1, "loss": NaN}\n{"loss": 2.0}\n{"step": 3, "loss": "x"}\n[1, 2]\n')
    assert plot.main([str(tmp_path / "odd"), "-o", str(out)]) == 2
    assert "its metrics log has no records with a step and a finite loss yet" in capsys.readouterr().err
    # Numbers at the edges of float: skipped, or drawn; never an overflow traceback, nor a tick
    # loop that never ends (1e16 and its next float), nor a line of 10**12 pixels.
    for name, records in (
        ("huge_int_loss", [{"step": 1, "loss": 10**400}, {"step": 2, "loss": 1.0}]),
        ("huge_int_step", [{"step": 10**400, "loss": 2.0}, {"step": 2, "loss": 1.0}]),
        ("float_range", [{"step": 1, "loss": 1e308}, {"step": 2, "loss": -1e308}]),
        ("float_max", [{"step": 1, "loss": 1.7e308}, {"step": 2, "loss": -1.7e308}, {"step": 3, "loss": 1e308}]),
        ("tiny", [{"step": 1, "loss": 3e-11}, {"step": 2, "loss": 2e-11}, {"step": 3, "loss": 1e-11}]),  # (ticks rounded to 0: a hang)
        ("next_float", [{"step": 1, "loss": 1e16}, {"step": 2, "loss": 1.0000000000000004e16}]),
        ("close_steps", [{"step": 10**17, "loss": 1.0}, {"step": 10**17 + 5, "loss": 2.0}]),
    ):
        (tmp_path / name / "logs").mkdir(parents=True)
        (tmp_path / name / "logs" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        assert plot.main([str(tmp_path / name), "-o", str(tmp_path / f"{name}.png")]) == 0, name
        assert f"{name}: " in capsys.readouterr().out
    assert len(plot.load_curve(str(tmp_path / "huge_int_loss")).losses) == 1
    # A log saved with a byte-order mark (an editor's): its first record is read, not dropped.
    (tmp_path / "bom" / "logs").mkdir(parents=True)
    (tmp_path / "bom" / "logs" / "metrics.jsonl").write_text('\ufeff{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.0}\n')
    assert plot.load_curve(str(tmp_path / "bom")).steps == [1, 2]


@pytest.mark.parametrize("content", [b"", b"\n  \n\n", bytes(range(256)) * 8], ids=["empty", "blank", "binary"])
def test_plot_of_an_empty_or_damaged_log_is_an_error_line_and_leaves_it(tmp_path, capsys, content):
    # A run stopped before its first logged step leaves an empty log; a damaged one reads as no records.
    (tmp_path / "run" / "logs").mkdir(parents=True)
    log = tmp_path / "run" / "logs" / "metrics.jsonl"
    log.write_bytes(content)
    out = tmp_path / "curve.png"
    assert plot.main([str(tmp_path / "run"), "-o", str(out)]) == 2
    captured = capsys.readouterr()
    assert f"error: RUN_DIR '{tmp_path / 'run'}': its metrics log has no records with a step and a finite loss yet\n" in captured.err
    assert "Traceback" not in captured.err and captured.out == ""
    assert log.read_bytes() == content and not out.exists()


def test_plot_of_a_run_folder_that_cannot_be_searched_names_the_run(tmp_path, capsys, monkeypatch):
    # a logs/ folder without search permission (simulated: root ignores modes) failed in is_file() with a raw
    # "[Errno 13] ... logs/metrics.jsonl", before the log's own read
    for run in ("a", "b"):
        (tmp_path / run / "logs").mkdir(parents=True)
        (tmp_path / run / "logs" / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    real_stat, denied = os.stat, str(tmp_path / "a" / "logs") + os.sep

    def stat(path, *args, **kwargs):
        if os.fspath(path).startswith(denied):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", stat)
    assert plot.main([str(tmp_path / "a"), str(tmp_path / "b"), "-o", str(tmp_path / "o.png")]) == 2
    err = capsys.readouterr().err
    assert f"error: RUN_DIR '{tmp_path / 'a'}': cannot read {tmp_path / 'a' / 'logs' / 'metrics.jsonl'}: Permission denied\n" in err


def test_plot_of_a_log_that_cannot_be_read_is_an_error_line(tmp_path, capsys, monkeypatch):
    # (root ignores file modes: the refusal is simulated)
    (tmp_path / "run" / "logs").mkdir(parents=True)
    log = tmp_path / "run" / "logs" / "metrics.jsonl"
    log.write_text('{"step": 1, "loss": 2.0}\n')
    real = Path.read_text

    def denied(self, *args, **kwargs):
        if self.name == "metrics.jsonl":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", denied)
    out = tmp_path / "curve.png"
    assert plot.main([str(tmp_path / "run"), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"error: RUN_DIR '{tmp_path / 'run'}': cannot read {log}: Permission denied\n" in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("args, needle", [
    (["--labels", "a", "b"], "argument --labels: needs one label per RUN_DIR (1); got 2"),
    (["--smoothing", "nan"], "argument --smoothing: must be in [0, 1); got nan"),
    (["--smoothing", "-0.1"], "argument --smoothing: must be in [0, 1); got -0.1"),
    (["--smoothing", "x"], "argument --smoothing: invalid float value: 'x'"),
])
def test_plot_usage_errors_exit_2_naming_the_argument(tmp_path, capsys, args, needle):
    (tmp_path / "run" / "logs").mkdir(parents=True)
    (tmp_path / "run" / "logs" / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    out = tmp_path / "curve.png"
    with pytest.raises(SystemExit) as exited:
        plot.main([str(tmp_path / "run"), "-o", str(out), *args])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert f"python -m qlora_ext.plot: error: {needle}\n" in err and "Traceback" not in err
    assert not out.exists()


def test_plot_labels_given_name_the_curves(tmp_path, capsys):
    for name in ("a", "b"):
        (tmp_path / name / "logs").mkdir(parents=True)
        (tmp_path / name / "logs" / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.0}\n')
    assert plot.main([str(tmp_path / "a"), str(tmp_path / "b"), "-o", str(tmp_path / "c.png"), "--labels", "lora", "qlora"]) == 0
    out = capsys.readouterr().out
    assert "  lora: 2 steps, loss 2.0000 -> 1.0000\n  qlora: 2 steps" in out


def test_the_builtin_legend_names_the_runs_that_fit_and_counts_the_rest(tmp_path, monkeypatch):
    # 50 runs: the legend ran off the canvas, and later curves were drawn over earlier labels.
    import qlora_ext.training.loss_plot as loss_plot
    from qlora_ext.training.png_canvas import Canvas

    texts, real_text = [], Canvas.text
    monkeypatch.setattr(Canvas, "text", lambda self, x, y, text, **kw: (texts.append((y, text)), real_text(self, x, y, text, **kw))[1])
    curves = [Curve(f"run{i:02d}", [1, 2, 3], [3.0 - i / 50, 2.0, 1.0]) for i in range(50)]
    loss_plot._plot_builtin(curves, tmp_path / "many.png", None, "training loss")
    legend = [(y, t) for y, t in texts if t.startswith("run") or t.endswith("more")]
    assert [t for _, t in legend] == [f"run{i:02d}" for i in range(20)] + ["and 30 more"]
    assert max(y for y, _ in legend) < 480 - 56  # inside the frame


def test_the_builtin_font_draws_accented_letters_as_their_base_letters():
    # a non-ASCII run name in the built-in PNG's legend: every letter with an accent was "?"
    from qlora_ext.training.png_canvas import Canvas, _drawable, text_width

    assert _drawable("caf\u00e9-r\u00e9sum\u00e9 [r=8] 100%") == "CAFE-RESUME [R=8] 100%"
    assert _drawable("\u00c5ngstr\u00f6m \ufb01t \u6f22") == "ANGSTROM FIT ?"  # (a ligature is its letters; no glyph: ?)
    assert text_width("\ufb01") == text_width("fi")

    def pixels(text):
        canvas = Canvas(40, 12)
        canvas.text(1, 1, text)
        return bytes(canvas.pixels)

    assert pixels("\u00e9") == pixels("e") != pixels("?")


def test_the_report_shows_a_held_out_input_on_its_own_line(capsys):
    # "instruction [input]" on one line, pasted into generate --prompt, asked another question than
    # the trainer's (generate takes the input as --input)
    import types

    from qlora_ext.training.evaluation import print_report

    samples = [{"instruction": "Sort these numbers.", "input": "5 38 32", "output": "5 32 38"},
               {"instruction": "Greet.", "input": "", "output": "Hi"}]
    summary = {"output_dir": "/runs/a", "metrics": "/runs/a/logs/metrics.jsonl", "answers_after": ["5 32 38", "Hi"]}
    print_report(summary, samples, types.SimpleNamespace(save_adapter_weights_only=True))
    lines = capsys.readouterr().out.splitlines()
    start = lines.index("Held-out prompts (never trained on):")
    assert lines[start + 1 : start + 9] == [
        "  prompt:   Sort these numbers.", "  input:    5 38 32", "  expected: 5 32 38", "  after:    5 32 38", "",
        "  prompt:   Greet.", "  expected: Hi", "  after:    Hi"]


def test_nice_ticks_are_few_and_cover_the_values():
    from qlora_ext.training.loss_plot import nice_ticks

    for lo, hi in ((0.0, 1.0), (1.37, 2.9), (5.0, 5.0), (0.0, 0.0), (0.1, 0.10000000000000002), (1e16, 1.0000000000000004e16),
                   (-1e300, 1e300), (1e17, 1e17 + 5), (-3.0, -2.5), (1e-11, 3e-11), (2e-300, 2e-300)):
        ticks = nice_ticks(lo, hi)
        assert 2 <= len(ticks) <= 22 and ticks == sorted(ticks) and len(set(ticks)) == len(ticks), (lo, hi, ticks)
        assert ticks[0] <= lo and hi <= ticks[-1] + 1e-12 * max(1.0, abs(hi)), (lo, hi, ticks)
    # Beyond an eighth of float's range the ticks stop (the values are drawn past the frame), finite.
    ticks = nice_ticks(-1.7e308, 1.7e308)
    assert all(math.isfinite(t) for t in ticks) and ticks[0] < -1e307 and ticks[-1] > 1e307


def test_atomic_torch_save_keeps_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "state.pt"
    ckpt.atomic_torch_save({"a": 1}, path)

    def crash(obj, f):
        open(f, "wb").write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        ckpt.atomic_torch_save({"a": 2}, path)
    monkeypatch.undo()
    assert torch.load(path) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]  # no temp file left behind


def test_commit_dir_replaces_whole_folder(tmp_path):
    final = tmp_path / "epoch_0"
    for content in ("one", "two"):
        tmp = checkpoint_folders.staging_dir(final)
        (tmp / "f.txt").write_text(content)
        checkpoint_folders.commit_dir(tmp, final)
    assert (final / "f.txt").read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch_0"]


def test_a_replaced_folder_that_cannot_be_deleted_is_named(tmp_path, monkeypatch):
    # A write-protected file in the replaced checkpoint (root ignores permissions, so the failure
    # is simulated): the save still commits, and the leftover folder is named, not kept silently.
    final = tmp_path / "epoch_0"
    tmp = checkpoint_folders.staging_dir(final)
    (tmp / "f.txt").write_text("one")
    checkpoint_folders.commit_dir(tmp, final)
    real_rmtree = checkpoint_folders.shutil.rmtree

    def protected(path, ignore_errors=False):
        if ".old-" not in str(path) and ".del-" not in str(path):
            return real_rmtree(path, ignore_errors=ignore_errors)
        if not ignore_errors:
            raise PermissionError(13, "Permission denied", str(path / "f.txt"))

    monkeypatch.setattr(checkpoint_folders.shutil, "rmtree", protected)
    tmp = checkpoint_folders.staging_dir(final)
    (tmp / "f.txt").write_text("two")
    with pytest.warns(RuntimeWarning, match=rf"could not delete {tmp_path}/\.epoch_0\.old-\d+ \(the checkpoint folder {final} "
                      r"replaced\): \[Errno 13\] Permission denied: .*f.txt'; delete it by hand"):
        checkpoint_folders.commit_dir(tmp, final)
    assert (final / "f.txt").read_text() == "two"
    (tmp_path / "step_3").mkdir()
    with pytest.warns(RuntimeWarning, match=rf"could not delete {tmp_path}/\.step_3\.del-\d+ \(what was {tmp_path / 'step_3'}\)"):
        checkpoint_folders.remove_dir(tmp_path / "step_3")
    monkeypatch.setattr(checkpoint_folders, "_writer_may_be_running", lambda pid: False)  # the next run: their writer is gone
    notes = checkpoint_folders.recover_interrupted_saves(tmp_path)
    assert len(notes) == 2 and all(n.startswith("could not delete") and "(left by a killed save)" in n for n in notes), notes


def test_recover_interrupted_saves(tmp_path):
    import os

    dead, alive = 2**22 + 1, os.getppid()  # above Linux's largest pid (no such process), and a running one

    def folder(name, content="x"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "f.txt").write_text(content)

    folder(f".step_4.tmp-{dead}")  # killed while writing
    folder(f".epoch_0.old-{dead}", "old epoch_0")  # killed between commit_dir's renames: epoch_0 missing
    folder(f".epoch_0.tmp-{dead}", "new epoch_0")
    folder("epoch_1", "new epoch_1")
    folder(f".epoch_1.old-{dead}", "old epoch_1")  # killed while removing the replaced folder
    folder(f".step_3.del-{dead}", "half of step_3")  # killed while remove_dir deleted it: step_3 stays gone
    folder(f".step_2.tmp-{os.getpid()}")  # our pid, before we saved anything: a restarted container's
    folder(f".step_8.tmp-{alive}")  # another live process's: left alone
    folder(".notes.tmp-12")  # not our pattern
    notes = checkpoint_folders.recover_interrupted_saves(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".notes.tmp-12", f".step_8.tmp-{alive}", "epoch_0", "epoch_1"]
    assert (tmp_path / "epoch_0" / "f.txt").read_text() == "old epoch_0"
    assert (tmp_path / "epoch_1" / "f.txt").read_text() == "new epoch_1"
    assert len(notes) == 6 and any(n.startswith(f"restored {tmp_path / 'epoch_0'}") for n in notes)
    assert checkpoint_folders.recover_interrupted_saves(tmp_path) == []


def test_training_state_round_trip_and_mismatch(tmp_path):
    p = torch.nn.Parameter(torch.randn(4))
    opt = torch.optim.AdamW([p])
    p.grad = torch.ones(4)
    opt.step()
    sched = build_scheduler(opt, "cosine_with_warmup", num_warmup_steps=1, num_training_steps=5, num_cycles=0.5)
    fp = {"model.lora_rank": 8}
    ckpt.save_training_state(tmp_path, checkpoint_name="step_1", epoch=0, step_in_epoch=1, global_step=1, seed=3,
                             optimizer=opt, scheduler=sched, adapter={"x": p}, fingerprint=fp)
    state = ckpt.load_training_state(tmp_path, fp)
    assert state["global_step"] == 1 and torch.equal(state["adapter"]["x"], p.detach())
    with pytest.raises(ckpt.ResumeError, match=r"config key 'model.lora_rank' is 16 but the checkpoint .* trained with 8"):
        ckpt.load_training_state(tmp_path, {"model.lora_rank": 16})
    assert ckpt.load_training_state(tmp_path, {"model.lora_rank": 16}, may_change=("model",))["global_step"] == 1
    with pytest.raises(ckpt.ResumeError, match=r"config key 'model.lora_rank' is null but the checkpoint .* trained with 8"):
        ckpt.load_training_state(tmp_path, {"model.lora_rank": None})  # as the config writes it, not Python's None
    with pytest.raises(ckpt.ResumeError, match=r"only optimizer.lr, lr_scheduler may change"):
        ckpt.load_training_state(tmp_path, {"model.lora_rank": 16}, may_change=("optimizer.lr", "lr_scheduler"))
    with pytest.raises(ckpt.ResumeError, match=r"there is no .*recipe_state.pt"):
        ckpt.load_training_state(tmp_path / "elsewhere", fp)
    # The seed: the one used must match, a null one takes it (a state of an earlier version also kept it in its fingerprint).
    assert ckpt.load_training_state(tmp_path, fp, seed=3)["seed"] == 3
    with pytest.raises(ckpt.ResumeError, match=r"config key 'seed' is 4 but the checkpoint .* was trained with seed 3; .* or seed=null"):
        ckpt.load_training_state(tmp_path, fp, seed=4)
    ckpt.save_training_state(tmp_path, checkpoint_name="step_1", epoch=0, step_in_epoch=1, global_step=1, seed=3,
                             optimizer=opt, scheduler=sched, adapter={"x": p}, fingerprint={**fp, "seed": 3})
    assert ckpt.load_training_state(tmp_path, fp)["fingerprint"] == fp


class _RunsCodeWhenUnpickled:
    marker = None

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_training_state_that_would_run_code_is_refused(tmp_path, monkeypatch):
    # A run folder can come from elsewhere: its recipe_state.pt is read with torch.load(weights_only=True).
    marker = tmp_path / "ran"
    _RunsCodeWhenUnpickled.marker = marker
    state = {"version": ckpt.STATE_VERSION, "checkpoint_name": "epoch_0", "global_step": 1, "epoch": 0,
             "payload": _RunsCodeWhenUnpickled()}
    torch.save(state, tmp_path / ckpt.STATE_FILE)
    with pytest.raises(ckpt.ResumeError, match=r"recipe_state.pt cannot be read: it holds Python objects besides tensors "
                                               r"\(torch.load\(weights_only=True\) refuses to unpickle [^)]+\), which this "
                                               r"trainer never writes; restore it from a copy, or start afresh"):
        ckpt.load_training_state(tmp_path, {})
    with pytest.raises(Exception, match="Weights only load failed"):
        ckpt.read_state_summary(tmp_path)
    assert not marker.exists()
    # a damaged or truncated state is said to be one, without torch's advice to load it unsafely
    good = tmp_path / "good.pt"
    torch.save({"version": ckpt.STATE_VERSION, "x": torch.zeros(10_000)}, good)
    for data, reason in ((b"not a torch file", r"UnpicklingError"), (good.read_bytes()[:20_000], r"[A-Za-z]+Error(: .*)?")):
        (tmp_path / ckpt.STATE_FILE).write_bytes(data)
        with pytest.raises(ckpt.ResumeError, match=rf"recipe_state.pt cannot be read: it is damaged or truncated, or not a training "
                                                   rf"state \({reason}\); restore it from a copy, or start afresh") as error:
            ckpt.load_training_state(tmp_path, {})
        assert "weights_only" not in str(error.value)
    # a file the user may not read is not called damaged (nor its removal advised)
    with monkeypatch.context() as patched:
        patched.setattr(torch, "load", lambda *a, **k: (_ for _ in ()).throw(PermissionError(13, "Permission denied", str(a[0]))))
        with pytest.raises(ckpt.ResumeError, match=r"recipe_state.pt cannot be read: Permission denied$"):
            ckpt.load_training_state(tmp_path, {})
    # A state missing what a resume reads is named, not a KeyError.
    del state["payload"]
    torch.save(state, tmp_path / ckpt.STATE_FILE)
    with pytest.raises(ckpt.ResumeError, match=r"lacks the entries \['step_in_epoch', 'seed', 'optimizer', 'lr_scheduler', "
                                               r"'rng', 'adapter', 'fingerprint'\] of a training state"):
        ckpt.load_training_state(tmp_path, {})
    torch.save([1, 2], tmp_path / ckpt.STATE_FILE)
    with pytest.raises(ckpt.ResumeError, match=r"has state version none \(it holds a list\), expected 1"):
        ckpt.load_training_state(tmp_path, {})


def test_a_lock_file_this_user_cannot_write_still_locks(tmp_path, monkeypatch):
    # Another user's .lock (0644) in a shared folder: opened read-only, flock still excludes a
    # second run (it was a raw PermissionError). As root ignores modes, the refusal is simulated.
    from qlora_ext.training import run_lock
    from qlora_ext.training.config import ConfigError

    (tmp_path / run_lock.LOCK_NAME).write_text("")
    real_open = os.open

    def no_write(path, flags, *args):
        if flags & (os.O_RDWR | os.O_WRONLY):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(run_lock.os, "open", no_write)
    with run_lock.exclusive_output_dir(tmp_path):
        with pytest.raises(ConfigError, match=r"is in use by another training run \(pid unknown\)"):
            with run_lock.exclusive_output_dir(tmp_path):
                pass
    with run_lock.exclusive_output_dir(tmp_path):  # released
        pass
    (tmp_path / run_lock.LOCK_NAME).unlink()  # and where it cannot be opened at all, the error says what to do
    with pytest.raises(ConfigError, match=rf"output_dir: its lock file '{tmp_path / run_lock.LOCK_NAME}' cannot be opened: "
                                          r"Permission denied; make it writable"):
        with run_lock.exclusive_output_dir(tmp_path):
            pass


def test_pick_samples_prefers_distinct_instructions():
    from qlora_ext.training.evaluation import pick_samples

    texts = ["Name the capital of A.", "Name the capital of B.", "Reverse the words x y.", "Reverse the words y z.", "Sort these."]
    recs = [{"instruction": t, "input": "", "output": ""} for t in texts]
    assert [r["instruction"] for r in pick_samples(recs, 4)] == [texts[0], texts[2], texts[4], texts[1]]
    assert pick_samples(recs, 0) == []


def test_resume_fingerprint_ignores_what_may_change_on_resume():
    from qlora_ext.training.config import load_config
    from qlora_ext.training.saving import ADJUSTABLE_ON_RESUME, resume_fingerprint

    base = resume_fingerprint(load_config("tiny_qlora"))
    assert resume_fingerprint(load_config("tiny_qlora", ["log_every_n_steps=3", "output_dir=x", "compile=True"])) == base
    # epochs is recorded (a resume reports its change, which stretches the lr schedule) and may change
    assert resume_fingerprint(load_config("tiny_qlora", ["epochs=9"])) == {**base, "epochs": 9}
    assert "epochs" in ADJUSTABLE_ON_RESUME
    assert resume_fingerprint(load_config("tiny_qlora", ["model.lora_rank=4"]))["model.lora_rank"] == 4
    assert resume_fingerprint(load_config("tiny_qlora", ["batch_size=3"])) != base


def test_tensorboard_logger_writes_events(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard (optional) is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    loggers = MetricLoggers("tensorboard", tmp_path)
    for s in range(1, 4):
        loggers.log({"loss": 1.0 / s, "lr": 0.1}, step=s)
    loggers.close()
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]  # the disk log is always kept
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert [(e.step, round(e.value, 4)) for e in events.Scalars("loss")] == [(1, 1.0), (2, 0.5), (3, 0.3333)]
    # A run started afresh in the same folder shows alone, as the disk log; a resumed one continues its curve.
    for resume_step, values in ((None, {1: 2.0, 2: 3.0, 3: 4.0}), (2, {3: 5.0, 4: 6.0})):
        loggers = MetricLoggers("tensorboard", tmp_path, resume_step=resume_step)
        for s, v in values.items():
            loggers.log({"loss": v}, step=s)
        loggers.close()
    def shown(folder):
        events = EventAccumulator(str(folder))
        events.Reload()
        return [(e.step, e.value) for e in events.Scalars("loss")]

    assert shown(tmp_path) == [(1, 2.0), (2, 3.0), (3, 5.0), (4, 6.0)]
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path)] == [(1, 2.0), (2, 3.0), (3, 5.0), (4, 6.0)]
    # A run that fails during setup (built, closed, nothing logged) leaves the curve shown, as the disk log.
    MetricLoggers("tensorboard", tmp_path).close()
    assert shown(tmp_path) == [(1, 2.0), (2, 3.0), (3, 5.0), (4, 6.0)]
    # A fresh run stopped before its first save logged over it; the resume restores the checkpoint's
    # log (resume_log) in both: TensorBoard shows what metrics.jsonl holds, not the stopped run's points.
    saved_log = "".join(json.dumps({"step": s, "loss": v}) + "\n" for s, v in ((1, 2.0), (2, 3.0), (3, 5.0), (4, 6.0)))
    stopped = MetricLoggers("tensorboard", tmp_path)
    for s in (1, 2):
        stopped.log({"loss": 9.0}, step=s)
    stopped.close()
    resumed = MetricLoggers("tensorboard", tmp_path, resume_step=4, resume_log=saved_log)
    resumed.log({"loss": 7.0}, step=5)
    resumed.close()
    assert shown(tmp_path) == [(1, 2.0), (2, 3.0), (3, 5.0), (4, 6.0), (5, 7.0)]
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path)] == shown(tmp_path)


def test_every_logger_is_closed_when_one_fails_to_close(tmp_path, monkeypatch):
    # A full disk at the disk log's fsync stopped the loop: TensorBoard's writer thread kept running
    # (a W&B run stayed "running"), and the run's later close(failed=True) did nothing.
    closed = []

    class Other:
        def log(self, metrics, step):
            pass

        def close(self, failed=False):
            closed.append(failed)

    loggers = MetricLoggers("disk", tmp_path)
    loggers.loggers.append(Other())
    loggers.log({"loss": 1.0}, step=1)

    def full_disk(failed=False):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(loggers.loggers[0], "close", full_disk)
    with pytest.raises(OSError, match="No space left on device"):
        loggers.close()
    assert closed == [False]
    loggers.close(failed=True)  # once only
    assert closed == [False]


def test_tensorboard_does_not_start_in_an_unwritable_log_dir(tmp_path, monkeypatch):
    # The disk logger's check comes first: no TensorBoard writer thread is left running (its
    # traceback followed the one-line error).
    pytest.importorskip("tensorboard", reason="tensorboard (optional) is not installed")
    import threading

    from qlora_ext.training import metric_logging

    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    threads = threading.active_count()
    monkeypatch.setattr(metric_logging, "open", read_only, raising=False)
    with pytest.raises(OSError, match="Read-only"):
        MetricLoggers("tensorboard", tmp_path)
    assert threading.active_count() == threads and not list(tmp_path.glob("events.out.tfevents.*"))


def test_wandb_logger_drives_a_run(tmp_path, monkeypatch):
    # A stand-in wandb module (the real one needs an account or network): what the logger calls.
    import types

    calls = []
    run = types.SimpleNamespace(
        log=lambda metrics, step: calls.append(("log", dict(metrics), step)), finish=lambda exit_code: calls.append(("finish", exit_code))
    )

    def init(project, dir, config):
        calls.append(("init", project, dir, config))
        return run

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    loggers = MetricLoggers("wandb", tmp_path, project="seed-qlora", config={"lr": 3e-4})
    loggers.log({"loss": 2.0, "lr": 1e-4}, step=5)
    loggers.close()
    assert calls == [
        ("init", "seed-qlora", str(tmp_path), {"lr": 3e-4}),
        ("log", {"loss": 2.0, "lr": 1e-4}, 5),
        ("finish", 0),
    ]
    calls.clear()  # a run stopped by an error: marked failed (it showed as running), once however often closed
    loggers = MetricLoggers("wandb", tmp_path / "failed", project="seed-qlora", config={})
    loggers.close(failed=True)
    loggers.close()
    assert calls[1:] == [("finish", 1)]
    assert [r["step"] for r in read_metrics(tmp_path)] == [5]  # the disk log is always kept
    # A resume at step 5 gets a new W&B run whose first log replays the kept records, as
    # TensorBoard's does: one whole curve (records past step 5, from the stopped run, are dropped).
    loggers = MetricLoggers("disk", tmp_path, resume_step=5)  # a run that went on to step 7 and stopped
    for step in (6, 7):
        loggers.log({"loss": 1.0 / step}, step=step)
    loggers.close()
    calls.clear()
    loggers = MetricLoggers("wandb", tmp_path, project="seed-qlora", config={}, resume_step=5)
    loggers.log({"loss": 0.5}, step=6)
    loggers.log({"val_loss": 0.7}, step=6)
    loggers.close()
    assert calls == [
        ("init", "seed-qlora", str(tmp_path), {}),
        ("log", {"loss": 2.0, "lr": 1e-4}, 5),
        ("log", {"loss": 0.5}, 6),
        ("log", {"val_loss": 0.7}, 6),
        ("finish", 0),
    ]

    class UsageError(Exception):
        pass

    def failing_init(project, dir, config):
        raise UsageError("api_key not configured (no-tty).")  # wandb's messages end with a period: not doubled

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=failing_init))
    from qlora_ext.training.metric_logging import MetricLoggerError

    with pytest.raises(MetricLoggerError, match=r"metric_logger.type=wandb: wandb.init\(project='seed-qlora'\) failed: "
                                                     r"UsageError: api_key not configured \(no-tty\)\. Run `wandb login` first"):
        MetricLoggers("wandb", tmp_path / "again", project="seed-qlora", config={})


def test_a_hand_added_line_without_a_step_is_not_replayed(tmp_path, monkeypatch):
    # The disk log keeps such a line on resume; the replay into W&B (or TensorBoard) skips it
    # instead of failing on its missing step.
    import types

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"comment": "hand-added"}\n{"step": null}\n{"step": "note"}\n'
                                            '{"step": 2, "loss": 1.5}\n')
    logged = []
    run = types.SimpleNamespace(log=lambda metrics, step: logged.append((step, dict(metrics))), finish=lambda exit_code: None)
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=lambda **kwargs: run))
    loggers = MetricLoggers("wandb", tmp_path, config={}, resume_step=2)
    loggers.log({"loss": 1.0}, step=3)
    loggers.close()
    assert logged == [(1, {"loss": 2.0}), (2, {"loss": 1.5}), (3, {"loss": 1.0})]
    assert all(line in (tmp_path / "metrics.jsonl").read_text() for line in ('{"comment": "hand-added"}', '{"step": null}', '{"step": "note"}'))


def test_a_resume_from_its_checkpoint_log_keeps_hand_added_lines(tmp_path, capsys):
    # The trainer resumes with the log its checkpoint saved: that replaced the file, and a line
    # added by hand since was lost, with a warning about another run.
    saved = '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n'
    (tmp_path / "metrics.jsonl").write_text(saved + '{"note": "baseline, lr 2e-3"}\n{"step": 3, "loss": 1.2}\n')
    logger = DiskLogger(tmp_path, resume_step=2, resume_log=saved)
    logger.log({"loss": 1.1}, step=3)
    logger.close()
    assert (tmp_path / "metrics.jsonl").read_text() == saved + '{"note": "baseline, lr 2e-3"}\n{"step": 3, "loss": 1.1}\n'
    assert "warning" not in capsys.readouterr().err
    # Records of steps that differ from the checkpoint's are still replaced, and said so.
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n{"note": "x"}\n')
    logger = DiskLogger(tmp_path, resume_step=2, resume_log=saved)
    logger.log({"loss": 1.1}, step=3)
    logger.close()
    assert (tmp_path / "metrics.jsonl").read_text() == saved + '{"note": "x"}\n{"step": 3, "loss": 1.1}\n'
    assert "are not those logged by the run this checkpoint belongs to" in capsys.readouterr().err


def test_a_metrics_log_that_cannot_be_written_is_named(tmp_path, monkeypatch):
    # A full disk's error names no file: the run's closing message said only "No space left on device".
    import errno

    logger = DiskLogger(tmp_path)
    logger.log({"loss": 2.0}, step=1)

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(logger._file, "write", full)
    with pytest.raises(OSError, match=rf"\[Errno 28\] No space left on device \(writing the metrics log\): "
                                      rf"'{re.escape(str(tmp_path / 'metrics.jsonl'))}'"):
        logger.log({"loss": 1.0}, step=2)


def test_the_disk_logs_text_before_its_first_log_is_what_the_run_keeps(tmp_path):
    # A checkpoint saved before the first logged step (save_every_n_steps=1, log_every_n_steps=5)
    # saves this text: a fresh run's is empty (the earlier run's file is not read), a resume's is
    # its kept records; the file itself is not touched until the first log.
    earlier = "".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (1, 2, 3))
    (tmp_path / "metrics.jsonl").write_text(earlier)
    assert DiskLogger(tmp_path).text() == ""
    resumed = DiskLogger(tmp_path, resume_step=2)
    assert resumed.text() == "".join(earlier.splitlines(keepends=True)[:2])
    assert (tmp_path / "metrics.jsonl").read_text() == earlier
    resumed.log({"loss": 0.25}, step=3)
    assert resumed.text() == "".join(earlier.splitlines(keepends=True)[:2]) + json.dumps({"step": 3, "loss": 0.25}) + "\n"
    resumed.close()


def test_an_error_that_names_its_file_is_passed_on_as_it_is(tmp_path, monkeypatch):
    # Only an error naming no file (a full disk's write) gets the log's name added; one that names
    # its file (the resume's rewrite of the log refused) is raised unchanged, not renamed.
    from qlora_ext.training import metric_logging

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.0}\n')
    log = DiskLogger(tmp_path, resume_step=1)
    target = str(tmp_path / "metrics.jsonl")

    def refused(path, text):
        raise PermissionError(13, "Permission denied", target)

    monkeypatch.setattr(metric_logging, "atomic_write_text", refused)
    with pytest.raises(PermissionError) as raised:
        log.log({"loss": 0.5}, step=2)
    assert raised.value.filename == target and raised.value.strerror == "Permission denied"
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.0}\n'  # left as it was


def test_an_unknown_metric_logger_type_is_named_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match=r"^metric_logger.type must be one of disk, tensorboard, wandb; got 'csv'$"):
        MetricLoggers("csv", tmp_path / "logs")
    assert not (tmp_path / "logs").exists()


def test_read_metrics_skips_blank_lines_and_a_saved_output_dir_that_is_not_text(tmp_path, monkeypatch, capsys):
    # Blank lines (an editor's) are no records and no warning; a config.yaml whose output_dir is not
    # a string (hand-edited) still leads to its log_dir, taken from the working directory.
    run = tmp_path / "run"
    (run / "tb").mkdir(parents=True)
    (run / "tb" / "metrics.jsonl").write_text('\n{"step": 1, "loss": 2.0}\n   \n\n{"step": 2, "loss": 1.0}\n')
    (run / "config.yaml").write_text("output_dir: 5\nmetric_logger:\n  log_dir: tb\n")
    monkeypatch.chdir(run)
    assert [r["step"] for r in read_metrics(run)] == [1, 2]
    assert capsys.readouterr().err == ""
    monkeypatch.chdir(tmp_path)  # elsewhere: no tb there, and no logs/ in the run: named, both places
    with pytest.raises(FileNotFoundError, match=r"no metrics.jsonl in .*run, tb \(its config.yaml's metric_logger.log_dir\) or .*run/logs"):
        read_metrics(run)


def test_matplotlib_loss_curves(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib (optional) is not installed")
    curves = [Curve(name, list(range(1, 31)), [k / s for s in range(1, 31)]) for name, k in (("lora", 1.0), ("qlora", 1.2))]
    path = tmp_path / "curves.png"
    assert plot_loss_curves(curves, path, smoothing=0.5) == "matplotlib"
    assert _png_size(path) == (800, 480)


def test_a_max_seq_len_that_leaves_no_response_is_named():
    # tokenizer.max_seq_len=8 on the bundled data had trained on nothing (loss 0.0) and then
    # failed validation with a traceback.
    from qlora_ext.models.llama2 import llama2_tokenizer
    from qlora_ext.training.config import ASSETS_DIR
    from qlora_ext.training.data import InstructDataset, check_loss_tokens
    from qlora_ext.training.data_files import DataError, load_alpaca_records

    tokenizer = llama2_tokenizer(ASSETS_DIR / "tokenizer.model")
    records = load_alpaca_records([str(ASSETS_DIR / "tiny_alpaca.jsonl")])[:40]
    with pytest.raises(DataError, match=r"tokenizer.max_seq_len=8 cuts all 40 training examples to their prompt "
                                        r"\(up to \d+ tokens with BOS\), leaving no response token to learn from; raise "
                                        r"tokenizer.max_seq_len \(or set dataset.train_on_input=true\)"):
        check_loss_tokens(InstructDataset(records, tokenizer, 8, False), "training")
    assert check_loss_tokens(InstructDataset(records, tokenizer, 8, True), "training") is None  # the prompt is learned
    assert check_loss_tokens(InstructDataset(records, tokenizer, None, False), "training") is None
    from qlora_ext.training.data import prompt_tokens

    prompts = [len(prompt_tokens(tokenizer, r, "alpaca")) for r in records]
    cut = sorted(prompts)[20]  # examples whose prompt fills the cut keep no response token
    empty = sum(n >= cut for n in prompts)
    assert 0 < empty < 40
    note = check_loss_tokens(InstructDataset(records, tokenizer, cut, False), "held-out")
    assert note == (f"tokenizer.max_seq_len={cut} cuts {empty} of the 40 held-out examples to their prompt (up to "
                    f"{max(prompts)} tokens with BOS), leaving no response token to learn from: they add nothing to the loss")
    # Only the held-out examples that are scored count: the first 2 here keep no token, which
    # is named with what limits them (their batches had made the validation loss fail after an
    # epoch of training).
    long_first = sorted(records, key=lambda r: -len(prompt_tokens(tokenizer, r, "alpaca")))
    dataset = InstructDataset(long_first, tokenizer, cut, False)
    with pytest.raises(DataError, match=rf"tokenizer.max_seq_len={cut} cuts all 2 held-out examples scored \(eval.max_batches=1 x "
                                        r"batch_size=2\) to their prompt .*; raise tokenizer.max_seq_len \(or set "
                                        r"dataset.train_on_input=true\), or raise eval.max_batches$"):
        check_loss_tokens(dataset, "held-out", 2, "eval.max_batches=1 x batch_size=2", "raise eval.max_batches")
    assert check_loss_tokens(dataset, "held-out", None).startswith(f"tokenizer.max_seq_len={cut} cuts {empty} of the 40 held-out")


def test_the_loss_token_check_samples_a_large_dataset_and_refuses_only_when_none_keeps_a_token():
    # A file whose first 256 records were all too long was refused, though the rest trained.
    from qlora_ext.models.llama2 import llama2_tokenizer
    from qlora_ext.training.config import ASSETS_DIR
    from qlora_ext.training.data import InstructDataset, check_loss_tokens
    from qlora_ext.training.data_files import DataError

    tokenizer = llama2_tokenizer(ASSETS_DIR / "tokenizer.model")
    long_ = {"instruction": "Describe " + "the forest island silver orange " * 20, "input": "", "output": "Ok."}
    short = {"instruction": "Greet.", "input": "", "output": "Hello there, friend."}
    note = check_loss_tokens(InstructDataset([long_] * 300 + [short] * 300, tokenizer, 64, False), "training")
    assert re.fullmatch(r"tokenizer.max_seq_len=64 cuts (\d+) of 256 sampled from the 600 training examples to their prompt "
                        r"\(up to \d+ tokens with BOS\), leaving no response token to learn from: they add nothing to the loss", note)
    assert 80 < int(note.split()[2]) < 176  # about half of the sample
    # Every one sampled is cut, yet one further on keeps a token: a note, not a refusal.
    note = check_loss_tokens(InstructDataset([long_] * 599 + [short], tokenizer, 64, False), "training", probe=16)
    assert note is not None and "cuts 16 of 16 sampled from the 600 training examples" in note
    with pytest.raises(DataError, match=r"cuts all 600 training examples"):
        check_loss_tokens(InstructDataset([long_] * 600, tokenizer, 64, False), "training", probe=16)


def test_an_empty_data_files_list_is_named():
    from qlora_ext.training.data_files import DataError, load_alpaca_records

    with pytest.raises(DataError, match=r"dataset.data_files: must name at least one JSON or JSONL file; got an empty list"):
        load_alpaca_records([])


def test_plot_refuses_a_binary_file_given_as_run_dir(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "logs").mkdir(parents=True)
    log = "".join(json.dumps({"step": s, "loss": 3.0 - s}) + "\n" for s in (1, 2, 3))
    (run / "logs" / "metrics.jsonl").write_text(log)
    torch.save({"metrics_log": log, "adapter": {"w": torch.zeros(4)}}, run / "recipe_state.pt")
    out = tmp_path / "curve.png"
    assert plot.main([str(run / "recipe_state.pt"), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "recipe_state.pt" in err and "not a metrics log" in err
    assert not out.exists()
    # the run folder, its logs folder and its metrics file still plot
    for given in (run, run / "logs", run / "logs" / "metrics.jsonl"):
        assert plot.main([str(given), "-o", str(out)]) == 0
        assert "3 steps" in capsys.readouterr().out


def test_build_optimizer_takes_every_hyperparameter():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = build_optimizer([p], lr=1e-3, weight_decay=0.05, betas=[0.8, 0.99], eps=1e-6, fused=None, device=torch.device("cpu"))
    group = opt.param_groups[0]
    assert (group["lr"], group["weight_decay"], tuple(group["betas"]), group["eps"]) == (1e-3, 0.05, (0.8, 0.99), 1e-6)


@pytest.mark.parametrize("damage", [b"\0" * 40, b'{"step": 9, "note": "\xe9'], ids=["nul-block", "latin-1-byte"])
def test_a_metrics_file_with_a_damaged_line_plots_as_its_run_folder_does(tmp_path, damage):
    logs = tmp_path / "run" / "logs"
    logs.mkdir(parents=True)
    lines = [json.dumps({"step": i, "loss": 2.0 / i}).encode() for i in range(1, 6)]
    (logs / "metrics.jsonl").write_bytes(b"\n".join(lines[:3] + [damage] + lines[3:]) + b"\n")
    by_folder = plot.load_curve(str(tmp_path / "run"))
    by_file = plot.load_curve(str(logs / "metrics.jsonl"))  # ValueError now: "is a binary file, not a metrics log"
    assert by_file.steps == by_folder.steps == [1, 2, 3, 4, 5]
