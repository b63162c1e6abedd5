"""Every release a node makes, and what covers it (torch-free: both sides read it).

DP protects a site's examples only if *everything* computed from them that
leaves the site is either noised and accounted in the site's ledger, or
fixed in advance (a function of settings, not of the data). This module is
the list; the ClientApp builds its replies from it and the server's reply
gate (:mod:`fedlora.server.gate`) accepts nothing beyond it, so a release
that is not on the list cannot leave a node, nor be read by the server.

========================  ======================  ===========================================
release                   message                 under local DP (``dp-mode=local``)
========================  ======================  ===========================================
adapter tensors           train reply             DP-SGD: clipped, noised, accounted per round
noisy label counts        (used at the node)      Gaussian histogram, accounted per round
feature sum and count     statistics query        clipped, noised, accounted once
num-examples              train reply             fixed: the site's ``privacy-public-examples``
                                                  (node config), else 1 -- never the data size
epsilon, delta            train reply             the ledger's total: a function of the
                                                  settings and the sampling rate ``B/n``,
                                                  which DP-SGD accounting treats as public
bytes-sent                train reply             fixed by the adapter shape and codec
loss, accuracy, time      train reply             **not sent** (exact, unaccounted)
federated evaluation      evaluate reply          **refused** (exact loss and accuracy of any
                                                  adapter the server sends are unaccounted)
site key, LoRA rank       query reply             node-config settings, no data read
error reasons             any reply               fixed sentences; unexpected errors send the
                                                  exception type only (no paths, no traceback)
========================  ======================  ===========================================

Without DP a node sends exact metrics; the site chose that by running
without a cap (a node with ``privacy-epsilon-cap`` refuses to run without
local DP, see :mod:`fedlora.client.private`).
"""

from __future__ import annotations

from fedlora.protocol import (
    METRIC_ACCURACY,
    METRIC_BYTES_SENT,
    METRIC_DELTA,
    METRIC_EPSILON,
    METRIC_LOSS,
    METRIC_NUM_EXAMPLES,
    METRIC_TRAIN_TIME,
)

#: Metric keys of a train reply without local DP (exact).
PLAIN_TRAIN_METRICS = frozenset(
    {METRIC_NUM_EXAMPLES, METRIC_LOSS, METRIC_ACCURACY, METRIC_BYTES_SENT, METRIC_TRAIN_TIME}
)
#: Metric keys of a train reply under local DP: fixed or accounted only.
LOCAL_DP_TRAIN_METRICS = frozenset(
    {METRIC_NUM_EXAMPLES, METRIC_BYTES_SENT, METRIC_EPSILON, METRIC_DELTA}
)
#: Metric keys of an evaluate reply (never sent under local DP).
EVALUATE_METRICS = frozenset({METRIC_NUM_EXAMPLES, METRIC_LOSS, METRIC_ACCURACY})

#: A node's weight under local DP when its operator publishes no count.
DEFAULT_PUBLIC_EXAMPLES = 1


def train_metric_keys(dp_mode: str) -> frozenset[str]:
    """The exact metric keys a train reply carries under ``dp_mode``."""
    return LOCAL_DP_TRAIN_METRICS if dp_mode == "local" else PLAIN_TRAIN_METRICS
