"""A hostile or broken node's reply never crashes or steers the server (issue 17).

Unit checks of :mod:`fedlora.server.gate` on hand-built replies, then a real
Flower simulation in which one node rewrites its replies (a client mod, the
same place a compromised site's code would sit)."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedlora.config import RunConfig
from fedlora.privacy.releases import PLAIN_TRAIN_METRICS
from fedlora.server.gate import ReplyLimits, check_train_reply, gate_replies, npy_header
from fedlora.simulations.engine import Resources, simulate
from fedlora.simulations.tiny import tiny_run_config
from fedlora.strategies.hetero_rank import max_rank

GLOBAL = ArrayRecord(
    {
        "m.lora_A.weight": Array(np.zeros((4, 6), np.float32)),
        "m.lora_B.weight": Array(np.zeros((5, 4), np.float32)),
    }
)


def _limits(**kw: Any) -> ReplyLimits:
    cfg = RunConfig.from_flat({"max-reported-examples": 1000, **kw})
    return ReplyLimits.for_run(cfg, GLOBAL)


def _metrics(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {k: 1.0 for k in PLAIN_TRAIN_METRICS}
    base["num-examples"] = 10
    return {**base, **over}


def _reply(arrays: ArrayRecord | None = None, **metrics: Any) -> Message:
    content = RecordDict({"arrays": arrays or GLOBAL, "metrics": MetricRecord(_metrics(**metrics))})
    msg = Message(content=content, dst_node_id=3, message_type="train")
    return msg


def _npy_with_header(header: str, payload: bytes = b"") -> bytes:
    text = header.encode("latin1")
    text += b" " * (63 - len(text) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text + payload


def test_a_good_reply_passes(flower_task: Any) -> None:
    assert check_train_reply(_reply(), _limits()) is None


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        (math.nan, "not finite"),
        (1e12, "outside 1..1000"),
        (-5, "outside 1..1000"),
        (0, "outside 1..1000"),
        (2.5, "whole number"),
    ],
)
def test_bad_weights_are_rejected(flower_task: Any, value: float, needle: str) -> None:
    reason = check_train_reply(_reply(**{"num-examples": value}), _limits())
    assert reason is not None and needle in reason


def test_an_extra_or_missing_metric_key_is_rejected(flower_task: Any) -> None:
    assert "unexpected ['x']" in str(check_train_reply(_reply(x=1.0), _limits()))
    msg = _reply()
    del msg.content.metric_records["metrics"]["loss"]
    assert "missing ['loss']" in str(check_train_reply(msg, _limits()))


def test_a_header_declaring_a_huge_tensor_is_rejected_without_allocating(
    flower_task: Any,
) -> None:
    data = _npy_with_header("{'descr': '<f4', 'fortran_order': False, 'shape': (100000000000,), }")
    array = Array(np.zeros((4, 6), np.float32))
    array.data = data
    arrays = ArrayRecord({"m.lora_A.weight": array})
    reason = check_train_reply(_reply(arrays), _limits())
    assert reason is not None and "declares shape (100000000000,)" in reason


@pytest.mark.parametrize(
    "header",
    [
        "{'descr': '|O', 'fortran_order': False, 'shape': (2,), }",
        "{'descr': '<f4', 'fortran_order': False, 'shape': (-1,), }",
        "__import__('os')",
        "{'descr': '<f4', 'shape': (2,)}",
    ],
)
def test_malformed_npy_headers_raise_value_error(header: str) -> None:
    with pytest.raises(ValueError):
        npy_header(_npy_with_header(header, b"\x00" * 8))


def test_npy_header_agrees_with_numpy() -> None:
    buf = io.BytesIO()
    np.save(buf, np.zeros((3, 7), np.int8))
    shape, dtype, offset = npy_header(buf.getvalue())
    assert (shape, dtype) == ((3, 7), np.dtype(np.int8))
    assert len(buf.getvalue()) - offset == 21


def test_encoded_payloads_are_refused_when_compression_is_off(flower_task: Any) -> None:
    arrays = ArrayRecord({"m.lora_A.weight::raw": Array(np.zeros(24, np.float32))})
    reason = check_train_reply(_reply(arrays), _limits())
    assert reason is not None and "compression=none" in reason
    assert check_train_reply(_reply(arrays), _limits(compression="int8")) is None


def test_unknown_tensors_and_extra_records_are_refused(flower_task: Any) -> None:
    arrays = ArrayRecord({"base.weight": Array(np.zeros(3, np.float32))})
    assert "not part of the global adapter" in str(check_train_reply(_reply(arrays), _limits()))
    msg = _reply()
    msg.content["extra"] = ConfigRecord({"a": 1})
    assert "config records ['extra']" in str(check_train_reply(msg, _limits()))


def test_gate_names_the_node_and_keeps_the_rest(flower_task: Any) -> None:
    good, bad = _reply(), _reply(**{"num-examples": math.nan})
    kept, rejected = gate_replies([good, bad], _limits())
    assert kept == [good]
    assert len(rejected) == 1 and rejected[0].startswith("node ")


def test_local_dp_replies_must_not_carry_exact_loss(flower_task: Any) -> None:
    limits = _limits(**{"dp-mode": "local", "dp-noise-multiplier": 1.0})
    assert "unexpected" in str(check_train_reply(_reply(), limits))


def test_the_largest_hetero_rank_is_the_factor_bound() -> None:
    assert max_rank(GLOBAL) == 5  # A: (4, in=6), B: (out=5, 4) -> min(6, 5)


# ---------------------------------------------------------------- real runs
def _hostile(kind: str) -> Any:
    """A client mod that rewrites partition 0's train replies."""

    def mod(msg: Message, context: Context, call_next: Any) -> Message:
        reply = call_next(msg, context)
        if msg.metadata.message_type != "train" or reply.has_error():
            return reply
        if int(context.node_config.get("partition-id", -1)) != 0:
            return reply
        metrics = reply.content.metric_records["metrics"]
        if kind == "nan-weight":
            metrics["num-examples"] = math.nan
        elif kind == "huge-weight":
            metrics["num-examples"] = 10**12
        elif kind == "extra-metric":
            metrics["surprise"] = 1.0
        elif kind == "bomb":
            first = next(iter(reply.content.array_records["arrays"].values()))
            first.data = _npy_with_header(
                "{'descr': '<f4', 'fortran_order': False, 'shape': (1000000000000,), }"
            )
        return reply

    return mod


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.parametrize("kind", ["nan-weight", "huge-weight", "extra-metric", "bomb"])
def test_one_hostile_node_is_dropped_and_the_run_completes(
    tiny_model_dir: Path, text_csv: Path, tmp_path: Path, kind: str
) -> None:
    cfg = tiny_run_config(tiny_model_dir, text_csv, tmp_path, **{"num-server-rounds": 1})
    status = simulate(cfg, 3, Resources(num_cpus=1), client_mods=[_hostile(kind)])
    assert status["status"] == "completed", status
    rounds = json.loads((tmp_path / "metrics.json").read_text())["rounds"]
    last = rounds[-1]
    assert last["clients_ok"] == 2 and last["clients_failed"] == 1
    assert "partition-000000" in last["failures"][0]
    assert "reply rejected" in last["failures"][0]
    from safetensors.numpy import load_file

    exported = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert all(np.all(np.isfinite(v)) for v in exported.values())


def _stats(total: Any, count: Any) -> Message:
    from fedlora.protocol import KEY_FEATURE_COUNT, KEY_FEATURE_SUM, STATS_RECORD

    record = ArrayRecord({KEY_FEATURE_SUM: Array(total), KEY_FEATURE_COUNT: Array(count)})
    return Message(content=RecordDict({STATS_RECORD: record}), dst_node_id=3, message_type="query")


@pytest.mark.parametrize(
    ("total", "count", "needle"),
    [
        (np.zeros(8), np.ones(1), None),
        (np.full(8, np.nan), np.ones(1), "not finite"),
        (np.zeros((2, 4)), np.ones(1), "1-D float"),
        (np.zeros(8, np.int64), np.ones(1), "1-D float"),
        (np.zeros(8), np.array([np.inf]), "not finite"),
    ],
)
def test_feature_statistics_replies_are_checked(
    flower_task: Any, total: Any, count: Any, needle: str | None
) -> None:
    from fedlora.protocol import KEY_FEATURE_COUNT, KEY_FEATURE_SUM, STATS_RECORD
    from fedlora.server.gate import check_statistics_reply

    keys = frozenset({KEY_FEATURE_SUM, KEY_FEATURE_COUNT})
    reason = check_statistics_reply(_stats(total, count), STATS_RECORD, keys)
    assert (reason is None) if needle is None else (needle in str(reason))


# ------------------------------------------------- a node's free text and its name
HOSTILE_REASON = "\x1b[2J\x1b[H\x1b]0;owned\x07all sites OK\r\x00" + "A" * 1_000_000


def test_wire_text_drops_escapes_and_controls_and_caps_the_length() -> None:
    from fedlora.protocol import MAX_REASON_CHARS, wire_text

    assert wire_text("a\x1b[31mred\x1b[0m b\x07\x00\r") == "ared b"
    assert wire_text("line 1\n\tline 2") == "line 1\n\tline 2"  # kept: tracebacks read on
    assert wire_text("\x9b31mc1 csi") == "31mc1 csi"  # the 8-bit CSI is a control too
    tail = "\nDataError: the last line"
    capped = wire_text(HOSTILE_REASON + tail)
    assert capped.startswith("all sites OK")
    assert len(capped) < MAX_REASON_CHARS + 60
    dropped = len("all sites OK") + 1_000_000 + len(tail) - MAX_REASON_CHARS
    assert f" … ({dropped} characters dropped) … " in capped
    assert capped.endswith("AAAA\nDataError: the last line")  # a traceback's verdict stays
    assert wire_text(12) == "12"


def test_a_node_error_reason_reaches_the_failures_cleaned_and_capped(flower_task: Any) -> None:
    from flwr.app import Error

    from fedlora.server.exchange import SiteRegistry, split_replies

    request = Message(content=RecordDict(), dst_node_id=3, message_type="train")
    reply = Message(error=Error(code=4001, reason=HOSTILE_REASON), reply_to=request)
    sites = SiteRegistry()
    sites.claim({3: "site-c"})
    ok, failures = split_replies([reply], [3], sites, sent=[request])
    assert ok == [] and len(failures) == 1
    assert failures[0].startswith("site-c (node 3): all sites OK")
    assert "\x1b" not in failures[0] and "\x00" not in failures[0] and len(failures[0]) < 2100


@pytest.mark.parametrize(
    ("claims", "expected"),
    [
        ({1: "site-a", 2: "site-b"}, {1: "site-a", 2: "site-b"}),
        ({1: "\x1b[2Jsite-a"}, {1: "node-1"}),  # escapes: refused
        ({1: "../../etc"}, {1: "node-1"}),  # a path: refused
        ({1: "a" * 65}, {1: "node-1"}),  # too long
        ({1: 42}, {1: "node-1"}),  # not text
        ({1: "site-a", 2: "site-a"}, {1: "node-1", 2: "node-2"}),  # two claim one name
        ({1: "node-2", 2: "site-b"}, {1: "node-1", 2: "site-b"}),  # another node's name
        ({1: "node-1"}, {1: "node-1"}),  # its own fallback is fine
    ],
)
def test_site_key_claims_are_checked(claims: dict[int, object], expected: dict[int, str]) -> None:
    from fedlora.server.exchange import SiteRegistry

    sites = SiteRegistry()
    sites.claim(claims)
    assert sites.keys == expected


def test_a_name_already_held_cannot_be_taken_later() -> None:
    from fedlora.server.exchange import SiteRegistry

    sites = SiteRegistry()
    sites.claim({1: "site-a"})
    sites.claim({2: "site-a"})  # a node that joins later, claiming site-a
    assert sites.keys == {1: "site-a", 2: "node-2"}
    sites.claim({3: "site-a"}, connected=[1, 3])  # node 1 still connected: still held
    assert sites.keys[3] == "node-3"


def test_a_site_that_reconnects_under_a_new_id_gets_its_name_back() -> None:
    from fedlora.server.exchange import SiteRegistry

    sites = SiteRegistry()
    sites.claim({1: "site-a", 2: "site-b"}, connected=[1, 2])
    sites.claim({5: "site-a"}, connected=[2, 5])  # node 1 left; site-a came back as 5
    assert sites.key(5) == "site-a" and sites.key(2) == "site-b"


def _impostor(msg: Message, context: Context, call_next: Any) -> Message:
    """Partition 0 claims partition 1's name and answers training with a hostile
    error reason (escape sequences and a megabyte of text)."""
    from flwr.app import Error

    from fedlora.protocol import SITE_KEY

    reply = call_next(msg, context)
    if int(context.node_config.get("partition-id", -1)) != 0:
        return reply
    if msg.metadata.message_type == "query" and SITE_KEY in reply.content.config_records:
        reply.content.config_records[SITE_KEY][SITE_KEY] = "partition-000001"
        return reply
    if msg.metadata.message_type == "train":
        return Message(error=Error(code=4001, reason=HOSTILE_REASON), reply_to=msg)
    return reply


@pytest.mark.slow
@pytest.mark.integration
def test_a_node_forging_its_name_and_its_error_text_steers_nothing(
    tiny_model_dir: Path, text_csv: Path, tmp_path: Path
) -> None:
    import logging

    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append  # type: ignore[method-assign]
    server_log = logging.getLogger("fedlora.server")  # "fedlora" does not propagate
    server_log.addHandler(handler)
    cfg = tiny_run_config(tiny_model_dir, text_csv, tmp_path, **{"num-server-rounds": 1})
    try:
        status = simulate(cfg, 3, Resources(num_cpus=1), client_mods=[_impostor])
    finally:
        server_log.removeHandler(handler)
    assert status["status"] == "completed", status
    last = json.loads((tmp_path / "metrics.json").read_text())["rounds"][-1]
    assert last["clients_ok"] == 2 and last["clients_failed"] == 1
    (line,) = last["failures"]
    assert line.startswith("node-") and ": all sites OK" in line, line[:200]
    assert "\x1b" not in line and len(line) < 2100
    sites = {row["site"] for row in json.loads((tmp_path / "clients.json").read_text())}
    # neither the impostor nor the site it named holds "partition-000001"
    assert "partition-000001" not in sites and "partition-000002" in sites, sites
    logged = [r.getMessage() for r in records]
    assert any("claimed site key 'partition-000001'" in m for m in logged), logged
    assert any("all sites OK" in m for m in logged), logged  # the failure was logged...
    assert not any("\x1b" in m or len(m) > 5000 for m in logged)  # ...cleaned and capped


def test_a_node_refuses_a_site_name_the_server_would_refuse() -> None:
    from flwr.app import Context, RecordDict

    from fedlora.client.app import site_key
    from fedlora.errors import ConfigError

    def context(node_config: dict[str, Any]) -> Context:
        return Context(1, 7, node_config, RecordDict(), {})

    assert site_key(context({"site-name": "hospital-a"})) == "hospital-a"
    assert site_key(context({"partition-id": 3})) == "partition-000003"
    with pytest.raises(ConfigError, match=r"site-name='a\\nb' is not a site name"):
        site_key(context({"site-name": "a\nb"}))
