"""``fedlora simulate --ray-address``: the same simulation on an existing Ray
cluster. On loopback: a head node and a second node started with ``ray start``
(one CPU each), a tiny run of four virtual clients needing one CPU each, and
``placement.jsonl`` showing that both nodes trained clients; then both stop."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.integration]
RAY = Path(sys.executable).parent / "ray"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ray(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(RAY), *args], capture_output=True, text=True, timeout=180, check=False
    )
    if check and result.returncode != 0:
        raise AssertionError(f"ray {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture
def two_node_cluster(tmp_path: Path) -> Iterator[str]:
    if not RAY.is_file():
        pytest.skip(f"no ray command beside {sys.executable}")
    port = _free_port()
    address = f"127.0.0.1:{port}"
    common = ("--num-cpus", "1", "--num-gpus", "0", "--disable-usage-stats")
    # Ray's sockets live under --temp-dir, and a socket path must fit 107 bytes
    temp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    _ray(
        "start",
        "--head",
        "--port",
        str(port),
        "--include-dashboard",
        "false",
        "--temp-dir",
        str(temp),
        *common,
    )
    try:
        _ray("start", "--address", address, *common)
        yield address
    finally:
        stopped = _ray("stop", "--force", check=False)
        assert stopped.returncode == 0, stopped.stderr
        # both nodes are gone: no process of this cluster (its temp dir) is left
        left = [
            p.info["pid"]
            for p in psutil.process_iter(["pid", "cmdline"])
            if str(temp) in " ".join(p.info["cmdline"] or [])
        ]
        assert not left, f"Ray processes left after ray stop: {left}"
        shutil.rmtree(temp, ignore_errors=True)


def test_a_simulation_on_an_existing_two_node_cluster(
    two_node_cluster: str, tiny_model_dir: Path, text_csv: Path, tmp_path: Path
) -> None:
    from fedlora.simulations.engine import Resources, simulate
    from fedlora.simulations.placement import placement_summary
    from fedlora.simulations.tiny import tiny_run_config

    run_dir = tmp_path / "run"
    flat = tiny_run_config(tiny_model_dir, text_csv, run_dir, **{"num-server-rounds": 2})
    status = simulate(flat, 4, Resources(num_cpus=1, ray_address=two_node_cluster))
    assert status["status"] == "completed", status
    rounds = json.loads((run_dir / "metrics.json").read_text())["rounds"]
    assert [r["clients_ok"] for r in rounds[1:]] == [4, 4]
    summary = placement_summary(run_dir)
    # one CPU per node and per client: two actors, one on each node, sharing the
    # 2 rounds x 4 clients x (train + evaluate) messages
    assert summary["nodes"] == 2, summary
    assert all(n >= 2 for n in summary["messages_per_node"].values()), summary
    assert sum(summary["messages_per_node"].values()) >= 8
    (tmp_path / "placement-summary.json").write_text(json.dumps(summary, indent=2))
    print("placement:", json.dumps(summary))


def test_a_wrong_cluster_address_is_named() -> None:
    from fedlora.errors import ConfigError
    from fedlora.simulations.engine import Resources

    with pytest.raises(ConfigError, match=r"ray-address is 'cluster'; give the head node's"):
        Resources(ray_address="cluster")
