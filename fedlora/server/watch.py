"""Never worse than the start: the best round so far, and when a run has diverged.

A private run that diverges (noise swamps the signal, a learning rate too
large for the clip) spends every site's ε to produce a model worse than the
one it started from. The server sees only its own held-out split's global
loss and accuracy, so that is what it watches (no site data, no privacy
cost):

- the **best round** is the one with the highest global accuracy, ties going
  to the lower loss (round 0, the starting adapter, competes too); with
  ``export-round=best`` it is what the run exports;
- the run **diverged** when, for ``divergence-patience`` rounds in a row,
  the global loss is above ``divergence-factor`` x round 0's, or the model
  has collapsed to one class (accuracy at or below the held-out split's
  majority share while round 0 was above it). The run then stops with a
  message that says what to change, and the best round is exported.

The selection uses the server's held-out split, the same split the reported
accuracy comes from, so the exported round's accuracy is optimistic by the
selection; a site that needs an unbiased figure keeps a test set of its own.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedlora.io import atomic_write_bytes
from fedlora.records import State
from fedlora.rundir import BEST_ADAPTER_FILE

log = logging.getLogger("fedlora.server")

_ROUND_KEY = "__fedlora_round__"
#: Accuracy within this of the majority share counts as "one class".
_MARGIN = 0.005


@dataclass(frozen=True)
class RoundScore:
    """What the watch reads of one round: the server's held-out figures."""

    server_round: int
    accuracy: float
    loss: float

    def beats(self, other: RoundScore) -> bool:
        """Higher accuracy, then lower loss (a later round wins only if strictly better)."""
        return (self.accuracy, -self.loss) > (other.accuracy, -other.loss)


@dataclass
class DivergenceWatch:
    """The best round so far and the divergence rule (pure: no Flower, no files).

    Attributes
    ----------
    factor
        Loss above ``factor`` x round 0's counts as diverged; 0 turns the rule off.
    patience
        Consecutive diverged rounds before the run stops.
    majority_share
        Share of the held-out split's most frequent label (None: free text, no
        collapse rule).
    """

    factor: float
    patience: int
    majority_share: float | None = None
    start: RoundScore | None = None
    best: RoundScore | None = None
    streak: int = 0

    def observe(self, score: RoundScore) -> str | None:
        """Take one round's score; a stop reason when the run has diverged, else None."""
        if self.start is None:
            self.start = score
        if self.best is None or score.beats(self.best):
            self.best = score
        if score.server_round == self.start.server_round or self.factor <= 0:
            return None
        symptom = self._symptom(score)
        self.streak = self.streak + 1 if symptom else 0
        if symptom and self.streak >= self.patience:
            assert self.best is not None
            return (
                f"the run diverged: {symptom} for {self.streak} round(s) in a row "
                f"(divergence-factor={self.factor:g}, divergence-patience={self.patience}). "
                f"The best round, {self.best.server_round} (global accuracy "
                f"{self.best.accuracy:.4f}, loss {self.best.loss:.4f}), is kept as the export. "
                "Under local DP: lower learning-rate, raise dp-target-epsilon or the examples "
                "per site, use fewer rounds or strategy=ffa-lora; without DP: lower "
                "learning-rate"
            )
        return None

    def _symptom(self, score: RoundScore) -> str:
        assert self.start is not None
        if score.loss > self.factor * self.start.loss:
            return (
                f"global loss {score.loss:.4f} > {self.factor:g} x round "
                f"{self.start.server_round}'s {self.start.loss:.4f}"
            )
        share = self.majority_share
        collapsed = (
            share is not None
            and self.start.accuracy > share + _MARGIN
            and score.accuracy <= share + _MARGIN
        )
        if collapsed:
            return (
                f"global accuracy {score.accuracy:.4f} is at or below the majority "
                f"label's share {share:.4f} (no better than always answering one class)"
            )
        return ""


def majority_share(label_ids: list[int] | tuple[int, ...]) -> float | None:
    """Share of the most frequent label id (None for no labels)."""
    if not label_ids:
        return None
    counts = np.bincount(np.asarray(label_ids, dtype=np.int64))
    return float(counts.max() / counts.sum())


def save_best(run_dir: Path, server_round: int, state: State) -> None:
    """The best round's adapter, atomically: a resumed run still exports it."""
    buffer = io.BytesIO()
    arrays: dict[str, Any] = {**state, _ROUND_KEY: np.array(server_round)}
    np.savez(buffer, **arrays)
    atomic_write_bytes(run_dir / BEST_ADAPTER_FILE, buffer.getvalue())


def load_best(run_dir: Path) -> tuple[int, State] | None:
    """(round, adapter) saved by :func:`save_best`, or None when there is none."""
    path = run_dir / BEST_ADAPTER_FILE
    if not path.is_file():
        return None
    with np.load(io.BytesIO(path.read_bytes()), allow_pickle=False) as data:
        state = {k: data[k] for k in data.files if k != _ROUND_KEY}
        return int(data[_ROUND_KEY]), state


class BestRound:
    """The watch plus the best round's adapter, kept in memory and on disk.

    ``observe`` is called with round 0 and every round after; ``choose`` gives
    the adapter to export. On resume, ``replay`` re-reads the history and the
    saved best adapter, so a resumed run still exports the best round.
    """

    def __init__(self, run_dir: Path, watch: DivergenceWatch) -> None:
        self.run_dir = run_dir
        self.watch = watch
        self.state: State | None = None

    def observe(self, server_round: int, accuracy: float, loss: float, state: State) -> str | None:
        """Record one round; a stop reason when the run has diverged."""
        reason = self.watch.observe(RoundScore(server_round, accuracy, loss))
        best = self.watch.best
        if best is not None and best.server_round == server_round:
            self.state = state
            save_best(self.run_dir, server_round, state)
        return reason

    def replay(self, rounds: list[tuple[int, float, float]]) -> None:
        """Rebuild the watch from (round, accuracy, loss) rows of a resumed run's history."""
        for server_round, accuracy, loss in rounds:
            self.watch.observe(RoundScore(server_round, accuracy, loss))
        saved = load_best(self.run_dir)
        best = self.watch.best
        if saved is not None and best is not None and saved[0] == best.server_round:
            self.state = saved[1]

    def choose(self, mode: str, last_round: int, last: State) -> tuple[int, State, str]:
        """(round, adapter, why) to export under ``export-round=mode``."""
        best = self.watch.best
        if mode == "best" and best is not None and self.state is not None:
            if best.server_round != last_round:
                log.info(
                    "exporting round %d (best global accuracy %.4f), not the last round %d",
                    best.server_round,
                    best.accuracy,
                    last_round,
                )
            return best.server_round, self.state, "best global accuracy (server's held-out split)"
        return last_round, last, "last round"
