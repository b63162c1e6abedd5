"""Examples as token ids, padded per batch: what a model is trained and evaluated on.

Tokenised once per dataset, unpadded; :func:`collate` pads each batch to its
longest row, so short texts stay cheap. The node's training, the server's
global evaluation and the ensembles read the same batches.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from fedlora.data.sources import TextDataset
from fedlora.errors import DataError


class EncodedDataset(Dataset[dict[str, torch.Tensor]]):
    """Token ids (unpadded) and labels; batches are padded by :func:`collate`.

    ``targets`` (a causal LM's per-token targets, -100 on the prompt) travel
    with each row when given; ``labels`` stay the examples' label ids.
    """

    def __init__(
        self,
        input_ids: list[list[int]],
        labels: Sequence[int],
        pad_id: int,
        targets: list[list[int]] | None = None,
    ):
        self.input_ids = input_ids
        self.labels = list(labels)
        self.pad_id = pad_id
        self.targets = targets
        self.prompt_lengths: list[int] = []  # causal LM: where each response starts
        self.choices: list[list[int]] = []  # causal LM, label answers: each label's tokens

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = {
            "input_ids": torch.tensor(self.input_ids[i], dtype=torch.long),
            "labels": torch.tensor(self.labels[i], dtype=torch.long),
        }
        if self.targets is not None:
            item["targets"] = torch.tensor(self.targets[i], dtype=torch.long)
        return item


def encode(tokenizer: Any, data: TextDataset, max_seq_length: int) -> EncodedDataset:
    """Tokenise once; padding happens per batch so short texts stay cheap."""
    if len(data) == 0:
        raise DataError(f"{data.source} has no examples to train or evaluate on")
    ids = tokenizer(list(data.texts), truncation=True, max_length=max_seq_length, padding=False)[
        "input_ids"
    ]
    return EncodedDataset(ids, data.label_ids, int(tokenizer.pad_token_id or 0))


def collate(batch: list[dict[str, torch.Tensor]], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Pad a batch to its longest sequence and build the attention mask."""
    if not batch:  # Poisson sampling (DP) can draw an empty batch
        return {
            "input_ids": torch.zeros((0, 1), dtype=torch.long),
            "attention_mask": torch.zeros((0, 1), dtype=torch.long),
            "labels": torch.zeros((0,), dtype=torch.long),
        }
    length = max(int(b["input_ids"].numel()) for b in batch)
    ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), length), dtype=torch.long)
    for row, item in enumerate(batch):
        n = int(item["input_ids"].numel())
        ids[row, :n] = item["input_ids"]
        mask[row, :n] = 1
    labels = torch.stack([b["labels"] for b in batch])
    out = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if "targets" in batch[0]:  # per-token targets, padded with the ignore index
        targets = torch.full((len(batch), length), -100, dtype=torch.long)
        for row, item in enumerate(batch):
            targets[row, : int(item["targets"].numel())] = item["targets"]
        out["targets"] = targets
    return out


def make_loader(
    dataset: EncodedDataset, batch_size: int, shuffle: bool, generator: torch.Generator | None
) -> DataLoader[Any]:
    """A loader whose shuffle order is fixed by ``generator``."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        collate_fn=lambda b: collate(b, dataset.pad_id),
    )


def to_device(batch: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Put a batch where the model's weights are (a GPU share, or the CPU)."""
    device = next(model.parameters()).device
    if device.type == "cpu":
        return batch
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def eval_batches(
    dataset: EncodedDataset, batch_size: int
) -> Iterator[tuple[list[int], dict[str, torch.Tensor]]]:
    """(row indices, padded batch), sorted by length so evaluation pads little."""
    order = sorted(range(len(dataset)), key=lambda i: len(dataset.input_ids[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        yield idx, collate([dataset[i] for i in idx], dataset.pad_id)
