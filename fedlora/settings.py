"""The run config's groups: LoRA shape, local training, data, privacy.

Each group is a frozen dataclass whose fields carry their help text and
whose ``__post_init__`` rejects values that are not allowed, naming the
flat config key, the value and what is allowed. :class:`fedlora.config.RunConfig`
holds one of each and checks how they fit together.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from fedlora.errors import ConfigError


def setting(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


POOLINGS = ("auto", "cls", "mean")

BASE_QUANTIZATIONS = ("none", "int8", "int4")


OPTIMIZERS = ("adamw", "sgd")


@dataclass(frozen=True)
class LoraSettings:
    """LoRA adapter shape, identical on every party of a federation."""

    rank: int = setting(8, "LoRA rank r of the A (r x in) and B (out x r) factors.")
    alpha: float = setting(16.0, "LoRA scaling numerator: the update is (alpha/r)·B·A.")
    dropout: float = setting(0.05, "Dropout on the LoRA input during training.")
    target_modules: tuple[str, ...] = setting(
        ("auto",),
        "Names of the linear layers that get LoRA adapters; auto = query,value for the "
        "encoder classifier, the attention projections (q,k,v,o) for a causal LM.",
    )
    base_quantization: str = field(
        default="none",
        metadata={
            "key": "base-quantization",
            "help": "task=causal-lm: keep the frozen base's linear weights in none or int8 "
            "(torchao, runs on CPU) under the LoRA adapters; int4 is refused (PEFT's LoRA "
            "over 4-bit weights needs bitsandbytes' CUDA backend).",
        },
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

    @property
    def auto_targets(self) -> bool:
        """``lora-target-modules=auto``: the task picks the layers."""
        return self.target_modules == ("auto",)

    def __post_init__(self) -> None:
        require(
            self.base_quantization in BASE_QUANTIZATIONS,
            "base-quantization",
            self.base_quantization,
            ", ".join(BASE_QUANTIZATIONS),
        )
        require(self.pooling in POOLINGS, "pooling", self.pooling, ", ".join(POOLINGS))
        require(self.pooling_layers >= 1, "pooling-layers", self.pooling_layers, "an integer >= 1")
        require(
            self.pooling != "cls" or not self.feature_centering,
            "feature-centering",
            self.feature_centering,
            "false with pooling=cls (centering applies to the mean-pooled vector)",
        )
        require(
            math.isfinite(self.feature_center_clip) and self.feature_center_clip > 0,
            "feature-center-clip",
            self.feature_center_clip,
            "a finite x > 0",
        )
        require(self.rank >= 1, "lora-rank", self.rank, "an integer >= 1")
        require(self.alpha > 0, "lora-alpha", self.alpha, "a number > 0")
        require(0 <= self.dropout < 1, "lora-dropout", self.dropout, "0 <= x < 1")
        require(
            len(self.target_modules) > 0 and all(self.target_modules),
            "lora-target-modules",
            ",".join(self.target_modules),
            "a comma-separated list of module names, e.g. 'query,value'",
        )


COMPRESSION_KINDS = ("none", "int8", "int4", "topk")


@dataclass(frozen=True)
class TrainSettings:
    """Local training recipe a client follows each round."""

    local_epochs: int = setting(1, "Passes over the local data per round.")
    learning_rate: float = setting(3e-3, "Learning rate of the local optimiser.")
    optimizer: str = setting(
        "adamw",
        "Local optimiser: adamw, or sgd (plain/momentum SGD; the better choice under "
        "DP-SGD, where Adam moves noise-only coordinates by ~lr every step).",
    )
    momentum: float = setting(0.0, "SGD momentum (optimizer=sgd only).")
    logit_adjustment: float = setting(
        0.0,
        "tau of logit-adjusted training (0 = off): the local loss adds tau*log(local "
        "label prior) to the logits, so a node whose labels are skewed does not pull "
        "the shared head toward its majority class. Under local DP the prior comes "
        "from label counts noised with dp-label-noise, and that release is accounted.",
    )
    lora_lr_ratio: float = setting(
        1.0,
        "LoRA tensors' learning rate as a multiple of learning-rate (the head and other "
        "saved modules keep learning-rate); as in LoRA+, B often wants a larger rate.",
    )
    batch_size: int = setting(16, "Examples per optimiser step.")
    max_seq_length: int = setting(64, "Tokens kept per text (longer texts truncated).")
    max_train_examples: int = setting(
        0, "Cap on local examples used per round (0 = all); for quick experiments."
    )
    compression: str = setting(
        "none",
        "How a client encodes its update for upload: none, int8, int4 (blockwise absmax) "
        "or topk (with error feedback kept across rounds in the node's state).",
    )
    compression_block_size: int = setting(
        64, "Elements per int8/int4 scale (0 = one scale per tensor)."
    )
    topk_fraction: float = setting(0.01, "Share of each tensor's entries top-k sends, in (0, 1].")

    def __post_init__(self) -> None:
        require(self.local_epochs >= 1, "local-epochs", self.local_epochs, ">= 1")
        require(
            math.isfinite(self.logit_adjustment) and self.logit_adjustment >= 0,
            "logit-adjustment",
            self.logit_adjustment,
            "a finite x >= 0 (1 = standard logit adjustment, 0 = off)",
        )
        require(
            math.isfinite(self.lora_lr_ratio) and self.lora_lr_ratio > 0,
            "lora-lr-ratio",
            self.lora_lr_ratio,
            "a finite x > 0",
        )
        require(
            self.compression in COMPRESSION_KINDS,
            "compression",
            self.compression,
            ", ".join(COMPRESSION_KINDS),
        )
        require(
            self.compression_block_size >= 0,
            "compression-block-size",
            self.compression_block_size,
            ">= 0 (0 means one scale per tensor)",
        )
        require(0 < self.topk_fraction <= 1, "topk-fraction", self.topk_fraction, "0 < x <= 1")
        require(self.optimizer in OPTIMIZERS, "optimizer", self.optimizer, ", ".join(OPTIMIZERS))
        require(0 <= self.momentum < 1, "momentum", self.momentum, "0 <= x < 1")
        require(
            self.momentum == 0 or self.optimizer == "sgd",
            "momentum",
            self.momentum,
            "0 unless optimizer=sgd",
        )
        if self.optimizer == "adamw":
            require(
                0 < self.learning_rate < 1,
                "learning-rate",
                self.learning_rate,
                "0 < x < 1 for optimizer=adamw (larger rates are for optimizer=sgd)",
            )
        else:
            require(
                0 < self.learning_rate <= 100, "learning-rate", self.learning_rate, "0 < x <= 100"
            )
        require(self.batch_size >= 1, "batch-size", self.batch_size, ">= 1")
        require(
            8 <= self.max_seq_length <= 4096,
            "max-seq-length",
            self.max_seq_length,
            "8 <= x <= 4096",
        )
        require(
            self.max_train_examples >= 0,
            "max-train-examples",
            self.max_train_examples,
            ">= 0 (0 means all)",
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

    dp_mode: str = setting(
        "none",
        "none, local (DP-SGD at each node), central-server-fixed, central-client-fixed, "
        "central-server-adaptive or central-client-adaptive (Flower's DP wrappers).",
    )
    dp_noise_multiplier: float = setting(
        0.0, "Noise std / clip norm; 0 = derive from dp-target-epsilon (local)."
    )
    dp_target_epsilon: float = setting(
        0.0, "Local DP: each client's ε over all rounds; sets the noise multiplier."
    )
    dp_max_grad_norm: float = setting(
        1.0, "Local: per-example gradient clip. Central: per-update clip norm."
    )
    dp_delta: float = setting(1e-5, "δ for central DP and for deriving noise from a target ε.")
    dp_accountant: str = setting("rdp", "Local DP accountant: rdp or prv.")
    dp_label_noise: float = setting(
        20.0,
        "Local DP with logit-adjustment: std of the Gaussian noise on each local label "
        "count (sensitivity 1), accounted in the node's ledger each round.",
    )
    dp_center_noise: float = setting(
        10.0,
        "Local DP with feature-centering: noise multiplier of the one-time release of the "
        "node's summed sentence vectors and count (Gaussian, sensitivity sqrt(2) x the "
        "clip), accounted in the node's ledger before it is sent.",
    )
    dp_grad_sample_mode: str = setting("hooks", "Opacus per-sample gradients: hooks, functorch.")
    dp_recipe: str = setting(
        "auto",
        "Local DP with dp-target-epsilon: auto (each node picks its batch size, SGD and a "
        "rate scaled down with the batch from its plan, and strategy fedavg becomes ffa-lora; "
        "settings changed from their defaults win) or manual.",
    )
    dp_plan: str = setting(
        "refuse",
        "Local DP: before round 1 the server plans every site's noise; refuse (stop when the "
        "plan says the run cannot learn) or warn. See `fedlora plan`.",
    )
    dp_physical_batch_size: int = setting(
        32, "Local DP: largest batch run at once (Opacus' BatchMemoryManager); bounds memory."
    )
    federation: str = setting(
        "fedlora",
        "Federation name. Keys a *virtual* node's ledger in simulations; a real site's "
        "ledger is keyed by its data alone, so this name cannot reset its spend.",
    )
    sim_epsilon_cap: float = setting(
        0.0, "Simulation only: every virtual node's ε cap (0 = no cap)."
    )
    sim_ledger_dir: str = setting(
        "", "Simulation only: virtual nodes' ledger folder (empty = <run-dir>/ledgers)."
    )

    @property
    def auto_recipe(self) -> bool:
        """Whether ``dp-recipe=auto`` applies: local DP with a target ε (a fixed
        noise multiplier is a hand-made recipe: the person chose σ, so B too)."""
        return self.dp_mode == "local" and self.dp_recipe == "auto" and self.dp_target_epsilon > 0

    def __post_init__(self) -> None:
        require(self.dp_mode in DP_MODES, "dp-mode", self.dp_mode, ", ".join(DP_MODES))
        require(
            self.dp_noise_multiplier >= 0, "dp-noise-multiplier", self.dp_noise_multiplier, ">= 0"
        )
        require(self.dp_target_epsilon >= 0, "dp-target-epsilon", self.dp_target_epsilon, ">= 0")
        require(self.dp_max_grad_norm > 0, "dp-max-grad-norm", self.dp_max_grad_norm, "> 0")
        require(0 < self.dp_delta < 1, "dp-delta", self.dp_delta, "0 < x < 1")
        require(
            math.isfinite(self.dp_label_noise) and self.dp_label_noise > 0,
            "dp-label-noise",
            self.dp_label_noise,
            "a finite x > 0",
        )
        require(
            math.isfinite(self.dp_center_noise) and self.dp_center_noise > 0,
            "dp-center-noise",
            self.dp_center_noise,
            "a finite x > 0",
        )
        require(
            self.dp_accountant in ("rdp", "prv"), "dp-accountant", self.dp_accountant, "rdp, prv"
        )
        # "ghost" clipping needs Opacus' criterion to drive the backward pass;
        # it measured slower than hooks for LoRA (fedlora/privacy/dpsgd.py).
        require(
            self.dp_grad_sample_mode in ("hooks", "functorch"),
            "dp-grad-sample-mode",
            self.dp_grad_sample_mode,
            "hooks, functorch",
        )
        require(bool(self.federation), "federation", self.federation, "a non-empty name")
        require(self.dp_recipe in ("auto", "manual"), "dp-recipe", self.dp_recipe, "auto, manual")
        require(self.dp_plan in ("refuse", "warn"), "dp-plan", self.dp_plan, "refuse, warn")
        require(
            self.dp_physical_batch_size >= 1,
            "dp-physical-batch-size",
            self.dp_physical_batch_size,
            ">= 1",
        )
        require(self.sim_epsilon_cap >= 0, "sim-epsilon-cap", self.sim_epsilon_cap, ">= 0")
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


def require(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}' has value {value!r}; allowed: {allowed}")
