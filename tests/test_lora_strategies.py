"""LoRA-aware strategies through Flower's Strategy interface, against hand-worked numbers."""

from __future__ import annotations

import pickle
from collections.abc import Iterable
from typing import Any

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)

from fedlora.client.app import query_handler
from fedlora.errors import ConfigError
from fedlora.protocol import (
    ARRAYS_KEY,
    CONFIG_KEY,
    METRIC_NUM_EXAMPLES,
    METRIC_REJECTED,
    METRIC_TRUNCATION,
    client_mode,
)
from fedlora.server.checkpoint import dump_strategy
from fedlora.server.validation import make_decoded_filter
from fedlora.strategies.registry import build_strategy

pytestmark = pytest.mark.usefixtures("flower_task")

M = "base_model.model.enc.query"
A, B = f"{M}.lora_A.weight", f"{M}.lora_B.weight"
HEAD = "base_model.model.classifier.bias"


def f32(x: Any) -> np.ndarray:
    return np.asarray(x, np.float32)


def record(state: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(f32(v)) for k, v in state.items()})


class FakeGrid:
    """Nodes whose query replies come from fedlora's real query handler."""

    def __init__(self, node_configs: dict[int, dict[str, Any]], run_config: dict[str, Any]):
        self.nodes = node_configs
        self.run_config = run_config
        self.queries = 0

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def send_and_receive(self, messages: Iterable[Message], timeout: float) -> list[Message]:
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            context = Context(1, node, self.nodes[node], RecordDict(), self.run_config)
            self.queries += 1
            replies.append(query_handler(msg, context))
        return replies


def configure(strategy: Any, arrays: ArrayRecord, grid: Any, rnd: int = 1) -> list[Message]:
    return list(strategy.configure_train(rnd, arrays, ConfigRecord(), grid))


def reply_to(sent: Message, state: dict[str, np.ndarray] | ArrayRecord, n: int) -> Message:
    """The node's reply to ``sent`` (src node = the node it was sent to)."""
    arrays = state if isinstance(state, ArrayRecord) else record(state)
    content = RecordDict(
        {ARRAYS_KEY: arrays, "metrics": MetricRecord({METRIC_NUM_EXAMPLES: n, "loss": 1.0})}
    )
    return Message(content=content, reply_to=sent)


def sent_state(msg: Message) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in msg.content.array_records[ARRAYS_KEY].items()}


def test_client_modes_follow_the_strategy_name() -> None:
    assert client_mode("fedavg") == "standard"
    assert client_mode("lora-exact") == "standard"
    assert client_mode("ffa-lora") == "ffa"
    assert client_mode("hetero-rank") == "hetero-rank"


# ------------------------------------------------------------------ lora-exact
def test_lora_exact_refactorises_the_weighted_mean_product_by_hand() -> None:
    # rank 1, two clients whose products are diag(2, 0) and diag(0, 1):
    # weights 1:3 -> M = diag(0.5, 0.75); the best rank-1 part is diag(0, 0.75)
    # and the error is 0.5 / sqrt(0.5^2 + 0.75^2).
    glob = {A: f32([[0.3, 0.1]]), B: f32([[0.0], [0.0]]), HEAD: f32([0.0, 0.0])}
    c1 = {A: f32([[2.0, 0.0]]), B: f32([[1.0], [0.0]]), HEAD: f32([4.0, 0.0])}
    c2 = {A: f32([[0.0, 1.0]]), B: f32([[0.0], [1.0]]), HEAD: f32([0.0, 8.0])}
    strategy = build_strategy("lora-exact")
    grid = FakeGrid({11: {}, 12: {}}, {})
    sent = configure(strategy, record(glob), grid)
    arrays, metrics = strategy.aggregate_train(
        1, [reply_to(sent[0], c1, 10), reply_to(sent[1], c2, 30)]
    )
    assert arrays is not None and metrics is not None
    a, b = arrays[A].numpy(), arrays[B].numpy()
    np.testing.assert_allclose(b @ a, [[0.0, 0.0], [0.0, 0.75]], atol=1e-6)
    # singular value split evenly: |B| = |A| = sqrt(0.75)
    np.testing.assert_allclose(np.abs(a), [[0.0, np.sqrt(0.75)]], atol=1e-6)
    np.testing.assert_allclose(np.abs(b), [[0.0], [np.sqrt(0.75)]], atol=1e-6)
    np.testing.assert_allclose(arrays[HEAD].numpy(), [1.0, 6.0], rtol=1e-6)  # (c1 + 3 c2) / 4
    assert metrics[METRIC_TRUNCATION] == pytest.approx(0.5 / np.hypot(0.5, 0.75), rel=1e-5)
    assert metrics[METRIC_REJECTED] == 0
    assert list(arrays.keys()) == list(glob)  # the global key order is kept


def test_lora_exact_equals_the_mean_of_products_when_the_rank_suffices() -> None:
    # out = 3 <= rank = 3: the mean product always fits, so it must be exact.
    rng = np.random.default_rng(0)
    glob = {A: rng.normal(size=(3, 5)), B: np.zeros((3, 3)), HEAD: np.zeros(2)}
    clients = [
        {A: rng.normal(size=(3, 5)), B: rng.normal(size=(3, 3)), HEAD: rng.normal(size=2)}
        for _ in range(3)
    ]
    n = [5, 1, 7]
    strategy = build_strategy("lora-exact")
    sent = configure(strategy, record(glob), FakeGrid({1: {}, 2: {}, 3: {}}, {}))
    replies = [reply_to(m, c, w) for m, c, w in zip(sent, clients, n, strict=True)]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None and metrics is not None
    expected = sum(w * f32(c[B]) @ f32(c[A]) for c, w in zip(clients, n, strict=True)) / sum(n)
    np.testing.assert_allclose(arrays[B].numpy() @ arrays[A].numpy(), expected, atol=1e-5)
    assert metrics[METRIC_TRUNCATION] < 1e-5
    # ... unlike FedAvg, which averages the factors separately
    fedavg, _ = build_strategy("fedavg").aggregate_train(1, replies)
    assert fedavg is not None
    naive = fedavg[B].numpy() @ fedavg[A].numpy()
    assert np.abs(naive - expected).max() > 0.1


def test_a_malformed_reply_is_left_out_not_fatal() -> None:
    glob = {A: f32([[1.0, 0.0]]), B: f32([[0.0], [0.0]]), HEAD: f32([0.0, 0.0])}
    good = {A: f32([[1.0, 0.0]]), B: f32([[1.0], [0.0]]), HEAD: f32([1.0, 1.0])}
    bad = {A: f32([[1.0, 0.0, 0.0]]), B: f32([[1.0], [0.0]]), HEAD: f32([1.0, 1.0])}
    strategy = build_strategy("lora-exact")
    sent = configure(strategy, record(glob), FakeGrid({1: {}, 2: {}}, {}))
    arrays, metrics = strategy.aggregate_train(
        1, [reply_to(sent[0], good, 1), reply_to(sent[1], bad, 1)]
    )
    assert arrays is not None and metrics is not None
    assert metrics[METRIC_REJECTED] == 1
    np.testing.assert_allclose(arrays[HEAD].numpy(), [1.0, 1.0])


# -------------------------------------------------------------------- ffa-lora
def test_ffa_averages_b_and_keeps_the_global_a_bit_for_bit() -> None:
    glob = {A: f32([[0.25, -0.5]]), B: f32([[0.0], [0.0]]), HEAD: f32([0.0, 3.0])}
    c1 = {B: f32([[1.0], [2.0]]), HEAD: f32([0.0, 3.0])}  # A frozen: not sent
    c2 = {B: f32([[4.0], [-1.0]]), HEAD: f32([6.0, 0.0])}
    strategy = build_strategy("ffa-lora")
    sent = configure(strategy, record(glob), FakeGrid({1: {}, 2: {}}, {}))
    arrays, metrics = strategy.aggregate_train(
        1, [reply_to(sent[0], c1, 10), reply_to(sent[1], c2, 20)]
    )
    assert arrays is not None and metrics is not None
    assert arrays[A].numpy().tobytes() == glob[A].tobytes()
    np.testing.assert_allclose(arrays[B].numpy(), [[3.0], [0.0]], rtol=1e-6)  # (c1 + 2 c2) / 3
    np.testing.assert_allclose(arrays[HEAD].numpy(), [4.0, 1.0], rtol=1e-6)
    # exact: the mean delta is mean(B_i) @ A
    mean_delta = (10 * c1[B] @ glob[A] + 20 * c2[B] @ glob[A]) / 30
    np.testing.assert_allclose(arrays[B].numpy() @ arrays[A].numpy(), mean_delta, atol=1e-6)


def test_ffa_server_learning_rate_scales_the_mean_step_and_keeps_a() -> None:
    glob = {A: f32([[0.25, -0.5]]), B: f32([[1.0], [-1.0]]), HEAD: f32([2.0, 0.0])}
    c1 = {B: f32([[2.0], [1.0]]), HEAD: f32([2.0, 4.0])}
    c2 = {B: f32([[5.0], [-1.0]]), HEAD: f32([8.0, 1.0])}
    strategy = build_strategy("ffa-lora", "server-learning-rate=2.5")
    sent = configure(strategy, record(glob), FakeGrid({1: {}, 2: {}}, {}))
    arrays, _ = strategy.aggregate_train(1, [reply_to(sent[0], c1, 10), reply_to(sent[1], c2, 30)])
    assert arrays is not None
    assert arrays[A].numpy().tobytes() == glob[A].tobytes()
    # mean B = (2 + 3*5)/4, (1 - 3)/4 = [4.25, -0.5]; step [3.25, 0.5] x 2.5 from [1, -1]
    np.testing.assert_allclose(arrays[B].numpy(), [[9.125], [0.25]], rtol=1e-6)
    # mean head = [6.5, 1.75]; step [4.5, 1.75] x 2.5 from [2, 0]
    np.testing.assert_allclose(arrays[HEAD].numpy(), [13.25, 4.375], rtol=1e-6)


@pytest.mark.parametrize("bad", ["0", "-1", "nan", "inf"])
def test_ffa_server_learning_rate_must_be_positive_and_finite(bad: str) -> None:
    with pytest.raises(ConfigError, match="server-learning-rate"):
        build_strategy("ffa-lora", f"server-learning-rate={bad}")


def test_ffa_leaves_out_a_client_that_trained_a() -> None:
    glob = {A: f32([[0.25, -0.5]]), B: f32([[0.0], [0.0]]), HEAD: f32([0.0, 0.0])}
    honest = {B: f32([[1.0], [1.0]]), HEAD: f32([1.0, 1.0])}
    trained_a = {A: f32([[0.3, -0.5]]), B: f32([[9.0], [9.0]]), HEAD: f32([9.0, 9.0])}
    strategy = build_strategy("ffa-lora")
    sent = configure(strategy, record(glob), FakeGrid({1: {}, 2: {}}, {}))
    arrays, metrics = strategy.aggregate_train(
        1, [reply_to(sent[0], honest, 1), reply_to(sent[1], trained_a, 1)]
    )
    assert arrays is not None and metrics is not None
    assert metrics[METRIC_REJECTED] == 1
    np.testing.assert_allclose(arrays[B].numpy(), [[1.0], [1.0]])


def test_ffa_applies_update_max_norm_to_the_whole_adapter(caplog: pytest.LogCaptureFixture) -> None:
    """FFA replies carry B and the head only; the server's norm guard must still
    apply, to the adapter the reply implies (the frozen A from the global)."""
    glob = {A: f32([[3.0, 4.0]]), B: f32([[0.0], [0.0]]), HEAD: f32([0.0, 0.0])}  # |A| = 5
    small = {B: f32([[0.0], [0.0]]), HEAD: f32([0.0, 12.0])}  # whole: sqrt(25 + 144) = 13
    large = {B: f32([[0.0], [0.0]]), HEAD: f32([0.0, 12.1])}  # whole: 13.09
    strategy = build_strategy("ffa-lora")
    strategy.sent.max_norm = 13.05
    sent = configure(strategy, record(glob), FakeGrid({1: {}, 2: {}}, {}))
    arrays, metrics = strategy.aggregate_train(
        1, [reply_to(sent[0], small, 1), reply_to(sent[1], large, 1)]
    )
    assert arrays is not None and metrics is not None
    assert metrics[METRIC_REJECTED] == 1
    np.testing.assert_allclose(arrays[HEAD].numpy(), [0.0, 12.0])
    assert "L2 norm of the update is 13.09, above the limit 13.05 (update-max-norm" in caplog.text


def test_ffa_trained_a_is_a_round_failure_and_replies_are_decoded_once() -> None:
    """The server's reply filter runs the strategy's own check, so a client that
    trained A is in the round's rejections (not only a log line); the strategy
    then aggregates from the same decode."""
    glob = {A: f32([[0.25, -0.5]]), B: f32([[0.0], [0.0]]), HEAD: f32([0.0, 0.0])}
    honest = {B: f32([[1.0], [1.0]]), HEAD: f32([1.0, 1.0])}
    trained_a = {A: f32([[0.3, -0.5]]), B: f32([[9.0], [9.0]]), HEAD: f32([9.0, 9.0])}
    strategy = build_strategy("ffa-lora")
    sent = configure(strategy, record(glob), FakeGrid({1: {}, 2: {}}, {}))
    replies = [reply_to(sent[0], honest, 1), reply_to(sent[1], trained_a, 1)]
    kept, rejections = make_decoded_filter(strategy.checked_state)(1, replies)
    assert kept == [replies[0]]
    assert len(rejections) == 1 and "differs from the global A" in rejections[0]
    assert rejections[0].startswith(f"node {replies[1].metadata.src_node_id}: update rejected:")
    first = strategy.sent.state_of(replies[0])
    assert strategy.sent.state_of(replies[0]) is first  # remembered, not decoded again
    assert pickle.loads(dump_strategy(strategy)).sent._decoded == {}  # not in checkpoints
    arrays, _ = strategy.aggregate_train(1, kept)
    assert arrays is not None
    np.testing.assert_allclose(arrays[B].numpy(), honest[B])
    assert strategy.sent._decoded == {}  # forgotten with the round


# ----------------------------------------------------------------- hetero-rank
def test_hetero_rank_round_trip_by_hand() -> None:
    # Node 1 says (node config) it trains at rank 1, node 2 at rank 2; global rank 2.
    grid = FakeGrid({1: {"lora-rank": 1}, 2: {"lora-rank": 2}}, {"strategy": "hetero-rank"})
    glob = {A: f32([[1.0, 0.0], [0.0, 1.0]]), B: np.zeros((2, 2)), HEAD: f32([0.0, 0.0])}
    strategy = build_strategy("hetero-rank")
    sent = configure(strategy, record(glob), grid)
    assert grid.queries == 2
    shapes = {m.metadata.dst_node_id: sent_state(m)[A].shape for m in sent}
    assert shapes == {1: (1, 2), 2: (2, 2)}
    for msg in sent:  # the zero delta reaches everyone; no direction is dead
        state = sent_state(msg)
        assert not np.any(state[B]) and np.all(np.any(state[A] != 0, axis=1))

    # Deltas per unit alpha: (1/r) B A. Node 1: B A = diag(2, 0) at r=1;
    # node 2: B A = diag(0, 2) at r=2 -> diag(0, 1). Weights 1:1 -> D = diag(1, 0.5).
    c1 = {A: f32([[1.0, 0.0]]), B: f32([[2.0], [0.0]]), HEAD: f32([2.0, 0.0])}
    c2 = {A: f32([[0.0, 0.0], [0.0, 1.0]]), B: f32([[0.0, 0.0], [0.0, 2.0]]), HEAD: f32([0, 4])}
    arrays, metrics = strategy.aggregate_train(
        1, [reply_to(sent[0], c1, 5), reply_to(sent[1], c2, 5)]
    )
    assert arrays is not None and metrics is not None
    d = np.diag([1.0, 0.5])
    g = {k: v.numpy() for k, v in arrays.items()}
    np.testing.assert_allclose(g[B] @ g[A] / 2, d, atol=1e-6)  # global rank 2 holds D exactly
    np.testing.assert_allclose(g[HEAD], [1.0, 2.0])
    assert metrics[METRIC_TRUNCATION] < 1e-6

    # Next round: each node gets D at its own rank, from the exact D, also after
    # the strategy went through a checkpoint (pickle) and the arrays were reloaded.
    strategy = pickle.loads(dump_strategy(strategy))
    arrays = ArrayRecord({k: Array(v.numpy()) for k, v in arrays.items()})
    again = configure(strategy, arrays, grid, rnd=2)
    assert grid.queries == 2  # ranks are asked once
    by_node = {m.metadata.dst_node_id: sent_state(m) for m in again}
    s1, s2 = by_node[1], by_node[2]
    np.testing.assert_allclose(s1[B] @ s1[A] / 1, np.diag([1.0, 0.0]), atol=1e-6)  # best rank 1
    np.testing.assert_allclose(s2[B] @ s2[A] / 2, d, atol=1e-6)
    np.testing.assert_allclose(s1[HEAD], [1.0, 2.0])


def test_hetero_rank_simulation_ranks_go_round_robin_by_partition() -> None:
    nodes = {10 + pid: {"partition-id": pid, "num-partitions": 3} for pid in range(3)}
    grid = FakeGrid(nodes, {"strategy": "hetero-rank", "sim-client-ranks": "1,2"})
    glob = {A: f32([[1.0, 0.0], [0.0, 1.0]]), B: np.zeros((2, 2)), HEAD: f32([0.0, 0.0])}
    sent = configure(build_strategy("hetero-rank"), record(glob), grid)
    ranks = {m.metadata.dst_node_id: sent_state(m)[A].shape[0] for m in sent}
    assert ranks == {10: 1, 11: 2, 12: 1}


def test_hetero_query_reply_carries_the_rank_only_when_asked() -> None:
    asked = Message(
        content=RecordDict({CONFIG_KEY: ConfigRecord({"fedlora-lora-rank": 1})}),
        dst_node_id=3,
        message_type=MessageType.QUERY,
    )
    plain = Message(
        content=RecordDict({CONFIG_KEY: ConfigRecord({"fedlora-site": 1})}),
        dst_node_id=3,
        message_type=MessageType.QUERY,
    )
    context = Context(1, 3, {"lora-rank": 16}, RecordDict(), {"strategy": "hetero-rank"})
    assert query_handler(asked, context).content.config_records["lora-rank"]["lora-rank"] == 16
    assert "lora-rank" not in query_handler(plain, context).content.config_records


def test_hetero_rank_asks_again_a_node_that_did_not_reply() -> None:
    # Node 2's operator restarts it at another rank: its round-1 arrays no longer
    # load, it sends no good reply, and next time it is asked its rank again.
    grid = FakeGrid({1: {"lora-rank": 1}, 2: {"lora-rank": 2}}, {"strategy": "hetero-rank"})
    glob = {A: f32([[1.0, 0.0], [0.0, 1.0]]), B: np.zeros((2, 2)), HEAD: f32([0.0, 0.0])}
    strategy = build_strategy("hetero-rank")
    sent = configure(strategy, record(glob), grid)
    c1 = {A: f32([[1.0, 0.0]]), B: f32([[2.0], [0.0]]), HEAD: f32([2.0, 0.0])}
    arrays, _ = strategy.aggregate_train(1, [reply_to(sent[0], c1, 5)])
    assert arrays is not None
    grid.nodes[2]["lora-rank"] = 1
    again = configure(strategy, arrays, grid, rnd=2)
    assert grid.queries == 3  # node 1 is known; node 2 was asked again
    assert {m.metadata.dst_node_id: sent_state(m)[A].shape[0] for m in again} == {1: 1, 2: 1}


def test_the_protocol_mode_table_equals_what_each_strategy_declares() -> None:
    # Nodes read the mode from fedlora.protocol (they never import the
    # strategies); the table must say what each registered class declares.
    from fedlora.strategies.registry import STRATEGIES

    for name, factory in STRATEGIES.items():
        assert client_mode(name) == getattr(factory, "client_mode", "standard"), name
