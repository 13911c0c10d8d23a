"""Per-packet cost of the dataplane codecs: ``python -m bench.codec [--quick]``.

Prints ns/packet for every case as the median, min and max of several
repetitions (interleaved rounds: 7, or 3 with ``--quick``), and the ratio
(of the medians) to a bare ``AESGCM.encrypt`` of the same payload size measured in
the same run (rounds interleave all cases so drift hits them alike). Suites
register in ``SUITES``; each yields :class:`Case` objects, so another codec
(GRE, MSS clamp…) adds one function and one dict entry.

Targets (issue 3): ESP AES-GCM encap at 1400 B within 1.5× of the bare call;
AES-CBC + HMAC encap ≤ 6 µs at 1400 B on one core. The ``in-place`` rows are
the zero-copy calls (``encapsulate_in_place``, ``decapsulate(in_place=True)``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import cryptography
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

SIZES = (64, 1400)
"""Inner packet sizes in octets."""


@dataclass
class Case:
    """One thing to time: ``run()`` processes one packet."""

    suite: str
    name: str
    size: int
    op: str
    run: Callable[[], object]
    baseline: str = "bare-gcm128"
    """Key of the baseline case this one is divided by (same size)."""
    samples: list[float] = field(default_factory=list)


def _bare(size: int) -> Iterator[Case]:
    """The reference: one AESGCM.encrypt call, no ESP around it."""
    for bits in (128, 256):
        aead = AESGCM(bytes(range(bits // 8)))
        nonce, data, aad = bytes(12), bytes(size), bytes(8)

        def run(
            aead: AESGCM = aead, nonce: bytes = nonce, data: bytes = data, aad: bytes = aad
        ) -> object:
            return aead.encrypt(nonce, data, aad)

        yield Case("bare", f"bare-gcm{bits}", size, "encrypt", run, baseline=f"bare-gcm{bits}")


def esp_suite(size: int) -> Iterator[Case]:
    """ESP encap/decap for every Child SA transform (replay off, the seeds' mode),
    plus AES-GCM-128 decap with a 1024-packet anti-replay window."""
    from dataplane.esp import InboundSa, OutboundSa
    from replication.records import (
        AEAD_CIPHERS,
        CIPHER_KEY_BYTES,
        INTEG_KEY_BYTES,
        Cipher,
        Direction,
        Integ,
        SaRecord,
        TrafficSelector,
    )

    transforms = [
        (Cipher.AES128GCM16, Integ.NONE),
        (Cipher.AES256GCM16, Integ.NONE),
        (Cipher.AES128CBC, Integ.SHA256_128),
        (Cipher.AES256CBC, Integ.SHA256_128),
        (Cipher.AES128CBC, Integ.SHA1_96),
        (Cipher.AES256CBC, Integ.SHA1_96),
        (Cipher.NULL, Integ.SHA256_128),
        (Cipher.NULL, Integ.SHA1_96),
    ]
    ts = (TrafficSelector.from_network("0.0.0.0/0"),)
    inner = bytes([0x45]) + bytes(size - 1)
    for cipher, integ in transforms:
        for window in (0, 1024) if cipher is Cipher.AES128GCM16 else (0,):
            rec = SaRecord(
                account_id="bench", tunnel_id="0" * 32, spi=0x1000, direction=Direction.OUT,
                local_addr="192.0.2.1", remote_addr="198.51.100.1", udp_encap=False,
                local_port=0, remote_port=0, cipher=cipher, integ=integ,
                enc_key=bytes(CIPHER_KEY_BYTES[cipher]),
                salt=bytes(4) if cipher in AEAD_CIPHERS else b"",
                integ_key=bytes(INTEG_KEY_BYTES[integ]), replay_window=window,
                ts_local=ts, ts_remote=ts, child_id=1, generation=0,
                created=0, rekey_at=0, expire_at=0,
            )  # fmt: skip
            name = cipher.value if integ is Integ.NONE else f"{cipher.value}+{integ.value}"
            base = "bare-gcm256" if cipher is Cipher.AES256GCM16 else "bare-gcm128"
            out = OutboundSa.from_record(rec, worker_id=1)
            buf = bytearray(size + 128)
            if window == 0:

                def encap(out: OutboundSa = out, buf: bytearray = buf) -> object:
                    return out.encapsulate_into(buf, 0, inner, 4)

                yield Case("esp", name, size, "encap", encap, base)
                inb = InboundSa.from_record(rec)
                packet = out.encapsulate(inner, 4)

                def decap(inb: InboundSa = inb, packet: bytes = packet) -> object:
                    return inb.decapsulate(packet)

                yield Case("esp", name, size, "decap", decap, base)
                if cipher in AEAD_CIPHERS or (cipher, integ) in _IN_PLACE_TOO:
                    yield from _in_place_cases(name, size, base, out, inb, inner, buf)
            else:
                # Fresh sequence numbers each call: pre-encrypt a ring of packets
                # and feed them in order, so the window slides like in traffic;
                # each lap gets a new inbound SA (new window), built ahead.
                feed = _ReplayFeed(rec, [out.encapsulate(inner, 4) for _ in range(4096)])
                yield Case("esp", name + " replay=1024", size, "decap", feed.next, base)


def _in_place_cases(
    name: str, size: int, base: str, out: object, inb: object, inner: bytes, buf: bytearray
) -> Iterator[Case]:
    """The zero-copy variants a worker can use: ``encapsulate_in_place`` (the
    inner packet was read to ``payload_offset`` of the output buffer, e.g.
    straight from the TUN) and ``decapsulate(in_place=True)`` (plaintext over
    the ciphertext in the receive buffer). The decap case first copies the
    packet back into the buffer, standing in for ``recv_into``."""
    from dataplane.esp import InboundSa, OutboundSa

    assert isinstance(out, OutboundSa) and isinstance(inb, InboundSa)
    n = len(inner)
    buf[out.payload_offset : out.payload_offset + n] = inner

    def encap(out: OutboundSa = out, buf: bytearray = buf, n: int = n) -> object:
        return out.encapsulate_in_place(buf, 0, n, 4)

    yield Case("esp", name + " in-place", size, "encap", encap, base)
    wire = out.encapsulate(inner, 4)
    rx = bytearray(wire)
    view = memoryview(rx)

    def decap(inb: InboundSa = inb, view: memoryview = view, wire: bytes = wire) -> object:
        view[:] = wire
        return inb.decapsulate(view, True)

    yield Case("esp", name + " in-place", size, "decap", decap, base)


_IN_PLACE_TOO = {("aes128", "sha256_128"), ("null", "sha256_128")}
"""Non-AEAD transforms that also get in-place rows (one CBC, one NULL)."""


class _ReplayFeed:
    """Decapsulates a ring of in-order packets, one per call."""

    __slots__ = ("_i", "_rec", "_ring", "_sa")

    def __init__(self, rec: object, ring: list[bytes]) -> None:
        from dataplane.esp import InboundSa
        from replication.records import SaRecord

        assert isinstance(rec, SaRecord)
        self._rec, self._ring, self._i = rec, ring, 0
        self._sa = InboundSa.from_record(rec)

    def next(self) -> object:
        i = self._i
        if i == len(self._ring):
            from dataplane.esp import InboundSa

            self._sa = InboundSa.from_record(self._rec)  # amortised over 4096 packets
            i = 0
        self._i = i + 1
        return self._sa.decapsulate(self._ring[i])


def gre_suite(size: int) -> Iterator[Case]:
    """GRE encap/decap (RFC 2784/2890) and the per-packet IP helpers of the
    GRE/IP path, as a ratio to a bare copy of the same bytes (the one copy a
    GRE encap cannot avoid) measured in the same rounds."""
    import struct

    from dataplane import gre, ip
    from dataplane.mss import clamp_mss

    a, b = bytes([10, 0, 0, 1]), bytes([10, 1, 0, 1])
    tcp = bytearray(size)  # IPv4 + TCP ACK with consistent lengths
    struct.pack_into("!BBHHHBBH4s4sHHIIBBHHH", tcp, 0, 0x45, 0, size, 1, 0, 64, 6, 0, a, b,
                     40000, 443, 1, 1, 0x50, 0x10, 65535, 0, 0)  # fmt: skip
    syn = bytearray(44)  # IPv4 + TCP SYN carrying MSS 1460
    struct.pack_into("!BBHHHBBH4s4sHHIIBBHHHI", syn, 0, 0x45, 0, 44, 1, 0, 64, 6, 0, a, b,
                     40000, 443, 1, 0, 0x60, 0x02, 65535, 0, 0, 0x020405B4)  # fmt: skip
    out = bytearray(size + 64)

    def copy() -> object:
        out[20 : 20 + size] = tcp
        return None

    yield Case("bare", "bare-copy", size, "copy", copy, baseline="bare-copy")
    for name, key, seq, csum in (
        ("gre", None, None, False),
        ("gre key", 0x1234, None, False),
        ("gre key+seq+csum", 0x1234, 7, True),
    ):

        def encap(key: int | None = key, seq: int | None = seq, csum: bool = csum) -> object:
            return gre.encapsulate_into(out, 20, tcp, 0x0800, key=key, seq=seq, checksum=csum)

        wire = bytearray(size + 64)
        view = memoryview(wire)[: gre.encapsulate_into(wire, 0, tcp, 0x0800, key=key, seq=seq,
                                                        checksum=csum)]  # fmt: skip
        yield Case("gre", name, size, "encap", encap, "bare-copy")

        def decap(v: memoryview = view) -> object:
            return gre.decapsulate(v)

        yield Case("gre", name, size, "decap", decap, "bare-copy")
    yield Case("gre", "gre key, header only", size, "encap",
               lambda: gre.write_header(out, 20, 0x0800, size, key=1), "bare-copy")  # fmt: skip
    yield Case("gre", "parse_flow v4 tcp", size, "flow", lambda: ip.parse_flow(tcp), "bare-copy")
    yield Case("gre", "clamp_mss non-SYN", size, "mss", lambda: clamp_mss(tcp, 1360, 1340),
               "bare-copy")  # fmt: skip

    def clamp() -> object:
        syn[42:44] = b"\x05\xb4"  # back to 1460, so every call clamps
        return clamp_mss(syn, 1360, 1340)

    yield Case("gre", "clamp_mss SYN 1460->1360", size, "mss", clamp, "bare-copy")
    yield Case("gre", "apply_ecn_decap ECT(0) outer", size, "ecn",
               lambda: ip.apply_ecn_decap(tcp, 0b10), "bare-copy")  # fmt: skip
    frozen, gw = bytes(tcp), bytes([10, 9, 9, 9])
    if size > 576:
        yield Case("gre", "fragment_ipv4 to 576", size, "pmtu",
                   lambda: ip.fragment_ipv4(frozen, 576), "bare-copy")  # fmt: skip
    yield Case("gre", "icmp_frag_needed", size, "pmtu",
               lambda: ip.icmp_frag_needed(frozen, 1280, gw), "bare-copy")  # fmt: skip


SUITES: dict[str, Callable[[int], Iterator[Case]]] = {"esp": esp_suite, "gre": gre_suite}
"""Benchmark suites by name; each yields the cases for one inner size."""


def spread(samples: list[float]) -> dict[str, Any]:
    """min, max and every value of a case's rounds (ns/packet); the row's
    ``ns_per_packet`` is their median, the ratio is median ÷ anchor median."""
    return {
        "min": round(min(samples), 1),
        "max": round(max(samples), 1),
        "values": [round(x, 1) for x in samples],
    }


def measure(cases: list[Case], *, iterations: int, rounds: int) -> None:
    """Interleaved rounds: each round times every case once (``iterations`` calls)."""
    clock = time.perf_counter_ns
    for case in cases:  # warm up: allocations, caches, lazy imports
        for _ in range(min(iterations, 200)):
            case.run()
    for _ in range(rounds):
        for case in cases:
            run = case.run
            start = clock()
            for _ in range(iterations):
                run()
            case.samples.append((clock() - start) / iterations)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.codec", description=(__doc__ or "").split("\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="few iterations (smoke test)")
    parser.add_argument("--suite", action="append", choices=sorted(SUITES), help="default: all")
    parser.add_argument("--iterations", type=int, help="calls per case per round")
    parser.add_argument(
        "--rounds", type=int, help="repetitions (default 7, --quick 3); median, min, max reported"
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args(argv)
    iterations = args.iterations or (200 if args.quick else 20_000)
    rounds = args.rounds or (3 if args.quick else 7)
    cases: list[Case] = []
    for size in SIZES:
        cases.extend(_bare(size))
        for suite in args.suite or sorted(SUITES):
            cases.extend(SUITES[suite](size))
    measure(cases, iterations=iterations, rounds=rounds)
    base = {(c.name, c.size): statistics.median(c.samples) for c in cases if c.suite == "bare"}
    rows: list[dict[str, Any]] = []
    for c in cases:
        ns = statistics.median(c.samples)
        rows.append({"suite": c.suite, "case": c.name, "size": c.size, "op": c.op,
                     "ns_per_packet": round(ns, 1),
                     "ratio": round(ns / base[(c.baseline, c.size)], 2),
                     "baseline": c.baseline, "repetitions": len(c.samples),
                     "spread": {"ns_per_packet": spread(c.samples)}})  # fmt: skip
    meta = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "python": platform.python_version(),
        "cryptography": cryptography.__version__,
        "machine": platform.machine(),
        "iterations": iterations,
        "rounds": rounds,
    }
    if args.json:
        json.dump({"meta": meta, "rows": rows}, sys.stdout, indent=1)
        print()
        return 0
    print(" ".join(f"{k}={v}" for k, v in meta.items()))
    print(f"{'suite':<6} {'case':<28} {'size':>5} {'op':<8} {'ns/pkt':>9} {'min–max':>13} "
          f"{'× bare':>7}  baseline")  # fmt: skip
    for r in rows:
        sp = r["spread"]["ns_per_packet"]
        print(f"{r['suite']:<6} {r['case']:<28} {r['size']:>5} {r['op']:<8} "
              f"{r['ns_per_packet']:>9.0f} {sp['min']:>6.0f}–{sp['max']:<6.0f} "
              f"{r['ratio']:>7.2f}  {r['baseline']}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
