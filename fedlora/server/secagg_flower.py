"""Flower's legacy SecAgg+ workflow, driven one round at a time.

:func:`secagg_exchange` runs ``SecAggPlusWorkflow`` once against the
Message-API grid with a fresh legacy context whose client manager holds
exactly the nodes fedlora sampled, and a legacy ``FedAvg`` subclass that
only collects the unmasked mean. What the protocol guarantees, and the
quantisation maths, are in :mod:`fedlora.server.secagg`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
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
    SECAGG_CLIPPING_KEY,
    SECAGG_MAX_WEIGHT_KEY,
    SECAGG_NAMES_KEY,
    wire_text,
)
from fedlora.records import State

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
                self.errors.setdefault(node, f"{stage}: {wire_text(reply.error.reason)}")
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
