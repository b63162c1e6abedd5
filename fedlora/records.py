"""Adapter state <-> Flower records, LoRA key names and payload size: written once.

An adapter *state* is a plain ``name -> numpy array`` mapping (the LoRA
factors and the trained head, by PEFT's parameter names). Everything that
crosses the wire carries it as a Flower ``ArrayRecord``; the server, the
node, the strategies and the checkpoints all convert through these helpers,
so a name or a dtype is never translated two ways. No torch; Flower is
imported on first use, so the aggregation math (which needs only the key
names) stays Flower-free.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from flwr.app import ArrayRecord

State = dict[str, np.ndarray]
"""An adapter state: arrays keyed by parameter name (float32 for tensors)."""

LORA_A_SUFFIX = ".lora_A.weight"  # PEFT's name ending of a down-projection factor
LORA_B_SUFFIX = ".lora_B.weight"  # PEFT's name ending of an up-projection factor


def arrays_to_state(record: ArrayRecord) -> State:
    """ArrayRecord -> ``name -> ndarray`` (order kept)."""
    return {name: arr.numpy() for name, arr in record.items()}


def state_to_arrays(state: Mapping[str, np.ndarray]) -> ArrayRecord:
    """``name -> ndarray`` -> ArrayRecord (order kept)."""
    from flwr.app import Array, ArrayRecord

    return ArrayRecord({name: Array(np.ascontiguousarray(value)) for name, value in state.items()})


def payload_bytes(record: ArrayRecord) -> int:
    """Serialized tensor bytes in a record (what crosses the wire, less framing)."""
    return int(sum(len(arr.data) for arr in record.values()))


def nonfinite_key(state: Mapping[str, np.ndarray]) -> str | None:
    """The first tensor of ``state`` holding NaN or inf, or None.

    One check for every place a state must never be kept with a NaN: the
    aggregate a round produces, a checkpoint, an exported adapter.
    """
    for name, value in state.items():
        if not np.all(np.isfinite(value)):
            return name
    return None


def is_lora_a(key: str) -> bool:
    """Whether ``key`` names a LoRA down-projection (A) factor."""
    return key.endswith(LORA_A_SUFFIX)


def is_lora_b(key: str) -> bool:
    """Whether ``key`` names a LoRA up-projection (B) factor."""
    return key.endswith(LORA_B_SUFFIX)
