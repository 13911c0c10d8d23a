"""The worker's packet loop: outer sockets ↔ per-account TUN devices.

Two layers:

* :class:`Dataplane` processes one packet at a time and knows no socket: it
  gets bytes (plus the outer addresses) and calls the ``send_*`` / TUN write
  callables it was given. It owns the state built from bus records (SAD,
  per-account routes, tunnels) and the drop counters (plain ints, DESIGN §7).
  ``bench/worker.py`` drives it from memory.
* :class:`Worker` is the I/O shell: an epoll loop over the TUN queues and the
  sockets, the bus subscriber and the IKE relay client (their callbacks run in
  their own threads and only enqueue; records are applied in the loop's
  thread, so the hot path never sees a half-updated table), the node-local
  liveness of sibling workers (lock files) that decides this worker's share
  of raw ESP/GRE packets, and the periodic metrics flush.

Paths (issue 5):

* inbound ESP (raw proto 50 or UDP 4500): SPI → SA (``unknown_spi``),
  decrypt/verify (``bad_icv``, ``replay`` ...), inner flow parsed
  (``malformed``), checked against the SA's selectors (``selector``, RFC 4301
  §5.2) and against the account's network (``cross_account``), MSS clamped,
  written to the SA's account's TUN — never another account's.
* inbound GRE: tunnel by outer (local, remote) pair (``no_tunnel``), key
  checked, decapsulated, written to the tunnel's account's TUN.
* outbound: a packet read from account A's TUN is routed with A's table only
  (``no_route``), then the newest outbound SA of the tunnel whose selectors
  cover it (``no_sa`` / ``selector``), path MTU (ICMP frag-needed / packet
  too big back into the TUN, ``mtu``; DF clear: inner fragmentation), MSS
  clamp, encrypt, send (UDP 4500 via GSO batching when UDP-encapsulated, raw
  ESP otherwise) — or GRE-encapsulate and send raw with the tunnel's TTL.
* outer header: the ECN field copies the inner packet's (RFC 6040 §4.1
  normal mode, outer DSCP 0) and GRE carries ``TunnelRecord.ttl``, both as
  ``sendmsg`` control messages (IP_TOS / IP_TTL) from cached lists; inbound,
  the outer ECN (raw header, or IP_RECVTOS on 4500) is applied to the inner
  packet per RFC 6040 §4.2.
* IKE on UDP 500, or on 4500 with the non-ESP marker, is relayed to control
  with the peer's address and port; control's replies leave from this
  worker's socket, so their source is the anycast address.

Sequence numbers (DESIGN §5): with ``replay_protection`` off every worker
sends on every SA with its own counter, its index in the GCM IV's high bits.
With it on, the SA's *owner* is the only sender: rendezvous hashing in two
levels (:func:`rendezvous_owner`), first over the nodes that control's
``worker/<node>/<index>`` records name, then over the owner node's live
workers as that node itself sees them (lock files, :func:`election_view`).
A non-owner hands the owner the cleartext: over an abstract AF_UNIX
datagram socket on the same node; to another node as an AES-256-GCM UDP
datagram (:data:`HANDOFF_VERSION`) to that node's handoff endpoint (its
cluster-network address, :data:`HANDOFF_PORT` shared by its workers with
SO_REUSEPORT, the node's key from its records, which only the CURVE bus
carries); the worker that gets it passes it on to the owner over AF_UNIX if
needed, never back to another node. A worker death thus moves its SAs to a
sibling at once (as before); an SA moves between nodes only when a whole
node appears or goes (its records). Without records (no bus, no cluster
address, or none for :data:`RECORD_GRACE` s) the election is node-local.

An owner reserves sequence numbers ahead in a node-local file
(``<run_dir>/seq-<tunnel>-<spi>``, :data:`SEQ_RESERVATION` at a time) and
reports the reservation's end to control with its bus acks (at once when it
moves); control replicates the highest one as a ``seq/<tunnel>/<spi>``
checkpoint record. A new owner starts above max(local reservation,
replicated checkpoint + :data:`SEQ_SAFETY_JUMP`), and a current owner that
sees a checkpoint beyond its own reservation (another node's owner sent
there) jumps above it too, so a number is not sent twice when ownership
moves within or between nodes (bounds: the README, "replay protection").

Inbound replay windows are per worker and checkpointed: each worker reports
its windows' tops (highest authenticated sequence number) with its acks,
control replicates the highest per SA as ``rwin/<spi>``, and a worker whose
window is below the checkpoint raises it there
(:meth:`Worker.raise_replay_windows`), so a packet accepted by another
worker up to the checkpoint is refused here as a replay.

Raw ESP/GRE sockets all receive every packet; each worker installs a classic
BPF filter taking its share (ESP: the SPI modulo the live workers; GRE: a
hash of the inner flow, so one GRE tunnel spreads over the workers with each
inner flow on one of them, ``sockets.gre_inner_flow_program``),
re-installed within 0.25 s when a sibling appears or dies.

TUN queues carry a ``virtio_net_hdr`` (IFF_VNET_HDR): inner packets are
written through ``tun.GsoTunWriter``, which merges the in-order TCP segments
of a loop turn into one GSO write (what GRO does for a NIC: the receiving
stack handles one skb instead of dozens) and is flushed at the end of every
loop turn, before the loop waits again. ESP is decrypted in place in the
receive buffer (no allocation per packet).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import ipaddress
import logging
import os
import queue
import select
import signal
import socket
import struct
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from replication.records import (
    HANDOFF_KEY_BYTES,
    Record,
    RecordError,
    ReplayCheckpoint,
    RouteRecord,
    SaRecord,
    SeqCheckpoint,
    TunnelKind,
    TunnelRecord,
    WorkerRecord,
)

from . import gre, ip, mss, udpencap
from .drops import Drop, DropReason
from .replay import ReplayWindow
from .routes import Routes, flow_hash
from .sad import InboundFactory, OutboundEntry, OutboundFactory, Sad, TunnelEntry

log = logging.getLogger("anywan.worker")

NH_IPV4 = 4
NH_IPV6 = 41
_TCP = 6
_SYN = 0x02
_ETH_P_IP = 0x0800
_ETH_P_IPV6 = 0x86DD

Anc = list[tuple[int, int, bytes]]
"""Control messages for ``sendmsg`` (IP_TTL / IP_TOS): shared, never mutated;
``[]`` (falsy) means "socket defaults, plain ``sendto``"."""
SendFn = Callable[[memoryview, tuple[str, int], Anc], None]
WriteFn = Callable[[memoryview], None]

SOL_IP = 0
IP_TOS = 1
IP_TTL = 2
_SPI = struct.Struct("!I").unpack_from
_ADDR_PAIR = struct.Struct("!Q").unpack_from


@functools.lru_cache(maxsize=1 << 16)
def _canonical_prefix(prefix: str) -> str:
    """``prefix`` as the kernel reports it back (``fd00:2::/64``), so a route
    netlink says was deleted is found in a set of strings; cached, as a sync
    of an account with 1000 routes maps all of them."""
    return str(ipaddress.ip_network(prefix, strict=False))


class GreFlow:
    """What the TUN fast path needs to GRE-encapsulate an IPv4 packet on one
    tunnel (:meth:`Dataplane.flow_entry`): the header, constant per tunnel
    for IPv4 inner packets since the worker sends neither checksum nor
    sequence number (RFC 2784 §2, RFC 2890 §2.1: the key when the tunnel has
    one), where it goes, and the control messages by inner TOS (outer TTL,
    ECN copy). ``codec`` is None so the drainer's ESP test fails first."""

    __slots__ = ("anc", "dest", "hdr")
    codec = None

    def __init__(self, hdr: bytes, dest: tuple[str, int], anc: tuple[Anc, ...]) -> None:
        self.hdr = hdr
        self.dest = dest
        self.anc = anc


FlowEntry = tuple[OutboundEntry | GreFlow, TunnelEntry, int]
"""(outbound SA entry, or GRE header and destination; tunnel entry; tunnel
MTU): :meth:`Dataplane.flow_entry`."""
_IP_TOS_CMSG = 1  # IP_RECVTOS delivers cmsg (SOL_IP, IP_TOS, tos)


class AccountNet:
    """One account's inner network on this worker: its TUN queue and addresses."""

    __slots__ = ("account_id", "fd", "icmp_src4", "icmp_src6", "inner", "netns", "write")

    def __init__(self, account_id: str, write: WriteFn, *, fd: int = -1, netns: str | None = None):
        self.account_id = account_id
        self.write = write
        self.fd = fd
        self.netns = netns
        self.icmp_src4 = b"\x00\x00\x00\x00"
        self.icmp_src6 = b"\xfe\x80" + b"\x00" * 13 + b"\x01"
        self.inner: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        """Networks of the account's tunnel interface addresses (always ours)."""


def _ip_bytes(addr: str) -> bytes:
    return ipaddress.ip_address(addr).packed


def rendezvous_owner(spi: int, live: tuple[int, ...]) -> int:
    """The live worker that owns outbound SA ``spi``: highest random weight
    hashing in two levels, first the node (``id >> 8``, all node-local
    indices share node 0), then the worker within it. Every worker computes
    the same answer from the same live set; a worker leaving only moves the
    SAs it owned, and to another worker of its node as long as the node has
    one (whose local file knows the exact sequence reservation).

    Memoised (the outbound path asks per packet: ~0.2 µs instead of ~1 µs
    per candidate); the memo is dropped whole at :data:`_OWNER_MEMO_MAX`."""
    key = (spi, live)
    best = _owner_memo.get(key)
    if best is not None:
        return best
    best, best_w = live[0], -1
    for i in live:
        w = (flow_hash(spi, i >> 8, 47, 0, 0) << 32) | flow_hash(spi, i, 50, 0, 0)
        if w > best_w:
            best, best_w = i, w
    if len(_owner_memo) >= _OWNER_MEMO_MAX:
        _owner_memo.clear()
    _owner_memo[key] = best
    return best


_OWNER_MEMO_MAX = 8192
_owner_memo: dict[tuple[int, tuple[int, ...]], int] = {}


def cluster_id(node: str, index: int) -> int:
    """A worker's identity in the cluster-wide owner election (DESIGN §5):
    the same in every process, ``1 ‖ BLAKE2b-48(node) ‖ index`` (so ``id >>
    8`` names the node), and never equal to a bare node-local index (< 256),
    which the node-local fallback election uses."""
    digest = hashlib.blake2b(node.encode(), digest_size=6).digest()
    return (1 << 64) | (int.from_bytes(digest, "big") << 8) | index


def election_view(
    records: Iterable[WorkerRecord], node: str, index: int, local_live: Iterable[int]
) -> tuple[tuple[int, ...], int]:
    """(live ids, my id) for :func:`rendezvous_owner`: the recorded workers
    (``worker/`` records) of the other nodes, and this node's live workers
    (lock files: exact and immediate) if this node has any record at all
    (so the other nodes know it; a node no one knows yet takes no SA).

    Views of two nodes differ only in the *other* nodes' workers, i.e. in
    which worker of a node is the owner, never in which node is (the node
    weight comes first), except while a whole node appears or disappears in
    the records, which every worker applies from the same bus update; and a
    packet for another node goes to that node, whose own view picks the
    worker. Empty when no record names a live worker (then the caller falls
    back to the node-local election)."""
    recs = list(records)
    ids = {cluster_id(r.node, r.index) for r in recs if r.node != node}
    if any(r.node == node for r in recs):
        ids.update(cluster_id(node, i) for i in local_live)
    return tuple(sorted(ids)), cluster_id(node, index)


HANDOFF_WINDOW = 4096
"""Handoff counters per sender a worker remembers (:meth:`Worker._admit_handed`)."""

HANDOFF_SENDERS = 1024
"""Sender nonce prefixes with a window; the oldest is forgotten beyond this."""

_REMOTE_MARK = b"\x00"
"""First octet of a sibling handoff that carries another node's nonce (an
account name is never empty, so a length octet is never 0)."""

RECORD_GRACE = 5.0
"""Seconds a worker keeps electing over the last ``worker/`` records after
all of them vanished at once (a restarted control's first snapshot has none
until the workers' next reports, within about a second and a half)."""

HANDOFF_VERSION = b"\x01"
"""First byte of a cross-node handoff datagram (then 12-byte nonce, then
AES-256-GCM of [account length][account][inner packet] with its tag)."""

HANDOFF_PORT = 7790
"""Default UDP port of a node's cross-node handoff endpoint: every worker of
the node binds it (SO_REUSEPORT), so a datagram reaches a live worker of
the node even right after one died; that worker passes it to the SA's owner
on the node (AF_UNIX) if it is not the owner itself."""


class _NotOwner:
    """The codec of a replay-protected outbound SA this worker does not own
    (DESIGN §5). Our own packets for it are handed to the owner before they
    get here; a packet *handed to us* by a worker whose view differs from
    ours (it has not seen a change yet) is dropped and counted — sending it
    would use a sequence number outside any reservation of ours. ``seq``
    keeps the last number we sent, so taking the SA back continues above."""

    __slots__ = ("seq",)

    def __init__(self, seq: int) -> None:
        self.seq = seq

    def encapsulate_into(self, out: Any, off: int, inner: Any, nh: int) -> int:
        raise Drop(DropReason.NO_SA, "not the owner of this replay-protected SA")


REPORT_MAX_SAS = 1500
"""SA entries per report to control (a report must fit ``clone.MAX_REPORT_BYTES``)."""

SEQ_RESERVATION = 1 << 20
"""Sequence numbers an owner reserves ahead (RFC 6311 style): a new owner
starts after the reservation, so no number is ever sent twice even when the
old owner died without a word. 2**20 per takeover out of 2**32 per SA."""

SEQ_SAFETY_JUMP = 1 << 20
"""Added to a replicated checkpoint (RFC 6311 style): the checkpoint may lag
the owner's newest reservation by one step (at most :data:`SEQ_RESERVATION`)."""


class Dataplane:
    """Per-packet processing and the record-built state. No sockets, no clock."""

    def __init__(
        self,
        *,
        inbound_factory: InboundFactory,
        outbound_factory: OutboundFactory,
        send_esp: SendFn,
        send_udp: SendFn,
        send_gre: SendFn,
        mss_clamp: bool = True,
    ) -> None:
        self.sad = Sad(inbound_factory, outbound_factory)
        self.routes = Routes()
        self.accounts: dict[str, AccountNet] = {}
        self.send_esp = send_esp
        self.send_udp = send_udp
        self.send_gre = send_gre
        self.mss_clamp = mss_clamp
        self.drops: dict[DropReason, int] = dict.fromkeys(DropReason, 0)
        self.out = bytearray(65536 + 512)
        self.out_view = memoryview(self.out)
        self.last_error: Drop | None = None
        """The most recent drop (for tests and debug tooling, not per-packet logs)."""
        self._me = 0
        self._live: tuple[int, ...] = (0,)
        self.handoff: Callable[[str, int, memoryview], None] | None = None
        """(account, owner index, cleartext): give a packet to the SA's owner."""
        self.admit_handed: Callable[[], bool] | None = None
        """Set only while a packet another node handed us is processed: asked
        once this worker is the one to send it (the owner); False = a replay
        of a handoff datagram, dropped (the worker's handoff replay window)."""
        self.handed_off = 0
        self.default_ttl = 64
        """The outer sockets' own TTL (the worker reads it from the GRE socket):
        a GRE tunnel whose ``ttl`` equals it needs no IP_TTL control message."""
        # RFC 6040 §4.1 normal mode: the outer ECN field is a copy of the
        # inner one (ip.ecn_encap; outer DSCP 0). One shared list per outer
        # TOS, indexed by the inner TOS byte: a Not-ECT packet (the common
        # case) gets [] and leaves with a plain sendto, an ECN-capable one
        # one IP_TOS control message; nothing is built per packet.
        by_ecn: list[Anc] = [[], *([(SOL_IP, IP_TOS, bytes([e]))] for e in (1, 2, 3))]
        self._tos_anc: tuple[Anc, ...] = tuple(by_ecn[ip.ecn_encap(t)] for t in range(256))
        self._ttl_anc: dict[int, tuple[Anc, ...]] = {}
        self.flows: dict[str, dict[int, FlowEntry | None]] = {}
        """Account → IPv4 (src << 32 | dst) → :meth:`flow_entry`'s answer.
        Emptied whenever a record changes (:meth:`apply`, :meth:`remove`);
        the worker's TUN drainer keeps the per-account dicts, never replaced."""
        self.peer_writers: dict[tuple[str, int], WriteFn] = {}
        """(account, election id of another worker on this node) → a writer
        into *that* worker's queue of the account's TUN (its fd, passed to us):
        see :meth:`inbound_writer`."""
        self._steer: dict[str, WriteFn | None] = {}

    @property
    def me(self) -> int:
        """This worker's id in the owner election."""
        return self._me

    @me.setter
    def me(self, me: int) -> None:
        if me != self._me:
            self._me = me
            self.forget_flows()

    @property
    def live(self) -> tuple[int, ...]:
        """Live worker indices on the node (owner election for replay-protected SAs)."""
        return self._live

    @live.setter
    def live(self, live: tuple[int, ...]) -> None:
        if live != self._live:
            self._live = live
            self.forget_flows()  # who owns an SA may have changed

    # ---- records ---------------------------------------------------------
    def apply(self, key: str, rec: Record) -> None:
        """Apply one bus record. Raises RecordError/ValueError if unusable."""
        self.forget_flows()
        if isinstance(rec, SaRecord):
            self.sad.apply_sa(key, rec)
            self._refresh_tunnel(rec.tunnel_id)
        elif isinstance(rec, RouteRecord):
            self.routes.apply_set(rec)
            self._refresh_tunnel(rec.tunnel_id)
        elif isinstance(rec, TunnelRecord):
            self.sad.apply_tunnel(key, rec)
            self._refresh_tunnel(rec.tunnel_id)
        else:  # pragma: no cover - Record is a closed union
            raise RecordError("invalid", f"unexpected record {type(rec).__name__}")

    def remove(self, key: str) -> None:
        self.forget_flows()
        if key.startswith("sa/"):
            self.sad.delete_sa(key)
            if key.startswith("sa/out/"):
                self._refresh_tunnel(key.split("/")[2])
        elif key.startswith("route/"):
            rec = self.routes.apply_delete(key.split("/", 1)[1])
            if rec is not None:
                self._refresh_tunnel(rec.tunnel_id)
        elif key.startswith("tunnel/"):
            old = self.sad.delete_tunnel(key)
            if old is not None:
                self._refresh_tunnel(old.tunnel_id)

    def _refresh_tunnel(self, tunnel_id: str) -> None:
        self.routes.set_tunnel_up(tunnel_id, self.sad.tunnel_usable(tunnel_id))

    def account_ids(self) -> set[str]:
        """Accounts that have any tunnel or route here (need an inner network)."""
        ids = {e.record.account_id for e in self.sad.tunnels.values()}
        ids.update(self.routes.tables)
        return ids

    def account_config(self, account_id: str) -> tuple[list[str], list[str]]:
        """(interface addresses, routed prefixes) for the account's TUN."""
        addrs = sorted(
            {
                e.record.interface_address
                for e in self.sad.tunnels.values()
                if e.record.account_id == account_id
            }
        )
        table = self.routes.tables.get(account_id)
        prefixes = sorted({r.prefix for r in table.routes.values()}) if table else []
        return addrs, prefixes

    def attach_account(self, net: AccountNet) -> None:
        addrs, _ = self.account_config(net.account_id)
        self.update_account(net, addrs)
        self.accounts[net.account_id] = net

    @staticmethod
    def update_account(net: AccountNet, addrs: Iterable[str]) -> None:
        inner: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for a in addrs:
            iface = ipaddress.ip_interface(a)
            inner.append(iface.network)
            if iface.version == 4:
                net.icmp_src4 = iface.ip.packed
            else:
                net.icmp_src6 = iface.ip.packed
        net.inner = inner

    # ---- counting --------------------------------------------------------
    def _drop(self, exc: Drop) -> None:
        self.drops[exc.reason] += 1
        self.last_error = exc

    def count(self, reason: DropReason) -> None:
        self.drops[reason] += 1

    # ---- inbound ---------------------------------------------------------
    def inbound_esp(self, packet: memoryview, outer_tos: int = 0) -> None:
        """An ESP packet (SPI first), from raw proto 50 or UDP 4500.

        ``outer_tos``: the outer IPv4 TOS byte (raw socket header, or
        IP_RECVTOS on port 4500); its ECN field is propagated to the inner
        packet per RFC 6040 §4.2 (CE over a Not-ECT inner packet is dropped,
        reason ``ecn``).

        A writable ``packet`` (the worker's receive buffer) is decrypted in
        place (``InboundSa.decapsulate(in_place=True)``): the inner packet is
        a view of it, nothing is allocated for the plaintext, and its
        ciphertext is gone afterwards."""
        try:
            if len(packet) < 8:
                raise Drop(DropReason.MALFORMED, "ESP shorter than its header")
            entry = self.sad.inbound.get(_SPI(packet)[0])
            if entry is None:
                raise Drop(DropReason.UNKNOWN_SPI)
            if packet.readonly:
                nh, inner = entry.codec.decapsulate(packet)
            else:
                nh, inner = entry.codec.decapsulate(packet, True)
            if nh != NH_IPV4 and nh != NH_IPV6:
                raise Drop(DropReason.UNKNOWN_NEXT_HEADER)
            version, src, dst, proto, sport, dport = ip.parse_flow(inner)
            if (version == 4) != (nh == NH_IPV4):
                raise Drop(DropReason.MALFORMED, "next header disagrees with IP version")
            f4 = entry.fast4
            if f4 is not None and version == 4:
                # inbound: source in the remote range, destination in the local one
                if not (f4[2] <= src <= f4[3] and f4[0] <= dst <= f4[1]):
                    raise Drop(DropReason.SELECTOR)
            elif not entry.selectors.inbound_ok(version, src, dst, proto, sport, dport):
                raise Drop(DropReason.SELECTOR)
            account = entry.account_id
            net = self.accounts.get(account)
            if net is None:
                raise Drop(DropReason.NO_TUNNEL, "account has no inner network here")
            tables = self.routes.tables
            if len(tables) > 1 or (tables and account not in tables):
                self._check_account(account, net, version, dst)
            if outer_tos & 3:
                if inner.readonly:
                    inner = memoryview(bytearray(inner))
                ip.apply_ecn_decap(inner, outer_tos)
            if proto == _TCP and self.mss_clamp:
                # only a SYN needs _clamp (IPv4 here; IPv6 always asks _clamp)
                if version != 4:
                    inner = self._clamp(entry.tunnel_id, inner, version)
                else:
                    off = (inner[0] & 0x0F) * 4 + 13
                    if off < len(inner) and inner[off] & _SYN:
                        inner = self._clamp(entry.tunnel_id, inner, version)
            if self.peer_writers:
                self.inbound_writer(entry.tunnel_id, net)(inner)
            else:
                net.write(inner)
            n = len(inner)
            entry.packets += 1
            entry.bytes += n
            t = self.sad.tunnels.get(entry.tunnel_id)
            if t is not None:
                t.packets_in += 1
                t.bytes_in += n
        except Drop as exc:
            self._drop(exc)

    def inbound_gre(self, packet: memoryview, local: str, remote: str, outer_tos: int = 0) -> None:
        """A GRE packet (GRE header first) between outer ``remote`` → ``local``."""
        try:
            t = self.sad.gre.get((local, remote))
            if t is None:
                raise Drop(DropReason.NO_TUNNEL)
            proto, key, off = gre.decapsulate(packet)
            if key != t.record.gre_key:
                raise Drop(DropReason.NO_TUNNEL, "GRE key mismatch")
            if proto != _ETH_P_IP and proto != _ETH_P_IPV6:
                raise Drop(DropReason.UNSUPPORTED, "GRE payload not IP")
            inner = packet[off:]
            version, _src, dst, proto, _sp, _dp = ip.parse_flow(inner)
            account = t.record.account_id
            net = self.accounts.get(account)
            if net is None:
                raise Drop(DropReason.NO_TUNNEL, "account has no inner network here")
            tables = self.routes.tables
            if len(tables) > 1 or (tables and account not in tables):
                self._check_account(account, net, version, dst)
            if outer_tos & 3:
                if inner.readonly:
                    inner = memoryview(bytearray(inner))
                ip.apply_ecn_decap(inner, outer_tos)
            if proto == _TCP and self.mss_clamp:
                if version != 4:
                    inner = self._clamp(t.record.tunnel_id, inner, version)
                else:
                    o = (inner[0] & 0x0F) * 4 + 13
                    if o < len(inner) and inner[o] & _SYN:
                        inner = self._clamp(t.record.tunnel_id, inner, version)
            net.write(inner)
            t.packets_in += 1
            t.bytes_in += len(inner)
        except Drop as exc:
            self._drop(exc)

    def _check_account(self, account: str, net: AccountNet, version: int, dst: int) -> None:
        """Issue 10: a packet of account A must not be aimed at B's network.

        A destination A routes, or inside A's tunnel interface networks, is
        A's. Otherwise, one that only another account routes would cross
        accounts: dropped and counted. (A destination nobody routes is A's
        inner network behind the TUN.)
        """
        tables = self.routes.tables
        if len(tables) < 2 and (not tables or account in tables):
            return  # no other account routes anything
        if self.routes.lookup(account, version, dst) is not None:
            return
        for n in net.inner:
            if n.version == version and int(n.network_address) == dst & int(n.netmask):
                return
        if self.routes.other_accounts_covering(account, version, dst):
            raise Drop(DropReason.CROSS_ACCOUNT)

    def _clamp(self, tunnel_id: str, inner: memoryview, version: int) -> memoryview:
        """MSS clamp of a TCP SYN (``mss.clamp_mss``); a cheap SYN pre-check
        first so that only SYNs of read-only buffers are copied."""
        if version == 4:
            off = (inner[0] & 0x0F) * 4
        elif inner[6] == _TCP:
            off = 40
        else:  # RFC 8200 §4: extension headers between the IPv6 header and TCP
            _, off, fragment = ip.ipv6_upper_layer(inner, len(inner))
            if fragment:
                return inner  # clamp_mss leaves fragments alone too
        if len(inner) < off + 14 or not inner[off + 13] & _SYN:
            return inner
        t = self.sad.tunnels.get(tunnel_id)
        if t is not None and t.record.mss:
            m4 = m6 = t.record.mss
        else:  # RFC 6691 §2 from the tunnel MTU
            m4, m6 = mss.mss_for_mtu(t.record.mtu if t is not None else 1400)
        if inner.readonly:
            inner = memoryview(bytearray(inner))
        mss.clamp_mss(inner, m4, m6)
        return inner

    # ---- outbound --------------------------------------------------------
    def outbound(self, net: AccountNet, packet: memoryview, handoff_ok: bool = True) -> None:
        """A packet read from account ``net``'s TUN, toward a tunnel.

        On a ``replay_protection`` tunnel only the SA's owner among the live
        workers sends (DESIGN §5); any other worker hands the cleartext to
        the owner (``handoff``) and stops. ``handoff_ok=False`` for packets
        that were handed to us, so a disagreement about who is alive can
        never bounce a packet back and forth.
        """
        try:
            version, src, dst, proto, sport, dport = ip.parse_flow(packet)
            table = self.routes.tables.get(net.account_id)
            choice = None if table is None else table.choice(version, dst)
            if choice is None:
                if (dst >> 120 == 0xFF) if version == 6 else (dst >> 28 == 0xE):
                    # the namespace's own multicast (IPv6 RS/MLD...): not a routing gap
                    raise Drop(DropReason.UNSUPPORTED, "multicast")
                raise Drop(DropReason.NO_ROUTE)
            if len(choice.tunnels) == 1:
                tid = choice.tunnels[0]
            else:
                tid = choice.pick(flow_hash(src, dst, proto, sport, dport))
            t = self.sad.tunnels.get(tid)
            if t is None:
                raise Drop(DropReason.NO_TUNNEL)
            rec = t.record
            if rec.account_id != net.account_id:
                raise Drop(DropReason.CROSS_ACCOUNT)
            if rec.kind is TunnelKind.IPSEC:
                sa = self.sad.outbound_for(tid, version, src, dst, proto, sport, dport)
                if sa is None:
                    if self.sad.outbound.get(tid):
                        raise Drop(DropReason.SELECTOR)
                    raise Drop(DropReason.NO_SA)
                if rec.replay_protection and handoff_ok and len(self.live) > 1:
                    owner = rendezvous_owner(sa.spi, self.live)
                    if owner != self.me and self.handoff is not None:
                        self.handoff(net.account_id, owner, packet)
                        self.handed_off += 1
                        return
            else:
                sa = None
            if self.admit_handed is not None and not self.admit_handed():
                raise Drop(DropReason.REPLAY, "handoff datagram replayed")
            if proto == _TCP and self.mss_clamp:
                # only a SYN needs _clamp (IPv4 here; IPv6 always asks _clamp)
                if version != 4:
                    packet = self._clamp(tid, packet, version)
                else:
                    off = (packet[0] & 0x0F) * 4 + 13
                    if off < len(packet) and packet[off] & _SYN:
                        packet = self._clamp(tid, packet, version)
            if len(packet) > rec.mtu:
                if version == 4 and not packet[6] & 0x40:
                    for frag in ip.fragment_ipv4(packet, rec.mtu):
                        self._encap(t, sa, memoryview(frag), version)
                    return
                self._too_big(net, packet, rec.mtu, version)
                raise Drop(DropReason.MTU)
            self._encap(t, sa, packet, version)
        except Drop as exc:
            self._drop(exc)

    # ---- outbound flow cache (the worker's TUN fast path) ------------------
    FLOW_CACHE_MAX = 4096
    """Address pairs remembered per account before the cache starts over."""

    def forget_flows(self) -> None:
        for cache in self.flows.values():
            cache.clear()
        self._steer.clear()

    def inbound_writer(self, tunnel_id: str, net: AccountNet) -> WriteFn:
        """Where a packet that arrived on ``tunnel_id`` is written to the TUN.

        On a ``replay_protection`` tunnel with several live workers only the
        owner of the tunnel's outbound SA may send its ESP (DESIGN §5), and
        the TUN hands each outbound packet to the queue of the worker that
        last *wrote* a packet of the same flow (the kernel's automatic queue
        selection, ``tun_automq_select_queue``, by a symmetric flow hash). So
        we write the tunnel's inbound packets into the owner's queue (its
        fd, which it passed us): the replies then reach the owner itself
        instead of being read here and handed over one by one. Our own queue
        when we own it, on other tunnels, or when we lack the owner's fd
        (then the hand-off still delivers). Remembered per tunnel until
        :meth:`forget_flows`."""
        w: Any = self._steer.get(tunnel_id, False)
        if w is False:
            w = None
            t = self.sad.tunnels.get(tunnel_id)
            outs = self.sad.outbound.get(tunnel_id)
            live = self._live
            if t is not None and t.record.replay_protection and outs and len(live) > 1:
                owner = rendezvous_owner(outs[0].spi, live)  # the newest
                if owner != self._me:
                    w = self.peer_writers.get((net.account_id, owner))
            self._steer[tunnel_id] = w
        return net.write if w is None else w

    def flow_cache(self, account_id: str) -> dict[int, FlowEntry | None]:
        cache = self.flows.get(account_id)
        if cache is None:
            cache = self.flows[account_id] = {}
        return cache

    def flow_entry(self, net: AccountNet, packet: memoryview) -> FlowEntry | None:
        """What :meth:`outbound` decides for every IPv4 packet from ``packet``'s
        source to its destination, when that depends on nothing else, and is
        remembered in :meth:`flow_cache` under ``src << 32 | dst``.

        A :data:`FlowEntry` (outbound SA entry, tunnel entry, tunnel MTU) when
        the destination's route has one tunnel (no ECMP hash over ports) and
        the tunnel is GRE (a :class:`GreFlow` in the SA's place), or it is
        IPsec and, with replay protection, this worker owns the SA
        (``live`` changes forget the cache; a non-owner's ``_NotOwner`` codec
        also sends every packet to :meth:`outbound`), and
        every outbound SA of the tunnel selects by addresses only
        (``OutboundEntry.by_address``), so the SA :meth:`Sad.outbound_for` picks is the same
        for every packet between the two addresses. None otherwise (also
        remembered): such packets always take :meth:`outbound`. The caller
        still checks per packet what is per packet: a clean IPv4 header,
        a TCP SYN (MSS clamp), the MTU, and the codec.
        """
        try:
            version, src, dst, proto, sport, dport = ip.parse_flow(packet)
        except Drop:
            return None  # this packet is malformed, not the flow: nothing remembered
        cache = self.flow_cache(net.account_id)
        if len(cache) >= self.FLOW_CACHE_MAX:
            cache.clear()
        entry = self._flow_entry(net, version, src, dst, proto, sport, dport)
        cache[_ADDR_PAIR(packet, 12)[0]] = entry
        return entry

    def _flow_entry(
        self, net: AccountNet, version: int, src: int, dst: int, proto: int, sport: int, dport: int
    ) -> FlowEntry | None:
        table = self.routes.tables.get(net.account_id)
        choice = None if table is None or version != 4 else table.choice(4, dst)
        if choice is None or len(choice.tunnels) != 1:
            return None
        tid = choice.tunnels[0]
        t = self.sad.tunnels.get(tid)
        if t is None:
            return None
        rec = t.record
        if rec.account_id != net.account_id:
            return None
        if rec.kind is TunnelKind.GRE:
            if rec.remote_addr is None:
                return None
            hdr = bytearray(8)
            hlen = gre.write_header(hdr, 0, _ETH_P_IP, 0, key=rec.gre_key)
            table = self._gre_anc(rec.ttl)
            return GreFlow(bytes(hdr[:hlen]), (rec.remote_addr, 0), table), t, rec.mtu
        if rec.kind is not TunnelKind.IPSEC:
            return None
        entries = self.sad.outbound.get(tid)
        if not entries or not all(e.by_address for e in entries):
            return None
        sa = self.sad.outbound_for(tid, 4, src, dst, proto, sport, dport)
        if sa is None:
            return None
        live = self.live
        if rec.replay_protection and len(live) > 1 and rendezvous_owner(sa.spi, live) != self.me:
            return None  # handed to the owner by outbound()
        return sa, t, rec.mtu

    def _too_big(self, net: AccountNet, packet: memoryview, mtu: int, version: int) -> None:
        try:
            if version == 4:
                err = ip.icmp_frag_needed(packet, mtu, net.icmp_src4)
            else:
                err = ip.icmpv6_packet_too_big(packet, mtu, net.icmp_src6)
        except Drop:
            return
        net.write(memoryview(err))

    def _gre_anc(self, ttl: int) -> tuple[Anc, ...]:
        """Control messages for a GRE tunnel's ``ttl`` (RFC 2784 leaves the
        outer header to the sender; the record says which TTL) and the ECN
        copy, indexed by inner TOS, built once per TTL value. No IP_TTL when
        the socket's default already is the tunnel's TTL."""
        table = self._ttl_anc.get(ttl)
        if table is None:
            ttl_msg = (
                [] if ttl == self.default_ttl else [(SOL_IP, IP_TTL, ttl.to_bytes(4, "little"))]
            )
            by_ecn: list[Anc] = [[*ttl_msg, *tos_msg] for tos_msg in self._tos_anc[:4]]
            table = tuple(by_ecn[ip.ecn_encap(t)] for t in range(256))
            self._ttl_anc[ttl] = table
        return table

    def _encap(self, t: TunnelEntry, sa: Any, inner: memoryview, version: int) -> None:
        out = self.out
        rec = t.record
        # inner TOS / traffic class byte (parse_flow saw a whole IP header)
        tos = inner[1] if version == 4 else ((inner[0] << 4) | (inner[1] >> 4)) & 0xFF
        if sa is None:  # GRE
            n = gre.encapsulate_into(
                out, 0, inner, _ETH_P_IP if version == 4 else _ETH_P_IPV6, key=rec.gre_key
            )
            assert rec.remote_addr is not None
            table = self._ttl_anc.get(rec.ttl)
            if table is None:
                table = self._gre_anc(rec.ttl)
            self.send_gre(self.out_view[:n], (rec.remote_addr, 0), table[tos])
        else:
            n = sa.codec.encapsulate_into(out, 0, inner, NH_IPV4 if version == 4 else NH_IPV6)
            if sa.udp_encap:
                self.send_udp(self.out_view[:n], sa.dest, self._tos_anc[tos])
            else:
                self.send_esp(self.out_view[:n], sa.dest, self._tos_anc[tos])
            sa.packets += 1
            sa.bytes += len(inner)
        t.packets_out += 1
        t.bytes_out += len(inner)


# --------------------------------------------------------------------------
# I/O shell
# --------------------------------------------------------------------------


@dataclass
class WorkerConfig:
    anycast: str
    """The anycast address: every socket binds it, it must be on an interface."""
    index: int = 0
    """This worker's index on the node (0..workers-1, < 256): with the start
    time it makes the worker's GCM IV space (``esp.iv_worker_id``)."""
    node: str = "node"
    workers: int = 1
    """How many worker indices the node may run (for the raw-socket share)."""
    run_dir: Path = Path("/run/anywan")
    tun_name: str = "aw0"
    netns_template: str | None = "anywan-{account}"
    """Per-account namespace name; None puts every account's TUN here, named
    ``aw<crc32(account)>`` (per-account devices without namespaces)."""
    tun_mtu: int = 1500
    mss_clamp: bool = True
    metrics_addr: str = "127.0.0.1"
    metrics_port: int = 9410
    """0 disables the /metrics HTTP server."""
    bus: dict[str, Any] | None = None
    """Subscriber kwargs (endpoints and CURVE keys), or None for no bus."""
    relay: dict[str, Any] | None = None
    """RelayClient kwargs, or None: IKE then goes unanswered (counted)."""
    state_file: Path | None = None
    """A msgpack list of [key, encoded record] applied at start (tests, bench)."""
    listen: tuple[str, ...] = field(default=("esp", "gre", "udp4500", "udp500"))
    handoff_addr: str | None = None
    """This worker's address on the node's cluster (bus) network, where
    other nodes' workers hand it cleartext for the replay-protected SAs it
    owns (DESIGN §5). None: the source address toward the bus snapshot
    endpoint's host (tcp:// endpoints); "" or "off": no cross-node handoff
    (the worker then takes part in the node-local election only)."""
    handoff_port: int = HANDOFF_PORT
    """UDP port of the node's cross-node handoff endpoint, the same for all
    the node's workers (SO_REUSEPORT); announced to the other nodes through
    control's ``worker/`` records."""

    @property
    def worker_id(self) -> str:
        return f"{self.node}/{self.index}"


class StartupError(RuntimeError):
    """A condition that keeps the worker from starting; message for the operator."""


class NodePeers:
    """Which worker indices are alive on this node, via flock'ed files.

    A worker holds ``worker-<i>.lock`` for its life; the kernel releases it
    when the process dies (even SIGKILL). Peers are alive if their lock
    cannot be taken.
    """

    def __init__(self, run_dir: Path, index: int, workers: int) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        self.run_dir = run_dir
        self.index = index
        self.workers = workers
        self._fd = os.open(run_dir / f"worker-{index}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            raise StartupError(
                f"worker index {index} is already running on this node ({run_dir})"
            ) from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, str(os.getpid()).encode(), 0)

    def pid_of(self, index: int) -> int | None:
        """The process id worker ``index`` wrote into its lock file (None if
        unreadable; alive or not is :meth:`live`'s question)."""
        try:
            raw = (self.run_dir / f"worker-{index}.lock").read_bytes()
        except OSError:
            return None
        return int(raw) if raw.isdigit() else None

    def live(self) -> list[int]:
        alive = []
        for i in range(self.workers):
            if i == self.index:
                alive.append(i)
                continue
            path = self.run_dir / f"worker-{i}.lock"
            try:
                fd = os.open(path, os.O_RDWR)
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                alive.append(i)
            else:
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)
        return alive

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)


class Worker:
    """The process: sockets, TUNs, bus, relay, loop."""

    BATCH = 64
    """Packets drained per fd per loop turn (fairness between fds)."""

    TUN_GSO = True
    """Open the TUN queues with IFF_VNET_HDR and merge the in-order TCP
    segments of a loop turn into one GSO write (``tun.GsoTunWriter``)."""

    TUN_STEER = True
    """Pass each account's TUN queue fd to the node's other workers
    (SCM_RIGHTS over AF_UNIX), so that they write a replay-protected
    tunnel's inbound packets into its owner's queue and the replies reach
    the owner without a hand-off (:meth:`Dataplane.inbound_writer`)."""

    QUEUE_RESEND = 5.0
    """Seconds after which our queue fds are passed to a peer again (it may
    not have had the account yet; it replaces the old copy)."""

    def __init__(self, config: WorkerConfig, *, registry: Any = None) -> None:
        from . import esp, sockets
        from .metrics import OwnerMetrics, WorkerMetrics

        self.cfg = config
        self._sockets = sockets
        self.metrics = WorkerMetrics(registry)
        self._events: queue.SimpleQueue[tuple[str, str, Any]] = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._running = False
        self._subscriber: Any = None
        self._relay: Any = None
        self._metrics_server: Any = None
        self.ep = select.epoll()
        self.handlers: dict[int, Callable[[], None]] = {}
        self.buf = bytearray(65536)
        self.view = memoryview(self.buf)
        self._gre_names = {}
        self._tun_gso: dict[int, Any] = {}
        """TUN fd → its GsoTunWriter (flushed at the end of every loop turn)."""
        self.ike_to_control = 0
        self.ike_to_peer = 0
        self.ike_unrelayed = 0
        self._dirty_accounts: set[str] = set()
        self._sync_failing: set[str] = set()
        """Accounts whose last sync failed (logged once until it works)."""
        self._created_netns: set[str] = set()
        self._tun_routes: dict[str, set[str]] = {}
        """Account → the prefixes routed into its TUN (what the last sync applied)."""
        self._netlink: dict[str, Any] = {}
        """Account → netlink handle in its namespace (``TunConfig.open``), kept:
        pyroute2 forks a child to make one, ~6 ms of the packet loop each."""
        self._route_watch: dict[str, Any] = {}
        """Account → ``tun.RouteWatch`` in its namespace (routes deleted by others)."""
        self._tun_index: dict[str, int] = {}
        """Account → its TUN's interface index (from the last sync)."""
        self._live: list[int] = [config.index]
        self.raw_esp: socket.socket | None = None
        self.raw_gre: socket.socket | None = None
        self.udp4500: socket.socket | None = None
        self.udp500: socket.socket | None = None
        self.peers: NodePeers | None = None

        # GCM IVs are worker_id ‖ seq under a key every worker shares: the id
        # must differ between workers AND between two lives of one index, or
        # a restarted worker would repeat nonces (RFC 4106 §3.1). Index in the
        # high 8 bits, the start time in tenths of a second below (esp docs).
        self.iv_worker_id = esp.iv_worker_id(config.index, int(time.time() * 10))
        iv_id = self.iv_worker_id

        def outbound_factory(rec: SaRecord) -> Any:
            return esp.OutboundSa.from_record(rec, worker_id=iv_id)

        self.dp = Dataplane(
            inbound_factory=esp.InboundSa.from_record,
            outbound_factory=outbound_factory,
            send_esp=self._send_raw_esp,
            send_udp=self._send_udp,
            send_gre=self._send_raw_gre,
            mss_clamp=config.mss_clamp,
        )
        self._gso: Any = None
        self._esp = esp
        self.handoff_sock: socket.socket | None = None
        self._handoff_hdr: dict[str, bytes] = {}
        self._reserved: dict[tuple[str, int], int] = {}
        self._owned_codec: dict[tuple[str, int], Any] = {}
        self._checkpoints: dict[tuple[str, int], int] = {}
        """(tunnel, outbound SPI) → replicated ``next_seq`` (``seq/`` records)."""
        self.dp.me = config.index
        self.dp.live = (config.index,)
        # cluster-wide owner election and cross-node handoff (DESIGN §5)
        self.handoff_udp: socket.socket | None = None
        self.handoff_bound: tuple[str, int] | None = None
        self._handoff_key = b""
        self._handoff_aead: Any = None
        self._aeads: dict[bytes, Any] = {}
        self._life = int.from_bytes(os.urandom(8), "big") >> 1
        """This process's id in reports: counters start over with a new one."""
        self._nonce_prefix = os.urandom(8)
        self._nonce_ctr = 0
        self._from_remote = b""
        """While a packet another node handed us is processed: the mark and
        its handoff nonce (what a local pass-on to the owner carries, and
        what :meth:`_admit_handed` checks)."""
        self._worker_recs: dict[str, WorkerRecord] = {}
        self._last_worker_recs: dict[str, WorkerRecord] = {}
        self._worker_recs_at = 0.0
        self._dest: dict[int, Any] = {config.index: self._handoff_addr(config.index)}
        """Election id → where a packet for that owner goes: an abstract
        AF_UNIX name (same node) or ((addr, port), AESGCM) (another node)."""
        self.election = "node"
        """"cluster" (``worker/`` records) or "node" (node-local fallback)."""
        self.remote_sent = self.remote_received = self.remote_rejected = 0
        self.remote_replayed = 0
        self._handoff_windows: dict[bytes, ReplayWindow] = {}
        """Sender nonce prefix → its handoff replay window (:meth:`_admit_handed`)."""
        self.windows_raised = 0
        self._rwin: dict[int, int] = {}
        """Inbound SPI → replicated replay-window top (``rwin/`` records)."""
        self._om = OwnerMetrics(self.metrics.registry)
        # TUN queue fds shared between the node's workers (TUN_STEER)
        self.tunq_sock: socket.socket | None = None
        self._tunq_sent: dict[tuple[int, int, str, int], float] = {}
        """(peer index, peer pid, account, queue generation) → when we passed it."""
        self._tunq_gen: dict[str, int] = {}
        """Account → which opening of its TUN queue this is (1, 2, ... per
        process): a peer keeps one copy per generation, so a resend of the
        same queue costs it nothing and a reopened queue replaces the old."""
        self._peer_q: dict[tuple[str, int], tuple[int, WriteFn, int, int]] = {}
        """(account, peer index) → (our copy of its queue fd, writer, its pid,
        its queue generation)."""
        self._peer_watch: dict[int, tuple[int, int]] = {}
        """Peer index → (pid, pidfd): its fds are closed the moment it exits,
        so no queue outlives its reader (the kernel would keep sending
        packets to it)."""

    # ---- senders -----------------------------------------------------------
    def _install_senders(self) -> None:
        """A kind of outer packet this worker has no socket for (its listener
        left out of ``--listen``) gets a sender that counts the packet as a
        ``no_tunnel`` drop and warns once, naming the listener: a tunnel of
        that kind pushed by control must not crash the packet loop."""
        if self.raw_esp is None:
            self.dp.send_esp = self._unsendable("esp")
        if self.raw_gre is None:
            self.dp.send_gre = self._unsendable("gre")
        if self.udp4500 is None:
            self.dp.send_udp = self._unsendable("udp4500")

    def _unsendable(self, listener: str) -> SendFn:
        count = self.dp.count
        warned = False

        def send(data: memoryview, dest: tuple[str, int], anc: Anc) -> None:
            nonlocal warned
            count(DropReason.NO_TUNNEL)
            if not warned:
                warned = True
                log.warning(
                    "a tunnel to %s needs --listen %s on this worker (not open here):"
                    " its packets are dropped and counted as no_tunnel",
                    dest[0],
                    listener,
                )

        return send

    # Raw sockets take IP_TTL / IP_TOS as sendmsg control messages (Linux
    # ip_cmsg_send, raw_sendmsg; checked on 6.18), so one socket serves every
    # tunnel's TTL and every packet's ECN without a setsockopt per packet.
    def _send_raw_esp(self, data: memoryview, dest: tuple[str, int], anc: Anc) -> None:
        try:
            if anc:
                self.raw_esp.sendmsg([data], anc, 0, dest)  # type: ignore[union-attr]
            else:
                self.raw_esp.sendto(data, dest)  # type: ignore[union-attr]
        except OSError:
            self.dp.count(DropReason.NO_TUNNEL)

    def _send_raw_gre(self, data: memoryview, dest: tuple[str, int], anc: Anc) -> None:
        try:
            if anc:
                self.raw_gre.sendmsg([data], anc, 0, dest)  # type: ignore[union-attr]
            else:
                self.raw_gre.sendto(data, dest)  # type: ignore[union-attr]
        except OSError:
            self.dp.count(DropReason.NO_TUNNEL)

    def _send_udp(self, data: memoryview, dest: tuple[str, int], anc: Anc) -> None:
        self._gso.add(data, dest, anc)

    # ---- startup -----------------------------------------------------------
    def start(self) -> None:
        cfg = self.cfg
        s = self._sockets
        try:
            ipaddress.ip_address(cfg.anycast)
        except ValueError:
            raise StartupError(f"anycast address {cfg.anycast!r} is not an IP address") from None
        if not os.path.exists("/dev/net/tun"):
            raise StartupError("no /dev/net/tun: load the tun module (modprobe tun)")
        if not os.access("/dev/net/tun", os.R_OK | os.W_OK):
            raise StartupError("no permission on /dev/net/tun (run as root / CAP_NET_ADMIN)")
        from . import tun

        try:
            tun.probe()
        except tun.TunError as exc:
            raise StartupError(str(exc)) from None
        self.peers = NodePeers(cfg.run_dir, cfg.index, cfg.workers)
        try:
            if "esp" in cfg.listen:
                self.raw_esp = s.open_raw(s.IPPROTO_ESP, cfg.anycast)
                self._register(self.raw_esp.fileno(), self._drain_raw_esp)
            if "gre" in cfg.listen:
                self.raw_gre = s.open_raw(s.IPPROTO_GRE, cfg.anycast)
                self._register(self.raw_gre.fileno(), self._drain_raw_gre)
                self.dp.default_ttl = self.raw_gre.getsockopt(socket.IPPROTO_IP, IP_TTL)
            if "udp4500" in cfg.listen:
                self.udp4500 = s.open_udp(cfg.anycast, 4500)
                self._register(self.udp4500.fileno(), self._drain_udp4500)
                # room to read a whole TUN packet into the batch (_tun_drainer)
                self._gso = s.GsoBatcher(self.udp4500, room=len(self.buf) + 64)
                self.dp.send_udp = self._gso.add  # one call less per packet than _send_udp
                s.enable_gro(self.udp4500)
                s.enable_recvtos(self.udp4500)
            if "udp500" in cfg.listen:
                self.udp500 = s.open_udp(cfg.anycast, 500)
                self._register(self.udp500.fileno(), self._drain_udp500)
        except s.SocketError as exc:
            raise StartupError(str(exc)) from None
        self._install_senders()
        self._open_handoff()
        if self.TUN_STEER:
            self._open_tunq()
        self._update_share()
        self._register(self._wake_r, self._drain_events)
        if cfg.state_file is not None:
            self._load_state_file(cfg.state_file)
        if cfg.metrics_port:
            from prometheus_client import start_http_server

            try:
                self._metrics_server = start_http_server(
                    cfg.metrics_port, addr=cfg.metrics_addr, registry=self.metrics.registry
                )
            except OSError as exc:
                raise StartupError(
                    f"cannot serve /metrics on {cfg.metrics_addr}:{cfg.metrics_port}: "
                    f"{exc.strerror}"
                ) from None
        if cfg.relay is not None:
            from replication.relay import RelayClient

            self._relay = RelayClient(
                **cfg.relay,
                worker_id=cfg.worker_id,
                on_reply=self._on_relay_reply,
                registry=self.metrics.registry,
            )
            self._relay.start()
        if cfg.bus is not None:
            self._start_bus()

    def _start_bus(self) -> None:
        from replication.subscriber import Subscriber

        kwargs = dict(self.cfg.bus or {})
        connect_timeout = float(kwargs.pop("connect_timeout", 10.0))
        self._subscriber = Subscriber(
            **kwargs,
            worker_id=self.cfg.worker_id,
            on_set=self._on_set,
            on_delete=self._on_delete,
            on_batch=self._on_bus_batch,
            registry=self.metrics.registry,
        )
        self._subscriber.start()
        if connect_timeout > 0 and not self._subscriber.ready.wait(connect_timeout):
            self._subscriber.stop()
            raise StartupError(
                f"bus unreachable: no snapshot from {kwargs.get('snapshot_endpoint')} "
                f"within {connect_timeout:g} s (control running? keys right?)"
            )

    def _load_state_file(self, path: Path) -> None:
        import msgpack

        from replication.records import decode

        try:
            items = msgpack.unpackb(path.read_bytes(), raw=False)
        except (OSError, ValueError) as exc:
            raise StartupError(f"cannot read state file {path}: {exc}") from None
        for key, data in items:
            self._on_set(key, decode(data))

    def _register(self, fd: int, handler: Callable[[], None]) -> None:
        self.handlers[fd] = handler
        self.ep.register(fd, select.EPOLLIN)

    def _unregister(self, fd: int) -> None:
        self.handlers.pop(fd, None)
        with contextlib.suppress(OSError, ValueError):
            self.ep.unregister(fd)

    # ---- bus callbacks (other threads): enqueue only -------------------------
    def _on_set(self, key: str, rec: Record) -> None:
        self._events.put(("set", key, rec))
        self._wake()

    def _on_delete(self, key: str, rec: Record | None = None) -> None:
        self._events.put(("del", key, rec))
        self._wake()

    def _on_bus_batch(self, token: object) -> None:
        """The records queued so far end a bus batch: once the loop has
        applied them (and fixed up the TUNs), it confirms ``token`` and the
        bus acks them, so control's "applied everywhere" (the IKE answer
        hold, make-before-break) means this loop can use them."""
        self._events.put(("batch", "", token))
        self._wake()

    _wake_pending = False

    def _wake(self) -> None:
        """Wake the loop (any thread). One pipe byte per wake-up, not per
        record: while one is pending (set here, cleared by the loop after it
        emptied the pipe and before it reads the queue) the queued record is
        seen by that wake-up."""
        if self._wake_pending:
            return
        self._wake_pending = True
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"x")

    def apply_pending(self) -> None:
        """Apply queued bus records (loop thread), then fix up account TUNs.

        Nothing is applied before the first snapshot is complete, so an SA
        and its sequence checkpoint always arrive together (a new owner must
        not start sending below the checkpoint)."""
        ready = getattr(self._subscriber, "ready", None)
        if ready is not None and not ready.is_set():
            return
        dp = self.dp
        token: Any = None
        while True:
            try:
                op, key, rec = self._events.get_nowait()
            except queue.Empty:
                break
            if op == "batch":
                token = rec
                continue
            log.debug("bus %s %s", op, key)
            try:
                if key.startswith("seq/"):
                    self._apply_checkpoint(key, rec if op == "set" else None)
                    continue
                if key.startswith("worker/"):
                    self._apply_worker(key, rec if op == "set" else None)
                    continue
                if key.startswith("rwin/"):
                    self._apply_rwin(key, rec if op == "set" else None)
                    continue
                if op == "set":
                    assert rec is not None
                    dp.apply(key, rec)
                    if not isinstance(rec, SaRecord):
                        # tunnels and routes shape the account's TUN (addresses,
                        # routes); SAs never do, and a TUN sync costs ~7 ms of
                        # netlink in the account's netns (a fork per call in
                        # pyroute2), which an IKE_AUTH storm must not pay per SA
                        self._dirty_accounts.add(rec.account_id)
                else:
                    acct = self._account_of_key(key)
                    dp.remove(key)
                    if acct is not None:
                        self._dirty_accounts.add(acct)
            except Exception as exc:  # an unusable record must not stop the worker
                self.metrics.records_rejected.inc()
                log.warning("record %s not applied: %s", key, type(exc).__name__)
        self.update_election()
        self.raise_replay_windows()
        self.manage_owned_sas()
        self._sync_dirty_accounts()
        if token is not None and self._subscriber is not None:
            self._subscriber.confirm(token)

    def _sync_dirty_accounts(self) -> None:
        """Sync every account a record touched. One that fails (a namespace
        another worker is still creating, netlink busy) stays dirty and is
        tried again at each housekeeping, every 0.25 s, until it works: a
        worker that gave up would never read its account's TUN queue, and be
        the owner of SAs whose packets it then drops, or leave the TUN to a
        sibling whose death takes the device and its routes with it."""
        if not self._dirty_accounts:
            return
        dirty, self._dirty_accounts = self._dirty_accounts, set()
        for acct in sorted(dirty):
            try:
                self._sync_account(acct)
            except Exception as exc:
                self._dirty_accounts.add(acct)
                self.metrics.account_sync_failures.inc()
                if acct not in self._sync_failing:
                    log.error("account %s inner network (retrying every 0.25 s): %s", acct, exc)
                self._sync_failing.add(acct)
            else:
                if acct in self._sync_failing:
                    self._sync_failing.discard(acct)
                    log.warning("account %s inner network: set up after retrying", acct)

    def _account_of_key(self, key: str) -> str | None:
        dp = self.dp
        if key.startswith("tunnel/"):
            t = dp.sad.tunnels.get(key.split("/", 1)[1])
            return t.record.account_id if t else None
        if key.startswith("route/"):
            rid = key.split("/", 1)[1]
            for table in dp.routes.tables.values():
                if rid in table.routes:
                    return table.account_id
        return None

    def _drain_events(self) -> None:
        """Empty the pipe, *then* clear the flag, then read the queue. The
        other order lost wake-ups for good: a record queued between clearing
        the flag and reading the pipe set the flag and wrote a byte that this
        read swallowed, so the flag stayed set with the pipe empty and every
        later record was queued without a wake-up (the worker silently stopped
        applying the bus: a rekey's new SA never arrived)."""
        with contextlib.suppress(BlockingIOError):
            while os.read(self._wake_r, 4096):
                pass
        self._wake_pending = False  # before the queue is read: see _wake
        self.apply_pending()

    # ---- accounts: TUN per account (in its own netns) -------------------------
    def _account_names(self, account: str) -> tuple[str | None, str]:
        if self.cfg.netns_template is None:
            return None, f"aw{zlib.crc32(account.encode()):08x}"[:15]
        return self.cfg.netns_template.format(account=account), self.cfg.tun_name

    def _sync_account(self, account: str) -> None:
        from . import tun

        dp = self.dp
        wanted = account in dp.account_ids()
        net = dp.accounts.get(account)
        netns_name, tun_name = self._account_names(account)
        if not wanted:
            self._close_route_watch(account)  # its socket would keep the namespace alive
            self._detach_tun(account)
            if (
                net is not None
                and netns_name is not None
                and netns_name in self._created_netns
                and not tun.device_exists(tun_name, netns_name=netns_name)
            ):
                from pyroute2 import netns

                with contextlib.suppress(Exception):
                    netns.remove(netns_name)
                self._created_netns.discard(netns_name)
            return
        if net is None:
            if netns_name is not None and tun.ensure_netns(netns_name):
                self._created_netns.add(netns_name)
            fd = tun.open_queue(tun_name, netns_name=netns_name, vnet_hdr=self.TUN_GSO)
            net = AccountNet(account, self._tun_writer(fd), fd=fd, netns=netns_name)
            self._tunq_gen[account] = self._tunq_gen.get(account, 0) + 1
            dp.attach_account(net)
            self._register(fd, self._tun_drainer(net))
        self._watch_routes(account, netns_name)
        addrs, prefixes = dp.account_config(account)
        dp.update_account(net, addrs)
        # The tunnel interface addresses are the worker's end of each tunnel,
        # not the namespace's: they are routed into the TUN, not assigned to
        # it (an address local to the namespace would make our ICMP errors
        # from it martians there).
        want = {
            *map(_canonical_prefix, prefixes),
            *(str(ipaddress.ip_interface(a).network) for a in addrs),
        }
        before = self._tun_routes.get(account)
        if want == before:
            return  # no netlink at all: e.g. a tunnel record whose address is unchanged
        # Only the difference: this runs in the packet loop, and replacing every
        # route took 260 ms per sync at 1000 routes (each new route, 1000
        # routes, stalled every worker that long); all of them on a new queue.
        add = want if before is None else want - before
        remove = set() if before is None else before - want
        cfg = tun.TunConfig(tun_name, netns_name=netns_name)
        ipr = self._netlink.get(account)
        if ipr is None:
            ipr = self._netlink[account] = cfg.open()
        try:
            self._tun_index[account] = cfg.apply(
                mtu=self.cfg.tun_mtu, routes=sorted(add), remove_routes=sorted(remove), ipr=ipr
            )
        except tun.TunGone:
            # deleted under our open queue, which is dead now: let go of it,
            # and the retry (dirty_accounts) opens a queue of a new device
            self._detach_tun(account)
            raise
        except Exception:
            self._close_netlink(account)  # a fresh handle next time
            raise
        self._tun_routes[account] = want
        watch = self._route_watch.get(account)
        if before is None and watch is not None:
            # what happened before a full sync (the new TUN's own "down", the
            # routes of a TUN that went down) is repaired by it
            watch.read(self._tun_index[account])

    def _detach_tun(self, account: str) -> None:
        """Close our queue of the account's TUN and forget what it carried
        (routes applied, sibling queues, netlink handle, whose socket would
        keep the namespace alive). The route watch stays."""
        dp = self.dp
        self._tun_routes.pop(account, None)
        self._tun_index.pop(account, None)
        self._close_netlink(account)
        for key in [k for k in self._peer_q if k[0] == account]:
            self._close_peer_queue(key)
        self._tunq_sent = {k: t for k, t in self._tunq_sent.items() if k[2] != account}
        net = dp.accounts.pop(account, None)
        if net is not None:
            self._unregister(net.fd)
            self._tun_gso.pop(net.fd, None)
            with contextlib.suppress(OSError):
                os.close(net.fd)

    def _tun_lost(self, account: str) -> None:
        """Reading our TUN queue failed (not "nothing to read"): the device was
        deleted under it. Set up a new one, at once and then every 0.25 s."""
        log.warning("account %s: TUN queue failed (device deleted?): opening a new one", account)
        self.metrics.tun_repairs.inc()
        self._detach_tun(account)
        self._dirty_accounts.add(account)
        self._sync_dirty_accounts()

    def _close_netlink(self, account: str) -> None:
        ipr = self._netlink.pop(account, None)
        if ipr is not None:
            with contextlib.suppress(Exception):
                ipr.close()

    def _close_route_watch(self, account: str) -> None:
        watch = self._route_watch.pop(account, None)
        if watch is not None:
            self._unregister(watch.fileno())
            watch.close()

    def _watch_routes(self, account: str, netns_name: str | None) -> None:
        """Learn from netlink when a route into the account's TUN disappears
        (or the TUN goes down): the sync applies only differences from what it
        last applied, so without this a route deleted by hand would stay gone."""
        from . import tun

        if account in self._route_watch:
            return
        try:
            watch = tun.RouteWatch(netns_name)
        except (OSError, tun.TunError) as exc:  # tried again at the next sync
            log.warning("account %s: cannot watch its TUN routes: %s", account, exc)
            return
        self._route_watch[account] = watch
        self._register(watch.fileno(), lambda: self._routes_changed(account))

    def _routes_changed(self, account: str) -> None:
        """Netlink says routes into the TUN were deleted or it went down:
        forget those routes (all of them if it went down) and sync again."""
        watch = self._route_watch.get(account)
        if watch is None:
            return
        deleted, down = watch.read(self._tun_index.get(account, -1))
        have = self._tun_routes.get(account)
        if have is None or not (deleted or down):
            return
        if down:
            lost = 1
            del self._tun_routes[account]
            log.warning("account %s: its TUN went down (or events were lost): re-syncing", account)
        else:
            missing = have.intersection(deleted)  # both canonical: _canonical_prefix
            if not missing:
                return  # ours to delete (a sync already forgot them) or not ours
            lost = len(missing)
            self._tun_routes[account] = have - missing
            log.warning(
                "account %s: %d route(s) into its TUN deleted outside anywan, restoring: %s",
                account,
                lost,
                ", ".join(sorted(missing)[:5]),
            )
        self.metrics.tun_repairs.inc(lost)
        self._dirty_accounts.add(account)
        self._sync_dirty_accounts()

    def _tun_writer(self, fd: int) -> WriteFn:
        dp = self.dp
        if self.TUN_GSO:
            from . import tun

            writer = tun.GsoTunWriter(fd, lambda: dp.count(DropReason.NO_TUNNEL))
            self._tun_gso[fd] = writer
            return writer.write
        write = os.write

        def tun_write(data: memoryview) -> None:
            try:
                write(fd, data)
            except OSError:
                dp.count(DropReason.NO_TUNNEL)

        return tun_write

    def _tun_drainer(self, net: AccountNet) -> Callable[[], None]:
        """The TUN queue's reader: up to :attr:`BATCH` packets per call.

        Each packet is read straight to where an AES-GCM ESP payload starts
        (after SPI, sequence number and IV) in the buffer its ESP packet will
        be sent from, so the packet is built around it without a copy
        (``OutboundSa.encapsulate_in_place``): with UDP GSO that is the end
        of the port-4500 batch (:meth:`GsoBatcher.slot`; the datagram then
        joins the batch as it lies, :meth:`GsoBatcher.commit`), otherwise the
        outbound buffer ``dp.out``. The fast path covers IPv4 packets whose
        address pair has a :meth:`Dataplane.flow_entry` (remembered per
        account; what ``Dataplane.outbound`` would decide for them, minus what
        is per packet): it checks the header, a TCP SYN (MSS clamp), the MTU
        and the codec, then encrypts and sends (AES-CBC after moving the
        packet 8 octets on, to where its 16-octet IV ends). A GRE tunnel's packets take
        the same path: the tunnel's constant GRE header is written in front
        of the packet where it was read (the ESP header's place) and the
        two go out in one raw ``sendmsg``. Every other packet (IPv6,
        SYNs, too big, unknown or ECMP flows, NULL encryption, SAs another
        worker owns, drops) is copied out and goes through
        ``Dataplane.outbound``, which decides everything itself.
        """
        fd = net.fd
        dp = self.dp
        buf = self.buf
        view = self.view
        readv = os.readv
        outbound = dp.outbound
        batch = self.BATCH
        gso = self._gso if self._gso is not None and self._gso.enabled else None
        # the buffer packets are read into and ESP packets built in
        out = dp.out if gso is None else gso.buf
        outv = memoryview(out)
        # with IFF_VNET_HDR a virtio_net_hdr comes first (no offloads were
        # enabled for reads, so it says "plain packet, checksums done"); it
        # lands in the ESP header's place, which is written afterwards
        skip = 10 if fd in self._tun_gso else 0
        pay = self._esp.ESP_HEADER_LEN + 8  # AES-GCM's 8-octet IV
        size = len(buf)  # the most one read returns
        reads: dict[int, list[memoryview]] = {}  # ESP packet offset -> [read view]
        gcm = self._esp._GcmOut
        cbc = self._esp._CbcOut
        cache = dp.flow_cache(net.account_id)
        flow_entry = dp.flow_entry
        tos_anc = dp._tos_anc
        clamp = dp.mss_clamp
        addr_pair = _ADDR_PAIR
        drop = dp._drop
        v4, tcp, syn = 0x45, _TCP, _SYN
        if gso is not None and gso.room < pay + size + 32:
            gso = None  # no room for a whole read plus the ESP trailer and ICV
        max_segments = 0 if gso is None else gso.max_segments
        last_slot = 0 if gso is None else len(gso.buf) - gso.room

        def drain() -> None:
            send_udp = dp.send_udp
            send_esp = dp.send_esp
            send_gre = dp.send_gre
            at = 0
            for _ in range(batch):
                if gso is not None:
                    at = gso.used
                    if gso.count >= max_segments or at > last_slot:
                        at = gso.slot()  # sends the full batch
                p = at + pay  # the inner packet's first octet
                bufs = reads.get(at)
                if bufs is None:
                    if len(reads) >= 256:
                        reads.clear()
                    bufs = reads[at] = [outv[p - skip : p - skip + size]]
                try:
                    n = readv(fd, bufs) - skip
                except BlockingIOError:  # drained
                    return
                except OSError:  # EBADFD: the device is gone
                    self._tun_lost(net.account_id)
                    return
                if n <= 0:
                    continue
                hit: Any = None
                if out[p] == v4 and n >= 24:
                    key = addr_pair(out, p + 12)[0]
                    hit = cache.get(key, False)  # None: remembered "not cacheable"
                    if hit is False:
                        hit = flow_entry(net, outv[p : p + n])
                if hit is not None:
                    sa, t, mtu = hit
                    codec = sa.codec
                    total = out[p + 2] << 8 | out[p + 3]
                    if (
                        n <= mtu
                        and 24 <= total <= n
                        and not (out[p + 9] == tcp and clamp and n > 33 and out[p + 33] & syn)
                    ):
                        if (cls := codec.__class__) is gcm or cls is cbc:
                            anc = tos_anc[out[p + 1]]  # before the encryption overwrites it
                            if cls is cbc:
                                # CBC's payload starts after a 16-octet IV, 8 octets
                                # further: one memmove (memoryview copies overlaps safely)
                                outv[p + 8 : p + 8 + n] = outv[p : p + n]
                            try:
                                m = codec.encapsulate_in_place(out, at, n, 4)
                            except Drop as exc:
                                drop(exc)
                                continue
                            if not sa.udp_encap:
                                send_esp(outv[at : at + m], sa.dest, anc)
                            elif gso is not None:
                                gso.commit(m, sa.dest, anc)
                            else:
                                send_udp(outv[:m], sa.dest, anc)
                            sa.packets += 1
                            sa.bytes += n
                            t.packets_out += 1
                            t.bytes_out += n
                            continue
                        if codec is None:  # GreFlow
                            h = len(sa.hdr)
                            out[p - h : p] = sa.hdr
                            send_gre(outv[p - h : p + n], sa.dest, sa.anc[out[p + 1]])
                            t.packets_out += 1
                            t.bytes_out += n
                            continue
                buf[:n] = outv[p : p + n]
                outbound(net, view[:n])

        return drain

    # ---- socket drains -------------------------------------------------------
    def _drain_raw_esp(self) -> None:
        sock = self.raw_esp
        assert sock is not None
        buf, view, inbound = self.buf, self.view, self.dp.inbound_esp
        for _ in range(self.BATCH):
            try:
                n = sock.recv_into(buf)
            except BlockingIOError:
                return
            ihl = (buf[0] & 0x0F) * 4
            inbound(view[ihl:n], buf[1])

    def _drain_raw_gre(self) -> None:
        sock = self.raw_gre
        assert sock is not None
        buf, view, inbound = self.buf, self.view, self.dp.inbound_gre
        recv_into = sock.recv_into
        names = self._gre_names
        for _ in range(self.BATCH):
            try:
                n = recv_into(buf)
            except BlockingIOError:
                return
            if n < 20:
                self.dp.count(DropReason.MALFORMED)
                continue
            # (local, remote) as text, cached by the 8 address octets as an int
            pair = names.get(_ADDR_PAIR(buf, 12)[0])
            if pair is None:
                pair = self._gre_name_pair(view)
            inbound(view[(buf[0] & 0x0F) * 4 : n], pair[0], pair[1], buf[1])

    def _gre_name_pair(self, view: memoryview) -> tuple[str, str]:
        if len(self._gre_names) >= 4096:
            self._gre_names.clear()
        ntoa = socket.inet_ntoa
        pair = (ntoa(view[16:20]), ntoa(view[12:16]))
        self._gre_names[_ADDR_PAIR(view, 12)[0]] = pair
        return pair

    _gre_names: dict[int, tuple[str, str]]

    def _drain_udp4500(self) -> None:
        sock = self.udp4500
        assert sock is not None
        buf, view, dp = self.buf, self.view, self.dp
        inbound = dp.inbound_esp
        recvmsg_into = sock.recvmsg_into
        bufs = [buf]
        cmsg = self._sockets.UDP_CMSG_SPACE
        ancillary = self._sockets.udp_ancillary
        for _ in range(self.BATCH):
            try:
                n, anc, _flags, addr = recvmsg_into(bufs, cmsg)
            except BlockingIOError:
                return
            # segment size (GRO) and outer TOS (IP_RECVTOS): once per batch.
            # The common case is one control message, the TOS of one datagram.
            if not anc:
                seg, tos = n, 0
            elif len(anc) == 1 and anc[0][1] == _IP_TOS_CMSG and anc[0][0] == SOL_IP:
                seg, tos = n, anc[0][2][0]
            else:
                seg, tos = ancillary(anc, n)
            if seg >= n:
                # one datagram: ESP unless it is a keepalive or carries the
                # non-ESP marker (RFC 3948 §2.2-2.3; udpencap.classify)
                if n >= 8 and (buf[0] or buf[1] or buf[2] or buf[3]):
                    inbound(view[:n], tos)
                else:
                    self._udp4500_other(view[:n], addr, tos)
                continue
            for off in range(0, n, seg):  # UDP GRO: several datagrams of one flow
                payload = view[off : min(off + seg, n)]
                if len(payload) >= 8 and (payload[0] or payload[1] or payload[2] or payload[3]):
                    inbound(payload, tos)
                else:
                    self._udp4500_other(payload, addr, tos)

    def _udp4500_other(self, payload: memoryview, addr: tuple[str, int], tos: int) -> None:
        """A port-4500 datagram that is not plain ESP: IKE, keepalive or junk."""
        dp = self.dp
        try:
            kind = udpencap.classify(payload)
        except Drop as exc:
            dp._drop(exc)
            return
        if kind == udpencap.Udp4500.ESP:
            dp.inbound_esp(payload, tos)
        elif kind == udpencap.Udp4500.IKE:
            self._relay_ike(bytes(payload[4:]), 4500, addr)
        else:
            dp.count(DropReason.KEEPALIVE)

    def _drain_udp500(self) -> None:
        sock = self.udp500
        assert sock is not None
        for _ in range(self.BATCH):
            try:
                data, addr = sock.recvfrom(65535)
            except BlockingIOError:
                return
            self._relay_ike(data, 500, addr)

    # ---- IKE relay ----------------------------------------------------------
    def _relay_ike(self, data: bytes, port: int, addr: tuple[str, int]) -> None:
        if self._relay is None:
            self.ike_unrelayed += 1
            return
        from replication.relay import IkeDatagram

        self._relay.forward(
            IkeDatagram(
                worker_id=self.cfg.worker_id,
                data=data,
                local_addr=self.cfg.anycast,
                local_port=port,
                remote_addr=addr[0],
                remote_port=addr[1],
            )
        )
        self.ike_to_control += 1
        self.metrics.ike_relayed.labels("to_control").inc()

    def _on_relay_reply(self, dgram: Any) -> None:
        """Runs in the relay thread: send control's reply from our socket."""
        try:
            if dgram.local_port == 4500 and self.udp4500 is not None:
                self.udp4500.sendto(
                    udpencap.NON_ESP_MARKER + dgram.data, (dgram.remote_addr, dgram.remote_port)
                )
            elif self.udp500 is not None:
                self.udp500.sendto(dgram.data, (dgram.remote_addr, dgram.remote_port))
            else:
                return
            self.metrics.ike_relayed.labels("to_peer").inc()
        except OSError as exc:
            log.warning("IKE reply to %s not sent: %s", dgram.remote_addr, exc.strerror)

    # ---- replay-protected SAs: one owner per SA on the node (DESIGN §5) -------------
    def _node_addr(self, kind: str, index: int) -> str:
        # Abstract AF_UNIX names live in the network namespace: node-local.
        return f"\0anywan-{kind}-{zlib.crc32(str(self.cfg.run_dir).encode()):08x}-{index}"

    def _handoff_addr(self, index: int) -> str:
        return self._node_addr("handoff", index)

    def _node_socket(self, addr: str, what: str) -> socket.socket:
        """A non-blocking AF_UNIX datagram socket bound to our abstract ``addr``."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.bind(addr)
        except OSError as exc:
            sock.close()
            raise StartupError(f"{what} socket for index {self.cfg.index}: {exc}") from None
        sock.setblocking(False)
        return sock

    HANDOFF_QLEN = 1024

    def _open_handoff(self) -> None:
        # AF_UNIX datagram queues hold net.unix.max_dgram_qlen packets (10 by
        # default): far too few for a burst handed to the owner. Raise it for
        # this (node) namespace if we may; otherwise bursts are counted drops.
        path = "/proc/sys/net/unix/max_dgram_qlen"
        with contextlib.suppress(OSError, ValueError):
            with open(path) as fh:
                current = int(fh.read())
            if current < self.HANDOFF_QLEN:
                with open(path, "w") as fh:
                    fh.write(str(self.HANDOFF_QLEN))
        sock = self._node_socket(self._handoff_addr(self.cfg.index), "handoff")
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.handoff_sock = sock
        self._register(sock.fileno(), self._drain_handoff)
        self.dp.handoff = self._handoff_send
        self._open_handoff_udp()

    def _cluster_addr(self) -> str | None:
        """Our address on the cluster network (:attr:`WorkerConfig.handoff_addr`)."""
        cfg = self.cfg
        if cfg.handoff_addr is not None:
            return None if cfg.handoff_addr in ("", "off") else cfg.handoff_addr
        ep = str((cfg.bus or {}).get("snapshot_endpoint", ""))
        if not ep.startswith("tcp://"):
            return None  # ipc:// or no bus: no cluster network to speak of
        host, _, port = ep[6:].rpartition(":")
        host = host.strip("[]")
        try:
            info = socket.getaddrinfo(host, int(port), type=socket.SOCK_DGRAM)[0]
            with socket.socket(info[0], socket.SOCK_DGRAM) as probe:
                probe.connect(info[4])  # no packet: the kernel only picks a source
                return str(probe.getsockname()[0])
        except (OSError, ValueError, IndexError) as exc:
            log.warning("no cluster address toward %s for the handoff socket: %s", ep, exc)
            return None

    def _open_handoff_udp(self) -> None:
        """The node's cross-node handoff endpoint (DESIGN §5): UDP on our
        cluster network address, a port every worker of the node binds
        (SO_REUSEPORT: the kernel delivers to a live one); datagrams are
        AES-256-GCM under the node's key (:meth:`_node_handoff_key`), which
        only workers that got our ``worker/`` record over the CURVE bus
        know. Not opened without a cluster address (node-local election)."""
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        addr = self._cluster_addr()
        if addr is None:
            return
        key = self._node_handoff_key()
        family = socket.AF_INET6 if ":" in addr else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind((addr, self.cfg.handoff_port))
        except OSError as exc:
            sock.close()
            raise StartupError(
                f"cross-node handoff socket on {addr}:{self.cfg.handoff_port}: {exc.strerror}"
            ) from None
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        sock.setblocking(False)
        self.handoff_udp = sock
        self.handoff_bound = (addr, sock.getsockname()[1])
        self._handoff_key = key
        self._handoff_aead = AESGCM(key)
        self._register(sock.fileno(), self._drain_handoff_udp)

    def _node_handoff_key(self) -> bytes:
        """The node's handoff key, shared by its workers (whichever of them
        the kernel gives a datagram must open it): ``<run_dir>/handoff.key``,
        32 random bytes made by the first worker (mode 0600, linked into
        place atomically, so a second worker starting at the same time reads
        the same key). It leaves the node only in our reports and ``worker/``
        records, i.e. over the CURVE bus."""
        path = self.cfg.run_dir / "handoff.key"
        if not path.exists():
            tmp = path.with_name(f"handoff.key.{self.cfg.index}.{os.getpid()}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, os.urandom(HANDOFF_KEY_BYTES))
            finally:
                os.close(fd)
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass
            finally:
                tmp.unlink()
        key = path.read_bytes()
        if len(key) != HANDOFF_KEY_BYTES:
            raise StartupError(f"{path} is not a {HANDOFF_KEY_BYTES}-byte handoff key")
        return key

    def _handoff_send(self, account: str, owner: int, packet: memoryview) -> None:
        hdr = self._handoff_hdr.get(account)
        if hdr is None:
            raw = account.encode()
            hdr = self._handoff_hdr[account] = bytes([len(raw)]) + raw
        dest = self._dest.get(owner)
        try:
            if dest.__class__ is str:  # same node: AF_UNIX, no crypto
                # another node's packet keeps its handoff nonce: the owner's
                # replay window decides (_admit_handed), not ours
                remote = self._from_remote
                parts = [remote, hdr, packet] if remote else [hdr, packet]
                self.handoff_sock.sendmsg(parts, [], 0, dest)  # type: ignore[union-attr]
            elif dest is not None and self.handoff_udp is not None and not self._from_remote:
                addr, aead = dest
                self._nonce_ctr += 1
                if self._nonce_ctr > 0xFFFFFFFF:  # a fresh random prefix every 2**32
                    self._nonce_prefix, self._nonce_ctr = os.urandom(8), 1
                nonce = self._nonce_prefix + self._nonce_ctr.to_bytes(4, "big")
                sealed = aead.encrypt(nonce, hdr + packet, HANDOFF_VERSION)
                self.handoff_udp.sendmsg([HANDOFF_VERSION + nonce, sealed], [], 0, addr)
                self.remote_sent += 1
            else:  # no such candidate, or across nodes twice (views differ): never bounce
                self.dp.count(DropReason.NO_SA)
        except OSError:
            self.dp.count(DropReason.NO_SA)

    def _drain_handoff_udp(self) -> None:
        """Cleartext another node's worker handed to this node (its SA owner
        is here in its view): sent if we own the SA, else passed on to the
        owner on this node over AF_UNIX (never back to another node)."""
        from cryptography.exceptions import InvalidTag

        sock = self.handoff_udp
        assert sock is not None
        buf, view, dp, aead = self.buf, self.view, self.dp, self._handoff_aead
        for _ in range(self.BATCH):
            try:
                n = sock.recv_into(buf)
            except BlockingIOError:
                return
            except OSError:  # an ICMP error queued on the socket
                continue
            if n < 1 + 12 + 16 + 2 or buf[0] != HANDOFF_VERSION[0]:
                self.remote_rejected += 1
                continue
            try:
                pt = aead.decrypt(view[1:13], view[13:n], HANDOFF_VERSION)
            except InvalidTag:
                self.remote_rejected += 1
                continue
            length = pt[0]
            if len(pt) < 2 + length:
                self.remote_rejected += 1
                continue
            net = dp.accounts.get(pt[1 : 1 + length].decode(errors="replace"))
            if net is None:
                dp.count(DropReason.NO_TUNNEL)
                continue
            self.remote_received += 1
            self._outbound_handed(net, memoryview(pt)[1 + length :], True, bytes(view[1:13]))

    def _outbound_handed(
        self, net: AccountNet, packet: memoryview, handoff_ok: bool, nonce: bytes
    ) -> None:
        """``Dataplane.outbound`` for a packet another node handed over with
        handoff ``nonce``: if this worker sends it, the replay window decides
        (:meth:`_admit_handed`); if it passes it on to a sibling, the nonce
        goes along; it never goes to another node again."""
        self._from_remote = _REMOTE_MARK + nonce
        self.dp.admit_handed = self._admit_handed
        try:
            self.dp.outbound(net, packet, handoff_ok)
        finally:
            self._from_remote = b""
            self.dp.admit_handed = None

    def _admit_handed(self) -> bool:
        """Handoff replay window (this worker is about to send a packet another
        node handed over): per sender, whose nonce is its random 8-octet
        prefix ‖ a 32-bit counter, an RFC 4303-style window of
        :data:`HANDOFF_WINDOW` counters. A datagram is accepted once however
        it reaches the owner: a copy sent to another worker of the node (a
        new source port, another SO_REUSEPORT pick) is passed on to the same
        owner with its nonce. Windows are per owner process: after the SA's
        owner changes, a copy of a datagram the previous owner accepted
        within the last window can pass once."""
        nonce = self._from_remote[1:]
        prefix = nonce[:8]
        win = self._handoff_windows.get(prefix)
        if win is None:
            if len(self._handoff_windows) >= HANDOFF_SENDERS:
                del self._handoff_windows[next(iter(self._handoff_windows))]  # the oldest
            win = self._handoff_windows[prefix] = ReplayWindow(HANDOFF_WINDOW)
        if win.accept(int.from_bytes(nonce[8:], "big")):
            return True
        self.remote_replayed += 1
        return False

    # ---- who owns what: the election view (DESIGN §5) -------------------------------
    def _apply_worker(self, key: str, rec: Record | None) -> None:
        """A ``worker/<node>/<index>`` record (or its tombstone)."""
        if rec is None:
            self._worker_recs.pop(key, None)
            return
        if not isinstance(rec, WorkerRecord):
            raise RecordError("invalid", "a worker/ key holds a worker record")
        self._worker_recs[key] = rec

    def update_election(self) -> None:
        """Set ``dp.live`` / ``dp.me`` (and where each candidate's packets go).

        Cluster-wide (``worker/`` records, :func:`election_view`) when this
        worker can reach other nodes (handoff socket open) and a recorded
        worker is alive; the last records are kept for :data:`RECORD_GRACE`
        seconds after they all vanished at once (control restart). Otherwise
        node-local: the indices whose lock files are held, as before."""
        now = time.monotonic()
        recs = self._worker_recs
        if recs:
            self._last_worker_recs = dict(recs)
            self._worker_recs_at = now
        elif self._last_worker_recs and now - self._worker_recs_at < RECORD_GRACE:
            recs = self._last_worker_recs
        cfg = self.cfg
        ids: tuple[int, ...] = ()
        if recs and self.handoff_udp is not None:
            ids, me = election_view(recs.values(), cfg.node, cfg.index, self._live)
        dest: dict[int, Any] = {}
        if ids:
            self.election = "cluster"
            endpoint: dict[str, WorkerRecord] = {}  # node → its lowest index's record
            for r in recs.values():
                if r.node != cfg.node and (
                    r.node not in endpoint or r.index < endpoint[r.node].index
                ):
                    endpoint[r.node] = r
            for r in endpoint.values():
                aead = self._aeads.get(r.handoff_key)
                if aead is None:
                    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

                    aead = self._aeads[r.handoff_key] = AESGCM(r.handoff_key)
                endpoint_dest = ((r.handoff_addr, r.handoff_port), aead)
                for other in recs.values():
                    if other.node == r.node:
                        dest[cluster_id(other.node, other.index)] = endpoint_dest
            for i in self._live:
                dest[cluster_id(cfg.node, i)] = self._handoff_addr(i)
            # Dataplane.outbound elects only when len(live) > 1: a view that
            # lacks us (our record is not out yet) and has one member lists
            # it twice, so we hand off to it instead of sending ourselves.
            live = ids if (me in ids or len(ids) > 1) else ids * 2
        else:
            self.election = "node"
            me = cfg.index
            live = tuple(self._live)
            dest = {i: self._handoff_addr(i) for i in live}
        if len(self._aeads) > 4 * max(1, len(dest)):
            keep = {d[1] for d in dest.values() if d.__class__ is not str}
            self._aeads = {k: a for k, a in self._aeads.items() if a in keep}
        self._dest = dest
        self.dp.me = me
        self.dp.live = live
        self._set_peer_writers()

    # ---- TUN queues shared on the node (TUN_STEER) -----------------------------
    def _tunq_addr(self, index: int) -> str:
        return self._node_addr("tunq", index)

    def _open_tunq(self) -> None:
        self.tunq_sock = sock = self._node_socket(self._tunq_addr(self.cfg.index), "TUN queue")
        self._register(sock.fileno(), self._drain_tunq)

    def _share_queues(self) -> None:
        """Pass each account's queue fd to every live peer on the node (once
        per peer process, again after :attr:`QUEUE_RESEND` seconds)."""
        sock, peers = self.tunq_sock, self.peers
        if sock is None or peers is None:
            return
        now = time.monotonic()
        sent = self._tunq_sent
        live = set(self._live)
        for key in [k for k in sent if k[0] not in live or now - sent[k] > self.QUEUE_RESEND]:
            del sent[key]
        me, pid = self.cfg.index, os.getpid()
        for j in self._live:
            if j == me:
                continue
            peer_pid = peers.pid_of(j)
            if peer_pid is None:
                continue
            for net in self.dp.accounts.values():
                gen = self._tunq_gen.get(net.account_id, 0)
                key = (j, peer_pid, net.account_id, gen)
                if key in sent or net.fd < 0:
                    continue
                msg = f"{me} {pid} {gen} {net.account_id}".encode()
                fds = struct.pack("i", net.fd)
                try:
                    sock.sendmsg([msg], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)], 0,
                                 self._tunq_addr(j))  # fmt: skip
                except OSError:
                    continue  # not up yet, or queue full: next housekeeping
                sent[key] = now

    def _drain_tunq(self) -> None:
        """A peer's queue fd: kept while the peer lives and we have the account."""
        sock = self.tunq_sock
        assert sock is not None
        for _ in range(self.BATCH):
            try:
                msg, anc, _flags, _addr = sock.recvmsg(256, socket.CMSG_SPACE(4 * 4))
            except BlockingIOError:
                return
            fds: list[int] = []
            for level, kind, data in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    usable = len(data) - len(data) % 4
                    fds += struct.unpack(f"{usable // 4}i", data[:usable])
            parts = msg.decode(errors="replace").split(" ", 3)
            ok = len(fds) == 1 and len(parts) == 4 and all(p.isdigit() for p in parts[:3])
            index = int(parts[0]) if ok else -1
            pid, gen = (int(parts[1]), int(parts[2])) if ok else (0, 0)
            account = parts[3] if ok else ""
            held = self._peer_q.get((account, index))
            if (
                not ok
                or (held is not None and held[2:] == (pid, gen))  # a resend: keep ours
                or index == self.cfg.index
                or not 0 <= index < self.cfg.workers
                or account not in self.dp.accounts
                or not self._watch_peer(index, pid)
            ):
                for fd in fds:
                    with contextlib.suppress(OSError):
                        os.close(fd)
                continue
            key = (account, index)
            if held is not None:
                self._close_peer_queue(key)
            fd = fds[0]
            writer = self._tun_writer(fd)  # a GsoTunWriter is flushed with ours
            self._peer_q[key] = (fd, writer, pid, gen)
            self._set_peer_writers()

    def _watch_peer(self, index: int, pid: int) -> bool:
        """Watch process ``pid`` (peer ``index``) with a pidfd; False if it is gone."""
        watch = self._peer_watch.get(index)
        if watch is not None and watch[0] == pid:
            return True
        if watch is not None:
            self._forget_peer(index)  # a new process took the index
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            return False
        self._peer_watch[index] = (pid, pidfd)
        self._register(pidfd, lambda: self._on_peer_exit(index))
        return True

    def _on_peer_exit(self, index: int) -> None:
        """Peer ``index``'s process ended (its pidfd became readable: the
        kernel had closed its files, so its lock file is free): act now
        instead of at the next housekeeping, up to 0.25 s later. Close our
        copies of its TUN queues, take over its share of the raw ESP / GRE
        packets and, on replay-protected tunnels, the outbound SAs it owned —
        the whole failover of a SIGKILLed sibling, as soon as it is dead."""
        self._forget_peer(index)
        if self.peers is not None:
            self._update_share()
            self.manage_owned_sas()

    def _forget_peer(self, index: int) -> None:
        """Peer ``index`` exited: close our copies of its queues at once."""
        watch = self._peer_watch.pop(index, None)
        if watch is not None:
            self._unregister(watch[1])
            with contextlib.suppress(OSError):
                os.close(watch[1])
        for key in [k for k in self._peer_q if k[1] == index]:
            self._close_peer_queue(key)
        self._set_peer_writers()

    def _close_peer_queue(self, key: tuple[str, int]) -> None:
        fd = self._peer_q.pop(key)[0]
        gso = self._tun_gso.pop(fd, None)
        if gso is not None:
            gso.flush()
        with contextlib.suppress(OSError):
            os.close(fd)
        self._set_peer_writers()

    def _set_peer_writers(self) -> None:
        """``dp.peer_writers`` by election id, from the queues we hold."""
        node_ids = self.election == "cluster"
        writers = {
            (account, cluster_id(self.cfg.node, index) if node_ids else index): writer
            for (account, index), (_fd, writer, _pid, _gen) in self._peer_q.items()
        }
        if writers != self.dp.peer_writers:
            self.dp.peer_writers = writers
            self.dp.forget_flows()
        self.metrics.peer_queues.set(len(self._peer_q))

    # ---- inbound replay windows: checkpointed (DESIGN §5) ---------------------------
    def _apply_rwin(self, key: str, rec: Record | None) -> None:
        """A replicated ``rwin/<spi>`` checkpoint: kept as the highest seen;
        a tombstone is ignored (a restarted control's snapshot lacks them
        until the workers report again) — it goes with its SA."""
        if rec is None:
            return
        if not isinstance(rec, ReplayCheckpoint):
            raise RecordError("invalid", "an rwin/ key holds a replay checkpoint")
        self._rwin[rec.spi] = max(self._rwin.get(rec.spi, 0), rec.top)

    def raise_replay_windows(self) -> int:
        """Raise every inbound replay window that is below its SA's
        replicated checkpoint to it (``ReplayWindow.restore``: everything at
        or below the checkpoint then counts as received). A worker that
        starts receiving an SA — new, restarted, or the traffic moved here
        from another worker or node — thus refuses every packet another
        worker had accepted up to the checkpoint. Our own reports never
        lower or raise our window (their top is ours). Returns how many
        windows moved."""
        inbound = self.dp.sad.inbound
        raised = 0
        for spi, top in list(self._rwin.items()):
            e = inbound.get(spi)
            if e is None:
                del self._rwin[spi]  # the SA is gone: so is its checkpoint
                continue
            window = getattr(e.codec, "replay", None)
            if window is not None and top > window.top:
                window.restore(top)
                raised += 1
        self.windows_raised += raised
        return raised

    def _drain_handoff(self) -> None:
        """A sibling's handoff: ``len ‖ account ‖ packet``, or, for a packet
        another node handed it, ``0 ‖ handoff nonce (12) ‖`` that."""
        sock = self.handoff_sock
        assert sock is not None
        buf, view, dp = self.buf, self.view, self.dp
        for _ in range(self.BATCH):
            try:
                n = sock.recv_into(buf)
            except BlockingIOError:
                return
            at = 13 if n and buf[0] == _REMOTE_MARK[0] else 0
            if n < at + 2 or n < at + 1 + buf[at]:
                dp.count(DropReason.MALFORMED)
                continue
            length = buf[at]
            net = dp.accounts.get(bytes(buf[at + 1 : at + 1 + length]).decode(errors="replace"))
            if net is None:
                dp.count(DropReason.NO_TUNNEL)
                continue
            if at:
                self._outbound_handed(net, view[at + 1 + length : n], False, bytes(buf[1:13]))
            else:
                dp.outbound(net, view[1 + length : n], False)

    def _seq_file(self, key: tuple[str, int]) -> Path:
        return self.cfg.run_dir / f"seq-{key[0]}-{key[1]:08x}"

    def _write_reservation(self, key: tuple[str, int], limit: int) -> None:
        path = self._seq_file(key)
        tmp = path.with_suffix(f".{self.cfg.index}.tmp")
        tmp.write_text(str(limit))
        os.replace(tmp, path)
        self._reserved[key] = limit

    def _apply_checkpoint(self, key: str, rec: Record | None) -> None:
        """A replicated ``seq/<tunnel>/<spi>`` checkpoint (or its tombstone).

        Kept as the highest value seen, and a tombstone is ignored: control
        does not persist checkpoints, so after its restart a snapshot lacks
        them until the owners report again; forgetting them meanwhile would
        open a window for reuse. They go with their SA (``manage_owned_sas``)."""
        if rec is None:
            return
        if not isinstance(rec, SeqCheckpoint):
            raise RecordError("invalid", "a seq/ key holds a checkpoint")
        ck = (rec.tunnel_id, rec.spi)
        self._checkpoints[ck] = max(self._checkpoints.get(ck, 0), rec.next_seq)

    def manage_owned_sas(self) -> None:
        """Take over / keep reserving sequence ranges for SAs this worker owns.

        A new owner starts after the highest reservation any owner on the
        node wrote (node-local file) and after the replicated checkpoint plus
        :data:`SEQ_SAFETY_JUMP` (any node), so a sequence number is never sent
        twice on a replay-protected SA, even when the previous owner was
        SIGKILLed or ran on another node. An owner whose replicated
        checkpoint is beyond its own reservation (another node's owner sent
        there meanwhile) takes over again above it.
        """
        dp = self.dp
        wrote = False
        if self._checkpoints:
            for gone in [
                k
                for k in self._checkpoints
                if not any(e.spi == k[1] for e in dp.sad.outbound.get(k[0], ()))
            ]:
                del self._checkpoints[gone]
        for tid, entries in list(dp.sad.outbound.items()):
            t = dp.sad.tunnels.get(tid)
            if t is None or not t.record.replay_protection:
                for e in entries:  # replay protection turned off: every worker sends
                    if e.codec.__class__ is _NotOwner:
                        e.codec = self._esp.OutboundSa.from_record(
                            e.record, worker_id=self.iv_worker_id, first_seq=e.codec.seq + 1
                        )
                continue
            for e in entries:
                key = (tid, e.spi)
                if rendezvous_owner(e.spi, dp.live) != dp.me:
                    self._reserved.pop(key, None)
                    self._owned_codec.pop(key, None)
                    if e.codec.__class__ is not _NotOwner:
                        e.codec = _NotOwner(e.codec.seq)
                    continue
                ckpt = self._checkpoints.get(key, 0)
                mine = self._owned_codec.get(key) is e.codec
                if not mine or ckpt > self._reserved[key] + 1:
                    try:
                        limit = int(self._seq_file(key).read_text())
                    except (OSError, ValueError):
                        limit = 0
                    first = max(limit + 1, e.codec.seq + 1)
                    if ckpt:
                        first = max(first, ckpt + SEQ_SAFETY_JUMP)
                    e.codec = self._esp.OutboundSa.from_record(
                        e.record, worker_id=self.iv_worker_id, first_seq=min(first, 1 << 32)
                    )
                    self._owned_codec[key] = e.codec
                    self._write_reservation(key, first - 1 + SEQ_RESERVATION)
                    wrote = True
                elif e.codec.seq > self._reserved[key] - SEQ_RESERVATION // 2:
                    self._write_reservation(key, e.codec.seq + SEQ_RESERVATION)
                    wrote = True
        if wrote:
            # at once, not at the next flush: the checkpoint a successor on
            # another node starts from should include this reservation
            self._send_report()

    # ---- telemetry to control (rides on the bus acks) ---------------------------
    def build_report(self) -> dict[str, Any]:
        """This worker's counters and sequence reservations for control.

        ``in``: inbound SPI → [packets, bytes]; ``out``: tunnel → outbound SPI
        → [packets, bytes] (bytes are inner, cleartext bytes; counters start
        at 0 when the worker or the SA entry starts); ``seq``: tunnel →
        outbound SPI → the first sequence number this owner has not reserved
        (replay-protected SAs it owns); ``rwin``: inbound SPI → the top of its
        replay window (highest authenticated sequence number, SAs with a
        window that received anything); ``handoff``: [address, port, key] of
        our cross-node handoff socket (control turns it into our
        ``worker/`` record; the report rides the CURVE bus); ``life``: a random
        id of this process, so control knows when counters started over. At
        most :data:`REPORT_MAX_SAS` SA entries (the rest is left out: the
        report must fit an ack)."""
        sad = self.dp.sad
        budget = REPORT_MAX_SAS
        inbound: dict[int, list[int]] = {}
        for spi, e in sad.inbound.items():
            if budget <= 0:
                break
            inbound[spi] = [e.packets, e.bytes]
            budget -= 1
        outbound: dict[str, dict[int, list[int]]] = {}
        for tid, entries in sad.outbound.items():
            for o in entries:
                if budget <= 0:
                    break
                outbound.setdefault(tid, {})[o.spi] = [o.packets, o.bytes]
                budget -= 1
        seq: dict[str, dict[int, int]] = {}
        for (tid, spi), limit in self._reserved.items():
            seq.setdefault(tid, {})[spi] = limit + 1
        rwin: dict[int, int] = {}
        for spi, e in sad.inbound.items():
            window = getattr(e.codec, "replay", None)
            if window is not None and window.top:
                if budget <= 0:
                    break
                rwin[spi] = window.top
                budget -= 1
        report: dict[str, Any] = {
            "v": 1,
            "life": self._life,
            "in": inbound,
            "out": outbound,
            "seq": seq,
        }
        if rwin:
            report["rwin"] = rwin
        if self.handoff_bound is not None:
            report["handoff"] = [*self.handoff_bound, self._handoff_key]
        return report

    def _send_report(self) -> None:
        sub = self._subscriber
        if sub is None or not hasattr(sub, "set_report"):
            return
        try:
            sub.set_report(self.build_report())
        except ValueError as exc:  # too big: counters stay on /metrics
            log.warning("report not sent: %s", exc)

    # ---- node share of raw packets ------------------------------------------------
    def _update_share(self) -> None:
        assert self.peers is not None
        live = self.peers.live()
        # A peer whose lock is free is gone: drop our copies of its TUN queues
        # now even if its pidfd said nothing (a second, 0.25 s bound on a queue
        # that nobody reads but the kernel may still send packets to).
        for index in ({k[1] for k in self._peer_q} | set(self._peer_watch)) - set(live):
            self._forget_peer(index)
        # a pidfd on every live sibling, so its exit is acted on at once
        # (_on_peer_exit), with or without TUN queues shared between us
        for index in live:
            if index != self.cfg.index and index not in self._peer_watch:
                pid = self.peers.pid_of(index)
                if pid is not None:
                    self._watch_peer(index, pid)
        if live == self._live and len(live) > 0 and self._share_set:
            return
        self._live = live
        self.update_election()
        rank, count = live.index(self.cfg.index), len(live)
        s = self._sockets
        if self.raw_esp is not None:
            s.attach_share_filter(self.raw_esp, s.IPPROTO_ESP, rank, count)
        if self.raw_gre is not None:
            s.attach_share_filter(self.raw_gre, s.IPPROTO_GRE, rank, count)
        self._share_set = True
        self.metrics.live_workers.set(count)

    _share_set = False

    # ---- loop ----------------------------------------------------------------
    def stop(self) -> None:
        self._running = False
        self._wake()

    def run(self, *, duration: float | None = None) -> None:
        """The loop; returns on :meth:`stop` (SIGTERM) or after ``duration`` s."""
        self._running = True
        handlers = self.handlers
        poll = self.ep.poll
        tun_gso = self._tun_gso
        end = None if duration is None else time.monotonic() + duration
        next_housekeeping = 0.0
        while self._running:
            for fd, _ev in poll(0.1):
                h = handlers.get(fd)
                if h is not None:
                    h()
            if self._gso is not None:
                self._gso.flush()
            if tun_gso:
                for w in tun_gso.values():
                    w.flush()
            now = time.monotonic()
            if now >= next_housekeeping:
                next_housekeeping = now + 0.25
                self._housekeeping()
            if end is not None and now >= end:
                break
        self._housekeeping()

    _last_flush = 0.0

    def _housekeeping(self) -> None:
        self._sync_dirty_accounts()  # retries a failed sync
        self._update_share()
        self.update_election()
        if self.tunq_sock is not None:
            self._share_queues()
        self.raise_replay_windows()
        self.manage_owned_sas()
        now = time.monotonic()
        if now - self._last_flush >= 0.5:
            self._last_flush = now
            gone = self.dp.sad.expire(time.time())
            for key in gone:
                self.dp.remove(key)
            if self._gso is not None and self._gso.errors:
                self.dp.count(DropReason.NO_TUNNEL)
                self._gso.errors = 0
            self.metrics.flush(self.dp)
            self.metrics.bus_pending.set(self._events.qsize())
            self._om.flush(self)
            self._send_report()

    def close(self) -> None:
        """Stop threads and close everything (the TUN devices go with the last queue)."""
        for thing in (self._subscriber, self._relay):
            if thing is not None:
                with contextlib.suppress(Exception):
                    thing.stop()
        if self._metrics_server is not None:
            with contextlib.suppress(Exception):
                server = (
                    self._metrics_server[0] if isinstance(self._metrics_server, tuple) else None
                )
                if server is not None:
                    server.shutdown()
        for index in list(self._peer_watch):
            self._forget_peer(index)
        for key in list(self._peer_q):
            self._close_peer_queue(key)
        for net in list(self.dp.accounts.values()):
            with contextlib.suppress(OSError):
                os.close(net.fd)
        self.dp.accounts.clear()
        for account in list(self._netlink):
            self._close_netlink(account)
        for account in list(self._route_watch):
            self._close_route_watch(account)
        for sock in (
            self.raw_esp,
            self.raw_gre,
            self.udp4500,
            self.udp500,
            self.handoff_sock,
            self.handoff_udp,
            self.tunq_sock,
        ):
            if sock is not None:
                sock.close()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.ep.close()
        if self.peers is not None:
            self.peers.close()


def install_signal_handlers(worker: Worker) -> None:
    def on_term(signum: int, frame: Any) -> None:
        worker.stop()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)


__all__ = [
    "AccountNet",
    "Dataplane",
    "NodePeers",
    "StartupError",
    "Worker",
    "WorkerConfig",
    "install_signal_handlers",
]
