"""Keys and certificates for a fedlora deployment (TLS + SuperNode authentication).

A deployment needs two kinds of credentials:

* **TLS**: a private certificate authority (CA) signs the SuperLink's server
  certificate. SuperNodes and the ``flwr`` CLI trust the CA certificate
  (``--root-certificates`` / ``root-certificates`` in ``config.toml``), so they
  only talk to a SuperLink that holds the matching server key.
* **SuperNode authentication**: each SuperNode owns an EC key pair in OpenSSH
  format (what ``flower-supernode --auth-supernode-private-key`` loads with
  ``load_ssh_private_key`` and ``flwr supernode register`` loads with
  ``load_ssh_public_key``; NIST curves only). The operator registers each public
  key with a SuperLink started with ``--enable-supernode-auth``; a node whose
  key was not registered is refused.

What this module adds over ``cryptography``: the exact file formats Flower
1.41 expects, SANs built from a mixed list of DNS names and IPs, private keys
that are created 0600 from the first byte, a refusal to overwrite existing
credentials, and :func:`generate_all`, which says which file goes to whom.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedlora.deploy.keyfiles import (
    CERTS_COMMAND,
    check_days,
    check_node_names,
    pem_private,
    refuse_existing,
    write_private,
    write_public,
)
from fedlora.errors import ConfigError

# How a person recreates these files (defined in keyfiles, named in errors here and in flower.py).
CA_CERT = "ca.crt"
CA_KEY = "ca.key"
SERVER_CERT = "server.pem"
SERVER_KEY = "server.key"
NODES_DIR = "nodes"
PRIVATE_KEY_SUFFIX = ".key"
PUBLIC_KEY_SUFFIX = ".pub"

# P-256 for TLS: every TLS stack (OpenSSL, BoringSSL in gRPC, browsers) has it.
_TLS_CURVE = ec.SECP256R1()
# P-384 for node authentication: the curve Flower's docs use for SuperNode keys.
_NODE_CURVE = ec.SECP384R1()
# Backdate validity so a node whose clock runs a little behind accepts the cert.
_CLOCK_SKEW = dt.timedelta(minutes=5)
_DNS_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


@dataclass(frozen=True)
class CertificateAuthority:
    """The operator's CA: signs server certificates; ``key`` never leaves."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    cert_path: Path
    key_path: Path


@dataclass(frozen=True)
class ServerCertificate:
    """The SuperLink's TLS certificate and private key files."""

    cert_path: Path
    key_path: Path


@dataclass(frozen=True)
class NodeKeyPair:
    """One SuperNode's authentication key files (OpenSSH format)."""

    name: str
    private_key_path: Path
    public_key_path: Path


def create_ca(
    out_dir: str | os.PathLike[str],
    common_name: str = "fedlora CA",
    *,
    valid_days: int = 3650,
    overwrite: bool = False,
) -> CertificateAuthority:
    """Create a self-signed CA (``ca.crt``, ``ca.key``) in ``out_dir``.

    Parameters
    ----------
    out_dir : path
        Folder to write into; created if missing.
    common_name : str
        Subject CN of the CA, shown by ``openssl x509 -text``.
    valid_days : int
        Validity of the CA certificate.
    overwrite : bool
        Replace existing files. Off by default because a new CA invalidates
        every certificate signed by the old one.

    Returns
    -------
    CertificateAuthority
    """
    out = Path(out_dir)
    cert_path, key_path = out / CA_CERT, out / CA_KEY
    refuse_existing([cert_path, key_path], overwrite)
    check_days(valid_days)

    key = ec.generate_private_key(_TLS_CURVE)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.UTC)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=valid_days))
        # path_length=0: this CA signs leaf certificates only, never another CA.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    out.mkdir(parents=True, exist_ok=True)
    write_private(key_path, pem_private(key), overwrite)
    write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM), overwrite)
    return CertificateAuthority(cert, key, cert_path, key_path)


def load_ca(out_dir: str | os.PathLike[str]) -> CertificateAuthority:
    """Load the CA written by :func:`create_ca`, e.g. to sign a new server cert."""
    out = Path(out_dir)
    cert_path, key_path = out / CA_CERT, out / CA_KEY
    for path in (cert_path, key_path):
        if not path.is_file():
            raise ConfigError(
                f"CA file {path} does not exist. Create the CA with "
                f"`{CERTS_COMMAND} --out {out}` (operator machine only)."
            )
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"CA key {key_path} is not an EC private key.")
    if cert.public_key() != key.public_key():
        raise ConfigError(
            f"CA key {key_path} does not belong to CA certificate {cert_path}. "
            f"Recreate both with `{CERTS_COMMAND} --out {out} --overwrite`."
        )
    return CertificateAuthority(cert, key, cert_path, key_path)


def create_server_cert(
    out_dir: str | os.PathLike[str],
    ca: CertificateAuthority,
    hosts: Sequence[str],
    *,
    valid_days: int = 825,
    overwrite: bool = False,
) -> ServerCertificate:
    """Create the SuperLink's ``server.pem``/``server.key``, signed by ``ca``.

    Parameters
    ----------
    out_dir : path
        Folder to write into; created if missing.
    ca : CertificateAuthority
        Issuer, from :func:`create_ca` or :func:`load_ca`.
    hosts : sequence of str
        Every name or IP that SuperNodes and the ``flwr`` CLI use to reach the
        SuperLink (``--superlink HOST:PORT``). Each becomes a SubjectAltName:
        IPs as ``IPAddress``, anything else as ``DNSName``. TLS clients check
        the SAN, not the CN, so a host missing here fails verification.
    valid_days : int
        Validity of the server certificate.
    overwrite : bool
        Replace existing files.

    Returns
    -------
    ServerCertificate
    """
    out = Path(out_dir)
    cert_path, key_path = out / SERVER_CERT, out / SERVER_KEY
    refuse_existing([cert_path, key_path], overwrite)
    check_days(valid_days)
    sans = subject_alt_names(hosts)

    key = ec.generate_private_key(_TLS_CURVE)
    now = dt.datetime.now(dt.UTC)
    not_after = min(now + dt.timedelta(days=valid_days), ca.cert.not_valid_after_utc)
    ca_ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski.value),
            critical=False,
        )
        .sign(ca.key, hashes.SHA256())
    )
    out.mkdir(parents=True, exist_ok=True)
    write_private(key_path, pem_private(key), overwrite)
    write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM), overwrite)
    return ServerCertificate(cert_path, key_path)


def create_node_keys(
    out_dir: str | os.PathLike[str],
    node_names: Iterable[str],
    *,
    overwrite: bool = False,
) -> dict[str, NodeKeyPair]:
    """Create one OpenSSH EC (P-384) key pair per SuperNode under ``out_dir/nodes``.

    ``nodes/<name>.key`` goes to that node only (``--auth-supernode-private-key``);
    ``nodes/<name>.pub`` is what the operator registers with
    ``flwr supernode register nodes/<name>.pub <connection>``.

    Returns
    -------
    dict[str, NodeKeyPair]
        Key pairs by node name, in the order given.
    """
    names = check_node_names(node_names)
    nodes_dir = Path(out_dir) / NODES_DIR
    pairs = {
        name: NodeKeyPair(
            name,
            nodes_dir / f"{name}{PRIVATE_KEY_SUFFIX}",
            nodes_dir / f"{name}{PUBLIC_KEY_SUFFIX}",
        )
        for name in names
    }
    refuse_existing(
        [p for pair in pairs.values() for p in (pair.private_key_path, pair.public_key_path)],
        overwrite,
    )
    nodes_dir.mkdir(parents=True, exist_ok=True)
    for pair in pairs.values():
        key = ec.generate_private_key(_NODE_CURVE)
        private = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
        public = key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        write_private(pair.private_key_path, private, overwrite)
        write_public(pair.public_key_path, public + f" {pair.name}\n".encode(), overwrite)
    return pairs


def generate_all(
    out_dir: str | os.PathLike[str],
    hosts: Sequence[str],
    node_names: Iterable[str],
    *,
    common_name: str = "fedlora CA",
    overwrite: bool = False,
) -> dict[str, dict[str, Path]]:
    """Create CA, server certificate and node keys; say which file goes to whom.

    Nothing is written if any target file exists and ``overwrite`` is False, so
    a refused call leaves the folder as it was.

    Returns
    -------
    dict[str, dict[str, Path]]
        Recipient -> {purpose: file}. Purposes are named after the flag or
        config key that consumes the file::

            "operator":        ca-key (keep offline), ca-cert,
                               public-key:<node> (register each one)
            "superlink":       ssl-certfile, ssl-keyfile, ssl-ca-certfile
            "supernode:<node>": root-certificates, auth-supernode-private-key
            "flwr-cli":        root-certificates
    """
    out = Path(out_dir)
    names = check_node_names(node_names)
    subject_alt_names(hosts)  # validate before anything is written
    targets = [out / CA_CERT, out / CA_KEY, out / SERVER_CERT, out / SERVER_KEY]
    for name in names:
        targets.append(out / NODES_DIR / f"{name}{PRIVATE_KEY_SUFFIX}")
        targets.append(out / NODES_DIR / f"{name}{PUBLIC_KEY_SUFFIX}")
    refuse_existing(targets, overwrite)

    ca = create_ca(out, common_name, overwrite=overwrite)
    server = create_server_cert(out, ca, hosts, overwrite=overwrite)
    nodes = create_node_keys(out, names, overwrite=overwrite)

    plan: dict[str, dict[str, Path]] = {
        "operator": {"ca-key": ca.key_path, "ca-cert": ca.cert_path},
        "superlink": {
            "ssl-certfile": server.cert_path,
            "ssl-keyfile": server.key_path,
            "ssl-ca-certfile": ca.cert_path,
        },
        "flwr-cli": {"root-certificates": ca.cert_path},
    }
    for name, pair in nodes.items():
        plan["operator"][f"public-key:{name}"] = pair.public_key_path
        plan[f"supernode:{name}"] = {
            "root-certificates": ca.cert_path,
            "auth-supernode-private-key": pair.private_key_path,
        }
    return plan


def subject_alt_names(hosts: Sequence[str]) -> list[x509.GeneralName]:
    """Turn host strings into SAN entries (``IPAddress`` for IPs, else ``DNSName``)."""
    if isinstance(hosts, str) or not hosts:
        raise ConfigError(
            f"hosts={hosts!r}: give a non-empty list of the DNS names/IPs the "
            "SuperLink is reached at, e.g. ['superlink.example.org', '10.0.0.5']."
        )
    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
            continue
        except ValueError:
            pass
        labels = host.removeprefix("*.").rstrip(".").split(".")
        if not host or not all(_DNS_LABEL.match(label) for label in labels):
            raise ConfigError(
                f"host {host!r} is neither an IP address nor a DNS name. Give the "
                "bare name or IP that nodes connect to, without scheme or port "
                "(e.g. 'superlink.example.org', not 'https://...:9093')."
            )
        sans.append(x509.DNSName(host))
    return sans
