"""What federated instruction tuning buys over a site alone, and what DP costs it.

One run, side by side, on the drug-review instructions (SmolLM2-135M-Instruct,
LoRA on q,k,v,o; 5 sites split by a natural column, the demo's settings):

- ``zero-shot``: the base, round 0 of the federated run;
- ``site-alone``: each site trains alone on the same rows for the same rounds
  (each round's fresh ``max-train-examples`` draw, as its node would),
  with the node's own training code (``client.train.local_train``), scored by
  the server's scorer (``models.lm_eval.lm_metrics``) on the same held-out split;
  the mean over sites is the row, each site is listed;
- ``centralised``: one model on the union of the rows the sites trained on in
  each round, same rounds;
- ``federated``: the real Flower simulation (FedAvg);
- ``federated-dp-eps8`` / ``eps1``: the same with local DP-SGD, each site's ε
  over all rounds (δ = 1e-5), priced by the node ledgers.

Prints JSON (one object per dataset) and writes it to ``--out``/sft_utility.json.
Demo data is public patient reviews of drugs, not clinical records. Slow on 2
CPU cores (about 25 minutes per dataset at the defaults)::

    .venv/bin/python bench/sft_utility.py --datasets drug-condition,drug-sentiment
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from fedlora.client.prepare import round_subset
from fedlora.client.train import local_train, round_generator
from fedlora.config import RunConfig
from fedlora.data.partition import client_partition, simulation_split
from fedlora.data.sources import TextDataset
from fedlora.models.adapter import adapter_state, load_adapter_state
from fedlora.models.lm_eval import lm_metrics
from fedlora.models.loading import load_tokenizer
from fedlora.models.task import get_task
from fedlora.server.history import RunHistory
from fedlora.simulations.engine import Resources, simulate

SCORES = ("choice", "exact-match", "perplexity", "loss")


def base_config(dataset: str, args: argparse.Namespace) -> dict[str, Any]:
    """The demo's settings (experiments/sft-drug-reviews.toml) for ``dataset``."""
    return {
        "task": "causal-lm",
        "dataset": dataset,
        "partitioner": "column",
        "num-server-rounds": args.rounds,
        "strategy": "fedavg",
        "lora-rank": 8,
        "lora-alpha": 16.0,
        "lora-dropout": 0.0,
        "learning-rate": 1e-3,
        "batch-size": 4,
        "max-seq-length": 128,
        "max-train-examples": args.examples,
        "eval-max-examples": args.eval_examples,
        "max-new-tokens": 4,
        "min-train-nodes": args.sites,
        "seed": args.seed,
    }


def scores(row: dict[str, Any]) -> dict[str, float]:
    return {k: round(float(row[k]), 4) for k in SCORES if k in row}


def federated(cfg: dict[str, Any], name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Rows of a real simulation: its round 0 (zero-shot) and its last round."""
    run_dir = Path(args.out) / f"{cfg['dataset']}-{name}"
    cfg = {
        **cfg,
        "run-dir": str(run_dir),
        "federation": f"bench-sft-{time.time_ns()}",  # fresh ledgers per cell
        "sim-ledger-dir": str(run_dir / "ledgers"),
    }
    start = time.perf_counter()
    status = simulate(cfg, args.sites, Resources(num_cpus=1))
    seconds = time.perf_counter() - start
    records = RunHistory.load(run_dir).records
    extra = [{**r.extra, "loss": r.global_loss} for r in records]
    out = []
    if name == "federated":
        out.append({"cell": "zero-shot", **scores(_strip(extra[0]))})
    out.append(
        {
            "cell": name,
            "status": status.get("status"),
            **scores(_strip(extra[-1])),
            "epsilon_spent_max": extra[-1].get("epsilon-max"),
            "per_round_choice": [round(float(_strip(e).get("choice", 0)), 4) for e in extra],
            "wall_seconds": round(seconds, 1),
        }
    )
    return out


def _strip(extra: dict[str, Any]) -> dict[str, Any]:
    """History columns are ``global_<metric>``; the table uses the metric's name."""
    return {k.removeprefix("global_").replace("_", "-"): v for k, v in extra.items()}


def local(cfg: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Each site alone and the union, trained in-process with the node's code."""
    run = RunConfig.from_flat(cfg)
    task = get_task(run.task)
    folder = task.folder(None)
    tokenizer = load_tokenizer(folder)
    _pool, test = simulation_split(run.data, run.seed)
    test_enc = task.encode(tokenizer, test, run.train.max_seq_length)
    labels = list(test.labels.names)
    model = task.build_model(folder, len(labels), run.lora, run.seed)
    initial = adapter_state(model)
    parts = [client_partition(run.data, run.seed, pid, args.sites) for pid in range(args.sites)]

    def rows(pid: int, r: int) -> TextDataset:
        """The rows site ``pid`` trains on in round ``r``: the node's own draw."""
        return round_subset(parts[pid], args.examples, run.seed, r, pid)

    def train_and_score(pick: Any, site: int) -> dict[str, float]:
        load_adapter_state(model, initial)
        for r in range(1, args.rounds + 1):
            enc = task.encode(tokenizer, pick(r), run.train.max_seq_length)
            local_train(model, enc, run.train, round_generator(run.seed, r, site), task)
        return lm_metrics(model, test_enc, tokenizer, run.lm, labels)

    start = time.perf_counter()
    alone = [
        {"site": pid, **scores(train_and_score(lambda r, pid=pid: rows(pid, r), pid))}
        for pid in range(args.sites)
    ]
    mean = {k: round(sum(a[k] for a in alone) / len(alone), 4) for k in SCORES if k in alone[0]}
    union = lambda r: _concat([rows(pid, r) for pid in range(args.sites)])  # noqa: E731
    central = scores(train_and_score(union, 0))
    return [
        {"cell": "site-alone (mean)", **mean, "sites": alone},
        {"cell": "centralised", **central, "examples_per_round": len(union(1))},
        {"wall_seconds_local_cells": round(time.perf_counter() - start, 1)},
    ]


def _concat(parts: list[TextDataset]) -> TextDataset:
    """The union of the sites' rows (they all index the same pool, so concatenate fields)."""
    import dataclasses

    first = parts[0]
    fields = {}
    for f in dataclasses.fields(first):
        values = [getattr(p, f.name) for p in parts]
        if isinstance(values[0], tuple):
            fields[f.name] = tuple(v for value in values for v in value)
        else:
            fields[f.name] = values[0]
    fields["source"] = f"{first.source} (union of {len(parts)} sites)"
    return dataclasses.replace(first, **fields)


def dp_config(cfg: dict[str, Any], eps: float, args: argparse.Namespace) -> dict[str, Any]:
    return {
        **cfg,
        "dp-mode": "local",
        "dp-target-epsilon": eps,
        "dp-delta": 1e-5,
        "dp-max-grad-norm": args.dp_clip,
        "optimizer": "sgd",
        "learning-rate": args.dp_lr,
        "batch-size": args.dp_batch,
        "update-max-norm": 1000.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--datasets", default="drug-condition")
    parser.add_argument("--sites", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--examples", type=int, default=32, help="per site per round")
    parser.add_argument("--eval-examples", type=int, default=48)
    parser.add_argument("--epsilons", default="8,1")
    parser.add_argument("--dp-lr", type=float, default=0.5)
    parser.add_argument("--dp-batch", type=int, default=16)
    parser.add_argument("--dp-clip", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", default="runs/bench-sft-utility")
    args = parser.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    results = []
    for dataset in filter(None, args.datasets.split(",")):
        cfg = base_config(dataset, args)
        rows = federated(cfg, "federated", args)
        rows += local(cfg, args)
        for eps in [float(e) for e in filter(None, args.epsilons.split(","))]:
            rows += federated(dp_config(cfg, eps, args), f"federated-dp-eps{eps:g}", args)
        results.append({"dataset": dataset, "settings": cfg, "rows": rows})
        (Path(args.out) / "sft_utility.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
