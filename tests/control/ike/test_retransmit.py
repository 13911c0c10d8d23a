"""RFC 7296 §2.1 / §2.23: only a true retransmission gets the cached response.

A datagram with a live IKE SA's SPIs and the last Message ID is not
authenticated before we answer it from cache; so the engine answers only a
bitwise copy of the request that produced the response, and from a new
address/port only when NAT is in play. Anything else is dropped and counted.
"""

from __future__ import annotations

from control.ike import events as ev
from control.ike.messages import HEADER_LEN, decode
from control.ike.payloads import ExchangeType

from .pair import CLIENT_IP, NAT_IP, SERVER_IP, TUNNEL, make_pair

ATTACKER = ("192.0.2.66", 19)  # chargen: the classic reflection target


def _last_request(p, exchange: int) -> bytes:
    return next(
        d
        for to_s, d in reversed(p.captured)
        if to_s and decode(d).header.exchange == exchange and not decode(d).header.is_response
    )


def _forge(request: bytes, body: bytes) -> bytes:
    """The request's header (SPIs, Message ID, flags) around ``body``, with the
    header's Length field fixed up so the datagram passes the header check."""
    total = HEADER_LEN + len(body)
    return request[:24] + total.to_bytes(4, "big") + body


def _sent_to(p, target: tuple[str, int]) -> list[bytes]:
    return [d for d, _local, remote in p.server.datagrams_to_send() if remote == target]


def test_forged_old_message_id_with_garbage_body_is_not_answered() -> None:
    p = make_pair()
    p.connect()
    auth = _last_request(p, ExchangeType.IKE_AUTH)  # Message ID 1, the last one answered
    forged = _forge(auth, bytes(len(auth) - HEADER_LEN))  # same header, body zeroed
    for src in (ATTACKER, (CLIENT_IP, 500)):
        p.server.receive_datagram(forged, (SERVER_IP, 500), src, p.now)
        assert not p.server.datagrams_to_send()  # nothing reflected anywhere
    # a truncated copy and a copy with one flipped bit are not retransmissions either
    truncated = _forge(auth, auth[HEADER_LEN:-1])
    p.server.receive_datagram(truncated, (SERVER_IP, 500), (CLIENT_IP, 500), p.now)
    flipped = auth[:-1] + bytes([auth[-1] ^ 1])
    p.server.receive_datagram(flipped, (SERVER_IP, 500), (CLIENT_IP, 500), p.now)
    assert not p.server.datagrams_to_send()
    assert p.server.drops["retransmit_mismatch"] == 4
    assert p.server.drops["retransmit_answered"] == 0
    # the IKE SA is untouched: the genuine copy is still answered, and work goes on
    p.server.receive_datagram(auth, (SERVER_IP, 500), (CLIENT_IP, 500), p.now)
    assert len(_sent_to(p, (CLIENT_IP, 500))) == 1
    assert p.server.drops["retransmit_answered"] == 1
    assert p.client.send_dpd(TUNNEL, p.now)
    p.roundtrip()
    assert not p.events(ev.IkeSaDeleted) and p.server.drops["retransmit_mismatch"] == 4


def test_forged_copy_of_an_informational_request() -> None:
    """The same on a later exchange (the cache then holds an INFORMATIONAL response)."""
    p = make_pair()
    p.connect()
    p.client.send_dpd(TUNNEL, p.now)
    p.roundtrip()
    dpd = _last_request(p, ExchangeType.INFORMATIONAL)
    forged = _forge(dpd, b"\x00" * 1200)  # a body much longer than the real one
    p.server.receive_datagram(forged, (SERVER_IP, 500), ATTACKER, p.now)
    assert not p.server.datagrams_to_send()
    assert p.server.drops["retransmit_mismatch"] == 1


def test_identical_copy_from_another_address_without_nat_is_dropped() -> None:
    """No NAT on this IKE SA: the peer does not move; a replayed copy from
    elsewhere would reflect our response at a third party."""
    p = make_pair()
    p.connect()
    auth = _last_request(p, ExchangeType.IKE_AUTH)
    p.server.receive_datagram(auth, (SERVER_IP, 500), ATTACKER, p.now)
    p.server.receive_datagram(auth, (SERVER_IP, 500), (CLIENT_IP, 501), p.now)
    assert not p.server.datagrams_to_send()
    assert p.server.drops["retransmit_moved"] == 2
    p.server.receive_datagram(auth, (SERVER_IP, 500), (CLIENT_IP, 500), p.now)
    assert len(_sent_to(p, (CLIENT_IP, 500))) == 1


def test_identical_copy_after_a_nat_rebinding_is_answered_at_the_new_port() -> None:
    """§2.23: behind a NAT the same request may come back from a new port."""
    p = make_pair(nat=True)
    p.connect()
    auth = _last_request(p, ExchangeType.IKE_AUTH)
    (e,) = p.events(ev.IkeSaEstablished)
    assert e.nat_detected and e.remote == (NAT_IP, 44500)
    p.server.receive_datagram(auth, (SERVER_IP, 4500), (NAT_IP, 51234), p.now)
    (resp,) = _sent_to(p, (NAT_IP, 51234))
    assert decode(resp).header.exchange == ExchangeType.IKE_AUTH and decode(resp).header.is_response
    assert p.server.drops["retransmit_answered_moved"] == 1
    # but a different body from the new port is still not a retransmission
    forged = _forge(auth, bytes(len(auth) - HEADER_LEN))
    p.server.receive_datagram(forged, (SERVER_IP, 4500), (NAT_IP, 51235), p.now)
    assert not p.server.datagrams_to_send()
    assert p.server.drops["retransmit_mismatch"] == 1
