"""Checks around a deployment's processes: before a node starts, after a run ends.

Flower reports a wrong deployment late and far from its cause: a node with a
wrong data column starts fine and then fails every round on the server's
log; ``flwr run --stream`` exits 0 for a failed run, and Flower's
``finished:completed`` also covers a fedlora run that stopped early. This
module holds the pure(ish) checks ``fedlora node``/``run``/``certs``
(:mod:`fedlora.cli.ops`, :mod:`fedlora.cli.node`) make, so they can be tested without starting
anything:

* :func:`check_node_inputs`: the node's files and settings, each problem
  named with its file and fix; returns the node's ``--node-config``;
* :func:`run_outcome`: a run's ending from the SuperLink's status *and*
  fedlora's ``status.json``;
* :func:`describe_plan`: which credential file goes to whom.
"""

from __future__ import annotations

import os
import stat
import tomllib
from pathlib import Path
from typing import Any, Literal

from fedlora.deploy import certs as certs_lib
from fedlora.deploy import flower as deploy
from fedlora.errors import ConfigError, DataError
from fedlora.protocol import (
    NODE_DATA_PATH,
    NODE_DELTA,
    NODE_EPSILON_CAP,
    NODE_LABEL_COLUMN,
    NODE_LEDGER_DIR,
    NODE_SITE_NAME,
    NODE_TEXT_COLUMN,
    SITE_NAME_RULE,
    valid_site_name,
)

Outcome = Literal["completed", "sites-failed", "stopped", "failed"]

# Node-config keys read by fedlora.client.app and fedlora.client.private.

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


def describe_plan(plan: dict[str, dict[str, Path]]) -> str:
    """Which file goes to whom, with its permissions (``fedlora certs`` output)."""
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
) -> tuple[dict[str, deploy.ConfigValue], list[str]]:
    """Check a node's files and settings; return its node config and notes.

    Parameters
    ----------
    ca, key : Path
        The CA certificate and the node's OpenSSH private key.
    data_path, text_column, label_column : Path, str, str
        The site's file and its columns.
    labels : str
        The federation's labels ``"a,b,c"``; when given the whole file is read
        now (columns and every label checked), otherwise only its presence.
    site_name : str
        The site's stable name.
    privacy : (cap, delta, ledger_dir)
        All three or none; creates the ledger folder.

    Returns
    -------
    (dict, list of str)
        ``--node-config`` values, and notes worth printing (warnings).

    Raises
    ------
    fedlora.errors.FedloraError
        Naming the file or option and the fix.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key

    notes: list[str] = []
    ca_file = deploy.require_file(ca, "CA certificate")
    try:
        x509.load_pem_x509_certificate(ca_file.read_bytes())
    except ValueError as err:
        raise ConfigError(
            f"{ca_file} is not a PEM certificate ({err}); pass the ca.crt from "
            f"`{certs_lib.CERTS_COMMAND}`"
        ) from None
    key_file = deploy.require_file(key, "SuperNode authentication private key")
    try:
        load_ssh_private_key(key_file.read_bytes(), password=None)
    except (ValueError, TypeError) as err:
        raise ConfigError(
            f"{key_file} is not an unencrypted OpenSSH private key ({err}); pass the node's "
            f"nodes/<name>{certs_lib.PRIVATE_KEY_SUFFIX} from `{certs_lib.CERTS_COMMAND}`, "
            f"not the {certs_lib.PUBLIC_KEY_SUFFIX} file"
        ) from None
    if stat.S_IMODE(key_file.stat().st_mode) & 0o077:
        raise ConfigError(
            f"{key_file} is readable by other users of this machine: anyone who reads it "
            f"can join the federation as this site. Run `chmod 600 {key_file}`"
        )
    data = _check_data(data_path, text_column, label_column, labels, notes)
    if not valid_site_name(site_name):
        raise ConfigError(f"--site-name {site_name!r}: give {SITE_NAME_RULE}")
    node_config: dict[str, deploy.ConfigValue] = {
        NODE_DATA_PATH: str(data),
        NODE_TEXT_COLUMN: text_column,
        NODE_LABEL_COLUMN: label_column,
        NODE_SITE_NAME: site_name,
    }
    node_config.update(_check_privacy(*privacy))
    return node_config, notes


def _check_data(
    data_path: Path, text_column: str, label_column: str, labels: str, notes: list[str]
) -> Path:
    from fedlora.data.labels import LabelSpace
    from fedlora.data.sources import load_table

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
        notes.append(f"{data}: {len(table)} rows, columns and labels check out")
    else:
        notes.append(
            f"note: {data} was not read; pass --labels 'a,b,c' (the federation's list) to "
            "check its columns and labels before the first round"
        )
    return data


def _check_privacy(
    cap: float | None, delta: float | None, ledger: Path | None
) -> dict[str, deploy.ConfigValue]:
    given = [v is not None for v in (cap, delta, ledger)]
    if not any(given):
        return {}
    if cap is None or delta is None or ledger is None:
        raise ConfigError(
            "give all three of --privacy-epsilon-cap, --privacy-delta and "
            "--privacy-ledger-dir, or none (then the node refuses runs with local DP)"
        )
    if not cap > 0 or not 0 < delta < 1:
        raise ConfigError(
            f"--privacy-epsilon-cap {cap} / --privacy-delta {delta}: need cap > 0 and 0 < delta < 1"
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
    return {
        NODE_EPSILON_CAP: float(cap),
        NODE_DELTA: float(delta),
        NODE_LEDGER_DIR: str(ledger_dir),
    }


def run_outcome(flwr_status: str, run_dir: Path | None) -> tuple[Outcome, str]:
    """How a run ended, from the SuperLink's status and fedlora's status.json.

    Flower reports ``finished:completed`` whenever the ServerApp returned,
    also when fedlora stopped early (too few nodes); status.json says which.
    ``run_dir`` is None when the run directory is not on this machine.
    """
    from fedlora.rundir import status_of

    local = status_of(run_dir) if run_dir is not None else None
    link = f"SuperLink: {flwr_status}"
    where = f" (status.json in {run_dir})" if run_dir is not None else ""
    if flwr_status != deploy.RUN_COMPLETED:
        reason = f"; fedlora: {local.get('reason')}" if local and local.get("reason") else ""
        return "failed", f"{link}{reason}{where}"
    if local is None:
        return "completed", f"{link}; run-dir not on this machine, status.json not read"
    state = local.get("status")
    failed = int(local.get("clients_failed") or 0)
    if state == "completed" and failed:
        return "sites-failed", (
            f"{link}; fedlora: completed, but {failed} site repl"
            f"{'y' if failed == 1 else 'ies'} failed (crash, timeout or refusal; reasons in "
            f"{run_dir}/metrics.csv)"
        )
    if state == "completed":
        return "completed", f"{link}; fedlora: completed; results in {run_dir}"
    if state == "stopped":
        return "stopped", f"{link}; fedlora: stopped early: {local.get('reason', '')}{where}"
    return "failed", f"{link} but fedlora: {state!r}{where}"


def app_defaults(app_dir: Path) -> dict[str, Any]:
    """The run-config defaults of the Flower App in ``app_dir``."""
    pyproject = app_dir / "pyproject.toml"
    if not pyproject.is_file():
        raise ConfigError(
            f"{app_dir} is not a Flower App folder (no pyproject.toml); pass --app with "
            "the fedlora repository root"
        )
    with pyproject.open("rb") as handle:
        flwr = tomllib.load(handle).get("tool", {}).get("flwr", {})
    if "components" not in flwr.get("app", {}):
        raise ConfigError(f"{pyproject} has no [tool.flwr.app.components]; pass --app")
    return dict(flwr["app"].get("config", {}))


def local_run_dir(run_dir: str, server_state_dir: Path | None) -> Path | None:
    """The run directory if it is on this machine (relative: under the server's state dir)."""
    path = Path(run_dir).expanduser()
    if not path.is_absolute():
        if server_state_dir is None:
            return None
        path = server_state_dir.expanduser() / path
    return path.resolve() if path.is_dir() else None
