"""Evaluation and prediction of a classifier: the node's and the server's alike.

The server evaluates the global adapter on its held-out split and the
ensembles predict with several adapters, by the same code a node evaluates
with, so the figures they report mean the same thing.
"""

from __future__ import annotations

import torch

from fedlora.models.batches import EncodedDataset, eval_batches, to_device


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, dataset: EncodedDataset, batch_size: int = 64
) -> tuple[float, float, int]:
    """(mean loss, accuracy, examples) of ``model`` on ``dataset``."""
    model.eval()
    loss_sum, correct, seen = 0.0, 0, 0
    for _idx, batch in eval_batches(dataset, batch_size):
        batch = to_device(batch, model)
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        labels = batch["labels"]
        loss_sum += float(torch.nn.functional.cross_entropy(out.logits, labels, reduction="sum"))
        correct += int((out.logits.argmax(-1) == labels).sum())
        seen += int(labels.numel())
    return loss_sum / max(seen, 1), correct / max(seen, 1), seen


@torch.no_grad()
def predict_proba(
    model: torch.nn.Module, dataset: EncodedDataset, batch_size: int = 64
) -> torch.Tensor:
    """Class probabilities for every example, in dataset order."""
    model.eval()
    out = torch.empty(0)
    for idx, batch in eval_batches(dataset, batch_size):
        batch = to_device(batch, model)
        probs = torch.softmax(
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
            dim=-1,
        )
        if out.numel() == 0:
            out = torch.zeros((len(dataset), probs.shape[-1]))
        out[torch.tensor(idx)] = probs.cpu()
    return out
