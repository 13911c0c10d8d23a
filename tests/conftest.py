"""Shared fixtures and skip rules for tests that need the host's facilities.

Markers (declared in pyproject.toml): ``netns`` (root, network namespaces,
TUN), ``strongswan`` (Debian's charon + swanctl), ``tshark``. A marked test is
skipped with the reason when its facility is missing; on the project's CI
machine all of them are present and the tests run.

Fixture ``netns_topology`` factory: ``topo = netns_topology("awt-x-")`` gives
a :class:`deploy.netns.Topology` that is closed after the test, even when it
fails. Its real prefix is ``"awt-x-<pid>-"`` (:func:`deploy.netns.unique_prefix`)
so two test runs at once never remove each other's namespaces; leftovers of
crashed runs under the base prefix are swept first.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

CHARON = Path("/usr/lib/ipsec/charon")
LIBIPSEC_PLUGIN = Path("/usr/lib/ipsec/plugins/libstrongswan-kernel-libipsec.so")


def netns_missing() -> str | None:
    """Why netns tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root for network namespaces"
    if not Path("/dev/net/tun").exists():
        return "needs /dev/net/tun"
    if shutil.which("ip") is None:
        return "needs iproute2 (ip netns exec)"
    try:
        import pyroute2  # noqa: F401
    except ImportError:
        return "needs pyroute2"
    return None


def strongswan_missing() -> str | None:
    if not CHARON.exists() or shutil.which("swanctl") is None:
        return "needs strongswan-charon and strongswan-swanctl"
    if not LIBIPSEC_PLUGIN.exists():
        return "needs libcharon-extra-plugins (kernel-libipsec)"
    if shutil.which("unshare") is None:
        return "needs util-linux unshare (private /run for charon)"
    return None


def tshark_missing() -> str | None:
    return None if shutil.which("tshark") else "needs tshark"


_CHECKS: dict[str, Callable[[], str | None]] = {
    "netns": netns_missing,
    "strongswan": strongswan_missing,
    "tshark": tshark_missing,
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reasons = {name: check() for name, check in _CHECKS.items()}
    for item in items:
        for name, reason in reasons.items():
            if reason and item.get_closest_marker(name):
                item.add_marker(pytest.mark.skip(reason=reason))
                break


@pytest.fixture
def netns_topology() -> Iterator[Callable[[str], object]]:
    from deploy.netns import Topology, cleanup_prefix, unique_prefix

    made: list[Topology] = []

    def make(base: str) -> Topology:
        prefix = unique_prefix(base)
        cleanup_prefix(prefix)
        topo = Topology(prefix)
        made.append(topo)
        return topo

    try:
        yield make
    finally:
        for topo in reversed(made):
            topo.close()
