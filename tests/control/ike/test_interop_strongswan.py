"""Our IKEv2 responder (IkeEngine + IkeTransport) against strongSwan initiators.

Topology (netns prefix ``awt-i-x-``)::

    site 192.0.2.1 ──── 192.0.2.254 gw (203.0.113.1 on lo: our responder)
                                     │ 198.51.100.254
    natsite 10.10.0.2 ── 10.10.0.1 nat 198.51.100.1 (nftables masquerade)

Each test starts its own charon (kernel-libipsec, so ESP would be UDP
encapsulated and a 500 initiator always floats to 4500) and its own engine +
transport, running on an event loop in a thread that joined the ``gw``
namespace. Pass/fail comes from strongSwan's own view (``swanctl --list-sas``:
ESTABLISHED / INSTALLED with the expected algorithms and SPIs) and from our
engine's events. ESP data is not exercised here (control carries no ESP; the
data-path interop test is the worker's).

On failure pytest prints charon's log and our events (captured teardown output).
"""

from __future__ import annotations

import hashlib
import re
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from deploy.netns import LoopThread, Namespace, Topology, cleanup_prefix, unique_prefix
from deploy.strongswan import Charon, Child, Connection

pytestmark = [pytest.mark.netns, pytest.mark.strongswan]

engine_mod = pytest.importorskip("control.ike.engine")
events_mod = pytest.importorskip("control.ike.events")
from control.ike.transport import IkeTransport  # noqa: E402

IkeConfig = engine_mod.IkeConfig
IkeEngine = engine_mod.IkeEngine
TunnelAuth = engine_mod.TunnelAuth
ev = events_mod


def _engine_is_implemented() -> bool:
    try:
        IkeEngine(IkeConfig(), lambda ident: None).get_timer()
    except NotImplementedError:
        return False
    return True


PREFIX = "awt-i-x-"
SUFFIX = "ipsec.anywan.example"
ANYCAST = "203.0.113.1"
SITE_ADDR = "192.0.2.1"
NAT_OUTER = "198.51.100.1"
PSK = b"\x11" * 8 + b"interop-psk-0123456789"
SITE_TS = "10.1.0.0/24"
CORE_TS = "10.200.0.0/16"

# strongSwan's names for what a swanctl proposal keyword selects.
ENCR = {
    "aes128gcm16": ("AES_GCM_16", "128"),
    "aes256gcm16": ("AES_GCM_16", "256"),
    "aes128": ("AES_CBC", "128"),
    "aes256": ("AES_CBC", "256"),
    "null": ("NULL", None),
}
INTEG = {"sha256": "HMAC_SHA2_256_128", "sha1": "HMAC_SHA1_96"}
PRF = {
    "prfsha256": "PRF_HMAC_SHA2_256",
    "prfsha384": "PRF_HMAC_SHA2_384",
    "prfsha512": "PRF_HMAC_SHA2_512",
}
DH = {"ecp384": "ECP_384", "modp2048": "MODP_2048", "modp1536": "MODP_1536"}
# Our SaRecord's integ names for the same.
RECORD_INTEG = {"sha256": "sha256_128", "sha1": "sha1_96", None: "none"}


def tid(name: str) -> str:
    """A tunnel ID in the seeds' form (32 hex digits), stable per test name."""
    return hashlib.md5(name.encode()).hexdigest()


def fqdn(account: str, tunnel: str) -> str:
    return f"{tunnel}.{account}.{SUFFIX}"


# --- fixtures -------------------------------------------------------------------


@pytest.fixture(scope="module")
def topo() -> Iterator[Topology]:
    prefix = unique_prefix(PREFIX)
    cleanup_prefix(prefix)
    t = Topology(prefix)
    try:
        gw, site = t.namespace("gw"), t.namespace("site")
        nat, natsite = t.namespace("nat"), t.namespace("natsite")
        t.veth(site, "s0", gw, "g1", addr_a=f"{SITE_ADDR}/24", addr_b="192.0.2.254/24")
        t.veth(nat, "n0", gw, "g2", addr_a=f"{NAT_OUTER}/24", addr_b="198.51.100.254/24")
        t.veth(natsite, "s0", nat, "n1", addr_a="10.10.0.2/24", addr_b="10.10.0.1/24")
        gw.addr("lo", f"{ANYCAST}/32")
        gw.addr("lo", "10.200.0.1/32")  # for the strongSwan-responder baseline's routes
        site.addr("lo", "10.1.0.1/32")
        natsite.addr("lo", "10.1.1.1/32")
        site.route(f"{ANYCAST}/32", via="192.0.2.254")
        natsite.route("default", via="10.10.0.1")
        nat.route(f"{ANYCAST}/32", via="198.51.100.254")
        nat.enable_forwarding()
        nat.nft(
            "table ip awnat {\n chain post {\n  type nat hook postrouting priority 100;\n"
            '  oifname "n0" meta l4proto udp masquerade to :40000-40999\n'
            '  oifname "n0" masquerade\n }\n}\n'
        )
        yield t
    finally:
        t.close()


@dataclass
class Store:
    """The tunnels our lookup knows (what control's store would answer)."""

    tunnels: list[Any] = field(default_factory=list)

    def add(self, account: str, tunnel: str, psk: bytes = PSK, **kw: Any) -> Any:
        auth = TunnelAuth(account_id=account, tunnel_id=tunnel, psk=psk, local_addr=ANYCAST, **kw)
        self.tunnels.append(auth)
        return auth

    def lookup(self, ident: Any) -> Any:
        if ident.kind == "ipv4":
            found = [
                t
                for t in self.tunnels
                if t.customer_endpoint == ident.address and t.local_addr == ident.local_addr
            ]
            return found[0] if len(found) == 1 else None
        for t in self.tunnels:
            if (t.account_id, t.tunnel_id) == (ident.account_id, ident.tunnel_id):
                return t
        return None


class Responder:
    """Engine + transport on a loop thread inside ``gw``."""

    def __init__(self, ns: Namespace, store: Store, config: Any) -> None:
        self.store = store
        self.engine = IkeEngine(config, store.lookup)
        self.events: list[object] = []
        self.lt: LoopThread = ns.loop_thread(use_uvloop=True)
        self.transport = IkeTransport(self.engine, on_event=self.events.append, loop=self.lt.loop)
        self.lt.run(self.transport.listen(ANYCAST))

    def of(self, cls: type, **match: Any) -> list[Any]:
        return [
            e
            for e in list(self.events)
            if isinstance(e, cls) and all(getattr(e, k) == v for k, v in match.items())
        ]

    def wait(self, cls: type, timeout: float = 10.0, count: int = 1, **match: Any) -> list[Any]:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            found = self.of(cls, **match)
            if len(found) >= count:
                return found
            time.sleep(0.05)
        raise AssertionError(
            f"no {count}x {cls.__name__}({match}) within {timeout}s; events: "
            f"{[type(e).__name__ for e in self.events]}; transport: {dict(self.transport.stats)}"
        )

    def call(self, func: Callable[..., Any], *args: Any) -> Any:
        return self.lt.call(self.transport.call, func, *args)

    def close(self) -> None:
        self.lt.call(self.transport.close)
        self.lt.stop()


def default_config(**kw: Any) -> Any:
    base: dict[str, Any] = {
        "id_suffix": SUFFIX,
        "retransmit_timeout": 0.5,
        "retransmit_tries": 3,
        "rekey_delete_delay": 0.2,
    }
    base.update(kw)
    return IkeConfig(**base)


@pytest.fixture
def make_responder(topo: Topology) -> Iterator[Callable[..., Responder]]:
    made: list[Responder] = []

    def make(store: Store, **config: Any) -> Responder:
        # Until control/ike/engine.py has a body there is nothing to test
        # against; the strongSwan-responder baselines need no engine.
        if not _engine_is_implemented():
            pytest.skip("control/ike/engine.py: IkeEngine is not implemented yet")
        r = Responder(topo.namespaces["gw"], store, default_config(**config))
        made.append(r)
        return r

    yield make
    for r in made:
        print(f"--- our events ({len(r.events)}):")
        for e in r.events:
            print("  ", e)
        print("--- transport stats:", dict(r.transport.stats))
        r.close()


@pytest.fixture
def charons(topo: Topology) -> Iterator[Callable[[str], Charon]]:
    made: list[Charon] = []

    def start(site: str = "site", **levels: int) -> Charon:
        log_levels = {"ike": 2, "enc": 1, "net": 2, **levels}
        c = Charon(topo.namespaces[site], name=site, log_levels=log_levels)
        made.append(c)
        c.start()
        return c

    yield start
    for c in made:
        print(f"--- charon {c.name} log (tail):")
        print("\n".join(c.log().splitlines()[-120:]))
        c.stop()


def site_conn(
    name: str,
    local_id: str,
    *,
    proposals: str = "aes256gcm16-prfsha384-ecp384",
    esp: str = "aes256gcm16",
    psk: bytes = PSK,
    local_addr: str = SITE_ADDR,
    port: int = 500,
    remote_id: str = "%any",
    local_ts: str = SITE_TS,
    remote_ts: str = CORE_TS,
    **kw: Any,
) -> Connection:
    return Connection(
        name,
        local_addr,
        ANYCAST,
        local_id,
        remote_id,
        psk,
        proposals=[proposals],
        children=[Child("net", [local_ts], [remote_ts], [esp])],
        local_port=port,
        remote_port=port,
        **kw,
    )


def only_sa(charon: Charon, name: str) -> dict[str, Any]:
    sas = charon.established(name)
    assert len(sas) == 1, f"expected one ESTABLISHED {name}: {charon.list_sas()}"
    return sas[0]


def installed_children(sa: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for c in sa["child-sas"] if c.get("state") == "INSTALLED"]


def check_child_matches_records(child: dict[str, Any], installed: Any) -> None:
    """strongSwan's Child SA and our ChildSaInstalled describe the same pair."""
    assert int(child["spi-in"], 16) == installed.outbound.spi
    assert int(child["spi-out"], 16) == installed.inbound.spi
    assert installed.inbound.udp_encap and installed.outbound.udp_encap  # libipsec forces it


def check_child_keys(theirs: dict[str, bytes], installed: Any, *, we_initiated: bool) -> None:
    """Our SaRecords carry the KEYMAT strongSwan derived (RFC 7296 §2.17):
    "initiator" keys protect traffic from the initiator of the exchange."""
    i2r, r2i = (
        (installed.outbound, installed.inbound)
        if we_initiated
        else (installed.inbound, installed.outbound)
    )
    assert i2r.enc_key + i2r.salt == theirs["encr_i"], "i->r encryption key differs"
    assert r2i.enc_key + r2i.salt == theirs["encr_r"], "r->i encryption key differs"
    assert i2r.integ_key == theirs.get("integ_i", b""), "i->r integrity key differs"
    assert r2i.integ_key == theirs.get("integ_r", b""), "r->i integrity key differs"


# --- proposals: a covering matrix -----------------------------------------------

# IKE: every encryption × PRF, encryption × DH and PRF × DH pair (a Latin square).
IKE_CASES = [
    "aes128gcm16-prfsha256-ecp384",
    "aes128gcm16-prfsha384-modp2048",
    "aes128gcm16-prfsha512-modp1536",
    "aes256gcm16-prfsha256-modp2048",
    "aes256gcm16-prfsha384-modp1536",
    "aes256gcm16-prfsha512-ecp384",
    "aes256-sha256-prfsha256-modp1536",
    "aes256-sha256-prfsha384-ecp384",
    "aes256-sha256-prfsha512-modp2048",
]
# Child: every cipher × integrity, each cipher family with each PFS choice.
CHILD_CASES = [
    ("aes128gcm16", None, None),
    ("aes256gcm16", None, "modp2048"),
    ("aes128", "sha256", "modp1536"),
    ("aes128", "sha1", None),
    ("aes256", "sha256", "modp2048"),
    ("aes256", "sha1", "modp1536"),
    ("aes128gcm16", None, "modp1536"),
    ("aes256gcm16", None, None),
    ("aes256", "sha1", "modp2048"),
]


def esp_string(cipher: str, integ: str | None, pfs: str | None) -> str:
    return "-".join(p for p in (cipher, integ, pfs) if p)


def ike_expectation(proposal: str) -> dict[str, str]:
    parts = proposal.split("-")
    encr, keysize = ENCR[parts[0]]
    want = {
        "encr-alg": encr,
        "encr-keysize": keysize or "",
        "prf-alg": PRF[parts[-2]],
        "dh-group": DH[parts[-1]],
    }
    if len(parts) == 4:
        want["integ-alg"] = INTEG[parts[1]]
    return want


@pytest.mark.parametrize(
    ("ike", "child"),
    list(zip(IKE_CASES, CHILD_CASES, strict=True)),
    ids=[f"{i}+{esp_string(*c)}" for i, c in zip(IKE_CASES, CHILD_CASES, strict=True)],
)
def test_proposal_matrix(make_responder, charons, ike: str, child: tuple) -> None:
    """strongSwan offers exactly one IKE and one ESP proposal; both sides agree
    on it; with PFS, a rekey by strongSwan runs CREATE_CHILD_SA with that group."""
    cipher, integ, pfs = child
    store = Store()
    store.add("acct1", tid("t1"))
    ours = make_responder(store)
    site = charons("site", chd=4)
    site.load([site_conn("t1", fqdn("acct1", tid("t1")), proposals=ike, esp=esp_string(*child))])
    site.initiate(child="net")

    sa = only_sa(site, "t1")
    for key, value in ike_expectation(ike).items():
        assert sa.get(key, "") == value, (key, sa)
    (kid,) = installed_children(sa)
    encr, keysize = ENCR[cipher]
    assert (kid["encr-alg"], kid.get("encr-keysize", "")) == (encr, keysize or "")
    assert kid.get("integ-alg") == (INTEG[integ] if integ else None)
    (est,) = ours.wait(ev.IkeSaEstablished, tunnel_id=tid("t1"))
    assert est.proposal == ike, est
    (inst,) = ours.wait(ev.ChildSaInstalled, tunnel_id=tid("t1"))
    check_child_matches_records(kid, inst)
    assert inst.inbound.cipher.value == cipher
    assert inst.inbound.integ.value == RECORD_INTEG[integ]
    check_child_keys(site.child_keys()[0], inst, we_initiated=False)

    if pfs:
        site.rekey(child="net")
        (_, new) = ours.wait(ev.ChildSaInstalled, count=2, tunnel_id=tid("t1"))
        assert new.replaces == (inst.inbound.spi, inst.outbound.spi)

        def rekeyed() -> Any:
            kids = installed_children(only_sa(site, "t1"))
            return kids if kids and kids[0]["spi-in"] != kid["spi-in"] else None

        kids = site.wait_for(rekeyed, timeout=10)
        assert kids, site.list_sas()
        assert kids[0].get("dh-group") == DH[pfs], kids
        check_child_matches_records(kids[0], new)
        check_child_keys(site.child_keys()[1], new, we_initiated=False)
        ours.wait(ev.ChildSaDeleted, inbound_spi=inst.inbound.spi)


def test_null_encryption_only_when_the_tunnel_allows_it(make_responder, charons) -> None:
    store = Store()
    store.add("acct1", tid("null-ok"), allow_null_cipher=True)
    store.add("acct1", tid("null-no"))
    ours = make_responder(store)
    site = charons("site")
    site.load(
        [
            site_conn("ok", fqdn("acct1", tid("null-ok")), esp="null-sha256"),
            site_conn("no", fqdn("acct1", tid("null-no")), esp="null-sha256"),
        ]
    )
    site.initiate(child="net", ike="ok")
    (kid,) = installed_children(only_sa(site, "ok"))
    assert kid["encr-alg"] == "NULL" and kid["integ-alg"] == "HMAC_SHA2_256_128"
    (inst,) = ours.wait(ev.ChildSaInstalled, tunnel_id=tid("null-ok"))
    assert inst.inbound.cipher.value == "null"

    with pytest.raises(Exception, match=r"failed|NO_PROPOSAL_CHOSEN"):
        site.initiate(child="net", ike="no", timeout=8)
    ours.wait(ev.NegotiationFailed, notify="NO_PROPOSAL_CHOSEN", sent=True)
    assert not ours.of(ev.ChildSaInstalled, tunnel_id=tid("null-no"))
    assert site.log_lines("NO_PROPOSAL_CHOSEN")


def test_unacceptable_traffic_selectors(make_responder, charons) -> None:
    """The customer's side claims a subnet the tunnel does not allow."""
    from replication.records import TrafficSelector

    store = Store()
    store.add("acct1", tid("ts"), remote_ts=(TrafficSelector("10.1.0.0", "10.1.0.255"),))
    ours = make_responder(store)
    site = charons("site")
    site.load([site_conn("ts", fqdn("acct1", tid("ts")), local_ts="10.77.0.0/24")])
    with pytest.raises(Exception, match="failed"):
        site.initiate(child="net", timeout=8)
    assert site.log_lines("TS_UNACCEPTABLE")
    ours.wait(ev.NegotiationFailed, notify="TS_UNACCEPTABLE", sent=True)
    assert not ours.of(ev.ChildSaInstalled)


# --- identities -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "local_id", "remote_id"),
    [
        ("fqdn", fqdn("acct7", tid("tun-f")), "%any"),
        ("rfc822", "ipsec@" + fqdn("acct7", tid("tun-r")), "%any"),
        ("key_id", "keyid:acct7_" + tid("tun-k"), "%any"),
        ("ipv4", SITE_ADDR, ANYCAST),
    ],
    ids=["fqdn", "rfc822", "keyid", "ipv4"],
)
def test_identity_types(make_responder, charons, kind: str, local_id: str, remote_id: str) -> None:
    store = Store()
    tunnel = tid({"fqdn": "tun-f", "rfc822": "tun-r", "key_id": "tun-k", "ipv4": "tun-4"}[kind])
    store.add("acct7", tunnel, customer_endpoint=SITE_ADDR if kind == "ipv4" else None)
    # A second tunnel with a different customer endpoint does not make ipv4 ambiguous.
    store.add("acct7", tid("other"), customer_endpoint="192.0.2.99")
    ours = make_responder(store)
    site = charons("site")
    site.load([site_conn("id", local_id, remote_id=remote_id)])
    site.initiate(child="net")
    sa = only_sa(site, "id")
    assert installed_children(sa)
    (est,) = ours.wait(ev.IkeSaEstablished)
    assert (est.tunnel_id, est.account_id, est.id_type) == (tunnel, "acct7", kind)
    if remote_id != "%any":
        # strongSwan checked our IDr against what it expects.
        assert sa["remote-id"] == remote_id


def test_ipv4_identity_refused_when_ambiguous(make_responder, charons) -> None:
    store = Store()
    store.add("acct7", tid("dup1"), customer_endpoint=SITE_ADDR)
    store.add("acct7", tid("dup2"), customer_endpoint=SITE_ADDR)
    ours = make_responder(store)
    site = charons("site")
    site.load([site_conn("id", SITE_ADDR)])
    with pytest.raises(Exception, match="failed"):
        site.initiate(child="net", timeout=8)
    assert site.log_lines("AUTHENTICATION_FAILED")
    ours.wait(ev.AuthenticationFailed, reason="unknown_id")
    assert not ours.of(ev.IkeSaEstablished)


def test_wrong_psk_and_unknown_id(make_responder, charons) -> None:
    store = Store()
    store.add("acct1", tid("t1"))
    ours = make_responder(store)
    site = charons("site")
    site.load(
        [
            site_conn("bad", fqdn("acct1", tid("t1")), psk=b"wrong-psk-wrong-psk-wrong"),
            site_conn("unk", fqdn("acct1", tid("nope"))),
        ]
    )
    with pytest.raises(Exception, match="failed"):
        site.initiate(child="net", ike="bad", timeout=8)
    assert site.log_lines("received AUTHENTICATION_FAILED notify error")
    (fail,) = ours.wait(ev.AuthenticationFailed, reason="bad_auth")
    assert fail.remote[0] == SITE_ADDR
    with pytest.raises(Exception, match="failed"):
        site.initiate(child="net", ike="unk", timeout=8)
    ours.wait(ev.AuthenticationFailed, reason="unknown_id")
    assert not ours.of(ev.IkeSaEstablished) and not ours.of(ev.ChildSaInstalled)
    # Nothing is left behind: the engine has no timer for these peers beyond housekeeping,
    # and a correct PSK afterwards works.
    site.load([site_conn("good", fqdn("acct1", tid("t1")))])
    site.initiate(child="net", ike="good")
    assert only_sa(site, "good")
    text = "\n".join(str(e) for e in ours.events)
    assert PSK.hex() not in text and "interop-psk" not in text


# --- ports and NAT --------------------------------------------------------------


def test_start_on_500_floats_to_4500(make_responder, charons) -> None:
    """kernel-libipsec makes charon fake a NAT, so it moves to 4500 after
    IKE_SA_INIT (RFC 7296 §2.23); we follow and encapsulate ESP."""
    store = Store()
    store.add("acct1", tid("t1"))
    ours = make_responder(store)
    site = charons("site")
    site.load([site_conn("t1", fqdn("acct1", tid("t1")))])
    out = site.initiate(child="net")
    assert f"to {ANYCAST}[500]" in out and f"to {ANYCAST}[4500]" in out
    sa = only_sa(site, "t1")
    assert (sa["local-port"], sa["remote-port"]) == ("4500", "4500")
    (inst,) = ours.wait(ev.ChildSaInstalled)
    rec = inst.outbound
    assert (rec.remote_addr, rec.remote_port, rec.local_port, rec.udp_encap) == (
        SITE_ADDR,
        4500,
        4500,
        True,
    )


def test_start_on_4500(make_responder, charons) -> None:
    store = Store()
    store.add("acct1", tid("t1"))
    ours = make_responder(store)
    site = charons("site")
    site.load([site_conn("t1", fqdn("acct1", tid("t1")), port=4500)])
    out = site.initiate(child="net")
    assert f"to {ANYCAST}[500]" not in out
    assert "IKE_SA_INIT" in out and f"to {ANYCAST}[4500]" in out
    (est,) = ours.wait(ev.IkeSaEstablished)
    assert est.udp_encap and est.local[1] == 4500 and est.remote[1] == 4500
    (inst,) = ours.wait(ev.ChildSaInstalled)
    check_child_matches_records(installed_children(only_sa(site, "t1"))[0], inst)


@pytest.mark.parametrize("port", [500, 4500], ids=["float-500-4500", "start-4500"])
def test_behind_masquerade_nat(make_responder, charons, port: int) -> None:
    """strongSwan behind an nftables masquerade: both sides detect the NAT,
    and our Child SA records point at the NAT's public address and port."""
    store = Store()
    store.add("acct2", tid("nat"))
    ours = make_responder(store)
    site = charons("natsite")
    site.load(
        [
            site_conn(
                "nat",
                fqdn("acct2", tid("nat")),
                local_addr="10.10.0.2",
                port=port,
                local_ts="10.1.1.0/24",
            )
        ]
    )
    site.initiate(child="net")
    sa = only_sa(site, "nat")
    assert sa.get("nat-local") == "yes", sa  # charon sees itself behind NAT
    (est,) = ours.wait(ev.IkeSaEstablished)
    assert est.nat_detected and est.udp_encap and est.remote[0] == NAT_OUTER
    (inst,) = ours.wait(ev.ChildSaInstalled)
    rec = inst.outbound
    assert rec.remote_addr == NAT_OUTER and rec.udp_encap and rec.local_port == 4500
    assert rec.remote_port == est.remote[1]
    # The NAT rewrote the source port (40000-40999): we use the port we saw.
    assert 40000 <= rec.remote_port <= 40999, rec.remote_port
    check_child_matches_records(installed_children(sa)[0], inst)
    if port == 500:
        # The float: IKE_SA_INIT on 500, then IKE_AUTH on 4500 through the NAT.
        assert site.log_lines(r"sending packet: from 10\.10\.0\.2\[500\]")
        assert site.log_lines(r"sending packet: from 10\.10\.0\.2\[4500\]")


# --- rekeying -------------------------------------------------------------------


def test_child_rekey_by_strongswan(make_responder, charons) -> None:
    store = Store()
    store.add("acct1", tid("t1"))
    ours = make_responder(store)
    site = charons("site")
    site.load([site_conn("t1", fqdn("acct1", tid("t1")), esp="aes128-sha256-modp2048")])
    site.initiate(child="net")
    (old,) = installed_children(only_sa(site, "t1"))
    (first,) = ours.wait(ev.ChildSaInstalled)
    site.rekey(child="net")
    (_, new) = ours.wait(ev.ChildSaInstalled, count=2)
    assert new.replaces == (first.inbound.spi, first.outbound.spi)
    ours.wait(ev.ChildSaDeleted, inbound_spi=first.inbound.spi)
    kids = site.wait_for(
        lambda: [c for c in installed_children(only_sa(site, "t1")) if c["spi-in"] != old["spi-in"]]
    )
    assert kids and len(installed_children(only_sa(site, "t1"))) == 1
    check_child_matches_records(kids[0], new)


def test_child_rekey_by_us(make_responder, charons) -> None:
    """Our Child SA lifetime runs out first: we start CREATE_CHILD_SA (with
    the negotiated PFS group), strongSwan installs the new SA, and we delete
    the old one after publishing the new (make-before-break)."""
    store = Store()
    store.add("acct1", tid("t1"))
    ours = make_responder(store, child_lifetime=2.0, rekey_jitter=0.0)
    site = charons("site", chd=4)
    site.load([site_conn("t1", fqdn("acct1", tid("t1")), esp="aes256gcm16-modp2048")])
    site.initiate(child="net")
    (old,) = installed_children(only_sa(site, "t1"))
    (first,) = ours.wait(ev.ChildSaInstalled)
    (_, new) = ours.wait(ev.ChildSaInstalled, count=2, timeout=8)
    assert new.replaces == (first.inbound.spi, first.outbound.spi)
    ours.wait(ev.ChildSaDeleted, inbound_spi=first.inbound.spi)
    assert site.log_lines(r"parsed CREATE_CHILD_SA request")
    kids = site.wait_for(
        lambda: [c for c in installed_children(only_sa(site, "t1")) if c["spi-in"] != old["spi-in"]]
    )
    assert kids, site.list_sas()
    assert kids[0].get("dh-group") == "MODP_2048"
    check_child_matches_records(kids[0], new)
    first_keys, rekey_keys = site.child_keys()
    check_child_keys(first_keys, first, we_initiated=False)
    check_child_keys(rekey_keys, new, we_initiated=True)
    assert site.wait_for(lambda: len(installed_children(only_sa(site, "t1"))) == 1)


def test_ike_rekey_by_strongswan(make_responder, charons) -> None:
    store = Store()
    store.add("acct1", tid("t1"))
    ours = make_responder(store)
    site = charons("site")
    site.load(
        [site_conn("t1", fqdn("acct1", tid("t1")), proposals="aes256-sha256-prfsha256-modp2048")]
    )
    site.initiate(child="net")
    before = only_sa(site, "t1")
    site.rekey(ike="t1")
    (rk,) = ours.wait(ev.IkeSaRekeyed)
    after = site.wait_for(
        lambda: [s for s in site.established("t1") if s["initiator-spi"] != before["initiator-spi"]]
    )
    assert after, site.list_sas()
    assert int(after[0]["initiator-spi"], 16) == rk.spi_i
    assert int(after[0]["responder-spi"], 16) == rk.spi_r
    assert int(before["initiator-spi"], 16) == rk.old_spi_i
    # The Child SA survived the IKE rekey, untouched.
    assert installed_children(after[0])[0]["spi-in"] == installed_children(before)[0]["spi-in"]
    assert not ours.of(ev.ChildSaDeleted)
    # The new IKE SA works: a Child rekey over it.
    site.rekey(child="net")
    ours.wait(ev.ChildSaInstalled, count=2)


def test_ike_rekey_by_us(make_responder, charons) -> None:
    store = Store()
    store.add("acct1", tid("t1"))
    ours = make_responder(store, ike_lifetime=2.0, rekey_jitter=0.0)
    site = charons("site")
    site.load([site_conn("t1", fqdn("acct1", tid("t1")))])
    site.initiate(child="net")
    before = only_sa(site, "t1")
    (rk,) = ours.wait(ev.IkeSaRekeyed, timeout=8)
    after = site.wait_for(
        lambda: [s for s in site.established("t1") if s["initiator-spi"] != before["initiator-spi"]]
    )
    assert after, site.list_sas()
    # We started this rekey, so we are the initiator of the new IKE SA (§2.18).
    assert after[0].get("initiator") != "yes", after[0]
    assert int(after[0]["initiator-spi"], 16) == rk.spi_i
    assert int(after[0]["responder-spi"], 16) == rk.spi_r
    assert installed_children(after[0])
    assert not ours.of(ev.IkeSaDeleted, reason="dpd")


# strongSwan's CREATE_CHILD_SA messages to us (it floats to 4500 in IKE_AUTH:
# 8 octets of UDP header + 4 of non-ESP marker + 18 = the IKE exchange type),
# held back while both sides start an IKE rekey.
HOLD_CCSA = """
table ip awhold {
  chain in {
    type filter hook input priority 0;
    udp dport 4500 @th,240,8 36 counter drop
  }
}
"""


def test_simultaneous_ike_rekey_with_strongswan(topo: Topology, make_responder, charons) -> None:
    """RFC 7296 §2.8.2 against strongSwan: both sides rekey the IKE SA at once and
    both notice. strongSwan's request is held back until ours has reached it
    and strongSwan's answer to ours has been dropped by the same hold; then one
    of its retransmissions (1, 2.4 and 4.4 s after the request) reaches
    us while ours is in flight, and our retransmission (after 8 s) fetches
    strongSwan's answer. Ours comes after strongSwan's last one, so the test does
    not depend on how long the hold took on a loaded machine (with 3 s, a hold
    lifted between 2.4 and 3 s let our rekey finish before strongSwan's request
    arrived). Both sides apply the nonce tie-break and end on the same single
    IKE SA with the Child SA untouched — whichever side wins."""
    gw = topo.namespaces["gw"]
    store = Store()
    store.add("acct1", tid("t1"))
    ours = make_responder(store, retransmit_timeout=8.0, retransmit_tries=3, dpd_interval=600)
    site = charons("site")
    site.load([site_conn("t1", fqdn("acct1", tid("t1")))])
    site.initiate(child="net")
    (inst,) = ours.wait(ev.ChildSaInstalled)
    before = only_sa(site, "t1")
    gw.nft(HOLD_CCSA)
    try:
        site.rekey(ike="t1")
        assert site.wait_for(
            lambda: site.log_lines(r"<t1\|\d+> generating CREATE_CHILD_SA request"), 5
        )
        assert ours.call(ours.engine.rekey_ike, tid("t1"))

        def answer_held() -> bool:
            """strongSwan's answer to our request was dropped too: ours stays
            in flight until our retransmission. Lifting the hold when the
            request was merely parsed let that answer through once (CI, a
            loaded machine): our rekey finished before any of strongSwan's
            retransmissions reached us, and only strongSwan saw a collision."""
            if not site.log_lines(r"<t1\|\d+> generating CREATE_CHILD_SA response"):
                return False
            resent = len(site.log_lines(r"<t1\|\d+> retransmit \d+ of request"))
            listing = gw.run(["nft", "list", "table", "ip", "awhold"]).stdout
            dropped = re.search(r"counter packets (\d+)", listing)
            return dropped is not None and int(dropped.group(1)) >= 2 + resent

        assert site.wait_for(answer_held, 3, interval=0.02)
    finally:
        gw.run(["nft", "delete", "table", "ip", "awhold"], check=False)

    def converged() -> Any:
        # strongSwan may keep a redundant IKE SA in REKEYED while it waits for
        # a DELETE we cannot send (see the "abandoned" case below)
        sas = [s for s in site.list_sas() if s.get("state") != "REKEYED"]
        mine = ours.lt.call(
            lambda: [(s.spi_i, s.spi_r, s.state.value) for s in ours.engine.sas.values()]
        )
        if len(sas) != 1 or len(mine) != 1 or sas[0].get("state") != "ESTABLISHED":
            return None
        return sas[0], mine[0]

    got = site.wait_for(converged, timeout=20)
    assert got, (site.list_sas(), ours.lt.call(lambda: list(ours.engine.sas.values())))
    theirs, (spi_i, spi_r, state) = got
    assert state == "established"
    assert int(theirs["initiator-spi"], 16) == int.from_bytes(spi_i, "big")
    assert int(theirs["responder-spi"], 16) == int.from_bytes(spi_r, "big")
    assert theirs["initiator-spi"] != before["initiator-spi"]
    # both sides saw the collision and agree on who lost
    assert site.log_lines(r"<t1\|\d+> detected IKE_REKEY collision with IKE_REKEY")
    drops = ours.lt.call(lambda: dict(ours.engine.drops))
    assert drops.get("ike_rekey_collision") == 1, drops
    if site.log_lines(r"IKE_SA rekey collision lost"):
        # strongSwan deleted its redundant IKE SA before our retransmission
        # fetched the answer that told us we won (the early-DELETE path)
        assert drops.get("ike_rekey_collision_won") == 1, drops
        assert drops.get("ike_rekey_collision_early_delete") == 1, drops
        assert site.wait_for(lambda: len(site.list_sas()) == 1, 5), site.list_sas()
    else:
        # strongSwan won and deleted the old IKE SA at once, before our
        # retransmission could fetch the answer the hold dropped: we abandon our
        # rekey and keep strongSwan's new IKE SA, which holds the Child SA
        assert site.log_lines(r"IKE_SA rekey collision won")
        assert (
            drops.get("ike_rekey_collision_lost", 0) + drops.get("ike_rekey_collision_abandoned", 0)
            == 1
        ), drops
    assert not ours.of(ev.NegotiationFailed) and not ours.of(ev.IkeSaDeleted)
    # the Child SA is untouched on both sides, and the survivor works
    assert installed_children(theirs)[0]["spi-in"] == installed_children(before)[0]["spi-in"]
    assert not ours.of(ev.ChildSaDeleted)
    site.rekey(child="net")
    (_, new) = ours.wait(ev.ChildSaInstalled, count=2)
    assert new.replaces == (inst.inbound.spi, inst.outbound.spi)


# --- liveness and deletes -------------------------------------------------------


def test_dpd_both_ways_and_dead_peer(make_responder, charons) -> None:
    """Any protected message proves liveness (RFC 7296 §2.4), so two peers that
    both check every second may never see their own check come due. Each
    direction therefore gets an IKE SA where only one side checks: on t1
    strongSwan checks every second and we do not (yet); on t2 we check every
    second and strongSwan never does. Log lines carry the IKE SA's name."""
    store = Store()
    store.add("acct1", tid("t1"))
    store.add("acct1", tid("t2"))
    ours = make_responder(store, dpd_interval=600.0, retransmit_timeout=0.3, retransmit_tries=2)
    site = charons("site")
    site.load(
        [
            site_conn("t1", fqdn("acct1", tid("t1")), dpd_delay="1s"),
            site_conn("t2", fqdn("acct1", tid("t2")), dpd_delay="0"),  # strongSwan: no DPD
        ]
    )
    # strongSwan's DPD on t1 gets answered by us.
    site.initiate(child="net", ike="t1")
    ours.wait(ev.ChildSaInstalled, tunnel_id=tid("t1"))
    assert site.wait_for(
        lambda: site.log_lines(r"<t1\|\d+> parsed INFORMATIONAL response \d+ \[ \]"), 6
    )
    # Ours: from now on we check after 1 s of silence; on t2 nothing else talks.
    ours.call(lambda now: setattr(ours.engine.config, "dpd_interval", 1.0))
    site.initiate(child="net", ike="t2")
    (inst,) = ours.wait(ev.ChildSaInstalled, tunnel_id=tid("t2"))
    assert site.wait_for(
        lambda: site.log_lines(r"<t2\|\d+> parsed INFORMATIONAL request \d+ \[ \]"), 6
    )
    assert site.wait_for(lambda: site.log_lines(r"<t2\|\d+> generating INFORMATIONAL response"), 2)
    assert not site.log_lines(r"<t2\|\d+> generating INFORMATIONAL request \d+ \[ \]")
    assert only_sa(site, "t2") and only_sa(site, "t1") and not ours.of(ev.IkeSaDeleted)
    # The peer dies silently: after our retransmissions we delete its SAs.
    site.kill()
    (gone,) = ours.wait(ev.IkeSaDeleted, timeout=10, tunnel_id=tid("t2"))
    assert gone.reason in ("dpd", "timeout")
    ours.wait(ev.ChildSaDeleted, inbound_spi=inst.inbound.spi)


def test_delete_child_and_ike_from_strongswan(make_responder, charons) -> None:
    store = Store()
    store.add("acct1", tid("t1"))
    ours = make_responder(store)
    site = charons("site")
    site.load([site_conn("t1", fqdn("acct1", tid("t1")))])
    site.initiate(child="net")
    (inst,) = ours.wait(ev.ChildSaInstalled)
    site.terminate(child="net")
    (deleted,) = ours.wait(ev.ChildSaDeleted)
    assert (deleted.inbound_spi, deleted.outbound_spi) == (inst.inbound.spi, inst.outbound.spi)
    assert deleted.sa_keys and all(k.startswith("sa/") for k in deleted.sa_keys)
    site.terminate(ike="t1")
    (gone,) = ours.wait(ev.IkeSaDeleted)
    assert gone.reason == "peer_delete"
    assert not site.list_sas()


def test_delete_tunnel_from_our_side(make_responder, charons) -> None:
    store = Store()
    store.add("acct1", tid("t1"))
    ours = make_responder(store)
    site = charons("site")
    site.load([site_conn("t1", fqdn("acct1", tid("t1")))])
    site.initiate(child="net")
    ours.wait(ev.ChildSaInstalled)
    ours.call(ours.engine.delete_tunnel, tid("t1"))
    ours.wait(ev.IkeSaDeleted, reason="local_delete")
    ours.wait(ev.ChildSaDeleted)
    assert site.wait_for(lambda: not site.list_sas(), timeout=8), site.list_sas()
    assert site.log_lines(r"received DELETE for IKE_SA t1")


def test_initial_contact_clears_old_sas(make_responder, charons) -> None:
    """A restarted router connects again with INITIAL_CONTACT: the SAs of its
    previous life are deleted on our side (RFC 7296 §2.4). strongSwan sends
    INITIAL_CONTACT only when it names the peer it expects (remote id not %any)."""
    store = Store()
    store.add("acct1", tid("t1"))
    ours = make_responder(store)
    site = charons("site")
    site.load([site_conn("t1", fqdn("acct1", tid("t1")), remote_id=ANYCAST)])
    site.initiate(child="net")
    (first,) = ours.wait(ev.ChildSaInstalled)
    site.kill()  # dies without DELETE
    site2 = charons("site")
    site2.load([site_conn("t1", fqdn("acct1", tid("t1")), remote_id=ANYCAST)])
    site2.initiate(child="net")
    ours.wait(ev.ChildSaInstalled, count=2)
    assert site2.log_lines(r"generating IKE_AUTH request 1 \[ IDi N\(INIT_CONTACT\)")
    ours.wait(ev.ChildSaDeleted, inbound_spi=first.inbound.spi)
    ours.wait(ev.IkeSaDeleted, reason="initial_contact")


# --- tshark: an independent decoder for our IKE_AUTH ----------------------------

# tshark 4.0's names in the ikev2_decryption_table UAT (packet-isakmp.c value strings).
TSHARK_ENCR = {
    "aes128gcm16": "AES-GCM-128 with 16 octet ICV [RFC5282]",
    "aes256gcm16": "AES-GCM-256 with 16 octet ICV [RFC5282]",
    "aes256": "AES-CBC-256 [RFC3602]",
}
TSHARK_INTEG = {None: "NONE [RFC4306]", "sha256": "HMAC_SHA2_256_128 [RFC4868]"}


def tshark_uat_line(spi_i: str, spi_r: str, keys: dict[str, bytes], proposal: str) -> str:
    parts = proposal.split("-")
    integ = parts[1] if len(parts) == 4 else None
    return ",".join(
        [
            spi_i,
            spi_r,
            keys["sk_ei"].hex(),
            keys["sk_er"].hex(),
            f'"{TSHARK_ENCR[parts[0]]}"',
            keys.get("sk_ai", b"").hex(),
            keys.get("sk_ar", b"").hex(),
            f'"{TSHARK_INTEG[integ]}"',
        ]
    )


def tshark_ike_auth(pcap: str, uat: str) -> list[dict[str, Any]]:
    """Decrypt and dissect the IKE_AUTH messages of ``pcap`` (``tshark -V``):
    one dict per message with its source address, whether the SK payload was
    decrypted, the integrity check verdict, and the dissection text."""
    import re
    import subprocess

    res = subprocess.run(
        [
            "tshark",
            "-r",
            pcap,
            "-o",
            f"uat:ikev2_decryption_table:{uat}",
            "-Y",
            "isakmp.exchangetype == 35",
            "-V",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    out = []
    for frame in re.split(r"(?m)^Frame \d+:", res.stdout)[1:]:
        src = re.search(r"Internet Protocol Version 4, Src: ([\d.]+)", frame)
        out.append(
            {
                "src": src.group(1) if src else None,
                "decrypted": "Decrypted Data" in frame,
                "icd_ok": bool(re.search(r"Integrity Checksum Data: .*\[correct\]", frame)),
                "icd_bad": "[incorrect" in frame,
                "text": frame,
            }
        )
    return out


@pytest.mark.tshark
@pytest.mark.parametrize("responder", ["strongswan", "anywan"])
@pytest.mark.parametrize(
    "proposal", ["aes256gcm16-prfsha384-ecp384", "aes256-sha256-prfsha256-modp2048"]
)
def test_tshark_decrypts_ike_auth(
    topo: Topology, make_responder, charons, tmp_path, responder: str, proposal: str
) -> None:
    """tshark, given the SK_* keys, decrypts both IKE_AUTH messages and
    finds the integrity check correct and the payloads well formed. The
    keys come from strongSwan's level-4 log (independent of our engine); the
    strongSwan-responder run proves the harness, the anywan run checks our
    encoder, padding, ICV and key derivation."""
    gw = topo.namespaces["gw"]
    store = Store()
    store.add("acct1", tid("t1"))
    if responder == "anywan":
        ours = make_responder(store)
    else:
        theirs = Charon(gw, name="gw-strongswan")
        theirs.start()
        gw_ts = Child("net", [CORE_TS], [SITE_TS])
        theirs.load(
            [
                Connection(
                    "t1",
                    ANYCAST,
                    SITE_ADDR,
                    ANYCAST,
                    fqdn("acct1", tid("t1")),
                    PSK,
                    proposals=[proposal],
                    children=[gw_ts],
                )
            ]
        )
    site = Charon(topo.namespaces["site"], name="site-keys", log_levels={"ike": 4})
    pcap = str(tmp_path / "ike.pcap")
    cap = gw.capture("g1", pcap, ["udp", "port", "500", "or", "udp", "port", "4500"])
    try:
        site.start()
        site.load([site_conn("t1", fqdn("acct1", tid("t1")), proposals=proposal)])
        site.initiate(child="net")
        sa = only_sa(site, "t1")
        (keys,) = site.ike_keys()
        if responder == "anywan":
            # OUR keys (control.ike.connection.IkeSa.keys), before the SA goes.
            (ike_sa,) = ours.lt.call(ours.engine.ike_sas, tid("t1"))
            our_keys = {k: getattr(ike_sa.keys, k) for k in keys}
        time.sleep(0.2)
    finally:
        topo.stop(cap)
        print("--- site charon log (tail):\n" + "\n".join(site.log().splitlines()[-60:]))
        site.stop()
        if responder == "strongswan":
            print("--- gw strongSwan log (tail):\n" + "\n".join(theirs.log().splitlines()[-60:]))
            theirs.stop()
    if responder == "anywan":
        # Decrypt with our keys, after checking they are the ones strongSwan
        # derived (SKEYSEED and prf+, RFC 7296 §2.14).
        assert our_keys == keys, "SK_* differ from strongSwan's"
        keys = our_keys
    uat = tshark_uat_line(sa["initiator-spi"], sa["responder-spi"], keys, proposal)
    request, response = tshark_ike_auth(pcap, uat)
    assert request["src"] == SITE_ADDR and response["src"] == ANYCAST
    for msg in (request, response):
        assert msg["decrypted"] and msg["icd_ok"] and not msg["icd_bad"], msg["text"][:3000]
    text = response["text"]
    assert "Authentication Method" in text and "Shared Key Message Integrity Code" in text
    assert "10.200.0.0" in text and "10.1.0.0" in text  # TSr / TSi
    assert "Malformed" not in text and "Expert Info (Error" not in text
    if responder == "anywan":
        (est,) = ours.wait(ev.IkeSaEstablished)
        assert f"{est.spi_i:016x}" == sa["initiator-spi"]


# --- loss: retransmissions both ways (RFC 7296 §2.1) ------------------------------

# In gw: drop the FIRST IKE_AUTH response we send to each peer, and the FIRST
# CREATE_CHILD_SA response each peer sends us. Offsets are from the UDP header
# on port 4500: 8 (UDP) + 4 (non-ESP marker) + 18 = exchange type, + 19 = flags.
LOSS_RULES = """
table ip awloss {
  set auth_seen { type ipv4_addr; flags dynamic; }
  set ccsa_seen { type ipv4_addr; flags dynamic; }
  chain out {
    type filter hook output priority 0;
    udp sport 4500 @th,240,8 35 ip daddr @auth_seen accept
    udp sport 4500 @th,240,8 35 add @auth_seen { ip daddr } counter drop
  }
  chain in {
    type filter hook input priority 0;
    udp dport 4500 @th,240,8 36 @th,250,1 1 ip saddr @ccsa_seen accept
    udp dport 4500 @th,240,8 36 @th,250,1 1 add @ccsa_seen { ip saddr } counter drop
  }
}
"""


def test_lost_messages_are_retransmitted(topo: Topology, make_responder, charons) -> None:
    """Our IKE_AUTH response is lost: strongSwan retransmits its request and
    we answer from the response cache (no second IKE SA, no second Child SA).
    strongSwan's CREATE_CHILD_SA response to our rekey is lost: we retransmit
    our request and strongSwan answers from its cache."""
    gw = topo.namespaces["gw"]
    gw.nft(LOSS_RULES)
    try:
        store = Store()
        store.add("acct1", tid("t1"))
        ours = make_responder(store, retransmit_timeout=0.5)
        site = charons("site")
        site.load([site_conn("t1", fqdn("acct1", tid("t1")))])
        site.initiate(child="net")
        assert site.log_lines(r"retransmit 1 of request with message ID 1\b")
        assert only_sa(site, "t1") and len(installed_children(only_sa(site, "t1"))) == 1
        (first,) = ours.wait(ev.ChildSaInstalled)
        assert len(ours.of(ev.IkeSaEstablished)) == 1

        ours.call(ours.engine.rekey_child, tid("t1"))
        (_, new) = ours.wait(ev.ChildSaInstalled, count=2, timeout=8)
        assert new.replaces == (first.inbound.spi, first.outbound.spi)
        # strongSwan saw our request twice and answered the copy from its cache.
        assert len(site.log_lines(r"received retransmit of request with ID \d+")) >= 1
        ours.wait(ev.ChildSaDeleted, inbound_spi=first.inbound.spi)
        counters = gw.run(["nft", "list", "table", "ip", "awloss"]).stdout
        assert counters.count("counter packets 1 ") == 2, counters
    finally:
        gw.run(["nft", "delete", "table", "ip", "awloss"], check=False)


def test_invalid_ke_payload_and_no_proposal_chosen(make_responder, charons) -> None:
    """strongSwan guesses MODP-1536 for its KE but also offers ECP-384, which
    we prefer: we answer INVALID_KE_PAYLOAD (RFC 7296 §1.2) naming ECP-384 and
    strongSwan retries with it. An offer with nothing we accept gets
    NO_PROPOSAL_CHOSEN."""
    store = Store()
    store.add("acct1", tid("t1"))
    ours = make_responder(store)
    site = charons("site")
    site.load(
        [
            site_conn(
                "ke", fqdn("acct1", tid("t1")), proposals="aes256gcm16-prfsha384-modp1536-ecp384"
            ),
            site_conn(
                "none", fqdn("acct1", tid("t1")), proposals="aes192-sha384-prfsha384-modp3072"
            ),
        ]
    )
    site.initiate(child="net", ike="ke")
    assert site.log_lines(r"peer didn't accept DH group MODP_1536, it requested ECP_384")
    assert only_sa(site, "ke")["dh-group"] == "ECP_384"
    (est,) = ours.wait(ev.IkeSaEstablished)
    assert est.proposal == "aes256gcm16-prfsha384-ecp384"
    with pytest.raises(Exception, match="failed"):
        site.initiate(child="net", ike="none", timeout=8)
    assert site.log_lines(r"received NO_PROPOSAL_CHOSEN notify error")
    assert len(ours.of(ev.IkeSaEstablished)) == 1


def test_several_child_sas_per_tunnel(make_responder, charons) -> None:
    """A second and third Child SA on the same IKE SA (CREATE_CHILD_SA, §1.3.1),
    each with its own selectors, deleted one by one."""
    store = Store()
    store.add("acct1", tid("t1"))
    ours = make_responder(store)
    site = charons("site")
    conn = site_conn("t1", fqdn("acct1", tid("t1")))
    conn.children = [
        Child("net", [SITE_TS], [CORE_TS], ["aes256gcm16"]),
        Child("net2", [SITE_TS], ["10.201.0.0/16"], ["aes128-sha256-modp2048"]),
        Child("net3", [SITE_TS], ["10.202.0.0/16"], ["aes128gcm16"]),
    ]
    site.load([conn])
    site.initiate(child="net")
    site.initiate(child="net2")
    site.initiate(child="net3")
    kids = installed_children(only_sa(site, "t1"))
    assert sorted(k["name"] for k in kids) == ["net", "net2", "net3"]
    installed = ours.wait(ev.ChildSaInstalled, count=3)
    assert len({i.inbound.spi for i in installed}) == 3
    assert all(i.replaces is None for i in installed)
    by_spi = {i.outbound.spi: i for i in installed}
    for kid in kids:
        check_child_matches_records(kid, by_spi[int(kid["spi-in"], 16)])
    net2 = by_spi[int(next(k for k in kids if k["name"] == "net2")["spi-in"], 16)]
    assert [(t.start, t.end) for t in net2.inbound.ts_local] == [("10.201.0.0", "10.201.255.255")]
    site.terminate(child="net2")
    ours.wait(ev.ChildSaDeleted, inbound_spi=net2.inbound.spi)
    assert sorted(k["name"] for k in installed_children(only_sa(site, "t1"))) == ["net", "net3"]
    assert len(ours.of(ev.ChildSaDeleted)) == 1


GARBAGE = r"""
import os, random, socket, struct, sys
dst, spi_i, spi_r = sys.argv[1], bytes.fromhex(sys.argv[2]), bytes.fromhex(sys.argv[3])
rnd = random.Random(7)
s500 = socket.socket(2, 2); s500.bind(("0.0.0.0", 5500))
s4500 = socket.socket(2, 2); s4500.bind(("0.0.0.0", 14500))
for i in range(300):
    body = os.urandom(rnd.randrange(0, 400))
    kind = i % 5
    if kind == 0:
        msg = body
    elif kind == 1:   # an IKE header for the live SA, garbage after it
        msg = spi_i + spi_r + bytes([46, 0x20, rnd.choice([34, 35, 36, 37]), 0x08])
        msg += struct.pack("!II", rnd.randrange(0, 5), 28 + len(body)) + body
    elif kind == 2:   # truncated header
        msg = (spi_i + spi_r + os.urandom(12))[: rnd.randrange(1, 28)]
    elif kind == 3:   # lies about its length
        msg = spi_i + os.urandom(8) + bytes([33, 0x20, 34, 0x08])
        msg += struct.pack("!II", 0, 9999) + body
    elif i % 2 and (i // 10) % 2:  # NAT keepalive (4500)
        msg = b"\xff"
    elif i % 2:  # ESP: a non-zero SPI where the marker would be (4500)
        msg = os.urandom(4) + body
    else:
        msg = os.urandom(rnd.randrange(4, 64))
    if i % 2:
        s4500.sendto(b"\0\0\0\0" + msg if kind != 4 else msg, (dst, 4500))
    else:
        s500.sendto(msg, (dst, 500))
print("sent")
"""


def test_garbage_never_disturbs_a_live_tunnel(topo: Topology, make_responder, charons) -> None:
    """Random, truncated and forged-SPI datagrams on 500 and 4500 next to a
    live IKE SA: nothing escapes the engine, the SA keeps working (a rekey)."""
    store = Store()
    store.add("acct1", tid("t1"))
    ours = make_responder(store)
    site = charons("site")
    site.load([site_conn("t1", fqdn("acct1", tid("t1")))])
    site.initiate(child="net")
    sa = only_sa(site, "t1")
    res = topo.namespaces["site"].run(
        [sys.executable, "-c", GARBAGE, ANYCAST, sa["initiator-spi"], sa["responder-spi"]]
    )
    assert res.stdout.strip() == "sent"
    time.sleep(0.5)
    site.rekey(child="net")
    ours.wait(ev.ChildSaInstalled, count=2)
    assert only_sa(site, "t1")["initiator-spi"] == sa["initiator-spi"]
    stats = dict(ours.transport.stats)
    assert stats.get("engine_error", 0) == 0, stats
    assert stats.get("drop_keepalive", 0) > 0 and stats.get("drop_esp", 0) > 0, stats
    assert not ours.of(ev.IkeSaDeleted)
