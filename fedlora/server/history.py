"""Per-round metrics of a run, written as CSV and JSON after every round.

Written atomically each round (not at the end) so a crashed or interrupted
run still leaves its history, and a resumed run continues the same files.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fedlora.io import atomic_write_json, atomic_write_text
from fedlora.rundir import METRICS_CSV, METRICS_JSON


@dataclass
class RoundRecord:
    """One round's outcome as the server saw it."""

    round: int
    global_loss: float | None = None
    global_accuracy: float | None = None
    train_loss: float | None = None
    train_accuracy: float | None = None
    federated_loss: float | None = None
    federated_accuracy: float | None = None
    clients_sampled: int = 0
    clients_ok: int = 0
    clients_failed: int = 0
    bytes_uploaded: int = 0
    seconds: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)


#: How a round's progress line starts: what ``fedlora run`` keeps of the server's log.
ROUND_LINE = re.compile(r"round \d+/\d+ · ")


def round_line(row: Mapping[str, Any], total: int) -> str:
    """A round's one progress line, from its record as ``metrics.json`` holds it.

    The server logs it and ``fedlora simulate``'s display prints it from the
    file, so a deployment's operator and a researcher read the same line.
    """

    def number(key: str, within: Mapping[str, Any] = row) -> float | None:
        value = within.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return None
        return float(value)

    rnd = int(number("round") or 0)
    parts = [] if rnd == 0 else [f"{row.get('clients_ok', 0)}/{row.get('clients_sampled', 0)} ok"]
    for key, label in (("global_accuracy", "acc"), ("global_loss", "loss")):
        if (value := number(key)) is not None:
            parts.append(f"{label} {value:.3f}")
    if rnd == 0:
        return f"round 0/{total} · " + " · ".join(parts) + " (before training)"
    if (eps := number("epsilon-max", row.get("extra") or {})) is not None:
        parts.append(f"ε {eps:.2f}")
    parts.append(f"{(number('bytes_uploaded') or 0) / 1e6:.2f} MB up")
    if seconds := number("seconds"):
        parts.append(f"{seconds:.1f} s")
    return f"round {rnd}/{total} · " + " · ".join(parts)


class RunHistory:
    """Rounds so far, persisted to ``run_dir/metrics.{csv,json}``."""

    def __init__(self, run_dir: str | Path, records: list[RoundRecord] | None = None):
        self.run_dir = Path(run_dir)
        self.records: list[RoundRecord] = list(records or [])

    @classmethod
    def load(cls, run_dir: str | Path) -> RunHistory:
        """Reload a history written by :meth:`save` (for resume and reports)."""
        path = Path(run_dir) / METRICS_JSON
        rows = json.loads(path.read_text())["rounds"] if path.is_file() else []
        return cls(run_dir, [RoundRecord(**row) for row in rows])

    def add(self, record: RoundRecord) -> None:
        """Append (replacing a record of the same round) and persist."""
        self.records = [r for r in self.records if r.round != record.round] + [record]
        self.records.sort(key=lambda r: r.round)
        self.save()

    def truncate(self, last_round: int) -> None:
        """Drop rounds after ``last_round`` (a resume replays them)."""
        self.records = [r for r in self.records if r.round <= last_round]
        self.save()

    def rows(self) -> list[dict[str, Any]]:
        """Flat rows: extra metrics become columns, failures a count."""
        out = []
        for rec in self.records:
            row = asdict(rec)
            row.pop("failures")
            row.update(row.pop("extra"))
            out.append(row)
        return out

    def save(self) -> None:
        """Write CSV and JSON atomically."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(
            self.run_dir / METRICS_JSON, {"rounds": [asdict(r) for r in self.records]}
        )
        rows = self.rows()
        columns: list[str] = []
        for row in rows:
            columns.extend(k for k in row if k not in columns)
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns or ["round"])
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if row.get(k) is None else row.get(k) for k in columns})
        atomic_write_text(self.run_dir / METRICS_CSV, buffer.getvalue())
