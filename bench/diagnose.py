"""Why does a private run plateau? Three diagnostics behind docs/RESULTS.md.

``probe``: the linear-probe ceiling. Logistic regression (full batch,
L-BFGS, L2 as scikit-learn's ``C``) on the *frozen* encoder's mean-pooled
features of a simulation's client pool, scored on the server's held-out
split (same seed, same split as ``fedlora simulate``). A private run that
ends at this number has learned a linear head and nothing in LoRA.

``dp-probe``: a federated DP-SGD run of the *head alone* over the frozen
features, in seconds instead of ten minutes: the same clients (Dirichlet
partition), Poisson sampling, per-example clipping, σ from the same
target-ε search (label counts and the centre release included), FedAvg
weighted by examples, logit adjustment with noisy counts, and optionally
feature centering (``--center dp`` is the product's noised, clipped
statistics; ``exact`` the non-private pool mean, a diagnostic). Since the
private runs learn a linear head and little else, this proxy ranks head
recipes (pooled layers, centering, rate, batch) before a real run
confirms one. The gradient is the closed-form one of softmax regression;
the noise comes from a seeded generator (``--noise-seeds`` repeats).

``adapter``: for finished runs (their ``adapter/`` folders), how far each
LoRA layer moved (``‖scale·B·A‖``), the head's norms, the share of test
examples predicted as each label, and the accuracy at the best threshold on
``p1 - p0`` (two-label data): a gap between that and the plain accuracy is
miscalibration, not missing features.

    .venv/bin/python bench/diagnose.py probe --dataset rotten-tomatoes --seed 44 --layers 1,2,4
    .venv/bin/python bench/diagnose.py dp-probe --seed 44 --layers 1,4 --center none,dp --lr 4,8
    .venv/bin/python bench/diagnose.py adapter --dataset rotten-tomatoes --seed 44 RUN_DIR ...

Prints one JSON object per line.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from fedlora.client.train import label_log_prior
from fedlora.config import RunConfig
from fedlora.data.partition import client_partition, simulation_split
from fedlora.data.sources import TextDataset
from fedlora.models.adapter import load_exported
from fedlora.models.batches import collate, encode
from fedlora.models.centering import clip_rows, combine, sum_clip
from fedlora.models.inference import predict_proba
from fedlora.models.loading import load_tokenizer, resolve_model_path
from fedlora.privacy.accounting import steps_per_round
from fedlora.privacy.plan import site_sigma
from fedlora.task_settings import DataSettings


def pooled_layers(data: TextDataset, seq: int) -> torch.Tensor:
    """(examples, layers + 1, hidden): masked means of every hidden state."""
    from transformers import AutoModel

    tokenizer = load_tokenizer(None)
    encoder = AutoModel.from_pretrained(str(resolve_model_path(None))).eval()
    enc = encode(tokenizer, data, seq)
    out = []
    with torch.no_grad():
        for start in range(0, len(enc), 256):
            batch = collate([enc[i] for i in range(start, min(start + 256, len(enc)))], enc.pad_id)
            states = encoder(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                output_hidden_states=True,
            ).hidden_states
            mask = batch["attention_mask"].unsqueeze(-1).float()
            out.append(torch.stack([(h * mask).sum(1) / mask.sum(1) for h in states], 1))
    return torch.cat(out)


def logistic_regression(
    x: torch.Tensor, y: torch.Tensor, classes: int, c: float = 1.0
) -> torch.nn.Linear:
    """Minimise sum of cross-entropies + ||W||^2 / (2C), as scikit-learn does."""
    x = x.double()
    head = torch.nn.Linear(x.shape[1], classes).double()
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    opt = torch.optim.LBFGS(head.parameters(), max_iter=2000, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(head(x), y, reduction="sum")
        loss = loss + head.weight.pow(2).sum() / (2 * c)
        loss.backward()
        return loss

    opt.step(closure)
    return head


def probe(args: argparse.Namespace) -> None:
    pool, test = simulation_split(DataSettings(dataset=args.dataset), args.seed)
    train_x, test_x = pooled_layers(pool, args.seq), pooled_layers(test, args.seq)
    train_y, test_y = torch.tensor(pool.label_ids), torch.tensor(test.label_ids)
    classes = len(pool.labels)
    for k in (int(v) for v in args.layers.split(",")):
        a = train_x[:, -k:].reshape(len(train_x), -1)
        b = test_x[:, -k:].reshape(len(test_x), -1)
        head = logistic_regression(a, train_y, classes, args.c)
        with torch.no_grad():
            acc = float((head(b.double()).argmax(-1) == test_y).double().mean())
        row = {"dataset": args.dataset, "seed": args.seed, "layers": k, "C": args.c}
        print(json.dumps({**row, "probe_accuracy": round(acc, 4)}), flush=True)


def _client_features(args: argparse.Namespace) -> dict[str, Any]:
    """Every client's (features, labels) and the test split's, cached on disk."""
    cache = Path(args.cache) if args.cache else None
    if cache is not None and cache.is_file():
        return dict(torch.load(cache))
    data = DataSettings(dataset=args.dataset, partitioner="dirichlet", dirichlet_alpha=args.alpha)
    _pool, test = simulation_split(data, args.seed)
    parts = [client_partition(data, args.seed, i, args.clients) for i in range(args.clients)]
    out = {
        "clients": [(pooled_layers(p, args.seq), torch.tensor(p.label_ids)) for p in parts],
        "test": (pooled_layers(test, args.seq), torch.tensor(test.label_ids)),
        "classes": len(test.labels),
    }
    if cache is not None:
        torch.save(out, cache)
    return out


def _center(
    clients: list[tuple[torch.Tensor, torch.Tensor]], how: str, cfg: RunConfig, g: torch.Generator
) -> torch.Tensor | None:
    if how == "none":
        return None
    if how == "exact":
        return torch.cat([x for x, _y in clients]).mean(0)
    clip, sigma = sum_clip(cfg), cfg.privacy.dp_center_noise
    sums, counts = [], []
    for x, _y in clients:  # the product's release (fedlora.client.centering)
        released = torch.cat([clip_rows(x, clip).sum(0), torch.tensor([clip * len(x)]).double()])
        released += (
            sigma
            * math.sqrt(2.0)
            * clip
            * torch.randn(released.shape, generator=g, dtype=torch.double)
        )
        sums.append(released[:-1].numpy())
        counts.append(float(released[-1]) / clip)
    return torch.from_numpy(combine(sums, counts)).double()


_noise = functools.lru_cache(maxsize=None)(site_sigma)  # bisection is slow; inputs repeat


def _probe_config(layers: int, center: str, batch: int, args: argparse.Namespace) -> RunConfig:
    """The run config a proxy row mirrors; built before features so bad flags fail at once."""
    base = RunConfig()
    return replace(
        base,
        num_server_rounds=args.rounds,
        lora=replace(
            base.lora, pooling="mean", pooling_layers=layers, feature_centering=center == "dp"
        ),
        train=replace(
            base.train,
            logit_adjustment=args.logit_adjustment,
            batch_size=batch,
            local_epochs=args.epochs,
        ),
        privacy=replace(
            base.privacy,
            dp_mode="local",
            dp_target_epsilon=args.epsilon,
            dp_max_grad_norm=args.clip,
        ),
    )


def dp_probe_run(
    feats: dict[str, Any],
    cfg: RunConfig,
    center: str,
    lr: float,
    noise_seed: int,
    args: argparse.Namespace,
) -> list[float]:
    """Accuracy per round of one federated DP-SGD run of the head."""
    layers, batch = cfg.lora.pooling_layers, cfg.train.batch_size
    g = torch.Generator().manual_seed(noise_seed)
    clients = [(x[:, -layers:].reshape(len(x), -1).double(), y) for x, y in feats["clients"]]
    test_x = feats["test"][0][:, -layers:].reshape(len(feats["test"][0]), -1).double()
    c = _center(clients, center, cfg, g)
    if c is not None:
        clients = [(x - c, y) for x, y in clients]
        test_x = test_x - c
    k, clip = int(feats["classes"]), cfg.privacy.dp_max_grad_norm
    weight = torch.zeros(k, test_x.shape[1] + 1, dtype=torch.double)
    add_one = lambda x: torch.cat([x, torch.ones(len(x), 1, dtype=torch.double)], 1)  # noqa: E731
    accs = []
    for _rnd in range(args.rounds):
        total, seen = torch.zeros_like(weight), 0
        for x, y in clients:
            n = len(x)
            rate, steps = steps_per_round(n, batch, cfg.train.local_epochs)
            sigma = _noise(cfg, n, batch, cfg.privacy.dp_delta, "rdp")
            prior = (
                label_log_prior(
                    y.tolist(), k, args.logit_adjustment, cfg.privacy.dp_label_noise, g
                ).double()
                if args.logit_adjustment > 0
                else torch.zeros(k, dtype=torch.double)
            )
            w, xb_all = weight.clone(), add_one(x)
            for _step in range(steps):
                pick = torch.rand(n, generator=g) < rate
                xb, yb = xb_all[pick], y[pick]
                err = torch.softmax(xb @ w.T + prior, -1) - torch.nn.functional.one_hot(yb, k)
                scale = (clip / (err.norm(dim=1) * xb.norm(dim=1)).clamp(min=1e-12)).clamp(max=1)
                grad = (err * scale[:, None]).T @ xb
                grad += sigma * clip * torch.randn(grad.shape, generator=g, dtype=torch.double)
                w -= lr * grad / (rate * n)
            total += n * w
            seen += n
        weight = total / seen
        pred = (add_one(test_x) @ weight.T).argmax(-1)
        accs.append(round(float((pred == feats["test"][1]).double().mean()), 4))
    return accs


def dp_probe(args: argparse.Namespace) -> None:
    grid = [
        (layers, center, lr, batch, _probe_config(layers, center, batch, args))
        for layers, center, lr, batch in itertools.product(
            [int(v) for v in args.layers.split(",")],
            args.center.split(","),
            [float(v) for v in args.lr.split(",")],
            [int(v) for v in args.batch.split(",")],
        )
    ]
    feats = _client_features(args)
    for layers, center, lr, batch, cfg in grid:
        runs = [dp_probe_run(feats, cfg, center, lr, s, args) for s in range(args.noise_seeds)]
        final = [r[-1] for r in runs]
        row = {
            "dataset": args.dataset,
            "seed": args.seed,
            "epsilon": args.epsilon,
            "layers": layers,
            "center": center,
            "lr": lr,
            "batch": batch,
            "rounds": args.rounds,
            "epochs": args.epochs,
            "clip": args.clip,
        }
        print(
            json.dumps(
                {
                    **row,
                    "final": final,
                    "mean_final": round(sum(final) / len(final), 4),
                    "per_round_first": runs[0],
                }
            ),
            flush=True,
        )


def adapter(args: argparse.Namespace) -> None:
    from safetensors.torch import load_file

    _pool, test = simulation_split(DataSettings(dataset=args.dataset), args.seed)
    y = torch.tensor(test.label_ids)
    for run in args.runs:
        folder = Path(run) / "adapter"
        tensors = load_file(str(folder / "adapter_model.safetensors"))
        config = json.loads((folder / "adapter_config.json").read_text())
        scale = float(config["lora_alpha"]) / float(config["r"])
        moved = [
            round(float((tensors[k.replace("lora_A", "lora_B")] @ tensors[k]).norm()) * scale, 3)
            for k in sorted(tensors)
            if "lora_A" in k
        ]
        head = {
            k.rsplit(".", 2)[-2] + "." + k.rsplit(".", 1)[-1]: round(float(v.norm()), 3)
            for k, v in tensors.items()
            if "lora_" not in k
        }
        model, labels = load_exported(folder)
        proba = predict_proba(model, encode(load_tokenizer(None), test, args.seq))
        pred = proba.argmax(-1)
        row: dict[str, Any] = {
            "run": str(run),
            "delta_w_norms": moved,
            "head_norms": head,
            "accuracy": round(float((pred == y).double().mean()), 4),
            "predicted_share": {
                label: round(float((pred == i).double().mean()), 3)
                for i, label in enumerate(labels)
            },
            "true_share": {
                label: round(float((y == i).double().mean()), 3) for i, label in enumerate(labels)
            },
        }
        if len(labels) == 2:
            score = proba[:, 1] - proba[:, 0]
            best = max(
                float(((score > t).long() == y).double().mean()) for t in torch.linspace(-1, 1, 401)
            )
            row["best_threshold_accuracy"] = round(best, 4)
        print(json.dumps(row), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("probe", "dp-probe", "adapter"):
        p = sub.add_parser(name)
        p.add_argument("--dataset", default="rotten-tomatoes")
        p.add_argument("--seed", type=int, default=42)
        p.add_argument("--seq", type=int, default=48)
        if name == "probe":
            p.add_argument("--layers", default="1,2,4")
            p.add_argument("--c", type=float, default=1.0)
        elif name == "dp-probe":
            p.add_argument("--layers", default="1,4")
            p.add_argument("--center", default="none,dp", help="none, exact, dp (comma list)")
            p.add_argument("--lr", default="4,8")
            p.add_argument("--batch", default="128,256")
            p.add_argument("--epsilon", type=float, default=8.0)
            p.add_argument("--rounds", type=int, default=3)
            p.add_argument("--epochs", type=int, default=1, help="local epochs per round")
            p.add_argument("--clip", type=float, default=1.0, help="per-example clip norm")
            p.add_argument("--clients", type=int, default=10)
            p.add_argument("--alpha", type=float, default=0.5)
            p.add_argument("--logit-adjustment", type=float, default=1.0)
            p.add_argument("--noise-seeds", type=int, default=3)
            p.add_argument("--cache", default="", help="file to keep the features in")
        else:
            p.add_argument("runs", nargs="+", help="run directories holding adapter/")
    args = parser.parse_args()
    if args.command == "probe":
        probe(args)
    elif args.command == "dp-probe":
        dp_probe(args)
    else:
        adapter(args)


if __name__ == "__main__":
    main()
