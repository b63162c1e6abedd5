"""Terminal summaries of a run directory."""

from __future__ import annotations

from pathlib import Path

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
    return "\n".join(lines)
