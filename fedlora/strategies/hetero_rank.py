"""``hetero-rank``: sites train LoRA at their own ranks; the server mixes deltas.

FlexLoRA (Bai et al., 2024, https://arxiv.org/abs/2402.11505), motivated by
HetLoRA (Cho et al., 2024, https://arxiv.org/abs/2401.06432).

Each site trains at its own rank ``r_i`` (``client_mode`` hetero-rank): a
real node's rank is its node-config key ``lora-rank``; a simulated node's is
``sim-client-ranks`` by partition id, round-robin; otherwise the run's
``lora-rank``. The server

1. asks each node it has not met for its rank (a Flower query message, once),
2. averages the deltas the sites actually applied, ``D = mean_i (alpha/r_i)
   B_i A_i`` (:func:`fedlora.strategies.hetero_rank.aggregate_hetero`), and
3. sends every node the best rank-``r_i`` factors of ``D`` for *its* rank
   (:func:`fedlora.strategies.hetero_rank.split_for_rank`), one SVD per
   distinct rank.

``alpha`` cancels out of the scheme (every site and the server share it), so
the strategy works with ``D / alpha`` and needs no LoRA settings. The global
arrays the round loop keeps (evaluated, checkpointed, exported) are ``D``'s
factors at the run's ``lora-rank``; choose it at least as large as the
largest site rank to export the model the sites train, and see the train
metric ``lora-truncation-error`` for what the export's rank drops. The exact
``D`` is kept in the strategy (one ``out x in`` matrix per module), so each
site gets factors of the true mean, not of the export.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid

from fedlora.protocol import (
    CONFIG_KEY,
    KEY_LORA_RANK,
    KEY_SERVER_ROUND,
    METRIC_TRUNCATION,
    MODE_HETERO,
    QUERY_LORA_RANK,
    RANK_RECORD,
)
from fedlora.records import LORA_A_SUFFIX, State, arrays_to_state
from fedlora.strategies.base import LoraStrategy, revive_dead_directions, state_rank, to_record
from fedlora.strategies.math.hetero import aggregate_hetero, split_for_rank
from fedlora.strategies.math.lora import dense_keys, lora_pairs

log = logging.getLogger("fedlora.server")

__all__ = ["HeteroRank"]


def _digest(arrays: ArrayRecord) -> str:
    h = hashlib.sha256()
    for key, arr in arrays.items():
        h.update(key.encode())
        h.update(arr.data)
    return h.hexdigest()


def unit_deltas(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``prefix -> B A / r``: a state's LoRA deltas divided by the shared alpha."""
    out = {}
    for prefix, (a_key, b_key) in lora_pairs(state).items():
        a = np.asarray(state[a_key], np.float64)
        b = np.asarray(state[b_key], np.float64)
        out[prefix] = (b @ a) / a.shape[0]
    return out


class HeteroRank(LoraStrategy):
    """Average in weight space; give each node its own rank's factorisation.

    Parameters
    ----------
    seed
        Seed for re-initialised factor directions, combined with the round.
    query_timeout
        Seconds to wait for nodes to say their rank (strategy-options
        ``query-timeout=...``). A node that does not answer is sent the
        global rank.
    **fedavg_kwargs
        Flower ``FedAvg`` arguments; fedlora's registry sets them.
    """

    client_mode = MODE_HETERO

    def __init__(
        self, *, seed: int = 0, query_timeout: float = 120.0, **fedavg_kwargs: Any
    ) -> None:
        super().__init__(seed=seed, **fedavg_kwargs)
        self.query_timeout = query_timeout
        self.node_ranks: dict[int, int] = {}
        # D / alpha per module and the dense means, for the global arrays with
        # this digest; recomputed from the arrays when they are not those.
        self._mean: tuple[str, dict[str, np.ndarray], State] | None = None

    # ------------------------------------------------------------- sending
    def configure_messages(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """One message per node, with the global delta at that node's rank."""
        return self._per_rank_messages(
            server_round, arrays, config, grid, MessageType.TRAIN, self.fraction_train
        )

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Federated evaluation, also at each node's own rank."""
        return self._per_rank_messages(
            server_round, arrays, config, grid, MessageType.EVALUATE, self.fraction_evaluate
        )

    def _per_rank_messages(
        self,
        server_round: int,
        arrays: ArrayRecord,
        config: ConfigRecord,
        grid: Grid,
        message_type: str,
        fraction: float,
    ) -> list[Message]:
        if fraction == 0.0:
            return []
        # fedlora's round loop has already sampled: every node in the view takes part.
        nodes = list(grid.get_node_ids())
        self._learn_ranks(grid, [n for n in nodes if n not in self.node_ranks], max_rank(arrays))
        deltas, dense = self._global_mean(arrays)
        default_rank = state_rank(arrays)
        config[KEY_SERVER_ROUND] = server_round
        by_rank: dict[int, ArrayRecord] = {}
        messages = []
        for node in nodes:
            rank = self.node_ranks.get(node, default_rank)
            if rank not in by_rank:
                state = split_for_rank(deltas, dense, rank, 1.0 / rank)
                state = revive_dead_directions(state, self.round_seed(server_round))
                by_rank[rank] = to_record(state, arrays.keys())
            content = RecordDict(
                {self.arrayrecord_key: by_rank[rank], self.configrecord_key: config}
            )
            messages.append(Message(content=content, dst_node_id=node, message_type=message_type))
        return messages

    def _learn_ranks(self, grid: Grid, nodes: list[int], limit: int) -> None:
        if not nodes:
            return
        query = RecordDict({CONFIG_KEY: ConfigRecord({QUERY_LORA_RANK: 1})})
        messages = [
            Message(content=query, dst_node_id=n, message_type=MessageType.QUERY) for n in nodes
        ]
        for reply in grid.send_and_receive(messages, timeout=self.query_timeout):
            node = reply.metadata.src_node_id
            record = None if reply.has_error() else reply.content.config_records.get(RANK_RECORD)
            value = None if record is None else record.get(KEY_LORA_RANK)
            if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= limit:
                self.node_ranks[node] = value
            else:
                log.warning(
                    "node %d did not say a lora-rank in 1..%d (got %r); sending it the global rank",
                    node,
                    limit,
                    value,
                )

    def _global_mean(self, arrays: ArrayRecord) -> tuple[dict[str, np.ndarray], State]:
        digest = _digest(arrays)
        if self._mean is not None and self._mean[0] == digest:
            return self._mean[1], self._mean[2]
        # First round, or the arrays changed outside this strategy (e.g. resumed):
        # the global factors themselves are the best knowledge of D.
        state = arrays_to_state(arrays)
        return unit_deltas(state), {k: state[k] for k in dense_keys(state)}

    # ---------------------------------------------------------- aggregating
    def aggregate_states(
        self, server_round: int, states: list[State], weights: list[float]
    ) -> tuple[State, dict[str, float]]:
        """``D / alpha`` from all ranks; the global arrays are its factors at lora-rank."""
        # alpha=1 gives sum_i w_i (1/r_i) B_i A_i / sum_i w_i = D / alpha.
        mean = aggregate_hetero(states, weights, alpha=1.0)
        assert self.global_arrays is not None  # configure_train ran this round
        rank = state_rank(self.global_arrays)
        state = split_for_rank(mean.products, mean.dense, rank, 1.0 / rank)
        state = revive_dead_directions(state, self.round_seed(server_round))
        record = to_record(state, self.global_arrays.keys())
        # float32 halves what every round's checkpoint pickles (one out x in per module).
        self._mean = (_digest(record), mean.products, mean.dense)
        return state, {METRIC_TRUNCATION: _relative_error(mean.products, unit_deltas(state))}

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """As LoraStrategy's; a node that sent no good reply is asked its rank again.

        A node whose operator changed its ``lora-rank`` fails to load the
        arrays it was sent (the round loop drops its error reply before this
        point); forgetting the rank of every node that did not reply lets it
        recover the next time it is sampled, at the cost of one query.
        """
        replies = list(replies)
        replied = {r.metadata.src_node_id for r in replies if not r.has_error()}
        for node in self.sent.nodes() - replied:
            self.node_ranks.pop(node, None)
        return super().aggregate_train(server_round, replies)


def max_rank(arrays: ArrayRecord) -> int:
    """The largest meaningful LoRA rank: a factor pair of shapes (r, in) and
    (out, r) has rank at most min(in, out). A node asking for more is refused,
    so a self-reported rank of 10^9 cannot make the server allocate."""
    limits = [
        min(int(arr.shape[1]), int(arrays[key.replace("lora_A", "lora_B")].shape[0]))
        for key, arr in arrays.items()
        if key.endswith(LORA_A_SUFFIX) and key.replace("lora_A", "lora_B") in arrays
    ]
    return min(limits) if limits else 1


def _relative_error(exact: Mapping[str, np.ndarray], approx: Mapping[str, np.ndarray]) -> float:
    err = sum(float(np.sum((np.asarray(exact[p], np.float64) - approx[p]) ** 2)) for p in exact)
    norm = sum(float(np.sum(np.asarray(exact[p], np.float64) ** 2)) for p in exact)
    return float(np.sqrt(err / norm)) if norm > 0 else 0.0
