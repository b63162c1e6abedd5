"""Central DP with fixed clipping releases every round (issue 17, finding 7):
unequal weights and a missing site no longer make Flower's wrapper refuse."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from fedlora.privacy.central import central_epsilon, wrap_central


class _Grid:
    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)


def _reply(sent: Message, value: float, weight: int) -> Message:
    content = RecordDict(
        {
            "arrays": ArrayRecord({"w": Array(np.full(4, value, np.float32))}),
            "metrics": MetricRecord({"num-examples": weight, "loss": value}),
        }
    )
    return Message(content=content, reply_to=sent)


@pytest.mark.parametrize("mode", ["central-server-fixed", "central-client-fixed"])
def test_unequal_weights_and_a_missing_site_still_release(flower_task: Any, mode: str) -> None:
    strategy = wrap_central(FedAvg(), mode, 1e-6, 100.0, 3, 3, 1e-5)
    arrays = ArrayRecord({"w": Array(np.zeros(4, np.float32))})
    sent = list(strategy.configure_train(1, arrays, ConfigRecord({}), _Grid([1, 2, 3])))  # type: ignore[arg-type]
    assert len(sent) == 3
    # Weights 10 and 30 (Flower refused unequal ones), the third site failed.
    replies = [_reply(sent[0], 3.0, 10), _reply(sent[1], 6.0, 30)]
    new, metrics = strategy.aggregate_train(1, replies)
    assert new is not None
    # Equal weights over the 3 sampled: (3 + 6 + 0) / 3 = 3, noise ~1e-6 * 100 / 3.
    np.testing.assert_allclose(new["w"].numpy(), 3.0, atol=1e-3)
    assert metrics is not None and metrics["loss"] == pytest.approx((3 * 10 + 6 * 30) / 40)
    eps = central_epsilon(strategy)
    assert eps is not None and eps > 0


def test_server_side_clipping_clips_and_survives_a_zero_update(flower_task: Any) -> None:
    strategy = wrap_central(FedAvg(), "central-server-fixed", 1e-6, 1.0, 2, 2, 1e-5)
    arrays = ArrayRecord({"w": Array(np.zeros(4, np.float32))})
    sent = list(strategy.configure_train(1, arrays, ConfigRecord({}), _Grid([1, 2])))  # type: ignore[arg-type]
    # Update of norm 200 is clipped to norm 1 (each entry 0.5); the other is
    # exactly the global model (zero update), which crashed flwr 1.42's clip.
    new, _ = strategy.aggregate_train(1, [_reply(sent[0], 100.0, 5), _reply(sent[1], 0.0, 5)])
    assert new is not None
    np.testing.assert_allclose(new["w"].numpy(), 0.25, atol=1e-4)
