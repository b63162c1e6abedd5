"""TensorBoard event files of a run, from its ``metrics.json``.

``tensorboard --logdir runs/`` then shows every run (and every sweep cell)
side by side. The events are derived from ``metrics.json`` after the fact
rather than logged live, so the one metrics file stays the source of truth
and a report can be regenerated at any time: the ``tensorboard/`` folder is
removed and rewritten whole, so re-running never duplicates points.

Tags: ``global/accuracy``, ``global/loss``, ``train/*``, ``federated/*``,
``clients/sampled|ok|failed``, ``comm/bytes_uploaded``, ``time/round_seconds``
and ``extra/<key>`` for every key of a round's ``extra`` (e.g.
``extra/epsilon``). Step = round. Uses ``torch.utils.tensorboard`` (torch is
already a dependency; it writes offline, no TensorFlow needed).
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedlora.rundir import TENSORBOARD_DIR
from fedlora.simulations.plots import load_rounds

# metrics.json field -> TensorBoard tag
SCALAR_TAGS: dict[str, str] = {
    "global_accuracy": "global/accuracy",
    "global_loss": "global/loss",
    "train_accuracy": "train/accuracy",
    "train_loss": "train/loss",
    "federated_accuracy": "federated/accuracy",
    "federated_loss": "federated/loss",
    "clients_sampled": "clients/sampled",
    "clients_ok": "clients/ok",
    "clients_failed": "clients/failed",
    "bytes_uploaded": "comm/bytes_uploaded",
    "seconds": "time/round_seconds",
}
# Round 0 is the untrained model's evaluation: counts there would read as "0 clients".
_TRAINING_ONLY = {
    "clients_sampled",
    "clients_ok",
    "clients_failed",
    "bytes_uploaded",
    "seconds",
}


def scalars(rounds: Sequence[dict[str, Any]]) -> list[tuple[str, int, float]]:
    """``(tag, round, value)`` for every recorded metric of every round."""
    out: list[tuple[str, int, float]] = []
    for row in rounds:
        step = int(row["round"])
        for key, tag in SCALAR_TAGS.items():
            value = row.get(key)
            if value is None or (step == 0 and key in _TRAINING_ONLY):
                continue
            out.append((tag, step, float(value)))
        for key, value in sorted((row.get("extra") or {}).items()):
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                out.append((f"extra/{key}", step, float(value)))
    return out


def write_tensorboard(run_dir: str | Path) -> Path:
    """(Re)write ``run_dir/tensorboard`` from ``metrics.json``; returns that folder."""
    from torch.utils.tensorboard import SummaryWriter

    run_dir = Path(run_dir)
    points = scalars(load_rounds(run_dir))
    folder = run_dir / TENSORBOARD_DIR
    if folder.exists():  # an error here must surface: stale events would duplicate points
        shutil.rmtree(folder)
    writer = SummaryWriter(log_dir=str(folder))
    try:
        for tag, step, value in points:
            writer.add_scalar(tag, value, global_step=step)
    finally:
        writer.close()
    return folder
