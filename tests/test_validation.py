"""Server-side update validation: hand-made states, one problem at a time."""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict

from fedlora.protocol import ARRAYS_KEY
from fedlora.server.validation import (
    check_update,
    expected_from_state,
    make_update_validator,
)
from fedlora.strategies.math.lora import state_norm

A = "base_model.model.encoder.layer.0.attention.self.query.lora_A.weight"
B = "base_model.model.encoder.layer.0.attention.self.query.lora_B.weight"


def _good() -> dict[str, np.ndarray]:
    return {
        A: np.full((2, 4), 0.5, np.float32),  # sum of squares 8 * 0.25 = 2
        B: np.zeros((4, 2), np.float32),
    }


EXPECTED = expected_from_state(_good())


def test_good_state_passes() -> None:
    assert check_update(_good(), EXPECTED, max_norm=10.0) is None


def test_norm_is_over_all_tensors_together() -> None:
    state = _good()
    state[B] = np.full((4, 2), 0.5, np.float32)  # another 2 -> total 4 -> norm 2
    assert state_norm(state) == pytest.approx(2.0)
    assert check_update(state, EXPECTED, max_norm=2.0) is None
    reason = check_update(state, EXPECTED, max_norm=1.99)
    assert reason is not None and "L2 norm of the update is 2" in reason and "1.99" in reason


def test_missing_and_extra_tensors_are_named() -> None:
    state = _good()
    del state[B]
    state["classifier.weight"] = np.zeros((3, 4), np.float32)
    reason = check_update(state, EXPECTED, max_norm=10.0)
    assert reason is not None
    assert "missing tensor(s)" in reason and B in reason
    assert "unexpected tensor(s)" in reason and "classifier.weight" in reason


def test_wrong_shape_is_named() -> None:
    state = _good()
    state[A] = np.zeros((4, 2), np.float32)  # transposed: same size, wrong shape
    assert check_update(state, EXPECTED, 10.0) == (
        f"tensor {A!r} has shape (4, 2), expected (2, 4)"
    )


def test_wrong_dtype_is_named() -> None:
    state = _good()
    state[B] = np.zeros((4, 2), np.float64)
    assert check_update(state, EXPECTED, 10.0) == (
        f"tensor {B!r} has dtype float64, expected float32"
    )


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_rejected(bad: float) -> None:
    state = _good()
    state[B][1, 1] = bad
    state[B][3, 0] = bad
    assert check_update(state, EXPECTED, math.inf) == (
        f"tensor {B!r} has 2 non-finite value(s) (NaN or inf)"
    )


def test_overflow_in_float32_does_not_hide_a_huge_norm() -> None:
    # 3e38 squared overflows float32; the norm is computed in float64.
    state = _good()
    state[A][0, 0] = 3e38
    reason = check_update(state, EXPECTED, max_norm=1e6)
    assert reason is not None and "3e+38" in reason


def test_bad_max_norm_is_refused() -> None:
    with pytest.raises(ValueError, match="max_norm"):
        check_update(_good(), EXPECTED, max_norm=0.0)
    with pytest.raises(ValueError, match="max_norm"):
        make_update_validator(EXPECTED, max_norm=float("nan"))


# ----------------------------------------------------------- the reply filter


def _reply(node_id: int, record: ArrayRecord | None, **other: ArrayRecord) -> Message:
    content = RecordDict({"metrics": MetricRecord({"num-examples": 4})})
    if record is not None:
        content[ARRAYS_KEY] = record
    for key, value in other.items():
        content[key] = value
    msg = Message(content=content, dst_node_id=1, message_type=MessageType.TRAIN)
    # A reply's sender is set by the runtime; stand in for it here.
    msg.metadata.__dict__["_src_node_id"] = node_id
    return msg


def _record(state: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in state.items()})


@pytest.mark.usefixtures("flower_task")
def test_validator_keeps_good_replies_and_names_each_rejected_node() -> None:
    nan_state = _good()
    nan_state[A][0, 0] = np.nan
    wrong_shape = _good()
    wrong_shape[B] = np.zeros((2, 2), np.float32)
    replies = [
        _reply(11, _record(_good())),
        _reply(12, _record(nan_state)),
        _reply(13, _record(wrong_shape)),
        _reply(14, _record(_good())),
        _reply(15, None),
    ]
    validate = make_update_validator(EXPECTED, max_norm=10.0)
    kept, rejected = validate(3, replies)
    assert [m.metadata.src_node_id for m in kept] == [11, 14]
    assert rejected == [
        f"node 12: update rejected: tensor {A!r} has 1 non-finite value(s) (NaN or inf)",
        f"node 13: update rejected: tensor {B!r} has shape (2, 2), expected (4, 2)",
        "node 15: update rejected: reply has no array record 'arrays' (found [])",
    ]


@pytest.mark.usefixtures("flower_task")
def test_validator_rejects_extra_records_and_undecodable_tensors() -> None:
    good = _record(_good())
    smuggled = _reply(21, good, activations=_record({"x": np.ones(3, np.float32)}))
    # Declared float32 (2, 4) but the bytes are cut short: decoding must fail.
    truncated = Array(dtype="float32", shape=(2, 4), stype="numpy.ndarray", data=b"\x93NUMPY")
    broken = _reply(22, ArrayRecord({A: truncated, B: Array(_good()[B])}))
    kept, rejected = make_update_validator(EXPECTED, 10.0)(1, [smuggled, broken])
    assert kept == []
    assert rejected[0] == (
        "node 21: update rejected: reply has extra array record(s) ['activations'] besides 'arrays'"
    )
    assert rejected[1].startswith(f"node 22: update rejected: tensor {A!r} cannot be decoded")


@pytest.mark.usefixtures("flower_task")
def test_declared_metadata_cannot_disguise_the_real_tensor() -> None:
    # The record says float32 (2, 4); the npy bytes hold float64 (2, 4).
    real = Array(np.zeros((2, 4), np.float64))
    disguised = Array(dtype="float32", shape=(2, 4), stype=real.stype, data=real.data)
    msg = _reply(31, ArrayRecord({A: disguised, B: Array(_good()[B])}))
    kept, rejected = make_update_validator(EXPECTED, 10.0)(1, [msg])
    assert kept == []
    assert rejected == [
        f"node 31: update rejected: tensor {A!r} has dtype float64, expected float32"
    ]


@pytest.mark.usefixtures("flower_task")
def test_a_decoder_turns_encoded_payloads_into_the_state_to_check() -> None:
    # Stand-in for SentArrays.state_of: the payload is a delta added to a base.
    base = _good()

    def decode(msg: Message) -> dict[str, np.ndarray]:
        record = msg.content.array_records[ARRAYS_KEY]
        if "bad" in record:
            raise ValueError("payload does not decode")
        return {k: base[k] + record[k].numpy() for k in base}

    small = _reply(41, _record({A: np.full((2, 4), 0.1, np.float32), B: base[B]}))
    huge = _reply(42, _record({A: np.full((2, 4), 1e3, np.float32), B: base[B]}))
    junk = _reply(43, _record({"bad": np.zeros(1, np.float32)}))
    kept, rejected = make_update_validator(EXPECTED, 10.0, decode=decode)(1, [small, huge, junk])
    assert [m.metadata.src_node_id for m in kept] == [41]
    assert rejected[0].startswith("node 42: update rejected: L2 norm of the update is 2830")
    assert rejected[1] == "node 43: update rejected: payload does not decode"
