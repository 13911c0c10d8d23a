"""After a control restart the restored IKE SAs' timers run on their own.

A restarted control with peers that stay silent must still send what its
restored IKE SAs owe them: the DPD of an idle IKE SA (RFC 7296 §2.4) within
one DPD interval, and a request that was in flight at the snapshot again at
once (§2.1). Nothing may wait for a first datagram or API call to arm the
transport's timer: a silent peer sends neither.

The real service (store, bus, API) with the real engine behind the IKE
transport, fed by a relay stub that records what control sends; the peers
are in-memory initiators (``Peer`` of test_service_ike)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from control.config import ControlConfig
from control.ike.engine import IkeEngine
from control.ike.messages import decode
from control.ike.payloads import ExchangeType
from control.metrics import ControlMetrics
from control.secrets import MasterKey
from control.service import ControlService
from control.store import Store
from tests.control.api_support import add_token
from tests.control.test_service import ACCT, Bus
from tests.control.test_service_ike import CLIENT, SERVER, ike_config
from tests.control.test_service_ike_rows import connect_many, ike_rows, running

DPD_INTERVAL = 1.0


class RecordingRelay:
    """``RelayServer`` as the IKE transport uses it; keeps what control sends."""

    def __init__(self) -> None:
        self.on_datagram: Any = None
        self.sent: list[tuple[float, Any]] = []

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def send(self, reply: Any) -> None:
        self.sent.append((time.monotonic(), reply))


async def restart_with_ike(
    tmp_path: Path, bus: Bus
) -> tuple[ControlService, Store, RecordingRelay]:
    """Control as ``anywan-control`` starts it: the engine is there before
    ``start()``, so the service restores the IKE state behind its transport."""
    store = Store.open(tmp_path, MasterKey.load_or_create(tmp_path / "master.key"))
    metrics = ControlMetrics()
    conf = ControlConfig(state_dir=tmp_path, api_listen="127.0.0.1:0", rekey_apply_timeout=5.0)
    relay = RecordingRelay()
    service = ControlService(
        conf, store, bus.factory(metrics.registry), metrics=metrics, relay=relay
    )
    config = ike_config(service)
    config.dpd_interval = DPD_INTERVAL
    service.engine = IkeEngine(config, service.lookup)
    await service.start()
    return service, store, relay


def informational_requests(relay: RecordingRelay, spi_i: bytes) -> list[tuple[float, bytes]]:
    """INFORMATIONAL requests control sent on the IKE SA with SPIi ``spi_i``."""
    out = []
    for at, reply in relay.sent:
        header = decode(reply.data).header
        if (
            header.spi_i == spi_i
            and header.exchange == ExchangeType.INFORMATIONAL
            and not header.is_response
        ):
            out.append((at, reply.data))
    return out


async def test_restored_timers_run_without_any_datagram_or_api_call(tmp_path: Path) -> None:
    bus = Bus(tmp_path)
    async with running(tmp_path, bus) as (service, store):
        token = add_token(store, ACCT)
        (idle_tid, idle), (busy_tid, busy) = await connect_many(service, token, 2)
        # control's own DPD on the second IKE SA is in flight at the snapshot:
        # sent, never answered (the peer does not get it)
        assert service.engine.send_dpd(busy_tid, time.monotonic())
        assert service.engine.datagrams_to_send()
        service.sweep_ike_state()
        assert len(ike_rows(store)) == 2
    (idle_sa,) = [sa.spi_i for sa in idle.client.ike_sas(idle_tid)]
    (busy_sa,) = [sa.spi_i for sa in busy.client.ike_sas(busy_tid)]

    service, store, relay = await restart_with_ike(tmp_path, bus)
    try:
        started = time.monotonic()
        assert len(service.engine.sas) == 2
        # No datagram, no API call from here on: only the restored timers.
        await asyncio.sleep(0.3)
        # the request in flight at the snapshot is retransmitted at once (§2.1)
        assert len(informational_requests(relay, busy_sa)) == 1
        deadline = started + 5 * DPD_INTERVAL
        while not informational_requests(relay, idle_sa) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        dpds = informational_requests(relay, idle_sa)
        assert dpds, "no DPD on the restored idle IKE SA"
        at, data = dpds[0]
        assert at - started <= DPD_INTERVAL + 1.0  # spread over one interval (+ slack)
        # ...and it is a real request on the restored IKE SA: the peer answers it
        now = time.monotonic()
        idle.client.receive_datagram(data, CLIENT, SERVER, now)
        assert not idle.client.drops, idle.client.drops
        (answer,) = idle.client.datagrams_to_send()
        assert decode(answer[0]).header.is_response
    finally:
        await service.stop()
        store.close()
