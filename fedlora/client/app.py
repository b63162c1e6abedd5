"""fedlora's ClientApp: what a hospital's or a bank's node runs.

The same handlers serve a real SuperNode and a simulated one; what each
needs first (run config, this node's data, the model with the server's
adapter) is :mod:`fedlora.client.prepare`.

Only the adapter's trainable tensors are sent back (under ``ffa-lora`` that
is B and the head: A stays frozen), as they are or, with ``compression``, as
an encoded delta (:mod:`fedlora.client.upload`). How the node trains follows
the run's strategy (:mod:`fedlora.client.modes`): its LoRA mode, its rank
(``hetero-rank``), and in simulations whether its partition attacks. A
failure that a person can fix (bad file, unknown label, mismatched model)
comes back to the server as an error reply naming the problem; the server
carries on without it.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp

from fedlora.client.centering import feature_statistics
from fedlora.client.modes import Tamper, node_mode
from fedlora.client.prepare import prepare, run_config_of, server_round_of
from fedlora.client.private import (
    open_ledger,
    precheck,
    private_train,
    public_examples,
    require_site_dp,
)
from fedlora.client.replies import error_reply, failure_reply
from fedlora.client.secagg import fedlora_secagg_train, is_secagg_fit, secagg_mod
from fedlora.client.train import local_train, round_generator
from fedlora.client.upload import build_upload
from fedlora.errors import ConfigError, FedloraError, PrivacyError
from fedlora.models.adapter import trainable_state
from fedlora.models.task import get_task
from fedlora.privacy.central import client_clipping_mod
from fedlora.privacy.releases import center_release
from fedlora.protocol import (
    ARRAYS_KEY,
    CONFIG_KEY,
    KEY_FEATURE_COUNT,
    KEY_FEATURE_SUM,
    KEY_LORA_RANK,
    METRIC_ACCURACY,
    METRIC_BYTES_SENT,
    METRIC_DELTA,
    METRIC_EPSILON,
    METRIC_LOSS,
    METRIC_NUM_EXAMPLES,
    METRIC_TRAIN_TIME,
    METRICS_KEY,
    NODE_PARTITION_ID,
    NODE_SITE_NAME,
    QUERY_FEATURE_STATS,
    QUERY_LORA_RANK,
    RANK_RECORD,
    SITE_KEY,
    SITE_NAME_RULE,
    STATS_RECORD,
    partition_site_key,
    valid_site_name,
)
from fedlora.records import arrays_to_state, payload_bytes

log = logging.getLogger("fedlora.client")


def build_client_app(
    overrides: dict[str, Any] | None = None,
    mods: list[Any] | None = None,
    tamper: Tamper | None = None,
) -> ClientApp:
    """A ClientApp whose run config is ``context.run_config`` plus ``overrides``.

    ``fedlora simulate`` passes its overrides here, and the simulated
    attacks as ``tamper``; ``flwr run`` and a site's node use the
    module-level ``app`` with the run config Flower delivers, and no tamper.
    """
    extra = dict(overrides or {})
    # Client-side clipping for central DP is a mod on every node; it is a
    # no-op unless the run's dp-mode asks for it.
    dp_mod = client_clipping_mod(lambda ctx: run_config_of(ctx, extra).privacy.dp_mode)
    # SecAgg+ runs Flower's secaggplus_mod on the protocol's messages only.
    client_app = ClientApp(mods=[secagg_mod(), *(mods or []), dp_mod])

    @client_app.train()
    def _train(msg: Message, context: Context) -> Message:
        if is_secagg_fit(msg):
            return fedlora_secagg_train(msg, context, lambda m, c: train(m, c, extra, tamper))
        return train(msg, context, extra, tamper)

    @client_app.evaluate()
    def _evaluate(msg: Message, context: Context) -> Message:
        return evaluate_handler(msg, context, extra)

    @client_app.query()
    def _query(msg: Message, context: Context) -> Message:
        return query_handler(msg, context, extra)

    return client_app


def site_key(context: Context) -> str:
    """A stable name for this site, used by the server for seeded sampling."""
    node = context.node_config
    if NODE_SITE_NAME in node:
        name = str(node[NODE_SITE_NAME])
        if not valid_site_name(name):
            raise ConfigError(
                f"node config {NODE_SITE_NAME}={name!r} is not a site name; use "
                f"{SITE_NAME_RULE} (the server would not accept it)"
            )
        return name
    if NODE_PARTITION_ID in node:
        return partition_site_key(int(node[NODE_PARTITION_ID]))
    return f"node-{context.node_id}"


def query_handler(
    msg: Message, context: Context, overrides: dict[str, Any] | None = None
) -> Message:
    """Answer the server's site-key query and its rank query (no data is read),
    and its feature-statistics query (data is read: privacy checks first)."""
    content = RecordDict({SITE_KEY: ConfigRecord({SITE_KEY: site_key(context)})})
    asked = msg.content.config_records.get(CONFIG_KEY, ConfigRecord())
    if QUERY_FEATURE_STATS in asked:
        return statistics_reply(msg, context, content, overrides)
    if QUERY_LORA_RANK in asked:
        try:
            node = node_mode(run_config_of(context, overrides), context)
        except FedloraError as exc:
            return error_reply(msg, exc)
        content[RANK_RECORD] = ConfigRecord({KEY_LORA_RANK: node.rank})
    return Message(content=content, reply_to=msg)


def statistics_reply(
    msg: Message,
    context: Context,
    content: RecordDict,
    overrides: dict[str, Any] | None = None,
) -> Message:
    """Sum and count of this node's sentence vectors (see fedlora.client.centering)."""
    try:
        cfg = run_config_of(context, overrides)
        require_site_dp(cfg, context, "the feature-statistics query")
        if not cfg.lora.feature_centering:
            # Only a run that centres its head may read the data for this.
            raise ConfigError(
                "the server asked for feature statistics, but the run's "
                "feature-centering is false; the node sends none"
            )
        ledger = None
        if cfg.privacy.dp_mode == "local":
            ledger, limits = open_ledger(cfg, context)
            precheck(ledger, limits)
            if not math.isinf(limits.epsilon_cap):
                ledger.check_releases(limits.epsilon_cap, center_release(cfg))
        elif cfg.privacy.dp_mode != "none":
            raise ConfigError(f"feature-centering does not fit dp-mode={cfg.privacy.dp_mode}")
        cfg, model, encoded, _site = prepare(msg, context, overrides)
        total, count = feature_statistics(model, encoded, cfg, ledger)
    except Exception as exc:  # every failure is a reply; see failure_reply
        return failure_reply(msg, exc, "feature statistics")
    content[STATS_RECORD] = ArrayRecord(
        {
            KEY_FEATURE_SUM: Array(total.astype(np.float64)),
            KEY_FEATURE_COUNT: Array(np.array([count], dtype=np.float64)),
        }
    )
    return Message(content=content, reply_to=msg)


def train(
    msg: Message,
    context: Context,
    overrides: dict[str, Any] | None = None,
    tamper: Tamper | None = None,
) -> Message:
    """Fine-tune the global adapter on local data; send back only the adapter."""
    privacy: dict[str, float] = {}
    try:
        cfg = run_config_of(context, overrides)
        require_site_dp(cfg, context, "training")
        server_round = server_round_of(msg)
        if cfg.privacy.dp_mode == "local":
            # The node's own budget is checked before its data is read, for
            # every round the run still asks for.
            ledger, limits = open_ledger(cfg, context)
            precheck(ledger, limits, max(1, cfg.num_server_rounds - server_round + 1))
        node = node_mode(cfg, context)
        cfg, model, encoded, site = prepare(msg, context, overrides, node, tamper)
        received = arrays_to_state(msg.content.array_records[ARRAYS_KEY])
        generator = round_generator(cfg.seed, server_round, site)
        if cfg.privacy.dp_mode == "local":
            result, model, privacy = private_train(
                model, encoded, cfg, ledger, limits, server_round, generator
            )
        else:
            result = local_train(model, encoded, cfg.train, generator, get_task(cfg.task))
        trained = trainable_state(model)
        if tamper is not None:  # simulations only (fedlora.simulations.attacks)
            trained = tamper.update(cfg, context, server_round, site, received, trained)
        server_config = msg.content.config_records.get(CONFIG_KEY, ConfigRecord())
        record = build_upload(trained, received, cfg.train, server_config, context.state)
        if cfg.privacy.dp_mode == "local":
            # Only fixed or accounted figures (fedlora.privacy.releases).
            metrics = MetricRecord(
                {
                    METRIC_NUM_EXAMPLES: public_examples(context),
                    METRIC_BYTES_SENT: payload_bytes(record),
                    METRIC_EPSILON: privacy[METRIC_EPSILON],
                    METRIC_DELTA: privacy[METRIC_DELTA],
                }
            )
        else:
            metrics = MetricRecord(
                {
                    METRIC_NUM_EXAMPLES: result.num_examples,
                    METRIC_LOSS: result.loss,
                    METRIC_ACCURACY: result.accuracy,
                    METRIC_BYTES_SENT: payload_bytes(record),
                    METRIC_TRAIN_TIME: result.seconds,
                }
            )
    except Exception as exc:  # every failure is a reply; see failure_reply
        return failure_reply(msg, exc, "training")
    return Message(content=RecordDict({ARRAYS_KEY: record, METRICS_KEY: metrics}), reply_to=msg)


def evaluate_handler(
    msg: Message, context: Context, overrides: dict[str, Any] | None = None
) -> Message:
    """Evaluate the global adapter on local data (federated evaluation)."""
    try:
        cfg = run_config_of(context, overrides)
        require_site_dp(cfg, context, "federated evaluation")
        if cfg.privacy.dp_mode == "local":
            raise PrivacyError(
                "federated evaluation under dp-mode=local would send the exact loss and "
                "accuracy of this site's data for any adapter the server sends, with no "
                "ledger entry; the node refuses. Set fraction-evaluate=0 (the server "
                "evaluates the global adapter on its own held-out split)"
            )
        cfg, model, encoded, _site = prepare(msg, context, overrides)
        loss, accuracy, n = get_task(cfg.task).evaluate(model, encoded)
    except Exception as exc:  # every failure is a reply; see failure_reply
        return failure_reply(msg, exc, "evaluation")
    metrics = MetricRecord({METRIC_NUM_EXAMPLES: n, METRIC_LOSS: loss, METRIC_ACCURACY: accuracy})
    return Message(content=RecordDict({METRICS_KEY: metrics}), reply_to=msg)


app = build_client_app()
