"""Which app a site runs: pinned digests and signatures the site checks itself.

Whoever can submit a run to the SuperLink chooses the code every SuperNode
executes beside its data and ledger, so every guarantee of a site (its ε cap,
DP-SGD, ``require-secagg``, "only adapter tensors leave") would rest on the
submitter's goodwill. Flower 1.42 verifies signed apps only through Flower
Hub's licence service (``--trusted-entities``), which an offline federation
cannot reach; a locally submitted FAB carries no verification at all.

fedlora closes this at the node. ``fedlora node`` launches Flower's SuperNode
so that every ClientApp process is fedlora's launcher
(:mod:`fedlora.client.pinned`), which checks the FAB *before* Flower installs
or imports any of it, against the site's own trust file:

* ``sha256:<digest>`` lines pin exact app contents (``fedlora app-digest``
  prints the digest of an app folder: a hash of the FAB's file manifest
  after every file is checked against it, so it does not depend on zip
  timestamps);
* ``ed25519:<name>:<base64 public key>`` lines trust a signer (for instance
  the consortium's release team): ``fedlora run --sign-key`` sends a
  signature of the digest with the run (run-config key ``app-signature``).

Anything else is refused with an error reply naming the digest, so the
operator sees why and the site's IT can decide to pin it.

What this adds: an offline, site-side app pin for Flower; Flower has the
manifest (``.info/CONTENT``) but no local check of it.
"""

from __future__ import annotations

import base64
import hashlib
import io
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedlora.errors import ConfigError, FedloraError

MANIFEST = ".info/CONTENT"
_MAX_FAB = 200 * 1024 * 1024


class AppNotTrusted(FedloraError, PermissionError):
    """The app a run asks this node to execute is not one its site trusts."""


@dataclass(frozen=True)
class TrustPolicy:
    """A site's trusted app digests and signers (from its trust file)."""

    digests: frozenset[str] = frozenset()
    signers: dict[str, Ed25519PublicKey] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path) -> TrustPolicy:
        """Read a trust file: one ``sha256:...`` or ``ed25519:name:key`` per line.

        Raises
        ------
        ConfigError
            Naming the file and line, for anything else (fails closed: a typo
            must not become "trust nothing" silently or "trust all").
        """
        file = Path(path)
        try:
            lines = file.read_text(encoding="utf-8").splitlines()
        except OSError as err:
            raise ConfigError(f"trusted-apps file {file} cannot be read: {err}") from None
        digests: set[str] = set()
        signers: dict[str, Ed25519PublicKey] = {}
        for number, raw in enumerate(lines, 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            kind, _, rest = line.partition(":")
            if kind == "sha256" and len(rest) == 64 and _is_hex(rest):
                digests.add(rest.lower())
            elif kind == "ed25519" and rest.count(":") == 1:
                name, key = rest.split(":")
                try:
                    signers[name] = Ed25519PublicKey.from_public_bytes(base64.b64decode(key))
                except ValueError as err:
                    raise ConfigError(
                        f"{file}, line {number}: public key of {name!r} is not a base64 "
                        f"ed25519 key ({err})"
                    ) from None
            else:
                raise ConfigError(
                    f"{file}, line {number}: {line[:60]!r} is neither 'sha256:<64 hex>' nor "
                    "'ed25519:<name>:<base64 public key>'"
                )
        if not digests and not signers:
            raise ConfigError(
                f"trusted-apps file {file} trusts no app; add the digest `fedlora app-digest` "
                "prints, or a signer's public key"
            )
        return cls(frozenset(digests), signers)

    def check(self, fab: bytes, signature: str = "") -> str:
        """The FAB's digest if this policy trusts it.

        Raises
        ------
        AppNotTrusted
            If the FAB is malformed, or neither pinned nor validly signed by a
            trusted signer.
        """
        digest = fab_digest(fab)
        if digest in self.digests:
            return digest
        if signature:
            name, _, sig = signature.partition(":")
            key = self.signers.get(name)
            if key is None:
                raise AppNotTrusted(
                    f"app sha256:{digest} is signed by {name!r}, whom this site does not "
                    "trust; its IT adds the signer's key or the digest to the trusted-apps file"
                )
            try:
                key.verify(base64.b64decode(sig), digest.encode())
            except (InvalidSignature, ValueError):
                raise AppNotTrusted(
                    f"app sha256:{digest}: the signature claimed from {name!r} does not verify"
                ) from None
            return digest
        raise AppNotTrusted(
            f"app sha256:{digest} is not pinned in this site's trusted-apps file and carries "
            "no signature; the node refuses to run it. If the site's IT approves this app, "
            f"they add the line 'sha256:{digest}'"
        )


def fab_digest(fab: bytes) -> str:
    """A digest of an app's contents: sha256 of its manifest, after checking
    that the FAB holds exactly the files the manifest lists, with those hashes.

    Raises
    ------
    AppNotTrusted
        If the FAB is not a zip, has no manifest, or any file disagrees with it.
    """
    if len(fab) > _MAX_FAB:
        raise AppNotTrusted(f"app bundle of {len(fab)} bytes is larger than {_MAX_FAB}")
    try:
        archive = zipfile.ZipFile(io.BytesIO(fab))
        names = set(archive.namelist())
        manifest = archive.read(MANIFEST).decode("utf-8")
        listed: dict[str, str] = {}
        for line in manifest.splitlines():
            path, sha, _bits = line.rsplit(",", 2)
            listed[path] = sha
        if names - {MANIFEST} != set(listed):
            extra = sorted(names - {MANIFEST} - set(listed))[:3]
            missing = sorted(set(listed) - names)[:3]
            raise AppNotTrusted(
                f"app bundle and its manifest disagree: unlisted {extra}, missing {missing}"
            )
        for path, sha in listed.items():
            if hashlib.sha256(archive.read(path)).hexdigest() != sha:
                raise AppNotTrusted(f"app bundle file {path!r} does not match its manifest")
    except (zipfile.BadZipFile, KeyError, ValueError, UnicodeDecodeError) as err:
        raise AppNotTrusted(f"app bundle cannot be read ({type(err).__name__})") from None
    return hashlib.sha256(manifest.encode("utf-8")).hexdigest()


def app_dir_digest(app_dir: str | Path) -> str:
    """The digest of the FAB ``flwr run`` builds from ``app_dir``."""
    from flwr.cli.build import build_fab_from_disk

    return fab_digest(build_fab_from_disk(Path(app_dir).resolve()))


def generate_signing_key(out: str | Path, name: str) -> str:
    """Write ``<out>/<name>.signing.key`` (PEM, mode 600); return its trust line."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    path = folder / f"{name}.signing.key"
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path.touch(mode=0o600, exist_ok=False)
    path.write_bytes(pem)
    return trust_line(name, key.public_key())


def trust_line(name: str, key: Ed25519PublicKey) -> str:
    """The trusted-apps line that trusts ``key`` as signer ``name``."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return f"ed25519:{name}:{base64.b64encode(raw).decode()}"


def sign_digest(digest: str, key_path: str | Path) -> str:
    """``<name>:<base64 signature>`` of ``digest`` with a signing key file."""
    path = Path(key_path)
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError) as err:
        raise ConfigError(f"signing key {path} cannot be read: {err}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"signing key {path} is not an ed25519 key")
    name = path.name.removesuffix(".signing.key")
    return f"{name}:{base64.b64encode(key.sign(digest.encode())).decode()}"


def _is_hex(text: str) -> bool:
    try:
        int(text, 16)
    except ValueError:
        return False
    return True
