"""A local-DP plan made before any privacy is spent, and the recipe it picks.

Why a plan: whether DP-SGD can learn is decided by numbers known before
round 1 -- each site's example count, the rounds, ε and δ, the batch size and
how many coordinates carry noise. A site that trains anyway on a plan that
cannot learn spends its budget on an adapter worse than the one it started
from. Everything here is a function of settings and example counts; it
reads no example.

The noise-to-signal ratio (NSR)
-------------------------------
One DP-SGD step adds Gaussian noise N(0, (σC)² I_d) to the *sum* of the
batch's clipped per-example gradients and divides by the expected batch
size B = q·n. The noise on the averaged gradient has expected L2 norm
σC√d / B, while the averaged clipped gradient's norm is at most C. So

* ``nsr_step = σ√d / B`` -- noise norm over the largest possible signal;
* a round of T steps adds T signals (aligned, at most) and T independent
  noises: ``nsr_round = σ√d / (B√T)``;
* the server averages K sites' rounds with equal weights (a DP node reports
  a fixed weight): ``nsr_federation = √(Σ_k nsr_round_k²) / K``
  (``nsr_round / √K`` for equal sites).

The signal is an upper bound (every example's gradient at the clip and all
aligned), so the ratio is optimistic; it leaves out how hard the task is
(easy topics learn at ratios where harder labels do not). The thresholds
below are calibrated on measured runs (docs/RESULTS.md).

The recipe (``dp-recipe=auto``)
-------------------------------
Following Ponomareva et al. 2023 ("How to DP-fy ML", §5: large batches, the
learning rate scaled with the batch) and De et al. 2022 / Li et al. 2022
(what matters is the noise on the averaged gradient, σ/B, and large batches
lower it at a fixed ε): for each candidate batch size the node computes the
σ that reaches its target ε over the whole run and keeps the batch with the
lowest ``nsr_round``, up to the task's measured reference batch; the rate is
the reference rate scaled linearly down with the batch (an epoch moves the
adapter as far whatever the batch; above the reference it cannot follow);
the optimiser is SGD. Settings a person changed from their defaults win.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fedlora.config import RunConfig
from fedlora.errors import ConfigError
from fedlora.privacy.accounting import (
    epsilon,
    epsilon_estimate,
    noise_multiplier_estimate,
    noise_multiplier_for,
    steps_per_round,
)
from fedlora.privacy.releases import center_release, run_side_releases, training_round_releases
from fedlora.settings import TrainSettings

#: Per task, (marginal, cannot-learn): the federation's ratio above which the
#: plan warns, and at or above which it refuses. The ratio is a worst case
#: (signal spread over all d coordinates), so its scale depends on how
#: concentrated a task's gradients are; each pair is calibrated on measured
#: runs (docs/RESULTS.md).
#:
#: Classifier: every run that learned comfortably planned below 1.0
#: (Rotten Tomatoes ε = 8: 0.17; BBC News ε = 8: 0.71); BBC ε = 4 (1.16)
#: learned on an easy task while the 10 x 230 federation of issue 20 (1.26)
#: diverged; cannot-learn is the geometric middle of BBC ε = 4 and BBC ε = 1
#: (3.66, learned nothing).
#:
#: Causal LM (LoRA on q,k,v,o of SmolLM2, d = 921,600): ε = 8 planned 20.5
#: and learned (response perplexity 30.7 -> 1.50); ε = 1 planned 102 and
#: diverged; cannot-learn is their geometric middle. Two runs: indicative.
THRESHOLDS = {"classification": (1.0, 2.0), "causal-lm": (25.0, 45.0)}
#: The classifier's pair, by name (tests, docs).
MARGINAL, CANNOT_LEARN = THRESHOLDS["classification"]

#: Batch sizes ``dp-recipe=auto`` tries, those that leave at least
#: MIN_STEPS steps an epoch and are no larger than the task's reference batch
#: (a site under 16 examples trains on all of them).
BATCH_CANDIDATES = (16, 32, 64, 128, 256, 512, 1024)
#: Fewest steps an epoch auto plans: one full-batch step a round moves the
#: adapter once, however far; at a linearly scaled rate that overshoots.
MIN_STEPS = 2

#: Per task: (learning rate, batch size) of the measured private recipe with
#: SGD at clip 1.0 (classifier: README recipe; causal LM: bench/sft_utility.py).
#: Auto scales the rate down with the batch, never up: on Rotten Tomatoes
#: SGD at 8 (batch 256-512) collapsed to the majority class (docs/RESULTS.md).
REFERENCE_RECIPE = {"classification": (4.0, 128), "causal-lm": (0.5, 16)}

_AUTO_KEYS = ("batch_size", "learning_rate", "optimizer")


@dataclass(frozen=True)
class SitePlan:
    """One site's planned DP-SGD: its numbers and its noise-to-signal ratios."""

    examples: int
    batch_size: int
    learning_rate: float
    sample_rate: float
    steps_per_round: int
    rounds: int
    noise_multiplier: float
    epsilon: float
    affordable_rounds: int  # of ``rounds``, under the site's cap (``rounds`` if none)
    nsr_step: float
    nsr_round: float


@dataclass(frozen=True)
class FederationPlan:
    """The federation's plan: every site's, the combined ratio and the verdict."""

    sites: tuple[SitePlan, ...]
    trainable: int
    sites_per_round: int
    nsr: float
    verdict: str  # "ok", "marginal" or "cannot-learn"
    advice: tuple[str, ...]
    marginal: float = MARGINAL  # the task's thresholds the verdict used
    cannot_learn: float = CANNOT_LEARN

    @property
    def can_learn(self) -> bool:
        return self.verdict != "cannot-learn"

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def site_sigma(
    cfg: RunConfig,
    examples: int,
    batch_size: int,
    delta: float,
    accountant: str | None = None,
    exact: bool = True,
) -> float:
    """σ that spends the run's target ε (side releases included) at this size:
    the node's own search when ``exact`` (what it will train with, with the
    node's accountant, default the run's), else a fast search over integer
    Rényi orders (for ranking batch sizes and advice)."""
    p = cfg.privacy
    rate, steps = steps_per_round(examples, batch_size, cfg.train.local_epochs)
    if p.dp_noise_multiplier > 0:
        return p.dp_noise_multiplier
    total = steps * cfg.num_server_rounds
    extra = run_side_releases(cfg)
    if exact:
        return noise_multiplier_for(
            p.dp_target_epsilon, delta, rate, total, accountant or p.dp_accountant, extra=extra
        )
    return noise_multiplier_estimate(p.dp_target_epsilon, delta, [(1.0, rate, total)], extra)


def _nsr(sigma: float, trainable: int, batch: float, steps: int) -> tuple[float, float]:
    step = sigma * math.sqrt(trainable) / batch
    return step, step / math.sqrt(steps)


def choose_batch_size(cfg: RunConfig, examples: int, trainable: int, delta: float) -> int:
    """The candidate batch with the lowest ``nsr_round`` at the run's target ε
    (each moves the adapter as far an epoch: the rate scales with the batch)."""
    largest = min(examples // MIN_STEPS, REFERENCE_RECIPE[cfg.task][1])
    fits = [b for b in BATCH_CANDIDATES if b <= largest]
    candidates = fits or [min(examples, BATCH_CANDIDATES[0])]
    best: tuple[float, int] | None = None
    for batch in candidates:
        rate, steps = steps_per_round(examples, batch, cfg.train.local_epochs)
        try:
            sigma = site_sigma(cfg, examples, batch, delta, exact=False)
        except ConfigError:  # this batch cannot reach the target at all
            continue
        nsr = _nsr(sigma, trainable, rate * examples, steps)[1]
        if best is None or nsr < best[0]:
            best = (nsr, batch)
    if best is None:
        raise ConfigError(
            f"dp-target-epsilon={cfg.privacy.dp_target_epsilon} cannot be reached with "
            f"{examples} examples over {cfg.num_server_rounds} rounds at any batch size; "
            "raise the target or lower num-server-rounds"
        )
    return best[1]


def effective_config(cfg: RunConfig, examples: int, trainable: int, delta: float) -> RunConfig:
    """The run config a node trains with: ``dp-recipe=auto``'s choices applied
    to the training settings still at their defaults; ``cfg`` itself otherwise."""
    if not cfg.privacy.auto_recipe:
        return cfg
    defaults = TrainSettings()
    changed = {k for k in _AUTO_KEYS if getattr(cfg.train, k) != getattr(defaults, k)}
    batch = (
        cfg.train.batch_size
        if "batch_size" in changed
        else choose_batch_size(cfg, examples, trainable, delta)
    )
    # The rate and the optimiser go together: a rate set for AdamW means nothing
    # to SGD, so one changed by hand keeps both as set.
    ref_lr, ref_batch = REFERENCE_RECIPE[cfg.task]
    lr, optimizer = ref_lr * min(1.0, batch / ref_batch), "sgd"
    if changed & {"learning_rate", "optimizer"}:
        lr, optimizer = cfg.train.learning_rate, cfg.train.optimizer
    train = dataclasses.replace(cfg.train, batch_size=batch, learning_rate=lr, optimizer=optimizer)
    return dataclasses.replace(cfg, train=train)


def plan_site(
    cfg: RunConfig,
    examples: int,
    trainable: int,
    delta: float,
    cap: float = math.inf,
    exact: bool = True,
) -> SitePlan:
    """One site's plan, with the recipe it will train with (auto or as set)."""
    if cfg.train.max_train_examples > 0:
        examples = min(examples, cfg.train.max_train_examples)
    run = effective_config(cfg, examples, trainable, delta)
    t = run.train
    rate, steps = steps_per_round(examples, t.batch_size, t.local_epochs)
    sigma = site_sigma(run, examples, t.batch_size, delta, exact=exact)
    one_round = training_round_releases(run, sigma, rate, steps)
    side = center_release(run)  # once per run, before round 1

    def spent(rounds: int) -> float:
        history = [*side, *one_round * rounds]
        if exact:
            return epsilon(history, delta, run.privacy.dp_accountant)
        return epsilon_estimate(history, delta)

    rounds = run.num_server_rounds
    affordable = rounds
    if math.isfinite(cap) and spent(rounds) > cap:
        affordable = _largest(lambda r: spent(r) <= cap, 1, rounds - 1)
    nsr_step, nsr_round = _nsr(sigma, trainable, rate * examples, steps)
    return SitePlan(
        examples=examples,
        batch_size=t.batch_size,
        learning_rate=t.learning_rate,
        sample_rate=rate,
        steps_per_round=steps,
        rounds=rounds,
        noise_multiplier=sigma,
        epsilon=spent(rounds),
        affordable_rounds=affordable,
        nsr_step=nsr_step,
        nsr_round=nsr_round,
    )


def sites_per_round(cfg: RunConfig, sites: int) -> int:
    """How many sites Flower samples a round (``fraction-train``, at least ``min-train-nodes``)."""
    return min(sites, max(cfg.min_train_nodes, int(sites * cfg.fraction_train)))


def _verdict(nsr: float, marginal: float, cannot_learn: float) -> str:
    if nsr >= cannot_learn:
        return "cannot-learn"
    return "marginal" if nsr >= marginal else "ok"


def _combined(sites: Sequence[SitePlan], per_round: int) -> float:
    """The federated round's ratio: the noise of the sites' summed updates over
    their summed signals (each site's update is ``lr x T`` clipped steps and
    ``lr x σ√(dT)/B`` of noise, in units of the clip), for ``per_round``
    sites drawn like the average site."""
    signal = sum(s.learning_rate * s.steps_per_round for s in sites)
    noise_sq = sum((s.learning_rate * s.nsr_round * s.steps_per_round) ** 2 for s in sites)
    return math.sqrt(noise_sq / len(sites) * per_round) / (signal / len(sites) * per_round)


def plan_federation(
    cfg: RunConfig,
    site_examples: Sequence[int],
    trainable: int,
    cap: float = math.inf,
    advise: bool = True,
    exact: bool = False,
) -> FederationPlan:
    """The plan of a local-DP run over sites of these sizes (see the module's text).

    ``trainable`` is the number of coordinates DP-SGD noises (the adapter's
    trainable entries: B and the head under FFA-LoRA); ``cap`` is every
    site's ε cap where the planner knows it (simulations). σ comes from the
    fast search (within ~2 % of the node's own, integer Rényi orders) unless ``exact``.
    """
    if not site_examples or min(site_examples) < 1:
        raise ConfigError(f"plan: every site needs >= 1 training example (got {site_examples})")
    if trainable < 1:
        raise ConfigError(f"plan: trainable coordinates must be >= 1 (got {trainable})")
    delta = cfg.privacy.dp_delta
    memo: dict[int, SitePlan] = {}
    sites = tuple(
        memo[n]
        if n in memo
        else memo.setdefault(n, plan_site(cfg, n, trainable, delta, cap, exact))
        for n in site_examples
    )
    per_round = sites_per_round(cfg, len(sites))
    nsr = _combined(sites, per_round)
    advice: tuple[str, ...] = ()
    if advise:
        advice = _advice(cfg, site_examples, trainable, sites, per_round, nsr)
    marginal, cannot = THRESHOLDS[cfg.task]
    verdict = _verdict(nsr, marginal, cannot)
    return FederationPlan(sites, trainable, per_round, nsr, verdict, advice, marginal, cannot)


def _advice(
    cfg: RunConfig,
    site_examples: Sequence[int],
    trainable: int,
    sites: Sequence[SitePlan],
    per_round: int,
    nsr: float,
) -> tuple[str, ...]:
    """What would bring the ratio under the task's marginal threshold, each
    computed, one line each."""
    target = THRESHOLDS[cfg.task][0]
    lines = [
        f"site {i}: its cap affords {s.affordable_rounds} of {s.rounds} rounds; it refuses "
        "round 1 rather than stop part-way (raise its cap, or lower num-server-rounds)"
        for i, s in enumerate(sites)
        if s.affordable_rounds < s.rounds
    ]
    if nsr < target:
        return tuple(lines)

    def replanned(**change: Any) -> float:
        new = dataclasses.replace(cfg, **change)
        return plan_federation(new, site_examples, trainable, advise=False, exact=False).nsr

    rounds = _largest(
        lambda r: replanned(num_server_rounds=r) < target, 1, cfg.num_server_rounds - 1
    )
    if rounds:
        lines.append(f"num-server-rounds={rounds} (now {cfg.num_server_rounds})")
    eps = cfg.privacy.dp_target_epsilon
    if eps > 0:
        for factor in (1.5, 2, 4, 8, 16, 32, 64):
            privacy = dataclasses.replace(cfg.privacy, dp_target_epsilon=eps * factor)
            if replanned(privacy=privacy) < target:
                lines.append(f"dp-target-epsilon={eps * factor:g} (now {eps:g})")
                break
        else:
            lines.append(f"no dp-target-epsilon up to {eps * 64:g} is enough at these sizes")
    more = math.ceil(per_round * (nsr / target) ** 2)
    lines.append(f"{more} sites per round (now {per_round}): the ratio falls as 1/sqrt(sites)")
    fewer = int(trainable * (target / nsr) ** 2)
    lines.append(
        f"at most {fewer:,} trainable coordinates (now {trainable:,}): strategy=ffa-lora, "
        "a lower lora-rank, pooling-layers=1"
    )
    return tuple(lines)


def _largest(ok: Any, low: int, high: int) -> int:
    """The largest x in [low, high] with ok(x), assuming ok is monotone (0: none)."""
    if high < low or not ok(low):
        return 0
    while low < high:
        mid = (low + high + 1) // 2
        if ok(mid):
            low = mid
        else:
            high = mid - 1
    return low


def plan_lines(plan: FederationPlan) -> list[str]:
    """The plan as a person reads it: one line a site, the federation, the advice."""
    out = ["site  examples  batch      lr       q  steps/round  sigma    epsilon  nsr/round"]
    for i, s in enumerate(plan.sites):
        out.append(
            f"{i:>4}  {s.examples:>8}  {s.batch_size:>5}  {s.learning_rate:>6.3g}  "
            f"{s.sample_rate:>6.3f}  {s.steps_per_round:>11}  {s.noise_multiplier:>5.2f}  "
            f"{s.epsilon:>9.3g}  {s.nsr_round:>9.3f}"
        )
    out.append(
        f"federation: {plan.sites_per_round} sites a round, {plan.trainable:,} noised "
        f"coordinates, noise-to-signal {plan.nsr:.2f} -> {plan.verdict} "
        f"(learns below {plan.marginal:g}, cannot at {plan.cannot_learn:g} or above)"
    )
    if plan.advice:
        out.append("what would help:" if plan.nsr >= plan.marginal else "note:")
        out.extend(f"  - {a}" for a in plan.advice)
    return out
