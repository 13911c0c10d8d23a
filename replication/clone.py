"""The Clone-pattern subscriber as a sans-IO state machine, and the bus wire format.

zguide chapter 5 ("Reliable Pub-Sub: Clone pattern"): a subscriber asks the
publisher's snapshot socket for the whole state, buffers the update stream
meanwhile, and applies the buffered updates whose sequence is past the
snapshot's. This module does that with no socket and no clock: frames and
``now`` in; events (records changed, "send this snapshot request", "send this
ack") out; one deadline from :meth:`CloneClient.get_timer`. ``subscriber.py``
is the thin ZeroMQ shell around it; ``forwarder.py`` reuses it.

Wire format (every message is a ZeroMQ multipart message; ``HDR`` is two
big-endian u64: the publisher's epoch and a sequence number)::

    snapshot request  DEALER→ROUTER  [b"ICANHAZ?", worker_id, req_id u64]
    snapshot chunk    ROUTER→DEALER  [b"KVS", req_id u64, msgpack([key, value, key, value, ...])]
    snapshot end      ROUTER→DEALER  [b"KTHXBAI", req_id u64, HDR(epoch, seq), count u64]
    update            PUB            [b"UPD", HDR(epoch, seq), key utf-8, value]  (b"" = tombstone)
    heartbeat         PUB            [b"HUGZ", HDR(epoch, last published seq)]
    ack               PUSH→PULL      [b"ACK", worker_id, HDR(epoch, applied seq)(, report)]
    goodbye           PUSH→PULL      [b"BYE", worker_id]   (clean stop: no longer counted live)

Sequences are bus-wide and gap-free within one epoch; the epoch is a random
64-bit number drawn at each publisher start. A subscriber re-snapshots when
it sees another epoch (publisher restart), a gap (an update past ``seq+1`` or
a heartbeat announcing a sequence it never got), or a silent stream for
``heartbeat_timeout``.

Beyond the zguide's clonecli: the subscriber waits for a first stream message
before asking for the snapshot (the publisher's XPUB answers every new
subscription with a heartbeat at once), so no update published between the
snapshot and the subscription taking effect can slip by; heartbeats carry
the last published sequence, so even the loss of the *last* update is a gap
seen within one heartbeat; snapshot requests carry an id, and a stale reply is
ignored; acks give the publisher make-before-break ("applied everywhere").

Reports: an ack may carry a fourth frame, a msgpack map of at most
:data:`MAX_REPORT_BYTES` (a worker's telemetry: per-SA counters, sequence
checkpoints). :meth:`CloneClient.set_report` stores the newest one and the next
ack takes it (then it is cleared: the reporter sends a fresh one each flush).
A report is latest-state, not a log: a lost ack loses nothing the next one
does not carry. The publisher keeps the newest valid report per subscriber
(:func:`parse_report`); a frame that is too big, not msgpack or not a map is
dropped and counted, the ack itself still counts.

Atomicity: while a (re-)snapshot is in flight the old state stays in force.
When it completes, the new state replaces the old in one step and only real
differences are reported: :class:`RecordChanged` for new or changed values,
then :class:`RecordRemoved` for keys truly gone. So a restarted publisher
holding the same records causes no callbacks at all, and SAs never vanish.
Values are compared as encoded bytes (msgpack encoding is deterministic).

Rejection: a value that does not decode (:class:`~replication.records.RecordError`:
malformed, unknown schema version, invalid field) or whose record key differs
from its bus key is counted (:class:`Rejected`) and not applied; the key keeps
its previous value, whether the value came in an update or a snapshot.
"""

from __future__ import annotations

import math
import struct
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

import msgpack

from replication.records import Record, RecordError, decode

ICANHAZ = b"ICANHAZ?"
KVS = b"KVS"
KTHXBAI = b"KTHXBAI"
UPD = b"UPD"
HUGZ = b"HUGZ"
ACK = b"ACK"
BYE = b"BYE"

HDR = struct.Struct(">QQ")
"""(epoch, sequence)."""
U64 = struct.Struct(">Q")

MAX_WORKER_ID = 200
"""Bytes of UTF-8; a worker id is also a ZeroMQ routing id (< 256 bytes)."""

MAX_REPORT_BYTES = 64 * 1024
"""Largest report frame an ack may carry (encoded)."""


def poll_timeout_ms(deadline: float, now: float) -> int:
    """Milliseconds to poll until ``deadline``, rounded up: pyzmq truncates a
    float timeout, and 0.4 ms becoming 0 would spin until the deadline."""
    return max(0, math.ceil((deadline - now) * 1000))


def check_worker_id(worker_id: str) -> bytes:
    raw = worker_id.encode("utf-8") if isinstance(worker_id, str) else b""
    if not raw or len(raw) > MAX_WORKER_ID or raw[0] == 0:
        raise ValueError("worker_id must be 1-200 bytes of UTF-8 not starting with NUL")
    return raw


# --- wire builders, shared by the publisher side ---------------------------------


def update_frames(epoch: int, seq: int, key: str, value: bytes) -> list[bytes]:
    return [UPD, HDR.pack(epoch, seq), key.encode("utf-8"), value]


def heartbeat_frames(epoch: int, seq: int) -> list[bytes]:
    return [HUGZ, HDR.pack(epoch, seq)]


def snapshot_chunks(
    req_id: bytes, items: Iterable[tuple[str, bytes]], chunk: int = 1000
) -> Iterable[list[bytes]]:
    """KVS messages carrying ``chunk`` pairs each (one msgpack array per message)."""
    flat: list[str | bytes] = []
    for key, value in items:
        flat.append(key)
        flat.append(value)
        if len(flat) >= 2 * chunk:
            yield [KVS, req_id, msgpack.packb(flat, use_bin_type=True)]
            flat = []
    if flat:
        yield [KVS, req_id, msgpack.packb(flat, use_bin_type=True)]


def snapshot_end_frames(req_id: bytes, epoch: int, seq: int, count: int) -> list[bytes]:
    return [KTHXBAI, req_id, HDR.pack(epoch, seq), U64.pack(count)]


def encode_report(report: Mapping[Any, Any]) -> bytes:
    """A report frame; ValueError if it is not a map or over :data:`MAX_REPORT_BYTES`."""
    if not isinstance(report, Mapping):
        raise ValueError("a report is a map")
    data: bytes = msgpack.packb(dict(report), use_bin_type=True)
    if len(data) > MAX_REPORT_BYTES:
        raise ValueError(f"report of {len(data)} bytes exceeds {MAX_REPORT_BYTES}")
    return data


def parse_report(frames: list[bytes]) -> tuple[dict[Any, Any] | None, str | None]:
    """The report an ACK carries: ``(report, None)``; ``(None, None)`` if it
    carries none; ``(None, reason)`` if the frame is unusable (``reason`` is
    ``oversized`` or ``malformed``, a metric label)."""
    if len(frames) != 4:
        return None, None
    raw = frames[3]
    if len(raw) > MAX_REPORT_BYTES:
        return None, "oversized"
    try:
        obj = msgpack.unpackb(raw, raw=False, strict_map_key=False)
    except Exception:  # msgpack raises several unrelated types (and RecursionError)
        return None, "malformed"
    if not isinstance(obj, dict):
        return None, "malformed"
    return obj, None


def parse_ack(frames: list[bytes]) -> tuple[str, int, int] | None:
    """(worker_id, epoch, seq) of an ACK (with or without a report), or None."""
    if len(frames) not in (3, 4) or frames[0] != ACK or len(frames[2]) != HDR.size:
        return None
    try:
        worker = frames[1].decode("utf-8")
    except UnicodeDecodeError:
        return None
    if not 0 < len(frames[1]) <= MAX_WORKER_ID:
        return None
    epoch, seq = HDR.unpack(frames[2])
    return worker, epoch, seq


def bye_frames(worker_id: str) -> list[bytes]:
    return [BYE, check_worker_id(worker_id)]


def parse_snapshot_request(frames: list[bytes]) -> tuple[str, bytes] | None:
    """(worker_id, req_id) of an ICANHAZ? (after the ROUTER identity), or None."""
    if len(frames) != 3 or frames[0] != ICANHAZ or len(frames[2]) != U64.size:
        return None
    try:
        worker = frames[1].decode("utf-8")
    except UnicodeDecodeError:
        return None
    return worker, frames[2]


# --- events ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RequestSnapshot:
    """Open a fresh snapshot connection and send ``frames`` on it.

    A fresh socket per request, so a reply to an abandoned request can never
    be mistaken for this one (the request id checks that too)."""

    frames: list[bytes]
    reason: str


@dataclass(frozen=True, slots=True)
class SendAck:
    """Report our applied sequence to the publisher (at most one per ``ack_interval``)."""

    frames: list[bytes]


@dataclass(frozen=True, slots=True)
class RecordChanged:
    """A new or changed record is now in :attr:`CloneClient.state`."""

    key: str
    record: Record
    old: Record | None


@dataclass(frozen=True, slots=True)
class RecordRemoved:
    """A key was deleted (tombstone) or is absent from a newer snapshot."""

    key: str
    old: Record


@dataclass(frozen=True, slots=True)
class SnapshotInstalled:
    """A snapshot replaced the state; ``raw`` is the state's encoded values at
    ``seq`` (a private copy, or None unless ``keep_raw`` was asked for)."""

    epoch: int
    seq: int
    changed: int
    removed: int
    raw: dict[str, bytes] | None


@dataclass(frozen=True, slots=True)
class Sequenced:
    """An update consumed in order (applied or rejected); for a forwarder to
    pass on unchanged so its own subscribers see the same sequence."""

    epoch: int
    seq: int
    key: str
    value: bytes


@dataclass(frozen=True, slots=True)
class Rejected:
    """A record or frame that was not applied; ``reason`` is a metric label."""

    key: str
    reason: str


@dataclass(frozen=True, slots=True)
class ResnapshotStarted:
    """We asked for a (new) snapshot; ``reason`` in metrics.RESNAPSHOT_REASONS."""

    reason: str


@dataclass(frozen=True, slots=True)
class GapDetected:
    expected: int
    got: int


@dataclass(frozen=True, slots=True)
class HeartbeatMissed:
    silent_for: float


Event = (
    RequestSnapshot
    | SendAck
    | RecordChanged
    | RecordRemoved
    | SnapshotInstalled
    | Sequenced
    | Rejected
    | ResnapshotStarted
    | GapDetected
    | HeartbeatMissed
)


class Phase(Enum):
    IDLE = "idle"
    """Not started."""
    CONNECTING = "connecting"
    """Subscribed, waiting for the first stream message (proof the subscription
    is in place, so nothing published after the snapshot can be missed)."""
    SNAPSHOTTING = "snapshotting"
    """Snapshot requested; the stream is buffered, the old state still serves."""
    LIVE = "live"
    """Applying the stream in sequence."""


# --- the state machine -----------------------------------------------------------


class CloneClient:
    """One subscriber's view of the bus. Not thread-safe: one owner thread.

    :param worker_id: reported in snapshot requests and acks.
    :param heartbeat_timeout: seconds of stream silence (no update, no
        heartbeat) after which we re-snapshot; also how long CONNECTING waits
        for a first stream message before asking for a snapshot anyway.
    :param snapshot_timeout: seconds without any snapshot chunk before the
        request is abandoned and sent again on a fresh connection.
    :param ack_interval: minimum seconds between two acks; applied updates
        within it are reported together (0 = one ack per drained batch). An
        update after a quiet spell is acked at once, so a lone rekey's
        make-before-break wait is not delayed; under a steady stream each
        subscriber acks every ``ack_interval`` (each ack costs the publisher
        ~0.1 ms of CPU: 16 workers acking every 10 ms took 0.15 of a core).
    :param keep_raw: emit :class:`Sequenced` and a raw copy in
        :class:`SnapshotInstalled` (a forwarder needs them; workers do not).
    :param max_buffer: stream messages buffered during a snapshot before we
        give up on it and start over (bounded memory under a flood).
    :param gate_acks: acks report only what the application has confirmed
        (:meth:`confirm`), not what this core handed it. A worker applies
        records in its packet loop, after its bus thread has queued them; the
        publisher's "applied everywhere" (which holds back an IKE answer
        until every worker can decrypt with the new SA) must mean the loop
        has them. Updates then ask for an ack only when confirmed (an ack
        sent at receipt would carry nothing new and push the confirmed one
        ``ack_interval`` later); heartbeats still ask, so a worker whose
        loop is stuck keeps acking, visibly behind.
    """

    def __init__(
        self,
        worker_id: str,
        *,
        heartbeat_timeout: float = 2.0,
        snapshot_timeout: float | None = None,
        keep_raw: bool = False,
        ack_interval: float = 0.05,
        max_buffer: int = 1_000_000,
        decoder: Callable[[bytes], Record] = decode,
        gate_acks: bool = False,
    ) -> None:
        self.worker_id = worker_id
        self._wid = check_worker_id(worker_id)
        if heartbeat_timeout <= 0:
            raise ValueError("heartbeat_timeout must be > 0")
        self.heartbeat_timeout = heartbeat_timeout
        self.snapshot_timeout = snapshot_timeout if snapshot_timeout else heartbeat_timeout
        self.keep_raw = keep_raw
        self.ack_interval = ack_interval
        self.max_buffer = max_buffer
        self._decode = decoder

        self.phase = Phase.IDLE
        self.state: dict[str, Record] = {}
        """Key → record, updated in place (readers in other threads see whole values)."""
        self.raw: dict[str, bytes] = {}
        """Key → encoded value of what is in :attr:`state`."""
        self.epoch: int | None = None
        self.applied_seq = 0
        """Sequence of the last update applied (or the installed snapshot's)."""
        self.seen_seq = 0
        """Highest sequence announced on the stream in our epoch."""
        self.gate_acks = gate_acks
        self.confirmed_seq = 0
        """With ``gate_acks``: the application has applied everything up to
        here (in :attr:`epoch`)."""
        self.snapshots = 0

        self._events: deque[Event] = deque()
        self._ack_due: float | None = None
        self._last_ack = float("-inf")
        self._last_rx = 0.0
        self._phase_since = 0.0
        self._req_counter = 0
        self._req_id = b""
        self._buffer: list[list[bytes]] = []
        self._snap_raw: dict[str, bytes] = {}
        self._snap_rec: dict[str, Record] = {}
        self._snap_count = 0
        self._report: bytes | None = None

    # --- inputs ------------------------------------------------------------------

    def start(self, now: float) -> None:
        """The shell has subscribed; wait for the stream, then snapshot."""
        self.phase = Phase.CONNECTING
        self._phase_since = self._last_rx = now

    def receive_stream(self, frames: list[bytes], now: float) -> None:
        """One message from the update (SUB) socket."""
        if self.phase is Phase.IDLE:
            return
        if len(frames) < 2 or len(frames[1]) != HDR.size or frames[0] not in (UPD, HUGZ):
            self._reject("", "frame")
            return
        if frames[0] == UPD and len(frames) != 4:
            self._reject("", "frame")
            return
        self._last_rx = now
        if self.phase is Phase.CONNECTING:
            self._buffer.append(frames)
            self._request_snapshot("start", now)
        elif self.phase is Phase.SNAPSHOTTING:
            if len(self._buffer) >= self.max_buffer:
                self._request_snapshot("overflow", now)
            self._buffer.append(frames)
        else:
            self._live(frames, now)

    def receive_snapshot(self, frames: list[bytes], now: float) -> None:
        """One message from the snapshot (DEALER) socket."""
        if self.phase is not Phase.SNAPSHOTTING or len(frames) < 2 or frames[1] != self._req_id:
            return  # a late reply to an abandoned request
        self._phase_since = now
        if frames[0] == KVS and len(frames) == 3:
            self._snapshot_chunk(frames[2])
        elif frames[0] == KTHXBAI and len(frames) == 4 and len(frames[2]) == HDR.size:
            epoch, seq = HDR.unpack(frames[2])
            (count,) = U64.unpack(frames[3]) if len(frames[3]) == U64.size else (-1,)
            if count != self._snap_count:
                self._reject("", "frame")
                self._request_snapshot("incomplete", now)
                return
            self._install(epoch, seq, now)
        else:
            self._reject("", "frame")

    def set_report(self, report: Mapping[Any, Any]) -> None:
        """Send ``report`` (a msgpack-able map) with the next ack, replacing
        one not yet sent. ValueError if it is over :data:`MAX_REPORT_BYTES`.

        May be called from another thread than the one driving the core (one
        reference assignment); a report replaced before it was sent is lost,
        which is fine for latest-state telemetry."""
        self._report = encode_report(report)

    def get_timer(self) -> float | None:
        """Absolute deadline at which :meth:`handle_timer` must run, or None."""
        if self.phase is Phase.LIVE:
            hb = self._last_rx + self.heartbeat_timeout
            return hb if self._ack_due is None else min(hb, self._ack_due)
        if self.phase is Phase.CONNECTING:
            return self._phase_since + self.heartbeat_timeout
        if self.phase is Phase.SNAPSHOTTING:
            return self._phase_since + self.snapshot_timeout
        return None

    def handle_timer(self, now: float) -> None:
        if self._ack_due is not None and now >= self._ack_due and self.phase is Phase.LIVE:
            assert self.epoch is not None
            self._ack_due = None
            self._last_ack = now
            frames = [ACK, self._wid, HDR.pack(self.epoch, self.ack_seq)]
            report, self._report = self._report, None
            if report is not None:
                frames.append(report)
            self._events.append(SendAck(frames))
        deadline = self.get_timer()
        if deadline is None or now < deadline:
            return
        if self.phase is Phase.LIVE:
            self._events.append(HeartbeatMissed(now - self._last_rx))
            self._request_snapshot("heartbeat", now)
        elif self.phase is Phase.CONNECTING:
            self._request_snapshot("start", now)
        elif self.phase is Phase.SNAPSHOTTING:
            self._request_snapshot("snapshot_timeout", now)

    def next_event(self) -> Event | None:
        """Pop the next event (acks come from :meth:`handle_timer`, coalesced)."""
        if self._events:
            return self._events.popleft()
        return None

    def _want_ack(self, now: float) -> None:
        if self._ack_due is None:
            self._ack_due = max(now, self._last_ack + self.ack_interval)

    def _applied(self, now: float) -> None:
        """Updates were handed to the application: ack them, unless acks wait
        for :meth:`confirm`."""
        if not self.gate_acks:
            self._want_ack(now)

    @property
    def ack_seq(self) -> int:
        """The sequence the next ack reports."""
        if self.gate_acks:
            return min(self.applied_seq, self.confirmed_seq)
        return self.applied_seq

    def confirm(self, epoch: int | None, seq: int, now: float) -> None:
        """With ``gate_acks``: the application has applied every update up to
        ``seq`` of ``epoch`` (the values of :attr:`epoch` and
        :attr:`applied_seq` when it was handed them); acked at once, or
        within ``ack_interval`` of the previous ack. A confirmation from an
        epoch that is no longer ours is ignored."""
        if epoch is not None and epoch == self.epoch and seq > self.confirmed_seq:
            self.confirmed_seq = seq
            self._want_ack(now)

    @property
    def lag(self) -> int:
        return max(0, self.seen_seq - self.applied_seq)

    # --- internals -----------------------------------------------------------------

    def _reject(self, key: str, reason: str) -> None:
        self._events.append(Rejected(key, reason))

    def _request_snapshot(self, reason: str, now: float) -> None:
        if self.phase is not Phase.SNAPSHOTTING and self.phase is not Phase.CONNECTING:
            self._buffer = []
        if reason == "overflow":
            self._buffer = []
        self.phase = Phase.SNAPSHOTTING
        self._phase_since = now
        self._req_counter += 1
        self._req_id = U64.pack(self._req_counter)
        self._snap_raw = {}
        self._snap_rec = {}
        self._snap_count = 0
        self._events.append(ResnapshotStarted(reason))
        self._events.append(RequestSnapshot([ICANHAZ, self._wid, self._req_id], reason))

    def _decode_checked(self, key: str, value: bytes) -> Record | None:
        try:
            record = self._decode(value)
        except RecordError as exc:
            self._reject(key, exc.reason if exc.reason in ("malformed", "version") else "invalid")
            return None
        except Exception:  # a decoder bug must not kill the bus thread
            self._reject(key, "malformed")
            return None
        if record.key != key:
            self._reject(key, "key_mismatch")
            return None
        return record

    def _snapshot_chunk(self, payload: bytes) -> None:
        try:
            flat = msgpack.unpackb(payload, raw=False, use_list=True)
        except Exception:
            flat = None
        if not isinstance(flat, list) or len(flat) % 2:
            self._reject("", "frame")
            return
        old_raw, old_state = self.raw, self.state
        for i in range(0, len(flat), 2):
            key, value = flat[i], flat[i + 1]
            self._snap_count += 1
            if not isinstance(key, str) or not isinstance(value, bytes) or not value:
                self._reject("", "frame")
                continue
            if old_raw.get(key) == value:  # unchanged: no decode, no callback
                self._snap_raw[key] = value
                self._snap_rec[key] = old_state[key]
                continue
            record = self._decode_checked(key, value)
            if record is None:
                if key in old_raw:  # rejected: the key keeps its previous value
                    self._snap_raw[key] = old_raw[key]
                    self._snap_rec[key] = old_state[key]
                continue
            self._snap_raw[key] = value
            self._snap_rec[key] = record

    def _install(self, epoch: int, seq: int, now: float) -> None:
        new_raw, new_rec = self._snap_raw, self._snap_rec
        self._snap_raw, self._snap_rec = {}, {}
        state, raw = self.state, self.raw
        changed = removed = 0
        for key, value in new_raw.items():
            if raw.get(key) != value:
                old = state.get(key)
                record = new_rec[key]
                state[key] = record
                raw[key] = value
                self._events.append(RecordChanged(key, record, old))
                changed += 1
        for key in [k for k in raw if k not in new_raw]:
            old = state.pop(key)
            del raw[key]
            self._events.append(RecordRemoved(key, old))
            removed += 1
        if epoch != self.epoch:
            self.confirmed_seq = 0  # sequences of another publisher's life
        self.epoch, self.applied_seq, self.seen_seq = epoch, seq, seq
        self.phase = Phase.LIVE
        self._last_rx = now
        self.snapshots += 1
        self._applied(now)
        self._events.append(
            SnapshotInstalled(epoch, seq, changed, removed, dict(raw) if self.keep_raw else None)
        )
        buffered, self._buffer = self._buffer, []
        for frames in buffered:
            if self.phase is not Phase.LIVE:
                break  # the buffer itself showed a gap: a new snapshot is under way
            if HDR.unpack(frames[1])[0] != epoch:
                continue  # from before the epoch we snapshotted
            self._live(frames, now)

    def _live(self, frames: list[bytes], now: float) -> None:
        epoch, seq = HDR.unpack(frames[1])
        if epoch != self.epoch:
            self._request_snapshot("epoch", now)
            self._buffer.append(frames)
            return
        if seq > self.seen_seq:
            self.seen_seq = seq
        if frames[0] == HUGZ:
            self._want_ack(now)
            if seq > self.applied_seq:  # the stream moved on without us
                self._events.append(GapDetected(self.applied_seq + 1, seq))
                self._request_snapshot("gap", now)
            return
        if seq <= self.applied_seq:
            return  # already in the snapshot, or a duplicate
        if seq != self.applied_seq + 1:
            self._events.append(GapDetected(self.applied_seq + 1, seq))
            self._request_snapshot("gap", now)
            self._buffer.append(frames)
            return
        self._apply(seq, frames[2], frames[3])
        self._applied(now)

    def _apply(self, seq: int, key_raw: bytes, value: bytes) -> None:
        self.applied_seq = seq
        try:
            key = key_raw.decode("utf-8")
        except UnicodeDecodeError:
            self._reject("", "frame")
            return
        if self.keep_raw:
            self._events.append(Sequenced(self.epoch or 0, seq, key, value))
        if not value:
            if key in self.raw:
                old = self.state.pop(key)
                del self.raw[key]
                self._events.append(RecordRemoved(key, old))
            return
        if self.raw.get(key) == value:
            return  # same bytes again: nothing changes, nothing to report
        record = self._decode_checked(key, value)
        if record is None:
            return
        old_rec = self.state.get(key)
        self.state[key] = record
        self.raw[key] = value
        self._events.append(RecordChanged(key, record, old_rec))
