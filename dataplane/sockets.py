"""The outer side's sockets, all bound to the anycast address. Thin I/O.

* raw IPv4 protocol 50 (ESP) and 47 (GRE): the kernel has no ESP/GRE of its
  own here, so every ESP/GRE packet to the address reaches these sockets with
  its IPv4 header; we send without ``IP_HDRINCL`` and the kernel adds the
  header with the bound (anycast) source.
* UDP 4500 (RFC 3948 ESP-in-UDP and IKE with the non-ESP marker) and UDP 500
  (IKE), with ``SO_REUSEPORT`` so every worker of a node binds the same port
  and the kernel spreads peers across workers by 4-tuple hash; when a worker
  dies its socket closes and its peers move to the others.

Raw sockets have no SO_REUSEPORT balancing: *every* raw socket gets a copy of
every packet. :func:`attach_share_filter` installs a classic BPF filter so a
worker only accepts its share (``key % count == rank``, key = ESP SPI or the
outer source address for GRE) and the kernel drops the rest before copying;
the worker re-installs it when the set of live workers on the node changes.

UDP GSO (``UDP_SEGMENT``, Linux ≥ 4.18): :class:`GsoBatcher` concatenates
equal-sized datagrams to one destination and sends them with one
``sendmsg``; the kernel splits them. UDP GRO (``UDP_GRO``) is the receive
side: one ``recvmsg_into`` may return several datagrams of a flow. Python has
no ``recvmmsg``: receive loops use ``recv_into`` / ``recvmsg_into`` on
preallocated buffers until ``BlockingIOError``.
"""

from __future__ import annotations

import contextlib
import errno
import socket
import struct

IPPROTO_ESP = 50
IPPROTO_GRE = 47
SOL_UDP = 17
UDP_SEGMENT = 103
SO_ATTACH_FILTER = 26
SO_DETACH_FILTER = 27
IP_MTU_DISCOVER = 10
IP_PMTUDISC_DONT = 0
SOCK_BUF = 4 << 20
"""Receive and send buffer of every outer socket: room for bursts while the
worker is not scheduled (about 1 600 full-size ESP packets)."""
SO_SNDBUFFORCE = 32
SO_RCVBUFFORCE = 33


class SocketError(RuntimeError):
    """A socket could not be opened or bound; the message says why."""


def _bind(sock: socket.socket, addr: str, port: int, what: str) -> None:
    try:
        sock.bind((addr, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRNOTAVAIL:
            raise SocketError(
                f"cannot bind {what} to {addr}: address not present on this node "
                "(add the anycast address to an interface, e.g. lo)"
            ) from None
        if exc.errno == errno.EADDRINUSE:
            raise SocketError(
                f"cannot bind {what} to {addr}:{port}: in use by a process without "
                "SO_REUSEPORT (another IKE daemon?)"
            ) from None
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise SocketError(f"cannot bind {what}: permission denied (needs root)") from None
        raise SocketError(f"cannot bind {what} to {addr}:{port}: {exc.strerror}") from None


def _tune(sock: socket.socket) -> None:
    # The *FORCE options (CAP_NET_ADMIN, which the worker has) are not capped
    # by net.core.rmem_max / wmem_max, 208 KiB on a default Debian; without
    # the capability the plain options get what the sysctl allows.
    for force, opt in ((SO_RCVBUFFORCE, socket.SO_RCVBUF), (SO_SNDBUFFORCE, socket.SO_SNDBUF)):
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, SOCK_BUF)
        except OSError:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, opt, SOCK_BUF)
    # Let the kernel fragment an outer packet rather than refuse it: inner
    # packets are already sized to the tunnel MTU (issue 5, path MTU).
    sock.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DONT)
    sock.setblocking(False)


def open_raw(proto: int, addr: str) -> socket.socket:
    """A non-blocking raw IPv4 socket for ``proto`` bound to ``addr``."""
    what = {IPPROTO_ESP: "raw ESP socket", IPPROTO_GRE: "raw GRE socket"}.get(
        proto, f"raw proto {proto} socket"
    )
    try:
        sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, proto)
    except PermissionError:
        raise SocketError(f"cannot open {what}: permission denied (needs CAP_NET_RAW)") from None
    _bind(sock, addr, 0, what)
    _tune(sock)
    return sock


def open_udp(addr: str, port: int) -> socket.socket:
    """A non-blocking UDP socket on ``addr:port`` shared with SO_REUSEPORT."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    _bind(sock, addr, port, f"UDP {port} socket")
    _tune(sock)
    return sock


# Classic BPF opcodes (linux/filter.h).
_BPF_LD_W_ABS = 0x20
_BPF_LD_W_IND = 0x40
_BPF_LDX_B_MSH = 0xB1
_BPF_LD_W_LEN = 0x80
_BPF_ALU_SUB_X = 0x1C
_BPF_ALU_MOD_K = 0x94
_BPF_JMP_JEQ_K = 0x15
_BPF_JMP_JGE_K = 0x35
_BPF_RET_K = 0x06


def _sock_fprog(insns: list[tuple[int, int, int, int]]) -> tuple[bytes, object]:
    import ctypes

    prog = b"".join(struct.pack("HBBI", *i) for i in insns)
    buf = ctypes.create_string_buffer(prog)
    fprog = struct.pack("HL", len(insns), ctypes.addressof(buf))
    return fprog, buf


# more classic BPF opcodes for the GRE program
_BPF_LD_H_IND = 0x48
_BPF_LD_B_IND = 0x50
_BPF_LD_MEM = 0x60
_BPF_LDX_MEM = 0x61
_BPF_ST = 0x02
_BPF_STX = 0x03
_BPF_ALU_ADD_K = 0x04
_BPF_ALU_ADD_X = 0x0C
_BPF_ALU_MUL_K = 0x24
_BPF_ALU_AND_K = 0x54
_BPF_ALU_LSH_K = 0x64
_BPF_ALU_RSH_K = 0x74
_BPF_ALU_XOR_X = 0xAC
_BPF_JMP_JA = 0x05
_BPF_JMP_JGE_X = 0x3D
_BPF_JMP_JSET_K = 0x45
_BPF_TAX = 0x07

_Insn = tuple[int, int | str, int | str, int]


def _assemble(prog: list[_Insn | str]) -> list[tuple[int, int, int, int]]:
    """Classic BPF with labels: a ``str`` item defines a label; a ``str`` in
    the jt/jf slot of a conditional jump (or k of ``ja``) names its target."""
    labels: dict[str, int] = {}
    insns: list[_Insn] = []
    for item in prog:
        if isinstance(item, str):
            labels[item] = len(insns)
        else:
            insns.append(item)
    out = []
    for i, (code, jt, jf, k) in enumerate(insns):

        def rel(target: int | str, i: int = i) -> int:
            if isinstance(target, int):
                return target
            off = labels[target] - i - 1
            if not 0 <= off <= 255:
                raise ValueError(f"BPF jump to {target} out of range")
            return off

        if code == _BPF_JMP_JA:
            out.append((code, 0, 0, rel(k)))
        else:
            assert isinstance(k, int)
            out.append((code, rel(jt), rel(jf), k))
    return out


_GOLDEN = 0x9E3779B1


def gre_inner_flow_program(rank: int, count: int) -> list[tuple[int, int, int, int]]:
    """The GRE share filter: keep a packet when hash(inner flow) % count == rank.

    GRE is stateless (any worker decapsulates any packet), and its header is
    cleartext, so the share can follow the *inner* flow rather than the outer
    source: one tunnel's traffic spreads over the node's workers while every
    inner flow stays on one worker (its packets keep their order). The
    program walks the outer IPv4 header (IHL), the GRE header (RFC 2784/2890:
    4 octets, plus 4 for each of the C, K and S flags), and for an inner IPv4
    or IPv6 packet hashes source XOR destination address (for IPv6 their low
    32 bits) XOR the TCP/UDP port word when the packet is TCP or UDP and, for
    IPv4, not a fragment (every fragment of a datagram hashes alike, as in
    ``ip.parse_flow``). Anything else — a GRE header with routing, a payload
    that is not IP, a packet too short for a field — falls back to the outer
    source address, so it still reaches exactly one worker (which counts its
    drop). Every load is preceded by a length check (an out-of-bounds load
    would abort the filter, i.e. drop the packet uncounted).
    """
    M_IHL, M_FLAGS, M_HLEN, M_INNER, M_PROTO, M_LEN, M_TMP, M_KEY, M_L4 = range(9)
    prog: list[_Insn | str] = [
        (_BPF_LDX_B_MSH, 0, 0, 0),  # x = outer IHL (GRE starts there)
        (_BPF_STX, 0, 0, M_IHL),
        (_BPF_LD_W_LEN, 0, 0, 0),
        (_BPF_ALU_SUB_X, 0, 0, 0),  # a = GRE length
        (_BPF_JMP_JGE_K, 0, "outer", 4),
        (_BPF_LD_B_IND, 0, 0, 0),  # a = C R K S flags
        (_BPF_JMP_JSET_K, "outer", 0, 0x40),  # routing present (RFC 1701): fall back
        (_BPF_ALU_RSH_K, 0, 0, 4),
        (_BPF_ALU_AND_K, 0, 0, 0x0B),  # C=8, K=2, S=1
        (_BPF_ST, 0, 0, M_FLAGS),
        (_BPF_ALU_AND_K, 0, 0, 1),  # S
        (_BPF_ST, 0, 0, M_HLEN),
        (_BPF_LD_MEM, 0, 0, M_FLAGS),
        (_BPF_ALU_RSH_K, 0, 0, 1),
        (_BPF_ALU_AND_K, 0, 0, 1),  # K
        (_BPF_LDX_MEM, 0, 0, M_HLEN),
        (_BPF_ALU_ADD_X, 0, 0, 0),
        (_BPF_ST, 0, 0, M_HLEN),
        (_BPF_LD_MEM, 0, 0, M_FLAGS),
        (_BPF_ALU_RSH_K, 0, 0, 3),  # C
        (_BPF_LDX_MEM, 0, 0, M_HLEN),
        (_BPF_ALU_ADD_X, 0, 0, 0),
        (_BPF_ALU_LSH_K, 0, 0, 2),
        (_BPF_ALU_ADD_K, 0, 0, 4),  # a = GRE header length
        (_BPF_LDX_MEM, 0, 0, M_IHL),
        (_BPF_ALU_ADD_X, 0, 0, 0),
        (_BPF_ST, 0, 0, M_INNER),  # inner packet offset
        (_BPF_LD_H_IND, 0, 0, 2),  # a = protocol type (x = IHL)
        (_BPF_ST, 0, 0, M_PROTO),
        (_BPF_LDX_MEM, 0, 0, M_INNER),
        (_BPF_LD_W_LEN, 0, 0, 0),
        (_BPF_JMP_JGE_X, 0, "outer", 0),  # len >= inner offset
        (_BPF_ALU_SUB_X, 0, 0, 0),
        (_BPF_ST, 0, 0, M_LEN),  # inner length
        (_BPF_LD_MEM, 0, 0, M_PROTO),
        (_BPF_JMP_JEQ_K, "v4", 0, 0x0800),
        (_BPF_JMP_JEQ_K, "v6", "outer", 0x86DD),
        "v4",
        (_BPF_LD_MEM, 0, 0, M_LEN),
        (_BPF_JMP_JGE_K, 0, "outer", 20),
        (_BPF_LD_W_IND, 0, 0, 12),  # source (x = inner offset)
        (_BPF_ST, 0, 0, M_TMP),
        (_BPF_LD_W_IND, 0, 0, 16),  # destination
        (_BPF_LDX_MEM, 0, 0, M_TMP),
        (_BPF_ALU_XOR_X, 0, 0, 0),
        (_BPF_ST, 0, 0, M_KEY),
        (_BPF_LDX_MEM, 0, 0, M_INNER),
        (_BPF_LD_H_IND, 0, 0, 6),  # flags + fragment offset
        (_BPF_JMP_JSET_K, "addr", 0, 0x3FFF),  # MF or offset: a fragment
        (_BPF_LD_B_IND, 0, 0, 9),  # protocol
        (_BPF_JMP_JEQ_K, "v4ports", 0, 6),
        (_BPF_JMP_JEQ_K, "v4ports", "addr", 17),
        "v4ports",
        (_BPF_LD_B_IND, 0, 0, 0),
        (_BPF_ALU_AND_K, 0, 0, 0x0F),
        (_BPF_ALU_LSH_K, 0, 0, 2),  # inner IHL
        (_BPF_ALU_ADD_X, 0, 0, 0),  # + inner offset = L4 offset
        (_BPF_ST, 0, 0, M_L4),
        (_BPF_JMP_JA, 0, 0, "ports"),
        "v6",
        (_BPF_LD_MEM, 0, 0, M_LEN),
        (_BPF_JMP_JGE_K, 0, "outer", 40),
        (_BPF_LD_W_IND, 0, 0, 20),  # low 32 bits of the source
        (_BPF_ST, 0, 0, M_TMP),
        (_BPF_LD_W_IND, 0, 0, 36),  # low 32 bits of the destination
        (_BPF_LDX_MEM, 0, 0, M_TMP),
        (_BPF_ALU_XOR_X, 0, 0, 0),
        (_BPF_ST, 0, 0, M_KEY),
        (_BPF_LDX_MEM, 0, 0, M_INNER),
        (_BPF_LD_B_IND, 0, 0, 6),  # next header (no extension headers)
        (_BPF_JMP_JEQ_K, "v6ports", 0, 6),
        (_BPF_JMP_JEQ_K, "v6ports", "addr", 17),
        "v6ports",
        (_BPF_LD_MEM, 0, 0, M_INNER),
        (_BPF_ALU_ADD_K, 0, 0, 40),
        (_BPF_ST, 0, 0, M_L4),
        "ports",  # a = L4 offset: the port word when it is inside the packet
        (_BPF_ALU_ADD_K, 0, 0, 4),
        (_BPF_TAX, 0, 0, 0),
        (_BPF_LD_W_LEN, 0, 0, 0),
        (_BPF_JMP_JGE_X, 0, "addr", 0),
        (_BPF_LDX_MEM, 0, 0, M_L4),
        (_BPF_LD_W_IND, 0, 0, 0),  # source port << 16 | destination port
        (_BPF_LDX_MEM, 0, 0, M_KEY),
        (_BPF_ALU_XOR_X, 0, 0, 0),
        (_BPF_JMP_JA, 0, 0, "hash"),
        "addr",
        (_BPF_LD_MEM, 0, 0, M_KEY),
        (_BPF_JMP_JA, 0, 0, "hash"),
        "outer",
        (_BPF_LD_W_ABS, 0, 0, 12),  # outer source address
        "hash",
        (_BPF_ALU_MUL_K, 0, 0, _GOLDEN),  # mix: the low bits of XORed fields are poor
        (_BPF_ALU_RSH_K, 0, 0, 16),
        (_BPF_ALU_MOD_K, 0, 0, count),
        (_BPF_JMP_JEQ_K, 0, 1, rank),
        (_BPF_RET_K, 0, 0, 0xFFFF),
        (_BPF_RET_K, 0, 0, 0),
    ]
    return _assemble(prog)


def attach_share_filter(
    sock: socket.socket, proto: int, rank: int, count: int, *, gre_inner: bool = True
) -> None:
    """Accept only packets whose key % count == rank (count 1: accept all).

    Key: for ESP the SPI (after the variable IPv4 header, ``ldx 4*([0]&0xf)``),
    spread evenly since SPIs are random; ESP too short to hold an SPI goes to
    rank 0 (which counts it as malformed). For GRE a hash of the inner flow
    (:func:`gre_inner_flow_program`), or with ``gre_inner=False`` the outer
    source address.
    """
    if count <= 1:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, SO_DETACH_FILTER, 0)
        return
    if proto == IPPROTO_GRE and gre_inner:
        fprog, keep = _sock_fprog(gre_inner_flow_program(rank, count))
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
        del keep
        return
    if proto == IPPROTO_ESP:
        # An ESP payload shorter than an SPI would make ``ld [x+0]`` run off the
        # packet, which aborts the filter (= drop, uncounted): hand it to share 0
        # instead so exactly one worker counts it as malformed.
        short = 0xFFFF if rank == 0 else 0
        load = [
            (_BPF_LDX_B_MSH, 0, 0, 0),  # x = IPv4 header length
            (_BPF_LD_W_LEN, 0, 0, 0),  # a = packet length
            (_BPF_ALU_SUB_X, 0, 0, 0),  # a = ESP payload length
            (_BPF_JMP_JGE_K, 1, 0, 4),  # >= 4 bytes: an SPI is there
            (_BPF_RET_K, 0, 0, short),
            (_BPF_LD_W_IND, 0, 0, 0),  # a = SPI
        ]
    else:
        load = [(_BPF_LD_W_ABS, 0, 0, 12)]
    insns = [
        *load,
        (_BPF_ALU_MOD_K, 0, 0, count),
        (_BPF_JMP_JEQ_K, 0, 1, rank),
        (_BPF_RET_K, 0, 0, 0xFFFF),
        (_BPF_RET_K, 0, 0, 0),
    ]
    fprog, keep = _sock_fprog(insns)
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
    del keep  # the kernel copied the program


UDP_GRO = 104
GRO_CMSG_SPACE = socket.CMSG_SPACE(4)


def enable_gro(sock: socket.socket) -> bool:
    """UDP GRO (Linux >= 5.0): the kernel may hand one ``recvmsg`` several
    datagrams of one flow back to back, with their size in a ``UDP_GRO``
    control message; :func:`gro_segment_size` reads it. False if refused."""
    try:
        sock.setsockopt(SOL_UDP, UDP_GRO, 1)
    except OSError:
        return False
    return True


def gro_segment_size(ancdata: list[tuple[int, int, bytes]], n: int) -> int:
    """The size of each coalesced datagram (``n`` when there was no GRO)."""
    for level, kind, data in ancdata:
        if level == SOL_UDP and kind == UDP_GRO and len(data) >= 2:
            seg = int.from_bytes(data[:4] if len(data) >= 4 else data[:2], "little")
            return seg if seg > 0 else n
    return n


IP_RECVTOS = 13
UDP_CMSG_SPACE = GRO_CMSG_SPACE + socket.CMSG_SPACE(1)
"""Room for both control messages a port-4500 ``recvmsg`` may carry: the
``UDP_GRO`` segment size and the outer ``IP_TOS`` byte."""


def enable_recvtos(sock: socket.socket) -> bool:
    """``IP_RECVTOS``: every ``recvmsg`` reports the outer TOS byte (ECN
    decapsulation, RFC 6040 §4.2). A GRO batch has one TOS: the kernel does
    not merge datagrams whose TOS differ (inet_gro_receive)."""
    try:
        sock.setsockopt(socket.IPPROTO_IP, IP_RECVTOS, 1)
    except OSError:
        return False
    return True


def udp_ancillary(ancdata: list[tuple[int, int, bytes]], n: int) -> tuple[int, int]:
    """(size of each coalesced datagram, outer TOS) from a ``recvmsg``'s
    control messages: ``n`` without GRO, TOS 0 when not reported."""
    seg, tos = n, 0
    for level, kind, data in ancdata:
        if level == socket.IPPROTO_IP and kind == socket.IP_TOS and data:
            tos = data[0]
        elif level == SOL_UDP and kind == UDP_GRO and len(data) >= 2:
            size = int.from_bytes(data[:4] if len(data) >= 4 else data[:2], "little")
            if size > 0:
                seg = size
    return seg, tos


def gso_supported(sock: socket.socket) -> bool:
    try:
        sock.setsockopt(SOL_UDP, UDP_SEGMENT, 0)
    except OSError:
        return False
    return True


_NO_ANC: list[tuple[int, int, bytes]] = []


class GsoBatcher:
    """Collects equal-sized UDP payloads for one destination; one sendmsg each.

    A batch is ``buf[start:used]``: ``count`` datagrams of ``seg`` octets (only
    the last may be shorter), one destination, one list of control messages.
    Two ways in:

    * :meth:`add` copies a datagram to the end of the batch;
    * zero copy: build the datagram in place at :meth:`slot` (the end of the
      batch, with ``room`` octets free after it: the worker reads a TUN
      packet there and encrypts it where it lies), then :meth:`commit` it.

    A datagram that does not fit the batch (another size, destination or
    ``anc``, or the batch full) sends the batch first; a committed one that
    does not fit starts the next batch where it lies. :meth:`flush` at the
    end of each loop turn. Without GSO support every datagram is sent on its
    own.
    """

    MAX_PAYLOAD = 65000
    """Octets of UDP payload in one GSO send (the kernel's limit is one IP
    datagram, 65535 octets with the headers)."""

    def __init__(self, sock: socket.socket, *, max_segments: int = 32, room: int = 65535) -> None:
        self.sock = sock
        self.enabled = gso_supported(sock)
        self.room = room
        """Octets free after :meth:`slot` for building one datagram in place."""
        self.buf = bytearray(self.MAX_PAYLOAD + room)
        self.view = memoryview(self.buf)
        self.max_segments = max_segments
        self.dest: tuple[str, int] | None = None
        self.anc = _NO_ANC
        self.seg = 0
        self.start = 0
        self.used = 0
        self.count = 0
        self.short = False
        self.sent = 0
        self.errors = 0

    def slot(self) -> int:
        """Where the next datagram goes in :attr:`buf`, with :attr:`room`
        octets free; sends the batch first when it is full."""
        if self.count >= self.max_segments or self.used + self.room > len(self.buf):
            self.flush()
        return self.used

    def commit(
        self, n: int, dest: tuple[str, int], anc: list[tuple[int, int, bytes]] = _NO_ANC
    ) -> None:
        """The ``n``-octet datagram built at :meth:`slot` joins the batch.
        ``anc``: extra control messages (IP_TOS) that apply to the whole
        batch, so a batch only holds datagrams with the same list object (the
        caller shares one list per value)."""
        used = self.used
        if self.count and (
            anc is not self.anc
            or dest != self.dest
            or n > self.seg
            or self.short
            or used + n - self.start > self.MAX_PAYLOAD
        ):
            self._send_batch()  # the new datagram starts the next batch where it is
        if not self.count:
            if not self.enabled:
                self._send(self.view[used : used + n], dest, anc)
                return
            self.start = used
            self.dest = dest
            self.seg = n
            self.anc = anc
        elif n < self.seg:
            self.short = True
        self.used = used + n
        self.count += 1

    def add(
        self,
        data: bytes | bytearray | memoryview,
        dest: tuple[str, int],
        anc: list[tuple[int, int, bytes]] = _NO_ANC,
    ) -> None:
        """Queue one datagram (a copy); see :meth:`commit`."""
        if not self.enabled:
            self._send(data, dest, anc)
            return
        n = len(data)
        at = self.slot()
        if at + n > len(self.buf):  # more than ``room``: cannot be a UDP datagram anyway
            self._send(data, dest, anc)
            return
        self.buf[at : at + n] = data
        self.commit(n, dest, anc)

    def flush(self) -> None:
        """Send the batch; the buffer starts over."""
        if self.count:
            self._send_batch()
        self.start = self.used = 0

    def _send_batch(self) -> None:
        dest = self.dest
        assert dest is not None
        batch = self.view[self.start : self.used]
        if self.count == 1:
            self._send(batch, dest, self.anc)
        else:
            try:
                self.sock.sendmsg(
                    [batch],
                    [(SOL_UDP, UDP_SEGMENT, struct.pack("H", self.seg)), *self.anc],
                    0,
                    dest,
                )
                self.sent += self.count
            except OSError:
                self.errors += self.count
        self.start = self.used
        self.count = 0
        self.short = False

    def _send(
        self,
        data: bytes | bytearray | memoryview,
        dest: tuple[str, int],
        anc: list[tuple[int, int, bytes]],
    ) -> None:
        try:
            if anc:
                self.sock.sendmsg([data], anc, 0, dest)
            else:
                self.sock.sendto(data, dest)
            self.sent += 1
        except OSError:
            self.errors += 1
