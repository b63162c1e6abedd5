"""Differential privacy for fedlora nodes.

``accounting``: epsilon of a DP-SGD history, via Opacus' accountants.
``ledger``: a node's privacy spend, persisted on its own disk.
``dpsgd``: local DP-SGD on a PEFT LoRA model, via Opacus' PrivacyEngine.
"""

from fedlora.privacy.accounting import (
    ACCOUNTANTS,
    HistoryEntry,
    epsilon,
    noise_multiplier_for,
    steps_per_round,
)
from fedlora.privacy.dpsgd import (
    PrivateTraining,
    ReproducibleNoiseWarning,
    make_private,
    resolve_noise_multiplier,
    trainable_device,
)
from fedlora.privacy.ledger import LEDGER_VERSION, BudgetExceeded, LedgerRound, PrivacyLedger
from fedlora.privacy.ledger_files import dataset_fingerprint, ledger_key
from fedlora.privacy.settings import GRAD_SAMPLE_MODES, DPConfig

__all__ = [
    "ACCOUNTANTS",
    "GRAD_SAMPLE_MODES",
    "LEDGER_VERSION",
    "BudgetExceeded",
    "DPConfig",
    "HistoryEntry",
    "LedgerRound",
    "PrivacyLedger",
    "PrivateTraining",
    "ReproducibleNoiseWarning",
    "dataset_fingerprint",
    "epsilon",
    "ledger_key",
    "make_private",
    "noise_multiplier_for",
    "resolve_noise_multiplier",
    "steps_per_round",
    "trainable_device",
]
