"""Central (user-level) DP: Flower's DP strategy wrappers, chosen by run config.

Flower already ships the mechanisms (server- or client-side clipping, fixed
or adaptive clip norm) and, for fixed clipping, a user-level RDP accountant.
This module adds what a run needs around them: selection by ``dp-mode``,
the matching client mod (client-side clipping needs ``fixedclipping_mod`` /
``adaptiveclipping_mod`` on every node, and a node without it must not send
unclipped updates), and the user-level ε over all rounds for the report.

Accounting model (documented because it is conservative on purpose): every
sampled node's update is clipped and the sum is noised once per round; the
accountant composes ``num-server-rounds`` Gaussian releases with *no*
subsampling amplification (fedlora's seeded sampler is not Poisson), with
add-or-remove-one-client neighbours. Adaptive clipping is run as Flower
implements it; its user-level ε is not reported (Flower has no accountant for
it) and the report says so instead of printing a number.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod
from flwr.serverapp import Grid, PrivacyConfig, RdpAccountant
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    FedAvg,
    Strategy,
)
from flwr.supercore.privacy_accounting import NeighboringRelation, SamplingMethod

from fedlora.errors import PrivacyError
from fedlora.protocol import METRICS_KEY

CENTRAL_MODES = (
    "central-server-fixed",
    "central-client-fixed",
    "central-server-adaptive",
    "central-client-adaptive",
)
DP_MODES = ("none", "local", *CENTRAL_MODES)


def wrap_central(
    strategy: Strategy,
    mode: str,
    noise_multiplier: float,
    clipping_norm: float,
    num_sampled_clients: int,
    population_size: int,
    delta: float,
) -> Strategy:
    """Wrap ``strategy`` in Flower's DP wrapper for ``mode``.

    Fails closed: a combination Flower cannot account for is an error, not
    a silently unaccounted run.
    """
    if mode not in CENTRAL_MODES:
        raise PrivacyError(f"dp-mode {mode!r} is not a central mode ({', '.join(CENTRAL_MODES)})")
    if noise_multiplier <= 0:
        raise PrivacyError(
            f"dp-mode={mode} needs dp-noise-multiplier > 0 (got {noise_multiplier}); "
            "central DP without noise is not private"
        )
    if mode.endswith("fixed"):
        if type(strategy) is not FedAvg:
            raise PrivacyError(
                f"dp-mode={mode} accounts user-level privacy only over plain FedAvg; "
                f"strategy {type(strategy).__name__} cannot be accounted. Use strategy=fedavg"
            )
        accountant = RdpAccountant(
            PrivacyConfig(
                target_delta=delta,
                population_size=max(population_size, num_sampled_clients),
                neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                sampling_method=SamplingMethod.NO_AMPLIFICATION,
            )
        )
        # Server-side clipping is done by FixedDenominator (flwr 1.42's clip
        # divides by the update's norm: a zero update, which a node can send
        # at will, raised ZeroDivisionError inside the server). The noise and
        # the accountant are the same in both wrappers (their common base).
        return FixedDenominator(
            DifferentialPrivacyClientSideFixedClipping(
                strategy,
                noise_multiplier=noise_multiplier,
                clipping_norm=clipping_norm,
                num_sampled_clients=num_sampled_clients,
                accountant=accountant,
            ),
            num_sampled_clients,
            server_clip=clipping_norm if mode == "central-server-fixed" else None,
        )
    adaptive = (
        DifferentialPrivacyServerSideAdaptiveClipping
        if mode == "central-server-adaptive"
        else DifferentialPrivacyClientSideAdaptiveClipping
    )
    return adaptive(
        strategy,
        noise_multiplier=noise_multiplier,
        num_sampled_clients=num_sampled_clients,
        initial_clipping_norm=clipping_norm,
    )


class FixedDenominator(Strategy):
    """Make Flower's accounted fixed-clipping wrappers release every round.

    Under flwr 1.42 those wrappers refuse (return no update) when client
    weights differ or when fewer than ``num_sampled_clients`` replies arrive,
    and a refused round looks like a completed one. User-level DP-FedAvg
    (McMahan et al., 2018, https://arxiv.org/abs/1710.06963) has a fixed
    answer to both: every client weighs the same, and the sum is divided by
    the number *sampled*, not the number that replied. So each good reply's
    weight becomes 1, and each missing reply is stood in for by the round's
    global arrays (a zero update) -- the released mean is then
    ``sum(clipped deltas) / m + noise(σC/m)``, exactly what the accountant
    prices. Train metrics are aggregated over the real replies only.
    """

    def __init__(
        self, dp: Strategy, num_sampled_clients: int, server_clip: float | None = None
    ) -> None:
        self.dp = dp
        self.num_sampled_clients = num_sampled_clients
        self.server_clip = server_clip
        self._arrays: ArrayRecord | None = None

    def __getattr__(self, name: str) -> Any:
        # privacy_spent, accountant, ...: the wrapper's own.
        if name == "dp":
            raise AttributeError(name)
        return getattr(self.dp, name)

    def summary(self) -> None:
        """The wrapper's summary."""
        self.dp.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The wrapper's messages; the arrays are kept to stand in for absentees."""
        self._arrays = arrays
        return self.dp.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Equal weights, absentees as zero updates, then the accounted release."""
        real = [r for r in replies if not r.has_error()]
        if not real or self._arrays is None:
            return None, None
        if len(real) > self.num_sampled_clients:
            raise PrivacyError(
                f"round {server_round}: {len(real)} replies but the accountant priced "
                f"{self.num_sampled_clients} sampled clients; refusing to release"
            )
        inner = getattr(self.dp, "strategy", None)
        weight_key = getattr(inner, "weighted_by_key", "num-examples")
        if self.server_clip is not None:
            real = [_clipped(r, self._arrays, self.server_clip) for r in real]
        equal = [_with_weight(r, weight_key, self._arrays, keep_arrays=True) for r in real]
        while len(equal) < self.num_sampled_clients:
            equal.append(_with_weight(real[0], weight_key, self._arrays, keep_arrays=False))
        arrays, _ = self.dp.aggregate_train(server_round, equal)
        metrics = None
        if inner is not None and hasattr(inner, "train_metrics_aggr_fn"):
            metrics = inner.train_metrics_aggr_fn([r.content for r in real], weight_key)
        return arrays, metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The wrapper's."""
        return self.dp.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """The wrapper's."""
        return self.dp.aggregate_evaluate(server_round, replies)


def _clipped(reply: Message, arrays: ArrayRecord, clip: float) -> Message:
    """A copy of ``reply`` whose update (reply - global) has L2 norm <= ``clip``
    (FlatClip of DP-FedAvg; a zero update stays zero)."""
    content = RecordDict(dict(reply.content.items()))
    for name, record in reply.content.array_records.items():
        deltas = {k: a.numpy().astype(np.float64) - arrays[k].numpy() for k, a in record.items()}
        norm = float(np.sqrt(sum(float(np.sum(d * d)) for d in deltas.values())))
        scale = min(1.0, clip / norm) if norm > 0 else 1.0
        content[name] = ArrayRecord(
            {
                k: Array((arrays[k].numpy() + scale * d).astype(arrays[k].numpy().dtype))
                for k, d in deltas.items()
            }
        )
    out = copy.copy(reply)
    out.content = content
    return out


def _with_weight(reply: Message, key: str, arrays: ArrayRecord, keep_arrays: bool) -> Message:
    """A copy of ``reply`` with weight 1 (and, for a stand-in, the global arrays)."""
    metrics = next(iter(reply.content.metric_records.values()), MetricRecord())
    content = RecordDict(
        {
            name: (record if keep_arrays else ArrayRecord(dict(arrays.items())))
            for name, record in reply.content.array_records.items()
        }
    )
    content[METRICS_KEY] = MetricRecord({**dict(metrics), key: 1})
    out = copy.copy(reply)  # the caller's reply keeps what the node sent
    out.content = content
    return out


def central_epsilon(strategy: Strategy) -> float | None:
    """User-level ε spent so far by a fixed-clipping wrapper (None if unaccounted)."""
    spent_fn = getattr(strategy, "privacy_spent", None)
    if spent_fn is None:
        return None
    spent = spent_fn() if callable(spent_fn) else spent_fn
    return None if spent is None else float(spent.epsilon)


Handler = Callable[[Message, Context], Message]


def client_clipping_mod(mode_of: Callable[[Context], str]) -> Callable[..., Message]:
    """A client mod that applies Flower's client-side clipping when the run asks.

    Installed on every fedlora ClientApp so a node never has to be rebuilt
    to join a client-side-clipping federation; it is a no-op otherwise.
    """

    def mod(msg: Message, context: Context, call_next: Handler) -> Message:
        if msg.metadata.message_type != "train":
            return call_next(msg, context)
        mode = mode_of(context)
        if mode == "central-client-fixed":
            return fixedclipping_mod(msg, context, call_next)
        if mode == "central-client-adaptive":
            return adaptiveclipping_mod(msg, context, call_next)
        return call_next(msg, context)

    return mod


def describe(mode: str, params: dict[str, Any]) -> dict[str, Any]:
    """Metadata for an exported adapter: mechanism and its parameters."""
    return {"mechanism": mode, **params}
