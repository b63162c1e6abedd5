"""A real Flower deployment on loopback: TLS, SuperNode authentication, 2 nodes.

Starts ``flower-superlink`` (TLS + ``--enable-supernode-auth``), registers two
node keys with ``flwr supernode register``, starts two ``flower-supernode``
processes and runs ``tests/fixtures/mini_app`` (each node adds 1 to an array).
Then checks the two refusals that make the deployment private: a node whose
key was not registered, and a node that does not trust the deployment's CA.
Every process is stopped in ``finally``/context exits, whatever happens.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest

from fedlora import certs, deploy

pytestmark = [pytest.mark.deployment, pytest.mark.slow]

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
    superlink: deploy.LocalProcess
    supernodes: dict[str, deploy.LocalProcess]

    def logs(self) -> str:
        procs = {"superlink": self.superlink, **self.supernodes}
        return "\n".join(f"--- {n} ---\n{p.log_tail(2000)}" for n, p in procs.items())

    def supernode(self, name: str, key: str | None, ca: bool) -> deploy.LocalProcess:
        """A SuperNode process (not started) with ``key`` and optionally the CA."""
        command = deploy.supernode_command(
            superlink=self.address,
            root_certificates=self.plan["flwr-cli"]["root-certificates"],
            auth_private_key=key,
            runtime_port=deploy.free_port(),
            max_retries=2,
            max_wait_time=REFUSAL_TIMEOUT / 2,
        )
        if not ca:  # fall back to the system CAs, as a node without ca.crt would
            at = command.index("--root-certificates")
            del command[at : at + 2]
        home = self.root / "home" / name
        return deploy.LocalProcess(
            command, self.root / f"{name}.log", env=deploy.flower_env(home)
        )


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    root = tmp_path_factory.mktemp("deploy")
    plan = certs.generate_all(
        root / "certs", ["localhost", "127.0.0.1"], [*NODES, "mallory"]
    )
    port = deploy.free_port()
    address = f"{deploy.LOOPBACK}:{port}"
    cli_home = root / "home" / "cli"
    deploy.write_flwr_connection_config(
        cli_home, CONNECTION, address, plan["flwr-cli"]["root-certificates"]
    )
    link = plan["superlink"]
    superlink = deploy.LocalProcess(
        deploy.superlink_command(
            ssl_certfile=link["ssl-certfile"],
            ssl_keyfile=link["ssl-keyfile"],
            ssl_ca_certfile=link["ssl-ca-certfile"],
            port=port,
            database=root / "superlink.db",
        ),
        root / "superlink.log",
        env=deploy.flower_env(root / "home" / "superlink"),
        ready_port=port,
        ready_timeout=STARTUP_TIMEOUT,
    )
    with ExitStack() as stack:
        stack.enter_context(superlink)
        for name in NODES:
            deploy.register_node(
                cli_home, CONNECTION, plan["operator"][f"public-key:{name}"]
            )
        supernodes = {}
        for index, name in enumerate(NODES):
            runtime_port = deploy.free_port()
            command = deploy.supernode_command(
                superlink=address,
                root_certificates=plan[f"supernode:{name}"]["root-certificates"],
                auth_private_key=plan[f"supernode:{name}"][
                    "auth-supernode-private-key"
                ],
                node_config={"partition-id": index, "num-partitions": len(NODES)},
                runtime_port=runtime_port,
            )
            supernodes[name] = stack.enter_context(
                deploy.LocalProcess(
                    command,
                    root / f"{name}.log",
                    env=deploy.flower_env(root / "home" / name),
                    ready_port=runtime_port,
                    ready_timeout=STARTUP_TIMEOUT,
                )
            )
        yield Deployment(root, plan, address, cli_home, superlink, supernodes)


def test_run_completes_over_tls_with_node_auth(deployment):
    run_id = deploy.submit_run(
        deployment.cli_home, APP_DIR, CONNECTION, wait=True, timeout=RUN_TIMEOUT
    )
    status = deploy.run_status(deployment.cli_home, CONNECTION, run_id)
    logs = deploy.run_logs(deployment.cli_home, CONNECTION, run_id)
    assert status == deploy.RUN_COMPLETED, logs + deployment.logs()
    # zeros + 1 from each node, averaged with equal weights
    assert "MINIAPP-RESULT [1.0, 1.0, 1.0, 1.0]" in logs, logs


def test_failed_run_is_reported_as_failed(deployment):
    # The ServerApp raises when the result differs from 2 per round, so the run
    # fails; `flwr run` itself would still exit 0.
    run_id = deploy.submit_run(
        deployment.cli_home,
        APP_DIR,
        CONNECTION,
        run_config={"expected-increment": 2.0},
    )
    status = deploy.wait_for_run(
        deployment.cli_home, CONNECTION, run_id, timeout=RUN_TIMEOUT
    )
    assert status == deploy.RUN_FAILED, deployment.logs()


def test_node_with_unregistered_key_is_refused(deployment):
    mallory_key = deployment.plan["supernode:mallory"]["auth-supernode-private-key"]
    with deployment.supernode("mallory", mallory_key, ca=True) as node:
        code = node.wait(timeout=REFUSAL_TIMEOUT)
        log = node.log_tail()
    assert code != 0, log
    assert "Failed to activate SuperNode" in log, log
    assert "No SuperNode found with the given public key" in (
        deployment.superlink.log_tail(20_000)
    )


def test_node_without_ca_cert_cannot_connect(deployment):
    # A registered key does not help a node that cannot verify the SuperLink.
    alice_key = deployment.plan["supernode:alice"]["auth-supernode-private-key"]
    with deployment.supernode("no-ca", alice_key, ca=False) as node:
        code = node.wait(timeout=REFUSAL_TIMEOUT)
        log = node.log_tail()
    assert code != 0, log
    assert "CERTIFICATE_VERIFY_FAILED" in log, log
