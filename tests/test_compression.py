"""Wire compression: stated error bounds, round trips, and error feedback."""

from __future__ import annotations

import numpy as np
import pytest

from fedlora.compression import (
    CompressionScheme,
    ErrorFeedback,
    decode,
    encode,
    payload_bytes,
)
from fedlora.errors import ConfigError, UpdateRejected

A = "base_model.model.layer.0.query.lora_A.weight"
BIAS = "base_model.model.classifier.bias"


def f32(x: list) -> np.ndarray:
    return np.array(x, dtype=np.float32)


def _state(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(37, 50)).astype(np.float32)
    a[3, 7] = 40.0  # an outlier: coarsens one block, or the whole tensor
    return {A: a, BIAS: rng.normal(size=13).astype(np.float32)}


def _block_absmax(x: np.ndarray, block: int) -> np.ndarray:
    flat = np.abs(x.reshape(-1).astype(np.float64))
    padded = np.zeros(-(-flat.size // block) * block)
    padded[: flat.size] = flat
    per_block = padded.reshape(-1, block).max(axis=1)
    return np.repeat(per_block, block)[: flat.size].reshape(x.shape)


@pytest.mark.parametrize(
    ("kind", "levels", "block"),
    [("int8", 127, 64), ("int8", 127, None), ("int4", 7, 64), ("int4", 7, 5)],
)
def test_quantisation_error_within_stated_bound(kind: str, levels: int, block: int | None) -> None:
    state = _state()
    out = decode(encode(state, CompressionScheme(kind, block_size=block)))  # type: ignore[arg-type]
    for key, x in state.items():
        size = x.size if block is None else block
        # |x - x_hat| <= scale / 2 = max|block| / (2 * levels); 1e-6 relative
        # slack for the float32 rounding of scale and of q * scale.
        bound = _block_absmax(x, size) / (2 * levels) * (1 + 1e-6) + 1e-12
        assert np.all(np.abs(out[key].astype(np.float64) - x) <= bound), key


def test_blocks_confine_an_outlier() -> None:
    state = _state()
    err = {
        block: np.abs(decode(encode(state, CompressionScheme("int8", block)))[A] - state[A])
        for block in (64, None)
    }
    assert err[64].mean() < err[None].mean() / 5


def test_int8_by_hand() -> None:
    x = {"w": np.array([1.0, -0.5, 0.25, 0.0], np.float32)}
    enc = encode(x, CompressionScheme("int8", block_size=None))
    # scale = 1 / 127; q = rint([127, -63.5, 31.75, 0]) (half to even).
    np.testing.assert_array_equal(enc["w::q"], np.array([127, -64, 32, 0], np.int8))
    np.testing.assert_array_equal(enc["w::scale"], f32([1 / 127]))
    np.testing.assert_allclose(decode(enc)["w"], f32([1, -64 / 127, 32 / 127, 0]), rtol=1e-6)


@pytest.mark.parametrize("kind", ["int8", "int4", "topk", "none"])
def test_decode_keeps_names_shapes_and_float32(kind: str) -> None:
    state = {
        **_state(),
        "scalar": np.array(2.5, np.float32),
        "odd": np.ones((3, 3), np.float32),
        "empty": np.zeros((0, 4), np.float32),
    }
    out = decode(encode(state, CompressionScheme(kind)))  # type: ignore[arg-type]
    assert list(out) == list(state)
    for key, x in state.items():
        assert out[key].shape == x.shape and out[key].dtype == np.float32, key
    if kind == "none":
        for key, x in state.items():
            np.testing.assert_array_equal(out[key], x)


def test_payload_sizes() -> None:
    x = {"w": np.ones(1000, np.float32)}
    header = 8 + 8  # shape (1 dim, int64) + block (int64)
    assert payload_bytes(encode(x, CompressionScheme("none"))) == 4000 + header
    int8 = CompressionScheme("int8", block_size=None)
    assert payload_bytes(encode(x, int8)) == 1000 + 4 + header
    int4 = CompressionScheme("int4", block_size=100)
    assert payload_bytes(encode(x, int4)) == 500 + 10 * 4 + header
    topk = CompressionScheme("topk", topk_fraction=0.01)
    assert payload_bytes(encode(x, topk)) == 10 * (4 + 4) + header


def test_topk_keeps_the_largest_entries_exactly() -> None:
    x = {"w": np.array([0.1, -5.0, 0.2, 3.0, -0.3, 0.0], np.float32)}
    enc = encode(x, CompressionScheme("topk", topk_fraction=0.3))  # k = ceil(1.8)
    np.testing.assert_array_equal(enc["w::idx"], [1, 3])
    np.testing.assert_array_equal(decode(enc)["w"], f32([0, -5, 0, 3, 0, 0]))


def test_error_feedback_sum_of_sent_tracks_sum_of_inputs() -> None:
    rng = np.random.default_rng(11)
    d, rounds, fraction = 200, 300, 0.05
    scheme = CompressionScheme("topk", topk_fraction=fraction)
    feedback = ErrorFeedback(scheme)
    mean_direction = rng.normal(size=d)
    sum_in, sum_fed, sum_plain = np.zeros(d), np.zeros(d), np.zeros(d)
    max_input, max_residual = 0.0, 0.0
    for _ in range(rounds):
        x = (mean_direction + rng.normal(size=d)).astype(np.float32)
        sum_in += x
        sum_fed += decode(feedback.compress({"x": x}))["x"]
        sum_plain += decode(encode({"x": x}, scheme))["x"]
        max_input = max(max_input, float(np.linalg.norm(x)))
        max_residual = max(max_residual, float(np.linalg.norm(feedback.residual["x"])))
    # What was not sent is exactly what is still held back.
    np.testing.assert_allclose(sum_in - sum_fed, feedback.residual["x"], atol=1e-3)
    # Top-k keeps at least a share delta = k/d of ||x + e||^2, so
    # ||e|| <= sqrt(1 - delta) / (1 - sqrt(1 - delta)) * max ||x||.
    q = np.sqrt(1 - fraction)
    assert max_residual <= q / (1 - q) * max_input
    relative = np.linalg.norm(sum_in - sum_fed) / np.linalg.norm(sum_in)
    assert relative < 0.05
    # Without feedback the dropped mass piles up round after round.
    assert np.linalg.norm(sum_in - sum_plain) / np.linalg.norm(sum_in) > 0.5


def test_error_feedback_state_round_trip_and_shape_change() -> None:
    feedback = ErrorFeedback(CompressionScheme("topk", topk_fraction=0.5))
    feedback.compress({"x": f32([1.0, 2.0, 3.0, 4.0])})
    np.testing.assert_array_equal(feedback.residual["x"], f32([1, 2, 0, 0]))
    restored = ErrorFeedback(feedback.scheme)
    restored.load_state_dict(feedback.state_dict())
    assert restored.residual.keys() == {"x"}
    with pytest.raises(ConfigError, match="call reset"):
        restored.compress({"x": np.zeros(3, np.float32)})
    with pytest.raises(ConfigError, match="non-finite"):
        restored.load_state_dict({"x": f32([np.nan])})


def test_decode_rejects_malformed_payloads() -> None:
    good = encode({"w": np.arange(6, dtype=np.float32)}, CompressionScheme("topk", 64, 0.5))
    bad_idx = {**good, "w::idx": np.array([0, 1, 99], np.int32)}
    with pytest.raises(UpdateRejected, match="idx out of range"):
        decode(bad_idx)
    missing = {k: v for k, v in good.items() if k != "w::val"}
    with pytest.raises(UpdateRejected, match="match no scheme"):
        decode(missing)
    q = encode({"w": np.ones(4, np.float32)}, CompressionScheme("int8"))
    with pytest.raises(UpdateRejected, match="q out of range"):
        decode({**q, "w::q": np.array([-128, 0, 0, 0], np.int8)})
    with pytest.raises(UpdateRejected, match="not '<key>::<field>'"):
        decode({"w": np.ones(1)})


def test_encode_rejects_nan_and_scheme_rejects_bad_options() -> None:
    with pytest.raises(UpdateRejected, match="non-finite"):
        encode({"w": f32([np.inf])}, CompressionScheme())
    with pytest.raises(ConfigError, match="block_size"):
        CompressionScheme("int8", block_size=0)
    with pytest.raises(ConfigError, match="topk_fraction"):
        CompressionScheme("topk", topk_fraction=0.0)
    with pytest.raises(ConfigError, match="not known"):
        CompressionScheme("fp8")  # type: ignore[arg-type]


def test_payload_survives_a_flower_array_record() -> None:
    app = pytest.importorskip("flwr.app")
    state = _state()
    encoded = encode(state, CompressionScheme("int4"))
    record = app.ArrayRecord({k: app.Array(v) for k, v in encoded.items()})
    received = {k: v.numpy() for k, v in record.items()}
    out = decode(received)
    np.testing.assert_array_equal(out[A], decode(encoded)[A])
    assert out[BIAS].shape == state[BIAS].shape
