"""Seeded sampling over stable site keys."""

from __future__ import annotations

from typing import Any

from fedlora.server.exchange import SiteRegistry, derive_seed, sample_nodes


def _sites(mapping: dict[int, str]) -> SiteRegistry:
    reg = SiteRegistry()
    reg.keys.update(mapping)
    return reg


def test_sampling_depends_on_sites_not_node_ids() -> None:
    # The same 10 sites behind different runtime node ids sample the same sites.
    run1 = _sites({100 + i: f"partition-{i:06d}" for i in range(10)})
    run2 = _sites({9000 - 7 * i: f"partition-{i:06d}" for i in range(10)})
    s1 = sample_nodes(run1.keys, run1, 0.3, 2, seed=5, server_round=3, purpose="train")
    s2 = sample_nodes(run2.keys, run2, 0.3, 2, seed=5, server_round=3, purpose="train")
    assert [run1.key(n) for n in s1] == [run2.key(n) for n in s2]
    assert len(s1) == 3


def test_sampling_changes_with_round_and_respects_minimum() -> None:
    reg = _sites({i: f"s{i:02d}" for i in range(20)})
    rounds = {tuple(sample_nodes(reg.keys, reg, 0.25, 1, 0, r, "train")) for r in range(1, 6)}
    assert len(rounds) > 1
    assert len(sample_nodes(reg.keys, reg, 0.01, 4, 0, 1, "train")) == 4


def test_derive_seed_is_stable_across_processes() -> None:
    # Pinned: Python's hash() would change per process; sha256 does not.
    assert derive_seed(42, 1, "train") == derive_seed(42, 1, "train")
    assert derive_seed(42, 1, "train") != derive_seed(42, 2, "train")
    assert derive_seed(0) == 3456079177858693020


class _Grid:
    """A grid of three nodes: node 2 refuses with the budget code, the others train."""

    def __init__(self) -> None:
        self.sent: dict[str, Any] = {}
        self.sampled: list[list[int]] = []

    def get_node_ids(self) -> list[int]:
        return [1, 2, 3]

    def send_and_receive(self, messages: Any, timeout: float) -> list[Any]:
        return []  # the site query: every node keeps its "node-<id>" key

    def push_messages(self, messages: list[Any]) -> list[str]:
        ids = []
        for msg in messages:
            mid = f"m{len(self.sent)}"
            msg.metadata.__dict__["_message_id"] = mid
            self.sent[mid] = msg
            ids.append(mid)
        self.sampled.append(sorted(m.metadata.dst_node_id for m in messages))
        return ids

    def pull_messages(self, ids: list[str]) -> list[Any]:
        from flwr.app import Error, Message, MetricRecord, RecordDict

        from fedlora.privacy.releases import PLAIN_TRAIN_METRICS
        from fedlora.protocol import ARRAYS_KEY, ERROR_CODE_BUDGET, METRICS_KEY

        replies = []
        for mid in ids:
            sent = self.sent.pop(mid, None)
            if sent is None:
                continue
            if sent.metadata.dst_node_id == 2:
                error = Error(code=ERROR_CODE_BUDGET, reason="privacy budget exhausted")
                replies.append(Message(error=error, reply_to=sent))
                continue
            metrics = {k: 1.0 for k in PLAIN_TRAIN_METRICS}
            content = RecordDict(
                {
                    ARRAYS_KEY: sent.content.array_records[ARRAYS_KEY],
                    METRICS_KEY: MetricRecord({**metrics, "num-examples": 10}),
                }
            )
            replies.append(Message(content=content, reply_to=sent))
        return replies


class _Strategy:
    """Sends the arrays to every node it is shown; the aggregate is the arrays."""

    def configure_train(self, rnd: int, arrays: Any, config: Any, grid: Any) -> list[Any]:
        from flwr.app import Message, MessageType, RecordDict

        from fedlora.protocol import ARRAYS_KEY, CONFIG_KEY

        content = RecordDict({ARRAYS_KEY: arrays, CONFIG_KEY: config})
        return [
            Message(content=content, dst_node_id=n, message_type=MessageType.TRAIN)
            for n in grid.get_node_ids()
        ]

    def aggregate_train(self, rnd: int, replies: list[Any]) -> tuple[Any, Any]:
        from fedlora.protocol import ARRAYS_KEY

        return replies[0].content.array_records[ARRAYS_KEY], None


def test_a_site_whose_budget_is_spent_is_not_sampled_again(flower_task: Any) -> None:
    # Round 1 samples all three sites; node 2 answers "budget exhausted"
    # (ERROR_CODE_BUDGET), so round 2 samples only nodes 1 and 3, and both
    # rounds' outcomes name the exhausted site.
    import numpy as np
    from flwr.app import Array, ArrayRecord

    from fedlora.config import RunConfig
    from fedlora.server.loop import StrategyStep, run_rounds

    cfg = RunConfig.from_flat({"num-server-rounds": 2, "min-train-nodes": 2, "round-timeout": 5.0})
    arrays = ArrayRecord({"w": Array(np.zeros(3, np.float32))})
    grid = _Grid()
    outcomes: list[Any] = []
    step = StrategyStep(_Strategy(), grid, cfg, arrays)  # type: ignore[arg-type]
    run_rounds(step, grid, cfg, arrays, None, outcomes.append)  # type: ignore[arg-type]
    assert grid.sampled == [[1, 2, 3], [1, 3]]
    assert [o.sampled for o in outcomes] == [3, 2]
    assert [o.exhausted for o in outcomes] == [["node-2"], ["node-2"]]
    assert "privacy budget exhausted" in outcomes[0].failures[0]
