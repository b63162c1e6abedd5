"""Terminal summaries of a run directory, and the files people look at.

:func:`write_reports` turns a run's ``metrics.json`` into PNG plots
(:mod:`fedlora.simulations.plots`) and TensorBoard events
(:mod:`fedlora.simulations.tensorboard`). ``fedlora simulate`` calls it when a
run ends; ``fedlora report RUN_DIR`` calls it again on demand (e.g. after
the server has written ``clients.json``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedlora.rundir import status_of
from fedlora.server.history import RunHistory


def summary_table(run_dir: str | Path) -> str:
    """Round, global accuracy and loss, clients ok and MB uploaded, as text."""
    history = RunHistory.load(run_dir)
    if not history.records:
        return ""
    header = f"{'round':>5} {'global acc':>10} {'loss':>8} {'clients ok':>10} {'MB up':>8} {'s':>7}"
    lines = [header, "-" * len(header)]
    for r in history.records:
        acc = "" if r.global_accuracy is None else f"{r.global_accuracy:.4f}"
        loss = "" if r.global_loss is None else f"{r.global_loss:.4f}"
        ok = "" if r.round == 0 else f"{r.clients_ok}/{r.clients_sampled}"
        lines.append(
            f"{r.round:>5} {acc:>10} {loss:>8} {ok:>10} "
            f"{r.bytes_uploaded / 1e6:>8.3f} {r.seconds:>7.1f}"
        )
    exported = status_of(run_dir).get("exported_round")
    last = history.records[-1].round
    if exported is not None and exported != last:
        lines.append(
            f"exported adapter: round {exported} (best global accuracy; the last round, "
            f"{last}, was worse)"
        )
    audit = Path(run_dir) / "audit.json"  # fedlora.simulations.audit.AUDIT_JSON
    if audit.is_file():
        import json

        from fedlora.simulations.audit import summary_line

        record = json.loads(audit.read_text())
        verdict = "" if record.get("passed", True) else " · AUDIT FAILED"
        lines.append(f"privacy audit: {summary_line(record)}{verdict}")
    return "\n".join(lines)


def write_reports(run_dir: str | Path) -> dict[str, Any]:
    """Write the run's plots and TensorBoard events; returns what was written.

    Returns ``{"plots": [png paths], "tensorboard": events folder}``.
    """
    from fedlora.simulations.plots import write_plots
    from fedlora.simulations.tensorboard import write_tensorboard

    return {"plots": write_plots(run_dir), "tensorboard": write_tensorboard(run_dir)}
