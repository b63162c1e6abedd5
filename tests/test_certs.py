"""Keys and certificates: SANs, chain to the CA, file modes, no silent overwrite."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (
    load_pem_private_key,
    load_ssh_private_key,
    load_ssh_public_key,
)

from fedlora.deploy import certs
from fedlora.errors import ConfigError

HOSTS = ["superlink.example.org", "localhost", "127.0.0.1", "10.1.2.3", "::1"]
NODES = ["hospital-a", "hospital_b"]


@pytest.fixture(scope="module")
def plan(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    return certs.generate_all(tmp_path_factory.mktemp("certs"), HOSTS, NODES)


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_server_cert_sans_hold_every_host_with_the_right_type(plan):
    server = _cert(plan["superlink"]["ssl-certfile"])
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [
        "superlink.example.org",
        "localhost",
    ]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("10.1.2.3"),
        ipaddress.ip_address("::1"),
    ]
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert x509.oid.ExtendedKeyUsageOID.SERVER_AUTH in eku


def test_server_cert_chains_to_ca_and_key_matches(plan):
    ca = _cert(plan["operator"]["ca-cert"])
    server = _cert(plan["superlink"]["ssl-certfile"])
    assert server.issuer == ca.subject
    server.verify_directly_issued_by(ca)  # raises if the signature is wrong
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    key = load_pem_private_key(plan["superlink"]["ssl-keyfile"].read_bytes(), password=None)
    assert key.public_key() == server.public_key()


def test_server_cert_does_not_verify_under_another_ca(plan, tmp_path):
    other = certs.create_ca(tmp_path, "someone else")
    server = _cert(plan["superlink"]["ssl-certfile"])
    with pytest.raises((ValueError, TypeError)):
        server.verify_directly_issued_by(other.cert)


def test_node_keys_are_openssh_nist_ec_pairs(plan):
    for name in NODES:
        private = load_ssh_private_key(
            plan[f"supernode:{name}"]["auth-supernode-private-key"].read_bytes(),
            password=None,
        )
        public_path = plan["operator"][f"public-key:{name}"]
        public = load_ssh_public_key(public_path.read_bytes())
        assert isinstance(private, ec.EllipticCurvePrivateKey)
        assert isinstance(public, ec.EllipticCurvePublicKey)
        assert public.curve.name == "secp384r1"
        assert private.public_key() == public
        assert public_path.read_text().startswith("ecdsa-sha2-nistp384 ")


def test_private_keys_are_0600_and_public_files_are_not(plan):
    private = [plan["operator"]["ca-key"], plan["superlink"]["ssl-keyfile"]]
    private += [plan[f"supernode:{n}"]["auth-supernode-private-key"] for n in NODES]
    for path in private:
        assert _mode(path) == 0o600, path
    public = [plan["operator"]["ca-cert"], plan["superlink"]["ssl-certfile"]]
    public += [plan["operator"][f"public-key:{n}"] for n in NODES]
    for path in public:
        assert _mode(path) & 0o077 == 0o044, path


def test_plan_gives_each_party_only_what_it_needs(plan):
    ca_key = plan["operator"]["ca-key"]
    node_keys = {plan[f"supernode:{n}"]["auth-supernode-private-key"] for n in NODES}
    assert set(plan) == {"operator", "superlink", "flwr-cli"} | {f"supernode:{n}" for n in NODES}
    for party, files in plan.items():
        if party != "operator":
            assert ca_key not in files.values(), party
        if party.startswith("supernode:"):
            assert files["root-certificates"] == plan["operator"]["ca-cert"]
            # a node holds its own private key and no other node's
            assert len(node_keys & set(files.values())) == 1
    assert plan["superlink"]["ssl-ca-certfile"] == plan["operator"]["ca-cert"]


def test_refuses_to_overwrite_and_names_file_and_flag(plan):
    out = plan["operator"]["ca-key"].parent
    before = plan["operator"]["ca-key"].read_bytes()
    with pytest.raises(ConfigError, match=r"ca\.key.*overwrite=True"):
        certs.generate_all(out, HOSTS, NODES)
    with pytest.raises(ConfigError, match=r"hospital-a\.key"):
        certs.create_node_keys(out, ["hospital-a"])
    assert plan["operator"]["ca-key"].read_bytes() == before


def test_refused_generate_all_writes_nothing(tmp_path):
    certs.create_node_keys(tmp_path, ["late"])  # only this one exists
    with pytest.raises(ConfigError, match="late"):
        certs.generate_all(tmp_path, ["localhost"], ["early", "late"])
    assert not (tmp_path / certs.CA_KEY).exists()
    assert not (tmp_path / certs.NODES_DIR / "early.key").exists()


def test_overwrite_true_replaces_keys_and_keeps_0600(tmp_path):
    first = certs.generate_all(tmp_path, ["localhost"], ["a"])
    old_key = first["supernode:a"]["auth-supernode-private-key"].read_bytes()
    second = certs.generate_all(tmp_path, ["localhost"], ["a"], overwrite=True)
    new_key_path = second["supernode:a"]["auth-supernode-private-key"]
    assert new_key_path.read_bytes() != old_key
    assert _mode(new_key_path) == 0o600
    server = _cert(second["superlink"]["ssl-certfile"])
    server.verify_directly_issued_by(_cert(second["operator"]["ca-cert"]))


def test_load_ca_signs_a_new_server_cert(tmp_path):
    certs.create_ca(tmp_path / "ca")
    ca = certs.load_ca(tmp_path / "ca")
    server = certs.create_server_cert(tmp_path / "srv", ca, ["node.internal"])
    _cert(server.cert_path).verify_directly_issued_by(ca.cert)


@pytest.mark.parametrize(
    ("hosts", "match"),
    [
        ([], "non-empty list"),
        ("localhost", "non-empty list"),
        (["https://superlink:9093"], "neither an IP address nor a DNS name"),
        (["bad_host!"], "neither an IP address nor a DNS name"),
    ],
)
def test_bad_hosts_are_rejected(tmp_path, hosts, match):
    with pytest.raises(ConfigError, match=match):
        certs.generate_all(tmp_path, hosts, ["a"])
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("names", "match"),
    [(["../evil"], "not allowed"), (["a", "a"], "repeat"), ("abc", "is a string")],
)
def test_bad_node_names_are_rejected(tmp_path, names, match):
    with pytest.raises(ConfigError, match=match):
        certs.create_node_keys(tmp_path, names)
