"""Server-side cost of aggregating many MiniLM-shaped adapter updates.

Updates arrive one at a time (a generator), as they would off the wire, and
are folded into a running mean, so memory should stay about one update wide
however many clients report. Prints JSON: seconds and tracemalloc peak per
aggregation rule, next to the size of one update.

Run: .venv/bin/python bench/server_aggregate.py [--updates 1000] [--rank 8]
Target: the FedAvg running mean of 1000 updates in < 1 s.
"""

from __future__ import annotations

import argparse
import json
import time
import tracemalloc
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from fedlora.models.adapter import adapter_state_shapes
from fedlora.models.loading import build_model, default_model_path
from fedlora.records import is_lora_a
from fedlora.settings import LoraSettings
from fedlora.strategies.math.exact import aggregate_exact
from fedlora.strategies.math.ffa import aggregate_ffa
from fedlora.strategies.math.lora import RunningMean

State = dict[str, np.ndarray]


def minilm_shapes(rank: int, targets: str, num_labels: int) -> dict[str, tuple[int, ...]]:
    """PEFT names and shapes of the real all-MiniLM-L6-v2 adapter."""
    lora = LoraSettings(rank=rank, alpha=2 * rank, target_modules=tuple(targets.split(",")))
    return adapter_state_shapes(build_model(None, num_labels, lora, seed=0))


def updates(shapes: dict[str, tuple[int, ...]], count: int, pool_size: int = 8) -> Iterator[State]:
    """``count`` updates, one at a time, cycling a small pool of distinct ones.

    Drawing 1000 x 75k normals would cost more than aggregating them; a pool
    built before timing keeps the measurement on the aggregation.
    """
    rng = np.random.default_rng(0)
    pool = [
        {k: rng.standard_normal(s).astype(np.float32) * 0.01 for k, s in shapes.items()}
        for _ in range(pool_size)
    ]
    for i in range(count):
        yield pool[i % pool_size]


def measure(fn: Callable[[], Any]) -> dict[str, float]:
    tracemalloc.start()
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    _current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"seconds": round(seconds, 3), "peak_mib": round(peak / 2**20, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--updates", type=int, default=1000)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--targets", default="query,value")
    parser.add_argument("--num-labels", type=int, default=5)
    parser.add_argument("--rules", default="fedavg,ffa-lora,lora-exact")
    args = parser.parse_args()
    shapes = minilm_shapes(args.rank, args.targets, args.num_labels)
    one_update = sum(int(np.prod(s)) * 4 for s in shapes.values())
    weights = np.random.default_rng(1).integers(20, 400, size=args.updates).tolist()

    def fedavg() -> State:
        mean = RunningMean()
        for state, w in zip(updates(shapes, args.updates), weights, strict=True):
            mean.add(state, w)
        return mean.result()

    def ffa() -> State:
        trained = (
            {k: v for k, v in s.items() if not is_lora_a(k)} for s in updates(shapes, args.updates)
        )
        return aggregate_ffa(trained, weights)

    def exact() -> State:
        return aggregate_exact(updates(shapes, args.updates), weights, args.rank).state

    rules = {"fedavg": fedavg, "ffa-lora": ffa, "lora-exact": exact}
    # The pool itself (8 updates) is allocated inside each measurement; report it.
    pool_mib = 8 * one_update / 2**20
    results = {name: measure(rules[name]) for name in args.rules.split(",")}
    print(
        json.dumps(
            {
                "model": str(default_model_path()),
                "lora_rank": args.rank,
                "lora_targets": args.targets,
                "updates": args.updates,
                "tensors_per_update": len(shapes),
                "update_mib": round(one_update / 2**20, 3),
                "all_updates_mib": round(args.updates * one_update / 2**20, 1),
                "generator_pool_mib": round(pool_mib, 2),
                "target": "fedavg running mean of 1000 updates < 1 s",
                "results": results,
                "fedavg_meets_target": results.get("fedavg", {}).get("seconds", 9e9) < 1.0,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
