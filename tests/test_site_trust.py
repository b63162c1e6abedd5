"""The site's promises kept by the site (issue 17): its ledger cannot be reset
by the server, a capped node never works without local DP, a DP node sends
only fixed or accounted figures, and the node checks SecAgg+'s threshold."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

from fedlora import protocol
from fedlora.client import app as client_app
from fedlora.client.private import open_ledger, precheck
from fedlora.client.secagg import check_setup
from fedlora.config import ConfigError, RunConfig
from fedlora.models.adapter import adapter_state
from fedlora.models.loading import build_model
from fedlora.privacy.accounting import epsilon
from fedlora.privacy.ledger import PrivacyLedger
from fedlora.privacy.releases import LOCAL_DP_TRAIN_METRICS
from fedlora.settings import LoraSettings
from fedlora.simulations.tiny import LABELS, tiny_run_config


def _site(data: Path, ledgers: Path, **extra: Any) -> Context:
    node = {
        "data-path": str(data),
        "privacy-epsilon-cap": 8.0,
        "privacy-delta": 1e-5,
        "privacy-ledger-dir": str(ledgers),
        **extra,
    }
    return Context(run_id=1, node_id=7, node_config=node, state=RecordDict(), run_config={})


def _flat(model: Path, data: Path, run: Path, **extra: Any) -> dict[str, Any]:
    flat = tiny_run_config(model, data, run, **extra)
    flat["labels"] = ",".join(LABELS)
    return flat


def _train_msg(model_dir: Path, rnd: int = 1) -> Message:
    model = build_model(model_dir, 3, LoraSettings(rank=4, alpha=8, dropout=0.0), 3)
    arrays = ArrayRecord({k: Array(v) for k, v in adapter_state(model).items()})
    return Message(
        content=RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": rnd})}),
        dst_node_id=7,
        message_type="train",
    )


def test_the_federation_name_does_not_open_a_fresh_ledger(
    tiny_model_dir: Path, text_csv: Path, tmp_path: Path
) -> None:
    context = _site(text_csv, tmp_path / "ledgers")
    one = RunConfig.from_flat(_flat(tiny_model_dir, text_csv, tmp_path, federation="a"))
    other = RunConfig.from_flat(_flat(tiny_model_dir, text_csv, tmp_path, federation="b"))
    ledger, _ = open_ledger(one, context)
    ledger.record_round(1, 1.0, 0.25, 4)
    again, _ = open_ledger(other, context)
    assert again.path == ledger.path
    assert again.history == [(1.0, 0.25, 4)]


def test_a_legacy_ledger_of_the_same_data_still_counts(
    tiny_model_dir: Path, text_csv: Path, tmp_path: Path
) -> None:
    context = _site(text_csv, tmp_path / "ledgers")
    cfg = RunConfig.from_flat(_flat(tiny_model_dir, text_csv, tmp_path))
    identity = "path:" + str(text_csv.resolve())
    old = PrivacyLedger.open(tmp_path / "ledgers", "old-federation", identity, 1e-5, "rdp")
    old.record_round(1, 1.0, 0.25, 4)
    old.record_round(2, 1.0, 0.25, 4)
    ledger, _ = open_ledger(cfg, context)
    assert ledger.history == []
    assert ledger.spent_epsilon() == pytest.approx(epsilon([(1.0, 0.25, 4)] * 2, 1e-5))
    assert ledger.projected_epsilon(1.0, 0.25, 4) == pytest.approx(
        epsilon([(1.0, 0.25, 4)] * 3, 1e-5)
    )


def test_precheck_counts_only_the_last_runs_round(
    tiny_model_dir: Path, text_csv: Path, tmp_path: Path
) -> None:
    # Run A: rounds 1, 2. Run B: round 1. The estimate of B's next round is
    # one round (not A's round 1 as well): with a cap that fits exactly four
    # rounds, the precheck must let the fourth one through.
    four = epsilon([(1.0, 0.25, 4)] * 4, 1e-5)
    context = _site(text_csv, tmp_path / "ledgers", **{"privacy-epsilon-cap": four + 1e-9})
    cfg = RunConfig.from_flat(_flat(tiny_model_dir, text_csv, tmp_path))
    ledger, limits = open_ledger(cfg, context)
    for rnd in (1, 2, 1):
        ledger.record_round(rnd, 1.0, 0.25, 4)
    precheck(ledger, limits)  # raised BudgetExceeded before the fix


@pytest.mark.parametrize("mode", ["none", "central-server-fixed"])
def test_a_capped_node_refuses_work_without_local_dp(
    flower_task: Any, tiny_model_dir: Path, text_csv: Path, tmp_path: Path, mode: str
) -> None:
    extra: dict[str, Any] = {"dp-mode": mode}
    if mode != "none":
        extra["dp-noise-multiplier"] = 1.0
    flat = _flat(tiny_model_dir, text_csv, tmp_path, **extra)
    context = _site(text_csv, tmp_path / "ledgers")
    reply = client_app.train(_train_msg(tiny_model_dir), context, flat)
    assert reply.has_error()
    assert reply.error.code == protocol.ERROR_CODE_PRIVACY
    assert "privacy-epsilon-cap" in reply.error.reason
    evaluate = Message(
        content=_train_msg(tiny_model_dir).content, dst_node_id=7, message_type="evaluate"
    )
    assert client_app.evaluate_handler(evaluate, context, flat).has_error()
    assert not list((tmp_path / "ledgers").glob("*.json"))


def test_an_infinite_cap_is_refused(
    flower_task: Any, tiny_model_dir: Path, text_csv: Path, tmp_path: Path
) -> None:
    flat = _flat(tiny_model_dir, text_csv, tmp_path, **{"dp-mode": "local"})
    flat["dp-noise-multiplier"] = 1.0
    context = _site(text_csv, tmp_path / "ledgers", **{"privacy-epsilon-cap": float("inf")})
    reply = client_app.train(_train_msg(tiny_model_dir), context, flat)
    assert reply.has_error() and "finite cap" in reply.error.reason


def test_a_dp_train_reply_carries_only_fixed_or_accounted_figures(
    flower_task: Any, tiny_model_dir: Path, text_csv: Path, tmp_path: Path
) -> None:
    flat = _flat(tiny_model_dir, text_csv, tmp_path, **{"dp-mode": "local"})
    flat["dp-noise-multiplier"] = 1.0
    context = _site(text_csv, tmp_path / "ledgers", **{"privacy-public-examples": 50})
    msg = _train_msg(tiny_model_dir)
    sent = set(msg.content.array_records["arrays"].keys())
    reply = client_app.train(msg, context, flat)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert set(reply.content.array_records) == {"arrays"}
    assert set(reply.content.array_records["arrays"].keys()) <= sent
    assert not reply.content.config_records
    (metrics,) = reply.content.metric_records.values()
    assert set(metrics) == LOCAL_DP_TRAIN_METRICS
    assert metrics["num-examples"] == 50  # the published count, not the data's size
    ledger = PrivacyLedger.load(next((tmp_path / "ledgers").glob("ledger-*.json")))
    assert metrics["epsilon"] == pytest.approx(ledger.spent_epsilon())


def test_federated_evaluation_is_refused_under_local_dp(
    flower_task: Any, tiny_model_dir: Path, text_csv: Path, tmp_path: Path
) -> None:
    flat = _flat(tiny_model_dir, text_csv, tmp_path, **{"dp-mode": "local"})
    flat["dp-noise-multiplier"] = 1.0
    context = _site(text_csv, tmp_path / "ledgers")
    msg = Message(
        content=_train_msg(tiny_model_dir).content, dst_node_id=7, message_type="evaluate"
    )
    reply = client_app.evaluate_handler(msg, context, flat)
    assert reply.has_error() and "fraction-evaluate=0" in reply.error.reason
    with pytest.raises(ConfigError, match="fraction-evaluate"):
        RunConfig.from_flat({**flat, "fraction-evaluate": 0.5})


def test_an_unwritable_ledger_folder_replies_without_a_traceback(
    flower_task: Any, tiny_model_dir: Path, text_csv: Path, tmp_path: Path
) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    flat = _flat(tiny_model_dir, text_csv, tmp_path, **{"dp-mode": "local"})
    flat["dp-noise-multiplier"] = 1.0
    context = _site(text_csv, blocker / "ledgers")
    reply = client_app.train(_train_msg(tiny_model_dir), context, flat)
    assert reply.has_error()
    assert reply.error.code == protocol.ERROR_CODE_PRIVACY
    assert "Traceback" not in reply.error.reason
    assert "cannot be used" in reply.error.reason


def _setup(threshold: int, shares: int) -> Message:
    config = ConfigRecord(
        {Key.STAGE: Stage.SETUP, Key.THRESHOLD: threshold, Key.SHARE_NUMBER: shares}
    )
    return Message(
        content=RecordDict({RECORD_KEY_CONFIGS: config}), dst_node_id=7, message_type="train"
    )


@pytest.mark.parametrize(
    ("threshold", "shares", "node_min", "refused"),
    [(1, 5, 3, True), (2, 5, 2, True), (3, 5, 3, False), (3, 4, 3, False), (4, 10, 3, True)],
)
def test_the_node_checks_the_secagg_threshold_itself(
    flower_task: Any, threshold: int, shares: int, node_min: int, refused: bool
) -> None:
    context = Context(
        run_id=1,
        node_id=7,
        node_config={"secagg-min-threshold": node_min},
        state=RecordDict(),
        run_config={},
    )
    assert (check_setup(_setup(threshold, shares), context) is not None) is refused
