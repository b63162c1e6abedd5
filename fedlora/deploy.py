"""Build and launch the processes of a Flower 1.41 deployment (TLS + node auth).

Flower ships the processes (``flower-superlink``, ``flower-supernode``) and the
``flwr`` CLI; this module adds what a script or test needs around them:

* command lines with the flags that a TLS deployment with SuperNode
  authentication needs in 1.41 (one HTTPS port on the SuperLink serves the
  Fleet, Control and Runtime APIs; each SuperNode also opens a local Runtime
  API port, so two SuperNodes on one host need different ``--port`` values);
* an isolated ``FLWR_HOME`` with a ``config.toml`` SuperLink connection for
  the ``flwr`` CLI;
* a run's real outcome: ``flwr run --stream`` exits 0 even when the run failed,
  and ``flwr ... --format json`` exits 0 with ``"success": false`` on errors;
* :class:`LocalProcess`, which logs to a file, waits until the process listens
  and, on exit, stops it *and* the helpers it spawned (the SuperLink starts its
  SuperExec in a new session, so killing a process group would miss it).

Credentials come from :mod:`fedlora.certs`; a missing one is reported up front
with the command that creates it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import psutil
import tomli_w

from fedlora.certs import CERTS_COMMAND
from fedlora.errors import ConfigError, FedloraError

# flwr 1.41's own defaults (flwr.supercore.constant), restated so importing
# this module does not import flwr.
DEFAULT_SUPERLINK_PORT = 8000
DEFAULT_SUPERNODE_PORT = 9094
LOOPBACK = "127.0.0.1"
RUN_COMPLETED = "finished:completed"
RUN_FAILED = "finished:failed"

ConfigValue = bool | int | float | str


class DeploymentError(FedloraError, RuntimeError):
    """A Flower process or CLI call of the deployment did not do its job."""


# --------------------------------------------------------------------------- files


def require_file(path: str | os.PathLike[str], what: str) -> Path:
    """Return ``path`` made absolute, or raise naming it and how to create it.

    Flower reports a missing certificate late and vaguely (a process exits with
    "does not point to a file", or TLS fails after retries), so check first.
    """
    resolved = Path(path).expanduser().resolve()
    if not resolved.is_file():
        raise ConfigError(
            f"{what} {resolved} does not exist. Create the deployment's keys and "
            f"certificates with `{CERTS_COMMAND} --out {resolved.parent}` on the "
            "operator machine and copy this file here."
        )
    try:
        with resolved.open("rb"):
            pass
    except OSError as err:
        raise ConfigError(
            f"{what} {resolved} cannot be read ({err.strerror}). Give the user "
            "running this process read access to it (private keys: owner-only, "
            "mode 0600)."
        ) from err
    return resolved


def write_flwr_connection_config(
    flwr_home: str | os.PathLike[str],
    name: str,
    address: str,
    ca_cert: str | os.PathLike[str],
    *,
    make_default: bool = True,
) -> Path:
    """Add a TLS SuperLink connection to ``FLWR_HOME/config.toml``.

    ``flwr run/ls/log/supernode`` take the connection by ``name``. Other
    connections in the file are kept. ``address`` is ``host:port`` of the
    SuperLink (no scheme); ``host`` must be one of the server cert's SANs.

    Returns
    -------
    Path
        The config file written.
    """
    if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
        raise ConfigError(
            f"connection name {name!r}: use letters, digits, '-' or '_' (it is a "
            "TOML table name in config.toml)."
        )
    if "://" in address or ":" not in address:
        raise ConfigError(
            f"SuperLink address {address!r}: give host:port without a scheme, "
            f"e.g. '{LOOPBACK}:{DEFAULT_SUPERLINK_PORT}'."
        )
    ca = require_file(ca_cert, "CA certificate")
    home = Path(flwr_home).expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True)
    config_path = home / "config.toml"
    config: dict[str, Any] = {}
    if config_path.exists():
        with config_path.open("rb") as handle:
            config = tomllib.load(handle)
    superlink = config.setdefault("superlink", {})
    # root-certificates must be absolute: flwr rejects relative paths.
    superlink[name] = {"address": address, "root-certificates": str(ca)}
    if make_default:
        superlink["default"] = name
    config_path.write_text(tomli_w.dumps(config), encoding="utf-8")
    return config_path


# ------------------------------------------------------------------- commands


def format_config_args(values: Mapping[str, ConfigValue]) -> str:
    """Format ``--node-config``/``--run-config`` text (``k=1 k2="s" k3=true``)."""
    parts = []
    for key, value in values.items():
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", key):
            raise ConfigError(f"config key {key!r}: use letters, digits, '.-_' only.")
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, int | float):
            text = repr(value)
        elif "'" not in value and "\n" not in value:
            text = f"'{value}'"  # TOML literal string: backslashes stay as typed
        elif '"' not in value and "\\" not in value and "\n" not in value:
            text = f'"{value}"'
        else:
            raise ConfigError(
                f"config value for {key!r} ({value!r}) holds both quote kinds or a "
                "newline, which Flower's key=value parser cannot carry."
            )
        parts.append(f"{key}={text}")
    return " ".join(parts)


def superlink_command(
    *,
    ssl_certfile: str | os.PathLike[str],
    ssl_keyfile: str | os.PathLike[str],
    ssl_ca_certfile: str | os.PathLike[str],
    host: str = LOOPBACK,
    port: int = DEFAULT_SUPERLINK_PORT,
    database: str | os.PathLike[str] | None = None,
    enable_supernode_auth: bool = True,
    runtime_dependency_installation: bool = False,
) -> list[str]:
    """``flower-superlink`` over TLS; nodes must be registered when auth is on.

    Parameters
    ----------
    host, port : str, int
        The one HTTPS address for SuperNodes (Fleet API), the ``flwr`` CLI
        (Control API) and ServerApps (Runtime API). Use ``0.0.0.0`` to accept
        nodes from other machines.
    database : path or None
        SQLite file that keeps runs and registered nodes across restarts;
        None keeps state in memory.
    runtime_dependency_installation : bool
        Off here although flwr 1.41 turns it on for the SuperLink: when on, each
        run's ServerApp starts with ``uv sync`` of the app's dependencies into a
        fresh per-run environment, which needs ``uv`` and a package index and,
        for fedlora, would fetch torch again. Off, ServerApps use this
        environment, so it must hold the app's dependencies.
    """
    command = [
        _flower_executable("flower-superlink"),
        "--ssl-certfile",
        str(require_file(ssl_certfile, "SuperLink TLS certificate")),
        "--ssl-keyfile",
        str(require_file(ssl_keyfile, "SuperLink TLS private key")),
        "--ssl-ca-certfile",
        str(require_file(ssl_ca_certfile, "CA certificate")),
        "--host",
        host,
        "--port",
        str(_check_port(port)),
    ]
    if enable_supernode_auth:
        command.append("--enable-supernode-auth")
    if not runtime_dependency_installation:
        command.append("--disable-runtime-dependency-installation")
    if database is not None:
        command += ["--database", str(Path(database).expanduser().resolve())]
    return command


def supernode_command(
    *,
    superlink: str,
    root_certificates: str | os.PathLike[str],
    auth_private_key: str | os.PathLike[str] | None,
    node_config: Mapping[str, ConfigValue] | None = None,
    runtime_port: int = DEFAULT_SUPERNODE_PORT,
    max_retries: int | None = None,
    max_wait_time: float | None = None,
) -> list[str]:
    """``flower-supernode`` connecting to ``superlink`` (``host:port``) over TLS.

    Parameters
    ----------
    root_certificates : path
        The deployment's CA certificate; without it the node falls back to the
        system CAs and the TLS handshake fails.
    auth_private_key : path or None
        The node's OpenSSH EC private key (``nodes/<name>.key``); its public
        half must be registered first. None only for SuperLinks without auth.
    node_config : mapping
        Node-local settings the ClientApp reads from ``context.node_config``
        (e.g. ``data-file``).
    runtime_port : int
        Local port of the node's Runtime API (ClientApp <-> SuperNode); unique
        per SuperNode on one host. It listens on 127.0.0.1 only.
    max_retries, max_wait_time : int, float or None
        Bound reconnection attempts; None retries forever (fine for services).
    """
    command = [
        _flower_executable("flower-supernode"),
        "--superlink",
        superlink,
        "--root-certificates",
        str(require_file(root_certificates, "CA certificate")),
        "--port",
        str(_check_port(runtime_port)),
    ]
    if auth_private_key is not None:
        key = require_file(auth_private_key, "SuperNode authentication private key")
        command += ["--auth-supernode-private-key", str(key)]
    if node_config:
        command += ["--node-config", format_config_args(node_config)]
    if max_retries is not None:
        command += ["--max-retries", str(max_retries)]
    if max_wait_time is not None:
        command += ["--max-wait-time", str(max_wait_time)]
    return command


def pinned_clientapp_env(
    env: Mapping[str, str], bin_dir: Path, trusted_apps: Path | None
) -> dict[str, str]:
    """The SuperNode's environment with fedlora's app check in front of Flower.

    Flower's SuperExec starts ``flwr-clientapp`` by name; a script of that
    name first on PATH runs :mod:`fedlora.client.pinned` instead, which is
    Flower's ClientApp process plus the site's app check. ``trusted_apps``
    None means the site chose to trust any app.
    """
    bin_dir.mkdir(parents=True, exist_ok=True)
    shim = bin_dir / "flwr-clientapp"
    shim.write_text(
        f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m fedlora.client.pinned "$@"\n'
    )
    shim.chmod(0o755)
    out = dict(env)
    out["PATH"] = os.pathsep.join([str(bin_dir), out.get("PATH", "")])
    out.pop("FEDLORA_TRUST_ANY_APP", None)
    out.pop("FEDLORA_TRUSTED_APPS", None)
    if trusted_apps is None:
        out["FEDLORA_TRUST_ANY_APP"] = "1"
    else:
        out["FEDLORA_TRUSTED_APPS"] = str(trusted_apps)
    return out


def register_node_command(public_key: str | os.PathLike[str], connection: str) -> list[str]:
    """``flwr supernode register`` for one node's public key (JSON output)."""
    key = require_file(public_key, "SuperNode public key")
    flwr = _flower_executable("flwr")
    return [flwr, "supernode", "register", str(key), connection, "--format", "json"]


def flwr_run_command(
    app_dir: str | os.PathLike[str],
    connection: str,
    *,
    run_config: Mapping[str, ConfigValue] | None = None,
    stream: bool = False,
    json_output: bool = True,
) -> list[str]:
    """``flwr run`` for a local app folder (built into a FAB on the fly).

    ``json_output`` prints ``{"run-id": ...}``; with ``stream`` that comes only
    once the run has ended (the logs are swallowed), without it at once.
    ``stream`` alone prints the logs live. Either way ``flwr run`` exits 0
    when the run itself failed: check :func:`run_status`.
    """
    app = Path(app_dir).expanduser().resolve()
    _check_app_pyproject(app / "pyproject.toml")
    command = [_flower_executable("flwr"), "run", str(app), connection]
    if run_config:
        command += ["--run-config", format_config_args(run_config)]
    if stream:
        command.append("--stream")
    if json_output:
        command += ["--format", "json"]
    return command


# ------------------------------------------------------------------ flwr CLI


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
    flwr = _flower_executable("flwr")
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
    command = [_flower_executable("flwr"), "log", str(run_id), connection, "--show"]
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


# ------------------------------------------------------------------ processes


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


def _flower_executable(name: str) -> str:
    """Path of a Flower console script, preferring this interpreter's env."""
    local = Path(sys.executable).parent / name
    if local.is_file():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise DeploymentError(
            f"Flower command `{name}` not found next to {sys.executable} or on "
            "PATH. Install fedlora's dependencies (flwr>=1.41) in this environment."
        )
    return found


def _check_app_pyproject(pyproject: Path) -> None:
    if not pyproject.is_file():
        raise ConfigError(f"Flower App folder {pyproject.parent} has no pyproject.toml.")
    with pyproject.open("rb") as handle:
        flwr_tool = tomllib.load(handle).get("tool", {}).get("flwr", {})
    if "federations" in flwr_tool:
        # flwr 1.41 "migrates" this legacy section on `flwr run`: it rewrites
        # the app's pyproject.toml (commenting the section out) and makes the
        # migrated connection the default in FLWR_HOME/config.toml.
        raise ConfigError(
            f"{pyproject} has a [tool.flwr.federations] section, which "
            "`flwr run` (Flower 1.41) would comment out in that file while "
            "changing FLWR_HOME/config.toml. Remove the section: SuperLink "
            "connections live in FLWR_HOME/config.toml "
            "(write_flwr_connection_config), simulation sizes in "
            "`flwr run --federation-config`."
        )


def _check_port(port: int) -> int:
    if not 1 <= port <= 65535:
        raise ConfigError(f"port {port} is outside 1-65535.")
    return port
