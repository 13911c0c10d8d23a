"""tun.RouteWatch / parse_netlink_events: what the kernel says when a route
into a TUN is deleted or the TUN goes down, read the way the worker reads it
(the worker syncs only differences, so this is how it learns that someone
else removed a route it believes is there)."""

from __future__ import annotations

import os
import select
import struct
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dataplane import tun


def _events(watch: tun.RouteWatch, ifindex: int, until: float = 2.0) -> tuple[list[str], bool]:
    """Everything the watch reports within ``until`` seconds of quiet-waiting."""
    deleted: list[str] = []
    down = False
    end = time.monotonic() + until
    while time.monotonic() < end:
        if not select.select([watch.fileno()], [], [], 0.2)[0]:
            if deleted or down:
                break
            continue
        more, gone = watch.read(ifindex)
        deleted += more
        down = down or gone
    return deleted, down


@pytest.mark.netns
def test_deleted_routes_and_a_downed_tun_are_reported(netns_topology) -> None:
    from pyroute2 import IPRoute

    topo = netns_topology("awt-p-rw")
    ns = topo.namespace("a")
    fd = tun.open_queue("awrw0", netns_name=ns.name, multi_queue=False)
    watch = tun.RouteWatch(ns.name)
    try:
        cfg = tun.TunConfig("awrw0", netns_name=ns.name)
        idx = cfg.apply(mtu=1400, routes=["10.7.0.0/24", "10.8.0.0/16", "fd00:7::/64"])
        watch.read(idx)  # the device's creation and our own routes: not deletions
        with tun.in_netns(ns.name), IPRoute() as ipr:
            ipr.route("del", dst="10.7.0.0", dst_len=24, oif=idx)
            ipr.route("del", dst="fd00:7::", dst_len=64, oif=idx, family=10)
            deleted, down = _events(watch, idx)
            assert sorted(deleted) == ["10.7.0.0/24", "fd00:7::/64"] and not down
            # another device's routes are not ours
            deleted, down = _events(watch, idx + 1000, 0.3)
            assert deleted == [] and not down

            ipr.link("set", index=idx, state="down")  # IPv4 routes go without a word
            deleted, down = _events(watch, idx)
            assert down
        # a full apply brings it back, as the worker's re-sync does
        cfg.apply(mtu=1400, routes=["10.7.0.0/24", "10.8.0.0/16"])
        with tun.in_netns(ns.name), IPRoute() as ipr:
            dsts = {
                (r.get_attr("RTA_DST"), r["dst_len"])
                for r in ipr.get_routes(family=2, oif=idx)
                if r.get_attr("RTA_DST")
            }
            assert {("10.7.0.0", 24), ("10.8.0.0", 16)} <= dsts
            assert ipr.get_links(idx)[0]["flags"] & 1  # IFF_UP
    finally:
        watch.close()
        os.close(fd)


def _nlmsg(kind: int, body: bytes) -> bytes:
    return struct.pack("=IHHII", 16 + len(body), kind, 0, 0, 0) + body + bytes(-len(body) % 4)


def _rta(kind: int, value: bytes) -> bytes:
    return struct.pack("=HH", 4 + len(value), kind) + value + bytes(-len(value) % 4)


def test_parses_a_batch_of_messages_and_skips_what_is_not_ours() -> None:
    rt = struct.pack("=BBBBBBBBI", 2, 24, 0, 0, 254, 4, 0, 1, 0)
    ours = _nlmsg(
        tun.RTM_DELROUTE, rt + _rta(1, bytes([10, 7, 0, 0])) + _rta(4, (5).to_bytes(4, "little"))
    )
    other = _nlmsg(
        tun.RTM_DELROUTE, rt + _rta(1, bytes([10, 9, 0, 0])) + _rta(4, (6).to_bytes(4, "little"))
    )
    up = _nlmsg(tun.RTM_NEWLINK, struct.pack("=BxHiII", 0, 0xFFFE, 5, 1, 0))
    down = _nlmsg(tun.RTM_NEWLINK, struct.pack("=BxHiII", 0, 0xFFFE, 5, 0, 1))
    assert tun.parse_netlink_events(other + ours + up, 5) == (["10.7.0.0/24"], False)
    assert tun.parse_netlink_events(up + down, 5) == ([], True)
    assert tun.parse_netlink_events(down, 6) == ([], False)
    # a message cut short ends the batch; what came before it counts
    assert tun.parse_netlink_events(ours + down[:20], 5) == (["10.7.0.0/24"], False)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300), st.integers(min_value=-1, max_value=8))
def test_garbage_never_raises(data: bytes, ifindex: int) -> None:
    deleted, down = tun.parse_netlink_events(data, ifindex)
    assert isinstance(deleted, list) and isinstance(down, bool)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 255), min_size=0, max_size=40), st.integers(0, 200))
def test_mutated_messages_never_raise(noise: list[int], at: int) -> None:
    rt = struct.pack("=BBBBBBBBI", 10, 64, 0, 0, 254, 4, 0, 1, 0)
    msg = bytearray(
        _nlmsg(tun.RTM_DELROUTE, rt + _rta(1, bytes(16)) + _rta(4, (5).to_bytes(4, "little")))
    )
    for i, b in enumerate(noise):
        msg[(at + i) % len(msg)] = b
    tun.parse_netlink_events(bytes(msg), 5)


@pytest.mark.netns
def test_a_namespace_still_being_created_is_waited_for_and_named_in_errors(
    netns_topology,
) -> None:
    """``ip netns add`` and pyroute2 create the file first and mount the
    namespace over it after: a sibling worker that looked in between once
    took the empty file for a namespace and failed with a wrong message."""
    topo = netns_topology("awt-p-ns")
    real = topo.namespace("a")
    tun.wait_netns(real.name, timeout=0.5)  # a mounted one: at once
    fake = f"{real.name[:-1]}z"
    path = f"{tun.NETNS_RUN_DIR}/{fake}"
    open(path, "w").close()  # the moment before the mount
    try:
        with pytest.raises(tun.TunError, match="exists but is not a network namespace"):
            tun.wait_netns(fake, timeout=0.1)
        with (
            pytest.raises(tun.TunError, match=f"cannot enter network namespace '{fake}'"),
            tun.in_netns(fake),
        ):
            pass
    finally:
        os.unlink(path)
