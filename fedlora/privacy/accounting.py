"""Privacy accounting for DP-SGD rounds, as stateless functions over Opacus.

A node trains each federated round with DP-SGD: ``steps`` noisy steps, each
over a Poisson sample of its examples taken with probability ``sample_rate``,
with Gaussian noise of scale ``noise_multiplier`` times the clipping norm. The
privacy spent over many rounds is the composition of all those steps, which is
what Opacus' accountants compute from a *history* of
``(noise_multiplier, sample_rate, num_steps)`` entries.

What this module adds to Opacus (which does all the math):

* A history is accounted in one call, with no accountant object to keep, so a
  node's spend can be recomputed from its on-disk ledger at any time.
* Epsilon is always computed by feeding the *whole* history to one
  accountant. Adding per-round epsilons would over-count badly (composition of
  Rényi DP is additive in RDP, not in epsilon), and a tighter accountant only
  helps if it sees every step.
* Errors fail closed: an accountant that cannot produce a number raises
  :class:`~fedlora.errors.PrivacyError` instead of returning something that
  would let training continue.

References: Abadi et al. 2016, https://arxiv.org/abs/1607.00133 (DP-SGD);
Mironov 2017, https://arxiv.org/abs/1702.07476 (RDP); Gopi et al. 2021,
https://arxiv.org/abs/2106.02848 (PRV accountant).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from opacus.accountants import create_accountant
from opacus.accountants.analysis import rdp as rdp_analysis
from opacus.accountants.utils import get_noise_multiplier

from fedlora.errors import ConfigError, DataError, PrivacyError

__all__ = [
    "ACCOUNTANTS",
    "HistoryEntry",
    "epsilon",
    "epsilon_estimate",
    "noise_multiplier_estimate",
    "noise_multiplier_for",
    "steps_per_round",
]

#: Accountants a node may choose with ``privacy-accountant``. Opacus' "gdp"
#: is left out on purpose: its central-limit approximation can underestimate
#: epsilon (Opacus warns so), worst with few steps, as in short rounds.
ACCOUNTANTS: tuple[str, ...] = ("rdp", "prv")

#: ``(noise_multiplier, sample_rate, num_steps)``, as in Opacus' ``history``.
HistoryEntry = tuple[float, float, int]


def _check_accountant(accountant: str) -> None:
    if accountant not in ACCOUNTANTS:
        raise ConfigError(
            f"privacy-accountant={accountant!r} is not a known accountant; "
            f"allowed: {', '.join(ACCOUNTANTS)}"
        )


def _check_delta(delta: float) -> None:
    if not (isinstance(delta, int | float) and 0.0 < delta < 1.0):
        raise ConfigError(
            f"privacy-delta={delta!r} must be a number in (0, 1), typically "
            "below 1/number-of-examples, e.g. 1e-5"
        )


def _clean_history(history: Sequence[HistoryEntry]) -> list[HistoryEntry]:
    """Validate a history and drop entries that spend nothing.

    Entries with zero steps or a zero sample rate touch no example, so they
    add no privacy loss; dropping them also avoids the PRV accountant dividing
    by zero on them.
    """
    cleaned: list[HistoryEntry] = []
    for index, entry in enumerate(history):
        if len(entry) != 3:
            raise PrivacyError(
                f"privacy history entry {index} is {entry!r}; expected "
                "(noise_multiplier, sample_rate, num_steps)"
            )
        sigma, rate, steps = entry
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise PrivacyError(
                f"privacy history entry {index} has num_steps={steps!r}; "
                "expected a non-negative integer"
            )
        if not (isinstance(sigma, int | float) and math.isfinite(sigma) and sigma >= 0):
            raise PrivacyError(
                f"privacy history entry {index} has noise_multiplier={sigma!r}; "
                "expected a finite number >= 0"
            )
        if not (isinstance(rate, int | float) and 0.0 <= rate <= 1.0):
            raise PrivacyError(
                f"privacy history entry {index} has sample_rate={rate!r}; "
                "expected a number in [0, 1]"
            )
        if steps > 0 and rate > 0:
            cleaned.append((float(sigma), float(rate), steps))
    return _merged(cleaned)


def _merged(entries: list[HistoryEntry]) -> list[HistoryEntry]:
    """Entries of one mechanism (same σ and sample rate) as one: composition of
    identical steps is by count, so this is exact, and a ledger of many
    rounds costs the accountant one evaluation per distinct mechanism."""
    steps: dict[tuple[float, float], int] = {}
    for sigma, rate, count in entries:
        steps[(sigma, rate)] = steps.get((sigma, rate), 0) + count
    return [(sigma, rate, count) for (sigma, rate), count in steps.items()]


def epsilon(history: Sequence[HistoryEntry], delta: float, accountant: str = "rdp") -> float:
    """Return the epsilon spent by a whole DP-SGD history at ``delta``.

    Parameters
    ----------
    history
        ``(noise_multiplier, sample_rate, num_steps)`` entries, one per run of
        identical steps (e.g. one per federated round), in any order:
        composition is commutative.
    delta
        The delta of the (epsilon, delta) guarantee.
    accountant
        One of :data:`ACCOUNTANTS`. "rdp" is fast and what most published
        numbers use; "prv" is tighter (smaller epsilon) but slower.

    Returns
    -------
    float
        Epsilon, ``0.0`` for an empty history and ``inf`` if any step ran
        without noise (``noise_multiplier == 0`` gives no privacy at all).

    Raises
    ------
    ConfigError
        If ``accountant`` or ``delta`` is not allowed.
    PrivacyError
        If the history is malformed or the accountant fails or returns NaN:
        a node must then stop rather than train on an unknown spend.
    """
    _check_accountant(accountant)
    _check_delta(delta)
    entries = _clean_history(history)
    if not entries:
        return 0.0
    if any(sigma == 0.0 for sigma, _, _ in entries):
        # No noise means no privacy. Said here because the PRV accountant
        # overflows on sigma=0 instead of answering.
        return math.inf
    engine = create_accountant(mechanism=accountant)
    engine.history = list(entries)
    try:
        eps = float(engine.get_epsilon(delta=delta))
    except (ArithmeticError, ValueError, RuntimeError) as err:
        raise PrivacyError(
            f"the {accountant} accountant could not compute epsilon for history "
            f"{entries} at delta={delta}: {err}; refusing to continue without "
            "a privacy bound"
        ) from err
    if math.isnan(eps) or eps < 0:
        raise PrivacyError(
            f"the {accountant} accountant returned epsilon={eps} for history "
            f"{entries} at delta={delta}; refusing to continue without a valid "
            "privacy bound"
        )
    return eps


def noise_multiplier_for(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "rdp",
    extra: Sequence[HistoryEntry] = (),
) -> float:
    """Return the smallest noise multiplier (to 0.01 in epsilon) that stays
    within ``target_epsilon`` after ``steps`` steps at ``sample_rate``.

    The search is Opacus' ``get_noise_multiplier``; the answer is checked
    again with :func:`epsilon` so a noise level that would overspend is never
    handed out, whatever the search did. ``extra`` entries (other releases
    composed with the steps, e.g. noisy label counts) are searched with our
    own bisection over the same accountant, since Opacus' search takes one
    mechanism only.

    Raises
    ------
    ConfigError
        If an argument is out of range or the target cannot be reached with
        any noise Opacus will consider (epsilon too small for so many steps).
    PrivacyError
        If the accountant fails.
    """
    _check_accountant(accountant)
    _check_delta(delta)
    if not (isinstance(target_epsilon, int | float) and 0 < target_epsilon < math.inf):
        raise ConfigError(f"privacy-target-epsilon={target_epsilon!r} must be a finite number > 0")
    if not (isinstance(sample_rate, int | float) and 0.0 < sample_rate <= 1.0):
        raise ConfigError(f"sample_rate={sample_rate!r} must be in (0, 1]")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"steps={steps!r} must be a positive integer")
    if extra:
        return _bisect_noise(target_epsilon, delta, sample_rate, steps, accountant, extra)
    try:
        sigma = float(
            get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=accountant,
            )
        )
    except ValueError as err:
        raise ConfigError(
            f"privacy-target-epsilon={target_epsilon} cannot be reached at "
            f"delta={delta} with {steps} steps at sample rate {sample_rate:.4g} "
            f"({err}); raise the target, or lower local-epochs or batch-size"
        ) from err
    except (ArithmeticError, RuntimeError) as err:
        raise PrivacyError(
            f"the {accountant} accountant failed while searching a noise multiplier: {err}"
        ) from err
    reached = epsilon([(sigma, sample_rate, steps)], delta, accountant)
    if reached > target_epsilon:
        raise PrivacyError(
            f"noise multiplier {sigma} found for privacy-target-epsilon="
            f"{target_epsilon} actually spends epsilon={reached}; refusing it"
        )
    return sigma


def _bisect_noise(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str,
    extra: Sequence[HistoryEntry],
) -> float:
    """Smallest sigma (to within 0.01 in epsilon) with steps + extra <= target."""

    def spend(sigma: float) -> float:
        return epsilon([(sigma, sample_rate, steps), *extra], delta, accountant)

    low, high = 0.0, 10.0
    spent = spend(high)
    while spent > target_epsilon:
        low, high = high, 2 * high
        spent = spend(high)
        if high > 1e4:
            raise ConfigError(
                f"privacy-target-epsilon={target_epsilon} cannot be reached at "
                f"delta={delta}: the other releases {list(extra)} alone spend "
                f"{epsilon(list(extra), delta, accountant):.3g}; raise the target or "
                "the noise on those releases (dp-label-noise)"
            )
    while spent < target_epsilon - 0.01 and high - low >= 1e-6:
        mid = (low + high) / 2
        at_mid = spend(mid)
        if at_mid > target_epsilon:
            low = mid
        else:
            high, spent = mid, at_mid
    return high


def steps_per_round(num_examples: int, batch_size: int, local_epochs: int) -> tuple[float, int]:
    """Return ``(sample_rate, steps)`` of one round of local DP-SGD.

    With Poisson sampling each example joins each step's batch independently
    with probability ``batch_size / num_examples`` (capped at 1), and an epoch
    is ``ceil(num_examples / batch_size)`` steps.

    Opacus samples at ``1 / ceil(num_examples / batch_size)`` and runs
    ``int(1 / that)`` steps an epoch, both never more than the values returned
    here. Accounting with these values is therefore exact when ``batch_size``
    divides ``num_examples`` and an upper bound otherwise: the spend it
    reports is never below the true one.

    Raises
    ------
    DataError
        If the node has no examples.
    ConfigError
        If ``batch_size`` or ``local_epochs`` is not a positive integer.
    """
    if isinstance(num_examples, bool) or not isinstance(num_examples, int):
        raise DataError(f"number of training examples {num_examples!r} is not an int")
    if num_examples < 1:
        raise DataError(
            "this node has no training examples; DP-SGD needs at least one. "
            "Check data-file and the partition this node was given"
        )
    for key, value in (("batch-size", batch_size), ("local-epochs", local_epochs)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{key}={value!r} must be a positive integer")
    sample_rate = min(1.0, batch_size / num_examples)
    steps = local_epochs * math.ceil(num_examples / batch_size)
    return sample_rate, steps


#: Integer Rényi orders: Opacus' closed form for them is ~30x faster than its
#: fractional orders, and the ε they give is at most slightly larger.
_ORDERS = tuple(float(a) for a in range(2, 128))


def epsilon_estimate(history: Sequence[HistoryEntry], delta: float) -> float:
    """ε of a history over integer Rényi orders only: ~30x faster than
    :func:`epsilon`, at most slightly larger; for planning, never for a ledger."""
    rdp = sum(
        rdp_analysis.compute_rdp(q=q, noise_multiplier=s, steps=n, orders=_ORDERS)
        for s, q, n in history
    )
    return float(rdp_analysis.get_privacy_spent(orders=_ORDERS, rdp=rdp, delta=delta)[0])


def noise_multiplier_estimate(
    target: float,
    delta: float,
    scaled: Sequence[HistoryEntry],
    extra: Sequence[HistoryEntry],
) -> float:
    """Bisection (to 0.5 %) for σ with ``scaled`` (σ=1 placeholders) plus ``extra``
    within ``target``; raises ConfigError when the extra releases alone exceed it."""
    merged: dict[tuple[float, float], int] = {}
    for s, q, n in extra:
        merged[(s, q)] = merged.get((s, q), 0) + n
    fixed = [(s, q, n) for (s, q), n in merged.items()]

    def spend(sigma: float) -> float:
        return epsilon_estimate([*((sigma, q, n) for _, q, n in scaled), *fixed], delta)

    low, high = 0.05, 1000.0
    if spend(high) > target:
        raise ConfigError(f"dp-target-epsilon={target} cannot be reached at any noise")
    while high / low > 1.005:
        mid = math.sqrt(low * high)
        low, high = (mid, high) if spend(mid) > target else (low, mid)
    return high
