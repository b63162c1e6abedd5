"""`fedlora certs|server|register|node|run`: the checks before any process starts.

Fast: nothing here starts a Flower process (``--print-command`` shows what
would run). tests/test_deploy_fedlora.py runs the commands for real.
"""

from __future__ import annotations

import re
import shlex
import stat
from pathlib import Path

import pytest
from conftest import make_text_csv
from flwr.common.config import parse_config_args
from typer.testing import CliRunner

from fedlora.cli.ops import app
from fedlora.deploy import flower as deploy
from fedlora.deploy.preflight import run_outcome
from fedlora.rundir import write_status

runner = CliRunner()


@pytest.fixture(scope="module")
def creds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ops") / "certs"
    result = runner.invoke(
        app,
        ["certs", "--out", str(out), "--host", "localhost", "--node", "site-a", "--node", "b"],
    )
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def site_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_text_csv(tmp_path_factory.mktemp("site") / "notes.csv", n=12)


def test_certs_says_which_file_goes_to_whom(creds: Path) -> None:
    result = runner.invoke(
        app, ["certs", "--out", str(creds.parent / "again"), "--host", "10.0.0.5", "--node", "x"]
    )
    out = result.output
    assert "ca.key  [0600]" in out and "keep it offline" in out
    assert "node x (copy to that site only)" in out
    assert f"{creds.parent / 'again' / 'nodes' / 'x.key'}  [0600]" in out
    assert "fedlora register --superlink 10.0.0.5:8000" in out
    for key in [creds / "ca.key", creds / "server.key", creds / "nodes" / "site-a.key"]:
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    # Refuses to overwrite a CA silently.
    again = runner.invoke(app, ["certs", "--out", str(creds), "--host", "h", "--node", "b"])
    assert again.exit_code == 2 and "--overwrite" in again.output


def test_server_command_has_tls_auth_persistence_and_no_installs(
    creds: Path, tmp_path: Path
) -> None:
    state = tmp_path / "server"
    result = runner.invoke(
        app, ["server", "--certs", str(creds), "--state-dir", str(state), "--print-command"]
    )
    assert result.exit_code == 0, result.output
    line = result.output.strip().splitlines()[-1]
    assert line.startswith(f"cd {state} && ")
    command = shlex.split(line.split(" && ", 1)[1])
    assert Path(command[0]).name == "flower-superlink"
    assert "--enable-supernode-auth" in command
    assert "--disable-runtime-dependency-installation" in command
    assert command[command.index("--database") + 1] == str(state / "superlink.db")
    assert command[command.index("--ssl-certfile") + 1] == str(creds / "server.pem")
    assert command[command.index("--host") + 1] == "127.0.0.1"  # loopback unless asked


def test_server_without_certificates_names_the_file_and_the_fix(tmp_path: Path) -> None:
    result = runner.invoke(app, ["server", "--certs", str(tmp_path), "--print-command"])
    assert result.exit_code == 2
    assert str(tmp_path / "server.pem") in result.output and "fedlora certs" in result.output


def _node(creds: Path, data: Path, *extra: str, key: str = "site-a.key") -> list[str]:
    return [
        "node",
        "--superlink",
        "10.0.0.5:8000",
        "--ca",
        str(creds / "ca.crt"),
        "--key",
        str(creds / "nodes" / key),
        "--data-path",
        str(data),
        "--print-command",
        "--trust-any-app",
        *extra,
    ]


def test_node_command_carries_the_site_config(creds: Path, site_csv: Path, tmp_path: Path) -> None:
    ledger = tmp_path / "ledger"
    extra = ["--labels", "money,sport,tech", "--privacy-epsilon-cap", "8"]
    extra += ["--privacy-delta", "1e-5", "--privacy-ledger-dir", str(ledger)]
    result = runner.invoke(app, _node(creds, site_csv, *extra))
    assert result.exit_code == 0, result.output
    command = shlex.split(result.output.strip().splitlines()[-1].split(" && ", 1)[1])
    assert Path(command[0]).name == "flower-supernode"
    assert command[command.index("--auth-supernode-private-key") + 1] == str(
        creds / "nodes" / "site-a.key"
    )
    node_config = parse_config_args([command[command.index("--node-config") + 1]])
    assert node_config == {
        "data-path": str(site_csv),
        "text-column": "text",
        "label-column": "label",
        "site-name": "site-a",  # from the key's file name
        "privacy-epsilon-cap": 8.0,
        "privacy-delta": 1e-5,
        "privacy-ledger-dir": str(ledger),
    }
    assert ledger.is_dir()


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"data": "missing.csv"}, r"data file .*missing\.csv does not exist"),
        ({"extra": ["--text-column", "body", "--labels", "money,sport,tech"]}, "no column 'body'"),
        ({"extra": ["--labels", "money,sport"]}, "label 'tech'"),
        ({"key": "site-a.pub"}, r"not an unencrypted OpenSSH private key.*not the \.pub"),
        ({"key": "nobody.key"}, r"nobody\.key does not exist.*fedlora certs"),
        ({"extra": ["--privacy-delta", "1e-5"]}, "give all three of --privacy-epsilon-cap"),
        ({"extra": ["--site-name", "../etc"]}, r"--site-name '\.\./etc': give 1-64 letters"),
        ({"extra": ["--site-name", "a b"]}, r"--site-name 'a b': give 1-64 letters"),
    ],
)
def test_node_refuses_to_start_with_a_clear_reason(
    creds: Path, site_csv: Path, change: dict, expected: str
) -> None:
    data = site_csv.parent / change["data"] if "data" in change else site_csv
    args = _node(creds, data, *change.get("extra", []), key=change.get("key", "site-a.key"))
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "node not started" in result.output
    assert re.search(expected, result.output), result.output


def test_node_refuses_a_missing_ca(creds: Path, site_csv: Path, tmp_path: Path) -> None:
    args = _node(creds, site_csv)
    args[args.index("--ca") + 1] = str(tmp_path / "ca.crt")
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert f"CA certificate {tmp_path / 'ca.crt'} does not exist" in result.output


def test_run_refuses_an_unknown_config_key_before_submitting(creds: Path, tmp_path: Path) -> None:
    args = ["run", "--ca", str(creds / "ca.crt"), "--flwr-home", str(tmp_path / "h")]
    result = runner.invoke(app, [*args, "-c", "learning_rate=0.1"])
    assert result.exit_code == 2
    assert "unknown config key 'learning_rate'" in result.output
    assert not (tmp_path / "h").exists()  # nothing was written or sent


@pytest.mark.parametrize(
    ("flwr_status", "local", "outcome", "text"),
    [
        (deploy.RUN_COMPLETED, "completed", "completed", "fedlora: completed"),
        (deploy.RUN_COMPLETED, "stopped", "stopped", "stopped early: too few nodes"),
        (deploy.RUN_COMPLETED, "running", "failed", "fedlora: 'running'"),
        (deploy.RUN_FAILED, "failed", "failed", "fedlora: too few nodes"),
        (deploy.RUN_COMPLETED, None, "completed", "status.json not read"),
        (deploy.RUN_FAILED, None, "failed", "SuperLink: finished:failed"),
    ],
)
def test_run_outcome_needs_both_flower_and_fedlora_to_agree(
    tmp_path: Path, flwr_status: str, local: str | None, outcome: str, text: str
) -> None:
    run_dir = None
    if local is not None:
        run_dir = tmp_path
        write_status(tmp_path, local, "too few nodes" if local != "completed" else "")
    got, message = run_outcome(flwr_status, run_dir)
    assert got == outcome and text in message, message


def test_a_deployed_run_that_lost_site_replies_is_not_plain_completed(tmp_path: Path) -> None:
    write_status(tmp_path, "completed", "", clients_failed=2)
    got, message = run_outcome(deploy.RUN_COMPLETED, tmp_path)
    assert got == "sites-failed" and "completed, but 2 site replies failed" in message


def test_a_completed_run_that_lost_replies_exits_4_and_says_so(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The exit-code mapping of `fedlora simulate` (the run itself is stubbed here; a
    real run with a failing site: test_simulation.py, test_one_failing_client_...)."""
    from fedlora.cli.main import app as main_app
    from fedlora.simulations import engine

    outcome = {"status": "completed", "run_dir": str(tmp_path), "clients_failed": 0}
    monkeypatch.setattr(engine, "simulate", lambda *a, **k: dict(outcome))
    assert CliRunner().invoke(main_app, ["simulate", "-n", "2"]).exit_code == 0
    outcome["clients_failed"] = 3
    result = CliRunner().invoke(main_app, ["simulate", "-n", "2"])
    assert result.exit_code == 4
    assert "completed, but 3 client replies failed" in result.output
