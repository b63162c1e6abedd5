"""FFA-LoRA: freeze A at a shared random init, train and average B only.

FFA-LoRA (Sun et al., ICLR 2024, https://arxiv.org/abs/2403.12313).

Why: with A frozen and identical on every client, the mean of the clients'
deltas is ``mean_i(B_i) @ A``, so plain averaging of B is *exact* (no
product-space mean needed, unlike :mod:`fedlora.strategies.math.exact`). It
also halves the trainable parameters, which halves the dimension DP-SGD noise
is spread over, and removes the A/B interplay that makes LoRA unstable under
DP noise.

The scheme only works if A really is identical everywhere, so this module

* derives each module's A from ``(seed, prefix)`` through SHA-256 and PCG64's
  raw 64-bit stream, both of which numpy promises are stable across versions
  and platforms (``Generator.uniform`` is not promised stable, and Python's
  ``hash()`` is salted per process), and turns the raw bits into floats with
  plain IEEE arithmetic;
* rejects, at aggregation, any client whose A is not bit-identical to the
  others' (or to the seeded init, when the server knows the seed).

What this adds: PEFT can freeze A (``requires_grad_(False)``) but has no
seeded, cross-process-reproducible init and no aggregation rule for it.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping

import numpy as np

from fedlora.errors import ConfigError, UpdateRejected
from fedlora.records import LORA_A_SUFFIX, State, is_lora_a
from fedlora.strategies.math.lora import RunningMean, lora_pairs, zip_weighted

__all__ = [
    "aggregate_ffa",
    "ffa_init_A",
    "ffa_init_state",
    "ffa_trainable_keys",
]


def _stable_seed(seed: int, prefix: str) -> int:
    # SHA-256 of a fixed encoding: the same on every machine and process.
    digest = hashlib.sha256(f"fedlora-ffa\x00{seed}\x00{prefix}".encode()).digest()
    return int.from_bytes(digest, "little")


def ffa_init_A(shape: tuple[int, int], seed: int, prefix: str) -> np.ndarray:
    """The frozen A factor of module ``prefix``, identical on every client.

    Values follow PEFT's default LoRA A init (``kaiming_uniform_(a=sqrt(5))``),
    i.e. uniform on ``[-1/sqrt(in), 1/sqrt(in)]``, so FFA starts from the same
    distribution as ordinary LoRA.

    Parameters
    ----------
    shape
        ``(r, in_features)``.
    seed
        The federation's seed (config ``seed``); any integer.
    prefix
        The module prefix, e.g. ``"base_model.model.bert.encoder.layer.0
        .attention.self.query"``. Mixing it in gives each module its own A.

    Returns
    -------
    np.ndarray
        float32 array of ``shape``; the same bits for the same arguments on
        any machine.
    """
    if (
        len(shape) != 2
        or any(isinstance(d, bool) or not isinstance(d, int) for d in shape)
        or min(shape) < 1
    ):
        raise ConfigError(
            f"FFA A shape for {prefix!r} must be (rank, in_features) with both >= 1, got {shape!r}"
        )
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed must be an integer, got {seed!r}")
    rank, in_features = shape
    bits = np.random.PCG64(_stable_seed(seed, prefix)).random_raw(rank * in_features)
    # Top 53 bits -> uniform [0, 1) double, exactly as the C standard recipe.
    unit = (np.asarray(bits, np.uint64) >> np.uint64(11)).astype(np.float64) * (2.0**-53)
    bound = 1.0 / math.sqrt(in_features)
    return ((2.0 * unit - 1.0) * bound).astype(np.float32).reshape(rank, in_features)


def ffa_init_state(state: Mapping[str, np.ndarray], seed: int) -> State:
    """Copy of ``state`` with every ``lora_A`` replaced by its seeded init.

    Clients call this once on their freshly built adapter (B is already zero
    in PEFT's init), so the frozen A agree before the first round.
    """
    out: State = {}
    for key, value in state.items():
        if is_lora_a(key):
            prefix = key[: -len(LORA_A_SUFFIX)]
            shape = np.asarray(value).shape
            if len(shape) != 2:
                raise ConfigError(f"{key!r} must be 2-D, got shape {shape}")
            out[key] = ffa_init_A((int(shape[0]), int(shape[1])), seed, prefix)
        else:
            out[key] = np.array(value, copy=True)
    return out


def ffa_trainable_keys(keys: Iterable[str]) -> list[str]:
    """Keys a client trains and sends under FFA: ``lora_B`` and dense keys.

    Every ``lora_A`` key is frozen. Order follows ``keys``.
    """
    return [k for k in keys if not is_lora_a(k)]


def _bit_identical(x: np.ndarray, y: np.ndarray) -> bool:
    # Compare bits, not values: NaN != NaN and -0.0 == 0.0 would both mislead.
    return x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()


def aggregate_ffa(
    states: Iterable[Mapping[str, np.ndarray]],
    weights: Iterable[float],
    *,
    seed: int | None = None,
) -> State:
    """Average B and dense keys; check that A, if sent, is the same everywhere.

    Parameters
    ----------
    states
        Client states. Each either omits ``lora_A`` entirely (the usual case:
        frozen tensors need not travel) or sends every module's A.
    weights
        One positive weight per state (example counts).
    seed
        If given, any A that is sent must equal :func:`ffa_init_A` for that
        seed, which catches a client that trained A or used another seed even
        when it is the only client.

    Returns
    -------
    State
        Weighted mean of ``lora_B`` and dense keys; plus the shared A,
        unchanged, if clients sent it.

    Raises
    ------
    UpdateRejected
        If a client's A differs by a single bit from the others' (or from the
        seeded init), if some clients send A and others do not, or if the
        trainable keys, shapes or weights are invalid.
    """
    mean = RunningMean()
    shared_a: dict[str, np.ndarray] | None = None
    first_source = ""
    for i, state, w in zip_weighted(states, weights):
        source = f"update {i}"
        a_part = {k: np.asarray(v) for k, v in state.items() if is_lora_a(k)}
        if a_part:
            lora_pairs(state)  # A and B must agree on the rank
        if i == 0:
            shared_a, first_source = (a_part or None), source
        elif bool(a_part) != (shared_a is not None):
            raise UpdateRejected(
                f"{source} {'sent' if a_part else 'did not send'} lora_A factors "
                f"but {first_source} {'did not' if a_part else 'did'}; under "
                "FFA-LoRA every client must send A, or none"
            )
        if shared_a is not None:
            # The first A is checked against the seed, the rest against it.
            seed_check = seed if i == 0 else None
            _check_same_a(a_part, shared_a, source, first_source, seed_check)
        mean.add({k: v for k, v in state.items() if not is_lora_a(k)}, w, source)
    out = mean.result()
    if shared_a is not None:
        out.update({k: v.astype(np.float32, copy=True) for k, v in shared_a.items()})
    return out


def _check_same_a(
    a_part: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray],
    source: str,
    ref_source: str,
    seed: int | None,
) -> None:
    if a_part.keys() != reference.keys():
        raise UpdateRejected(
            f"{source} sent lora_A for modules {sorted(a_part)} but {ref_source} "
            f"for {sorted(reference)}; every client must train the same modules"
        )
    for key, a in a_part.items():
        if seed is not None:
            prefix = key[: -len(LORA_A_SUFFIX)]
            if a.ndim != 2:
                raise UpdateRejected(f"{source} sent {key!r} with shape {a.shape}")
            expected = ffa_init_A((a.shape[0], a.shape[1]), seed, prefix)
            if not _bit_identical(a, expected):
                raise UpdateRejected(
                    f"{source} sent {key!r} that is not the FFA init for "
                    f"seed={seed}; the client either trained A (freeze it) or "
                    "used a different seed"
                )
        if not _bit_identical(a, reference[key]):
            raise UpdateRejected(
                f"{source} sent {key!r} that differs from {ref_source}'s; under "
                "FFA-LoRA A is frozen and must be bit-identical on all clients "
                "(same seed, A frozen, float32)"
            )
