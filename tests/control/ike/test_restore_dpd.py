"""The first DPDs (RFC 7296 §2.4) of IKE SAs restored after a control restart
are spread over one DPD interval, never later than one interval after the
restore: thousands of SAs restored at one instant must not all send their
empty INFORMATIONAL (and retransmit it) together.

Three ways the SAs come back: all re-based on the restore instant (a blob, or
rows without a write time); each re-based on the time its row was written, as
``ControlService.restore_ike_state`` does (already spread: must not get worse);
rows all older than the interval (the node was down longer than that).
"""

from __future__ import annotations

import random
from typing import Any

import msgpack

from control.ike.engine import IkeConfig, IkeEngine

from .pair import make_lookup, make_pair

N = 200
RESTORE = 5000.0
"""The restored engine's clock at the restore (a new process, a new clock)."""
INTERVAL = IkeConfig().dpd_interval


def template() -> dict[str, Any]:
    """One established responder IKE SA (with its Child SA) as export_state has it."""
    p = make_pair()
    p.connect()
    (sa,) = msgpack.unpackb(p.server.export_state(), raw=False)["sas"]
    return sa  # type: ignore[no-any-return]


def copies(n: int, seed: int = 7) -> list[dict[str, Any]]:
    """``n`` copies of the template, each with its own (seeded) SPIs and tunnel."""
    rng = random.Random(seed)
    base = template()
    out = []
    for i in range(n):
        d = dict(base)
        d["spi"] = [rng.randbytes(8), rng.randbytes(8)]
        d["tunnel"] = list(base["tunnel"])
        d["tunnel"][1] = f"{i:032x}"
        out.append(d)
    return out


def blob(sas: list[dict[str, Any]]) -> bytes:
    packed: bytes = msgpack.packb({"v": IkeEngine.STATE_VERSION, "sas": sas}, use_bin_type=True)
    return packed


def fresh() -> IkeEngine:
    return IkeEngine(IkeConfig(strict=True), make_lookup([]))


def first_dpds(engine: IkeEngine, until: float) -> dict[bytes, float]:
    """Drive the engine's timers (no peer answers) from RESTORE up to ``until``,
    as the transport does (a deadline already past runs now); when each IKE SA
    (by our SPI) first sent a DPD request."""
    sent: dict[bytes, float] = {}
    while (deadline := engine.get_timer()) is not None and deadline <= until:
        t = max(deadline, RESTORE)
        engine.handle_timer(t)
        out = engine.datagrams_to_send()
        for spi, sa in engine.sas.items():
            req = sa.pending
            if req is not None and req.kind == "dpd" and spi not in sent:
                assert req.sent_at == t
                sent[spi] = t
        assert len(out) >= sum(1 for v in sent.values() if v == t)
    return sent


def tenths(times: list[float]) -> list[int]:
    """How many of ``times`` fall in each tenth of (RESTORE, RESTORE + INTERVAL]."""
    counts = [0] * 10
    for t in times:
        counts[min(9, max(0, int((t - RESTORE) / (INTERVAL / 10))))] += 1
    return counts


def assert_spread(sent: dict[bytes, float]) -> None:
    times = sorted(sent.values())
    assert len(times) == N
    # (a) the liveness check is not weakened: every SA is checked within one
    # interval of the restore ...
    assert times[-1] <= RESTORE + INTERVAL
    # ... and none in a burst at the restore instant itself
    assert times[0] > RESTORE
    # (b) spread: 20 per tenth expected; more than 50 (25 %) in a tenth would be
    # ~7 standard deviations for 200 uniform phases, while a herd puts all 200
    # in one tenth
    assert max(tenths(times)) <= N // 4, tenths(times)


def test_sas_restored_at_one_instant_spread_their_first_dpd() -> None:
    sas = copies(N)
    engine = fresh()
    engine.import_state(blob(sas), RESTORE)
    assert len(engine.ike_sas()) == N
    sent = first_dpds(engine, RESTORE + INTERVAL + 1)
    assert_spread(sent)
    # deterministic (a hash of the SPIs, no random): a second restore of the
    # same state sends at the same times
    again = fresh()
    again.import_state(blob(sas), RESTORE)
    assert first_dpds(again, RESTORE + INTERVAL + 1) == sent


def test_rows_rebased_on_their_write_time_keep_their_schedule() -> None:
    """As the control service restores: each row re-based on when it was
    written, roughly when its SA last exchanged a message, so their DPDs are
    spread already. The spreading must not pull any of them into a burst at
    the restore (it may only move a DPD earlier, within the interval)."""
    sas = copies(N, seed=8)
    engine = fresh()
    age = {}
    for i, d in enumerate(sas):
        age[d["spi"][1]] = 1.0 + i * (INTERVAL - 2.0) / N  # written 1 s … 29 s ago
        engine.import_state(blob([d]), RESTORE - age[d["spi"][1]])
    sent = first_dpds(engine, RESTORE + INTERVAL + 1)
    assert_spread(sent)
    for spi, t in sent.items():
        assert t <= RESTORE - age[spi] + INTERVAL  # never later than its own schedule


def test_rows_older_than_the_interval_spread_too() -> None:
    """The node was down longer than the DPD interval: every restored SA is
    overdue. Checked within one interval of the restore, spread, not all in
    the first timer run."""
    sas = copies(N, seed=9)
    engine = fresh()
    for i, d in enumerate(sas):
        engine.import_state(blob([d]), RESTORE - 2 * INTERVAL - i * 0.01)
    assert_spread(first_dpds(engine, RESTORE + INTERVAL + 1))


def test_a_restored_pending_request_is_still_retransmitted_at_once() -> None:
    """Unchanged: a request in flight at the export is re-sent at the first
    timer run after the restore (§2.1), not spread."""
    d = copies(1, seed=10)[0]
    d["pending"] = ["dpd", 37, d["mid"][1], b"\x00" * 60]
    d["mid"] = [d["mid"][0], d["mid"][1] + 1, d["mid"][2]]
    engine = fresh()
    engine.import_state(blob([d]), RESTORE)
    assert engine.get_timer() == RESTORE
    engine.handle_timer(RESTORE)
    assert len(engine.datagrams_to_send()) == 1


def test_a_restored_sa_heard_from_before_its_first_timer_keeps_the_normal_schedule() -> None:
    """A message from the peer after the restore is a real ``last_heard``: no
    spreading then, the DPD comes one interval after it, not earlier."""
    from control.ike.messages import decode
    from control.ike.payloads import ExchangeType

    from .pair import TUNNEL, server_tunnel

    p = make_pair(client_config=IkeConfig(strict=True, dpd_interval=1e6))
    p.connect()
    state = p.server.export_state()
    p.server = IkeEngine(IkeConfig(strict=True), make_lookup([server_tunnel()]))
    p.now += 5000.0
    p.server.import_state(state, p.now)
    heard = p.now
    assert p.client.send_dpd(TUNNEL, p.now)
    p.roundtrip()
    since = len(p.captured)

    def server_requests() -> int:
        return sum(
            1
            for to_server, d in p.captured[since:]
            if not to_server
            and decode(d).header.exchange == ExchangeType.INFORMATIONAL
            and not decode(d).header.is_response
        )

    p.step(INTERVAL - 0.5)
    assert server_requests() == 0
    assert p.now < heard + INTERVAL
    p.step(1.0)
    assert server_requests() == 1
