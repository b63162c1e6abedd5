"""A clean terminal for ``fedlora simulate``: one progress display, the rest to a log.

Why at the file-descriptor level: the noise comes from everywhere — Flower's
deprecation notice (printed twice), Ray's worker lines forwarded to the
driver, transformers' warnings and weight-loading bars, torch's C++ warnings —
and much of it is written by C++ or by other processes straight to file
descriptors 1 and 2, past any Python logger. So, unless ``-v``, both
descriptors point at ``<run-dir>/fedlora.log`` for the run, and the display
writes to a duplicate of the real terminal. The display reads the run's own
``metrics.json`` (what the server already writes), so it shows exactly what
the run recorded, from whichever process wrote it.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from fedlora.rundir import METRICS_JSON
from fedlora.server.history import round_line

LOG_FILE = "fedlora.log"


@contextlib.contextmanager
def quiet_output(log_path: Path) -> Iterator[IO[str]]:
    """Send everything written to stdout/stderr (any process, any language) to
    ``log_path``; yield a stream to the real terminal."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    terminal = os.fdopen(os.dup(saved[0]), "w", buffering=1, encoding="utf-8")
    with log_path.open("a", encoding="utf-8") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield terminal
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            terminal.close()


class RoundDisplay:
    """Follows ``metrics.json`` in a thread: a live bar on a terminal, or one
    line per round when the output is a file or a pipe (CI logs)."""

    def __init__(self, run_dir: Path, total: int, stream: IO[str], poll_s: float = 0.5):
        self.path, self.total, self.stream, self.poll_s = (
            run_dir / METRICS_JSON,
            total,
            stream,
            poll_s,
        )
        self.shown = -1
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, daemon=True)
        self._progress: Any = None

    def __enter__(self) -> RoundDisplay:
        if self.stream.isatty():
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )

            self._progress = Progress(
                TextColumn("[bold]rounds"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("{task.description}"),
                console=Console(file=self.stream),
                transient=False,
                redirect_stdout=False,  # Python's stdout/stderr stay on the log file
                redirect_stderr=False,
            )
            self._progress.start()
            self._task = self._progress.add_task("starting…", total=self.total)
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self._update()  # the last rounds, written just before the run ended
        if self._progress is not None:
            self._progress.stop()

    def _follow(self) -> None:
        while not self._stop.wait(self.poll_s):
            self._update()

    def _update(self) -> None:
        try:
            rounds = json.loads(self.path.read_text()).get("rounds", [])
        except (OSError, ValueError):
            return
        for record in rounds:
            if not isinstance(record, dict) or record.get("round", -1) <= self.shown:
                continue
            self.shown = int(record["round"])
            line = round_line(record, self.total)
            if self._progress is not None:
                self._progress.update(self._task, completed=self.shown, description=line)
            else:
                self.stream.write(line + "\n")
                self.stream.flush()
