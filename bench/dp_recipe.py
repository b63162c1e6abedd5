"""Which DP-SGD recipe learns? A one-client proxy, recipes side by side, one run.

A federated utility cell costs minutes per round on 2 CPU cores; this proxy
costs under a minute per recipe: one client's worth of data (``--n``
examples, IID), DP-SGD at a target ε over ``--epochs`` passes (δ = 1e-5,
RDP), the packaged MiniLM, and the real fedlora path (``build_model``,
``make_private``, ``train_epochs``, ``make_optimizer``). It prints one JSON
row per recipe and a summary; ``acc`` is accuracy on ``--n-test`` held-out
examples, ``majority`` the share of the largest class there (a recipe at
``majority`` learned nothing). It ranks recipes; it does not predict the
federated number (averaging K clients' updates cuts the noise by about √K).

    .venv/bin/python bench/dp_recipe.py --dataset rotten-tomatoes --eps 8
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from collections import Counter
from dataclasses import replace
from typing import Any

import torch

from fedlora.client.train import make_optimizer, train_epochs
from fedlora.data.catalog import load_demo
from fedlora.data.sources import TextDataset
from fedlora.models.batches import encode, make_loader
from fedlora.models.inference import evaluate
from fedlora.models.loading import build_model, load_tokenizer
from fedlora.privacy.accounting import noise_multiplier_for, steps_per_round
from fedlora.privacy.dpsgd import make_private
from fedlora.privacy.settings import DPConfig
from fedlora.settings import LoraSettings, TrainSettings

# name -> (pooling, optimizer, learning rate, batch size, trained tensors, LoRA rank);
# trained tensors: "all" (LoRA A, B and head), "ffa" (A frozen), "head" (head only)
RECIPES: dict[str, tuple[str, str, float, int, str, int]] = {
    "cls-adamw-5e-3": ("cls", "adamw", 5e-3, 128, "all", 8),
    "mean-adamw-5e-3": ("mean", "adamw", 5e-3, 128, "all", 8),
    "mean-adamw-5e-4": ("mean", "adamw", 5e-4, 128, "all", 8),
    "cls-sgd-2": ("cls", "sgd", 2.0, 128, "all", 8),
    "mean-sgd-0.5": ("mean", "sgd", 0.5, 128, "all", 8),
    "mean-sgd-2": ("mean", "sgd", 2.0, 128, "all", 8),
    "mean-sgd-4": ("mean", "sgd", 4.0, 128, "all", 8),
    "mean-sgd-2-b64": ("mean", "sgd", 2.0, 64, "all", 8),
    "mean-sgd-2-ffa": ("mean", "sgd", 2.0, 128, "ffa", 8),
    "mean-sgd-4-ffa": ("mean", "sgd", 4.0, 128, "ffa", 8),
    "mean-sgd-2-r1": ("mean", "sgd", 2.0, 128, "all", 1),
    "mean-sgd-8": ("mean", "sgd", 8.0, 128, "all", 8),
    "mean-sgd-8-ffa": ("mean", "sgd", 8.0, 128, "ffa", 8),
    "mean-sgd-16-ffa": ("mean", "sgd", 16.0, 128, "ffa", 8),
    "mean-sgd-4-head": ("mean", "sgd", 4.0, 128, "head", 8),
    "mean-sgd-8-head": ("mean", "sgd", 8.0, 128, "head", 8),
    "mean-sgd-4-head-b256": ("mean", "sgd", 4.0, 256, "head", 8),
    "mean-adamw-2e-2-head": ("mean", "adamw", 2e-2, 32, "head", 8),
    # "ffa/x": FFA with LoRA B at x times the head's rate
    "mean-sgd-8-ffa/0.25": ("mean", "sgd", 8.0, 128, "ffa/0.25", 8),
    "mean-sgd-8-ffa/0.125": ("mean", "sgd", 8.0, 128, "ffa/0.125", 8),
    "mean-sgd-8-ffa/0.5": ("mean", "sgd", 8.0, 128, "ffa/0.5", 8),
    "mean-sgd-4-ffa/2": ("mean", "sgd", 4.0, 128, "ffa/2", 8),
    "mean-sgd-4-ffa/4": ("mean", "sgd", 4.0, 128, "ffa/4", 8),
    "mean-sgd-4-ffa/16": ("mean", "sgd", 4.0, 128, "ffa/16", 8),
    "mean-sgd-4-ffa-r2": ("mean", "sgd", 4.0, 128, "ffa", 2),
    "mean-sgd-6-ffa-r2": ("mean", "sgd", 6.0, 128, "ffa", 2),
    "mean-sgd-4-ffa-r1": ("mean", "sgd", 4.0, 128, "ffa", 1),
    "mean-sgd-4-ffa-r4": ("mean", "sgd", 4.0, 128, "ffa", 4),
    "mean-sgd-4-ffa-r16": ("mean", "sgd", 4.0, 128, "ffa", 16),
    "mean-adamw-5e-3-b32": ("mean", "adamw", 5e-3, 32, "all", 8),
    "mean-adamw-5e-3-ffa-b32": ("mean", "adamw", 5e-3, 32, "ffa", 8),
    "mean-sgd-1-ffa-b32": ("mean", "sgd", 1.0, 32, "ffa", 8),
    "mean-sgd-2-ffa-b64": ("mean", "sgd", 2.0, 64, "ffa", 8),
    "mean-sgd-0.4-ffa-m0.9": ("mean", "sgd", 0.4, 128, "ffa", 8),
    "mean-sgd-1-ffa-m0.75": ("mean", "sgd", 1.0, 128, "ffa", 8),
}
# SGD momentum for the recipes that use it (0 elsewhere)
MOMENTUM = {"mean-sgd-0.4-ffa-m0.9": 0.9, "mean-sgd-1-ffa-m0.75": 0.75}


def split(args: argparse.Namespace) -> tuple[TextDataset, TextDataset]:
    """The one client's examples and the held-out ones (seeded, IID)."""
    data = load_demo(args.dataset)
    order = list(range(len(data)))
    random.Random(args.seed).shuffle(order)
    return data.subset(order[: args.n]), data.subset(order[args.n : args.n + args.n_test])


def run(
    name: str, eps: float, train: TextDataset, test: TextDataset, args: argparse.Namespace
) -> dict[str, Any]:
    pooling, optimizer, lr, batch, tensors, rank = RECIPES[name]
    tokenizer = load_tokenizer(None)
    enc_train, enc_test = (encode(tokenizer, d, args.seq) for d in (train, test))
    lora = replace(LoraSettings(), pooling=pooling, rank=rank, alpha=2.0 * rank)
    model = build_model(None, len(train.labels), lora, args.seed)
    for pname, param in model.named_parameters():
        if (tensors.startswith("ffa") and ".lora_A." in pname) or (
            tensors == "head" and "lora_" in pname
        ):
            param.requires_grad_(False)
    model.train()
    settings = TrainSettings(
        learning_rate=lr, optimizer=optimizer, batch_size=batch, momentum=MOMENTUM.get(name, 0.0)
    )
    opt = make_optimizer(model, settings)
    if "/" in tensors:  # LoRA tensors at a fraction of the head's rate
        ratio = float(tensors.split("/")[1])
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        groups: list[dict[str, Any]] = [
            {"params": [p for n, p in named if "lora_" not in n]},
            {"params": [p for n, p in named if "lora_" in n], "lr": lr * ratio},
        ]
        opt = torch.optim.SGD(groups, lr=lr)
    generator = torch.Generator().manual_seed(args.seed)
    loader = make_loader(enc_train, batch, shuffle=True, generator=generator)
    sigma = None
    start = time.perf_counter()
    if math.isfinite(eps):
        rate, steps = steps_per_round(args.n, batch, args.epochs)
        sigma = noise_multiplier_for(eps, 1e-5, rate, steps, "rdp")
        dp = DPConfig(noise_multiplier=sigma, max_grad_norm=args.clip, delta=1e-5)
        private = make_private(model, opt, loader, dp, sigma)
        result = train_epochs(private.model, private.data_loader, private.optimizer, args.epochs)
    else:
        result = train_epochs(model, loader, opt, args.epochs, generator)
    seconds = time.perf_counter() - start
    _loss, acc, _n = evaluate(model, enc_test)
    majority = max(Counter(test.label_ids).values()) / len(test)
    return {
        "recipe": name,
        "epsilon": "inf" if math.isinf(eps) else eps,
        "pooling": pooling,
        "optimizer": optimizer,
        "lr": lr,
        "batch": batch,
        "tensors": tensors,
        "rank": rank,
        "sigma": sigma,
        "steps": result.steps,
        "acc": round(acc, 4),
        "majority": round(majority, 4),
        "train_seconds": round(seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dataset", default="rotten-tomatoes")
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--eps", default="8", help="comma-separated; 'inf' = no DP")
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--n-test", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--clip", type=float, default=1.0)
    parser.add_argument("--seq", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rows = []
    train, test = split(args)  # read and split once; every recipe sees the same examples
    for eps in (float(e) for e in args.eps.split(",")):
        for name in args.recipes.split(","):
            rows.append(run(name, eps, train, test, args))
            print(json.dumps(rows[-1]), flush=True)
    print(json.dumps({"settings": vars(args), "results": rows}, indent=2))


if __name__ == "__main__":
    main()
