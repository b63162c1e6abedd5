"""Compressed uploads, client -> server: the server decodes exactly what was encoded."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedlora.client.upload import FEEDBACK_STATE_KEY, build_upload
from fedlora.compression import CompressionScheme, decode, encode
from fedlora.errors import ConfigError
from fedlora.protocol import ARRAYS_KEY, METRIC_NUM_EXAMPLES
from fedlora.records import payload_bytes
from fedlora.settings import TrainSettings
from fedlora.strategies.compressed import CompressedUpdates, record_state
from fedlora.strategies.registry import build_strategy

pytestmark = pytest.mark.usefixtures("flower_task")

A = "base_model.model.enc.query.lora_A.weight"
B = "base_model.model.enc.query.lora_B.weight"
HEAD = "base_model.model.classifier.weight"


class Grid:
    def __init__(self, nodes: list[int]):
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)


def _states(dim: int = 96) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    received = {
        A: rng.normal(size=(4, dim)).astype(np.float32),
        B: rng.normal(size=(dim, 4)).astype(np.float32) * 0.1,
        HEAD: rng.normal(size=(3, dim)).astype(np.float32),
    }
    trained = {
        k: v + 0.01 * rng.normal(size=v.shape).astype(np.float32) for k, v in received.items()
    }
    return received, trained


def _round(strategy, received, uploads_of, rnd=1):  # type: ignore[no-untyped-def]
    """Send ``received`` to two nodes; each replies with uploads_of(server_config)."""
    record = ArrayRecord({k: Array(v) for k, v in received.items()})
    sent = list(strategy.configure_train(rnd, record, ConfigRecord(), Grid([1, 2])))
    replies = []
    for msg in sent:
        upload = uploads_of(msg.content.config_records["config"])
        metrics = MetricRecord({METRIC_NUM_EXAMPLES: 10, "bytes-sent": payload_bytes(upload)})
        content = RecordDict({ARRAYS_KEY: upload, "metrics": metrics})
        replies.append(Message(content=content, reply_to=msg))
    return strategy.aggregate_train(rnd, replies)


@pytest.mark.parametrize("kind", ["int8", "int4", "topk"])
@pytest.mark.parametrize("strategy_name", ["fedavg", "fedmedian", "lora-exact"])
def test_server_decodes_what_the_client_encoded(kind: str, strategy_name: str) -> None:
    received, trained = _states()
    settings = TrainSettings(compression=kind, compression_block_size=32, topk_fraction=0.1)
    strategy = build_strategy(strategy_name, compression=kind)
    arrays, _ = _round(
        strategy,
        received,
        lambda config: build_upload(trained, received, settings, config, RecordDict()),
    )
    assert arrays is not None
    # Both nodes sent the same update, so any mean/median of them is it:
    # received + decode(encode(delta)).
    delta = {k: trained[k] - received[k] for k in trained}
    scheme = CompressionScheme(kind, block_size=32, topk_fraction=0.1)  # type: ignore[arg-type]
    expected = {k: received[k] + v for k, v in decode(encode(delta, scheme)).items()}
    if strategy_name == "lora-exact":  # compares the product, re-factorised
        np.testing.assert_allclose(
            arrays[B].numpy() @ arrays[A].numpy(), expected[B] @ expected[A], atol=1e-5
        )
        np.testing.assert_allclose(arrays[HEAD].numpy(), expected[HEAD], atol=1e-6)
    else:
        for key in expected:
            np.testing.assert_allclose(arrays[key].numpy(), expected[key], atol=1e-6)
    if kind != "topk":  # quantisation error is bounded by max|delta| / levels per element
        levels = 127 if kind == "int8" else 7
        for key in (HEAD, B):
            bound = np.abs(delta[key]).max() / (2 * levels) + 1e-6
            assert np.abs(expected[key] - trained[key]).max() <= bound


def test_compressed_upload_is_smaller_and_bytes_sent_counts_it() -> None:
    # MiniLM-wide tensors: each encoded field also carries a ~128-byte header.
    received, trained = _states(dim=384)
    plain = build_upload(trained, received, TrainSettings(), ConfigRecord(), RecordDict())
    config = ConfigRecord({"decodes-compressed": True})
    int8 = build_upload(trained, received, TrainSettings(compression="int8"), config, RecordDict())
    int4 = build_upload(trained, received, TrainSettings(compression="int4"), config, RecordDict())
    raw = sum(v.nbytes for v in trained.values())
    assert payload_bytes(plain) >= raw
    assert payload_bytes(int8) < 0.4 * payload_bytes(plain)  # 1 byte + scales + headers
    assert payload_bytes(int4) < payload_bytes(int8)


def test_topk_error_feedback_lives_in_the_node_state_across_rounds() -> None:
    received, trained = _states()
    settings = TrainSettings(compression="topk", topk_fraction=0.05)
    config = ConfigRecord({"decodes-compressed": True})
    node_state = RecordDict()
    first = build_upload(trained, received, settings, config, node_state)
    assert FEEDBACK_STATE_KEY in node_state.array_records
    residual = {k: a.numpy() for k, a in node_state.array_records[FEEDBACK_STATE_KEY].items()}
    delta = {k: trained[k] - received[k] for k in trained}
    sent = decode(record_state(first))
    for key in delta:  # what was not sent is carried, exactly
        np.testing.assert_allclose(sent[key] + residual[key], delta[key], atol=1e-7)
    # next round with no new change: the carried residual itself is sent
    second = build_upload(received, received, settings, config, node_state)
    sent2 = decode(record_state(second))
    assert any(np.any(sent2[k] != 0) for k in sent2)
    # a fresh node state would have sent nothing at all
    fresh = decode(record_state(build_upload(received, received, settings, config, RecordDict())))
    assert not any(np.any(fresh[k] != 0) for k in fresh)


def test_client_refuses_to_compress_for_a_server_that_cannot_decode() -> None:
    received, trained = _states()
    with pytest.raises(ConfigError, match="does not decode compressed updates"):
        build_upload(
            trained, received, TrainSettings(compression="int8"), ConfigRecord(), RecordDict()
        )


def test_build_strategy_wraps_flower_strategies_only_when_compressing() -> None:
    assert type(build_strategy("fedavg")).__name__ == "FedAvg"  # central DP needs plain FedAvg
    assert isinstance(build_strategy("krum", compression="int8"), CompressedUpdates)
    assert type(build_strategy("lora-exact", compression="int8")).__name__ == "LoraExact"
    with pytest.raises(ConfigError, match="'compression' has value 'zip'"):
        build_strategy("fedavg", compression="zip")
