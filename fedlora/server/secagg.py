"""Secure aggregation of adapter updates with Flower's SecAgg+.

SecAgg+ (Bell et al., 2020, https://arxiv.org/abs/2009.14019) lets the
server learn the weighted *sum* of the nodes' updates and nothing about any
single one, as long as it does not collude with ``reconstruction_threshold``
of a node's neighbours, and survives nodes dropping out mid-round.

How it runs from a Message-API ServerApp (Flower 1.41)
------------------------------------------------------
Flower 1.41 ships SecAgg+ only as a legacy workflow:
``flwr.server.workflow.SecAggPlusWorkflow`` runs *one* fit round against a
Message-API :class:`~flwr.serverapp.Grid` and a
:class:`~flwr.server.compat.LegacyContext` that holds a legacy strategy and a
client manager; the nodes need ``flwr.client.mod.secaggplus_mod``.
``DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(...))`` would also work,
but it asks a random node for initial parameters, evaluates with the legacy
strategy and samples with the global ``random`` module. So fedlora calls the
workflow once per round itself (:func:`run_secagg_rounds`), with a fresh
context whose client manager holds exactly the nodes fedlora sampled and a
small legacy ``FedAvg`` subclass that only collects the unmasked result.
The nodes' side is :mod:`fedlora.client.secagg`.

What fedlora adds: tensor names on a wire that only knows ordered lists;
updates (``trained - global``) instead of adapters; the adapter's dtypes
restored; one "node <id>: <stage>: <reason>" line per node that dropped out;
settings checked before a round starts; and :func:`aggregate_error_bound`.

The quantization, exactly (``secaggplus_mod`` / ``SecAggPlusWorkflow``)
----------------------------------------------------------------------
Write C = ``clipping_range``, Q = ``quantization_range``, M =
``modulus_range``, W = ``max_weight``, and for node i: w_i its example count
and Δ_i its update. Node i computes ``dq_i = round(w_i / W * Q) / Q`` and
sends, masked, ``q_i = stochastic_round((clip(dq_i * Δ_i, -C, C) + C) * Q / (2C))``
(integers in [0, Q]) and ``round(w_i / W * Q)``. The server unmasks the sums
modulo M and returns

    sum_i dq_i * clip(...)_i / sum_i dq_i  +  (2C / Q) * sum_i e_i / sum_i dq_i,

with e_i in (-1, 1) the rounding errors (zero-mean: stochastic rounding).
Hence, per tensor entry:

* the step is ``2C / Q``; the error of the mean is at most
  ``n * 2C * W / (Q * sum_i w_i)``, which is ``2C / Q`` when all n nodes
  have W examples. **Overstating W by k multiplies the error by k**: set
  ``max_weight`` to the largest example count you expect (fedlora caps it
  with ``max-train-examples``), not to "something big";
* clipping acts on ``dq_i * Δ_i``, i.e. on Δ_i at ``C * W / w_i``: the node
  with W examples is clipped at C, smaller nodes more leniently. Clipping is
  silent and biased (a clipped entry is pulled towards zero), so each node
  reports the share of entries it will clip (``secagg-clipped-fraction``);
* a node with ``w_i > W`` overflows the masked sum; nodes refuse to take part;
* the sum must stay below M: ``n * Q < M`` (n < 1024 with the defaults).

LoRA's scales, and why updates are sent
---------------------------------------
LoRA A starts as U(±1/sqrt(fan_in)) (kaiming-uniform, a=sqrt(5)): ±0.051 for
MiniLM's 384 inputs, ±0.036 for 768. B starts at exactly zero and stays small
(1e-3..1e-2 after a few rounds at lr 3e-3), and the classifier head starts
around N(0, 0.02). Masking the adapter itself would need C above the largest
entry anywhere (A's bound, the head's tail) plus the drift of training, and a
C that is too small would clip the *model*. An update's scale is the
optimiser's instead: AdamW moves an entry by about ``lr`` per step (at most
~3 lr in pathological steps), so ``|Δ| <~ lr * local_steps`` for A, B and the
head alike. The default C = 1 covers lr 3e-3 for ~300 typical steps (~100
at Adam's worst-case 3.16 lr per step with the default betas); its step
2C/Q = 4.8e-7 is far below B's scale. Aggregating updates is exactly FedAvg:
``mean_i(global + Δ_i) = global + mean_i(Δ_i)``.

With differential privacy
-------------------------
* Quantization error is additive noise, zero-mean and bounded (|e| < 1 step
  per node), but it is *not* DP noise: it is not calibrated, and it adds
  nothing to ε.
* With local DP (DP-SGD at each node) the noise is already inside Δ_i and C
  must cover the *noised* update. With AdamW that is still about
  ``lr * steps`` (Adam normalises the noisy gradient: the noise changes the
  direction of a step more than its size); with plain SGD each step adds
  N(0, (lr·σ·max_grad_norm/batch)²) per entry, so size C for it. Clipping
  noised values is post-processing (ε is unchanged) but it truncates the
  noise and pulls the signal towards zero; watch ``secagg-clipped-fraction``.
* Central DP needs per-update clipping the server cannot do on masked
  updates: only the client-side clipping variants (Flower's
  ``DifferentialPrivacyClientSide*`` with the nodes' clipping mod) fit, and
  the server then sees the clean sum before it adds noise. SecAgg+ protects
  single updates from the server, central DP protects the released adapter
  from its readers. Protecting against the server too needs each node to add
  its share of the noise before masking (distributed DP), with C covering
  Δ plus about 4 standard deviations of that noise.

What the server still learns
----------------------------
The weighted mean of the sampled nodes' updates; each node's example count
and training metrics (sent in clear beside the masked vector); who took
part and who dropped out. Flower's implementation assumes an
honest-but-curious server: it has no consistency round, so a server that
lies about who dropped out could ask some neighbours for a node's mask seed
and others for its key share. A reconstruction threshold above half the
shares (enforced here) makes that impossible, because each neighbour answers
one unmask request per round. With n nodes, the other n-1 together can
always compute the n-th node's update from two consecutive global adapters,
and with 2 nodes each learns the other's: at least 3 nodes are required.

Server-side update validation (:mod:`fedlora.server.validation`) cannot run
under SecAgg+; the clipping range is the only per-node bound.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
from flwr.app import ArrayRecord
from flwr.common import Scalar
from flwr.serverapp import Grid

from fedlora.errors import ConfigError
from fedlora.protocol import (
    METRIC_ACCURACY,
    METRIC_BYTES_SENT,
    METRIC_LOSS,
)
from fedlora.records import State, arrays_to_state, state_to_arrays
from fedlora.server.exchange import SiteRegistry
from fedlora.server.loop import TrainResult, run_rounds
from fedlora.server.secagg_flower import (
    MIN_SECAGG_NODES,
    SecAggRound,
    SecAggSettings,
    secagg_exchange,
)

log = logging.getLogger("fedlora.server")


def aggregate_error_bound(
    num_examples: Sequence[int], max_abs: float, settings: SecAggSettings
) -> float:
    """Worst-case per-entry gap between SecAgg+'s mean and the exact FedAvg mean.

    Parameters
    ----------
    num_examples : sequence of int
        The contributing nodes' example counts (their weights).
    max_abs : float
        The largest absolute update entry (no clipping assumed: each node's
        ``w_i / W * max_abs`` must stay within ``clipping_range``).
    settings : SecAggSettings

    Returns
    -------
    float
        ``n * 2C / (Q * sum dq_i)`` from rounding the entries, plus
        ``2 * max_abs * max_i 1 / (2 * round(w_i/W * Q))`` from rounding the
        weights (see the module docstring).
    """
    q, c, w_max = settings.quantization_range, settings.clipping_range, settings.max_weight
    levels = [round(w / w_max * q) for w in num_examples]
    if min(levels) <= 0:
        raise ConfigError("a node's weight rounds to 0 levels; lower max_weight")
    entries = len(levels) * 2 * c / q / (sum(levels) / q)
    weights = 2 * max_abs * max(1 / (2 * lv) for lv in levels)
    return entries + weights


class SecAggStep:
    """A SecAgg+ round as the one loop's train step (:class:`fedlora.server.loop.TrainStep`).

    The loop samples the sites, checks the aggregate and evaluates, exactly as
    in a plain round; this step runs the protocol and reports the clear
    figures (example counts, loss, accuracy, bytes) beside the masked sum.
    ``frozen`` tensors (FFA-LoRA's A) are kept bit-for-bit rather than
    trusting a quantised zero update. ``on_exchange`` sees each round's
    :class:`SecAggRound` (the protocol-level record).
    """

    def __init__(
        self,
        grid: Grid,
        settings: SecAggSettings,
        num_rounds: int,
        *,
        min_nodes: int = MIN_SECAGG_NODES,
        train_config: Mapping[str, Scalar] | None = None,
        frozen: Iterable[str] = (),
        on_exchange: Callable[[SecAggRound], None] | None = None,
    ) -> None:
        settings.check_nodes(min_nodes)
        self.grid, self.settings, self.num_rounds = grid, settings, num_rounds
        self.min_nodes = min_nodes
        self.train_config = dict(train_config or {})
        self.frozen = list(frozen)
        self.on_exchange = on_exchange

    def train(
        self,
        rnd: int,
        arrays: ArrayRecord,
        nodes: list[int],
        sites: SiteRegistry,
        exhausted: set[str],
    ) -> TrainResult:
        """Run the protocol with ``nodes``; the unmasked mean applied to ``arrays``.

        A node's refusal is masked inside the protocol's dropouts, so no site
        is marked ``exhausted`` here (as before the one loop).
        """
        state = arrays_to_state(arrays)
        if not state:  # also guards run_secagg_rounds' caller-supplied adapter
            raise ConfigError("initial adapter state is empty")
        new_state, result = secagg_exchange(
            self.grid,
            state,
            nodes,
            rnd,
            self.num_rounds,
            self.settings,
            self.train_config,
            self.min_nodes,
        )
        new_state.update({n: state[n] for n in self.frozen if n in state})
        if self.on_exchange is not None:
            self.on_exchange(result)
        return TrainResult(
            arrays=state_to_arrays(new_state),
            metrics=_weighted_metrics(result),
            contributed=len(result.contributed),
            failures=list(result.failures),
            bytes_uploaded=int(
                sum(_clear(result, n, METRIC_BYTES_SENT) for n in result.contributed)
            ),
        )

    def evaluate(
        self, rnd: int, arrays: ArrayRecord, sites: SiteRegistry
    ) -> tuple[dict[str, float], list[str]]:
        """No federated evaluation under SecAgg+ (the server evaluates centrally)."""
        return {}, []


def _clear(result: SecAggRound, node: int, key: str) -> float:
    """A figure node ``node`` sent in clear beside its masked vector (0 if absent)."""
    value = result.metrics.get(node, {}).get(key, 0.0)
    return float(value) if isinstance(value, int | float) else 0.0


def _weighted_metrics(result: SecAggRound) -> dict[str, float]:
    """Example-weighted loss and accuracy from the figures nodes send in clear."""
    total = sum(result.num_examples.get(n, 0) for n in result.contributed) or 1
    return {
        key: sum(_clear(result, n, key) * result.num_examples.get(n, 0) for n in result.contributed)
        / total
        for key in (METRIC_LOSS, METRIC_ACCURACY)
    }


def run_secagg_rounds(
    grid: Grid,
    initial: Mapping[str, np.ndarray],
    num_rounds: int,
    on_round: Callable[[SecAggRound], None],
    settings: SecAggSettings | None = None,
    *,
    min_nodes: int = MIN_SECAGG_NODES,
    first_round: int = 1,
    train_config: Mapping[str, Scalar] | None = None,
    wait_timeout: float = 3600.0,
    frozen: Iterable[str] = (),
) -> State:
    """Rounds ``first_round..num_rounds`` of FedAvg over SecAgg+ with every
    connected node, through the one round loop; returns the final adapter.

    A protocol-level entry point (no model, no evaluation) for ServerApps that
    bring their own training; fedlora's server runs :class:`SecAggStep` in
    :func:`fedlora.server.loop.run_rounds` itself. ``on_round`` gets each
    round's :class:`SecAggRound`.

    Raises
    ------
    fedlora.server.stops.RunStopped
        Too few nodes connected.
    SecureAggregationFailed
        A round lost so many nodes that the aggregate could not be unmasked,
        or fewer than ``min_nodes`` contributed.
    """
    from fedlora.config import RunConfig

    settings = settings or SecAggSettings()
    cfg = RunConfig.from_flat(
        {
            "num-server-rounds": num_rounds,
            "min-train-nodes": min_nodes,
            "fraction-train": 1.0,
            "round-timeout": wait_timeout,
        }
    )
    step = SecAggStep(
        grid,
        settings,
        num_rounds,
        min_nodes=min_nodes,
        train_config=train_config,
        frozen=frozen,
        on_exchange=on_round,
    )
    start = state_to_arrays(initial)  # serialised: the caller's arrays stay untouched
    final = run_rounds(step, grid, cfg, start, None, lambda _outcome: None, first_round)
    return arrays_to_state(final)
