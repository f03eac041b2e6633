"""The command-line tools' standard streams: text they cannot encode, and a reader that is gone.

Under an ASCII locale (``LC_ALL=C`` with ``PYTHONUTF8=0``) a print of non-ASCII text (an answer,
a data record quoted in a report) raised UnicodeEncodeError, after the work was done. The tools
write such characters as escapes instead. A stdout whose reader went away (``| head -n 1``) ends
a tool quietly. A stdout that cannot be written (a full disk under ``> log.txt``) is named as
such, where the OSError of a failed write names no file.
"""

from __future__ import annotations

import io
import os
import sys


def tolerant_console() -> None:
    """Characters stdout and stderr cannot encode are written as backslash escapes. A closed
    stderr (``2>&-``: ``sys.stderr`` is None) becomes /dev/null: ``print(..., file=None)`` would
    write its messages and reports into stdout, among the program's output."""
    if sys.stderr is None:
        sys.stderr = open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115  (for the process's life)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(errors="backslashreplace")
        except (AttributeError, ValueError, io.UnsupportedOperation):  # (None, closed, or not a text wrapper)
            pass


def stdout_reader_gone() -> int:
    """After a BrokenPipeError on stdout: points stdout at /dev/null (Python's flush at exit would
    fail again) and returns the exit status, 1."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 1


def print_out(text: str) -> int:
    """Prints ``text`` to stdout, flushed; returns the exit status: 0, or 1 where stdout cannot take
    it (quietly for a reader gone, else with a line on stderr)."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        return stdout_reader_gone()
    except OSError as e:
        print(f"error: cannot write to standard output: {e.strerror or e}", file=sys.stderr)
        return 1
    return 0


STDOUT_NAME = "<standard output>"


class StdoutErrorsNamed:
    """Stands in for ``sys.stdout`` while a tool works: an OSError of a write or flush names the
    stream (as ``filename``, ``STDOUT_NAME``), so that it is told apart from the tool's files."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError as e:
            raise OSError(e.errno, e.strerror, STDOUT_NAME) from None  # (EPIPE: a BrokenPipeError still)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError as e:
            raise OSError(e.errno, e.strerror, STDOUT_NAME) from None

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def recovered_utf8(text: str) -> str:
    """An argument whose UTF-8 bytes were decoded under an ASCII locale (each byte past 0x7f a
    lone surrogate, by surrogateescape): the text those bytes spell; ``text`` where they are no UTF-8."""
    try:
        return os.fsencode(text).decode("utf-8")
    except UnicodeError:
        return text
