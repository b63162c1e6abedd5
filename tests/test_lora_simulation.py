"""LoRA-aware strategies, compression and poisoning in real Flower simulations (tiny BERT)."""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import make_text_csv

from fedlora.compression import CompressionScheme, encode
from fedlora.config import RunConfig
from fedlora.models.adapter import adapter_state
from fedlora.models.loading import build_model
from fedlora.records import payload_bytes
from fedlora.settings import LoraSettings
from fedlora.simulations.engine import Resources, simulate
from fedlora.simulations.tiny import tiny_run_config
from fedlora.strategies.compressed import encoded_record
from fedlora.strategies.math.lora import state_norm

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def _overrides(model_dir: Path, data: Path, run_dir: Path, **extra: Any) -> dict[str, Any]:
    return tiny_run_config(
        model_dir, data, run_dir, **{"learning-rate": 0.05, "local-epochs": 2, **extra}
    )


def _recorder(out_dir: Path) -> Callable[..., Any]:
    """A client mod noting, per train round, the A a node received and holds after training."""

    def mod(msg: Any, context: Any, call_next: Any) -> Any:
        reply = call_next(msg, context)
        if msg.metadata.message_type == "train" and not reply.has_error():
            from fedlora.models.loading import _MODEL_CACHE

            (model,) = _MODEL_CACHE.values()  # the model this worker just trained
            held = {k: v for k, v in adapter_state(model).items() if ".lora_A." in k}
            sent = msg.content.array_records["arrays"]
            digest = hashlib.sha256(b"".join(held[k].tobytes() for k in sorted(held)))
            row = {
                "received_rank": min(int(a.shape[0]) for k, a in sent.items() if ".lora_A." in k),
                "held_a_sha256": digest.hexdigest(),
            }
            pid = int(context.node_config["partition-id"])
            rnd = int(msg.content.config_records["config"]["server-round"])
            (out_dir / f"p{pid}-r{rnd}.json").write_text(json.dumps(row))
        return reply

    return mod


def _rounds(run_dir: Path) -> list[dict[str, Any]]:
    return json.loads((run_dir / "metrics.json").read_text())["rounds"]


def _checkpoint(run_dir: Path) -> dict[str, np.ndarray]:
    return dict(np.load(io.BytesIO((run_dir / "checkpoint" / "adapter.npz").read_bytes())))


def test_ffa_keeps_a_frozen_and_identical_everywhere_with_int8_uploads(
    tiny_model_dir: Path, text_csv: Path, tmp_path: Path
) -> None:
    run_dir, seen = tmp_path / "run", tmp_path / "seen"
    seen.mkdir()
    cfg = _overrides(tiny_model_dir, text_csv, run_dir, strategy="ffa-lora", compression="int8")
    status = simulate(cfg, 3, Resources(num_cpus=1), client_mods=[_recorder(seen)])
    assert status["status"] == "completed", status

    initial = adapter_state(build_model(tiny_model_dir, 3, LoraSettings(4, 8.0, 0.0), seed=3))
    final = _checkpoint(run_dir)
    a_keys = sorted(k for k in initial if ".lora_A." in k)
    assert len(a_keys) == 2
    for key in a_keys:  # the server's A never moved...
        assert final[key].tobytes() == initial[key].tobytes()
    assert any(not np.allclose(final[k], initial[k]) for k in initial if ".lora_B." in k)
    # ...and every client held exactly that A after training, in every round
    initial_digest = hashlib.sha256(b"".join(initial[k].tobytes() for k in a_keys)).hexdigest()
    rows = [json.loads(p.read_text()) for p in sorted(seen.glob("*.json"))]
    assert len(rows) == 6
    assert {r["held_a_sha256"] for r in rows} == {initial_digest}

    # Only B and the head travel, int8-encoded, and bytes-sent counts that payload
    # (an encoding's size depends on shapes only, so it can be worked out exactly).
    b_and_head = {k: v for k, v in initial.items() if ".lora_A." not in k}
    int8 = encode(b_and_head, CompressionScheme("int8", block_size=64))
    expected = payload_bytes(encoded_record(int8))
    for r in _rounds(run_dir)[1:]:
        assert r["clients_ok"] == 3 and not r["failures"]
        assert r["bytes_uploaded"] == 3 * expected


def test_hetero_rank_sites_train_at_their_own_ranks(
    tiny_model_dir: Path, text_csv: Path, tmp_path: Path
) -> None:
    run_dir, seen = tmp_path / "run", tmp_path / "seen"
    seen.mkdir()
    cfg = _overrides(
        tiny_model_dir,
        text_csv,
        run_dir,
        strategy="hetero-rank",
        **{"sim-client-ranks": "2,8", "compression": "topk", "topk-fraction": 0.3},
    )
    status = simulate(cfg, 3, Resources(num_cpus=1), client_mods=[_recorder(seen)])
    assert status["status"] == "completed", status
    got = {p.stem: json.loads(p.read_text())["received_rank"] for p in seen.glob("*.json")}
    assert got == {"p0-r1": 2, "p1-r1": 8, "p2-r1": 2, "p0-r2": 2, "p1-r2": 8, "p2-r2": 2}
    rounds = _rounds(run_dir)
    assert all(r["clients_ok"] == 3 and not r["failures"] for r in rounds[1:])
    assert "lora-truncation-error" in rounds[1]["extra"]
    final = _checkpoint(run_dir)  # the global adapter stays at lora-rank
    assert {v.shape[0] for k, v in final.items() if ".lora_A." in k} == {4}


@pytest.fixture(scope="module")
def poison_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 600 rows: 120 held out, so one test example is 0.83 accuracy points.
    return make_text_csv(tmp_path_factory.mktemp("poison") / "news.csv", n=600)


def test_robust_aggregation_shrugs_off_a_sign_flipping_client_fedavg_does_not(
    tiny_model_dir: Path, poison_csv: Path, tmp_path: Path
) -> None:
    # 5 clients, 1 malicious (20%), its update flipped and scaled by 10. The
    # server's norm gate (update-max-norm) would reject that update by itself;
    # it is opened wide so that only the aggregation rule defends.
    attack = {"sim-malicious-fraction": 0.2, "sim-attack": "sign-flip", "sim-attack-scale": 10.0}
    robust = {
        "strategy": "multikrum",
        "strategy-options": "num-malicious-nodes=1,num-nodes-to-select=4",
    }

    def final_accuracy(name: str, **extra: Any) -> float:
        cfg = _overrides(
            tiny_model_dir,
            poison_csv,
            tmp_path / name,
            # divergence-factor=0: the attacked FedAvg run must run to the end, not stop
            **{"num-server-rounds": 6, "update-max-norm": 1e9, "divergence-factor": 0, **extra},
        )
        status = simulate(cfg, 5, Resources(num_cpus=1))
        assert status["status"] == "completed", status
        return float(_rounds(tmp_path / name)[-1]["global_accuracy"])

    clean = final_accuracy("clean", strategy="fedavg")
    attacked_fedavg = final_accuracy("fedavg", strategy="fedavg", **attack)
    attacked_robust = final_accuracy("multikrum", **robust, **attack)
    assert clean > 0.9  # the task is learnt
    assert abs(attacked_robust - clean) <= 0.02, (clean, attacked_robust)
    assert clean - attacked_fedavg > 0.3, (clean, attacked_fedavg)


def test_update_max_norm_guards_ffa_lora_runs_too(
    tiny_model_dir: Path, text_csv: Path, tmp_path: Path
) -> None:
    """FFA replies are decoded by the strategy, not the server's reply filter;
    the operator's update-max-norm must still reject (here: every) update."""
    cfg = _overrides(
        tiny_model_dir, text_csv, tmp_path / "run", strategy="ffa-lora", **{"num-server-rounds": 1}
    )
    run = RunConfig.from_flat(cfg)
    init = adapter_state(build_model(tiny_model_dir, 3, run.lora, run.seed))  # 3 labels
    cfg["update-max-norm"] = state_norm(init) / 2  # below even the untrained adapter
    status = simulate(cfg, 3, Resources(num_cpus=1))
    assert status["status"] == "stopped", status
    assert "update-max-norm" in status["reason"] and "only 0 of 3" in status["reason"], status
    failures = status["reason"].split("failures: ")[1].split("; partition-")
    assert len(failures) == 3, status
    assert all("update rejected: L2 norm of the update is" in f for f in failures), status
