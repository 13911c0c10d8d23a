"""The API's resource logic, independent of HTTP: validate, write in one
transaction, then tell the hooks what changed (publish after commit).

Every method takes the caller's :class:`TokenInfo`; a resource of another
account than the token's is *not found* (issue 10): the answer for "exists but
not yours" and "does not exist" is the same 404, so tokens cannot probe.

``validate_only`` runs the very same code inside the transaction and rolls it
back, so the checks are identical and nothing is left behind.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

from control.api.validation import (
    BadRequest,
    ConflictError,
    FieldError,
    NotFound,
    check_account,
    check_id,
    items_of,
    validate,
)
from control.secrets import generate_psk
from control.store import Conflict, Store, TokenInfo, now_iso, peer_address

KIND_PLURAL = {"ipsec": "ipsec_tunnels", "gre": "gre_tunnels", "route": "routes"}
KIND_SINGULAR = {"ipsec": "ipsec_tunnel", "gre": "gre_tunnel", "route": "route"}
KIND_LABEL = {"ipsec": "IPsec tunnel", "gre": "GRE tunnel", "route": "route"}


@dataclass
class Changes:
    """What one committed request changed, for the publisher (tunnel rows carry ``kind``)."""

    tunnels_set: list[dict[str, Any]] = field(default_factory=list)
    tunnels_deleted: list[tuple[str, str]] = field(default_factory=list)
    """(account_id, tunnel_id)"""
    routes_set: list[dict[str, Any]] = field(default_factory=list)
    """Route rows with ``tunnel_id`` resolved from the nexthop."""
    routes_deleted: list[tuple[str, str]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(
            self.tunnels_set or self.tunnels_deleted or self.routes_set or self.routes_deleted
        )


class Hooks(Protocol):
    """What the API needs from the rest of control (implemented in control/service.py)."""

    def committed(self, changes: Changes) -> None: ...
    def psk_changed(self, account_id: str, tunnel_id: str) -> None: ...
    def tunnel_sas(self, account_id: str, tunnel_id: str) -> dict[str, Any]: ...
    def workers(self) -> list[dict[str, Any]]: ...
    def health(self) -> dict[str, Any]: ...


class _Rollback(Exception):
    pass


class Api:
    def __init__(self, store: Store, hooks: Hooks, *, id_suffix: str) -> None:
        self.store = store
        self.hooks = hooks
        self.id_suffix = id_suffix

    # -- scoping --------------------------------------------------------------

    @staticmethod
    def scope(token: TokenInfo, account_id: str) -> None:
        check_account(account_id)
        if token.account_id is not None and token.account_id != account_id:
            raise NotFound("account not found")

    def accounts(self, token: TokenInfo) -> list[dict[str, Any]]:
        ids = self.store.accounts() if token.is_operator else [token.account_id]
        return [{"id": a} for a in ids if a is not None]

    @contextmanager
    def _write(self, validate_only: bool) -> Iterator[None]:
        try:
            with self.store.transaction():
                yield
                if validate_only:
                    raise _Rollback
        except _Rollback:
            pass
        except Conflict as exc:
            # The UNIQUE backstop: only reachable if a check above missed a race.
            raise ConflictError(f"conflicts with an existing resource ({exc})") from None

    # -- presentation ---------------------------------------------------------

    def identities(self, account_id: str, tunnel_id: str) -> dict[str, str]:
        fqdn = f"{tunnel_id}.{account_id}.{self.id_suffix}"
        return {"fqdn_id": fqdn, "user_id": f"ipsec@{fqdn}", "hex_id": f"{account_id}_{tunnel_id}"}

    def present(
        self, kind: str, row: dict[str, Any], peers: dict[str, str] | None = None
    ) -> dict[str, Any]:
        out = {k: v for k, v in row.items() if k not in ("account_id", "psk_generated_on")}
        if kind == "ipsec":
            out["remote_identities"] = self.identities(row["account_id"], row["id"])
            out["psk_metadata"] = {"last_generated_on": row.get("psk_generated_on")}
        if kind == "route":
            if peers is None:
                peers = self.peer_map(row["account_id"])
            out["tunnel_id"] = peers.get(row["nexthop"])
        return out

    def peer_map(self, account_id: str) -> dict[str, str]:
        """Peer interface address → tunnel id, for one account (interface
        networks are disjoint per account, so the map is unambiguous)."""
        return self.store.peer_map(account_id)

    # -- tunnels and routes: shared checks ------------------------------------

    def _resolve_nexthop(self, account_id: str, nexthop: str) -> str | None:
        return self.store.tunnel_by_peer(account_id, nexthop)

    def _check_route(self, account_id: str, row: dict[str, Any], path: str) -> str:
        """The tunnel the route's nexthop names; no other route of the account
        with the same prefix and nexthop."""
        tunnel_id = self._resolve_nexthop(account_id, row["nexthop"])
        if tunnel_id is None:
            raise FieldError(
                path + "nexthop",
                f"no tunnel of this account has peer interface address {row['nexthop']}",
            )
        for dup in self.store.route_ids(account_id, row["nexthop"], row["prefix"]):
            if dup != row["id"]:
                raise ConflictError(
                    f"{path}prefix: route {row['prefix']} via {row['nexthop']} "
                    f"already exists ({dup})"
                )
        return tunnel_id

    def _check_tunnel(self, kind: str, account_id: str, row: dict[str, Any], path: str) -> None:
        """Name unique among the account's tunnels (both kinds); interface networks
        disjoint, so that a nexthop names exactly one tunnel; a GRE outer pair unique."""
        named = self.store.tunnel_named(account_id, row["name"])
        if named is not None and named[1] != row["id"]:
            raise ConflictError(
                f"{path}name: a tunnel named {row['name']!r} already exists ({named[0]} {named[1]})"
            )
        other = self.store.tunnel_overlapping(account_id, row["interface_address"], row["id"])
        if other is not None:
            raise ConflictError(
                f"{path}interface_address: {row['interface_address']} overlaps "
                f"tunnel {other['id']} ({other['interface_address']})"
            )
        if kind == "gre":
            self._check_gre_pair(row, path)

    def _check_gre_pair(self, row: dict[str, Any], path: str) -> None:
        """A GRE packet is matched to its tunnel by its outer address pair alone
        (RFC 2784 has no tunnel id), so that pair must be unique on the whole
        cluster, across accounts too; the message does not say whose it is."""
        pair = (row["cloudflare_gre_endpoint"], row["customer_gre_endpoint"])
        if self.store.gre_with_pair(*pair, row["id"]) is not None:
            raise ConflictError(
                f"{path}customer_gre_endpoint: another GRE tunnel already uses "
                f"{pair[1]} with cloudflare_gre_endpoint {pair[0]}"
            )

    def _routes_via(self, account_id: str, tunnel_row: dict[str, Any]) -> list[str]:
        return self.store.route_ids(account_id, peer_address(tunnel_row["interface_address"]))

    def _pair_messages(self, account_id: str, row: dict[str, Any], messages: list[str]) -> None:
        if row.get("customer_endpoint") is None:
            return
        other = self.store.ipsec_with_pair(
            account_id, row["cloudflare_endpoint"], row["customer_endpoint"], row["id"]
        )
        if other is not None:
            messages.append(
                f"tunnel {row['id']}: (cloudflare_endpoint, customer_endpoint) is shared with "
                f"tunnel {other}; ID_IPV4_ADDR cannot be used, use ID_FQDN, "
                "ID_RFC822_ADDR or ID_KEY_ID"
            )

    # -- create ---------------------------------------------------------------

    def create(
        self,
        token: TokenInfo,
        kind: str,
        account_id: str,
        body: Any,
        *,
        validate_only: bool,
        messages: list[str],
    ) -> Any:
        self.scope(token, account_id)
        plural = KIND_PLURAL[kind]
        items, bulk = items_of(body, plural)
        parsed = [
            validate(kind, it, f"{plural}[{i}]" if bulk else "", partial=False, messages=messages)
            for i, it in enumerate(items)
        ]
        changes = Changes()
        created: list[dict[str, Any]] = []
        now = now_iso()
        with self._write(validate_only):
            self.store.ensure_account(account_id)
            for i, p in enumerate(parsed):
                path = f"{plural}[{i}]." if bulk else ""
                psk = p.pop("psk", None)
                row = {"id": uuid.uuid4().hex, "account_id": account_id, **p}
                row["created_on"] = row["modified_on"] = now
                if kind == "route":
                    tunnel_id = self._check_route(account_id, row, path)
                    self.store.insert(kind, row)
                    changes.routes_set.append({**row, "tunnel_id": tunnel_id})
                else:
                    self._check_tunnel(kind, account_id, row, path)
                    self.store.insert(kind, row)
                    if psk is not None:
                        self.store.set_psk(account_id, row["id"], psk.encode(), now)
                stored = self.store.get(kind, account_id, row["id"])
                assert stored is not None
                if kind != "route":
                    changes.tunnels_set.append({**stored, "kind": kind})
                    if kind == "ipsec":
                        self._pair_messages(account_id, stored, messages)
                created.append(self.present(kind, stored))
        if not validate_only:
            self.hooks.committed(changes)
        return {plural: created} if bulk else created[0]

    # -- read -----------------------------------------------------------------

    def list_all(self, token: TokenInfo, kind: str, account_id: str) -> dict[str, Any]:
        self.scope(token, account_id)
        peers = self.peer_map(account_id) if kind == "route" else None
        rows = self.store.rows(kind, account_id)
        return {KIND_PLURAL[kind]: [self.present(kind, r, peers) for r in rows]}

    def _get(self, kind: str, account_id: str, row_id: str) -> dict[str, Any]:
        check_id(row_id, KIND_LABEL[kind])
        row = self.store.get(kind, account_id, row_id)
        if row is None:
            raise NotFound(f"{KIND_LABEL[kind]} {row_id} not found")
        return row

    def get(self, token: TokenInfo, kind: str, account_id: str, row_id: str) -> dict[str, Any]:
        self.scope(token, account_id)
        return {KIND_SINGULAR[kind]: self.present(kind, self._get(kind, account_id, row_id))}

    # -- update ---------------------------------------------------------------

    def update(
        self,
        token: TokenInfo,
        kind: str,
        account_id: str,
        row_id: str,
        body: Any,
        *,
        validate_only: bool,
        messages: list[str],
    ) -> dict[str, Any]:
        self.scope(token, account_id)
        self._get(kind, account_id, row_id)
        p = validate(kind, body, "", partial=True, messages=messages)
        changes = Changes()
        now = now_iso()
        with self._write(validate_only):
            old = self._get(kind, account_id, row_id)
            psk = p.pop("psk", None)
            new = {**old, **p}
            if kind == "route":
                tunnel_id = self._check_route(account_id, new, "")
            else:
                self._check_tunnel(kind, account_id, new, "")
                if new["interface_address"] != old["interface_address"]:
                    users = self._routes_via(account_id, old)
                    if users and peer_address(new["interface_address"]) != peer_address(
                        old["interface_address"]
                    ):
                        raise ConflictError(
                            f"interface_address: routes {', '.join(users)} use this tunnel's "
                            "peer address as nexthop; change or delete them first"
                        )
            p["modified_on"] = now
            self.store.update(kind, account_id, row_id, p)
            if psk is not None:
                self.store.set_psk(account_id, row_id, psk.encode(), now)
            stored = self._get(kind, account_id, row_id)
            if kind == "route":
                changes.routes_set.append({**stored, "tunnel_id": tunnel_id})
            else:
                changes.tunnels_set.append({**stored, "kind": kind})
                if kind == "ipsec":
                    self._pair_messages(account_id, stored, messages)
            result = self.present(kind, stored)
        if not validate_only:
            self.hooks.committed(changes)
            if psk is not None:
                self.hooks.psk_changed(account_id, row_id)
        return {"modified": not validate_only, f"modified_{KIND_SINGULAR[kind]}": result}

    # -- delete ---------------------------------------------------------------

    def delete(
        self, token: TokenInfo, kind: str, account_id: str, row_id: str, *, validate_only: bool
    ) -> dict[str, Any]:
        self.scope(token, account_id)
        changes = Changes()
        with self._write(validate_only):
            old = self._get(kind, account_id, row_id)
            result = self.present(kind, old)
            if kind == "route":
                changes.routes_deleted.append((account_id, row_id))
            else:
                users = self._routes_via(account_id, old)
                if users:
                    raise ConflictError(
                        f"{KIND_LABEL[kind]} {row_id} is the nexthop of routes "
                        f"{', '.join(users)}; delete them first"
                    )
                changes.tunnels_deleted.append((account_id, row_id))
            self.store.delete(kind, account_id, row_id)
        if not validate_only:
            self.hooks.committed(changes)
        return {"deleted": not validate_only, f"deleted_{KIND_SINGULAR[kind]}": result}

    # -- PSK ------------------------------------------------------------------

    def psk_generate(
        self,
        token: TokenInfo,
        account_id: str,
        tunnel_id: str,
        *,
        validate_only: bool,
        messages: list[str],
    ) -> dict[str, Any]:
        self.scope(token, account_id)
        self._get("ipsec", account_id, tunnel_id)
        if validate_only:
            messages.append("validate_only: no PSK was generated")
            return {"ipsec_tunnel_id": tunnel_id, "psk_metadata": {"last_generated_on": None}}
        psk = generate_psk()
        now = now_iso()
        with self._write(False):
            self._get("ipsec", account_id, tunnel_id)
            self.store.set_psk(account_id, tunnel_id, psk.encode(), now)
            self.store.update("ipsec", account_id, tunnel_id, {"modified_on": now})
        self.hooks.psk_changed(account_id, tunnel_id)
        return {
            "ipsec_tunnel_id": tunnel_id,
            "psk": psk,
            "psk_metadata": {"last_generated_on": now},
        }

    # -- status ---------------------------------------------------------------

    def sas(self, token: TokenInfo, account_id: str, tunnel_id: str) -> dict[str, Any]:
        self.scope(token, account_id)
        self._get("ipsec", account_id, tunnel_id)
        return {"ipsec_tunnel_id": tunnel_id, **self.hooks.tunnel_sas(account_id, tunnel_id)}

    def workers(self, token: TokenInfo) -> dict[str, Any]:
        return {"workers": self.hooks.workers()}


def parse_validate_only(value: str | None) -> bool:
    if value is None:
        return False
    v = value.lower()
    if v in ("true", "1", "yes"):
        return True
    if v in ("false", "0", "no", ""):
        return False
    raise BadRequest("validate_only: must be true or false")
