"""IKE relay: datagrams between the workers' UDP 500/4500 sockets and control.

Workers hold the anycast address and receive IKE; only control negotiates.
A worker forwards each IKE datagram with its original addresses and ports
(:class:`IkeDatagram`) to control over a CURVE DEALER→ROUTER connection;
control's replies go back to the worker that relayed the exchange, which
sends them from its own socket, so they leave with the anycast source address
and the port the peer used (the 500→4500 float and NAT mappings keep working
whichever worker the network picks).

If that worker is gone (no ping for ``worker_timeout``, or ZeroMQ reports it
unroutable), the reply goes to any other live worker (the most recently
heard first): every worker owns the same anycast address and ports, so any of
them can send it. With no live worker the reply is dropped and counted.

Wire (msgpack map per datagram, one ZeroMQ frame)::

    worker → control   [b"PING"]  every ping_interval (liveness)
    worker → control   [b"DGRAM", msgpack{worker_id, data, local_addr, local_port,
                                          remote_addr, remote_port}]
    control → worker   [b"DGRAM", msgpack{...}]

The ROUTER knows a worker by its routing id, which is its worker id; the
worker id inside a datagram from a worker is overwritten with that routing id
so a worker cannot claim to be another.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import msgpack
import zmq
from prometheus_client import CollectorRegistry

from replication.clone import check_worker_id, poll_timeout_ms
from replication.curve import AllowList, configure_client, configure_server
from replication.metrics import RelayMetrics

log = logging.getLogger("anywan.bus.relay")

PING = b"PING"
DGRAM = b"DGRAM"
MAX_DATAGRAM = 65535
QUEUE_LIMIT = 10_000
"""Datagrams waiting for the relay thread before new ones are dropped."""


class RelayError(ValueError):
    """A relay message that does not parse; ``reason`` is a metric label."""

    reason = "malformed"


@dataclass(frozen=True, slots=True)
class IkeDatagram:
    """One IKE message and where it came from / goes to.

    ``data`` is the IKE message without the RFC 3948 non-ESP marker;
    ``local_port`` (500 or 4500) says which socket it arrived on / leaves from.
    """

    worker_id: str
    data: bytes
    local_addr: str
    local_port: int
    remote_addr: str
    remote_port: int

    def to_wire(self) -> bytes:
        out: bytes = msgpack.packb(
            {
                "worker_id": self.worker_id,
                "data": self.data,
                "local_addr": self.local_addr,
                "local_port": self.local_port,
                "remote_addr": self.remote_addr,
                "remote_port": self.remote_port,
            },
            use_bin_type=True,
        )
        return out

    @classmethod
    def from_wire(cls, raw: bytes) -> IkeDatagram:
        try:
            obj = msgpack.unpackb(raw, raw=False, max_bin_len=MAX_DATAGRAM)
        except Exception:
            raise RelayError("not msgpack") from None
        if not isinstance(obj, dict) or set(obj) != {
            "worker_id",
            "data",
            "local_addr",
            "local_port",
            "remote_addr",
            "remote_port",
        }:
            raise RelayError("wrong fields")
        ok = (
            isinstance(obj["worker_id"], str)
            and isinstance(obj["data"], bytes)
            and 0 < len(obj["data"]) <= MAX_DATAGRAM
            and all(_is_port(obj[k]) for k in ("local_port", "remote_port"))
            and all(_is_addr(obj[k]) for k in ("local_addr", "remote_addr"))
        )
        if not ok:
            raise RelayError("bad field")
        return cls(**obj)


def _is_port(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 65535


def _is_addr(v: object) -> bool:
    if not isinstance(v, str):
        return False
    try:
        ipaddress.ip_address(v)
    except ValueError:
        return False
    return True


class _Thread:
    """A socket thread with a thread-safe outbox and a wake-up pipe."""

    name = "anywan-relay"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._outbox: deque[IkeDatagram] = deque()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._wake_r = self._wake_w = -1

    def _enqueue(self, d: IkeDatagram) -> bool:
        with self._lock:
            if len(self._outbox) >= QUEUE_LIMIT:
                return False
            self._outbox.append(d)
        if self._wake_w >= 0:
            with contextlib.suppress(OSError):
                os.write(self._wake_w, b"\0")
        return True

    def _drain(self) -> list[IkeDatagram]:
        with contextlib.suppress(BlockingIOError):
            os.read(self._wake_r, 4096)
        with self._lock:
            out = list(self._outbox)
            self._outbox.clear()
        return out

    def _start_thread(self) -> None:
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    @property
    def thread_died(self) -> bool:
        """Started, and its socket thread has exited while meant to run (a
        ZeroMQ error or a bug): nothing is relayed any more. Read by /healthz."""
        thread = self._thread
        return thread is not None and not thread.is_alive()

    def _stop_thread(self) -> None:
        self._stopping.set()
        if self._wake_w >= 0:
            with contextlib.suppress(OSError):
                os.write(self._wake_w, b"\0")
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1

    def _run(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError


class RelayServer(_Thread):
    """Control's end. Set :attr:`on_datagram` before :meth:`start`; it runs in
    the relay thread (hand the datagram to your event loop from there)."""

    name = "anywan-relay-server"

    def __init__(
        self,
        *,
        endpoint: str,
        server_public: bytes,
        server_secret: bytes,
        allowed_clients: Iterable[bytes],
        worker_timeout: float = 3.0,
        registry: CollectorRegistry | None = None,
    ) -> None:
        super().__init__()
        self.endpoint = endpoint
        self._keys = (server_public, server_secret)
        self._allowed = list(allowed_clients)
        self.worker_timeout = worker_timeout
        self.metrics = RelayMetrics(registry)
        self.on_datagram: Callable[[IkeDatagram], None] | None = None
        self._workers: dict[str, float] = {}
        self._ctx: zmq.Context[zmq.Socket[bytes]] | None = None
        self._auth: AllowList | None = None

    def start(self) -> None:
        self._ctx = zmq.Context()
        self._auth = AllowList(self._ctx, self._allowed)
        self._auth.start()
        try:
            self._sock = self._ctx.socket(zmq.ROUTER)
            self._sock.linger = 0
            self._sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
            self._sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
            configure_server(self._sock, *self._keys)
            self._sock.bind(self.endpoint)
            self.endpoint = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        except zmq.ZMQError:
            self._auth.stop()
            self._ctx.destroy(linger=0)
            raise
        self._start_thread()

    def stop(self) -> None:
        self._stop_thread()
        if self._auth is not None:
            self._auth.stop()
        if self._ctx is not None:
            self._ctx.destroy(linger=0)
            self._ctx = None

    def send(self, reply: IkeDatagram) -> None:
        """Queue ``reply`` for ``reply.worker_id`` (or any live worker). Thread-safe."""
        if not self._enqueue(reply):
            self.metrics.dropped.labels("queue_full").inc()

    def live_workers(self) -> list[str]:
        now = time.monotonic()
        with self._lock:
            return [w for w, t in self._workers.items() if now - t <= self.worker_timeout]

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        while not self._stopping.is_set():
            try:
                ready = dict(poller.poll(500))
            except zmq.ZMQError:
                break
            if self._sock in ready:
                self._receive()
            if self._wake_r in ready:
                for d in self._drain():
                    self._route(d)
            self.metrics.live_workers.set(len(self.live_workers()))

    def _receive(self) -> None:
        for _ in range(1000):
            try:
                frames = self._sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) < 2:
                continue
            try:
                worker = frames[0].decode("utf-8")
            except UnicodeDecodeError:
                continue
            with self._lock:
                self._workers[worker] = time.monotonic()
            if frames[1] != DGRAM:
                continue  # PING: liveness only
            if len(frames) != 3:
                self.metrics.dropped.labels("malformed").inc()
                continue
            try:
                d = IkeDatagram.from_wire(frames[2])
            except RelayError:
                self.metrics.dropped.labels("malformed").inc()
                continue
            if d.worker_id != worker:
                d = IkeDatagram(
                    worker, d.data, d.local_addr, d.local_port, d.remote_addr, d.remote_port
                )
            self.metrics.datagrams.labels("to_control").inc()
            if self.on_datagram is not None:
                try:
                    self.on_datagram(d)
                except Exception as exc:
                    log.error("on_datagram failed: %s", type(exc).__name__)

    def _route(self, d: IkeDatagram) -> None:
        now = time.monotonic()
        with self._lock:
            live = sorted(
                (t, w) for w, t in self._workers.items() if now - t <= self.worker_timeout
            )
        order = [w for _, w in reversed(live) if w != d.worker_id]
        if any(w == d.worker_id for _, w in live):
            order.insert(0, d.worker_id)
        payload = d.to_wire()
        for worker in order:
            try:
                self._sock.send_multipart([worker.encode("utf-8"), DGRAM, payload], zmq.NOBLOCK)
            except zmq.ZMQError as exc:  # gone (EHOSTUNREACH) or full: try the next one
                if exc.errno == zmq.EHOSTUNREACH:
                    with self._lock:
                        self._workers.pop(worker, None)
                continue
            self.metrics.datagrams.labels("to_worker").inc()
            return
        self.metrics.dropped.labels("no_worker").inc()


class RelayClient(_Thread):
    """A worker's end. ``on_reply`` runs in the relay thread."""

    name = "anywan-relay-client"

    def __init__(
        self,
        *,
        endpoint: str,
        server_public: bytes,
        client_public: bytes,
        client_secret: bytes,
        worker_id: str,
        on_reply: Callable[[IkeDatagram], None],
        ping_interval: float = 1.0,
        registry: CollectorRegistry | None = None,
    ) -> None:
        super().__init__()
        self.endpoint = endpoint
        self._keys = (server_public, client_public, client_secret)
        self.worker_id = worker_id
        self._wid = check_worker_id(worker_id)
        self.on_reply = on_reply
        self.ping_interval = ping_interval
        self.metrics = RelayMetrics(registry)
        self._ctx: zmq.Context[zmq.Socket[bytes]] | None = None

    def start(self) -> None:
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.linger = 0
        self._sock.routing_id = self._wid
        self._sock.sndhwm = QUEUE_LIMIT
        configure_client(self._sock, *self._keys)
        self._sock.connect(self.endpoint)
        self._start_thread()

    def stop(self) -> None:
        self._stop_thread()
        if self._ctx is not None:
            self._ctx.destroy(linger=0)
            self._ctx = None

    def forward(self, dgram: IkeDatagram) -> None:
        """Queue an IKE datagram for control. Thread-safe, never blocks."""
        if not self._enqueue(dgram):
            self.metrics.dropped.labels("queue_full").inc()

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        next_ping = 0.0
        while not self._stopping.is_set():
            now = time.monotonic()
            if now >= next_ping:
                with contextlib.suppress(zmq.ZMQError):
                    self._sock.send_multipart([PING], zmq.NOBLOCK)
                next_ping = now + self.ping_interval
            try:
                ready = dict(poller.poll(poll_timeout_ms(next_ping, now)))
            except zmq.ZMQError:
                break
            if self._wake_r in ready:
                for d in self._drain():
                    try:
                        self._sock.send_multipart([DGRAM, d.to_wire()], zmq.NOBLOCK)
                    except zmq.ZMQError:
                        self.metrics.dropped.labels("queue_full").inc()
                        continue
                    self.metrics.datagrams.labels("to_control").inc()
            if self._sock in ready:
                self._receive()

    def _receive(self) -> None:
        for _ in range(1000):
            try:
                frames = self._sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) != 2 or frames[0] != DGRAM:
                self.metrics.dropped.labels("malformed").inc()
                continue
            try:
                d = IkeDatagram.from_wire(frames[1])
            except RelayError:
                self.metrics.dropped.labels("malformed").inc()
                continue
            self.metrics.datagrams.labels("to_worker").inc()
            try:
                self.on_reply(d)
            except Exception as exc:
                log.error("on_reply failed: %s", type(exc).__name__)
