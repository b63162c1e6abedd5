"""``fedlora console``: the read-only web page over run directories.

A command of its own so the deployment and research commands stay free of
the web stack; the console itself is :mod:`fedlora.console.server`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedlora.cli.common import fail

app = typer.Typer(add_completion=False)


@app.command()
def console(
    run_dirs: Annotated[
        list[Path],
        typer.Argument(help="Run directories, sweep folders, or folders of runs (live ones too)."),
    ],
    host: Annotated[
        str, typer.Option(help="Address to listen on; beyond loopback only with TLS.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8765,
    token: Annotated[
        str,
        typer.Option(
            help="Access token (>= 16 characters); default: a new one, printed once.",
            envvar="FEDLORA_CONSOLE_TOKEN",
        ),
    ] = "",
    certfile: Annotated[
        Path | None, typer.Option(help="TLS certificate (PEM), e.g. from `fedlora certs`.")
    ] = None,
    keyfile: Annotated[Path | None, typer.Option(help="TLS private key (PEM).")] = None,
) -> None:
    """Serve a live, read-only page of the runs: status, rounds, charts, sites,
    failures, ε against caps, partitions, the adapter, the audit, the plots.
    Every request needs the token; nothing is fetched from the internet."""
    from fedlora.console.server import serve

    for path in (certfile, keyfile):
        if path is not None and not path.is_file():
            fail(f"--certfile/--keyfile {path}: no such file (make one with `fedlora certs`)")
    try:
        serve(run_dirs, host, port, token or None, certfile, keyfile, announce=typer.echo)
    except ValueError as exc:
        fail(str(exc))
