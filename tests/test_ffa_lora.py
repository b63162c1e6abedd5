"""FFA-LoRA: a seeded, frozen A shared bit-for-bit; only B is averaged."""

from __future__ import annotations

import numpy as np
import pytest

from fedlora.errors import UpdateRejected
from fedlora.strategies.math.ffa import (
    aggregate_ffa,
    ffa_init_A,
    ffa_init_state,
    ffa_trainable_keys,
)

P = "base_model.model.layer.0.query"
A, B = f"{P}.lora_A.weight", f"{P}.lora_B.weight"
HEAD = "base_model.model.classifier.weight"
SEED = 42


def f32(x: list) -> np.ndarray:
    return np.array(x, dtype=np.float32)


def test_init_is_pinned_so_every_machine_agrees() -> None:
    # Golden bits: if these change, clients on different versions would
    # silently train against different A. Derived via SHA-256 + PCG64 raw.
    a = ffa_init_A((2, 3), SEED, "m.q")
    assert a.dtype == np.float32 and a.shape == (2, 3)
    assert a.tobytes().hex() == "bd7f69bdd1768c3e410230bec9e90c3f04ae3c3d569513bf"


def test_init_depends_on_seed_and_prefix_and_follows_peft_bound() -> None:
    a = ffa_init_A((8, 100), SEED, P)
    assert a.tobytes() == ffa_init_A((8, 100), SEED, P).tobytes()
    assert not np.array_equal(a, ffa_init_A((8, 100), SEED + 1, P))
    assert not np.array_equal(a, ffa_init_A((8, 100), SEED, P + "x"))
    # PEFT's kaiming_uniform_(a=sqrt(5)) bound is 1 / sqrt(in_features).
    assert np.abs(a).max() <= 0.1
    assert np.abs(a).max() > 0.09  # 800 draws do reach near the bound


def test_trainable_keys_are_b_and_dense() -> None:
    assert ffa_trainable_keys([A, B, HEAD]) == [B, HEAD]


def test_init_state_replaces_only_a() -> None:
    state = {A: np.ones((2, 3), np.float32), B: np.zeros((4, 2), np.float32)}
    out = ffa_init_state(state, SEED)
    assert out[A].tobytes() == ffa_init_A((2, 3), SEED, P).tobytes()
    np.testing.assert_array_equal(out[B], state[B])


def _clients(send_a: bool) -> list[dict[str, np.ndarray]]:
    a = ffa_init_A((1, 2), SEED, P)
    c1 = {B: f32([[3], [0]]), HEAD: f32([[0, 3]])}
    c2 = {B: f32([[0], [3]]), HEAD: f32([[3, 0]])}
    if send_a:
        c1[A], c2[A] = a.copy(), a.copy()
    return [c1, c2]


@pytest.mark.parametrize("send_a", [False, True])
def test_b_is_averaged_and_a_unchanged(send_a: bool) -> None:
    c1, c2 = _clients(send_a)
    out = aggregate_ffa([c1, c2], [1, 2], seed=SEED)
    # (b1 + 2 b2) / 3, by hand.
    np.testing.assert_array_equal(out[B], f32([[1], [2]]))
    np.testing.assert_array_equal(out[HEAD], f32([[2, 1]]))
    if send_a:
        assert out[A].tobytes() == ffa_init_A((1, 2), SEED, P).tobytes()
    else:
        assert A not in out


def test_shared_a_makes_b_averaging_exact() -> None:
    c1, c2 = _clients(send_a=True)
    out = aggregate_ffa([c1, c2], [1, 2])
    mean_of_products = (c1[B] @ c1[A] + 2 * c2[B] @ c2[A]) / 3
    np.testing.assert_allclose(out[B] @ out[A], mean_of_products, rtol=1e-6)


def test_a_differing_by_one_ulp_is_rejected() -> None:
    c1, c2 = _clients(send_a=True)
    c2[A] = c2[A].copy()
    c2[A][0, 0] = np.nextafter(c2[A][0, 0], np.float32(1))
    with pytest.raises(UpdateRejected, match="bit-identical"):
        aggregate_ffa([c1, c2], [1, 1])


def test_a_that_is_not_the_seeded_init_is_rejected() -> None:
    c1, c2 = _clients(send_a=True)
    with pytest.raises(UpdateRejected, match="not the FFA init for seed=7"):
        aggregate_ffa([c1, c2], [1, 1], seed=7)


def test_some_clients_sending_a_and_others_not_is_rejected() -> None:
    with_a, _ = _clients(send_a=True)
    _, without_a = _clients(send_a=False)
    with pytest.raises(UpdateRejected, match="every client must send A, or none"):
        aggregate_ffa([with_a, without_a], [1, 1])
