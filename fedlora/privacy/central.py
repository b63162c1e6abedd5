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

from collections.abc import Callable
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod
from flwr.serverapp import PrivacyConfig, RdpAccountant
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
    Strategy,
)
from flwr.supercore.privacy_accounting import NeighboringRelation, SamplingMethod

from fedlora.errors import PrivacyError

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
        fixed = (
            DifferentialPrivacyServerSideFixedClipping
            if mode == "central-server-fixed"
            else DifferentialPrivacyClientSideFixedClipping
        )
        return fixed(
            strategy,
            noise_multiplier=noise_multiplier,
            clipping_norm=clipping_norm,
            num_sampled_clients=num_sampled_clients,
            accountant=accountant,
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
