"""Request validation: one table of fields per resource, errors that name the field.

Each resource is a dict ``field -> Field(parse, default, required)``; a parser
takes the JSON value and returns the stored value or raises ``ValueError`` with
a message that, prefixed by the field's path (``ipsec_tunnels[1].mtu``), is the
API's 400 message. Cloudflare fields anywan accepts but does not implement are
listed in ``IGNORED`` and reported in ``messages``; any other unknown field is a
400, so a typo never silently does nothing.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

ACCOUNT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,63}$")
"""Same rule as :mod:`replication.records` (the account travels on the bus)."""
ID_RE = re.compile(r"^[0-9a-f]{32}$")
MAX_ITEMS = 100


class ApiError(Exception):
    """An error answered to the client. ``message`` must never contain a secret."""

    status = 400
    code = 1000

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(ApiError):
    status = 400
    code = 1001


class Unauthorized(ApiError):
    status = 401
    code = 10000


class Forbidden(ApiError):
    status = 403
    code = 10001


class NotFound(ApiError):
    status = 404
    code = 1003


class ConflictError(ApiError):
    status = 409
    code = 1004


class FieldError(BadRequest):
    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


@dataclass(frozen=True, slots=True)
class Field:
    parse: Callable[[Any], Any]
    default: Any = None
    required: bool = False


def _str(lo: int, hi: int, *, printable: bool = True) -> Callable[[Any], str]:
    def parse(v: Any) -> str:
        if not isinstance(v, str):
            raise ValueError("must be a string")
        if not lo <= len(v) <= hi:
            raise ValueError(f"must be {lo} to {hi} characters long")
        if printable and any(ord(c) < 0x20 or ord(c) == 0x7F for c in v):
            raise ValueError("must not contain control characters")
        return v

    return parse


def _name(v: Any) -> str:
    s = _str(1, 255)(v)
    if s != s.strip() or not s:
        raise ValueError("must not start or end with whitespace")
    return s


def _int(lo: int, hi: int) -> Callable[[Any], int]:
    def parse(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError("must be an integer")
        if not lo <= v <= hi:
            raise ValueError(f"must be between {lo} and {hi}")
        return v

    return parse


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError("must be true or false")
    return v


def _ipv4(v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError("must be an IPv4 address string")
    try:
        addr = ipaddress.IPv4Address(v)
    except ValueError:
        raise ValueError(f"{v!r} is not an IPv4 address") from None
    if addr.is_unspecified or addr.is_multicast:
        raise ValueError(f"{v!r} is not a unicast address")
    return str(addr)


def _optional_ipv4(v: Any) -> str | None:
    if v is None or v == "":
        return None
    return _ipv4(v)


def interface_address(v: Any) -> str:
    """Our side of a /31 (RFC 3021) or /30: ``a.b.c.d/len``, the peer being the other host."""
    if not isinstance(v, str):
        raise ValueError("must be a string like 10.0.0.0/31")
    try:
        iface = ipaddress.IPv4Interface(v)
    except ValueError:
        raise ValueError(f"{v!r} is not an IPv4 address with a prefix length") from None
    if "/" not in v:
        raise ValueError("needs a prefix length: /31 or /30")
    plen = iface.network.prefixlen
    if plen not in (30, 31):
        raise ValueError(f"must be a /31 or a /30, not /{plen}")
    if plen == 30 and iface.ip in (iface.network.network_address, iface.network.broadcast_address):
        raise ValueError("in a /30 the address must be one of the two usable hosts")
    return str(iface)


def _prefix(v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError("must be a string like 10.1.0.0/24")
    try:
        net = ipaddress.ip_network(v, strict=False)
    except ValueError:
        raise ValueError(f"{v!r} is not an IP prefix") from None
    if "/" not in v:
        raise ValueError("needs a prefix length, e.g. 10.1.0.0/24")
    if ipaddress.ip_interface(v).ip != net.network_address:
        raise ValueError(f"has host bits set (did you mean {net}?)")
    return str(net)


def _mss(v: Any) -> int:
    n = _int(0, 9000)(v)
    if 0 < n < 536:
        raise ValueError("must be 0 (derive from mtu) or at least 536")
    return n


IPSEC_DEFAULT_MTU = 1400
"""1500 minus the worst ESP-in-UDP overhead in scope (AES-CBC + HMAC-SHA256: 85 bytes), rounded."""
GRE_DEFAULT_MTU = 1476

IPSEC_FIELDS: dict[str, Field] = {
    "name": Field(_name, required=True),
    "description": Field(_str(0, 1024), ""),
    "customer_endpoint": Field(_optional_ipv4, None),
    "cloudflare_endpoint": Field(_ipv4, required=True),
    "interface_address": Field(interface_address, required=True),
    "psk": Field(_str(8, 256), None),
    "replay_protection": Field(_bool, False),
    "allow_null_cipher": Field(_bool, False),
    "mtu": Field(_int(576, 9000), IPSEC_DEFAULT_MTU),
    "mss": Field(_mss, 0),
}
GRE_FIELDS: dict[str, Field] = {
    "name": Field(_name, required=True),
    "description": Field(_str(0, 1024), ""),
    "customer_gre_endpoint": Field(_ipv4, required=True),
    "cloudflare_gre_endpoint": Field(_ipv4, required=True),
    "interface_address": Field(interface_address, required=True),
    "ttl": Field(_int(1, 255), 64),
    "mtu": Field(_int(576, 9000), GRE_DEFAULT_MTU),
    "mss": Field(_mss, 0),
}
ROUTE_FIELDS: dict[str, Field] = {
    "prefix": Field(_prefix, required=True),
    "nexthop": Field(_ipv4, required=True),
    "priority": Field(_int(0, 65535), 100),
    "weight": Field(_int(1, 65535), 100),
    "description": Field(_str(0, 1024), ""),
}
IGNORED: dict[str, frozenset[str]] = {
    "ipsec": frozenset(
        {
            "health_check",
            "automatic_return_routing",
            "bgp",
            "interface_address6",
            "custom_remote_identities",
        }
    ),
    "gre": frozenset({"health_check", "automatic_return_routing", "bgp", "interface_address6"}),
    "route": frozenset({"scope"}),
}
READ_ONLY = frozenset(
    {"id", "created_on", "modified_on", "remote_identities", "psk_metadata", "account_id"}
)
FIELDS = {"ipsec": IPSEC_FIELDS, "gre": GRE_FIELDS, "route": ROUTE_FIELDS}


def validate(
    kind: str, obj: Any, path: str, *, partial: bool, messages: list[str]
) -> dict[str, Any]:
    """Parse one resource body. ``partial`` (PUT): only the given fields, none required."""
    if not isinstance(obj, dict):
        raise BadRequest(f"{path or 'body'}: must be a JSON object")
    spec = FIELDS[kind]
    prefix = f"{path}." if path else ""
    out: dict[str, Any] = {}
    for key, value in obj.items():
        if key in spec:
            try:
                out[key] = spec[key].parse(value)
            except ValueError as exc:
                # A PSK's value must never be echoed back: its parser's messages don't.
                raise FieldError(prefix + key, str(exc)) from None
        elif key in IGNORED[kind]:
            messages.append(f"{prefix}{key}: not supported by anywan, ignored")
        elif key in READ_ONLY:
            messages.append(f"{prefix}{key}: read-only, ignored")
        else:
            raise FieldError(prefix + str(key)[:64], "unknown field")
    if not partial:
        for key, f in spec.items():
            if key not in out:
                if f.required:
                    raise FieldError(prefix + key, "is required")
                out[key] = f.default
    return out


def items_of(body: Any, plural: str) -> tuple[list[Any], bool]:
    """A create body: ``{plural: [...]}`` (the v4 bulk form) or one object.

    Returns the items and whether the bulk form was used (the answer mirrors it).
    """
    if isinstance(body, dict) and plural in body:
        items = body[plural]
        extra = set(body) - {plural}
        if extra:
            raise FieldError(sorted(extra)[0][:64], "unknown field")
        if not isinstance(items, list) or not items:
            raise FieldError(plural, "must be a non-empty list")
        if len(items) > MAX_ITEMS:
            raise FieldError(plural, f"at most {MAX_ITEMS} items per request")
        return items, True
    return [body], False


def check_account(account_id: str) -> None:
    if not ACCOUNT_RE.match(account_id):
        # Not a 400: an id that cannot exist is simply not found.
        raise NotFound("account not found")


def check_id(row_id: str, what: str) -> None:
    if not ID_RE.match(row_id):
        raise NotFound(f"{what} not found")
