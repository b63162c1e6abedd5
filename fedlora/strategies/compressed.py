"""Server half of update compression: decode clients' deltas before aggregating.

Blockwise absmax quantisation (Dettmers et al., 2022,
https://arxiv.org/abs/2110.02861) and top-k with error feedback (Stich et al.,
2018, https://arxiv.org/abs/1809.07599); the codec is
:mod:`fedlora.compression`.

A client with ``compression`` other than ``none`` sends the *delta* between
its trained adapter and the arrays it was sent this round, encoded by
:func:`fedlora.compression.encode` (entries named ``<key>::<field>``). Deltas
quantise far better than weights (they are small and centred) and top-k of a
weight would zero most of the model. The server therefore has to remember
what it sent each node, decode, and add the delta back before any strategy
sees the update: :class:`SentArrays` does that, :class:`CompressedUpdates`
wraps any Flower strategy with it (like Flower's DP wrappers), and fedlora's
own LoRA strategies use it directly.

Encoded arrays travel as ordinary Flower ``Array`` objects (numpy ``.npy``
bytes), so any server code that reads a reply with ``Array.numpy()`` keeps
working. Each carries a ~128-byte ``.npy`` header and the codec uses four
arrays per tensor: about 13 KB of an int8 MiniLM update (94 KB at rank 8);
raw-byte arrays would save that but ``Array.numpy()`` cannot read them.

Both announce ``decodes-compressed`` in the train config; a client asked to
compress refuses (an error reply naming the fix) when it is missing, so a
server that cannot decode never averages encoded bytes.

What this adds: Flower ships arrays as they are; it has no update codec.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterable, Mapping

import numpy as np
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedlora.compression import SEPARATOR, decode
from fedlora.errors import UpdateRejected
from fedlora.protocol import ARRAYS_KEY, KEY_DECODES_COMPRESSED
from fedlora.records import State, state_to_arrays
from fedlora.strategies.math.lora import norm_excess

log = logging.getLogger("fedlora.server")

__all__ = [
    "CompressedUpdates",
    "SentArrays",
    "encoded_record",
    "is_encoded",
    "record_state",
]


def is_encoded(record: ArrayRecord) -> bool:
    """Whether ``record`` holds an encoded delta rather than plain tensors."""
    return any(SEPARATOR in key for key in record)


def encoded_record(encoded: Mapping[str, np.ndarray]) -> ArrayRecord:
    """An encoded payload (:func:`fedlora.compression.encode`) as an ArrayRecord."""
    return state_to_arrays(encoded)


def record_state(record: ArrayRecord) -> State:
    """ArrayRecord -> name -> ndarray.

    Raises
    ------
    UpdateRejected
        If an entry is not a readable numpy array (untrusted bytes).
    """
    state = {}
    for name, arr in record.items():
        try:
            state[name] = arr.numpy()
        except Exception as exc:  # untrusted bytes can raise anything
            raise UpdateRejected(
                f"payload entry {name!r} cannot be read ({type(exc).__name__})"
            ) from None
    return state


class SentArrays:
    """What each node was sent in a round, to check and decode its reply against.

    Remembering costs nothing extra when every node gets the same record (it is
    held by reference); strategies that send per-node arrays (heterogeneous
    ranks) hold one record per distinct payload.
    """

    def __init__(self, arrayrecord_key: str, max_norm: float = math.inf) -> None:
        self.arrayrecord_key = arrayrecord_key
        # The server's update-max-norm, on the whole adapter the reply implies
        # (a partial payload is completed from what the node was sent).
        self.max_norm = max_norm
        self._by_node: dict[int, ArrayRecord] = {}
        # Decoded replies of this round: the server's reply filter and the
        # strategy's aggregation both ask, and decoding is not free. Keyed by
        # the reply object, which the entry keeps alive until the round is
        # forgotten (so its id cannot be reused meanwhile).
        self._decoded: dict[int, tuple[Message, State]] = {}

    def __getstate__(self) -> dict[str, object]:
        # Checkpoints keep the strategy, never this round's replies.
        return {**self.__dict__, "_decoded": {}}

    def remember(self, messages: Iterable[Message]) -> None:
        """Record the arrays of this round's outgoing train messages."""
        self._by_node = {
            m.metadata.dst_node_id: m.content.array_records[self.arrayrecord_key]
            for m in messages
            if self.arrayrecord_key in m.content.array_records
        }
        self._decoded = {}

    def nodes(self) -> set[int]:
        """The nodes sent arrays this round."""
        return set(self._by_node)

    def clear(self) -> None:
        """Forget the round (keeps checkpoints of the strategy small)."""
        self._by_node = {}
        self._decoded = {}

    def base_of(self, reply: Message) -> ArrayRecord:
        """The arrays the replying node was sent."""
        node = reply.metadata.src_node_id
        if node in self._by_node:
            return self._by_node[node]
        distinct = {id(r): r for r in self._by_node.values()}
        if len(distinct) == 1:
            # Every node got the same arrays, so whoever replies had these.
            return next(iter(distinct.values()))
        raise UpdateRejected(
            f"node {node} replied but was not sent arrays this round; "
            "its update cannot be checked against what it trained from"
        )

    def state_of(self, reply: Message) -> State:
        """The reply's adapter state: decoded and added to its base if encoded.

        Checks every tensor against what the node was sent (known name, same
        shape, finite values), so a malformed update is rejected here, naming
        the tensor, instead of failing inside the aggregation.

        Raises
        ------
        UpdateRejected
            If the reply has no single ArrayRecord, a payload does not decode,
            or a tensor is unknown, mis-shaped or not finite, or the adapter
            it implies is above ``max_norm``.
        """
        seen = self._decoded.get(id(reply))
        if seen is not None and seen[0] is reply:
            return seen[1]
        state = self._decode(reply)
        self._decoded[id(reply)] = (reply, state)
        return state

    def _decode(self, reply: Message) -> State:
        node = reply.metadata.src_node_id
        records = reply.content.array_records
        if len(records) != 1 or self.arrayrecord_key not in records:
            raise UpdateRejected(
                f"node {node} replied with array records {sorted(records)}; expected "
                f"exactly one named {self.arrayrecord_key!r}"
            )
        record = records[self.arrayrecord_key]
        base = self.base_of(reply)
        if is_encoded(record):
            delta = decode(record_state(record))
            state = {}
            for key, value in delta.items():
                if key not in base:
                    raise UpdateRejected(f"node {node} sent a delta for unknown tensor {key!r}")
                state[key] = base[key].numpy() + value
        else:
            state = record_state(record)
        _check_against(state, base, f"node {node}")
        if math.isfinite(self.max_norm):
            # Decode only what the reply left out (this runs for every reply).
            rest = {k: v.numpy() for k, v in base.items() if k not in state}
            whole = {**rest, **state}
            excess = norm_excess(whole, self.max_norm)
            if excess is not None:
                raise UpdateRejected(f"node {node}: {excess}")
        return state


def _check_against(state: Mapping[str, np.ndarray], base: ArrayRecord, source: str) -> None:
    for key, value in state.items():
        if key not in base:
            raise UpdateRejected(
                f"{source} sent tensor {key!r}, which the global adapter does not have; "
                "every party must use the same model, lora-target-modules and labels"
            )
        expected = tuple(base[key].shape)
        if tuple(value.shape) != expected:
            raise UpdateRejected(
                f"{source} sent {key!r} with shape {tuple(value.shape)}, it was sent "
                f"{expected}; check the node's lora-rank and the label list"
            )
        if not np.all(np.isfinite(value)):
            raise UpdateRejected(
                f"{source} sent non-finite values in {key!r}; local training diverged. "
                "Lower learning-rate"
            )


class DecodesReplies:
    """A strategy that reads its own replies (compressed deltas, partial or
    per-site payloads) against what each node was sent (:attr:`sent`).

    The server's reply filter asks such a strategy to decode and check each
    reply (:meth:`checked_state`) under the run's ``update-max-norm``; every
    other strategy gets the server's check of the full adapter as sent
    (:func:`fedlora.server.validation.update_filter` chooses by this type).
    """

    sent: SentArrays

    def checked_state(self, reply: Message) -> State:
        """The reply's decoded state (raises ``UpdateRejected`` if it is not sound)."""
        return self.sent.state_of(reply)


class CompressedUpdates(DecodesReplies, Strategy):
    """Wrap a Flower strategy so it aggregates compressed client updates.

    Each reply is decoded to a plain adapter state (the node's base plus its
    delta) before the wrapped strategy's ``aggregate_train`` sees it, so any
    strategy (FedAvg, FedMedian, Krum, ...) works unchanged. A reply that
    cannot be decoded is left out and logged with the reason.

    Parameters
    ----------
    strategy
        The strategy that aggregates the decoded updates.
    """

    def __init__(self, strategy: Strategy) -> None:
        self.strategy = strategy
        key = getattr(strategy, "arrayrecord_key", ARRAYS_KEY)
        self.sent = SentArrays(key)

    def summary(self) -> None:
        """Log the wrapped strategy's summary."""
        self.strategy.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The wrapped strategy's messages, remembered for decoding replies."""
        config[KEY_DECODES_COMPRESSED] = True
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        self.sent.remember(messages)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Decode every good reply, then let the wrapped strategy aggregate."""
        decoded: list[Message] = []
        for reply in replies:
            if reply.has_error():
                decoded.append(reply)
                continue
            try:
                state = self.sent.state_of(reply)
            except UpdateRejected as exc:
                log.warning("round %d: update left out: %s", server_round, exc)
                continue
            content = RecordDict(dict(reply.content.items()))
            content[self.sent.arrayrecord_key] = state_to_arrays(state)
            plain = copy.copy(reply)  # the caller's reply keeps what the node sent
            plain.content = content
            decoded.append(plain)
        self.sent.clear()
        return self.strategy.aggregate_train(server_round, decoded)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Evaluation carries no updates; the wrapped strategy configures it."""
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Evaluation carries no updates; the wrapped strategy aggregates it."""
        return self.strategy.aggregate_evaluate(server_round, replies)
