"""``results.md`` from the ``results.json`` of :mod:`bench.run`.

Every figure appears with its same-run anchor and the ratio to it; measured
spreads are shown as ``median (min–max)`` over the repetitions. A suite that
did not run says so, with the reason — never a number.
"""

from __future__ import annotations

import importlib
from typing import Any

MODES = ("strongswan", "anywan-1w", "anywan-2w")
MODE_LABEL = {
    "plain": "plain routing",
    "strongswan": "strongSwan libipsec",
    "anywan-1w": "anywan 1 worker",
    "anywan-2w": "anywan 2 workers",
}
CIPHER_LABEL = {
    "aes256gcm": "AES-256-GCM",
    "aes128gcm": "AES-128-GCM",
    "aes256cbc-sha256": "AES-256-CBC+SHA256",
    "gre": "GRE",
    "none": "none",
}
TEST_LABEL = {
    "tcp-up": "TCP site→core (responder decrypts), Gbit/s",
    "tcp-down": "TCP core→site (responder encrypts), Gbit/s",
    "udp1400": "UDP 1400 B inner packets site→core, received kpps",
    "udp64": "UDP 64 B inner packets site→core, received kpps",
}


def num(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "—"
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.{digits}g}" if x else "0"


def spread(row: dict[str, Any]) -> str:
    if "median" not in row:
        return row.get("status", "not run")
    if len(row.get("reps", [])) > 1:
        return f"{num(row['median'])} ({num(row['min'])}–{num(row['max'])})"
    return num(row["median"])


def stat(row: dict[str, Any], key: str) -> str:
    """``row[key]`` as ``median (min–max)`` when the suite repeated it (the
    row's ``spread[key]``: ``bench.ike``, ``bench.codec``), else the plain
    number (results written before the suites repeated)."""
    value = row.get(key)
    if not isinstance(value, int | float):
        return "—"
    sp = (row.get("spread") or {}).get(key)
    if isinstance(sp, dict) and len(sp.get("values") or ()) > 1:
        return f"{num(value)} ({num(sp.get('min'))}–{num(sp.get('max'))})"
    return num(value)


def reps_note(rows: list[dict[str, Any]]) -> str:
    """'median (min–max) of N repetitions' for a table's caption, or a note
    that its numbers are single runs."""
    counts = sorted({int(r.get("repetitions") or 1) for r in rows})
    if not counts or counts[-1] <= 1:
        return "one run each (no repetitions in this result)"
    n = str(counts[0]) if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"
    return f"median (min–max) of {n} repetitions"


def ratio(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}×"


def table(head: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out) + "\n"


def _step(results: dict[str, Any], suite: str, step: str) -> dict[str, Any] | None:
    return results.get("suites", {}).get(suite, {}).get(step)


def _status_note(res: dict[str, Any] | None, name: str) -> str | None:
    if res is None:
        return None
    retried = ""
    if res.get("failed_attempts"):
        first = res["failed_attempts"][0]
        tail = " / ".join(str(x) for x in (first.get("tail") or [])[-2:])
        retried = (
            f"_{name}: first attempt failed ({first.get('status')}: {tail[:300]}); retried._\n"
        )
    if res["status"] == "ok" and retried:
        return retried
    if res["status"] != "ok":
        tail = " / ".join(str(x) for x in (res.get("tail") or [])[-3:])
        return f"**{name}: {res['status']}** ({tail[:400]})\n"
    if isinstance(res.get("data"), dict) and res["data"].get("skipped"):
        return f"**{name}: skipped** — {res['data']['skipped']}\n"
    return None


# --------------------------------------------------------------------------
# per suite
# --------------------------------------------------------------------------


def _open_section(
    results: dict[str, Any], suite: str, title: str
) -> tuple[dict[str, Any], list[str]] | None:
    """A suite's result and the start of its markdown section (heading, then
    the failure or retry note if any); None when the suite did not run."""
    res = _step(results, suite, suite)
    if res is None:
        return None
    out = [f"## {title}\n"]
    note = _status_note(res, suite)
    if note:
        out.append(note)
    return res, out


def throughput_md(results: dict[str, Any]) -> str:
    opened = _open_section(results, "throughput", "Tunnel throughput (`bench.throughput`)")
    if opened is None:
        return ""
    res, out = opened
    data = res.get("data") or {}
    rows = data.get("rows", [])
    if not rows:
        return "\n".join(out)
    cfg = data.get("config", {})
    out.append(
        f"{cfg.get('sites')} strongSwan kernel-libipsec initiator sites in parallel, one "
        f"iperf3 client each (sum shown), {cfg.get('reps')} repetitions of "
        f"{cfg.get('seconds')} s; median (min–max). Ratios: anywan ÷ strongSwan "
        "(same cipher, same run); GRE and strongSwan ÷ plain routing; 2 workers ÷ 1 worker.\n"
    )
    index = {(r["mode"], r["cipher"], r["test"]): r for r in rows}
    tests = [t for t in TEST_LABEL if any(r["test"] == t for r in rows)]
    ciphers = [c for c in CIPHER_LABEL if c != "none" and any(r["cipher"] == c for r in rows)]
    for test in tests:
        out.append(f"### {TEST_LABEL[test]}\n")
        body = []
        plain = index.get(("plain", "none", test))
        for c in ciphers:
            sw = index.get(("strongswan", c, test))
            a1 = index.get(("anywan-1w", c, test))
            a2 = index.get(("anywan-2w", c, test))
            body.append(
                [
                    CIPHER_LABEL[c],
                    spread(sw) if sw else ("no GRE in strongSwan" if c == "gre" else "—"),
                    ratio(sw.get("ratio")) if sw else "—",
                    spread(a1) if a1 else "—",
                    ratio(a1.get("ratio")) if a1 else "—",
                    spread(a2) if a2 else "—",
                    ratio(a2.get("ratio")) if a2 else "—",
                    ratio(a2.get("ratio_vs_1w")) if a2 else "—",
                ]
            )
        body.append(
            ["plain routing (no tunnel)", spread(plain) if plain else "—", "", "", "", "", "", ""]
        )
        out.append(
            table(
                [
                    "cipher",
                    "strongSwan",
                    "sS ÷ plain",
                    "anywan 1w",
                    "1w ÷ anchor",
                    "anywan 2w",
                    "2w ÷ anchor",
                    "2w ÷ 1w",
                ],
                body,
            )
        )
    pc_rows = []
    for test in tests:
        for c in ciphers:
            cells = []
            for mode in MODES:
                r = index.get((mode, c, test))
                if r and "per_core" in r:
                    pc = r["per_core"]
                    cell = (
                        f"{num(pc['median'])} ({num(pc['min'])}–{num(pc['max'])}) "
                        f"@{r.get('responder_cpu_pct', 0):.0f}%"
                    )
                    if r.get("per_core_ratio") is not None:
                        cell += f" = {ratio(r['per_core_ratio'])}"
                    cells.append(cell)
                else:
                    cells.append("—")
            if any(x != "—" for x in cells):
                pc_rows.append([test, CIPHER_LABEL[c], *cells])
    if pc_rows:
        out.append("### Per core of the responder\n")
        out.append(
            "The same figures divided by the responder's CPU use (charon, or the sum over "
            "anywan's workers; @ = % of one core in the median repetition): what one "
            "dedicated core would carry if the responder's cost scaled linearly. On this "
            "2-core shared machine the raw figures above are CPU-starved (see below), so this "
            "is the fairer comparison of the two implementations' efficiency; it leaves out "
            "kernel work done outside the responder's process context (softirq). "
            "Ratio: anywan ÷ strongSwan.\n"
        )
        out.append(
            table(
                ["test", "cipher", "strongSwan /core", "anywan 1w /core", "anywan 2w /core"],
                pc_rows,
            )
        )
    out.append("### What limited each number\n")
    out.append(
        "CPU of each process (% of one core; busiest thread in brackets) during the "
        "median repetition, and the whole machine's busy share. A process near 100 % of a "
        "core is the bottleneck; a machine near 100 % means all processes were starved "
        "together (2 cores shared by initiators, responder, iperf3 and the kernel).\n"
    )
    lim = []
    for r in rows:
        if "cpu" not in r:
            continue
        procs = r["cpu"].get("processes", {})
        top = sorted(procs.items(), key=lambda kv: -kv[1]["cpu_pct"])[:5]
        lim.append(
            [
                MODE_LABEL.get(r["mode"], r["mode"]),
                CIPHER_LABEL.get(r["cipher"], r["cipher"]),
                r["test"],
                ", ".join(
                    f"{k} {v['cpu_pct']:.0f}% ({v['busiest_thread_pct']:.0f}%)" for k, v in top
                ),
                f"{r['cpu'].get('machine_busy_pct', 0):.0f}%",
            ]
        )
    out.append(table(["responder", "cipher", "test", "top processes", "machine busy"], lim))
    extra = [r for r in rows if r.get("worker_packet_counters")]
    if extra:
        out.append(
            "Inner packets each anywan worker carried during each test (from its /metrics) "
            "show how SO_REUSEPORT (ESP-in-UDP) and the raw-socket share (GRE) split the "
            "sites' flows over 2 workers: "
            + "; ".join(
                f"{r['cipher']} {r['test']}: "
                + "/".join(f"{x:.0f}" for x in r["worker_packet_counters"])
                for r in extra
                if r["mode"] == "anywan-2w"
            )
            + "\n"
        )
    flaky = [r for r in rows if r.get("failed_reps")]
    if flaky:
        out.append(
            "Repetitions that failed and are not in the figures: "
            + "; ".join(
                f"{r['mode']} {r['cipher']} {r['test']}: {len(r['failed_reps'])} "
                f"({r['failed_reps'][-1][:120]})"
                for r in flaky
            )
            + "\n"
        )
    bad = [r for r in rows if r.get("status")]
    if bad:
        out.append(
            table(
                ["responder", "cipher", "test", "status"],
                [[r["mode"], r["cipher"], r["test"], r["status"]] for r in bad],
            )
        )
    return "\n".join(out)


def failover_md(results: dict[str, Any]) -> str:
    opened = _open_section(results, "failover", "Failover and rekey (`bench.failover`)")
    if opened is None:
        return ""
    res, out = opened
    data = res.get("data") or {}
    cfg = data.get("config", {})
    rows = data.get("rows", [])
    if not rows:
        return "\n".join(out)
    out.append(
        f"Probe: {cfg.get('rate_pps')} UDP echoes/s through the tunnel (resolution "
        f"{1000 / (cfg.get('rate_pps') or 1000):.0f} ms). worker-kill: SIGKILL of the worker that "
        "carried the tunnel, outage = longest run of lost echoes; rekey-loss: echoes lost in "
        "the 1.6 s after `swanctl --rekey` minus those lost in the 1.6 s before (the load "
        "alone), with iperf3 TCP on the same tunnel.\n"
    )
    body = []
    for r in rows:
        anchor = (
            f"{MODE_LABEL.get(r['anchor'], r['anchor'])}: {num(r.get('anchor_median'))}"
            if r.get("anchor")
            else "—"
        )
        body.append(
            [
                r["test"],
                CIPHER_LABEL.get(r["cipher"], r["cipher"]),
                MODE_LABEL.get(r["mode"], r["mode"]),
                spread(r),
                r.get("unit", ""),
                str(len(r.get("reps", []))),
                anchor,
                ratio(r.get("ratio")),
            ]
        )
    out.append(
        table(
            ["test", "tunnel", "responder", "median (min–max)", "unit", "reps", "anchor", "ratio"],
            body,
        )
    )
    return "\n".join(out)


def codec_md(results: dict[str, Any]) -> str:
    opened = _open_section(results, "codec", "Codecs (`bench.codec`)")
    if opened is None:
        return ""
    res, out = opened
    data = res.get("data") or {}
    rows = data.get("rows", [])
    if not rows:
        return "\n".join(out)
    meta = data.get("meta", {})
    spreads = (
        " (min–max)" if any((r.get("spread") or {}).get("ns_per_packet") for r in rows) else ""
    )
    out.append(
        f"ns/packet, median{spreads} of {meta.get('rounds')} interleaved rounds of "
        f"{meta.get('iterations')} calls; ratio of the medians to the bare call named in "
        f"'anchor' (its own median{spreads} in 'anchor ns'), measured in the same rounds.\n"
    )
    bare = {(r.get("case"), r.get("size")): r for r in rows if r.get("suite") == "bare"}
    out.append(
        table(
            ["suite", "case", "size B", "op", "ns/packet", "anchor", "anchor ns", "ratio"],
            [
                [
                    str(r.get("suite")),
                    str(r.get("case")),
                    str(r.get("size")),
                    str(r.get("op")),
                    stat(r, "ns_per_packet"),
                    str(r.get("baseline")),
                    stat(bare.get((r.get("baseline"), r.get("size"))) or {}, "ns_per_packet"),
                    ratio(r.get("ratio")),
                ]
                for r in rows
                if r.get("suite") != "bare"
            ],
        )
    )
    return "\n".join(out)


def _best_of(snap: dict[str, Any]) -> str:
    """A snapshot row's best ready time, with the range of its runs if several."""
    runs = [x for x in snap.get("ready_all_s") or () if isinstance(x, int | float)]
    if len(runs) > 1:
        return f"{num(snap['ready_s'])} ({num(min(runs))}–{num(max(runs))})"
    return num(snap["ready_s"])


def worker_md(results: dict[str, Any]) -> str:
    opened = _open_section(results, "worker", "Worker packet path from memory (`bench.worker`)")
    if opened is None:
        return ""
    res, out = opened
    data = res.get("data") or {}
    out.append(
        "The worker's per-packet code with no kernel (no TUN/socket syscalls): the code's "
        "own ceiling, to compare with the end-to-end figures above. Ratio: worker path ÷ "
        f"bare codec call, same run; {reps_note(data.get('rows', []))} (interleaved rounds).\n"
    )
    out.append(
        table(
            ["transform", "size B", "op", "ns/packet", "bare ns", "kpps", "Gbit/s", "÷ bare"],
            [
                [
                    CIPHER_LABEL.get(r["kind"], r["kind"]),
                    str(r["size"]),
                    r["op"],
                    stat(r, "worker_ns"),
                    str(r["bare_ns"]),
                    stat(r, "kpps"),
                    num(r["gbit_s"]),
                    ratio(r["ratio_to_bare"]),
                ]
                for r in data.get("rows", [])
            ],
        )
    )
    if data.get("scaling"):
        out.append(
            table(
                ["encap", "size B", "1 process kpps", "2 processes kpps", "2 ÷ 1"],
                [
                    [
                        CIPHER_LABEL.get(s["kind"], s["kind"]),
                        str(s["size"]),
                        num(s["kpps_1"]),
                        num(s["kpps_2"]),
                        ratio(s["ratio_2_to_1"]),
                    ]
                    for s in data["scaling"]
                ],
            )
        )
    net = _step(results, "worker", "worker-network")
    if net is not None:
        note = _status_note(net, "worker --network")
        if note:
            out.append(note)
        elif net.get("data"):
            out.append(
                "Two anywan workers back to back (no strongSwan), iperf3 TCP through them "
                "(`bench.worker --network`):\n"
            )
            out.append(
                table(
                    ["outer", "cipher", "TCP Gbit/s", "retransmits", "error"],
                    [
                        [
                            str(x.get("mode")),
                            str(x.get("cipher")),
                            num(x.get("gbit_s")),
                            str(x.get("retransmits")),
                            str(x.get("error") or ""),
                        ]
                        for x in net["data"]
                        if isinstance(x, dict)
                    ],
                )
            )
    return "\n".join(out)


PKTRATE_TITLE = "Packet rate of the worker processes (`bench.pktrate`)"


def _cpu_of(row: dict[str, Any], prefix: str) -> str:
    procs = (row.get("cpu") or {}).get("processes") or {}
    vals = [v["cpu_pct"] for k, v in sorted(procs.items()) if k.startswith(prefix)]
    return " + ".join(f"{v:.0f}" for v in vals) if vals else "—"


def pktrate_md(results: dict[str, Any]) -> str:
    """Real worker processes fed by a cheap generator: kpps and Gbit/s per
    cell, 2 workers ÷ 1 worker, the 150 kpps goal at 64 B, and what each
    process used (the generator's kernel work shares the cores)."""
    opened = _open_section(results, "pktrate", PKTRATE_TITLE)
    if opened is None:
        return ""
    res, out = opened
    data = res.get("data") or {}
    rows = [r for r in data.get("rows", []) if isinstance(r, dict)]
    if not rows:
        return "\n".join(out)
    cfg = data.get("config") or {}
    out.append(
        "End to end through `anywan-worker` processes (TUN, sockets, kernel included) fed "
        "by a cheap generator (UDP GSO / a TPACKET ring, 64 packets per syscall) on the "
        f"same {cfg.get('cores', 2)} cores; packets the **workers** carried (their "
        f"counters) over a {num(cfg.get('window_s'))} s window, one run per cell, 1w and 2w "
        "interleaved. Goals: ≥ 150 kpps at 64 B; 2 workers ≥ 1.6× one.\n"
    )
    index = {(r["kind"], r["size"], r["op"], r["workers"]): r for r in rows}
    keys = sorted(
        {(r["kind"], r["size"], r["op"]) for r in rows},
        key=lambda k: (list(CIPHER_LABEL).index(k[0]) if k[0] in CIPHER_LABEL else 99, k[1], k[2]),
    )
    table_rows = []
    for kind, size, op in keys:
        one, two = index.get((kind, size, op, 1)), index.get((kind, size, op, 2))

        def cell(r: dict[str, Any] | None) -> list[str]:
            if r is None:
                return ["—", "—", "—"]
            if "kpps" not in r:
                return [r.get("status", "not run")[:80], "—", "—"]
            goal = ""
            if r.get("goal_150kpps") is not None:
                goal = " ✓" if r["goal_150kpps"] else " ✗"
            split = " / ".join(num(x) for x in r.get("per_worker_kpps", []))
            return [
                num(r["kpps"]) + goal,
                num(r["gbit_s"]),
                f"{split}; {num(r.get('kpps_per_worker_core'))} per worker core "
                f"(workers {_cpu_of(r, 'anywan-worker')} %, gen "
                f"{_cpu_of(r, 'generator')} %, machine "
                f"{num((r.get('cpu') or {}).get('machine_busy_pct'))} %)",
            ]

        r2 = (two or {}).get("ratio_2w_1w")
        table_rows.append(
            [
                CIPHER_LABEL.get(kind, kind),
                str(size),
                op,
                *cell(one),
                *cell(two),
                ("**" + ratio(r2) + "**") if r2 is not None and r2 >= 1.6 else ratio(r2),
            ]
        )
    out.append(
        table(
            [
                "tunnel", "inner B", "op", "1w kpps", "1w Gbit/s", "1w: per worker kpps, CPU",
                "2w kpps", "2w Gbit/s", "2w: per worker kpps, CPU", "2w ÷ 1w",
            ],
            table_rows,
        )
    )  # fmt: skip
    out.append(
        "✓ / ✗: the ≥ 150 kpps goal at 64 B. CPU: % of one core over the window "
        "(`/proc/<pid>/stat`); the machine share is of all cores; per worker core: kpps ÷ "
        "the workers' summed CPU share (their efficiency, whatever CPU they got). "
        "encap = core→site "
        "(TUN read, encrypt / GRE, UDP or raw send); decap = site→core.\n"
    )
    notes = []
    for r in rows:
        if "kpps" not in r:
            continue
        wd = r.get("worker_drops") or {}
        if wd:
            notes.append(
                f"{CIPHER_LABEL.get(r['kind'], r['kind'])} {r['size']} B {r['op']} "
                f"{r['workers']}w: worker drops {wd}"
            )
    if notes:
        out.append("Drops counted by the workers during a window: " + "; ".join(notes) + ".\n")
    return "\n".join(out)


IKE_VS_METRICS = (
    ("responder_handshakes_per_cpu_s", "handshakes per responder CPU-second"),
    ("handshakes_per_s_wall", "handshakes/s, wall clock"),
    ("p50_ms", "p50 handshake latency, ms"),
    ("p99_ms", "p99 handshake latency, ms"),
    ("responder_rss_growth_per_sa", "responder RSS growth, bytes per IKE SA"),
)


def ike_md(results: dict[str, Any]) -> str:
    res = _step(results, "ike", "ike")
    vs = _step(results, "ike", "ike-vs-strongswan")
    if res is None and vs is None:
        return ""
    out = ["## IKE (`bench.ike`)\n"]
    for r, name in ((res, "ike"), (vs, "ike --strongswan")):
        note = _status_note(r, name)
        if note:
            out.append(note)
    data = (res or {}).get("data") or {}
    if data.get("rates"):
        out.append(
            "In memory, one core: our initiator and our responder in one process; rates "
            "from CPU time, p50/p99 wall clock per handshake (preemption shows in p99); "
            f"{reps_note(data['rates'])} of {data['rates'][0].get('handshakes')} handshakes.\n"
        )
        out.append(
            table(
                ["DH group", "pair handshakes/s", "responder handshakes/s", "p50 ms", "p99 ms"],
                [
                    [
                        str(r.get("group")),
                        stat(r, "pair_handshakes_per_s"),
                        stat(r, "responder_handshakes_per_s"),
                        stat(r, "p50_ms"),
                        stat(r, "p99_ms"),
                    ]
                    for r in data["rates"]
                ],
            )
        )
    if data.get("memory"):
        traced = not any("spread" in m for m in data["memory"])
        out.append(
            "Memory per established IKE SA (with its Child SA) in our responder, a fresh "
            f"process per measurement; {reps_note(data['memory'])}. "
            + (
                "Written before bench.ike separated them: this RSS was measured while "
                "tracemalloc traced, whose bookkeeping inflates it (about 4×)."
                if traced
                else "RSS growth untraced; Python heap (tracemalloc) in another process."
            )
            + "\n"
        )
        out.append(
            table(
                ["IKE SAs", "RSS bytes/SA", "Python heap bytes/SA"],
                [
                    [
                        str(m.get("ike_sas")),
                        stat(m, "rss_bytes_per_sa"),
                        stat(m, "python_heap_bytes_per_sa"),
                    ]
                    for m in data["memory"]
                ],
            )
        )
    vdata = (vs or {}).get("data") or {}
    if vdata.get("vs_strongswan"):
        rows = vdata["vs_strongswan"]
        by = {(r.get("group"), r.get("responder")): r for r in rows}
        n = rows[0].get("handshakes")
        out.append(
            "Over UDP in a namespace, the same initiator against strongSwan's responder and "
            f"ours in turn, {n} handshakes per run, a fresh responder each run; "
            f"{reps_note(rows)}. Responder CPU and RSS growth from /proc. "
            "Ratio: anywan ÷ strongSwan, of the medians (for latency and memory, below "
            "1× is better).\n"
        )
        body = []
        for g in sorted({str(r.get("group")) for r in rows}):
            sw, aw = by.get((g, "strongswan")), by.get((g, "anywan"))
            if not sw or not aw:
                continue
            for key, label in IKE_VS_METRICS:
                a, b = aw.get(key), sw.get(key)
                body.append(
                    [
                        g,
                        label,
                        stat(aw, key),
                        stat(sw, key),
                        ratio(a / b if isinstance(a, int | float) and b else None),
                    ]
                )
        failed = [
            f"{r.get('group')} {r.get('responder')}: {r['failed']}" for r in rows if r.get("failed")
        ]
        out.append(table(["group", "metric", "anywan", "strongSwan", "anywan ÷ sS"], body))
        if failed:
            out.append("Handshakes that failed (not counted in the rates): " + "; ".join(failed))
    mem = [m for m in vdata.get("memory_vs_strongswan") or [] if isinstance(m, dict)]
    if mem and vdata.get("vs_strongswan"):
        # RSS growth per IKE SA by SA count: the 'vs' runs (ECP-384) and the big runs
        key = "responder_rss_growth_per_sa"
        sizes: dict[int, dict[str, dict[str, Any]]] = {}
        for r in [*vdata["vs_strongswan"], *mem]:
            if r.get("group") == "ecp384" and isinstance(r.get(key), int | float):
                n_sa = int(r.get("ike_sas") or r.get("handshakes") or 0)
                sizes.setdefault(n_sa, {})[str(r.get("responder"))] = r
        out.append(
            "Responder RSS growth per IKE SA (ECP-384, each with its Child SA) by the number "
            f"of SAs it holds, a fresh responder per run; {reps_note(mem)}. "
            "Ratio: anywan ÷ strongSwan, of the medians.\n"
        )
        out.append(
            table(
                ["IKE SAs", "anywan B/SA", "strongSwan B/SA", "anywan ÷ sS"],
                [
                    [
                        str(n_sa),
                        stat(by_resp.get("anywan") or {}, key),
                        stat(by_resp.get("strongswan") or {}, key),
                        ratio(
                            by_resp["anywan"][key] / by_resp["strongswan"][key]
                            if "anywan" in by_resp
                            and "strongswan" in by_resp
                            and by_resp["strongswan"][key]
                            else None
                        ),
                    ]
                    for n_sa, by_resp in sorted(sizes.items())
                ],
            )
        )
    return "\n".join(out)


SA_PROPAGATION_KEYS = ("sa_propagation", "sa_usable", "ike_to_usable", "propagation_sa")
N_KEYS = ("workers", "n_workers", "n", "N", "subscribers")


def _first_key(row: dict[str, Any], names: tuple[str, ...]) -> str | None:
    return next((k for k in names if isinstance(row.get(k), int | float)), None)


def _prefixed(row: dict[str, Any], prefix: str) -> str | None:
    """``p99_ms`` (or ``p99``, ``p99_us``…): the first numeric key with that prefix."""
    for k in (f"{prefix}_ms", prefix):
        if isinstance(row.get(k), int | float):
            return k
    return next(
        (k for k, v in row.items() if k.startswith(prefix) and isinstance(v, int | float)), None
    )


def sa_propagation_rows(data: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The "IKE_AUTH done → SA usable on N workers" rows of a replication
    result, read tolerantly: a list of dicts (or a dict keyed by N) under
    one of ``SA_PROPAGATION_KEYS`` (or any key naming an SA and propagation
    or usability), each with a worker count (``N_KEYS``) and ``p50*``/``p99*``
    numbers; None when the result has none."""
    key = next((k for k in SA_PROPAGATION_KEYS if data.get(k)), None)
    if key is None:
        key = next(
            (
                k
                for k in data
                if "sa" in k.lower().split("_")
                and ("propagation" in k.lower() or "usable" in k.lower())
                and data[k]
            ),
            None,
        )
    if key is None:
        return None
    raw = data[key]
    if isinstance(raw, dict):
        rows = raw.get("rows") if isinstance(raw.get("rows"), list) else None
        if rows is None:
            rows = [
                {"workers": int(n), **v}
                for n, v in raw.items()
                if isinstance(v, dict) and str(n).isdigit()
            ]
    else:
        rows = raw if isinstance(raw, list) else []
    return [r for r in rows if isinstance(r, dict)]


def _range(xs: Any) -> str | None:
    vals = [x for x in xs if isinstance(x, int | float)] if isinstance(xs, list) else []
    return f"{num(min(vals))}–{num(max(vals))}" if vals else None


def sa_propagation_md(data: dict[str, Any]) -> list[str]:
    """IKE_AUTH done → Child SA usable on N workers (``bench.replication``
    ``sa_propagation``: per N, p50/p99/max over all handshakes, the
    per-repetition p50s/p99s ``rep_p50_ms``/``rep_p99_ms``, and the split
    into control → published and bus → applied); older or other shapes are
    read by :func:`sa_propagation_rows` and shown with what they have."""
    rows = sa_propagation_rows(data)
    if not rows:
        return []
    reps = sorted({r["reps"] for r in rows if isinstance(r.get("reps"), int)})
    sas = sorted({r["child_sas"] for r in rows if isinstance(r.get("child_sas"), int)})
    out = [
        "SA propagation: from our responder producing the IKE_AUTH response (control's "
        "engine and service, tunnels and PSKs made through the API) to the Child SA "
        "usable (both SAs through the worker's bus → queue → loop → Dataplane.apply path) "
        "on all N worker-like subscriber processes"
        + (f"; {'/'.join(map(str, sas))} Child SAs" if sas else "")
        + (f" in {'/'.join(map(str, reps))} repetitions" if reps else "")
        + ". p50/p99 over all handshakes; spread: the range of the per-repetition "
        "p50 and p99, and the maximum. Ratio: p99 ÷ p99 with N = 1 (same run).\n"
    ]
    optional = [
        ("first_worker_p50_ms", "first worker p50 ms"),
        ("published_p99_ms", "→ published p99 ms"),
        ("bus_p99_ms", "bus + apply p99 ms"),
        ("not_usable_everywhere", "not usable on all"),
    ]
    optional = [(k, h) for k, h in optional if any(k in r for r in rows)]
    base = None
    for r in rows:
        nk, k99 = _first_key(r, N_KEYS), _prefixed(r, "p99")
        if nk is not None and r[nk] == 1 and k99:
            base = r[k99]
    body = []
    for r in rows:
        nk, k50, k99 = _first_key(r, N_KEYS), _prefixed(r, "p50"), _prefixed(r, "p99")
        parts = []
        sp = (r.get("spread") or {}).get(k99 or "") if k99 else None
        if (p50s := _range(r.get("rep_p50_ms"))) and (p99s := _range(r.get("rep_p99_ms"))):
            n_reps = len(r["rep_p99_ms"])
            parts.append(f"p50 {p50s}, p99 {p99s} over {n_reps} reps")
        elif isinstance(sp, dict) and sp.get("values"):
            parts.append(
                f"p99 {num(sp.get('min'))}–{num(sp.get('max'))} over {len(sp['values'])} reps"
            )
        if isinstance(r.get("min_ms"), int | float) and isinstance(r.get("max_ms"), int | float):
            parts.append(f"all samples {num(r['min_ms'])}–{num(r['max_ms'])}")
        elif isinstance(r.get("max_ms"), int | float):
            parts.append(f"max {num(r['max_ms'])}")
        samples = r.get("samples", r.get("count", r.get("n_samples")))
        if isinstance(samples, int) and not isinstance(samples, bool):
            parts.append(f"{samples} samples")
        p99 = r.get(k99) if k99 else None
        body.append(
            [
                str(r.get(nk)) if nk else "?",
                stat(r, k50) if k50 else "—",
                stat(r, k99) if k99 else "—",
                "; ".join(parts) or "—",
                *(str(r[k]) if isinstance(r.get(k), int) else stat(r, k) for k, _ in optional),
                ratio(p99 / base if isinstance(p99, int | float) and base else None),
            ]
        )
    k99 = next((k for r in rows if (k := _prefixed(r, "p99"))), "p99_ms")
    unit = {"us": "µs", "s": "s", "ns": "ns"}.get(k99.rsplit("_", 1)[-1], "ms")
    out.append(
        table(
            [
                "workers N",
                f"p50 {unit}",
                f"p99 {unit}",
                "spread",
                *(h for _, h in optional),
                "p99 ÷ N=1",
            ],
            body,
        )
    )
    return out


def replication_md(results: dict[str, Any]) -> str:
    opened = _open_section(results, "replication", "Replication bus (`bench.replication`)")
    if opened is None:
        return ""
    res, out = opened
    data = res.get("data") or {}
    prop = data.get("propagation", [])
    if prop:
        base = next((p for p in prop if p["subscribers"] == 1), None)
        fwd = [p for p in data.get("propagation_forwarder") or [] if isinstance(p, dict)]
        runs = max((len(p.get("runs_p99_ms") or []) for p in [*prop, *fwd]), default=0)
        out.append(
            "Publisher.set() → applied in each subscriber process at 1000 updates/s"
            + (
                f"; the run with the median p99 of {runs} runs, and the range of the runs' "
                "p50 and p99"
                if runs > 1
                else ""
            )
            + (
                "; 'via forwarder': the subscribers behind one forwarder process "
                "(publisher CPU per update: direct / via forwarder)"
                if fwd
                else ""
            )
            + ". Ratio: p99 ÷ p99 with 1 subscriber (same run).\n"
        )
        direct = {p["subscribers"]: p for p in prop}

        def prow(p: dict[str, Any], label: str) -> list[str]:
            cells = [
                label,
                num(p.get("p50_ms")),
                num(p.get("p99_ms")),
                num(p.get("max_ms")),
                str(p.get("gaps")),
                ratio(p["p99_ms"] / base["p99_ms"] if base and base["p99_ms"] else None),
            ]
            if runs > 1:
                p50s, p99s = _range(p.get("runs_p50_ms")), _range(p.get("runs_p99_ms"))
                cells.append(f"p50 {p50s}, p99 {p99s}" if p50s and p99s else "—")
            if fwd:
                pub = p.get("publisher_cpu_us_per_update")
                d = direct.get(p["subscribers"], {}).get("publisher_cpu_us_per_update")
                cells.append(
                    f"{num(d)} / {num(pub)} µs" if p.get("via_forwarder") else f"{num(pub)} µs"
                )
            return cells

        head = ["subscribers", "p50 ms", "p99 ms", "max ms", "gaps", "p99 ÷ N=1"]
        head += ["runs' range ms"] if runs > 1 else []
        head += ["publisher CPU/update"] if fwd else []
        out.append(
            table(
                head,
                [prow(p, str(p["subscribers"])) for p in prop]
                + [prow(p, f"{p['subscribers']} via forwarder") for p in fwd if "p99_ms" in p],
            )
        )
    out += sa_propagation_md(data)
    snap = data.get("snapshot", [])
    if snap:
        base = snap[0]
        out.append(
            "Snapshot to a fresh subscriber; ready s: best (min–max) of the runs (other "
            "tenants of a shared machine only ever add time); ratio: seconds per record ÷ "
            "the smallest size.\n"
        )
        out.append(
            table(
                ["SA records", "ready s", "with process start s", "per-record ÷ smallest"],
                [
                    [
                        str(s["records"]),
                        _best_of(s),
                        num(s.get("wall_with_process_start_s")),
                        ratio(
                            (s["ready_s"] / s["records"]) / (base["ready_s"] / base["records"])
                            if base["ready_s"]
                            else None
                        ),
                    ]
                    for s in snap
                ],
            )
        )
    thr = data.get("throughput", [])
    if thr:
        out.append(
            table(
                ["subscribers", "target /s", "sent /s", "p99 ms", "gaps", "sustained"],
                [
                    [
                        str(t["subscribers"]),
                        str(t["rate_target"]),
                        num(t["rate_sent"]),
                        num(t["p99_ms"]),
                        str(t["gaps"]),
                        str(t.get("sustained")),
                    ]
                    for t in thr
                ],
            )
        )
    return "\n".join(out)


PROFILE_TITLE = "## Per-stage profile of one worker (`bench.profile`)\n"


def profile_md(results: dict[str, Any]) -> str:
    """The profile suite's section, written by ``bench.profile.markdown(data)``.
    That module is optional here: when it is missing, or its ``markdown()``
    raises, the section says so in one line instead of failing the report."""
    res = _step(results, "profile", "profile")
    if res is None:
        return ""
    note = _status_note(res, "profile")
    data = res.get("data")
    if res.get("status") != "ok" or not isinstance(data, dict):
        return "\n".join([PROFILE_TITLE, note or "**profile suite: no result**\n"])
    if data.get("skipped"):
        return "\n".join([PROFILE_TITLE, note or ""])
    try:  # import_module consults sys.modules, so a test can stand in for it
        profile = importlib.import_module("bench.profile")
    except Exception as exc:  # missing or broken: say so, keep the report
        return (
            f"{PROFILE_TITLE}\n**profile suite: not available** "
            f"(bench.profile: {exc.__class__.__name__}: {str(exc)[:200]})\n"
        )
    try:
        lines = [str(x) for x in profile.markdown(data)]
    except Exception as exc:
        return (
            f"{PROFILE_TITLE}\n**profile suite: failed to render** "
            f"(bench.profile.markdown: {exc.__class__.__name__}: {str(exc)[:200]})\n"
        )
    if not lines or not lines[0].startswith("#"):
        lines.insert(0, PROFILE_TITLE.rstrip("\n"))
    if note:  # a retried step: say so under the heading
        lines.insert(1, "\n" + note)
    return "\n".join(lines) + "\n"


def markdown(results: dict[str, Any]) -> str:
    m = results.get("machine", {})
    pk = m.get("packages", {})
    head = [
        f"# anywan benchmark — {results.get('date')}\n",
        f"Command: `{results.get('command')}` ({'quick' if results.get('quick') else 'full'} "
        f"run, {results.get('seconds')} s)\n",
        f"Machine: {m.get('cpu_model')}, {m.get('cores')} cores, "
        f"{(m.get('memory_bytes') or 0) / 2**30:.1f} GiB, Linux {m.get('kernel')}, "
        f"Python {m.get('python')}; load average before {results.get('loadavg_before')}, "
        f"after {results.get('loadavg_after')} (the machine is shared: only same-run "
        "ratios are comparable across runs).\n",
        "Versions: "
        + ", ".join(f"{k} {v}" for k, v in pk.items() if v)
        + f"; anywan {str(m.get('git_commit'))[:12]}"
        + (" (dirty)" if m.get("git_dirty") else "")
        + "\n",
    ]
    if results.get("interrupted"):
        head.append("**Interrupted**: only the suites below ran.\n")
    body = [
        throughput_md(results),
        failover_md(results),
        worker_md(results),
        pktrate_md(results),
        profile_md(results),
        codec_md(results),
        ike_md(results),
        replication_md(results),
    ]
    plots = results.get("plots") or []
    if plots:
        body.append("## Plots\n\n" + "\n".join(f"![{p}]({p})" for p in plots) + "\n")
    return "\n".join(head) + "\n" + "\n".join(b for b in body if b)
