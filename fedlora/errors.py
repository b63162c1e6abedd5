"""Errors a person can act on.

Every fedlora error derives from a built-in exception so callers can catch it
broadly (``ValueError``) or precisely (``DataError``). Messages name the thing,
the value and the fix, e.g. "data file /data/notes.csv has no column 'label';
columns are: text, y. Set label-column=y".
"""

from __future__ import annotations


class FedloraError(Exception):
    """Root of fedlora's own errors."""


class ConfigError(FedloraError, ValueError):
    """A configuration key has a value that is not allowed."""


class DataError(FedloraError, ValueError):
    """Local data is missing, malformed or inconsistent with the federation."""


class ModelError(FedloraError, ValueError):
    """A model folder or adapter cannot be loaded or does not match."""


class PrivacyError(FedloraError, RuntimeError):
    """Differential privacy was requested but cannot be applied (fail closed)."""


class PrivacyBudgetExceeded(PrivacyError):
    """A round would take a node's privacy spend past the cap its operator set."""


class UpdateRejected(FedloraError, ValueError):
    """A client's update failed server-side validation."""
