"""The node's half of SecAgg+: train, send a masked update, never the update itself.

Flower 1.41 ships SecAgg+ only on its legacy path: the server's
``SecAggPlusWorkflow`` sends ``FitIns`` records (``fitins.parameters`` and
``fitins.config``) in ``train`` messages and Flower's client mod
``secaggplus_mod`` expects a ``FitRes`` record back (``fitres.parameters``,
``fitres.num_examples``, ``fitres.metrics``), which it quantizes and masks
before anything leaves the node (:mod:`fedlora.server.secagg` has the maths).
This module adds what a fedlora node needs around that mod:

* :func:`secagg_mod` runs ``secaggplus_mod`` for the protocol's ``train``
  messages only, so the same ClientApp still answers fedlora's plain
  messages (site query, evaluate) — and, when the node requires it
  (node config ``require-secagg=true``), refuses a plain ``train`` message
  with an error reply: a node whose operator asked for secure aggregation
  never sends a readable update because the server chose not to run the
  protocol (fail closed).
* :func:`secagg_fit_handler` turns a training function
  ``train_fn(state, config, context) -> (state, num_examples, metrics)`` over
  named tensors into the legacy fit handler. Legacy parameters are an
  ordered list, so the server sends the tensor names in the fit config
  (:data:`SECAGG_NAMES_KEY`) and the handler checks that what training returns has
  exactly those names and shapes.
* What is masked is the **update** ``trained - global`` (float32), not the
  adapter: its scale is set by the optimiser, not by LoRA's initialisation,
  so one clipping range fits every tensor (see the server module).
* The node reports, in clear, the share of update entries that SecAgg+'s
  clipping will cut (:data:`METRIC_SECAGG_CLIPPED`) and refuses to take part when
  its example count exceeds the protocol's ``max_weight`` (the masked sum
  would overflow and the round's aggregate would be garbage).
* :func:`fedlora_secagg_train` runs fedlora's own ``train`` handler (data,
  local DP, privacy ledger, error replies: all unchanged) inside the protocol.

Everything in ``fitres.metrics`` and ``fitres.num_examples`` reaches the
server in clear, beside the masked vector; only the tensors are hidden.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.compat.common import recorddict_compat as compat

from fedlora.client.replies import error_reply
from fedlora.errors import ConfigError, FedloraError
from fedlora.protocol import (
    ARRAYS_KEY,
    CONFIG_KEY,
    ERROR_CODE_SECAGG_REQUIRED,
    ERROR_CODE_USER,
    METRIC_NUM_EXAMPLES,
    METRIC_SECAGG_CLIPPED,
    NODE_REQUIRE_SECAGG,
    NODE_SECAGG_MIN_THRESHOLD,
    SECAGG_CLIPPING_KEY,
    SECAGG_FITINS_PARAMETERS,
    SECAGG_MAX_WEIGHT_KEY,
    SECAGG_NAMES_KEY,
)
from fedlora.records import State, arrays_to_state, is_lora_a, state_to_arrays

Scalar = bool | int | float | str | bytes
TrainFn = Callable[[State, dict[str, Scalar], Context], tuple[State, int, dict[str, Scalar]]]

# Fit-config keys the server (fedlora.server.secagg) sets for every round.
# node config: the fewest other nodes whose shares the server must collect
# to unmask anything (default 2, with the rule "above half the shares")
DEFAULT_MIN_THRESHOLD = 2
# Error codes, mirroring fedlora.client.app (importing it would pull in torch).


class SecAggRequired(FedloraError, RuntimeError):
    """A node that requires secure aggregation got a plain training request."""


def is_secagg_fit(msg: Message) -> bool:
    """Whether ``msg`` is the protocol's training step (legacy ``FitIns`` inside)."""
    return (
        msg.metadata.message_type == MessageType.TRAIN
        and msg.has_content()
        and SECAGG_FITINS_PARAMETERS in msg.content.array_records
    )


def secagg_mod(required: bool | None = None) -> Mod:
    """Flower's ``secaggplus_mod`` for SecAgg+ messages; plain messages pass by.

    Parameters
    ----------
    required : bool or None
        Refuse plain ``train`` messages with an error reply (code
        :data:`ERROR_CODE_SECAGG_REQUIRED`) instead of training and sending a
        readable update. None (the default) lets each node decide with the
        node-config key ``require-secagg`` (:data:`NODE_REQUIRE_SECAGG`): the site's
        operator, not the server, chooses. ``query`` and ``evaluate``
        messages always pass.
    """

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        if msg.metadata.message_type != MessageType.TRAIN:
            return call_next(msg, context)
        if RECORD_KEY_CONFIGS in msg.content.config_records:
            refusal = check_setup(msg, context)
            if refusal is not None:
                return error_reply(msg, refusal, ERROR_CODE_SECAGG_REQUIRED)
            return _run_protocol_step(msg, context, call_next)
        must = required if required is not None else _node_requires(context)
        if must:
            exc = SecAggRequired(
                "this node only sends masked updates (its operator requires secure "
                "aggregation) but the server asked for a plain one; run the federation "
                f"with secure aggregation, or restart the node without {NODE_REQUIRE_SECAGG}=true"
            )
            return error_reply(msg, exc, ERROR_CODE_SECAGG_REQUIRED)
        return call_next(msg, context)

    return mod


def check_setup(msg: Message, context: Context) -> SecAggRequired | None:
    """Why this node refuses the server's SecAgg+ set-up, or None.

    The server picks the protocol's share count and reconstruction threshold;
    a hostile one could ask for a threshold of 1 (or shares below half the
    sample) and unmask one node's update. The node checks them itself: the
    threshold must be at least its operator's ``secagg-min-threshold`` and
    above half the shares (so two disjoint groups cannot both reconstruct).
    """
    config = msg.content.config_records[RECORD_KEY_CONFIGS]
    if config.get(Key.STAGE) != Stage.SETUP:
        return None
    raw_min = context.node_config.get(NODE_SECAGG_MIN_THRESHOLD, DEFAULT_MIN_THRESHOLD)
    if isinstance(raw_min, bool) or not isinstance(raw_min, int) or raw_min < 2:
        return SecAggRequired(
            f"node config has {NODE_SECAGG_MIN_THRESHOLD}={raw_min!r}; give a whole number >= 2"
        )
    threshold, shares = config.get(Key.THRESHOLD), config.get(Key.SHARE_NUMBER)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (threshold, shares)):
        return SecAggRequired(
            f"SecAgg+ set-up has threshold={threshold!r}, share_num={shares!r}; not integers"
        )
    assert isinstance(threshold, int) and isinstance(shares, int)
    if threshold < raw_min or 2 * threshold <= shares:
        return SecAggRequired(
            f"the server's SecAgg+ set-up has reconstruction threshold {threshold} of "
            f"{shares} shares; this node requires a threshold >= {raw_min} "
            f"({NODE_SECAGG_MIN_THRESHOLD}) and above half the shares, or the server could "
            "unmask a single update. The operator raises reconstruction_threshold (or "
            "samples more nodes)"
        )
    return None


def _node_requires(context: Context) -> bool:
    value = context.node_config.get(NODE_REQUIRE_SECAGG, False)
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes")
    return bool(value)


class _TrainingFailed(Exception):
    """Carries a training error reply out through ``secaggplus_mod``."""

    def __init__(self, reply: Message):
        super().__init__(reply.error.reason)
        self.reply = reply


def _run_protocol_step(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    # secaggplus_mod reads the content of whatever training returns; an error
    # reply has none, and the mod would fail with "Message content is None".
    # Raise past it instead and send the training error itself, so the server
    # logs why this node dropped out of the round.
    def guarded(inner: Message, ctx: Context) -> Message:
        reply = call_next(inner, ctx)
        if reply.has_error():
            raise _TrainingFailed(reply)
        return reply

    try:
        return secaggplus_mod(msg, context, guarded)
    except _TrainingFailed as failed:
        return Message(error=failed.reply.error, reply_to=msg)


def read_fitins(msg: Message) -> tuple[list[str], State, dict[str, Scalar]]:
    """Tensor names, the global adapter by name, and the plain fit config."""
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    config: dict[str, Scalar] = dict(fitins.config)
    if SECAGG_NAMES_KEY not in config:
        raise ConfigError(
            f"SecAgg+ fit request has no '{SECAGG_NAMES_KEY}' in its config; the server must "
            "run fedlora.server.secagg (plain Flower SecAgg+ does not name tensors)"
        )
    names = json.loads(str(config.pop(SECAGG_NAMES_KEY)))
    arrays = parameters_to_ndarrays(fitins.parameters)
    if len(names) != len(arrays):
        raise ConfigError(
            f"SecAgg+ fit request names {len(names)} tensors but carries {len(arrays)}"
        )
    return names, dict(zip(names, arrays, strict=True)), config


def fitres_reply(
    msg: Message,
    names: list[str],
    global_state: Mapping[str, np.ndarray],
    trained: Mapping[str, np.ndarray],
    num_examples: int,
    metrics: Mapping[str, Scalar],
    config: Mapping[str, Scalar],
) -> Message:
    """The legacy ``FitRes`` reply carrying ``trained - global`` for the mod to mask."""
    if sorted(trained) != sorted(names):
        missing = sorted(set(names) - set(trained))
        extra = sorted(set(trained) - set(names))
        raise ConfigError(
            f"training returned a state that differs from the global adapter: missing "
            f"{missing[:3]}, unexpected {extra[:3]}"
        )
    deltas = []
    for name in names:
        new, old = np.asarray(trained[name]), global_state[name]
        if new.shape != old.shape:
            raise ConfigError(f"training changed the shape of {name!r}: {old.shape} -> {new.shape}")
        deltas.append((new.astype(np.float64) - old.astype(np.float64)).astype(np.float32))
    max_weight = float(config.get(SECAGG_MAX_WEIGHT_KEY, 0.0))
    if max_weight and num_examples > max_weight:
        raise ConfigError(
            f"this node trained on {num_examples} examples but the federation's SecAgg+ "
            f"max_weight is {max_weight:g}; the masked sum would overflow. Ask the "
            "operator to raise max-weight (or cap max-train-examples)."
        )
    extra_metrics: dict[str, Scalar] = {}
    clipping = float(config.get(SECAGG_CLIPPING_KEY, 0.0))
    if clipping and max_weight:
        # secaggplus_mod clips (num_examples / max_weight) * delta at +-clipping.
        limit = clipping * max_weight / max(num_examples, 1)
        total = sum(d.size for d in deltas)
        clipped = sum(int(np.count_nonzero(np.abs(d) > limit)) for d in deltas)
        extra_metrics[METRIC_SECAGG_CLIPPED] = clipped / total if total else 0.0
    fitres = FitRes(
        status=Status(code=Code.OK, message="Success"),
        parameters=ndarrays_to_parameters(deltas),
        num_examples=int(num_examples),
        metrics={**dict(metrics), **extra_metrics},
    )
    return Message(content=compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)


def secagg_fit_handler(train_fn: TrainFn) -> ClientAppCallable:
    """A ``@app.train()`` handler for SecAgg+ rounds around ``train_fn``.

    ``train_fn(state, config, context)`` gets a copy of the global adapter by
    name and the round's config (``server-round`` and whatever the server
    added), and returns the trained adapter, its example count (the FedAvg
    weight) and scalar metrics. A :class:`fedlora.errors.FedloraError` it
    raises becomes an error reply naming the problem.
    """

    def handle(msg: Message, context: Context) -> Message:
        try:
            names, global_state, config = read_fitins(msg)
            work = {k: v.copy() for k, v in global_state.items()}
            trained, num_examples, metrics = train_fn(work, dict(config), context)
            return fitres_reply(msg, names, global_state, trained, num_examples, metrics, config)
        except FedloraError as exc:
            return error_reply(msg, exc, ERROR_CODE_USER)

    return handle


def build_secagg_client_app(train_fn: TrainFn, required: bool | None = True) -> ClientApp:
    """A ClientApp that trains with ``train_fn`` and only sends masked updates."""
    app = ClientApp(mods=[secagg_mod(required)])
    app.train()(secagg_fit_handler(train_fn))
    return app


def fedlora_secagg_train(
    msg: Message, context: Context, train: Callable[[Message, Context], Message]
) -> Message:
    """fedlora's ``train`` handler inside a SecAgg+ round.

    The protocol's ``FitIns`` is rewritten into the message fedlora's handler
    ``train`` reads (``arrays`` + ``config`` with ``server-round``), so data
    loading, local DP, the node's privacy ledger and error replies behave
    exactly as in a plain round; its reply is turned into the ``FitRes`` the
    mod masks. (The ClientApp passes its handler in: this module does not
    import the app.)
    """

    try:
        names, global_state, config = read_fitins(msg)
    except FedloraError as exc:
        return error_reply(msg, exc, ERROR_CODE_USER)
    plain = {
        k: v for k, v in config.items() if k not in (SECAGG_CLIPPING_KEY, SECAGG_MAX_WEIGHT_KEY)
    }
    msg.content = RecordDict(
        {
            ARRAYS_KEY: state_to_arrays(global_state),
            CONFIG_KEY: ConfigRecord(plain),  # type: ignore[arg-type]
        }
    )
    reply = train(msg, context)
    if reply.has_error():
        return reply
    trained = arrays_to_state(reply.content.array_records[ARRAYS_KEY])
    # FFA-LoRA replies leave out the frozen A factors: their update is zero.
    trained = {**{k: global_state[k] for k in names if is_lora_a(k)}, **trained}
    metrics: dict[str, Scalar] = {}
    for record in reply.content.metric_records.values():
        metrics.update({k: v for k, v in record.items() if isinstance(v, int | float)})
    num_examples = int(metrics.pop(METRIC_NUM_EXAMPLES, 0))
    try:
        return fitres_reply(msg, names, global_state, trained, num_examples, metrics, config)
    except FedloraError as exc:
        return error_reply(msg, exc, ERROR_CODE_USER)
