"""Strategies by name; FedAvg over adapters equals hand-computed weighted means."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict

from fedlora.errors import ConfigError
from fedlora.protocol import ARRAYS_KEY, METRIC_NUM_EXAMPLES
from fedlora.strategies.registry import STRATEGIES, build_strategy, strategy_options

pytestmark = pytest.mark.usefixtures("flower_task")


def _reply(arrays: dict[str, np.ndarray], n: int, loss: float) -> Message:
    content = RecordDict(
        {
            ARRAYS_KEY: ArrayRecord({k: Array(v) for k, v in arrays.items()}),
            "metrics": MetricRecord({METRIC_NUM_EXAMPLES: n, "loss": loss}),
        }
    )
    # A plain message stands in for the reply's envelope; aggregation reads content.
    return Message(content=content, dst_node_id=1, message_type=MessageType.TRAIN)


def test_fedavg_over_adapters_is_the_example_weighted_mean() -> None:
    a = {
        "x.lora_A.weight": np.array([[1.0, 2.0]], np.float32),
        "head.bias": np.array([0.0, 3.0], np.float32),
    }
    b = {
        "x.lora_A.weight": np.array([[4.0, -1.0]], np.float32),
        "head.bias": np.array([6.0, 0.0], np.float32),
    }
    strategy = build_strategy("fedavg")
    arrays, metrics = strategy.aggregate_train(1, [_reply(a, 10, 1.0), _reply(b, 20, 4.0)])
    assert arrays is not None and metrics is not None
    # weights 1:2 -> (a + 2b) / 3, worked out by hand
    np.testing.assert_allclose(arrays["x.lora_A.weight"].numpy(), [[3.0, 0.0]], rtol=1e-6)
    np.testing.assert_allclose(arrays["head.bias"].numpy(), [4.0, 1.0], rtol=1e-6)
    assert metrics["loss"] == pytest.approx(3.0)  # (1 + 2*4) / 3


def test_fedmedian_takes_the_coordinate_median() -> None:
    replies = [_reply({"w": np.array([v], np.float32)}, 1, 0.0) for v in (1.0, 100.0, 3.0)]
    arrays, _ = build_strategy("fedmedian").aggregate_train(1, replies)
    assert arrays is not None
    np.testing.assert_allclose(arrays["w"].numpy(), [3.0])


def test_every_flower_strategy_is_registered() -> None:
    expected = {
        "fedavg",
        "fedavgm",
        "fedprox",
        "fedadam",
        "fedyogi",
        "fedadagrad",
        "krum",
        "multikrum",
        "fedmedian",
        "fedtrimmedavg",
        "bulyan",
    }
    assert expected <= set(STRATEGIES)


def test_strategy_options_are_typed_and_checked() -> None:
    strategy = build_strategy("fedavgm", "server-momentum=0.9,server-learning-rate=0.5")
    assert strategy.server_momentum == pytest.approx(0.9)  # type: ignore[attr-defined]
    assert "server-momentum" in strategy_options("fedavgm")
    with pytest.raises(ConfigError, match="does not take; allowed: server-learning-rate"):
        build_strategy("fedavgm", "momentum=0.9")
    with pytest.raises(ConfigError, match="not key=value"):
        build_strategy("fedavgm", "0.9")
    with pytest.raises(ConfigError, match="not a valid float"):
        build_strategy("fedavgm", "server-momentum=high")


def test_unknown_strategy_lists_known_names() -> None:
    with pytest.raises(ConfigError, match="'strategy' has value 'fedsgd'; allowed: fedavg"):
        build_strategy("fedsgd")


def test_partial_replies_follow_the_registered_client_mode() -> None:
    # A strategy registered later with FFA's client mode gets its replies
    # decoded by the strategy, like ffa-lora; no name list to keep in step.
    from fedlora.config import RunConfig
    from fedlora.strategies.ffa_lora import FfaLora
    from fedlora.strategies.registry import register

    class MyFfa(FfaLora):
        pass

    register("my-ffa-test", MyFfa)
    try:
        assert RunConfig.from_flat({"strategy": "my-ffa-test"}).partial_replies
        assert RunConfig.from_flat({"strategy": "ffa-lora"}).partial_replies
        assert RunConfig.from_flat({"strategy": "hetero-rank"}).partial_replies
        assert not RunConfig.from_flat({"strategy": "lora-exact"}).partial_replies
        assert not RunConfig.from_flat({"strategy": "fedavg"}).partial_replies
        assert RunConfig.from_flat({"strategy": "fedavg", "compression": "int8"}).partial_replies
    finally:
        del STRATEGIES["my-ffa-test"]
