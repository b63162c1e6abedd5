"""The task seam: what a fine-tuning task needs, with sequence classification as the one task.

The node trains, the server evaluates and exports, through a :class:`Task`;
neither branches on what kind of model it holds. A second task (a causal
language model tuned on instructions) is a new module that builds its own
:class:`Task` and adds it to :data:`TASKS`, not a set of ``if`` branches
across the client and the server.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from fedlora.errors import ConfigError
from fedlora.models.adapter import export_classifier
from fedlora.models.batches import encode
from fedlora.models.causal_lm import (
    build_causal_lm,
    encode_instructions,
    export_causal_lm,
    lm_evaluate,
    lm_loss,
    lm_model_folder,
)
from fedlora.models.inference import evaluate
from fedlora.models.lm_eval import lm_metrics
from fedlora.models.loading import build_model, resolve_model_path
from fedlora.models.pooling import resolve_pooling
from fedlora.settings import LoraSettings

#: ``(model, padded batch, log prior or None) -> (mean loss, correct predictions)``
LossFn = Callable[[Any, dict[str, torch.Tensor], torch.Tensor | None], tuple[torch.Tensor, int]]


@dataclass(frozen=True)
class Task:
    """Everything the node and the server need to know about a task.

    Attributes
    ----------
    name
        The task's name.
    build_model
        ``(model_path, num_labels, lora, seed, device) -> model``: the frozen
        base with its LoRA adapter attached (device first, PEFT second).
    encode
        ``(tokenizer, examples, max_seq_length) -> EncodedDataset``.
    loss
        :data:`LossFn`: one batch's training objective and its correct count.
    evaluate
        ``(model, dataset) -> (mean loss, accuracy, examples)``.
    export
        ``(model, state, out_dir, labels, metadata) -> Path``: a PEFT adapter
        folder that reloads with ``PeftModel.from_pretrained``.
    """

    name: str
    build_model: Callable[..., Any]
    encode: Callable[..., Any]
    loss: LossFn
    evaluate: Callable[..., tuple[float, float, int]]
    export: Callable[..., Any]
    #: ``model-path -> folder``: the task's packaged default for an empty one, checked.
    folder: Callable[..., Any] = resolve_model_path
    #: ``(model, dataset, tokenizer, LmSettings, labels) -> metrics``: the server's
    #: per-round scores beyond ``evaluate`` (generative metrics); None = loss, accuracy.
    metrics: Callable[..., dict[str, float]] | None = None
    #: ``(folder, LoraSettings) -> dict``: how the base was used, for the export's
    #: metadata (what a head reads; how the base was stored).
    describe: Callable[..., dict[str, Any]] = lambda _folder, _lora: {}


def _describe_classifier(folder: Any, lora: LoraSettings) -> dict[str, Any]:
    return {
        "pooling": resolve_pooling(folder, lora.pooling),
        "pooling_layers": lora.pooling_layers,
        "feature_centering": lora.feature_centering,
    }


def _describe_causal_lm(_folder: Any, lora: LoraSettings) -> dict[str, Any]:
    return {"base_quantization": lora.base_quantization}


def classification_loss(
    model: Any, batch: dict[str, torch.Tensor], log_prior: torch.Tensor | None = None
) -> tuple[torch.Tensor, int]:
    """Cross-entropy of the head's logits (plus ``log_prior``, logit adjustment).

    Correct predictions are counted on the plain logits: the prior shapes the
    training objective only.
    """
    labels = batch["labels"]
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    logits = out.logits if log_prior is None else out.logits + log_prior
    loss = torch.nn.functional.cross_entropy(logits, labels)
    return loss, int((out.logits.argmax(-1) == labels).sum())


SEQUENCE_CLASSIFICATION = Task(
    name="classification",
    build_model=build_model,
    encode=encode,
    loss=classification_loss,
    evaluate=evaluate,
    export=export_classifier,
    describe=_describe_classifier,
)

CAUSAL_LM = Task(
    name="causal-lm",
    build_model=build_causal_lm,
    encode=encode_instructions,
    loss=lm_loss,
    evaluate=lm_evaluate,
    export=export_causal_lm,
    folder=lm_model_folder,
    metrics=lm_metrics,
    describe=_describe_causal_lm,
)

#: Tasks by name.
TASKS: dict[str, Task] = {t.name: t for t in (SEQUENCE_CLASSIFICATION, CAUSAL_LM)}


def get_task(name: str = "classification") -> Task:
    """The task called ``name``; a clear error for an unknown one."""
    if name not in TASKS:
        raise ConfigError(f"task {name!r} is not known; known tasks: {', '.join(TASKS)}")
    return TASKS[name]
