"""A clean terminal: ``fedlora simulate`` prints its progress and summary and
nothing else; the third-party chatter is kept in ``<run-dir>/fedlora.log``
(``-v`` shows it). Also pins the Flower the project runs against: the
simulation path (``run_simulation``, deprecated in Flower 1.42) works on the
newest Flower that pyproject.toml allows."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.integration]
ROOT = Path(__file__).resolve().parents[1]
NOISE = ("DEPRECATED", "ClientAppActor", "Loading weights", "FutureWarning", "WARNING")


def _simulate(model: Path, data: Path, run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    config = {
        "model-path": f'"{model}"',
        "dataset": '"file"',
        "data-file": f'"{data}"',
        "num-server-rounds": "2",
        "run-dir": f'"{run_dir}"',
        "lora-rank": "4",
        "max-seq-length": "32",
        "batch-size": "8",
        "min-train-nodes": "2",
    }
    args = [a for k, v in config.items() for a in ("-c", f"{k}={v}")]
    return subprocess.run(
        [sys.executable, "-m", "fedlora", "simulate", "-n", "3", *args, *extra],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def test_simulate_prints_progress_and_summary_only(
    tiny_model_dir: Path, text_csv: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    done = _simulate(tiny_model_dir, text_csv, run_dir)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == f"fedlora simulate · 3 clients · log: {run_dir / 'fedlora.log'}"
    assert [line.split(" · ")[0] for line in lines[1:4]] == ["round 0/2", "round 1/2", "round 2/2"]
    assert lines[4].startswith("round global acc")  # then the summary table
    assert lines[-1] == f"completed · results in {run_dir}"
    for noise in NOISE:
        assert noise not in done.stdout + done.stderr, noise
    assert not re.search(r"^[WE]\d{4} ", done.stdout + done.stderr, re.M)  # torch's C++ log
    log = (run_dir / "fedlora.log").read_text()
    assert "DEPRECATED FEATURE" in log and "ClientAppActor" in log  # kept, not lost

    loud = _simulate(tiny_model_dir, text_csv, tmp_path / "loud", "-v")
    assert loud.returncode == 0
    assert "DEPRECATED FEATURE" in loud.stdout + loud.stderr


def test_the_newest_flower_the_project_allows_is_the_one_tested() -> None:
    """If the pin moves, this fails until the simulation path is checked (and the
    README's upgrade note revisited) on the new Flower."""
    import flwr

    pin = re.search(
        r'"flwr\[[^\]]*\]>=[\d.]+,<(\d+)\.(\d+)"', (ROOT / "pyproject.toml").read_text()
    )
    assert pin, "the flwr requirement in pyproject.toml has no upper bound"
    major, minor = int(pin.group(1)), int(pin.group(2))
    installed = tuple(int(v) for v in flwr.__version__.split(".")[:2])
    assert installed == (major, minor - 1), (flwr.__version__, pin.group(0))


def test_one_round_line_for_the_server_log_and_the_simulate_display() -> None:
    from fedlora.server.history import ROUND_LINE, round_line

    first = {"round": 0, "global_accuracy": 0.25, "global_loss": 1.3862, "bytes_uploaded": 0}
    assert round_line(first, 3) == "round 0/3 · acc 0.250 · loss 1.386 (before training)"
    row = {
        "round": 2,
        "clients_ok": 2,
        "clients_sampled": 3,
        "global_accuracy": 0.6666,
        "global_loss": None,  # a run without a held-out loss shows none
        "bytes_uploaded": 1_234_567,
        "seconds": 14.26,
        "extra": {"epsilon-max": 1.005},
    }
    line = round_line(row, 3)
    assert line == "round 2/3 · 2/3 ok · acc 0.667 · ε 1.00 · 1.23 MB up · 14.3 s"
    assert ROUND_LINE.search(f"INFO :      {line}") and not ROUND_LINE.search("[ROUND 2]")
