"""DP wired through the real ClientApp/ServerApp: local DP-SGD with each node's
ledger and cap, refusals before data is read, and central DP wrappers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from fedlora import protocol
from fedlora.client import app as client_app
from fedlora.models.adapter import adapter_state
from fedlora.models.loading import build_model
from fedlora.privacy.accounting import epsilon
from fedlora.privacy.ledger import PrivacyLedger
from fedlora.settings import LoraSettings
from fedlora.simulations.engine import Resources, simulate
from fedlora.simulations.tiny import tiny_run_config

SIM = [pytest.mark.slow, pytest.mark.integration]


def _overrides(model_dir: Path, data: Path, run_dir: Path, **extra: Any) -> dict[str, Any]:
    return tiny_run_config(model_dir, data, run_dir, **extra)


# 120 rows, 20% server test -> 96 in the pool, IID over 3 clients -> 32 each.
# Batch 8 -> Poisson rate q = 8/32 = 0.25 and 4 steps per round.
ONE_ROUND = epsilon([(1.0, 0.25, 4)], 1e-5)
TWO_ROUNDS = epsilon([(1.0, 0.25, 4)] * 2, 1e-5)


@pytest.mark.slow
@pytest.mark.integration
def test_local_dp_run_reports_epsilon_per_client_and_round(
    tiny_model_dir: Path, text_csv: Path, tmp_path: Path
) -> None:
    cfg = _overrides(
        tiny_model_dir,
        text_csv,
        tmp_path,
        **{"dp-mode": "local", "dp-noise-multiplier": 1.0, "dp-max-grad-norm": 1.0},
    )
    status = simulate(cfg, 3, Resources(num_cpus=1))
    assert status["status"] == "completed", status
    rounds = json.loads((tmp_path / "metrics.json").read_text())["rounds"]
    assert rounds[1]["extra"]["epsilon-max"] == pytest.approx(ONE_ROUND, rel=1e-6)
    assert rounds[2]["extra"]["epsilon-max"] == pytest.approx(TWO_ROUNDS, rel=1e-6)
    clients = json.loads((tmp_path / "clients.json").read_text())
    assert len(clients) == 6 and all("epsilon" in row for row in clients)
    assert len(list((tmp_path / "ledgers").glob("ledger-*.json"))) == 3
    meta = json.loads((tmp_path / "adapter" / "fedlora_metadata.json").read_text())
    dp = meta["differential_privacy"]
    assert dp["mechanism"].startswith("local DP-SGD")
    assert dp["epsilon_spent_max_over_clients"] == pytest.approx(TWO_ROUNDS, rel=1e-6)


@pytest.mark.slow
@pytest.mark.integration
def test_logit_adjustment_under_local_dp_accounts_the_label_counts(
    tiny_model_dir: Path, text_csv: Path, tmp_path: Path
) -> None:
    """With logit-adjustment on, each round also releases noisy label counts
    (Gaussian, sigma = dp-label-noise, sensitivity 1): every node's ledger
    holds both releases per round and the reported epsilon composes them."""
    cfg = _overrides(
        tiny_model_dir,
        text_csv,
        tmp_path,
        **{
            "dp-mode": "local",
            "dp-noise-multiplier": 1.0,
            "dp-max-grad-norm": 1.0,
            "logit-adjustment": 1.0,
            "dp-label-noise": 5.0,
        },
    )
    status = simulate(cfg, 3, Resources(num_cpus=1))
    assert status["status"] == "completed", status
    per_round = [(5.0, 1.0, 1), (1.0, 0.25, 4)]
    rounds = json.loads((tmp_path / "metrics.json").read_text())["rounds"]
    assert rounds[1]["extra"]["epsilon-max"] == pytest.approx(epsilon(per_round, 1e-5), rel=1e-6)
    assert rounds[2]["extra"]["epsilon-max"] == pytest.approx(
        epsilon(per_round * 2, 1e-5), rel=1e-6
    )
    assert epsilon(per_round * 2, 1e-5) > TWO_ROUNDS  # the counts are not free
    for path in (tmp_path / "ledgers").glob("ledger-*.json"):
        entries = json.loads(path.read_text())["rounds"]
        got = [(r["noise_multiplier"], r["sample_rate"], r["steps"]) for r in entries]
        assert got == per_round * 2, path
    meta = json.loads((tmp_path / "adapter" / "fedlora_metadata.json").read_text())
    assert meta["differential_privacy"]["label_count_noise"] == 5.0


@pytest.mark.slow
@pytest.mark.integration
def test_nodes_refuse_past_their_cap_and_run_stops_cleanly_even_after_restart(
    tiny_model_dir: Path, text_csv: Path, tmp_path: Path
) -> None:
    cap = (ONE_ROUND + TWO_ROUNDS) / 2  # room for one round, not two
    cfg = _overrides(
        tiny_model_dir,
        text_csv,
        tmp_path / "run",
        **{
            "dp-mode": "local",
            "dp-noise-multiplier": 1.0,
            "sim-epsilon-cap": cap,
            "sim-ledger-dir": str(tmp_path / "ledgers"),
        },
    )
    # One round fits the cap and completes.
    one = {**cfg, "num-server-rounds": 1}
    assert simulate(one, 3, Resources(num_cpus=1))["status"] == "completed"
    # A new two-round run on the same data: the ledgers on disk remember that
    # spend, and the run's two rounds would pass the cap, so every node refuses
    # at round 1, before spending, rather than part-way with its budget gone.
    status = simulate({**cfg, "run-dir": str(tmp_path / "run2")}, 3, Resources(num_cpus=1))
    assert status["status"] == "stopped", status
    assert f"privacy budget exhausted: spent ε={ONE_ROUND:.2f}" in status["reason"]
    assert "the run's 2 remaining rounds would cost" in status["reason"]
    rounds = json.loads((tmp_path / "run2" / "metrics.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [0]
    for path in (tmp_path / "ledgers").glob("ledger-*.json"):
        assert len(json.loads(path.read_text())["rounds"]) == 1, path  # nothing more spent


@pytest.mark.slow
@pytest.mark.integration
def test_central_server_side_fixed_clipping_reports_user_level_epsilon(
    tiny_model_dir: Path, text_csv: Path, tmp_path: Path
) -> None:
    cfg = _overrides(
        tiny_model_dir,
        text_csv,
        tmp_path,
        **{"dp-mode": "central-server-fixed", "dp-noise-multiplier": 0.8, "dp-max-grad-norm": 0.5},
    )
    status = simulate(cfg, 3, Resources(num_cpus=1))
    assert status["status"] == "completed", status
    rounds = json.loads((tmp_path / "metrics.json").read_text())["rounds"]
    eps1 = rounds[1]["extra"]["epsilon-user-level"]
    eps2 = rounds[2]["extra"]["epsilon-user-level"]
    assert 0 < eps1 < eps2
    meta = json.loads((tmp_path / "adapter" / "fedlora_metadata.json").read_text())
    assert meta["differential_privacy"]["epsilon_user_level"] == pytest.approx(eps2)


def test_refusal_happens_before_the_data_is_read(
    flower_task: Any,
    tiny_model_dir: Path,
    text_csv: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    flat = _overrides(
        tiny_model_dir,
        text_csv,
        tmp_path,
        **{
            "dp-mode": "local",
            "dp-noise-multiplier": 1.0,
            "sim-epsilon-cap": 1.0,
            "sim-ledger-dir": str(tmp_path / "ledgers"),
        },
    )
    context = Context(
        run_id=1,
        node_id=7,
        node_config={"partition-id": 0, "num-partitions": 3},
        state=RecordDict(),
        run_config={},
    )
    cfg = client_app.run_config_of(context, flat)
    from fedlora.client.private import dataset_identity

    ledger = PrivacyLedger.open(
        tmp_path / "ledgers", "fedlora", dataset_identity(cfg, context), 1e-5, "rdp"
    )
    ledger.record_round(1, 1.0, 0.25, 4)  # costs ONE_ROUND > 1.0 already
    assert ledger.spent_epsilon() > 1.0

    def no_reading(*_a: Any, **_k: Any) -> Any:
        raise AssertionError("data was read although the budget is exhausted")

    monkeypatch.setattr(client_app, "prepare", no_reading)
    from fedlora.client import prepare as client_prepare

    monkeypatch.setattr(client_prepare, "local_dataset", no_reading)
    model = build_model(tiny_model_dir, 3, LoraSettings(rank=4, alpha=8, dropout=0.0), 3)
    arrays = ArrayRecord({k: Array(v) for k, v in adapter_state(model).items()})
    msg = Message(
        content=RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": 2})}),
        dst_node_id=7,
        message_type="train",
    )
    reply = client_app.train(msg, context, flat)
    assert reply.has_error()
    assert reply.error.code == protocol.ERROR_CODE_BUDGET
    assert "privacy budget exhausted" in reply.error.reason
    assert (
        len(
            PrivacyLedger.open(
                tmp_path / "ledgers", "fedlora", dataset_identity(cfg, context), 1e-5, "rdp"
            ).history
        )
        == 1
    )
    assert np.isfinite(ONE_ROUND)
