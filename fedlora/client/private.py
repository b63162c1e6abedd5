"""A node's local DP round: its own budget, its own ledger, DP-SGD or nothing.

The order of a private round is the point of this module:

1. Read the node's *own* privacy settings (ε cap, δ, accountant, ledger
   folder) from its node config — the server's run config cannot set, raise
   or reset them. A node with a cap refuses any work without local DP
   (:func:`require_site_dp`).
2. Open the node's ledger (keyed by its data alone for a real site, so no
   run-config value can open a fresh one) and, if an
   earlier round shows that another one would pass the cap, refuse **before
   the data is read**.
3. Read the data, work out this round's exact cost once (sample rate,
   steps, noise multiplier: :func:`fedlora.privacy.releases.training_round_releases`),
   refuse if spent + cost > cap.
4. Train with Opacus DP-SGD on a copy of the model (Opacus' hooks never stay
   on the cached model) — any failure to apply DP is an error, never a
   fallback to non-private training.
5. Record the round's releases in the ledger, in one atomic write, once DP
   is in place and *before* any of them is used or the update leaves.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from flwr.app import Context
from opacus.utils.batch_memory_manager import BatchMemoryManager

from fedlora.client.train import TrainResult, label_log_prior, make_optimizer, train_epochs
from fedlora.config import RunConfig
from fedlora.errors import ConfigError, PrivacyError
from fedlora.models.batches import EncodedDataset, make_loader
from fedlora.models.task import get_task
from fedlora.privacy.accounting import HistoryEntry, steps_per_round
from fedlora.privacy.dpsgd import make_private, round_generators
from fedlora.privacy.ledger import PrivacyLedger
from fedlora.privacy.plan import effective_config, site_sigma
from fedlora.privacy.releases import (
    DEFAULT_PUBLIC_EXAMPLES,
    training_round_releases,
)
from fedlora.privacy.settings import DPConfig
from fedlora.protocol import (
    METRIC_DELTA,
    METRIC_EPSILON,
    NODE_ACCOUNTANT,
    NODE_DATA_PATH,
    NODE_DELTA,
    NODE_EPSILON_CAP,
    NODE_LEDGER_DIR,
    NODE_PUBLIC_EXAMPLES,
)

# Node-config keys a site's operator sets (never the server).

#: The ledger scope of a real site. A site's ledger is keyed by its data,
#: never by a name from the server's run config (``federation``): that name
#: could otherwise open a fresh, empty ledger for the same data at will.
SITE_SCOPE = "site"


@dataclass(frozen=True)
class NodePrivacy:
    """The privacy limits a node's operator set for this node."""

    epsilon_cap: float  # math.inf = no cap (simulations only)
    delta: float
    ledger_dir: Path
    accountant: str


def node_privacy(cfg: RunConfig, context: Context) -> NodePrivacy:
    """The node's own limits; a real site must set them in its node config."""
    node = context.node_config
    if NODE_DATA_PATH in node:
        missing = [k for k in (NODE_EPSILON_CAP, NODE_DELTA, NODE_LEDGER_DIR) if k not in node]
        if missing:
            raise PrivacyError(
                f"the federation runs local DP but this node's config lacks "
                f"{', '.join(missing)}; the node operator sets them, e.g. --node-config "
                '"privacy-epsilon-cap=8.0 privacy-delta=1e-5 '
                "privacy-ledger-dir='/var/lib/fedlora/ledger'\""
            )
        try:
            cap, delta = float(node[NODE_EPSILON_CAP]), float(node[NODE_DELTA])  # type: ignore[arg-type]
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"node privacy settings must be numbers: {exc}") from None
        if not (math.isfinite(cap) and cap > 0) or not 0 < delta < 1:
            raise ConfigError(
                f"node config has privacy-epsilon-cap={cap}, privacy-delta={delta}; "
                "need a finite cap > 0 (a site's cap cannot be switched off) and 0 < delta < 1"
            )
        accountant = str(node.get(NODE_ACCOUNTANT, "rdp"))  # the site's, not the run's
        if accountant not in ("rdp", "prv"):
            raise ConfigError(f"node config has privacy-accountant={accountant!r}; use rdp or prv")
        return NodePrivacy(
            epsilon_cap=cap,
            delta=delta,
            ledger_dir=Path(str(node[NODE_LEDGER_DIR])),
            accountant=accountant,
        )
    # A virtual node has no config of its own: the simulation stands in for it.
    p = cfg.privacy
    return NodePrivacy(
        epsilon_cap=p.sim_epsilon_cap if p.sim_epsilon_cap > 0 else math.inf,
        delta=p.dp_delta,
        ledger_dir=Path(p.sim_ledger_dir) if p.sim_ledger_dir else cfg.run_path / "ledgers",
        accountant=p.dp_accountant,
    )


def dataset_identity(cfg: RunConfig, context: Context) -> str:
    """What a ledger is keyed by besides the federation.

    A real site keys by the resolved data path: a file edited in place keeps
    its spend (conservative), a different file gets its own ledger. A virtual
    node keys by everything that decides its partition.
    """
    node = context.node_config
    if NODE_DATA_PATH in node:
        return "path:" + str(Path(str(node[NODE_DATA_PATH])).resolve())
    d = cfg.data
    return (
        f"sim:{d.dataset}:{d.data_file}:{d.partitioner}:{d.dirichlet_alpha}:"
        f"{d.partition_column}:{d.test_fraction}:seed={cfg.seed}:"
        f"{node.get('partition-id')}/{node.get('num-partitions')}"
    )


def ledger_scope(cfg: RunConfig, context: Context) -> str:
    """What the ledger is keyed by besides the data: fixed for a real site; the
    simulation's federation name for a virtual node (the researcher runs both
    sides, and separate sweeps must not share spend)."""
    return SITE_SCOPE if NODE_DATA_PATH in context.node_config else cfg.privacy.federation


def require_site_dp(cfg: RunConfig, context: Context, what: str) -> None:
    """A node whose operator set an ε cap works under local DP or not at all.

    The server chooses ``dp-mode``; without this check ``dp-mode=none`` (or a
    central mode) at a capped node would train and send an exact adapter and
    record nothing.

    Raises
    ------
    PrivacyError
        If the node config has ``privacy-epsilon-cap`` and the run's dp-mode
        is not ``local``.
    """
    if NODE_EPSILON_CAP in context.node_config and cfg.privacy.dp_mode != "local":
        raise PrivacyError(
            f"this node has privacy-epsilon-cap={context.node_config[NODE_EPSILON_CAP]} "
            f"in its node config and refuses {what} under dp-mode={cfg.privacy.dp_mode}: "
            "every release from its data must be local DP. Run with dp-mode=local, or "
            "the node's operator removes the cap"
        )


def public_examples(context: Context) -> int:
    """The example count a DP node reports as its weight: a number its operator
    chose to publish (``privacy-public-examples``), else 1 — never the size of
    its data, which would be an unaccounted release."""
    raw = context.node_config.get(NODE_PUBLIC_EXAMPLES, DEFAULT_PUBLIC_EXAMPLES)
    if isinstance(raw, bool) or not isinstance(raw, int) or raw < 1:
        raise ConfigError(
            f"node config has {NODE_PUBLIC_EXAMPLES}={raw!r}; give a whole number >= 1 "
            "(the count this site is willing to publish as its weight)"
        )
    return raw


def open_ledger(cfg: RunConfig, context: Context) -> tuple[PrivacyLedger, NodePrivacy]:
    """The node's ledger for its data (created if new).

    Ledgers an earlier fedlora kept for the same data under a federation name
    (before the key was the data alone) still count: their history is composed
    with this one's in every budget check (``prior``).
    """
    limits = node_privacy(cfg, context)
    identity = dataset_identity(cfg, context)
    ledger = PrivacyLedger.open(
        limits.ledger_dir,
        ledger_scope(cfg, context),
        identity,
        limits.delta,
        limits.accountant,
    )
    if NODE_DATA_PATH in context.node_config:
        ledger.prior = prior_history(limits.ledger_dir, identity, ledger.key, limits)
    return ledger, limits


def prior_history(
    folder: Path, identity: str, own_key: str, limits: NodePrivacy
) -> tuple[HistoryEntry, ...]:
    """Histories of every other ledger in ``folder`` kept for the same data.

    Fails closed: an unreadable ledger file in the folder, or one kept with
    another δ or accountant, is an error, not "no spend".
    """
    history: list[HistoryEntry] = []
    for path in sorted(folder.glob("ledger-*.json")):
        if path.stem == own_key:
            continue
        other = PrivacyLedger.load(path)
        if other.dataset_fingerprint != identity:
            continue
        if other.delta != limits.delta or other.accountant != limits.accountant:
            raise PrivacyError(
                f"privacy ledger {path} holds spend on this node's data under "
                f"delta={other.delta}, accountant {other.accountant}, not "
                f"{limits.delta}, {limits.accountant}; set the node's privacy-delta and "
                "privacy-accountant to match it"
            )
        history.extend(other.history)
    return tuple(history)


def precheck(ledger: PrivacyLedger, limits: NodePrivacy, rounds: int = 1) -> None:
    """Refuse before reading data when the last round's cost no longer fits.

    Uses the most recent round's releases (its label counts, if any, and its
    DP-SGD steps) as the estimate of the next one; the exact check follows
    once the data size is known. ``rounds``: how many such rounds the run
    still asks for (this one included); the node refuses a run it cannot finish.
    """
    if not ledger.rounds or math.isinf(limits.epsilon_cap):
        return
    # The last round's releases are the trailing entries with its number:
    # an earlier run's round of the same number is history, not this estimate.
    last = ledger.rounds[-1].server_round
    same: list[HistoryEntry] = []
    for entry in reversed(ledger.rounds):
        if entry.server_round != last:
            break
        same.insert(0, entry.history_entry)
    ledger.check_releases(limits.epsilon_cap, same, rounds)


def private_train(
    model: Any,
    dataset: EncodedDataset,
    cfg: RunConfig,
    ledger: PrivacyLedger,
    limits: NodePrivacy,
    server_round: int,
    generator: torch.Generator,
    secure_rng: bool = True,
) -> tuple[TrainResult, Any, dict[str, float]]:
    """One DP-SGD round; returns (result, trained model copy, privacy metrics)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # dp-recipe=auto: batch size, rate and optimiser from the node's own plan
    cfg = effective_config(cfg, len(dataset), trainable, limits.delta)
    settings = cfg.train
    sample_rate, steps = steps_per_round(len(dataset), settings.batch_size, settings.local_epochs)
    sigma = site_sigma(cfg, len(dataset), settings.batch_size, limits.delta, limits.accountant)
    # The round's whole cost, computed once (fedlora.privacy.releases) and
    # checked against the site's cap once, before any of it is spent: this
    # round and every later one of the run, so a site that cannot finish the
    # run refuses at its start, not part-way with its budget gone.
    releases = training_round_releases(cfg, sigma, sample_rate, steps)
    labels = releases[:-1]  # the label counts, if this round releases any
    if not math.isinf(limits.epsilon_cap):
        remaining = max(1, cfg.num_server_rounds - server_round + 1)
        ledger.check_releases(limits.epsilon_cap, releases, remaining)
    dp = DPConfig(
        noise_multiplier=sigma,
        max_grad_norm=cfg.privacy.dp_max_grad_norm,
        delta=limits.delta,
        accountant=limits.accountant,
        grad_sample_mode=cfg.privacy.dp_grad_sample_mode,
        secure_rng=secure_rng,
    )
    # Opacus attaches hooks and grad_sample buffers: train a copy, so the
    # per-process cached model never carries them into another client's round.
    work = copy.deepcopy(model)
    work.train()
    loader = make_loader(dataset, settings.batch_size, shuffle=True, generator=generator)
    optimizer = make_optimizer(work, settings)
    wrapped = make_private(work, optimizer, loader, dp, sigma, None if secure_rng else generator)
    # Recorded once, before the counts are used or the update leaves: a crash
    # later over-counts, never under.
    spent = ledger.record_releases(server_round, releases)
    log_prior = None
    if labels:
        noise_rng, _ = round_generators(
            torch.device("cpu"), secure_rng, None if secure_rng else generator
        )
        log_prior = label_log_prior(
            dataset.labels,
            int(work.config.num_labels),
            settings.logit_adjustment,
            cfg.privacy.dp_label_noise,
            noise_rng,
        )
    # Physical batches: a logical Poisson batch runs as pieces of at most
    # dp-physical-batch-size examples, whose clipped gradients Opacus sums
    # before the one noisy step; memory follows the piece, not the batch.
    with BatchMemoryManager(
        data_loader=wrapped.data_loader,
        max_physical_batch_size=cfg.privacy.dp_physical_batch_size,
        optimizer=wrapped.optimizer,
    ) as loader:
        result = train_epochs(
            wrapped.model,
            loader,
            wrapped.optimizer,
            settings.local_epochs,
            generator,
            log_prior,
            get_task(cfg.task),
        )
    wrapped.close()  # nothing of this round stays reachable once it returns
    # Only the ledger's totals leave (fedlora.privacy.releases); sigma and the
    # step count stay at the node.
    metrics = {METRIC_EPSILON: float(spent), METRIC_DELTA: float(limits.delta)}
    result = TrainResult(result.loss, result.accuracy, len(dataset), result.steps, result.seconds)
    return result, work, metrics
