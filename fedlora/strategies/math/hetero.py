"""Heterogeneous LoRA ranks: average in weight space, hand each site its rank.

FlexLoRA (Bai et al., 2024, https://arxiv.org/abs/2402.11505), motivated by
HetLoRA (Cho et al., 2024, https://arxiv.org/abs/2401.06432).

Why: sites differ in memory and data, so each trains LoRA at its own rank
``r_i``. Factors of different ranks cannot be averaged entry by entry (HetLoRA
zero-pads them, which again averages A and B separately and so is not the mean
of the clients' models). FlexLoRA instead averages the *deltas* each site
actually applied,

    D = sum_i w_i s_i B_i A_i / sum_i w_i       (shape out x in, per module)

with ``s_i`` the scaling that site trained with (PEFT: ``alpha / r_i``), and
then gives every site the best rank-``r`` factors of ``D`` for its own ``r``
by truncated SVD. A site whose rank is at least ``rank(D)`` (at most
``min(out, in, sum_i r_i)``) receives ``D`` exactly; a smaller site receives
its Eckart–Young best approximation, and :func:`factorise_for_rank` reports
the Frobenius norm it had to drop.

Memory: the running mean of ``D`` is one *full* ``out x in`` matrix per
module, larger than any adapter; that is the price of mixing ranks.

What this adds: neither Flower nor PEFT has a rank-aware aggregation.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import NamedTuple

import numpy as np

from fedlora.errors import ConfigError
from fedlora.records import LORA_A_SUFFIX, LORA_B_SUFFIX, State
from fedlora.strategies.math.lora import (
    Factors,
    RunningMean,
    dense_keys,
    factorise,
    lora_pairs,
    lora_scaling,
    zip_weighted,
)

__all__ = [
    "HeteroAggregate",
    "aggregate_hetero",
    "factorise_for_rank",
    "split_for_rank",
]


class HeteroAggregate(NamedTuple):
    """What :func:`aggregate_hetero` returns; unpacks as ``products, dense, _``."""

    products: dict[str, np.ndarray]
    """``prefix -> D``, the weighted mean delta, shape ``(out, in)``, float32."""
    dense: State
    """Weighted mean of every non-LoRA key (classifier head, biases)."""
    ranks: dict[str, tuple[int, ...]]
    """``prefix -> rank of each update``, in arrival order, for reporting."""


def _check_rank(rank: int) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"lora-rank must be an integer >= 1, got {rank!r}")


def aggregate_hetero(
    states: Iterable[Mapping[str, np.ndarray]],
    weights: Iterable[float],
    *,
    alpha: float | None = None,
    rslora: bool = False,
) -> HeteroAggregate:
    """Weighted mean of the clients' weight deltas, whatever their ranks.

    Parameters
    ----------
    states
        Client adapter states. Modules and dense keys must match across
        clients; the rank of each module may differ. May be a generator.
    weights
        One positive weight per state (example counts).
    alpha
        PEFT's ``lora_alpha``. When given, each client's product is scaled by
        the scaling it trained with (``alpha / r_i``, or ``alpha / sqrt(r_i)``
        with ``rslora``), so the mean is of the deltas actually applied; this
        matters because ranks differ. ``None`` averages raw ``B_i A_i``
        (correct only if every client's scaling is the same).
    rslora
        Whether clients use rank-stabilised scaling (PEFT ``use_rslora``).

    Returns
    -------
    HeteroAggregate
        ``products`` (prefix -> mean delta), ``dense`` means, and the ranks
        seen per module.

    Raises
    ------
    ConfigError
        If ``alpha`` is not positive and finite.
    UpdateRejected
        If modules, delta shapes, dense keys, weights or values disagree.
    """
    if alpha is not None and not (math.isfinite(alpha) and alpha > 0):
        raise ConfigError(f"lora-alpha must be positive and finite, got {alpha!r}")
    product_mean, dense_mean = RunningMean(), RunningMean()
    ranks: dict[str, list[int]] = {}
    for i, state, w in zip_weighted(states, weights):
        source = f"update {i}"
        products: dict[str, np.ndarray] = {}
        for prefix, (a_key, b_key) in lora_pairs(state).items():
            a = np.asarray(state[a_key], np.float64)
            b = np.asarray(state[b_key], np.float64)
            r = a.shape[0]
            s = 1.0 if alpha is None else lora_scaling(alpha, r, rslora)
            products[prefix] = s * (b @ a)
            ranks.setdefault(prefix, []).append(r)
        # Check the dense part before adding either part, so a rejected
        # update leaves no half of itself in the means.
        dense = {k: state[k] for k in dense_keys(state)}
        dense_mean.check(dense, w, source)
        product_mean.add(products, w, source)
        dense_mean.add(dense, w, source)
    return HeteroAggregate(
        product_mean.result(),
        dense_mean.result(),
        {p: tuple(r) for p, r in ranks.items()},
    )


def factorise_for_rank(product: np.ndarray, r: int) -> Factors:
    """Best rank-``r`` factors ``(b, a)`` of ``product`` by truncated SVD.

    Singular values are split symmetrically (``b = U sqrt(S)``,
    ``a = sqrt(S) V^T``). ``dropped_norm`` is the Frobenius norm of what rank
    ``r`` could not hold: zero when ``r >= rank(product)``.
    """
    _check_rank(r)
    return factorise(product, r)


def split_for_rank(
    global_products: Mapping[str, np.ndarray],
    dense: Mapping[str, np.ndarray],
    rank: int,
    scaling: float,
) -> State:
    """The global model as an adapter state at one site's ``rank``.

    Parameters
    ----------
    global_products
        ``prefix -> D`` from :func:`aggregate_hetero`.
    dense
        Dense means from :func:`aggregate_hetero`, copied as they are.
    rank
        The site's LoRA rank.
    scaling
        The scaling the site's PEFT model will apply (``alpha / rank``): the
        factors are fitted to ``D / scaling`` so that ``scaling * B @ A``
        approximates ``D``.

    Returns
    -------
    State
        ``<prefix>.lora_A.weight`` ``(rank, in)``, ``<prefix>.lora_B.weight``
        ``(out, rank)`` and the dense keys, float32. SVD is done per call;
        when serving many sites, call once per distinct rank.
    """
    _check_rank(rank)
    if not (math.isfinite(scaling) and scaling > 0):
        raise ConfigError(
            f"LoRA scaling must be positive and finite, got {scaling!r}; "
            "it is lora-alpha / lora-rank"
        )
    out: State = {}
    for prefix, product in sorted(global_products.items()):
        b, a, _ = factorise(np.asarray(product, np.float64) / scaling, rank)
        out[prefix + LORA_A_SUFFIX] = a
        out[prefix + LORA_B_SUFFIX] = b
    for key, value in dense.items():
        out[key] = np.asarray(value, np.float32).copy()
    return out
