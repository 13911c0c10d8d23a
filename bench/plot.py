"""PNG plots of a :mod:`bench.run` result (matplotlib, no display needed).

    python -m bench.plot bench/results/latest/results.json   # re-plot a result

Every plot has units on its axes, a legend, and error bars spanning the
repetitions (min–max); a configuration that did not run is absent from the
plot and named in the title's note.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

SERIES = (
    ("strongswan", "strongSwan kernel-libipsec", "#888888"),
    ("anywan-1w", "anywan, 1 worker", "#1f77b4"),
    ("anywan-2w", "anywan, 2 workers", "#ff7f0e"),
    ("plain", "plain routing (no tunnel)", "#2ca02c"),
)
CIPHER_LABEL = {
    "aes256gcm": "AES-256-GCM",
    "aes128gcm": "AES-128-GCM",
    "aes256cbc-sha256": "AES-256-CBC+HMAC-SHA256",
    "gre": "GRE",
}


def _save(plt: Any, fig: Any, path: Path) -> None:
    """Every figure is written the same way, and closed so a full run does not
    keep them all in memory."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _rows(results: dict[str, Any], suite: str) -> list[dict[str, Any]]:
    step = results.get("suites", {}).get(suite, {}).get(suite) or {}
    data = step.get("data") or {}
    return [r for r in data.get("rows", []) if "median" in r and not r.get("status")]


def _err(row: dict[str, Any], scale: float = 1.0) -> tuple[float, float]:
    return ((row["median"] - row["min"]) * scale, (row["max"] - row["median"]) * scale)


def _subtitle(results: dict[str, Any]) -> str:
    m = results.get("machine", {})
    return (
        f"{results.get('date')} · {m.get('cores')} cores {m.get('cpu_model') or ''} · "
        f"load {results.get('loadavg_before')}\n{results.get('command')}"
    )


def throughput_figure(results: dict[str, Any], cipher: str, path: Path) -> bool:
    """Three panels: UDP received packets/s vs inner packet size, and the same
    in Gbit/s, and TCP Gbit/s both directions; one series per responder."""
    rows = _rows(results, "throughput")
    idx = {(r["mode"], r["cipher"], r["test"]): r for r in rows}
    mine = [r for r in rows if r["cipher"] == cipher]
    if not mine:
        return False
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8))
    sizes = [(64, "udp64"), (1400, "udp1400")]
    for mode, label, color in SERIES:
        c = "none" if mode == "plain" else cipher
        pts = [(s, idx[(mode, c, t)]) for s, t in sizes if (mode, c, t) in idx]
        if not pts:
            continue
        xs = [s for s, _ in pts]
        for ax, scale in ((axes[0], 1.0), (axes[1], None)):
            if scale is None:  # kpps -> Gbit/s of inner packets
                ys = [r["median"] * 1e3 * s * 8 / 1e9 for s, r in pts]
                errs = [_err(r, 1e3 * s * 8 / 1e9) for s, r in pts]
            else:
                ys = [r["median"] for _, r in pts]
                errs = [_err(r) for _, r in pts]
            ax.errorbar(
                xs,
                ys,
                yerr=list(zip(*errs, strict=True)),
                marker="o",
                capsize=4,
                label=label,
                color=color,
                linestyle="--" if mode == "plain" else "-",
            )
    axes[0].set_title("UDP flood, site → core (log scale)")
    axes[0].set_ylabel("received packets/s (thousands)")
    axes[1].set_title("same, as inner Gbit/s (log scale)")
    axes[1].set_ylabel("received inner Gbit/s")
    for ax in axes[:2]:
        ax.set_xlabel("inner IPv4 packet size (bytes)")
        ax.set_xscale("log")
        ax.set_xticks([64, 1400], ["64", "1400"])
        ax.set_xlim(40, 2200)
        ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
    # TCP bars
    tests = [t for t in ("tcp-up", "tcp-down") if any(r["test"] == t for r in mine)]
    width = 0.8 / len(SERIES)
    ax = axes[2]
    for i, (mode, label, color) in enumerate(SERIES):
        c = "none" if mode == "plain" else cipher
        bx: list[float] = []
        by: list[float] = []
        berr: list[tuple[float, float]] = []
        for j, t in enumerate(tests):
            r = idx.get((mode, c, t))
            if r:
                bx.append(j + (i - 1.5) * width)
                by.append(r["median"])
                berr.append(_err(r))
        if bx:
            bars = ax.bar(
                bx,
                by,
                width,
                yerr=list(zip(*berr, strict=True)),
                capsize=3,
                label=label,
                color=color,
            )
            ax.bar_label(bars, labels=[f"{y:.2f}" for y in by], fontsize=7, padding=2)
    ax.set_xticks(
        range(len(tests)),
        [
            "site→core\n(responder decrypts)" if t == "tcp-up" else "core→site\n(encrypts)"
            for t in tests
        ],
    )
    ax.set_ylabel("TCP goodput (Gbit/s)")
    ax.set_yscale("log")
    ax.set_title("TCP (log scale)")
    ax.grid(alpha=0.3, axis="y")
    axes[0].legend(fontsize=8, loc="best")
    missing = sorted(
        {
            r["mode"]
            for r in (results["suites"]["throughput"]["throughput"]["data"] or {}).get("rows", [])
            if r.get("status") and r["cipher"] == cipher
        }
    )
    note = f" (not run: {', '.join(missing)})" if missing else ""
    fig.suptitle(
        f"Tunnel throughput, {CIPHER_LABEL.get(cipher, cipher)}{note} — error bars: "
        "min–max of repetitions\n" + _subtitle(results),
        fontsize=9,
    )
    _save(plt, fig, path)
    return True


def ratio_figure(results: dict[str, Any], path: Path) -> bool:
    """anywan ÷ anchor for each cipher and test (error bars from the extreme
    repetitions: min÷max to max÷min)."""
    rows = _rows(results, "throughput")
    have = [r for r in rows if r.get("anchor_median") and r["mode"].startswith("anywan")]
    if not have:
        return False
    idx = {(r["mode"], r["cipher"], r["test"]): r for r in rows}
    plt = _plt()
    keys = sorted(
        {(r["cipher"], r["test"]) for r in have},
        key=lambda k: (list(CIPHER_LABEL).index(k[0]) if k[0] in CIPHER_LABEL else 9, k[1]),
    )
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(keys)), 4.5))
    width = 0.38
    for i, mode in enumerate(("anywan-1w", "anywan-2w")):
        xs, ys, lo, hi = [], [], [], []
        for j, (c, t) in enumerate(keys):
            r = idx.get((mode, c, t))
            if not r or not r.get("anchor_median"):
                continue
            a = idx.get((r["anchor"], "none" if r["anchor"] == "plain" else c, t))
            ratio = r["median"] / r["anchor_median"]
            xs.append(j + (i - 0.5) * width)
            ys.append(ratio)
            if a and a["max"] > 0 and a["min"] > 0:
                lo.append(max(ratio - r["min"] / a["max"], 0))
                hi.append(max(r["max"] / a["min"] - ratio, 0))
            else:
                lo.append(0)
                hi.append(0)
        if xs:
            ax.bar(
                xs,
                ys,
                width,
                yerr=[lo, hi],
                capsize=3,
                label=dict((s[0], s[1]) for s in SERIES)[mode],
                color=dict((s[0], s[2]) for s in SERIES)[mode],
            )
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(
        range(len(keys)),
        [f"{CIPHER_LABEL.get(c, c)}\n{t}" + ("\n(÷ plain)" if c == "gre" else "") for c, t in keys],
        fontsize=7,
    )
    ax.set_ylabel("throughput ÷ same-run anchor (×)")
    ax.set_title(
        "anywan ÷ strongSwan libipsec (IPsec) and ÷ plain routing (GRE)\n" + _subtitle(results),
        fontsize=8,
    )
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    _save(plt, fig, path)
    return True


def failover_figure(results: dict[str, Any], path: Path) -> bool:
    rows = [r for r in _rows(results, "failover") if r["test"] == "worker-kill"]
    if not rows:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for i, r in enumerate(rows):
        xs = [
            i + 0.06 * (k - len(r["reps"]) / 2) / max(len(r["reps"]), 1) * 4
            for k in range(len(r["reps"]))
        ]
        ax.scatter(
            xs,
            r["reps"],
            alpha=0.7,
            label=f"{CIPHER_LABEL.get(r['cipher'], r['cipher'])}: each repetition",
        )
        ax.errorbar(
            [i + 0.3],
            [r["median"]],
            yerr=[[r["median"] - r["min"]], [r["max"] - r["median"]]],
            marker="s",
            capsize=5,
            color="black",
            label="median, min–max" if i == 0 else None,
        )
    ax.set_xticks(range(len(rows)), [CIPHER_LABEL.get(r["cipher"], r["cipher"]) for r in rows])
    ax.set_ylabel("outage (ms)")
    ax.set_xlabel("tunnel")
    ax.set_ylim(bottom=0)
    ax.set_title(
        "Outage when the worker carrying the flow is SIGKILLed\n" + _subtitle(results), fontsize=8
    )
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    _save(plt, fig, path)
    return True


def _spread_err(row: dict[str, Any], key: str, scale: float = 1.0) -> tuple[float, float]:
    """(below, above) the median of ``row[key]`` from its repetitions'
    min–max (``spread``, see bench.ike.repeated); (0, 0) for a single run."""
    sp = (row.get("spread") or {}).get(key) or {}
    v = row[key]
    if not sp.get("values"):
        return (0.0, 0.0)
    return (max(v - sp["min"], 0.0) * scale, max(sp["max"] - v, 0.0) * scale)


IKE_RESPONDERS = (
    ("strongswan", "strongSwan responder", "#888888"),
    ("anywan", "anywan responder", "#1f77b4"),
)


def _ike_memory_panel(ax: Any, data: list[dict[str, Any]], big: list[dict[str, Any]]) -> None:
    """RSS growth per IKE SA of each responder (ECP-384) at the 'vs' run size
    and at the ``--memory-sas`` size."""
    key = "responder_rss_growth_per_sa"
    rows = [r for r in [*data, *big] if r.get("group") == "ecp384" and key in r]
    sizes = sorted({int(r.get("ike_sas") or r.get("handshakes") or 0) for r in rows})
    width = 0.38
    for i, (resp, label, color) in enumerate(IKE_RESPONDERS):
        pts = [
            (j, r)
            for j, n in enumerate(sizes)
            for r in rows
            if r["responder"] == resp and int(r.get("ike_sas") or r.get("handshakes") or 0) == n
        ]
        if not pts:
            continue
        errs = [_spread_err(r, key, 1 / 1024) for _, r in pts]
        ax.bar(
            [j + (i - 0.5) * width for j, _ in pts],
            [r[key] / 1024 for _, r in pts],
            width,
            yerr=list(zip(*errs, strict=True)),
            capsize=4,
            label=label,
            color=color,
        )
    ax.set_xticks(range(len(sizes)), [f"{n:,}".replace(",", " ") for n in sizes])
    ax.set_xlabel("IKE SAs held by the responder (ECP-384)")
    ax.set_ylabel("responder RSS growth per IKE SA (KiB)")
    ax.set_title("Memory per IKE SA with its Child SA (lower is better)", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")


def ike_figure(results: dict[str, Any], path: Path) -> bool:
    """The same initiator against each responder: handshakes per responder
    CPU-second, p50/p99 handshake latency, and (when measured) RSS growth per
    IKE SA by the number of SAs; error bars span the repetitions (min–max)."""
    step = results.get("suites", {}).get("ike", {}).get("ike-vs-strongswan") or {}
    vdata = step.get("data") or {}
    data = vdata.get("vs_strongswan") or []
    if not data:
        return False
    plt = _plt()
    groups = sorted({r["group"] for r in data})
    reps = max(int(r.get("repetitions") or 1) for r in data)
    big = [m for m in vdata.get("memory_vs_strongswan") or [] if isinstance(m, dict)]
    fig, axes = plt.subplots(1, 3 if big else 2, figsize=(16 if big else 11, 4.4))
    ax, lat = axes[0], axes[1]
    width = 0.38
    for i, (resp, label, color) in enumerate(IKE_RESPONDERS):
        rows = [
            (j, r)
            for j, g in enumerate(groups)
            for r in data
            if r["group"] == g and r["responder"] == resp
        ]
        if not rows:
            continue
        key = "responder_handshakes_per_cpu_s"
        errs = [_spread_err(r, key) for _, r in rows]
        ax.bar(
            [j + (i - 0.5) * width for j, _ in rows],
            [r[key] for _, r in rows],
            width,
            yerr=list(zip(*errs, strict=True)),
            capsize=4,
            label=label,
            color=color,
        )
        for k, (pct, hatch) in enumerate((("p50_ms", ""), ("p99_ms", "//"))):
            w = width / 2
            xs = [j + (i - 0.5) * width + (k - 0.5) * w for j, _ in rows]
            errs = [_spread_err(r, pct) for _, r in rows]
            lat.bar(
                xs,
                [r[pct] for _, r in rows],
                w,
                yerr=list(zip(*errs, strict=True)),
                capsize=3,
                color=color,
                hatch=hatch,
                edgecolor="white" if not hatch else "black",
                label=f"{label}, {pct[:3]}",
            )
    for a in (ax, lat):
        a.set_xticks(range(len(groups)), [g.upper() for g in groups])
        a.set_xlabel("DH group")
        a.grid(alpha=0.3, axis="y")
    ax.set_ylabel("handshakes per CPU-second of the responder")
    ax.set_title("Responder efficiency (higher is better)", fontsize=9)
    ax.legend(fontsize=8)
    lat.set_ylabel("IKE_SA_INIT + IKE_AUTH latency (ms)")
    lat.set_title("Handshake latency seen by the initiator (lower is better)", fontsize=9)
    lat.margins(y=0.3)  # room above the bars for the legend
    lat.legend(fontsize=7, ncols=2, loc="upper left")
    if big:
        _ike_memory_panel(axes[2], data, big)
    bars = (
        f"error bars: min–max of {reps} repetitions" if reps > 1 else "one run each, no error bars"
    )
    fig.suptitle(
        f"IKE_SA_INIT + IKE_AUTH, same initiator, {data[0].get('handshakes')} handshakes per "
        f"run — {bars}\n" + _subtitle(results),
        fontsize=8,
    )
    _save(plt, fig, path)
    return True


def _rep_err(row: dict[str, Any], key: str, reps_key: str) -> tuple[float, float]:
    """Error bar around ``row[key]`` spanning the per-repetition values in
    ``row[reps_key]`` (bench.replication's ``rep_p99_ms``), else ``spread``."""
    vals = [x for x in row.get(reps_key) or [] if isinstance(x, int | float)]
    if vals:
        return (max(row[key] - min(vals), 0.0), max(max(vals) - row[key], 0.0))
    return _spread_err(row, key)


def replication_figure(results: dict[str, Any], path: Path) -> bool:
    """set() → applied latency by subscriber count; and, when the result has
    it, IKE_AUTH done → SA usable on N workers (error bars: the range of the
    per-repetition p50/p99)."""
    from bench.report import N_KEYS, _first_key, sa_propagation_rows

    step = results.get("suites", {}).get("replication", {}).get("replication") or {}
    data = step.get("data") or {}
    prop = data.get("propagation") or []
    sa = [
        r
        for r in sa_propagation_rows(data) or []
        if _first_key(r, N_KEYS) and isinstance(r.get("p99_ms"), int | float)
    ]
    if not prop and not sa:
        return False
    plt = _plt()
    fig, axes = plt.subplots(
        1,
        int(bool(prop)) + int(bool(sa)),
        figsize=(6 * (1 + bool(prop and sa)), 4.2),
        squeeze=False,
    )
    panels = list(axes[0])
    if prop:
        ax = panels.pop(0)
        ns = [p["subscribers"] for p in prop]
        for key, label, style in (
            ("p50_ms", "p50", "o-"),
            ("p99_ms", "p99", "s-"),
            ("max_ms", "max", "^--"),
        ):
            ax.plot(ns, [p[key] for p in prop], style, label=label)
        ax.axhline(10, color="red", linewidth=0.8, linestyle=":", label="goal p99 10 ms")
        ax.set_xscale("log", base=2)
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.set_xlabel("subscriber processes")
        ax.set_ylabel("set() → applied latency (ms)")
        ax.set_yscale("log")
        ax.set_title("Bus propagation at 1000 updates/s", fontsize=9)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    if sa:
        ax = panels.pop(0)
        ns = [r[_first_key(r, N_KEYS) or "subscribers"] for r in sa]
        for key, label, style in (("p50_ms", "p50", "o-"), ("p99_ms", "p99", "s-")):
            if not all(isinstance(r.get(key), int | float) for r in sa):
                continue
            errs = [_rep_err(r, key, f"rep_{key}") for r in sa]
            ax.errorbar(
                ns,
                [r[key] for r in sa],
                yerr=list(zip(*errs, strict=True)),
                fmt=style,
                capsize=4,
                label=f"{label} (bars: range over repetitions)",
            )
        if all(isinstance(r.get("max_ms"), int | float) for r in sa):
            ax.plot(ns, [r["max_ms"] for r in sa], "^--", label="max")
        ax.set_xscale("log", base=2)
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.set_xlabel("worker processes N")
        ax.set_ylabel("IKE_AUTH response → SA usable on all N (ms)")
        ax.set_yscale("log")
        ax.set_title("SA propagation from IKE_AUTH", fontsize=9)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle("Replication\n" + _subtitle(results), fontsize=8)
    _save(plt, fig, path)
    return True


def pktrate_figure(results: dict[str, Any], path: Path) -> bool:
    """``bench.pktrate``: kpps the worker processes carried, 1 and 2 workers,
    per tunnel / size / direction, with the 150 kpps goal and the 2w ÷ 1w
    ratio over each pair (one run per cell: no error bars)."""
    step = results.get("suites", {}).get("pktrate", {}).get("pktrate") or {}
    rows = [r for r in (step.get("data") or {}).get("rows", []) if "kpps" in r]
    if not rows:
        return False
    idx = {(r["kind"], r["size"], r["op"], r["workers"]): r for r in rows}
    keys = sorted(
        {(r["kind"], r["size"], r["op"]) for r in rows},
        key=lambda k: (list(CIPHER_LABEL).index(k[0]) if k[0] in CIPHER_LABEL else 9, k[1], k[2]),
    )
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(keys)), 4.5))
    width = 0.38
    short = {"aes256gcm": "GCM-256", "aes256cbc-sha256": "CBC-256\n+SHA256", "gre": "GRE"}
    for i, (w, label, color) in enumerate(
        ((1, "anywan, 1 worker", "#1f77b4"), (2, "anywan, 2 workers", "#ff7f0e"))
    ):
        xs = [j + (i - 0.5) * width for j, k in enumerate(keys) if (*k, w) in idx]
        ys = [idx[(*k, w)]["kpps"] for k in keys if (*k, w) in idx]
        if xs:
            ax.bar(xs, ys, width, label=label, color=color)
    for j, k in enumerate(keys):
        two = idx.get((*k, 2))
        if two and two.get("ratio_2w_1w") is not None:
            ax.text(j, two["kpps"], f"{two['ratio_2w_1w']:.2f}×", ha="center", va="bottom",
                    fontsize=7)  # fmt: skip
    ax.axhline(150, color="red", linewidth=0.8, linestyle="--", label="goal at 64 B: 150 kpps")
    ax.set_xticks(
        range(len(keys)),
        [f"{short.get(c, c)}\n{s} B {op}" for c, s, op in keys],
        fontsize=7,
    )
    ax.set_ylabel("packets/s carried by the workers (kpps)")
    ax.set_title(
        "worker processes fed by a cheap generator (bench.pktrate); label: 2w ÷ 1w\n"
        + _subtitle(results),
        fontsize=8,
    )
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    _save(plt, fig, path)
    return True


def make_all(results: dict[str, Any], out_dir: Path) -> list[str]:
    """Write every plot that has data; returns the file names."""
    made = []
    rows = _rows(results, "throughput")
    ciphers = [c for c in CIPHER_LABEL if any(r["cipher"] == c for r in rows)]
    for c in ciphers:
        name = "throughput.png" if c == "aes256gcm" else f"throughput-{c}.png"
        if throughput_figure(results, c, out_dir / name):
            made.append(name)
    for name, fn in (
        ("ratios.png", ratio_figure),
        ("pktrate.png", pktrate_figure),
        ("failover.png", failover_figure),
        ("ike.png", ike_figure),
        ("replication.png", replication_figure),
    ):
        if fn(results, out_dir / name):
            made.append(name)
    return made


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m bench.plot RESULTS.json", file=sys.stderr)
        return 2
    path = Path(argv[0])
    results = json.loads(path.read_text())
    for name in make_all(results, path.parent):
        print(path.parent / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
