"""Experiments and parameter sweeps: TOML in, one run directory per cell out.

An *experiment* is a TOML file::

    [experiment]
    name = "demo"          # names the output folder (runs/<name> by default)
    num-clients = 10       # virtual clients (Flower SuperNodes)
    num-cpus = 1.0         # CPUs per virtual client (Ray)
    num-gpus = 0.0         # GPU share per virtual client (Ray)

    [config]               # flat run-config keys, as for `fedlora simulate -c`
    num-server-rounds = 3

A *sweep* adds ``[grid]``: run-config keys mapped to lists of values. Cells
are the cartesian product, run one after another with
:func:`fedlora.simulations.engine.simulate`, each into ``<sweep-dir>/<cell>``
where ``<cell>`` encodes its grid values (``strategy=fedavg__dirichlet-alpha=0.1``).
``comparison.csv`` (one row per cell) and ``comparison.png`` (accuracy per
round, one line per cell) are rewritten after every cell, so a sweep cut
short still leaves its comparison so far.

Flower has no notion of a sweep; this module adds the grid, the up-front
validation of every cell (an unknown key or strategy fails before any
compute is spent, not in cell 7) and the comparison.
"""

from __future__ import annotations

import csv
import difflib
import io
import itertools
import json
import logging
import re
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedlora.config import DEFAULTS
from fedlora.errors import ConfigError
from fedlora.io import atomic_write_json, atomic_write_text
from fedlora.rundir import COMPARISON_CSV, SWEEP_JSON

log = logging.getLogger("fedlora.simulation")

_EXPERIMENT_KEYS = {"name", "num-clients", "num-cpus", "num-gpus"}
# The sweep sets each cell's run-dir itself; a user value would send every cell to one folder.
_SWEEP_OWNED = {"run-dir"}


@dataclass(frozen=True)
class Cell:
    """One point of the grid: its folder name and its run-config values."""

    name: str
    values: dict[str, Any]


@dataclass(frozen=True)
class Sweep:
    """An experiment (no grid: one cell) or a grid of them, validated at construction."""

    name: str
    num_clients: int = 10
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    config: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, list[Any]] = field(default_factory=dict)
    source: str = "<sweep>"

    def __post_init__(self) -> None:
        if not self.name or not re.fullmatch(r"[\w.=-]+", self.name):
            raise ConfigError(
                f"{self.source}: [experiment] name {self.name!r} must be a non-empty "
                "folder name of letters, digits, '-', '_' or '.'"
            )
        for key in [*self.config, *self.grid]:
            if key in _SWEEP_OWNED:
                raise ConfigError(
                    f"{self.source}: '{key}' is set per cell by the sweep; remove it and "
                    "choose the output folder with `fedlora sweep FILE --out DIR`"
                )
        if self.num_clients < 1:
            raise ConfigError(f"{self.source}: num-clients is {self.num_clients}; use >= 1")
        for table, keys in (("config", list(self.config)), ("grid", list(self.grid))):
            for key in keys:
                if key not in DEFAULTS:
                    raise ConfigError(
                        f"{self.source}: [{table}] has unknown config key '{key}'"
                        f"{_hint(key)}; known keys: {', '.join(sorted(DEFAULTS))}"
                    )
        for key, values in self.grid.items():
            if not isinstance(values, list) or not values:
                raise ConfigError(
                    f"{self.source}: [grid] {key} = {values!r} must be a non-empty list, "
                    f"e.g. {key} = [{json.dumps(DEFAULTS[key])}]"
                )
        names = [cell.name for cell in self.cells()]
        if len(set(names)) != len(names):
            raise ConfigError(
                f"{self.source}: two grid cells map to the same folder name; "
                "make the grid values distinct"
            )

    def cells(self) -> list[Cell]:
        """The grid's cells in file order (last key varies fastest)."""
        if not self.grid:
            return [Cell(self.name, {})]
        keys = list(self.grid)
        combos = itertools.product(*(self.grid[k] for k in keys))
        values = [dict(zip(keys, combo, strict=True)) for combo in combos]
        return [Cell(cell_name(v), v) for v in values]

    def overrides(self, cell: Cell, run_dir: Path) -> dict[str, Any]:
        """A cell's full run-config overrides: [config], then its grid values."""
        return {**self.config, **cell.values, "run-dir": str(run_dir)}

    def validate(self, out: Path) -> None:
        """Check every cell's config (and strategy) before anything runs."""
        from fedlora.simulations.engine import Resources, resolve_config
        from fedlora.strategies.registry import build_strategy

        Resources(self.num_cpus, self.num_gpus)
        flwr_log = logging.getLogger("flwr")
        level = flwr_log.level
        for cell in self.cells():
            flwr_log.setLevel(logging.ERROR)  # a trial build need not warn once per cell
            try:
                cfg = resolve_config(self.overrides(cell, out / cell.name))
                build_strategy(cfg.strategy, cfg.strategy_options, cfg.fraction_evaluate)
            except ConfigError as exc:
                raise ConfigError(f"{self.source}, cell {cell.name}: {exc}") from None
            finally:
                flwr_log.setLevel(level)
            if cfg.min_train_nodes > self.num_clients:
                raise ConfigError(
                    f"{self.source}, cell {cell.name}: min-train-nodes={cfg.min_train_nodes} "
                    f"exceeds num-clients={self.num_clients}"
                )


def _hint(key: str) -> str:
    if key in _EXPERIMENT_KEYS:
        return " (it is an [experiment] key)"
    close = difflib.get_close_matches(key.replace("_", "-"), list(DEFAULTS), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def cell_name(values: dict[str, Any]) -> str:
    """``key=value`` pairs joined by ``__``, made safe as one folder name."""
    parts = []
    for key, value in values.items():
        text = json.dumps(value) if not isinstance(value, str) else value
        parts.append(f"{key}={re.sub(r'[^A-Za-z0-9._+-]+', '_', text).strip('_') or '_'}")
    return "__".join(parts)


def load_sweep(path: str | Path) -> Sweep:
    """Parse an experiment or sweep TOML file (format in the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file {path} does not exist")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    unknown_tables = set(data) - {"experiment", "config", "grid"}
    if unknown_tables:
        raise ConfigError(
            f"{path}: unknown table(s) {', '.join(sorted(unknown_tables))}; "
            "allowed: [experiment], [config], [grid]"
        )
    exp = dict(data.get("experiment", {}))
    unknown = set(exp) - _EXPERIMENT_KEYS
    if unknown:
        raise ConfigError(
            f"{path}: unknown [experiment] key(s) {', '.join(sorted(unknown))}; "
            f"allowed: {', '.join(sorted(_EXPERIMENT_KEYS))} (run-config keys go in [config])"
        )
    try:
        num_clients = int(exp.get("num-clients", 10))
        num_cpus = float(exp.get("num-cpus", 1.0))
        num_gpus = float(exp.get("num-gpus", 0.0))
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"{path}: [experiment] num-clients must be an integer and num-cpus/num-gpus "
            f"numbers ({exc})"
        ) from None
    return Sweep(
        name=str(exp.get("name", path.stem)),
        num_clients=num_clients,
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        config=dict(data.get("config", {})),
        grid=dict(data.get("grid", {})),
        source=str(path),
    )


# ---------------------------------------------------------------- comparison
def cell_summary(run_dir: Path) -> dict[str, Any]:
    """Final/best accuracy, final loss, total bytes and final ε of one cell's run."""
    from fedlora.simulations.plots import load_rounds

    rounds = load_rounds(run_dir) if (run_dir / "metrics.json").is_file() else []
    trained = [r for r in rounds if int(r["round"]) > 0]
    accs = [r["global_accuracy"] for r in trained if r.get("global_accuracy") is not None]
    last = rounds[-1] if rounds else {}
    out: dict[str, Any] = {
        "rounds_completed": int(last.get("round", 0)),
        "final_accuracy": last.get("global_accuracy") if trained else None,
        "best_accuracy": max(accs) if accs else None,
        "final_loss": last.get("global_loss") if trained else None,
        "total_bytes": int(sum(r.get("bytes_uploaded") or 0 for r in rounds)),
    }
    for key, value in sorted((last.get("extra") or {}).items()):
        if key.startswith("epsilon"):
            out[f"final_{key}"] = value
    return out


def write_comparison(sweep: Sweep, out: Path, rows: list[dict[str, Any]]) -> list[Path]:
    """Rewrite ``comparison.csv`` and ``comparison.png`` from the cells run so far."""
    from fedlora.simulations.plots import comparison_spec, load_rounds, save_png

    columns = ["cell", *sweep.grid]
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None else row[k] for k in columns})
    written = [atomic_write_text(out / COMPARISON_CSV, buffer.getvalue())]
    curves = [
        (row["cell"], load_rounds(out / row["cell"]))
        for row in rows
        if (out / row["cell"] / "metrics.json").is_file()
    ]
    written.append(save_png(comparison_spec(curves), out))
    return written


def run_sweep(
    sweep: Sweep,
    out: str | Path,
    verbose: bool = False,
    on_cell: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Run every cell in order into ``out/<cell>``; returns one comparison row per cell.

    A failed or stopped cell is recorded and the sweep goes on: one bad
    combination (say Krum with too few clients) should not cost the others.
    """
    from fedlora.simulations.engine import Resources, simulate

    out = Path(out).resolve()
    sweep.validate(out)
    cells = sweep.cells()
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(
        out / SWEEP_JSON,
        {
            "name": sweep.name,
            "source": sweep.source,
            "num-clients": sweep.num_clients,
            "num-cpus": sweep.num_cpus,
            "num-gpus": sweep.num_gpus,
            "config": sweep.config,
            "grid": sweep.grid,
            "cells": [c.name for c in cells],
        },
    )
    rows: list[dict[str, Any]] = []
    resources = Resources(sweep.num_cpus, sweep.num_gpus)
    for index, cell in enumerate(cells, start=1):
        log.debug("sweep %s: cell %d/%d %s", sweep.name, index, len(cells), cell.name)
        run_dir = out / cell.name
        start = time.perf_counter()
        status = simulate(sweep.overrides(cell, run_dir), sweep.num_clients, resources, verbose)
        row: dict[str, Any] = {
            "cell": cell.name,
            **cell.values,
            **cell_summary(run_dir),
            "wall_seconds": round(time.perf_counter() - start, 2),
            "status": status.get("status"),
            "reason": status.get("reason", ""),
        }
        rows.append(row)
        write_comparison(sweep, out, rows)
        if on_cell is not None:
            on_cell(row)
    return rows


def comparison_table(rows: list[dict[str, Any]]) -> str:
    """The comparison as terminal text."""
    header = f"{'cell':<44} {'final acc':>9} {'best acc':>9} {'MB up':>8} {'s':>7}  status"
    lines = [header, "-" * len(header)]
    for row in rows:
        final, best = row.get("final_accuracy"), row.get("best_accuracy")
        lines.append(
            f"{row['cell'][:44]:<44} "
            f"{'' if final is None else f'{final:.4f}':>9} "
            f"{'' if best is None else f'{best:.4f}':>9} "
            f"{row['total_bytes'] / 1e6:>8.3f} {row['wall_seconds']:>7.1f}  {row['status']}"
        )
    return "\n".join(lines)
