"""The first check on every reply, before any byte of it is decoded.

A registered node may still be hostile or broken. Flower delivers whatever it
sent; fedlora's later checks (:mod:`fedlora.server.validation`, the
strategies' decoders) read tensors with ``Array.numpy()``. That call trusts
the ``.npy`` header inside the bytes: a header that declares 10¹² elements
makes numpy allocate them before it notices the data is short (MemoryError),
and a node can send a metric key the others do not (Flower's aggregation
then fails the whole round). This module reads only metadata and headers,
and answers one question per reply: may it go further?

What a train reply must be (anything else drops it, naming site and reason):

* exactly one array record (``arrays``), one metric record, nothing else;
* the metric keys the run's release list allows, exactly
  (:func:`fedlora.privacy.releases.train_metric_keys`), each a finite number;
  ``num-examples`` a whole number in ``1..max-reported-examples``;
* tensor names the global adapter has (or, with compression on, their
  ``<name>::<field>`` encodings; never encodings with ``compression=none``);
* each tensor's ``.npy`` header parsed by hand: a numeric dtype, and a shape
  whose size matches the bytes exactly; all tensors together at most
  ``4 x`` the float32 adapter (+ 1 MiB of headers).

What this adds: Flower checks none of this; numpy's reader is not written
for hostile input.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, Message

from fedlora.compression import SEPARATOR
from fedlora.config import RunConfig
from fedlora.privacy.releases import EVALUATE_METRICS, train_metric_keys
from fedlora.protocol import ARRAYS_KEY, METRIC_NUM_EXAMPLES

_MAGIC = b"\x93NUMPY"
_MAX_HEADER = 4096
_OK_KINDS = "fiub"  # float, signed, unsigned, bool: what fedlora's payloads use
_SLACK_BYTES = 1 << 20


@dataclass(frozen=True)
class ReplyLimits:
    """What a train reply of this run may contain (built once per run)."""

    names: frozenset[str]  # tensor names of the global adapter
    metric_keys: frozenset[str]
    max_examples: int
    max_bytes: int
    allow_encoded: bool

    @classmethod
    def for_run(cls, cfg: RunConfig, arrays: ArrayRecord) -> ReplyLimits:
        """Limits from the run config and the initial global adapter."""
        floats = sum(math.prod(arr.shape) for arr in arrays.values())
        return cls(
            names=frozenset(arrays.keys()),
            metric_keys=train_metric_keys(cfg.privacy.dp_mode),
            max_examples=cfg.max_reported_examples,
            max_bytes=16 * floats + _SLACK_BYTES,
            allow_encoded=cfg.train.compression != "none",
        )


def npy_header(data: bytes) -> tuple[tuple[int, ...], np.dtype, int]:
    """``(shape, dtype, offset)`` of ``.npy`` bytes, read without numpy's loader.

    Raises
    ------
    ValueError
        If the bytes are not a version 1-3 ``.npy`` header of a plain array.
    """
    if len(data) < 10 or data[:6] != _MAGIC:
        raise ValueError("not .npy bytes (bad magic)")
    major = data[6]
    if major == 1:
        size, start = int.from_bytes(data[8:10], "little"), 10
    elif major in (2, 3):
        size, start = int.from_bytes(data[8:12], "little"), 12
    else:
        raise ValueError(f".npy version {major} is not supported")
    if size > _MAX_HEADER or start + size > len(data):
        raise ValueError(f".npy header of {size} bytes is too long or cut short")
    try:
        header = ast.literal_eval(data[start : start + size].decode("latin1"))
    except (ValueError, SyntaxError, MemoryError, RecursionError) as err:
        raise ValueError(f".npy header is not a literal ({type(err).__name__})") from None
    if not isinstance(header, dict) or set(header) != {"descr", "fortran_order", "shape"}:
        raise ValueError(".npy header must have exactly descr, fortran_order and shape")
    shape = header["shape"]
    if not isinstance(shape, tuple) or not all(
        isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**40 for d in shape
    ):
        raise ValueError(f".npy shape {shape!r} is not a tuple of sizes")
    descr = header["descr"]
    if not isinstance(descr, str) or len(descr) > 8:
        raise ValueError(f".npy dtype {descr!r} is not a plain dtype")
    try:
        dtype = np.dtype(descr)
    except TypeError:
        raise ValueError(f".npy dtype {descr!r} is unknown") from None
    if dtype.kind not in _OK_KINDS or dtype.hasobject:
        raise ValueError(f".npy dtype {dtype} is not numeric")
    return shape, dtype, start + size


def check_array(name: str, array: Array) -> tuple[int, str | None]:
    """``(bytes, reason)`` for one wire tensor; reason None if its bytes are sound."""
    data = array.data
    if not isinstance(data, bytes):
        return 0, f"tensor {name!r} carries no bytes"
    try:
        shape, dtype, offset = npy_header(data)
    except ValueError as err:
        return len(data), f"tensor {name!r}: {err}"
    need = math.prod(shape) * dtype.itemsize
    if len(data) - offset != need:
        return len(data), (
            f"tensor {name!r} declares shape {shape} of {dtype} ({need} bytes) "
            f"but carries {len(data) - offset}"
        )
    return len(data), None


def check_train_reply(msg: Message, limits: ReplyLimits) -> str | None:
    """Why this (non-error) train reply must be dropped before decoding, or None."""
    content = msg.content
    arrays, metrics, configs = (
        content.array_records,
        content.metric_records,
        content.config_records,
    )
    if set(arrays) != {ARRAYS_KEY} or len(metrics) != 1 or configs:
        return (
            f"reply must hold one array record {ARRAYS_KEY!r} and one metric record; it "
            f"holds array records {_few(arrays)}, metric records {_few(metrics)}, "
            f"config records {_few(configs)}"
        )
    reason = check_metrics(next(iter(metrics.values())), limits.metric_keys, limits.max_examples)
    if reason is not None:
        return reason
    total = 0
    for name, array in arrays[ARRAYS_KEY].items():
        base, sep, _field = name.rpartition(SEPARATOR)
        if sep and not limits.allow_encoded:
            return f"tensor {name!r} is encoded, but this run has compression=none"
        if (base if sep else name) not in limits.names:
            return f"tensor {name!r} is not part of the global adapter"
        size, reason = check_array(name, array)
        if reason is not None:
            return reason
        total += size
        if total > limits.max_bytes:
            return f"payload exceeds {limits.max_bytes} bytes (4x the adapter in float32)"
    return None


def check_metrics(
    record: Mapping[str, object], allowed: frozenset[str], max_examples: int
) -> str | None:
    """Why a reply's metrics are unacceptable (keys other than ``allowed``, a
    non-finite value, a weight outside ``1..max_examples``), or None."""
    keys = set(record)
    if keys != allowed:
        missing, extra = sorted(allowed - keys), sorted(keys - allowed)
        return f"metric keys differ from the run's: missing {missing[:5]}, unexpected {extra[:5]}"
    for key, value in record.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            return f"metric {key!r}={_short(value)} is not a number"
        if not math.isfinite(value):
            return f"metric {key!r}={value} is not finite"
    n = record[METRIC_NUM_EXAMPLES]
    if isinstance(n, float) and not n.is_integer():
        return f"{METRIC_NUM_EXAMPLES}={n} is not a whole number"
    if not 1 <= float(n) <= max_examples:  # type: ignore[arg-type]
        return (
            f"{METRIC_NUM_EXAMPLES}={n} is outside 1..{max_examples} "
            "(max-reported-examples): it is the update's weight"
        )
    return None


def check_evaluate_reply(msg: Message, limits: ReplyLimits) -> str | None:
    """Why an evaluate reply must be dropped before aggregation, or None."""
    content = msg.content
    if content.array_records or content.config_records or len(content.metric_records) != 1:
        return "an evaluate reply must hold exactly one metric record and nothing else"
    record = next(iter(content.metric_records.values()))
    return check_metrics(record, EVALUATE_METRICS, limits.max_examples)


def gate_replies(
    replies: Iterable[Message], limits: ReplyLimits, evaluate: bool = False
) -> tuple[list[Message], list[str]]:
    """The replies that may be decoded, and ``"node <id>: ..."`` for the rest."""
    check = check_evaluate_reply if evaluate else check_train_reply
    kept: list[Message] = []
    rejected: list[str] = []
    for msg in replies:
        try:
            reason = check(msg, limits)
        except Exception as exc:  # a reply no check foresaw: drop it, say why
            reason = f"reply could not be checked ({type(exc).__name__})"
        if reason is None:
            kept.append(msg)
        else:
            rejected.append(f"node {msg.metadata.src_node_id}: reply rejected: {reason}")
    return kept, rejected


def _few(names: Iterable[str]) -> list[str]:
    return sorted(names)[:5]


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_statistics_reply(msg: Message, stats_key: str, keys: frozenset[str]) -> str | None:
    """Why a feature-statistics reply must be dropped, or None: exactly the
    ``keys`` arrays in record ``stats_key``, sound headers, a finite 1-D
    float sum of at most 2^20 entries and one finite count."""
    records = msg.content.array_records
    if set(records) != {stats_key} or msg.content.metric_records:
        return f"statistics reply must hold only array record {stats_key!r}"
    record = records[stats_key]
    if set(record) != keys:
        return f"statistics record has arrays {sorted(record)[:5]}, expected {sorted(keys)}"
    for name, array in record.items():
        _size, reason = check_array(name, array)
        if reason is not None:
            return reason
        values = array.numpy()
        if values.ndim != 1 or values.size > 1 << 20 or values.dtype.kind != "f":
            return (
                f"statistic {name!r} must be a 1-D float vector (got {values.dtype}{values.shape})"
            )
        if not np.all(np.isfinite(values)):
            return f"statistic {name!r} is not finite"
    return None
