"""The control node's durable state: one SQLite file (WAL) under the state dir.

Accounts, IPsec and GRE tunnels, routes, API tokens (hashed) and an encrypted
key/value table (``sealed_state``) for the state that must survive a control
restart: one row per Child SA record (``sa/…``) and one per IKE SA
(``ike/sa/<SPI>``), each sealed on its own so a change rewrites one row. Every
secret column is sealed with the master key (:mod:`control.secrets`), so the
database file alone reveals no PSK or key.

Calls are synchronous and short; the API runs them on the event loop thread,
which makes each handler's read-check-write sequence atomic with respect to
other requests (no ``await`` inside a transaction), and the UNIQUE constraints
are the backstop. Schema changes are numbered migrations applied in order and
recorded in ``schema_version``.
"""

from __future__ import annotations

import ipaddress
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from control.secrets import MasterKey

DB_FILENAME = "anywan.sqlite3"


def peer_address(interface_address: str) -> str:
    """The customer's side of a tunnel's /31 (RFC 3021) or /30 (the other of
    its two hosts): the address a route names as its nexthop."""
    iface = ipaddress.IPv4Interface(interface_address)
    net = iface.network
    if net.prefixlen == 31:
        return str(ipaddress.IPv4Address(int(iface.ip) ^ 1))
    first, second = int(net.network_address) + 1, int(net.network_address) + 2
    return str(ipaddress.IPv4Address(second if int(iface.ip) == first else first))


def interface_columns(interface_address: str) -> dict[str, Any]:
    """Derived, indexed columns of a tunnel's interface network: the peer's
    address (a route's nexthop) and the network as an integer range (overlap
    checks in SQL instead of parsing every row)."""
    net = ipaddress.IPv4Interface(interface_address).network
    return {
        "peer_address": peer_address(interface_address),
        "net_lo": int(net.network_address),
        "net_hi": int(net.broadcast_address),
    }


def _migration_2(db: sqlite3.Connection) -> None:
    """Derived interface columns + indexes, backfilled from existing rows."""
    for table in ("ipsec_tunnels", "gre_tunnels"):
        for col, typ in (("peer_address", "TEXT"), ("net_lo", "INTEGER"), ("net_hi", "INTEGER")):
            db.execute(f"ALTER TABLE {table} ADD COLUMN {col} {typ}")
        for row_id, iface in db.execute(f"SELECT id, interface_address FROM {table}").fetchall():
            cols = interface_columns(iface)
            db.execute(
                f"UPDATE {table} SET peer_address = ?, net_lo = ?, net_hi = ? WHERE id = ?",
                (cols["peer_address"], cols["net_lo"], cols["net_hi"], row_id),
            )
        db.execute(f"CREATE INDEX {table}_by_peer ON {table} (account_id, peer_address)")
        db.execute(f"CREATE INDEX {table}_by_net ON {table} (account_id, net_lo, net_hi)")
    db.execute(
        "CREATE INDEX gre_tunnels_by_pair ON gre_tunnels "
        "(cloudflare_gre_endpoint, customer_gre_endpoint)"
    )
    db.execute(
        "CREATE INDEX ipsec_tunnels_by_pair ON ipsec_tunnels "
        "(cloudflare_endpoint, customer_endpoint)"
    )


MIGRATIONS: list[str | Callable[[sqlite3.Connection], None]] = [
    # 1: the initial schema.
    """
    CREATE TABLE accounts (
        account_id TEXT PRIMARY KEY,
        created_on TEXT NOT NULL
    );
    CREATE TABLE ipsec_tunnels (
        id TEXT PRIMARY KEY,
        account_id TEXT NOT NULL REFERENCES accounts(account_id),
        name TEXT NOT NULL,
        description TEXT NOT NULL DEFAULT '',
        customer_endpoint TEXT,
        cloudflare_endpoint TEXT NOT NULL,
        interface_address TEXT NOT NULL,
        replay_protection INTEGER NOT NULL DEFAULT 0,
        allow_null_cipher INTEGER NOT NULL DEFAULT 0,
        mtu INTEGER NOT NULL,
        mss INTEGER NOT NULL DEFAULT 0,
        psk_sealed BLOB,
        psk_generated_on TEXT,
        created_on TEXT NOT NULL,
        modified_on TEXT NOT NULL,
        UNIQUE (account_id, name)
    );
    CREATE TABLE gre_tunnels (
        id TEXT PRIMARY KEY,
        account_id TEXT NOT NULL REFERENCES accounts(account_id),
        name TEXT NOT NULL,
        description TEXT NOT NULL DEFAULT '',
        customer_gre_endpoint TEXT NOT NULL,
        cloudflare_gre_endpoint TEXT NOT NULL,
        interface_address TEXT NOT NULL,
        ttl INTEGER NOT NULL DEFAULT 64,
        mtu INTEGER NOT NULL DEFAULT 1476,
        mss INTEGER NOT NULL DEFAULT 0,
        created_on TEXT NOT NULL,
        modified_on TEXT NOT NULL,
        UNIQUE (account_id, name)
    );
    CREATE TABLE routes (
        id TEXT PRIMARY KEY,
        account_id TEXT NOT NULL REFERENCES accounts(account_id),
        prefix TEXT NOT NULL,
        nexthop TEXT NOT NULL,
        priority INTEGER NOT NULL DEFAULT 100,
        weight INTEGER NOT NULL DEFAULT 100,
        description TEXT NOT NULL DEFAULT '',
        created_on TEXT NOT NULL,
        modified_on TEXT NOT NULL,
        UNIQUE (account_id, prefix, nexthop)
    );
    CREATE INDEX routes_by_nexthop ON routes (account_id, nexthop);
    CREATE TABLE api_tokens (
        id TEXT PRIMARY KEY,
        token_sha256 TEXT NOT NULL UNIQUE,
        account_id TEXT,
        description TEXT NOT NULL DEFAULT '',
        created_on TEXT NOT NULL
    );
    CREATE TABLE sealed_state (
        key TEXT PRIMARY KEY,
        sealed BLOB NOT NULL,
        modified_on TEXT NOT NULL
    );
    """,
    # 2: derived interface columns for indexed nexthop/overlap lookups.
    _migration_2,
]

_BOOL_COLUMNS = frozenset({"replay_protection", "allow_null_cipher"})
TABLES = {"ipsec": "ipsec_tunnels", "gre": "gre_tunnels", "route": "routes"}
_PUBLIC_EXCLUDE = frozenset({"psk_sealed", "peer_address", "net_lo", "net_hi"})
_TUNNEL_TABLES = ("ipsec_tunnels", "gre_tunnels")


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


class StoreError(Exception):
    pass


class Conflict(StoreError):
    """A uniqueness rule would break (maps to HTTP 409)."""


@dataclass(frozen=True, slots=True)
class TokenInfo:
    token_id: str
    account_id: str | None
    """None for an operator token (sees every account)."""
    description: str

    @property
    def is_operator(self) -> bool:
        return self.account_id is None


def _psk_aad(account_id: str, tunnel_id: str) -> bytes:
    """AES-GCM AAD binding a sealed PSK to its row (see control.secrets)."""
    return f"psk/{account_id}/{tunnel_id}".encode()


def _state_aad(key: str) -> bytes:
    return f"state/{key}".encode()


def _row(row: sqlite3.Row) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k in row.keys():  # noqa: SIM118 - sqlite3.Row is not a mapping
        if k in _PUBLIC_EXCLUDE:
            continue
        v = row[k]
        out[k] = bool(v) if k in _BOOL_COLUMNS else v
    return out


class Store:
    """One SQLite database. Not thread-safe: use it from one thread (the loop)."""

    def __init__(self, path: Path, master: MasterKey) -> None:
        self.path = path
        self._master = master
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, isolation_level=None, timeout=10.0)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._in_txn = False
        self.migrate()

    @classmethod
    def open(cls, state_dir: Path, master: MasterKey) -> Store:
        return cls(state_dir / DB_FILENAME, master)

    def close(self) -> None:
        self._db.close()

    # -- schema ---------------------------------------------------------------

    @property
    def schema_version(self) -> int:
        row = self._db.execute(
            "SELECT name FROM sqlite_master WHERE type='table' AND name='schema_version'"
        ).fetchone()
        if row is None:
            return 0
        v = self._db.execute("SELECT MAX(version) FROM schema_version").fetchone()[0]
        return int(v or 0)

    def migrate(self) -> None:
        with self.transaction():
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS schema_version "
                "(version INTEGER PRIMARY KEY, applied_on TEXT NOT NULL)"
            )
            current = self.schema_version
            if current > len(MIGRATIONS):
                raise StoreError(
                    f"database schema {current} is newer than this anywan ({len(MIGRATIONS)})"
                )
            for version in range(current + 1, len(MIGRATIONS) + 1):
                step = MIGRATIONS[version - 1]
                if callable(step):
                    step(self._db)
                else:
                    for stmt in step.split(";"):
                        if stmt.strip():
                            self._db.execute(stmt)
                self._db.execute(
                    "INSERT INTO schema_version (version, applied_on) VALUES (?, ?)",
                    (version, now_iso()),
                )

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """BEGIN IMMEDIATE … COMMIT, or ROLLBACK on any exception. Re-entrant."""
        if self._in_txn:
            yield
            return
        self._db.execute("BEGIN IMMEDIATE")
        self._in_txn = True
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        else:
            self._db.execute("COMMIT")
        finally:
            self._in_txn = False

    # -- accounts -------------------------------------------------------------

    def ensure_account(self, account_id: str) -> None:
        self._db.execute(
            "INSERT OR IGNORE INTO accounts (account_id, created_on) VALUES (?, ?)",
            (account_id, now_iso()),
        )

    def accounts(self) -> list[str]:
        return [r[0] for r in self._db.execute("SELECT account_id FROM accounts ORDER BY 1")]

    # -- generic rows ---------------------------------------------------------

    def rows(self, kind: str, account_id: str | None = None) -> list[dict[str, Any]]:
        table = TABLES[kind]
        if account_id is None:
            cur = self._db.execute(f"SELECT * FROM {table} ORDER BY created_on, id")
        else:
            cur = self._db.execute(
                f"SELECT * FROM {table} WHERE account_id = ? ORDER BY created_on, id",
                (account_id,),
            )
        return [_row(r) for r in cur]

    def get(self, kind: str, account_id: str, row_id: str) -> dict[str, Any] | None:
        """The row only if it belongs to ``account_id``: another account's id is None."""
        r = self._db.execute(
            f"SELECT * FROM {TABLES[kind]} WHERE id = ? AND account_id = ?", (row_id, account_id)
        ).fetchone()
        return None if r is None else _row(r)

    def insert(self, kind: str, row: dict[str, Any]) -> None:
        if kind in ("ipsec", "gre"):
            row = {**row, **interface_columns(row["interface_address"])}
        cols = list(row)
        try:
            self._db.execute(
                f"INSERT INTO {TABLES[kind]} ({', '.join(cols)}) "
                f"VALUES ({', '.join('?' for _ in cols)})",
                [row[c] for c in cols],
            )
        except sqlite3.IntegrityError as exc:
            raise Conflict(str(exc)) from None

    def update(self, kind: str, account_id: str, row_id: str, changes: dict[str, Any]) -> None:
        if not changes:
            return
        if kind in ("ipsec", "gre") and "interface_address" in changes:
            changes = {**changes, **interface_columns(changes["interface_address"])}
        sets = ", ".join(f"{c} = ?" for c in changes)
        try:
            self._db.execute(
                f"UPDATE {TABLES[kind]} SET {sets} WHERE id = ? AND account_id = ?",
                [*changes.values(), row_id, account_id],
            )
        except sqlite3.IntegrityError as exc:
            raise Conflict(str(exc)) from None

    def delete(self, kind: str, account_id: str, row_id: str) -> bool:
        cur = self._db.execute(
            f"DELETE FROM {TABLES[kind]} WHERE id = ? AND account_id = ?", (row_id, account_id)
        )
        return cur.rowcount > 0

    # -- indexed lookups the API's checks use --------------------------------

    def tunnel_named(self, account_id: str, name: str) -> tuple[str, str] | None:
        """(kind, id) of the account's tunnel (either kind) with this name."""
        for kind, table in (("ipsec", "ipsec_tunnels"), ("gre", "gre_tunnels")):
            r = self._db.execute(
                f"SELECT id FROM {table} WHERE account_id = ? AND name = ?", (account_id, name)
            ).fetchone()
            if r is not None:
                return kind, r[0]
        return None

    def tunnel_overlapping(
        self, account_id: str, interface_address: str, exclude_id: str
    ) -> dict[str, Any] | None:
        cols = interface_columns(interface_address)
        for table in _TUNNEL_TABLES:
            r = self._db.execute(
                f"SELECT * FROM {table} WHERE account_id = ? AND net_lo <= ? AND net_hi >= ? "
                "AND id != ? LIMIT 1",
                (account_id, cols["net_hi"], cols["net_lo"], exclude_id),
            ).fetchone()
            if r is not None:
                return _row(r)
        return None

    def tunnel_by_peer(self, account_id: str, peer: str) -> str | None:
        """The account's tunnel whose customer-side interface address is ``peer``."""
        for table in _TUNNEL_TABLES:
            r = self._db.execute(
                f"SELECT id FROM {table} WHERE account_id = ? AND peer_address = ?",
                (account_id, peer),
            ).fetchone()
            if r is not None:
                return str(r[0])
        return None

    def peer_map(self, account_id: str) -> dict[str, str]:
        out: dict[str, str] = {}
        for table in _TUNNEL_TABLES:
            for peer, row_id in self._db.execute(
                f"SELECT peer_address, id FROM {table} WHERE account_id = ?", (account_id,)
            ):
                out[peer] = row_id
        return out

    def route_ids(self, account_id: str, nexthop: str, prefix: str | None = None) -> list[str]:
        if prefix is None:
            cur = self._db.execute(
                "SELECT id FROM routes WHERE account_id = ? AND nexthop = ? ORDER BY id",
                (account_id, nexthop),
            )
        else:
            cur = self._db.execute(
                "SELECT id FROM routes WHERE account_id = ? AND nexthop = ? AND prefix = ?",
                (account_id, nexthop, prefix),
            )
        return [r[0] for r in cur]

    def gre_with_pair(self, cloudflare: str, customer: str, exclude_id: str) -> str | None:
        r = self._db.execute(
            "SELECT id FROM gre_tunnels WHERE cloudflare_gre_endpoint = ? "
            "AND customer_gre_endpoint = ? AND id != ? LIMIT 1",
            (cloudflare, customer, exclude_id),
        ).fetchone()
        return None if r is None else str(r[0])

    def ipsec_with_pair(
        self, account_id: str, cloudflare: str, customer: str, exclude_id: str
    ) -> str | None:
        r = self._db.execute(
            "SELECT id FROM ipsec_tunnels WHERE account_id = ? AND cloudflare_endpoint = ? "
            "AND customer_endpoint = ? AND id != ? LIMIT 1",
            (account_id, cloudflare, customer, exclude_id),
        ).fetchone()
        return None if r is None else str(r[0])

    def count_by_account(self, kind: str) -> dict[str, int]:
        cur = self._db.execute(
            f"SELECT account_id, COUNT(*) FROM {TABLES[kind]} GROUP BY account_id"
        )
        return {a: int(n) for a, n in cur}

    def count(self, kind: str) -> int:
        return int(self._db.execute(f"SELECT COUNT(*) FROM {TABLES[kind]}").fetchone()[0])

    # -- PSKs -----------------------------------------------------------------

    def set_psk(self, account_id: str, tunnel_id: str, psk: bytes, when: str) -> None:
        sealed = self._master.seal(psk, _psk_aad(account_id, tunnel_id))
        self._db.execute(
            "UPDATE ipsec_tunnels SET psk_sealed = ?, psk_generated_on = ? "
            "WHERE id = ? AND account_id = ?",
            (sealed, when, tunnel_id, account_id),
        )

    def get_psk(self, account_id: str, tunnel_id: str) -> bytes | None:
        r = self._db.execute(
            "SELECT psk_sealed FROM ipsec_tunnels WHERE id = ? AND account_id = ?",
            (tunnel_id, account_id),
        ).fetchone()
        if r is None or r[0] is None:
            return None
        return self._master.open(bytes(r[0]), _psk_aad(account_id, tunnel_id))

    # -- API tokens -----------------------------------------------------------

    def add_token(
        self, token_id: str, token_sha256: str, account_id: str | None, desc: str
    ) -> None:
        with self.transaction():
            if account_id is not None:
                self.ensure_account(account_id)
            self._db.execute(
                "INSERT INTO api_tokens (id, token_sha256, account_id, description, created_on) "
                "VALUES (?, ?, ?, ?, ?)",
                (token_id, token_sha256, account_id, desc, now_iso()),
            )

    def find_token(self, token_sha256: str) -> TokenInfo | None:
        r = self._db.execute(
            "SELECT id, account_id, description FROM api_tokens WHERE token_sha256 = ?",
            (token_sha256,),
        ).fetchone()
        return None if r is None else TokenInfo(r[0], r[1], r[2])

    def tokens(self) -> list[TokenInfo]:
        cur = self._db.execute("SELECT id, account_id, description FROM api_tokens ORDER BY 1")
        return [TokenInfo(r[0], r[1], r[2]) for r in cur]

    def delete_token(self, token_id: str) -> bool:
        with self.transaction():
            return self._db.execute("DELETE FROM api_tokens WHERE id = ?", (token_id,)).rowcount > 0

    # -- sealed state (IKE SAs, Child SA records) -----------------------------

    def put_sealed(self, key: str, plaintext: bytes) -> None:
        sealed = self._master.seal(plaintext, _state_aad(key))
        self._db.execute(
            "INSERT INTO sealed_state (key, sealed, modified_on) VALUES (?, ?, ?) "
            "ON CONFLICT(key) DO UPDATE SET sealed = excluded.sealed, "
            "modified_on = excluded.modified_on",
            (key, sealed, now_iso()),
        )

    def get_sealed(self, key: str) -> bytes | None:
        r = self._db.execute("SELECT sealed FROM sealed_state WHERE key = ?", (key,)).fetchone()
        return None if r is None else self._master.open(bytes(r[0]), _state_aad(key))

    def delete_sealed(self, key: str) -> None:
        self._db.execute("DELETE FROM sealed_state WHERE key = ?", (key,))

    def sealed_items(self, prefix: str) -> list[tuple[str, bytes]]:
        cur = self._db.execute(
            "SELECT key, sealed FROM sealed_state WHERE substr(key, 1, ?) = ? ORDER BY key",
            (len(prefix), prefix),
        )
        return [(k, self._master.open(bytes(s), _state_aad(k))) for k, s in cur]

    def ipsec_by_endpoints(
        self, cloudflare_endpoint: str, customer_endpoint: str
    ) -> list[dict[str, Any]]:
        """Every IPsec tunnel (all accounts) with this outer address pair (ID_IPV4_ADDR)."""
        cur = self._db.execute(
            "SELECT * FROM ipsec_tunnels WHERE cloudflare_endpoint = ? AND customer_endpoint = ?",
            (cloudflare_endpoint, customer_endpoint),
        )
        return [_row(r) for r in cur]
