"""The architecture's import rules (DESIGN §2), checked on the source text.

* ``dataplane`` and ``control`` never import each other; both may use
  ``replication``, which imports neither.
* Sans-IO protocol cores import no socket, clock, OS or event loop: they take
  bytes and ``now`` in and hand bytes and events out, so tests can steer time.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN_IN_CORES = {"socket", "asyncio", "time", "os", "selectors", "zmq", "uvloop"}
# Modules that are I/O adapters by design (allowed to do I/O).
IO_ADAPTERS = {"control/ike/transport.py"}
CORE_GLOBS = [
    "dataplane/esp.py",
    "dataplane/gre.py",
    "dataplane/udpencap.py",
    "dataplane/ip.py",
    "dataplane/mss.py",
    "dataplane/replay.py",
    "dataplane/drops.py",
    "dataplane/sad.py",
    "dataplane/routes.py",
    "dataplane/selectors.py",
    "replication/records.py",
    "replication/clone.py",
    "control/ike/*.py",
]


def imported_top_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def sources(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("dataplane", {"control"}),
        ("control", {"dataplane"}),
        ("replication", {"control", "dataplane"}),
    ],
)
def test_package_dependency_direction(package: str, forbidden: set[str]) -> None:
    offenders = {
        str(p.relative_to(ROOT)): sorted(imported_top_modules(p) & forbidden)
        for p in sources(package)
        if imported_top_modules(p) & forbidden
    }
    assert not offenders, f"{package} must not import {forbidden}: {offenders}"


def core_modules() -> list[Path]:
    found: list[Path] = []
    for pattern in CORE_GLOBS:
        found.extend(p for p in ROOT.glob(pattern) if p.name != "__init__.py")
    return sorted(p for p in found if str(p.relative_to(ROOT)) not in IO_ADAPTERS)


def test_there_are_sans_io_cores_to_check() -> None:
    assert (ROOT / "replication/records.py") in core_modules()


@pytest.mark.parametrize("path", core_modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_sans_io_cores_do_no_io(path: Path) -> None:
    bad = imported_top_modules(path) & FORBIDDEN_IN_CORES
    assert not bad, f"{path.relative_to(ROOT)} is a sans-IO core but imports {sorted(bad)}"


def test_checker_sees_violations(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("import os.path\nfrom time import monotonic\nfrom . import sibling\n")
    assert imported_top_modules(probe) == {"os", "time"}
