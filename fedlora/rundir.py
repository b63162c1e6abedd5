"""The run directory: every file a run writes, named once.

``fedlora simulate``, ``fedlora run`` (the server side of a deployment) and
the sweep write into one folder per run (``run-dir``); the plots, the
console, preflight checks and resume read from it. ``docs/ARCHITECTURE.md``
shows the layout.

::

    <run-dir>/
      config.json            the validated run config (flat keys)
      status.json            running | completed | stopped | failed, with the reason
      metrics.json, .csv     one record per round (server.history)
      clients.json           per-site accuracy and loss by round (ensembles)
      partitions.json        what each virtual client holds (simulations)
      feature_center.npy     the federation's mean sentence vector (feature-centering)
      checkpoint/            state.json + round-NNNNNN/{adapter.npz,strategy.pkl}
      best_adapter.npz       the best round's global adapter so far (server.watch)
      adapter/               the exported PEFT adapter (+ labels, metadata, centre)
      *.png                  plots (simulations.plots); tensorboard/ event files
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from fedlora.io import atomic_write_json

CONFIG_FILE = "config.json"
STATUS_FILE = "status.json"
METRICS_JSON = "metrics.json"
METRICS_CSV = "metrics.csv"
CLIENTS_JSON = "clients.json"
PARTITIONS_JSON = "partitions.json"
PLAN_JSON = "plan.json"  # the local-DP plan, made before round 1
FEATURE_CENTER_FILE = "feature_center.npy"
CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_STATE_FILE = "state.json"  # inside CHECKPOINT_DIR: the round to resume from
ADAPTER_DIR = "adapter"
BEST_ADAPTER_FILE = "best_adapter.npz"
TENSORBOARD_DIR = "tensorboard"
PLOT_FILES = (
    "accuracy.png",
    "loss.png",
    "generation.png",
    "perplexity.png",
    "epsilon.png",
    "clients.png",
    "bytes.png",
    "partitions.png",
)
# A sweep's folder holds one run directory per grid point and these.
SWEEP_JSON = "sweep.json"
COMPARISON_CSV = "comparison.csv"
COMPARISON_PNG = "comparison.png"


def write_status(run_dir: Path, status: str, reason: str = "", **extra: Any) -> None:
    """Record how the run ended (atomic)."""
    atomic_write_json(
        run_dir / STATUS_FILE,
        {"status": status, "reason": reason, "time": time.time(), **extra},
    )


def status_of(run_dir: str | Path) -> dict[str, Any]:
    """Read a run's status.json (``{"status": "missing"}`` if absent)."""
    path = Path(run_dir) / STATUS_FILE
    return json.loads(path.read_text()) if path.is_file() else {"status": "missing"}


def simulated_sites(run_dir: Path) -> int:
    """How many virtual sites the simulation had (``partitions.json``), or why
    the run cannot be audited here."""
    from fedlora.errors import DataError

    partitions = run_dir / PARTITIONS_JSON
    if not partitions.is_file():
        raise DataError(
            f"{run_dir} has no {PARTITIONS_JSON}: a deployment's run, whose members are the "
            "sites' private data; only a simulation's run can be audited here (a site can "
            "audit its own data with its own copy of the adapter)"
        )
    return len(json.loads(partitions.read_text()))
