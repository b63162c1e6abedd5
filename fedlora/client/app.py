"""fedlora's ClientApp: what a hospital's or a bank's node runs.

The same handlers serve a real SuperNode and a simulated one. A node finds
its data in its own node config (``data-path``, ``text-column``,
``label-column``) — the server never names a file at a site. In a
simulation the node config instead carries ``partition-id`` and
``num-partitions`` and the node reads its slice of the demo corpus.

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

import dataclasses
import logging
import math
from functools import lru_cache
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
from fedlora.client.modes import NodeMode, Tamper, node_mode
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
from fedlora.config import RunConfig
from fedlora.data.labels import LabelSpace
from fedlora.data.partition import client_partition, simulation_split
from fedlora.data.sources import TextDataset, load_table
from fedlora.errors import ConfigError, FedloraError, PrivacyError
from fedlora.models.adapter import load_adapter_state, set_lora_a_trainable, trainable_state
from fedlora.models.batches import EncodedDataset
from fedlora.models.loading import cached_model, load_tokenizer
from fedlora.models.pooling import set_feature_center
from fedlora.models.task import get_task
from fedlora.privacy.central import client_clipping_mod
from fedlora.privacy.releases import center_release
from fedlora.protocol import (
    ARRAYS_KEY,
    CONFIG_KEY,
    KEY_FEATURE_CENTER,
    KEY_FEATURE_COUNT,
    KEY_FEATURE_SUM,
    KEY_LORA_RANK,
    KEY_SERVER_ROUND,
    METRIC_ACCURACY,
    METRIC_BYTES_SENT,
    METRIC_DELTA,
    METRIC_EPSILON,
    METRIC_LOSS,
    METRIC_NUM_EXAMPLES,
    METRIC_TRAIN_TIME,
    METRICS_KEY,
    NODE_DATA_PATH,
    NODE_LABEL_COLUMN,
    NODE_NUM_PARTITIONS,
    NODE_PARTITION_ID,
    NODE_SITE_NAME,
    NODE_TEXT_COLUMN,
    QUERY_FEATURE_STATS,
    QUERY_LORA_RANK,
    RANK_RECORD,
    SITE_KEY,
    STATS_RECORD,
)
from fedlora.records import arrays_to_state, payload_bytes

log = logging.getLogger("fedlora.client")


# Node-config keys (set by the node's operator with `flower-supernode --node-config`).
# Error codes in error replies, so the server can tell kinds of failure apart.


@lru_cache(maxsize=4)
def _run_config(items: tuple[tuple[str, Any], ...]) -> RunConfig:
    return RunConfig.from_flat(dict(items))


def run_config_of(context: Context, overrides: dict[str, Any] | None = None) -> RunConfig:
    """The validated run config of this context (parsed once per process)."""
    flat = {**dict(context.run_config), **(overrides or {})}
    return _run_config(tuple(sorted(flat.items())))


def _federation_labels(cfg: RunConfig) -> LabelSpace:
    if cfg.data.labels:
        return LabelSpace.of(cfg.data.labels)
    if cfg.data.dataset == "file":
        raise ConfigError(
            "a federation over site files needs the run config key 'labels' "
            "(e.g. labels='negative,positive') so every site maps labels to the same ids"
        )
    pool, _ = simulation_split(cfg.data, cfg.seed)
    return pool.labels


def local_dataset(cfg: RunConfig, context: Context) -> tuple[TextDataset, int]:
    """This node's examples and a site index for seeding."""
    node = context.node_config
    if NODE_DATA_PATH in node:
        labels = _federation_labels(cfg)
        data = load_table(
            str(node[NODE_DATA_PATH]),
            str(node.get(NODE_TEXT_COLUMN, cfg.data.text_column)),
            str(node.get(NODE_LABEL_COLUMN, cfg.data.label_column)),
            labels,
        )
        return data, int(context.node_id) % 1_000_003
    if NODE_PARTITION_ID not in node:
        raise ConfigError(
            "this node has neither 'data-path' (a real site) nor 'partition-id' "
            "(a simulated one) in its node config; start it with "
            "--node-config \"data-path='/data/notes.csv'\""
        )
    pid, n = int(node[NODE_PARTITION_ID]), int(node[NODE_NUM_PARTITIONS])
    return client_partition(cfg.data, cfg.seed, pid, n), pid


@lru_cache(maxsize=8)
def _encoded(task: str, model_path: str, max_len: int, texts: TextDataset) -> EncodedDataset:
    """Tokenised once per worker; ``texts`` (rows and label ids) is the cache key."""
    return get_task(task).encode(load_tokenizer(model_path or None), texts, max_len)


def prepare(
    msg: Message,
    context: Context,
    overrides: dict[str, Any] | None = None,
    node: NodeMode | None = None,
    tamper: Tamper | None = None,
) -> tuple[RunConfig, Any, EncodedDataset, int]:
    """Validate config, load data and model, and install the global adapter.

    ``node`` sets the model's rank and which LoRA factors train (default: the
    node's mode for this run); ``poison_data`` applies a simulated
    label-flip attack when this partition mounts one.
    """
    cfg = run_config_of(context, overrides)
    node = node or node_mode(cfg, context)
    data, site = local_dataset(cfg, context)
    if cfg.train.max_train_examples and len(data) > cfg.train.max_train_examples:
        data = data.subset(range(cfg.train.max_train_examples))
    if tamper is not None:  # simulations only (fedlora.simulations.attacks)
        data = tamper.data(cfg, context, data)
    task = get_task()
    encoded = _encoded(task.name, cfg.model_path, cfg.train.max_seq_length, data)
    lora = dataclasses.replace(cfg.lora, rank=node.rank)
    model = cached_model(cfg.model_path or None, len(data.labels), lora, cfg.seed, task.build_model)
    # Every use sets it: the cached model may have served another mode before.
    set_lora_a_trainable(model, node.trains_a)
    state = arrays_to_state(msg.content.array_records[ARRAYS_KEY])
    load_adapter_state(model, state)
    set_feature_center(model, message_center(msg, cfg))
    return cfg, model, encoded, site


def message_center(msg: Message, cfg: RunConfig) -> np.ndarray | None:
    """The feature centre the server sent with this message (feature-centering).

    Fails closed: a run with feature-centering whose message carries no centre
    would train a head on a different vector than the server evaluates.
    """
    config = msg.content.config_records.get(CONFIG_KEY, ConfigRecord())
    if KEY_FEATURE_CENTER in config:
        return np.asarray(config[KEY_FEATURE_CENTER], dtype=np.float32)
    if cfg.lora.feature_centering and QUERY_FEATURE_STATS not in config:
        raise ConfigError(
            "feature-centering=true but the server's message carries no feature-center; "
            "server and node must run the same fedlora version and run config"
        )
    return None


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
        return str(node[NODE_SITE_NAME])
    if NODE_PARTITION_ID in node:
        return f"partition-{int(node[NODE_PARTITION_ID]):06d}"
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
                ledger.check_budget(limits.epsilon_cap, *center_release(cfg)[0])
        elif cfg.privacy.dp_mode != "none":
            raise ConfigError(f"feature-centering does not fit dp-mode={cfg.privacy.dp_mode}")
        _cfg, model, encoded, _site = prepare(msg, context, overrides)
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
            # The node's own budget is checked before its data is read.
            ledger, limits = open_ledger(cfg, context)
            precheck(ledger, limits)
        node = node_mode(cfg, context)
        cfg, model, encoded, site = prepare(msg, context, overrides, node, tamper)
        received = arrays_to_state(msg.content.array_records[ARRAYS_KEY])
        generator = round_generator(cfg.seed, server_round, site)
        if cfg.privacy.dp_mode == "local":
            result, model, privacy = private_train(
                model, encoded, cfg, ledger, limits, server_round, generator
            )
        else:
            result = local_train(model, encoded, cfg.train, generator)
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


def server_round_of(msg: Message) -> int:
    """The round number the server put in a train message (0 if absent).

    Raises
    ------
    ConfigError
        If it is not a whole number >= 0: the ledger records it.
    """
    config = msg.content.config_records.get(CONFIG_KEY, ConfigRecord())
    value = config.get(KEY_SERVER_ROUND, 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"the server sent {KEY_SERVER_ROUND}={value!r}; expected an int >= 0")
    return value


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
        _cfg, model, encoded, _site = prepare(msg, context, overrides)
        loss, accuracy, n = get_task().evaluate(model, encoded)
    except Exception as exc:  # every failure is a reply; see failure_reply
        return failure_reply(msg, exc, "evaluation")
    metrics = MetricRecord({METRIC_NUM_EXAMPLES: n, METRIC_LOSS: loss, METRIC_ACCURACY: accuracy})
    return Message(content=RecordDict({METRICS_KEY: metrics}), reply_to=msg)


app = build_client_app()
