"""Local Flower processes on loopback: ports, start, logs, stop.

What the deployment tests and a one-machine trial run need around
``subprocess``: a free port, waiting until a port listens, a process whose
output goes to a log file and whose whole process tree is stopped on exit
(psutil), so a failed test never leaves a SuperLink behind.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import IO

import psutil

from fedlora.deploy.flower import LOOPBACK, DeploymentError


def free_port(host: str = LOOPBACK) -> int:
    """A port that was free a moment ago (another process may still take it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_for_port(
    host: str,
    port: int,
    timeout: float,
    *,
    process: subprocess.Popen[bytes] | None = None,
) -> None:
    """Block until ``host:port`` accepts TCP connections.

    Raises DeploymentError on timeout or, if ``process`` is given, as soon as
    that process exits (so a crash is reported now, not after the timeout).
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            pass
        if process is not None and process.poll() is not None:
            raise DeploymentError(
                f"process {process.pid} exited with code {process.returncode} "
                f"before listening on {host}:{port}."
            )
        if time.monotonic() > deadline:
            raise DeploymentError(f"nothing listens on {host}:{port} after {timeout}s.")
        time.sleep(0.1)


class LocalProcess:
    """A process that lives for one ``with`` block, logging to ``log_path``.

    On entry it starts the command and, if ``ready_port`` is set, waits until
    that port accepts connections. On exit it sends SIGTERM to the process
    and everything it spawned, waits ``stop_timeout`` and kills what is left.
    """

    def __init__(
        self,
        command: Sequence[str],
        log_path: str | os.PathLike[str],
        *,
        env: Mapping[str, str] | None = None,
        ready_port: int | None = None,
        ready_host: str = LOOPBACK,
        ready_timeout: float = 60.0,
        stop_timeout: float = 10.0,
    ) -> None:
        self.command = list(command)
        self.log_path = Path(log_path)
        self.env = dict(env) if env is not None else None
        self.ready_port = ready_port
        self.ready_host = ready_host
        self.ready_timeout = ready_timeout
        self.stop_timeout = stop_timeout
        self.popen: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def __enter__(self) -> LocalProcess:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def returncode(self) -> int | None:
        """Exit code, or None while running."""
        return self._started().poll()

    def start(self) -> None:
        """Start the process and wait for ``ready_port`` if one was given."""
        if self.popen is not None:
            raise DeploymentError(f"{self.command[0]} was already started.")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("wb")
        self.popen = subprocess.Popen(
            self.command,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=self.env,
        )
        if self.ready_port is None:
            return
        try:
            wait_for_port(self.ready_host, self.ready_port, self.ready_timeout, process=self.popen)
        except DeploymentError as err:
            self.stop()
            raise DeploymentError(
                f"{Path(self.command[0]).name} did not become ready: {err}\n"
                f"Last log lines ({self.log_path}):\n{self.log_tail()}"
            ) from err

    def wait(self, timeout: float) -> int:
        """Wait for the process to exit by itself; return its exit code."""
        try:
            return self._started().wait(timeout=timeout)
        except subprocess.TimeoutExpired as err:
            raise DeploymentError(
                f"{Path(self.command[0]).name} still running after {timeout}s.\n"
                f"Last log lines ({self.log_path}):\n{self.log_tail()}"
            ) from err

    def stop(self) -> None:
        """Terminate the process and its descendants; safe to call twice."""
        if self.popen is None:
            return
        try:
            if self.popen.poll() is None:
                self._terminate_tree(self.popen)
        finally:
            if self._log is not None:
                self._log.close()
                self._log = None

    def log_tail(self, max_chars: int = 4000) -> str:
        """The end of the log file (for error messages)."""
        if self._log is not None:
            self._log.flush()
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no log)"
        return text[-max_chars:]

    def _started(self) -> subprocess.Popen[bytes]:
        if self.popen is None:
            raise DeploymentError(f"{self.command[0]} has not been started.")
        return self.popen

    def _terminate_tree(self, popen: subprocess.Popen[bytes]) -> None:
        try:
            # Collected before the parent dies: orphans are re-parented and
            # could no longer be found from it.
            children = psutil.Process(popen.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            children = []
        # Parent first, so it can shut its helpers down the way it expects;
        # then whatever survived it (e.g. the SuperLink's detached SuperExec).
        popen.terminate()
        try:
            popen.wait(timeout=self.stop_timeout)
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait(timeout=self.stop_timeout)
        _terminate_and_reap(children, self.stop_timeout)


def stop_all(processes: Iterable[LocalProcess]) -> None:
    """Stop several processes at once; each graceful shutdown takes seconds."""
    with ThreadPoolExecutor() as pool:
        list(pool.map(LocalProcess.stop, processes))


def _terminate_and_reap(procs: list[psutil.Process], timeout: float) -> None:
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.terminate()
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(alive, timeout=timeout)
