"""A node runs only an app its site trusts (issue 17): pinned digests and
signatures, checked on the real FAB ``flwr run`` builds from this repository."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from fedlora.app_trust import (
    AppNotTrusted,
    TrustPolicy,
    fab_digest,
    generate_signing_key,
    sign_digest,
)
from fedlora.cli.ops import app as ops_app
from fedlora.client import pinned
from fedlora.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def fab() -> bytes:
    from flwr.cli.build import build_fab_from_disk

    return build_fab_from_disk(REPO)


def _rewrite(fab: bytes, path: str, content: bytes | None, keep_manifest: bool = True) -> bytes:
    """A copy of ``fab`` with one file replaced (or added), manifest untouched."""
    src = zipfile.ZipFile(io.BytesIO(fab))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as dst:
        for name in src.namelist():
            if name == path:
                continue
            dst.writestr(name, src.read(name))
        if content is not None:
            dst.writestr(path, content)
    return out.getvalue()


def test_the_digest_is_stable_and_matches_the_cli(fab: bytes) -> None:
    from flwr.cli.build import build_fab_from_disk

    assert fab_digest(fab) == fab_digest(build_fab_from_disk(REPO))
    printed = CliRunner().invoke(ops_app, ["app-digest", "--app", str(REPO)])
    assert printed.exit_code == 0, printed.output
    assert printed.output.strip() == f"sha256:{fab_digest(fab)}"


def test_a_changed_or_added_file_is_caught(fab: bytes) -> None:
    with pytest.raises(AppNotTrusted, match="does not match its manifest"):
        fab_digest(_rewrite(fab, "fedlora/client/app.py", b"print('evil')"))
    with pytest.raises(AppNotTrusted, match="unlisted"):
        fab_digest(_rewrite(fab, "fedlora/backdoor.py", b"x = 1"))
    with pytest.raises(AppNotTrusted, match="cannot be read"):
        fab_digest(b"not a zip")


def test_pinned_digest_passes_others_are_refused(fab: bytes, tmp_path: Path) -> None:
    trust = tmp_path / "trusted"
    trust.write_text(f"# approved by IT\nsha256:{fab_digest(fab)}\n")
    assert TrustPolicy.load(trust).check(fab) == fab_digest(fab)
    trust.write_text("sha256:" + "0" * 64 + "\n")
    with pytest.raises(AppNotTrusted, match=f"sha256:{fab_digest(fab)} is not pinned"):
        TrustPolicy.load(trust).check(fab)


def test_signatures_from_trusted_signers_only(fab: bytes, tmp_path: Path) -> None:
    line = generate_signing_key(tmp_path, "release")
    other = generate_signing_key(tmp_path, "mallory")
    trust = tmp_path / "trusted"
    trust.write_text(line + "\n")
    policy = TrustPolicy.load(trust)
    digest = fab_digest(fab)
    good = sign_digest(digest, tmp_path / "release.signing.key")
    assert policy.check(fab, good) == digest
    with pytest.raises(AppNotTrusted, match="'mallory', whom this site does not trust"):
        policy.check(fab, sign_digest(digest, tmp_path / "mallory.signing.key"))
    forged = "release:" + sign_digest(digest, tmp_path / "mallory.signing.key").split(":")[1]
    with pytest.raises(AppNotTrusted, match="does not verify"):
        policy.check(fab, forged)
    # A signature of the honest app does not cover a modified one.
    tampered = _rewrite(fab, "README.md", b"changed")
    with pytest.raises(AppNotTrusted):
        policy.check(tampered, good)
    assert other.startswith("ed25519:mallory:")


def test_bad_trust_files_fail_closed(tmp_path: Path) -> None:
    trust = tmp_path / "trusted"
    trust.write_text("sha256:abc\n")
    with pytest.raises(ConfigError, match="line 1"):
        TrustPolicy.load(trust)
    trust.write_text("# nothing\n")
    with pytest.raises(ConfigError, match="trusts no app"):
        TrustPolicy.load(trust)


def test_the_launcher_refuses_without_a_trust_file(
    fab: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    task = SimpleNamespace(content=fab)
    monkeypatch.delenv(pinned.ENV_TRUSTED_APPS, raising=False)
    monkeypatch.delenv(pinned.ENV_TRUST_ANY, raising=False)
    with pytest.raises(AppNotTrusted, match="refuses every app"):
        pinned.verify_task(task, {})
    trust = tmp_path / "trusted"
    trust.write_text(f"sha256:{fab_digest(fab)}\n")
    monkeypatch.setenv(pinned.ENV_TRUSTED_APPS, str(trust))
    assert pinned.verify_task(task, {}) == fab_digest(fab)
    # The run's config cannot switch the check off.
    tampered = SimpleNamespace(content=_rewrite(fab, "README.md", b"x"))
    with pytest.raises(AppNotTrusted):
        pinned.verify_task(tampered, {"app-signature": "", "trust-any-app": True})


def test_node_refuses_to_start_without_a_trust_decision(tmp_path: Path) -> None:
    made = CliRunner().invoke(
        ops_app, ["certs", "--out", str(tmp_path), "--host", "localhost", "--node", "a"]
    )
    assert made.exit_code == 0, made.output
    data = tmp_path / "d.csv"
    data.write_text("text,label\nhello,x\n")
    result = CliRunner().invoke(
        ops_app,
        [
            "node",
            "--superlink",
            "127.0.0.1:1",
            "--ca",
            str(tmp_path / "ca.crt"),
            "--key",
            str(tmp_path / "nodes" / "a.key"),
            "--data-path",
            str(data),
            "--print-command",
        ],
    )
    assert result.exit_code == 2
    assert "--trusted-apps" in result.output
