"""How a run ends early: for a stated reason, not with a crash."""

from __future__ import annotations


class RunStopped(Exception):
    """The run ended early for a stated reason (not a crash): too few nodes
    connected or replied, budgets spent, an aggregate that must not be kept.
    The run directory records ``stopped`` with the reason; the last good
    round stays exported and resumable."""
