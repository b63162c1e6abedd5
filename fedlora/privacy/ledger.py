"""A node's privacy spend, kept on the node's own disk.

Differential privacy protects a node's examples only if *every* release
computed from them is accounted. A federation can run many times (restarts,
new runs, new servers), so the spend cannot live in server state or in memory:
a node keeps a ledger file, one per ``(federation, dataset)`` pair, and checks
it before each round. What this module adds to Opacus' accountants:

* Persistence that survives crashes: the JSON file is replaced atomically
  (temporary file in the same folder, ``fsync``, ``os.replace``, ``fsync`` of
  the folder), so a reader sees the old ledger or the new one, never half.
* Keys that cannot collide: :func:`ledger_key` hashes federation and dataset
  fingerprint, so two federations, or two datasets, never share or reset each
  other's spend.
* Fail-closed loading: an unreadable, corrupt or inconsistent ledger raises
  :class:`~fedlora.errors.PrivacyError`; it is never treated as "no spend".
* A budget check that composes the whole history plus the next round in one
  accountant call (never adding epsilons) and refuses with numbers a node
  operator can act on.

Use it in this order each round: :meth:`PrivacyLedger.check_budget`, train,
:meth:`PrivacyLedger.record_round`, and only then send the update. If
recording fails, the update must not leave the node.

Deleting a ledger file resets that node's accounting; only the node operator
can do that, and the file's name says what it is for.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeGuard

from fedlora.errors import ConfigError, DataError, PrivacyBudgetExceeded, PrivacyError
from fedlora.privacy.accounting import HistoryEntry, epsilon

if sys.platform != "win32":
    import fcntl

__all__ = [
    "LEDGER_VERSION",
    "BudgetExceeded",
    "LedgerRound",
    "PrivacyLedger",
    "dataset_fingerprint",
    "ledger_key",
]

LEDGER_VERSION = 1
_CHUNK = 1 << 20


class BudgetExceeded(PrivacyBudgetExceeded):
    """:class:`PrivacyBudgetExceeded` carrying the numbers behind the refusal.

    Attributes
    ----------
    spent, cap, projected
        Epsilon already spent, the operator's cap, and the epsilon the next
        round would have reached.
    """

    def __init__(self, spent: float, cap: float, projected: float) -> None:
        self.spent = spent
        self.cap = cap
        self.projected = projected
        super().__init__(
            f"privacy budget exhausted: spent ε={spent:.2f} of {cap:.2f}, this "
            f"round would cost {projected - spent:.2f} (ε would reach "
            f"{projected:.2f}); the node operator can raise privacy-epsilon-cap "
            "in the node config or stop this node"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        # Errors cross process boundaries (Flower, Ray); keep them picklable.
        return (type(self), (self.spent, self.cap, self.projected))


def ledger_key(federation: str, dataset_fingerprint: str) -> str:
    """Return the file-name-safe key of a ``(federation, dataset)`` ledger.

    The pair is JSON-encoded before hashing so that no two different pairs
    give the same input (``("a|b", "c")`` vs ``("a", "b|c")``).
    """
    if not (isinstance(federation, str) and isinstance(dataset_fingerprint, str)):
        raise ConfigError("federation and dataset_fingerprint must be strings")
    if not (federation and dataset_fingerprint):
        raise ConfigError(
            f"federation={federation!r} and dataset_fingerprint="
            f"{dataset_fingerprint!r} must both be non-empty"
        )
    payload = json.dumps(["fedlora-privacy-ledger", federation, dataset_fingerprint])
    return "ledger-" + hashlib.sha256(payload.encode("utf-8")).hexdigest()


def dataset_fingerprint(path: str | os.PathLike[str]) -> str:
    """Return ``"sha256:<hex>"`` of a data file's bytes, or of a folder's files.

    The content is streamed, so large files need no memory. A folder hashes
    every file below it with its relative path, in sorted order. The same
    bytes always give the same ledger, whatever the file is named or where it
    lives; any change of content starts a separate ledger.
    """
    root = Path(path)
    digest = hashlib.sha256()
    if root.is_file():
        files = [root]
    elif root.is_dir():
        files = sorted(p for p in root.rglob("*") if p.is_file())
    else:
        raise DataError(f"data path {root} does not exist; cannot fingerprint it")
    for file in files:
        if file is not root:
            name = file.relative_to(root).as_posix().encode("utf-8")
            digest.update(len(name).to_bytes(8, "big") + name)
        with file.open("rb") as handle:
            for chunk in iter(lambda: handle.read(_CHUNK), b""):
                digest.update(chunk)
    return "sha256:" + digest.hexdigest()


@dataclass(frozen=True)
class LedgerRound:
    """One round of local DP-SGD as recorded in a ledger."""

    server_round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    timestamp: str
    epsilon_after: float

    @property
    def history_entry(self) -> HistoryEntry:
        return (self.noise_multiplier, self.sample_rate, self.steps)


def _atomic_write_json(path: Path, data: Mapping[str, Any]) -> None:
    """Replace ``path`` with ``data`` so readers see old or new, never half."""
    fd, tmp_name = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"
    )
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=2, sort_keys=True, allow_nan=True)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    if sys.platform != "win32":  # the rename is durable once the folder is
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


@contextlib.contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """Serialise ledger updates between processes on this machine (POSIX)."""
    with open(path.with_suffix(".lock"), "a", encoding="utf-8") as lock:
        if sys.platform != "win32":
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)  # released on close
        yield


class PrivacyLedger:
    """The privacy spend of one node on one dataset in one federation.

    Create it with :meth:`open`. The history on disk is the source of truth;
    epsilon is recomputed from it with the ledger's accountant, so a restart
    reports exactly the same spend.
    """

    def __init__(
        self,
        path: Path,
        federation: str,
        dataset_fingerprint: str,
        delta: float,
        accountant: str,
        rounds: list[LedgerRound],
    ) -> None:
        self.path = path
        self.federation = federation
        self.dataset_fingerprint = dataset_fingerprint
        self.delta = delta
        self.accountant = accountant
        self._rounds = list(rounds)
        epsilon([], delta, accountant)  # validates delta and accountant

    @property
    def key(self) -> str:
        return ledger_key(self.federation, self.dataset_fingerprint)

    @property
    def rounds(self) -> tuple[LedgerRound, ...]:
        return tuple(self._rounds)

    @property
    def history(self) -> list[HistoryEntry]:
        """``(noise_multiplier, sample_rate, steps)`` per recorded round."""
        return [r.history_entry for r in self._rounds]

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

        A new ledger is written at once, so a folder that cannot be written
        fails before any training.

        Raises
        ------
        PrivacyError
            If the file is unreadable or corrupt, or was kept with another
            delta or accountant: the recorded spend is only meaningful with
            the delta and accountant it was computed with, and starting a new
            ledger instead would silently forget it.
        """
        folder = Path(directory)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{ledger_key(federation, dataset_fingerprint)}.json"
        with _exclusive(path):
            if path.exists():
                ledger = cls._load(path)
                if ledger.delta != delta or ledger.accountant != accountant:
                    raise PrivacyError(
                        f"privacy ledger {path} was kept with delta={ledger.delta} "
                        f"and accountant={ledger.accountant!r}, but this run asks "
                        f"for delta={delta} and accountant={accountant!r}. The "
                        "spend already recorded cannot be carried over, and "
                        "resetting it would forget privacy already spent on this "
                        f"data. Set privacy-delta={ledger.delta} and "
                        f"privacy-accountant={ledger.accountant} to continue"
                    )
                return ledger
            ledger = cls(path, federation, dataset_fingerprint, delta, accountant, [])
            ledger._write(ledger.state_dict())
            return ledger

    @classmethod
    def _load(cls, path: Path) -> PrivacyLedger:
        try:
            text = path.read_text(encoding="utf-8")
            state = json.loads(text)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise PrivacyError(
                f"privacy ledger {path} cannot be read ({err}); refusing to "
                "start from zero spend. Restore it from a backup, or if this "
                "node's data has never been used, remove the file"
            ) from err
        return cls.from_state_dict(state, path)

    def spent_epsilon(self) -> float:
        """Return the epsilon spent by every recorded round, composed."""
        return epsilon(self.history, self.delta, self.accountant)

    def projected_epsilon(
        self, noise_multiplier: float, sample_rate: float, steps: int
    ) -> float:
        """Return the epsilon after one more round with these parameters.

        The whole history plus the new round goes to one accountant call;
        epsilons do not add up under composition.
        """
        entry = (noise_multiplier, sample_rate, steps)
        return epsilon([*self.history, entry], self.delta, self.accountant)

    def check_budget(
        self,
        cap_epsilon: float,
        noise_multiplier: float,
        sample_rate: float,
        steps: int,
    ) -> float:
        """Return the projected epsilon, or refuse the round if it passes the cap.

        Raises
        ------
        ConfigError
            If ``cap_epsilon`` is not a positive number.
        BudgetExceeded
            (a :class:`PrivacyBudgetExceeded`) if the round would take the
            spend past ``cap_epsilon``. The ledger is left unchanged.
        """
        if isinstance(cap_epsilon, bool) or not (
            isinstance(cap_epsilon, int | float) and cap_epsilon > 0
        ):
            raise ConfigError(
                f"privacy-epsilon-cap={cap_epsilon!r} must be a number > 0"
            )
        projected = self.projected_epsilon(noise_multiplier, sample_rate, steps)
        if projected > cap_epsilon:
            raise BudgetExceeded(self.spent_epsilon(), float(cap_epsilon), projected)
        return projected

    def record_round(
        self,
        server_round: int,
        noise_multiplier: float,
        sample_rate: float,
        steps: int,
    ) -> float:
        """Append a round and persist the ledger before returning its new spend.

        Raises
        ------
        PrivacyError
            If the ledger cannot be written, or another process changed it
            since it was opened. The in-memory ledger is then unchanged and
            this round's update must not be sent.
        """
        if not _is_int(server_round):
            raise PrivacyError(f"server_round={server_round!r} is not an integer")
        eps = self.projected_epsilon(noise_multiplier, sample_rate, steps)
        entry = LedgerRound(
            server_round=server_round,
            noise_multiplier=float(noise_multiplier),
            sample_rate=float(sample_rate),
            steps=steps,
            timestamp=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            epsilon_after=eps,
        )
        rounds = [*self._rounds, entry]
        with _exclusive(self.path):
            on_disk = self._load(self.path) if self.path.exists() else None
            if on_disk is None or on_disk.rounds != self.rounds:
                raise PrivacyError(
                    f"privacy ledger {self.path} changed on disk (or vanished) "
                    "since this node opened it; another process may be training "
                    "on the same data. Stop the other process and restart this one"
                )
            state = self.state_dict()
            state["rounds"] = [asdict(r) for r in rounds]
            state["epsilon_spent"] = eps
            self._write(state)
        self._rounds = rounds
        return eps

    def _write(self, state: Mapping[str, Any]) -> None:
        try:
            _atomic_write_json(self.path, state)
        except OSError as err:
            raise PrivacyError(
                f"privacy ledger {self.path} could not be written ({err}); the "
                "spend of this round is not recorded, so its update must not be "
                "sent. Check free space and permissions of the ledger folder"
            ) from err

    def state_dict(self) -> dict[str, Any]:
        """Return the ledger as JSON-ready data (what the file holds)."""
        return {
            "version": LEDGER_VERSION,
            "key": self.key,
            "federation": self.federation,
            "dataset_fingerprint": self.dataset_fingerprint,
            "delta": self.delta,
            "accountant": self.accountant,
            "rounds": [asdict(r) for r in self._rounds],
            "epsilon_spent": self.spent_epsilon(),
        }

    @classmethod
    def from_state_dict(cls, state: Any, path: str | os.PathLike[str]) -> PrivacyLedger:
        """Rebuild a ledger from :meth:`state_dict` output, validating all of it.

        Raises
        ------
        PrivacyError
            If any field is missing, of the wrong type, or inconsistent (e.g.
            the key does not match federation and dataset).
        """
        where = f"privacy ledger {path}"
        if not isinstance(state, Mapping):
            raise PrivacyError(f"{where} is not a JSON object")
        if state.get("version") != LEDGER_VERSION:
            raise PrivacyError(
                f"{where} has version {state.get('version')!r}; this fedlora "
                f"reads version {LEDGER_VERSION}. Use the fedlora that wrote it"
            )
        federation = state.get("federation")
        fingerprint = state.get("dataset_fingerprint")
        accountant = state.get("accountant")
        if not isinstance(federation, str) or not isinstance(fingerprint, str):
            raise PrivacyError(f"{where}: federation or dataset_fingerprint missing")
        if state.get("key") != ledger_key(federation, fingerprint):
            raise PrivacyError(
                f"{where}: key {state.get('key')!r} does not match its federation "
                "and dataset; the file was edited or copied by hand"
            )
        if not isinstance(accountant, str):
            raise PrivacyError(f"{where}: accountant is {accountant!r}")
        delta = _number(state, "delta", where)
        raw_rounds = state.get("rounds")
        if not isinstance(raw_rounds, list):
            raise PrivacyError(f"{where}: rounds is {raw_rounds!r}, not a list")
        rounds = [
            _round_from_json(r, f"{where}, round entry {i}")
            for i, r in enumerate(raw_rounds)
        ]
        try:
            ledger = cls(Path(path), federation, fingerprint, delta, accountant, rounds)
            ledger.spent_epsilon()  # the history must be accountable
        except (ConfigError, PrivacyError) as err:
            raise PrivacyError(f"{where} is inconsistent: {err}") from err
        return ledger


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(state: Mapping[str, Any], key: str, where: str) -> float:
    value = state.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PrivacyError(f"{where}: field {key!r} is {value!r}, not a number")
    return float(value)


def _round_from_json(raw: Any, where: str) -> LedgerRound:
    if not isinstance(raw, Mapping):
        raise PrivacyError(f"{where} is not a JSON object")
    server_round, steps, stamp = (
        raw.get(k) for k in ("server_round", "steps", "timestamp")
    )
    if not (_is_int(server_round) and _is_int(steps) and isinstance(stamp, str)):
        raise PrivacyError(
            f"{where}: server_round={server_round!r}, steps={steps!r}, "
            f"timestamp={stamp!r}; expected an integer, an integer and a string"
        )
    return LedgerRound(
        server_round=server_round,
        noise_multiplier=_number(raw, "noise_multiplier", where),
        sample_rate=_number(raw, "sample_rate", where),
        steps=steps,
        timestamp=stamp,
        epsilon_after=_number(raw, "epsilon_after", where),
    )
