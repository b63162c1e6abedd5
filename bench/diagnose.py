"""Why does a private run plateau? Two diagnostics behind docs/RESULTS.md.

``probe``: the linear-probe ceiling. Logistic regression (full batch,
L-BFGS, L2 as scikit-learn's ``C``) on the *frozen* encoder's mean-pooled
features of a simulation's client pool, scored on the server's held-out
split (same seed, same split as ``fedlora simulate``). A private run that
ends at this number has learned a linear head and nothing in LoRA.

``adapter``: for finished runs (their ``adapter/`` folders), how far each
LoRA layer moved (``‖scale·B·A‖``), the head's norms, the share of test
examples predicted as each label, and the accuracy at the best threshold on
``p1 - p0`` (two-label data): a gap between that and the plain accuracy is
miscalibration, not missing features.

    .venv/bin/python bench/diagnose.py probe --dataset rotten-tomatoes --seed 44 --layers 1,2,4
    .venv/bin/python bench/diagnose.py adapter --dataset rotten-tomatoes --seed 44 RUN_DIR ...

Prints one JSON object per line.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from fedlora.client.train import collate, encode, predict_proba
from fedlora.config import DataSettings
from fedlora.data.partition import simulation_split
from fedlora.data.sources import TextDataset
from fedlora.models import load_exported, load_tokenizer, resolve_model_path


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
    for name in ("probe", "adapter"):
        p = sub.add_parser(name)
        p.add_argument("--dataset", default="rotten-tomatoes")
        p.add_argument("--seed", type=int, default=42)
        p.add_argument("--seq", type=int, default=48)
        if name == "probe":
            p.add_argument("--layers", default="1,2,4")
            p.add_argument("--c", type=float, default=1.0)
        else:
            p.add_argument("runs", nargs="+", help="run directories holding adapter/")
    args = parser.parse_args()
    if args.command == "probe":
        probe(args)
    else:
        adapter(args)


if __name__ == "__main__":
    main()
