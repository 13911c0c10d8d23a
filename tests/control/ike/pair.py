"""An in-memory initiator↔responder pair (aioquic's client_and_server shape).

Two :class:`IkeEngine` objects, datagrams moved by hand, ``now`` a plain
variable stepped by the test. An optional NAT rewrites the initiator's source
as the responder sees it, like a masquerading router would.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from control.ike.engine import IkeConfig, IkeEngine, PeerIdentity, TunnelAuth
from control.ike.events import IkeEvent
from replication.records import TrafficSelector

ACCOUNT = "acct42"
TUNNEL = "f5407d8db1a542b196c59f6d04ba8bd1"
PSK = b"correct horse battery staple 0123"
SERVER_IP = "203.0.113.1"
CLIENT_IP = "198.51.100.7"
NAT_IP = "192.0.2.99"


def server_tunnel(**kw: object) -> TunnelAuth:
    args: dict[str, object] = dict(
        account_id=ACCOUNT,
        tunnel_id=TUNNEL,
        psk=PSK,
        local_addr=SERVER_IP,
        customer_endpoint=CLIENT_IP,
        local_ts=(TrafficSelector.from_network("10.0.0.0/8"),),
        remote_ts=(TrafficSelector.from_network("192.168.10.0/24"),),
    )
    args.update(kw)
    return TunnelAuth(**args)  # type: ignore[arg-type]


def client_tunnel(**kw: object) -> TunnelAuth:
    args: dict[str, object] = dict(
        account_id=ACCOUNT,
        tunnel_id=TUNNEL,
        psk=PSK,
        local_addr=CLIENT_IP,
        allow_null_cipher=True,
        local_ts=(TrafficSelector.from_network("192.168.10.0/24"),),
        remote_ts=(TrafficSelector.from_network("10.0.0.0/8"),),
    )
    args.update(kw)
    return TunnelAuth(**args)  # type: ignore[arg-type]


def make_lookup(tunnels: list[TunnelAuth]) -> Callable[[PeerIdentity], TunnelAuth | None]:
    def lookup(ident: PeerIdentity) -> TunnelAuth | None:
        if ident.kind == "ipv4":
            hits = [
                t
                for t in tunnels
                if t.customer_endpoint == ident.address and t.local_addr == ident.local_addr
            ]
            return hits[0] if len(hits) == 1 else None
        for t in tunnels:
            if t.account_id == ident.account_id and t.tunnel_id == ident.tunnel_id:
                return t
        return None

    return lookup


@dataclass
class Pair:
    client: IkeEngine
    server: IkeEngine
    now: float = 1000.0
    nat: bool = False
    """Masquerade the client's address/port towards the server."""
    nat_port_base: int = 40000
    drop: Callable[[bytes, bool], bool] | None = None
    """drop(data, to_server) → True to lose that datagram."""
    captured: list[tuple[bool, bytes]] = field(default_factory=list)
    client_events: list[IkeEvent] = field(default_factory=list)
    server_events: list[IkeEvent] = field(default_factory=list)

    def _nat_out(self, addr: tuple[str, int]) -> tuple[str, int]:
        if not self.nat:
            return addr
        return (NAT_IP, self.nat_port_base + addr[1])

    def _nat_in(self, addr: tuple[str, int]) -> tuple[str, int]:
        if not self.nat:
            return addr
        return (CLIENT_IP, addr[1] - self.nat_port_base)

    def transfer(self) -> int:
        """Move every pending datagram once in each direction; returns how many moved."""
        moved = 0
        for data, local, remote in self.client.datagrams_to_send():
            self.captured.append((True, data))
            if self.drop and self.drop(data, True):
                continue
            moved += 1
            self.server.receive_datagram(data, remote, self._nat_out(local), self.now)
        for data, local, remote in self.server.datagrams_to_send():
            self.captured.append((False, data))
            if self.drop and self.drop(data, False):
                continue
            moved += 1
            self.client.receive_datagram(data, self._nat_in(remote), local, self.now)
        self.collect()
        return moved

    def roundtrip(self, limit: int = 20) -> None:
        for _ in range(limit):
            if not self.transfer():
                return

    def collect(self) -> None:
        while (e := self.client.next_event()) is not None:
            self.client_events.append(e)
        while (e := self.server.next_event()) is not None:
            self.server_events.append(e)

    def step(self, seconds: float) -> None:
        """Advance time, firing both engines' timers in order, moving datagrams."""
        end = self.now + seconds
        for _ in range(100000):
            timers = [
                t for t in (self.client.get_timer(), self.server.get_timer()) if t is not None
            ]
            nxt = min(timers) if timers else None
            if nxt is None or nxt > end:
                break
            self.now = max(self.now, nxt)
            self.client.handle_timer(self.now)
            self.server.handle_timer(self.now)
            for eng in (self.client, self.server):
                # a deadline handle_timer() did not move would make a transport spin
                t = eng.get_timer()
                assert t is None or t > self.now, (t, self.now)
            self.roundtrip()
        self.now = end
        self.roundtrip()

    def connect(self, **kw: object) -> bytes:
        local = kw.pop("local", (CLIENT_IP, 500))
        tunnel = kw.pop("tunnel", client_tunnel())
        spi = self.client.initiate(
            tunnel,  # type: ignore[arg-type]
            local=local,  # type: ignore[arg-type]
            remote=(SERVER_IP, local[1]),  # type: ignore[index]
            now=self.now,
            **kw,  # type: ignore[arg-type]
        )
        self.roundtrip()
        return spi

    def events(self, kind: type, side: str = "server") -> list[IkeEvent]:
        evs = self.server_events if side == "server" else self.client_events
        return [e for e in evs if isinstance(e, kind)]


def make_pair(
    server_tunnels: list[TunnelAuth] | None = None,
    *,
    config: IkeConfig | None = None,
    client_config: IkeConfig | None = None,
    rng: Callable[[int], bytes] | None = None,
    **kw: object,
) -> Pair:
    """``rng``: one seeded byte source for both engines (reproducible nonces)."""
    cfg = config or IkeConfig(strict=True)
    ccfg = client_config or IkeConfig(strict=True)
    client = IkeEngine(ccfg, lambda ident: None, rng=rng)
    server = IkeEngine(cfg, make_lookup(server_tunnels or [server_tunnel()]), rng=rng)
    return Pair(client, server, **kw)  # type: ignore[arg-type]
