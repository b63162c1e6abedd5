"""Checkpoint and resume: a server killed mid-run and resumed ends where an
uninterrupted run ends (same seeds), strategy state included."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedlora.errors import ConfigError
from fedlora.simulations.engine import Resources, simulate
from fedlora.simulations.tiny import tiny_run_config

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def _overrides(model_dir: Path, data: Path, run_dir: Path) -> dict[str, Any]:
    # Server momentum makes the strategy stateful: resume must restore it.
    return tiny_run_config(
        model_dir,
        data,
        run_dir,
        **{
            "num-server-rounds": 4,
            "seed": 5,
            "strategy": "fedavgm",
            "strategy-options": "server-momentum=0.9",
        },
    )


def _final(run_dir: Path) -> dict[str, np.ndarray]:
    data = np.load(io.BytesIO((run_dir / "checkpoint" / "adapter.npz").read_bytes()))
    return {k: data[k] for k in data.files}


def test_killed_server_resumes_to_the_uninterrupted_result(
    tiny_model_dir: Path, text_csv: Path, tmp_path: Path
) -> None:
    straight = tmp_path / "straight"
    assert (
        simulate(_overrides(tiny_model_dir, text_csv, straight), 3, Resources(num_cpus=1))["status"]
        == "completed"
    )

    crashed = tmp_path / "crashed"
    args = [
        f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}"
        for k, v in _overrides(tiny_model_dir, text_csv, crashed).items()
    ]
    cmd = [sys.executable, "-m", "fedlora", "simulate", "-n", "3"]
    for a in args:
        cmd += ["-c", a.replace("'", '"')]
    proc = subprocess.Popen(
        cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    marker = crashed / "checkpoint" / "state.json"
    deadline = time.monotonic() + 240
    try:
        while not (marker.is_file() and json.loads(marker.read_text())["round"] >= 1):
            assert proc.poll() is None, "simulation ended before it could be killed"
            assert time.monotonic() < deadline, "no checkpoint within 240 s"
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the server dies without cleaning up
        proc.wait(timeout=30)
    killed_at = json.loads(marker.read_text())["round"]
    assert killed_at < 4
    assert json.loads((crashed / "status.json").read_text())["status"] == "running"

    status = simulate(
        {**_overrides(tiny_model_dir, text_csv, crashed), "resume": True}, 3, Resources(num_cpus=1)
    )
    assert status["status"] == "completed", status
    a, b = _final(straight), _final(crashed)
    assert set(a) == set(b)
    for key in a:  # tolerance: float32 round-off only; in practice bit-identical
        np.testing.assert_allclose(b[key], a[key], rtol=0, atol=1e-6, err_msg=key)
    rounds = json.loads((crashed / "metrics.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2, 3, 4]


def test_resume_refuses_a_changed_config(
    tiny_model_dir: Path, text_csv: Path, tmp_path: Path
) -> None:
    cfg = {**_overrides(tiny_model_dir, text_csv, tmp_path), "num-server-rounds": 1}
    assert simulate(cfg, 2, Resources(num_cpus=1))["status"] == "completed"
    changed = {**cfg, "learning-rate": 0.02, "resume": True}
    status = simulate(changed, 2, Resources(num_cpus=1))
    assert status["status"] == "failed"
    assert "different run config" in status["reason"]
    assert ConfigError


def test_dp_strategy_with_accountant_round_trips_through_a_checkpoint() -> None:
    import pickle

    from flwr.serverapp import GaussianPrivacyEvent
    from flwr.serverapp.strategy import FedAvg

    from fedlora.privacy.central import central_epsilon, wrap_central
    from fedlora.server.checkpoint import dump_strategy

    strategy = wrap_central(FedAvg(), "central-server-fixed", 1.0, 0.5, 3, 10, 1e-5)
    for _ in range(2):
        strategy.accountant.compose(GaussianPrivacyEvent(1.0, 3, 10))  # type: ignore[attr-defined]
    before = central_epsilon(strategy)
    restored = pickle.loads(dump_strategy(strategy))
    assert before is not None and before > 0
    assert central_epsilon(restored) == pytest.approx(before)
