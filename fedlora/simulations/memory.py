"""Will the simulation fit in memory? Estimated before Ray starts.

Why: Ray's memory monitor kills a worker when the machine passes 95 % of
its memory, mid-round, after a DP site has already spent its ε on the
round. A simulation that cannot fit should say so before round 1, with the
numbers and the settings that shrink it.

The estimate is an upper-bound model of one client's peak, in bytes:

* ``BASE_PROCESS``: a Ray worker with torch, transformers, peft, opacus and
  flwr imported (504 MB measured for the imports alone; 700 MB allowed);
* the model's weights in fp32, twice under local DP (the cached model and
  the round's Opacus copy);
* training activations: ``layers x (68·s·b·h + 10·a·s²·b)`` bytes, the
  per-layer figure of Korthikanti et al. 2022 ("Reducing activation
  recomputation", 34·s·b·h + 5·a·s²·b at 16 bits) doubled for fp32;
* a causal LM's logits, their softmax and its gradient: ``3·b·s·V·4``;
* under DP, per-example gradients and their clipped sum: ``2·b·d·4``;

where b is the batch one forward pass sees (``dp-physical-batch-size``
under DP), s ``max-seq-length``, h the hidden size, a the heads, V the
vocabulary and d the noised coordinates. The driver (the ServerApp, which
evaluates) counts as one more client, and Ray's own processes as
``RAY_OVERHEAD``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from fedlora.config import RunConfig

MB = 1024**2
BASE_PROCESS = 700 * MB
RAY_OVERHEAD = 1024 * MB
#: Share of the available memory the estimate may use (Ray kills at 95 % of all).
HEADROOM = 0.85


@dataclass(frozen=True)
class ModelShape:
    """What the estimate reads from a model folder (config.json, safetensors headers)."""

    parameters: int
    hidden: int
    layers: int
    heads: int
    vocab: int


def model_shape(folder: str | Path) -> ModelShape:
    """The folder's parameter count (from its safetensors headers, no weights
    read) and the sizes the activation model needs."""
    from safetensors import safe_open

    folder = Path(folder)
    parameters = 0
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="np") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                parameters += math.prod(f.get_slice(key).get_shape())
    config = json.loads((folder / "config.json").read_text())
    return ModelShape(
        parameters=parameters,
        hidden=int(config.get("hidden_size", 0)),
        layers=int(config.get("num_hidden_layers", 0)),
        heads=int(config.get("num_attention_heads", 1)),
        vocab=int(config.get("vocab_size", 0)),
    )


def client_peak_bytes(cfg: RunConfig, shape: ModelShape, trainable: int = 0) -> int:
    """One client's estimated peak (the module's model)."""
    dp = cfg.privacy.dp_mode == "local"
    b = cfg.train.batch_size
    if dp:
        b = min(cfg.privacy.dp_physical_batch_size, max(b, 1))
    s, h, a = cfg.train.max_seq_length, shape.hidden, shape.heads
    weights = shape.parameters * 4 * (2 if dp else 1)
    activations = shape.layers * (68 * s * b * h + 10 * a * s * s * b)
    logits = 3 * b * s * shape.vocab * 4 if cfg.task == "causal-lm" else 0
    per_example = 2 * b * trainable * 4 if dp else 0
    return BASE_PROCESS + weights + activations + logits + per_example


def available_bytes(cfg: RunConfig) -> int:
    """``sim-memory-gb`` if set, else the machine's available memory now."""
    if cfg.sim_memory_gb > 0:
        return int(cfg.sim_memory_gb * 1024**3)
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:  # pragma: no cover - psutil comes with ray
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def check_memory(
    cfg: RunConfig, concurrent: int, shape: ModelShape, trainable: int = 0
) -> str | None:
    """The reason the simulation would not fit (None if it does): ``concurrent``
    clients at once plus the driver and Ray, against HEADROOM of what is available."""
    client = client_peak_bytes(cfg, shape, trainable)
    need = (concurrent + 1) * client + RAY_OVERHEAD
    have = available_bytes(cfg)
    if need <= HEADROOM * have:
        return None
    fits = max(0, int((HEADROOM * have - RAY_OVERHEAD) // client) - 1)
    knobs = "dp-physical-batch-size, " if cfg.privacy.dp_mode == "local" else "batch-size, "
    return (
        f"this simulation needs about {need / 1024**3:.1f} GB ({concurrent} clients at once "
        f"x {client / 1024**3:.2f} GB, the server and Ray) but {have / 1024**3:.1f} GB is "
        f"available and Ray stops workers past 95 %; run {fits or 1} at once (--num-cpus "
        f"per client higher), or lower {knobs}max-seq-length. No round was started"
    )
