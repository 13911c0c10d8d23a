# ruff: noqa: F811, E501
"""The REST API against a real aiohttp server, real SQLite and the real bus
Publisher: CRUD, every 4xx path, auth, tenancy, validate_only, concurrency."""

from __future__ import annotations

import asyncio
import re

import pytest

from replication.records import RouteRecord, TunnelKind, TunnelRecord
from tests.control.api_support import Control, control, gre, ipsec  # noqa: F401

A = "/accounts/acct-a/magic"
B = "/accounts/acct-b/magic"


def ok(status: int, body: dict) -> dict:
    assert status == 200, body
    assert body["success"] is True and body["errors"] == []
    return body["result"]


def err(status: int, body: dict, expect: int, *words: str) -> str:
    assert status == expect, body
    assert body["success"] is False and body["result"] is None
    msg = body["errors"][0]["message"]
    assert isinstance(body["errors"][0]["code"], int)
    for w in words:
        assert w in msg, (w, msg)
    return msg


async def test_ipsec_crud_and_bus(control: Control) -> None:
    pub = control.service.publisher
    res = ok(*await control.call("POST", f"{A}/ipsec_tunnels", {"ipsec_tunnels": [ipsec("t1")]}))
    (t,) = res["ipsec_tunnels"]
    assert re.fullmatch(r"[0-9a-f]{32}", t["id"])
    assert t["remote_identities"] == {
        "fqdn_id": f"{t['id']}.acct-a.ipsec.anywan.example",
        "user_id": f"ipsec@{t['id']}.acct-a.ipsec.anywan.example",
        "hex_id": f"acct-a_{t['id']}",
    }
    assert t["replay_protection"] is False and t["allow_null_cipher"] is False
    assert "psk" not in t and t["psk_metadata"] == {"last_generated_on": None}
    rec = pub.get(f"tunnel/{t['id']}")
    assert rec == TunnelRecord(
        account_id="acct-a", tunnel_id=t["id"], kind=TunnelKind.IPSEC, name="t1",
        local_addr="203.0.113.1", remote_addr="198.51.100.10",
        interface_address="10.200.0.0/31", mtu=1400, mss=0,
    )  # fmt: skip

    listed = ok(*await control.call("GET", f"{A}/ipsec_tunnels"))["ipsec_tunnels"]
    assert [x["id"] for x in listed] == [t["id"]]
    got = ok(*await control.call("GET", f"{A}/ipsec_tunnels/{t['id']}"))["ipsec_tunnel"]
    assert got == t

    mod = ok(
        *await control.call(
            "PUT", f"{A}/ipsec_tunnels/{t['id']}", {"description": "new", "mtu": 1350}
        )
    )
    assert mod["modified"] is True
    assert mod["modified_ipsec_tunnel"]["description"] == "new"
    assert mod["modified_ipsec_tunnel"]["name"] == "t1"
    assert pub.get(f"tunnel/{t['id']}").mtu == 1350

    gen = ok(*await control.call("POST", f"{A}/ipsec_tunnels/{t['id']}/psk_generate"))
    assert re.fullmatch(r"[A-Za-z0-9]{32}", gen["psk"])
    assert gen["ipsec_tunnel_id"] == t["id"]
    assert gen["psk_metadata"]["last_generated_on"]
    assert control.store.get_psk("acct-a", t["id"]) == gen["psk"].encode()
    again = ok(*await control.call("GET", f"{A}/ipsec_tunnels/{t['id']}"))["ipsec_tunnel"]
    assert "psk" not in again
    assert again["psk_metadata"] == gen["psk_metadata"]
    gen2 = ok(*await control.call("POST", f"{A}/ipsec_tunnels/{t['id']}/psk_generate"))
    assert gen2["psk"] != gen["psk"]
    assert control.store.get_psk("acct-a", t["id"]) == gen2["psk"].encode()

    sas = ok(*await control.call("GET", f"{A}/ipsec_tunnels/{t['id']}/sas"))
    assert sas == {"ipsec_tunnel_id": t["id"], "ike_sas": [], "child_sas": []}

    seq = pub.sequence
    gone = ok(*await control.call("DELETE", f"{A}/ipsec_tunnels/{t['id']}"))
    assert gone["deleted"] is True and gone["deleted_ipsec_tunnel"]["id"] == t["id"]
    assert pub.get(f"tunnel/{t['id']}") is None and pub.sequence == seq + 1
    err(*await control.call("GET", f"{A}/ipsec_tunnels/{t['id']}"), 404, t["id"])
    err(*await control.call("DELETE", f"{A}/ipsec_tunnels/{t['id']}"), 404)


async def test_single_object_create_and_client_v4_prefix(control: Control) -> None:
    t = ok(*await control.call("POST", f"/client/v4{A}/ipsec_tunnels", ipsec("solo", psk="x" * 20)))
    assert t["name"] == "solo" and t["psk_metadata"]["last_generated_on"]
    assert control.store.get_psk("acct-a", t["id"]) == b"x" * 20


async def test_gre_crud(control: Control) -> None:
    pub = control.service.publisher
    (g,) = ok(*await control.call("POST", f"{A}/gre_tunnels", {"gre_tunnels": [gre("g1")]}))[
        "gre_tunnels"
    ]
    assert g["ttl"] == 64 and g["mtu"] == 1476
    rec = pub.get(f"tunnel/{g['id']}")
    assert rec.kind is TunnelKind.GRE and rec.remote_addr == "198.51.100.100"
    mod = ok(*await control.call("PUT", f"{A}/gre_tunnels/{g['id']}", {"ttl": 200}))
    assert mod["modified_gre_tunnel"]["ttl"] == 200 and pub.get(f"tunnel/{g['id']}").ttl == 200
    listed = ok(*await control.call("GET", f"{A}/gre_tunnels"))["gre_tunnels"]
    assert [x["id"] for x in listed] == [g["id"]]
    assert ok(*await control.call("GET", f"{A}/gre_tunnels/{g['id']}"))["gre_tunnel"]["ttl"] == 200
    # An IPsec tunnel may not take a GRE tunnel's name in the same account.
    err(*await control.call("POST", f"{A}/ipsec_tunnels", ipsec("g1")), 409, "name", "g1")
    d = ok(*await control.call("DELETE", f"{A}/gre_tunnels/{g['id']}"))
    assert d["deleted_gre_tunnel"]["id"] == g["id"] and pub.get(f"tunnel/{g['id']}") is None


async def test_routes_resolve_nexthop_to_tunnel(control: Control) -> None:
    pub = control.service.publisher
    t = ok(*await control.call("POST", f"{A}/ipsec_tunnels", ipsec("t1", n=0)))
    t2 = ok(*await control.call("POST", f"{A}/ipsec_tunnels", ipsec("t2", n=1)))
    # 10.200.0.0/31: our side .0, the customer's (the nexthop) .1.
    body = {"routes": [{"prefix": "10.9.0.0/24", "nexthop": "10.200.0.1", "priority": 100}]}
    (r,) = ok(*await control.call("POST", f"{A}/routes", body))["routes"]
    assert r["tunnel_id"] == t["id"] and r["weight"] == 100
    assert pub.get(f"route/{r['id']}") == RouteRecord(
        account_id="acct-a", route_id=r["id"], prefix="10.9.0.0/24", tunnel_id=t["id"]
    )
    mod = ok(
        *await control.call("PUT", f"{A}/routes/{r['id']}", {"nexthop": "10.200.0.3", "weight": 5})
    )
    assert mod["modified_route"]["tunnel_id"] == t2["id"]
    assert pub.get(f"route/{r['id']}").tunnel_id == t2["id"]
    assert pub.get(f"route/{r['id']}").weight == 5
    # The tunnel a route uses cannot go away or move under it.
    err(*await control.call("DELETE", f"{A}/ipsec_tunnels/{t2['id']}"), 409, r["id"])
    err(
        *await control.call(
            "PUT", f"{A}/ipsec_tunnels/{t2['id']}", {"interface_address": "10.250.0.0/31"}
        ),
        409,
        "interface_address",
    )
    err(
        *await control.call(
            "POST", f"{A}/routes", {"prefix": "10.9.0.0/24", "nexthop": "10.200.0.3"}
        ),
        409,
        "prefix",
    )
    listed = ok(*await control.call("GET", f"{A}/routes"))["routes"]
    assert [x["id"] for x in listed] == [r["id"]]
    assert (
        ok(*await control.call("GET", f"{A}/routes/{r['id']}"))["route"]["prefix"] == "10.9.0.0/24"
    )
    d = ok(*await control.call("DELETE", f"{A}/routes/{r['id']}"))
    assert d["deleted"] is True and d["deleted_route"]["id"] == r["id"]
    assert pub.get(f"route/{r['id']}") is None
    ok(*await control.call("DELETE", f"{A}/ipsec_tunnels/{t2['id']}"))


async def test_30_interface_address_and_its_peer(control: Control) -> None:
    ok(
        *await control.call(
            "POST", f"{A}/ipsec_tunnels", ipsec("t30", interface_address="10.7.0.2/30")
        )
    )
    r = ok(
        *await control.call("POST", f"{A}/routes", {"prefix": "10.8.0.0/16", "nexthop": "10.7.0.1"})
    )
    assert r["tunnel_id"]


BAD_IPSEC = [
    ({"interface_address": "10.0.0.0/29"}, "interface_address", "/31 or a /30"),
    ({"interface_address": "10.0.0.0/30"}, "interface_address", "usable"),
    ({"interface_address": "10.0.0.1"}, "interface_address", "prefix length"),
    ({"interface_address": 7}, "interface_address", "string"),
    ({"cloudflare_endpoint": "nope"}, "cloudflare_endpoint", "not an IPv4"),
    ({"customer_endpoint": "300.1.1.1"}, "customer_endpoint", ""),
    ({"name": ""}, "name", ""),
    ({"name": 5}, "name", "string"),
    ({"replay_protection": "yes"}, "replay_protection", "true or false"),
    ({"mtu": 100}, "mtu", "between"),
    ({"mtu": True}, "mtu", "integer"),
    ({"mss": 100}, "mss", "536"),
    ({"psk": "short"}, "psk", "characters"),
    ({"colour": "red"}, "colour", "unknown field"),
]


@pytest.mark.parametrize(("change", "field", "word"), BAD_IPSEC)
async def test_ipsec_bad_fields_name_the_field(
    control: Control, change: dict, field: str, word: str
) -> None:
    bad = ipsec("bad", n=4)
    bad.update(change)
    body = {"ipsec_tunnels": [ipsec("ok", n=3), bad]}
    msg = err(
        *await control.call("POST", f"{A}/ipsec_tunnels", body),
        400,
        f"ipsec_tunnels[1].{field}",
        word,
    )
    assert "short" not in msg  # a PSK value is never echoed
    # All-or-nothing: the valid first item was not created either.
    assert ok(*await control.call("GET", f"{A}/ipsec_tunnels"))["ipsec_tunnels"] == []
    assert control.service.publisher.items() == {}


async def test_missing_and_malformed_bodies(control: Control) -> None:
    body = ipsec()
    del body["cloudflare_endpoint"]
    err(
        *await control.call("POST", f"{A}/ipsec_tunnels", body),
        400,
        "cloudflare_endpoint",
        "required",
    )
    err(*await control.call("POST", f"{A}/ipsec_tunnels", raw=b"{not json"), 400, "JSON")
    err(*await control.call("POST", f"{A}/ipsec_tunnels"), 400, "body")
    err(*await control.call("POST", f"{A}/ipsec_tunnels", [1, 2]), 400, "object")
    err(
        *await control.call("POST", f"{A}/ipsec_tunnels", {"ipsec_tunnels": []}),
        400,
        "ipsec_tunnels",
    )
    err(
        *await control.call("POST", f"{A}/ipsec_tunnels", {"ipsec_tunnels": [ipsec()], "x": 1}),
        400,
        "x",
    )
    err(
        *await control.call(
            "POST", f"{A}/routes", {"prefix": "10.1.0.1/24", "nexthop": "10.0.0.1"}
        ),
        400,
        "prefix",
        "host bits",
    )
    err(
        *await control.call(
            "POST", f"{A}/routes", {"prefix": "10.1.0.0/24", "nexthop": "10.0.0.1"}
        ),
        400,
        "nexthop",
        "no tunnel",
    )
    err(
        *await control.call("POST", f"{A}/routes", {"prefix": "10.1.0.0/24", "nexthop": "x"}),
        400,
        "nexthop",
    )
    err(
        *await control.call(
            "POST", f"{A}/routes", {"prefix": "10.1.0.0/24", "nexthop": "10.0.0.1", "weight": 0}
        ),
        400,
        "weight",
    )
    err(*await control.call("POST", f"{A}/gre_tunnels", gre(ttl=0)), 400, "ttl")
    err(
        *await control.call("POST", f"{A}/gre_tunnels", gre(customer_gre_endpoint=None)),
        400,
        "customer_gre_endpoint",
    )
    err(
        *await control.call("POST", f"{A}/ipsec_tunnels?validate_only=maybe", ipsec()),
        400,
        "validate_only",
    )
    t = ok(*await control.call("POST", f"{A}/ipsec_tunnels", ipsec()))
    err(*await control.call("PUT", f"{A}/ipsec_tunnels/{t['id']}", {"mtu": "big"}), 400, "mtu")
    err(
        *await control.call("PUT", f"{A}/ipsec_tunnels/{t['id']}", {"nmae": "x"}),
        400,
        "nmae",
        "unknown",
    )
    # Cloudflare-only fields are accepted, ignored and reported.
    status, body = await control.call("PUT", f"{A}/ipsec_tunnels/{t['id']}", {"health_check": {}})
    assert status == 200 and "health_check" in body["messages"][0]["message"]


async def test_conflicts(control: Control) -> None:
    ok(*await control.call("POST", f"{A}/ipsec_tunnels", ipsec("t1", n=0)))
    err(*await control.call("POST", f"{A}/ipsec_tunnels", ipsec("t1", n=1)), 409, "name", "t1")
    err(
        *await control.call("POST", f"{A}/ipsec_tunnels", ipsec("t2", n=0)),
        409,
        "interface_address",
        "overlaps",
    )
    body = {"ipsec_tunnels": [ipsec("d", n=5), ipsec("d", n=6)]}
    err(*await control.call("POST", f"{A}/ipsec_tunnels", body), 409, "ipsec_tunnels[1].name")
    # Same name and addresses in another account: fine (tenancy).
    ok(*await control.call("POST", f"{B}/ipsec_tunnels", ipsec("t1", n=0)))
    # Same endpoint pair in one account: allowed, but ID_IPV4_ADDR is then unusable.
    status, body = await control.call(
        "POST", f"{A}/ipsec_tunnels", ipsec("t3", n=7, customer_endpoint="198.51.100.10")
    )
    assert status == 200 and "ID_IPV4_ADDR" in body["messages"][0]["message"]


async def test_gre_outer_pair_unique_across_accounts(control: Control) -> None:
    """A GRE packet names no tunnel: its outer pair must be unique cluster-wide."""
    ok(*await control.call("POST", f"{A}/gre_tunnels", gre("g1", n=100), account="acct-a"))
    msg = err(
        *await control.call("POST", f"{B}/gre_tunnels", gre("g1", n=100), account="acct-b"),
        409,
        "customer_gre_endpoint",
    )
    assert "acct-a" not in msg  # says nothing about whose tunnel it is
    g = ok(*await control.call("POST", f"{B}/gre_tunnels", gre("g2", n=101), account="acct-b"))
    err(
        *await control.call(
            "PUT",
            f"{B}/gre_tunnels/{g['id']}",
            {"customer_gre_endpoint": "198.51.100.100"},
            account="acct-b",
        ),
        409,
        "customer_gre_endpoint",
    )


async def test_validate_only_leaves_nothing(control: Control) -> None:
    pub = control.service.publisher
    res = ok(
        *await control.call("POST", f"{A}/ipsec_tunnels?validate_only=true", ipsec(psk="p" * 16))
    )
    assert res["name"] == "t1"
    assert control.store.rows("ipsec") == [] and pub.items() == {} and pub.sequence == 0
    t = ok(*await control.call("POST", f"{A}/ipsec_tunnels", ipsec()))
    seq = pub.sequence
    mod = ok(
        *await control.call(
            "PUT", f"{A}/ipsec_tunnels/{t['id']}?validate_only=true", {"name": "zz"}
        )
    )
    assert mod["modified"] is False and mod["modified_ipsec_tunnel"]["name"] == "zz"
    d = ok(*await control.call("DELETE", f"{A}/ipsec_tunnels/{t['id']}?validate_only=true"))
    assert d["deleted"] is False
    g = ok(
        *await control.call("POST", f"{A}/ipsec_tunnels/{t['id']}/psk_generate?validate_only=true")
    )
    assert "psk" not in g
    r = ok(
        *await control.call(
            "POST",
            f"{A}/routes?validate_only=true",
            {"prefix": "10.3.0.0/16", "nexthop": "10.200.0.1"},
        )
    )
    assert r["tunnel_id"] == t["id"]
    assert control.store.get("ipsec", "acct-a", t["id"])["name"] == "t1"
    assert control.store.get_psk("acct-a", t["id"]) is None
    assert control.store.rows("route") == [] and pub.sequence == seq
    # validate_only still refuses what a real write would refuse.
    err(*await control.call("POST", f"{A}/ipsec_tunnels?validate_only=true", ipsec()), 409, "name")


async def test_auth(control: Control) -> None:
    for token in ("", "garbage", control.operator + "x"):
        err(*await control.call("GET", f"{A}/ipsec_tunnels", token=token), 401)
    status, body = await control.call(
        "GET", f"{A}/ipsec_tunnels", token="", headers={"Authorization": "Basic Zm9vOmJhcg=="}
    )
    err(status, body, 401, "bearer")
    err(*await control.call("POST", f"{A}/ipsec_tunnels", ipsec(), token="nope"), 401)
    assert control.store.rows("ipsec") == []
    err(*await control.call("GET", "/workers", token=""), 401)
    err(*await control.call("GET", "/metrics", token=""), 401)
    # No token needed: health and the API document.
    status, body = await control.call("GET", "/healthz", token="")
    assert status == 200 and body["result"]["status"] == "ok"
    status, body = await control.call("GET", "/openapi.json", token="")
    assert status == 200 and body["openapi"].startswith("3.")


async def test_account_isolation_and_operator(control: Control) -> None:
    ta = ok(*await control.call("POST", f"{A}/ipsec_tunnels", ipsec("a1"), account="acct-a"))
    ga = ok(*await control.call("POST", f"{A}/gre_tunnels", gre("ga"), account="acct-a"))
    ra = ok(
        *await control.call(
            "POST",
            f"{A}/routes",
            {"prefix": "10.5.0.0/16", "nexthop": "10.200.0.1"},
            account="acct-a",
        )
    )
    tb = ok(*await control.call("POST", f"{B}/ipsec_tunnels", ipsec("b1"), account="acct-b"))
    # B's token on A's collections and on A's resources by B's own path: 404 everywhere.
    paths = [
        ("GET", f"{A}/ipsec_tunnels"), ("POST", f"{A}/ipsec_tunnels"), ("GET", f"{A}/gre_tunnels"),
        ("GET", f"{A}/routes"), ("POST", f"{A}/routes"),
        ("GET", f"{A}/ipsec_tunnels/{ta['id']}"), ("PUT", f"{A}/ipsec_tunnels/{ta['id']}"),
        ("DELETE", f"{A}/ipsec_tunnels/{ta['id']}"), ("POST", f"{A}/ipsec_tunnels/{ta['id']}/psk_generate"),
        ("GET", f"{A}/ipsec_tunnels/{ta['id']}/sas"),
        ("GET", f"{B}/ipsec_tunnels/{ta['id']}"), ("PUT", f"{B}/ipsec_tunnels/{ta['id']}"),
        ("DELETE", f"{B}/ipsec_tunnels/{ta['id']}"), ("POST", f"{B}/ipsec_tunnels/{ta['id']}/psk_generate"),
        ("GET", f"{B}/ipsec_tunnels/{ta['id']}/sas"),
        ("GET", f"{B}/gre_tunnels/{ga['id']}"), ("PUT", f"{B}/gre_tunnels/{ga['id']}"),
        ("DELETE", f"{B}/gre_tunnels/{ga['id']}"),
        ("GET", f"{B}/routes/{ra['id']}"), ("PUT", f"{B}/routes/{ra['id']}"), ("DELETE", f"{B}/routes/{ra['id']}"),
    ]  # fmt: skip
    for method, path in paths:
        body = {"description": "x"} if method in ("PUT", "POST") else None
        err(*await control.call(method, path, body, account="acct-b"), 404)
    # ... and nothing of A changed.
    assert control.store.get("ipsec", "acct-a", ta["id"])["description"] == "test tunnel"
    assert control.store.get_psk("acct-a", ta["id"]) is None
    accts = ok(*await control.call("GET", "/accounts", account="acct-b"))["accounts"]
    assert accts == [{"id": "acct-b"}]
    # Operator sees both.
    accts = ok(*await control.call("GET", "/accounts"))["accounts"]
    assert accts == [{"id": "acct-a"}, {"id": "acct-b"}]
    assert (
        ok(*await control.call("GET", f"{B}/ipsec_tunnels/{tb['id']}"))["ipsec_tunnel"]["name"]
        == "b1"
    )
    assert len(ok(*await control.call("GET", f"{A}/ipsec_tunnels"))["ipsec_tunnels"]) == 1
    # Account tokens cannot read the (account-labelled) metrics.
    err(*await control.call("GET", "/metrics", account="acct-b"), 403, "operator")
    # Bad ids are not found, not errors.
    err(*await control.call("GET", f"{A}/ipsec_tunnels/../../x", account="acct-a"), 404)
    err(*await control.call("GET", f"{A}/ipsec_tunnels/XYZ", account="acct-a"), 404)
    err(*await control.call("GET", "/accounts/bad_acct!/magic/routes"), 404)
    err(*await control.call("GET", "/nope"), 404)
    err(*await control.call("PATCH", f"{A}/ipsec_tunnels"), 405)


async def test_concurrent_creates_one_wins(control: Control) -> None:
    async def create(i: int) -> tuple[int, dict]:
        return await control.call("POST", f"{A}/ipsec_tunnels", ipsec("same", n=10 + i))

    results = await asyncio.gather(*(create(i) for i in range(12)))
    statuses = sorted(s for s, _ in results)
    assert statuses == [200] + [409] * 11, statuses
    assert len(control.store.rows("ipsec", "acct-a")) == 1
    assert len(control.service.publisher.items()) == 1
    # Distinct names in parallel all succeed, each published once.
    more = await asyncio.gather(
        *(control.call("POST", f"{A}/ipsec_tunnels", ipsec(f"n{i}", n=40 + i)) for i in range(10))
    )
    assert [s for s, _ in more] == [200] * 10
    assert len(control.service.publisher.items()) == 11


async def test_workers_and_metrics(control: Control) -> None:
    assert ok(*await control.call("GET", "/workers")) == {"workers": []}
    ok(*await control.call("POST", f"{A}/ipsec_tunnels", ipsec()))
    await control.call("GET", f"{A}/ipsec_tunnels/{'0' * 32}")
    async with control.session.get(
        control.base + "/metrics", headers={"Authorization": f"Bearer {control.operator}"}
    ) as resp:
        assert resp.status == 200
        text = await resp.text()
    assert 'anywan_control_tunnels{kind="ipsec"} 1.0' in text
    assert 'anywan_control_account_tunnels{account="acct-a",kind="ipsec"} 1.0' in text
    assert (
        'anywan_control_api_requests_total{method="POST",'
        'route="/accounts/{account_id}/magic/ipsec_tunnels",status="200"} 1.0'
    ) in text
    assert ('route="/accounts/{account_id}/magic/ipsec_tunnels/{id}",status="404"} 1.0') in text
    assert "anywan_control_bus_sequence 1.0" in text
    for name in (
        "ike_sas",
        "child_sas",
        "ike_handshakes",
        "dpd_failures",
        "bus_slowest_worker_lag",
    ):
        assert f"anywan_control_{name}" in text
    assert "anywan_bus_" in text  # the publisher's own metrics share the registry


async def test_random_bodies_never_500(control: Control) -> None:
    """Garbage of every JSON shape in every field: a 4xx (or 200), never a 500."""
    import random

    rng = random.Random(7)
    values = [None, True, 0, -1, 2**40, 1.5, "", "x" * 300, "10.0.0.0/31", "203.0.113.1",
              "::1", "10.0.0.1/24", [], [1], {}, {"a": 1}, "\x00", "ü" * 3]  # fmt: skip
    fields = {
        "ipsec_tunnels": [*ipsec(), "psk", "mtu", "mss", "replay_protection", "zzz"],
        "gre_tunnels": [*gre(), "ttl", "mtu"],
        "routes": ["prefix", "nexthop", "priority", "weight", "description"],
    }
    t = ok(*await control.call("POST", f"{A}/ipsec_tunnels", ipsec("base", n=90)))
    for i in range(150):
        plural = rng.choice(list(fields))
        body: object = {f: rng.choice(values) for f in rng.sample(fields[plural], 3)}
        if plural == "ipsec_tunnels" and i % 3 == 0:
            body = {**ipsec(f"f{i}", n=100 + i), **body}
        if i % 5 == 0:
            body = {plural: [body]}
        if i % 11 == 0:
            body = rng.choice(values)
        status, resp = await control.call("POST", f"{A}/{plural}", body)
        assert status in (200, 400, 409), (body, resp)
        status, resp = await control.call("PUT", f"{A}/ipsec_tunnels/{t['id']}", body)
        assert status in (200, 400, 409), (body, resp)
    status, _ = await control.call("POST", f"{A}/routes", raw=b"\xff\xfe{")
    assert status == 400
    status, _ = await control.call("POST", f"{A}/routes", raw=b"[" * 5000 + b"]" * 5000)
    assert status == 400
    # Python refuses to parse an int of more than 4300 digits (a ValueError).
    status, _ = await control.call("POST", f"{A}/routes", raw=b'{"weight": ' + b"9" * 5000 + b"}")
    assert status == 400
