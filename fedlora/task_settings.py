"""The run config's task-facing groups: the task, its data, its scores, the round kept.

Kept apart from :mod:`fedlora.settings` (LoRA, training, privacy) so each
module stays one screen of rules. :class:`fedlora.config.RunConfig` holds a
:class:`DataSettings` as ``cfg.data`` and an :class:`LmSettings` as ``cfg.lm``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedlora.errors import ConfigError
from fedlora.settings import require, setting

TASK_CLASSIFICATION = "classification"
TASK_CAUSAL_LM = "causal-lm"
TASK_NAMES = (TASK_CLASSIFICATION, TASK_CAUSAL_LM)


#: Generative metrics the server can report; ``auto`` picks by the data.
LM_METRICS = ("perplexity", "exact-match", "choice", "rouge-l")
LABEL_METRICS = ("exact-match", "choice")


@dataclass(frozen=True)
class LmSettings:
    """How a causal LM reads instruction data, holds its base, and is scored."""

    lm_metrics: tuple[str, ...] = setting(
        ("auto",),
        "task=causal-lm: what the server scores on its held-out split besides loss: "
        "perplexity, exact-match, choice (log-likelihood over the label list), rouge-l; "
        "auto = perplexity plus exact-match,choice for label answers or rouge-l for free text.",
    )
    max_new_tokens: int = setting(
        48, "task=causal-lm: longest greedy answer generated for exact-match and rouge-l."
    )
    eval_max_examples: int = setting(
        0,
        "Cap on the server's held-out examples scored each round (0 = all); generative "
        "metrics cost one forward pass per label plus a generation per example.",
    )
    audit_canaries: int = setting(
        0,
        "Simulation only, task=causal-lm: secret canary records planted in the sites' "
        "training data (as many more held out) for fedlora audit's exposure, extraction "
        "and ε lower bound; 0 = none, else 20..500. Never planted on a real site.",
    )
    audit_canary_repeats: int = setting(
        1, "Copies of each canary its site trains on every round (1..100)."
    )

    def __post_init__(self) -> None:
        allowed = ("auto", *LM_METRICS)
        require(
            bool(self.lm_metrics) and all(m in allowed for m in self.lm_metrics),
            "lm-metrics",
            ",".join(self.lm_metrics),
            "auto, or a comma-separated subset of " + ", ".join(LM_METRICS),
        )
        require(
            "auto" not in self.lm_metrics or len(self.lm_metrics) == 1,
            "lm-metrics",
            ",".join(self.lm_metrics),
            "auto on its own, or an explicit list",
        )
        require(1 <= self.max_new_tokens <= 1024, "max-new-tokens", self.max_new_tokens, "1..1024")
        canaries = self.audit_canaries
        require(canaries == 0 or 20 <= canaries <= 500, "audit-canaries", canaries, "0 or 20..500")
        repeats = self.audit_canary_repeats
        require(1 <= repeats <= 100, "audit-canary-repeats", repeats, "1..100")
        require(
            self.eval_max_examples >= 0,
            "eval-max-examples",
            self.eval_max_examples,
            ">= 0 (0 means all)",
        )


@dataclass(frozen=True)
class DataSettings:
    """Where examples come from and how a simulation splits them."""

    task: str = setting(
        "classification",
        "What is fine-tuned: classification (encoder + head) or causal-lm (instruction "
        "tuning of a causal language model).",
    )
    dataset: str = setting(
        "bbc-news",
        "Packaged demo dataset (bbc-news, rotten-tomatoes, drug-sentiment, drug-condition, "
        "aclsum: news, film and drug reviews, paper summaries; not clinical records) or file.",
    )
    data_file: str = setting("", "Local CSV/JSONL/Parquet file when dataset='file'.")
    text_column: str = setting("text", "Column holding the input text.")
    label_column: str = setting("label", "Column holding the class label.")
    labels: tuple[str, ...] = setting(
        (),
        "The federation's label list 'a,b,c' (required for real sites, so every "
        "site maps a label to the same id); empty = the dataset's own list.",
    )
    prompt_column: str = setting("prompt", "task=causal-lm: column holding the instruction.")
    response_column: str = setting(
        "response", "task=causal-lm: column holding the answer the model learns."
    )
    messages_column: str = setting(
        "",
        "task=causal-lm: column holding a chat (list of {role, content}; the last turn is "
        "the assistant's answer). Set it instead of prompt-/response-column.",
    )
    partitioner: str = setting("dirichlet", "Simulation split: iid, dirichlet, column.")
    dirichlet_alpha: float = setting(0.5, "Dirichlet concentration; small = skewed.")
    partition_column: str = setting("", "Column naming each row's site (partitioner=column).")
    test_fraction: float = setting(0.2, "Share held out for the server's global test.")

    def __post_init__(self) -> None:
        require(self.task in TASK_NAMES, "task", self.task, ", ".join(TASK_NAMES))
        require(bool(self.prompt_column), "prompt-column", self.prompt_column, "a column name")
        require(
            bool(self.response_column), "response-column", self.response_column, "a column name"
        )
        if self.task == TASK_CLASSIFICATION and self.dataset == "aclsum":
            raise ConfigError(
                "dataset=aclsum holds free-text summaries, not labels; use task=causal-lm"
            )
        require(0 < self.test_fraction < 1, "test-fraction", self.test_fraction, "0 < x < 1")
        require(self.dirichlet_alpha > 0, "dirichlet-alpha", self.dirichlet_alpha, "x > 0")
        require(bool(self.text_column), "text-column", self.text_column, "a column name")
        require(bool(self.label_column), "label-column", self.label_column, "a column name")
        if self.dataset == "file" and not self.data_file:
            raise ConfigError(
                "dataset='file' needs data-file: set data-file=/path/to/data.csv "
                "(CSV, JSONL or Parquet)"
            )
        if len(set(self.labels)) != len(self.labels):
            raise ConfigError(
                f"labels has duplicates: {','.join(self.labels)}; list each label once"
            )


@dataclass(frozen=True)
class WatchSettings:
    """What the server keeps and when it gives up (fedlora.server.watch)."""

    export_round: str = setting(
        "best",
        "Which round's global adapter the run exports: best (highest global accuracy on the "
        "server's held-out split, then lowest loss; round 0 competes, so a run never exports "
        "worse than its start) or last.",
    )
    divergence_factor: float = setting(
        3.0,
        "Stop a run whose global loss stays above this x round 0's (or that collapses to "
        "one class) for divergence-patience rounds, exporting its best round; 0 = never stop.",
    )
    divergence_patience: int = setting(
        2, "Consecutive diverged rounds before the run stops (see divergence-factor)."
    )

    def __post_init__(self) -> None:
        require(
            self.export_round in ("best", "last"), "export-round", self.export_round, "best or last"
        )
        require(
            math.isfinite(self.divergence_factor) and self.divergence_factor >= 0,
            "divergence-factor",
            self.divergence_factor,
            "a number >= 0 (0 = off; e.g. 3)",
        )
        require(
            self.divergence_patience >= 1, "divergence-patience", self.divergence_patience, ">= 1"
        )
