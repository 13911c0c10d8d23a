# ruff: noqa: F811
"""/openapi.json is a valid OpenAPI 3 document and real responses conform to it.

A small JSON-schema checker (the subset the document uses: $ref, type,
nullable, properties, required, additionalProperties, items, enum, oneOf,
pattern, date-time) keeps the test free of extra dependencies. Every response
of a scenario that touches every operation is checked against the schema of
its (path, method, status).
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

import pytest

from tests.control.api_support import Control, control, gre, ipsec  # noqa: F401

TYPES = {
    "object": dict,
    "array": list,
    "string": str,
    "boolean": bool,
    "integer": int,
    "number": (int, float),
}


def check(doc: dict[str, Any], schema: dict[str, Any], value: Any, where: str = "$") -> None:
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[1]
        return check(doc, doc["components"]["schemas"][name], value, where)
    if value is None:
        assert schema.get("nullable") or not schema, f"{where}: null not allowed"
        return None
    if "oneOf" in schema:
        ok = 0
        for sub in schema["oneOf"]:
            try:
                check(doc, sub, value, where)
                ok += 1
            except AssertionError:
                pass
        assert ok == 1, f"{where}: matches {ok} of oneOf"
        return None
    t = schema.get("type")
    if t:
        py = TYPES[t]
        assert isinstance(value, py) and not (
            t in ("integer", "number") and isinstance(value, bool)
        ), f"{where}: {value!r} is not {t}"
    if "enum" in schema:
        assert value in schema["enum"], f"{where}: {value!r} not in {schema['enum']}"
    if "pattern" in schema:
        assert re.search(schema["pattern"], value), f"{where}: {value!r} !~ {schema['pattern']}"
    if schema.get("format") == "date-time":
        datetime.fromisoformat(value.replace("Z", "+00:00"))
    if t == "object":
        props = schema.get("properties", {})
        for k in schema.get("required", []):
            assert k in value, f"{where}: missing {k}"
        if schema.get("additionalProperties") is False:
            extra = set(value) - set(props)
            assert not extra, f"{where}: undocumented {sorted(extra)}"
        for k, v in value.items():
            if k in props:
                check(doc, props[k], v, f"{where}.{k}")
    if t == "array" and "items" in schema:
        for i, v in enumerate(value):
            check(doc, schema["items"], v, f"{where}[{i}]")
    return None


def response_schema(doc: dict[str, Any], path: str, method: str, status: int) -> dict[str, Any]:
    op = doc["paths"][path][method.lower()]
    resp = op["responses"][str(status)]
    return resp["content"]["application/json"]["schema"]


async def test_openapi_document_is_well_formed(control: Control) -> None:
    status, doc = await control.call("GET", "/openapi.json", token="")
    assert status == 200 and doc["openapi"] == "3.0.3"
    # Every route the app serves (outside /client/v4) is documented, and vice versa.
    served = set()
    for res in control.service.app.router.resources():
        path = res.canonical
        if path.startswith("/client/v4"):
            continue
        served.add(path)
    assert served == set(doc["paths"]), served ^ set(doc["paths"])
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if method == "parameters":
                continue
            assert op["responses"], (path, method)
            for name in re.findall(r"{(\w+)}", path):
                params = item.get("parameters", []) + op.get("parameters", [])
                assert any(p["name"] == name and p["in"] == "path" for p in params), (path, name)
    # Every $ref resolves.
    text = str(doc)
    for name in set(re.findall(r"#/components/schemas/(\w+)", text)):
        assert name in doc["components"]["schemas"], name


async def test_real_responses_conform(control: Control) -> None:
    _, doc = await control.call("GET", "/openapi.json", token="")
    seen: list[tuple[str, str, int, Any]] = []

    async def call(method: str, template: str, path: str, body: Any = None, **kw: Any) -> Any:
        status, resp = await control.call(method, path, body, **kw)
        check(doc, response_schema(doc, template, method, status), resp, f"{method} {template}")
        seen.append((method, template, status, resp))
        return resp["result"]

    A = "/accounts/acct-a/magic"
    T = "/accounts/{account_id}/magic"
    t = (
        await call("POST", f"{T}/ipsec_tunnels", f"{A}/ipsec_tunnels", {"ipsec_tunnels": [ipsec()]})
    )["ipsec_tunnels"][0]
    await call("POST", f"{T}/ipsec_tunnels", f"{A}/ipsec_tunnels", ipsec("solo", n=1, psk="z" * 12))
    await call("POST", f"{T}/ipsec_tunnels", f"{A}/ipsec_tunnels", ipsec("bad", mtu=1))
    await call("POST", f"{T}/ipsec_tunnels", f"{A}/ipsec_tunnels", ipsec())
    await call("GET", f"{T}/ipsec_tunnels", f"{A}/ipsec_tunnels")
    await call("GET", f"{T}/ipsec_tunnels", f"{A}/ipsec_tunnels", token="bad")
    await call("GET", f"{T}/ipsec_tunnels/{{id}}", f"{A}/ipsec_tunnels/{t['id']}")
    await call("GET", f"{T}/ipsec_tunnels/{{id}}", f"{A}/ipsec_tunnels/{'f' * 32}")
    await call("PUT", f"{T}/ipsec_tunnels/{{id}}", f"{A}/ipsec_tunnels/{t['id']}", {"mss": 1300})
    await call(
        "POST",
        f"{T}/ipsec_tunnels/{{id}}/psk_generate",
        f"{A}/ipsec_tunnels/{t['id']}/psk_generate",
    )
    await call(
        "POST",
        f"{T}/ipsec_tunnels/{{id}}/psk_generate",
        f"{A}/ipsec_tunnels/{t['id']}/psk_generate?validate_only=true",
    )
    await call("GET", f"{T}/ipsec_tunnels/{{id}}/sas", f"{A}/ipsec_tunnels/{t['id']}/sas")
    g = (await call("POST", f"{T}/gre_tunnels", f"{A}/gre_tunnels", {"gre_tunnels": [gre()]}))[
        "gre_tunnels"
    ][0]
    await call("GET", f"{T}/gre_tunnels", f"{A}/gre_tunnels")
    await call("GET", f"{T}/gre_tunnels/{{id}}", f"{A}/gre_tunnels/{g['id']}")
    await call("PUT", f"{T}/gre_tunnels/{{id}}", f"{A}/gre_tunnels/{g['id']}", {"ttl": 9})
    r = (
        await call(
            "POST",
            f"{T}/routes",
            f"{A}/routes",
            {"routes": [{"prefix": "10.1.0.0/16", "nexthop": "10.200.0.1"}]},
        )
    )["routes"][0]
    await call(
        "POST", f"{T}/routes", f"{A}/routes", {"prefix": "10.2.0.0/16", "nexthop": "10.201.0.201"}
    )
    await call("GET", f"{T}/routes", f"{A}/routes")
    await call("GET", f"{T}/routes/{{id}}", f"{A}/routes/{r['id']}")
    await call("PUT", f"{T}/routes/{{id}}", f"{A}/routes/{r['id']}", {"priority": 5})
    await call("DELETE", f"{T}/ipsec_tunnels/{{id}}", f"{A}/ipsec_tunnels/{t['id']}")  # 409
    await call("DELETE", f"{T}/routes/{{id}}", f"{A}/routes/{r['id']}")
    await call("DELETE", f"{T}/ipsec_tunnels/{{id}}", f"{A}/ipsec_tunnels/{t['id']}")
    await call("DELETE", f"{T}/gre_tunnels/{{id}}", f"{A}/gre_tunnels/{g['id']}", account="other")
    await call("GET", "/accounts", "/accounts")
    await call("GET", "/workers", "/workers")
    await call("GET", "/healthz", "/healthz", token="")
    statuses = {s for _, _, s, _ in seen}
    assert statuses == {200, 400, 401, 404, 409}, statuses
    assert len({(m, p) for m, p, _, _ in seen}) >= 17


def test_checker_catches_drift() -> None:
    """The checker is not a rubber stamp: undocumented, missing and mistyped fields fail."""
    doc = {"components": {"schemas": {}}}
    schema = {
        "type": "object",
        "properties": {"a": {"type": "integer"}, "b": {"type": "string", "nullable": True}},
        "required": ["a"],
        "additionalProperties": False,
    }
    check(doc, schema, {"a": 1, "b": None})
    for bad in ({"a": 1, "c": 2}, {"b": "x"}, {"a": "1"}, {"a": True}):
        with pytest.raises(AssertionError):
            check(doc, schema, bad)
