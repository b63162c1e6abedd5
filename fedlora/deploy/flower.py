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

Credentials come from :mod:`fedlora.deploy.certs`; a missing one is reported up front
with the command that creates it.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import sys
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import tomli_w

from fedlora.deploy.keyfiles import CERTS_COMMAND
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
        flower_executable("flower-superlink"),
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
        flower_executable("flower-supernode"),
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
    flwr = flower_executable("flwr")
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
    command = [flower_executable("flwr"), "run", str(app), connection]
    if run_config:
        command += ["--run-config", format_config_args(run_config)]
    if stream:
        command.append("--stream")
    if json_output:
        command += ["--format", "json"]
    return command


# ------------------------------------------------------------------ flwr CLI


# ------------------------------------------------------------------ processes


def flower_executable(name: str) -> str:
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
