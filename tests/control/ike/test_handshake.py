"""In-memory initiator↔responder tests: every exchange, both directions, time stepped by hand."""

from __future__ import annotations

import pytest

from control.ike import events as ev
from control.ike.engine import IkeConfig
from control.ike.messages import decode
from control.ike.payloads import ExchangeType, Notify, PayloadType
from control.ike.proposals import (
    ALL_CHILD_SUITES,
    ALL_IKE_SUITES,
    CHILD_SUITES_NO_PFS,
    ChildSuite,
    IkeSuite,
)
from control.ike.state import IkeState
from replication.records import Cipher, Direction, Integ, TrafficSelector
from replication.records import decode as rdecode
from replication.records import encode as rencode

from .pair import (
    ACCOUNT,
    CLIENT_IP,
    NAT_IP,
    PSK,
    SERVER_IP,
    TUNNEL,
    client_tunnel,
    make_pair,
    server_tunnel,
)


def established(p, side: str = "server") -> list[ev.IkeSaEstablished]:
    return p.events(ev.IkeSaEstablished, side)  # type: ignore[return-value]


def installed(p, side: str = "server") -> list[ev.ChildSaInstalled]:
    return p.events(ev.ChildSaInstalled, side)  # type: ignore[return-value]


def assert_pair_matches(p) -> None:
    """The newest Child SA on each side: the server's inbound is the client's outbound."""
    s, c = installed(p)[-1], installed(p, "client")[-1]
    assert s.inbound.spi == c.outbound.spi and s.outbound.spi == c.inbound.spi
    assert s.inbound.enc_key == c.outbound.enc_key and s.inbound.salt == c.outbound.salt
    assert s.inbound.integ_key == c.outbound.integ_key
    assert s.outbound.enc_key == c.inbound.enc_key and s.outbound.integ_key == c.inbound.integ_key
    assert (s.inbound.enc_key + s.inbound.integ_key) != (s.outbound.enc_key + s.outbound.integ_key)
    assert s.inbound.direction is Direction.IN and s.outbound.direction is Direction.OUT
    for rec in (s.inbound, s.outbound):
        assert rdecode(rencode(rec)) == rec  # a valid, publishable record


def test_basic_handshake_events_and_records() -> None:
    p = make_pair()
    p.connect()
    (e,) = established(p)
    assert (e.tunnel_id, e.account_id, e.initiator, e.id_type) == (TUNNEL, ACCOUNT, False, "fqdn")
    assert e.remote == (CLIENT_IP, 500) and not e.nat_detected and not e.udp_encap
    assert e.proposal == "aes128gcm16-prfsha256-ecp384"  # our first preference
    (i,) = installed(p)
    assert i.replaces is None
    assert i.inbound.cipher is Cipher.AES128GCM16 and i.inbound.integ is Integ.NONE
    assert len(i.inbound.salt) == 4 and len(i.inbound.enc_key) == 16
    assert i.inbound.ts_local == (TrafficSelector.from_network("10.0.0.0/8"),)
    assert i.inbound.ts_remote == (TrafficSelector.from_network("192.168.10.0/24"),)
    assert i.inbound.remote_addr == CLIENT_IP and i.inbound.local_addr == SERVER_IP
    assert i.inbound.replay_window == 0 and not i.inbound.udp_encap
    assert i.inbound.key.startswith("sa/in/") and i.outbound.key.startswith(f"sa/out/{TUNNEL}/")
    assert_pair_matches(p)
    assert not p.server.drops and not p.client.drops
    assert p.server.half_open == {}


@pytest.mark.parametrize("suite", ALL_IKE_SUITES, ids=lambda s: s.name)
def test_every_ike_proposal(suite: IkeSuite) -> None:
    """The seeds' IKE matrix (3 encr × 3 DH × 3 PRF): each alone is accepted."""
    p = make_pair()
    p.connect(ike_suites=[suite], child_suites=[CHILD_SUITES_NO_PFS[0]])
    assert [e.proposal for e in established(p)] == [suite.name]
    assert [e.proposal for e in established(p, "client")] == [suite.name]
    assert_pair_matches(p)


CHILD_MATRIX = [s for s in ALL_CHILD_SUITES]


@pytest.mark.parametrize("suite", CHILD_MATRIX, ids=lambda s: s.name)
def test_every_child_proposal_in_auth_and_rekey(suite: ChildSuite) -> None:
    """Every Child combination: first SA from IKE_AUTH (no PFS there, §1.2), then
    a rekey with that PFS group (or none) started by the client."""
    null = suite.encr == 11
    p = make_pair([server_tunnel(allow_null_cipher=True)] if null else None)
    auth_suite = ChildSuite(suite.encr, suite.key_bits, suite.integ, None)
    p.connect(ike_suites=[ALL_IKE_SUITES[0]], child_suites=[auth_suite])
    (i,) = installed(p)
    assert i.inbound.cipher is suite.cipher and i.inbound.integ is suite.integ_alg
    p.client.create_child(TUNNEL, p.now, suites=[suite], pfs_group=suite.dh)
    p.roundtrip()
    assert len(installed(p)) == 2, p.server_events
    assert_pair_matches(p)
    assert p.client.rekey_child(TUNNEL, p.now)
    p.roundtrip()
    assert installed(p)[-1].replaces is not None
    assert_pair_matches(p)


def test_null_refused_unless_tunnel_allows() -> None:
    p = make_pair()
    p.connect(child_suites=[ChildSuite(11, 0, 12, None)])
    assert established(p) and not installed(p)
    (f,) = p.events(ev.NegotiationFailed)
    assert f.notify == "NO_PROPOSAL_CHOSEN" and f.sent
    assert p.events(ev.NegotiationFailed, "client")[0].notify == "NO_PROPOSAL_CHOSEN"


def test_preference_is_ours_not_the_peers() -> None:
    p = make_pair()
    offer = [ALL_IKE_SUITES[-1], ALL_IKE_SUITES[0]]  # cbc/modp1536/sha512 first
    p.connect(ike_suites=offer, ke_group=ALL_IKE_SUITES[0].dh)
    assert established(p)[0].proposal == ALL_IKE_SUITES[0].name


def test_no_ike_proposal_chosen() -> None:
    p = make_pair()
    p.connect(ike_suites=[IkeSuite(12, 128, 12, 5, 20)])  # AES-CBC-128 not for IKE
    assert not established(p)
    assert p.events(ev.NegotiationFailed)[0].notify == "NO_PROPOSAL_CHOSEN"
    assert p.events(ev.NegotiationFailed, "client")[0].notify == "NO_PROPOSAL_CHOSEN"
    assert not p.server.sas and not p.client.sas


def test_invalid_ke_payload_retry() -> None:
    """Client offers 20 and 14 but sends a 14 KE: we want 20 (§1.2), it retries."""
    p = make_pair()
    p.connect(ike_suites=[ALL_IKE_SUITES[0], ALL_IKE_SUITES[3]], ke_group=14)
    assert established(p)[0].proposal.endswith("ecp384")
    inits = [decode(d) for to_s, d in p.captured if not to_s]
    first = inits[0]
    assert first.header.exchange == ExchangeType.IKE_SA_INIT
    n = first.notify(Notify.INVALID_KE_PAYLOAD)
    assert n is not None and n.data == (20).to_bytes(2, "big")
    assert p.server.drops["invalid_ke"] == 1


@pytest.mark.parametrize("kind", ["fqdn", "rfc822", "key_id", "ipv4"])
def test_each_id_type_and_mirrored_idr(kind: str) -> None:
    p = make_pair()
    p.connect(id_kind=kind)
    assert established(p)[0].id_type == kind
    assert established(p, "client")


def test_ipv4_id_needs_unique_endpoint_pair() -> None:
    other = server_tunnel(tunnel_id="0" * 32)  # same customer endpoint, same anycast address
    p = make_pair([server_tunnel(), other])
    p.connect(id_kind="ipv4")
    assert not established(p)
    assert p.events(ev.AuthenticationFailed)[0].reason == "unknown_id"
    # the same two tunnels are fine by FQDN
    p2 = make_pair([server_tunnel(), other])
    p2.connect(id_kind="fqdn")
    assert established(p2)


def test_wrong_psk_leaves_no_state() -> None:
    p = make_pair()
    p.connect(tunnel=client_tunnel(psk=b"not the right key"))
    (f,) = p.events(ev.AuthenticationFailed)
    assert f.reason == "bad_auth" and f.remote == (CLIENT_IP, 500)
    assert "not the right" not in repr(f) and PSK.decode() not in repr(p.server_events)
    assert p.events(ev.AuthenticationFailed, "client")[0].reason == "peer_refused"
    assert not p.server.sas and not p.server.half_open and not p.server.spis_in_use
    assert not installed(p) and not established(p)


def test_unknown_id() -> None:
    p = make_pair()
    p.connect(tunnel=client_tunnel(tunnel_id="a" * 32))
    assert p.events(ev.AuthenticationFailed)[0].reason == "unknown_id"
    assert not p.server.sas


def test_id_suffix_is_configurable() -> None:
    p = make_pair(
        config=IkeConfig(strict=True, id_suffix="ipsec.example.net"),
        client_config=IkeConfig(strict=True, id_suffix="ipsec.example.net"),
    )
    p.connect(id_kind="rfc822")
    assert established(p)
    q = make_pair(config=IkeConfig(strict=True, id_suffix="ipsec.example.net"))
    q.connect(id_kind="rfc822")
    assert not established(q)


def test_ts_narrowing_and_unacceptable() -> None:
    wide = client_tunnel(
        local_ts=(TrafficSelector.from_network("192.168.0.0/16"),),
        remote_ts=(TrafficSelector.from_network("0.0.0.0/0"),),
    )
    p = make_pair()
    p.connect(tunnel=wide)
    rec = installed(p)[0].inbound
    assert rec.ts_remote == (TrafficSelector.from_network("192.168.10.0/24"),)
    assert rec.ts_local == (TrafficSelector.from_network("10.0.0.0/8"),)
    outside = client_tunnel(local_ts=(TrafficSelector.from_network("172.16.0.0/12"),))
    q = make_pair()
    q.connect(tunnel=outside)
    assert established(q) and not installed(q)
    assert q.events(ev.NegotiationFailed)[0].notify == "TS_UNACCEPTABLE"


def test_replay_protection_sets_window() -> None:
    p = make_pair([server_tunnel(replay_protection=True)])
    p.connect()
    assert installed(p)[0].inbound.replay_window == IkeConfig().replay_window


def test_retransmitted_request_gets_cached_response() -> None:
    lost: list[int] = []

    def drop(data: bytes, to_server: bool) -> bool:
        # lose the server's first IKE_AUTH response
        if not to_server and decode(data).header.exchange == ExchangeType.IKE_AUTH and not lost:
            lost.append(1)
            return True
        return False

    p = make_pair(drop=drop)
    p.connect()
    assert established(p) and not established(p, "client")
    p.step(3)  # client retransmits IKE_AUTH after retransmit_timeout
    assert established(p, "client")
    assert p.server.drops["retransmit_answered"] == 1
    assert len(installed(p)) == 1  # no second Child SA from the retransmission
    assert_pair_matches(p)


def test_lost_init_request_is_retransmitted() -> None:
    count = [0]

    def drop(data: bytes, to_server: bool) -> bool:
        count[0] += 1
        return count[0] <= 2 and to_server

    p = make_pair(drop=drop)
    p.connect()
    assert not established(p)
    p.step(10)
    assert established(p) and established(p, "client")
    assert p.client.drops["retransmitted"] >= 2


def test_retransmitted_init_reuses_half_open_sa() -> None:
    p = make_pair(drop=lambda d, to_s: not to_s)  # all responses lost
    p.connect()
    p.step(2.5)
    assert len(p.server.sas) == 1 and p.server.drops["retransmit_answered"] == 1
    p.step(100)  # client gives up; server's half-open SA times out
    assert not p.server.sas and not p.server.half_open and not p.client.sas


def test_cookie_challenge_when_half_open_passes_threshold() -> None:
    p = make_pair(config=IkeConfig(strict=True, cookie_threshold=0))
    p.connect()
    assert established(p) and established(p, "client")
    assert p.server.drops["cookie_sent"] == 1
    first = decode(next(d for to_s, d in p.captured if not to_s))
    assert first.notify(Notify.COOKIE) is not None and first.header.spi_r == bytes(8)


def test_half_open_limits_and_timeout() -> None:
    p = make_pair(
        config=IkeConfig(strict=True, max_half_open_per_peer=2),
        drop=lambda d, to_s: decode(d).header.exchange == ExchangeType.IKE_AUTH,
    )
    for _ in range(3):
        p.connect(ike_suites=[ALL_IKE_SUITES[0]])
    assert len(p.server.half_open) == 2 and p.server.drops["half_open_peer_limit"] == 1
    p.step(IkeConfig().half_open_timeout + 1)
    assert not p.server.half_open and not p.server.sas


def test_rekeys_both_ways_make_before_break() -> None:
    p = make_pair()
    p.connect()
    first = installed(p)[0]
    # client rekeys the Child SA (peer-initiated for the server)
    p.client.rekey_child(TUNNEL, p.now)
    p.roundtrip()
    new = installed(p)[-1]
    assert new.replaces == (first.inbound.spi, first.outbound.spi)
    assert new.inbound.generation == 1 and new.inbound.child_id == first.inbound.child_id
    assert new.inbound.replaces == first.inbound.spi
    assert_pair_matches(p)
    assert not p.events(ev.ChildSaDeleted)  # the old one lives on for a moment
    p.step(IkeConfig().rekey_delete_delay + 0.5)
    deleted = p.events(ev.ChildSaDeleted)
    assert [d.inbound_spi for d in deleted] == [first.inbound.spi]
    assert deleted[0].sa_keys == (first.inbound.key, first.outbound.key)
    # server rekeys: old one kept until rekey_delete_delay, then deleted
    p.server.rekey_child(TUNNEL, p.now)
    p.roundtrip()
    newer = installed(p)[-1]
    assert newer.replaces == (new.inbound.spi, new.outbound.spi)
    assert_pair_matches(p)
    assert len(p.events(ev.ChildSaDeleted)) == 1  # not yet: make-before-break
    p.step(IkeConfig().rekey_delete_delay + 0.5)
    assert [d.inbound_spi for d in p.events(ev.ChildSaDeleted)][-1] == new.inbound.spi
    assert p.events(ev.ChildSaDeleted, "client")[-1].outbound_spi == new.inbound.spi
    # IKE SA rekey both ways: Child SAs move, no Child SA events
    before = len(p.server_events)
    for side in (p.client, p.server):
        assert side.rekey_ike(TUNNEL, p.now)
        p.roundtrip()
    rk = p.events(ev.IkeSaRekeyed)
    assert len(rk) == 2 and rk[1].old_spi_i == rk[0].spi_i
    assert all(isinstance(e, ev.IkeSaRekeyed) for e in p.server_events[before:])
    # whoever rekeyed deletes the old IKE SA after a grace period (§2.18)
    assert len(p.server.sas) == 3
    p.step(IkeConfig().old_ike_sa_grace + 1)
    assert len(p.server.sas) == 1 and len(p.client.sas) == 1
    assert all(isinstance(e, ev.IkeSaRekeyed) for e in p.server_events[before:])
    # the Child SA still works over the new IKE SA (rekey it once more)
    p.client.rekey_child(TUNNEL, p.now)
    p.roundtrip()
    assert_pair_matches(p)


def test_child_rekey_by_timer_with_jitter_and_pfs_hint() -> None:
    cfg = IkeConfig(strict=True, child_lifetime=100, rekey_jitter=0.1, dpd_interval=1000)
    p = make_pair(config=cfg, client_config=IkeConfig(strict=True, child_lifetime=10**6))
    p.connect()
    rec = installed(p)[0].inbound
    assert 1000 + 90 <= rec.rekey_at <= 1000 + 100
    p.step(101)
    assert len(installed(p)) == 2 and installed(p)[-1].replaces is not None
    assert_pair_matches(p)


def test_dpd_answered_and_dead_peer_deleted() -> None:
    cfg = IkeConfig(strict=True, dpd_interval=10, retransmit_timeout=1, retransmit_tries=2)
    p = make_pair(config=cfg, client_config=IkeConfig(strict=True, dpd_interval=1000))
    p.connect()
    p.step(11)
    info = [decode(d) for to_s, d in p.captured if not to_s]
    assert info[-1].header.exchange == ExchangeType.INFORMATIONAL
    assert not p.events(ev.IkeSaDeleted)
    p.drop = lambda d, to_s: True  # the peer vanishes
    p.step(30)
    (gone,) = p.events(ev.IkeSaDeleted)
    assert gone.reason == "dpd"
    assert p.events(ev.ChildSaDeleted)[0].reason == "dpd"
    assert not p.server.sas and p.server.get_timer() is None


def test_delete_child_and_ike_by_peer() -> None:
    p = make_pair()
    p.connect()
    spi = installed(p, "client")[0].inbound.spi
    assert p.client.delete_child(TUNNEL, spi, p.now)
    p.roundtrip()
    (d,) = p.events(ev.ChildSaDeleted)
    assert d.outbound_spi == spi and d.reason == "peer_delete"
    assert p.events(ev.ChildSaDeleted, "client")[0].reason == "local_delete"
    p.client.delete_tunnel(TUNNEL, p.now)
    p.roundtrip()
    assert p.events(ev.IkeSaDeleted)[0].reason == "peer_delete"
    assert not p.server.sas and not p.client.sas


def test_delete_tunnel_from_control() -> None:
    p = make_pair()
    p.connect()
    p.server.delete_tunnel(TUNNEL, p.now)
    p.collect()
    assert p.events(ev.IkeSaDeleted)[0].reason == "local_delete"  # events right away
    assert p.events(ev.ChildSaDeleted)[0].reason == "local_delete"
    p.roundtrip()
    assert not p.server.sas and not p.client.sas
    assert p.events(ev.IkeSaDeleted, "client")[0].reason == "peer_delete"


def test_initial_contact_clears_older_sas() -> None:
    p = make_pair()
    p.connect(initial_contact=False)
    p.connect(initial_contact=False)
    assert len(p.server.ike_sas(TUNNEL)) == 2
    p.connect(initial_contact=True)
    assert len(p.server.ike_sas(TUNNEL)) == 1
    reasons = [e.reason for e in p.events(ev.IkeSaDeleted)]
    assert reasons == ["initial_contact", "initial_contact"]
    assert len(p.events(ev.ChildSaDeleted)) == 2


def test_nat_detected_float_to_4500() -> None:
    p = make_pair(nat=True)
    p.connect()
    (e,) = established(p)
    assert e.nat_detected and e.udp_encap
    assert e.remote == (NAT_IP, 40000 + 4500) and e.local == (SERVER_IP, 4500)
    rec = installed(p)[0].inbound
    assert rec.udp_encap and rec.remote_addr == NAT_IP and rec.remote_port == 44500
    assert rec.local_port == 4500
    # the NAT rebinds the client to another port: records follow (§2.23)
    p.nat_port_base = 50000
    p.client.send_dpd(TUNNEL, p.now)
    p.roundtrip()
    (u,) = p.events(ev.ChildSaUpdated)
    assert u.inbound.remote_port == 54500 and u.outbound.remote_port == 54500


def test_start_on_4500_without_nat_uses_udp_encap() -> None:
    p = make_pair()
    p.connect(local=(CLIENT_IP, 4500))
    (e,) = established(p)
    assert not e.nat_detected and e.udp_encap
    rec = installed(p)[0].outbound
    assert rec.udp_encap and rec.remote_port == 4500 and rec.local_port == 4500


def test_message_id_window_and_stray_messages() -> None:
    p = make_pair()
    p.connect()
    auth = next(d for to_s, d in p.captured if to_s and decode(d).header.message_id == 1)
    # an old request re-sent much later is answered from cache only if it is the last one
    p.client.send_dpd(TUNNEL, p.now)
    p.roundtrip()
    p.server.receive_datagram(auth, (SERVER_IP, 500), (CLIENT_IP, 500), p.now)
    assert p.server.drops["message_id"] == 1
    # a response nobody asked for
    resp = next(d for to_s, d in p.captured if not to_s and decode(d).header.message_id == 2)
    p.server.receive_datagram(resp, (SERVER_IP, 500), (CLIENT_IP, 500), p.now)
    assert p.server.drops["unknown_spi"] == 1  # our own response reflected back


def test_state_after_establish() -> None:
    p = make_pair()
    p.connect()
    (sa,) = p.server.ike_sas(TUNNEL)
    assert sa.state is IkeState.ESTABLISHED
    assert sa.init_request == b"" and sa.kex is None  # handshake material dropped


def test_unsupported_critical_payload_in_init() -> None:
    p = make_pair()
    p.client.initiate(client_tunnel(), local=(CLIENT_IP, 500), remote=(SERVER_IP, 500), now=1.0)
    ((data, _, _),) = p.client.datagrams_to_send()
    # append an unknown payload type 200 with the critical bit at the chain's end
    msg = decode(data)
    last_off = 28
    ptype = msg.header.next_payload
    while True:
        nxt = data[last_off]
        length = int.from_bytes(data[last_off + 2 : last_off + 4], "big")
        if nxt == 0:
            break
        last_off += length
        ptype = nxt
    extra = bytes([0, 0x80, 0, 8]) + b"abcd"
    mutated = bytearray(data + extra)
    mutated[last_off] = 200
    mutated[24:28] = len(mutated).to_bytes(4, "big")
    p.server.receive_datagram(bytes(mutated), (SERVER_IP, 500), (CLIENT_IP, 500), 1.0)
    ((resp, _, _),) = p.server.datagrams_to_send()
    n = decode(resp).notify(Notify.UNSUPPORTED_CRITICAL_PAYLOAD)
    assert n is not None and n.data == bytes([200])
    assert not p.server.sas
    del ptype


def test_unknown_noncritical_payload_ignored() -> None:
    p = make_pair()
    p.client.initiate(client_tunnel(), local=(CLIENT_IP, 500), remote=(SERVER_IP, 500), now=1.0)
    ((data, _, _),) = p.client.datagrams_to_send()
    mutated = bytearray(data[:28]) + bytes([data[16], 0, 0, 8]) + b"wxyz" + data[28:]
    mutated[16] = 201
    mutated[24:28] = len(mutated).to_bytes(4, "big")
    p.server.receive_datagram(bytes(mutated), (SERVER_IP, 500), (CLIENT_IP, 500), 1.0)
    ((resp, _, _),) = p.server.datagrams_to_send()
    assert decode(resp).get(PayloadType.SA) is not None


def test_major_version_3_refused() -> None:
    p = make_pair()
    p.client.initiate(client_tunnel(), local=(CLIENT_IP, 500), remote=(SERVER_IP, 500), now=1.0)
    ((data, _, _),) = p.client.datagrams_to_send()
    mutated = bytearray(data)
    mutated[17] = 0x30
    p.server.receive_datagram(bytes(mutated), (SERVER_IP, 500), (CLIENT_IP, 500), 1.0)
    ((resp, _, _),) = p.server.datagrams_to_send()
    assert decode(resp).notify(Notify.INVALID_MAJOR_VERSION) is not None


def test_export_import_state_keeps_ike_sas_across_restart() -> None:
    """Issue 7: a restarted control node continues the peers' IKE SAs."""
    from control.ike.engine import IkeEngine

    from .pair import make_lookup

    p = make_pair(nat=True)
    p.connect()
    p.client.rekey_child(TUNNEL, p.now)
    p.roundtrip()
    p.step(IkeConfig().rekey_delete_delay + 1)  # the client deletes the old Child SA
    before = installed(p)[-1]
    blob = p.server.export_state()
    assert PSK not in blob
    # control restarts: a new engine, a different monotonic clock
    p.server = IkeEngine(IkeConfig(strict=True), make_lookup([server_tunnel()]))
    p.now += 5000.0
    p.server.import_state(blob, p.now)
    assert len(p.server.ike_sas(TUNNEL)) == 1
    (sa,) = p.server.ike_sas(TUNNEL)
    assert abs(sa.created - (1000.0 + 5000.0)) <= 5  # re-based on the new clock
    (child,) = sa.children.values()
    assert child.records == (before.inbound, before.outbound) or child.spi_in == before.inbound.spi
    # the peer's next requests are understood: DPD, rekeys both ways, delete
    p.client.send_dpd(TUNNEL, p.now)
    p.roundtrip()
    assert not p.server.drops
    p.client.rekey_child(TUNNEL, p.now)
    p.roundtrip()
    assert_pair_matches(p)
    p.server.rekey_child(TUNNEL, p.now)
    p.roundtrip()
    assert_pair_matches(p)
    p.server.rekey_ike(TUNNEL, p.now)
    p.roundtrip()
    p.step(IkeConfig().old_ike_sa_grace + 1)
    p.client.delete_tunnel(TUNNEL, p.now)
    p.roundtrip()
    assert not p.server.sas and p.events(ev.IkeSaDeleted)[-1].reason == "peer_delete"
    # garbage is ignored, not raised
    p.server.import_state(b"\x93garbage", p.now)
    assert p.server.drops["bad_state_blob"] == 1


@pytest.mark.parametrize("seed", range(6))
def test_simultaneous_child_rekey_collision(seed: int) -> None:
    """§2.8.1: both sides rekey the same Child SA at once; one new SA survives on both."""
    p = make_pair()
    p.connect()
    old = installed(p)[0]
    assert p.client.rekey_child(TUNNEL, p.now)
    assert p.server.rekey_child(TUNNEL, p.now)
    p.roundtrip()
    p.step(10)
    (s_sa,) = p.server.ike_sas(TUNNEL)
    (c_sa,) = p.client.ike_sas(TUNNEL)
    s_live = {c.spi_in: c for c in s_sa.children.values()}
    c_live = {c.spi_in: c for c in c_sa.children.values()}
    assert len(s_live) == 1 and len(c_live) == 1, (s_live, c_live)
    (s_child,) = s_live.values()
    (c_child,) = c_live.values()
    assert s_child.spi_in == c_child.spi_out and s_child.spi_out == c_child.spi_in
    assert s_child.keys_in == c_child.keys_out and s_child.keys_out == c_child.keys_in
    assert old.inbound.spi not in s_live
    assert p.server.drops["rekey_collision"] + p.client.drops["rekey_collision"] == 2
    del seed


def test_strongswan_like_extras_are_ignored_politely() -> None:
    """What strongSwan 5.9 adds: status notifies we do not act on, vendor IDs, a CP
    request, an IDr, several proposals — none of it may stop the handshake."""
    from control.ike.payloads import IdPayload, NotifyPayload, Payload, RawPayload, VendorPayload

    def n(t: int, data: bytes = b"") -> Payload:
        return Payload(PayloadType.NOTIFY, NotifyPayload(t, data))

    init = [
        Payload(PayloadType.VENDOR, VendorPayload(b"strongSwan-ish")),
        n(16430),  # IKEV2_FRAGMENTATION_SUPPORTED
        n(16431, b"\x00\x01\x00\x02\x00\x03\x00\x04"),  # SIGNATURE_HASH_ALGORITHMS
        n(16406),  # REDIRECT_SUPPORTED
    ]
    auth = [
        Payload(PayloadType.IDR, IdPayload(1, bytes([203, 0, 113, 1]))),
        Payload(PayloadType.CP, RawPayload(b"\x01\x00\x00\x00\x00\x01\x00\x00")),
        n(16394),  # ESP_TFC_PADDING_NOT_SUPPORTED
        n(16395),  # NON_FIRST_FRAGMENTS_ALSO
        n(16396),  # MOBIKE_SUPPORTED
        n(16397, bytes(4)),  # ADDITIONAL_IP4_ADDRESS
        n(16417),  # EAP_ONLY_AUTHENTICATION
        n(16422),  # MESSAGE_ID_SYNC_SUPPORTED
    ]
    p = make_pair()
    p.connect(extra_payloads={"init": init, "auth": auth}, ike_suites=ALL_IKE_SUITES[::-1])
    assert established(p) and installed(p) and established(p, "client")
    resp = [decode(d) for to_s, d in p.captured if not to_s]
    # we echo the IDr the peer asked for, and never announce fragmentation
    assert all(m.notify(16430) is None for m in resp)


def test_child_limits_and_unknown_rekey() -> None:
    p = make_pair(config=IkeConfig(strict=True, max_child_sas=2))
    p.connect()
    assert p.client.create_child(TUNNEL, p.now)
    p.roundtrip()
    assert p.client.create_child(TUNNEL, p.now)
    p.roundtrip()
    assert len(installed(p)) == 2
    assert p.events(ev.NegotiationFailed, "client")[-1].notify == "NO_ADDITIONAL_SAS"
    # rekeying a Child SA the server does not know → CHILD_SA_NOT_FOUND
    (c_sa,) = p.client.ike_sas(TUNNEL)
    child = next(iter(c_sa.children.values()))
    child.spi_in = 0x12345678  # what the client will name in REKEY_SA
    c_sa.children = {child.spi_in: child}
    assert p.client.rekey_child(TUNNEL, p.now)
    p.roundtrip()
    assert p.events(ev.NegotiationFailed, "client")[-1].notify == "CHILD_SA_NOT_FOUND"


def test_simultaneous_ike_rekey_converges() -> None:
    """§2.8.2 collision: both sides rekey the IKE SA at once; one IKE SA survives."""
    cfg = IkeConfig(strict=True, ike_lifetime=100, rekey_jitter=0.0, dpd_interval=1e6)
    p = make_pair(config=cfg, client_config=IkeConfig(strict=True, dpd_interval=1e6))
    p.connect()
    assert p.client.rekey_ike(TUNNEL, p.now)
    assert p.server.rekey_ike(TUNNEL, p.now)
    p.roundtrip()
    p.step(200)
    p.step(IkeConfig().old_ike_sa_grace + 1)
    (s_sa,) = p.server.ike_sas(TUNNEL)
    (c_sa,) = p.client.ike_sas(TUNNEL)
    assert (s_sa.spi_i, s_sa.spi_r) == (c_sa.spi_i, c_sa.spi_r)
    assert len(s_sa.children) == 1 and len(c_sa.children) == 1
    assert p.client.rekey_child(TUNNEL, p.now)
    p.roundtrip()
    assert_pair_matches(p)
    assert not p.events(ev.IkeSaDeleted)


def test_due_deadlines_move_while_requests_queue_up() -> None:
    """Several rekeys due while a request is unanswered: get_timer() stays in the
    future (the pair's step() asserts it) and the peer is finally declared dead."""
    cfg = IkeConfig(
        strict=True, child_lifetime=20, ike_lifetime=25, dpd_interval=5, retransmit_timeout=2
    )
    p = make_pair(config=cfg, client_config=IkeConfig(strict=True, dpd_interval=1e6))
    p.connect()
    p.client.create_child(TUNNEL, p.now)
    p.roundtrip()
    assert len(installed(p)) == 2
    p.drop = lambda d, to_s: True
    p.step(200)
    assert p.events(ev.IkeSaDeleted)[0].reason in ("dpd", "timeout")
    assert not p.server.sas and p.server.get_timer() is None


def test_a_deadline_a_failing_handler_left_behind_is_retried_not_spun(monkeypatch) -> None:
    """handle_timer(now) leaves get_timer() after now even when the handler of a
    due deadline fails (non-strict: counted), so a transport re-arming at
    get_timer() cannot spin; the IKE SA is retried every STUCK_TIMER_RETRY."""
    from control.ike.connection import IkeSa
    from control.ike.engine import STUCK_TIMER_RETRY

    p = make_pair(config=IkeConfig(dpd_interval=5.0))
    p.connect()

    def broken(self: IkeSa, now: float) -> None:
        raise RuntimeError("a bug in a timer handler")

    monkeypatch.setattr(IkeSa, "on_timer", broken)
    engine, now, calls = p.server, p.now, 0
    for _ in range(1000):  # what a transport does, with no guard of its own
        t = engine.get_timer()
        if t is None or t > p.now + 20:
            break
        now = max(now, t)
        engine.handle_timer(now)
        calls += 1
        assert engine.get_timer() is None or engine.get_timer() > now  # type: ignore[operator]
    # DPD due at +5, then one retry per second up to +20
    assert calls <= 1 + (20 - 5) / STUCK_TIMER_RETRY + 1, calls
    assert engine.drops["timer_stuck"] == calls and engine.drops["internal_error"] == calls
