"""The sentence vector the classification head reads, and its centre.

The vector follows the checkpoint: a sentence-transformers model such as
all-MiniLM-L6-v2 was trained for the masked *mean* of its token states, and
its CLS/pooler output is untrained (a linear probe on it stays at the
majority class; on the mean it reaches 0.75 on Rotten Tomatoes), so
``pooling=auto`` reads the folder's pooling config and swaps the pooler for
:class:`MaskedMeanPooler`. With ``feature-centering`` the head reads the
vector minus the federation's mean vector, which the server combines from
the nodes' (clipped, noised under local DP) sums and counts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedlora.errors import ModelError


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
