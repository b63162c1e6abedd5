"""Typed run configuration, validated once.

Flower hands a run its configuration as a flat ``{"key": value}`` mapping
(``[tool.flwr.app.config]`` in pyproject.toml, overridden by ``flwr run
--run-config`` or ``fedlora simulate -c``). This module turns that mapping
into frozen dataclasses exactly once, at the edge, so the rest of the code
never probes a dict with ``.get`` and a wrong value is reported with its key,
the value and what is allowed.

The defaults below are the single source of truth; pyproject.toml mirrors
them so that ``flwr run .`` sees the same values (``tests/test_config.py``
keeps the two equal).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedlora.errors import ConfigError
from fedlora.settings import (
    SIM_ATTACKS,
    LoraSettings,
    PrivacySettings,
    TrainSettings,
    require,
    setting,
)
from fedlora.task_settings import TASK_CAUSAL_LM, DataSettings, LmSettings, WatchSettings

MAX_ROUNDS = 100_000


@dataclass(frozen=True)
class RunConfig:
    """Everything one federated run needs, validated at construction."""

    model_path: str = setting(
        "",
        "Local model folder; empty = the packaged model of the task (all-MiniLM-L6-v2, "
        "or SmolLM2-135M-Instruct converted once from its GGUF).",
    )
    lora: LoraSettings = field(default_factory=LoraSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    data: DataSettings = field(default_factory=DataSettings)
    privacy: PrivacySettings = field(default_factory=PrivacySettings)
    lm: LmSettings = field(default_factory=LmSettings)
    watch: WatchSettings = field(default_factory=WatchSettings)
    num_server_rounds: int = setting(8, "Federated rounds (1 to 100000).")
    fraction_train: float = setting(1.0, "Share of connected nodes sampled per round.")
    fraction_evaluate: float = setting(
        0.0,
        "Share of nodes asked for federated evaluation "
        "(must be 0 with dp-mode=local: DP nodes refuse it).",
    )
    min_train_nodes: int = setting(
        2, "Fewest good replies a round needs; below it the run stops cleanly, with the reason."
    )
    strategy: str = setting(
        "fedavg",
        "Aggregation strategy: fedavg, fedavgm, fedprox, fedadam, fedyogi, fedadagrad, "
        "krum, multikrum, fedmedian, fedtrimmedavg, bulyan, lora-exact, ffa-lora, hetero-rank.",
    )
    strategy_options: str = setting(
        "", "Strategy parameters as 'key=value,...', e.g. 'server-momentum=0.9'."
    )
    seed: int = setting(42, "Root seed: model init, splits, sampling per (seed, round).")
    run_dir: str = setting("runs/latest", "Where metrics, checkpoints, adapters go.")
    round_timeout: float = setting(3600.0, "Seconds to wait for replies in a round.")
    update_max_norm: float = setting(
        0.0, "Reject updates whose L2 norm exceeds this (0 = 10x the initial adapter's norm)."
    )
    max_reported_examples: int = setting(
        1_000_000,
        "Largest example count (the FedAvg weight) a node's reply may carry; a larger one "
        "is rejected, so no single node can outweigh the rest by claiming more data.",
    )
    secagg: bool = setting(False, "Secure aggregation (Flower SecAgg+): the server sees only sums.")
    secagg_clipping_range: float = setting(
        1.0, "SecAgg+: each weighted update entry is clipped to +-this before quantisation."
    )
    secagg_max_weight: float = setting(
        0.0, "SecAgg+: largest example count a node may report (0 = max-train-examples)."
    )
    app_signature: str = setting(
        "",
        "Set by `fedlora run --sign-key`: a signature of the app's digest, for sites whose "
        "trusted-apps file trusts the signer. Nodes check it; the server ignores it.",
    )
    ensemble: str = setting(
        "none", "Also evaluate an ensemble: none, last-rounds (global adapters) or sites."
    )
    ensemble_size: int = setting(3, "Members of the ensemble (rounds or sites).")
    resume: bool = setting(
        False, "Continue from run-dir's last complete round (checkpoint) instead of anew."
    )
    sim_client_ranks: tuple[str, ...] = setting(
        (),
        "Simulation only, strategy=hetero-rank: LoRA ranks given to partitions round-robin "
        "(e.g. '4,16'); empty = every client trains at lora-rank. A real node sets its "
        "own rank with the node-config key lora-rank.",
    )
    sim_malicious_fraction: float = setting(
        0.0,
        "Simulation only: share of partitions that poison their updates (chosen from seed); "
        "ignored at nodes with their own data-path.",
    )
    sim_attack: str = setting(
        "sign-flip", "Simulation only: the poisoning: sign-flip, scaled-noise or label-flip."
    )
    sim_attack_scale: float = setting(
        10.0, "Simulation only: factor of sign-flip (delta -> -s·delta) and scaled-noise."
    )
    audit: bool = setting(
        False,
        "Simulation only: after the last round, audit the exported adapter (fedlora audit: "
        "membership inference; canaries for a causal LM; audit.json and plots).",
    )
    sim_memory_gb: float = setting(
        0.0,
        "Simulation only: memory the run may use, checked against an estimate before "
        "round 1 (0 = what the machine has available).",
    )

    def __post_init__(self) -> None:
        require(
            1 <= self.num_server_rounds <= MAX_ROUNDS,
            "num-server-rounds",
            self.num_server_rounds,
            f"1 <= x <= {MAX_ROUNDS}",
        )
        require(0 <= self.seed < 2**63, "seed", self.seed, "0 <= seed < 2**63")
        require(
            self.max_reported_examples >= 1,
            "max-reported-examples",
            self.max_reported_examples,
            ">= 1",
        )
        if self.privacy.dp_mode == "local" and self.fraction_evaluate > 0:
            raise ConfigError(
                f"fraction-evaluate={self.fraction_evaluate} does not fit dp-mode=local: "
                "federated evaluation would release each site's exact loss and accuracy, "
                "which no ledger accounts, so DP nodes refuse it. Set fraction-evaluate=0 "
                "(the server still evaluates on its own held-out split)"
            )
        require(0 < self.fraction_train <= 1, "fraction-train", self.fraction_train, "0 < x <= 1")
        require(
            0 <= self.fraction_evaluate <= 1,
            "fraction-evaluate",
            self.fraction_evaluate,
            "0 <= x <= 1",
        )
        require(self.min_train_nodes >= 1, "min-train-nodes", self.min_train_nodes, ">= 1")
        require(self.round_timeout > 0, "round-timeout", self.round_timeout, "> 0")
        require(
            self.ensemble in ("none", "last-rounds", "sites"),
            "ensemble",
            self.ensemble,
            "none, last-rounds, sites",
        )
        require(self.ensemble_size >= 2, "ensemble-size", self.ensemble_size, ">= 2")
        require(self.update_max_norm >= 0, "update-max-norm", self.update_max_norm, ">= 0")
        if self.ensemble == "sites" and self.partial_replies:
            raise ConfigError(
                "ensemble=sites needs each site's full adapter in its reply; it does not fit "
                f"compression={self.train.compression} or strategy={self.strategy}. "
                "Use ensemble=last-rounds"
            )
        central = self.privacy.dp_mode.startswith("central")
        if self.lora.feature_centering and (self.secagg or central):
            raise ConfigError(
                "feature-centering=true does not fit "
                + ("secagg=true" if self.secagg else f"dp-mode={self.privacy.dp_mode}")
                + ": each node's sentence-vector sum is sent on its own (noised only under "
                "dp-mode=local), which SecAgg+ and central DP's guarantee do not cover. "
                "Set feature-centering=false, or use dp-mode=local without secagg"
            )
        if self.secagg:
            self._check_secagg()
        self._check_simulation()
        self._check_task()
        if self.train.compression != "none" and self.privacy.dp_mode.startswith("central"):
            # Flower's DP wrappers clip what arrives; an encoded delta is not a model.
            raise ConfigError(
                f"compression={self.train.compression} cannot be combined with "
                f"dp-mode={self.privacy.dp_mode}: central DP clips and noises the updates "
                "the server receives, which compression has encoded. Set compression=none "
                "or use dp-mode=local"
            )

    def _check_secagg(self) -> None:
        """Every setting SecAgg+ cannot serve, named in one error."""
        problems = []
        if self.train.compression != "none":
            problems.append(f"compression={self.train.compression} (SecAgg+ quantises itself)")
        if self.strategy not in ("fedavg", "ffa-lora"):
            problems.append(
                f"strategy={self.strategy} (SecAgg+ computes a sum: use fedavg or ffa-lora)"
            )
        if self.strategy_options.strip():
            problems.append(
                f"strategy-options={self.strategy_options!r} (SecAgg+ applies the plain "
                "weighted mean; the strategy's own aggregation does not run)"
            )
        if self.privacy.dp_mode.startswith("central-server") or self.privacy.dp_mode in (
            "central-client-adaptive",
        ):
            problems.append(
                f"dp-mode={self.privacy.dp_mode} (the server cannot clip what it cannot see;"
                " use local or central-client-fixed)"
            )
        if self.min_train_nodes < 3:
            problems.append(f"min-train-nodes={self.min_train_nodes} (SecAgg+ needs >= 3)")
        if self.secagg_max_weight <= 0 and self.train.max_train_examples <= 0:
            problems.append(
                "secagg-max-weight=0 and max-train-examples=0 (set the largest example "
                "count a node may report)"
            )
        if problems:
            raise ConfigError("secagg=true does not fit: " + "; ".join(problems))

    def _check_task(self) -> None:
        """The task, and the settings that only one task can serve, in one error."""
        problems = []
        if self.task == TASK_CAUSAL_LM:
            if self.ensemble != "none":
                problems.append(f"ensemble={self.ensemble} (ensembles average class scores)")
            if self.lora.feature_centering:
                problems.append("feature-centering=true (there is no sentence vector)")
            if self.train.logit_adjustment > 0:
                problems.append(f"logit-adjustment={self.train.logit_adjustment:g} (no head)")
        elif self.lora.base_quantization != "none":
            problems.append(
                f"base-quantization={self.lora.base_quantization} (only task=causal-lm "
                "quantises its base)"
            )
        if problems:
            raise ConfigError(
                f"task={self.task} does not fit: " + "; ".join(problems) + ". Change these "
                "settings or the task"
            )

    def _check_simulation(self) -> None:
        """The simulation-only keys (ranks by partition, simulated attacks)."""
        require(
            all(r.isdigit() and int(r) >= 1 for r in self.sim_client_ranks),
            "sim-client-ranks",
            ",".join(self.sim_client_ranks),
            "comma-separated integers >= 1, e.g. '4,16'",
        )
        require(
            0 <= self.sim_malicious_fraction <= 1,
            "sim-malicious-fraction",
            self.sim_malicious_fraction,
            "0 <= x <= 1",
        )
        require(
            self.sim_attack in SIM_ATTACKS, "sim-attack", self.sim_attack, ", ".join(SIM_ATTACKS)
        )
        require(self.sim_attack_scale > 0, "sim-attack-scale", self.sim_attack_scale, "> 0")
        require(self.sim_memory_gb >= 0, "sim-memory-gb", self.sim_memory_gb, ">= 0 (0 = all)")
        canaries, lm = self.lm.audit_canaries, self.task == TASK_CAUSAL_LM
        allowed = "false with task=causal-lm unless audit-canaries >= 20"
        require(not self.audit or not lm or canaries > 0, "audit", self.audit, allowed)
        require(canaries == 0 or lm, "audit-canaries", canaries, "0 unless task=causal-lm")

    @property
    def task(self) -> str:
        """``classification`` or ``causal-lm`` (kept with the data it reads)."""
        return self.data.task

    @property
    def client_ranks(self) -> tuple[int, ...]:
        """``sim-client-ranks`` as integers (empty: every client at lora-rank)."""
        return tuple(int(r) for r in self.sim_client_ranks)

    # ------------------------------------------------------------------ I/O
    @classmethod
    def from_flat(cls, flat: Mapping[str, Any]) -> RunConfig:
        """Build from Flower's flat run config; unknown keys are an error (a typo
        such as ``learning_rate`` would otherwise train with the default)."""
        values = dict(DEFAULTS)
        for key, value in flat.items():
            if key not in _FLAT_FIELDS:
                raise ConfigError(
                    f"unknown config key '{key}' (value {value!r}); known keys: "
                    f"{', '.join(sorted(_FLAT_FIELDS))}"
                )
            values[key] = value
        groups: dict[str, dict[str, Any]] = {g: {} for g in _GROUPS}
        for key, value in values.items():
            group, attr, typ = _FLAT_FIELDS[key]
            groups[group][attr] = _coerce(key, value, typ)
        privacy, top = PrivacySettings(**groups["privacy"]), groups[""]
        if privacy.auto_recipe and top["strategy"] == "fedavg":
            # auto freezes LoRA A (FFA-LoRA): noise on A as well as B made SGD
            # collapse to one class on Rotten Tomatoes (docs/RESULTS.md)
            top["strategy"] = "ffa-lora"
        return cls(
            lora=LoraSettings(**groups["lora"]),
            train=TrainSettings(**groups["train"]),
            data=DataSettings(**groups["data"]),
            privacy=privacy,
            lm=LmSettings(**groups["lm"]),
            watch=WatchSettings(**groups["watch"]),
            **top,
        )

    def to_flat(self) -> dict[str, Any]:
        """Flat, TOML-friendly view (the inverse of :meth:`from_flat`)."""
        out: dict[str, Any] = {}
        for key, (group, attr, _typ) in _FLAT_FIELDS.items():
            obj = self if not group else getattr(self, group)
            value = getattr(obj, attr)
            out[key] = ",".join(value) if isinstance(value, tuple) else value
        return out

    @property
    def run_path(self) -> Path:
        """The run directory as a path."""
        return Path(self.run_dir)

    @property
    def partial_replies(self) -> bool:
        """Whether train replies carry something other than the full adapter as
        sent (compressed deltas; FFA-LoRA's and hetero-rank's partial or per-site
        payloads), so only the strategy's decoder can read them.

        Read from the strategy's ``client_mode`` in the registry, so a
        strategy registered later with a partial mode is treated the same.
        """
        from fedlora.protocol import MODE_STANDARD, client_mode

        return self.train.compression != "none" or client_mode(self.strategy) != MODE_STANDARD


def _flat_name(attr: str) -> str:
    return attr.replace("_", "-")


# flat key -> (group attribute on RunConfig or "", attribute name, type)
_FLAT_FIELDS: dict[str, tuple[str, str, type]] = {}
_GROUPS: dict[str, type] = {
    "": RunConfig,
    "lora": LoraSettings,
    "train": TrainSettings,
    "data": DataSettings,
    "privacy": PrivacySettings,
    "lm": LmSettings,
    "watch": WatchSettings,
}
for _group, _cls in _GROUPS.items():
    for _f in dataclasses.fields(_cls):
        if _f.name in _GROUPS:
            continue
        _prefix = "lora-" if _group == "lora" else ""
        _key = _f.metadata.get("key") or _prefix + _flat_name(_f.name)
        _type = {"int": int, "float": float, "str": str, "bool": bool, "tuple[str, ...]": tuple}[
            str(_f.type)
        ]
        _FLAT_FIELDS[_key] = (_group, _f.name, _type)


def _coerce(key: str, value: Any, typ: type) -> Any:
    """Coerce TOML/CLI values to the field's type, naming the key on failure."""
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"config key '{key}' has value {value!r}; allowed: true, false")
    if typ is tuple:
        if isinstance(value, (list, tuple)):
            return tuple(str(v).strip() for v in value if str(v).strip())
        if isinstance(value, str):
            return tuple(v.strip() for v in value.split(",") if v.strip())
        raise ConfigError(
            f"config key '{key}' has value {value!r}; allowed: a comma-separated string"
        )
    if typ is bool or isinstance(value, bool):
        raise ConfigError(f"config key '{key}' has value {value!r}; allowed: a {typ.__name__}")
    try:
        if typ is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if typ is float:
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"config key '{key}' has value {value!r}; allowed: a {typ.__name__}"
        ) from None


#: The default flat config, mirrored in pyproject.toml's [tool.flwr.app.config].
DEFAULTS: dict[str, Any] = RunConfig().to_flat()
