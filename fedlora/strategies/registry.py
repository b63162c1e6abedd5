"""Aggregation strategies by name.

Flower's own Message-API strategies do the aggregation math; this registry
adds lookup by the run config's ``strategy`` name, typed options checked
against each strategy's constructor (``strategy-options="eta=0.01,tau=1e-3"``),
and sampling settings that leave node selection to fedlora's round loop
(which samples from ``(seed, round)`` so any round reproduces). Adding a
strategy is adding one entry (or one module that calls :func:`register`).

fedlora's LoRA-aware strategies (``lora-exact``, ``ffa-lora``,
``hetero-rank``) each declare how clients must train for them
(``client_mode``, the same table as :data:`fedlora.protocol.STRATEGY_MODES`);
the ClientApp follows the run's ``strategy`` name, so the server and its
clients cannot disagree about it. When clients compress
their updates (run config ``compression``), a Flower strategy is wrapped in
:class:`~fedlora.strategies.compressed.CompressedUpdates`, which decodes them
first; the LoRA strategies decode by themselves.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from flwr.serverapp.strategy import (
    Bulyan,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
    Strategy,
)

from fedlora.errors import ConfigError
from fedlora.protocol import (
    ARRAYS_KEY,
    CONFIG_KEY,
    METRIC_NUM_EXAMPLES,
    MODE_STANDARD,
    declare_mode,
)
from fedlora.settings import COMPRESSION_KINDS
from fedlora.strategies.base import LoraStrategy
from fedlora.strategies.compressed import CompressedUpdates
from fedlora.strategies.ffa_lora import FfaLora
from fedlora.strategies.hetero_rank import HeteroRank
from fedlora.strategies.lora_exact import LoraExact

StrategyFactory = Callable[..., Strategy]

# Options the round loop owns; a user may not set them per strategy.
_LOOP_OWNED = {
    "fraction_train",
    "fraction_evaluate",
    "min_train_nodes",
    "min_evaluate_nodes",
    "min_available_nodes",
    "weighted_by_key",
    "arrayrecord_key",
    "configrecord_key",
    "train_metrics_aggr_fn",
    "evaluate_metrics_aggr_fn",
    "self",
}

STRATEGIES: dict[str, StrategyFactory] = {
    "fedavg": FedAvg,
    "fedavgm": FedAvgM,
    "fedprox": FedProx,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
    "fedadagrad": FedAdagrad,
    "krum": Krum,
    "multikrum": MultiKrum,
    "fedmedian": FedMedian,
    "fedtrimmedavg": FedTrimmedAvg,
    "bulyan": Bulyan,
    "lora-exact": LoraExact,
    "ffa-lora": FfaLora,
    "hetero-rank": HeteroRank,
}


def register(name: str, factory: StrategyFactory) -> None:
    """Make a strategy available by ``name`` in run configs."""
    if name in STRATEGIES:
        raise ConfigError(f"strategy name {name!r} is already registered")
    STRATEGIES[name] = factory
    declare_mode(name, str(getattr(factory, "client_mode", MODE_STANDARD)))


def strategy_options(name: str) -> list[str]:
    """The options a user may set for strategy ``name`` (flat, dash-separated)."""
    return [p.replace("_", "-") for p in _parameters(name) if p not in _LOOP_OWNED]


def _parameters(name: str) -> dict[str, inspect.Parameter]:
    # **kwargs that a subclass forwards to FedAvg are not options of their own.
    params = inspect.signature(_lookup(name)).parameters
    return {n: p for n, p in params.items() if p.kind is not inspect.Parameter.VAR_KEYWORD}


def parse_options(text: str) -> dict[str, str]:
    """Parse ``"a=1,b=x"`` into a dict; empty string is no options."""
    out: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        if "=" not in item:
            raise ConfigError(
                f"strategy-options item {item!r} is not key=value; "
                "write e.g. strategy-options='eta=0.01,tau=0.001'"
            )
        key, value = (s.strip() for s in item.split("=", 1))
        out[key] = value
    return out


def build_strategy(
    name: str, options: str = "", fraction_evaluate: float = 0.0, compression: str = "none"
) -> Strategy:
    """Instantiate strategy ``name`` with its options, ready for fedlora's loop.

    Parameters
    ----------
    name, options
        The run config's ``strategy`` and ``strategy-options``.
    fraction_evaluate
        The run config's ``fraction-evaluate`` (0 turns federated evaluation off).
    compression
        The run config's ``compression``. Other than ``none``, a Flower
        strategy is wrapped so it decodes clients' compressed deltas (fedlora's
        LoRA strategies always can). Without it, clients asked to compress
        refuse with an error naming the problem rather than send updates the
        server would average as raw bytes.
    """
    if compression not in COMPRESSION_KINDS:
        raise ConfigError(
            f"config key 'compression' has value {compression!r}; "
            f"allowed: {', '.join(COMPRESSION_KINDS)}"
        )
    factory = _lookup(name)
    params = _parameters(name)
    kwargs: dict[str, Any] = {}
    for key, raw in parse_options(options).items():
        attr = key.replace("-", "_")
        if attr not in params or attr in _LOOP_OWNED:
            raise ConfigError(
                f"strategy-options has {key!r}, which strategy {name!r} does not take; "
                f"allowed: {', '.join(strategy_options(name)) or '(none)'}"
            )
        kwargs[attr] = _convert(key, raw, params[attr].default)
    strategy = factory(
        fraction_train=1.0,  # the loop has already sampled; take all it offers
        fraction_evaluate=1.0 if fraction_evaluate > 0 else 0.0,
        min_train_nodes=1,
        min_evaluate_nodes=1 if fraction_evaluate > 0 else 0,
        min_available_nodes=1,
        weighted_by_key=METRIC_NUM_EXAMPLES,
        arrayrecord_key=ARRAYS_KEY,
        configrecord_key=CONFIG_KEY,
        **kwargs,
    )
    if compression != "none" and not isinstance(strategy, LoraStrategy):
        return CompressedUpdates(strategy)
    return strategy


def _lookup(name: str) -> StrategyFactory:
    if name not in STRATEGIES:
        raise ConfigError(
            f"config key 'strategy' has value {name!r}; allowed: {', '.join(STRATEGIES)}"
        )
    return STRATEGIES[name]


def _convert(key: str, raw: str, default: Any) -> Any:
    try:
        if isinstance(default, bool):
            if raw.lower() not in ("true", "false"):
                raise ValueError
            return raw.lower() == "true"
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float) or default is inspect.Parameter.empty:
            return float(raw)
        return raw
    except ValueError:
        kind = type(default).__name__
        raise ConfigError(f"strategy-options {key}={raw!r} is not a valid {kind}") from None
