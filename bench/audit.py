"""The membership audit at ε = ∞, 8 and 1 on the classifier: leakage against the claim.

For each federation of ``bench/dp_auto.py``'s settings (default: BBC News over
10 IID sites, 5 rounds) at each ε, runs ``fedlora simulate`` (or, with
``--from DIR``, reuses the run directories a dp_auto run left there) and
audits the exported adapter (:mod:`fedlora.simulations.audit`). Prints JSON:
AUC and TPR at 1 % / 0.1 % FPR of both attacks, the empirical ε lower bound
(95 %) and the accounted ε; for ``--settings lm-canaries`` (SmolLM2 on drug
reviews, 20 canaries planted 4 times a round) canary exposure and extraction.
``--settings memorise --epsilons inf,8`` is the federation that overfits
without DP (MiniLM on drug reviews, 8 local epochs): the audit's evidence
against a model that does leak.

    .venv/bin/python bench/audit.py [--settings small-sites] [--from /tmp/dpauto]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from dp_auto import cell  # same folder

from fedlora.simulations.audit import audit_run


def audited(run_dir: Path) -> dict[str, Any]:
    if not (run_dir / "adapter").is_dir():
        return {"run_dir": str(run_dir), "audit": "no exported adapter (the run stopped early)"}
    record = audit_run(run_dir, progress=lambda _s: None)
    return {
        "run_dir": str(run_dir),
        "epsilon_accounted": record["epsilon_accounted"],
        "epsilon_lower_95": record["epsilon_lower_95"],
        "passed": record["passed"],
        "members": record["members"],
        **{
            f"{name}_{k}": v
            for name, a in record["attacks"].items()
            for k, v in a.items()
            if k in ("auc", "tpr_at_fpr_1pct", "tpr_at_fpr_0.1pct")
        },
        **{f"canary_{k}": v for k, v in record.get("canaries", {}).items() if k != "rows"},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--settings", default="small-sites")
    parser.add_argument("--epsilons", default="inf,8,1")
    parser.add_argument("--from", dest="source", default="", help="a dp_auto --out folder")
    args = parser.parse_args()
    out = Path(args.source or tempfile.mkdtemp(prefix="fedlora-audit-"))
    rows = []
    for setting in args.settings.split(","):
        for eps in (float(e) for e in args.epsilons.split(",")):
            run_dir = out / f"{setting}-eps{eps:g}"
            if not args.source:
                cell(setting, eps, out)
            rows.append({"setting": setting, "epsilon": eps, **audited(run_dir)})
    print(json.dumps(rows, indent=2, default=str))


if __name__ == "__main__":
    main()
