"""The payload codec: round trips, bounds, and scapy's independent IKEv2 parser."""

from __future__ import annotations

import ipaddress

import pytest
from scapy.contrib import ikev2 as scapy_ike

from control.ike import messages as wire
from control.ike.payloads import (
    AuthPayload,
    Buffer,
    BufferReadError,
    DeletePayload,
    IdPayload,
    KePayload,
    NoncePayload,
    NotifyPayload,
    Payload,
    PayloadType,
    Proposal,
    RawPayload,
    SaPayload,
    Selector,
    Transform,
    TsPayload,
    VendorPayload,
)

from .pair import CLIENT_IP, SERVER_IP, client_tunnel, make_pair


def test_buffer_bounds() -> None:
    b = Buffer(b"\x01\x02\x03")
    assert b.pull_uint16() == 0x0102
    with pytest.raises(BufferReadError):
        b.pull_uint16()
    assert b.pull_uint8() == 3 and b.eof()
    with pytest.raises(BufferReadError):
        b.pull_bytes(1)
    with pytest.raises(BufferReadError):
        Buffer(b"ab", 0, 3)


def sample_payloads() -> list[Payload]:
    v4 = ipaddress.IPv4Address
    v6 = ipaddress.IPv6Address
    return [
        Payload(
            PayloadType.SA,
            SaPayload(
                [
                    Proposal(1, 1, b"", [Transform(1, 20, 256), Transform(2, 5), Transform(4, 20)]),
                    Proposal(2, 3, b"\x01\x02\x03\x04", [Transform(1, 12, 128), Transform(5, 0)]),
                ]
            ),
        ),
        Payload(PayloadType.KE, KePayload(14, b"\x05" * 256)),
        Payload(PayloadType.NONCE, NoncePayload(b"n" * 32)),
        Payload(PayloadType.IDI, IdPayload(2, b"host.example")),
        Payload(PayloadType.AUTH, AuthPayload(2, b"a" * 32)),
        Payload(PayloadType.NOTIFY, NotifyPayload(16393, b"", 3, b"\x00\x00\x01\x00")),
        Payload(PayloadType.DELETE, DeletePayload(3, [b"\x00\x00\x01\x00", b"\x00\x00\x02\x00"])),
        Payload(PayloadType.VENDOR, VendorPayload(b"vendor")),
        Payload(
            PayloadType.TSI,
            TsPayload(
                [
                    Selector(7, 0, 0, 65535, v4("10.0.0.0"), v4("10.255.255.255")),
                    Selector(8, 6, 80, 80, v6("2001:db8::"), v6("2001:db8::ffff")),
                ]
            ),
        ),
        Payload(PayloadType.CP, RawPayload(b"\x01\x00\x00\x00\x00\x01\x00\x00")),
    ]


def test_roundtrip_every_payload() -> None:
    payloads = sample_payloads()
    data = wire.encode(
        spi_i=b"i" * 8, spi_r=b"r" * 8, exchange=34, flags=8, message_id=0, payloads=payloads
    )
    msg = wire.decode(data)
    assert [p.type for p in msg.payloads] == [p.type for p in payloads]
    assert [p.body for p in msg.payloads] == [p.body for p in payloads]
    assert msg.header.length == len(data) and msg.header.from_initiator


@pytest.mark.parametrize("cut", [1, 5, 27, 29, 40, 100])
def test_truncated_and_bad_lengths_raise(cut: int) -> None:
    data = wire.encode(
        spi_i=b"i" * 8,
        spi_r=b"r" * 8,
        exchange=34,
        flags=8,
        message_id=0,
        payloads=sample_payloads(),
    )
    short = bytearray(data[:-cut])
    short[24:28] = len(short).to_bytes(4, "big")
    with pytest.raises(wire.MessageError):
        wire.decode(bytes(short))
    with pytest.raises(wire.MessageError):
        wire.decode(data[:-cut])  # header length mismatch


def test_scapy_parses_our_ike_sa_init_both_ways() -> None:
    """scapy.contrib.ikev2 as an independent parser of our IKE_SA_INIT request/response."""
    p = make_pair()
    p.client.initiate(client_tunnel(), local=(CLIENT_IP, 500), remote=(SERVER_IP, 500), now=1.0)
    ((req, _, _),) = p.client.datagrams_to_send()
    p.server.receive_datagram(req, (SERVER_IP, 500), (CLIENT_IP, 500), 1.0)
    ((resp, _, _),) = p.server.datagrams_to_send()
    for data, flags in ((req, 0x08), (resp, 0x20)):
        pkt = scapy_ike.IKEv2(data)
        assert pkt.exch_type == 34 and int(pkt.flags) == flags and pkt.length == len(data)
        sa = pkt[scapy_ike.IKEv2_SA]
        ours = wire.decode(data).get(PayloadType.SA)
        assert isinstance(ours, SaPayload)
        prop = sa.prop
        n = 0
        while isinstance(prop, scapy_ike.IKEv2_Proposal):
            n += 1
            trans = prop.trans
            ids = []
            while isinstance(trans, scapy_ike.IKEv2_Transform):
                ids.append((trans.transform_type, trans.transform_id))
                trans = trans.payload
            assert ids == [(t.type, t.id) for t in ours.proposals[n - 1].transforms]
            prop = prop.payload
        assert n == len(ours.proposals)
        ke = pkt[scapy_ike.IKEv2_KE]
        ours_ke = wire.decode(data).get(PayloadType.KE)
        assert isinstance(ours_ke, KePayload)
        assert ke.group == ours_ke.group == 20 and bytes(ke.ke) == ours_ke.data
        assert len(bytes(pkt[scapy_ike.IKEv2_Nonce].nonce)) == 32
        types = []
        layer = pkt[scapy_ike.IKEv2_Notify]
        while isinstance(layer, scapy_ike.IKEv2_Notify):
            types.append(layer.type)
            layer = layer.payload
        assert types == [16388, 16389]  # NAT_DETECTION_SOURCE_IP / DESTINATION_IP
    # we never announce IKE fragmentation (RFC 7383) since we do not implement it
    assert b"\x40\x2e" not in resp[28:]


def test_scapy_built_message_parses() -> None:
    """A message built by scapy (not by us) decodes with the same content."""
    pkt = (
        scapy_ike.IKEv2(init_SPI=b"A" * 8, resp_SPI=b"\x00" * 8, exch_type=34, flags="Initiator")
        / scapy_ike.IKEv2_Nonce(nonce=b"x" * 24)
        / scapy_ike.IKEv2_Notify(type=16430)
    )
    data = bytes(pkt)
    msg = wire.decode(data)
    nonce = msg.get(PayloadType.NONCE)
    assert isinstance(nonce, NoncePayload) and nonce.nonce == b"x" * 24
    assert [n.type for n in msg.notifies()] == [16430]
