"""The worker's side of the bus: a thread that keeps a local copy of control's state.

A thin ZeroMQ shell around :class:`replication.clone.CloneClient` (which holds
all the rules): a SUB socket on the update stream, a DEALER per snapshot
request, a PUSH for acks, all CURVE clients of control's server key. The
thread moves frames into the core, runs its one timer, and turns its events
into callbacks, metrics and outgoing messages.

Callbacks run in the subscriber's thread, in bus order: ``on_set(key,
record)`` for a new or changed record, ``on_delete(key, old_record)`` for a
removed one. A callback that raises is counted
(``anywan_bus_callback_errors_total``) and logged by key only; the bus goes on.
``ready`` is set once the first snapshot is in. ``state`` is the live dict of
records by key (read it from other threads as a whole value per key, or copy
it with ``dict(sub.state)``).

An application that applies records later, in another thread (the worker's
packet loop), passes ``on_batch``: after the callbacks of each batch it gets
a token, and the acks to the publisher then report only what it handed back
to :meth:`Subscriber.confirm` — "applied everywhere" means applied where
packets are handled, not queued for it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import zmq
from prometheus_client import CollectorRegistry

from replication import clone
from replication.curve import configure_client
from replication.metrics import SubscriberMetrics
from replication.records import Record

log = logging.getLogger("anywan.bus.subscriber")

METRICS_INTERVAL = 0.1
"""Seconds between gauge refreshes (applied sequence, lag, record count)."""

OnSet = Callable[[str, Record], None]
OnDelete = Callable[[str, Record | None], None]
BatchToken = tuple[int | None, int]
"""(epoch, sequence) of the last update of a batch; see ``on_batch``."""


class _ClientIO:
    """Sockets + core of one subscription; driven by a thread's poll loop."""

    def __init__(
        self,
        *,
        snapshot_endpoint: str,
        update_endpoint: str,
        ack_endpoint: str,
        server_public: bytes,
        client_public: bytes,
        client_secret: bytes,
        core: clone.CloneClient,
        metrics: SubscriberMetrics,
        on_set: OnSet | None,
        on_delete: OnDelete | None,
        on_event: Callable[[clone.Event], None] | None = None,
        on_batch: Callable[[BatchToken], None] | None = None,
    ) -> None:
        self.endpoints = (snapshot_endpoint, update_endpoint, ack_endpoint)
        self._keys = (server_public, client_public, client_secret)
        self.core = core
        self.metrics = metrics
        self.on_set = on_set
        self.on_delete = on_delete
        self.on_event = on_event
        self.on_batch = on_batch
        self._batched: BatchToken | None = None
        self.ready = threading.Event()
        self.ctx: zmq.Context[zmq.Socket[bytes]] | None = None
        self.dealer: zmq.Socket[bytes] | None = None
        self._shown_at = float("-inf")

    def _client(self, kind: int) -> zmq.Socket[bytes]:
        assert self.ctx is not None
        s = self.ctx.socket(kind)
        s.linger = 0
        configure_client(s, *self._keys)
        return s

    def open(self, now: float) -> None:
        _, upd_ep, ack_ep = self.endpoints
        self.ctx = zmq.Context()
        self.sub = self._client(zmq.SUB)
        self.sub.rcvhwm = 0
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.sub.connect(upd_ep)
        self.push = self._client(zmq.PUSH)
        self.push.sndhwm = 1000
        self.push.connect(ack_ep)
        self.core.start(now)

    def close(self) -> None:
        if self.ctx is None:
            return
        with contextlib.suppress(zmq.ZMQError):
            self.push.send_multipart(clone.bye_frames(self.core.worker_id), zmq.NOBLOCK)
        time.sleep(0.005)  # let the I/O thread write the goodbye before linger 0 drops it
        self.ctx.destroy(linger=0)
        self.ctx = None
        self.dealer = None  # destroyed with the context: a restart must not poll it

    def sockets(self) -> list[zmq.Socket[bytes]]:
        return [self.sub] if self.dealer is None else [self.sub, self.dealer]

    def on_ready(self, sock: zmq.Socket[bytes], now: float) -> None:
        recv = self.core.receive_stream if sock is self.sub else self.core.receive_snapshot
        for _ in range(2000):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            recv(frames, now)
            events = sock.getsockopt(zmq.EVENTS)
            if isinstance(events, int) and not events & zmq.POLLIN:
                break  # cheaper than provoking zmq.Again

    def timer(self) -> float | None:
        return self.core.get_timer()

    def process(self, now: float) -> None:
        """Act on every event, running the core's timer whenever it is due."""
        m = self.metrics
        while True:
            deadline = self.core.get_timer()
            if deadline is not None and now >= deadline:
                self.core.handle_timer(now)
            ev = self.core.next_event()
            if ev is None:
                break
            if self.on_event is not None:
                self.on_event(ev)
            if isinstance(ev, clone.RecordChanged):
                if self.on_set is not None:
                    self._call(self.on_set, ev.key, ev.record)
            elif isinstance(ev, clone.RecordRemoved):
                if self.on_delete is not None:
                    self._call(self.on_delete, ev.key, ev.old)
            elif isinstance(ev, clone.SendAck):
                # Control unreachable: the next ack carries the same news.
                with contextlib.suppress(zmq.ZMQError):
                    self.push.send_multipart(ev.frames, zmq.NOBLOCK)
            elif isinstance(ev, clone.RequestSnapshot):
                self._request(ev.frames)
            elif isinstance(ev, clone.SnapshotInstalled):
                m.snapshots_taken.inc()
                self._shown_at = float("-inf")
                if self.dealer is not None:
                    self.dealer.close(linger=0)
                    self.dealer = None
                self.ready.set()
            elif isinstance(ev, clone.Rejected):
                m.rejected.labels(ev.reason).inc()
                log.warning("bus record rejected (%s) key=%r", ev.reason, ev.key)
            elif isinstance(ev, clone.ResnapshotStarted):
                m.resnapshots.labels(ev.reason).inc()
                if ev.reason != "start":
                    log.info("re-snapshot: %s", ev.reason)
            elif isinstance(ev, clone.GapDetected):
                m.gaps.inc()
            elif isinstance(ev, clone.HeartbeatMissed):
                m.heartbeats_missed.inc()
        core = self.core
        if self.on_batch is not None and core.phase is clone.Phase.LIVE:
            token = (core.epoch, core.applied_seq)
            if token != self._batched:
                self._batched = token
                try:
                    self.on_batch(token)
                except Exception as exc:
                    self.metrics.callback_errors.inc()
                    log.error("bus batch callback failed: %s", type(exc).__name__)
        # Gauges at most every METRICS_INTERVAL (DESIGN §7: no per-update
        # metric writes); counters above are per event and rare.
        if now - self._shown_at >= METRICS_INTERVAL or self.core.phase is not clone.Phase.LIVE:
            self._shown_at = now
            m.applied.set(self.core.applied_seq)
            m.lag.set(self.core.lag)
            m.records.set(len(self.core.state))

    def _request(self, frames: list[bytes]) -> None:
        if self.dealer is not None:
            self.dealer.close(linger=0)
        self.dealer = self._client(zmq.DEALER)
        self.dealer.connect(self.endpoints[0])
        self.dealer.send_multipart(frames)

    def _call(self, fn: Callable[[str, Record], None] | OnDelete, key: str, rec: Record) -> None:
        try:
            fn(key, rec)
        except Exception as exc:
            self.metrics.callback_errors.inc()
            log.error("bus callback failed for key=%r: %s", key, type(exc).__name__)


def run_loop(
    ios: list[_ClientIO],
    stopping: threading.Event,
    wake: tuple[int, Callable[[float], None]] | None = None,
) -> None:
    """Poll loop for one or more client IOs (used by Subscriber); ``wake``:
    a file descriptor polled with the sockets and its handler (given the time)."""
    registered: list[zmq.Socket[bytes]] = []
    poller = zmq.Poller()
    owner: dict[zmq.Socket[bytes], _ClientIO] = {}
    while not stopping.is_set():
        now = time.monotonic()
        timers = [t for io in ios if (t := io.timer()) is not None]
        deadline = min([*timers, now + 0.2])
        wanted = [s for io in ios for s in io.sockets()]
        if wanted != registered:  # a snapshot connection came or went
            poller = zmq.Poller()
            owner = {}
            if wake is not None:
                poller.register(wake[0], zmq.POLLIN)
            for io in ios:
                for s in io.sockets():
                    poller.register(s, zmq.POLLIN)
                    owner[s] = io
            registered = wanted
        try:
            ready = poller.poll(clone.poll_timeout_ms(deadline, now))
        except zmq.ZMQError:
            break
        now = time.monotonic()
        for sock, _ in ready:
            if wake is not None and sock == wake[0]:
                wake[1](now)
            else:
                owner[sock].on_ready(sock, now)
        for io in ios:
            io.process(now)


def _close_fds(*fds: int) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


class Subscriber:
    """A background thread keeping ``state`` equal to the publisher's.

    Extra keyword arguments beyond the agreed contract: ``snapshot_timeout``
    (seconds without snapshot data before re-requesting; default
    ``heartbeat_timeout``), ``ack_interval`` (minimum seconds between acks to
    the publisher under a steady stream, default 50 ms; see ``CloneClient``)
    ``registry`` for the ``anywan_bus_*`` metrics, and ``on_batch`` (module
    doc: acks only for batches handed back to :meth:`confirm`).
    """

    def __init__(
        self,
        *,
        snapshot_endpoint: str,
        update_endpoint: str,
        ack_endpoint: str,
        server_public: bytes,
        client_public: bytes,
        client_secret: bytes,
        worker_id: str,
        on_set: OnSet | None = None,
        on_delete: OnDelete | None = None,
        heartbeat_timeout: float = 2.0,
        snapshot_timeout: float | None = None,
        ack_interval: float = 0.05,
        registry: CollectorRegistry | None = None,
        on_batch: Callable[[BatchToken], None] | None = None,
    ) -> None:
        self.worker_id = worker_id
        self.metrics = SubscriberMetrics(registry)
        self._core = clone.CloneClient(
            worker_id,
            heartbeat_timeout=heartbeat_timeout,
            snapshot_timeout=snapshot_timeout,
            ack_interval=ack_interval,
            gate_acks=on_batch is not None,
        )
        self._io = _ClientIO(
            snapshot_endpoint=snapshot_endpoint,
            update_endpoint=update_endpoint,
            ack_endpoint=ack_endpoint,
            server_public=server_public,
            client_public=client_public,
            client_secret=client_secret,
            core=self._core,
            metrics=self.metrics,
            on_set=on_set,
            on_delete=on_delete,
            on_batch=on_batch,
        )
        self._confirmed: BatchToken | None = None
        self._wake: tuple[int, Callable[[float], None]] | None = None
        self._wake_w = -1
        if on_batch is not None:
            wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            self._wake = (wake_r, self._on_wake)
            # it may start again after stop(): the pipe goes with the object
            weakref.finalize(self, _close_fds, wake_r, self._wake_w)
        self.ready: threading.Event = self._io.ready
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def state(self) -> dict[str, Record]:
        return self._core.state

    @property
    def applied_seq(self) -> int:
        return self._core.applied_seq

    @property
    def epoch(self) -> int | None:
        return self._core.epoch

    def set_report(self, report: dict[Any, Any]) -> None:
        """Send ``report`` (a msgpack-able map, at most
        ``clone.MAX_REPORT_BYTES`` encoded, else ValueError) to the publisher
        with the next ack; call it again for each new report (e.g. every
        metrics flush). Thread-safe. Acks go at least once per heartbeat."""
        self._core.set_report(report)

    @property
    def snapshots(self) -> int:
        """Snapshots installed so far (the first one included)."""
        return self._core.snapshots

    def confirm(self, token: BatchToken) -> None:
        """Everything up to the ``on_batch`` call that gave ``token`` is
        applied: let the acks report it. Any thread; the bus thread sends the
        ack (one pipe byte wakes it)."""
        if self._wake is None:
            raise RuntimeError("confirm() is for a Subscriber made with on_batch")
        self._confirmed = token
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"x")

    def _on_wake(self, now: float) -> None:
        assert self._wake is not None
        with contextlib.suppress(BlockingIOError):
            while os.read(self._wake[0], 4096):
                pass
        token = self._confirmed  # read after the pipe is empty: none is missed
        if token is not None:
            self._core.confirm(token[0], token[1], now)

    def start(self) -> None:
        """Connect and start the thread; after :meth:`stop` it may start again
        (the state is kept and reconciled by the next snapshot)."""
        self._stopping.clear()
        self._io.open(time.monotonic())
        self._thread = threading.Thread(
            target=self._run, name=f"anywan-bus-sub-{self.worker_id}", daemon=True
        )
        self._thread.start()

    def _run(self) -> None:
        try:
            run_loop([self._io], self._stopping, self._wake)
        finally:
            self._io.close()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
