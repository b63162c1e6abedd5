"""A ledger's name and file handling: which ledger a dataset has, exclusive access, typed reads.

A site's ledger is keyed by a fingerprint of its data file's bytes, so the
same examples keep one ledger whatever a run calls them; an exclusive lock
keeps two runs from spending the same budget at once.
"""

from __future__ import annotations

import sys

if sys.platform != "win32":
    import fcntl

import contextlib
import hashlib
import json
import os
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from fedlora.errors import ConfigError, DataError, PrivacyError

_CHUNK = 1 << 20


def ledger_key(federation: str, dataset_fingerprint: str) -> str:
    """Return the file-name-safe key of a ``(federation, dataset)`` ledger.

    The pair is JSON-encoded before hashing, so ``("a|b", "c")`` and
    ``("a", "b|c")`` cannot collide."""
    if not all(isinstance(v, str) and v for v in (federation, dataset_fingerprint)):
        raise ConfigError(
            f"federation={federation!r} and dataset_fingerprint="
            f"{dataset_fingerprint!r} must both be non-empty strings"
        )
    payload = json.dumps(["fedlora-privacy-ledger", federation, dataset_fingerprint])
    return "ledger-" + hashlib.sha256(payload.encode("utf-8")).hexdigest()


def dataset_fingerprint(path: str | os.PathLike[str]) -> str:
    """Return ``"sha256:<hex>"`` of a data file's bytes, streamed.

    The same bytes give the same ledger wherever the file lives or whatever
    it is called; any change of content starts a separate ledger. A node
    training on part of a file should fingerprint its part (for instance the
    file's fingerprint plus its partition id), not the whole file.
    """
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(_CHUNK), b""):
                digest.update(chunk)
    except OSError as err:
        raise DataError(f"data file {path} cannot be read to fingerprint it: {err}") from err
    return "sha256:" + digest.hexdigest()


@contextlib.contextmanager
def exclusive(path: Path) -> Iterator[None]:
    """Serialise ledger updates between processes on this machine (POSIX)."""
    with open(path.with_suffix(".lock"), "a", encoding="utf-8") as lock:
        if sys.platform != "win32":
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)  # released on close
        yield


def typed_fields(raw: Any, types: Mapping[str, type], where: str) -> dict[str, Any]:
    """Return ``raw`` as a dict after checking it has exactly these typed fields."""
    if not isinstance(raw, Mapping) or set(raw) != set(types):
        got = sorted(raw) if isinstance(raw, Mapping) else type(raw).__name__
        raise PrivacyError(f"{where} must have the fields {sorted(types)}; got {got}")
    out = {}
    for name, kind in types.items():
        value = raw[name]
        if kind is float and type(value) is int:
            value = float(value)  # JSON writes 1.0 as 1 in some tools
        if type(value) is not kind:
            raise PrivacyError(f"{where}: {name}={value!r} is not a {kind.__name__}")
        out[name] = value
    return out
