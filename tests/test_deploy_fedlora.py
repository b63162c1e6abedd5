"""The real fedlora app in a real deployment on loopback: TLS, node auth, 3 sites.

``fedlora server`` starts the SuperLink, ``fedlora register`` registers the
sites' keys, ``fedlora node`` starts one SuperNode per site (each with its own
CSV in its node config) and ``fedlora run`` submits the repository root as the
Flower App with the tiny BERT from conftest. Then the failure cases a real
federation meets: a node whose key was never registered, a node whose data
file has the wrong column (its error replies are logged; the run goes on),
and a node killed mid-run (SIGKILL: the round waits until the SuperLink
declares it unavailable, at most ``round-timeout``; the run completes with
the others).

Time: about 4 minutes on 2 idle CPU cores (each round starts a ClientApp
process per node); every process is stopped on exit.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
from conftest import make_text_csv
from typer.testing import CliRunner

from fedlora.app_trust import app_dir_digest, generate_signing_key
from fedlora.cli.ops import app as ops_app
from fedlora.deploy import flower as deploy
from fedlora.deploy import flwr_cli, processes

pytestmark = [pytest.mark.deployment, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
CONNECTION = "fedlora-e2e"
LABELS = "money,sport,tech"
SITES = ["alpha", "bravo", "charlie"]
STARTUP_TIMEOUT = 60.0
RUN_TIMEOUT = 300.0
# The backstop for a node that never replies. A SIGKILLed node is declared
# unavailable by the SuperLink once its heartbeats stop (<= 2 x 30 s), which
# ends the round sooner; 120 s keeps slow-but-alive nodes on a loaded 2-core
# machine from being cut off.
ROUND_TIMEOUT = 120
COMPLETED = f"SuperLink: {deploy.RUN_COMPLETED}; fedlora: completed"


@dataclass
class Federation:
    root: Path
    address: str
    ca: Path
    certs: Path
    cli_home: Path
    superlink: processes.LocalProcess
    digest: str = ""
    signer: str = ""
    nodes: dict[str, processes.LocalProcess] = field(default_factory=dict)

    def logs(self) -> str:
        procs = {"superlink": self.superlink, **self.nodes}
        return "\n".join(f"--- {n} ---\n{p.log_tail(3000)}" for n, p in procs.items())

    def node(self, name: str, data: Path, *extra: str) -> processes.LocalProcess:
        """``fedlora node`` for site ``name`` (not started), behind its app pin:
        alpha and bravo pin the app's digest, charlie trusts only its signer."""
        port = processes.free_port()
        if "--trust-any-app" not in extra:
            trust = self.root / f"{name}.trusted-apps"
            # stranger's IT pinned some other app: it must refuse this one.
            pins = {"charlie": self.signer, "stranger": "sha256:" + "0" * 64}
            trust.write_text(pins.get(name, f"sha256:{self.digest}") + "\n")
            extra = (*extra, "--trusted-apps", str(trust))
        command = _ops(
            "node",
            "--superlink",
            self.address,
            "--ca",
            str(self.ca),
            "--key",
            str(self.certs / "nodes" / f"{name}.key"),
            "--data-path",
            str(data),
            "--site-name",
            name,
            "--runtime-port",
            str(port),
            "--state-dir",
            str(self.root / "state" / name),
            *extra,
        )
        return processes.LocalProcess(
            command,
            self.root / f"{name}.log",
            env=flwr_cli.flower_env(self.root / "home" / name),
            ready_port=port,
            ready_timeout=STARTUP_TIMEOUT,
        )

    def run(self, run_dir: Path, **overrides: object) -> tuple[subprocess.CompletedProcess, int]:
        """``fedlora run`` of the repository's app; returns the process and the run id."""
        config = {**_run_config(self, run_dir), **overrides}
        args = [a for k, v in config.items() for a in ("-c", f"{k}={_toml(v)}")]
        done = subprocess.run(
            _ops(
                "run",
                "--ca",
                str(self.ca),
                "--superlink",
                self.address,
                "--flwr-home",
                str(self.cli_home),
                "--connection",
                CONNECTION,
                "--app",
                str(REPO),
                "--timeout",
                str(RUN_TIMEOUT),
                "--sign-key",
                str(self.root / "release.signing.key"),
                *args,
            ),
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT + 60,
            check=False,
            env=flwr_cli.flower_env(self.cli_home),
        )
        found = re.search(r"submitted run (\d+)", done.stderr)
        assert found, done.stdout + done.stderr + self.logs()
        return done, int(found.group(1))


def _ops(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedlora", *args]


def _toml(value: object) -> str:
    return json.dumps(value) if isinstance(value, str) else str(value).lower()


def _run_config(fed: Federation, run_dir: Path) -> dict[str, object]:
    return {
        "model-path": str(fed.root / "tiny-bert"),
        "dataset": "file",
        "data-file": str(fed.root / "data" / "server.csv"),
        "labels": LABELS,
        "num-server-rounds": 2,
        "lora-rank": 2,
        "lora-alpha": 4,
        "lora-dropout": 0.0,
        "batch-size": 16,
        "max-seq-length": 16,
        "max-train-examples": 32,
        "min-train-nodes": 2,
        "round-timeout": ROUND_TIMEOUT,
        "run-dir": str(run_dir),
        "seed": 7,
    }


@pytest.fixture(scope="module")
def federation(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path
) -> Iterator[Federation]:
    root = tmp_path_factory.mktemp("fedlora-deploy")
    (root / "tiny-bert").symlink_to(tiny_model_dir, target_is_directory=True)
    data = root / "data"
    data.mkdir()
    make_text_csv(data / "server.csv", n=60, seed=100)
    for i, site in enumerate(SITES):
        make_text_csv(data / f"{site}.csv", n=48, seed=i)
    certs_dir = root / "certs"
    runner = CliRunner()
    made = runner.invoke(
        ops_app,
        ["certs", "--out", str(certs_dir), "--host", "localhost", "--host", "127.0.0.1"]
        + [a for n in [*SITES, "broken", "mallory", "stranger"] for a in ("--node", n)],
    )
    assert made.exit_code == 0, made.output
    port = processes.free_port()
    address = f"{deploy.LOOPBACK}:{port}"
    superlink = processes.LocalProcess(
        _ops("server", "--certs", str(certs_dir), "--port", str(port), "--state-dir", str(root)),
        root / "superlink.log",
        env=flwr_cli.flower_env(root / "home" / "superlink"),
        ready_port=port,
        ready_timeout=STARTUP_TIMEOUT,
    )
    fed = Federation(
        root, address, certs_dir / "ca.crt", certs_dir, root / "home" / "cli", superlink
    )
    fed.digest = app_dir_digest(REPO)
    fed.signer = generate_signing_key(root, "release")
    with ExitStack() as stack:
        stack.enter_context(superlink)
        # mallory's key is never registered.
        keys = [str(certs_dir / "nodes" / f"{n}.pub") for n in [*SITES, "broken", "stranger"]]
        common = ["--superlink", address, "--ca", str(fed.ca), "--flwr-home", str(fed.cli_home)]
        registered = runner.invoke(
            ops_app, ["register", *keys, *common, "--connection", CONNECTION]
        )
        assert registered.exit_code == 0, registered.output + fed.logs()
        assert registered.output.count("registered as node") == 5, registered.output
        for site in SITES:
            fed.nodes[site] = fed.node(site, data / f"{site}.csv", "--labels", LABELS)
        # Runs first on exit: stop everything concurrently.
        stack.callback(processes.stop_all, [*fed.nodes.values(), superlink])
        # Start the nodes concurrently: each reads its file first (seconds).
        with ThreadPoolExecutor() as pool:
            list(pool.map(processes.LocalProcess.start, fed.nodes.values()))
        yield fed


def test_run_completes_with_three_sites(federation: Federation) -> None:
    run_dir = federation.root / "runs" / "complete"
    done, run_id = federation.run(run_dir)
    assert done.returncode == 0, done.stdout + done.stderr + federation.logs()
    # `fedlora run` read `flwr ls` (finished:completed) and status.json.
    assert f"run {run_id}: {COMPLETED}" in done.stdout, done.stdout + done.stderr
    # a clean terminal: fedlora's progress lines; the server's whole log in a file
    shown = [line for line in done.stdout.splitlines() if line.strip()]
    assert all(line.startswith(("round ", "exporting round", "run ")) for line in shown), shown
    assert "round 2/2 · 3/3 ok · acc " in done.stdout, shown  # the same line simulate prints
    assert "DEPRECATED" not in done.stdout + done.stderr
    log_file = federation.cli_home / "logs" / f"run-{run_id}.log"
    assert f"server log: {log_file}" in done.stderr
    assert "round 2/2 · " in log_file.read_text()
    assert json.loads((run_dir / "status.json").read_text())["status"] == "completed"
    assert (run_dir / "adapter" / "adapter_config.json").is_file()
    rounds = json.loads((run_dir / "metrics.json").read_text())["rounds"]
    assert [r["clients_ok"] for r in rounds[1:]] == [3, 3], rounds


def test_unregistered_node_is_refused(federation: Federation) -> None:
    data = federation.root / "data" / "alpha.csv"
    mallory = federation.node("mallory", data, "--max-retries", "1", "--max-wait-time", "20")
    mallory.ready_port = None  # it must not get as far as listening
    with mallory:
        code = mallory.wait(timeout=60)
        log = mallory.log_tail()
    assert code != 0, log
    assert "Failed to activate SuperNode" in log, log


def test_broken_site_and_killed_node_do_not_stop_the_run(federation: Federation) -> None:
    bad = federation.root / "data" / "broken.csv"
    bad.write_text("note,diagnosis\nsome text,money\nmore text,tech\n")
    # `fedlora node` would refuse this file; start the SuperNode directly, as
    # if the file had been replaced after the node started.
    port = processes.free_port()
    broken = processes.LocalProcess(
        deploy.supernode_command(
            superlink=federation.address,
            root_certificates=federation.ca,
            auth_private_key=federation.certs / "nodes" / "broken.key",
            node_config={"data-path": str(bad), "site-name": "broken"},
            runtime_port=port,
        ),
        federation.root / "broken.log",
        env=flwr_cli.flower_env(federation.root / "home" / "broken"),
        ready_port=port,
        ready_timeout=STARTUP_TIMEOUT,
    )
    run_dir = federation.root / "runs" / "faults"
    victim = federation.nodes["charlie"]
    # A site whose IT pinned another app: it must refuse this one, and say why.
    stranger = federation.node("stranger", federation.root / "data" / "alpha.csv")
    with broken, stranger:
        _wait_for_log(broken, "SuperNode ID:")  # activated: the run will see it
        killer = _kill_when_training(victim)
        done, run_id = federation.run(run_dir)
        killer.join(timeout=5)
    output = done.stdout + done.stderr
    # completed, and says that sites failed on the way: exit 4, not a plain 0
    assert done.returncode == 4, output + federation.logs()
    assert f"run {run_id}: {COMPLETED}, but " in done.stderr, output
    assert " site replies failed" in done.stderr, output
    assert victim.returncode is not None, "charlie was not killed"
    rounds = json.loads((run_dir / "metrics.json").read_text())["rounds"][1:]
    failures = [f for r in rounds for f in r["failures"]]
    assert any(f.startswith("broken") and "has no column 'text'" in f for f in failures), failures
    assert any(f.startswith("charlie") for f in failures), failures
    # The run is signed by 'release', whom stranger does not trust, and its
    # digest is not pinned there: refused at the node, with the reason sent.
    why = f"sha256:{federation.digest} is signed by 'release', whom this site does not trust"
    stranger_log = stranger.log_tail(100_000)
    assert why in stranger_log, stranger_log
    assert any(why in f for f in failures), "\n".join(failures)
    assert all(r["clients_ok"] >= 2 for r in rounds), rounds
    assert (run_dir / "adapter" / "adapter_config.json").is_file()


def _wait_for_log(
    proc: processes.LocalProcess, text: str, timeout: float = STARTUP_TIMEOUT
) -> None:
    deadline = time.monotonic() + timeout
    while text not in proc.log_tail(100_000):
        assert time.monotonic() < deadline, f"{text!r} not in log:\n{proc.log_tail()}"
        time.sleep(0.2)


def _kill_when_training(victim: processes.LocalProcess) -> threading.Thread:
    """SIGKILL the victim's process tree once it has taken a training message.

    A crash, not a shutdown: SIGTERM would let the SuperNode deactivate
    itself, while after SIGKILL the SuperLink only notices when heartbeats
    stop (or the round times out), which is the case to test.
    """
    seen = victim.log_tail(1_000_000).count("Receiving: train message")

    def watch() -> None:
        deadline = time.monotonic() + RUN_TIMEOUT
        while time.monotonic() < deadline:
            if victim.log_tail(1_000_000).count("Receiving: train message") > seen:
                break
            time.sleep(0.2)
        popen = victim.popen
        if popen is None or popen.poll() is not None:
            return
        tree = [psutil.Process(popen.pid), *psutil.Process(popen.pid).children(recursive=True)]
        for proc in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        popen.wait(timeout=10)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread
