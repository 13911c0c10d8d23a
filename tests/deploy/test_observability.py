"""Prometheus and Grafana configuration, checked statically: promtool accepts
the shipped config (the same file the lab and docker-compose use), and every
metric a Grafana panel queries is one the code registers."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PROM = ROOT / "deploy" / "prometheus"
GRAFANA = ROOT / "deploy" / "grafana"

needs_promtool = pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="needs Debian's prometheus package for promtool (deploy/setup.sh installs it)",
)


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["promtool", *args], capture_output=True, text=True, timeout=60, check=False
    )


@needs_promtool
def test_promtool_accepts_the_shipped_config(tmp_path: Path) -> None:
    # With the compose targets in place, as the compose cluster mounts them.
    shutil.copy(PROM / "prometheus.yml", tmp_path / "prometheus.yml")
    shutil.copytree(PROM / "compose-targets", tmp_path / "targets")
    res = promtool("check", "config", str(tmp_path / "prometheus.yml"))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "WARNING" not in res.stdout + res.stderr


@needs_promtool
def test_promtool_rejects_a_broken_config(tmp_path: Path) -> None:
    bad = tmp_path / "prometheus.yml"
    bad.write_text(
        (PROM / "prometheus.yml")
        .read_text()
        .replace("scrape_interval: 5s", "scrape_interval: 5 parsecs")
    )
    assert promtool("check", "config", str(bad)).returncode != 0


def test_scrape_jobs_cover_control_and_workers() -> None:
    cfg = yaml.safe_load((PROM / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    assert set(jobs) >= {"anywan-control", "anywan-worker"}
    for job in jobs.values():
        files = [f for sd in job["file_sd_configs"] for f in sd["files"]]
        assert all(f.startswith("targets/") for f in files), "targets relative to the config"


def test_grafana_provisioning_points_at_the_dashboards() -> None:
    ds = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yml").read_text())
    uids = {d["uid"] for d in ds["datasources"] if d["type"] == "prometheus"}
    prov = yaml.safe_load((GRAFANA / "provisioning/dashboards/anywan.yml").read_text())
    assert prov["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    dashboards = sorted((GRAFANA / "dashboards").glob("*.json"))
    assert dashboards
    for path in dashboards:
        dash = json.loads(path.read_text())
        for panel in dash["panels"]:
            if panel.get("type") == "row":
                continue
            assert panel["datasource"]["uid"] in uids, (path.name, panel["title"])


# -- dashboard queries vs registered metrics ---------------------------------

PROMQL_WORDS = {
    # aggregations, functions and keywords that look like identifiers
    "sum",
    "min",
    "max",
    "avg",
    "count",
    "stddev",
    "stdvar",
    "topk",
    "bottomk",
    "quantile",
    "group",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "rate",
    "irate",
    "increase",
    "delta",
    "idelta",
    "deriv",
    "histogram_quantile",
    "label_values",
    "abs",
    "clamp_min",
    "clamp_max",
    "vector",
    "scalar",
    "time",
    "sort",
    "sort_desc",
    "label_replace",
    "absent",
    "changes",
    "resets",
    "avg_over_time",
    "max_over_time",
    "min_over_time",
    "sum_over_time",
    "last_over_time",
    "count_over_time",
    "e",
}
# Series Prometheus itself makes for every target.
SYNTHETIC = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names an expression reads: identifiers that are not functions,
    keywords, label names (inside {...} or by/without/on (...)), strings,
    durations or Grafana variables."""
    import re

    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings
    e = re.sub(r"\{[^}]*\}", "", e)  # label matchers
    e = re.sub(r"\[[^\]]*\]", "", e)  # range selectors
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    e = re.sub(r"\$\{?\w+\}?", " ", e)  # Grafana variables
    m = re.match(r"\s*label_values\(\s*([a-zA-Z_:][\w:]*)", e)
    if m:
        return {m.group(1)}
    names = set()
    for m in re.finditer(r"(?<![\w.])([a-zA-Z_:][\w:]*)(\s*\()?", e):
        word, call = m.group(1), m.group(2)
        if call or word in PROMQL_WORDS:
            continue
        names.add(word)
    return names


def test_promql_metric_names_extractor() -> None:
    """The extractor the dashboard check relies on finds names and only names."""
    expr = (
        'sum by (account) (rate(anywan_x_total{account=~"$account"}[$__rate_interval])) * 8 / 1e9'
    )
    assert promql_metric_names(expr) == {"anywan_x_total"}
    assert promql_metric_names('up{job="a"} + on(instance) group_left foo_bar') == {"up", "foo_bar"}
    assert promql_metric_names("label_values(anywan_y_total, account)") == {"anywan_y_total"}
    assert promql_metric_names("count(x > 0) / scalar(y)") == {"x", "y"}


def registered_metric_names() -> set[str]:
    """Exposition names of every metric the metrics modules register: each
    class there that owns a ``registry`` is built on a fresh registry and its
    families listed with the suffixes the text format adds."""
    import importlib
    import inspect

    from prometheus_client import CollectorRegistry

    names: set[str] = set()
    found_classes = []
    for modname in ("control.metrics", "dataplane.metrics", "replication.metrics"):
        try:
            mod = importlib.import_module(modname)
        except ImportError:
            continue
        for _, cls in inspect.getmembers(mod, inspect.isclass):
            if cls.__module__ != modname:
                continue
            try:
                obj = cls(registry=CollectorRegistry())
            except TypeError:
                continue
            registry = getattr(obj, "registry", None)
            if not isinstance(registry, CollectorRegistry):
                continue
            found_classes.append(cls.__name__)
            for fam in registry.collect():
                suffixes = {
                    "counter": ("_total",),
                    "histogram": ("_bucket", "_count", "_sum"),
                    "summary": ("_count", "_sum", ""),
                    "info": ("_info",),
                }.get(fam.type, ("",))
                names.update(fam.name + s for s in suffixes)
    assert found_classes, "no metrics classes found"
    return names


def dashboard_queries() -> list[tuple[str, str, str]]:
    out = []
    for path in sorted((GRAFANA / "dashboards").glob("*.json")):
        dash = json.loads(path.read_text())
        for panel in dash["panels"]:
            for t in panel.get("targets", []):
                out.append((path.name, panel["title"], t["expr"]))
        for var in dash.get("templating", {}).get("list", []):
            q = var.get("query")
            out.append(
                (path.name, f"variable {var['name']}", q["query"] if isinstance(q, dict) else q)
            )
    return out


def test_every_dashboard_metric_is_registered_by_the_code() -> None:
    registered = registered_metric_names() | SYNTHETIC
    queries = dashboard_queries()
    assert len(queries) >= 10
    used: set[str] = set()
    missing = []
    for name, title, expr in queries:
        names = promql_metric_names(expr)
        assert names, (name, title, expr)
        used |= names
        missing += [(title, n) for n in sorted(names - registered)]
    assert not missing, f"dashboard queries metrics nobody registers: {missing}"
    # The panels: tunnels up, traffic per tunnel and worker, drops by
    # reason, IKE handshakes and rekeys, bus lag.
    for need in (
        "anywan_control_ike_sas",
        "anywan_worker_tunnel_bytes_total",
        "anywan_worker_tunnel_packets_total",
        "anywan_worker_drops_total",
        "anywan_control_ike_handshakes_total",
        "anywan_control_child_sa_rekeys_total",
        "anywan_bus_lag_sequences",
    ):
        assert need in used, need
