"""Real Flower simulations (Ray) of the real ServerApp/ClientApp on a tiny BERT."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fedlora.models.adapter import adapter_state, load_adapter_state
from fedlora.models.loading import build_model
from fedlora.settings import LoraSettings
from fedlora.simulations.engine import Resources, simulate
from fedlora.simulations.tiny import tiny_run_config

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def _overrides(model_dir: Path, data: Path, run_dir: Path, **extra: Any) -> dict[str, Any]:
    return tiny_run_config(model_dir, data, run_dir, **extra)


def _fail_partition_zero(msg: Any, context: Any, call_next: Any) -> Any:
    """A site whose node crashes on every message (a real exception in the app)."""
    if (
        int(context.node_config.get("partition-id", -1)) == 0
        and msg.metadata.message_type == "train"
    ):
        raise RuntimeError("disk on fire at site 0")
    return call_next(msg, context)


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir: Path, text_csv: Path, tmp_path_factory: pytest.TempPathFactory):
    run_dir = tmp_path_factory.mktemp("run-a")
    # export-round=last: these tests check that the export is the trained last round
    # (this 2-round run does not beat round 0, which export-round=best would export).
    cfg = _overrides(tiny_model_dir, text_csv, run_dir, **{"export-round": "last"})
    status = simulate(cfg, 3, Resources(num_cpus=1))
    return run_dir, status


def test_simulation_completes_and_writes_metrics(finished_run: tuple[Path, dict]) -> None:
    run_dir, status = finished_run
    assert status["status"] == "completed", status
    rounds = json.loads((run_dir / "metrics.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert all(r["clients_ok"] == 3 for r in rounds[1:])
    assert all(r["bytes_uploaded"] > 0 for r in rounds[1:])
    header = (run_dir / "metrics.csv").read_text().splitlines()[0]
    assert "global_accuracy" in header and "bytes_uploaded" in header
    # what each virtual client held: the same split the clients trained on
    parts = json.loads((run_dir / "partitions.json").read_text())
    assert [p["partition"] for p in parts] == [0, 1, 2]
    assert all(sum(p["labels"].values()) == p["examples"] > 0 for p in parts)
    assert (run_dir / "partitions.png").is_file()


def test_global_adapter_changed_and_export_reloads_identically(
    finished_run: tuple[Path, dict], tiny_model_dir: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    run_dir, _ = finished_run
    lora = LoraSettings(rank=4, alpha=8, dropout=0.0)
    model = build_model(tiny_model_dir, 3, lora, seed=3)
    initial = adapter_state(model)
    final = dict(np.load(io.BytesIO((run_dir / "checkpoint" / "adapter.npz").read_bytes())))
    assert set(final) == set(initial)
    changed = [k for k in initial if not np.allclose(initial[k], final[k])]
    assert any(".lora_B." in k for k in changed)
    assert any("classifier" in k for k in changed)

    load_adapter_state(model, final)
    ids = torch.tensor([[2, 40, 41, 42, 3]])
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    base = AutoModelForSequenceClassification.from_pretrained(str(tiny_model_dir), num_labels=3)
    reloaded = PeftModel.from_pretrained(base, str(run_dir / "adapter")).eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=ids).logits, expected, atol=1e-6)
    labels = json.loads((run_dir / "adapter" / "fedlora_labels.json").read_text())["labels"]
    assert labels == ["money", "sport", "tech"]


def test_same_seed_gives_identical_metrics(
    finished_run: tuple[Path, dict], tiny_model_dir: Path, text_csv: Path, tmp_path: Path
) -> None:
    run_a, _ = finished_run
    cfg = _overrides(tiny_model_dir, text_csv, tmp_path, **{"export-round": "last"})
    status = simulate(cfg, 3, Resources(num_cpus=1))
    assert status["status"] == "completed"
    keys = ("global_accuracy", "global_loss", "train_loss", "bytes_uploaded")
    a = json.loads((run_a / "metrics.json").read_text())["rounds"]
    b = json.loads((tmp_path / "metrics.json").read_text())["rounds"]
    assert [[r[k] for k in keys] for r in a] == [[r[k] for k in keys] for r in b]


def test_one_failing_client_does_not_stop_the_run(
    tiny_model_dir: Path, text_csv: Path, tmp_path: Path
) -> None:
    status = simulate(
        _overrides(tiny_model_dir, text_csv, tmp_path),
        3,
        Resources(num_cpus=1),
        client_mods=[_fail_partition_zero],
    )
    assert status["status"] == "completed", status
    rounds = json.loads((tmp_path / "metrics.json").read_text())["rounds"]
    assert all(r["clients_ok"] == 2 and r["clients_failed"] == 1 for r in rounds[1:])
    assert any("disk on fire" in f for f in rounds[1]["failures"])
    assert status["clients_failed"] == 2  # one per round: never a silent "completed"


def test_too_few_replies_stops_cleanly_with_reason(
    tiny_model_dir: Path, text_csv: Path, tmp_path: Path
) -> None:
    status = simulate(
        _overrides(tiny_model_dir, text_csv, tmp_path, **{"min-train-nodes": 3}),
        3,
        Resources(num_cpus=1),
        client_mods=[_fail_partition_zero],
    )
    assert status["status"] == "stopped"
    assert "only 2 of 3 sampled nodes replied" in status["reason"]
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()


def _slow_partition_zero(msg: Any, context: Any, call_next: Any) -> Any:
    """Site 0 answers round 2 after the timeout; in round 3 the other sites
    take a while, so the straggler's late reply arrives while round 3 runs."""
    import time

    if msg.metadata.message_type == "train":
        site = int(context.node_config.get("partition-id", -1))
        rnd = int(msg.content.config_records["config"]["server-round"])
        if site == 0 and rnd == 2:
            time.sleep(14)
        if site != 0 and rnd == 3:
            time.sleep(8)
    return call_next(msg, context)


def test_straggler_is_dropped_and_its_late_reply_logged(
    tiny_model_dir: Path, text_csv: Path, tmp_path: Path
) -> None:
    status = simulate(
        _overrides(
            tiny_model_dir, text_csv, tmp_path, **{"round-timeout": 12.0, "num-server-rounds": 3}
        ),
        3,
        Resources(num_cpus=0.5),
        client_mods=[_slow_partition_zero],
    )
    assert status["status"] == "completed", status
    rounds = json.loads((tmp_path / "metrics.json").read_text())["rounds"]
    assert rounds[1]["clients_ok"] == 3
    assert rounds[2]["clients_ok"] == 2
    assert any("no reply before timeout" in f for f in rounds[2]["failures"])
    late = [f for f in rounds[3]["failures"] if "late reply" in f]
    assert late and "for round 2 dropped" in late[0]


def _poison_partition_zero(msg: Any, context: Any, call_next: Any) -> Any:
    """Site 0 sends NaNs, site 1 a tensor of the wrong shape."""
    from flwr.app import Array, ArrayRecord

    reply = call_next(msg, context)
    site = int(context.node_config.get("partition-id", -1))
    if msg.metadata.message_type != "train" or reply.has_error() or site not in (0, 1):
        return reply
    arrays = reply.content.array_records["arrays"]
    state = {k: v.numpy() for k, v in arrays.items()}
    first = next(iter(state))
    if site == 0:
        state[first] = np.full_like(state[first], np.nan)
    else:
        state[first] = np.zeros((2, 2), np.float32)
    reply.content.array_records["arrays"] = ArrayRecord({k: Array(v) for k, v in state.items()})
    return reply


def test_nan_and_wrong_shape_updates_are_rejected_and_the_round_goes_on(
    tiny_model_dir: Path, text_csv: Path, tmp_path: Path
) -> None:
    status = simulate(
        _overrides(
            tiny_model_dir, text_csv, tmp_path, **{"num-server-rounds": 1, "min-train-nodes": 1}
        ),
        3,
        Resources(num_cpus=1),
        client_mods=[_poison_partition_zero],
    )
    assert status["status"] == "completed", status
    rounds = json.loads((tmp_path / "metrics.json").read_text())["rounds"]
    assert rounds[1]["clients_ok"] == 1 and rounds[1]["clients_failed"] == 2
    text = " ".join(rounds[1]["failures"])
    assert "partition-000000" in text and "partition-000001" in text
    assert "nan" in text.lower() and "shape" in text.lower()
    final = dict(np.load(io.BytesIO((tmp_path / "checkpoint" / "adapter.npz").read_bytes())))
    assert all(np.isfinite(v).all() for v in final.values())
