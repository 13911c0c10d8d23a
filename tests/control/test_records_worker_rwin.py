"""The record kinds of cluster-wide owner election and replay-window
checkpoints (DESIGN §5): ``worker/<node>/<index>`` and ``rwin/<spi>``."""

from __future__ import annotations

import os

import msgpack
import pytest

from replication.records import (
    SCHEMA,
    RecordError,
    ReplayCheckpoint,
    WorkerRecord,
    decode,
    encode,
)

TID = "0" * 31 + "1"
KEY = os.urandom(32)


def test_worker_record_round_trip_key_and_hidden_secret() -> None:
    rec = WorkerRecord("node-1", 3, "10.99.0.11", 40001, KEY)
    assert rec.key == "worker/node-1/3" and rec.worker_id == "node-1/3"
    assert decode(encode(rec)) == rec
    assert KEY.hex() not in repr(rec) and repr(KEY) not in repr(rec)
    assert "hidden" in repr(rec)


def test_replay_checkpoint_round_trip_and_key() -> None:
    rec = ReplayCheckpoint("acme", TID, 0x2001, 12345)
    assert rec.key == "rwin/00002001"
    assert decode(encode(rec)) == rec


@pytest.mark.parametrize(
    ("kwargs", "detail"),
    [
        ({"node": ""}, "node"),
        ({"node": "a/b"}, "node"),
        ({"node": "x" * 64}, "node"),
        ({"index": 256}, "index"),
        ({"index": -1}, "index"),
        ({"index": True}, "index"),
        ({"handoff_addr": "not-an-ip"}, "handoff_addr"),
        ({"handoff_addr": 167772161}, "handoff_addr"),
        ({"handoff_port": 0}, "handoff_port"),
        ({"handoff_port": 65536}, "handoff_port"),
        ({"handoff_key": b"short"}, "handoff_key"),
        ({"handoff_key": "a" * 32}, "handoff_key"),
    ],
)
def test_worker_record_validation(kwargs: dict[str, object], detail: str) -> None:
    base: dict[str, object] = {
        "node": "n1",
        "index": 0,
        "handoff_addr": "10.0.0.1",
        "handoff_port": 5000,
        "handoff_key": KEY,
    }
    with pytest.raises(RecordError, match=detail):
        WorkerRecord(**{**base, **kwargs})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "detail"),
    [
        ({"top": 0}, "top"),
        ({"top": 1 << 32}, "top"),
        ({"top": 1.5}, "top"),
        ({"spi": 255}, "spi"),
        ({"tunnel_id": "x"}, "tunnel_id"),
        ({"account_id": ""}, "account_id"),
    ],
)
def test_replay_checkpoint_validation(kwargs: dict[str, object], detail: str) -> None:
    base: dict[str, object] = {"account_id": "acme", "tunnel_id": TID, "spi": 0x2001, "top": 9}
    with pytest.raises(RecordError, match=detail):
        ReplayCheckpoint(**{**base, **kwargs})  # type: ignore[arg-type]


def test_decode_rejects_bad_wire_forms() -> None:
    good = msgpack.unpackb(encode(WorkerRecord("n1", 0, "10.0.0.1", 5000, KEY)), raw=False)
    for bad in (
        {**good, "extra": 1},  # unknown field
        {k: v for k, v in good.items() if k != "handoff_key"},  # missing
        {**good, "handoff_port": "5000"},
        {**good, "schema": SCHEMA + 1},
    ):
        with pytest.raises(RecordError):
            decode(msgpack.packb(bad, use_bin_type=True))
