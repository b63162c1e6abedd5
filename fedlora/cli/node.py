"""``fedlora node``: what a hospital's IT runs to start the site's node.

Every input is checked before a process starts (key, CA, data file and
columns, the labels, the ledger folder, the trust file; see
:mod:`fedlora.deploy.preflight`), and the SuperNode is started behind
fedlora's pinned ClientApp launcher, so the node runs only the apps the
site's trust file allows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedlora.cli.common import FLWR_HOME_DIR, CaCert, PrintCommand, exec_or_print, fail
from fedlora.deploy import flower as deploy
from fedlora.deploy import flwr_cli, preflight
from fedlora.errors import ConfigError, FedloraError
from fedlora.protocol import NODE_REQUIRE_SECAGG, NODE_SITE_NAME

SuperlinkOpt = Annotated[
    str, typer.Option(help="The server's HOST:PORT, as given by the operator.")
]

KeyOpt = Annotated[
    Path, typer.Option(help="This node's private key (nodes/<name>.key) from the operator.")
]

DataPathOpt = Annotated[Path, typer.Option(help="This site's CSV/JSONL/Parquet file.")]

SiteNameOpt = Annotated[
    str, typer.Option(help="A stable name for this site (default: the key's file name).")
]

TextColumnOpt = Annotated[str, typer.Option(help="Column holding the text.")]

LabelColumnOpt = Annotated[str, typer.Option(help="Column holding the label.")]

LabelsOpt = Annotated[
    str,
    typer.Option(help="The federation's labels 'a,b,c': read the file now, check every row."),
]

PrivacyEpsilonCapOpt = Annotated[
    float | None, typer.Option(help="Most ε this site's data may ever spend (local DP).")
]

PrivacyDeltaOpt = Annotated[float | None, typer.Option(help="δ for this site's ledger.")]

PrivacyLedgerDirOpt = Annotated[
    Path | None, typer.Option(help="Persistent folder for this site's privacy ledger.")
]

RequireSecaggOpt = Annotated[
    bool, typer.Option(help="Refuse plain training: this site only joins SecAgg+ rounds.")
]

RuntimePortOpt = Annotated[
    int, typer.Option(help="Local port (127.0.0.1) for the node's app runtime.")
]

StateDirOpt = Annotated[Path | None, typer.Option(help="Where the node keeps installed apps.")]

MaxRetriesOpt = Annotated[
    int | None, typer.Option(help="Give up after this many reconnection attempts.")
]

MaxWaitTimeOpt = Annotated[
    float | None, typer.Option(help="Give up reconnecting after this many seconds.")
]

TrustedAppsOpt = Annotated[
    Path | None,
    typer.Option(
        help="This site's trust file: 'sha256:<digest>' lines (fedlora app-digest) and "
        "'ed25519:<name>:<key>' signer lines. The node runs no other app."
    ),
]

TrustAnyAppOpt = Annotated[
    bool,
    typer.Option(help="Run whatever app the server submits (not for real sites)."),
]


def node(
    superlink: SuperlinkOpt,
    ca: CaCert,
    key: KeyOpt,
    data_path: DataPathOpt,
    site_name: SiteNameOpt = "",
    text_column: TextColumnOpt = "text",
    label_column: LabelColumnOpt = "label",
    labels: LabelsOpt = "",
    privacy_epsilon_cap: PrivacyEpsilonCapOpt = None,
    privacy_delta: PrivacyDeltaOpt = None,
    privacy_ledger_dir: PrivacyLedgerDirOpt = None,
    require_secagg: RequireSecaggOpt = False,
    runtime_port: RuntimePortOpt = deploy.DEFAULT_SUPERNODE_PORT,
    state_dir: StateDirOpt = None,
    max_retries: MaxRetriesOpt = None,
    max_wait_time: MaxWaitTimeOpt = None,
    trusted_apps: TrustedAppsOpt = None,
    trust_any_app: TrustAnyAppOpt = False,
    print_command: PrintCommand = False,
) -> None:
    """Start this site's node; refuses to start while a file or setting is wrong."""
    from fedlora.app_trust import TrustPolicy

    try:
        if trusted_apps is None and not trust_any_app:
            raise ConfigError(
                "give --trusted-apps FILE (the apps this site's IT approved; "
                "`fedlora app-digest` prints an app's digest) so the node runs no other "
                "code, or --trust-any-app to run whatever the server submits"
            )
        if trusted_apps is not None:
            trusted_apps = trusted_apps.expanduser().resolve()
            TrustPolicy.load(trusted_apps)  # a bad file fails now, not at the first round
        node_config, notes = preflight.check_node_inputs(
            ca=ca,
            key=key,
            data_path=data_path,
            text_column=text_column,
            label_column=label_column,
            labels=labels,
            site_name=site_name or key.stem,
            privacy=(privacy_epsilon_cap, privacy_delta, privacy_ledger_dir),
        )
        for note in notes:
            typer.echo(note, err=True)
        if require_secagg:
            node_config[NODE_REQUIRE_SECAGG] = True
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
        fail(f"node not started: {exc}")
    state = (state_dir or Path(f"~/.fedlora/node-{node_config[NODE_SITE_NAME]}")).expanduser()
    state = state.resolve()
    if not print_command:
        state.mkdir(parents=True, exist_ok=True)
        typer.echo(
            f"fedlora node {node_config[NODE_SITE_NAME]}: {data_path} -> {superlink}; only "
            "adapter tensors and metrics leave this site",
            err=True,
        )
    env = flwr_cli.flower_env(state / FLWR_HOME_DIR)
    if not print_command:
        env = deploy.pinned_clientapp_env(env, state / "bin", trusted_apps)
    elif trust_any_app:
        typer.echo("warning: --trust-any-app: this node runs any submitted app", err=True)
    exec_or_print(command, env, state, print_command)
