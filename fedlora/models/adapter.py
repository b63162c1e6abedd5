"""The LoRA adapter's tensors: what travels, how it loads, how it is exported.

PEFT does the adapter work (``get_peft_model_state_dict``,
``set_peft_model_state_dict``, ``save_pretrained``). What this adds: the
payload is exactly the trainable tensors, by PEFT's name, and loading a
payload is strict (a missing, extra or mis-shaped tensor is an error); an
export carries the label names and fedlora's metadata beside PEFT's files
and reloads with ``PeftModel.from_pretrained`` to identical logits.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedlora.errors import ModelError
from fedlora.models.loading import resolve_model_path
from fedlora.models.pooling import (
    MaskedMeanPooler,
    install_pooling,
    resolve_pooling,
    set_feature_center,
)
from fedlora.records import State, nonfinite_key

LABELS_FILE = "fedlora_labels.json"


METADATA_FILE = "fedlora_metadata.json"


CENTER_FILE = "fedlora_feature_center.safetensors"


def adapter_state(model: Any) -> State:
    """Every adapter tensor (LoRA A/B and classifier head) by PEFT's names.

    This is the whole adapter, including tensors a client keeps frozen (FFA-LoRA's
    A); :func:`trainable_state` is the part a client sends.
    """
    return {k: _numpy(v) for k, v in _checked_peft_state(model)[0].items()}


def trainable_state(model: Any) -> State:
    """The adapter tensors that train, by PEFT's names: what a client sends.

    Equal to :func:`adapter_state` in ordinary LoRA; under FFA-LoRA (A frozen)
    only B and the head.
    """
    state, trainable_keys = _checked_peft_state(model)
    return {k: _numpy(state[k]) for k in trainable_keys}


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().cpu().numpy().astype(np.float32, copy=True)


def _checked_peft_state(model: Any) -> tuple[dict[str, torch.Tensor], list[str]]:
    """PEFT's adapter state and which of its keys are trainable.

    PEFT renames parameters in its state (``lora_A.default.weight`` ->
    ``lora_A.weight``, ``modules_to_save.default.weight`` -> ``weight``), so a
    state entry is matched to its parameter by storage, not by name. Any
    trainable parameter outside the adapter is an error: it would train but
    never travel.
    """
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(model)
    by_storage = {(v.data_ptr(), tuple(v.shape)): k for k, v in state.items()}
    trainable_keys: list[str] = []
    outside: list[str] = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        key = by_storage.get((param.data_ptr(), tuple(param.shape)))
        if key is None:
            outside.append(name)
        else:
            trainable_keys.append(key)
    if outside:
        raise ModelError(
            f"{len(outside)} trainable parameter(s) are not part of the adapter "
            f"(e.g. {outside[0]}); only adapter tensors may be trainable"
        )
    order = {k: i for i, k in enumerate(state)}
    return state, sorted(trainable_keys, key=order.__getitem__)


def set_lora_a_trainable(model: Any, trainable: bool) -> None:
    """Freeze (FFA-LoRA) or unfreeze every LoRA A factor of ``model``.

    Set on every use, because a cached model serves clients of any mode.
    """
    for name, param in model.named_parameters():
        if ".lora_A." in name:
            param.requires_grad_(trainable)


def load_adapter_state(model: Any, state: State) -> None:
    """Load a full adapter state strictly: same names, same shapes, finite."""
    from peft import set_peft_model_state_dict

    expected = adapter_state_shapes(model)
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise ModelError(
            f"adapter state does not match the model: missing {missing[:3]}, "
            f"unexpected {extra[:3]}; both sides must use the same model and LoRA config"
        )
    for name, shape in expected.items():
        if tuple(state[name].shape) != shape:
            raise ModelError(
                f"adapter tensor {name} has shape {tuple(state[name].shape)}, "
                f"model expects {shape}; check lora-rank and the label list"
            )
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}
    result = set_peft_model_state_dict(model, tensors)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ModelError(f"PEFT did not recognise adapter tensors: {unexpected[:3]}")


def adapter_state_shapes(model: Any) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the trainable tensors, without copying them."""
    from peft import get_peft_model_state_dict

    return {k: tuple(v.shape) for k, v in get_peft_model_state_dict(model).items()}


def export_adapter(
    model: Any,
    state: State,
    out_dir: str | os.PathLike[str],
    labels: list[str],
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Save the adapter in PEFT format with the federation's label list.

    ``PeftModel.from_pretrained(base, out_dir)`` reloads it; the label list is
    written beside it (and into the base config's id2label) because logits
    without their label names are not usable by a hospital.

    Raises ``ValueError`` on a non-finite tensor: a NaN adapter is never exported.
    """
    bad = nonfinite_key(state)
    if bad is not None:
        raise ValueError(f"refusing to export {out_dir}: tensor {bad!r} is not finite")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    load_adapter_state(model, state)
    model.save_pretrained(str(out))
    (out / LABELS_FILE).write_text(json.dumps({"labels": labels}, indent=2))
    center = next((m.center for m in model.modules() if isinstance(m, MaskedMeanPooler)), None)
    if center is not None:
        from safetensors.torch import save_file

        save_file({"center": center.detach().cpu().contiguous()}, str(out / CENTER_FILE))
    else:  # never leave an earlier export's centre beside an uncentred head
        (out / CENTER_FILE).unlink(missing_ok=True)
    if metadata is not None:
        (out / METADATA_FILE).write_text(json.dumps(metadata, indent=2, default=str))
    return out


def export_classifier(
    model: Any,
    state: State,
    out_dir: str | os.PathLike[str],
    labels: list[str],
    metadata: dict[str, Any] | None = None,
) -> Path:
    """The classifier's export: the PEFT adapter plus a ``standalone/`` transformers folder.

    See :mod:`fedlora.models.standalone`: the standalone folder loads with
    plain transformers to fedlora's logits, and a mean-pooled adapter is
    marked so that a plain PEFT load fails instead of predicting garbage.
    """
    from fedlora.models.loading import load_tokenizer
    from fedlora.models.standalone import export_standalone, mark_mean_pooled

    out = export_adapter(model, state, out_dir, labels, metadata)
    base = str(model.peft_config["default"].base_model_name_or_path or "")
    export_standalone(model, out, labels, load_tokenizer(base or None))
    if any(isinstance(m, MaskedMeanPooler) for m in model.modules()):
        mark_mean_pooled(out)
    return out


def exported_folder(run_dir: str | os.PathLike[str]) -> Path:
    """The exported adapter of a run directory (or the folder itself if it is one)."""
    run = Path(run_dir)
    folder = run / "adapter" if (run / "adapter").is_dir() else run
    if not (folder / "adapter_config.json").is_file():
        raise ModelError(
            f"{run} holds no exported adapter (adapter/adapter_config.json); pass a run "
            "directory whose run finished, or its adapter/ folder"
        )
    return folder


def export_metadata(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """fedlora's metadata beside an exported adapter (empty for a bare PEFT folder)."""
    path = Path(folder) / METADATA_FILE
    return dict(json.loads(path.read_text())) if path.is_file() else {}


def load_exported(
    adapter_dir: str | os.PathLike[str], model_path: str | None = None
) -> tuple[Any, list[str]]:
    """Reload an exported adapter onto a fresh base, for inference."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    adapter_path = Path(adapter_dir)
    labels_file = adapter_path / LABELS_FILE
    if not labels_file.is_file():
        raise ModelError(f"{adapter_path} has no {LABELS_FILE}; was it exported by fedlora?")
    labels = json.loads(labels_file.read_text())["labels"]
    path = resolve_model_path(model_path)
    base = AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=len(labels))
    metadata = export_metadata(adapter_path)
    # The head was trained on this sentence vector; read it the same way.
    install_pooling(
        base,
        str(metadata.get("pooling") or resolve_pooling(path, "auto")),
        int(metadata.get("pooling_layers") or 1),
    )
    center_file = adapter_path / CENTER_FILE
    if metadata.get("feature_centering") and not center_file.is_file():
        raise ModelError(
            f"{adapter_path} was trained with feature-centering but has no {CENTER_FILE}; "
            "copy the whole exported folder"
        )
    if center_file.is_file():
        from safetensors.torch import load_file

        set_feature_center(base, load_file(str(center_file))["center"].numpy())
    from fedlora.models.standalone import peft_config_of

    config = peft_config_of(adapter_path)
    try:
        return PeftModel.from_pretrained(base, str(adapter_path), config=config), labels
    except RuntimeError as exc:  # torch's size mismatch: the wrong base or metadata
        raise ModelError(
            f"{adapter_path} does not fit the base model {path} ({str(exc)[:300]}); load it "
            f"on the base named in its adapter_config.json, with its {METADATA_FILE}"
        ) from exc
