"""Writing credentials safely (never over a file unless asked; keys 0600), and their names.

A key file is created with ``O_EXCL`` and its final mode in one step, so
there is no moment at which another user could read it, and an existing
credential is never silently replaced.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedlora.errors import ConfigError

CERTS_COMMAND = "fedlora certs"
_NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def refuse_existing(paths: Iterable[Path], overwrite: bool) -> None:
    if overwrite:
        return
    existing = [str(p) for p in paths if p.exists()]
    if existing:
        raise ConfigError(
            f"refusing to overwrite existing key/certificate file(s): "
            f"{', '.join(existing)}. Pass overwrite=True (`{CERTS_COMMAND} "
            "--overwrite`) to replace them; nodes and servers holding the old "
            "files must then receive the new ones."
        )


def pem_private(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def write_private(path: Path, data: bytes, overwrite: bool) -> None:
    # Create the file 0600 in the same call that creates it: a chmod afterwards
    # leaves a window where another local user could open the key. O_EXCL also
    # guarantees we never write through a pre-planted file or symlink, so an
    # allowed overwrite removes the old file first.
    if overwrite:
        path.unlink(missing_ok=True)
    write_new(path, data, 0o600)


def write_public(path: Path, data: bytes, overwrite: bool) -> None:
    if overwrite:
        path.unlink(missing_ok=True)
    write_new(path, data, 0o644)


def write_new(path: Path, data: bytes, mode: int) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags, mode)
    except FileExistsError as err:
        raise ConfigError(
            f"{path} appeared while writing credentials; another process is "
            f"writing the same folder. Rerun `{CERTS_COMMAND}` once it is done."
        ) from err
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def check_node_names(node_names: Iterable[str]) -> list[str]:
    if isinstance(node_names, str):
        raise ConfigError(
            f"node_names={node_names!r} is a string; give a list such as [{node_names!r}]."
        )
    names = list(node_names)
    for name in names:
        if not _NODE_NAME.match(name):
            raise ConfigError(
                f"node name {name!r} is not allowed: it becomes a file name, so use "
                "1-64 letters, digits, '.', '_' or '-', starting with a letter or "
                "digit."
            )
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"node names repeat: {', '.join(duplicates)}; names must be unique.")
    return names


def check_days(valid_days: int) -> None:
    if valid_days < 1:
        raise ConfigError(f"valid_days={valid_days}; give a positive number of days.")
