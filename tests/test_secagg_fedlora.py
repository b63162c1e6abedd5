"""SecAgg+ through fedlora's real ServerApp/ClientApp in a Flower simulation:
the secure aggregate equals plain FedAvg within SecAgg+'s quantisation bound."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedlora.server.secagg import aggregate_error_bound
from fedlora.server.secagg_flower import SecAggSettings
from fedlora.simulations.engine import Resources, simulate
from fedlora.simulations.tiny import tiny_run_config

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def _cfg(model_dir: Path, data: Path, run_dir: Path, **extra: Any) -> dict[str, Any]:
    return tiny_run_config(
        model_dir,
        data,
        run_dir,
        **{
            "num-server-rounds": 1,
            "min-train-nodes": 3,
            "max-train-examples": 32,
            "seed": 9,
            **extra,
        },
    )


def _adapter(run_dir: Path) -> dict[str, np.ndarray]:
    data = np.load(io.BytesIO((run_dir / "checkpoint" / "adapter.npz").read_bytes()))
    return {k: data[k] for k in data.files}


def test_secure_aggregate_matches_plain_fedavg(
    tiny_model_dir: Path, text_csv: Path, tmp_path: Path
) -> None:
    plain = simulate(_cfg(tiny_model_dir, text_csv, tmp_path / "plain"), 3, Resources(num_cpus=1))
    assert plain["status"] == "completed", plain
    secure = simulate(
        _cfg(tiny_model_dir, text_csv, tmp_path / "secure", secagg=True), 3, Resources(num_cpus=1)
    )
    assert secure["status"] == "completed", secure
    rounds = json.loads((tmp_path / "secure" / "metrics.json").read_text())["rounds"]
    assert rounds[1]["clients_ok"] == 3
    a, b = _adapter(tmp_path / "plain"), _adapter(tmp_path / "secure")
    # Bound: 3 nodes of 32 examples, entries clipped to +-1.0 (the default range).
    bound = aggregate_error_bound([32, 32, 32], 1.0, SecAggSettings(max_weight=32.0))
    worst = max(float(np.max(np.abs(a[k] - b[k]))) for k in a)
    assert worst <= bound + 1e-6, (worst, bound)
    assert any(not np.allclose(a[k], 0) for k in a)


def test_ffa_lora_over_secagg_keeps_a_bit_for_bit(
    tiny_model_dir: Path, text_csv: Path, tmp_path: Path
) -> None:
    """The DP recipe (FFA-LoRA) under SecAgg+: nodes, whose replies leave A
    out, must send a zero update for it, A must come back bit-for-bit (the
    server also pins it, should quantisation ever turn a zero into a
    rounding error), and B must still move by the secure mean."""
    from fedlora.config import RunConfig
    from fedlora.models.adapter import adapter_state
    from fedlora.models.loading import build_model

    cfg = _cfg(tiny_model_dir, text_csv, tmp_path / "ffa", secagg=True, strategy="ffa-lora")
    init = adapter_state(
        build_model(tiny_model_dir, 3, RunConfig.from_flat(cfg).lora, 9)
    )  # 3 labels
    status = simulate(cfg, 3, Resources(num_cpus=1))
    assert status["status"] == "completed", status
    final = _adapter(tmp_path / "ffa")
    a_keys = [k for k in final if ".lora_A." in k]
    assert a_keys and all(final[k].tobytes() == init[k].tobytes() for k in a_keys)
    assert any(not np.array_equal(final[k], init[k]) for k in final if ".lora_B." in k)
