"""Local training and evaluation of the LoRA adapter on a site's examples.

Plain PyTorch loops on purpose: they are short, they run the same in a
hospital's node and in a simulation worker, and the DP path swaps in Opacus'
optimizer and Poisson sampler without a different loop. Randomness (shuffle
order, dropout) comes from generators seeded by ``(seed, round, site)`` so a
round reproduces on its own.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from fedlora.config import TrainSettings
from fedlora.data.sources import TextDataset
from fedlora.errors import DataError
from fedlora.privacy.dpsgd import empty_batch_step


class EncodedDataset(Dataset[dict[str, torch.Tensor]]):
    """Token ids (unpadded) and labels; batches are padded by :func:`collate`."""

    def __init__(self, input_ids: list[list[int]], labels: Sequence[int], pad_id: int):
        self.input_ids = input_ids
        self.labels = list(labels)
        self.pad_id = pad_id

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {
            "input_ids": torch.tensor(self.input_ids[i], dtype=torch.long),
            "labels": torch.tensor(self.labels[i], dtype=torch.long),
        }


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
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


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


def round_generator(seed: int, server_round: int, site: int) -> torch.Generator:
    """Generator for one site's round: reproducible, independent across sites."""
    gen = torch.Generator()
    gen.manual_seed((seed * 1_000_003 + server_round * 10_007 + site) % (2**63 - 1))
    return gen


@dataclass(frozen=True)
class TrainResult:
    """What a round of local training reports."""

    loss: float
    accuracy: float
    num_examples: int
    steps: int
    seconds: float


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Only the adapter's tensors: the base stays frozen."""
    return [p for p in model.parameters() if p.requires_grad]


def noisy_label_counts(
    labels: Sequence[int],
    num_classes: int,
    noise_std: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Per-class counts, plus N(0, noise_std^2) each when ``noise_std`` > 0:
    the Gaussian mechanism on a histogram (L2 sensitivity 1 under
    add/remove-one), which is what local DP may release."""
    counts = torch.bincount(torch.tensor(list(labels), dtype=torch.long), minlength=num_classes)
    if counts.numel() != num_classes:
        raise DataError(f"label ids reach {counts.numel() - 1}, but the model has {num_classes}")
    noisy = counts.double()
    if noise_std > 0:
        noise = torch.randn(num_classes, generator=generator, dtype=torch.double)
        noisy = noisy + noise_std * noise
    return noisy


def label_log_prior(
    labels: Sequence[int],
    num_classes: int,
    tau: float,
    noise_std: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``tau * log(prior)`` from this node's label counts, for logit adjustment.

    Under label skew each node's loss rewards predicting its own majority
    class, and FedAvg carries that into the shared head; training on
    ``logits + tau*log(prior)`` (Menon et al. 2021; FedLC, Zhang et al. 2022)
    leaves the model the *balanced* part to learn. Counts (noised by
    :func:`noisy_label_counts` under local DP) are floored at 1 so every
    class keeps a finite log prior.
    """
    counts = noisy_label_counts(labels, num_classes, noise_std, generator).clamp(min=1.0)
    return (tau * (counts / counts.sum()).log()).float()


def train_epochs(
    model: torch.nn.Module,
    loader: DataLoader[Any],
    optimizer: torch.optim.Optimizer,
    epochs: int,
    generator: torch.Generator | None = None,
    log_prior: torch.Tensor | None = None,
) -> TrainResult:
    """Run ``epochs`` passes; returns mean loss and accuracy over seen examples.

    ``log_prior`` (from :func:`label_log_prior`) is added to the logits of
    the training loss only; accuracy is reported on the plain logits.
    """
    model.train()
    start = time.perf_counter()
    loss_sum, correct, seen, steps = 0.0, 0, 0, 0
    with torch.random.fork_rng(devices=[]):
        if generator is not None:
            # Dropout draws from the global generator; fork it so library code
            # never disturbs the caller's RNG, and seed it for reproducibility.
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
        for _ in range(epochs):
            for batch in loader:
                batch = to_device(batch, model)
                labels = batch["labels"]
                if labels.numel() == 0:
                    # An empty Poisson batch still takes its noise step, as the
                    # accountant assumes (see empty_batch_step).
                    empty_batch_step(optimizer)
                    steps += 1
                    continue
                out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                logits = out.logits if log_prior is None else out.logits + log_prior
                loss = torch.nn.functional.cross_entropy(logits, labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                steps += 1
                loss_sum += float(loss.detach()) * labels.numel()
                correct += int((out.logits.argmax(-1) == labels).sum())
                seen += int(labels.numel())
    return TrainResult(
        loss=loss_sum / max(seen, 1),
        accuracy=correct / max(seen, 1),
        num_examples=seen,
        steps=steps,
        seconds=time.perf_counter() - start,
    )


def make_optimizer(model: torch.nn.Module, settings: TrainSettings) -> torch.optim.Optimizer:
    """The configured local optimiser over the trainable tensors.

    AdamW suits non-private LoRA. Under DP-SGD, plain (or momentum) SGD with a
    large rate is the better default: Adam divides by the running RMS, so
    every coordinate whose gradient is mostly noise still moves by about
    ``lr`` each step, and for a 75k-entry adapter that random walk swamps the
    signal (measured in docs/RESULTS.md).
    """
    params: Any = trainable_parameters(model)
    if settings.lora_lr_ratio != 1.0:
        lora = {id(p) for n, p in model.named_parameters() if "lora_" in n}
        groups: list[dict[str, Any]] = [
            {"params": [p for p in params if id(p) not in lora]},
            {
                "params": [p for p in params if id(p) in lora],
                "lr": settings.learning_rate * settings.lora_lr_ratio,
            },
        ]
        params = [g for g in groups if g["params"]]
    if settings.optimizer == "sgd":
        return torch.optim.SGD(params, lr=settings.learning_rate, momentum=settings.momentum)
    return torch.optim.AdamW(params, lr=settings.learning_rate)


def local_train(
    model: torch.nn.Module,
    dataset: EncodedDataset,
    settings: TrainSettings,
    generator: torch.Generator,
) -> TrainResult:
    """Non-private local training of the trainable tensors."""
    loader = make_loader(dataset, settings.batch_size, shuffle=True, generator=generator)
    optimizer = make_optimizer(model, settings)
    log_prior = None
    if settings.logit_adjustment > 0:  # no DP here: the exact counts
        num_classes = int(getattr(model, "config").num_labels)  # noqa: B009
        log_prior = label_log_prior(dataset.labels, num_classes, settings.logit_adjustment)
    result = train_epochs(model, loader, optimizer, settings.local_epochs, generator, log_prior)
    # Report the number of local examples (FedAvg's weight), not examples x epochs.
    return TrainResult(result.loss, result.accuracy, len(dataset), result.steps, result.seconds)


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


def eval_batches(
    dataset: EncodedDataset, batch_size: int
) -> Iterator[tuple[list[int], dict[str, torch.Tensor]]]:
    """(row indices, padded batch), sorted by length so evaluation pads little."""
    order = sorted(range(len(dataset)), key=lambda i: len(dataset.input_ids[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        yield idx, collate([dataset[i] for i in idx], dataset.pad_id)


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
