"""Deployment commands: ``fedlora certs | server | register | node | run``.

The operator creates credentials (``certs``), starts the SuperLink
(``server``), registers each hospital's public key (``register``) and submits
runs (``run``); each hospital starts its node (``node``). The commands wrap
:mod:`fedlora.deploy.certs` and :mod:`fedlora.deploy`; what they add is the checks a
person needs *before* a process starts (a missing key, an unreadable data
file, a wrong column; :mod:`fedlora.deploy.preflight`) with the file and the fix
named, and a ``run`` whose exit code says how the run ended (``flwr run``
exits 0 when a run failed).

``server`` and ``node`` replace themselves with the Flower process
(``exec``), so a service manager's stop signal reaches it directly;
``--print-command`` prints the command instead, e.g. for a systemd unit.

Exit codes (as ``fedlora simulate``): 0 completed, 1 failed, 2 bad input,
3 the run stopped early for a stated reason, 4 it completed but some site
replies failed.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Annotated

import typer

from fedlora.cli.common import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_SITES_FAILED,
    EXIT_STOPPED,
    FLWR_HOME_DIR,
    CaCert,
    PrintCommand,
    exec_or_print,
    fail,
    parse_overrides,
)
from fedlora.cli.node import node
from fedlora.deploy import certs as certs_lib
from fedlora.deploy import flower as deploy
from fedlora.deploy import flwr_cli, preflight
from fedlora.errors import FedloraError
from fedlora.server.history import ROUND_LINE

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Deployment: credentials, the operator's server, hospitals' nodes, runs.",
)


DEFAULT_CONNECTION = "fedlora"
DEFAULT_SUPERLINK = f"{deploy.LOOPBACK}:{deploy.DEFAULT_SUPERLINK_PORT}"
DEFAULT_CLI_HOME = Path("~/.fedlora/cli")
DEFAULT_SERVER_STATE = Path("~/.fedlora/server")
DATABASE_FILE = "superlink.db"

Superlink = Annotated[
    str,
    typer.Option(
        help="SuperLink address HOST:PORT; HOST must be in the server cert's --host list."
    ),
]
FlwrHome = Annotated[
    Path, typer.Option(help="Folder for the flwr CLI's connection config (FLWR_HOME).")
]
Connection = Annotated[str, typer.Option(help="Name of the SuperLink connection in FLWR_HOME.")]
Verbose = Annotated[
    bool,
    typer.Option(
        "-v", "--verbose", help="Print the server's whole log, not only fedlora's progress."
    ),
]


# ------------------------------------------------------------------- certs


@app.command()
def certs(
    out: Annotated[Path, typer.Option(help="Folder to write the files into.")],
    host: Annotated[
        list[str],
        typer.Option(help="DNS name or IP nodes use to reach the server; repeat for each."),
    ],
    node: Annotated[
        list[str], typer.Option(help="A node (site) name, e.g. hospital-a; repeat for each.")
    ],
    overwrite: Annotated[bool, typer.Option(help="Replace existing files.")] = False,
) -> None:
    """Create the CA, the server certificate and one login key pair per node."""
    try:
        plan = certs_lib.generate_all(out, host, node, overwrite=overwrite)
    except FedloraError as exc:
        fail(str(exc))
    typer.echo(preflight.describe_plan(plan))
    ca = plan["operator"]["ca-cert"]
    keys = " ".join(str(plan["operator"][f"public-key:{n}"]) for n in node)
    typer.echo(
        "\nNext, once `fedlora server` runs, register the nodes:\n"
        f"  fedlora register --superlink {host[0]}:{deploy.DEFAULT_SUPERLINK_PORT} "
        f"--ca {ca} {keys}"
    )


# ------------------------------------------------------------------ server


@app.command()
def server(
    certs_dir: Annotated[
        Path, typer.Option("--certs", help="Folder from `fedlora certs` (server.pem, ca.crt).")
    ],
    host: Annotated[
        str,
        typer.Option(
            help="Interface to listen on. Loopback by default: give the address on the "
            "network your nodes use (see docs/OPERATOR.md on the control API)."
        ),
    ] = deploy.LOOPBACK,
    port: Annotated[int, typer.Option(help="The one HTTPS port (nodes, CLI, apps).")] = (
        deploy.DEFAULT_SUPERLINK_PORT
    ),
    state_dir: Annotated[
        Path,
        typer.Option(
            help="Keeps the database (runs, registered nodes) and installed apps; relative "
            "run-dir paths land here."
        ),
    ] = DEFAULT_SERVER_STATE,
    print_command: PrintCommand = False,
) -> None:
    """Start the SuperLink in the foreground: TLS, node authentication, persistent state."""
    state = state_dir.expanduser().resolve()
    try:
        command = deploy.superlink_command(
            ssl_certfile=certs_dir / certs_lib.SERVER_CERT,
            ssl_keyfile=certs_dir / certs_lib.SERVER_KEY,
            ssl_ca_certfile=certs_dir / certs_lib.CA_CERT,
            host=host,
            port=port,
            database=state / DATABASE_FILE,
            enable_supernode_auth=True,
            runtime_dependency_installation=False,
        )
    except FedloraError as exc:
        fail(str(exc))
    if not print_command:
        state.mkdir(parents=True, exist_ok=True)
        typer.echo(
            f"fedlora server: SuperLink on {host}:{port} (TLS, registered nodes only); "
            f"state in {state}",
            err=True,
        )
        if host in ("0.0.0.0", "::"):
            typer.secho(
                "warning: listening on all interfaces; the control API (submit/stop runs, "
                "register nodes) shares this port and has no login in open-source Flower. "
                "Firewall it to the node network and the operator's machine.",
                fg=typer.colors.YELLOW,
                err=True,
            )
    exec_or_print(command, flwr_cli.flower_env(state / FLWR_HOME_DIR), state, print_command)


# ---------------------------------------------------------------- register


@app.command()
def register(
    public_keys: Annotated[
        list[Path], typer.Argument(help="Nodes' public keys (nodes/<name>.pub).")
    ],
    ca: CaCert,
    superlink: Superlink = DEFAULT_SUPERLINK,
    flwr_home: FlwrHome = DEFAULT_CLI_HOME,
    connection: Connection = DEFAULT_CONNECTION,
) -> None:
    """Allow nodes to connect: register their public keys with the SuperLink."""
    try:
        deploy.write_flwr_connection_config(flwr_home, connection, superlink, ca)
        for key in public_keys:
            deploy.require_file(key, "SuperNode public key")
    except FedloraError as exc:
        fail(str(exc))
    failed = False
    for key in public_keys:
        try:
            node_id = flwr_cli.register_node(flwr_home, connection, key)
        except deploy.DeploymentError as exc:
            if "already registered" in str(exc):
                typer.echo(f"{key}: already registered, nothing to do")
                continue
            typer.secho(f"{key}: {exc}", fg=typer.colors.RED, err=True)
            failed = True
            continue
        typer.echo(f"{key}: registered as node {node_id}")
    raise typer.Exit(EXIT_FAILED if failed else EXIT_OK)


app.command()(node)


# ------------------------------------------------------------- app trust


@app.command("app-digest")
def app_digest(
    app_dir: Annotated[
        Path | None,
        typer.Option("--app", help="Flower App folder (default: fedlora's repository root)."),
    ] = None,
) -> None:
    """Print the digest a site pins to run this app ('sha256:...' for --trusted-apps)."""
    from fedlora.app_trust import app_dir_digest

    try:
        typer.echo(f"sha256:{app_dir_digest((app_dir or default_app_dir()).resolve())}")
    except (FedloraError, ValueError) as exc:
        fail(str(exc))


@app.command("signing-key")
def signing_key(
    out: Annotated[Path, typer.Option(help="Folder for <name>.signing.key.")],
    name: Annotated[str, typer.Option(help="The signer's name, e.g. consortium-release.")],
) -> None:
    """Create an app-signing key; prints the line sites add to their trusted-apps file."""
    from fedlora.app_trust import generate_signing_key

    try:
        line = generate_signing_key(out, name)
    except (FileExistsError, OSError) as exc:
        fail(f"signing key not written: {exc}")
    typer.echo(line)


# --------------------------------------------------------------------- run


def default_app_dir() -> Path:
    """The fedlora Flower App folder: the repository root this package lives in."""
    import fedlora

    return Path(fedlora.__file__).resolve().parent.parent


@app.command()
def run(
    ca: CaCert,
    config: Annotated[
        list[str] | None,
        typer.Option("-c", "--config", help="key=value or a TOML file; repeatable."),
    ] = None,
    app_dir: Annotated[
        Path | None,
        typer.Option("--app", help="Flower App folder (default: fedlora's repository root)."),
    ] = None,
    superlink: Superlink = DEFAULT_SUPERLINK,
    flwr_home: FlwrHome = DEFAULT_CLI_HOME,
    connection: Connection = DEFAULT_CONNECTION,
    timeout: Annotated[
        float, typer.Option(help="Give up waiting after this many seconds (0: never).")
    ] = 0.0,
    stream: Annotated[bool, typer.Option(help="Follow the server's log while it runs.")] = True,
    verbose: Verbose = False,
    server_state_dir: Annotated[
        Path | None,
        typer.Option(
            help="The server's --state-dir, if it runs on this machine: a relative "
            "run-dir is read from there."
        ),
    ] = None,
    sign_key: Annotated[
        Path | None,
        typer.Option(
            help="Sign the app with this key (fedlora signing-key) for sites that trust its signer."
        ),
    ] = None,
) -> None:
    """Submit a run to the SuperLink, follow it, and exit with how it ended."""
    from fedlora.config import RunConfig

    app_path = (app_dir or default_app_dir()).expanduser().resolve()
    try:
        overrides = parse_overrides(config or [])
        flat = {**preflight.app_defaults(app_path), **overrides}
        cfg = RunConfig.from_flat(flat)  # a typo fails here, not on the server
        if sign_key is not None:
            from fedlora.app_trust import app_dir_digest, sign_digest
            from fedlora.protocol import RUN_APP_SIGNATURE

            overrides[RUN_APP_SIGNATURE] = sign_digest(app_dir_digest(app_path), sign_key)
        deploy.write_flwr_connection_config(flwr_home, connection, superlink, ca)
    except FedloraError as exc:
        fail(str(exc))
    start = time.monotonic()
    try:
        run_id = flwr_cli.submit_run(flwr_home, app_path, connection, run_config=overrides)
    except FedloraError as exc:
        fail(str(exc), EXIT_FAILED)
    typer.echo(f"submitted run {run_id} to {superlink}", err=True)
    deadline = start + timeout if timeout > 0 else None
    try:
        if stream:
            _stream_logs(flwr_home, connection, run_id, deadline, verbose)
        remaining = max(1.0, deadline - time.monotonic()) if deadline else 10 * 365 * 86400.0
        status = flwr_cli.wait_for_run(flwr_home, connection, run_id, timeout=remaining)
    except deploy.DeploymentError as exc:
        fail(str(exc), EXIT_FAILED)
    except KeyboardInterrupt:
        fail(
            f"stopped following run {run_id}; it goes on on the server. Stop it with "
            f"`FLWR_HOME={flwr_home} flwr stop {run_id} {connection}`",
            130,
        )
    outcome, message = preflight.run_outcome(
        status, preflight.local_run_dir(cfg.run_dir, server_state_dir)
    )
    code = {
        "completed": EXIT_OK,
        "sites-failed": EXIT_SITES_FAILED,
        "stopped": EXIT_STOPPED,
    }.get(outcome, EXIT_FAILED)
    colour = typer.colors.GREEN if code == EXIT_OK else typer.colors.RED
    typer.secho(f"run {run_id}: {message}", fg=colour, err=code != EXIT_OK)
    raise typer.Exit(code)


#: Lines of the server's log that are fedlora's own progress and verdicts; the
#: rest (Flower's notices, third-party warnings) goes to the run's log file.
OWN_LINES = ("exporting round", "run stopped", "privacy audit", "late reply")


def _stream_logs(
    flwr_home: Path, connection: str, run_id: int, deadline: float | None, verbose: bool
) -> None:
    """Follow the ServerApp's log until the run ends (``flwr log`` streams till then):
    every line to ``<flwr-home>/logs/run-<id>.log``; fedlora's progress lines (or,
    with ``--verbose``, all) to the terminal."""
    home = flwr_home.expanduser().resolve()
    flwr = Path(sys.executable).parent / "flwr"
    command = [str(flwr) if flwr.is_file() else "flwr", "log", str(run_id), connection]
    log_path = home / "logs" / f"run-{run_id}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    typer.echo(f"server log: {log_path}", err=True)

    def follow(proc: subprocess.Popen[str], log: IO[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            log.flush()
            if verbose or ROUND_LINE.search(line) or any(mark in line for mark in OWN_LINES):
                typer.echo(line.rstrip("\n").split("INFO :      ", 1)[-1])

    with (
        log_path.open("a", encoding="utf-8") as log,
        subprocess.Popen(
            command,
            env=flwr_cli.flower_env(home),
            cwd=home,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        ) as proc,
    ):
        reader = threading.Thread(target=follow, args=(proc, log), daemon=True)
        reader.start()
        try:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()) if deadline else None)
        except subprocess.TimeoutExpired:
            proc.terminate()
            proc.wait(timeout=10)
            raise deploy.DeploymentError(
                f"run {run_id} did not finish in time; it goes on on the server"
            ) from None
        except BaseException:
            proc.terminate()
            raise
        finally:
            reader.join(timeout=10)


if __name__ == "__main__":  # pragma: no cover - `python -m fedlora.cli.ops`
    app()
