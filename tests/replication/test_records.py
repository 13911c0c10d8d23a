"""Record schema: round trips, all-or-nothing validation, keys stay hidden."""

from __future__ import annotations

import contextlib

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from replication.records import (
    SCHEMA,
    Cipher,
    Direction,
    Integ,
    RecordError,
    RouteRecord,
    SaRecord,
    TrafficSelector,
    TunnelKind,
    TunnelRecord,
    decode,
    encode,
)

TUNNEL_ID = "f5407d8db1a542b196c59f6d04ba8bd1"


def make_sa(**overrides: object) -> SaRecord:
    values: dict[str, object] = dict(
        account_id="123456789",
        tunnel_id=TUNNEL_ID,
        spi=0xC0FFEE01,
        direction=Direction.IN,
        local_addr="203.0.113.1",
        remote_addr="198.51.100.7",
        udp_encap=True,
        local_port=4500,
        remote_port=31337,
        cipher=Cipher.AES256GCM16,
        integ=Integ.NONE,
        enc_key=bytes(range(32)),
        salt=b"\x01\x02\x03\x04",
        integ_key=b"",
        replay_window=0,
        ts_local=(TrafficSelector.from_network("0.0.0.0/0"),),
        ts_remote=(TrafficSelector.from_network("10.1.0.0/24"),),
        child_id=7,
        generation=1,
        created=1_700_000_000.0,
        rekey_at=1_700_014_400.0,
        expire_at=0,
    )
    values.update(overrides)
    return SaRecord(**values)  # type: ignore[arg-type]


def test_sa_round_trip_and_keys() -> None:
    sa = make_sa()
    assert decode(encode(sa)) == sa
    assert sa.key == "sa/in/c0ffee01"
    out = make_sa(direction=Direction.OUT)
    assert out.key == f"sa/out/{TUNNEL_ID}/c0ffee01"


def test_sa_repr_hides_keys() -> None:
    sa = make_sa()
    assert sa.enc_key.hex() not in repr(sa)
    assert repr(sa.enc_key) not in repr(sa)


def test_tunnel_and_route_round_trip() -> None:
    tun = TunnelRecord(
        account_id="acct1",
        tunnel_id=TUNNEL_ID,
        kind=TunnelKind.GRE,
        name="site-c",
        local_addr="203.0.113.1",
        remote_addr="198.51.100.9",
        interface_address="10.200.0.0/31",
        gre_key=42,
    )
    route = RouteRecord("acct1", "ab" * 16, "10.3.0.0/16", TUNNEL_ID, priority=100, weight=50)
    assert decode(encode(tun)) == tun
    assert decode(encode(route)) == route
    assert route.key == "route/" + "ab" * 16


@pytest.mark.parametrize(
    ("overrides", "detail"),
    [
        ({"enc_key": b"short"}, "enc_key length"),
        ({"salt": b""}, "salt length"),
        ({"cipher": Cipher.AES256CBC}, "salt length"),
        ({"cipher": Cipher.AES256CBC, "salt": b"", "integ": Integ.NONE}, "AEAD"),
        ({"spi": 5}, "spi"),
        ({"replay_window": 5000}, "replay_window"),
        ({"ts_local": ()}, "selectors"),
        ({"remote_addr": "not-an-ip"}, "remote_addr"),
        ({"tunnel_id": "XYZ"}, "tunnel_id"),
        ({"salt": "abcd"}, "salt must be bytes"),
        (
            {
                "cipher": Cipher.AES256CBC,
                "salt": b"",
                "integ": Integ.SHA1_96,
                "integ_key": "x" * 20,
            },
            "integ_key must be bytes",
        ),
    ],
)
def test_sa_validation_rejects(overrides: dict[str, object], detail: str) -> None:
    with pytest.raises(RecordError, match=detail):
        make_sa(**overrides)


@pytest.mark.parametrize("value", [167772160, b"\n\x00\x00\x00", True])
def test_addresses_must_be_text(value: object) -> None:
    """ipaddress takes ints and packed bytes too; a record carries text only."""
    with pytest.raises(RecordError, match="interface_address"):
        TunnelRecord("acct1", TUNNEL_ID, TunnelKind.GRE, "n", "203.0.113.1", "198.51.100.9", value)  # type: ignore[arg-type]
    with pytest.raises(RecordError, match="prefix"):
        RouteRecord("acct1", "ab" * 16, value, TUNNEL_ID)  # type: ignore[arg-type]


def _raw(sa: SaRecord) -> dict[str, object]:
    obj = msgpack.unpackb(encode(sa), raw=False)
    assert isinstance(obj, dict)
    return obj


def test_decode_rejects_wrong_schema_unknown_fields_and_garbage() -> None:
    obj = _raw(make_sa())
    with pytest.raises(RecordError) as exc:
        decode(msgpack.packb({**obj, "schema": SCHEMA + 1}))
    assert exc.value.reason == "version"
    with pytest.raises(RecordError) as exc:
        decode(msgpack.packb({**obj, "surprise": 1}))
    assert exc.value.reason == "malformed"
    missing = dict(obj)
    del missing["spi"]
    with pytest.raises(RecordError) as exc:
        decode(msgpack.packb(missing))
    assert exc.value.reason == "malformed"
    with pytest.raises(RecordError) as exc:
        decode(msgpack.packb({**obj, "cipher": "rot13"}))
    assert exc.value.reason == "invalid"
    with pytest.raises(RecordError):
        decode(b"\xc1")


@pytest.mark.parametrize(
    "obj",
    [
        {"schema": SCHEMA, "type": ["sa"]},  # unhashable type name
        {"schema": SCHEMA, "type": {"sa": 1}},
        {"schema": SCHEMA, "type": "route", b"x": 1, "y": 2},  # str and bytes keys
    ],
)
def test_decode_of_hostile_maps_raises_record_error(obj: dict[object, object]) -> None:
    with pytest.raises(RecordError) as exc:
        decode(msgpack.packb(obj, use_bin_type=True))
    assert exc.value.reason == "malformed"


@given(st.binary(max_size=300))
def test_decode_of_random_bytes_only_raises_record_error(data: bytes) -> None:
    with contextlib.suppress(RecordError):
        decode(data)


@given(st.integers(0, 10**6), st.sampled_from(list(Cipher)))
def test_mutated_valid_records_only_raise_record_error(seed: int, cipher: Cipher) -> None:
    aead = cipher in (Cipher.AES128GCM16, Cipher.AES256GCM16)
    key_len = {"aes128gcm16": 16, "aes256gcm16": 32, "aes128": 16, "aes256": 32, "null": 0}
    sa = make_sa(
        cipher=cipher,
        enc_key=bytes(key_len[cipher.value]),
        salt=b"\x00" * 4 if aead else b"",
        integ=Integ.NONE if aead else Integ.SHA256_128,
        integ_key=b"" if aead else bytes(32),
    )
    data = bytearray(encode(sa))
    data[seed % len(data)] ^= 1 + seed % 255
    with contextlib.suppress(RecordError):
        decode(bytes(data))


def test_selector_cache_keeps_validation_strict() -> None:
    """A cached selector with protocol 1 must not let protocol True or 1.0 through."""
    good = TrafficSelector.from_wire(["10.0.0.1", "10.0.0.9", 1, 0, 65535])
    assert TrafficSelector.from_wire(["10.0.0.1", "10.0.0.9", 1, 0, 65535]) is good
    for bad in (True, 1.0):
        with pytest.raises(RecordError):
            TrafficSelector.from_wire(["10.0.0.1", "10.0.0.9", bad, 0, 65535])
    with pytest.raises(RecordError):
        TrafficSelector.from_wire(["10.0.0.1", "10.0.0.9", [1], 0, 65535])  # unhashable
