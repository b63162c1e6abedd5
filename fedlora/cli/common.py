"""What every ``fedlora`` command shares: exit codes, ``-c`` parsing, error output.

Exit codes: 0 the run completed; 1 it failed; 2 bad input (config, paths);
3 it stopped early for a stated reason (e.g. too few nodes replied); 4 it
completed, but some client replies failed along the way (a crashed or
out-of-memory site: see the failures in metrics.csv). A user's scripts test
these; they never change meaning.
"""

from __future__ import annotations

import os
import shlex
import sys
import tomllib
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from fedlora.errors import ConfigError, FedloraError

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_STOPPED, EXIT_SITES_FAILED = 0, 1, 2, 3, 4
FLWR_HOME_DIR = "flwr-home"  # the flwr CLI's config folder inside a state folder

CaCert = Annotated[Path, typer.Option("--ca", help="The deployment's CA certificate (ca.crt).")]
PrintCommand = Annotated[
    bool, typer.Option("--print-command", help="Print the command instead of running it.")
]


def fail(message: str, code: int = EXIT_BAD_INPUT) -> NoReturn:
    """Print ``error: message`` in red on stderr and exit with ``code``."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``key=value`` pairs (TOML values) and/or TOML files, later wins."""
    out: dict[str, Any] = {}
    for item in items:
        path = Path(item)
        if "=" not in item and path.suffix == ".toml":
            if not path.is_file():
                raise FedloraError(f"config file {item!r} does not exist")
            try:
                data = tomllib.loads(path.read_text(encoding="utf-8"))
            except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
                raise ConfigError(f"config file {item} is not valid TOML: {err}") from None
            out.update(data.get("config", data))
            continue
        if "=" not in item:
            raise FedloraError(
                f"-c {item!r} is neither key=value nor a .toml file; "
                "write e.g. -c num-server-rounds=5"
            )
        key, raw = (s.strip() for s in item.split("=", 1))
        try:
            out[key] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            out[key] = raw  # bare strings need no quotes on the command line
    return out


def exec_or_print(command: list[str], env: dict[str, str], cwd: Path, print_only: bool) -> None:
    """Replace this process with ``command`` (or print it, for a service unit)."""
    if print_only:
        typer.echo(f"cd {shlex.quote(str(cwd))} && {shlex.join(command)}")
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.chdir(cwd)
    # exec, not a child: the service manager's SIGTERM must reach the Flower process.
    os.execve(command[0], command, env)
