"""Exact LoRA aggregation: the global delta is the mean of the client deltas."""

from __future__ import annotations

import numpy as np
import pytest

from fedlora.errors import ConfigError, UpdateRejected
from fedlora.strategies.math.exact import aggregate_exact

P = "base_model.model.layer.0.query"
A, B = f"{P}.lora_A.weight", f"{P}.lora_B.weight"
HEAD = "base_model.model.classifier.bias"


def f32(x: list) -> np.ndarray:
    return np.array(x, dtype=np.float32)


# Two rank-1 clients whose deltas point along different axes:
#   B1 A1 = [[1, 0], [0, 0]],  B2 A2 = [[0, 0], [0, 1]].
C1 = {A: f32([[1, 0]]), B: f32([[1], [0]]), HEAD: f32([1, 0])}
C2 = {A: f32([[0, 1]]), B: f32([[0], [1]]), HEAD: f32([0, 1])}


def test_naive_factor_averaging_is_not_the_mean_of_products() -> None:
    mean_product = (C1[B] @ C1[A] + C2[B] @ C2[A]) / 2  # diag(0.5, 0.5)
    naive = ((C1[B] + C2[B]) / 2) @ ((C1[A] + C2[A]) / 2)  # 0.25 everywhere
    np.testing.assert_array_equal(naive, np.full((2, 2), 0.25, np.float32))
    # ||diag(.5,.5) - .25 * ones||_F = sqrt(4 * 0.25**2) = 0.5, by hand.
    assert np.linalg.norm(mean_product - naive) == pytest.approx(0.5)


def test_exact_at_rank_equal_to_sum_of_client_ranks() -> None:
    agg = aggregate_exact([C1, C2], [1, 1], rank=2)
    delta = agg.state[B] @ agg.state[A]
    np.testing.assert_allclose(delta, np.diag([0.5, 0.5]), atol=1e-6)
    assert agg.truncation_error[P] < 1e-6
    np.testing.assert_array_equal(agg.state[HEAD], f32([0.5, 0.5]))
    assert agg.state[A].shape == (2, 2) and agg.state[B].shape == (2, 2)


def test_truncation_error_is_reported_when_rank_is_too_small() -> None:
    agg = aggregate_exact([C1, C2], [1, 1], rank=1, scaling=2.0)
    # Singular values of diag(.5, .5) are .5 and .5: rank 1 drops one of
    # them, and the error is in weight units, i.e. times the scaling 2.
    assert agg.truncation_error[P] == pytest.approx(1.0, abs=1e-6)
    assert agg.mean_delta_norm[P] == pytest.approx(np.sqrt(2.0), abs=1e-6)
    assert agg.relative_truncation_error == pytest.approx(1 / np.sqrt(2), abs=1e-6)
    assert agg.residual == {}


def test_residual_makes_the_update_exact_at_any_rank() -> None:
    agg = aggregate_exact([C1, C2], [1, 2], rank=1, scaling=2.0, residual=True)
    # Weights 1:2 -> mean product diag(1/3, 2/3), by hand.
    mean_delta = 2.0 * np.diag([1 / 3, 2 / 3])
    low_rank = 2.0 * agg.state[B] @ agg.state[A]
    np.testing.assert_allclose(low_rank + agg.residual[P], mean_delta, atol=1e-6)
    # Rank 1 keeps the larger direction (2/3) and drops 1/3 * scaling.
    np.testing.assert_allclose(agg.residual[P], np.diag([2 / 3, 0]), atol=1e-6)
    assert agg.truncation_error[P] == pytest.approx(2 / 3, abs=1e-6)


def test_fedex_mean_factors_with_residual() -> None:
    agg = aggregate_exact([C1, C2], [1, 1], rank=1, factors="mean", residual=True)
    np.testing.assert_array_equal(agg.state[A], f32([[0.5, 0.5]]))
    np.testing.assert_array_equal(agg.state[B], f32([[0.5], [0.5]]))
    expected = np.diag([0.5, 0.5]) - np.full((2, 2), 0.25)
    np.testing.assert_allclose(agg.residual[P], expected, atol=1e-7)
    assert agg.truncation_error[P] == pytest.approx(0.5)
    with pytest.raises(ConfigError, match="lora-rank=1"):
        aggregate_exact([C1, C2], [1, 1], rank=2, factors="mean")


def test_random_clients_are_exact_when_rank_suffices() -> None:
    rng = np.random.default_rng(7)
    states = [
        {
            A: rng.normal(size=(2, 9)).astype(np.float32),
            B: rng.normal(size=(8, 2)).astype(np.float32),
        }
        for _ in range(3)
    ]
    weights = [10, 20, 30]
    products = [s[B].astype(np.float64) @ s[A] for s in states]
    mean = np.average(products, axis=0, weights=weights)
    exact = aggregate_exact(states, weights, rank=6)  # 3 clients x rank 2
    np.testing.assert_allclose(exact.state[B] @ exact.state[A], mean, atol=1e-5)
    assert exact.truncation_error[P] < 1e-5

    truncated = aggregate_exact(states, weights, rank=3)
    s = np.linalg.svd(mean, compute_uv=False)
    assert truncated.truncation_error[P] == pytest.approx(np.sqrt(np.sum(s[3:] ** 2)), rel=1e-4)
    assert truncated.truncation_error[P] > 0.1


def test_clients_with_different_ranks_are_rejected() -> None:
    other = {A: np.zeros((2, 2), np.float32), B: np.zeros((2, 2), np.float32)}
    with pytest.raises(UpdateRejected, match=r"lora_A\.weight' with shape"):
        aggregate_exact([{A: C1[A], B: C1[B]}, other], [1, 1], rank=2)


@pytest.mark.parametrize("rank", [0, -1, 1.5, True])
def test_bad_rank_is_a_config_error(rank: object) -> None:
    with pytest.raises(ConfigError, match="lora-rank"):
        aggregate_exact([C1], [1], rank=rank)  # type: ignore[arg-type]
