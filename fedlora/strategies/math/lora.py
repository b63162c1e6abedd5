"""Shared arithmetic on LoRA adapter states: pairing factors and weighted means.

FedAvg (McMahan et al., 2017, https://arxiv.org/abs/1602.05629) applied to a
LoRA adapter (Hu et al., 2021, https://arxiv.org/abs/2106.09685).

An adapter state is ``dict[str, np.ndarray]`` (float32) keyed by parameter
name. LoRA factors come in pairs that share a module prefix::

    <prefix>.lora_A.weight   shape (r, in_features)
    <prefix>.lora_B.weight   shape (out_features, r)

and the weight delta they stand for is ``scaling * B @ A``. Every other key
(a classifier head, a bias) is a dense tensor.

What this adds to Flower and PEFT: Flower's FedAvg averages whatever arrays it
is given and PEFT names the tensors, but neither checks that two clients'
updates describe the same adapter. :class:`RunningMean` does, naming the key
that differs, so a mismatched client is rejected rather than broadcast into an
array error deep inside numpy. The strategies in this folder (exact, FFA,
heterogeneous rank) build on these helpers.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from typing import NamedTuple

import numpy as np

from fedlora.errors import UpdateRejected
from fedlora.records import LORA_A_SUFFIX, LORA_B_SUFFIX, State, is_lora_a, is_lora_b

__all__ = [
    "Factors",
    "RunningMean",
    "dense_keys",
    "factorise",
    "lora_pairs",
    "lora_scaling",
    "norm_excess",
    "state_norm",
    "weighted_mean",
    "zip_weighted",
]


def state_norm(state: Mapping[str, np.ndarray]) -> float:
    """L2 norm of all tensors of a state taken together, in float64."""
    total = 0.0
    for arr in state.values():
        flat = np.asarray(arr, dtype=np.float64).ravel()
        total += float(np.dot(flat, flat))
    return math.sqrt(total)


def norm_excess(state: Mapping[str, np.ndarray], max_norm: float) -> str | None:
    """Why ``state`` is too large for the server's guard (``update-max-norm``), or None.

    One rule for every path an update reaches the server by (plain replies,
    compressed deltas, FFA's and heterogeneous ranks' partial payloads), so
    the operator's limit never silently stops applying.
    """
    norm = state_norm(state)
    if norm > max_norm:
        return (
            f"L2 norm of the update is {norm:.4g}, above the limit {max_norm:.4g} "
            "(update-max-norm; raise it if honest updates are this large, e.g. DP-SGD "
            "noise at a large learning rate)"
        )
    return None


def lora_pairs(state: Mapping[str, np.ndarray]) -> dict[str, tuple[str, str]]:
    """Pair each module's A and B factor keys and check their shapes agree.

    Parameters
    ----------
    state
        An adapter state.

    Returns
    -------
    dict[str, tuple[str, str]]
        ``prefix -> (a_key, b_key)``, sorted by prefix so that every caller
        walks modules in the same order.

    Raises
    ------
    UpdateRejected
        If a factor has no partner, is not 2-D, or the two factors disagree on
        the rank (``A.shape[0] != B.shape[1]``). A lone factor cannot be turned
        into a weight delta, so the update is unusable rather than partial.
    """
    a_prefixes = {k[: -len(LORA_A_SUFFIX)] for k in state if is_lora_a(k)}
    b_prefixes = {k[: -len(LORA_B_SUFFIX)] for k in state if is_lora_b(k)}
    lonely = sorted(a_prefixes ^ b_prefixes)
    if lonely:
        prefix = lonely[0]
        have, missing = ("lora_A", "lora_B") if prefix in a_prefixes else ("lora_B", "lora_A")
        raise UpdateRejected(
            f"module {prefix!r} has a {have} factor but no {missing} factor; "
            f"send both {prefix}{LORA_A_SUFFIX} and {prefix}{LORA_B_SUFFIX}"
        )
    pairs: dict[str, tuple[str, str]] = {}
    for prefix in sorted(a_prefixes):
        a_key, b_key = prefix + LORA_A_SUFFIX, prefix + LORA_B_SUFFIX
        a, b = np.asarray(state[a_key]), np.asarray(state[b_key])
        if a.ndim != 2 or b.ndim != 2:
            raise UpdateRejected(
                f"LoRA factors of {prefix!r} must be 2-D; got A {a.shape}, B {b.shape}"
            )
        if a.shape[0] != b.shape[1]:
            raise UpdateRejected(
                f"LoRA factors of {prefix!r} disagree on the rank: A {a.shape} "
                f"has r={a.shape[0]} rows, B {b.shape} has r={b.shape[1]} columns"
            )
        pairs[prefix] = (a_key, b_key)
    return pairs


def dense_keys(state: Mapping[str, np.ndarray]) -> list[str]:
    """Keys that are not LoRA factors, sorted; they are averaged as they are."""
    return sorted(k for k in state if not (is_lora_a(k) or is_lora_b(k)))


def lora_scaling(alpha: float, rank: int, rslora: bool = False) -> float:
    """PEFT's LoRA scaling: ``alpha / r``, or ``alpha / sqrt(r)`` for rsLoRA.

    Kept here so that strategies which mix ranks scale each client exactly as
    PEFT did when that client trained.
    """
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def zip_weighted(
    states: Iterable[Mapping[str, np.ndarray]], weights: Iterable[float]
) -> Iterator[tuple[int, Mapping[str, np.ndarray], float]]:
    """Yield ``(index, state, weight)``, checking both sides have equal length.

    ``states`` is consumed lazily so that a caller can stream updates off the
    wire one at a time.
    """
    weight_list = [float(w) for w in weights]
    count = 0
    for count, state in enumerate(states, start=1):
        if count > len(weight_list):
            raise ValueError(
                f"got more updates than weights ({len(weight_list)}); pass one "
                "weight (example count) per update"
            )
        yield count - 1, state, weight_list[count - 1]
    if count != len(weight_list):
        raise ValueError(
            f"got {count} updates but {len(weight_list)} weights; pass one "
            "weight (example count) per update"
        )


class RunningMean:
    """Weighted mean of states, fed one state at a time.

    Aggregating as a running sum keeps server memory one update wide however
    many clients report, and lets the server validate each update as it
    arrives. The sum is held in float64 so that hundreds of float32 updates
    add without visible rounding; :meth:`result` returns float32.

    Examples
    --------
    >>> mean = RunningMean()
    >>> mean.add({"w": np.array([1.0], np.float32)}, 1.0)
    >>> mean.add({"w": np.array([4.0], np.float32)}, 2.0)
    >>> float(mean.result()["w"][0])
    3.0
    """

    def __init__(self) -> None:
        self._sum: dict[str, np.ndarray] = {}
        self._total = 0.0
        self._count = 0

    @property
    def count(self) -> int:
        """Number of states added so far."""
        return self._count

    @property
    def total_weight(self) -> float:
        """Sum of the weights added so far."""
        return self._total

    def add(self, state: Mapping[str, np.ndarray], weight: float, source: str = "update") -> None:
        """Add ``state`` with ``weight`` (the client's example count).

        Parameters
        ----------
        state
            Arrays keyed by name; the first state fixes the keys and shapes.
        weight
            A positive, finite number, normally the client's example count.
        source
            How to name this update in error messages (e.g. ``"node 12"``).

        Raises
        ------
        UpdateRejected
            If the weight is not positive and finite, the keys or a shape
            differ from the first state's, or a value is NaN/inf. Nothing is
            added when it raises, so the caller may skip this update and go on.
        """
        w, arrays = self._validated(state, weight, source)
        if not self._count:
            self._sum = {k: np.zeros(v.shape, np.float64) for k, v in arrays.items()}
        for key, value in arrays.items():
            self._sum[key] += w * value.astype(np.float64, copy=False)
        self._total += w
        self._count += 1

    def check(self, state: Mapping[str, np.ndarray], weight: float, source: str = "update") -> None:
        """Raise what :meth:`add` would raise, without adding anything.

        Lets a strategy that keeps several means validate every part of an
        update before adding any part, so a rejected update leaves none of
        itself behind.
        """
        self._validated(state, weight, source)

    def _validated(
        self, state: Mapping[str, np.ndarray], weight: float, source: str
    ) -> tuple[float, dict[str, np.ndarray]]:
        w = float(weight)
        if not (math.isfinite(w) and w > 0):
            raise UpdateRejected(
                f"{source} reported weight {weight!r}; weights are example "
                "counts and must be positive and finite. Leave out clients that "
                "trained on no examples"
            )
        arrays = {k: np.asarray(v) for k, v in state.items()}
        if self._count:
            self._check_like_first(arrays, source)
        for key, value in arrays.items():
            if not np.all(np.isfinite(value)):
                raise UpdateRejected(
                    f"{source} sent non-finite values in {key!r}; local training "
                    "diverged. Lower learning-rate or enable gradient clipping"
                )
        return w, arrays

    def _check_like_first(self, arrays: Mapping[str, np.ndarray], source: str) -> None:
        missing = sorted(self._sum.keys() - arrays.keys())
        extra = sorted(arrays.keys() - self._sum.keys())
        if missing or extra:
            raise UpdateRejected(
                f"{source} does not match the other updates: missing keys "
                f"{missing}, unexpected keys {extra}. Every client must train "
                "the same adapter (same lora-target-modules and head)"
            )
        for key, value in arrays.items():
            if value.shape != self._sum[key].shape:
                raise UpdateRejected(
                    f"{source} sent {key!r} with shape {value.shape}, other "
                    f"updates have {self._sum[key].shape}. Every client must use "
                    "the same lora-rank and base model"
                )

    def result(self, dtype: type[np.floating] = np.float32) -> State:
        """The weighted mean so far, as ``dtype`` arrays (float32 by default).

        Strategies that compute further with the mean (an SVD) ask for
        float64 so the float32 rounding happens once, at the end.

        Raises
        ------
        ValueError
            If nothing was added: a mean of no updates is undefined and the
            caller should skip the round instead.
        """
        if not self._count:
            raise ValueError("no updates were added; there is nothing to average")
        return {k: (s / self._total).astype(dtype) for k, s in self._sum.items()}


def weighted_mean(states: Iterable[Mapping[str, np.ndarray]], weights: Iterable[float]) -> State:
    """Weighted mean of states: ``sum_i w_i x_i / sum_i w_i`` per key.

    Parameters
    ----------
    states
        Adapter states with identical keys and shapes; may be a generator.
    weights
        One positive weight per state (example counts).

    Returns
    -------
    State
        The float32 mean of each key.

    Raises
    ------
    UpdateRejected
        Naming the key and the update, if keys, shapes or weights are invalid.
    """
    mean = RunningMean()
    for i, state, w in zip_weighted(states, weights):
        mean.add(state, w, source=f"update {i}")
    return mean.result()


class Factors(NamedTuple):
    """A rank-``r`` factorisation ``b @ a`` and what truncation left out."""

    b: np.ndarray
    """Up-projection, shape ``(out, r)``, float32."""
    a: np.ndarray
    """Down-projection, shape ``(r, in)``, float32."""
    dropped_norm: float
    """Frobenius norm of ``product - b @ a`` (float64 arithmetic)."""


def factorise(product: np.ndarray, rank: int) -> Factors:
    """Best rank-``rank`` factors of ``product`` by truncated SVD.

    With ``product = U S V^T`` the factors are ``B = U_r sqrt(S_r)`` and
    ``A = sqrt(S_r) V_r^T``: splitting the singular values symmetrically keeps
    B and A on the same scale, so neither factor's learning dynamics are
    starved when clients resume training from them. By Eckart–Young the
    result is the closest rank-``rank`` matrix in Frobenius norm, and the
    error is ``sqrt(sum_{j > rank} s_j^2)``.

    Parameters
    ----------
    product
        A 2-D matrix of shape ``(out, in)``.
    rank
        Number of columns of B (rows of A). If it exceeds ``min(out, in)`` the
        extra directions are zero-filled so the shapes still match what PEFT
        expects for that rank; those directions carry nothing and are exact.

    Returns
    -------
    Factors
        ``b`` (out, rank), ``a`` (rank, in), and ``dropped_norm``.
    """
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    m = np.asarray(product, dtype=np.float64)
    if m.ndim != 2:
        raise ValueError(f"product must be 2-D, got shape {m.shape}")
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    keep = min(rank, s.size)
    root = np.sqrt(s[:keep])
    b = np.zeros((m.shape[0], rank), np.float64)
    a = np.zeros((rank, m.shape[1]), np.float64)
    b[:, :keep] = u[:, :keep] * root
    a[:keep, :] = root[:, None] * vt[:keep, :]
    dropped = float(np.sqrt(np.sum(s[keep:] ** 2)))
    return Factors(b.astype(np.float32), a.astype(np.float32), dropped)
