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
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedlora.errors import ConfigError

# Names of the keys that cross the wire in Flower ConfigRecords (server -> client).
# Reply metric names (client -> server).
MAX_ROUNDS = 100_000
# Name of the ArrayRecord holding the adapter tensors in messages.


def _field(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


POOLINGS = ("auto", "cls", "mean")
OPTIMIZERS = ("adamw", "sgd")


@dataclass(frozen=True)
class LoraSettings:
    """LoRA adapter shape, identical on every party of a federation."""

    rank: int = _field(8, "LoRA rank r of the A (r x in) and B (out x r) factors.")
    alpha: float = _field(16.0, "LoRA scaling numerator: the update is (alpha/r)·B·A.")
    dropout: float = _field(0.05, "Dropout on the LoRA input during training.")
    target_modules: tuple[str, ...] = _field(
        ("query", "value"), "Names of the linear layers that get LoRA adapters."
    )
    pooling: str = field(
        default="auto",
        metadata={
            "key": "pooling",
            "help": "Sentence vector the head reads: cls (the model's pooler), mean "
            "(masked mean of token states) or auto (the model folder's "
            "sentence-transformers pooling if it has one, else cls).",
        },
    )
    pooling_layers: int = field(
        default=1,
        metadata={
            "key": "pooling-layers",
            "help": "With mean pooling: how many of the last encoder layers' means the "
            "head reads, concatenated (a richer sentence vector for the head, which DP "
            "trains well).",
        },
    )
    feature_centering: bool = field(
        default=False,
        metadata={
            "key": "feature-centering",
            "help": "Mean pooling: subtract the federation's mean sentence vector before the "
            "head (measured once, before round 1, by a statistics query to the nodes; "
            "noised and accounted under local DP). Lets DP-SGD train a head over several "
            "pooled layers, which the shared common direction otherwise destabilises.",
        },
    )
    feature_center_clip: float = field(
        default=5.0,
        metadata={
            "key": "feature-center-clip",
            "help": "Local DP with feature-centering: each example's sentence vector is "
            "clipped to this L2 norm per pooled layer (x sqrt(pooling-layers)) before it "
            "is summed; near the typical norm keeps both the clipping bias and the noise low.",
        },
    )

    def __post_init__(self) -> None:
        _require(self.pooling in POOLINGS, "pooling", self.pooling, ", ".join(POOLINGS))
        _require(self.pooling_layers >= 1, "pooling-layers", self.pooling_layers, "an integer >= 1")
        _require(
            self.pooling != "cls" or not self.feature_centering,
            "feature-centering",
            self.feature_centering,
            "false with pooling=cls (centering applies to the mean-pooled vector)",
        )
        _require(
            math.isfinite(self.feature_center_clip) and self.feature_center_clip > 0,
            "feature-center-clip",
            self.feature_center_clip,
            "a finite x > 0",
        )
        _require(self.rank >= 1, "lora-rank", self.rank, "an integer >= 1")
        _require(self.alpha > 0, "lora-alpha", self.alpha, "a number > 0")
        _require(0 <= self.dropout < 1, "lora-dropout", self.dropout, "0 <= x < 1")
        _require(
            len(self.target_modules) > 0 and all(self.target_modules),
            "lora-target-modules",
            ",".join(self.target_modules),
            "a comma-separated list of module names, e.g. 'query,value'",
        )


COMPRESSION_KINDS = ("none", "int8", "int4", "topk")


@dataclass(frozen=True)
class TrainSettings:
    """Local training recipe a client follows each round."""

    local_epochs: int = _field(1, "Passes over the local data per round.")
    learning_rate: float = _field(3e-3, "Learning rate of the local optimiser.")
    optimizer: str = _field(
        "adamw",
        "Local optimiser: adamw, or sgd (plain/momentum SGD; the better choice under "
        "DP-SGD, where Adam moves noise-only coordinates by ~lr every step).",
    )
    momentum: float = _field(0.0, "SGD momentum (optimizer=sgd only).")
    logit_adjustment: float = _field(
        0.0,
        "tau of logit-adjusted training (0 = off): the local loss adds tau*log(local "
        "label prior) to the logits, so a node whose labels are skewed does not pull "
        "the shared head toward its majority class. Under local DP the prior comes "
        "from label counts noised with dp-label-noise, and that release is accounted.",
    )
    lora_lr_ratio: float = _field(
        1.0,
        "LoRA tensors' learning rate as a multiple of learning-rate (the head and other "
        "saved modules keep learning-rate); as in LoRA+, B often wants a larger rate.",
    )
    batch_size: int = _field(16, "Examples per optimiser step.")
    max_seq_length: int = _field(64, "Tokens kept per text (longer texts truncated).")
    max_train_examples: int = _field(
        0, "Cap on local examples used per round (0 = all); for quick experiments."
    )
    compression: str = _field(
        "none",
        "How a client encodes its update for upload: none, int8, int4 (blockwise absmax) "
        "or topk (with error feedback kept across rounds in the node's state).",
    )
    compression_block_size: int = _field(
        64, "Elements per int8/int4 scale (0 = one scale per tensor)."
    )
    topk_fraction: float = _field(0.01, "Share of each tensor's entries top-k sends, in (0, 1].")

    def __post_init__(self) -> None:
        _require(self.local_epochs >= 1, "local-epochs", self.local_epochs, ">= 1")
        _require(
            math.isfinite(self.logit_adjustment) and self.logit_adjustment >= 0,
            "logit-adjustment",
            self.logit_adjustment,
            "a finite x >= 0 (1 = standard logit adjustment, 0 = off)",
        )
        _require(
            math.isfinite(self.lora_lr_ratio) and self.lora_lr_ratio > 0,
            "lora-lr-ratio",
            self.lora_lr_ratio,
            "a finite x > 0",
        )
        _require(
            self.compression in COMPRESSION_KINDS,
            "compression",
            self.compression,
            ", ".join(COMPRESSION_KINDS),
        )
        _require(
            self.compression_block_size >= 0,
            "compression-block-size",
            self.compression_block_size,
            ">= 0 (0 means one scale per tensor)",
        )
        _require(0 < self.topk_fraction <= 1, "topk-fraction", self.topk_fraction, "0 < x <= 1")
        _require(self.optimizer in OPTIMIZERS, "optimizer", self.optimizer, ", ".join(OPTIMIZERS))
        _require(0 <= self.momentum < 1, "momentum", self.momentum, "0 <= x < 1")
        _require(
            self.momentum == 0 or self.optimizer == "sgd",
            "momentum",
            self.momentum,
            "0 unless optimizer=sgd",
        )
        if self.optimizer == "adamw":
            _require(
                0 < self.learning_rate < 1,
                "learning-rate",
                self.learning_rate,
                "0 < x < 1 for optimizer=adamw (larger rates are for optimizer=sgd)",
            )
        else:
            _require(
                0 < self.learning_rate <= 100, "learning-rate", self.learning_rate, "0 < x <= 100"
            )
        _require(self.batch_size >= 1, "batch-size", self.batch_size, ">= 1")
        _require(
            8 <= self.max_seq_length <= 4096,
            "max-seq-length",
            self.max_seq_length,
            "8 <= x <= 4096",
        )
        _require(
            self.max_train_examples >= 0,
            "max-train-examples",
            self.max_train_examples,
            ">= 0 (0 means all)",
        )


@dataclass(frozen=True)
class DataSettings:
    """Where examples come from and how a simulation splits them."""

    dataset: str = _field(
        "bbc-news", "Packaged demo dataset ('bbc-news', 'rotten-tomatoes') or 'file'."
    )
    data_file: str = _field("", "Local CSV/JSONL/Parquet file when dataset='file'.")
    text_column: str = _field("text", "Column holding the input text.")
    label_column: str = _field("label", "Column holding the class label.")
    labels: tuple[str, ...] = _field(
        (), "The federation's label list; empty = the dataset's own list."
    )
    partitioner: str = _field("dirichlet", "Simulation split: iid, dirichlet, column.")
    dirichlet_alpha: float = _field(0.5, "Dirichlet concentration; small = skewed.")
    partition_column: str = _field("", "Column naming each row's site (partitioner=column).")
    test_fraction: float = _field(0.2, "Share held out for the server's global test.")

    def __post_init__(self) -> None:
        _require(0 < self.test_fraction < 1, "test-fraction", self.test_fraction, "0 < x < 1")
        _require(self.dirichlet_alpha > 0, "dirichlet-alpha", self.dirichlet_alpha, "x > 0")
        _require(bool(self.text_column), "text-column", self.text_column, "a column name")
        _require(bool(self.label_column), "label-column", self.label_column, "a column name")
        if self.dataset == "file" and not self.data_file:
            raise ConfigError(
                "dataset='file' needs data-file: set data-file=/path/to/data.csv "
                "(CSV, JSONL or Parquet)"
            )
        if len(set(self.labels)) != len(self.labels):
            raise ConfigError(
                f"labels has duplicates: {','.join(self.labels)}; list each label once"
            )


SIM_ATTACKS = ("sign-flip", "scaled-noise", "label-flip")

DP_MODES = (
    "none",
    "local",
    "central-server-fixed",
    "central-client-fixed",
    "central-server-adaptive",
    "central-client-adaptive",
)


@dataclass(frozen=True)
class PrivacySettings:
    """The federation's DP recipe. Caps and δ of local DP are the *node's*.

    A node's operator sets its own ε cap, δ and ledger folder in the node
    config (``privacy-epsilon-cap``, ``privacy-delta``, ``privacy-ledger-dir``);
    the server's run config cannot raise them. Virtual clients have no node
    config of their own, so simulations take them from ``sim-epsilon-cap``
    and ``sim-ledger-dir`` instead.
    """

    dp_mode: str = _field("none", "none, local (DP-SGD at each node) or a central-* mode.")
    dp_noise_multiplier: float = _field(
        0.0, "Noise std / clip norm; 0 = derive from dp-target-epsilon (local)."
    )
    dp_target_epsilon: float = _field(
        0.0, "Local DP: each client's ε over all rounds; sets the noise multiplier."
    )
    dp_max_grad_norm: float = _field(
        1.0, "Local: per-example gradient clip. Central: per-update clip norm."
    )
    dp_delta: float = _field(1e-5, "δ for central DP and for deriving noise from a target ε.")
    dp_accountant: str = _field("rdp", "Local DP accountant: rdp or prv.")
    dp_label_noise: float = _field(
        20.0,
        "Local DP with logit-adjustment: std of the Gaussian noise on each local label "
        "count (sensitivity 1), accounted in the node's ledger each round.",
    )
    dp_center_noise: float = _field(
        10.0,
        "Local DP with feature-centering: noise multiplier of the one-time release of the "
        "node's summed sentence vectors and count (Gaussian, sensitivity sqrt(2) x the "
        "clip), accounted in the node's ledger before it is sent.",
    )
    dp_grad_sample_mode: str = _field("hooks", "Opacus per-sample gradients: hooks, functorch.")
    federation: str = _field(
        "fedlora",
        "Federation name. Keys a *virtual* node's ledger in simulations; a real site's "
        "ledger is keyed by its data alone, so this name cannot reset its spend.",
    )
    sim_epsilon_cap: float = _field(
        0.0, "Simulation only: every virtual node's ε cap (0 = no cap)."
    )
    sim_ledger_dir: str = _field(
        "", "Simulation only: virtual nodes' ledger folder (empty = <run-dir>/ledgers)."
    )

    def __post_init__(self) -> None:
        _require(self.dp_mode in DP_MODES, "dp-mode", self.dp_mode, ", ".join(DP_MODES))
        _require(
            self.dp_noise_multiplier >= 0, "dp-noise-multiplier", self.dp_noise_multiplier, ">= 0"
        )
        _require(self.dp_target_epsilon >= 0, "dp-target-epsilon", self.dp_target_epsilon, ">= 0")
        _require(self.dp_max_grad_norm > 0, "dp-max-grad-norm", self.dp_max_grad_norm, "> 0")
        _require(0 < self.dp_delta < 1, "dp-delta", self.dp_delta, "0 < x < 1")
        _require(
            math.isfinite(self.dp_label_noise) and self.dp_label_noise > 0,
            "dp-label-noise",
            self.dp_label_noise,
            "a finite x > 0",
        )
        _require(
            math.isfinite(self.dp_center_noise) and self.dp_center_noise > 0,
            "dp-center-noise",
            self.dp_center_noise,
            "a finite x > 0",
        )
        _require(
            self.dp_accountant in ("rdp", "prv"), "dp-accountant", self.dp_accountant, "rdp, prv"
        )
        # "ghost" clipping needs Opacus' criterion to drive the backward pass;
        # it measured slower than hooks for LoRA (fedlora/privacy/dpsgd.py).
        _require(
            self.dp_grad_sample_mode in ("hooks", "functorch"),
            "dp-grad-sample-mode",
            self.dp_grad_sample_mode,
            "hooks, functorch",
        )
        _require(bool(self.federation), "federation", self.federation, "a non-empty name")
        _require(self.sim_epsilon_cap >= 0, "sim-epsilon-cap", self.sim_epsilon_cap, ">= 0")
        if self.dp_mode == "local" and (self.dp_noise_multiplier > 0) == (
            self.dp_target_epsilon > 0
        ):
            raise ConfigError(
                "dp-mode=local needs exactly one of dp-noise-multiplier and dp-target-epsilon "
                f"(got {self.dp_noise_multiplier} and {self.dp_target_epsilon})"
            )
        if self.dp_mode.startswith("central") and self.dp_noise_multiplier <= 0:
            raise ConfigError(
                f"dp-mode={self.dp_mode} needs dp-noise-multiplier > 0 "
                f"(got {self.dp_noise_multiplier})"
            )

    @property
    def enabled(self) -> bool:
        """Whether any DP mechanism is on."""
        return self.dp_mode != "none"


@dataclass(frozen=True)
class RunConfig:
    """Everything one federated run needs, validated at construction."""

    model_path: str = _field("", "Local model folder; empty = packaged all-MiniLM-L6-v2.")
    lora: LoraSettings = field(default_factory=LoraSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    data: DataSettings = field(default_factory=DataSettings)
    privacy: PrivacySettings = field(default_factory=PrivacySettings)
    num_server_rounds: int = _field(8, "Federated rounds (1 to 100000).")
    fraction_train: float = _field(1.0, "Share of connected nodes sampled per round.")
    fraction_evaluate: float = _field(0.0, "Share of nodes asked for federated eval.")
    min_train_nodes: int = _field(2, "Fewest nodes a round may train with.")
    strategy: str = _field("fedavg", "Aggregation strategy name (see strategies).")
    strategy_options: str = _field(
        "", "Strategy parameters as 'key=value,...', e.g. 'server-momentum=0.9'."
    )
    seed: int = _field(42, "Root seed: model init, splits, sampling per (seed, round).")
    run_dir: str = _field("runs/latest", "Where metrics, checkpoints, adapters go.")
    round_timeout: float = _field(3600.0, "Seconds to wait for replies in a round.")
    update_max_norm: float = _field(
        0.0, "Reject updates whose L2 norm exceeds this (0 = 10x the initial adapter's norm)."
    )
    max_reported_examples: int = _field(
        1_000_000,
        "Largest example count (the FedAvg weight) a node's reply may carry; a larger one "
        "is rejected, so no single node can outweigh the rest by claiming more data.",
    )
    secagg: bool = _field(False, "Secure aggregation (Flower SecAgg+): the server sees only sums.")
    secagg_clipping_range: float = _field(
        1.0, "SecAgg+: each weighted update entry is clipped to +-this before quantisation."
    )
    secagg_max_weight: float = _field(
        0.0, "SecAgg+: largest example count a node may report (0 = max-train-examples)."
    )
    app_signature: str = _field(
        "",
        "Set by `fedlora run --sign-key`: a signature of the app's digest, for sites whose "
        "trusted-apps file trusts the signer. Nodes check it; the server ignores it.",
    )
    ensemble: str = _field(
        "none", "Also evaluate an ensemble: none, last-rounds (global adapters) or sites."
    )
    ensemble_size: int = _field(3, "Members of the ensemble (rounds or sites).")
    resume: bool = _field(
        False, "Continue from run-dir's last complete round (checkpoint) instead of anew."
    )
    sim_client_ranks: tuple[str, ...] = _field(
        (),
        "Simulation only, strategy=hetero-rank: LoRA ranks given to partitions round-robin "
        "(e.g. '4,16'); empty = every client trains at lora-rank. A real node sets its "
        "own rank with the node-config key lora-rank.",
    )
    sim_malicious_fraction: float = _field(
        0.0,
        "Simulation only: share of partitions that poison their updates (chosen from seed); "
        "ignored at nodes with their own data-path.",
    )
    sim_attack: str = _field(
        "sign-flip", "Simulation only: the poisoning: sign-flip, scaled-noise or label-flip."
    )
    sim_attack_scale: float = _field(
        10.0, "Simulation only: factor of sign-flip (delta -> -s·delta) and scaled-noise."
    )

    def __post_init__(self) -> None:
        _require(
            1 <= self.num_server_rounds <= MAX_ROUNDS,
            "num-server-rounds",
            self.num_server_rounds,
            f"1 <= x <= {MAX_ROUNDS}",
        )
        _require(0 <= self.seed < 2**63, "seed", self.seed, "0 <= seed < 2**63")
        _require(
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
        _require(0 < self.fraction_train <= 1, "fraction-train", self.fraction_train, "0 < x <= 1")
        _require(
            0 <= self.fraction_evaluate <= 1,
            "fraction-evaluate",
            self.fraction_evaluate,
            "0 <= x <= 1",
        )
        _require(self.min_train_nodes >= 1, "min-train-nodes", self.min_train_nodes, ">= 1")
        _require(self.round_timeout > 0, "round-timeout", self.round_timeout, "> 0")
        _require(
            self.ensemble in ("none", "last-rounds", "sites"),
            "ensemble",
            self.ensemble,
            "none, last-rounds, sites",
        )
        _require(self.ensemble_size >= 2, "ensemble-size", self.ensemble_size, ">= 2")
        _require(self.update_max_norm >= 0, "update-max-norm", self.update_max_norm, ">= 0")
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
        _require(
            all(r.isdigit() and int(r) >= 1 for r in self.sim_client_ranks),
            "sim-client-ranks",
            ",".join(self.sim_client_ranks),
            "comma-separated integers >= 1, e.g. '4,16'",
        )
        _require(
            0 <= self.sim_malicious_fraction <= 1,
            "sim-malicious-fraction",
            self.sim_malicious_fraction,
            "0 <= x <= 1",
        )
        _require(
            self.sim_attack in SIM_ATTACKS, "sim-attack", self.sim_attack, ", ".join(SIM_ATTACKS)
        )
        _require(self.sim_attack_scale > 0, "sim-attack-scale", self.sim_attack_scale, "> 0")
        if self.train.compression != "none" and self.privacy.dp_mode.startswith("central"):
            # Flower's DP wrappers clip what arrives; an encoded delta is not a model.
            raise ConfigError(
                f"compression={self.train.compression} cannot be combined with "
                f"dp-mode={self.privacy.dp_mode}: central DP clips and noises the updates "
                "the server receives, which compression has encoded. Set compression=none "
                "or use dp-mode=local"
            )

    @property
    def client_ranks(self) -> tuple[int, ...]:
        """``sim-client-ranks`` as integers (empty: every client at lora-rank)."""
        return tuple(int(r) for r in self.sim_client_ranks)

    # ------------------------------------------------------------------ I/O
    @classmethod
    def from_flat(cls, flat: Mapping[str, Any]) -> RunConfig:
        """Build from Flower's flat run config; unknown keys are an error.

        Unknown keys are rejected rather than ignored because a typo such as
        ``learning_rate`` would otherwise silently train with the default.
        """
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
        return cls(
            lora=LoraSettings(**groups["lora"]),
            train=TrainSettings(**groups["train"]),
            data=DataSettings(**groups["data"]),
            privacy=PrivacySettings(**groups["privacy"]),
            **groups[""],
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


def _require(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}' has value {value!r}; allowed: {allowed}")


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
