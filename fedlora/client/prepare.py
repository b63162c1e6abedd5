"""What a handler needs first: the run config, this node's data, the model with the adapter.

A node finds its data in its own node config (``data-path``,
``text-column``, ``label-column``); the server never names a file at a
site. In a simulation the node config instead carries ``partition-id`` and
``num-partitions`` and the node reads its slice of the demo corpus. The
model comes from the run's task (:mod:`fedlora.models.task`), cached per
process, with the adapter the server sent loaded strictly.
"""

from __future__ import annotations

import dataclasses
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from flwr.app import (
    ConfigRecord,
    Context,
    Message,
)

from fedlora.client.modes import NodeMode, Tamper, node_mode
from fedlora.config import RunConfig
from fedlora.data.labels import LabelSpace
from fedlora.data.partition import client_partition, read_site_file, simulation_split
from fedlora.data.sources import TextDataset
from fedlora.errors import ConfigError
from fedlora.models.adapter import load_adapter_state, set_lora_a_trainable
from fedlora.models.batches import EncodedDataset
from fedlora.models.loading import cached_model, load_tokenizer
from fedlora.models.pooling import set_feature_center
from fedlora.models.task import get_task
from fedlora.protocol import (
    ARRAYS_KEY,
    CONFIG_KEY,
    KEY_FEATURE_CENTER,
    KEY_SERVER_ROUND,
    NODE_DATA_PATH,
    NODE_LABEL_COLUMN,
    NODE_MESSAGES_COLUMN,
    NODE_NUM_PARTITIONS,
    NODE_PARTITION_ID,
    NODE_PROMPT_COLUMN,
    NODE_RESPONSE_COLUMN,
    NODE_TEXT_COLUMN,
    QUERY_FEATURE_STATS,
)
from fedlora.records import arrays_to_state
from fedlora.task_settings import TASK_CAUSAL_LM

#: Offsets the subset's random stream from the round's training generator.
_SUBSET_STREAM = 0x5EED


@lru_cache(maxsize=4)
def _run_config(items: tuple[tuple[str, Any], ...]) -> RunConfig:
    return RunConfig.from_flat(dict(items))


def run_config_of(context: Context, overrides: dict[str, Any] | None = None) -> RunConfig:
    """The validated run config of this context (parsed once per process)."""
    flat = {**dict(context.run_config), **(overrides or {})}
    return _run_config(tuple(sorted(flat.items())))


def _federation_labels(cfg: RunConfig) -> LabelSpace | None:
    if cfg.data.labels:
        return LabelSpace.of(cfg.data.labels)
    if cfg.data.dataset == "file" and cfg.task == TASK_CAUSAL_LM:
        return None  # free-text answers: no label list to agree on
    if cfg.data.dataset == "file":
        raise ConfigError(
            "a federation over site files needs the run config key 'labels' "
            "(e.g. labels='negative,positive') so every site maps labels to the same ids"
        )
    pool, _ = simulation_split(cfg.data, cfg.seed)
    return pool.labels


def local_dataset(cfg: RunConfig, context: Context) -> tuple[TextDataset, int]:
    """This node's examples and a site index for seeding."""
    node = context.node_config
    if NODE_DATA_PATH in node:
        labels = _federation_labels(cfg)
        columns = dataclasses.replace(
            cfg.data,
            text_column=str(node.get(NODE_TEXT_COLUMN, cfg.data.text_column)),
            label_column=str(node.get(NODE_LABEL_COLUMN, cfg.data.label_column)),
            prompt_column=str(node.get(NODE_PROMPT_COLUMN, cfg.data.prompt_column)),
            response_column=str(node.get(NODE_RESPONSE_COLUMN, cfg.data.response_column)),
            messages_column=str(node.get(NODE_MESSAGES_COLUMN, cfg.data.messages_column)),
        )
        data = read_site_file(columns, str(node[NODE_DATA_PATH]), labels)
        return data, int(context.node_id) % 1_000_003
    if NODE_PARTITION_ID not in node:
        raise ConfigError(
            "this node has neither 'data-path' (a real site) nor 'partition-id' "
            "(a simulated one) in its node config; start it with "
            "--node-config \"data-path='/data/notes.csv'\""
        )
    pid, n = int(node[NODE_PARTITION_ID]), int(node[NODE_NUM_PARTITIONS])
    return client_partition(cfg.data, cfg.seed, pid, n), pid


@lru_cache(maxsize=8)
def _encoded(task: str, folder: str, max_len: int, texts: TextDataset) -> EncodedDataset:
    """Tokenised once per worker; ``texts`` (rows and label ids) is the cache key."""
    return get_task(task).encode(load_tokenizer(folder), texts, max_len)


def prepare(
    msg: Message,
    context: Context,
    overrides: dict[str, Any] | None = None,
    node: NodeMode | None = None,
    tamper: Tamper | None = None,
) -> tuple[RunConfig, Any, EncodedDataset, int]:
    """Validate config, load data and model, and install the global adapter.

    ``node`` sets the model's rank and which LoRA factors train (default: the
    node's mode for this run); ``poison_data`` applies a simulated
    label-flip attack when this partition mounts one.
    """
    cfg = run_config_of(context, overrides)
    node = node or node_mode(cfg, context)
    data, site = local_dataset(cfg, context)
    data = round_subset(data, cfg.train.max_train_examples, cfg.seed, server_round_of(msg), site)
    if tamper is not None:  # simulations only (fedlora.simulations.attacks)
        data = tamper.data(cfg, context, data)
    task = get_task(cfg.task)
    folder = str(task.folder(cfg.model_path or None))
    encoded = _encoded(task.name, folder, cfg.train.max_seq_length, data)
    lora = dataclasses.replace(cfg.lora, rank=node.rank)
    model = cached_model(folder, len(data.labels), lora, cfg.seed, task.build_model)
    # Every use sets it: the cached model may have served another mode before.
    set_lora_a_trainable(model, node.trains_a)
    state = arrays_to_state(msg.content.array_records[ARRAYS_KEY])
    load_adapter_state(model, state)
    set_feature_center(model, message_center(msg, cfg))
    return cfg, model, encoded, site


def server_round_of(msg: Message) -> int:
    """The round number the server put in a message (0 if absent).

    Raises
    ------
    ConfigError
        If it is not a whole number >= 0: the ledger records it.
    """
    config = msg.content.config_records.get(CONFIG_KEY, ConfigRecord())
    value = config.get(KEY_SERVER_ROUND, 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"the server sent {KEY_SERVER_ROUND}={value!r}; expected an int >= 0")
    return value


def round_subset(
    data: TextDataset, limit: int, seed: int, server_round: int, site: int
) -> TextDataset:
    """``limit`` rows drawn afresh each round (seeded by run seed, round and site).

    A fixed first ``limit`` rows would leave the rest of a site's data unused
    for the whole run. Privacy pricing is unchanged and conservative: the
    ledger charges every round at the sampling rate within the subset, as if
    every row were in every round's subset (no amplification is claimed for
    the draw, whose seed the server can see).
    """
    if not limit or len(data) <= limit:
        return data
    gen = torch.Generator().manual_seed(
        (seed * 1_000_003 + server_round * 10_007 + site * 31 + _SUBSET_STREAM) % (2**63 - 1)
    )
    picked = sorted(torch.randperm(len(data), generator=gen)[:limit].tolist())
    return data.subset(picked, f"{data.source}[round {server_round}: {limit} of {len(data)}]")


def message_center(msg: Message, cfg: RunConfig) -> np.ndarray | None:
    """The feature centre the server sent with this message (feature-centering).

    Fails closed: a run with feature-centering whose message carries no centre
    would train a head on a different vector than the server evaluates.
    """
    config = msg.content.config_records.get(CONFIG_KEY, ConfigRecord())
    if KEY_FEATURE_CENTER in config:
        return np.asarray(config[KEY_FEATURE_CENTER], dtype=np.float32)
    if cfg.lora.feature_centering and QUERY_FEATURE_STATS not in config:
        raise ConfigError(
            "feature-centering=true but the server's message carries no feature-center; "
            "server and node must run the same fedlora version and run config"
        )
    return None
