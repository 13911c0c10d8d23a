"""A per-node bus proxy: one subscription to control, re-served to local workers.

With N workers per node, control would otherwise serve N snapshots and N
streams per node. The forwarder subscribes once (a :class:`CloneClient` like
any worker) and runs a publisher in *mirror* mode for the node's workers:

* its snapshots carry the upstream epoch and sequence, and its stream
  republishes every upstream update with the upstream sequence number, so a
  worker behind a forwarder follows exactly the same rules as one attached
  to control directly;
* when the forwarder itself re-snapshots (gap, upstream restart), its
  heartbeats announce the new sequence/epoch and the workers re-snapshot from
  it, with the same no-churn diffing as anywhere else;
* while control is unreachable it keeps serving the last state it had, so
  workers keep forwarding through a control restart;
* workers' acks (and the reports they carry) are passed upstream unchanged, so control's
  ``applied_everywhere`` counts the workers themselves, not the forwarder.

Everything runs in one thread: upstream client sockets and downstream server
sockets share one poll loop, so no state crosses threads.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterable

import zmq
from prometheus_client import CollectorRegistry

from replication import clone
from replication.metrics import SubscriberMetrics
from replication.publisher import Publisher
from replication.subscriber import _ClientIO


class Forwarder:
    """Upstream: control's endpoints and this node's client key pair.
    Downstream: the endpoints local workers connect to, served with
    ``local_public``/``local_secret`` to ``allowed_clients``."""

    def __init__(
        self,
        *,
        upstream_snapshot: str,
        upstream_update: str,
        upstream_ack: str,
        server_public: bytes,
        client_public: bytes,
        client_secret: bytes,
        worker_id: str,
        snapshot_endpoint: str,
        update_endpoint: str,
        ack_endpoint: str,
        local_public: bytes,
        local_secret: bytes,
        allowed_clients: Iterable[bytes],
        heartbeat_interval: float = 0.5,
        heartbeat_timeout: float = 2.0,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.core = clone.CloneClient(worker_id, heartbeat_timeout=heartbeat_timeout, keep_raw=True)
        self.publisher = Publisher(
            snapshot_endpoint=snapshot_endpoint,
            update_endpoint=update_endpoint,
            ack_endpoint=ack_endpoint,
            server_public=local_public,
            server_secret=local_secret,
            allowed_clients=allowed_clients,
            heartbeat_interval=heartbeat_interval,
            registry=self.registry,
        )
        self.publisher._mirror_mode()
        self.publisher.on_ack = self._forward_ack
        self._io = _ClientIO(
            snapshot_endpoint=upstream_snapshot,
            update_endpoint=upstream_update,
            ack_endpoint=upstream_ack,
            server_public=server_public,
            client_public=client_public,
            client_secret=client_secret,
            core=self.core,
            metrics=SubscriberMetrics(self.registry),
            on_set=None,
            on_delete=None,
            on_event=self._on_event,
        )
        self.ready = self._io.ready
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def snapshot_endpoint(self) -> str:
        return self.publisher.snapshot_endpoint

    @property
    def update_endpoint(self) -> str:
        return self.publisher.update_endpoint

    @property
    def ack_endpoint(self) -> str:
        return self.publisher.ack_endpoint

    def start(self) -> None:
        self.publisher._open()
        self._io.open(time.monotonic())
        self._thread = threading.Thread(target=self._run, name="anywan-bus-fwd", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self.publisher._wake()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _on_event(self, ev: clone.Event) -> None:
        if isinstance(ev, clone.SnapshotInstalled):
            assert ev.raw is not None
            self.publisher._mirror_install(ev.epoch, ev.seq, ev.raw)
        elif isinstance(ev, clone.Sequenced):
            self.publisher._mirror_update(ev.epoch, ev.seq, ev.key, ev.value)

    def _forward_ack(self, frames: list[bytes]) -> None:
        if self._io.ctx is not None:
            with contextlib.suppress(zmq.ZMQError):
                self._io.push.send_multipart(frames, zmq.NOBLOCK)

    def _run(self) -> None:
        pub, io = self.publisher, self._io
        poller, registered = zmq.Poller(), None
        try:
            while not self._stopping.is_set():
                now = time.monotonic()
                deadlines = [pub._next_deadline()]
                if (t := io.timer()) is not None:
                    deadlines.append(t)
                if io.sockets() != registered:  # a snapshot connection came or went
                    registered = io.sockets()
                    poller = zmq.Poller()
                    for s in (*registered, *pub._poll_items()):
                        poller.register(s, zmq.POLLIN)
                    poller.register(pub._wake_r, zmq.POLLIN)
                try:
                    ready = dict(poller.poll(clone.poll_timeout_ms(min(deadlines), now)))
                except zmq.ZMQError:
                    break
                now = time.monotonic()
                for s in io.sockets():
                    if s in ready:
                        io.on_ready(s, now)
                io.process(now)
                pub._handle(ready, now)
        finally:
            io.close()
            pub._close()
