"""The SaRecord fast path of ``decode`` agrees with the full validation.

``decode`` takes a straight-line path for well-formed SaRecords (the bus's
hot path) and falls back to the dataclass validation for anything else. Both
are run here on valid records of every transform and on single-field
mutations with hostile values: the results must be equal records, or the
same :class:`RecordError` reason.
"""

from __future__ import annotations

import math

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from replication import records
from replication.records import (
    Cipher,
    Direction,
    Integ,
    RecordError,
    SaRecord,
    TrafficSelector,
    decode,
    decode_checked,
    encode,
)

TUNNEL_ID = "f5407d8db1a542b196c59f6d04ba8bd1"
TRANSFORMS = [
    (Cipher.AES128GCM16, Integ.NONE, 16, 4, 0),
    (Cipher.AES256GCM16, Integ.NONE, 32, 4, 0),
    (Cipher.AES128CBC, Integ.SHA256_128, 16, 0, 32),
    (Cipher.AES256CBC, Integ.SHA1_96, 32, 0, 20),
    (Cipher.NULL, Integ.SHA256_128, 0, 0, 32),
]


def base_map(transform: int = 1, direction: Direction = Direction.IN) -> dict[str, object]:
    cipher, integ, klen, slen, ilen = TRANSFORMS[transform]
    rec = SaRecord(
        account_id="acct-1",
        tunnel_id=TUNNEL_ID,
        spi=0xC0FFEE01,
        direction=direction,
        local_addr="203.0.113.1",
        remote_addr="2001:db8::7",
        udp_encap=True,
        local_port=4500,
        remote_port=31337,
        cipher=cipher,
        integ=integ,
        enc_key=bytes(klen),
        salt=bytes(slen),
        integ_key=bytes(ilen),
        replay_window=64,
        ts_local=(TrafficSelector.from_network("0.0.0.0/0"),),
        ts_remote=(
            TrafficSelector.from_network("10.1.0.0/24"),
            TrafficSelector("10.2.0.1", "10.2.0.9", 6, 80, 443),
        ),
        child_id=7,
        generation=3,
        created=1_700_000_000.5,
        rekey_at=0,
        expire_at=1_700_014_400,
        replaces=0x1234,
    )
    obj = msgpack.unpackb(encode(rec), raw=False)
    assert isinstance(obj, dict)
    return obj


def outcome(decoder: object, data: bytes) -> object:
    try:
        return decoder(data)  # type: ignore[operator]
    except RecordError as exc:
        return ("error", exc.reason)


def assert_same(obj: object) -> object:
    data = msgpack.packb(obj, use_bin_type=True)
    fast, full = outcome(decode, data), outcome(decode_checked, data)
    assert fast == full, (obj, fast, full)
    if isinstance(fast, SaRecord):
        # Equal field by field, the same types (an enum is an enum, a tuple of selectors).
        for name in SaRecord.__slots__:  # type: ignore[attr-defined]
            a, b = getattr(fast, name), getattr(full, name)
            assert type(a) is type(b) and a == b, name
    return fast


@pytest.mark.parametrize("transform", range(len(TRANSFORMS)))
@pytest.mark.parametrize("direction", list(Direction))
def test_valid_records_take_the_fast_path_and_decode_equal(
    transform: int, direction: Direction
) -> None:
    obj = base_map(transform, direction)
    assert records._fast_sa(obj) is not None  # the common shape is really fast-pathed
    rec = assert_same(obj)
    assert isinstance(rec, SaRecord) and encode(rec) == msgpack.packb(obj, use_bin_type=True)
    obj.pop("replaces")  # an older producer that never sets it
    assert_same(obj)


HOSTILE: list[object] = [
    None,
    True,
    False,
    0,
    1,
    -1,
    255,
    256,
    65535,
    65536,
    0xFFFFFFFF,
    2**32,
    2**63 - 1,
    2**63,
    2**64 - 1,
    1.0,
    0.5,
    -0.5,
    math.inf,
    -math.inf,
    math.nan,
    "",
    "in",
    "out",
    "aes256gcm16",
    "aes128",
    "none",
    "sha256_128",
    "10.0.0.1",
    "::1",
    "203.0.113.1\n",
    "x" * 65,
    "acct-1",
    TUNNEL_ID,
    TUNNEL_ID.upper(),
    b"",
    bytes(4),
    bytes(16),
    bytes(20),
    bytes(32),
    [],
    [[]],
    {},
    {"a": 1},
    ["10.0.0.0", "10.0.0.255", 0, 0, 65535],
    [["10.0.0.0", "10.0.0.255", 0, 0, 65535]],
    [["10.0.0.0", "10.0.0.255", True, 0, 65535]],
    [["10.0.0.9", "10.0.0.1", 0, 0, 65535]],
    [["10.0.0.0", "::1", 0, 0, 65535]],
    [["10.0.0.0", "10.0.0.255", 0, 9, 8]],
    [["10.0.0.0", "10.0.0.255", 0, 0, 65535.0]],
    [["10.0.0.0", "10.0.0.255", 256, 0, 65535]],
    [[b"10.0.0.0", "10.0.0.255", 0, 0, 1]],
]


@pytest.mark.parametrize("transform", range(len(TRANSFORMS)))
def test_every_single_field_mutation_agrees(transform: int) -> None:
    base = base_map(transform)
    for name in [*base, "extra", b"spi"]:
        for value in HOSTILE:
            obj = dict(base)
            obj[name] = value
            assert_same(obj)
        obj = dict(base)
        obj.pop(name, None)
        assert_same(obj)


@settings(max_examples=300, deadline=None)
@given(
    transform=st.integers(0, len(TRANSFORMS) - 1),
    changes=st.dictionaries(
        st.sampled_from(list(base_map())),
        st.one_of(
            st.sampled_from(HOSTILE),
            st.integers(-(2**63), 2**64 - 1),
            st.floats(),
            st.text(max_size=8),
            st.binary(max_size=40),
        ),
        max_size=3,
    ),
)
def test_random_multi_field_mutations_agree(transform: int, changes: dict[str, object]) -> None:
    obj = base_map(transform)
    obj.update(changes)
    assert_same(obj)


def test_wrong_schema_is_a_version_error_on_both_paths() -> None:
    obj = base_map()
    obj["schema"] = 2
    assert assert_same(obj) == ("error", "version")


@pytest.mark.parametrize("transform", range(len(TRANSFORMS)))
@pytest.mark.parametrize("direction", list(Direction))
def test_sa_encode_fast_path_gives_the_generic_bytes(transform: int, direction: Direction) -> None:
    rec = decode_checked(msgpack.packb(base_map(transform, direction), use_bin_type=True))
    assert isinstance(rec, SaRecord)
    assert encode(rec) == records.encode_generic(rec)
    # Plain strings where enums go pass validation; they must encode the same.
    plain = SaRecord(
        **{n: getattr(rec, n) for n in SaRecord.__slots__},  # type: ignore[attr-defined]
    )
    object.__setattr__(plain, "direction", direction.value)
    assert encode(plain) == records.encode_generic(plain) == encode(rec)
