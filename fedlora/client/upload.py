"""What a client uploads: its adapter, or its update encoded for a slow uplink.

Blockwise absmax int8/int4 (Dettmers et al., 2022,
https://arxiv.org/abs/2110.02861) and top-k with error feedback (Stich et al.,
2018, https://arxiv.org/abs/1809.07599), from :mod:`fedlora.compression`.

With ``compression = "none"`` the upload is the trainable tensors as they
are. Otherwise it is the *delta* ``trained - received`` (per sent tensor),
encoded; the server adds it back to what it sent
(:mod:`fedlora.strategies.compressed`). Deltas are small and centred, so they
quantise well, and top-k of a delta keeps the largest changes rather than the
largest weights.

Top-k's error feedback (what a round did not send is added to the next
round's delta) must survive between rounds, and Flower builds the ClientApp
afresh for every message: the residual lives in the node's
``context.state``, which Flower keeps for the node across rounds.
"""

from __future__ import annotations

import logging

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from fedlora.compression import CompressionScheme, ErrorFeedback, encode
from fedlora.errors import ConfigError
from fedlora.protocol import KEY_DECODES_COMPRESSED
from fedlora.records import State, arrays_to_state, state_to_arrays
from fedlora.settings import TrainSettings
from fedlora.strategies.compressed import encoded_record

log = logging.getLogger("fedlora.client")

FEEDBACK_STATE_KEY = "fedlora-error-feedback"  # ArrayRecord in context.state


def scheme_of(settings: TrainSettings) -> CompressionScheme:
    """The codec settings of a run's train settings (compression != none)."""
    return CompressionScheme(
        kind=settings.compression,  # type: ignore[arg-type]  # validated by TrainSettings
        block_size=settings.compression_block_size or None,
        topk_fraction=settings.topk_fraction,
    )


def build_upload(
    trained: State,
    received: State,
    settings: TrainSettings,
    server_config: ConfigRecord,
    node_state: RecordDict,
) -> ArrayRecord:
    """The ArrayRecord a client sends for ``trained``.

    Parameters
    ----------
    trained
        The tensors the client sends (its trainable ones), after training.
    received
        The adapter the client was sent this round (delta reference).
    settings
        The run's train settings (``compression`` and its parameters).
    server_config
        The train message's ConfigRecord: the server must have announced that
        it decodes compressed updates.
    node_state
        The node's ``context.state`` (holds top-k's error feedback).

    Raises
    ------
    ConfigError
        If compression is asked for and the server's strategy cannot decode it.
    """
    if settings.compression == "none":
        return _record(trained)
    if not server_config.get(KEY_DECODES_COMPRESSED, False):
        raise ConfigError(
            f"compression={settings.compression}, but the server's strategy does not "
            "decode compressed updates; the server must build its strategy with "
            "fedlora.strategies.registry.build_strategy(..., compression=...) or use a "
            "fedlora LoRA strategy (lora-exact, ffa-lora, hetero-rank). Set "
            "compression=none to send plain updates"
        )
    delta = {k: trained[k] - received[k] for k in trained}
    scheme = scheme_of(settings)
    if scheme.kind != "topk":
        return encoded_record(encode(delta, scheme))
    feedback = ErrorFeedback(scheme)
    saved = _saved_residual(node_state, delta)
    if saved:
        feedback.load_state_dict(saved)
    encoded = feedback.compress(delta)
    node_state[FEEDBACK_STATE_KEY] = _record(feedback.state_dict())
    return encoded_record(encoded)


def _saved_residual(node_state: RecordDict, delta: State) -> State:
    if FEEDBACK_STATE_KEY not in node_state.array_records:
        return {}
    saved = arrays_to_state(node_state.array_records[FEEDBACK_STATE_KEY])
    same = saved.keys() == delta.keys() and all(saved[k].shape == delta[k].shape for k in delta)
    if not same:
        # The adapter changed shape (another lora-rank, another strategy): the
        # old residual belongs to another model and is dropped.
        log.warning("error-feedback residual does not match the adapter; starting afresh")
        return {}
    return saved


def _record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return state_to_arrays(arrays)
