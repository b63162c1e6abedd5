"""Audit a simulation's exported classifier: membership inference against the ledger's ε.

Why: the ledger's ε is a proof about the mechanism; this is evidence about
the released adapter. Members are training examples of the audited sites
(the simulation's partitions, the rows each site drew); non-members are the
server's held-out examples, never trained on; both balanced and shuffled
with the run's seed. Two attacks score each example:

* ``loss``: the lower the adapter's loss, the likelier a member (Yeom et al.
  2018, "Privacy risk in machine learning");
* ``calibrated``: the loss drop from the run's initial adapter (rebuilt from
  the seed, never trained on anything) to the exported one, which removes
  each example's own difficulty (Watson et al. 2022, "On the importance of
  difficulty calibration in membership inference attacks").

Each attack's AUC, TPR at 1 % and 0.1 % FPR, and an ε lower bound with 95 %
confidence (:mod:`fedlora.privacy.audit_bound`) go to ``audit.json`` beside
the accounted ε (the largest any audited site's ledger reports) and
``audit_roc.png``. A lower bound above the accounted ε fails the audit.

A causal LM is audited by its canaries instead (:mod:`fedlora.simulations.canaries`:
exposure, extraction, and the same two attacks and bound on planted against
held-out canaries; ``audit_canaries.png``). What it cannot audit: a
deployment's run (its members are the sites' private data, which the run
directory does not hold), refused with the reason. The server's held-out
split also chose the exported round, a mild selection on the non-members
that can only make members look *less* special.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fedlora.config import RunConfig
from fedlora.errors import ConfigError, DataError
from fedlora.privacy.audit_bound import audit_threshold, roc_auc, tpr_at_fpr
from fedlora.protocol import partition_of_site_key
from fedlora.rundir import simulated_sites

AUDIT_JSON = "audit.json"
AUDIT_ROC = "audit_roc.png"
AUDIT_EXPOSURE = "audit_canaries.png"
#: Fewest members (and non-members) an audit runs on: below it a 95 % bound
#: cannot exceed ~1 even for a perfect attack, so the number would mislead.
MIN_MEMBERS = 20


def run_config_of(run_dir: Path) -> RunConfig:
    """The run's resolved config (``config.json``), or a clear error."""
    from fedlora.rundir import CONFIG_FILE

    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise DataError(f"{run_dir} has no {CONFIG_FILE}: not a fedlora run directory")
    return RunConfig.from_flat(json.loads(path.read_text()))


def members_and_non_members(
    cfg: RunConfig, run_dir: Path, sites: Sequence[int] | None, limit: int
) -> tuple[Any, Any, list[int], list[int]]:
    """(members, non-members, audited sites, each member's site), balanced,
    shuffled by the run's seed."""
    from fedlora.client.prepare import round_subset
    from fedlora.data.partition import client_partition, simulation_split

    count = simulated_sites(run_dir)
    chosen = list(sites) if sites else list(range(count))
    if any(not 0 <= s < count for s in chosen):
        raise ConfigError(f"--sites {chosen}: this run has sites 0..{count - 1}")
    rows: dict[str, int] = {}
    owner: dict[str, int] = {}
    texts = []
    for site in chosen:
        data = client_partition(cfg.data, cfg.seed, site, count)
        for rnd in range(1, cfg.num_server_rounds + 1):  # the rows the site drew
            drawn = round_subset(data, cfg.train.max_train_examples, cfg.seed, rnd, site)
            for text, label in zip(drawn.texts, drawn.label_ids, strict=True):
                if text not in rows:
                    rows[text], owner[text] = label, site
                    texts.append(text)
    _, held_out = simulation_split(cfg.data, cfg.seed)
    outside = [
        (t, y) for t, y in zip(held_out.texts, held_out.label_ids, strict=True) if t not in rows
    ]
    inside = [(t, rows[t]) for t in texts]
    rng = random.Random(cfg.seed)
    rng.shuffle(inside)
    rng.shuffle(outside)
    n = min(len(inside), len(outside), limit)
    if n < MIN_MEMBERS:
        raise DataError(
            f"only {n} members and non-members can be balanced (sites {chosen}: "
            f"{len(inside)} trained rows; {len(outside)} held out); an audit needs at least "
            f"{MIN_MEMBERS} of each for a bound that means anything"
        )

    def as_data(rows: list[tuple[str, int]], what: str) -> Any:
        return dataclasses.replace(
            held_out,
            texts=tuple(t for t, _ in rows),
            label_ids=tuple(y for _, y in rows),
            source=f"audit {what}",
            groups=(),
            responses=(),
            contexts=(),
        )

    members = as_data(inside[:n], "members")
    return members, as_data(outside[:n], "non-members"), chosen, [owner[t] for t in members.texts]


def losses(model: Any, tokenizer: Any, data: Any, max_len: int) -> list[float]:
    """Each example's cross-entropy under ``model`` (eval mode, batches of 32)."""
    import torch

    from fedlora.models.batches import encode, make_loader, to_device

    out: list[float] = []
    model.eval()
    with torch.no_grad():
        for batch in make_loader(encode(tokenizer, data, max_len), 32, False, None):
            batch = to_device(batch, model)
            mask = batch["attention_mask"]
            logits = model(input_ids=batch["input_ids"], attention_mask=mask).logits
            loss = torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="none")
            out.extend(float(v) for v in loss)
    return out


def attack(members: Sequence[float], non_members: Sequence[float], delta: float) -> dict[str, Any]:
    """AUC, TPR at low FPR and the ε lower bound of one attack's scores (higher = member)."""
    bound = audit_threshold(list(members), list(non_members), delta)
    return {
        "auc": roc_auc(members, non_members),
        "tpr_at_fpr_1pct": tpr_at_fpr(members, non_members, 0.01),
        "tpr_at_fpr_0.1pct": tpr_at_fpr(members, non_members, 0.001),
        "epsilon_lower_95": bound.epsilon_lower_95,
        "epsilon_point": bound.epsilon_point,
        "bound": {
            "threshold": bound.threshold,
            "members": bound.members,
            "non_members": bound.non_members,
            "false_positives": bound.false_positives,
            "false_negatives": bound.false_negatives,
        },
    }


def accounted_epsilon(run_dir: Path) -> float:
    """The largest ε any client reported (the ledgers' totals); inf without DP."""
    from fedlora.rundir import METRICS_JSON

    rounds = json.loads((run_dir / METRICS_JSON).read_text()).get("rounds", [])
    spent = [r.get("extra", {}).get("epsilon-max") for r in rounds]
    values = [float(v) for v in spent if isinstance(v, (int, float))]
    return max(values) if values else math.inf


def site_epsilons(run_dir: Path) -> dict[int, float]:
    """Each simulated site's ε as its own ledger reported it (``clients.json``:
    the largest, i.e. the latest cumulative, value per simulated site key)."""
    from fedlora.rundir import CLIENTS_JSON

    path = run_dir / CLIENTS_JSON
    rows = json.loads(path.read_text()) if path.is_file() else []
    out: dict[int, float] = {}
    for row in rows if isinstance(rows, list) else []:
        name, eps = row.get("site"), row.get("epsilon")
        site = partition_of_site_key(name) if isinstance(name, str) else None
        if site is not None and isinstance(eps, (int, float)):
            out[site] = max(out.get(site, 0.0), float(eps))
    return out


def site_verdict(
    site: int,
    owners: Sequence[int],
    scores: dict[str, tuple[list[float], list[float]]],
    delta: float,
    accounted: float,
) -> dict[str, Any]:
    """One site's bound (its members against as many non-members) beside its own ε."""
    picked = [i for i, s in enumerate(owners) if s == site]
    row: dict[str, Any] = {
        "site": site,
        "members": len(picked),
        "epsilon_accounted": accounted if math.isfinite(accounted) else None,
    }
    if len(picked) < MIN_MEMBERS:
        row["skipped"] = f"{len(picked)} members, fewer than {MIN_MEMBERS}: no per-site bound"
        return row
    bounds = [
        audit_threshold([m[i] for i in picked], n[: len(picked)], delta).epsilon_lower_95
        for m, n in scores.values()
    ]
    row["epsilon_lower_95"] = max(bounds)
    row["passed"] = row["epsilon_lower_95"] <= accounted
    return row


def audit_run(
    run_dir: Path,
    sites: Sequence[int] | None = None,
    limit: int = 400,
    progress: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Audit the run's exported adapter; writes ``audit.json`` and the plots."""
    from fedlora.io import atomic_write_json
    from fedlora.models.adapter import exported_folder

    cfg = run_config_of(run_dir)
    adapter = exported_folder(run_dir)
    extra: dict[str, Any] = {}
    if cfg.task == "causal-lm":
        from fedlora.simulations.canaries import audit_language_model

        extra, scores = audit_language_model(run_dir, cfg, progress)
        owners = [r["site"] for r in extra["canaries"]["rows"] if r["site"] >= 0]
    else:
        scores, owners = classifier_scores(cfg, run_dir, adapter, sites, limit, progress)
    chosen = sorted(set(owners))
    delta = cfg.privacy.dp_delta
    attacks = {name: attack(m, n, delta) for name, (m, n) in scores.items()}
    spent = site_epsilons(run_dir)
    per_site = [site_verdict(s, owners, scores, delta, spent.get(s, math.inf)) for s in chosen]
    # the pooled members come from all audited sites: the loosest claim covers them
    accounted = max((spent.get(s, math.inf) for s in chosen), default=math.inf)
    if not spent:  # an older run without per-site ledgers in clients.json
        accounted = accounted_epsilon(run_dir)
    lower = max(a["epsilon_lower_95"] for a in attacks.values())
    failures = [
        f"site {s['site']}: empirical lower bound {s['epsilon_lower_95']:.2f} exceeds its "
        f"accounted ε {s['epsilon_accounted']:.2f}"
        for s in per_site
        if s.get("passed") is False
    ]
    if lower > accounted:
        failures.insert(
            0,
            f"sites {chosen} together: empirical lower bound {lower:.2f} exceeds the "
            f"accounted ε {accounted:.2f}",
        )
    record = {
        "version": 2,
        "task": cfg.task,
        "sites": chosen,
        "members": len(scores["loss"][0]),
        "non_members": len(scores["loss"][1]),
        "delta": delta,
        "epsilon_accounted": accounted if math.isfinite(accounted) else None,
        "epsilon_lower_95": lower,
        "passed": not failures,
        "failures": failures,
        "attacks": attacks,
        "per_site": per_site,
        **extra,
    }
    atomic_write_json(run_dir / AUDIT_JSON, record)
    plot_roc(record, scores, run_dir / AUDIT_ROC)
    if extra:
        from fedlora.simulations.canaries import plot_exposure

        plot_exposure(record, run_dir / AUDIT_EXPOSURE)
    return record


def classifier_scores(
    cfg: RunConfig,
    run_dir: Path,
    adapter: Path,
    sites: Sequence[int] | None,
    limit: int,
    progress: Callable[[str], None],
) -> tuple[dict[str, tuple[list[float], list[float]]], list[int]]:
    """Both attacks' scores (higher = member) on the classifier's members and
    non-members, and each member's site."""
    from fedlora.models.adapter import load_exported
    from fedlora.models.loading import build_model, load_tokenizer
    from fedlora.models.task import get_task

    members, non_members, chosen, owners = members_and_non_members(cfg, run_dir, sites, limit)
    folder = str(get_task(cfg.task).folder(cfg.model_path or None))
    tokenizer = load_tokenizer(folder)
    progress(f"audit: {len(members)} members of sites {chosen}, {len(non_members)} non-members")
    model, labels = load_exported(adapter, cfg.model_path or None)
    if list(labels) != list(members.labels.names):
        raise DataError(
            f"the exported adapter's labels {list(labels)} do not match the run's data labels "
            f"{list(members.labels.names)}: every score would be against the wrong class; "
            "audit the run directory the adapter was trained in (or its labels setting)"
        )
    target = [
        losses(model, tokenizer, rows, cfg.train.max_seq_length) for rows in (members, non_members)
    ]
    progress("audit: scored the exported adapter; scoring the initial one (the reference)")
    initial = build_model(folder, len(labels), cfg.lora, cfg.seed)
    reference = [
        losses(initial, tokenizer, rows, cfg.train.max_seq_length)
        for rows in (members, non_members)
    ]
    scores = {
        "loss": ([-v for v in target[0]], [-v for v in target[1]]),
        "calibrated": (
            [r - t for r, t in zip(reference[0], target[0], strict=True)],
            [r - t for r, t in zip(reference[1], target[1], strict=True)],
        ),
    }
    return scores, owners


def plot_roc(
    record: dict[str, Any], scores: dict[str, tuple[list[float], list[float]]], path: Path
) -> None:
    """ROC curves on log axes (the low-FPR corner is where membership leaks)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    for name, (members, non_members) in scores.items():
        thresholds = sorted(set(members) | set(non_members), reverse=True)
        fpr = [sum(s >= t for s in non_members) / len(non_members) for t in thresholds]
        tpr = [sum(s >= t for s in members) / len(members) for t in thresholds]
        auc = record["attacks"][name]["auc"]
        ax.plot(
            [max(f, 1e-4) for f in fpr],
            [max(t, 1e-4) for t in tpr],
            label=f"{name} (AUC {auc:.3f})",
        )
    ax.plot([1e-4, 1], [1e-4, 1], "k:", label="chance")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    accounted = record["epsilon_accounted"]
    ax.set_title(
        f"ε accounted {accounted if accounted is not None else '∞ (no DP)'} · "
        f"lower bound {record['epsilon_lower_95']:.2f} (95%)",
        fontsize=9,
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def summary_line(record: dict[str, Any]) -> str:
    """``ε accounted X · empirical lower bound Y (95% confidence)``."""
    accounted = record["epsilon_accounted"]
    shown = f"{accounted:.2f}" if accounted is not None else "∞ (no DP)"
    return (
        f"ε accounted {shown} · empirical lower bound {record['epsilon_lower_95']:.2f} "
        "(95% confidence)"
    )
