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

import hashlib
import logging
import math
import random
import re
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedlora.config import RunConfig
from fedlora.models.centering import combine, sum_clip
from fedlora.protocol import (
    ARRAYS_KEY,
    CONFIG_KEY,
    ERROR_CODE_BUDGET,
    KEY_FEATURE_COUNT,
    KEY_FEATURE_SUM,
    METRIC_ACCURACY,
    METRIC_BYTES_SENT,
    METRIC_LOSS,
    QUERY_FEATURE_STATS,
    QUERY_SITE,
    SITE_KEY,
    STATS_RECORD,
)
from fedlora.records import arrays_to_state, nonfinite_key
from fedlora.server.gate import ReplyLimits, check_statistics_reply, gate_replies

log = logging.getLogger("fedlora.server")


EvaluateFn = Callable[[int, ArrayRecord], dict[str, float] | None]
RoundHook = Callable[["RoundOutcome"], None]
ReplyFilter = Callable[[int, list[Message]], tuple[list[Message], list[str]]]


class RunStopped(Exception):
    """The run ended early for a stated reason (not a crash)."""


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


class _SampledGrid:
    """A view of the grid whose connected nodes are the ones fedlora sampled.

    Flower strategies sample with the global ``random`` module; handing them
    this view with ``fraction=1`` leaves the choice to the seeded loop.
    """

    def __init__(self, grid: Grid, node_ids: Sequence[int]):
        self._grid = grid
        self._nodes = list(node_ids)

    def get_node_ids(self) -> list[int]:
        return list(self._nodes)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


def _view(grid: Grid, node_ids: Sequence[int]) -> Grid:
    return cast(Grid, _SampledGrid(grid, node_ids))


def derive_seed(*parts: object) -> int:
    """A stable 63-bit seed from parts (Python's hash() is salted per process)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


class SiteRegistry:
    """Maps runtime node ids to stable site keys by asking each node once."""

    def __init__(self) -> None:
        self.keys: dict[int, str] = {}

    def refresh(self, grid: Grid, timeout: float) -> None:
        unknown = [n for n in grid.get_node_ids() if n not in self.keys]
        if not unknown:
            return
        content = RecordDict({CONFIG_KEY: ConfigRecord({QUERY_SITE: 1})})
        msgs = [
            Message(content=content, dst_node_id=n, message_type=MessageType.QUERY) for n in unknown
        ]
        for reply in grid.send_and_receive(msgs, timeout=timeout):
            node = reply.metadata.src_node_id
            if reply.has_error() or SITE_KEY not in reply.content.config_records:
                continue
            self.keys[node] = str(reply.content.config_records[SITE_KEY][SITE_KEY])
        for node in unknown:
            self.keys.setdefault(node, f"node-{node}")

    def key(self, node_id: int) -> str:
        return self.keys.get(node_id, f"node-{node_id}")


def sample_nodes(
    node_ids: Iterable[int],
    sites: SiteRegistry,
    fraction: float,
    minimum: int,
    seed: int,
    server_round: int,
    purpose: str,
) -> list[int]:
    """Seeded sample of ``max(ceil(fraction*n), minimum)`` nodes, in site order."""
    ordered = sorted(node_ids, key=sites.key)
    k = min(len(ordered), max(math.ceil(fraction * len(ordered)), minimum))
    rng = random.Random(derive_seed(seed, server_round, purpose))
    chosen = rng.sample(ordered, k)
    return sorted(chosen, key=sites.key)


class Exchange:
    """Push messages, pull replies with a progress bar, drop and log late ones.

    Flower's ``send_and_receive`` blocks silently until every reply or the
    timeout. This keeps the same semantics but reports each reply as it
    arrives (one terminal bar per round) and remembers the ids it gave up on,
    so a straggler's reply that turns up later is logged and dropped instead
    of leaking into another round.
    """

    def __init__(self, grid: Grid, sites: SiteRegistry, poll: float = 0.2):
        self.grid = grid
        self.sites = sites
        self.poll = poll
        self.abandoned: dict[str, tuple[int, int]] = {}  # msg id -> (round, node)
        self.last_late: list[str] = []  # late replies dropped by the last send()

    def drain_late(self) -> list[str]:
        """Pull replies to messages an earlier round stopped waiting for."""
        if not self.abandoned:
            return []
        lines = []
        for msg in self.grid.pull_messages(list(self.abandoned)):
            rnd, node = self.abandoned.pop(msg.metadata.reply_to_message_id, (0, 0))
            lines.append(
                f"late reply from {self.sites.key(node)} (node {node}) for round {rnd} dropped"
            )
        return lines

    def _log_late(self) -> None:
        for line in self.drain_late():
            log.warning("%s", line)
            self.last_late.append(line)

    def send(
        self, messages: list[Message], timeout: float, server_round: int, label: str
    ) -> list[Message]:
        """Replies that arrived within ``timeout`` seconds."""
        self.last_late = []
        self._log_late()
        dst = {}
        ids = []
        for mid, msg in zip(self.grid.push_messages(messages), messages, strict=True):
            dst[mid] = msg.metadata.dst_node_id
            ids.append(mid)
        pending = set(ids)
        replies: list[Message] = []
        bar = _ProgressBar(f"round {server_round} {label}", len(ids))
        deadline = time.monotonic() + timeout
        while pending and time.monotonic() < deadline:
            for msg in self.grid.pull_messages(list(pending)):
                pending.discard(msg.metadata.reply_to_message_id)
                replies.append(msg)
                bar.update(len(replies))
            self._log_late()
            if pending:
                time.sleep(self.poll)
        bar.close()
        for mid in pending:
            self.abandoned[mid] = (server_round, dst[mid])
        return replies


class _ProgressBar:
    """A one-line ``[#####.....] 5/10 replies`` bar, only on a terminal."""

    def __init__(self, label: str, total: int):
        self.label, self.total = label, total
        self.enabled = sys.stderr.isatty() and total > 0
        self.update(0)

    def update(self, done: int) -> None:
        if not self.enabled:
            return
        width = 30
        filled = int(width * done / self.total)
        sys.stderr.write(
            f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} replies"
        )
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\r" + " " * (len(self.label) + 50) + "\r")
            sys.stderr.flush()


def wait_for_nodes(grid: Grid, minimum: int, timeout: float) -> list[int]:
    """Block until ``minimum`` nodes are connected, or stop with a reason."""
    deadline = time.monotonic() + timeout
    announced = False
    while len(nodes := list(grid.get_node_ids())) < minimum:
        if time.monotonic() > deadline:
            raise RunStopped(
                f"only {len(nodes)} node(s) connected after {timeout:.0f} s; "
                f"min-train-nodes={minimum}"
            )
        if not announced:
            log.info("waiting for nodes: %d connected, need %d", len(nodes), minimum)
            announced = True
        time.sleep(1.0)
    return nodes


def split_replies(
    replies: Iterable[Message],
    expected: Sequence[int],
    sites: SiteRegistry,
    exhausted: set[str] | None = None,
    sent: Sequence[Message] = (),
) -> tuple[list[Message], list[str]]:
    """Good replies in site order, and one human-readable line per failure.

    Sites that refused because their own privacy budget is spent are added
    to ``exhausted`` so they are not sampled again. A reply is attributed to
    the node its request went to (``sent``): when a node dies, the SuperLink
    answers "Node Unavailable" itself, from its own id.
    """
    dst_of = {m.metadata.message_id: m.metadata.dst_node_id for m in sent}
    ok: list[Message] = []
    failures: list[str] = []
    seen: set[int] = set()
    for msg in replies:
        node = dst_of.get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id)
        seen.add(node)
        if msg.has_error() and msg.error.code == ERROR_CODE_BUDGET and exhausted is not None:
            exhausted.add(sites.key(node))
        if msg.has_error():
            failures.append(f"{sites.key(node)} (node {node}): {msg.error.reason}")
        else:
            ok.append(msg)
    for node in expected:
        if node not in seen:
            failures.append(f"{sites.key(node)} (node {node}): no reply before timeout")
    ok.sort(key=lambda m: sites.key(m.metadata.src_node_id))
    return ok, failures


def _name_site(line: str, sites: SiteRegistry) -> str:
    """Prefix a validator's "node N: ..." line with the node's site key."""
    match = re.match(r"node (\d+)", line)
    return f"{sites.key(int(match.group(1)))} ({line})" if match else line


def reply_metrics(msg: Message) -> dict[str, float]:
    """All scalar metrics of a reply's (first) MetricRecord."""
    return _metric_dict(next(iter(msg.content.metric_records.values()), None))


def _metric_dict(record: MetricRecord | None) -> dict[str, float]:
    if record is None:
        return {}
    return {k: float(v) for k, v in record.items() if isinstance(v, (int, float))}


def run_rounds(
    strategy: Strategy,
    grid: Grid,
    arrays: ArrayRecord,
    cfg: RunConfig,
    evaluate_fn: EvaluateFn | None,
    on_round: RoundHook,
    first_round: int = 1,
    train_config: dict[str, Any] | None = None,
    reply_filter: ReplyFilter | None = None,
) -> ArrayRecord:
    """Run rounds ``first_round..num_server_rounds``; returns the final arrays.

    Raises :class:`RunStopped` (after the last good round was reported) when
    a round cannot go on: too few nodes connected or replying.
    """
    sites = SiteRegistry()
    exchange = Exchange(grid, sites)
    exhausted: set[str] = set()
    limits = ReplyLimits.for_run(cfg, arrays)
    for rnd in range(first_round, cfg.num_server_rounds + 1):
        start = time.perf_counter()
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
        nodes = sample_nodes(
            eligible,
            sites,
            cfg.fraction_train,
            cfg.min_train_nodes,
            cfg.seed,
            rnd,
            "train",
        )
        config = ConfigRecord(dict(train_config or {}))
        messages = list(strategy.configure_train(rnd, arrays, config, _view(grid, nodes)))
        replies = exchange.send(messages, cfg.round_timeout, rnd, "train")
        ok, failures = split_replies(replies, nodes, sites, exhausted, sent=messages)
        failures.extend(exchange.last_late)
        ok, refused = gate_replies(ok, limits)
        failures.extend(_name_site(line, sites) for line in refused)
        if reply_filter is not None:
            ok, rejected = reply_filter(rnd, ok)
            failures.extend(_name_site(line, sites) for line in rejected)
        for line in failures:
            log.warning("round %d: %s", rnd, line)
        if len(ok) < cfg.min_train_nodes:
            raise RunStopped(
                f"round {rnd}: only {len(ok)} of {len(nodes)} sampled nodes replied "
                f"with an update (min-train-nodes={cfg.min_train_nodes}); failures: "
                + "; ".join(failures)
            )
        new_arrays, train_metrics = strategy.aggregate_train(rnd, ok)
        if new_arrays is None:
            # Never a silent no-op round (Flower's DP wrappers return None
            # when they will not release): stop, keeping the last good adapter.
            raise RunStopped(
                f"round {rnd}: the strategy produced no global update from {len(ok)} "
                "accepted replies; failures: " + ("; ".join(failures) or "none")
            )
        bad = nonfinite_key(arrays_to_state(new_arrays))
        if bad is not None:
            raise RunStopped(
                f"round {rnd}: the aggregate has non-finite values in {bad!r}; the round "
                "is discarded and the last finite global adapter kept"
            )
        arrays = new_arrays
        outcome = RoundOutcome(
            server_round=rnd,
            arrays=arrays,
            train_metrics=_metric_dict(train_metrics),
            sampled=len(nodes),
            ok=len(ok),
            failures=failures,
            bytes_uploaded=int(sum(reply_metrics(m).get(METRIC_BYTES_SENT, 0.0) for m in ok)),
            replies=ok,
            exhausted=sorted(exhausted),
            reply_sites=[sites.key(m.metadata.src_node_id) for m in ok],
        )
        if cfg.fraction_evaluate > 0:
            eval_nodes = sample_nodes(
                grid.get_node_ids(), sites, cfg.fraction_evaluate, 1, cfg.seed, rnd, "evaluate"
            )
            eval_msgs = list(
                strategy.configure_evaluate(
                    rnd, arrays, ConfigRecord(dict(train_config or {})), _view(grid, eval_nodes)
                )
            )
            eval_ok, eval_fail = split_replies(
                exchange.send(eval_msgs, cfg.round_timeout, rnd, "evaluate"),
                eval_nodes,
                sites,
                sent=eval_msgs,
            )
            eval_ok, eval_refused = gate_replies(eval_ok, limits, evaluate=True)
            eval_fail.extend(_name_site(line, sites) for line in eval_refused)
            outcome.failures.extend(f"evaluate: {f}" for f in eval_fail)
            if eval_ok:
                outcome.eval_metrics = _metric_dict(strategy.aggregate_evaluate(rnd, eval_ok))
        if evaluate_fn is not None:
            outcome.global_metrics = evaluate_fn(rnd, arrays) or {}
        outcome.seconds = time.perf_counter() - start
        on_round(outcome)
    return arrays


def measure_feature_center(grid: Grid, arrays: ArrayRecord, cfg: RunConfig) -> np.ndarray:
    """Ask every connected node for its sentence-vector sum and count; return
    the federation's mean vector (feature-centering, before round 1).

    Nodes that fail or refuse (budget, data) are left out and logged; fewer
    than ``min-train-nodes`` answers stop the run, as a round would.
    """
    nodes = wait_for_nodes(grid, cfg.min_train_nodes, cfg.round_timeout)
    sites = SiteRegistry()
    sites.refresh(grid, timeout=max(cfg.round_timeout, 60.0))
    content = RecordDict({ARRAYS_KEY: arrays, CONFIG_KEY: ConfigRecord({QUERY_FEATURE_STATS: 1})})
    messages = [
        Message(content=content, dst_node_id=n, message_type=MessageType.QUERY) for n in nodes
    ]
    replies = grid.send_and_receive(messages, timeout=max(cfg.round_timeout, 60.0))
    ok, failures = split_replies(replies, nodes, sites, sent=messages)
    keys = frozenset({KEY_FEATURE_SUM, KEY_FEATURE_COUNT})
    checked = []
    for m in ok:
        try:
            reason = check_statistics_reply(m, STATS_RECORD, keys)
        except Exception as exc:  # a reply no check foresaw: drop it, say why
            reason = f"reply could not be checked ({type(exc).__name__})"
        if reason is None and m.content.array_records[STATS_RECORD][KEY_FEATURE_COUNT].shape != (
            1,
        ):
            reason = "feature-count must hold one number"
        if reason is None:
            checked.append(m)
        else:
            failures.append(f"{sites.key(m.metadata.src_node_id)}: statistics rejected: {reason}")
    sizes = {m.content.array_records[STATS_RECORD][KEY_FEATURE_SUM].shape for m in checked}
    if len(sizes) > 1:
        # Sums of different lengths cannot be combined: keep the most common.
        common = max(
            sizes,
            key=lambda s: sum(
                m.content.array_records[STATS_RECORD][KEY_FEATURE_SUM].shape == s for m in checked
            ),
        )
        for m in checked:
            if m.content.array_records[STATS_RECORD][KEY_FEATURE_SUM].shape != common:
                failures.append(
                    f"{sites.key(m.metadata.src_node_id)}: statistics rejected: sum of shape "
                    f"{m.content.array_records[STATS_RECORD][KEY_FEATURE_SUM].shape}, "
                    f"others {common}"
                )
        checked = [
            m
            for m in checked
            if m.content.array_records[STATS_RECORD][KEY_FEATURE_SUM].shape == common
        ]
    ok = checked
    for line in failures:
        log.warning("feature statistics: %s", line)
    if len(ok) < cfg.min_train_nodes:
        raise RunStopped(
            f"feature statistics: only {len(ok)} of {len(nodes)} nodes answered "
            f"(min-train-nodes={cfg.min_train_nodes}); failures: " + "; ".join(failures)
        )
    records = [m.content.array_records[STATS_RECORD] for m in ok]
    center = combine(
        [r[KEY_FEATURE_SUM].numpy() for r in records],
        [float(r[KEY_FEATURE_COUNT].numpy()[0]) for r in records],
    )
    norm = float(np.linalg.norm(center))
    log.info(
        "feature centre from %d node(s): norm %.3f over %d features", len(ok), norm, center.size
    )
    if cfg.privacy.dp_mode == "local":
        counts = sum(float(r[KEY_FEATURE_COUNT].numpy()[0]) for r in records)
        noise = centre_noise_norm(cfg, len(ok), center.size, counts)
        if noise > 0.5 * norm:
            log.warning(
                "feature centre is mostly noise: its expected noise norm %.2f is over half "
                "its norm %.2f (%d nodes, ~%d examples in all). A noisy centre can make the "
                "head worse than none: set feature-centering=false, or lower dp-center-noise "
                "or feature-center-clip",
                noise,
                norm,
                len(ok),
                int(counts),
            )
    return center


def centre_noise_norm(cfg: RunConfig, nodes: int, features: int, examples: float) -> float:
    """Expected L2 norm of the DP noise in the centre: each node adds N(0, (σ√2R)²)
    per coordinate to its sum, and the total is divided by the example count."""
    std = cfg.privacy.dp_center_noise * math.sqrt(2.0) * sum_clip(cfg)
    return std * math.sqrt(nodes * features) / max(examples, 1.0)


def progress_line(outcome: RoundOutcome, total_rounds: int) -> str:
    """One terminal line per round."""
    g = outcome.global_metrics
    parts = [f"{outcome.ok}/{outcome.sampled} clients ok"]
    if METRIC_ACCURACY in g:
        parts.append(f"global acc {g[METRIC_ACCURACY]:.3f}")
    if METRIC_LOSS in g:
        parts.append(f"loss {g[METRIC_LOSS]:.3f}")
    parts.append(f"{outcome.bytes_uploaded / 1e6:.2f} MB up")
    parts.append(f"{outcome.seconds:.1f} s")
    return f"[round {outcome.server_round}/{total_rounds}] " + " · ".join(parts)
