"""The OpenAPI 3.0 document served at ``/openapi.json``.

Built from the same field tables as the validator so they cannot drift on
names; response schemas are strict (``additionalProperties: false``) so the
conformance test (tests/control/test_api_openapi.py) notices any field the
server adds or drops without updating this document.
"""

from __future__ import annotations

from typing import Any

from control.api.validation import FIELDS

S = dict[str, Any]
STR: S = {"type": "string"}
NSTR: S = {"type": "string", "nullable": True}
INT: S = {"type": "integer"}
BOOL: S = {"type": "boolean"}
ID: S = {"type": "string", "pattern": "^[0-9a-f]{32}$"}
TIME: S = {"type": "string", "format": "date-time"}


def ref(name: str) -> S:
    return {"$ref": f"#/components/schemas/{name}"}


def obj(props: dict[str, S], required: list[str] | None = None) -> S:
    return {
        "type": "object",
        "properties": props,
        "required": required if required is not None else sorted(props),
        "additionalProperties": False,
    }


_INPUT_TYPES: dict[str, dict[str, S]] = {
    "ipsec": {
        "name": STR,
        "description": STR,
        "customer_endpoint": NSTR,
        "cloudflare_endpoint": STR,
        "interface_address": STR,
        "psk": {"type": "string", "writeOnly": True},
        "replay_protection": BOOL,
        "allow_null_cipher": BOOL,
        "mtu": INT,
        "mss": INT,
    },
    "gre": {
        "name": STR,
        "description": STR,
        "customer_gre_endpoint": STR,
        "cloudflare_gre_endpoint": STR,
        "interface_address": STR,
        "ttl": INT,
        "mtu": INT,
        "mss": INT,
    },
    "route": {"prefix": STR, "nexthop": STR, "priority": INT, "weight": INT, "description": STR},
}
assert all(set(_INPUT_TYPES[k]) == set(FIELDS[k]) for k in FIELDS), "openapi out of sync"


def _input(kind: str) -> S:
    props = _INPUT_TYPES[kind]
    required = [k for k, f in FIELDS[kind].items() if f.required]
    return {"type": "object", "properties": props, "required": required}


def _output(kind: str) -> S:
    props = {k: v for k, v in _INPUT_TYPES[kind].items() if k != "psk"}
    props |= {"id": ID, "created_on": TIME, "modified_on": TIME}
    if kind == "ipsec":
        props["remote_identities"] = obj({"fqdn_id": STR, "user_id": STR, "hex_id": STR})
        props["psk_metadata"] = obj({"last_generated_on": {**TIME, "nullable": True}})
    if kind == "route":
        props["tunnel_id"] = {**ID, "nullable": True}
    return obj(props)


MESSAGE = obj({"code": INT, "message": STR})


def envelope(result: S) -> S:
    return obj(
        {
            "success": BOOL,
            "errors": {"type": "array", "items": MESSAGE},
            "messages": {"type": "array", "items": MESSAGE},
            "result": result,
        }
    )


ERROR = envelope({"nullable": True, "type": "object"})


def _resp(result: S, desc: str = "OK") -> S:
    return {"description": desc, "content": {"application/json": {"schema": envelope(result)}}}


def _errors(*codes: int) -> dict[str, S]:
    text = {
        400: "Bad input; the message names the field",
        401: "No valid token",
        403: "Token lacks the scope",
        404: "Not found (or another account's)",
        409: "Conflict",
        503: "Unhealthy",
    }
    return {
        str(c): {"description": text[c], "content": {"application/json": {"schema": ERROR}}}
        for c in codes
    }


VALIDATE_ONLY: S = {
    "name": "validate_only",
    "in": "query",
    "required": False,
    "schema": BOOL,
    "description": "Run every check, persist nothing.",
}


def _param(name: str) -> S:
    return {"name": name, "in": "path", "required": True, "schema": STR}


def build_openapi() -> dict[str, Any]:
    paths: dict[str, Any] = {}
    sec: list[dict[str, list[str]]] = [{"bearer": []}]
    names = {
        "ipsec": ("ipsec_tunnels", "ipsec_tunnel", "IpsecTunnel"),
        "gre": ("gre_tunnels", "gre_tunnel", "GreTunnel"),
        "route": ("routes", "route", "Route"),
    }
    schemas: dict[str, S] = {}
    for kind, (plural, singular, schema) in names.items():
        schemas[schema] = _output(kind)
        schemas[schema + "Input"] = _input(kind)
        one, many = ref(schema), {"type": "array", "items": ref(schema)}
        base = f"/accounts/{{account_id}}/magic/{plural}"
        paths[base] = {
            "parameters": [_param("account_id")],
            "get": {
                "summary": f"List {plural}",
                "security": sec,
                "responses": {"200": _resp(obj({plural: many})), **_errors(401, 404)},
            },
            "post": {
                "summary": f"Create {plural} (bulk form {{'{plural}': [...]}} or one object)",
                "security": sec,
                "parameters": [VALIDATE_ONLY],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "oneOf": [
                                    obj(
                                        {plural: {"type": "array", "items": ref(schema + "Input")}}
                                    ),
                                    ref(schema + "Input"),
                                ]
                            }
                        }
                    },
                },
                "responses": {
                    "200": _resp({"oneOf": [obj({plural: many}), one]}),
                    **_errors(400, 401, 404, 409),
                },
            },
        }
        paths[base + "/{id}"] = {
            "parameters": [_param("account_id"), _param("id")],
            "get": {
                "summary": f"Show one {singular}",
                "security": sec,
                "responses": {"200": _resp(obj({singular: one})), **_errors(401, 404)},
            },
            "put": {
                "summary": f"Update a {singular} (only the given fields change)",
                "security": sec,
                "parameters": [VALIDATE_ONLY],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {"type": "object", "properties": _INPUT_TYPES[kind]}
                        }
                    },
                },
                "responses": {
                    "200": _resp(obj({"modified": BOOL, f"modified_{singular}": one})),
                    **_errors(400, 401, 404, 409),
                },
            },
            "delete": {
                "summary": f"Delete a {singular}",
                "security": sec,
                "parameters": [VALIDATE_ONLY],
                "responses": {
                    "200": _resp(obj({"deleted": BOOL, f"deleted_{singular}": one})),
                    **_errors(401, 404, 409),
                },
            },
        }
    ipsec = "/accounts/{account_id}/magic/ipsec_tunnels/{id}"
    paths[ipsec + "/psk_generate"] = {
        "parameters": [_param("account_id"), _param("id")],
        "post": {
            "summary": "Generate a new PSK, returned once",
            "security": sec,
            "parameters": [VALIDATE_ONLY],
            "responses": {
                "200": _resp(
                    obj(
                        {
                            "ipsec_tunnel_id": ID,
                            "psk": STR,
                            "psk_metadata": obj({"last_generated_on": {**TIME, "nullable": True}}),
                        },
                        ["ipsec_tunnel_id", "psk_metadata"],
                    )
                ),
                **_errors(401, 404),
            },
        },
    }
    sa_common = {
        "spi": STR,
        "cipher": STR,
        "integ": STR,
        "local_addr": STR,
        "remote_addr": STR,
        "local_port": INT,
        "remote_port": INT,
        "udp_encap": BOOL,
        "created": TIME,
        "rekey_at": {**TIME, "nullable": True},
        "expire_at": {**TIME, "nullable": True},
    }
    schemas["ChildSa"] = obj(
        {
            **sa_common,
            "direction": {"type": "string", "enum": ["in", "out"]},
            "child_id": INT,
            "generation": INT,
            "replay_window": INT,
            "packets": {
                **INT,
                "nullable": True,
                "description": "Packets on this SA summed over the live workers' latest "
                "reports (sent every 0.5 s with their bus acks); null while no live "
                "worker has reported the SA. A restarted worker counts from 0.",
            },
            "bytes": {
                **INT,
                "nullable": True,
                "description": "Inner (cleartext) bytes, summed like packets.",
            },
        },
        [
            "spi",
            "direction",
            "cipher",
            "integ",
            "local_addr",
            "remote_addr",
            "local_port",
            "remote_port",
            "udp_encap",
            "created",
            "child_id",
            "generation",
        ],
    )
    schemas["IkeSa"] = obj(
        {
            "initiator_spi": STR,
            "responder_spi": STR,
            "state": STR,
            "remote_addr": STR,
            "remote_port": INT,
            "nat_detected": BOOL,
            "udp_encap": BOOL,
            "id_type": {"type": "string", "enum": ["rfc822", "fqdn", "key_id", "ipv4"]},
            "proposal": STR,
            "created": TIME,
        }
    )
    paths[ipsec + "/sas"] = {
        "parameters": [_param("account_id"), _param("id")],
        "get": {
            "summary": "IKE SA and Child SAs of a tunnel (no keys)",
            "security": sec,
            "responses": {
                "200": _resp(
                    obj(
                        {
                            "ipsec_tunnel_id": ID,
                            "ike_sas": {"type": "array", "items": ref("IkeSa")},
                            "child_sas": {"type": "array", "items": ref("ChildSa")},
                        }
                    )
                ),
                **_errors(401, 404),
            },
        },
    }
    paths["/accounts"] = {
        "get": {
            "summary": "Accounts visible to the token",
            "security": sec,
            "responses": {
                "200": _resp(obj({"accounts": {"type": "array", "items": obj({"id": STR})}})),
                **_errors(401),
            },
        }
    }
    schemas["Worker"] = obj(
        {
            "worker_id": STR,
            "applied_seq": INT,
            "lag": INT,
            "last_seen_seconds_ago": {"type": "number"},
        }
    )
    paths["/workers"] = {
        "get": {
            "summary": "Live workers, their applied bus sequence and lag",
            "security": sec,
            "responses": {
                "200": _resp(obj({"workers": {"type": "array", "items": ref("Worker")}})),
                **_errors(401),
            },
        }
    }
    health = obj(
        {
            "status": {"type": "string", "enum": ["ok", "degraded"]},
            "problems": {
                "type": "array",
                "items": STR,
                "description": "Why control is degraded, one short sentence each "
                "(empty when ok), e.g. 'IKE not listening (udp/500, udp/4500 on 0.0.0.0)', "
                "'no worker subscribed to the bus for 31 s while 3 tunnels are configured', "
                "'store not writable: OperationalError (a write failed 2 s ago)', "
                "'bus publisher not running'.",
            },
            "bus_sequence": INT,
            "workers": {**INT, "description": "Live workers on the bus"},
            "ike": {"type": "string", "enum": ["running", "not listening", "not configured"]},
            "tunnels": {
                **INT,
                "nullable": True,
                "description": "IPsec and GRE tunnels configured; null if the store cannot be read",
            },
        }
    )
    paths["/healthz"] = {
        "get": {
            "summary": "Health (no token needed): 200 ok, 503 degraded",
            "description": "A freshly started control is ok without workers for its first "
            "30 s (the grace in which workers subscribe); after it, no live worker while "
            "tunnels are configured is a problem, as is a live worker that has not applied "
            "what the bus published 10 s ago.",
            "responses": {
                "200": _resp(health),
                "503": _resp(health, "Degraded: result.problems (also in errors) says why"),
            },
        }
    }
    paths["/openapi.json"] = {
        "get": {
            "summary": "This document (no token needed)",
            "responses": {"200": {"description": "OpenAPI 3 document"}},
        }
    }
    paths["/metrics"] = {
        "get": {
            "summary": "Prometheus metrics (operator token)",
            "security": sec,
            "responses": {"200": {"description": "text exposition format"}, **_errors(401, 403)},
        }
    }
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "anywan control API",
            "version": "1",
            "description": "Magic WAN compatible tunnels, PSKs and routes; every path is "
            "also served under /client/v4.",
        },
        "servers": [{"url": "/"}, {"url": "/client/v4"}],
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "paths": paths,
    }
