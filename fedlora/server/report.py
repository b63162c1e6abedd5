"""What a run records for its readers: round rows, per-client rows, privacy metadata.

The round loop hands one :class:`~fedlora.server.loop.RoundOutcome` per
round; these turn it into the history row (``metrics.json``), the
per-client rows (``clients.json``, for spread plots) and, at export, the
adapter's ``differential_privacy`` metadata.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedlora.config import RunConfig
from fedlora.io import atomic_write_json
from fedlora.privacy.central import central_epsilon
from fedlora.protocol import (
    METRIC_ACCURACY,
    METRIC_LOSS,
    METRIC_NUM_EXAMPLES,
)
from fedlora.rundir import (
    CLIENTS_JSON,
)
from fedlora.server.exchange import reply_metrics
from fedlora.server.history import RoundRecord, RunHistory
from fedlora.server.loop import (
    RoundOutcome,
)


class ClientLog:
    """Per-client metrics of every round in ``clients.json`` (for spread plots).

    Format: a JSON list of ``{"round", "site", "accuracy", "loss",
    "num_examples", ...}`` rows, one per client reply, including ``epsilon``
    when local DP is on.
    """

    def __init__(self, run_dir: Path, keep_until: int = 0):
        self.path = run_dir / CLIENTS_JSON
        old = json.loads(self.path.read_text()) if keep_until and self.path.is_file() else []
        self.rows: list[dict[str, Any]] = [r for r in old if r["round"] <= keep_until]

    def add(self, outcome: RoundOutcome) -> dict[str, float]:
        """Append this round's rows; returns summary metrics (ε max/mean)."""
        epsilons = []
        for site, msg in zip(outcome.reply_sites, outcome.replies, strict=True):
            m = reply_metrics(msg)
            row = {"round": outcome.server_round, "site": site, **m}
            row["num_examples"] = row.pop(METRIC_NUM_EXAMPLES, 0)
            self.rows.append(row)
            if "epsilon" in m:
                epsilons.append(m["epsilon"])
        atomic_write_json(self.path, self.rows)
        if not epsilons:
            return {}
        return {"epsilon-max": max(epsilons), "epsilon-mean": sum(epsilons) / len(epsilons)}


def dp_metadata(cfg: RunConfig, history: RunHistory, strategy: Any) -> dict[str, Any]:
    """What an adapter's reader needs to know about its privacy."""
    p = cfg.privacy
    if p.dp_mode == "none":
        return {"mechanism": "none"}
    eps = [r.extra for r in history.records if r.extra]
    if p.dp_mode == "local":
        return {
            "mechanism": "local DP-SGD (Opacus), per-example clipping at each node",
            "max_grad_norm": p.dp_max_grad_norm,
            "noise_multiplier": p.dp_noise_multiplier or "derived from target epsilon",
            "target_epsilon_per_client": p.dp_target_epsilon or None,
            "accountant": p.dp_accountant,
            # Logit adjustment releases noisy label counts each round (accounted).
            "label_count_noise": p.dp_label_noise if cfg.train.logit_adjustment > 0 else None,
            "delta": "set by each node (node config)",
            "epsilon_spent_max_over_clients": max(
                (e.get("epsilon-max", 0.0) for e in eps), default=None
            ),
        }
    return {
        "mechanism": f"central user-level DP ({p.dp_mode}, Flower DP wrapper)",
        "clipping_norm": p.dp_max_grad_norm,
        "noise_multiplier": p.dp_noise_multiplier,
        "delta": p.dp_delta,
        "epsilon_user_level": central_epsilon(strategy),
        "accounting": "RDP, no sampling amplification"
        if p.dp_mode.endswith("fixed")
        else "not accounted (adaptive clipping)",
    }


def global_extras(g: dict[str, float]) -> dict[str, float]:
    """The server's metrics beyond loss and accuracy (a causal LM's perplexity, choice,
    exact-match, ROUGE-L), as ``global_<name>`` history columns."""
    return {
        f"global_{k.replace('-', '_')}": v
        for k, v in g.items()
        if k not in (METRIC_LOSS, METRIC_ACCURACY)
    }


def round_record(outcome: RoundOutcome) -> RoundRecord:
    """The history row of a round."""
    g, t, e = outcome.global_metrics, outcome.train_metrics, outcome.eval_metrics
    extra = {k: v for k, v in t.items() if k not in (METRIC_LOSS, METRIC_ACCURACY)}
    extra.update(global_extras(g))
    return RoundRecord(
        round=outcome.server_round,
        global_loss=g.get(METRIC_LOSS),
        global_accuracy=g.get(METRIC_ACCURACY),
        train_loss=t.get(METRIC_LOSS),
        train_accuracy=t.get(METRIC_ACCURACY),
        federated_loss=e.get(METRIC_LOSS),
        federated_accuracy=e.get(METRIC_ACCURACY),
        clients_sampled=outcome.sampled,
        clients_ok=outcome.ok,
        clients_failed=len(outcome.failures),
        bytes_uploaded=outcome.bytes_uploaded,
        seconds=round(outcome.seconds, 3),
        extra=extra,
        failures=outcome.failures,
    )
