"""Key files: 0600 from creation, no overwrite, loadable by pyzmq, secrets never in errors."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import zmq
import zmq.auth

from replication.curve import (
    CurveKeyError,
    generate_keypair,
    load_allowed,
    load_public,
    load_secret,
    main,
)


def test_keypair_files_modes_and_roundtrip(tmp_path: Path) -> None:
    old = os.umask(0)  # a permissive umask must not make the secret readable
    try:
        pub_path, key_path = generate_keypair(tmp_path / "keys", "control")
    finally:
        os.umask(old)
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(pub_path.stat().st_mode) == 0o644
    public, secret = load_secret(key_path)
    assert load_public(pub_path) == public == load_public(key_path)
    assert zmq.curve_public(secret) == public
    assert secret.decode() not in pub_path.read_text()
    # pyzmq's own certificate loader reads the same files.
    assert zmq.auth.load_certificate(str(key_path)) == (public, secret)
    assert zmq.auth.load_certificate(str(pub_path)) == (public, None)
    assert load_allowed([tmp_path / "keys"]) == [public]


def test_refuses_overwrite_and_bad_names(tmp_path: Path) -> None:
    _, key_path = generate_keypair(tmp_path, "w1")
    before = key_path.read_bytes()
    with pytest.raises(CurveKeyError, match="refusing"):
        generate_keypair(tmp_path, "w1")
    assert key_path.read_bytes() == before
    with pytest.raises(CurveKeyError):
        generate_keypair(tmp_path, "../escape")


def test_readable_secret_refused_without_leaking_it(tmp_path: Path) -> None:
    _, key_path = generate_keypair(tmp_path, "w1")
    _, secret = load_secret(key_path)
    key_path.chmod(0o640)
    with pytest.raises(CurveKeyError) as err:
        load_secret(key_path)
    assert secret.decode() not in str(err.value)
    key_path.chmod(0o600)
    text = key_path.read_text().replace('secret-key = "', 'secret-key = "x')
    key_path.write_text(text)
    with pytest.raises(CurveKeyError) as err:
        load_secret(key_path)
    assert secret.decode()[:20] not in str(err.value)


def test_mismatched_pair_refused(tmp_path: Path) -> None:
    _, a = generate_keypair(tmp_path, "a")
    _, b = generate_keypair(tmp_path, "b")
    pub_a, sec_a = load_secret(a)
    pub_b, _ = load_secret(b)
    a.write_text(a.read_text().replace(pub_a.decode(), pub_b.decode()))
    with pytest.raises(CurveKeyError, match="does not match") as err:
        load_secret(a)
    assert sec_a.decode() not in str(err.value)


def test_keygen_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keygen", str(tmp_path), "node1"]) == 0
    out = capsys.readouterr().out
    _, secret = load_secret(tmp_path / "node1.key")
    assert secret.decode() not in out
    assert main(["keygen", str(tmp_path), "node1"]) == 1
    proc = subprocess.run(
        [sys.executable, "-m", "replication.curve", "keygen", str(tmp_path), "node2"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert "node2.key" in proc.stdout
    assert stat.S_IMODE((tmp_path / "node2.key").stat().st_mode) == 0o600
