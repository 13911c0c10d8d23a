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
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from pyroute2 import IPRoute, NetNS, netns

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_MULTI_QUEUE = 0x0100
CLONE_NEWNET = 0x40000000
NETNS_RUN_DIR = "/run/netns"


class TunError(RuntimeError):
    """A TUN device could not be opened or configured; the message says why."""


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
        finally:
            os.close(target)
        try:
            yield
        finally:
            _setns(own)
    finally:
        os.close(own)


def ensure_netns(name: str) -> bool:
    """Create namespace ``name`` if missing (lo up); True if it was created."""
    if os.path.exists(f"{NETNS_RUN_DIR}/{name}"):
        return False
    try:
        netns.create(name)
    except FileExistsError:
        return False
    except OSError as exc:
        if exc.errno == errno.EEXIST:
            return False
        raise
    with NetNS(name, flags=0) as ns:
        idx = ns.link_lookup(ifname="lo")
        if idx:
            ns.link("set", index=idx[0], state="up")
    return True


def open_queue(name: str, *, netns_name: str | None = None, multi_queue: bool = True) -> int:
    """Attach one queue of TUN device ``name``; returns a non-blocking fd.

    Raises :class:`TunError` with an operator-readable reason (no permission,
    no /dev/net/tun, device exists without multi-queue, name too long).
    """
    if not 0 < len(name) <= 15:
        raise TunError(f"TUN name {name!r} must be 1-15 characters")
    flags = IFF_TUN | IFF_NO_PI | (IFF_MULTI_QUEUE if multi_queue else 0)
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

    def apply(
        self,
        *,
        mtu: int,
        addresses: Iterable[str] = (),
        routes: Iterable[str] = (),
        remove_routes: Iterable[str] = (),
    ) -> None:
        """Bring the device up with ``mtu``, add ``a.b.c.d/len`` addresses and
        route each prefix in ``routes`` to the device (replace semantics)."""
        with self._ipr() as ipr:
            found = ipr.link_lookup(ifname=self.name)
            if not found:
                raise TunError(f"TUN {self.name!r} not found in {self.netns_name or 'root'} netns")
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
                net = ipaddress.ip_network(prefix)
                ipr.route(
                    "replace",
                    dst=str(net.network_address),
                    dst_len=net.prefixlen,
                    oif=idx,
                    family=10 if net.version == 6 else 2,
                )
            for prefix in remove_routes:
                net = ipaddress.ip_network(prefix)
                try:
                    ipr.route(
                        "del",
                        dst=str(net.network_address),
                        dst_len=net.prefixlen,
                        oif=idx,
                        family=10 if net.version == 6 else 2,
                    )
                except Exception as exc:
                    if getattr(exc, "code", None) not in (errno.ESRCH, errno.ENOENT):
                        raise


def device_exists(name: str, *, netns_name: str | None = None) -> bool:
    if netns_name is not None and not os.path.exists(f"{NETNS_RUN_DIR}/{netns_name}"):
        return False
    with IPRoute() if netns_name is None else NetNS(netns_name, flags=0) as ipr:
        return bool(ipr.link_lookup(ifname=name))
