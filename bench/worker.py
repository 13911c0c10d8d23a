"""The worker's per-packet path from memory: ``python -m bench.worker [--quick]``.

Drives :class:`dataplane.worker.Dataplane` — the exact code the packet loop
runs per packet (flow parse, per-account route lookup with ECMP hash, SA
choice by selectors, MTU check, encapsulation; or SPI lookup, decryption,
selector and account checks) — with in-memory packets and no-op senders, so
the numbers exclude the kernel (TUN and socket syscalls).

For each of AES-256-GCM, AES-CBC-256 + HMAC-SHA-256-128 and GRE, at 64 B and
1400 B inner packets, it reports encap and decap in packets/s and Gbit/s
(inner bytes), and the ratio of the worker path's cost to the bare codec call
(``OutboundSa.encapsulate_into`` / ``InboundSa.decapsulate`` /
``gre.encapsulate_into`` / ``gre.decapsulate``) measured in the same run,
interleaved in rounds so machine noise hits both alike.

``--workers 2`` additionally runs the encap loop in two processes at once and
reports the aggregate against one process (the 2-core scaling ceiling of the
per-packet work, without the kernel).
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from dataplane import esp, gre
from dataplane.worker import AccountNet, Dataplane
from replication.records import (
    Cipher,
    Direction,
    Integ,
    RouteRecord,
    SaRecord,
    TrafficSelector,
    TunnelKind,
    TunnelRecord,
)

ACCOUNT = "bench"
TID = "0" * 31 + "1"
LOCAL, REMOTE = "192.0.2.1", "198.51.100.2"
ANY = (TrafficSelector.from_network("0.0.0.0/0"),)
SIZES = (64, 1400)
KINDS = ("aes256gcm", "aes256cbc-sha256", "gre")


def _sa(direction: Direction, kind: str) -> SaRecord:
    gcm = kind == "aes256gcm"
    return SaRecord(
        account_id=ACCOUNT, tunnel_id=TID, spi=0x1000, direction=direction,
        local_addr=LOCAL, remote_addr=REMOTE, udp_encap=False, local_port=0, remote_port=0,
        cipher=Cipher.AES256GCM16 if gcm else Cipher.AES256CBC,
        integ=Integ.NONE if gcm else Integ.SHA256_128,
        enc_key=bytes(range(32)), salt=b"salt" if gcm else b"",
        integ_key=b"" if gcm else bytes(range(32, 64)), replay_window=0,
        ts_local=ANY, ts_remote=ANY, child_id=1, generation=0, created=0.0,
        rekey_at=0.0, expire_at=0.0,
    )  # fmt: skip


def _inner(size: int) -> bytearray:
    """An IPv4/UDP packet of ``size`` octets from 10.1.0.2 to 10.2.0.1."""
    from dataplane import ip

    pkt = bytearray(size)
    ip.write_ipv4_header(
        pkt, 0, src=bytes([10, 1, 0, 2]), dst=bytes([10, 2, 0, 1]), proto=17,
        payload_len=size - 20,
    )  # fmt: skip
    ip.write_udp_header(pkt, 20, sport=40000, dport=5201, payload_len=size - 28)
    return pkt


class Sink:
    def __init__(self) -> None:
        self.n = 0

    def send(self, data: memoryview, dest: tuple[str, int], anc: object = None) -> None:
        self.n += 1

    def write(self, data: memoryview) -> None:
        self.n += 1


def build(kind: str, size: int) -> dict[str, Callable[[], object]]:
    """Four callables processing one packet each: worker/bare × encap/decap."""
    sink = Sink()
    dp = Dataplane(
        inbound_factory=esp.InboundSa.from_record,
        outbound_factory=lambda r: esp.OutboundSa.from_record(r, worker_id=0),
        send_esp=sink.send, send_udp=sink.send, send_gre=sink.send,
    )  # fmt: skip
    is_gre = kind == "gre"
    trec = TunnelRecord(
        account_id=ACCOUNT, tunnel_id=TID, kind=TunnelKind.GRE if is_gre else TunnelKind.IPSEC,
        name="bench", local_addr=LOCAL, remote_addr=REMOTE, interface_address="10.100.0.0/31",
        mtu=9000,
    )  # fmt: skip
    dp.apply(trec.key, trec)
    rrec = RouteRecord(account_id=ACCOUNT, route_id="0" * 32, prefix="10.2.0.0/24", tunnel_id=TID)
    dp.apply(rrec.key, rrec)
    net = AccountNet(ACCOUNT, sink.write)
    dp.attach_account(net)
    inner = _inner(size)
    inner_view = memoryview(inner)
    out = bytearray(size + 512)
    if is_gre:
        n = gre.encapsulate_into(out, 0, inner, gre.ETH_P_IP)
        gre_pkt = memoryview(bytes(out[:n]))

        def bare_encap() -> object:
            return gre.encapsulate_into(out, 0, inner_view, gre.ETH_P_IP)

        def bare_decap() -> object:
            return gre.decapsulate(gre_pkt)

        def worker_decap() -> object:
            dp.inbound_gre(gre_pkt, LOCAL, REMOTE)
            return None
    else:
        for d in (Direction.IN, Direction.OUT):
            rec = _sa(d, kind)
            dp.apply(rec.key, rec)
        bare_out = esp.OutboundSa.from_record(_sa(Direction.OUT, kind), worker_id=1)
        bare_in = esp.InboundSa.from_record(_sa(Direction.IN, kind))
        n = bare_out.encapsulate_into(out, 0, inner, 4)
        esp_pkt = memoryview(bytes(out[:n]))

        def bare_encap() -> object:
            return bare_out.encapsulate_into(out, 0, inner_view, 4)

        def bare_decap() -> object:
            return bare_in.decapsulate(esp_pkt)

        def worker_decap() -> object:
            dp.inbound_esp(esp_pkt)
            return None

    def worker_encap() -> object:
        dp.outbound(net, inner_view)
        return None

    # sanity: the worker path really delivered, no drops
    worker_encap()
    worker_decap()
    dropped = {r.value: c for r, c in dp.drops.items() if c}
    if dropped or sink.n != 2:
        raise RuntimeError(f"bench setup broken for {kind}/{size}: drops {dropped}")
    return {
        "worker-encap": worker_encap,
        "bare-encap": bare_encap,
        "worker-decap": worker_decap,
        "bare-decap": bare_decap,
    }


def _time(fn: Callable[[], object], n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def _spread(values: list[float]) -> dict[str, Any]:
    """min / max / every value of a row's rounds (``bench.report.stat``)."""
    return {"min": min(values), "max": max(values), "values": values}


def run(quick: bool) -> list[dict[str, Any]]:
    n = 2000 if quick else 20000
    rounds = 3 if quick else 7
    cases = {(k, s): build(k, s) for k in KINDS for s in SIZES}
    samples: dict[tuple[str, int, str], list[float]] = {}
    for _ in range(rounds):
        for (k, s), fns in cases.items():
            for name, fn in fns.items():
                samples.setdefault((k, s, name), []).append(_time(fn, n))
    rows = []
    for k in KINDS:
        for s in SIZES:
            for op in ("encap", "decap"):
                ws = samples[(k, s, f"worker-{op}")]
                w = statistics.median(ws)
                b = statistics.median(samples[(k, s, f"bare-{op}")])
                kpps = [round(1e-3 / x, 1) for x in ws]
                rows.append(
                    {
                        "kind": k,
                        "size": s,
                        "op": op,
                        "worker_ns": round(w * 1e9),
                        "bare_ns": round(b * 1e9),
                        "kpps": round(1e-3 / w, 1),
                        "gbit_s": round(s * 8 / w / 1e9, 3),
                        "ratio_to_bare": round(w / b, 2),
                        "repetitions": rounds,
                        "spread": {
                            "worker_ns": _spread([round(x * 1e9) for x in ws]),
                            "kpps": _spread(kpps),
                        },
                    }
                )
    return rows


def _proc(kind: str, size: int, n: int, q: Any) -> None:
    fn = build(kind, size)["worker-encap"]
    fn()
    q.put(_time(fn, n))


def scaling(kind: str, size: int, n: int) -> dict[str, Any]:
    """Aggregate pps of 1 and of 2 processes running the encap loop at once."""
    ctx = multiprocessing.get_context("fork")
    result = {}
    for procs in (1, 2):
        q = ctx.Queue()
        ps = [ctx.Process(target=_proc, args=(kind, size, n, q)) for _ in range(procs)]
        for p in ps:
            p.start()
        per = [q.get(timeout=120) for _ in ps]
        for p in ps:
            p.join(30)
        result[procs] = sum(1 / t for t in per)
    return {
        "kind": kind,
        "size": size,
        "kpps_1": round(result[1] / 1e3, 1),
        "kpps_2": round(result[2] / 1e3, 1),
        "ratio_2_to_1": round(result[2] / result[1], 2),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.worker", description=__doc__)
    p.add_argument("--quick", action="store_true", help="fewer packets (smoke test)")
    p.add_argument("--workers", type=int, default=1, choices=(1, 2))
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = p.parse_args(argv)
    rows = run(args.quick)
    scale = []
    if args.workers == 2:
        n = 5000 if args.quick else 50000
        scale = [scaling("aes256gcm", s, n) for s in SIZES]
    meta = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "quick": args.quick,
    }
    if args.json:
        print(json.dumps({"meta": meta, "rows": rows, "scaling": scale}, indent=1))
        return 0
    print(f"# bench.worker {meta['date']} python {meta['python']} quick={args.quick}")
    print(
        f"{'kind':<18}{'size':>6}{'op':>7}{'ns/pkt':>9}{'bare ns':>9}"
        f"{'kpps':>9}{'Gbit/s':>9}{'x bare':>8}"
    )
    for r in rows:
        print(
            f"{r['kind']:<18}{r['size']:>6}{r['op']:>7}{r['worker_ns']:>9}{r['bare_ns']:>9}"
            f"{r['kpps']:>9}{r['gbit_s']:>9}{r['ratio_to_bare']:>8}"
        )
    for s in scale:
        print(
            f"scaling {s['kind']} {s['size']} B encap: 1 proc {s['kpps_1']} kpps, "
            f"2 procs {s['kpps_2']} kpps ({s['ratio_2_to_1']}x)"
        )
    return 0


# --------------------------------------------------------------------------
# --network: two real worker processes back to back, TCP through them
# --------------------------------------------------------------------------


def network(seconds: float, udp_encap: bool) -> dict[str, Any]:
    """iperf3 TCP from account netns A → worker A → ESP → worker B → netns B.

    Both ends are anywan workers (mirrored SAs from state files, AES-256-GCM),
    one process each, on this machine's two cores: the number is the
    throughput of the full loop (TUN read, encrypt, socket send; socket
    receive, decrypt, TUN write) including the kernel, end to end.
    """
    import os
    import subprocess
    import tempfile
    from pathlib import Path

    import msgpack

    from deploy.netns import Topology, cleanup_prefix
    from replication.records import encode

    prefix = "awt-x-bench-"
    cleanup_prefix(prefix)
    tmp = Path(tempfile.mkdtemp(prefix="awt-x-bench-"))
    k_ab, k_ba, s_ab, s_ba = os.urandom(32), os.urandom(32), os.urandom(4), os.urandom(4)

    def sa_rec(spi: int, d: Direction, key: bytes, salt: bytes, local: str, remote: str) -> Any:
        return SaRecord(
            account_id=ACCOUNT, tunnel_id=TID, spi=spi, direction=d, local_addr=local,
            remote_addr=remote, udp_encap=udp_encap, local_port=4500 if udp_encap else 0,
            remote_port=4500 if udp_encap else 0, cipher=Cipher.AES256GCM16, integ=Integ.NONE,
            enc_key=key, salt=salt, integ_key=b"", replay_window=0, ts_local=ANY,
            ts_remote=ANY, child_id=1, generation=0, created=0.0, rekey_at=0.0, expire_at=0.0,
        )  # fmt: skip

    def state(me: str, peer: str, prefix_peer: str, spi_in: int, spi_out: int, kin: bytes,
              sin: bytes, kout: bytes, sout: bytes) -> Path:  # fmt: skip
        recs = [
            TunnelRecord(
                account_id=ACCOUNT,
                tunnel_id=TID,
                kind=TunnelKind.IPSEC,
                name="b",
                local_addr=me,
                remote_addr=peer,
                interface_address="10.100.0.0/31",
                mtu=1400,
            ),
            RouteRecord(account_id=ACCOUNT, route_id="0" * 32, prefix=prefix_peer, tunnel_id=TID),
            sa_rec(spi_in, Direction.IN, kin, sin, me, peer),
            sa_rec(spi_out, Direction.OUT, kout, sout, me, peer),
        ]
        path = tmp / f"{me}.msgpack"
        path.write_bytes(msgpack.packb([[r.key, encode(r)] for r in recs]))
        return path

    a_state = state("192.0.2.1", "192.0.2.2", "10.2.0.0/24", 0x1001, 0x2001, k_ba, s_ba, k_ab, s_ab)
    b_state = state("192.0.2.2", "192.0.2.1", "10.1.0.0/24", 0x2001, 0x1001, k_ab, s_ab, k_ba, s_ba)
    topo = Topology(prefix)
    try:
        a, b = topo.namespace("a"), topo.namespace("b")
        topo.veth(a, "ab", b, "ba", addr_a="172.30.0.1/24", addr_b="172.30.0.2/24")
        a.addr("lo", "192.0.2.1/32")
        b.addr("lo", "192.0.2.2/32")
        a.route("192.0.2.2/32", via="172.30.0.2")
        b.route("192.0.2.1/32", via="172.30.0.1")
        procs = []
        for ns, st, side in ((a, a_state, "a"), (b, b_state, "b")):
            procs.append(
                topo.root.popen(
                    [
                        sys.executable,
                        "-m",
                        "dataplane.cli",
                        "--netns",
                        str(ns.name),
                        "--anycast",
                        "192.0.2.1" if side == "a" else "192.0.2.2",
                        "--state-file",
                        str(st),
                        "--run-dir",
                        str(tmp / f"run-{side}"),
                        "--netns-template",
                        prefix + side + "-{account}",
                        "--metrics-port",
                        "0",
                        "--log-level",
                        "WARNING",
                    ],
                    stdout=subprocess.DEVNULL,
                )
            )
        from dataplane import tun

        end = time.monotonic() + 15
        while time.monotonic() < end and not all(
            tun.device_exists("aw0", netns_name=f"{prefix}{s}-{ACCOUNT}") for s in "ab"
        ):
            time.sleep(0.1)
        from deploy.netns import Namespace

        acct_a = Namespace(topo, f"{prefix}a-{ACCOUNT}")
        acct_b = Namespace(topo, f"{prefix}b-{ACCOUNT}")
        topo.namespaces["acct-a"], topo.namespaces["acct-b"] = acct_a, acct_b
        acct_a.addr("lo", "10.1.0.1/32")
        acct_b.addr("lo", "10.2.0.1/32")
        time.sleep(0.5)
        server = acct_b.popen(["iperf3", "-s", "-1", "-B", "10.2.0.1"], stdout=subprocess.DEVNULL)
        time.sleep(0.5)
        res = acct_a.run(
            ["iperf3", "-c", "10.2.0.1", "-B", "10.1.0.1", "-t", str(seconds), "-J"],
            check=False,
            timeout=seconds + 30,
        )
        topo.stop(server, grace=0.5)
        data = json.loads(res.stdout) if res.stdout.strip().startswith("{") else {}
        end_ = data.get("end", {})
        bps = end_.get("sum_received", {}).get("bits_per_second", 0.0)
        retr = end_.get("sum_sent", {}).get("retransmits")
        return {
            "mode": "esp-in-udp" if udp_encap else "esp",
            "cipher": "aes256gcm",
            "gbit_s": round(bps / 1e9, 3),
            "retransmits": retr,
            "error": data.get("error") or (res.stderr.strip()[-200:] if not bps else None),
        }
    finally:
        topo.close()
        cleanup_prefix(prefix)
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


def network_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.worker --network")
    p.add_argument("--network", action="store_true")
    p.add_argument("--seconds", type=float, default=5.0)
    args = p.parse_args(argv)
    for udp in (False, True):
        print(json.dumps(network(args.seconds, udp)))
    return 0


if __name__ == "__main__":
    sys.exit(network_main(sys.argv[1:]) if "--network" in sys.argv else main())
