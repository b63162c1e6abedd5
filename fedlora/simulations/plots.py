"""PNG plots of a run directory, so a researcher can look at a run, not parse it.

Reads ``metrics.json`` (written every round by :mod:`fedlora.server.history`)
and, when present, ``clients.json``; writes PNGs next to them:

* ``accuracy.png`` — global accuracy per round (plus the clients' train and
  federated-evaluation accuracy where recorded);
* ``loss.png`` — the same for loss;
* ``generation.png`` and ``perplexity.png`` — a causal LM's answer scores
  (multiple choice, exact match, ROUGE-L) and response perplexity per round;
  skipped for a classifier;
* ``epsilon.png`` — every ``epsilon*`` key found in a round's ``extra``
  (differential privacy spend); skipped when the run has none;
* ``clients.png`` — per-client accuracy spread per round (each client a dot,
  min–max band, median line); skipped without ``clients.json``;
* ``bytes.png`` — bytes uploaded per round (MB);
* ``partitions.png`` — each simulated client's label shares (stacked bars,
  example counts in the tick labels), from ``partitions.json`` (written by
  :func:`fedlora.simulations.engine.write_partitions`); skipped without it.

``clients.json`` format (written by the server; optional)::

    [
      {"round": 1, "site": "partition-000003", "accuracy": 0.71,
       "loss": 0.83, "num_examples": 120},
      ...
    ]

one object per client reply per round (the server's ``ClientLog`` writes it).
``round``, ``site`` and ``accuracy`` are required for the spread plot; ``loss``
and ``num_examples`` may be null. Any other reply metric rides along under its
wire name: ``train-time-s`` (seconds of local training, which
``bench/sim_scale.py`` sums into client compute), ``bytes-sent``, ``epsilon``
(local DP). A top-level ``{"clients": [...]}`` object is accepted too.

What this adds to matplotlib: the plot *data* is computed by pure functions
(:func:`plot_specs`, :func:`comparison_spec`) apart from the drawing
(:func:`render`), so tests check the exact points drawn and the PNGs
separately. Drawing uses the object-oriented API on an Agg canvas, never
``pyplot``, so no global figure state or GUI backend is touched (this runs in
the same process as a Ray driver and in headless CI).
"""

from __future__ import annotations

import io
import json
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fedlora.errors import DataError
from fedlora.io import atomic_write_bytes
from fedlora.rundir import CLIENTS_JSON, COMPARISON_PNG, METRICS_JSON, PARTITIONS_JSON, PLOT_FILES


@dataclass(frozen=True)
class Series:
    """One drawn series: a line, scatter or bar set, with its points."""

    label: str
    x: tuple[float, ...]
    y: tuple[float, ...]
    kind: Literal["line", "scatter", "bar", "band", "stack"] = "line"
    y2: tuple[float, ...] = ()  # upper edge of a band (``y`` is the lower edge)


@dataclass(frozen=True)
class PlotSpec:
    """Everything needed to draw one PNG; pure data, comparable in tests."""

    filename: str
    title: str
    ylabel: str
    series: tuple[Series, ...] = field(default_factory=tuple)
    xlabel: str = "round"
    xticklabels: tuple[str, ...] = ()  # one per x position 0..n-1 (default: numbers)


# ---------------------------------------------------------------- reading
def load_rounds(run_dir: str | Path) -> list[dict[str, Any]]:
    """The ``rounds`` list of ``metrics.json``, ordered by round."""
    path = Path(run_dir) / METRICS_JSON
    if not path.is_file():
        raise DataError(
            f"{path} does not exist; is {run_dir} a run directory (e.g. runs/latest)? "
            "A run writes metrics.json after its first round"
        )
    try:
        rounds = json.loads(path.read_text())["rounds"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise DataError(f"{path} is not a fedlora metrics file ({exc})") from None
    return sorted(rounds, key=lambda r: int(r["round"]))


def load_clients(run_dir: str | Path) -> list[dict[str, Any]] | None:
    """Per-client rows of ``clients.json`` (format in the module docstring), or None."""
    path = Path(run_dir) / CLIENTS_JSON
    if not path.is_file():
        return None
    data = _read_json(path)
    rows = data.get("clients") if isinstance(data, dict) else data
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise DataError(f"{path} must be a JSON list of objects with round, site, accuracy")
    return rows


def _read_json(path: Path) -> Any:
    """The parsed file; a file that is not JSON is a DataError naming it."""
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is not valid JSON ({exc})") from None


def load_partitions(run_dir: str | Path) -> list[dict[str, Any]] | None:
    """Rows of ``partitions.json`` (``partition``, ``examples``, ``labels``), or None."""
    path = Path(run_dir) / PARTITIONS_JSON
    if not path.is_file():
        return None
    rows = _read_json(path)
    if not isinstance(rows, list) or not all(
        isinstance(r, dict) and isinstance(r.get("labels"), dict) for r in rows
    ):
        raise DataError(f"{path} must be a JSON list of objects with partition, examples, labels")
    return rows


# ---------------------------------------------------------------- plot data
def _series(rounds: Sequence[dict[str, Any]], key: str, label: str) -> Series | None:
    points = [(r["round"], r[key]) for r in rounds if r.get(key) is not None]
    if not points:
        return None
    return Series(label, tuple(float(x) for x, _ in points), tuple(float(y) for _, y in points))


def _metric_spec(rounds: Sequence[dict[str, Any]], metric: str) -> PlotSpec:
    candidates = (
        _series(rounds, f"global_{metric}", f"global (server test split) {metric}"),
        _series(rounds, f"train_{metric}", f"clients' train {metric} (weighted mean)"),
        _series(rounds, f"federated_{metric}", f"federated evaluation {metric}"),
    )
    return PlotSpec(
        filename=f"{metric}.png",
        title=f"{metric.capitalize()} per round",
        ylabel=metric,
        series=tuple(s for s in candidates if s is not None),
    )


def _extra_series(rounds: Sequence[dict[str, Any]], keys: Sequence[str]) -> list[Series]:
    """One line per ``extra`` key that some round has, in ``keys``' order."""
    series = []
    for key in keys:
        points = [
            (r["round"], r["extra"][key])
            for r in rounds
            if isinstance(r.get("extra"), dict) and r["extra"].get(key) is not None
        ]
        if points:
            series.append(
                Series(key, tuple(float(x) for x, _ in points), tuple(float(y) for _, y in points))
            )
    return series


def _epsilon_spec(rounds: Sequence[dict[str, Any]]) -> PlotSpec | None:
    keys = sorted({k for r in rounds for k in (r.get("extra") or {}) if k.startswith("epsilon")})
    series = _extra_series(rounds, keys)
    if not series:
        return None
    return PlotSpec("epsilon.png", "Privacy spent (ε) per round", "ε", tuple(series))


#: A causal LM's scores in [0, 1] (server's held-out split), as history names them.
GENERATIVE_SCORES = ("global_choice", "global_exact_match", "global_rouge_l")


def _generative_specs(rounds: Sequence[dict[str, Any]]) -> list[PlotSpec]:
    """Causal-LM runs: the answer scores on one plot, response perplexity on another."""
    specs = []
    scores = _extra_series(rounds, GENERATIVE_SCORES)
    if scores:
        specs.append(
            PlotSpec(
                "generation.png",
                "Answer quality per round (server test split)",
                "score",
                tuple(scores),
            )
        )
    perplexity = _extra_series(rounds, ("global_perplexity",))
    if perplexity:
        specs.append(
            PlotSpec(
                "perplexity.png",
                "Response perplexity per round (server test split)",
                "perplexity",
                tuple(perplexity),
            )
        )
    return specs


def _clients_spec(clients: Sequence[dict[str, Any]]) -> PlotSpec | None:
    by_round: dict[int, list[float]] = {}
    for row in clients:
        if row.get("accuracy") is not None and row.get("round") is not None:
            by_round.setdefault(int(row["round"]), []).append(float(row["accuracy"]))
    if not by_round:
        return None
    order = sorted(by_round)
    dots_x = tuple(float(r) for r in order for _ in by_round[r])
    dots_y = tuple(a for r in order for a in by_round[r])
    xs = tuple(float(r) for r in order)
    return PlotSpec(
        filename="clients.png",
        title="Per-client accuracy spread per round",
        ylabel="client accuracy",
        series=(
            Series(
                "min–max",
                xs,
                tuple(min(by_round[r]) for r in order),
                "band",
                tuple(max(by_round[r]) for r in order),
            ),
            Series("one client", dots_x, dots_y, "scatter"),
            Series("median", xs, tuple(statistics.median(by_round[r]) for r in order)),
        ),
    )


def _bytes_spec(rounds: Sequence[dict[str, Any]]) -> PlotSpec:
    trained = [r for r in rounds if int(r["round"]) > 0]
    sizes = [float(r.get("bytes_uploaded") or 0) for r in trained]
    # A tiny test model uploads kilobytes, MiniLM megabytes: pick a unit that reads well.
    unit, scale = next(
        ((u, f) for u, f in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)) if max(sizes, default=0) >= f),
        ("bytes", 1.0),
    )
    return PlotSpec(
        filename="bytes.png",
        title="Bytes uploaded per round (all clients)",
        ylabel=f"{unit} uploaded",
        series=(
            Series(
                "uploaded",
                tuple(float(r["round"]) for r in trained),
                tuple(b / scale for b in sizes),
                "bar",
            ),
        ),
    )


def partitions_spec(partitions: Sequence[dict[str, Any]]) -> PlotSpec:
    """Label shares per client: one stacked series per label, x = partition."""
    rows = sorted(partitions, key=lambda r: int(r["partition"]))
    names = list(dict.fromkeys(name for r in rows for name in r["labels"]))
    x = tuple(float(i) for i in range(len(rows)))
    series = []
    for name in names:
        shares = tuple(
            r["labels"].get(name, 0) / r["examples"] if r["examples"] else 0.0 for r in rows
        )
        series.append(Series(str(name), x, shares, "stack"))
    ticks = tuple(f"{int(r['partition'])}\n{int(r['examples'])}" for r in rows)
    return PlotSpec(
        "partitions.png",
        "Label shares per client (tick: client, examples)",
        "share of the client's examples",
        tuple(series),
        xlabel="client",
        xticklabels=ticks,
    )


def plot_specs(
    rounds: Sequence[dict[str, Any]],
    clients: Sequence[dict[str, Any]] | None = None,
    partitions: Sequence[dict[str, Any]] | None = None,
) -> list[PlotSpec]:
    """The plots a run supports, as data (no drawing); plots without data are left out."""
    specs = [_metric_spec(rounds, "accuracy"), _metric_spec(rounds, "loss")]
    specs.extend(_generative_specs(rounds))
    optional = (_epsilon_spec(rounds), _clients_spec(clients) if clients else None)
    specs.extend(s for s in optional if s is not None)
    specs.append(_bytes_spec(rounds))
    if partitions:
        specs.append(partitions_spec(partitions))
    return [s for s in specs if s.series]


def comparison_spec(cells: Sequence[tuple[str, Sequence[dict[str, Any]]]]) -> PlotSpec:
    """Global accuracy per round, one line per sweep cell (``(name, rounds)`` pairs)."""
    lines = []
    for name, rounds in cells:
        series = _series(rounds, "global_accuracy", name)
        if series is not None:
            lines.append(series)
    title = "Global accuracy per round, by sweep cell"
    return PlotSpec(COMPARISON_PNG, title, "accuracy", tuple(lines))


# ---------------------------------------------------------------- drawing
def render(spec: PlotSpec) -> Any:
    """A matplotlib ``Figure`` drawing ``spec`` on an Agg canvas (not yet saved)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(7.0, 4.2), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    stacked: list[float] = []
    for s in spec.series:
        if s.kind == "stack":
            stacked = stacked or [0.0] * len(s.y)
            ax.bar(s.x, s.y, width=0.8, bottom=stacked, label=s.label)
            stacked = [b + y for b, y in zip(stacked, s.y, strict=True)]
        elif s.kind == "bar":
            ax.bar(s.x, s.y, width=0.6, label=s.label, color="tab:blue")
        elif s.kind == "scatter":
            ax.scatter(s.x, s.y, s=12, alpha=0.5, color="tab:gray", label=s.label)
        elif s.kind == "band":
            ax.fill_between(s.x, s.y, s.y2, alpha=0.2, color="tab:orange", label=s.label)
        else:
            ax.plot(s.x, s.y, marker="o", markersize=3, label=s.label)
    ax.set_title(spec.title)
    ax.set_xlabel(spec.xlabel)
    ax.set_ylabel(spec.ylabel)
    if spec.xticklabels:
        ax.set_xticks(range(len(spec.xticklabels)), spec.xticklabels, fontsize="x-small")
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers
    ax.grid(True, alpha=0.3)
    if len(spec.series) > 1:
        # Many sweep cells would cover the plot; put their legend underneath.
        many = len(spec.series) > 6
        ax.legend(
            fontsize="small",
            loc="upper center" if many else "best",
            bbox_to_anchor=(0.5, -0.18) if many else None,
            ncol=2 if many else 1,
        )
    return fig


def save_png(spec: PlotSpec, folder: str | Path) -> Path:
    """Draw ``spec`` and write it to ``folder/spec.filename`` atomically."""
    buffer = io.BytesIO()
    render(spec).savefig(buffer, format="png")
    return atomic_write_bytes(Path(folder) / spec.filename, buffer.getvalue())


def write_plots(run_dir: str | Path) -> list[Path]:
    """Write the run's PNGs (see module docstring); returns the paths written.

    A plot this run has no data for is removed if an earlier report left one,
    so the folder never shows a stale picture next to fresh metrics.
    """
    run_dir = Path(run_dir)
    specs = plot_specs(load_rounds(run_dir), load_clients(run_dir), load_partitions(run_dir))
    written = [save_png(spec, run_dir) for spec in specs]
    for name in set(PLOT_FILES) - {spec.filename for spec in specs}:
        (run_dir / name).unlink(missing_ok=True)
    return written
