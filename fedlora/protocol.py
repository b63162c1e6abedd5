"""fedlora's wire protocol: every name that crosses the wire or the node config.

The server (:mod:`fedlora.server`) and the node (:mod:`fedlora.client`) never
import each other; both import this module, which is torch-free and
Flower-free, so the two halves cannot drift apart by a typo. Nothing else in
fedlora defines such a string. ``docs/ARCHITECTURE.md`` has the same
protocol as one table.

Messages (Flower's Message API, one ``RecordDict`` each):

=================  ==========================  =========================================
message            server -> node              node -> server
=================  ==========================  =========================================
train              ``arrays`` + ``config``     ``arrays`` + ``metrics`` (or an error)
evaluate           ``arrays`` + ``config``     ``metrics`` (refused under local DP)
query: site        ``config`` {fedlora-site}   ``site-key``
query: rank        ``config`` {fedlora-lora-   ``site-key`` + ``lora-rank``
                   rank}
query: statistics  ``arrays`` + ``config``     ``site-key`` + ``feature-stats``
                   {fedlora-feature-stats}
SecAgg+ train      Flower's legacy ``fitins``  Flower's masked ``fitres`` (see
                   + the ``fedlora-secagg-*``  :mod:`fedlora.client.secagg`)
                   fit-config keys
=================  ==========================  =========================================
"""

from __future__ import annotations

import re

# ---------------------------------------------------------------------------
# Records in a message's RecordDict
# ---------------------------------------------------------------------------
ARRAYS_KEY = "arrays"  # ArrayRecord: the adapter's tensors (or an encoded delta)
CONFIG_KEY = "config"  # ConfigRecord: the server's instructions for the round
METRICS_KEY = "metrics"  # MetricRecord: a reply's figures (fedlora.privacy.releases)
SITE_KEY = "site-key"  # ConfigRecord and its one key: the node's stable site name
RANK_RECORD = "lora-rank"  # ConfigRecord: the node's LoRA rank (hetero-rank)
STATS_RECORD = "feature-stats"  # ArrayRecord: the node's feature sum and count

# ---------------------------------------------------------------------------
# Keys of the server's ConfigRecord (server -> node)
# ---------------------------------------------------------------------------
KEY_SERVER_ROUND = "server-round"  # int >= 0; the node's ledger records it
KEY_LOCAL_EPOCHS = "local-epochs"
KEY_LEARNING_RATE = "learning-rate"
KEY_BATCH_SIZE = "batch-size"
KEY_DECODES_COMPRESSED = "decodes-compressed"  # the server can decode compressed deltas
KEY_FEATURE_CENTER = "feature-center"  # list of floats: the head's input centre

# Query message types: a key of the server's ConfigRecord says what is asked.
QUERY_SITE = "fedlora-site"
QUERY_LORA_RANK = "fedlora-lora-rank"
QUERY_FEATURE_STATS = "fedlora-feature-stats"

# ---------------------------------------------------------------------------
# Keys of a node's reply records (node -> server)
# ---------------------------------------------------------------------------
KEY_LORA_RANK = "lora-rank"  # in RANK_RECORD
KEY_FEATURE_SUM = "feature-sum"  # in STATS_RECORD: float64 vector
KEY_FEATURE_COUNT = "feature-count"  # in STATS_RECORD: one float64

# Reply metric names (the lists of which metrics a reply may carry are in
# fedlora.privacy.releases: under local DP only fixed or accounted figures).
METRIC_NUM_EXAMPLES = "num-examples"
METRIC_LOSS = "loss"
METRIC_ACCURACY = "accuracy"
METRIC_BYTES_SENT = "bytes-sent"
METRIC_TRAIN_TIME = "train-time-s"
METRIC_EPSILON = "epsilon"
METRIC_DELTA = "delta"
METRIC_SECAGG_CLIPPED = "secagg-clipped-fraction"  # SecAgg+: share of entries clipped
# Metrics the server adds to its own round record (not sent by nodes).
METRIC_TRUNCATION = "lora-truncation-error"  # relative Frobenius error of the global factors
METRIC_REJECTED = "updates-rejected"  # replies left out because they failed validation

# ---------------------------------------------------------------------------
# Error codes of error replies, so the server can tell kinds of failure apart
# ---------------------------------------------------------------------------
ERROR_CODE_INTERNAL = 4000  # an unexpected error at the node; details stay in its log
ERROR_CODE_USER = 4001  # fixable input problem at the node (data, config, model)
ERROR_CODE_PRIVACY = 4002  # DP (or SecAgg+) asked for but not applied: the node refuses
ERROR_CODE_BUDGET = 4003  # the node's own privacy budget would be exceeded
ERROR_CODE_SECAGG_REQUIRED = ERROR_CODE_PRIVACY  # a node requiring SecAgg+ got a plain request

# ---------------------------------------------------------------------------
# SecAgg+ fit-config keys (fedlora's additions to Flower's legacy FitIns)
# ---------------------------------------------------------------------------
SECAGG_NAMES_KEY = "fedlora-secagg-names"  # JSON list: tensor names in wire order
SECAGG_CLIPPING_KEY = "fedlora-secagg-clipping-range"
SECAGG_MAX_WEIGHT_KEY = "fedlora-secagg-max-weight"
SECAGG_FITINS_PARAMETERS = "fitins.parameters"  # Flower's legacy record name

# ---------------------------------------------------------------------------
# Node config (set by a site's operator: `fedlora node --node-config` /
# `flower-supernode --node-config`); the server never sets these
# ---------------------------------------------------------------------------
NODE_DATA_PATH = "data-path"  # a real site's data file
NODE_TEXT_COLUMN = "text-column"
NODE_LABEL_COLUMN = "label-column"
NODE_PROMPT_COLUMN = "prompt-column"  # task=causal-lm: the site's instruction column
NODE_RESPONSE_COLUMN = "response-column"
NODE_MESSAGES_COLUMN = "messages-column"
NODE_SITE_NAME = "site-name"
NODE_EPSILON_CAP = "privacy-epsilon-cap"  # the site's own lifetime ε cap
NODE_DELTA = "privacy-delta"
NODE_ACCOUNTANT = "privacy-accountant"
NODE_PUBLIC_EXAMPLES = "privacy-public-examples"  # the weight a DP site publishes
NODE_LEDGER_DIR = "privacy-ledger-dir"  # where the site keeps its privacy ledgers
NODE_LORA_RANK = KEY_LORA_RANK  # hetero-rank: this site's rank
NODE_REQUIRE_SECAGG = "require-secagg"  # refuse plain (unmasked) training requests
NODE_SECAGG_MIN_THRESHOLD = "secagg-min-threshold"
# Set by Flower's simulation engine on virtual nodes (never at a real site).
NODE_PARTITION_ID = "partition-id"
NODE_NUM_PARTITIONS = "num-partitions"

# ---------------------------------------------------------------------------
# Run-config keys the node checks itself (not only the server)
# ---------------------------------------------------------------------------
RUN_APP_SIGNATURE = "app-signature"  # ed25519 signature of the app's digest

# ---------------------------------------------------------------------------
# How a node trains for a strategy: the strategy -> client mode table
# ---------------------------------------------------------------------------
MODE_STANDARD = "standard"  # train A, B and head at the run's lora-rank; send all of them
MODE_FFA = "ffa"  # A frozen at the shared seeded init; send B and head only
MODE_HETERO = "hetero-rank"  # train at the node's own rank; send all of them

#: Strategies whose nodes do not train in the standard way. Every other
#: strategy (all of Flower's, ``lora-exact``) is ``standard``. The strategy
#: classes declare the same mode; ``tests/test_strategies.py`` keeps them equal.
STRATEGY_MODES: dict[str, str] = {"ffa-lora": MODE_FFA, "hetero-rank": MODE_HETERO}


def declare_mode(strategy: str, mode: str) -> None:
    """Record the client mode of a strategy registered at run time.

    :func:`fedlora.strategies.registry.register` calls this; a node learns the
    mode only if the module that registers the strategy is imported on its
    side too (as fedlora's own strategies' table entries above are).
    """
    if mode not in (MODE_STANDARD, MODE_FFA, MODE_HETERO):
        raise ValueError(
            f"client mode {mode!r} of strategy {strategy!r} is not one of "
            f"{MODE_STANDARD}, {MODE_FFA}, {MODE_HETERO}"
        )
    if mode == MODE_STANDARD:
        STRATEGY_MODES.pop(strategy, None)
    else:
        STRATEGY_MODES[strategy] = mode


def client_mode(strategy: str) -> str:
    """How nodes train for ``strategy``: ``standard``, ``ffa`` or ``hetero-rank``."""
    return STRATEGY_MODES.get(strategy, MODE_STANDARD)


def partition_site_key(partition_id: int) -> str:
    """A simulated node's site key (the ``SITE_KEY`` it reports, ``clients.json``'s
    ``site``): its partition, zero-padded so the keys sort in partition order."""
    return f"partition-{partition_id:06d}"


def partition_of_site_key(key: str) -> int | None:
    """The partition a simulated site key names; None for any other name (a real
    site's, or one that only looks like it)."""
    digits = key.removeprefix("partition-")
    return int(digits) if digits != key and digits.isdigit() else None


# ---------------------------------------------------------------------------
# Free text a node sends (its site key, an error reply's reason): untrusted
# ---------------------------------------------------------------------------
#: A site key: what a site's operator may set as ``site-name``, and what the
#: server accepts from a node (anything else is replaced by ``node-<id>``).
SITE_NAME_RULE = "1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
_SITE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
#: The most of a node's error reason the server keeps (logs, metrics.json, status).
MAX_REASON_CHARS = 2000
_ESCAPES = re.compile(r"\x1b(\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(\x07|\x1b\\)?|[@-Z\\-_])")
_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def valid_site_name(name: str) -> bool:
    """Whether ``name`` may be a site key (:data:`SITE_NAME_RULE`): it names the
    site in logs, file rows and the console, so it may carry nothing else."""
    return _SITE_NAME.fullmatch(name) is not None


def wire_text(value: object, limit: int = MAX_REASON_CHARS) -> str:
    """A node's free text made safe to log, store and show.

    A hostile node could send terminal escape sequences (to repaint or hide
    lines on the operator's terminal), other control characters, or megabytes
    of text (to fill the server's logs and ``metrics.json``). Escapes and
    controls other than newline and tab are dropped; of a text longer than
    ``limit`` characters the first and last halves are kept, saying how much
    was cut between them (a traceback's last line names the error).
    """
    text = _CONTROLS.sub("", _ESCAPES.sub("", str(value)))
    if len(text) > limit:
        half = limit // 2
        text = f"{text[:half]} … ({len(text) - 2 * half} characters dropped) … {text[-half:]}"
    return text
