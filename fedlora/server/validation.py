"""Server-side checks on each client's update before it is aggregated.

A node is trusted to train, not to be correct: a bug, a corrupted file or a
hostile site can send a tensor of the wrong shape (FedAvg then fails for
everyone, or broadcasts silently), a NaN (which poisons the global adapter in
one round) or a huge update (which dominates a weighted mean). Flower's
strategies aggregate whatever arrives; this module adds the gate in front of
them, as a :data:`fedlora.server.loop.ReplyFilter`:

* :func:`check_update` is the pure check of one decoded adapter state;
* :func:`make_update_validator` turns it into a reply filter that keeps the
  good replies and names the node and the reason for every rejected one, so
  the round goes on without the bad update (and ``min-train-nodes`` decides
  whether that is still enough).

What is checked, in order (the first failure is reported): the reply carries
exactly one array record, ``"arrays"``; its tensor names equal the expected
set (none missing, none extra); each tensor *as decoded* has the expected
shape and dtype (the npy header inside the bytes is what aggregation uses, so
that is what is checked, not the record's declared metadata); every value is
finite; and the L2 norm of the whole state (all tensors together, computed in
float64) is at most ``max_norm``.

``max_norm`` bounds the *state* a node returns (the adapter itself, not its
difference to the global one): pick it from the initial adapter's norm, e.g.
``10 * state_norm(initial)``. LoRA A starts near ``sqrt(r * n_modules / 3)``
in norm and training moves it slowly; B starts at zero; a state hundreds of
times the initial norm is not a training step.

Under SecAgg+ the server never sees an individual update, so none of this can
run; SecAgg+'s clipping range is then the only per-client bound (see
:mod:`fedlora.server.secagg`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message
from flwr.serverapp.strategy import Strategy

from fedlora.config import RunConfig
from fedlora.protocol import ARRAYS_KEY
from fedlora.records import State
from fedlora.server.loop import ReplyFilter
from fedlora.strategies.compressed import DecodesReplies
from fedlora.strategies.math.lora import norm_excess, state_norm

Shape = tuple[int, ...]
Expected = Mapping[str, tuple[Sequence[int], Any]]

# Names in messages are shown up to this many, so one bad reply cannot flood the log.
_MAX_NAMES_SHOWN = 5


def expected_from_state(state: Mapping[str, np.ndarray]) -> dict[str, tuple[Shape, np.dtype]]:
    """The ``expected`` argument for a reference state (e.g. the initial adapter)."""
    return {name: (tuple(arr.shape), arr.dtype) for name, arr in state.items()}


def check_update(
    state: Mapping[str, np.ndarray], expected: Expected, max_norm: float
) -> str | None:
    """Why ``state`` must not be aggregated, or None if it may.

    Parameters
    ----------
    state : mapping of str to ndarray
        A client's adapter tensors by name.
    expected : mapping of str to (shape, dtype)
        The adapter's names, shapes and dtypes (:func:`expected_from_state`).
    max_norm : float
        Largest allowed L2 norm of the whole state; ``inf`` disables the check.

    Returns
    -------
    str or None
        One sentence naming the first problem found (tensor, value, limit).
    """
    _check_max_norm(max_norm)
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing tensor(s) {_names(missing)}")
        if extra:
            parts.append(f"unexpected tensor(s) {_names(extra)}")
        return "; ".join(parts) + " (only the adapter's tensors may be sent)"
    for name, (shape, dtype) in expected.items():
        arr = state[name]
        if not isinstance(arr, np.ndarray):
            return f"tensor {name!r} is a {type(arr).__name__}, not a numpy array"
        want_shape, want_dtype = tuple(int(d) for d in shape), np.dtype(dtype)
        if arr.shape != want_shape:
            return f"tensor {name!r} has shape {arr.shape}, expected {want_shape}"
        if arr.dtype != want_dtype:
            return f"tensor {name!r} has dtype {arr.dtype}, expected {want_dtype}"
        if arr.dtype.kind in "fc" and not np.isfinite(arr).all():
            bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
            return f"tensor {name!r} has {bad} non-finite value(s) (NaN or inf)"
    return norm_excess(state, max_norm)


def decode_reply(msg: Message) -> tuple[dict[str, np.ndarray] | None, str | None]:
    """A reply's adapter state, or the reason it cannot be read as one."""
    records = msg.content.array_records
    others = sorted(k for k in records if k != ARRAYS_KEY)
    if ARRAYS_KEY not in records:
        return None, f"reply has no array record {ARRAYS_KEY!r} (found {_names(others)})"
    if others:
        return None, f"reply has extra array record(s) {_names(others)} besides {ARRAYS_KEY!r}"
    record: ArrayRecord = records[ARRAYS_KEY]
    state: dict[str, np.ndarray] = {}
    for name, array in record.items():
        try:
            state[name] = array.numpy()
        except Exception as err:  # hostile bytes can raise anything: drop, say why
            return None, f"tensor {name!r} cannot be decoded ({type(err).__name__})"
    return state, None


def make_update_validator(
    expected: Expected,
    max_norm: float,
    decode: Callable[[Message], Mapping[str, np.ndarray]] | None = None,
) -> ReplyFilter:
    """A reply filter for :func:`fedlora.server.loop.run_rounds`.

    Parameters
    ----------
    expected, max_norm
        As for :func:`check_update`.
    decode : callable, optional
        Turns a reply into the adapter state to check, for payloads that are
        not plain tensors (e.g. ``SentArrays.state_of`` from
        :mod:`fedlora.strategies.compressed` for encoded deltas); a
        ``ValueError`` it raises (``UpdateRejected`` is one) rejects the reply
        with its message. Default: :func:`decode_reply`.

    Returns
    -------
    ReplyFilter
        ``(server_round, replies) -> (kept, rejections)``: the replies that
        pass, in their original order, and one line per rejected reply,
        ``"node <id>: update rejected: <reason>"``.
    """
    _check_max_norm(max_norm)
    frozen = {name: (tuple(int(d) for d in s), np.dtype(t)) for name, (s, t) in expected.items()}
    if not frozen:
        raise ValueError("expected is empty; give the adapter's tensor names, shapes and dtypes")

    def state_of(msg: Message) -> tuple[Mapping[str, np.ndarray] | None, str | None]:
        if decode is None:
            return decode_reply(msg)
        try:
            return decode(msg), None
        except (ValueError, TypeError) as err:
            return None, str(err)
        except Exception as err:  # hostile bytes can raise anything: drop, say why
            return None, f"payload cannot be decoded ({type(err).__name__})"

    def validate(server_round: int, replies: list[Message]) -> tuple[list[Message], list[str]]:
        kept: list[Message] = []
        rejected: list[str] = []
        for msg in replies:
            state, reason = state_of(msg)
            if state is not None:
                reason = check_update(state, frozen, max_norm)
            if reason is None:
                kept.append(msg)
            else:
                rejected.append(f"node {msg.metadata.src_node_id}: update rejected: {reason}")
        return kept, rejected

    return validate


def make_decoded_filter(decode: Callable[[Message], object]) -> ReplyFilter:
    """A reply filter for strategies that decode replies themselves.

    Compressed deltas and partial payloads (FFA's B and head, heterogeneous
    ranks) are checked by the strategy's decoder (``SentArrays.state_of``:
    names, shapes, finiteness, ``update-max-norm`` on the adapter the reply
    implies). Running it here as well puts its rejections where every other
    rejection goes: the round's failures, and ``RunStopped`` when too few
    updates remain.
    """

    def validate(server_round: int, replies: list[Message]) -> tuple[list[Message], list[str]]:
        kept: list[Message] = []
        rejected: list[str] = []
        for msg in replies:
            try:
                decode(msg)
            except Exception as err:  # UpdateRejected (a ValueError) or hostile bytes
                node = f"node {msg.metadata.src_node_id}"
                reason = str(err) if isinstance(err, ValueError | TypeError) else type(err).__name__
                # decoders name the node first; say it once
                if reason.startswith(node):
                    reason = reason[len(node) :].lstrip(": ")
                rejected.append(f"{node}: update rejected: {reason}")
            else:
                kept.append(msg)
        return kept, rejected

    return validate


def _check_max_norm(max_norm: float) -> None:
    if math.isnan(max_norm) or max_norm <= 0:
        raise ValueError(f"max_norm={max_norm}; give a positive number (or math.inf)")


def _names(names: Sequence[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:_MAX_NAMES_SHOWN])
    more = len(names) - _MAX_NAMES_SHOWN
    return f"[{shown}{f', ... {more} more' if more > 0 else ''}]"


def update_filter(cfg: RunConfig, init: State, strategy: Strategy) -> ReplyFilter:
    """The run's one gate for updates: reject malformed or absurd ones before
    they reach the strategy.

    The limit is ``update-max-norm`` (default: ten times the initial adapter's
    norm). A strategy that decodes its own replies
    (:class:`~fedlora.strategies.compressed.DecodesReplies`: compressed
    uploads, ffa-lora's and hetero-rank's partial payloads) decodes and
    checks each one under that limit; for every other strategy each reply
    must carry the full adapter as sent, checked against the initial one.
    """
    max_norm = cfg.update_max_norm or 10 * state_norm(init)
    if isinstance(strategy, DecodesReplies):
        strategy.sent.max_norm = max_norm
        if cfg.partial_replies:
            return make_decoded_filter(strategy.checked_state)
    return make_update_validator(expected_from_state(init), max_norm=max_norm)
