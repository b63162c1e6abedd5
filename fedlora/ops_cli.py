"""Deployment commands: ``fedlora certs | server | register | node | run``.

The operator creates credentials (``certs``), starts the SuperLink
(``server``), registers each hospital's public key (``register``) and submits
runs (``run``); each hospital starts its node (``node``). The commands wrap
:mod:`fedlora.certs` and :mod:`fedlora.deploy`; what they add is the checks a
person needs *before* a process starts (a missing key, an unreadable data
file, a wrong column) with the file and the fix named, and a ``run`` whose
exit code says how the run ended (``flwr run`` exits 0 when a run failed).

``server`` and ``node`` replace themselves with the Flower process
(``exec``), so a service manager's stop signal reaches it directly;
``--print-command`` prints the command instead, e.g. for a systemd unit.

Exit codes (as ``fedlora simulate``): 0 completed, 1 failed, 2 bad input,
3 the run stopped early for a stated reason.
"""

from __future__ import annotations

import os
import shlex
import stat
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from fedlora import certs as certs_lib
from fedlora import deploy
from fedlora.errors import FedloraError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Deployment: credentials, the operator's server, hospitals' nodes, runs.",
)

# Same values as fedlora.cli (not imported: fedlora.cli mounts this module).
EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_STOPPED = 0, 1, 2, 3

DEFAULT_CONNECTION = "fedlora"
DEFAULT_SUPERLINK = f"{deploy.LOOPBACK}:{deploy.DEFAULT_SUPERLINK_PORT}"
DEFAULT_CLI_HOME = Path("~/.fedlora/cli")
DEFAULT_SERVER_STATE = Path("~/.fedlora/server")
DATABASE_FILE = "superlink.db"
FLWR_HOME_DIR = "flwr-home"

_PLAN_TITLES = {
    "operator": "operator (this machine; ca.key never leaves it, keep it offline)",
    "superlink": "server (`fedlora server --certs DIR`)",
    "flwr-cli": "whoever runs `fedlora register` / `fedlora run`",
}
_PURPOSE = {
    "ca-key": "signs server certificates; needed only to re-issue server.pem",
    "ca-cert": "public; every party trusts the server through it",
    "ssl-certfile": "server certificate (public)",
    "ssl-keyfile": "server TLS private key",
    "ssl-ca-certfile": "CA certificate",
    "root-certificates": "CA certificate (verifies the server)",
    "auth-supernode-private-key": "this node's login key; nobody else gets it",
}

Superlink = Annotated[
    str,
    typer.Option(
        help="SuperLink address HOST:PORT; HOST must be in the server cert's --host list."
    ),
]
CaCert = Annotated[Path, typer.Option("--ca", help="The deployment's CA certificate (ca.crt).")]
FlwrHome = Annotated[
    Path, typer.Option(help="Folder for the flwr CLI's connection config (FLWR_HOME).")
]
Connection = Annotated[str, typer.Option(help="Name of the SuperLink connection in FLWR_HOME.")]
PrintCommand = Annotated[
    bool, typer.Option("--print-command", help="Print the command instead of running it.")
]


def _fail(message: str, code: int = EXIT_BAD_INPUT) -> NoReturn:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _exec(command: list[str], env: dict[str, str], cwd: Path, print_only: bool) -> None:
    if print_only:
        typer.echo(f"cd {shlex.quote(str(cwd))} && {shlex.join(command)}")
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.chdir(cwd)
    # exec, not a child: the service manager's SIGTERM must reach the Flower process.
    os.execve(command[0], command, env)


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
        _fail(str(exc))
    typer.echo(describe_plan(plan))
    ca = plan["operator"]["ca-cert"]
    keys = " ".join(str(plan["operator"][f"public-key:{n}"]) for n in node)
    typer.echo(
        "\nNext, once `fedlora server` runs, register the nodes:\n"
        f"  fedlora register --superlink {host[0]}:{deploy.DEFAULT_SUPERLINK_PORT} "
        f"--ca {ca} {keys}"
    )


def describe_plan(plan: dict[str, dict[str, Path]]) -> str:
    """Which file goes to whom, with permissions, as printed by ``fedlora certs``."""
    lines = []
    for recipient, files in plan.items():
        if recipient.startswith("supernode:"):
            title = f"node {recipient.split(':', 1)[1]} (copy to that site only)"
        else:
            title = _PLAN_TITLES.get(recipient, recipient)
        lines.append(f"{title}:")
        for purpose, path in files.items():
            mode = stat.S_IMODE(path.stat().st_mode)
            if purpose.startswith("public-key:"):
                why = f"register with `fedlora register` ({purpose.split(':', 1)[1]}'s public key)"
            else:
                why = _PURPOSE.get(purpose, purpose)
            lines.append(f"  {path}  [{mode:04o}]  {why}")
    return "\n".join(lines)


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
        _fail(str(exc))
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
    _exec(command, deploy.flower_env(state / FLWR_HOME_DIR), state, print_command)


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
        _fail(str(exc))
    failed = False
    for key in public_keys:
        try:
            node_id = deploy.register_node(flwr_home, connection, key)
        except deploy.DeploymentError as exc:
            if "already registered" in str(exc):
                typer.echo(f"{key}: already registered, nothing to do")
                continue
            typer.secho(f"{key}: {exc}", fg=typer.colors.RED, err=True)
            failed = True
            continue
        typer.echo(f"{key}: registered as node {node_id}")
    raise typer.Exit(EXIT_FAILED if failed else EXIT_OK)


# -------------------------------------------------------------------- node


@app.command()
def node(
    superlink: Annotated[
        str, typer.Option(help="The server's HOST:PORT, as given by the operator.")
    ],
    ca: CaCert,
    key: Annotated[
        Path, typer.Option(help="This node's private key (nodes/<name>.key) from the operator.")
    ],
    data_path: Annotated[Path, typer.Option(help="This site's CSV/JSONL/Parquet file.")],
    site_name: Annotated[
        str, typer.Option(help="A stable name for this site (default: the key's file name).")
    ] = "",
    text_column: Annotated[str, typer.Option(help="Column holding the text.")] = "text",
    label_column: Annotated[str, typer.Option(help="Column holding the label.")] = "label",
    labels: Annotated[
        str,
        typer.Option(help="The federation's labels 'a,b,c': read the file now, check every row."),
    ] = "",
    privacy_epsilon_cap: Annotated[
        float | None, typer.Option(help="Most ε this site's data may ever spend (local DP).")
    ] = None,
    privacy_delta: Annotated[float | None, typer.Option(help="δ for this site's ledger.")] = None,
    privacy_ledger_dir: Annotated[
        Path | None, typer.Option(help="Persistent folder for this site's privacy ledger.")
    ] = None,
    runtime_port: Annotated[
        int, typer.Option(help="Local port (127.0.0.1) for the node's app runtime.")
    ] = deploy.DEFAULT_SUPERNODE_PORT,
    state_dir: Annotated[
        Path | None, typer.Option(help="Where the node keeps installed apps.")
    ] = None,
    max_retries: Annotated[
        int | None, typer.Option(help="Give up after this many reconnection attempts.")
    ] = None,
    max_wait_time: Annotated[
        float | None, typer.Option(help="Give up reconnecting after this many seconds.")
    ] = None,
    print_command: PrintCommand = False,
) -> None:
    """Start this site's node; refuses to start while a file or setting is wrong."""
    try:
        node_config = check_node_inputs(
            ca=ca,
            key=key,
            data_path=data_path,
            text_column=text_column,
            label_column=label_column,
            labels=labels,
            site_name=site_name or key.stem,
            privacy=(privacy_epsilon_cap, privacy_delta, privacy_ledger_dir),
        )
        command = deploy.supernode_command(
            superlink=superlink,
            root_certificates=ca,
            auth_private_key=key,
            node_config=node_config,
            runtime_port=runtime_port,
            max_retries=max_retries,
            max_wait_time=max_wait_time,
        )
    except FedloraError as exc:
        _fail(f"node not started: {exc}")
    state = (state_dir or Path(f"~/.fedlora/node-{node_config['site-name']}")).expanduser()
    state = state.resolve()
    if not print_command:
        state.mkdir(parents=True, exist_ok=True)
        typer.echo(
            f"fedlora node {node_config['site-name']}: {data_path} -> {superlink}; only "
            "adapter tensors and metrics leave this site",
            err=True,
        )
    _exec(command, deploy.flower_env(state / FLWR_HOME_DIR), state, print_command)


def check_node_inputs(
    *,
    ca: Path,
    key: Path,
    data_path: Path,
    text_column: str,
    label_column: str,
    labels: str,
    site_name: str,
    privacy: tuple[float | None, float | None, Path | None],
) -> dict[str, deploy.ConfigValue]:
    """Check a node's files and settings; return its ``--node-config``.

    Raises :class:`fedlora.errors.FedloraError` naming the file or option and
    the fix, so the node refuses to start instead of failing every round.
    """
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key

    from fedlora.data.labels import LabelSpace
    from fedlora.data.sources import load_table
    from fedlora.errors import ConfigError, DataError

    deploy.require_file(ca, "CA certificate")
    key_file = deploy.require_file(key, "SuperNode authentication private key")
    try:
        load_ssh_private_key(key_file.read_bytes(), password=None)
    except (ValueError, TypeError) as err:
        raise ConfigError(
            f"{key_file} is not an unencrypted OpenSSH private key ({err}); pass the node's "
            f"nodes/<name>{certs_lib.NODE_PRIVATE_SUFFIX} from `{certs_lib.CERTS_COMMAND}`, "
            f"not the {certs_lib.NODE_PUBLIC_SUFFIX} file"
        ) from None
    if stat.S_IMODE(key_file.stat().st_mode) & 0o077:
        typer.secho(
            f"warning: {key_file} is readable by other users; run `chmod 600 {key_file}`",
            fg=typer.colors.YELLOW,
            err=True,
        )
    data = data_path.expanduser().resolve()
    if not data.is_file():
        raise DataError(
            f"data file {data} does not exist or is not a file; pass --data-path with this "
            "site's CSV, JSONL or Parquet file"
        )
    try:
        with data.open("rb"):
            pass
    except OSError as err:
        raise DataError(
            f"data file {data} cannot be read ({err.strerror}); give the user running the "
            "node read access to it"
        ) from None
    if labels:
        # Reading the whole file now costs seconds; a wrong column or label found
        # here is one clear message instead of an error reply in every round.
        space = LabelSpace.of(s.strip() for s in labels.split(",") if s.strip())
        table = load_table(data, text_column, label_column, space)
        typer.echo(f"{data}: {len(table)} rows, columns and labels check out", err=True)
    else:
        typer.echo(
            f"note: {data} was not read; pass --labels 'a,b,c' (the federation's list) to "
            "check its columns and labels before the first round",
            err=True,
        )
    if not site_name or any(c.isspace() for c in site_name):
        raise ConfigError(f"--site-name {site_name!r}: give a name without spaces")
    node_config: dict[str, deploy.ConfigValue] = {
        "data-path": str(data),
        "text-column": text_column,
        "label-column": label_column,
        "site-name": site_name,
    }
    cap, delta, ledger = privacy
    given = [v is not None for v in privacy]
    if any(given) and not all(given):
        raise ConfigError(
            "give all three of --privacy-epsilon-cap, --privacy-delta and "
            "--privacy-ledger-dir, or none (then the node refuses runs with local DP)"
        )
    if cap is not None and delta is not None and ledger is not None:
        if not cap > 0 or not 0 < delta < 1:
            raise ConfigError(
                f"--privacy-epsilon-cap {cap} / --privacy-delta {delta}: need cap > 0 and "
                "0 < delta < 1"
            )
        ledger_dir = ledger.expanduser().resolve()
        try:
            ledger_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ConfigError(f"--privacy-ledger-dir {ledger_dir}: {err.strerror}") from None
        if not os.access(ledger_dir, os.W_OK):
            raise ConfigError(
                f"--privacy-ledger-dir {ledger_dir} is not writable by this user; the node "
                "must record every round's privacy spend there"
            )
        node_config.update(
            {
                "privacy-epsilon-cap": float(cap),
                "privacy-delta": float(delta),
                "privacy-ledger-dir": str(ledger_dir),
            }
        )
    return node_config


# --------------------------------------------------------------------- run


def default_app_dir() -> Path:
    """The fedlora Flower App folder: the repository root this package lives in."""
    return Path(__file__).resolve().parent.parent


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
    stream: Annotated[bool, typer.Option(help="Print the server's log while it runs.")] = True,
    server_state_dir: Annotated[
        Path | None,
        typer.Option(
            help="The server's --state-dir, if it runs on this machine: a relative "
            "run-dir is read from there."
        ),
    ] = None,
) -> None:
    """Submit a run to the SuperLink, follow it, and exit with how it ended."""
    from fedlora.cli import parse_overrides
    from fedlora.config import RunConfig

    app_path = (app_dir or default_app_dir()).expanduser().resolve()
    try:
        overrides = parse_overrides(config or [])
        flat = {**_app_defaults(app_path), **overrides}
        cfg = RunConfig.from_flat(flat)  # a typo fails here, not on the server
        deploy.write_flwr_connection_config(flwr_home, connection, superlink, ca)
    except FedloraError as exc:
        _fail(str(exc))
    start = time.monotonic()
    try:
        run_id = deploy.submit_run(flwr_home, app_path, connection, run_config=overrides)
    except FedloraError as exc:
        _fail(str(exc), EXIT_FAILED)
    typer.echo(f"submitted run {run_id} to {superlink}", err=True)
    deadline = start + timeout if timeout > 0 else None
    try:
        if stream:
            _stream_logs(flwr_home, connection, run_id, deadline)
        remaining = max(1.0, deadline - time.monotonic()) if deadline else 10 * 365 * 86400.0
        status = deploy.wait_for_run(flwr_home, connection, run_id, timeout=remaining)
    except deploy.DeploymentError as exc:
        _fail(str(exc), EXIT_FAILED)
    except KeyboardInterrupt:
        _fail(
            f"stopped following run {run_id}; it goes on on the server. Stop it with "
            f"`FLWR_HOME={flwr_home} flwr stop {run_id} {connection}`",
            130,
        )
    code, message = run_outcome(status, _local_run_dir(cfg.run_dir, server_state_dir))
    colour = typer.colors.GREEN if code == EXIT_OK else typer.colors.RED
    typer.secho(f"run {run_id}: {message}", fg=colour, err=code != EXIT_OK)
    raise typer.Exit(code)


def run_outcome(flwr_status: str, run_dir: Path | None) -> tuple[int, str]:
    """Exit code and sentence from the SuperLink's status and fedlora's status.json.

    Flower reports ``finished:completed`` whenever the ServerApp returned, also
    when fedlora stopped early (too few nodes); status.json says which.
    """
    from fedlora.server.app import status_of

    local = status_of(run_dir) if run_dir is not None else None
    link = f"SuperLink: {flwr_status}"
    where = f" (status.json in {run_dir})" if run_dir is not None else ""
    if flwr_status != deploy.RUN_COMPLETED:
        reason = f"; fedlora: {local.get('reason')}" if local and local.get("reason") else ""
        return EXIT_FAILED, f"{link}{reason}{where}"
    if local is None:
        return EXIT_OK, f"{link}; run-dir not on this machine, status.json not read"
    state = local.get("status")
    if state == "completed":
        return EXIT_OK, f"{link}; fedlora: completed; results in {run_dir}"
    if state == "stopped":
        return EXIT_STOPPED, f"{link}; fedlora: stopped early: {local.get('reason', '')}{where}"
    return EXIT_FAILED, f"{link} but fedlora: {state!r}{where}"


def _app_defaults(app_dir: Path) -> dict[str, Any]:
    pyproject = app_dir / "pyproject.toml"
    if not pyproject.is_file():
        raise FedloraError(
            f"{app_dir} is not a Flower App folder (no pyproject.toml); pass --app with "
            "the fedlora repository root"
        )
    with pyproject.open("rb") as handle:
        flwr = tomllib.load(handle).get("tool", {}).get("flwr", {})
    if "components" not in flwr.get("app", {}):
        raise FedloraError(f"{pyproject} has no [tool.flwr.app.components]; pass --app")
    return dict(flwr["app"].get("config", {}))


def _local_run_dir(run_dir: str, server_state_dir: Path | None) -> Path | None:
    path = Path(run_dir).expanduser()
    if not path.is_absolute():
        if server_state_dir is None:
            return None
        path = server_state_dir.expanduser() / path
    return path.resolve() if path.is_dir() else None


def _stream_logs(flwr_home: Path, connection: str, run_id: int, deadline: float | None) -> None:
    """Print the ServerApp's log until the run ends (``flwr log`` streams till then)."""
    home = flwr_home.expanduser().resolve()
    flwr = Path(sys.executable).parent / "flwr"
    command = [str(flwr) if flwr.is_file() else "flwr", "log", str(run_id), connection]
    with subprocess.Popen(command, env=deploy.flower_env(home), cwd=home) as proc:
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


if __name__ == "__main__":  # pragma: no cover - `python -m fedlora.ops_cli`
    app()
