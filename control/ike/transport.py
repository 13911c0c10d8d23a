"""The asyncio (and uvloop) shell around :class:`control.ike.engine.IkeEngine`.

STYLE: aioquic's ``asyncio/protocol.py`` — this module only moves bytes,
events and one timer; every protocol decision is the engine's.

Two ways IKE reaches the engine:

* **direct UDP** sockets bound to an address on ports 500 and 4500
  (:meth:`IkeTransport.listen`). On 4500 (RFC 3948 §2.2) an IKE message
  starts with the four-octet non-ESP marker, which is stripped on receive and
  added on send; a one-octet ``0xFF`` is a NAT keepalive (§2.3) and is
  dropped; anything else on 4500 is ESP, which control does not carry (the
  workers do) — dropped and counted.
* the **relay** (``replication.relay.RelayServer``): workers own the anycast
  address and forward the IKE datagrams they receive as ``IkeDatagram``
  (already without marker). Replies to a peer last heard through the relay
  go back through the relay to the same worker.

After every input (and every timer) the transport takes what
``datagrams_to_send()`` returns, hands each ``next_event()`` to ``on_event``,
sends the datagrams, and re-arms one timer at ``get_timer()``. An event
handler may :meth:`IkeTransport.hold` the datagrams until something is done
(control: until every worker has a new Child SA, so the peer never learns of
an SA before the workers can decrypt it); later datagrams queue behind them.
``now`` is the loop's monotonic clock; ``config.unix_time_offset`` is set from
it so SA records carry Unix times.

Everything runs on the event loop thread. The relay calls back from its own
thread; those calls hop onto the loop with ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol

log = logging.getLogger("anywan.ike.transport")

Address = tuple[str, int]
NON_ESP_MARKER = b"\x00\x00\x00\x00"
NAT_KEEPALIVE = b"\xff"
IKE_PORT = 500
NAT_T_PORT = 4500
#: IKE header (RFC 7296 §3.1) is 28 octets; anything shorter is not IKE.
IKE_HEADER_LEN = 28
#: Peers remembered as "reached through the relay via worker X" (bounded).
MAX_RELAY_ROUTES = 200_000
#: Longest a :meth:`IkeTransport.hold` keeps datagrams back, whatever it waits
#: for (the peer retransmits after seconds; an answer must not wait that long).
MAX_HOLD = 1.0


class Engine(Protocol):
    """The part of ``IkeEngine`` the transport drives."""

    config: Any

    def receive_datagram(
        self, data: bytes, local: Address, remote: Address, now: float
    ) -> None: ...

    def datagrams_to_send(self) -> list[tuple[bytes, Address, Address]]: ...

    def get_timer(self) -> float | None: ...

    def handle_timer(self, now: float) -> None:
        """Must leave ``get_timer()`` None or later than ``now``: the transport
        re-arms at whatever it returns, so a deadline left behind would spin."""

    def next_event(self) -> object | None: ...


class Relay(Protocol):
    """``replication.relay.RelayServer`` as the transport uses it."""

    on_datagram: Callable[[Any], None] | None

    def send(self, reply: Any) -> None: ...


def classify_4500(payload: bytes) -> str:
    """RFC 3948 §2.2/§2.3: ``ike``, ``keepalive``, ``esp`` or ``short``."""
    if len(payload) == 1 and payload == NAT_KEEPALIVE:
        return "keepalive"
    if len(payload) < 4:
        return "short"
    if payload[:4] == NON_ESP_MARKER:
        return "ike"
    # Non-zero SPI in the first four octets: an ESP packet (§2.2).
    return "esp"


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, owner: IkeTransport, local: Address) -> None:
        self.owner = owner
        self.local = local
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self.owner._direct_in(data, self.local, (addr[0], addr[1]))

    def error_received(self, exc: Exception) -> None:
        # ICMP errors (port unreachable) for earlier sends: not fatal.
        self.owner.stats["socket_error"] += 1


def _factory(proto: _UdpProtocol) -> Callable[[], _UdpProtocol]:
    return lambda: proto


class IkeTransport:
    """Feeds one engine from UDP sockets and/or a relay; see the module doc.

    ``on_event(event)`` gets every engine event on the loop thread (an
    exception it raises is logged and counted, never propagated into I/O).
    ``datagram_factory`` builds relay replies; it defaults to
    ``replication.relay.IkeDatagram`` (imported when a relay is attached).
    """

    def __init__(
        self,
        engine: Engine,
        *,
        on_event: Callable[[object], None] | None = None,
        on_flush: Callable[[], None] | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.engine = engine
        self.on_event = on_event
        self.on_flush = on_flush
        """Called in every flush once its events were handled, before its
        datagrams are sent: control writes the IKE SAs the flush touched
        first, so no message reaches a peer ahead of the saved state."""
        self._loop = loop
        self._sockets: dict[Address, _UdpProtocol] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._relay: Relay | None = None
        self._datagram_factory: Callable[..., Any] | None = None
        # (local, remote) -> worker_id for peers last heard through the relay.
        self._relay_routes: OrderedDict[tuple[Address, Address], str] = OrderedDict()
        self._closed = False
        #: Datagrams taken from the engine and not sent yet, in order, with the
        #: holds (barrier tasks) placed in front of the datagrams they keep back.
        self._queue: deque[tuple[bytes, Address, Address] | asyncio.Task[None]] = deque()
        self._starts: list[int] = []  # where each running flush's datagrams begin
        self._blocked_on: asyncio.Task[None] | None = None
        #: Counters for metrics: received/sent per path, drops by reason.
        self.stats: Counter[str] = Counter()

    # -- setup -----------------------------------------------------------------
    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    def now(self) -> float:
        return self.loop.time()

    def _sync_clock(self) -> None:
        config = getattr(self.engine, "config", None)
        if config is not None and hasattr(config, "unix_time_offset"):
            config.unix_time_offset = time.time() - self.loop.time()

    async def listen(self, address: str, ports: Iterable[int] = (IKE_PORT, NAT_T_PORT)) -> None:
        """Bind UDP sockets on ``address`` for each port (500 and 4500)."""
        self._sync_clock()
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        for port in ports:
            local = (address, port)
            if local in self._sockets:
                continue
            sock = socket.socket(family, socket.SOCK_DGRAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(local)
                sock.setblocking(False)
                proto = _UdpProtocol(self, local)
                await self.loop.create_datagram_endpoint(_factory(proto), sock=sock)
            except BaseException:
                sock.close()
                raise
            self._sockets[local] = proto

    def attach_relay(
        self, relay: Relay, *, datagram_factory: Callable[..., Any] | None = None
    ) -> None:
        """Take IKE datagrams from ``relay`` (a ``RelayServer`` not yet
        started) and send replies to relayed peers back through it."""
        if datagram_factory is None:
            from replication.relay import IkeDatagram

            datagram_factory = IkeDatagram
        self._sync_clock()
        self._relay = relay
        self._datagram_factory = datagram_factory
        loop = self.loop

        def from_relay_thread(dgram: Any) -> None:
            loop.call_soon_threadsafe(self._relay_in, dgram)

        relay.on_datagram = from_relay_thread

    def close(self) -> None:
        self._closed = True
        for item in self._queue:
            if isinstance(item, asyncio.Task):
                item.cancel()
        self._queue.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for proto in self._sockets.values():
            if proto.transport is not None:
                proto.transport.close()
        self._sockets.clear()
        if self._relay is not None:
            self._relay.on_datagram = None

    # -- input -----------------------------------------------------------------
    def _direct_in(self, data: bytes, local: Address, remote: Address) -> None:
        if local[1] == NAT_T_PORT:
            kind = classify_4500(data)
            if kind != "ike":
                self.stats[f"drop_{kind}"] += 1
                return
            data = data[4:]
        if len(data) < IKE_HEADER_LEN:
            self.stats["drop_short"] += 1
            return
        self.stats["rx_direct"] += 1
        # A direct packet from this peer: replies go direct from now on.
        self._relay_routes.pop((local, remote), None)
        self._feed(data, local, remote)

    def _relay_in(self, dgram: Any) -> None:
        if self._closed:
            return
        try:
            local = (str(dgram.local_addr), int(dgram.local_port))
            remote = (str(dgram.remote_addr), int(dgram.remote_port))
            data = bytes(dgram.data)
            worker = str(dgram.worker_id)
        except (AttributeError, TypeError, ValueError):
            self.stats["drop_relay_malformed"] += 1
            return
        if local[1] not in (IKE_PORT, NAT_T_PORT) or len(data) < IKE_HEADER_LEN:
            self.stats["drop_relay_malformed"] += 1
            return
        self.stats["rx_relay"] += 1
        key = (local, remote)
        self._relay_routes[key] = worker
        self._relay_routes.move_to_end(key)
        while len(self._relay_routes) > MAX_RELAY_ROUTES:
            self._relay_routes.popitem(last=False)
        self._feed(data, local, remote)

    def feed(self, data: bytes, local: Address, remote: Address) -> None:
        """Hand one IKE message (no marker) to the engine as if received now."""
        self._feed(data, local, remote)

    def _feed(self, data: bytes, local: Address, remote: Address) -> None:
        try:
            self.engine.receive_datagram(data, local, remote, self.now())
        except Exception:
            # The engine promises never to raise; if it does, keep serving.
            self.stats["engine_error"] += 1
            log.exception("IKE engine raised on a datagram from %s:%d", *remote)
        self.flush()

    def call(self, func: Callable[..., Any], *args: Any) -> Any:
        """Run ``func(*args, now)`` on the engine (e.g. ``engine.delete_tunnel``)
        and then send/dispatch what it produced. Loop thread only."""
        try:
            return func(*args, self.now())
        finally:
            self.flush()

    # -- output ----------------------------------------------------------------
    def flush(self) -> None:
        """Take pending datagrams, dispatch events, send the datagrams (unless
        a handler held them), re-arm the timer."""
        if self._closed:
            return
        try:
            out = self.engine.datagrams_to_send()
        except Exception:
            self.stats["engine_error"] += 1
            log.exception("IKE engine raised in datagrams_to_send")
            out = []
        # queued before any handler runs: a nested flush (a handler calling
        # into the engine) queues its datagrams after these
        self._starts.append(len(self._queue))
        self._queue.extend(out)
        try:
            self._dispatch_events()
        finally:
            self._starts.pop()
        if self.on_flush is not None:
            try:
                self.on_flush()
            except Exception:
                self.stats["event_handler_error"] += 1
                log.exception("IKE flush handler raised")
        self._send_queue()
        self._arm_timer()

    def hold(self, until: Awaitable[object]) -> None:
        """Keep the datagrams of the flush running now back until ``until`` is
        done (its result and errors are ignored), :data:`MAX_HOLD` seconds at
        most. Later datagrams queue behind them (order is kept); earlier ones
        are not held. For event handlers: control holds the answer that tells
        the peer about a new Child SA until every worker has applied it."""
        barrier = self.loop.create_task(self._bounded(until))
        if self._starts:
            self._queue.insert(self._starts[-1], barrier)
        else:
            self._queue.append(barrier)

    async def _bounded(self, until: Awaitable[object]) -> None:
        try:
            await asyncio.wait_for(until, MAX_HOLD)
        except TimeoutError:
            self.stats["hold_timeout"] += 1
        except Exception:  # a failed wait releases the datagrams all the same
            pass
        self.stats["held"] += 1

    def _send_queue(self) -> None:
        """Send queued datagrams up to the first hold that is not done; that
        hold's completion sends the rest."""
        if self._starts or self._closed:
            return  # the outermost flush sends them, after every handler ran
        q = self._queue
        while q:
            item = q[0]
            if isinstance(item, asyncio.Task):
                if not item.done():
                    if self._blocked_on is not item:
                        self._blocked_on = item
                        item.add_done_callback(lambda _t: self._send_queue())
                    return
                q.popleft()
                continue
            q.popleft()
            self._send(*item)

    def _dispatch_events(self) -> None:
        while True:
            try:
                event = self.engine.next_event()
            except Exception:
                self.stats["engine_error"] += 1
                log.exception("IKE engine raised in next_event")
                break
            if event is None:
                break
            self.stats["events"] += 1
            if self.on_event is not None:
                try:
                    self.on_event(event)
                except Exception:
                    self.stats["event_handler_error"] += 1
                    log.exception("IKE event handler raised on %s", type(event).__name__)

    def _send(self, data: bytes, local: Address, remote: Address) -> None:
        key = (local, remote)
        worker = self._relay_routes.get(key)
        proto = self._sockets.get(local)
        if worker is None and proto is not None and proto.transport is not None:
            payload = NON_ESP_MARKER + data if local[1] == NAT_T_PORT else data
            proto.transport.sendto(payload, remote)
            self.stats["tx_direct"] += 1
            return
        if self._relay is not None and self._datagram_factory is not None:
            reply = self._datagram_factory(
                worker_id=worker or "",
                data=bytes(data),
                local_addr=local[0],
                local_port=local[1],
                remote_addr=remote[0],
                remote_port=remote[1],
            )
            try:
                self._relay.send(reply)
            except Exception:
                self.stats["drop_relay_send"] += 1
                log.exception("relay send failed")
                return
            self.stats["tx_relay"] += 1
            return
        self.stats["drop_no_route"] += 1

    def _arm_timer(self) -> None:
        try:
            at = self.engine.get_timer()
        except Exception:
            self.stats["engine_error"] += 1
            log.exception("IKE engine raised in get_timer")
            at = None
        if at == self._timer_at and (at is None or self._timer is not None):
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = at
        if at is not None:
            # No guard against a deadline that handle_timer() left in the past:
            # the engine promises never to (IkeEngine.handle_timer).
            self._timer = self.loop.call_at(at, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        if self._closed:
            return
        try:
            self.engine.handle_timer(self.now())
        except Exception:
            self.stats["engine_error"] += 1
            log.exception("IKE engine raised in handle_timer")
        self.flush()
