"""An empirical lower bound on ε from a membership-inference attack's errors.

Why: the ledger's ε is an upper bound proved from the mechanism; an attack
that tells members from non-members gives a *lower* bound measured on the
released adapter. If the measured bound ever exceeds the accounted one,
some part of the DP pipeline is broken (Jagielski et al. 2020, "Auditing
differentially private machine learning: how private is private SGD?";
Nasr et al. 2021, "Adversary instantiation").

The arithmetic: an (ε, δ)-DP mechanism forces every membership test with
false-positive rate α and false-negative rate β to satisfy
``1 - δ - β <= e^ε α`` and ``1 - δ - α <= e^ε β`` (Kairouz et al. 2015). So

    ε >= max( log((1 - δ - β) / α), log((1 - δ - α) / β) ).

To make that a statement with 95 % confidence, α and β are replaced by
their Clopper-Pearson upper bounds (each one-sided at 97.5 %, so both hold
together with probability >= 95 %) computed on examples the attack's
threshold was *not* chosen on (:func:`audit_threshold` splits them).
Torch-free: both sides read it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from scipy.stats import beta as beta_dist


def clopper_pearson_upper(errors: int, trials: int, confidence: float = 0.975) -> float:
    """One-sided upper confidence bound on a rate from ``errors`` of ``trials``."""
    if trials < 1 or not 0 <= errors <= trials:
        raise ValueError(f"need 0 <= errors ({errors}) <= trials ({trials}), trials >= 1")
    if errors == trials:
        return 1.0
    return float(beta_dist.ppf(confidence, errors + 1, trials - errors))


def epsilon_from_rates(fpr: float, fnr: float, delta: float) -> float:
    """The ε a test with these error rates proves at ``delta`` (0 when none)."""
    bounds = [0.0]
    for a, b in ((fpr, fnr), (fnr, fpr)):
        if a > 0 and 1 - delta - b > 0:
            bounds.append(math.log((1 - delta - b) / a))
        elif a == 0 and 1 - delta - b > 0:
            return math.inf
    return max(bounds)


@dataclass(frozen=True)
class EpsilonBound:
    """A threshold test's measured ε: the point estimate and its 95 % lower bound."""

    threshold: float
    members: int
    non_members: int
    false_positives: int
    false_negatives: int
    epsilon_point: float
    epsilon_lower_95: float


def bound_at(
    threshold: float,
    member_scores: Sequence[float],
    non_member_scores: Sequence[float],
    delta: float,
) -> EpsilonBound:
    """ε of the test "score >= threshold means member" on these examples."""
    fp = sum(1 for s in non_member_scores if s >= threshold)
    fn = sum(1 for s in member_scores if s < threshold)
    m, n = len(member_scores), len(non_member_scores)
    point = epsilon_from_rates(fp / n, fn / m, delta)
    lower = epsilon_from_rates(clopper_pearson_upper(fp, n), clopper_pearson_upper(fn, m), delta)
    return EpsilonBound(threshold, m, n, fp, fn, point, lower)


def audit_threshold(
    member_scores: Sequence[float], non_member_scores: Sequence[float], delta: float
) -> EpsilonBound:
    """Choose the threshold on the first half of each set (the best 95 % bound
    there: a point estimate is infinite for any threshold without misses, so
    it cannot choose), bound ε on the second half: choosing and measuring on
    the same examples would overstate the bound."""
    m, n = len(member_scores) // 2, len(non_member_scores) // 2
    if min(m, n) < 1:
        raise ValueError("an ε audit needs at least 2 members and 2 non-members")
    pick_m, pick_n = member_scores[:m], non_member_scores[:n]
    candidates = sorted(set(pick_m) | set(pick_n))
    best = max(candidates, key=lambda t: bound_at(t, pick_m, pick_n, delta).epsilon_lower_95)
    return bound_at(best, member_scores[m:], non_member_scores[n:], delta)


def roc_auc(member_scores: Sequence[float], non_member_scores: Sequence[float]) -> float:
    """Probability a random member scores above a random non-member (ties count half)."""
    pairs = 0.0
    for s in member_scores:
        for t in non_member_scores:
            pairs += 1.0 if s > t else 0.5 if s == t else 0.0
    return pairs / (len(member_scores) * len(non_member_scores))


def tpr_at_fpr(
    member_scores: Sequence[float], non_member_scores: Sequence[float], fpr: float
) -> float | None:
    """TPR at the largest threshold whose FPR is <= ``fpr`` (None: too few non-members
    to resolve that rate, fewer than 1/fpr)."""
    if len(non_member_scores) < math.ceil(1 / fpr):
        return None
    allowed = math.floor(fpr * len(non_member_scores))
    ranked = sorted(non_member_scores, reverse=True)
    threshold = ranked[allowed] if allowed < len(ranked) else -math.inf
    return sum(1 for s in member_scores if s > threshold) / len(member_scores)
