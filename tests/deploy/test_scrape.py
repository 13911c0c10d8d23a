"""deploy.scrape reads what prometheus-client writes: labels in any order,
``_created`` samples and other families ignored, absent metrics are 0."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from deploy import scrape


def _page() -> str:
    reg = CollectorRegistry()
    packets = Counter("anywan_worker_tunnel_packets", "p", ["tunnel", "direction"], registry=reg)
    packets.labels("t1", "in").inc(5)
    packets.labels("t1", "out").inc(7)
    packets.labels("t2", "in").inc(11)
    Counter("anywan_worker_tunnel_bytes", "b", ["tunnel", "direction"], registry=reg).labels(
        "t1", "in"
    ).inc(1400)
    Gauge("anywan_control_up", "u", registry=reg).set(1)
    return generate_latest(reg).decode()


def test_samples_and_totals_by_label() -> None:
    page = _page()
    name = "anywan_worker_tunnel_packets_total"
    assert scrape.total(page, name) == 23
    assert scrape.total(page, name, tunnel="t1") == 12
    assert scrape.total(page, name, direction="in") == 16
    assert scrape.total(page, name, tunnel="t2", direction="out") == 0
    assert {(lb["tunnel"], lb["direction"]) for lb, _ in scrape.samples(page, name)} == {
        ("t1", "in"),
        ("t1", "out"),
        ("t2", "in"),
    }
    assert scrape.total(page, "anywan_worker_tunnel_bytes_total") == 1400
    assert list(scrape.samples(page, "anywan_control_up")) == [({}, 1.0)]
    assert scrape.total(page, "anywan_missing_total") == 0
    assert scrape.total("", "anywan_control_up") == 0
