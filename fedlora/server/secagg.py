"""Secure aggregation of adapter updates with Flower's SecAgg+.

SecAgg+ (Bell et al., 2020, https://arxiv.org/abs/2009.14019) lets the
server learn the weighted *sum* of the nodes' updates and nothing about any
single one, as long as it does not collude with ``reconstruction_threshold``
of a node's neighbours, and survives nodes dropping out mid-round.

How it runs from a Message-API ServerApp (Flower 1.41)
------------------------------------------------------
Flower 1.41 ships SecAgg+ only as a legacy workflow:
``flwr.server.workflow.SecAggPlusWorkflow`` runs *one* fit round against a
Message-API :class:`~flwr.serverapp.Grid` and a
:class:`~flwr.server.compat.LegacyContext` that holds a legacy strategy and a
client manager; the nodes need ``flwr.client.mod.secaggplus_mod``.
``DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(...))`` would also work,
but it asks a random node for initial parameters, evaluates with the legacy
strategy and samples with the global ``random`` module. So fedlora calls the
workflow once per round itself (:func:`run_secagg_rounds`), with a fresh
context whose client manager holds exactly the nodes fedlora sampled and a
small legacy ``FedAvg`` subclass that only collects the unmasked result.
The nodes' side is :mod:`fedlora.client.secagg`.

What fedlora adds: tensor names on a wire that only knows ordered lists;
updates (``trained - global``) instead of adapters; the adapter's dtypes
restored; one "node <id>: <stage>: <reason>" line per node that dropped out;
settings checked before a round starts; and :func:`aggregate_error_bound`.

The quantization, exactly (``secaggplus_mod`` / ``SecAggPlusWorkflow``)
----------------------------------------------------------------------
Write C = ``clipping_range``, Q = ``quantization_range``, M =
``modulus_range``, W = ``max_weight``, and for node i: w_i its example count
and Δ_i its update. Node i computes ``dq_i = round(w_i / W * Q) / Q`` and
sends, masked, ``q_i = stochastic_round((clip(dq_i * Δ_i, -C, C) + C) * Q / (2C))``
(integers in [0, Q]) and ``round(w_i / W * Q)``. The server unmasks the sums
modulo M and returns

    sum_i dq_i * clip(...)_i / sum_i dq_i  +  (2C / Q) * sum_i e_i / sum_i dq_i,

with e_i in (-1, 1) the rounding errors (zero-mean: stochastic rounding).
Hence, per tensor entry:

* the step is ``2C / Q``; the error of the mean is at most
  ``n * 2C * W / (Q * sum_i w_i)``, which is ``2C / Q`` when all n nodes
  have W examples. **Overstating W by k multiplies the error by k**: set
  ``max_weight`` to the largest example count you expect (fedlora caps it
  with ``max-train-examples``), not to "something big";
* clipping acts on ``dq_i * Δ_i``, i.e. on Δ_i at ``C * W / w_i``: the node
  with W examples is clipped at C, smaller nodes more leniently. Clipping is
  silent and biased (a clipped entry is pulled towards zero), so each node
  reports the share of entries it will clip (``secagg-clipped-fraction``);
* a node with ``w_i > W`` overflows the masked sum; nodes refuse to take part;
* the sum must stay below M: ``n * Q < M`` (n < 1024 with the defaults).

LoRA's scales, and why updates are sent
---------------------------------------
LoRA A starts as U(±1/sqrt(fan_in)) (kaiming-uniform, a=sqrt(5)): ±0.051 for
MiniLM's 384 inputs, ±0.036 for 768. B starts at exactly zero and stays small
(1e-3..1e-2 after a few rounds at lr 3e-3), and the classifier head starts
around N(0, 0.02). Masking the adapter itself would need C above the largest
entry anywhere (A's bound, the head's tail) plus the drift of training, and a
C that is too small would clip the *model*. An update's scale is the
optimiser's instead: AdamW moves an entry by about ``lr`` per step (at most
~3 lr in pathological steps), so ``|Δ| <~ lr * local_steps`` for A, B and the
head alike. The default C = 1 covers lr 3e-3 for ~300 typical steps (~100
at Adam's worst-case 3.16 lr per step with the default betas); its step
2C/Q = 4.8e-7 is far below B's scale. Aggregating updates is exactly FedAvg:
``mean_i(global + Δ_i) = global + mean_i(Δ_i)``.

With differential privacy
-------------------------
* Quantization error is additive noise, zero-mean and bounded (|e| < 1 step
  per node), but it is *not* DP noise: it is not calibrated, and it adds
  nothing to ε.
* With local DP (DP-SGD at each node) the noise is already inside Δ_i and C
  must cover the *noised* update. With AdamW that is still about
  ``lr * steps`` (Adam normalises the noisy gradient: the noise changes the
  direction of a step more than its size); with plain SGD each step adds
  N(0, (lr·σ·max_grad_norm/batch)²) per entry, so size C for it. Clipping
  noised values is post-processing (ε is unchanged) but it truncates the
  noise and pulls the signal towards zero; watch ``secagg-clipped-fraction``.
* Central DP needs per-update clipping the server cannot do on masked
  updates: only the client-side clipping variants (Flower's
  ``DifferentialPrivacyClientSide*`` with the nodes' clipping mod) fit, and
  the server then sees the clean sum before it adds noise. SecAgg+ protects
  single updates from the server, central DP protects the released adapter
  from its readers. Protecting against the server too needs each node to add
  its share of the noise before masking (distributed DP), with C covering
  Δ plus about 4 standard deviations of that noise.

What the server still learns
----------------------------
The weighted mean of the sampled nodes' updates; each node's example count
and training metrics (sent in clear beside the masked vector); who took
part and who dropped out. Flower's implementation assumes an
honest-but-curious server: it has no consistency round, so a server that
lies about who dropped out could ask some neighbours for a node's mask seed
and others for its key share. A reconstruction threshold above half the
shares (enforced here) makes that impossible, because each neighbour answers
one unmask request per round. With n nodes, the other n-1 together can
always compute the n-th node's update from two consecutive global adapters,
and with 2 nodes each learns the other's: at least 3 nodes are required.

Server-side update validation (:mod:`fedlora.server.validation`) cannot run
under SecAgg+; the clipping range is the only per-node bound.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common import FitRes, Parameters, Scalar, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.server_config import ServerConfig
from flwr.server.strategy import FedAvg
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid

from fedlora.errors import ConfigError, FedloraError
from fedlora.protocol import (
    KEY_SERVER_ROUND,
    METRIC_ACCURACY,
    METRIC_BYTES_SENT,
    METRIC_LOSS,
    SECAGG_CLIPPING_KEY,
    SECAGG_MAX_WEIGHT_KEY,
    SECAGG_NAMES_KEY,
)
from fedlora.records import State, arrays_to_state, state_to_arrays
from fedlora.server.exchange import SiteRegistry
from fedlora.server.loop import TrainResult, run_rounds

log = logging.getLogger("fedlora.server")

MIN_SECAGG_NODES = 3


class SecureAggregationFailed(FedloraError, RuntimeError):
    """A SecAgg+ round could not produce an aggregate (too many dropouts)."""


@dataclass(frozen=True)
class SecAggSettings:
    """SecAgg+ parameters; see the module docstring for how they interact."""

    num_shares: float = field(
        default=1.0,
        metadata={"help": "shares per node: a fraction of the sampled nodes, or a count > 2"},
    )
    reconstruction_threshold: float = field(
        default=2 / 3,
        metadata={"help": "shares needed to unmask: a fraction in (0.5, 1] or a count"},
    )
    clipping_range: float = field(
        default=1.0, metadata={"help": "C: updates are clipped to +-C (after weighting)"}
    )
    quantization_range: int = field(default=2**22, metadata={"help": "Q: integer levels"})
    modulus_range: int = field(default=2**32, metadata={"help": "M: mask modulus, 2**k"})
    max_weight: float = field(
        default=1000.0,
        metadata={"help": "W: the largest example count a node may report"},
    )
    timeout: float | None = field(
        default=None, metadata={"help": "seconds to wait for each protocol stage"}
    )

    def __post_init__(self) -> None:
        t, s = self.reconstruction_threshold, self.num_shares
        if isinstance(t, float) and not 0.5 < t <= 1:
            raise ConfigError(
                f"secagg reconstruction_threshold={t}: a fraction must be in (0.5, 1]; at "
                "or below half the shares a lying server can unmask a single update"
            )
        if isinstance(t, int) and isinstance(s, int) and not s / 2 < t < s:
            raise ConfigError(
                f"secagg reconstruction_threshold={t} with num_shares={s}: need "
                f"{s / 2:g} < threshold < {s}"
            )
        if not self.clipping_range > 0 or not self.max_weight > 0:
            raise ConfigError(
                f"secagg clipping_range={self.clipping_range}, max_weight={self.max_weight}: "
                "both must be positive"
            )
        if self.modulus_range <= self.quantization_range:
            raise ConfigError(
                f"secagg modulus_range={self.modulus_range} must exceed "
                f"quantization_range={self.quantization_range}"
            )
        # Flower's own checks (power of two, types) run here too, with its messages.
        self.workflow()

    def workflow(self) -> SecAggPlusWorkflow:
        """Flower's workflow for one round with these settings."""
        return SecAggPlusWorkflow(
            num_shares=self.num_shares,
            reconstruction_threshold=self.reconstruction_threshold,
            max_weight=self.max_weight,
            clipping_range=self.clipping_range,
            quantization_range=self.quantization_range,
            modulus_range=self.modulus_range,
            timeout=self.timeout,
        )

    def check_nodes(self, n: int) -> None:
        """Refuse node counts that SecAgg+ cannot protect or cannot sum."""
        if n < MIN_SECAGG_NODES:
            raise ConfigError(
                f"secure aggregation over {n} node(s): with 2 nodes each learns the other's "
                f"update from the global adapter; use at least {MIN_SECAGG_NODES} "
                "(min-train-nodes >= 3)"
            )
        if n * self.quantization_range >= self.modulus_range:
            raise ConfigError(
                f"{n} nodes * quantization_range {self.quantization_range} reaches "
                f"modulus_range {self.modulus_range}: the masked sum would wrap around"
            )


@dataclass
class SecAggRound:
    """What one secure round produced, for the caller's history and checkpoint."""

    server_round: int
    state: State
    sampled: list[int]
    contributed: list[int]
    num_examples: dict[int, int]
    metrics: dict[int, dict[str, Scalar]]
    failures: list[str]
    seconds: float


def aggregate_error_bound(
    num_examples: Sequence[int], max_abs: float, settings: SecAggSettings
) -> float:
    """Worst-case per-entry gap between SecAgg+'s mean and the exact FedAvg mean.

    Parameters
    ----------
    num_examples : sequence of int
        The contributing nodes' example counts (their weights).
    max_abs : float
        The largest absolute update entry (no clipping assumed: each node's
        ``w_i / W * max_abs`` must stay within ``clipping_range``).
    settings : SecAggSettings

    Returns
    -------
    float
        ``n * 2C / (Q * sum dq_i)`` from rounding the entries, plus
        ``2 * max_abs * max_i 1 / (2 * round(w_i/W * Q))`` from rounding the
        weights (see the module docstring).
    """
    q, c, w_max = settings.quantization_range, settings.clipping_range, settings.max_weight
    levels = [round(w / w_max * q) for w in num_examples]
    if min(levels) <= 0:
        raise ConfigError("a node's weight rounds to 0 levels; lower max_weight")
    entries = len(levels) * 2 * c / q / (sum(levels) / q)
    weights = 2 * max_abs * max(1 / (2 * lv) for lv in levels)
    return entries + weights


def secagg_exchange(
    grid: Grid,
    state: State,
    nodes: Sequence[int],
    rnd: int,
    num_rounds: int,
    settings: SecAggSettings,
    train_config: Mapping[str, Scalar] | None = None,
    min_nodes: int = MIN_SECAGG_NODES,
) -> tuple[State, SecAggRound]:
    """One round of FedAvg over SecAgg+ with ``nodes``; the new adapter and what happened.

    Raises
    ------
    SecureAggregationFailed
        The round lost so many nodes that the aggregate could not be
        unmasked, or fewer than ``min_nodes`` contributed.
    """
    start = time.perf_counter()
    names = list(state)
    nodes = sorted(nodes)
    settings.check_nodes(len(nodes))
    recording = _RecordingGrid(grid)
    config: dict[str, Scalar] = {
        **dict(train_config or {}),
        KEY_SERVER_ROUND: rnd,
        SECAGG_NAMES_KEY: json.dumps(names),
        SECAGG_CLIPPING_KEY: float(settings.clipping_range),
        SECAGG_MAX_WEIGHT_KEY: float(settings.max_weight),
    }
    collector = _Collector(len(nodes), config)
    context = _legacy_context(recording, nodes, collector, rnd, num_rounds)
    context.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord([state[n] for n in names])
    settings.workflow()(cast(Grid, recording), context)
    failures = recording.failure_lines()
    if collector.mean is None:
        raise SecureAggregationFailed(
            f"round {rnd}: secure aggregation halted (too few nodes left to unmask; "
            f"threshold {settings.reconstruction_threshold} of the shares); failures: "
            + ("; ".join(failures) or "none reported")
        )
    if len(collector.results) < min_nodes:
        raise SecureAggregationFailed(
            f"round {rnd}: only {len(collector.results)} node(s) contributed "
            f"(min {min_nodes}); failures: " + "; ".join(failures)
        )
    new_state = _apply(state, names, collector.mean)
    contributed = sorted(node for node, _, _ in collector.results)
    return new_state, SecAggRound(
        server_round=rnd,
        state=new_state,
        sampled=list(nodes),
        contributed=contributed,
        num_examples={node: n for node, n, _ in collector.results},
        metrics={node: m for node, _, m in collector.results},
        failures=failures,
        seconds=time.perf_counter() - start,
    )


class SecAggStep:
    """A SecAgg+ round as the one loop's train step (:class:`fedlora.server.loop.TrainStep`).

    The loop samples the sites, checks the aggregate and evaluates, exactly as
    in a plain round; this step runs the protocol and reports the clear
    figures (example counts, loss, accuracy, bytes) beside the masked sum.
    ``frozen`` tensors (FFA-LoRA's A) are kept bit-for-bit rather than
    trusting a quantised zero update. ``on_exchange`` sees each round's
    :class:`SecAggRound` (the protocol-level record).
    """

    def __init__(
        self,
        grid: Grid,
        settings: SecAggSettings,
        num_rounds: int,
        *,
        min_nodes: int = MIN_SECAGG_NODES,
        train_config: Mapping[str, Scalar] | None = None,
        frozen: Iterable[str] = (),
        on_exchange: Callable[[SecAggRound], None] | None = None,
    ) -> None:
        settings.check_nodes(min_nodes)
        self.grid, self.settings, self.num_rounds = grid, settings, num_rounds
        self.min_nodes = min_nodes
        self.train_config = dict(train_config or {})
        self.frozen = list(frozen)
        self.on_exchange = on_exchange

    def train(
        self, rnd: int, arrays: ArrayRecord, nodes: list[int], sites: SiteRegistry
    ) -> TrainResult:
        """Run the protocol with ``nodes``; the unmasked mean applied to ``arrays``."""
        state = arrays_to_state(arrays)
        if not state:
            raise ConfigError("initial adapter state is empty")
        new_state, result = secagg_exchange(
            self.grid,
            state,
            nodes,
            rnd,
            self.num_rounds,
            self.settings,
            self.train_config,
            self.min_nodes,
        )
        new_state.update({n: state[n] for n in self.frozen if n in state})
        if self.on_exchange is not None:
            self.on_exchange(result)
        return TrainResult(
            arrays=state_to_arrays(new_state),
            metrics=_weighted_metrics(result),
            contributed=len(result.contributed),
            failures=list(result.failures),
            bytes_uploaded=int(
                sum(_clear(result, n, METRIC_BYTES_SENT) for n in result.contributed)
            ),
        )

    def evaluate(
        self, rnd: int, arrays: ArrayRecord, sites: SiteRegistry
    ) -> tuple[dict[str, float], list[str]]:
        """No federated evaluation under SecAgg+ (the server evaluates centrally)."""
        return {}, []


def _clear(result: SecAggRound, node: int, key: str) -> float:
    """A figure node ``node`` sent in clear beside its masked vector (0 if absent)."""
    value = result.metrics.get(node, {}).get(key, 0.0)
    return float(value) if isinstance(value, int | float) else 0.0


def _weighted_metrics(result: SecAggRound) -> dict[str, float]:
    """Example-weighted loss and accuracy from the figures nodes send in clear."""
    total = sum(result.num_examples.get(n, 0) for n in result.contributed) or 1
    return {
        key: sum(_clear(result, n, key) * result.num_examples.get(n, 0) for n in result.contributed)
        / total
        for key in (METRIC_LOSS, METRIC_ACCURACY)
    }


def run_secagg_rounds(
    grid: Grid,
    initial: Mapping[str, np.ndarray],
    num_rounds: int,
    on_round: Callable[[SecAggRound], None],
    settings: SecAggSettings | None = None,
    *,
    min_nodes: int = MIN_SECAGG_NODES,
    first_round: int = 1,
    train_config: Mapping[str, Scalar] | None = None,
    wait_timeout: float = 3600.0,
    frozen: Iterable[str] = (),
) -> State:
    """Rounds ``first_round..num_rounds`` of FedAvg over SecAgg+ with every
    connected node, through the one round loop; returns the final adapter.

    A protocol-level entry point (no model, no evaluation) for ServerApps that
    bring their own training; fedlora's server runs :class:`SecAggStep` in
    :func:`fedlora.server.loop.run_rounds` itself. ``on_round`` gets each
    round's :class:`SecAggRound`.

    Raises
    ------
    fedlora.server.stops.RunStopped
        Too few nodes connected.
    SecureAggregationFailed
        A round lost so many nodes that the aggregate could not be unmasked,
        or fewer than ``min_nodes`` contributed.
    """
    from fedlora.config import RunConfig

    settings = settings or SecAggSettings()
    if not initial:
        raise ConfigError("initial adapter state is empty")
    cfg = RunConfig.from_flat(
        {
            "num-server-rounds": num_rounds,
            "min-train-nodes": min_nodes,
            "fraction-train": 1.0,
            "round-timeout": wait_timeout,
        }
    )
    step = SecAggStep(
        grid,
        settings,
        num_rounds,
        min_nodes=min_nodes,
        train_config=train_config,
        frozen=frozen,
        on_exchange=on_round,
    )
    start = state_to_arrays({k: np.array(v, copy=True) for k, v in initial.items()})
    final = run_rounds(step, grid, cfg, start, None, lambda _outcome: None, first_round)
    return arrays_to_state(final)


class _Collector(FedAvg):
    """Legacy FedAvg that configures every node and keeps the unmasked mean.

    SecAggPlusWorkflow hands ``aggregate_fit`` results whose parameters were
    all replaced by the unmasked weighted mean; averaging them again would
    only add float error, so this just takes it.
    """

    def __init__(self, num_nodes: int, config: dict[str, Scalar]):
        super().__init__(
            fraction_fit=1.0,
            fraction_evaluate=0.0,
            min_fit_clients=num_nodes,
            min_evaluate_clients=0,
            min_available_clients=num_nodes,
            on_fit_config_fn=lambda _round: dict(config),
            accept_failures=True,
        )
        self.mean: list[np.ndarray] | None = None
        self.results: list[tuple[int, int, dict[str, Scalar]]] = []

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        if not results:
            return None, {}
        parameters = results[0][1].parameters
        self.mean = parameters_to_ndarrays(parameters)
        self.results = [
            (cast(GridClientProxy, proxy).node_id, res.num_examples, dict(res.metrics))
            for proxy, res in results
        ]
        return parameters, {}


class _RecordingGrid:
    """The grid, remembering which node failed at which protocol stage and why."""

    def __init__(self, grid: Grid):
        self._grid = grid
        self.errors: dict[int, str] = {}

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        sent = list(messages)
        replies = list(self._grid.send_and_receive(sent, timeout=timeout))
        # Match replies to requests by message id, not by sender: the SuperLink
        # answers for an unreachable node itself, with its own id (1) as sender.
        by_id = {m.metadata.message_id: m for m in sent}
        answered: set[int] = set()
        for reply in replies:
            request = by_id.get(reply.metadata.reply_to_message_id)
            node = request.metadata.dst_node_id if request else reply.metadata.src_node_id
            answered.add(node)
            if reply.has_error():
                stage = _stage(request) if request else "?"
                self.errors.setdefault(node, f"{stage}: {reply.error.reason}")
        for msg in sent:
            if msg.metadata.dst_node_id not in answered:
                self.errors.setdefault(
                    msg.metadata.dst_node_id, f"{_stage(msg)}: no reply before timeout"
                )
        return replies

    def failure_lines(self) -> list[str]:
        return [f"node {node}: {why}" for node, why in sorted(self.errors.items())]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


def _stage(msg: Message) -> str:
    configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
    return str(configs.get(Key.STAGE, "?")) if configs is not None else "?"


def _legacy_context(
    grid: _RecordingGrid, nodes: list[int], strategy: FedAvg, rnd: int, num_rounds: int
) -> LegacyContext:
    run_id = grid.run.run_id
    manager = SimpleClientManager()
    for node in nodes:
        manager.register(GridClientProxy(node_id=node, grid=cast(Grid, grid), run_id=run_id))
    base = Context(run_id=run_id, node_id=0, node_config={}, state=RecordDict(), run_config={})
    context = LegacyContext(
        base,
        config=ServerConfig(num_rounds=num_rounds),
        strategy=strategy,
        client_manager=manager,
    )
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
        {WorkflowKey.CURRENT_ROUND: rnd}
    )
    return context


def _apply(state: State, names: list[str], mean_update: list[np.ndarray]) -> State:
    if len(mean_update) != len(names):
        raise SecureAggregationFailed(
            f"unmasked aggregate has {len(mean_update)} tensors, the adapter {len(names)}"
        )
    new: State = {}
    for name, update in zip(names, mean_update, strict=True):
        old = state[name]
        if update.shape != old.shape:
            raise SecureAggregationFailed(
                f"unmasked update for {name!r} has shape {update.shape}, expected {old.shape}"
            )
        value = old.astype(np.float64) + update
        if not np.isfinite(value).all():
            raise SecureAggregationFailed(f"unmasked update for {name!r} is not finite")
        new[name] = value.astype(old.dtype)
    return new
