"""TUN devices for the inner side: one multi-queue device per account.

Thin I/O adapter. :func:`open_queue` opens ``/dev/net/tun`` with
``IFF_TUN | IFF_NO_PI | IFF_MULTI_QUEUE`` (Documentation/networking/tuntap.rst
§3.3): every worker process attaches its own queue to the *same* device name,
and the kernel spreads outgoing (to-the-tunnel) flows across the queues. The
device is not persistent: it disappears with its last queue, so a node whose
workers all stopped leaves nothing behind, while a SIGKILLed worker's queue is
simply closed and the other queues carry on.

Tenancy (issue 10): an account's TUN lives in the account's own network
namespace, so two accounts can use the same inner prefixes and addresses. The
namespace is created when missing; the queue is attached from inside it
(``setns`` on the calling thread only, then back).

:class:`TunConfig` puts addresses, MTU and routes on the device with pyroute2
(idempotent: every worker may apply the same configuration).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import ipaddress
import os
import struct
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from pyroute2 import IPRoute, NetNS, netns

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_MULTI_QUEUE = 0x0100
IFF_VNET_HDR = 0x4000
VNET_HDR_LEN = 10
"""``struct virtio_net_hdr`` in front of every packet read or written on a
queue opened with ``vnet_hdr=True`` (little-endian on x86: TUN's legacy
native byte order)."""
CLONE_NEWNET = 0x40000000
NETNS_RUN_DIR = "/run/netns"


class TunError(RuntimeError):
    """A TUN device could not be opened or configured; the message says why."""


class TunGone(TunError):
    """The TUN device to configure does not exist (any more): deleted while
    its queues were open, which leaves them dead."""


_libc: Any = None


def _setns(fd: int) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def enter_netns(name: str) -> None:
    """Move the calling thread (the process, if it has no other) into ``name``."""
    fd = os.open(f"{NETNS_RUN_DIR}/{name}", os.O_RDONLY)
    try:
        _setns(fd)
    finally:
        os.close(fd)


@contextmanager
def in_netns(name: str | None) -> Iterator[None]:
    """Run the block with this *thread* inside namespace ``name`` (None = stay)."""
    if name is None:
        yield
        return
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(f"{NETNS_RUN_DIR}/{name}", os.O_RDONLY)
        try:
            _setns(target)
        except OSError as exc:
            # EINVAL: the name exists but is not (yet) a namespace; said as
            # such, not as whatever the caller was about to do inside it
            raise TunError(f"cannot enter network namespace {name!r}: {exc.strerror}") from None
        finally:
            os.close(target)
        try:
            yield
        finally:
            _setns(own)
    finally:
        os.close(own)


def _is_netns(path: str) -> bool:
    """``path`` is a namespace (a bind mount of nsfs), not just the empty
    file ``ip netns add`` / pyroute2 create first and mount over after."""
    try:
        return os.stat(path).st_dev == os.stat("/proc/self/ns/net").st_dev
    except OSError:
        return False


def wait_netns(name: str, timeout: float = 2.0) -> None:
    """Wait until ``name`` is a usable namespace: another process (a sibling
    worker) that is creating it has mounted it. TunError after ``timeout``."""
    path = f"{NETNS_RUN_DIR}/{name}"
    deadline = time.monotonic() + timeout
    while not _is_netns(path):
        if time.monotonic() >= deadline:
            raise TunError(f"{path} exists but is not a network namespace")
        time.sleep(0.01)


def ensure_netns(name: str) -> bool:
    """Create namespace ``name`` if missing (lo up); True if it was created.
    If another process is creating it right now, wait (2 s at most) until it
    can be entered."""
    if os.path.exists(f"{NETNS_RUN_DIR}/{name}"):
        wait_netns(name)
        return False
    try:
        netns.create(name)
    except FileExistsError:
        wait_netns(name)
        return False
    except OSError as exc:
        if exc.errno == errno.EEXIST:
            wait_netns(name)
            return False
        raise
    with NetNS(name, flags=0) as ns:
        idx = ns.link_lookup(ifname="lo")
        if idx:
            ns.link("set", index=idx[0], state="up")
    return True


def open_queue(
    name: str, *, netns_name: str | None = None, multi_queue: bool = True, vnet_hdr: bool = False
) -> int:
    """Attach one queue of TUN device ``name``; returns a non-blocking fd.

    ``vnet_hdr``: IFF_VNET_HDR, every packet read or written carries a
    :data:`VNET_HDR_LEN`-octet ``virtio_net_hdr`` first (:class:`GsoTunWriter`
    uses it to write merged TCP segments). All queues of a device must agree.

    Raises :class:`TunError` with an operator-readable reason (no permission,
    no /dev/net/tun, device exists without multi-queue, name too long).
    """
    if not 0 < len(name) <= 15:
        raise TunError(f"TUN name {name!r} must be 1-15 characters")
    flags = IFF_TUN | IFF_NO_PI | (IFF_MULTI_QUEUE if multi_queue else 0)
    if vnet_hdr:
        flags |= IFF_VNET_HDR
    try:
        with in_netns(netns_name):
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
            try:
                fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), flags))
            except OSError:
                os.close(fd)
                raise
    except FileNotFoundError as exc:
        raise TunError(
            f"cannot open TUN {name!r}: {exc.filename or '/dev/net/tun'} missing "
            "(modprobe tun, or the network namespace does not exist)"
        ) from None
    except PermissionError:
        raise TunError(
            f"cannot open TUN {name!r}: permission denied (needs CAP_NET_ADMIN: "
            "run as root or grant the capability)"
        ) from None
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            raise TunError(
                f"cannot attach to TUN {name!r}: a device of that name exists with other "
                "flags (not a multi-queue TUN?)"
            ) from None
        if exc.errno == errno.EPERM:
            raise TunError(
                f"cannot open TUN {name!r}: operation not permitted (needs CAP_NET_ADMIN)"
            ) from None
        raise TunError(f"cannot open TUN {name!r}: {exc.strerror}") from None
    return fd


def probe() -> None:
    """Create and drop a throw-away TUN device: :class:`TunError` now, at start,
    rather than when the first account appears, if TUN devices are refused."""
    fd = open_queue(f"awprobe{os.getpid() % 10_000_000}", multi_queue=False)
    os.close(fd)


class TunConfig:
    """Addresses, MTU and routes of one TUN device, applied idempotently."""

    def __init__(self, name: str, *, netns_name: str | None = None) -> None:
        self.name = name
        self.netns_name = netns_name

    def _ipr(self) -> Any:
        return IPRoute() if self.netns_name is None else NetNS(self.netns_name, flags=0)

    def open(self) -> Any:
        """A netlink handle for :meth:`apply` that the caller keeps and closes:
        for another namespace, pyroute2 forks a child to make each one
        (~6 ms), so a caller that applies often keeps one per namespace."""
        return self._ipr()

    def apply(
        self,
        *,
        mtu: int,
        addresses: Iterable[str] = (),
        routes: Iterable[str] = (),
        remove_routes: Iterable[str] = (),
        ipr: Any = None,
    ) -> int:
        """Bring the device up with ``mtu``, add ``a.b.c.d/len`` addresses and
        route each prefix in ``routes`` to the device (replace semantics).
        ``ipr``: a handle from :meth:`open` (else one is made for this call).
        Returns the device's interface index."""
        if ipr is None:
            with self._ipr() as own:
                return self._apply(own, mtu, addresses, routes, remove_routes)
        return self._apply(ipr, mtu, addresses, routes, remove_routes)

    def _apply(
        self,
        ipr: Any,
        mtu: int,
        addresses: Iterable[str],
        routes: Iterable[str],
        remove_routes: Iterable[str],
    ) -> int:
        found = ipr.link_lookup(ifname=self.name)
        if not found:
            raise TunGone(f"TUN {self.name!r} not found in {self.netns_name or 'root'} netns")
        idx = found[0]
        ipr.link("set", index=idx, mtu=mtu, state="up")
        for cidr in addresses:
            iface = ipaddress.ip_interface(cidr)
            try:
                ipr.addr(
                    "add",
                    index=idx,
                    address=str(iface.ip),
                    prefixlen=iface.network.prefixlen,
                )
            except Exception as exc:
                if getattr(exc, "code", None) != errno.EEXIST:
                    raise
        for prefix in routes:
            ipr.route("replace", **_route_fields(prefix, idx))
        for prefix in remove_routes:
            try:
                ipr.route("del", **_route_fields(prefix, idx))
            except Exception as exc:
                if getattr(exc, "code", None) not in (errno.ESRCH, errno.ENOENT):
                    raise
        return int(idx)


def _route_fields(prefix: str, oif: int) -> dict[str, Any]:
    """Netlink fields of the route of ``prefix`` into device ``oif``."""
    net = ipaddress.ip_network(prefix)
    return {
        "dst": str(net.network_address),
        "dst_len": net.prefixlen,
        "oif": oif,
        "family": 10 if net.version == 6 else 2,
    }


# --------------------------------------------------------------------------
# Watching the namespace: routes or the device changed by someone else
# --------------------------------------------------------------------------

_NLMSG = struct.Struct("=IHHII")
_RTMSG = struct.Struct("=BBBBBBBBI")
_IFINFO = struct.Struct("=BxHiII")
_RTA = struct.Struct("=HH")
RTM_NEWLINK, RTM_DELLINK, RTM_DELROUTE = 16, 17, 25
_RTA_DST, _RTA_OIF = 1, 4
_RTMGRP_LINK, _RTMGRP_IPV4_ROUTE, _RTMGRP_IPV6_ROUTE = 0x1, 0x40, 0x400
_IFF_UP = 0x1


def parse_netlink_events(data: bytes, ifindex: int) -> tuple[list[str], bool]:
    """From rtnetlink notifications (rtnetlink(7)): the prefixes of routes
    into device ``ifindex`` that were deleted, and whether that device went
    down or away. Anything else, and anything truncated, is skipped: this
    only decides what to re-check, so a message it cannot read costs nothing
    but that."""
    deleted: list[str] = []
    down = False
    off = 0
    while off + _NLMSG.size <= len(data):
        length, kind = _NLMSG.unpack_from(data, off)[:2]
        if length < _NLMSG.size or off + length > len(data):
            break
        body, end = off + _NLMSG.size, off + length
        off += (length + 3) & ~3
        if kind in (RTM_NEWLINK, RTM_DELLINK) and body + _IFINFO.size <= end:
            _, _, index, flags, _ = _IFINFO.unpack_from(data, body)
            if index == ifindex and (kind == RTM_DELLINK or not flags & _IFF_UP):
                down = True
        elif kind == RTM_DELROUTE and body + _RTMSG.size <= end:
            family, dst_len = _RTMSG.unpack_from(data, body)[:2]
            dst = oif = None
            a = body + _RTMSG.size
            while a + _RTA.size <= end:
                alen, atype = _RTA.unpack_from(data, a)
                if alen < _RTA.size or a + alen > end:
                    break
                value = data[a + _RTA.size : a + alen]
                if atype == _RTA_DST:
                    dst = value
                elif atype == _RTA_OIF and len(value) == 4:
                    oif = int.from_bytes(value, "little")
                a += (alen + 3) & ~3
            if oif != ifindex:
                continue
            if family == 2 and dst is not None and len(dst) == 4 and dst_len <= 32:
                deleted.append(f"{ipaddress.IPv4Address(dst)}/{dst_len}")
            elif family == 10 and dst is not None and len(dst) == 16 and dst_len <= 128:
                deleted.append(f"{ipaddress.IPv6Address(dst)}/{dst_len}")
    return deleted, down


class RouteWatch:
    """An rtnetlink socket in one namespace, subscribed to link and route
    changes, so the worker learns at once that an operator (``ip route del``,
    ``ip link set down``) or another program removed a route into its TUN and
    puts it back, instead of believing its last sync forever. Non-blocking;
    poll :meth:`fileno` and call :meth:`read`."""

    def __init__(self, netns_name: str | None) -> None:
        import socket

        with in_netns(netns_name):
            self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK, 0)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            self.sock.bind((0, _RTMGRP_LINK | _RTMGRP_IPV4_ROUTE | _RTMGRP_IPV6_ROUTE))
        except OSError:
            self.sock.close()
            raise

    def fileno(self) -> int:
        return self.sock.fileno()

    def read(self, ifindex: int) -> tuple[list[str], bool]:
        """Everything queued (see :func:`parse_netlink_events`); an overrun
        socket (ENOBUFS: notifications were lost) reports the device down,
        so the caller re-checks everything."""
        deleted: list[str] = []
        down = False
        for _ in range(64):
            try:
                data = self.sock.recv(1 << 16)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                down = True
                continue
            more, gone = parse_netlink_events(data, ifindex)
            deleted += more
            down = down or gone
        return deleted, down

    def close(self) -> None:
        self.sock.close()


def device_exists(name: str, *, netns_name: str | None = None) -> bool:
    if netns_name is not None and not os.path.exists(f"{NETNS_RUN_DIR}/{netns_name}"):
        return False
    with IPRoute() if netns_name is None else NetNS(netns_name, flags=0) as ipr:
        return bool(ipr.link_lookup(ifname=name))


# --------------------------------------------------------------------------
# TUN writes with TCP segment merging (virtio_net_hdr GSO)
# --------------------------------------------------------------------------

_VNET = struct.Struct("<BBHHHH")
_VNET_F_NEEDS_CSUM = 1
_VNET_GSO_TCPV4 = 1
_ZERO_VNET = bytes(VNET_HDR_LEN)
_FLOW = struct.Struct("!QI").unpack_from
_HDR = struct.Struct("!BBHHHBBHIIIIIBB").unpack_from
"""IPv4 (no options) + TCP up to the flags: version/IHL, TOS, total length,
ID, flags/fragment, TTL, protocol, checksum, source, destination, ports,
sequence, acknowledgment, data offset, flags."""
_U32 = struct.Struct("!I").unpack_from
_ACK, _PSH = 0x10, 0x08


class _Pending:
    """One flow's merged TCP segments, headers of the first, from offset 10."""

    __slots__ = ("ack", "buf", "count", "hlen", "next_seq", "opts", "psh", "seg", "tos_ttl", "used")

    def __init__(self) -> None:
        self.buf = bytearray(VNET_HDR_LEN + 65536)
        self.used = self.count = self.hlen = self.seg = self.next_seq = self.tos_ttl = 0
        self.ack = 0
        self.opts = b""
        self.psh = False


class GsoTunWriter:
    """Inner packets to a TUN queue opened with ``vnet_hdr=True``, merging
    consecutive in-order TCP segments of an IPv4 flow into one GSO write.

    Why: a TUN write hands each packet to the kernel's receive path in the
    writing thread; for a TCP stream most of that is the receiver's TCP
    processing per segment (``bench.profile``: ~70 % of the TUN write stage).
    Written as one ``virtio_net_hdr`` GSO_TCPV4 packet (NEEDS_CSUM, the TCP
    checksum field holding the pseudo-header sum), the segments cross the
    stack as one skb — what GRO does for a NIC — and are cut again only if a
    device on the way needs it. Segments merge as Linux GRO merges them
    (``tcp_gro_receive``): same 4-tuple, IPv4 without options, not a
    fragment, next sequence number, flags ACK (PSH ends a merge), same ACK
    number, TOS, DF, TTL and TCP options, every segment but the last of the first
    one's size, at most :attr:`MAX_SEGMENTS` / :attr:`MAX_BYTES`. Anything
    else (IPv6, UDP, SYN/FIN/RST, ICMP...) is written at once with an empty
    header, after the pending segments of its own flow, so each flow keeps its
    order. :meth:`flush` writes everything pending; the worker calls it at
    the end of each loop turn, before it waits again.
    """

    MAX_SEGMENTS = 44
    MAX_BYTES = 64000
    SLOTS = 4
    """Flows merged at once (the rest are flushed to make room)."""

    def __init__(self, fd: int, on_error: Callable[[], None]) -> None:
        self.fd = fd
        self.on_error = on_error
        self._pending: dict[tuple[int, int], _Pending] = {}
        self._free: list[_Pending] = []
        self.writes = 0
        self.merged = 0
        """Segments written as part of a merged packet (statistics)."""

    def write(self, pkt: memoryview) -> None:
        n = len(pkt)
        if n > 40:
            # one unpack for every field the merge looks at (IPv4 + TCP headers)
            b0, tos, total, _, frag, ttl, proto, _, src, dst, ports, seq, ack, off, flags = _HDR(
                pkt, 0
            )
            if (
                b0 == 0x45
                and proto == 6
                and not frag & 0x3FFF
                and flags & 0xF7 == _ACK
                and total == n
                and 40 <= (hlen := 20 + (off >> 4) * 4) < n
            ):
                key = ((src << 32) | dst, ports)
                plen = n - hlen
                tos_ttl = (tos << 16) | (frag & 0x4000) | ttl
                slot = self._pending.get(key)
                if slot is not None:
                    if (
                        seq == slot.next_seq
                        and hlen == slot.hlen
                        and plen <= slot.seg
                        and slot.count < self.MAX_SEGMENTS
                        and slot.used + plen <= self.MAX_BYTES
                        and tos_ttl == slot.tos_ttl
                        and ack == slot.ack
                        and (hlen == 40 or pkt[40:hlen] == slot.opts)
                    ):
                        u = slot.used
                        slot.buf[u : u + plen] = pkt[hlen:n]
                        slot.used = u + plen
                        slot.count += 1
                        slot.next_seq = (seq + plen) & 0xFFFFFFFF
                        if flags & _PSH or plen < slot.seg:
                            slot.psh = bool(flags & _PSH)
                            del self._pending[key]
                            self._emit(slot)
                        return
                    del self._pending[key]
                    self._emit(slot)
                if flags & _PSH:
                    self._plain(pkt)
                    return
                self._start(pkt, n, key, hlen, plen, seq, ack, tos_ttl)
                return
        if self._pending:
            self._flush_flow(pkt, n)
        self._plain(pkt)

    def _plain(self, pkt: memoryview) -> None:
        try:
            os.writev(self.fd, (_ZERO_VNET, pkt))
            self.writes += 1
        except OSError:
            self.on_error()

    def _flush_flow(self, pkt: memoryview, n: int) -> None:
        """Before a packet that is not merged: its flow's pending segments."""
        if n >= 24 and pkt[0] == 0x45:
            slot = self._pending.pop(_FLOW(pkt, 12), None)
            if slot is not None:
                self._emit(slot)

    def _start(
        self,
        pkt: memoryview,
        n: int,
        key: tuple[int, int],
        hlen: int,
        plen: int,
        seq: int,
        ack: int,
        tos_ttl: int,
    ) -> None:
        if len(self._pending) >= self.SLOTS:
            self._emit(self._pending.pop(next(iter(self._pending))))
        slot = self._free.pop() if self._free else _Pending()
        slot.buf[VNET_HDR_LEN : VNET_HDR_LEN + n] = pkt
        slot.used = VNET_HDR_LEN + n
        slot.count = 1
        slot.hlen = hlen
        slot.seg = plen
        slot.next_seq = (seq + plen) & 0xFFFFFFFF
        slot.tos_ttl = tos_ttl
        slot.ack = ack
        slot.opts = bytes(pkt[40:hlen])
        slot.psh = False
        self._pending[key] = slot

    def _emit(self, slot: _Pending) -> None:
        b = slot.buf
        if slot.count > 1:
            total = slot.used - VNET_HDR_LEN
            ip0 = VNET_HDR_LEN
            old = (b[ip0 + 2] << 8) | b[ip0 + 3]
            b[ip0 + 2] = total >> 8
            b[ip0 + 3] = total & 0xFF
            # RFC 1624 incremental update of the IPv4 header checksum
            s = (~((b[ip0 + 10] << 8) | b[ip0 + 11]) & 0xFFFF) + (~old & 0xFFFF) + total
            s = (s & 0xFFFF) + (s >> 16)
            s = (s & 0xFFFF) + (s >> 16)
            c = ~s & 0xFFFF
            b[ip0 + 10] = c >> 8
            b[ip0 + 11] = c & 0xFF
            # CHECKSUM_PARTIAL: the TCP checksum field holds the (uncomplemented)
            # pseudo-header sum; the kernel adds the segment sums when it cuts
            s = _U32(b, ip0 + 12)[0]
            d = _U32(b, ip0 + 16)[0]
            s = (s >> 16) + (s & 0xFFFF) + (d >> 16) + (d & 0xFFFF) + 6 + total - 20
            s = (s & 0xFFFF) + (s >> 16)
            s = (s & 0xFFFF) + (s >> 16)
            t = ip0 + 20
            b[t + 16] = s >> 8
            b[t + 17] = s & 0xFF
            if slot.psh:
                b[t + 13] |= _PSH
            _VNET.pack_into(b, 0, _VNET_F_NEEDS_CSUM, _VNET_GSO_TCPV4, slot.hlen, slot.seg, 20, 16)
            self.merged += slot.count
        try:
            os.write(self.fd, memoryview(b)[: slot.used])
            self.writes += 1
        except OSError:
            self.on_error()
        if slot.count > 1:
            b[0:VNET_HDR_LEN] = _ZERO_VNET
        self._free.append(slot)

    def flush(self) -> None:
        """Write every pending merge (end of a loop turn)."""
        pending = self._pending
        while pending:
            self._emit(pending.pop(next(iter(pending))))
