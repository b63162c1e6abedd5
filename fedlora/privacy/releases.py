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

The accounted releases themselves (what ε covers) are the functions below:
:func:`dp_sgd_release`, :func:`label_release`, :func:`center_release`; a
training round is :func:`training_round_releases`, a whole run
:func:`run_side_releases` plus its DP-SGD rounds.

Without DP a node sends exact metrics; the site chose that by running
without a cap (a node with ``privacy-epsilon-cap`` refuses to run without
local DP, see :mod:`fedlora.client.private`).
"""

from __future__ import annotations

from fedlora.config import RunConfig
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


# ---------------------------------------------------------------------------
# What ε covers: every accounted release, as accountant entries
# ---------------------------------------------------------------------------
#: One accounted release as the accountant reads it:
#: ``(noise multiplier, sample rate, steps)``. A Gaussian mechanism of L2
#: sensitivity Δ and noise std σΔ over the whole dataset is ``(σ, 1.0, 1)``.
Entry = tuple[float, float, int]

#: The ledger's round number of the feature-centre release (it precedes round 1).
FEATURE_CENTRE_ROUND = 0


def dp_sgd_release(noise_multiplier: float, sample_rate: float, steps: int) -> Entry:
    """A round of DP-SGD: ``steps`` Poisson-sampled steps at rate ``B/n``, each
    clipping every example's gradient and adding N(0, (σC)²) (Opacus)."""
    return (float(noise_multiplier), float(sample_rate), int(steps))


def label_release(cfg: RunConfig) -> list[Entry]:
    """The accountant entries of one round's noisy label counts (none without
    logit adjustment): the Gaussian mechanism on a histogram whose L2
    sensitivity is 1 is one full-batch step at noise multiplier dp-label-noise."""
    if cfg.train.logit_adjustment <= 0:
        return []
    return [(cfg.privacy.dp_label_noise, 1.0, 1)]


def center_release(cfg: RunConfig) -> list[Entry]:
    """The accountant entry of the one-time feature-centering release (none
    without it, or without local DP): each example adds its clipped sentence
    vector and a constant equal to the clip to a sum, so the sum's L2
    sensitivity is sqrt(2) x clip and Gaussian noise of std dp-center-noise x
    that is one full-batch step at noise multiplier dp-center-noise."""
    if not cfg.lora.feature_centering or cfg.privacy.dp_mode != "local":
        return []
    return [(cfg.privacy.dp_center_noise, 1.0, 1)]


def training_round_releases(
    cfg: RunConfig, noise_multiplier: float, sample_rate: float, steps: int
) -> list[Entry]:
    """Everything one training round releases under local DP, in the order the
    ledger records it: the noisy label counts (if any), then DP-SGD. The node
    checks this list against its cap once and records it once."""
    return [*label_release(cfg), dp_sgd_release(noise_multiplier, sample_rate, steps)]


def run_side_releases(cfg: RunConfig) -> list[Entry]:
    """Every release of a whole run besides DP-SGD: ``num-server-rounds``
    rounds of label counts and the one feature centre. ``dp-target-epsilon``
    is reached by calibrating DP-SGD's noise *with* these included."""
    return label_release(cfg) * cfg.num_server_rounds + center_release(cfg)
