"""A node's privacy spend, kept on the node's own disk.

DP protects a node's examples only if *every* release computed from them is
accounted, across restarts, runs and servers. So the spend lives in a file on
the node, one per ``(federation, dataset)``. What this adds to Opacus:

* Crash-safe persistence: the JSON file is replaced atomically (temporary file
  in the same folder, ``fsync``, ``os.replace``, ``fsync`` of the folder), so
  a reader sees the old ledger or the new one, never half of one.
* Keys that cannot collide (:func:`ledger_key`): two federations or two
  datasets never share, or reset, each other's spend.
* Fail-closed loading: a corrupt or inconsistent ledger raises
  :class:`~fedlora.errors.PrivacyError`; it is never read as "no spend".
* A budget check that composes the whole history plus the next round in one
  accountant call (epsilons do not add) and refuses with actionable numbers.

Each round: :meth:`PrivacyLedger.check_budget`, train,
:meth:`PrivacyLedger.record_round`, then send the update; if recording fails
the update must not leave the node. Deleting a ledger file resets that node's
accounting, which only its operator can do.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

from fedlora.errors import ConfigError, PrivacyBudgetExceeded, PrivacyError
from fedlora.io import atomic_write_text
from fedlora.privacy.accounting import HistoryEntry, epsilon
from fedlora.privacy.ledger_files import exclusive, ledger_key, typed_fields

LEDGER_VERSION = 1


class BudgetExceeded(PrivacyBudgetExceeded):
    """:class:`PrivacyBudgetExceeded` with its numbers: epsilon ``spent``, the
    operator's ``cap``, and the epsilon the round would have reached
    (``projected``), so a caller can report them without parsing text."""

    def __init__(self, spent: float, cap: float, projected: float, rounds: int = 1) -> None:
        self.spent, self.cap, self.projected, self.rounds = spent, cap, projected, rounds
        what = "this round" if rounds == 1 else f"the run's {rounds} remaining rounds"
        super().__init__(
            f"privacy budget exhausted: spent ε={spent:.2f} of {cap:.2f}, {what} "
            f"would cost {projected - spent:.2f} (ε would reach {projected:.2f}); the "
            "node refuses now rather than stop part-way; the node operator can raise "
            "privacy-epsilon-cap in the node config, or the server lower num-server-rounds"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        # Errors cross process boundaries (Flower, Ray); keep them picklable.
        return (type(self), (self.spent, self.cap, self.projected, self.rounds))


@dataclass(frozen=True)
class LedgerRound:
    """One release of a round as recorded in a ledger: its DP-SGD steps, or
    its noisy label counts (one full-batch step, ``sample_rate`` 1)."""

    server_round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    timestamp: str
    epsilon_after: float

    @property
    def history_entry(self) -> HistoryEntry:
        return (self.noise_multiplier, self.sample_rate, self.steps)


@dataclass(eq=False)
class PrivacyLedger:
    """The privacy spend of one node on one dataset in one federation.

    Create it with :meth:`open`. The recorded history is the source of truth:
    epsilon is recomputed from it with the ledger's accountant, so a restart
    reports exactly the same spend.
    """

    path: Path
    federation: str
    dataset_fingerprint: str
    delta: float
    accountant: str
    rounds: tuple[LedgerRound, ...] = ()
    #: Spend on the same data kept in other ledger files (read at open, never
    #: written here): composed with this ledger's history in every figure.
    prior: tuple[HistoryEntry, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        epsilon([], self.delta, self.accountant)  # validates both

    @property
    def key(self) -> str:
        return ledger_key(self.federation, self.dataset_fingerprint)

    @property
    def history(self) -> list[HistoryEntry]:
        """``(noise_multiplier, sample_rate, steps)`` per recorded round."""
        return [r.history_entry for r in self.rounds]

    def _composed(self) -> list[HistoryEntry]:
        return [*self.prior, *self.history]

    @classmethod
    def open(
        cls,
        directory: str | os.PathLike[str],
        federation: str,
        dataset_fingerprint: str,
        delta: float,
        accountant: str,
    ) -> PrivacyLedger:
        """Load the ledger for this federation and dataset, or create it.

        A new ledger is written at once, so an unwritable folder fails before
        any training.

        Raises
        ------
        PrivacyError
            If the file is unreadable or corrupt, or was kept with another
            delta or accountant: its spend means nothing under other ones,
            and starting afresh would forget it.
        """
        folder = Path(directory)
        path = folder / f"{ledger_key(federation, dataset_fingerprint)}.json"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            lock = exclusive(path)
            lock.__enter__()
        except OSError as err:
            raise PrivacyError(
                f"privacy ledger folder {folder} cannot be used ({type(err).__name__}: "
                f"{err.strerror or err}); the node trains nothing until it can record "
                "its spend. Check the folder's permissions and free space"
            ) from None
        with contextlib.ExitStack() as stack:
            stack.push(lock)
            if path.exists():
                ledger = cls._load(path)
                if ledger.delta != delta or ledger.accountant != accountant:
                    raise PrivacyError(
                        f"privacy ledger {path} was kept with delta={ledger.delta}"
                        f" and accountant {ledger.accountant}, not {delta} and "
                        f"{accountant}: its spend cannot be carried over, and a "
                        "new ledger would forget privacy already spent on this "
                        f"data. Set privacy-delta={ledger.delta} and "
                        f"privacy-accountant={ledger.accountant}"
                    )
                return ledger
            ledger = cls(path, federation, dataset_fingerprint, delta, accountant)
            ledger._write(ledger.state_dict())
            return ledger

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> PrivacyLedger:
        """Read and validate one ledger file (fails closed, like :meth:`open`)."""
        return cls._load(Path(path))

    @classmethod
    def _load(cls, path: Path) -> PrivacyLedger:
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise PrivacyError(
                f"privacy ledger {path} cannot be read ({err}); refusing to "
                "start from zero spend. Restore it from a backup, or if this "
                "node's data has never been used, remove the file"
            ) from err
        ledger = cls.from_state_dict(state, path)
        if path.stem != ledger.key:
            raise PrivacyError(f"privacy ledger {path} holds ledger {ledger.key}")
        return ledger

    def spent_epsilon(self) -> float:
        """Return the epsilon spent by every recorded round, composed."""
        return epsilon(self._composed(), self.delta, self.accountant)

    def projected_epsilon(
        self,
        noise_multiplier: float,
        sample_rate: float,
        steps: int,
        extra: Sequence[HistoryEntry] = (),
    ) -> float:
        """Return the epsilon after one more round with these parameters.

        History and new round (and its ``extra`` releases) go to one accountant
        call: epsilons do not add.
        """
        entry = (noise_multiplier, sample_rate, steps)
        return epsilon([*self._composed(), *extra, entry], self.delta, self.accountant)

    def check_budget(
        self,
        cap_epsilon: float,
        noise_multiplier: float,
        sample_rate: float,
        steps: int,
        extra: Sequence[HistoryEntry] = (),
    ) -> float:
        """Return the projected epsilon, or refuse the round if it passes the cap.

        ``extra``: the round's other releases (noisy label counts), judged
        together with its DP-SGD steps.

        Raises
        ------
        ConfigError
            If ``cap_epsilon`` is not a positive number.
        BudgetExceeded
            A :class:`PrivacyBudgetExceeded`, if the round would take the spend
            past ``cap_epsilon``; the ledger is left unchanged.
        """
        if (
            type(cap_epsilon) not in (int, float)
            or not cap_epsilon > 0
            or cap_epsilon != cap_epsilon
        ):
            raise ConfigError(f"privacy-epsilon-cap={cap_epsilon!r} must be > 0")
        projected = self.projected_epsilon(noise_multiplier, sample_rate, steps, extra)
        if projected > cap_epsilon:
            raise BudgetExceeded(self.spent_epsilon(), float(cap_epsilon), projected)
        return projected

    def check_releases(
        self, cap_epsilon: float, releases: Sequence[HistoryEntry], rounds: int = 1
    ) -> float:
        """:meth:`check_budget` for a round's releases taken together (the
        list :meth:`record_releases` then records), or for ``rounds`` such
        rounds (the rest of a run); returns the projected ε."""
        if not releases:
            raise PrivacyError("no releases to check against the budget")
        try:
            return self.check_budget(
                cap_epsilon, *releases[-1], extra=[*releases[:-1], *list(releases) * (rounds - 1)]
            )
        except BudgetExceeded as exc:
            raise BudgetExceeded(exc.spent, exc.cap, exc.projected, rounds) from None

    def record_round(
        self,
        server_round: int,
        noise_multiplier: float,
        sample_rate: float,
        steps: int,
    ) -> float:
        """Append one release and persist the ledger; returns the new spend."""
        return self.record_releases(server_round, [(noise_multiplier, sample_rate, steps)])

    def record_releases(self, server_round: int, releases: Sequence[HistoryEntry]) -> float:
        """Append a round's releases in one write and return the new spend.

        Persisted (atomically, under the ledger's lock) before anything they
        cover is used or sent: a crash afterwards over-counts, never under.

        Raises
        ------
        PrivacyError
            If the ledger cannot be written, or another process changed it
            since it was opened. The ledger is then unchanged and this round's
            update must not be sent.
        """
        if type(server_round) is not int:
            raise PrivacyError(f"server_round={server_round!r} is not an integer")
        if not releases:
            raise PrivacyError(f"round {server_round}: no releases to record")
        stamp = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        entries = []
        for k, (sigma, q, steps) in enumerate(releases):
            entries.append(
                LedgerRound(
                    server_round=server_round,
                    noise_multiplier=float(sigma),
                    sample_rate=float(q),
                    steps=steps,
                    timestamp=stamp,
                    epsilon_after=self.projected_epsilon(sigma, q, steps, releases[:k]),
                )
            )
        eps = entries[-1].epsilon_after
        rounds = (*self.rounds, *entries)
        try:
            lock = exclusive(self.path)
            lock.__enter__()
        except OSError as err:
            raise PrivacyError(
                f"privacy ledger {self.path} cannot be locked ({type(err).__name__}); the "
                "spend of this round is not recorded, so its update must not be sent"
            ) from None
        with contextlib.ExitStack() as stack:
            stack.push(lock)
            on_disk = self._load(self.path) if self.path.exists() else None
            if on_disk is None or on_disk.rounds != self.rounds:
                raise PrivacyError(
                    f"privacy ledger {self.path} changed on disk (or vanished) "
                    "since this node opened it; another process may be training "
                    "on the same data. Stop the other process and restart this one"
                )
            self._write(self._state(rounds, eps))
        self.rounds = rounds
        return eps

    def _write(self, state: Mapping[str, Any]) -> None:
        try:
            atomic_write_text(
                self.path, json.dumps(state, indent=2, sort_keys=True, allow_nan=True) + "\n"
            )
        except OSError as err:
            raise PrivacyError(
                f"privacy ledger {self.path} could not be written ({err}); the "
                "spend of this round is not recorded, so its update must not be "
                "sent. Check free space and permissions of the ledger folder"
            ) from err

    def state_dict(self) -> dict[str, Any]:
        """Return the ledger as JSON-ready data (what the file holds)."""
        return self._state(self.rounds, self.spent_epsilon())

    def _state(self, rounds: tuple[LedgerRound, ...], spent: float) -> dict[str, Any]:
        return {
            "version": LEDGER_VERSION,
            "key": self.key,
            "federation": self.federation,
            "dataset_fingerprint": self.dataset_fingerprint,
            "delta": self.delta,
            "accountant": self.accountant,
            "rounds": [asdict(r) for r in rounds],
            "epsilon_spent": spent,
        }

    @classmethod
    def from_state_dict(cls, state: Any, path: str | os.PathLike[str]) -> PrivacyLedger:
        """Rebuild a ledger from :meth:`state_dict` output, validating all of it.

        Raises
        ------
        PrivacyError
            If a field is missing, unknown, of the wrong type or inconsistent
            (e.g. a key that does not match federation and dataset).
        """
        where = f"privacy ledger {path}"
        if not isinstance(state, Mapping) or state.get("version") != LEDGER_VERSION:
            raise PrivacyError(
                f"{where} is not a version-{LEDGER_VERSION} fedlora ledger; "
                "restore it, or use the fedlora version that wrote it"
            )
        top = typed_fields(state, _LEDGER_FIELDS, where)
        fed, fingerprint = top["federation"], top["dataset_fingerprint"]
        if top["key"] != ledger_key(fed, fingerprint):
            raise PrivacyError(
                f"{where}: key {top['key']!r} does not match its federation and "
                "dataset; the file was edited or copied by hand"
            )
        rounds = tuple(
            LedgerRound(**typed_fields(r, _ROUND_FIELDS, f"{where}, round {i}"))
            for i, r in enumerate(top["rounds"])
        )
        try:
            ledger = cls(Path(path), fed, fingerprint, top["delta"], top["accountant"])
            ledger.rounds = rounds
            ledger.spent_epsilon()  # the history must be accountable
        except (ConfigError, PrivacyError) as err:
            raise PrivacyError(f"{where} is inconsistent: {err}") from err
        return ledger


_LEDGER_FIELDS: dict[str, type] = {
    "version": int,
    "key": str,
    "federation": str,
    "dataset_fingerprint": str,
    "delta": float,
    "accountant": str,
    "rounds": list,
    "epsilon_spent": float,
}
_ROUND_FIELDS: dict[str, type] = get_type_hints(LedgerRound)
