"""What the console shows of a run directory, as JSON-safe dictionaries.

Why a view and not the files: the page must never show training text, and a
run directory can hold some (an LM audit's canary rows, a sweep's source
path is harmless, a generation sample is not). Every value here is picked
field by field from the files :mod:`fedlora.rundir` names, so a new file or
field a future version writes stays off the page until it is added here.
Reads are tolerant: a run that is still starting, or a file caught half
written by a non-atomic writer, shows as what is there, never as an error.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from fedlora.protocol import partition_site_key, wire_text
from fedlora.rundir import (
    ADAPTER_DIR,
    CLIENTS_JSON,
    COMPARISON_PNG,
    CONFIG_FILE,
    METRICS_JSON,
    PARTITIONS_JSON,
    PLAN_JSON,
    PLOT_FILES,
    STATUS_FILE,
    SWEEP_JSON,
    TENSORBOARD_DIR,
)

# fedlora.simulations.audit.AUDIT_JSON (the console imports no simulation code)
AUDIT_FILE = "audit.json"
AUDIT_PLOTS = ("audit_roc.png", "audit_canaries.png")
PLACEMENT_FILE = "placement.jsonl"  # fedlora.simulations.placement
METADATA_FILE = "fedlora_metadata.json"  # fedlora.models.adapter (torch-free here)
#: The only files the console serves from a run directory: fixed names, so no
#: request path ever reaches the file system.
SERVED_FILES = frozenset((*PLOT_FILES, *AUDIT_PLOTS, COMPARISON_PNG))
#: Files whose change means the page should update.
WATCHED = (STATUS_FILE, METRICS_JSON, CLIENTS_JSON, PARTITIONS_JSON, PLAN_JSON, AUDIT_FILE)
_ROUND_FIELDS = (
    "round",
    "clients_sampled",
    "clients_ok",
    "clients_failed",
    "global_accuracy",
    "global_loss",
    "federated_accuracy",
    "federated_loss",
    "train_accuracy",
    "train_loss",
    "bytes_uploaded",
    "seconds",
)
_SITE = re.compile(r"^(?P<site>[^ ]+) \((?P<rest>.*)$", re.S)


def read_json(path: Path) -> Any:
    """The file's JSON, or None while it is missing or half written."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def is_run(path: Path) -> bool:
    return any((path / name).is_file() for name in (CONFIG_FILE, STATUS_FILE, METRICS_JSON))


def _child_dir(root: Path, name: str) -> bool:
    path = root / name
    return path.is_dir() and not path.is_symlink() and path.resolve().parent == root.resolve()


def discover(roots: list[Path]) -> dict[str, Path]:
    """Name -> run directory for what the console was given: run directories,
    sweeps (each cell a run), or folders of runs. A root that does not exist yet
    is a run still starting. Names are unique and URL-safe."""
    found: dict[str, Path] = {}

    def add(name: str, path: Path) -> None:
        name = re.sub(r"[^A-Za-z0-9._=,+-]+", "_", name) or "run"
        base, n = name, 2
        while name in found and found[name] != path:
            name, n = f"{base}~{n}", n + 1
        found[name] = path

    for root in roots:
        sweep = read_json(root / SWEEP_JSON) if root.is_dir() else None
        if isinstance(sweep, dict):
            for cell in sweep.get("cells", []):
                # a cell is a folder directly inside the sweep, never a path out of it
                if isinstance(cell, str) and _child_dir(root, cell):
                    add(f"{root.name}/{cell}".replace("/", "_"), root / cell)
        elif not root.is_dir() or is_run(root) or not any(root.iterdir()):
            add(root.name, root)
        else:
            for child in sorted(p for p in root.iterdir() if p.is_dir() and is_run(p)):
                add(child.name, child)
    return found


def signature(run_dir: Path) -> tuple[float, ...]:
    """Modification times of the watched files and the plots (drawn after the
    last round): the page updates when it changes."""
    out = []
    for name in (*WATCHED, *sorted(SERVED_FILES), PLACEMENT_FILE):
        try:
            out.append((run_dir / name).stat().st_mtime)
        except OSError:
            out.append(0.0)
    return tuple(out)


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def failure(line: str) -> dict[str, str]:
    """One server failure line as site, kind and a one-line reason.

    The server writes ``<site> (node N): <reason>``; a node's reason starts with
    its exception's name, which says whether it refused (budget, privacy) or its
    input was bad. A simulated worker's reason carries a Ray traceback whose
    last line is the message.
    """
    text = wire_text(line)  # files a hostile node could have put text into
    match = _SITE.match(text)
    site = match.group("site") if match else "?"
    rest = match.group("rest") if match else text
    reason = rest.split("): ", 1)[1] if "): " in rest.split("\n", 1)[0] else rest
    if "Message: " in reason:
        reason = reason.rsplit("Message: ", 1)[1]
    reason = reason.strip()
    if reason.endswith("'>"):  # the end of Ray's wrapped exception repr
        reason = reason[:-2]
    lines = [v.strip() for v in reason.splitlines() if v.strip()]
    short = lines[-1] if len(lines) > 1 and "Traceback" in reason else " ".join(lines)
    kinds = (
        ("PrivacyBudgetExceeded", "refused: budget"),
        ("PrivacyError", "refused: privacy"),
        ("DataError", "bad data"),
        ("ConfigError", "bad config"),
        ("ModelError", "bad model"),
        ("UpdateRejected", "update rejected"),
        ("no reply before timeout", "timeout"),
    )
    kind = next((k for needle, k in kinds if needle in text), "error")
    return {"site": site, "kind": kind, "reason": short[:500]}


def rounds_view(metrics: Any) -> list[dict[str, Any]]:
    """Per-round numbers (and failures) from ``metrics.json``."""
    rows = metrics.get("rounds", []) if isinstance(metrics, dict) else []
    out = []
    for r in rows if isinstance(rows, list) else []:
        if not isinstance(r, dict):
            continue
        row: dict[str, Any] = {k: _number(r.get(k)) for k in _ROUND_FIELDS}
        extra = _dict(r.get("extra"))
        row["epsilon_max"] = _number(extra.get("epsilon-max"))
        row["generation"] = {
            k: v
            for k, raw in extra.items()
            if isinstance(k, str) and k.startswith("global_") and (v := _number(raw)) is not None
        }
        row["failures"] = [failure(f) for f in r.get("failures", []) if isinstance(f, str)]
        out.append(row)
    return out


def sites_view(
    clients: Any, rounds: list[dict[str, Any]], plan: Any, cap: float | None = None
) -> list[dict[str, Any]]:
    """One row per site: its last reply, ε per round and in total against its
    cap, bytes sent, failures with reasons.

    The cap is what the node enforces: a simulation's ``sim-epsilon-cap``
    (``cap``); a deployed site's cap is its own setting, which it does not
    report, so none is shown. The plan's figure is the spend it *predicted*,
    shown beside as "planned", never as a cap.
    """
    sites: dict[str, dict[str, Any]] = {}

    def site(name: str) -> dict[str, Any]:
        return sites.setdefault(
            name,
            {
                "site": name,
                "last_round": None,
                "accuracy": None,
                "loss": None,
                "epsilon_by_round": {},
                "epsilon": None,
                "epsilon_cap": cap,
                "epsilon_planned": None,
                "bytes_sent": 0.0,
                "failures": [],
            },
        )

    for row in clients if isinstance(clients, list) else []:
        if not isinstance(row, dict) or not isinstance(row.get("site"), str):
            continue
        s, rnd = site(row["site"]), _number(row.get("round"))
        if rnd is not None and (s["last_round"] is None or rnd >= s["last_round"]):
            s["last_round"] = int(rnd)
            s["accuracy"] = _number(row.get("accuracy"))
            s["loss"] = _number(row.get("loss"))
        eps = _number(row.get("epsilon"))
        if eps is not None and rnd is not None:
            s["epsilon_by_round"][str(int(rnd))] = eps
            s["epsilon"] = max(eps, s["epsilon"] or 0.0)
        s["bytes_sent"] += _number(row.get("bytes-sent")) or 0.0
    for r in rounds:
        for f in r["failures"]:
            site(f["site"])["failures"].append({"round": r["round"], **f})
    planned = plan.get("sites", []) if isinstance(plan, dict) else []
    for i, p in enumerate(planned if isinstance(planned, list) else []):
        name = partition_site_key(i)  # the simulation's site keys, in plan order
        if isinstance(p, dict) and name in sites:
            sites[name]["epsilon_planned"] = _number(p.get("epsilon"))
    return [sites[k] for k in sorted(sites)]


def audit_view(audit: Any) -> dict[str, Any] | None:
    """The audit's verdict and numbers; never the canaries' secrets."""
    if not isinstance(audit, dict):
        return None
    attacks, canaries = _dict(audit.get("attacks")), _dict(audit.get("canaries"))
    return {
        "passed": bool(audit.get("passed", True)),
        "epsilon_accounted": _number(audit.get("epsilon_accounted")),
        "epsilon_lower_95": _number(audit.get("epsilon_lower_95")),
        "members": _number(audit.get("members")),
        "non_members": _number(audit.get("non_members")),
        "attacks": {
            str(name): {k: _number(v) for k, v in a.items() if not isinstance(v, dict)}
            for name, a in attacks.items()
            if isinstance(a, dict)
        },
        "per_site": [
            {k: v for k, v in s.items() if isinstance(v, (int, float, str, bool)) or v is None}
            for s in audit.get("per_site", [])
            if isinstance(s, dict)
        ],
        "canaries": {k: _number(v) for k, v in canaries.items() if k != "rows"},
    }


def placement_view(run_dir: Path) -> list[dict[str, Any]]:
    """Messages and partitions per Ray node (simulations; ``placement.jsonl``)."""
    nodes: dict[str, dict[str, Any]] = {}
    try:
        lines = (run_dir / PLACEMENT_FILE).read_text().splitlines()
    except OSError:
        return []
    for text in lines:
        try:
            row = json.loads(text)
        except ValueError:
            continue
        if not isinstance(row, dict):
            continue
        node = nodes.setdefault(
            str(row.get("ray_node")), {"ip": str(row.get("ip")), "messages": 0, "partitions": set()}
        )
        node["messages"] += 1
        if isinstance(row.get("partition"), int):
            node["partitions"].add(row["partition"])
    return [
        {
            "node": k[:12],
            "ip": v["ip"],
            "messages": v["messages"],
            "partitions": sorted(v["partitions"]),
        }
        for k, v in sorted(nodes.items())
    ]


def run_view(name: str, run_dir: Path) -> dict[str, Any]:
    """Everything the page shows of one run."""
    status = read_json(run_dir / STATUS_FILE)
    config = read_json(run_dir / CONFIG_FILE)
    rounds = rounds_view(read_json(run_dir / METRICS_JSON))
    partitions = read_json(run_dir / PARTITIONS_JSON)
    metadata = read_json(run_dir / ADAPTER_DIR / METADATA_FILE)
    config = config if isinstance(config, dict) else {}
    return {
        "name": name,
        "kind": "simulation" if (run_dir / PARTITIONS_JSON).is_file() else "deployment",
        "status": status if isinstance(status, dict) else {"status": "waiting"},
        "config": {str(k): v for k, v in config.items() if isinstance(v, (str, int, float, bool))},
        "num_rounds": _number(config.get("num-server-rounds")),
        "rounds": rounds,
        "sites": sites_view(
            read_json(run_dir / CLIENTS_JSON),
            rounds,
            read_json(run_dir / PLAN_JSON),
            cap=_number(config.get("sim-epsilon-cap")) or None,  # 0: no cap
        ),
        "partitions": [
            {k: p.get(k) for k in ("partition", "examples", "labels")}
            for p in (partitions if isinstance(partitions, list) else [])
            if isinstance(p, dict)
        ],
        "adapter": metadata if isinstance(metadata, dict) else None,
        "placement": placement_view(run_dir),
        "audit": audit_view(read_json(run_dir / AUDIT_FILE)),
        "plots": sorted(n for n in SERVED_FILES if (run_dir / n).is_file()),
        "tensorboard": str(run_dir / TENSORBOARD_DIR)
        if (run_dir / TENSORBOARD_DIR).is_dir()
        else None,
    }


def overview(runs: dict[str, Path]) -> list[dict[str, Any]]:
    """A line per run, for the list and the comparison view (a sweep's cells)."""
    out = []
    for name, path in runs.items():
        status = read_json(path / STATUS_FILE)
        config = read_json(path / CONFIG_FILE)
        rounds = rounds_view(read_json(path / METRICS_JSON))
        last = rounds[-1] if rounds else {}
        out.append(
            {
                "name": name,
                "status": status.get("status") if isinstance(status, dict) else "waiting",
                "strategy": config.get("strategy") if isinstance(config, dict) else None,
                "rounds": len([r for r in rounds if (r["round"] or 0) > 0]),
                "global_accuracy": last.get("global_accuracy"),
                "global_loss": last.get("global_loss"),
                "epsilon_max": last.get("epsilon_max"),
                "accuracy_by_round": [[r["round"], r["global_accuracy"]] for r in rounds],
            }
        )
    return out
