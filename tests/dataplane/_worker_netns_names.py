"""Namespace prefixes for the worker's netns tests that are unique per run.

Several engineers run the suite at once on one machine; a fixed prefix would
let one run's cleanup sweep away another run's namespaces and processes. The
prefix carries this process's PID; :func:`sweep_dead` removes leftovers of
runs whose process is gone (crashed), and never touches a live run's.
"""

from __future__ import annotations

import os
import re

BASE = "awt-x-"


def unique_prefix(kind: str) -> str:
    return f"{BASE}{kind}{os.getpid()}-"


def sweep_dead(kind: str) -> None:
    from deploy.netns import cleanup_prefix, list_namespaces

    pattern = re.compile(rf"^{re.escape(BASE + kind)}(\d+)-")
    seen = set()
    for name in list_namespaces(BASE + kind):
        m = pattern.match(name)
        if not m or m.group(1) in seen:
            continue
        pid = int(m.group(1))
        seen.add(m.group(1))
        if pid != os.getpid() and not os.path.exists(f"/proc/{pid}"):
            cleanup_prefix(f"{BASE}{kind}{pid}-")
