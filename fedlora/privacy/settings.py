"""How a node runs DP-SGD: the typed settings, checked at construction, and the recipe advice.

Field metadata holds each setting's config key and help text, so an error
names the key a person sets (``privacy-delta=...``), not a Python name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

from fedlora.errors import ConfigError
from fedlora.privacy.accounting import ACCOUNTANTS
from fedlora.protocol import NODE_ACCOUNTANT, NODE_DELTA

#: Opacus per-sample gradient modes a node may choose.
GRAD_SAMPLE_MODES: tuple[str, ...] = ("hooks", "functorch", "ghost")


def _option(default: Any, key: str, text: str) -> Any:
    return field(default=default, metadata={"key": key, "help": text})


@dataclass(frozen=True)
class DPConfig:
    """How a node runs DP-SGD. Set exactly one of ``noise_multiplier`` or
    ``target_epsilon``; field metadata holds each config key and its help."""

    noise_multiplier: float | None = _option(
        None, "privacy-noise-multiplier", "Noise std / max-grad-norm; > 0."
    )
    target_epsilon: float | None = _option(
        None, "privacy-target-epsilon", "Epsilon of the run; sets the noise."
    )
    max_grad_norm: float = _option(
        1.0, "privacy-max-grad-norm", "L2 bound each example's gradient is clipped to."
    )
    delta: float = _option(1e-5, NODE_DELTA, "Delta; below 1/examples.")
    accountant: str = _option("rdp", NODE_ACCOUNTANT, "One of ACCOUNTANTS.")
    grad_sample_mode: str = _option(
        "hooks", "privacy-grad-sample-mode", "Opacus per-sample gradient mode."
    )
    poisson_sampling: bool = _option(
        True, "privacy-poisson-sampling", "Poisson batches, as accountants assume."
    )
    secure_rng: bool = _option(True, "privacy-secure-rng", "OS-seeded noise; false only in tests.")

    def __post_init__(self) -> None:
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ConfigError(
                f"set exactly one of privacy-noise-multiplier (got "
                f"{self.noise_multiplier!r}) and privacy-target-epsilon (got "
                f"{self.target_epsilon!r})"
            )
        for name in ("noise_multiplier", "target_epsilon", "max_grad_norm"):
            value = getattr(self, name)
            if value is not None and not _positive(value):
                raise ConfigError(
                    f"{_key(name)}={value!r} is not allowed; it must be a finite number > 0"
                )
        if not (_positive(self.delta) and self.delta < 1):
            raise ConfigError(
                f"privacy-delta={self.delta!r} is not allowed; it must be in "
                "(0, 1), typically below 1/number-of-examples"
            )
        for name, allowed in (
            ("accountant", ACCOUNTANTS),
            ("grad_sample_mode", GRAD_SAMPLE_MODES),
        ):
            if getattr(self, name) not in allowed:
                raise ConfigError(
                    f"{_key(name)}={getattr(self, name)!r} is not allowed; "
                    f"allowed: {', '.join(allowed)}"
                )
        for name in ("poisson_sampling", "secure_rng"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(
                    f"{_key(name)}={getattr(self, name)!r} is not allowed; allowed: true, false"
                )


def _key(name: str) -> str:
    return next(str(f.metadata["key"]) for f in fields(DPConfig) if f.name == name)


def _positive(value: Any) -> bool:
    return type(value) in (int, float) and math.isfinite(value) and value > 0


def recipe_advice(optimizer: str, trains_lora_a: bool) -> list[str]:
    """What in a local-DP recipe is known to cost accuracy, one line each (empty: nothing).

    A warning, not an error: the run is private either way, only likely to
    learn less. Measured on Rotten Tomatoes at ε=8 (docs/RESULTS.md): AdamW
    predicted the majority class in every configuration tried; training A
    as well as B (FedAvg instead of FFA-LoRA) left the private run 7.6 points
    behind the non-private one instead of 5.0 (same seed).
    """
    advice = []
    if optimizer == "adamw":
        advice.append(
            "dp-mode=local with optimizer=adamw: Adam rescales every coordinate, so "
            "noise-only coordinates random-walk and private runs tend to learn nothing; "
            "use optimizer=sgd (README's DP recipe: strategy=ffa-lora optimizer=sgd "
            "learning-rate=4.0 batch-size=128)"
        )
    if trains_lora_a:
        advice.append(
            "dp-mode=local trains LoRA A and B: noise lands on twice the coordinates; "
            "strategy=ffa-lora (A frozen) learned more at the same epsilon (docs/RESULTS.md)"
        )
    return advice
