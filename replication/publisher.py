"""The Clone-pattern publisher on the control node (zguide ch. 5, "clonesrv").

Three CURVE server sockets, owned by one background thread:

* ROUTER ``snapshot_endpoint``: answers ``ICANHAZ?`` with every record and a
  ``KTHXBAI`` carrying the snapshot's sequence and our epoch.
* XPUB ``update_endpoint``: sequenced updates and a heartbeat every
  ``heartbeat_interval``, plus one at once whenever a subscription arrives,
  so a new subscriber knows within a round trip that its subscription is live.
* PULL ``ack_endpoint``: subscribers' applied sequences, which drive
  :meth:`Publisher.applied_everywhere` / :meth:`Publisher.wait_applied`
  (make-before-break: install the new SA, wait until every live worker
  applied it, only then delete the old one). An ack may carry a report (a
  worker's telemetry, see ``clone.py``); the newest valid one per subscriber
  is kept and :meth:`Publisher.reports` returns those of live subscribers.
  Oversized or malformed reports are dropped and counted
  (``anywan_bus_reports_total{result}``); the ack still counts.

:meth:`Publisher.set` and :meth:`Publisher.delete` are thread-safe: they take
a lock, assign the next sequence, update the table (kept as encoded bytes, so
a snapshot never re-encodes) and hand the update to the socket thread through
a queue and a wake-up pipe.

Restarts. Each start draws a random 64-bit epoch, and subscribers re-snapshot
when the epoch changes. A control node that restarts with the state it had
(``initial=`` the same records) does not disturb the workers: each one keeps
serving its old state until the new snapshot is complete, then swaps it in
and reports only the records that really differ (see ``clone.py``). With the
same records, no on_set and no on_delete fire at all, and no SA is ever
missing in between.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import zmq
from prometheus_client import CollectorRegistry

from replication import clone
from replication.curve import AllowList, configure_server
from replication.metrics import PublisherMetrics
from replication.records import Record, decode, encode

log = logging.getLogger("anywan.bus.publisher")

SNAPSHOT_CHUNK = 1000
"""Records per snapshot message."""
STREAM_HWM = 100_000
"""Messages queued per subscriber on the update stream before ZeroMQ drops
(the subscriber then sees a gap and re-snapshots)."""


@dataclass(frozen=True, slots=True)
class SubscriberStatus:
    worker_id: str
    applied_seq: int
    """Last sequence the subscriber reported applied in our epoch (0 if none)."""
    last_seen: float
    """``time.monotonic()`` of its last ack."""
    lag: int
    """Our sequence minus ``applied_seq``."""
    live: bool


@dataclass(slots=True)
class _Sub:
    epoch: int
    seq: int
    last_seen: float
    report: dict[Any, Any] | None = None


class Publisher:
    """Publishes records to every subscriber; see the module docstring.

    :param heartbeat_interval: seconds between heartbeats on the stream.
    :param initial: records to start with (a restarted control node passes
        what it had, so workers converge without churn).
    :param initial_sequence: sequence number the initial state carries.
    :param subscriber_timeout: seconds after its last ack a subscriber stops
        counting as live (default 4 heartbeat intervals, at least 1 s).
    :param registry: where the ``anywan_bus_*`` publisher metrics go.
    """

    def __init__(
        self,
        *,
        snapshot_endpoint: str,
        update_endpoint: str,
        ack_endpoint: str,
        server_public: bytes,
        server_secret: bytes,
        allowed_clients: Iterable[bytes],
        heartbeat_interval: float = 0.5,
        initial: Iterable[Record] = (),
        initial_sequence: int = 0,
        subscriber_timeout: float | None = None,
        registry: CollectorRegistry | None = None,
        epoch: int | None = None,
    ) -> None:
        if heartbeat_interval <= 0:
            raise ValueError("heartbeat_interval must be > 0")
        self._endpoints = (snapshot_endpoint, update_endpoint, ack_endpoint)
        self.snapshot_endpoint, self.update_endpoint, self.ack_endpoint = self._endpoints
        self._server_public = server_public
        self._server_secret = server_secret
        self._allowed = list(allowed_clients)
        self.heartbeat_interval = heartbeat_interval
        self.subscriber_timeout = subscriber_timeout or max(4 * heartbeat_interval, 1.0)
        self.metrics = PublisherMetrics(registry)
        self.epoch = epoch if epoch is not None else random.getrandbits(64)

        self._lock = threading.Lock()
        self._values: dict[str, bytes] = {}
        self._records: dict[str, Record] = {}
        for rec in initial:
            self._values[rec.key] = encode(rec)
            self._records[rec.key] = rec
        self._seq = initial_sequence
        self._published = initial_sequence
        self._outbox: deque[tuple[int, int, str, bytes]] = deque()
        self._subs: dict[str, _Sub] = {}
        self._waiters: list[tuple[int, asyncio.AbstractEventLoop, asyncio.Future[bool]]] = []
        self._cond = threading.Condition(self._lock)
        self._skip = 0
        self._hb_paused_until = 0.0
        self._mirror = False
        self._serving = True
        self._pending_requests: dict[str, tuple[bytes, bytes]] = {}
        """Mirror mode, before the first upstream snapshot: worker id → its
        newest request (ROUTER identity, request id); older ones are stale."""
        self.on_ack: Callable[[list[bytes]], None] | None = None
        """Called in the socket thread with each valid ack's frames (forwarder)."""

        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._ctx: zmq.Context[zmq.Socket[bytes]] | None = None
        self._auth: AllowList | None = None
        self._wake_r = self._wake_w = -1
        self._wake_pending = False
        self._next_hb = 0.0
        self.metrics.records.set(len(self._values))
        self.metrics.sequence.set(self._seq)

    # --- public, thread-safe --------------------------------------------------------

    @property
    def sequence(self) -> int:
        """The last sequence number assigned."""
        return self._seq

    def start(self) -> None:
        """Bind the sockets (errors surface here) and start the socket thread."""
        self._open()
        self._thread = threading.Thread(target=self._run, name="anywan-bus-pub", daemon=True)
        self._thread.start()

    @property
    def thread_died(self) -> bool:
        """Started, and its socket thread has exited while meant to run (a
        ZeroMQ error or a bug): nothing is published any more. Read by /healthz."""
        thread = self._thread
        return thread is not None and not thread.is_alive()

    def stop(self) -> None:
        self._stopping.set()
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        self._close()

    def set(self, record: Record) -> int:
        """Publish ``record`` under ``record.key``; returns its bus sequence."""
        return self._publish(record.key, record)

    def delete(self, key: str) -> int:
        """Publish a tombstone for ``key``; returns its sequence."""
        return self._publish(key, None)

    def _publish(self, key: str, record: Record | None) -> int:
        """Next sequence, table updated, update queued for the socket thread."""
        if self._mirror:
            raise RuntimeError("a forwarder's publisher mirrors its upstream")
        value = b"" if record is None else encode(record)  # b"": the tombstone
        with self._lock:
            self._seq += 1
            seq = self._seq
            if record is None:
                self._values.pop(key, None)
                self._records.pop(key, None)
            else:
                self._values[key] = value
                self._records[key] = record
            self._outbox.append((self.epoch, seq, key, value))
        self._wake()
        return seq

    def get(self, key: str) -> Record | None:
        with self._lock:
            rec = self._records.get(key)
            raw = self._values.get(key) if rec is None else None
        return decode(raw) if raw is not None else rec

    def items(self) -> dict[str, Record]:
        with self._lock:
            if not self._mirror:
                return dict(self._records)
            raw = dict(self._values)
        return {k: decode(v) for k, v in raw.items()}

    def subscribers(self) -> list[SubscriberStatus]:
        now = time.monotonic()
        with self._lock:
            return [self._status(w, s, now) for w, s in sorted(self._subs.items())]

    def reports(self) -> dict[str, dict[Any, Any]]:
        """Worker id → the newest valid report of each live subscriber that
        sent one (each a decoded msgpack map; treat its contents as untrusted)."""
        now = time.monotonic()
        with self._lock:
            return {
                w: s.report
                for w, s in self._subs.items()
                if s.report is not None and now - s.last_seen <= self.subscriber_timeout
            }

    def applied_everywhere(self, seq: int) -> bool:
        """Every live subscriber has acked ``seq`` or later in our epoch.

        True when no subscriber is live (nothing to wait for); callers that
        need at least one worker check :meth:`subscribers`."""
        with self._lock:
            return self._applied_locked(seq, time.monotonic())

    async def wait_applied(self, seq: int, timeout: float) -> bool:
        """Wait until :meth:`applied_everywhere` (``seq``); False on timeout."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[bool] = loop.create_future()
        entry = (seq, loop, fut)
        with self._lock:
            if self._applied_locked(seq, time.monotonic()):
                return True
            self._waiters.append(entry)
        try:
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            return False
        finally:
            with self._lock:
                if entry in self._waiters:
                    self._waiters.remove(entry)

    def wait_applied_sync(self, seq: int, timeout: float) -> bool:
        """Blocking :meth:`wait_applied` for threads without an event loop."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._applied_locked(seq, time.monotonic()):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, self.heartbeat_interval))
            return True

    def allow_client(self, public: bytes) -> None:
        """Add a client key to the ZAP allow-list (new connections)."""
        self._allowed.append(public)
        if self._auth is not None:
            self._auth.allow(public)

    # --- test hooks -------------------------------------------------------------------

    def inject_loss(self, count: int = 1) -> None:
        """Test hook: the next ``count`` updates get a sequence but are not sent."""
        with self._lock:
            self._skip += count

    def pause_heartbeats(self, seconds: float) -> None:
        """Test hook: send no heartbeat for ``seconds``."""
        self._hb_paused_until = time.monotonic() + seconds

    # --- mirror mode (forwarder) ---------------------------------------------------------

    def _mirror_mode(self) -> None:
        """Serve an upstream's state with its epoch and sequences (forwarder)."""
        self._mirror = True
        self._serving = False

    def _mirror_install(self, epoch: int, seq: int, raw: dict[str, bytes]) -> None:
        self._flush()  # what the old state's subscribers are owed, in order
        with self._lock:
            self.epoch = epoch
            self._seq = self._published = seq
            self._values = raw
            self._records = {}
            self._serving = True
            pending, self._pending_requests = self._pending_requests, {}
        self.metrics.sequence.set(seq)
        self.metrics.records.set(len(raw))
        for ident, req_id in pending.values():
            self._serve_snapshot(ident, req_id)
        self._send_heartbeat()

    def _mirror_update(self, epoch: int, seq: int, key: str, value: bytes) -> None:
        with self._lock:
            self._seq = seq
            if value:
                self._values[key] = value
            else:
                self._values.pop(key, None)
            self._outbox.append((epoch, seq, key, value))

    # --- socket thread ---------------------------------------------------------------------

    def _wake(self) -> None:
        if self._wake_w < 0:
            return
        with self._lock:
            if self._wake_pending:
                return
            self._wake_pending = True
        # Pipe full or closed: the thread is awake or gone anyway.
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"\0")

    def _open(self) -> None:
        snap_ep, upd_ep, ack_ep = self._endpoints
        self._ctx = zmq.Context()
        self._auth = AllowList(self._ctx, self._allowed)
        self._auth.start()
        try:
            self._router = self._ctx.socket(zmq.ROUTER)
            self._xpub = self._ctx.socket(zmq.XPUB)
            self._pull = self._ctx.socket(zmq.PULL)
            for s in (self._router, self._xpub, self._pull):
                s.linger = 0
                configure_server(s, self._server_public, self._server_secret)
            self._router.sndhwm = 0
            self._xpub.sndhwm = STREAM_HWM
            self._xpub.setsockopt(zmq.XPUB_VERBOSE, 1)
            self._router.bind(snap_ep)
            self._xpub.bind(upd_ep)
            self._pull.bind(ack_ep)
            # Resolved endpoints (a "tcp://127.0.0.1:*" wildcard becomes a real port).
            self.snapshot_endpoint, self.update_endpoint, self.ack_endpoint = (
                s.getsockopt_string(zmq.LAST_ENDPOINT)
                for s in (self._router, self._xpub, self._pull)
            )
        except zmq.ZMQError:
            self._close()
            raise
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._next_hb = time.monotonic()

    def _close(self) -> None:
        if self._ctx is None:
            return
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        self._ctx.destroy(linger=0)
        self._ctx = None
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1

    def _poll_items(self) -> list[zmq.Socket[bytes]]:
        return [self._router, self._xpub, self._pull]

    def _run(self) -> None:
        poller = zmq.Poller()
        for s in self._poll_items():
            poller.register(s, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        while not self._stopping.is_set():
            timeout = clone.poll_timeout_ms(self._next_deadline(), time.monotonic())
            try:
                ready = dict(poller.poll(timeout))
            except zmq.ZMQError:
                break
            if self._wake_r in ready:
                with contextlib.suppress(BlockingIOError):
                    os.read(self._wake_r, 4096)
                with self._lock:
                    self._wake_pending = False
            self._handle(ready, time.monotonic())

    def _next_deadline(self) -> float:
        return self._next_hb

    def _handle(self, ready: dict[object, int], now: float) -> None:
        """Service readable sockets, send queued updates, heartbeat if due."""
        if self._pull in ready:
            self._recv_acks(now)
        if self._router in ready:
            self._recv_requests()
        self._flush()
        if self._xpub in ready:
            self._recv_subscriptions()
        if now >= self._next_hb:
            self._next_hb = now + self.heartbeat_interval
            self._send_heartbeat()
            self._housekeeping(now)

    def _flush(self) -> None:
        with self._lock:
            batch = list(self._outbox)
            self._outbox.clear()
        for epoch, seq, key, value in batch:
            if self._skip:
                with self._lock:
                    self._skip -= 1
            else:
                try:
                    self._xpub.send_multipart(clone.update_frames(epoch, seq, key, value))
                except zmq.ZMQError as exc:  # HWM: that subscriber will see a gap
                    log.warning("update %d not sent: %s", seq, exc.strerror)
            self._published = seq
        if batch:
            self.metrics.updates.inc(len(batch))
            self.metrics.sequence.set(self._published)
            self.metrics.records.set(len(self._values))

    def _send_heartbeat(self) -> None:
        if not self._serving or time.monotonic() < self._hb_paused_until:
            return
        with contextlib.suppress(zmq.ZMQError):
            self._xpub.send_multipart(clone.heartbeat_frames(self.epoch, self._published))

    def _recv_subscriptions(self) -> None:
        for _ in range(1000):
            try:
                msg = self._xpub.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            if msg[:1] == b"\x01":  # a (re)subscription: tell it where we are at once
                self._send_heartbeat()

    def _recv_requests(self) -> None:
        for _ in range(1000):
            try:
                frames = self._router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            parsed = clone.parse_snapshot_request(frames[1:]) if len(frames) > 1 else None
            if parsed is None:
                continue
            if not self._serving:
                # A worker re-requests (on a fresh connection) every snapshot
                # timeout while we wait for upstream: answer only its last.
                self._pending_requests[parsed[0]] = (frames[0], parsed[1])
                continue
            self._serve_snapshot(frames[0], parsed[1])

    def _serve_snapshot(self, ident: bytes, req_id: bytes) -> None:
        with self._lock:
            items = list(self._values.items())
            seq, epoch = self._seq, self.epoch
        try:
            for chunk in clone.snapshot_chunks(req_id, items, SNAPSHOT_CHUNK):
                self._router.send_multipart([ident, *chunk], copy=False)
            self._router.send_multipart(
                [ident, *clone.snapshot_end_frames(req_id, epoch, seq, len(items))]
            )
        except zmq.ZMQError as exc:
            log.warning("snapshot not sent: %s", exc.strerror)
            return
        self.metrics.snapshots_served.inc()

    def _recv_acks(self, now: float) -> None:
        got = False
        for _ in range(10000):
            try:
                frames = self._pull.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            if len(frames) == 2 and frames[0] == clone.BYE:
                with self._lock:
                    self._subs.pop(frames[1].decode("utf-8", "replace"), None)
                got = True
                if self.on_ack is not None:
                    self.on_ack(frames)
                continue
            parsed = clone.parse_ack(frames)
            if parsed is None:
                continue
            worker, epoch, seq = parsed
            report, bad = clone.parse_report(frames)
            if bad is not None:
                self.metrics.reports.labels(bad).inc()
                frames = frames[:3]  # pass the ack on without it
            elif report is not None:
                self.metrics.reports.labels("ok").inc()
            with self._lock:
                sub = self._subs.get(worker)
                if sub is None:
                    sub = self._subs[worker] = _Sub(epoch, seq, now)
                else:
                    if sub.epoch != epoch or seq > sub.seq:
                        sub.epoch, sub.seq = epoch, seq
                    sub.last_seen = now
                if report is not None:
                    sub.report = report
            got = True
            if self.on_ack is not None:
                self.on_ack(frames)
        if got:
            self._notify_waiters(now)

    def _housekeeping(self, now: float) -> None:
        with self._lock:
            live = [s for s in self._subs.values() if now - s.last_seen <= self.subscriber_timeout]
            for w in [w for w, s in self._subs.items() if now - s.last_seen > 60]:
                del self._subs[w]
            lags = [self._seq - (s.seq if s.epoch == self.epoch else 0) for s in live]
        self.metrics.live_subscribers.set(len(live))
        self.metrics.max_lag.set(max(lags, default=0))
        self._notify_waiters(now)

    def _notify_waiters(self, now: float) -> None:
        with self._lock:
            done = [w for w in self._waiters if self._applied_locked(w[0], now)]
            for w in done:
                self._waiters.remove(w)
            self._cond.notify_all()
        for _, loop, fut in done:
            loop.call_soon_threadsafe(_resolve, fut)

    # --- helpers (lock held) ---------------------------------------------------------------

    def _applied_locked(self, seq: int, now: float) -> bool:
        for s in self._subs.values():
            if now - s.last_seen > self.subscriber_timeout:
                continue
            if s.epoch != self.epoch or s.seq < seq:
                return False
        return True

    def _status(self, worker: str, s: _Sub, now: float) -> SubscriberStatus:
        applied = s.seq if s.epoch == self.epoch else 0
        return SubscriberStatus(
            worker_id=worker,
            applied_seq=applied,
            last_seen=s.last_seen,
            lag=max(0, self._seq - applied),
            live=now - s.last_seen <= self.subscriber_timeout,
        )


def _resolve(fut: asyncio.Future[bool]) -> None:
    if not fut.done():
        fut.set_result(True)
