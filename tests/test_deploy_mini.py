"""A real Flower deployment on loopback: TLS, SuperNode authentication, 2 nodes.

The tests marked ``deployment``/``slow`` start ``flower-superlink`` (TLS and
``--enable-supernode-auth``), register two node keys with ``flwr supernode
register``, start two ``flower-supernode`` processes and run
``tests/fixtures/mini_app`` (each node adds 1 to an array). Then they check the
two refusals that keep the federation private: a node whose key was not
registered, and a node that does not trust the deployment's CA. Every process
is stopped on context exit, whatever happens. The unmarked tests at the end
check the helpers in fedlora.deploy quickly.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from flwr.cli.flower_config import read_superlink_connection
from flwr.common.config import parse_config_args

from fedlora.deploy import certs, flwr_cli, processes
from fedlora.deploy import flower as deploy
from fedlora.errors import ConfigError

APP_DIR = Path(__file__).parent / "fixtures" / "mini_app"
CONNECTION = "fedlora-test"
NODES = ["alice", "bob"]
STARTUP_TIMEOUT = 30.0
RUN_TIMEOUT = 60.0
REFUSAL_TIMEOUT = 30.0


@dataclass
class Deployment:
    root: Path
    plan: dict[str, dict[str, Path]]
    address: str
    cli_home: Path
    superlink: processes.LocalProcess
    supernodes: dict[str, processes.LocalProcess]

    def logs(self) -> str:
        procs = {"superlink": self.superlink, **self.supernodes}
        return "\n".join(f"--- {n} ---\n{p.log_tail(2000)}" for n, p in procs.items())

    def supernode(self, name: str, key: str | None, ca: bool) -> processes.LocalProcess:
        """A SuperNode process (not started) with ``key`` and optionally the CA."""
        command = deploy.supernode_command(
            superlink=self.address,
            root_certificates=self.plan["flwr-cli"]["root-certificates"],
            auth_private_key=key,
            runtime_port=processes.free_port(),
            max_retries=2,
            max_wait_time=REFUSAL_TIMEOUT / 2,
        )
        if not ca:  # fall back to the system CAs, as a node without ca.crt would
            at = command.index("--root-certificates")
            del command[at : at + 2]
        home = self.root / "home" / name
        return processes.LocalProcess(
            command, self.root / f"{name}.log", env=flwr_cli.flower_env(home)
        )


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    root = tmp_path_factory.mktemp("deploy")
    plan = certs.generate_all(root / "certs", ["localhost", "127.0.0.1"], [*NODES, "mallory"])
    port = processes.free_port()
    address = f"{deploy.LOOPBACK}:{port}"
    cli_home = root / "home" / "cli"
    deploy.write_flwr_connection_config(
        cli_home, CONNECTION, address, plan["flwr-cli"]["root-certificates"]
    )
    link = plan["superlink"]
    superlink = processes.LocalProcess(
        deploy.superlink_command(
            ssl_certfile=link["ssl-certfile"],
            ssl_keyfile=link["ssl-keyfile"],
            ssl_ca_certfile=link["ssl-ca-certfile"],
            port=port,
            database=root / "superlink.db",
        ),
        root / "superlink.log",
        env=flwr_cli.flower_env(root / "home" / "superlink"),
        ready_port=port,
        ready_timeout=STARTUP_TIMEOUT,
    )
    with ExitStack() as stack:
        stack.enter_context(superlink)
        for name in NODES:
            flwr_cli.register_node(cli_home, CONNECTION, plan["operator"][f"public-key:{name}"])
        supernodes = {}
        for index, name in enumerate(NODES):
            runtime_port = processes.free_port()
            command = deploy.supernode_command(
                superlink=address,
                root_certificates=plan[f"supernode:{name}"]["root-certificates"],
                auth_private_key=plan[f"supernode:{name}"]["auth-supernode-private-key"],
                node_config={"partition-id": index, "num-partitions": len(NODES)},
                runtime_port=runtime_port,
            )
            supernodes[name] = stack.enter_context(
                processes.LocalProcess(
                    command,
                    root / f"{name}.log",
                    env=flwr_cli.flower_env(root / "home" / name),
                    ready_port=runtime_port,
                    ready_timeout=STARTUP_TIMEOUT,
                )
            )
        # Runs first on exit: stop everything concurrently, not one by one.
        stack.callback(processes.stop_all, [*supernodes.values(), superlink])
        yield Deployment(root, plan, address, cli_home, superlink, supernodes)


@pytest.mark.deployment
@pytest.mark.slow
def test_run_completes_over_tls_with_node_auth(deployment):
    run_id = flwr_cli.submit_run(
        deployment.cli_home, APP_DIR, CONNECTION, wait=True, timeout=RUN_TIMEOUT
    )
    status = flwr_cli.run_status(deployment.cli_home, CONNECTION, run_id)
    logs = flwr_cli.run_logs(deployment.cli_home, CONNECTION, run_id)
    assert status == deploy.RUN_COMPLETED, logs + deployment.logs()
    # zeros + 1 from each node, averaged with equal weights
    assert "MINIAPP-RESULT [1.0, 1.0, 1.0, 1.0]" in logs, logs


@pytest.mark.deployment
@pytest.mark.slow
def test_failed_run_is_reported_as_failed(deployment):
    # The ServerApp raises when the result differs from 2 per round, so the run
    # fails; `flwr run` itself would still exit 0.
    run_id = flwr_cli.submit_run(
        deployment.cli_home,
        APP_DIR,
        CONNECTION,
        run_config={"expected-increment": 2.0},
    )
    status = flwr_cli.wait_for_run(deployment.cli_home, CONNECTION, run_id, timeout=RUN_TIMEOUT)
    assert status == deploy.RUN_FAILED, deployment.logs()


@pytest.mark.deployment
@pytest.mark.slow
def test_node_with_unregistered_key_is_refused(deployment):
    mallory_key = deployment.plan["supernode:mallory"]["auth-supernode-private-key"]
    with deployment.supernode("mallory", mallory_key, ca=True) as node:
        code = node.wait(timeout=REFUSAL_TIMEOUT)
        log = node.log_tail()
    assert code != 0, log
    assert "Failed to activate SuperNode" in log, log
    assert "No SuperNode found with the given public key" in (deployment.superlink.log_tail(20_000))


@pytest.mark.deployment
@pytest.mark.slow
def test_node_without_ca_cert_cannot_connect(deployment):
    # A registered key does not help a node that cannot verify the SuperLink.
    alice_key = deployment.plan["supernode:alice"]["auth-supernode-private-key"]
    with deployment.supernode("no-ca", alice_key, ca=False) as node:
        code = node.wait(timeout=REFUSAL_TIMEOUT)
        log = node.log_tail()
    assert code != 0, log
    assert "CERTIFICATE_VERIFY_FAILED" in log, log


# ------------------------------------------------------- fast helper checks


def test_missing_certificate_names_the_file_and_the_command(tmp_path):
    missing = tmp_path / "server.pem"
    with pytest.raises(ConfigError, match=r"server\.pem.*fedlora certs"):
        deploy.superlink_command(
            ssl_certfile=missing,
            ssl_keyfile=missing,
            ssl_ca_certfile=missing,
        )


def test_config_args_round_trip_through_flowers_parser():
    values: dict[str, deploy.ConfigValue] = {
        "partition-id": 3,
        "lr": 0.5,
        "dp": True,
        "data-file": "/data/my notes.csv",
        "windows": "C:\\data\\x.csv",
        "quote": "it's",
    }
    text = deploy.format_config_args(values)
    assert parse_config_args([text]) == values


def test_connection_config_is_what_flwr_reads(tmp_path, monkeypatch):
    ca = certs.create_ca(tmp_path / "certs").cert_path
    home = tmp_path / "home"
    deploy.write_flwr_connection_config(home, "first", "10.0.0.1:9093", ca)
    deploy.write_flwr_connection_config(home, "second", "127.0.0.1:8000", ca)
    monkeypatch.setenv("FLWR_HOME", str(home))
    first = read_superlink_connection("first")
    default = read_superlink_connection(None)
    assert (first.address, first.root_certificates) == ("10.0.0.1:9093", str(ca))
    assert not first.insecure
    assert (default.name, default.address) == ("second", "127.0.0.1:8000")


def test_app_with_legacy_federations_section_is_refused(tmp_path):
    app = tmp_path / "app"
    shutil.copytree(APP_DIR, app)
    pyproject = app / "pyproject.toml"
    pyproject.write_text(pyproject.read_text() + '\n[tool.flwr.federations]\ndefault = "x"\n')
    before = pyproject.read_text()
    with pytest.raises(ConfigError, match=r"tool\.flwr\.federations"):
        deploy.flwr_run_command(app, CONNECTION)
    assert pyproject.read_text() == before


def test_local_process_reports_a_crash_with_its_log(tmp_path):
    command = [sys.executable, "-c", "print('boom', flush=True); raise SystemExit(3)"]
    process = processes.LocalProcess(
        command, tmp_path / "crash.log", ready_port=processes.free_port()
    )
    with pytest.raises(deploy.DeploymentError, match=r"(?s)code 3.*boom"):
        process.start()


def test_local_process_stops_helpers_in_their_own_session(tmp_path):
    # Like the SuperLink: a helper in a new session, then listen on a port.
    port = processes.free_port()
    pid_file = tmp_path / "helper.pid"
    script = f"""
import socket, subprocess, sys, time
helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"],
                          start_new_session=True)
open({str(pid_file)!r}, "w").write(str(helper.pid))
server = socket.create_server(("127.0.0.1", {port}))
time.sleep(120)
"""
    with processes.LocalProcess(
        [sys.executable, "-c", script],
        tmp_path / "parent.log",
        ready_port=port,
        ready_timeout=20,
        stop_timeout=5,
    ) as parent:
        helper = psutil.Process(int(pid_file.read_text()))
        assert helper.is_running()
    assert parent.returncode is not None
    deadline = time.monotonic() + 5
    while _alive(helper) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(helper)


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
