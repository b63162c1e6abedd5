"""Simulated poisoning and the client's LoRA modes: who attacks, how, at which rank."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, RecordDict

from fedlora.client.modes import node_mode
from fedlora.config import RunConfig
from fedlora.data.labels import LabelSpace
from fedlora.data.sources import TextDataset
from fedlora.errors import ConfigError
from fedlora.models.adapter import adapter_state, set_lora_a_trainable, trainable_state
from fedlora.models.loading import build_model
from fedlora.settings import LoraSettings
from fedlora.simulations.attacks import (
    flip_labels,
    malicious_partitions,
    partition_attack,
    poison_update,
)


def _context(node_config: dict, **run: object) -> tuple[RunConfig, Context]:
    cfg = RunConfig.from_flat(dict(run))
    return cfg, Context(1, 1, node_config, RecordDict(), dict(run))  # type: ignore[arg-type]


def test_malicious_partitions_are_exactly_the_fraction_and_seeded() -> None:
    chosen = malicious_partitions(seed=7, num_partitions=5, fraction=0.2)
    assert len(chosen) == 1 and chosen == malicious_partitions(7, 5, 0.2)
    assert len(malicious_partitions(7, 10, 0.3)) == 3
    assert malicious_partitions(7, 10, 0.0) == frozenset()
    assert {min(malicious_partitions(s, 10, 0.1)) for s in range(20)} != {0}  # varies with seed


def test_sign_flip_and_noise_act_on_the_delta() -> None:
    received = {"w": np.array([1.0, 2.0], np.float32)}
    trained = {"w": np.array([1.5, 1.0], np.float32)}  # delta = [0.5, -1]
    flipped = poison_update(received, trained, "sign-flip", 10.0, 0, 1, 0)
    np.testing.assert_allclose(flipped["w"], [1.0 - 5.0, 2.0 + 10.0])
    noisy = poison_update(received, trained, "scaled-noise", 3.0, 0, 1, 0)
    again = poison_update(received, trained, "scaled-noise", 3.0, 0, 1, 0)
    np.testing.assert_array_equal(noisy["w"], again["w"])  # seeded by (seed, round, partition)
    big = {"w": np.zeros(20000, np.float32)}
    big_trained = {"w": np.full(20000, 0.5, np.float32)}  # RMS of delta 0.5
    std = float(np.std(poison_update(big, big_trained, "scaled-noise", 3.0, 0, 1, 0)["w"]))
    assert std == pytest.approx(1.5, rel=0.03)  # scale x RMS, within sampling error


def test_label_flip_moves_every_label() -> None:
    data = TextDataset(("a", "b", "c"), (0, 1, 2), LabelSpace.of(["x", "y", "z"]), "t")
    assert flip_labels(data).label_ids == (1, 2, 0)


def test_only_simulated_partitions_attack() -> None:
    run = {"sim-malicious-fraction": 1.0, "sim-attack": "label-flip"}
    cfg, ctx = _context({"partition-id": 0, "num-partitions": 2}, **run)
    assert partition_attack(cfg, ctx) == "label-flip"
    cfg, ctx = _context({"data-path": "/data/x.csv", "partition-id": 0, "num-partitions": 2}, **run)
    assert partition_attack(cfg, ctx) is None


def test_node_rank_comes_from_the_node_then_the_simulation_then_the_run() -> None:
    cfg, ctx = _context({"lora-rank": 16}, strategy="hetero-rank")
    assert node_mode(cfg, ctx).rank == 16
    cfg, ctx = _context(
        {"partition-id": 3, "num-partitions": 4},
        strategy="hetero-rank",
        **{"sim-client-ranks": "4,16"},
    )
    assert node_mode(cfg, ctx).rank == 16
    cfg, ctx = _context({"lora-rank": 16}, strategy="fedavg", **{"lora-rank": 4})
    assert node_mode(cfg, ctx).rank == 4  # only hetero-rank lets a node choose
    cfg, ctx = _context({"lora-rank": 0}, strategy="hetero-rank")
    with pytest.raises(ConfigError, match="lora-rank=0"):
        node_mode(cfg, ctx)


def test_ffa_payload_is_b_and_head_only(tiny_model_dir: Path) -> None:
    model = build_model(tiny_model_dir, 3, LoraSettings(rank=4, alpha=8, dropout=0.0), seed=0)
    set_lora_a_trainable(model, False)
    payload = trainable_state(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(v.size for v in payload.values()) == sum(p.numel() for p in trainable)
    assert not any(".lora_A." in k for k in payload)
    assert sum(".lora_B." in k for k in payload) == 2
    assert sum("classifier" in k for k in payload) == 2
    assert set(adapter_state(model)) - set(payload) == {
        k for k in adapter_state(model) if ".lora_A." in k
    }
    set_lora_a_trainable(model, True)
    assert trainable_state(model).keys() == adapter_state(model).keys()


def test_compression_and_central_dp_do_not_mix() -> None:
    with pytest.raises(ConfigError, match="compression=int8 cannot be combined"):
        RunConfig.from_flat(
            {"compression": "int8", "dp-mode": "central-server-fixed", "dp-noise-multiplier": 1.0}
        )
