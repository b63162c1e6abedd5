"""Heterogeneous ranks: mean of scaled deltas, then each site's own rank."""

from __future__ import annotations

import numpy as np
import pytest

from fedlora.errors import ConfigError, UpdateRejected
from fedlora.strategies.math.hetero import aggregate_hetero, factorise_for_rank, split_for_rank
from fedlora.strategies.math.lora import lora_scaling

P = "base_model.model.layer.0.query"
A, B = f"{P}.lora_A.weight", f"{P}.lora_B.weight"
HEAD = "base_model.model.classifier.bias"
OUT, IN, ALPHA = 24, 20, 16.0


def f32(x: list) -> np.ndarray:
    return np.array(x, dtype=np.float32)


def _client(rng: np.random.Generator, rank: int) -> dict[str, np.ndarray]:
    return {
        A: rng.normal(size=(rank, IN)).astype(np.float32),
        B: rng.normal(size=(OUT, rank)).astype(np.float32),
        HEAD: rng.normal(size=OUT).astype(np.float32),
    }


def test_scaled_products_by_hand() -> None:
    # Rank 1 (scaling 2/1 = 2) and rank 2 (scaling 2/2 = 1), weights 1:2.
    c1 = {A: f32([[1, 0]]), B: f32([[1], [1]]), HEAD: f32([3])}
    c2 = {A: f32([[0, 1], [1, 0]]), B: f32([[1, 0], [0, 1]]), HEAD: f32([0])}
    products, dense, ranks = aggregate_hetero([c1, c2], [1, 2], alpha=2.0)
    # c1 delta: 2 * [[1,0],[1,0]]; c2 delta: [[0,1],[1,0]].
    # (c1 + 2 c2) / 3 = [[2, 2], [4, 0]] / 3, worked out by hand.
    np.testing.assert_allclose(products[P], f32([[2, 2], [4, 0]]) / 3, atol=1e-7)
    np.testing.assert_array_equal(dense[HEAD], f32([1]))
    assert ranks == {P: (1, 2)}


def test_ranks_4_and_16_each_get_their_own_rank() -> None:
    rng = np.random.default_rng(3)
    clients = [_client(rng, 4), _client(rng, 16)]
    weights = [100, 300]
    products, dense, _ = aggregate_hetero(clients, weights, alpha=ALPHA)

    expected = sum(
        w * lora_scaling(ALPHA, c[A].shape[0]) * (c[B].astype(np.float64) @ c[A])
        for c, w in zip(clients, weights, strict=True)
    ) / sum(weights)
    np.testing.assert_allclose(products[P], expected, rtol=1e-5, atol=1e-5)

    errors = {}
    for rank in (4, 16):
        scaling = lora_scaling(ALPHA, rank)
        site = split_for_rank(products, dense, rank, scaling)
        assert site[A].shape == (rank, IN) and site[B].shape == (OUT, rank)
        assert site[A].dtype == np.float32
        np.testing.assert_array_equal(site[HEAD], dense[HEAD])
        errors[rank] = np.linalg.norm(scaling * site[B] @ site[A] - expected)
        assert errors[rank] == pytest.approx(
            factorise_for_rank(products[P], rank).dropped_norm, rel=1e-3
        )
    # Ranks 4 + 16 = 20 = min(out, in): neither site holds all of it, and
    # the smaller site loses more.
    assert errors[4] > errors[16] > 0


def test_full_rank_reconstructs_the_mean_delta() -> None:
    rng = np.random.default_rng(4)
    clients = [_client(rng, 4), _client(rng, 16)]
    products, dense, _ = aggregate_hetero(clients, [1, 1], alpha=ALPHA)
    rank = 20  # >= sum of client ranks
    scaling = lora_scaling(ALPHA, rank)
    site = split_for_rank(products, dense, rank, scaling)
    delta = scaling * site[B].astype(np.float64) @ site[A]
    np.testing.assert_allclose(delta, products[P], atol=1e-5)
    assert factorise_for_rank(products[P], rank).dropped_norm < 1e-5


def test_mismatched_module_shapes_are_rejected() -> None:
    rng = np.random.default_rng(5)
    other = _client(rng, 4)
    other[A] = rng.normal(size=(4, IN + 1)).astype(np.float32)
    with pytest.raises(UpdateRejected, match=f"'{P}' with shape"):
        aggregate_hetero([_client(rng, 4), other], [1, 1])


def test_bad_rank_or_scaling_is_a_config_error() -> None:
    products = {P: np.eye(3, dtype=np.float32)}
    with pytest.raises(ConfigError, match="lora-rank"):
        split_for_rank(products, {}, 0, 1.0)
    with pytest.raises(ConfigError, match="scaling"):
        split_for_rank(products, {}, 2, 0.0)
    with pytest.raises(ConfigError, match="lora-alpha"):
        aggregate_hetero([], [], alpha=-1.0)
