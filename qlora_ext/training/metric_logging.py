"""Metric loggers: every one writes ``{name: value}`` per step. The disk logger (a JSONL file under
``output_dir/logs``, always on: the loss curve and ``python -m qlora_ext.plot`` read it), plus
TensorBoard or Weights & Biases when chosen; those two are imported only then, and a missing
package stops the run before training with the command that installs it.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import yaml

from qlora_ext._arguments import is_finite_real, is_int
from qlora_ext.checkpoint.atomic import atomic_write_text

METRICS_FILE = "metrics.jsonl"
LOG_SUBDIR = "logs"  # the logs' folder inside output_dir where metric_logger.log_dir is null
RUN_CONFIG_FILE = "config.yaml"  # the resolved config the trainer saves in output_dir (read for its log_dir)


class MissingDependencyError(RuntimeError):
    """An optional package the config asks for is not installed."""


class MetricLoggerError(RuntimeError):
    """A chosen metric logger's package is installed but cannot start (e.g. wandb without a login)."""


class DiskLogger:
    """Appends one JSON object per ``log`` call to ``log_dir/metrics.jsonl``.

    Its content first changes at the first ``log`` (or ``close``), so a run that fails during
    setup leaves an earlier run's log as it was (construction only checks that the file can be
    written, opening it for append). Then a new run starts the file afresh, and a
    resumed run keeps the records up to its resume step (rewritten atomically; lines a killed
    writer left unreadable are dropped with a warning), so the file always holds one curve.
    A resume given ``resume_log`` (the log as it was when its checkpoint was saved, ``text()``)
    restores that instead: a run started afresh in the folder after the checkpoint, and stopped
    before its own first save, has replaced the file with its own records.
    """

    def __init__(self, log_dir: str | Path, resume_step: int | None = None, resume_log: str | None = None):
        self.path = Path(log_dir) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        open(self.path, "a").close()  # a read-only folder fails here, not after the first step
        # A resume's (line, record) pairs, read (and any unreadable line warned of) now, during
        # setup, not under the progress bar; written back at the first log.
        self._kept = None if resume_step is None else [
            (line, record) for line, record in _parsed_lines(self.path)
            if not is_int(record.get("step")) or record["step"] <= resume_step  # a hand-added line without a step stays
        ]
        if self._kept is not None and resume_log is not None:
            saved, _ = _parsed_text(resume_log.splitlines())
            stepped = [pair for pair in self._kept if is_int(pair[1].get("step"))]
            if stepped and stepped != [pair for pair in saved if is_int(pair[1].get("step"))]:  # (none: a new log_dir, or the file deleted)
                print(f"warning: {self.path}: its records up to step {resume_step} are not those logged by the run "
                      "this checkpoint belongs to (a run started afresh here after it?); the checkpoint's are restored",
                      file=sys.stderr)
            # The checkpoint's records, and the lines added by hand since (without a step) after them.
            self._kept = saved + [pair for pair in self._kept if not is_int(pair[1].get("step")) and pair not in saved]
        self._file: Any = None

    def kept_records(self) -> list[dict[str, Any]]:
        """The records a resume keeps (none for a fresh run), as ``log`` was given them; a line
        without an int step (added by hand) stays in the file but is not a record to replay."""
        return [record for _, record in self._kept or [] if is_int(record.get("step"))]

    def text(self) -> str:
        """The log's content so far, as this run will have written it (before its first ``log``:
        a fresh run's empty file, a resume's kept records)."""
        if self._file is None:
            return "".join(line + "\n" for line, _ in self._kept or [])
        self._file.flush()
        return self.path.read_text(encoding="utf-8")

    def _open(self) -> None:
        if self._kept is None:
            self._file = open(self.path, "w", encoding="utf-8")
            return
        atomic_write_text(self.path, "".join(line + "\n" for line, _ in self._kept))
        self._file = open(self.path, "a", encoding="utf-8")

    def log(self, metrics: dict[str, Any], step: int) -> None:
        try:
            if self._file is None:
                self._open()
            self._file.write(json.dumps({"step": step, **metrics}) + "\n")
            self._file.flush()
        except OSError as e:  # a full disk: the error of a write names no file; this one names the log
            if e.filename is not None:
                raise
            raise OSError(e.errno, f"{e.strerror} (writing the metrics log)", str(self.path)) from None

    def close(self, failed: bool = False) -> None:
        """``failed``: the run stopped by an error or Ctrl-C; a log it never wrote to stays as it was."""
        if self._file is None:
            if failed:
                return
            self._open()
        if self._file.closed:
            return
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
        except OSError as e:
            # (after a failed write of the log stopped the run, as on a full disk, its error, naming
            # the log, is the one to report, not this repeat of it)
            if not failed:
                raise OSError(e.errno, f"{e.strerror} (writing the metrics log)", str(self.path)) from None
        finally:
            with contextlib.suppress(OSError):  # (closing flushes the stuck line once more)
                self._file.close()


class TensorBoardLogger:
    """Scalars to TensorBoard event files in ``log_dir``, showing what the disk log holds.

    The writer starts at the first ``log`` (a run that fails during setup leaves the earlier
    run's curve shown, as the disk log keeps its file). It hides every point of the earlier
    event files of ``log_dir`` (a purge from step 0), then writes ``replay``, the records a
    resume keeps (the disk log's), so a run started afresh and a resumed one each show one curve,
    the same as ``metrics.jsonl``, whatever a stopped run wrote there in between.
    """

    def __init__(self, log_dir: str | Path, replay: list[dict[str, Any]] | None = None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise MissingDependencyError(
                "metric_logger.type=tensorboard needs the tensorboard package: pip install tensorboard "
                "(or pip install 'qlora_ext[tensorboard]'), or use metric_logger.type=disk"
            ) from None
        self._start = lambda: SummaryWriter(log_dir=str(log_dir), purge_step=0)
        self._replay = replay or []
        self._writer: Any = None

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if self._writer is None:
            self._writer = self._start()
            for record in self._replay:
                self._add(record, record["step"])
        self._add(metrics, step)

    def _add(self, metrics: dict[str, Any], step: int) -> None:
        for name, value in metrics.items():
            if name != "step" and is_finite_real(value):
                self._writer.add_scalar(name, value, global_step=step)

    def close(self, failed: bool = False) -> None:
        if self._writer is not None:
            self._writer.close()  # (stops its writer thread)


class WandBLogger:
    """Metrics to a Weights & Biases run (``wandb login`` first, or WANDB_MODE=offline).

    Each run, resumed or not, is a new W&B run; a resumed one's first ``log`` writes ``replay``
    first, the records the resume keeps (the disk log's), so that its curve is whole, as
    TensorBoard's and ``metrics.jsonl``'s are; the stopped run's W&B run stays as it ended.
    """

    def __init__(self, log_dir: str | Path, project: str, config: dict[str, Any], replay: list[dict[str, Any]] | None = None):
        try:
            import wandb
        except ImportError:
            raise MissingDependencyError(
                "metric_logger.type=wandb needs the wandb package: pip install wandb "
                "(or pip install 'qlora_ext[wandb]'), or use metric_logger.type=disk"
            ) from None
        self._wandb = wandb
        try:
            self._run = wandb.init(project=project, dir=str(log_dir), config=config)
        except Exception as e:  # noqa: BLE001  (wandb's own errors: no login, no network, a bad project)
            raise MetricLoggerError(
                f"metric_logger.type=wandb: wandb.init(project={project!r}) failed: {type(e).__name__}: {str(e).rstrip('.')}. Run "
                "`wandb login` first, or set WANDB_MODE=offline, or use metric_logger.type=disk"
            ) from None
        self._replay = replay or []

    def log(self, metrics: dict[str, Any], step: int) -> None:
        for record in self._replay:
            self._run.log({name: value for name, value in record.items() if name != "step"}, step=record["step"])
        self._replay = []
        self._run.log(metrics, step=step)

    def close(self, failed: bool = False) -> None:
        self._run.finish(exit_code=1 if failed else 0)  # (a failed run shows as failed, not as running)


class MetricLoggers:
    """The disk logger plus the chosen one; ``log`` and ``close`` go to all."""

    def __init__(
        self, kind: str, log_dir: str | Path, *, project: str = "qlora_ext", config: dict | None = None,
        resume_step: int | None = None, resume_log: str | None = None,
    ):
        if kind not in ("disk", "tensorboard", "wandb"):
            raise ValueError(f"metric_logger.type must be one of disk, tensorboard, wandb; got {kind!r}")
        # The disk logger first: it makes log_dir and checks it can be written before
        # TensorBoard's writer thread or a wandb run starts there.
        disk = DiskLogger(log_dir, resume_step=resume_step, resume_log=resume_log)
        self.loggers: list[Any] = [disk]
        self._closed = False
        if kind == "tensorboard":
            self.loggers.append(TensorBoardLogger(log_dir, replay=disk.kept_records()))
        elif kind == "wandb":
            self.loggers.append(WandBLogger(log_dir, project, config or {}, replay=disk.kept_records()))

    @property
    def metrics_path(self) -> Path:
        return self.loggers[0].path

    def disk_log_text(self) -> str:
        """The disk log's content so far (saved with a checkpoint's training state)."""
        return self.loggers[0].text()

    def log(self, metrics: dict[str, Any], step: int) -> None:
        for logger in self.loggers:
            logger.log(metrics, step)

    def close(self, failed: bool = False) -> None:
        """Closes each logger once (later calls do nothing). ``failed``: the run stopped by an
        error or an interruption (the disk log keeps an earlier run's file if this one wrote
        nothing; W&B marks the run failed). Every logger is closed, whichever fails (a full disk
        at the disk log's fsync left TensorBoard's writer thread running); the first error is
        raised after."""
        if self._closed:
            return
        self._closed = True
        first_error = None
        for logger in self.loggers:
            try:
                logger.close(failed)
            except BaseException as e:  # (Ctrl-C too: the others still close)
                first_error = first_error or e
        if first_error is not None:
            raise first_error


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file (a run folder, its logs folder, or the file itself; for
    a run that set ``metric_logger.log_dir``, the folder its ``config.yaml`` names). Lines that are
    not JSON objects (a writer killed mid-line) are skipped with a warning."""
    return [record for _, record in _parsed_lines(metrics_file(path))]


def metrics_file(path: str | Path) -> Path:
    """The metrics.jsonl that ``read_metrics(path)`` reads; FileNotFoundError naming where it looked."""
    path = Path(path)
    candidates = [path, path / METRICS_FILE]
    log_dir = _configured_log_dir(path)
    if log_dir is not None:  # the latest run's (config.yaml is rewritten by each run), before an earlier run's logs/
        candidates.append(log_dir / METRICS_FILE)
    candidates.append(path / LOG_SUBDIR / METRICS_FILE)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    where = f"{path}, {log_dir} (its config.yaml's metric_logger.log_dir) or {path / 'logs'}" if log_dir else f"{path} or {path / 'logs'}"
    raise FileNotFoundError(
        f"no {METRICS_FILE} in {where}: give a training run's output_dir, or the folder holding its {METRICS_FILE}"
    )


def run_log_dir(run_dir: str | Path) -> Path:
    """The folder of a run's logs: the ``metric_logger.log_dir`` its saved ``config.yaml`` names,
    else ``run_dir/logs``."""
    return _configured_log_dir(Path(run_dir)) or Path(run_dir) / LOG_SUBDIR


def run_logger_type(run_dir: str | Path) -> str | None:
    """The ``metric_logger.type`` a run's saved ``config.yaml`` names, if it can be read."""
    config = _saved_config(Path(run_dir))
    logger = config.get("metric_logger") if config else None
    return logger.get("type") if isinstance(logger, dict) else None


def _saved_config(run_dir: Path) -> dict[str, Any] | None:
    """A run's saved ``config.yaml``, if there is one that reads as a mapping."""
    try:
        config = yaml.safe_load((run_dir / RUN_CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError, RecursionError):  # (ValueError: not UTF-8)
        return None
    return config if isinstance(config, dict) else None


def _configured_log_dir(run_dir: Path) -> Path | None:
    """The ``metric_logger.log_dir`` a run's saved ``config.yaml`` names, if any. A relative one is
    taken as the trainer did (from its working directory) unless it lies inside the recorded
    ``output_dir``: then it is found inside ``run_dir``, wherever the run folder is now."""
    config = _saved_config(run_dir)
    logger = config.get("metric_logger") if config else None
    log_dir = logger.get("log_dir") if isinstance(logger, dict) else None
    if not isinstance(log_dir, str) or not log_dir:
        return None
    output_dir = config.get("output_dir")
    if isinstance(output_dir, str) and output_dir:
        inside = os.path.relpath(log_dir, output_dir)
        if not inside.startswith(os.pardir) and os.path.isabs(log_dir) == os.path.isabs(output_dir):
            return run_dir / inside
    return Path(log_dir)


def _parsed_lines(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(line, record) of each line of a metrics log holding a JSON object; warns of the others."""
    if not path.exists():
        return []
    out, broken = _parsed_text(path.read_text(encoding="utf-8-sig", errors="replace").splitlines())
    if broken:
        print(f"warning: {path}: skipped {len(broken)} line(s) that are not JSON records (lines {broken[:10]}; "
              "a run killed while writing leaves one)", file=sys.stderr)
    return out


def _parsed_text(lines: list[str]) -> tuple[list[tuple[str, dict[str, Any]]], list[int]]:
    """(line, record) of each line holding a JSON object, and the (1-based) numbers of the others."""
    out, broken = [], []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            record = None
        if isinstance(record, dict):
            out.append((line, record))
        else:
            broken.append(number)
    return out, broken
