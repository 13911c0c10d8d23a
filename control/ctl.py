"""``anywanctl``: command-line client of the control node's REST API.

Readable tables by default, ``--json`` for scripts (the API's ``result``).
Base URL, token and account from flags or ``ANYWAN_API``, ``ANYWAN_TOKEN``,
``ANYWAN_ACCOUNT``. Exit codes: 0 ok, 1 the API refused (its message, which
names the field, is printed), 2 usage, 3 API unreachable, 4 authentication,
5 ``status`` found control degraded (its problems are printed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from typing import Any

EXIT_OK, EXIT_API, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_AUTH, EXIT_DEGRADED = 0, 1, 2, 3, 4, 5
DEFAULT_API = "http://127.0.0.1:8080"


class CtlError(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class Client:
    def __init__(self, base: str, token: str | None, timeout: float) -> None:
        self.base = base.rstrip("/")
        self.token = token
        self.timeout = timeout

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: dict[str, str] | None = None,
        accept: tuple[int, ...] = (),
    ) -> Any:
        """The envelope's ``result``; :class:`CtlError` on failure, except for
        the HTTP statuses in ``accept`` whose result is returned as well
        (``/healthz`` answers 503 with the full health when degraded)."""
        url = self.base + path + ("?" + urllib.parse.urlencode(query) if query else "")
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url, data=data, method=method)
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read()
                status = resp.status
        except urllib.error.HTTPError as exc:
            raw, status = exc.read(), exc.code
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise CtlError(
                f"cannot reach the API at {self.base}: {reason}", EXIT_UNREACHABLE
            ) from None
        try:
            doc = json.loads(raw)
        except ValueError:
            doc = None
        if not isinstance(doc, dict):  # e.g. a proxy's error page
            raise CtlError(f"{method} {path}: HTTP {status}, not a JSON answer", EXIT_API)
        if status in accept and isinstance(doc.get("result"), dict):
            return doc["result"]
        if status >= 400 or not doc.get("success", False):
            msgs = "; ".join(_texts(doc.get("errors"))) or f"HTTP {status}"
            if status == 401:
                raise CtlError(
                    f"authentication failed: {msgs} (set --token or ANYWAN_TOKEN)", EXIT_AUTH
                )
            raise CtlError(f"error (HTTP {status}): {msgs}", EXIT_API)
        for m in _texts(doc.get("messages")):
            print(f"note: {m}", file=sys.stderr)
        return doc.get("result")


def _texts(items: Any) -> list[str]:
    """The ``message`` of each ``{"code", "message"}`` in an envelope list."""
    if not isinstance(items, list):
        return []
    return [str(i.get("message", "?")) if isinstance(i, dict) else str(i) for i in items]


# -- output ----------------------------------------------------------------------


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, bool):
            return "yes" if v else "no"
        return str(v)

    cells = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()]
    for row in cells:
        lines.append("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
    return "\n".join(lines)


def kv(obj: dict[str, Any], indent: str = "") -> str:
    out = []
    for k, v in obj.items():
        if isinstance(v, dict):
            out.append(f"{indent}{k}:")
            out.append(kv(v, indent + "  "))
        else:
            out.append(f"{indent}{k}: {'-' if v is None else v}")
    return "\n".join(out)


IPSEC_COLS = ["id", "name", "cloudflare_endpoint", "customer_endpoint", "interface_address", "kind"]
ROUTE_COLS = ["id", "prefix", "nexthop", "tunnel_id", "priority", "weight", "description"]


# -- commands ----------------------------------------------------------------------


def _acct(args: argparse.Namespace) -> str:
    if not args.account:
        raise CtlError("an account is required: --account ACCOUNT or ANYWAN_ACCOUNT", EXIT_USAGE)
    return f"/accounts/{urllib.parse.quote(args.account, safe='')}/magic"


def _q(args: argparse.Namespace) -> dict[str, str] | None:
    return {"validate_only": "true"} if getattr(args, "validate_only", False) else None


def _find_tunnel(c: Client, args: argparse.Namespace, tid: str) -> tuple[str, dict[str, Any]]:
    base = _acct(args)
    tid_q = urllib.parse.quote(tid, safe="")
    kinds = ["gre"] if args.gre else ["ipsec", "gre"]
    last: CtlError | None = None
    for kind in kinds:
        try:
            res = c.call("GET", f"{base}/{kind}_tunnels/{tid_q}")
            return kind, res[f"{kind}_tunnel"]
        except CtlError as exc:
            if exc.code != EXIT_API or "404" not in str(exc):
                raise
            last = exc
    assert last is not None
    raise CtlError(f"tunnel {tid} not found in account {args.account}", EXIT_API)


def cmd_tunnels(c: Client, args: argparse.Namespace) -> Any:
    base = _acct(args)
    if args.action == "list":
        rows = []
        for kind in ("ipsec", "gre"):
            for t in c.call("GET", f"{base}/{kind}_tunnels")[f"{kind}_tunnels"]:
                if kind == "gre":
                    t = {**t, "cloudflare_endpoint": t["cloudflare_gre_endpoint"],
                         "customer_endpoint": t["customer_gre_endpoint"]}  # fmt: skip
                rows.append({**t, "kind": kind})
        return rows, lambda r: table(r, IPSEC_COLS)
    if args.action == "show":
        kind, t = _find_tunnel(c, args, args.id)
        return {**t, "kind": kind}, kv
    if args.action == "delete":
        kind, _ = _find_tunnel(c, args, args.id)
        tid = urllib.parse.quote(args.id, safe="")
        res = c.call("DELETE", f"{base}/{kind}_tunnels/{tid}", query=_q(args))
        return res, lambda r: ("deleted " if r["deleted"] else "would delete ") + args.id
    # create
    body: dict[str, Any] = {"name": args.name, "interface_address": args.interface_address}
    if args.description is not None:
        body["description"] = args.description
    if args.mtu is not None:
        body["mtu"] = args.mtu
    if args.mss is not None:
        body["mss"] = args.mss
    if args.gre:
        if not args.customer_endpoint:
            raise CtlError("a GRE tunnel needs --customer-endpoint", EXIT_USAGE)
        body["cloudflare_gre_endpoint"] = args.cloudflare_endpoint
        body["customer_gre_endpoint"] = args.customer_endpoint
        if args.ttl is not None:
            body["ttl"] = args.ttl
        res = c.call("POST", f"{base}/gre_tunnels", {"gre_tunnels": [body]}, _q(args))
        created = res["gre_tunnels"][0]
    else:
        body["cloudflare_endpoint"] = args.cloudflare_endpoint
        if args.customer_endpoint:
            body["customer_endpoint"] = args.customer_endpoint
        body["replay_protection"] = args.replay_protection
        body["allow_null_cipher"] = args.allow_null_cipher
        if args.psk_env:
            psk = os.environ.get(args.psk_env)
            if not psk:
                raise CtlError(f"--psk-env: ${args.psk_env} is not set", EXIT_USAGE)
            body["psk"] = psk
        res = c.call("POST", f"{base}/ipsec_tunnels", {"ipsec_tunnels": [body]}, _q(args))
        created = res["ipsec_tunnels"][0]
    return created, kv


def cmd_psk(c: Client, args: argparse.Namespace) -> Any:
    base = _acct(args)
    tid = urllib.parse.quote(args.id, safe="")
    res = c.call("POST", f"{base}/ipsec_tunnels/{tid}/psk_generate", {}, _q(args))

    def show(r: dict[str, Any]) -> str:
        if "psk" not in r:
            return "validate only: no PSK generated"
        return (f"{r['psk']}\n# generated {r['psk_metadata']['last_generated_on']}; "
                "shown only now, store it safely")  # fmt: skip

    return res, show


def cmd_routes(c: Client, args: argparse.Namespace) -> Any:
    base = _acct(args)
    if args.action == "list":
        return c.call("GET", f"{base}/routes")["routes"], lambda r: table(r, ROUTE_COLS)
    if args.action == "delete":
        rid = urllib.parse.quote(args.id, safe="")
        res = c.call("DELETE", f"{base}/routes/{rid}", query=_q(args))
        return res, lambda r: ("deleted " if r["deleted"] else "would delete ") + args.id
    body: dict[str, Any] = {"prefix": args.prefix, "nexthop": args.nexthop}
    for f in ("priority", "weight", "description"):
        if getattr(args, f) is not None:
            body[f] = getattr(args, f)
    res = c.call("POST", f"{base}/routes", {"routes": [body]}, _q(args))
    return res["routes"][0], kv


def cmd_sas(c: Client, args: argparse.Namespace) -> Any:
    base = _acct(args)
    tid = urllib.parse.quote(args.id, safe="")
    res = c.call("GET", f"{base}/ipsec_tunnels/{tid}/sas")

    def show(r: dict[str, Any]) -> str:
        parts = ["IKE SAs:", table(r["ike_sas"], ["initiator_spi", "responder_spi", "state",
                                                  "remote_addr", "remote_port", "nat_detected",
                                                  "proposal", "created"])]  # fmt: skip
        parts += ["", "Child SAs:", table(r["child_sas"], ["spi", "direction", "cipher", "integ",
                                                           "remote_addr", "remote_port",
                                                           "udp_encap", "generation", "created",
                                                           "rekey_at"])]  # fmt: skip
        return "\n".join(parts)

    return res, show


def cmd_workers(c: Client, args: argparse.Namespace) -> Any:
    res = c.call("GET", "/workers")["workers"]
    cols = ["worker_id", "applied_seq", "lag", "last_seen_seconds_ago"]
    return res, lambda r: table(r, cols) if r else "no live workers"


def cmd_status(c: Client, args: argparse.Namespace) -> Any:
    health = c.call("GET", "/healthz", accept=(503,))
    workers = c.call("GET", "/workers")["workers"]
    accounts = c.call("GET", "/accounts")["accounts"]
    res = {"health": health, "workers": workers, "accounts": [a["id"] for a in accounts]}

    def show(r: dict[str, Any]) -> str:
        h = r["health"]
        lines = [
            f"control: {h['status']}  bus sequence {h['bus_sequence']}  ike {h['ike']}  "
            f"tunnels {'-' if h['tunnels'] is None else h['tunnels']}",
            *(f"  problem: {p}" for p in h.get("problems", [])),
            f"workers: {len(r['workers'])} live"
            + (f", max lag {max(w['lag'] for w in r['workers'])}" if r["workers"] else ""),
            f"accounts: {', '.join(r['accounts']) or '-'}",
        ]
        return "\n".join(lines)

    return res, show


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="anywanctl", description="Manage anywan tunnels, PSKs and routes over the REST API."
    )
    p.add_argument("--api", default=os.environ.get("ANYWAN_API", DEFAULT_API),
                   help="control API base URL [env ANYWAN_API; default %(default)s]")  # fmt: skip
    p.add_argument("--token", default=os.environ.get("ANYWAN_TOKEN"),
                   help="API token [env ANYWAN_TOKEN]")  # fmt: skip
    p.add_argument("--account", default=os.environ.get("ANYWAN_ACCOUNT"),
                   help="account id [env ANYWAN_ACCOUNT]")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the API result as JSON")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per request")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("tunnels", help="IPsec and GRE tunnels").add_subparsers(
        dest="action", required=True
    )
    t.add_parser("list", help="list tunnels of the account")
    for name in ("show", "delete"):
        sp = t.add_parser(name, help=f"{name} a tunnel (IPsec or GRE)")
        sp.add_argument("id")
        sp.add_argument("--gre", action="store_true", help="it is a GRE tunnel")
        if name == "delete":
            sp.add_argument("--validate-only", action="store_true")
    c = t.add_parser("create", help="create a tunnel")
    c.add_argument("name")
    c.add_argument("--gre", action="store_true", help="a GRE tunnel (default IPsec)")
    c.add_argument("--cloudflare-endpoint", "--anycast", required=True,
                   help="our (anycast) outer address")  # fmt: skip
    c.add_argument("--customer-endpoint", help="the customer router's outer address")
    c.add_argument("--interface-address", required=True, help="our side of the /31 or /30")
    c.add_argument("--description")
    c.add_argument("--mtu", type=int)
    c.add_argument("--mss", type=int)
    c.add_argument("--ttl", type=int, help="GRE outer TTL")
    c.add_argument("--replay-protection", action="store_true")
    c.add_argument("--allow-null-cipher", action="store_true")
    c.add_argument("--psk-env", metavar="VAR",
                   help="take the PSK from this environment variable (never a flag)")  # fmt: skip
    c.add_argument("--validate-only", action="store_true")

    psk = sub.add_parser("psk", help="pre-shared keys").add_subparsers(dest="action", required=True)
    g = psk.add_parser("generate", help="generate a new PSK (printed once)")
    g.add_argument("id")
    g.add_argument("--validate-only", action="store_true")

    r = sub.add_parser("routes", help="static routes").add_subparsers(dest="action", required=True)
    r.add_parser("list", help="list routes of the account")
    a = r.add_parser("add", help="add a route")
    a.add_argument("prefix")
    a.add_argument("nexthop", help="the tunnel's peer interface address")
    a.add_argument("--priority", type=int)
    a.add_argument("--weight", type=int)
    a.add_argument("--description")
    a.add_argument("--validate-only", action="store_true")
    d = r.add_parser("delete", help="delete a route")
    d.add_argument("id")
    d.add_argument("--validate-only", action="store_true")

    s = sub.add_parser("sas", help="IKE and Child SAs of an IPsec tunnel")
    s.add_argument("id")
    sub.add_parser("workers", help="live workers and their bus lag")
    sub.add_parser("status", help="control health, workers, accounts")
    return p


COMMANDS = {
    "tunnels": cmd_tunnels,
    "psk": cmd_psk,
    "routes": cmd_routes,
    "sas": cmd_sas,
    "workers": cmd_workers,
    "status": cmd_status,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    client = Client(args.api, args.token, args.timeout)
    try:
        result, render = COMMANDS[args.command](client, args)
    except CtlError as exc:
        print(f"anywanctl: {exc}", file=sys.stderr)
        return exc.code
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
    else:
        print(render(result))
    if args.command == "status" and result["health"].get("status") != "ok":
        return EXIT_DEGRADED
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
