"""UDP/4500 demultiplexing, RFC 3948 §2.2–2.3."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dataplane.drops import Drop, DropReason
from dataplane.esp import InboundSa, OutboundSa
from dataplane.udpencap import NON_ESP_MARKER, Udp4500, classify, ike_message
from replication.records import Cipher, Integ
from tests.dataplane.test_esp import ipv4_packet, make_record

IKE_HEADER = bytes(8) + bytes(8) + bytes([33, 0x20, 34, 0x08]) + bytes(4) + (28).to_bytes(4, "big")


def test_keepalive() -> None:
    assert classify(b"\xff") is Udp4500.KEEPALIVE


def test_ike_after_marker() -> None:
    payload = NON_ESP_MARKER + IKE_HEADER
    assert classify(payload) is Udp4500.IKE
    assert bytes(ike_message(payload)) == IKE_HEADER


def test_our_esp_is_esp_and_decrypts() -> None:
    rec = make_record(Cipher.AES128GCM16, Integ.NONE)
    packet = OutboundSa.from_record(rec).encapsulate(ipv4_packet(), 4)
    assert classify(packet) is Udp4500.ESP
    assert bytes(InboundSa.from_record(rec).decapsulate(packet)[1]) == ipv4_packet()


@pytest.mark.parametrize(
    "payload",
    [b"", b"\x00", b"\xfe", b"\xff\xff", b"\x00\x00\x00", b"\x00\x00\x00\x00",
     NON_ESP_MARKER + IKE_HEADER[:27], b"\x00\x00\x01\x00\x00\x00\x00"],
)  # fmt: skip
def test_malformed(payload: bytes) -> None:
    with pytest.raises(Drop) as exc:
        classify(payload)
    assert exc.value.reason is DropReason.MALFORMED


def test_ike_message_refuses_esp() -> None:
    with pytest.raises(Drop):
        ike_message(b"\x00\x00\x10\x00" + bytes(30))


@given(st.binary(max_size=64))
@settings(max_examples=300, deadline=None)
def test_any_payload_classifies_or_drops(payload: bytes) -> None:
    try:
        kind = classify(memoryview(payload))
    except Drop as exc:
        assert exc.reason is DropReason.MALFORMED
        return
    if kind is Udp4500.ESP:
        assert payload[:4] != NON_ESP_MARKER and len(payload) >= 8
    elif kind is Udp4500.IKE:
        assert payload[:4] == NON_ESP_MARKER and len(payload) >= 32
    else:
        assert payload == b"\xff"
