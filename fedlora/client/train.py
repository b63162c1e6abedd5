"""Local training and evaluation of the LoRA adapter on a site's examples.

Plain PyTorch loops on purpose: they are short, they run the same in a
hospital's node and in a simulation worker, and the DP path swaps in Opacus'
optimizer and Poisson sampler without a different loop. Randomness (shuffle
order, dropout) comes from generators seeded by ``(seed, round, site)`` so a
round reproduces on its own.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader

from fedlora.errors import DataError
from fedlora.models.batches import EncodedDataset, make_loader, to_device
from fedlora.models.task import SEQUENCE_CLASSIFICATION, Task
from fedlora.privacy.dpsgd import empty_batch_step
from fedlora.settings import TrainSettings


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
    task: Task = SEQUENCE_CLASSIFICATION,
) -> TrainResult:
    """Run ``epochs`` passes; returns mean loss and accuracy over seen examples.

    The objective is the ``task``'s (:mod:`fedlora.models.task`).
    ``log_prior`` (from :func:`label_log_prior`) is added to the logits of
    the training loss only; accuracy is reported on the plain logits.
    """
    loss_fn = task.loss
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
                loss, right = loss_fn(model, batch, log_prior)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                # a physical piece of a DP batch only accumulates (BatchMemoryManager)
                steps += 0 if getattr(optimizer, "_is_last_step_skipped", False) else 1
                loss_sum += float(loss.detach()) * labels.numel()
                correct += right
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
    task: Task = SEQUENCE_CLASSIFICATION,
) -> TrainResult:
    """Non-private local training of the trainable tensors, on the ``task``'s loss."""
    loader = make_loader(dataset, settings.batch_size, shuffle=True, generator=generator)
    optimizer = make_optimizer(model, settings)
    log_prior = None
    if settings.logit_adjustment > 0:  # no DP here: the exact counts
        num_classes = int(getattr(model, "config").num_labels)  # noqa: B009
        log_prior = label_log_prior(dataset.labels, num_classes, settings.logit_adjustment)
    result = train_epochs(
        model, loader, optimizer, settings.local_epochs, generator, log_prior, task
    )
    # Report the number of local examples (FedAvg's weight), not examples x epochs.
    return TrainResult(result.loss, result.accuracy, len(dataset), result.steps, result.seconds)
