"""dp-recipe=auto against no DP, in one run: does private training work first time?

Three federations built from the packaged data, each at ε = ∞ (no DP, the
default recipe), ε = 8 and ε = 1 with nothing set but ``dp-mode=local`` and
``dp-target-epsilon`` (the auto recipe and the plan do the rest):

* ``large-sites``: Rotten Tomatoes, IID over 8 sites of ~1,070 reviews, 3 rounds;
* ``mixed-sites``: BBC News, Dirichlet α = 0.5 over 10 sites of 45-382, 5 rounds;
* ``small-sites``: BBC News, IID over 10 sites of ~170 articles, 5 rounds.

Each cell runs ``fedlora simulate`` as a child process; the bench samples the
memory of every process in its tree and reports the peak of the largest Ray
client worker, and of the tree. Prints JSON (one row per cell, and the
comparisons the issue's goals ask for). Slow: ~3-6 minutes a cell on 2 cores.

    .venv/bin/python bench/dp_auto.py [--settings small-sites] [--epsilons 8,inf]
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from sim_scale import TreeMemorySampler  # same folder

LM_CANARIES: dict[str, Any] = {
    "task": "causal-lm",
    "dataset": "drug-sentiment",
    "partitioner": "column",
    "num-server-rounds": 3,
    "max-seq-length": 128,
    "max-train-examples": 16,
    "eval-max-examples": 48,
    "max-new-tokens": 4,
    "min-train-nodes": 5,
    "audit-canaries": 20,
    "audit-canary-repeats": 4,
    "dp-plan": "warn",
}

SETTINGS: dict[str, dict[str, Any]] = {
    "large-sites": {
        "clients": 8,
        "config": {"dataset": "rotten-tomatoes", "partitioner": "iid", "num-server-rounds": 3},
    },
    "mixed-sites": {
        "clients": 10,
        "config": {"dataset": "bbc-news", "partitioner": "dirichlet", "num-server-rounds": 5},
    },
    # The causal LM with canaries for bench/audit.py (not in dp_auto's default list):
    # SmolLM2 on drug reviews split by condition, 20 canaries x 4 copies a round.
    "lm-canaries": {"clients": 5, "config": LM_CANARIES},
    # The same, auditing the last round's adapter, canaries 8 times a round.
    "lm-canaries-last": {
        "clients": 5,
        "config": {
            **LM_CANARIES,
            "audit-canary-repeats": 8,
            "export-round": "last",
        },
    },
    "small-sites": {
        "clients": 10,
        "config": {"dataset": "bbc-news", "partitioner": "iid", "num-server-rounds": 5},
    },
    # For bench/audit.py: a federation that memorises without DP, so the audit's
    # evidence has something to find. MiniLM on the 979 drug reviews (noisy
    # 3-way sentiment: members' losses fall far below unseen reviews') over 4 sites
    # of ~196, 8 local epochs a round for 3 rounds. The plan warns at ε = 8
    # (small sites) instead of refusing: the audit is the point, not accuracy.
    "memorise": {
        "clients": 4,
        "config": {
            "dataset": "drug-sentiment",
            "partitioner": "iid",
            "num-server-rounds": 3,
            "local-epochs": 8,
            "dp-plan": "warn",
            "export-round": "last",
            # 8 local epochs of DP-SGD noise move the adapter ~100 in L2, above the
            # default bound (10x the initial adapter's norm, 57 here): without this
            # the server rejects every honest update of round 1 and stops.
            "update-max-norm": 1000.0,
        },
    },
}


def cell(setting: str, eps: float, out: Path) -> dict[str, Any]:
    spec = SETTINGS[setting]
    run_dir = out / f"{setting}-eps{eps:g}"
    config = {**spec["config"], "run-dir": str(run_dir), "sim-ledger-dir": str(run_dir / "ledgers")}
    if math.isfinite(eps):
        config.update({"dp-mode": "local", "dp-target-epsilon": eps})
    if (run_dir / "status.json").exists() and (out / f"{setting}-eps{eps:g}.log").exists():
        # done by an earlier invocation with this --out: report it, memory unmeasured
        return summarise(setting, eps, run_dir, -1, 0.0, None)
    cmd = [sys.executable, "-m", "fedlora", "simulate", "-n", str(spec["clients"])]
    for key, value in config.items():
        cmd += ["-c", f"{key}={json.dumps(value)}"]
    start = time.perf_counter()
    log = (out / f"{setting}-eps{eps:g}.log").open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    sampler = TreeMemorySampler(proc.pid, 0.5)
    sampler.start()
    code = proc.wait()
    sampler.stop()
    return summarise(setting, eps, run_dir, code, time.perf_counter() - start, sampler)


def summarise(
    setting: str,
    eps: float,
    run_dir: Path,
    code: int,
    wall: float,
    sampler: TreeMemorySampler | None,
) -> dict[str, Any]:
    def read(name: str) -> Any:
        path = run_dir / name
        return json.loads(path.read_text()) if path.exists() else {}

    rounds = read("metrics.json").get("rounds", [])
    accs = [r.get("global_accuracy") for r in rounds]
    status, plan = read("status.json"), read("plan.json")
    eps_spent = max((r.get("extra", {}).get("epsilon-max", 0) or 0 for r in rounds), default=0)
    return {
        "setting": setting,
        "epsilon": "inf" if math.isinf(eps) else eps,
        "exit_code": code,
        "status": status.get("status"),
        "reason": (status.get("reason") or "")[:300],
        "plan_verdict": plan.get("verdict"),
        "plan_noise_to_signal": round(plan["nsr"], 3) if plan else None,
        "plan_batches": sorted({s["batch_size"] for s in plan.get("sites", [])}),
        "round0_accuracy": accs[0] if accs else None,
        "final_accuracy": accs[-1] if accs else None,
        "best_accuracy": max((a for a in accs if a is not None), default=None),
        "exported_round": status.get("exported_round"),
        "accuracy_per_round": accs,
        "epsilon_spent_max": eps_spent,
        "clients_failed": status.get("clients_failed"),
        "peak_rss_mb_client_worker": round(sampler.peak_worker / 2**20) if sampler else None,
        "peak_rss_mb_process_tree": round(sampler.peak_rss / 2**20) if sampler else None,
        "wall_seconds": round(wall, 1),
    }


def goals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's goals, checked on the rows."""
    by = {(r["setting"], r["epsilon"]): r for r in rows}
    out: dict[str, Any] = {}
    for r in rows:
        key = f"{r['setting']}@eps={r['epsilon']}"
        start, export = r["round0_accuracy"], r["best_accuracy"]
        out[key] = {
            "no_failure": r["status"] in ("completed", "stopped") and not r["clients_failed"],
            "never_below_round0": None if start is None or export is None else export >= start,
        }
        plain = by.get((r["setting"], "inf"))
        if plain and r["epsilon"] != "inf" and plain["best_accuracy"] and export is not None:
            out[key]["points_behind_no_dp"] = round(100 * (plain["best_accuracy"] - export), 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--settings", default="small-sites,mixed-sites,large-sites")
    parser.add_argument("--epsilons", default="inf,8,1")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="fedlora-dp-auto-"))
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for setting in args.settings.split(","):
        for eps in (float(e) for e in args.epsilons.split(",")):
            rows.append(cell(setting, eps, out))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)  # progress
    print(json.dumps({"rows": rows, "goals": goals(rows), "out": str(out)}, indent=2))


if __name__ == "__main__":
    main()
