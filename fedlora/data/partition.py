"""Simulation splits: the server's held-out test set and per-client partitions.

Partitioning reuses flwr-datasets' partitioners (IID, Dirichlet over labels,
natural id); this module adds a registry by name, a seeded stratified
train/test split for the server's global evaluation, and a per-process cache
so a worker serving many virtual clients builds each split once.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from functools import lru_cache
from typing import Any

import numpy as np

from fedlora.data.catalog import load_demo
from fedlora.data.instructions import load_instruction_table
from fedlora.data.labels import LabelSpace
from fedlora.data.sources import TextDataset, load_table
from fedlora.errors import ConfigError, DataError
from fedlora.task_settings import TASK_CAUSAL_LM, DataSettings

PartitionerFactory = Callable[[DataSettings, int, int, int], object]


def _iid(data: DataSettings, num_partitions: int, seed: int, n: int) -> object:
    from flwr_datasets.partitioner import IidPartitioner

    return IidPartitioner(num_partitions=num_partitions)


def _dirichlet(data: DataSettings, num_partitions: int, seed: int, n: int) -> object:
    from flwr_datasets.partitioner import DirichletPartitioner

    # Many clients over a small corpus cannot all get 10 examples; ask for
    # what the corpus can give so flwr-datasets' resampling terminates.
    min_size = int(min(10, max(1, n // (4 * num_partitions))))
    return DirichletPartitioner(
        num_partitions=num_partitions,
        partition_by="label",
        alpha=data.dirichlet_alpha,
        min_partition_size=min_size,
        self_balancing=False,
        shuffle=True,
        seed=seed,
    )


def _column(data: DataSettings, num_partitions: int, seed: int, n: int) -> object:
    from flwr_datasets.partitioner import NaturalIdPartitioner

    return NaturalIdPartitioner(partition_by="group")


PARTITIONERS: dict[str, PartitionerFactory] = {
    "iid": _iid,
    "dirichlet": _dirichlet,
    "column": _column,
}


def check_partitioner(name: str) -> None:
    """Reject an unknown partitioner name with the list of known ones."""
    if name not in PARTITIONERS:
        raise ConfigError(
            f"config key 'partitioner' has value {name!r}; allowed: {', '.join(PARTITIONERS)}"
        )


def stratified_split(
    data: TextDataset, test_fraction: float, seed: int
) -> tuple[TextDataset, TextDataset]:
    """Seeded, label-stratified train/test split (every class in the test set)."""
    rng = np.random.default_rng([seed, 0x7E57])
    labels = np.asarray(data.label_ids)
    test_idx: list[int] = []
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        rng.shuffle(rows)
        k = max(1, round(len(rows) * test_fraction)) if len(rows) > 1 else 0
        test_idx.extend(rows[:k].tolist())
    test_set = set(test_idx)
    train_idx = [i for i in range(len(data)) if i not in test_set]
    return (
        data.subset(train_idx, f"{data.source}[train]"),
        data.subset(sorted(test_idx), f"{data.source}[test]"),
    )


def load_source(data: DataSettings) -> TextDataset:
    """The whole corpus a simulation splits: a demo dataset or one file."""
    labels = LabelSpace.of(data.labels) if data.labels else None
    if data.dataset == "file":
        group = data.partition_column if data.partitioner == "column" else ""
        return read_site_file(data, data.data_file, labels, group)
    corpus = load_demo(data.dataset)
    if labels is not None and labels != corpus.labels:
        raise ConfigError(
            f"labels={','.join(labels.names)} differs from dataset {data.dataset}'s "
            f"labels {','.join(corpus.labels.names)}; leave 'labels' empty for demo data"
        )
    return corpus


def read_site_file(
    data: DataSettings, path: str, labels: LabelSpace | None, group: str = ""
) -> TextDataset:
    """A site's file, as the run's task reads it: instructions, or texts with labels."""
    if data.task == TASK_CAUSAL_LM:
        return load_instruction_table(
            path, data.prompt_column, data.response_column, data.messages_column, labels, group
        )
    return load_table(path, data.text_column, data.label_column, labels, group)


@lru_cache(maxsize=2)
def simulation_split(data: DataSettings, seed: int) -> tuple[TextDataset, TextDataset]:
    """(clients' pool, server's held-out test) for a simulation, cached per process."""
    corpus = load_source(data)
    return stratified_split(corpus, data.test_fraction, seed)


@lru_cache(maxsize=4)
def _partition_indices(
    data: DataSettings, seed: int, num_partitions: int
) -> tuple[tuple[int, ...], ...]:
    import datasets

    check_partitioner(data.partitioner)
    pool, _ = simulation_split(data, seed)
    if data.partitioner == "column":
        if not pool.groups:
            raise ConfigError(
                "partitioner='column' needs partition-column naming a column of the "
                "data file (demo rotten-tomatoes has 'movie_name' built in)"
            )
        n_groups = len(set(pool.groups))
        if n_groups < num_partitions:
            raise ConfigError(
                f"partitioner='column' found {n_groups} distinct values but the "
                f"simulation has {num_partitions} clients; set num-supernodes<={n_groups}"
            )
        if n_groups > num_partitions:
            return _grouped_indices(pool.groups, num_partitions)
    table = datasets.Dataset.from_dict(
        {
            "idx": list(range(len(pool))),
            "label": list(pool.label_ids),
            "group": list(pool.groups) if pool.groups else [""] * len(pool),
        }
    )
    if num_partitions > len(pool):
        raise DataError(
            f"{num_partitions} clients but only {len(pool)} training examples in "
            f"{pool.source} (after the {data.test_fraction:g} test split); every client "
            f"needs at least one. Use at most {len(pool)} clients (-n) or more data"
        )
    if data.partitioner == "iid":
        # flwr-datasets' IidPartitioner takes contiguous shards, and the pool
        # comes label by label from the stratified split: unshuffled, "iid"
        # gave each site one or two labels.
        table = table.shuffle(seed=seed)
    partitioner = PARTITIONERS[data.partitioner](data, num_partitions, seed, len(pool))
    partitioner.dataset = table  # type: ignore[attr-defined]
    out = []
    for pid in range(num_partitions):
        part = partitioner.load_partition(pid)  # type: ignore[attr-defined]
        out.append(tuple(int(i) for i in part["idx"]))
    return tuple(out)


def _grouped_indices(groups: tuple[str, ...], num_partitions: int) -> tuple[tuple[int, ...], ...]:
    """More natural ids than sites: each id (a condition, a drug) goes whole to one site.

    Largest id first, each to the site holding fewest rows so far (ties to the
    lower site, ids by name): a deterministic, natural non-IID split in which
    no value of the column is shared by two sites.
    """
    rows: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        rows.setdefault(g, []).append(i)
    parts: list[list[int]] = [[] for _ in range(num_partitions)]
    for g in sorted(rows, key=lambda k: (-len(rows[k]), k)):
        target = min(range(num_partitions), key=lambda p: (len(parts[p]), p))
        parts[target].extend(rows[g])
    return tuple(tuple(sorted(p)) for p in parts)


def client_partition(
    data: DataSettings, seed: int, partition_id: int, num_partitions: int
) -> TextDataset:
    """The slice of the pool virtual client ``partition_id`` holds."""
    if not 0 <= partition_id < num_partitions:
        raise DataError(f"partition-id {partition_id} outside 0..{num_partitions - 1}")
    pool, _ = simulation_split(data, seed)
    idx = _partition_indices(data, seed, num_partitions)[partition_id]
    return pool.subset(list(idx), f"{pool.source}[partition {partition_id}/{num_partitions}]")


def partition_summary(data: DataSettings, seed: int, num_partitions: int) -> list[dict[str, Any]]:
    """Each virtual client's example count and label counts (by label name).

    How non-IID a partition is decides much of what a run can reach (e.g. a
    Dirichlet split whose largest client is 92 % one class); the simulation
    writes this next to the metrics so a researcher sees it, not guesses it.
    """
    pool, _ = simulation_split(data, seed)
    names = pool.labels.names
    out = []
    for pid, idx in enumerate(_partition_indices(data, seed, num_partitions)):
        counts = Counter(pool.label_ids[i] for i in idx)
        out.append(
            {
                "partition": pid,
                "examples": len(idx),
                "labels": {name: counts.get(k, 0) for k, name in enumerate(names)},
            }
        )
    return out
