"""Virtual clients sharing one GPU: throughput against clients per GPU.

For k in --shares (default 1,2,4) runs the same MiniLM simulation with
``num-gpus = 1/k`` per virtual client, so k clients train concurrently on
the GPU, and reports examples trained per second of round wall time.
Prints JSON; on a machine without a GPU it says so and exits 0 (the CPU
path is the tested default). Run:

    .venv/bin/python bench/gpu_share.py [--shares 1,2,4] [--clients 8]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch

from fedlora.server.history import RunHistory
from fedlora.simulations.engine import Resources, simulate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shares", default="1,2,4")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-train-examples", type=int, default=256)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(json.dumps({"gpu": False, "skipped": "no CUDA device; nothing to measure"}))
        return
    cpus = os.cpu_count() or 1
    rows = []
    for k in (int(x) for x in args.shares.split(",")):
        run_dir = Path(tempfile.mkdtemp(prefix=f"gpu-share-{k}-"))
        cfg = {
            "num-server-rounds": args.rounds,
            "fraction-train": 1.0,
            "max-train-examples": args.max_train_examples,
            "run-dir": str(run_dir),
            "dirichlet-alpha": 100.0,
        }
        res = Resources(num_cpus=max(cpus / k / 2, 0.5), num_gpus=1.0 / k, total_gpus=1)
        status = simulate(cfg, args.clients, res)
        rounds = [r for r in RunHistory.load(run_dir).records if r.round >= 2]  # skip warm-up
        examples = args.clients * args.max_train_examples * len(rounds)
        seconds = sum(r.seconds for r in rounds) or float("nan")
        rows.append(
            {
                "clients_per_gpu": k,
                "num_gpus_per_client": 1.0 / k,
                "status": status.get("status"),
                "examples_per_second": examples / seconds,
            }
        )
    base = rows[0]["examples_per_second"]
    for row in rows:
        row["speedup_vs_1"] = round(row["examples_per_second"] / base, 3)
    print(json.dumps({"gpu": torch.cuda.get_device_name(0), "results": rows}, indent=2))


if __name__ == "__main__":
    main()
