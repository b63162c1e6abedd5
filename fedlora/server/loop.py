"""The federated round loop, written once for simulation and deployment.

Flower's ``Strategy.start`` runs a fixed loop; fedlora needs a few things it
does not do, so the loop lives here and Flower's strategies keep doing the
aggregation math (``configure_*``/``aggregate_*``):

* node sampling derived from ``(seed, round)`` over stable *site keys* (a
  simulation's partition id, a deployment's site name), so a round samples
  the same sites every time whatever node ids the runtime hands out, and
  replies are aggregated in site order (bit-identical sums);
* failures are data: error replies and timeouts are logged with the node and
  reason, the round goes on with the rest, and the run stops cleanly (with a
  reason) when fewer than ``min-train-nodes`` replied;
* after every round: global evaluation, metrics written, checkpoint saved,
  one progress line printed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedlora.config import RunConfig
from fedlora.protocol import METRIC_BYTES_SENT
from fedlora.records import arrays_to_state, nonfinite_key
from fedlora.server.exchange import (
    Exchange,
    SiteRegistry,
    metric_dict,
    name_site,
    reply_metrics,
    sample_nodes,
    sampled_view,
    split_replies,
    wait_for_nodes,
)
from fedlora.server.gate import ReplyLimits, gate_replies
from fedlora.server.stops import RunStopped

log = logging.getLogger("fedlora.server")


EvaluateFn = Callable[[int, ArrayRecord], dict[str, float] | None]
RoundHook = Callable[["RoundOutcome"], None]
ReplyFilter = Callable[[int, list[Message]], tuple[list[Message], list[str]]]


@dataclass
class RoundOutcome:
    """Everything one round produced, for history, checkpoints and progress."""

    server_round: int
    arrays: ArrayRecord
    train_metrics: dict[str, float] = field(default_factory=dict)
    eval_metrics: dict[str, float] = field(default_factory=dict)
    global_metrics: dict[str, float] = field(default_factory=dict)
    sampled: int = 0
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    bytes_uploaded: int = 0
    seconds: float = 0.0
    replies: list[Message] = field(default_factory=list)
    exhausted: list[str] = field(default_factory=list)
    reply_sites: list[str] = field(default_factory=list)


@dataclass
class TrainResult:
    """What a round's training exchange produced (before evaluation)."""

    arrays: ArrayRecord | None  # the new global adapter; None: nothing released
    metrics: dict[str, float]
    contributed: int  # nodes whose update is in the aggregate
    failures: list[str]
    bytes_uploaded: int = 0
    replies: list[Message] = field(default_factory=list)  # empty under SecAgg+
    reply_sites: list[str] = field(default_factory=list)


class TrainStep(Protocol):
    """How one round's training is exchanged with the sampled nodes and aggregated.

    :class:`StrategyStep` (plain rounds, any strategy) and
    :class:`fedlora.server.secagg.SecAggStep` (SecAgg+: the server sees only
    the masked sum) are the two; :func:`run_rounds` is the one loop around them.
    """

    def train(
        self,
        rnd: int,
        arrays: ArrayRecord,
        nodes: list[int],
        sites: SiteRegistry,
        exhausted: set[str],
    ) -> TrainResult:
        """Send ``arrays`` to ``nodes`` for round ``rnd``; return the aggregate.

        Sites that refuse because their own budget is spent go into
        ``exhausted`` (the loop's set), so they are not sampled again.
        """
        ...

    def evaluate(
        self, rnd: int, arrays: ArrayRecord, sites: SiteRegistry
    ) -> tuple[dict[str, float], list[str]]:
        """Federated evaluation (aggregated metrics, failure lines); may be a no-op."""
        ...


class StrategyStep:
    """A plain round: the strategy configures and aggregates; every reply passes
    the reply gate (:mod:`fedlora.server.gate`) and the update filter first."""

    def __init__(
        self,
        strategy: Strategy,
        grid: Grid,
        cfg: RunConfig,
        arrays: ArrayRecord,
        train_config: dict[str, Any] | None = None,
        reply_filter: ReplyFilter | None = None,
    ) -> None:
        self.strategy, self.grid, self.cfg = strategy, grid, cfg
        self.train_config = dict(train_config or {})
        self.reply_filter = reply_filter
        self.limits = ReplyLimits.for_run(cfg, arrays)
        self.exchange: Exchange | None = None

    def _exchange(self, sites: SiteRegistry) -> Exchange:
        if self.exchange is None:
            self.exchange = Exchange(self.grid, sites)
        return self.exchange

    def train(
        self,
        rnd: int,
        arrays: ArrayRecord,
        nodes: list[int],
        sites: SiteRegistry,
        exhausted: set[str],
    ) -> TrainResult:
        """Configure, send, gate, filter and aggregate one round."""
        exchange = self._exchange(sites)
        config = ConfigRecord(dict(self.train_config))
        view = sampled_view(self.grid, nodes)
        messages = list(self.strategy.configure_train(rnd, arrays, config, view))
        replies = exchange.send(messages, self.cfg.round_timeout, rnd, "train")
        ok, failures = split_replies(replies, nodes, sites, exhausted, sent=messages)
        failures.extend(exchange.last_late)
        ok, refused = gate_replies(ok, self.limits)
        failures.extend(name_site(line, sites) for line in refused)
        if self.reply_filter is not None:
            ok, rejected = self.reply_filter(rnd, ok)
            failures.extend(name_site(line, sites) for line in rejected)
        if len(ok) < self.cfg.min_train_nodes:
            return TrainResult(None, {}, len(ok), failures)
        new_arrays, metrics = self.strategy.aggregate_train(rnd, ok)
        return TrainResult(
            arrays=new_arrays,
            metrics=metric_dict(metrics),
            contributed=len(ok),
            failures=failures,
            bytes_uploaded=int(sum(reply_metrics(m).get(METRIC_BYTES_SENT, 0.0) for m in ok)),
            replies=ok,
            reply_sites=[sites.key(m.metadata.src_node_id) for m in ok],
        )

    def evaluate(
        self, rnd: int, arrays: ArrayRecord, sites: SiteRegistry
    ) -> tuple[dict[str, float], list[str]]:
        """Federated evaluation on a seeded sample (``fraction-evaluate`` > 0)."""
        if self.cfg.fraction_evaluate <= 0:
            return {}, []
        cfg, exchange = self.cfg, self._exchange(sites)
        nodes = sample_nodes(
            self.grid.get_node_ids(), sites, cfg.fraction_evaluate, 1, cfg.seed, rnd, "evaluate"
        )
        config = ConfigRecord(dict(self.train_config))
        view = sampled_view(self.grid, nodes)
        messages = list(self.strategy.configure_evaluate(rnd, arrays, config, view))
        replies = exchange.send(messages, cfg.round_timeout, rnd, "evaluate")
        ok, failures = split_replies(replies, nodes, sites, sent=messages)
        ok, refused = gate_replies(ok, self.limits, evaluate=True)
        failures.extend(name_site(line, sites) for line in refused)
        metrics = metric_dict(self.strategy.aggregate_evaluate(rnd, ok)) if ok else {}
        return metrics, [f"evaluate: {f}" for f in failures]


def run_rounds(
    step: TrainStep,
    grid: Grid,
    cfg: RunConfig,
    arrays: ArrayRecord,
    evaluate_fn: EvaluateFn | None,
    on_round: RoundHook,
    first_round: int = 1,
) -> ArrayRecord:
    """Run rounds ``first_round..num_server_rounds``; returns the final arrays.

    The one round loop of plain and SecAgg+ runs alike: wait for nodes, sample
    the sites from ``(seed, round)``, let ``step`` train, refuse a missing or
    non-finite aggregate, evaluate, and hand one :class:`RoundOutcome` to
    ``on_round`` (history, checkpoint, progress: written once, by the caller).

    Raises :class:`RunStopped` (after the last good round was reported) when
    a round cannot go on: too few nodes connected or replying.
    """
    sites = SiteRegistry()
    exhausted: set[str] = set()  # sites whose own privacy budget is spent
    for rnd in range(first_round, cfg.num_server_rounds + 1):
        start = time.perf_counter()
        nodes = _sample_round(grid, cfg, sites, exhausted, rnd)
        result = step.train(rnd, arrays, nodes, sites, exhausted)
        for line in result.failures:
            log.warning("round %d: %s", rnd, line)
        arrays = _accepted(result, rnd, len(nodes), cfg.min_train_nodes)
        outcome = RoundOutcome(
            server_round=rnd,
            arrays=arrays,
            train_metrics=result.metrics,
            sampled=len(nodes),
            ok=result.contributed,
            failures=result.failures,
            bytes_uploaded=result.bytes_uploaded,
            replies=result.replies,
            exhausted=sorted(exhausted),
            reply_sites=result.reply_sites,
        )
        outcome.eval_metrics, eval_failures = step.evaluate(rnd, arrays, sites)
        outcome.failures.extend(eval_failures)
        if evaluate_fn is not None:
            outcome.global_metrics = evaluate_fn(rnd, arrays) or {}
        outcome.seconds = time.perf_counter() - start
        on_round(outcome)
    return arrays


def _sample_round(
    grid: Grid, cfg: RunConfig, sites: SiteRegistry, exhausted: set[str], rnd: int
) -> list[int]:
    """The round's seeded sample of connected sites whose budgets are not spent."""
    wait_for_nodes(grid, cfg.min_train_nodes, cfg.round_timeout)
    # Node start-up (model load) can exceed a short round timeout; the query
    # reads no data, so give it at least a minute.
    sites.refresh(grid, timeout=max(cfg.round_timeout, 60.0))
    eligible = [n for n in grid.get_node_ids() if sites.key(n) not in exhausted]
    if len(eligible) < cfg.min_train_nodes:
        raise RunStopped(
            f"privacy budgets exhausted at {len(exhausted)} site(s) "
            f"({', '.join(sorted(exhausted))}); {len(eligible)} node(s) remain, "
            f"min-train-nodes={cfg.min_train_nodes}"
        )
    return sample_nodes(
        eligible, sites, cfg.fraction_train, cfg.min_train_nodes, cfg.seed, rnd, "train"
    )


def _accepted(result: TrainResult, rnd: int, sampled: int, minimum: int) -> ArrayRecord:
    """The round's aggregate, or :class:`RunStopped` when it must not be kept."""
    if result.contributed < minimum:
        raise RunStopped(
            f"round {rnd}: only {result.contributed} of {sampled} sampled nodes replied "
            f"with an update (min-train-nodes={minimum}); failures: " + "; ".join(result.failures)
        )
    if result.arrays is None:
        # Never a silent no-op round (Flower's DP wrappers return None
        # when they will not release): stop, keeping the last good adapter.
        raise RunStopped(
            f"round {rnd}: the strategy produced no global update from {result.contributed} "
            "accepted replies; failures: " + ("; ".join(result.failures) or "none")
        )
    bad = nonfinite_key(arrays_to_state(result.arrays))
    if bad is not None:
        raise RunStopped(
            f"round {rnd}: the aggregate has non-finite values in {bad!r}; the round "
            "is discarded and the last finite global adapter kept"
        )
    return result.arrays
