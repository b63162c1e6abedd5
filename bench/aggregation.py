"""Final global accuracy of plain FedAvg vs lora-exact vs ffa-lora, one run each.

BBC News, Dirichlet non-IID split, same seeds and recipe for every strategy;
only the aggregation (and, for ffa-lora, the frozen A) differs. Prints JSON:
one row per strategy with final and best global accuracy, bytes uploaded per
round, lora-exact's truncation error and wall time.

Run (full, slow on 2 CPU cores):
    .venv/bin/python bench/aggregation.py --rounds 8 --clients 10
Reduced:
    .venv/bin/python bench/aggregation.py --rounds 3 --clients 5 --max-train-examples 64
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from fedlora.server.history import RunHistory
from fedlora.simulations.engine import Resources, simulate


def run(strategy: str, args: argparse.Namespace) -> dict[str, Any]:
    run_dir = Path(args.out) / strategy
    cfg: dict[str, Any] = {
        "dataset": args.dataset,
        "partitioner": "dirichlet",
        "dirichlet-alpha": args.alpha,
        "strategy": strategy,
        "num-server-rounds": args.rounds,
        "learning-rate": args.lr,
        "local-epochs": args.epochs,
        "max-train-examples": args.max_train_examples,
        "lora-rank": args.rank,
        "lora-alpha": 2.0 * args.rank,
        "seed": args.seed,
        "run-dir": str(run_dir),
    }
    start = time.perf_counter()
    status = simulate(cfg, args.clients, Resources(num_cpus=1))
    records = RunHistory.load(run_dir).records
    accs = [r.global_accuracy for r in records if r.global_accuracy is not None]
    return {
        "strategy": strategy,
        "status": status.get("status"),
        "final_accuracy": accs[-1] if accs else None,
        "best_accuracy": max(accs) if accs else None,
        "accuracy_per_round": accs,
        "bytes_uploaded_per_round": records[-1].bytes_uploaded if len(records) > 1 else None,
        "truncation_error_per_round": [
            r.extra["lora-truncation-error"] for r in records if "lora-truncation-error" in r.extra
        ],
        "seconds": round(time.perf_counter() - start, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--strategies", default="fedavg,lora-exact,ffa-lora")
    parser.add_argument("--dataset", default="bbc-news")
    parser.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--max-train-examples", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", default="runs/bench-aggregation")
    args = parser.parse_args()
    rows = [run(name, args) for name in args.strategies.split(",")]
    print(json.dumps({"config": vars(args), "runs": rows}, indent=2))


if __name__ == "__main__":
    main()
