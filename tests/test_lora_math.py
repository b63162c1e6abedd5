"""Weighted means, factor pairing and truncated SVD, against hand-worked numbers."""

from __future__ import annotations

import numpy as np
import pytest

from fedlora.errors import UpdateRejected
from fedlora.strategies.math.lora import (
    RunningMean,
    dense_keys,
    factorise,
    lora_pairs,
    lora_scaling,
    weighted_mean,
)

P = "base_model.model.layer.0.query"
A, B = f"{P}.lora_A.weight", f"{P}.lora_B.weight"
HEAD = "base_model.model.classifier.weight"


def f32(x: list) -> np.ndarray:
    return np.array(x, dtype=np.float32)


def test_weighted_mean_one_to_two_by_hand() -> None:
    a = {"w": f32([[1, 2], [3, 4]]), "b": f32([0, 3])}
    b = {"w": f32([[4, 5], [6, 7]]), "b": f32([3, 0])}
    mean = weighted_mean([a, b], [1, 2])
    # (a + 2 b) / 3, worked out by hand.
    np.testing.assert_array_equal(mean["w"], f32([[3, 4], [5, 6]]))
    np.testing.assert_array_equal(mean["b"], f32([2, 1]))
    assert mean["w"].dtype == np.float32


def test_running_mean_streams_a_generator_and_matches_batch() -> None:
    rng = np.random.default_rng(0)
    states = [{"x": rng.normal(size=(3, 4)).astype(np.float32)} for _ in range(5)]
    weights = [3, 1, 4, 1, 5]
    streamed = weighted_mean((s for s in states), weights)
    expected = sum(w * s["x"].astype(np.float64) for s, w in zip(states, weights, strict=True))
    np.testing.assert_allclose(streamed["x"], expected / sum(weights), rtol=1e-6)

    running = RunningMean()
    for s, w in zip(states, weights, strict=True):
        running.add(s, w)
    assert running.count == 5 and running.total_weight == 14.0
    np.testing.assert_array_equal(running.result()["x"], streamed["x"])


def test_mismatched_keys_are_rejected_by_name() -> None:
    mean = RunningMean()
    mean.add({"x": f32([1]), "y": f32([1])}, 1)
    with pytest.raises(UpdateRejected, match=r"node 7.*missing keys \['y'\]"):
        mean.add({"x": f32([1])}, 1, source="node 7")
    with pytest.raises(UpdateRejected, match=r"'y' with shape \(2,\)"):
        mean.add({"x": f32([1]), "y": f32([1, 2])}, 1)


def test_rejected_update_leaves_the_mean_unchanged() -> None:
    mean = RunningMean()
    mean.add({"x": f32([2.0]), "y": f32([4.0])}, 1)
    with pytest.raises(UpdateRejected, match="non-finite values in 'y'"):
        mean.add({"x": f32([100.0]), "y": f32([np.nan])}, 1)
    for bad in (0, -1, float("nan"), float("inf")):
        with pytest.raises(UpdateRejected, match="weight"):
            mean.add({"x": f32([100.0]), "y": f32([1.0])}, bad)
    assert mean.count == 1
    assert mean.result() == {"x": f32([2.0]), "y": f32([4.0])}


def test_empty_and_length_mismatch_are_errors() -> None:
    with pytest.raises(ValueError, match="nothing to average"):
        RunningMean().result()
    with pytest.raises(ValueError, match="2 updates but 3 weights"):
        weighted_mean([{"x": f32([1])}, {"x": f32([1])}], [1, 1, 1])
    with pytest.raises(ValueError, match="more updates than weights"):
        weighted_mean([{"x": f32([1])}, {"x": f32([1])}], [1])


def test_lora_pairs_and_dense_keys() -> None:
    state = {
        A: np.zeros((2, 5), np.float32),
        B: np.zeros((3, 2), np.float32),
        HEAD: np.zeros((4, 3), np.float32),
    }
    assert lora_pairs(state) == {P: (A, B)}
    assert dense_keys(state) == [HEAD]


def test_lora_pairs_rejects_a_lone_factor_and_rank_mismatch() -> None:
    with pytest.raises(UpdateRejected, match="lora_A factor but no lora_B"):
        lora_pairs({A: np.zeros((2, 5), np.float32)})
    with pytest.raises(UpdateRejected, match="disagree on the rank"):
        lora_pairs({A: np.zeros((2, 5), np.float32), B: np.zeros((3, 4), np.float32)})


def test_factorise_drops_the_smallest_singular_value() -> None:
    m = np.diag([9.0, 4.0, 1.0])
    b, a, dropped = factorise(m, 2)
    assert b.shape == (3, 2) and a.shape == (2, 3)
    np.testing.assert_allclose(b @ a, np.diag([9.0, 4.0, 0.0]), atol=1e-6)
    assert dropped == pytest.approx(1.0)
    # sqrt(S) split symmetrically: B and A carry the same scale.
    np.testing.assert_allclose(np.abs(b[:2, :2]), np.diag([3.0, 2.0]), atol=1e-6)
    np.testing.assert_allclose(np.abs(a[:2, :2]), np.diag([3.0, 2.0]), atol=1e-6)


def test_factorise_pads_ranks_beyond_the_matrix() -> None:
    m = np.arange(6, dtype=np.float64).reshape(2, 3)
    b, a, dropped = factorise(m, 5)
    assert b.shape == (2, 5) and a.shape == (5, 3)
    np.testing.assert_allclose(b @ a, m, atol=1e-5)
    assert dropped == 0.0


def test_lora_scaling_matches_peft() -> None:
    assert lora_scaling(16, 8) == 2.0
    assert lora_scaling(16, 4, rslora=True) == 8.0
