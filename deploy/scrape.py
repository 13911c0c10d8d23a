"""Reading numbers out of a ``/metrics`` page (Prometheus text format).

The lab's status, its tests and the benchmarks read a few counters from the
workers and control. They parse with prometheus-client's own parser rather
than by splitting lines, so label order, escaping, ``_created`` samples and
comment lines cannot fool them.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.parser import text_string_to_metric_families


def samples(body: str, name: str, **labels: str) -> Iterator[tuple[dict[str, str], float]]:
    """(labels, value) of every sample called ``name`` (the sample's own
    name: ``..._total`` for a counter) whose labels include ``labels``."""
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                yield s.labels, s.value


def total(body: str, name: str, **labels: str) -> float:
    """The sum of :func:`samples` (0 when there are none)."""
    return sum(value for _, value in samples(body, name, **labels))
