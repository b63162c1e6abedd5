"""Smaller adapter payloads: absmax quantisation and top-k with error feedback.

Blockwise absmax quantisation as in 8-bit optimisers (Dettmers et al., 2022,
https://arxiv.org/abs/2110.02861); top-k sparsification with error feedback
(Stich et al., 2018, https://arxiv.org/abs/1809.07599; Karimireddy et al.,
2019, https://arxiv.org/abs/1901.09847).

Why: a client's upload is its adapter update, and on slow uplinks its size
sets the round time. What this adds: Flower ships arrays as they are and
PEFT/bitsandbytes quantise *models* on the GPU; neither encodes an update for
the wire. :func:`encode` turns a state into a flat ``dict[str, np.ndarray]``
that fits a Flower ``ArrayRecord``; :func:`decode` restores names, shapes and
float32 and rejects malformed payloads.

Error bounds (per element, up to float32 rounding of the final product):

* ``int8``: ``scale = max|block| / 127``, ``q = round(x / scale)``, so
  ``|x - x_hat| <= scale / 2 = max|block| / 254``.
* ``int4`` (levels -7..7, two per byte): ``scale = max|block| / 7``, so
  ``|x - x_hat| <= max|block| / 14``.
* ``topk``: kept entries are exact; a dropped entry is no larger in magnitude
  than the smallest kept one. With :class:`ErrorFeedback` nothing is lost for
  good: what was not sent is added to the next round's input, so the sum of
  what was sent tracks the sum of the inputs up to one bounded residual.

Wire layout, for a tensor named ``<key>`` (``::`` cannot occur in a PyTorch
parameter name): ``<key>::shape`` (int64), ``<key>::block`` (int64, one
value), then ``::q`` (int8) and ``::scale`` (float32 per block) for int8;
``::q4`` (uint8, packed) and ``::scale`` for int4; ``::idx`` (int32/int64 flat
indices) and ``::val`` (float32) for top-k; ``::raw`` (float32) for none.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np

from fedlora.errors import ConfigError, ModelError, UpdateRejected

__all__ = [
    "SEPARATOR",
    "CompressionScheme",
    "ErrorFeedback",
    "decode",
    "encode",
    "payload_bytes",
]

SEPARATOR = "::"
_LEVELS = {"int8": 127, "int4": 7}
_FIELDS = {
    "int8": {"shape", "block", "q", "scale"},
    "int4": {"shape", "block", "q4", "scale"},
    "topk": {"shape", "block", "idx", "val"},
    "none": {"shape", "block", "raw"},
}


@dataclass(frozen=True)
class CompressionScheme:
    """How to encode an update for the wire.

    Attributes
    ----------
    kind
        ``"int8"``, ``"int4"``, ``"topk"`` or ``"none"``.
    block_size
        Elements per absmax scale for int8/int4; ``None`` for one scale per
        tensor. Smaller blocks cost 4 bytes each but keep one outlier from
        coarsening a whole tensor's grid.
    topk_fraction
        Share of each tensor's entries that top-k keeps, in ``(0, 1]``; at
        least one entry per non-empty tensor is kept.
    """

    kind: Literal["int8", "int4", "topk", "none"] = "int8"
    block_size: int | None = 64
    topk_fraction: float = 0.01

    def __post_init__(self) -> None:
        if self.kind not in _FIELDS:
            raise ConfigError(
                f"compression kind {self.kind!r} is not known; choose one of "
                f"{', '.join(sorted(_FIELDS))}"
            )
        if self.block_size is not None and (
            isinstance(self.block_size, bool)
            or not isinstance(self.block_size, int)
            or self.block_size < 1
        ):
            raise ConfigError(
                f"compression block_size must be an integer >= 1 or None (one "
                f"scale per tensor), got {self.block_size!r}"
            )
        if not (0.0 < self.topk_fraction <= 1.0):
            raise ConfigError(
                f"compression topk_fraction must be in (0, 1], got "
                f"{self.topk_fraction!r}; e.g. 0.01 keeps 1% of each tensor"
            )


def _block_of(n: int, block_size: int | None) -> int:
    return max(n, 1) if block_size is None else block_size


def _quantise(flat: np.ndarray, block: int, levels: int) -> tuple[np.ndarray, ...]:
    n = flat.size
    n_blocks = math.ceil(n / block)
    padded = np.zeros(n_blocks * block, np.float64)
    padded[:n] = flat
    blocks = padded.reshape(n_blocks, block)
    # The scale is rounded to float32 *before* quantising, so the grid the
    # encoder rounds to is exactly the grid the decoder multiplies out.
    scale = (np.max(np.abs(blocks), axis=1) / levels).astype(np.float32)
    safe = np.where(scale > 0, scale, 1.0).astype(np.float64)
    q = np.clip(np.rint(blocks / safe[:, None]), -levels, levels)
    return q.reshape(-1)[:n].astype(np.int8), scale


def _topk(flat: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    n = flat.size
    k = min(n, max(1, math.ceil(fraction * n))) if n else 0
    # argpartition finds the k largest in O(n); sorting them keeps the
    # indices monotone, which later generic compression squeezes well.
    idx = np.arange(n) if k == n else np.sort(np.argpartition(-np.abs(flat), k - 1)[:k])
    idx_dtype = np.int32 if n < 2**31 else np.int64
    return idx.astype(idx_dtype), flat[idx].astype(np.float32)


def encode(state: Mapping[str, np.ndarray], scheme: CompressionScheme) -> dict[str, np.ndarray]:
    """Encode ``state`` into flat arrays for a Flower ``ArrayRecord``.

    Parameters
    ----------
    state
        Arrays keyed by parameter name (any float dtype; float32 normally).
    scheme
        How to encode; see :class:`CompressionScheme`.

    Returns
    -------
    dict[str, np.ndarray]
        ``<key>::<field>`` arrays; see the module docstring for the fields.

    Raises
    ------
    ModelError
        If a key contains ``"::"``, which would make the payload ambiguous.
    UpdateRejected
        If a tensor has NaN/inf values: it cannot be quantised, and sending
        it would poison the global model.
    """
    out: dict[str, np.ndarray] = {}
    for key, value in state.items():
        if SEPARATOR in key:
            raise ModelError(
                f"parameter name {key!r} contains {SEPARATOR!r}, which the wire "
                "format reserves; rename the module"
            )
        x = np.asarray(value)
        flat = x.reshape(-1).astype(np.float64)
        if not np.all(np.isfinite(flat)):
            raise UpdateRejected(
                f"tensor {key!r} has non-finite values; local training diverged. "
                "Lower learning-rate or enable gradient clipping"
            )
        block = _block_of(flat.size, scheme.block_size)
        fields: dict[str, np.ndarray] = {
            "shape": np.asarray(x.shape, np.int64),
            "block": np.asarray([block], np.int64),
        }
        if scheme.kind in _LEVELS:
            q, scale = _quantise(flat, block, _LEVELS[scheme.kind])
            fields["scale"] = scale
            if scheme.kind == "int8":
                fields["q"] = q
            else:
                fields["q4"] = _pack4(q)
        elif scheme.kind == "topk":
            fields["idx"], fields["val"] = _topk(flat, scheme.topk_fraction)
        else:
            fields["raw"] = flat.astype(np.float32)
        for name, array in fields.items():
            out[f"{key}{SEPARATOR}{name}"] = array
    return out


def _pack4(q: np.ndarray) -> np.ndarray:
    # Offset by 8 so each level -7..7 is a nibble 1..15; low nibble first.
    nibbles = (q.astype(np.int16) + 8).astype(np.uint8)
    if nibbles.size % 2:
        nibbles = np.append(nibbles, np.uint8(8))
    return (nibbles[0::2] | (nibbles[1::2] << 4)).astype(np.uint8)


def _unpack4(packed: np.ndarray, n: int) -> np.ndarray:
    nibbles = np.empty(packed.size * 2, np.int16)
    nibbles[0::2] = packed & 0x0F
    nibbles[1::2] = packed >> 4
    return nibbles[:n] - 8


#: Largest tensor a payload may declare (2^28 floats = 1 GiB; a LoRA factor is far smaller).
MAX_DECODED_ELEMENTS = 1 << 28


def decode(encoded: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Restore a state from :func:`encode`'s output: names, shapes, float32.

    The decoder infers each tensor's scheme from the fields present, so the
    server needs no side channel. It treats the payload as untrusted.

    Raises
    ------
    UpdateRejected
        Naming the tensor, if fields are missing or extra, lengths disagree
        with the shape, indices are out of range or repeated, or a value is
        out of the quantisation range or non-finite.
    """
    grouped: dict[str, dict[str, np.ndarray]] = {}
    for name, array in encoded.items():
        key, sep, field = name.rpartition(SEPARATOR)
        if not sep:
            raise UpdateRejected(
                f"payload entry {name!r} is not '<key>{SEPARATOR}<field>'; "
                "was it made by fedlora.compression.encode?"
            )
        grouped.setdefault(key, {})[field] = np.asarray(array)
    return {key: _decode_one(key, fields) for key, fields in grouped.items()}


def _decode_one(key: str, fields: Mapping[str, np.ndarray]) -> np.ndarray:
    kind = next((k for k, need in _FIELDS.items() if set(fields) == need), None)
    if kind is None:
        raise UpdateRejected(
            f"payload for {key!r} has fields {sorted(fields)}, which match no "
            f"scheme; expected one of {[sorted(v) for v in _FIELDS.values()]}"
        )
    shape_arr = fields["shape"].reshape(-1)
    if shape_arr.dtype.kind not in "iu" or np.any(shape_arr < 0):
        raise UpdateRejected(f"payload for {key!r} has a bad shape {shape_arr}")
    if shape_arr.size > 8:
        raise UpdateRejected(f"payload for {key!r} has {shape_arr.size} dimensions")
    shape = tuple(int(d) for d in shape_arr)
    n = math.prod(shape)
    if n > MAX_DECODED_ELEMENTS:
        # Checked before anything is allocated: a hostile shape must not
        # become a MemoryError (or an OverflowError) inside the server.
        raise UpdateRejected(
            f"payload for {key!r} declares {n} elements (limit {MAX_DECODED_ELEMENTS})"
        )
    block = int(fields["block"].reshape(-1)[0]) if fields["block"].size == 1 else 0
    if block < 1:
        raise UpdateRejected(f"payload for {key!r} has a bad block size")

    def need(ok: bool, what: str) -> None:
        if not ok:
            raise UpdateRejected(f"payload for {key!r} (shape {shape}): {what}")

    if kind in _LEVELS:
        levels = _LEVELS[kind]
        scale = fields["scale"].reshape(-1)
        need(scale.dtype == np.float32, "scale must be float32")
        need(scale.size == math.ceil(n / block), "scale count != blocks")
        need(bool(np.all(np.isfinite(scale) & (scale >= 0))), "bad scale values")
        if kind == "int8":
            q = fields["q"].reshape(-1)
            need(q.dtype == np.int8 and q.size == n, "q must be int8 of size n")
        else:
            packed = fields["q4"].reshape(-1)
            need(packed.dtype == np.uint8, "q4 must be uint8")
            need(packed.size == math.ceil(n / 2), "q4 size != ceil(n / 2)")
            q = _unpack4(packed, n)
        need(bool(np.all(np.abs(q.astype(np.int16)) <= levels)), "q out of range")
        scales = np.repeat(scale, block)[:n]
        flat = q.astype(np.float32) * scales
    elif kind == "topk":
        idx, val = fields["idx"].reshape(-1), fields["val"].reshape(-1)
        need(idx.dtype.kind in "iu" and idx.size == val.size, "idx/val mismatch")
        need(val.dtype == np.float32 and bool(np.all(np.isfinite(val))), "bad val")
        need(bool(np.all((idx >= 0) & (idx < n))), "idx out of range")
        need(np.unique(idx).size == idx.size, "repeated idx")
        flat = np.zeros(n, np.float32)
        flat[idx] = val
    else:
        flat = fields["raw"].reshape(-1)
        need(flat.dtype == np.float32 and flat.size == n, "raw must be float32[n]")
        need(bool(np.all(np.isfinite(flat))), "non-finite raw values")
    return flat.astype(np.float32, copy=False).reshape(shape)


def payload_bytes(encoded: Mapping[str, np.ndarray]) -> int:
    """Bytes of array data in an encoded payload (what the wire carries)."""
    return sum(int(np.asarray(a).nbytes) for a in encoded.values())


class ErrorFeedback:
    """Carry what compression dropped into the next round (error feedback).

    Each call encodes ``x + e`` and keeps ``e <- (x + e) - decode(encode(x +
    e))``. Summed over rounds, what was sent equals what was input minus the
    current residual, so biased compressors such as top-k still converge.

    Flower builds a fresh ``ClientApp`` every round: store
    :meth:`state_dict` in the node's ``context.state`` and restore it with
    :meth:`load_state_dict`, or the residual is lost between rounds.
    """

    def __init__(self, scheme: CompressionScheme) -> None:
        self.scheme = scheme
        self._residual: dict[str, np.ndarray] = {}

    @property
    def residual(self) -> dict[str, np.ndarray]:
        """A copy of the current residual, per key."""
        return {k: v.copy() for k, v in self._residual.items()}

    def compress(self, state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Encode ``state`` plus the carried residual; update the residual.

        Raises
        ------
        ConfigError
            If a key's shape no longer matches its residual (the adapter
            changed, e.g. a new lora-rank); call :meth:`reset` first.
        """
        corrected: dict[str, np.ndarray] = {}
        for key, value in state.items():
            x = np.asarray(value, np.float32)
            carried = self._residual.get(key)
            if carried is not None and carried.shape != x.shape:
                raise ConfigError(
                    f"error-feedback residual for {key!r} has shape "
                    f"{carried.shape} but the update has {x.shape}; the adapter "
                    "changed (e.g. lora-rank), so call reset() first"
                )
            corrected[key] = x if carried is None else x + carried
        encoded = encode(corrected, self.scheme)
        sent = decode(encoded)
        self._residual = {k: corrected[k] - sent[k] for k in corrected}
        return encoded

    def reset(self) -> None:
        """Forget the residual (e.g. after the adapter's shape changed)."""
        self._residual = {}

    def state_dict(self) -> dict[str, np.ndarray]:
        """The residual as plain arrays, to persist between rounds."""
        return self.residual

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore a residual saved by :meth:`state_dict`.

        Raises
        ------
        ConfigError
            If a value is not finite, which would corrupt every later update.
        """
        loaded = {k: np.asarray(v, np.float32).copy() for k, v in state.items()}
        for key, value in loaded.items():
            if not np.all(np.isfinite(value)):
                raise ConfigError(
                    f"saved error-feedback residual {key!r} has non-finite "
                    "values; delete it from the node state to start afresh"
                )
        self._residual = loaded
