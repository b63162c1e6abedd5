"""Common plumbing of fedlora's LoRA-aware Flower strategies.

LoRA (Hu et al., 2021, https://arxiv.org/abs/2106.09685) under FedAvg
(McMahan et al., 2017, https://arxiv.org/abs/1602.05629).

:class:`LoraStrategy` is a Flower ``FedAvg`` whose ``aggregate_train`` turns
replies into adapter states and hands them to a pure aggregation function
(``fedlora/strategies/exact_lora.py``, ``ffa_lora.py``, ``hetero_rank.py``).
What it adds around that math:

* every reply is decoded (compressed deltas, :mod:`.compressed`) and checked
  against what that node was sent, and a bad reply is left out, logged and
  counted (``updates-rejected``) rather than failing the round;
* the global state keeps the key order of the arrays it came from;
* factor directions that carry nothing (``A`` row and ``B`` column both zero,
  which truncated SVD produces when the mean delta has lower rank than the
  adapter) get a fresh seeded ``A`` row, as PEFT's init would: the delta is
  unchanged, but the direction can learn again (a zero ``A`` row and a zero
  ``B`` column have zero gradient, forever).

Each subclass says how its clients train (``client_mode``); the ClientApp
reads it through :func:`fedlora.protocol.client_mode`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedlora.errors import UpdateRejected
from fedlora.protocol import KEY_DECODES_COMPRESSED, METRIC_REJECTED, MODE_STANDARD
from fedlora.records import LORA_A_SUFFIX, State
from fedlora.strategies.compressed import DecodesReplies, SentArrays, record_state
from fedlora.strategies.math.ffa import ffa_init_A
from fedlora.strategies.math.lora import lora_pairs

log = logging.getLogger("fedlora.server")

__all__ = ["LoraStrategy", "revive_dead_directions", "state_rank", "to_record"]


def to_record(state: State, order: Iterable[str] = ()) -> ArrayRecord:
    """A state as an ArrayRecord, keys in ``order`` first, then the rest."""
    keys = [k for k in order if k in state]
    keys += [k for k in state if k not in set(keys)]
    return ArrayRecord({k: Array(np.ascontiguousarray(state[k], np.float32)) for k in keys})


def state_rank(state: Mapping[str, Any]) -> int:
    """The LoRA rank of an adapter state or ArrayRecord (rows of its first A)."""
    for key, arr in state.items():
        if key.endswith(LORA_A_SUFFIX):
            return int(arr.shape[0])
    raise UpdateRejected(
        "the global arrays have no '*.lora_A.weight' tensor; a LoRA strategy needs a "
        "LoRA adapter (check lora-target-modules)"
    )


def revive_dead_directions(state: State, seed: int) -> State:
    """Give every all-zero factor direction a seeded A row; the delta is unchanged.

    Parameters
    ----------
    state
        An adapter state (modified copy returned).
    seed
        Derive it from ``(run seed, round)`` so a round reproduces on its own.
    """
    out = dict(state)
    for prefix, (a_key, b_key) in lora_pairs(state).items():
        a, b = state[a_key], state[b_key]
        dead = ~np.any(a != 0, axis=1) & ~np.any(b != 0, axis=0)
        if np.any(dead):
            fresh = ffa_init_A((int(a.shape[0]), int(a.shape[1])), seed, prefix)
            revived = a.copy()
            revived[dead] = fresh[dead]
            out[a_key] = revived
    return out


class LoraStrategy(DecodesReplies, FedAvg):
    """FedAvg plumbing around a LoRA aggregation rule (subclass and implement
    :meth:`aggregate_states`).

    Parameters
    ----------
    seed
        Seed for re-initialised factor directions (strategy-options
        ``seed=...``); combined with the round number.
    **fedavg_kwargs
        Flower ``FedAvg`` arguments; fedlora's registry sets them.
    """

    client_mode: ClassVar[str] = MODE_STANDARD

    def __init__(self, *, seed: int = 0, **fedavg_kwargs: Any) -> None:
        super().__init__(**fedavg_kwargs)
        self.seed = seed
        self.sent = SentArrays(self.arrayrecord_key)
        self.global_arrays: ArrayRecord | None = None

    # ------------------------------------------------------------- override
    def aggregate_states(
        self, server_round: int, states: list[State], weights: list[float]
    ) -> tuple[State, dict[str, float]]:
        """The new global state from accepted client states; plus metrics."""
        raise NotImplementedError

    def check_update(self, state: State, base: ArrayRecord, source: str) -> None:
        """Strategy-specific check of one decoded update (default: all keys sent)."""
        missing = [k for k in base if k not in state]
        if missing:
            raise UpdateRejected(
                f"{source} did not send {len(missing)} tensor(s), e.g. {missing[0]!r}; "
                "every trainable adapter tensor must be sent"
            )

    def configure_messages(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Train messages for this round (default: the same arrays to every node)."""
        return FedAvg.configure_train(self, server_round, arrays, config, grid)

    # ------------------------------------------------------------ Strategy
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Train messages; remembers what each node got to check its reply against."""
        config[KEY_DECODES_COMPRESSED] = True
        self.global_arrays = arrays
        messages = list(self.configure_messages(server_round, arrays, config, grid))
        self.sent.remember(messages)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Decode and check each reply, then aggregate with the LoRA rule."""
        valid, _errors = self._check_and_log_replies(replies, is_train=True, validate=False)
        states: list[State] = []
        weights: list[float] = []
        accepted: list[Message] = []
        for reply in valid:
            source = f"node {reply.metadata.src_node_id}"
            try:
                weight = self._weight_of(reply, source)
                state = self.checked_state(reply)
            except UpdateRejected as exc:
                log.warning("round %d: update left out: %s", server_round, exc)
                continue
            states.append(state)
            weights.append(weight)
            accepted.append(reply)
        rejected = len(valid) - len(accepted)
        self.sent.clear()
        if not accepted:
            return None, None
        state, extra = self.aggregate_states(server_round, states, weights)
        metrics = self.train_metrics_aggr_fn([m.content for m in accepted], self.weighted_by_key)
        for key, value in extra.items():
            metrics[key] = float(value)
        metrics[METRIC_REJECTED] = rejected
        order = list(self.global_arrays.keys()) if self.global_arrays is not None else []
        return to_record(state, order), metrics

    def checked_state(self, reply: Message) -> State:
        """The reply's decoded state, after the strategy's own check.

        The server's reply filter calls this too, so a rejection (e.g. an
        ffa-lora client that trained A) lands in the round's failures, not
        only in a log line; the decode is remembered for the round.
        """
        state = self.sent.state_of(reply)
        self.check_update(state, self.sent.base_of(reply), f"node {reply.metadata.src_node_id}")
        return state

    # -------------------------------------------------------------- helpers
    def _weight_of(self, reply: Message, source: str) -> float:
        records = list(reply.content.metric_records.values())
        value = records[0].get(self.weighted_by_key) if len(records) == 1 else None
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
            or value <= 0
        ):
            raise UpdateRejected(
                f"{source} sent no positive finite {self.weighted_by_key!r} metric (got "
                f"{value!r}); it is the update's weight"
            )
        return float(value)

    def global_state(self) -> State:
        """The arrays sent this round, as a state (empty before the first round)."""
        return record_state(self.global_arrays) if self.global_arrays is not None else {}

    def round_seed(self, server_round: int) -> int:
        """A seed derived from ``(seed, round)``."""
        return self.seed * 1_000_003 + server_round
