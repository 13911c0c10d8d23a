"""``anywan-control``'s glue: store + API + publisher + IKE engine in one process.

Order of every change (issue 7, "nothing half-applied"): the API's SQLite
transaction commits first, then :meth:`ControlService.committed` turns the
change into replication records and publishes them. On startup everything in
the store — tunnels, routes and the persisted (sealed) Child SA records — is
republished, and bus keys the store no longer has are tombstoned, so a
restarted control converges the workers without wiping live SAs.

IKE glue: the engine's ``lookup`` is :meth:`ControlService.lookup` (peer ID →
:class:`TunnelAuth` with the decrypted PSK, read from the store on every
handshake so a regenerated PSK takes effect for the next negotiation), and
engine events come to :meth:`ControlService.on_ike_event`:

* ``ChildSaInstalled``/``ChildSaUpdated`` → sealed into the store, then
  ``publisher.set(inbound)``, ``publisher.set(outbound)``;
* ``ChildSaDeleted`` → tombstones; for a rekey (``reason == "rekeyed"``) only
  after every live worker acknowledged the replacing SA (make-before-break,
  bounded by ``rekey_apply_timeout``);
* every ``IkeSa*``/``ChildSa*`` event marks the IKE SAs it touched; their
  sealed rows (one per IKE SA, ``ike/sa/<our SPI>``) are written in the next
  loop turn, after the flush's Child SA records are on the bus
  (:meth:`ControlService.persist_ike_state`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from aiohttp import web

from control.api.app import create_app, metrics_response
from control.api.handlers import Api, Changes
from control.api.openapi import build_openapi
from control.config import ControlConfig, split_hostport
from control.metrics import ControlMetrics
from control.store import Store, StoreError
from replication.records import (
    Direction,
    Record,
    RecordError,
    ReplayCheckpoint,
    RouteRecord,
    SaRecord,
    SeqCheckpoint,
    TunnelKind,
    TunnelRecord,
    WorkerRecord,
    decode,
    encode,
)

log = logging.getLogger("anywan.control")

SA_PREFIX = "sa/"
HELD_PREFIX = "held/"
"""A held outbound SA record (``hold_outbound``: the peer's rekey, until it
deletes the old Child SA) is sealed under ``held/<its key>``, not its key, so
that a restart does not publish it with the rest of the store; it moves to
its key when released (:meth:`ControlService._settle_held_outbound`)."""
OWNED_PREFIXES = ("tunnel/", "route/", "sa/")
ANSWER_HOLD = 0.5
"""Seconds an IKE message that creates a Child SA waits for every worker to
acknowledge the SA before it is sent anyway (see ``_answer_after_apply``)."""
STORE_ERRORS = (sqlite3.Error, StoreError, OSError)
"""What a failing store raises (locked, read-only, disk full, I/O error)."""


class PublisherLike(Protocol):
    """``replication.publisher.Publisher`` as the glue uses it (see the contracts)."""

    sequence: int

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def set(self, record: Record) -> int: ...
    def delete(self, key: str) -> int: ...
    def get(self, key: str) -> Record | None: ...
    def items(self) -> dict[str, Record]: ...
    def applied_everywhere(self, seq: int) -> bool: ...
    async def wait_applied(self, seq: int, timeout: float) -> bool: ...
    def subscribers(self) -> list[Any]: ...


def _thread_died(component: Any) -> bool:
    """True if ``component`` (``Publisher``, ``RelayServer``) was started and
    its socket thread has exited: then nothing is published or relayed any
    more. Duck-typed: test doubles without the property are never reported."""
    return getattr(component, "thread_died", False) is True


def _expired(sa: SaRecord, unix_now: float) -> bool:
    """Past its hard lifetime (``expire_at`` 0: none); workers drop it then."""
    return 0 < sa.expire_at <= unix_now


def _plural(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def _iso(unix: float) -> str | None:
    if not unix:
        return None
    return datetime.fromtimestamp(unix, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def tunnel_record(row: dict[str, Any]) -> TunnelRecord:
    """The bus record of a stored tunnel row; the two kinds name their outer
    endpoints differently, as Magic WAN's API does."""
    extra: dict[str, Any]
    if row["kind"] == "ipsec":
        kind, local, remote = TunnelKind.IPSEC, "cloudflare_endpoint", "customer_endpoint"
        extra = {k: row[k] for k in ("replay_protection", "allow_null_cipher")}
    else:
        kind, local, remote = TunnelKind.GRE, "cloudflare_gre_endpoint", "customer_gre_endpoint"
        extra = {"ttl": row["ttl"]}
    return TunnelRecord(
        account_id=row["account_id"],
        tunnel_id=row["id"],
        kind=kind,
        name=row["name"],
        local_addr=row[local],
        remote_addr=row[remote],
        interface_address=row["interface_address"],
        mtu=row["mtu"],
        mss=row["mss"],
        **extra,
    )


def route_record(row: dict[str, Any]) -> RouteRecord:
    return RouteRecord(
        account_id=row["account_id"],
        route_id=row["id"],
        prefix=row["prefix"],
        tunnel_id=row["tunnel_id"],
        priority=row["priority"],
        weight=row["weight"],
    )


_Counters = dict[tuple[str, int], list[int]]
"""(tunnel id or "" for inbound, SPI) → [packets, bytes] summed over workers."""


def _pair(value: object) -> tuple[int, int] | None:
    if (
        isinstance(value, list | tuple)
        and len(value) == 2
        and all(type(v) is int and 0 <= v < 1 << 64 for v in value)
    ):
        return value[0], value[1]
    return None


def sum_sa_counters(reports: Iterable[Any]) -> _Counters:
    """Per-SA packets/bytes summed over the live workers' reports.

    A report is untrusted input (``worker.build_report`` writes ``{"in": {spi:
    [packets, bytes]}, "out": {tunnel: {spi: [packets, bytes]}}}``): entries
    of the wrong shape are skipped, never raised on."""
    total: _Counters = {}

    def add(key: tuple[str, int], value: object) -> None:
        pair = _pair(value)
        if pair is not None:
            _add_counts(total, key, pair)

    for report in reports:
        if not isinstance(report, dict):
            continue
        inbound, outbound = report.get("in"), report.get("out")
        if isinstance(inbound, dict):
            for spi, value in inbound.items():
                if type(spi) is int:
                    add(("", spi), value)
        if isinstance(outbound, dict):
            for tid, per in outbound.items():
                if isinstance(tid, str) and isinstance(per, dict):
                    for spi, value in per.items():
                        if type(spi) is int:
                            add((tid, spi), value)
    return total


def _add_counts(total: _Counters, key: tuple[str, int], pair: Iterable[int]) -> None:
    packets, octets = pair
    acc = total.setdefault(key, [0, 0])
    acc[0] += packets
    acc[1] += octets


class SaCounterLedger:
    """Per-SA packets/bytes that never go backwards, from the workers' reports.

    A report carries the counters of one worker process since *it* started
    (``life``: a random id per process), so summing the live workers' latest
    reports, as ``/sas`` once did, dropped a dead worker's share and restarted
    from zero with a restarted worker: counters an operator's graph shows
    falling. Here each worker's last values are kept after it stops reporting
    (they are final), and are set aside ("retired") when the same worker id
    reports another life, or when an SA's counter falls within one life (its
    SA entry was rebuilt). What a worker counted after its last report before
    it died is not known to control; counters start over when control does."""

    def __init__(self) -> None:
        self._last: dict[str, tuple[object, _Counters]] = {}
        """Worker id → (its life, SA key → [packets, bytes]) of its latest report."""
        self._retired: _Counters = {}

    def observe(self, reports: dict[str, Any]) -> None:
        """Take the latest report of each worker (untrusted: bad entries are
        skipped by :func:`sum_sa_counters`)."""
        for worker, report in reports.items():
            if not isinstance(report, dict):
                continue
            life = report.get("life")
            seen = self._last.get(worker)
            if seen is None or seen[0] != life:
                if seen is not None:
                    self._retire(seen[1])  # a new process under this id
                seen = self._last[worker] = (life, {})
            last = seen[1]
            for key, (packets, octets) in sum_sa_counters([report]).items():
                old = last.get(key)
                if old is not None and (packets < old[0] or octets < old[1]):
                    _add_counts(self._retired, key, old)  # its SA entry was rebuilt
                last[key] = [packets, octets]

    def _retire(self, counters: _Counters) -> None:
        for key, pair in counters.items():
            _add_counts(self._retired, key, pair)

    def totals(self) -> _Counters:
        """SA key → [packets, bytes] over every worker life seen."""
        total = {key: list(v) for key, v in self._retired.items()}
        for _, last in self._last.values():
            for key, pair in last.items():
                _add_counts(total, key, pair)
        return total

    def keep_only(self, keys: set[tuple[str, int]]) -> None:
        """Forget SAs that are gone (bounded memory); a worker whose report
        named nothing else is forgotten too."""
        self._retired = {k: v for k, v in self._retired.items() if k in keys}
        for worker, (life, counters) in list(self._last.items()):
            last = {k: v for k, v in counters.items() if k in keys}
            if last:
                self._last[worker] = (life, last)
            else:
                del self._last[worker]


def sa_counter_key(rec: SaRecord) -> tuple[str, int]:
    """How reports name an SA: ("", spi) inbound, (tunnel id, spi) outbound."""
    return ("", rec.spi) if rec.direction is Direction.IN else (rec.tunnel_id, rec.spi)


def max_seq_checkpoints(reports: Iterable[Any]) -> dict[tuple[str, int], int]:
    """(tunnel id, outbound SPI) → the highest ``next_seq`` any live worker
    reported (``{"seq": {tunnel: {spi: next_seq}}}``); bad entries skipped."""
    best: dict[tuple[str, int], int] = {}
    for report in reports:
        seq = report.get("seq") if isinstance(report, dict) else None
        if not isinstance(seq, dict):
            continue
        for tid, per in seq.items():
            if not isinstance(tid, str) or not isinstance(per, dict):
                continue
            for spi, nxt in per.items():
                ok = type(spi) is int and type(nxt) is int and 0 < nxt < 1 << 64
                if ok and nxt > best.get((tid, spi), 0):
                    best[(tid, spi)] = nxt
    return best


def max_replay_tops(reports: Iterable[Any]) -> dict[int, int]:
    """Inbound SPI → the highest replay-window top any live worker reported
    (``{"rwin": {spi: top}}``, ``worker.build_report``); bad entries skipped."""
    best: dict[int, int] = {}
    for report in reports:
        rwin = report.get("rwin") if isinstance(report, dict) else None
        if not isinstance(rwin, dict):
            continue
        for spi, top in rwin.items():
            ok = type(spi) is int and type(top) is int and 0 < top <= 0xFFFFFFFF
            if ok and top > best.get(spi, 0):
                best[spi] = top
    return best


def live_worker_records(reports: dict[str, Any]) -> dict[str, WorkerRecord]:
    """``worker/<node>/<index>`` records of the live workers whose report
    names a handoff address (``{"handoff": [addr, port, key]}``, worker id
    ``<node>/<index>``). A report is untrusted input: a worker id or handoff
    entry that does not make a valid record is skipped."""
    out: dict[str, WorkerRecord] = {}
    for worker_id, report in reports.items():
        handoff = report.get("handoff") if isinstance(report, dict) else None
        if not isinstance(worker_id, str) or not isinstance(handoff, list | tuple):
            continue
        node, _, index = worker_id.rpartition("/")
        if len(handoff) != 3 or not index.isdigit() or len(index) > 3:
            continue
        try:
            rec = WorkerRecord(node, int(index), *handoff)
        except (RecordError, TypeError):
            continue
        out[rec.key] = rec
    return out


def child_sa_view(rec: SaRecord, counters: _Counters | None = None) -> dict[str, Any]:
    """What ``/sas`` shows of one SA: never a key or salt. ``packets`` and
    ``bytes`` are the workers' reported counters summed (inner bytes, see
    :class:`SaCounterLedger`), null while no worker has reported the SA."""
    got = counters.get(sa_counter_key(rec)) if counters is not None else None
    return {
        "spi": f"0x{rec.spi:08x}",
        "direction": rec.direction.value,
        "cipher": rec.cipher.value,
        "integ": rec.integ.value,
        "local_addr": rec.local_addr,
        "remote_addr": rec.remote_addr,
        "local_port": rec.local_port,
        "remote_port": rec.remote_port,
        "udp_encap": rec.udp_encap,
        "created": _iso(rec.created),
        "rekey_at": _iso(rec.rekey_at),
        "expire_at": _iso(rec.expire_at),
        "child_id": rec.child_id,
        "generation": rec.generation,
        "replay_window": rec.replay_window,
        "packets": got[0] if got is not None else None,
        "bytes": got[1] if got is not None else None,
    }


@dataclass
class _IkeSaView:
    account_id: str
    tunnel_id: str
    spi_i: int
    spi_r: int
    remote: tuple[str, int]
    nat_detected: bool
    udp_encap: bool
    id_type: str
    proposal: str
    created: float

    def view(self) -> dict[str, Any]:
        return {
            "initiator_spi": f"{self.spi_i:016x}",
            "responder_spi": f"{self.spi_r:016x}",
            "state": "established",
            "remote_addr": self.remote[0],
            "remote_port": self.remote[1],
            "nat_detected": self.nat_detected,
            "udp_encap": self.udp_encap,
            "id_type": self.id_type,
            "proposal": self.proposal,
            "created": _iso(self.created),
        }


class ControlService:
    """Implements the API's :class:`~control.api.handlers.Hooks` and the IKE glue."""

    def __init__(
        self,
        config: ControlConfig,
        store: Store,
        publisher: PublisherLike | Callable[[list[Record]], PublisherLike],
        *,
        metrics: ControlMetrics | None = None,
        engine: Any = None,
        relay: Any = None,
    ) -> None:
        """``publisher`` is a publisher, or a factory that gets the store's records
        to start with (``Publisher(initial=...)``): a restarted control then hands
        the workers a snapshot equal to what they hold, and nothing churns."""
        self.config = config
        self.store = store
        self.metrics = metrics or ControlMetrics(max_accounts=config.max_account_labels)
        self.api = Api(store, self, id_suffix=config.id_suffix)
        if callable(publisher) and not hasattr(publisher, "set"):
            publisher = publisher(list(self.desired_records().values()))
        self.publisher: PublisherLike = publisher  # type: ignore[assignment]
        self.app = create_app(self.api, self.metrics, build_openapi())
        self.engine = engine
        self.relay = relay
        """``replication.relay.RelayServer`` (not started) feeding the engine, or None."""
        self.transport: Any = None
        self._ike_rows: dict[bytes, Any] = {}
        """Our IKE SPI -> fingerprint of its sealed row as last written."""
        self._ike_dirty: set[bytes] = set()
        """IKE SPIs events touched since the last write (either SPI of a pair)."""
        self._ike_sweep_all = False
        self._ike_persist_pending = False
        self._ike_sas: dict[tuple[int, int], _IkeSaView] = {}
        self._sa_counters = SaCounterLedger()
        self._install_seq: dict[str, int] = {}
        """tunnel_id -> bus sequence of its newest installed Child SA."""
        self._tasks: set[asyncio.Task[None]] = set()
        self._runners: list[web.AppRunner] = []
        self._started_at: float | None = None
        """``time.monotonic()`` when :meth:`start` began (None before): the
        start of /healthz's grace for workers."""
        self._workers_seen_at = 0.0
        self._relay_seen_at = 0.0
        """``time.monotonic()`` a live worker was last seen (:meth:`_note_bus`)."""
        self._seq_marks: deque[tuple[float, int]] = deque(maxlen=1024)
        """(``time.monotonic()``, bus sequence) samples, taken when the
        sequence moved, of the last :data:`WORKER_LAG_GRACE` seconds plus
        one older: what every worker should have applied by now."""
        self._store_failure: tuple[str, float] | None = None
        """(error class, ``time.monotonic()``) of the last store transaction
        of the service if it failed; None once one succeeds (:meth:`_store_txn`)."""
        self.metrics.bind_bus(
            lambda: float(self.publisher.sequence),
            lambda: float(len(self._subscribers())),
            self._slowest_lag,
        )
        self.metrics.ike_sas.labels("established").set_function(lambda: len(self._ike_sas))
        self.metrics.child_sas.labels("installed").set_function(
            lambda: sum(1 for k in self.publisher.items() if k.startswith("sa/in/"))
        )
        self.metrics.refresh_on_render(self._refresh_sa_counts)
        self.metrics.bind_ike_drops(lambda: getattr(self.engine, "drops", {}))
        self._refresh_counts()

    # -- hooks for the API ----------------------------------------------------

    def committed(self, changes: Changes) -> None:
        """Publish one committed API change (after COMMIT, never before)."""
        for row in changes.tunnels_set:
            self.publisher.set(tunnel_record(row))
        for row in changes.routes_set:
            self.publisher.set(route_record(row))
        for _, route_id in changes.routes_deleted:
            self._tombstone(f"route/{route_id}")
        for _, tunnel_id in changes.tunnels_deleted:
            self._delete_tunnel_sas(tunnel_id)
            self._tombstone(f"tunnel/{tunnel_id}")
        self._refresh_counts()

    def psk_changed(self, account_id: str, tunnel_id: str) -> None:
        # lookup() reads the PSK from the store on each handshake: the new PSK
        # is used from the next negotiation on; existing SAs stay up (as in
        # Magic WAN, a PSK change does not tear down a running tunnel).
        log.info("PSK of tunnel %s (account %s) replaced", tunnel_id, account_id)

    def _reports(self) -> list[Any]:
        """The live workers' latest reports (empty if the publisher has none)."""
        return list(self._report_map().values())

    CHECKPOINT_INTERVAL = 1.0
    """Seconds between two passes of :meth:`publish_checkpoints` (so at most
    one ``seq/`` update per SA per interval reaches the bus)."""

    def publish_checkpoints(self) -> int:
        """Replicate the owners' sequence reservations and the inbound
        replay-window tops (DESIGN §5).

        For each replay-protected outbound SA on the bus, publish
        ``seq/<tunnel>/<spi>`` with the highest ``next_seq`` a live worker
        reported, if it is higher than the published one (never lower; an
        owner moves its reservation every 2**19 packets, so this is rare).
        Checkpoints of SAs that are gone are tombstoned. Returns the number of
        bus updates. Checkpoints are not persisted: after a control restart
        the owners' next reports (within a second) rebuild them.

        Inbound: for each inbound SA with a replay window, ``rwin/<spi>``
        with the highest window top a live worker reported, if higher than
        the published one (at most one update per SA per pass, so an SA
        under steady traffic costs one small bus update per
        :data:`CHECKPOINT_INTERVAL`); tombstoned with the SA."""
        items = self.publisher.items()
        reports = self._reports()
        changed = 0
        for (tid, spi), nxt in max_seq_checkpoints(reports).items():
            sa = items.get(f"sa/out/{tid}/{spi:08x}")
            tunnel = items.get(f"tunnel/{tid}")
            if not isinstance(sa, SaRecord) or not isinstance(tunnel, TunnelRecord):
                continue  # only SAs we published: a report cannot make up keys
            if not tunnel.replay_protection:
                continue
            cur = items.get(f"seq/{tid}/{spi:08x}")
            if isinstance(cur, SeqCheckpoint) and cur.next_seq >= nxt:
                continue
            self.publisher.set(SeqCheckpoint(sa.account_id, tid, spi, nxt))
            changed += 1
        for spi, top in max_replay_tops(reports).items():
            sa = items.get(f"sa/in/{spi:08x}")
            if not isinstance(sa, SaRecord) or sa.replay_window == 0:
                continue  # only SAs we published that have a replay window
            cur = items.get(f"rwin/{spi:08x}")
            if isinstance(cur, ReplayCheckpoint) and cur.top >= top:
                continue
            self.publisher.set(ReplayCheckpoint(sa.account_id, sa.tunnel_id, spi, top))
            changed += 1
        for key, rec in items.items():
            if (
                isinstance(rec, SeqCheckpoint)
                and f"sa/out/{rec.tunnel_id}/{rec.spi:08x}" not in items
            ) or (isinstance(rec, ReplayCheckpoint) and f"sa/in/{rec.spi:08x}" not in items):
                self.publisher.delete(key)
                changed += 1
        return changed

    def publish_workers(self) -> int:
        """Replicate the live worker set (DESIGN §5: cluster-wide owner
        election of replay-protected SAs).

        Every live subscriber whose report names a handoff address gets a
        ``worker/<node>/<index>`` record (updated when its address or key
        changes, i.e. when it restarted); the record of a worker that is no
        longer live (``Publisher.subscriber_timeout`` after its last ack) is
        tombstoned. Called after :meth:`publish_checkpoints` in the same
        pass, so a dead owner's last reported reservation is on the bus
        before its record goes. Returns the number of bus updates."""
        items = self.publisher.items()
        live = live_worker_records(self._report_map())
        changed = 0
        for key, rec in live.items():
            if items.get(key) != rec:
                self.publisher.set(rec)
                changed += 1
        for key, rec in items.items():
            if isinstance(rec, WorkerRecord) and key not in live:
                self.publisher.delete(key)
                changed += 1
        self.metrics.live_workers_published.set(len(live))
        return changed

    def _report_map(self) -> dict[str, Any]:
        """Worker id → its latest report (empty if the publisher has none)."""
        try:
            return dict(self.publisher.reports())  # type: ignore[attr-defined]
        except Exception:  # no reports() (test doubles) or stopping
            return {}

    async def _checkpoint_loop(self) -> None:
        while True:
            await asyncio.sleep(self.CHECKPOINT_INTERVAL)
            self._note_bus(time.monotonic(), self._subscribers())
            try:
                self.publish_checkpoints()
            except Exception as exc:  # a bad report must not stop the loop
                log.error("publishing sequence checkpoints failed: %s", type(exc).__name__)
            try:
                self.publish_workers()
            except Exception as exc:
                log.error("publishing the live workers failed: %s", type(exc).__name__)
            try:
                self._count_sas(prune=True)
            except Exception as exc:
                log.error("summing the workers' SA counters failed: %s", type(exc).__name__)

    def _count_sas(self, *, prune: bool = False) -> _Counters:
        """Fold the workers' latest reports into the ledger; its totals."""
        ledger = self._sa_counters
        ledger.observe(self._report_map())
        if prune:
            ledger.keep_only(
                {
                    sa_counter_key(r)
                    for r in self.publisher.items().values()
                    if isinstance(r, SaRecord)
                }
            )
        return ledger.totals()

    def tunnel_sas(self, account_id: str, tunnel_id: str) -> dict[str, Any]:
        counters = self._count_sas()
        child = [
            child_sa_view(r, counters)
            for r in self.publisher.items().values()
            if isinstance(r, SaRecord) and r.tunnel_id == tunnel_id and r.account_id == account_id
        ]
        child.sort(key=lambda v: (v["child_id"], v["generation"], v["direction"]))
        ike = self._engine_ike_view(account_id, tunnel_id)
        if ike is None:
            ike = [
                v.view()
                for v in self._ike_sas.values()
                if v.tunnel_id == tunnel_id and v.account_id == account_id
            ]
        return {"ike_sas": ike, "child_sas": child}

    def _engine_ike_view(self, account_id: str, tunnel_id: str) -> list[dict[str, Any]] | None:
        """The engine's own IKE SAs of the tunnel (authoritative, also after a
        restart restored them); None if the engine cannot list them."""
        if self.engine is None or not hasattr(self.engine, "ike_sas"):
            return None
        try:
            offset = float(getattr(self.engine.config, "unix_time_offset", 0.0))
            out = []
            for sa in self.engine.ike_sas(tunnel_id):
                if sa.tunnel is None or sa.tunnel.account_id != account_id:
                    continue
                spi_i, spi_r = (
                    s.hex() if isinstance(s, bytes) else f"{s:016x}" for s in (sa.spi_i, sa.spi_r)
                )
                out.append(
                    {
                        "initiator_spi": spi_i,
                        "responder_spi": spi_r,
                        "state": str(getattr(sa.state, "value", sa.state)),
                        "remote_addr": sa.remote[0],
                        "remote_port": int(sa.remote[1]),
                        "nat_detected": bool(sa.nat_detected),
                        "udp_encap": bool(sa.udp_encap),
                        "id_type": sa.id_kind,
                        "proposal": sa.suite.name if sa.suite is not None else "",
                        "created": _iso(sa.created + offset),
                    }
                )
            return out
        except Exception as exc:  # an engine change must not break the status API
            log.warning("cannot list the engine's IKE SAs: %s", type(exc).__name__)
            return None

    def _subscribers(self) -> list[Any]:
        """Live subscribers (workers) of the bus."""
        try:
            subs = list(self.publisher.subscribers())
        except Exception:  # a scrape must not fail because the bus is stopping
            return []
        return [s for s in subs if getattr(s, "live", True)]

    def _slowest_lag(self) -> float:
        subs = self._subscribers()
        return float(max((s.lag for s in subs), default=0))

    def workers(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        return [
            {
                "worker_id": str(s.worker_id),
                "applied_seq": int(s.applied_seq),
                "lag": int(s.lag),
                "last_seen_seconds_ago": round(max(0.0, now - s.last_seen), 3),
            }
            for s in self._subscribers()
        ]

    # -- health ---------------------------------------------------------------

    WORKER_GRACE = 30.0
    """Seconds without any live worker, while tunnels are configured, before
    /healthz says so. Covers a control start (the lab and compose start
    control first, then the workers) and a restart of every worker (each
    one serves again in well under a second, DESIGN §1)."""
    WORKER_LAG_GRACE = 10.0
    """A live worker that has not applied bus updates published this many
    seconds ago is reported: twice the default ``rekey_apply_timeout``, so
    a burst it is still working through is not, and a worker that stopped
    applying (its rekeyed SAs are then deleted under it) is."""
    MAX_LISTED = 5
    """Lagging workers named one by one; the rest are counted."""

    def health(self) -> dict[str, Any]:
        """``GET /healthz``: "ok", or "degraded" with one short problem string
        per condition that stops control doing its job. Only what is cheap to
        observe: two COUNTs, the subscriber list, two thread flags and the
        outcome of the last store write (no scan, no probe write). Never a
        secret: error classes, not their messages."""
        now = time.monotonic()
        subs = self._subscribers()
        self._note_bus(now, subs)
        problems: list[str] = []
        tunnels: int | None = None
        ipsec: int | None = None
        try:
            ipsec = self.store.count("ipsec")
            tunnels = ipsec + self.store.count("gre")
        except STORE_ERRORS as exc:
            problems.append(f"store not readable: {type(exc).__name__}")
        if self._store_failure is not None:
            cls, at = self._store_failure
            problems.append(f"store not writable: {cls} (a write failed {now - at:.0f} s ago)")
        if _thread_died(self.publisher):
            problems.append("bus publisher not running")
        ike = self._ike_where()
        if ike and self.transport is None:
            problems.append(f"IKE not listening ({'; '.join(ike)})")
        elif self.relay is not None and self.transport is not None and _thread_died(self.relay):
            problems.append("IKE relay not running (workers cannot forward IKE to control)")
        problems += self._worker_problems(now, subs, tunnels)
        problems += self._relay_problems(now, subs, ipsec)
        ike_state = "not configured" if not ike else "not listening"
        return {
            "status": "degraded" if problems else "ok",
            "problems": problems,
            "bus_sequence": int(self.publisher.sequence),
            "workers": len(subs),
            "ike": "running" if self.transport is not None else ike_state,
            "tunnels": tunnels,
        }

    def _ike_where(self) -> list[str]:
        """Where this control is configured to serve IKE (empty: it is not)."""
        if self.engine is None:
            return []
        where = []
        if self.config.ike_listen:
            ports = ", ".join(f"udp/{p}" for p in self.config.ike_ports)
            where.append(f"{ports} on {', '.join(self.config.ike_listen)}")
        if self.relay is not None:
            where.append("the worker relay")
        return where

    def _note_bus(self, now: float, subs: list[Any]) -> None:
        """Sample the bus for /healthz (from the 1 s checkpoint loop and each
        probe): the sequence if it moved, and whether a worker is live."""
        seq = int(self.publisher.sequence)
        marks = self._seq_marks
        if not marks or marks[-1][1] != seq:
            marks.append((now, seq))
        cutoff = now - self.WORKER_LAG_GRACE
        while len(marks) >= 2 and marks[1][0] <= cutoff:
            marks.popleft()
        if subs:
            self._workers_seen_at = now

    def _worker_problems(self, now: float, subs: list[Any], tunnels: int | None) -> list[str]:
        """No live worker for :data:`WORKER_GRACE` while tunnels exist, and
        live workers that have not applied what was published
        :data:`WORKER_LAG_GRACE` ago. Nothing before :meth:`start`."""
        if self._started_at is None:
            return []
        out = []
        if not subs and tunnels:
            quiet = now - max(self._started_at, self._workers_seen_at)
            if quiet >= self.WORKER_GRACE:
                n = _plural(tunnels, "tunnel is", "tunnels are")
                out.append(
                    f"no worker subscribed to the bus for {quiet:.0f} s while {n} configured"
                )
        cutoff = now - self.WORKER_LAG_GRACE
        due = max((seq for t, seq in self._seq_marks if t <= cutoff), default=0)
        behind = sorted((s for s in subs if s.applied_seq < due), key=lambda s: s.applied_seq)
        seq = int(self.publisher.sequence)
        for s in behind[: self.MAX_LISTED]:
            out.append(
                f"worker {s.worker_id} has not applied bus updates published "
                f"{self.WORKER_LAG_GRACE:.0f} s ago (applied {s.applied_seq}, bus at {seq})"
            )
        if len(behind) > self.MAX_LISTED:
            more = _plural(len(behind) - self.MAX_LISTED, "more worker", "more workers")
            out.append(f"{more} lagging the same way")
        return out

    def _relay_problems(self, now: float, subs: list[Any], ipsec: int | None) -> list[str]:
        """Workers live on the bus, IPsec tunnels configured, but for
        :data:`WORKER_GRACE` no worker connected to the IKE relay (a wrong
        relay endpoint or key on the workers): the peers' IKE messages reach
        no one, so no tunnel can come up or rekey."""
        live = getattr(self.relay, "live_workers", None)
        if live is None or self.transport is None or self._started_at is None:
            return []
        if live() or not subs or not ipsec:
            self._relay_seen_at = now
            return []
        quiet = now - max(self._started_at, self._relay_seen_at)
        if quiet < self.WORKER_GRACE:
            return []
        n = _plural(ipsec, "IPsec tunnel is", "IPsec tunnels are")
        return [
            f"no worker connected to the IKE relay for {quiet:.0f} s while {n} configured "
            f"and {_plural(len(subs), 'worker is', 'workers are')} on the bus"
        ]

    @contextlib.contextmanager
    def _store_txn(self) -> Iterator[None]:
        """``store.transaction()`` that remembers for /healthz whether it
        failed on the store (a locked, read-only or full database): the IKE
        state sweep opens one every second and retries what failed, so the
        problem clears by itself once writes succeed again."""
        try:
            with self.store.transaction():
                yield
        except STORE_ERRORS as exc:
            self._store_failure = (type(exc).__name__, time.monotonic())
            raise
        self._store_failure = None

    def _refresh_counts(self) -> None:
        m = self.metrics
        m.tunnels.labels("ipsec").set(self.store.count("ipsec"))
        m.tunnels.labels("gre").set(self.store.count("gre"))
        m.routes.set(self.store.count("route"))
        per: dict[tuple[str, str], int] = {}
        for kind in ("ipsec", "gre"):
            for account, n in self.store.count_by_account(kind).items():
                key = (m.account_label(account), kind)
                per[key] = per.get(key, 0) + n
        m.account_tunnels.clear()
        for (acct, kind), n in per.items():
            m.account_tunnels.labels(acct, kind).set(n)

    # -- publishing -----------------------------------------------------------

    def _tombstone(self, key: str) -> None:
        if self.publisher.get(key) is not None:
            self.publisher.delete(key)

    def desired_records(self) -> dict[str, Record]:
        """Everything the store says the bus should hold."""
        out: dict[str, Record] = {}
        for kind in ("ipsec", "gre"):
            for row in self.store.rows(kind):
                rec = tunnel_record({**row, "kind": kind})
                out[rec.key] = rec
        peers: dict[str, dict[str, str]] = {}
        for row in self.store.rows("route"):
            acct = row["account_id"]
            if acct not in peers:
                peers[acct] = self.api.peer_map(acct)
            tunnel_id = peers[acct].get(row["nexthop"])
            if tunnel_id is None:  # cannot happen through the API (409 guards it)
                log.warning("route %s has no tunnel for nexthop %s", row["id"], row["nexthop"])
                continue
            route = route_record({**row, "tunnel_id": tunnel_id})
            out[route.key] = route
        now = time.time()
        for key, blob in self.store.sealed_items(SA_PREFIX):
            try:
                sa = decode(blob)
            except RecordError:
                log.warning("dropping unreadable persisted SA record %s", key)
                self._delete_sealed(key)
                continue
            live = isinstance(sa, SaRecord) and not _expired(sa, now)
            if live and f"tunnel/{sa.tunnel_id}" in out:
                out[sa.key] = sa
                continue
            self._delete_sealed(key)
        return out

    def republish_all(self) -> int:
        """Make the bus equal to the store; returns how many keys changed."""
        desired = self.desired_records()
        current = self.publisher.items()
        changed = 0
        for key, rec in desired.items():
            if current.get(key) != rec:
                self.publisher.set(rec)
                changed += 1
        for key in current:
            if key.startswith(OWNED_PREFIXES) and key not in desired:
                self.publisher.delete(key)
                changed += 1
        self._refresh_counts()
        return changed

    def _delete_sealed(self, key: str) -> None:
        with self._store_txn():
            self.store.delete_sealed(key)

    def _delete_tunnel_sas(self, tunnel_id: str) -> None:
        """Tunnel deleted: tell the engine (DELETE to the peer), tombstone its SAs."""
        if self.engine is not None:
            try:
                if self.transport is not None:
                    self.transport.call(self.engine.delete_tunnel, tunnel_id)
                else:
                    self.engine.delete_tunnel(tunnel_id, time.monotonic())
                    self._drain_engine_events()
            except NotImplementedError:
                log.warning("IKE engine cannot delete tunnels yet (not implemented)")
        # Every sealed SA record is on the bus under the same key (persisted
        # then published, tombstoned then unsealed), so the bus names them:
        # no need to open and decode every sealed SA of every tunnel. One left
        # behind by a crash between the two steps is dropped at the next start
        # (desired_records: its tunnel is gone).
        for key, rec in self.publisher.items().items():
            if isinstance(rec, SaRecord) and rec.tunnel_id == tunnel_id:
                self.publisher.delete(key)
                self._delete_sealed(key)
        for key, _ in self.store.sealed_items(f"{HELD_PREFIX}sa/out/{tunnel_id}/"):
            self._delete_sealed(key)  # held: never published
        self._ike_sas = {k: v for k, v in self._ike_sas.items() if v.tunnel_id != tunnel_id}

    def _drain_engine_events(self) -> None:
        while (ev := self.engine.next_event()) is not None:
            self.on_ike_event(ev)

    # -- IKE glue -------------------------------------------------------------

    def lookup(self, identity: Any) -> Any:
        """``IkeEngine`` lookup: a :class:`PeerIdentity` → :class:`TunnelAuth` or None."""
        from control.ike.engine import TunnelAuth

        if identity.kind == "ipv4":
            rows = self.store.ipsec_by_endpoints(identity.local_addr, identity.address)
            # The seeds: ID_IPV4_ADDR only when the pair is unique (here: across
            # all accounts, since the identity does not name one).
            if len(rows) != 1:
                return None
            row = rows[0]
        else:
            if identity.account_id is None or identity.tunnel_id is None:
                return None
            found = self.store.get("ipsec", identity.account_id, identity.tunnel_id)
            if found is None:
                return None
            row = found
        psk = self.store.get_psk(row["account_id"], row["id"])
        if psk is None:
            return None  # no PSK generated yet: nobody can authenticate
        return TunnelAuth(
            account_id=row["account_id"],
            tunnel_id=row["id"],
            psk=psk,
            local_addr=row["cloudflare_endpoint"],
            customer_endpoint=row["customer_endpoint"],
            allow_null_cipher=row["allow_null_cipher"],
            replay_protection=row["replay_protection"],
        )

    def on_ike_event(self, ev: object) -> None:
        """Handle one engine event: Child SA records are sealed and published
        here; the rows of the IKE SAs it touched are written after the
        current flush (:meth:`_schedule_ike_persist`), never before a publish."""
        name = type(ev).__name__
        handler = getattr(self, f"_on_{name}", None)
        if handler is None:
            log.debug("unhandled IKE event %s", name)
        else:
            handler(ev)
        if name.startswith(("IkeSa", "ChildSa")) and hasattr(self.engine, "sas"):
            self._mark_ike_event(ev)
            self._schedule_ike_persist()

    def _refresh_sa_counts(self) -> None:
        """Per-account SA gauges (issue 10: per-customer dashboards), at scrape
        time: one pass over every SA record (~90 ms at 100k Child SAs) is too
        much to repeat on each Child SA event."""
        m = self.metrics
        per: dict[tuple[str, str], int] = {}
        for v in self._ike_sas.values():
            key = (m.account_label(v.account_id), "ike")
            per[key] = per.get(key, 0) + 1
        for k, rec in self.publisher.items().items():
            if k.startswith("sa/in/") and isinstance(rec, SaRecord):
                key = (m.account_label(rec.account_id), "child")
                per[key] = per.get(key, 0) + 1
        m.account_sas.clear()
        for (acct, kind), n in per.items():
            m.account_sas.labels(acct, kind).set(n)

    def _on_IkeSaEstablished(self, ev: Any) -> None:
        self.metrics.handshakes.labels("ok").inc()
        self._ike_sas[(ev.spi_i, ev.spi_r)] = _IkeSaView(
            ev.account_id,
            ev.tunnel_id,
            ev.spi_i,
            ev.spi_r,
            tuple(ev.remote),
            ev.nat_detected,
            ev.udp_encap,
            ev.id_type,
            ev.proposal,
            time.time(),
        )
        log.info("IKE SA up: tunnel %s from %s:%d (%s)", ev.tunnel_id, *ev.remote, ev.id_type)

    def _on_IkeSaRekeyed(self, ev: Any) -> None:
        self.metrics.rekeys.labels("ike").inc()
        old = self._ike_sas.pop((ev.old_spi_i, ev.old_spi_r), None)
        if old is not None:
            old.spi_i, old.spi_r, old.proposal = ev.spi_i, ev.spi_r, ev.proposal
            self._ike_sas[(ev.spi_i, ev.spi_r)] = old

    def _on_IkeSaDeleted(self, ev: Any) -> None:
        self._ike_sas.pop((ev.spi_i, ev.spi_r), None)
        self.metrics.deletes.labels("ike").inc()
        if ev.reason == "dpd":
            self.metrics.dpd_failures.inc()
        log.info("IKE SA of tunnel %s deleted (%s)", ev.tunnel_id, ev.reason)

    def _on_ChildSaInstalled(self, ev: Any) -> None:
        log.debug(
            "Child SA installed: tunnel %s in %08x out %08x%s%s",
            ev.tunnel_id,
            ev.inbound.spi,
            ev.outbound.spi,
            " (rekey of in {:08x} out {:08x})".format(*ev.replaces) if ev.replaces else "",
            ", outbound held until the peer deletes the old SA" if ev.hold_outbound else "",
        )
        if self.store.get("ipsec", ev.account_id, ev.tunnel_id) is None:
            # The tunnel was deleted while the exchange ran: never publish SAs
            # for a tunnel the workers no longer have; the engine deletes it.
            log.info("ignoring Child SA for deleted tunnel %s", ev.tunnel_id)
            self._delete_tunnel_sas(ev.tunnel_id)
            return
        self._publish_pair(ev)
        if ev.replaces is not None:
            self.metrics.rekeys.labels("child").inc()
            self._spawn(self._ready_after_apply(ev.tunnel_id, ev.inbound.spi))

    def _on_ChildSaUpdated(self, ev: Any) -> None:
        log.debug(
            "Child SA updated: tunnel %s in %08x out %08x%s",
            ev.tunnel_id,
            ev.inbound.spi,
            ev.outbound.spi,
            " (outbound held)" if ev.hold_outbound else "",
        )
        self._publish_pair(ev)

    def _publish_pair(self, ev: Any) -> None:
        """Seal both directions into the store, then publish them; the outbound
        one's sequence is what a rekey's old SA waits for (make-before-break).
        A held outbound SA (``ev.hold_outbound``: the peer's rekey, until it
        deletes the old SA) is sealed under :data:`HELD_PREFIX` and not
        published; its release moves it to its key and publishes it, and a
        control restart in that window keeps it held (the restored engine
        releases it).

        The IKE message that tells the peer about these records (our answer
        creating the SA, or the DELETE answer that releases a held outbound
        one) waits until every worker can use them (``IkeTransport.hold``)."""
        out = ev.outbound
        with self._store_txn():
            self.store.put_sealed(ev.inbound.key, encode(ev.inbound))
            if ev.hold_outbound:
                self.store.put_sealed(HELD_PREFIX + out.key, encode(out))
            else:
                self.store.put_sealed(out.key, encode(out))
                self.store.delete_sealed(HELD_PREFIX + out.key)
        seq = self.publisher.set(ev.inbound)
        if not ev.hold_outbound:
            seq = self.publisher.set(ev.outbound)
        self._install_seq[ev.tunnel_id] = seq
        if self.transport is not None:
            self.transport.hold(self._answer_after_apply(seq))

    def _on_ChildSaDeleted(self, ev: Any) -> None:
        log.debug(
            "Child SA deleted: tunnel %s in %08x out %08x (%s)",
            ev.tunnel_id,
            ev.inbound_spi,
            ev.outbound_spi,
            ev.reason,
        )
        self.metrics.deletes.labels("child").inc()
        seq = self._install_seq.get(ev.tunnel_id)
        if (
            ev.reason == "rekeyed"
            and seq is not None
            and not self.publisher.applied_everywhere(seq)
        ):
            self._spawn(self._delete_after_apply(ev.sa_keys, seq))
            return
        self._delete_sa_keys(ev.sa_keys)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _ready_after_apply(self, tunnel_id: str, inbound_spi: int) -> None:
        """Make-before-break for rekeys we started: tell the engine the new
        Child SA is on every worker, so it deletes the old one with the peer
        now rather than at its ``rekey_delete_delay`` upper bound."""
        seq = self._install_seq.get(tunnel_id)
        if seq is None or self.engine is None:
            return
        if not await self.publisher.wait_applied(seq, self.config.rekey_apply_timeout):
            self.metrics.make_before_break_timeouts.inc()
            log.warning("rekey: not every worker applied seq %d in time", seq)
            return  # the engine's rekey_delete_delay bound deletes the old SA
        if self.transport is not None:
            self.transport.call(self.engine.child_sa_ready, tunnel_id, inbound_spi)

    async def _answer_after_apply(self, seq: int) -> None:
        """Held IKE output (``IkeTransport.hold``): done once every worker has
        acknowledged ``seq``, or after :data:`ANSWER_HOLD` seconds (a stale
        subscriber — a worker killed moments ago — must not delay every
        answer for long; the peer retransmits after seconds)."""
        if not await self.publisher.wait_applied(seq, ANSWER_HOLD):
            self.metrics.answer_hold_timeouts.inc()
            log.debug("IKE answer sent before every worker applied seq %d", seq)

    async def _delete_after_apply(self, keys: Iterable[str], seq: int) -> None:
        ok = await self.publisher.wait_applied(seq, self.config.rekey_apply_timeout)
        if not ok:
            self.metrics.make_before_break_timeouts.inc()
            log.warning("rekey: not every worker applied seq %d in time; deleting old SA", seq)
        self._delete_sa_keys(keys)

    def _delete_sa_keys(self, keys: Iterable[str]) -> None:
        for key in keys:
            log.debug("tombstoning %s", key)
            self._tombstone(key)
            with self._store_txn():
                self.store.delete_sealed(key)
                self.store.delete_sealed(HELD_PREFIX + key)

    def _on_AuthenticationFailed(self, ev: Any) -> None:
        self.metrics.handshakes.labels(ev.reason).inc()
        self.metrics.auth_failures.labels(ev.reason).inc()
        log.info("IKE authentication failed from %s:%d (%s)", *ev.remote, ev.reason)

    def _on_NegotiationFailed(self, ev: Any) -> None:
        self.metrics.handshakes.labels(str(ev.notify).lower()).inc()

    # -- running --------------------------------------------------------------

    async def start(self) -> None:
        """Start the bus, republish the store, serve the API (and IKE if configured)."""
        self._started_at = time.monotonic()
        self.publisher.start()
        n = self.republish_all()
        log.info("republished store: %d keys changed, bus sequence %d", n, self.publisher.sequence)
        await self._serve(self.app, self.config.api_listen)
        task = asyncio.get_running_loop().create_task(self._checkpoint_loop())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if self.config.metrics_listen:
            mapp = web.Application()

            async def metrics(_: web.Request) -> web.Response:
                return metrics_response(self.metrics)

            mapp.router.add_get("/metrics", metrics)
            await self._serve(mapp, self.config.metrics_listen)
        if self.engine is not None and (self.config.ike_listen or self.relay is not None):
            await self._start_ike()
        self._settle_held_outbound()

    def _settle_held_outbound(self) -> None:
        """After a restart: an outbound SA still held in the store stays held
        if the restored engine holds it too (it publishes it when the peer
        deletes the old Child SA); otherwise nothing would ever release it (its
        IKE SA's row was not written before a crash, or no IKE engine runs
        here), so it is published now. Held records of a deleted tunnel or
        past their expiry are dropped."""
        held = self._engine_held_outbound()
        now = time.time()
        for hkey, blob in self.store.sealed_items(HELD_PREFIX):
            try:
                rec = decode(blob)
            except RecordError:
                rec = None
            if (
                not isinstance(rec, SaRecord)
                or hkey != HELD_PREFIX + rec.key
                or self.store.get("ipsec", rec.account_id, rec.tunnel_id) is None
                or _expired(rec, now)
            ):
                self._delete_sealed(hkey)
                continue
            if (rec.tunnel_id, rec.spi) in held:
                continue
            log.info(
                "publishing held outbound SA %08x of tunnel %s: no restored IKE SA holds it",
                rec.spi,
                rec.tunnel_id,
            )
            with self._store_txn():
                self.store.put_sealed(rec.key, blob)
                self.store.delete_sealed(hkey)
            self.publisher.set(rec)

    def _engine_held_outbound(self) -> set[tuple[str, int]]:
        """(tunnel, outbound SPI) of every Child SA the engine holds back."""
        out: set[tuple[str, int]] = set()
        for sa in getattr(self.engine, "sas", {}).values():
            tunnel = getattr(sa, "tunnel", None)
            for c in getattr(sa, "children", {}).values():
                if tunnel is not None and getattr(c, "outbound_held", False):
                    out.add((tunnel.tunnel_id, c.spi_out))
        return out

    async def _start_ike(self) -> None:
        """The engine behind direct UDP listeners and/or the worker relay."""
        from control.ike.transport import IkeTransport

        self.transport = IkeTransport(
            self.engine, on_event=self.on_ike_event, on_flush=self._on_ike_flush
        )
        if hasattr(self.engine, "take_touched"):
            self.engine.take_touched()  # start tracking (restored SAs are on disk)
        self.restore_ike_state(self.transport.now())
        for addr in self.config.ike_listen:
            await self.transport.listen(addr, [int(p) for p in self.config.ike_ports])
        if self.relay is not None:
            self.transport.attach_relay(self.relay)
            self.relay.start()
        # The transport arms its timer only when it flushes, i.e. after a
        # datagram or an API call. Flush once now, with the sockets and the
        # relay in place, so the restored IKE SAs' timers run even if every
        # peer stays silent: DPD (RFC 7296 §2.4), retransmission of a request
        # in flight at the snapshot (§2.1), rekeys and expiry.
        self.transport.flush()
        if hasattr(self.engine, "export_state"):
            task = asyncio.get_running_loop().create_task(self._persist_ike_state_loop())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    # IKE SA persistence (issue 7, "control restart keeps tunnels up"): one
    # sealed row per IKE SA the engine would export (keys, Message IDs, Child
    # SAs), key ``ike/sa/<our SPI>``, written when that SA changes and deleted
    # when it goes; restore_ike_state() hands the rows back to a fresh engine
    # before the first datagram. See persist_ike_state() for when rows are
    # written and what a crash can lose. Child SA records are persisted and
    # republished separately (above), so workers keep forwarding across a
    # restart and the peer renegotiates nothing.
    IKE_STATE_KEY = "ike/state"
    """The single blob of every IKE SA older versions wrote; migrated once."""
    IKE_SA_PREFIX = "ike/sa/"
    IKE_ROW_VERSION = 1

    def _ike_row_key(self, our_spi: bytes) -> str:
        return f"{self.IKE_SA_PREFIX}{our_spi.hex()}"

    def _mark_ike_event(self, ev: Any) -> None:
        """Note the IKE SAs an event touched, so their rows are rewritten."""
        for a, b in (("spi_i", "spi_r"), ("old_spi_i", "old_spi_r")):
            spi_i, spi_r = getattr(ev, a, None), getattr(ev, b, None)
            for spi in (spi_i, spi_r):
                if type(spi) is int and 0 < spi < 1 << 64:
                    self._ike_dirty.add(spi.to_bytes(8, "big"))
        tunnel_id = getattr(ev, "tunnel_id", None)
        if type(ev).__name__.startswith("ChildSa") and tunnel_id and self.engine is not None:
            try:
                for sa in self.engine.ike_sas(tunnel_id):
                    self._ike_dirty.add(sa.our_spi)
            except Exception as exc:  # an engine change must not break the event path
                log.warning("cannot list the engine's IKE SAs: %s", type(exc).__name__)
                self._ike_sweep_all = True

    def _on_ike_flush(self) -> None:
        """In every transport flush, before its datagrams go out: write the
        rows of the IKE SAs it touched (a DPD moved their Message IDs, we sent
        a request, a timer ran). Write-ahead: a crash can lose a change only
        before the peer saw any message showing it — the peer then
        retransmits, and the restored engine answers from the saved state.
        (The flush's events published their Child SA records before this.)
        Engines without ``take_touched`` rely on the event marks and the sweep."""
        take = getattr(self.engine, "take_touched", None)
        if take is None:
            return
        sas, rows = self.engine.sas, self._ike_rows
        # half-open SAs (an IKE_SA_INIT flood) are never saved: no transaction
        touched = {
            spi
            for spi in take()
            if spi in rows or ((sa := sas.get(spi)) is not None and self._exportable(sa))
        }
        if touched:
            self._ike_dirty |= touched
            self._persist_ike_logged()

    def _schedule_ike_persist(self) -> None:
        """Persist the touched IKE SAs after the current loop turn: the
        transport dispatches every event of one input in one flush, so the
        Child SA records of that flush are on the bus before any IKE row is
        sealed (nothing of it delays the publish). Without a running loop
        (tests driving the service by hand) it persists at once."""
        if self._ike_persist_pending:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._persist_ike_logged()
            return
        self._ike_persist_pending = True
        loop.call_soon(self._persist_ike_logged)

    def _persist_ike_logged(self) -> None:
        self._ike_persist_pending = False
        try:
            self.persist_ike_state()
        except Exception as exc:
            log.error("persisting IKE state failed: %s", type(exc).__name__)

    def restore_ike_state(self, now: float) -> bool:
        """Load every persisted IKE SA into the (fresh) engine; True if any.

        Each row's relative times are re-based on when it was written (its
        Unix time, so a row written an hour before the restart does not push
        that SA's rekey and expiry an hour late); a row without one (engine
        clock not mapped to Unix time) is re-based on ``now``. A store that
        still holds the old single blob (``ike/state``) is migrated: the blob
        is imported once, written back as one row per IKE SA and removed, in
        one transaction."""
        if self.engine is None or not hasattr(self.engine, "import_state"):
            return False
        import msgpack

        restored = 0
        legacy = self.store.get_sealed(self.IKE_STATE_KEY)
        if legacy is not None:
            before = set(self.engine.sas)
            self.engine.import_state(legacy, now)
            migrated = set(self.engine.sas) - before
            restored += len(migrated)
            self._ike_dirty |= migrated
            self._ike_rows_txn(full=False, drop=(self.IKE_STATE_KEY,))
            log.info(
                "migrated the persisted IKE state blob (%d bytes) to %d per-SA rows",
                len(legacy),
                len(migrated),
            )
        wall = time.time()
        version = getattr(self.engine, "STATE_VERSION", self.IKE_ROW_VERSION)
        for key, plain in self.store.sealed_items(self.IKE_SA_PREFIX):
            try:
                our_spi = bytes.fromhex(key[len(self.IKE_SA_PREFIX) :])
                row = msgpack.unpackb(plain, raw=False)
                at = row.get("at")
                base = now - max(0.0, wall - at) if isinstance(at, int | float) else now
                blob = msgpack.packb({"v": version, "sas": [row["sa"]]}, use_bin_type=True)
            except Exception:
                log.warning("ignoring unreadable persisted IKE SA row %s", key)
                self._ike_rows[key.encode()] = self._FORCE  # removed by the next sweep
                continue
            self.engine.import_state(blob, base)
            sa = self.engine.sas.get(our_spi)
            self._ike_rows[our_spi] = self._fingerprint(sa) if sa is not None else self._FORCE
            restored += sa is not None
        if restored:
            log.info("restored %d persisted IKE SAs", restored)
        return restored > 0

    _FORCE: Any = object()
    """A fingerprint no SA has: the row is rewritten (or deleted) next time."""

    @staticmethod
    def _exportable(sa: Any) -> bool:
        """The IKE SAs ``IkeEngine.export_state`` keeps (half-open ones are not)."""
        state = getattr(getattr(sa, "state", None), "value", None)
        return sa.tunnel is not None and state in ("established", "rekeyed", "deleting")

    @staticmethod
    def _fingerprint(sa: Any) -> Any:
        """What must be on disk for this IKE SA to continue after a restart,
        short of the keys (fixed for its life): state, Message IDs, peer
        address, the pending request, the rekey time and its Child SAs.
        Cheap (no serialising, no crypto), so the once-a-second sweep can
        compare every SA; any engine change that breaks it just rewrites."""
        try:
            pend = sa.pending
            return (
                sa.state,
                sa.peer_next,
                sa.our_next,
                tuple(sa.local),
                tuple(sa.remote),
                sa.nat_detected,
                sa.udp_encap,
                sa.ike_rekey_at,
                None if pend is None else (pend.kind, pend.message_id),
                id(sa.last_response),
                tuple(
                    (
                        c.spi_in,
                        c.generation,
                        c.rekeyed,
                        c.deleting,
                        c.delete_at,
                        c.replaced_by,
                        c.outbound_held,
                        c.unconfirmed_successor,
                        c.answered is None,
                    )
                    for c in sa.children.values()
                ),
            )
        except Exception:
            return object()

    def persist_ike_state(self) -> int:
        """Write the rows of the IKE SAs events or the engine
        (``take_touched``) marked since the last write (called after the flush
        that touched them, :meth:`_schedule_ike_persist`); returns rows
        written or deleted. Only changed SAs (by a cheap fingerprint) are
        serialised, sealed and written, all in one transaction.

        :meth:`sweep_ike_state` (every :attr:`IKE_SWEEP_INTERVAL` seconds, once
        a second for an engine that does not report what it touched, and at
        stop) compares every IKE SA with its row: a safety net for anything
        that changed unreported.

        Crash safety: Child SA records are sealed before they are published;
        the IKE rows follow in the same flush, before it sends anything
        (:meth:`_on_ike_flush`; in the next loop turn for an engine without
        ``take_touched``). A crash in between (well under a millisecond) loses
        that flush's change of those IKE SAs, which no peer has seen: a new
        IKE SA is then not restored and the peer, without our answer,
        retries; the Child SA records already on the bus go at their
        ``expire_at``."""
        if self.engine is None or not hasattr(self.engine, "sas"):
            return 0
        if not self._ike_dirty and not self._ike_sweep_all:
            return 0  # (the flush that marked them wrote them already): no empty transaction
        return self._ike_rows_txn(full=self._ike_sweep_all)

    def sweep_ike_state(self) -> int:
        """Compare every IKE SA (and every row) with what is on disk; write
        the changed rows, delete the rows of SAs that are gone."""
        if self.engine is None or not hasattr(self.engine, "sas"):
            return 0
        return self._ike_rows_txn(full=True)

    def _ike_rows_txn(self, *, full: bool, drop: Iterable[str] = ()) -> int:
        """One transaction: the changed rows (and ``drop`` keys); the memo of
        what is on disk moves only once it committed. If it fails, the next
        write compares every SA (nothing an event marked is forgotten)."""
        try:
            with self._store_txn():
                puts, gone = self._write_ike_rows(full=full)
                for key in drop:
                    self.store.delete_sealed(key)
        except BaseException:
            self._ike_sweep_all = True
            raise
        for spi, fp in puts:
            self._ike_rows[spi] = fp
        for spi in gone:
            self._ike_rows.pop(spi, None)
        if puts:
            self.metrics.ike_state_writes.labels("put").inc(len(puts))
        if gone:
            self.metrics.ike_state_writes.labels("delete").inc(len(gone))
        return len(puts) + len(gone)

    def _write_ike_rows(self, *, full: bool) -> tuple[list[tuple[bytes, Any]], list[bytes]]:
        """Write the rows of the candidate SAs whose fingerprint changed and
        delete the rows of those gone; returns (our SPI, fingerprint) written
        and the SPIs deleted. Inside the caller's transaction."""
        import msgpack

        engine = self.engine
        sas = engine.sas
        if full:
            candidates: Iterable[bytes] = set(sas) | set(self._ike_rows)
            self._ike_dirty.clear()
            self._ike_sweep_all = False
        else:
            candidates, self._ike_dirty = self._ike_dirty, set()
        shift = float(engine.last_now)
        offset = float(getattr(engine.config, "unix_time_offset", 0.0) or 0.0)
        at = shift + offset if offset else None
        puts: list[tuple[bytes, Any, bytes]] = []
        gone: list[bytes] = []
        for spi in candidates:
            sa = sas.get(spi)
            if sa is None or not self._exportable(sa):
                if spi in self._ike_rows:
                    gone.append(spi)
                continue
            fp = self._fingerprint(sa)
            if self._ike_rows.get(spi) == fp:
                continue
            row = {"v": self.IKE_ROW_VERSION, "at": at, "sa": sa.to_state(shift)}
            puts.append((spi, fp, msgpack.packb(row, use_bin_type=True)))
        for spi, _, plain in puts:
            self.store.put_sealed(self._ike_row_key(spi), plain)
        for spi in gone:
            # an unreadable row is remembered by its whole key (restore_ike_state)
            key = self._ike_row_key(spi) if len(spi) == 8 else spi.decode()
            self.store.delete_sealed(key)
        return [(spi, fp) for spi, fp, _ in puts], gone

    IKE_SWEEP_INTERVAL = 30.0
    """Seconds between full comparisons of every IKE SA with its row when the
    engine reports what it touched (a safety net); once a second otherwise."""

    async def _persist_ike_state_loop(self) -> None:
        full_every = self.IKE_SWEEP_INTERVAL if hasattr(self.engine, "take_touched") else 0.0
        last_full = time.monotonic()
        while True:
            await asyncio.sleep(1.0)
            try:
                if time.monotonic() - last_full >= full_every:
                    last_full = time.monotonic()
                    self.sweep_ike_state()
                else:  # what is still marked, e.g. after a failed write
                    self.persist_ike_state()
            except Exception as exc:
                log.error("persisting IKE state failed: %s", type(exc).__name__)

    async def _serve(self, app: web.Application, listen: str) -> None:
        host, port = split_hostport(listen)
        runner = web.AppRunner(app, access_log=log if log.isEnabledFor(logging.DEBUG) else None)
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        await site.start()
        self._runners.append(runner)
        log.info("listening on http://%s:%d", host, port)

    @property
    def bound_ports(self) -> list[int]:
        ports = []
        for r in self._runners:
            for addr in r.addresses:
                ports.append(int(addr[1]))
        return ports

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        try:
            self.sweep_ike_state()
        except Exception as exc:
            log.error("persisting IKE state at stop failed: %s", type(exc).__name__)
        if self.transport is not None:
            if self.relay is not None:
                self.relay.stop()
            self.transport.close()
            self.transport = None
        for runner in self._runners:
            await runner.cleanup()
        self._runners.clear()
        self.publisher.stop()
