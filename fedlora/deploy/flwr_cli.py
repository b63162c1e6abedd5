"""The operator's side of a deployment through Flower's ``flwr`` CLI: register, submit, watch.

``flwr`` talks to the SuperLink's Control API with the connection written
by :func:`fedlora.deploy.flower.write_flwr_connection_config`. These
wrappers run it with that ``FLWR_HOME``, parse its ``--format json`` output,
and turn its failures into :class:`~fedlora.deploy.flower.DeploymentError`
naming the command and what it printed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedlora.deploy.flower import (
    ConfigValue,
    DeploymentError,
    flower_executable,
    flwr_run_command,
    register_node_command,
)
from fedlora.errors import ConfigError


def flower_env(
    flwr_home: str | os.PathLike[str], extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Environment for Flower processes and the ``flwr`` CLI.

    ``FLWR_HOME`` isolates config, installed apps and credentials per process.
    PATH starts with this interpreter's scripts folder because the SuperLink
    and SuperNode start ``flower-superexec`` by name. Telemetry and the update
    check are off: federation machines are often offline, and a private
    deployment should not announce itself.
    """
    env = dict(os.environ)
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([bin_dir, env.get("PATH", "")])
    env["FLWR_HOME"] = str(Path(flwr_home).expanduser().resolve())
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    env["PYTHONUNBUFFERED"] = "1"  # log files show output as it happens
    env.update(extra or {})
    return env


def flwr_json(
    command: Sequence[str], flwr_home: str | os.PathLike[str], *, timeout: float = 60
) -> dict[str, Any]:
    """Run a ``flwr ... --format json`` command; return its JSON or raise."""
    done = _run_flwr(command, flwr_home, timeout)
    # stdout is the JSON document, possibly after stray log lines.
    start = done.stdout.find("{")
    payload: Any = None
    if start >= 0:
        try:
            payload, _ = json.JSONDecoder().raw_decode(done.stdout[start:])
        except ValueError:
            payload = None
    if not isinstance(payload, dict) or not payload.get("success", False):
        detail = (payload or {}).get("error-message") or done.stderr or done.stdout
        raise DeploymentError(
            f"`{' '.join(command)}` failed (exit {done.returncode}): {str(detail).strip()[-2000:]}"
        )
    return payload


def register_node(
    flwr_home: str | os.PathLike[str],
    connection: str,
    public_key: str | os.PathLike[str],
) -> int:
    """Register a node's public key with the SuperLink; return its node id."""
    try:
        payload = flwr_json(register_node_command(public_key, connection), flwr_home)
    except DeploymentError as err:
        if "already in use" not in str(err):
            raise
        raise DeploymentError(
            f"public key {public_key} is already registered with SuperLink "
            f"connection '{connection}' (its --database keeps registrations "
            "across restarts). Nothing to do, or remove it first with "
            "`flwr supernode unregister`."
        ) from err
    return int(payload["node-id"])


def submit_run(
    flwr_home: str | os.PathLike[str],
    app_dir: str | os.PathLike[str],
    connection: str,
    *,
    run_config: Mapping[str, ConfigValue] | None = None,
    wait: bool = False,
    timeout: float = 120.0,
) -> int:
    """Start a run of the app in ``app_dir``; return its run id.

    With ``wait`` this returns once the run has ended (one ``flwr run
    --stream`` call instead of polling), successful or not: check
    :func:`run_status`.
    """
    command = flwr_run_command(app_dir, connection, run_config=run_config, stream=wait)
    return int(flwr_json(command, flwr_home, timeout=timeout)["run-id"])


def run_status(flwr_home: str | os.PathLike[str], connection: str, run_id: int) -> str:
    """Status of a run, e.g. ``running`` or ``finished:completed``/``:failed``."""
    flwr = flower_executable("flwr")
    command = [flwr, "ls", connection, "--run-id", str(run_id), "--format", "json"]
    runs = flwr_json(command, flwr_home)["runs"]
    if len(runs) != 1:
        raise DeploymentError(f"SuperLink lists {len(runs)} runs for run id {run_id}.")
    return str(runs[0]["status"])


def wait_for_run(
    flwr_home: str | os.PathLike[str],
    connection: str,
    run_id: int,
    *,
    timeout: float,
    poll_interval: float = 1.0,
) -> str:
    """Poll until the run is ``finished:*``; return that status."""
    deadline = time.monotonic() + timeout
    while True:
        status = run_status(flwr_home, connection, run_id)
        if status.startswith("finished"):
            return status
        if time.monotonic() > deadline:
            raise DeploymentError(
                f"run {run_id} still '{status}' after {timeout:.0f}s; see "
                f"`flwr log {run_id} {connection} --show` and the SuperNode logs."
            )
        time.sleep(poll_interval)


def run_logs(flwr_home: str | os.PathLike[str], connection: str, run_id: int) -> str:
    """The ServerApp log of a run so far (``flwr log --show``)."""
    command = [flower_executable("flwr"), "log", str(run_id), connection, "--show"]
    done = _run_flwr(command, flwr_home, timeout=60)
    return done.stdout + done.stderr


def _run_flwr(
    command: Sequence[str], flwr_home: str | os.PathLike[str], timeout: float
) -> subprocess.CompletedProcess[str]:
    home = Path(flwr_home).expanduser().resolve()
    if not (home / "config.toml").is_file():
        raise ConfigError(
            f"FLWR_HOME {home} has no config.toml; create the SuperLink "
            "connection first with write_flwr_connection_config()."
        )
    try:
        return subprocess.run(
            list(command),
            env=flower_env(home),
            # `flwr` treats a pyproject.toml in its working directory as an
            # app whose legacy settings it may rewrite; run it where none is.
            cwd=home,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as err:
        raise DeploymentError(
            f"`{' '.join(command)}` did not finish within {timeout:.0f}s; is the "
            f"SuperLink reachable at the address in {home / 'config.toml'}?"
        ) from err
