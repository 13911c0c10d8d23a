"""Store and secrets: migrations, sealed PSKs, the master key file, restarts."""

from __future__ import annotations

import os
import sqlite3
import stat
from pathlib import Path

import pytest

from control.secrets import MasterKey, SecretError, generate_psk, generate_token, hash_token
from control.store import DB_FILENAME, MIGRATIONS, Store


def test_master_key_created_0600_and_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "state" / "master.key"
    key = MasterKey.load_or_create(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert "hidden" in repr(key) and path.read_text().strip() not in repr(key)
    with pytest.raises(SecretError, match="refusing"):
        MasterKey.create(path)
    again = MasterKey.load(path)
    assert again.open(key.seal(b"x", b"aad"), b"aad") == b"x"
    os.chmod(path, 0o644)
    with pytest.raises(SecretError, match="chmod 600"):
        MasterKey.load(path)


def test_unreadable_master_key_is_a_secret_error(tmp_path: Path) -> None:
    """Not a traceback, and no key byte in the message."""
    binary = tmp_path / "binary.key"
    binary.write_bytes(b"\xfe" + bytes(31))
    os.chmod(binary, 0o600)
    with pytest.raises(SecretError, match="cannot read") as ei:
        MasterKey.load(binary)
    assert "fe" not in str(ei.value).replace(str(tmp_path), "")
    folder = tmp_path / "dir.key"
    folder.mkdir(mode=0o700)
    with pytest.raises(SecretError, match="cannot read"):
        MasterKey.load(folder)


def test_sealed_values_are_bound_to_their_row(tmp_path: Path) -> None:
    key = MasterKey.create(tmp_path / "k")
    sealed = key.seal(b"Zq8-plaintext", b"psk/a/1")
    with pytest.raises(SecretError):
        key.open(sealed, b"psk/a/2")
    other = MasterKey.create(tmp_path / "k2")
    with pytest.raises(SecretError, match="master key") as ei:
        other.open(sealed, b"psk/a/1")
    assert "Zq8" not in str(ei.value)


def test_generated_secrets_shape() -> None:
    psks = {generate_psk() for _ in range(200)}
    assert len(psks) == 200 and all(len(p) == 32 and p.isalnum() for p in psks)
    tok = generate_token()
    assert tok.startswith("awt_") and len(tok) > 40
    assert hash_token(tok) != tok and len(hash_token(tok)) == 64


def _tunnel(store: Store, account: str, tid: str, name: str) -> None:
    with store.transaction():
        store.ensure_account(account)
        store.insert(
            "ipsec",
            {
                "id": tid, "account_id": account, "name": name,
                "cloudflare_endpoint": "203.0.113.1",
                "interface_address": "10.0.0.0/31", "mtu": 1400, "created_on": "t",
                "modified_on": "t",
            },
        )  # fmt: skip


def test_restart_keeps_data_and_db_file_holds_no_psk(tmp_path: Path) -> None:
    master = MasterKey.load_or_create(tmp_path / "master.key")
    store = Store.open(tmp_path, master)
    assert store.schema_version == len(MIGRATIONS)
    tid = "a" * 32
    _tunnel(store, "acct", tid, "t1")
    psk = generate_psk().encode()
    state_blob = os.urandom(48)
    with store.transaction():
        store.set_psk("acct", tid, psk, "now")
        store.put_sealed("ike/0001", state_blob)
    token = generate_token()
    store.add_token("tid1", hash_token(token), "acct", "d")
    store.close()

    for f in tmp_path.iterdir():
        if f.name != "master.key":
            data = f.read_bytes()
            assert psk not in data and state_blob not in data and token.encode() not in data

    store = Store.open(tmp_path, MasterKey.load(tmp_path / "master.key"))
    assert store.get("ipsec", "acct", tid)["name"] == "t1"
    assert "psk_sealed" not in store.get("ipsec", "acct", tid)
    assert store.get_psk("acct", tid) == psk
    assert store.get_sealed("ike/0001") == state_blob
    assert store.sealed_items("ike/") == [("ike/0001", state_blob)]
    info = store.find_token(hash_token(token))
    assert info is not None and info.account_id == "acct" and not info.is_operator
    assert store.find_token(hash_token(token + "x")) is None
    # Scoped reads: the row is invisible under another account.
    assert store.get("ipsec", "other", tid) is None
    assert store.get_psk("other", tid) is None
    store.close()
    # The database alone (another master key) opens no PSK.
    store = Store.open(tmp_path, MasterKey.create(tmp_path / "other.key"))
    with pytest.raises(SecretError):
        store.get_psk("acct", tid)
    store.close()


def test_wal_and_migrations_are_recorded(tmp_path: Path) -> None:
    store = Store.open(tmp_path, MasterKey.create(tmp_path / "k"))
    store.close()
    db = sqlite3.connect(tmp_path / DB_FILENAME)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert [r[0] for r in db.execute("SELECT version FROM schema_version")] == list(
        range(1, len(MIGRATIONS) + 1)
    )
    # A database from a newer anywan is refused rather than misread.
    db.execute("INSERT INTO schema_version VALUES (999, 'x')")
    db.commit()
    db.close()
    with pytest.raises(Exception, match="newer"):
        Store.open(tmp_path, MasterKey.load(tmp_path / "k"))


def test_transaction_rolls_back_everything(tmp_path: Path) -> None:
    store = Store.open(tmp_path, MasterKey.create(tmp_path / "k"))
    with pytest.raises(RuntimeError), store.transaction():
        store.ensure_account("x")
        raise RuntimeError
    assert store.accounts() == []
    store.close()


def test_upgrade_from_schema_1_backfills_derived_columns(tmp_path: Path) -> None:
    """A database written by the first schema is migrated in place, data kept."""
    db = sqlite3.connect(tmp_path / DB_FILENAME)
    db.execute("CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied_on TEXT)")
    db.executescript(MIGRATIONS[0])  # type: ignore[arg-type]
    db.execute("INSERT INTO schema_version VALUES (1, 'then')")
    db.execute("INSERT INTO accounts VALUES ('acct', 't')")
    db.execute(
        "INSERT INTO ipsec_tunnels (id, account_id, name, cloudflare_endpoint, "
        "interface_address, mtu, created_on, modified_on) "
        "VALUES (?, 'acct', 'old', '203.0.113.1', '10.3.0.1/30', 1400, 't', 't')",
        ("c" * 32,),
    )
    db.commit()
    db.close()
    store = Store.open(tmp_path, MasterKey.create(tmp_path / "k"))
    assert store.schema_version == len(MIGRATIONS) >= 2
    assert store.get("ipsec", "acct", "c" * 32)["name"] == "old"
    # The backfilled peer column answers nexthop lookups: the /30's other host.
    assert store.tunnel_by_peer("acct", "10.3.0.2") == "c" * 32
    assert store.tunnel_by_peer("acct", "10.3.0.1") is None
    assert store.tunnel_overlapping("acct", "10.3.0.0/31", "x")["id"] == "c" * 32
    assert store.tunnel_overlapping("acct", "10.3.0.4/31", "x") is None
    store.close()
