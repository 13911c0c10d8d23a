"""Shared fixtures for the control API tests: a real control service (real
SQLite in tmp_path, real replication Publisher on ipc:// sockets, real aiohttp
server on a loopback port) and a small JSON client."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest_asyncio
import zmq

from control.config import ControlConfig
from control.metrics import ControlMetrics
from control.secrets import MasterKey, generate_token, hash_token
from control.service import ControlService
from control.store import Store
from replication.publisher import Publisher


def make_publisher_factory(state: Path, registry: Any) -> Any:
    public, secret = zmq.curve_keypair()
    ipc = state / "bus"
    ipc.mkdir(exist_ok=True)

    def factory(initial: list[Any]) -> Publisher:
        return Publisher(
            snapshot_endpoint=f"ipc://{ipc}/snap",
            update_endpoint=f"ipc://{ipc}/upd",
            ack_endpoint=f"ipc://{ipc}/ack",
            server_public=public,
            server_secret=secret,
            allowed_clients=[],
            heartbeat_interval=0.2,
            initial=initial,
            registry=registry,
        )

    return factory


def add_token(store: Store, account: str | None) -> str:
    token = generate_token()
    store.add_token(uuid.uuid4().hex[:16], hash_token(token), account, "test")
    return token


@dataclass
class Control:
    state: Path
    service: ControlService
    store: Store
    base: str
    session: aiohttp.ClientSession
    operator: str
    tokens: dict[str, str] = field(default_factory=dict)
    responses: list[str] = field(default_factory=list)
    """Every response body seen (for the secrets check)."""

    def token(self, account: str) -> str:
        if account not in self.tokens:
            self.tokens[account] = add_token(self.store, account)
        return self.tokens[account]

    async def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        token: str | None = None,
        account: str | None = None,
        raw: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any]:
        h = dict(headers or {})
        tok = token if token is not None else (self.token(account) if account else self.operator)
        if tok:
            h["Authorization"] = f"Bearer {tok}"
        kwargs: dict[str, Any] = {"headers": h}
        if raw is not None:
            kwargs["data"] = raw
        elif body is not None:
            kwargs["json"] = body
        async with self.session.request(method, self.base + path, **kwargs) as resp:
            text = await resp.text()
            self.responses.append(text)
            try:
                return resp.status, await resp.json(content_type=None)
            except ValueError:
                return resp.status, text


async def start_control(state: Path, **conf: Any) -> tuple[ControlService, Store]:
    master = MasterKey.load_or_create(state / "master.key")
    store = Store.open(state, master)
    config = ControlConfig(state_dir=state, api_listen="127.0.0.1:0", **conf)
    metrics = ControlMetrics()
    service = ControlService(
        config, store, make_publisher_factory(state, metrics.registry), metrics=metrics
    )
    await service.start()
    return service, store


@pytest_asyncio.fixture
async def control(tmp_path: Path) -> AsyncIterator[Control]:
    service, store = await start_control(tmp_path)
    operator = add_token(store, None)
    async with aiohttp.ClientSession() as session:
        c = Control(
            tmp_path,
            service,
            store,
            f"http://127.0.0.1:{service.bound_ports[0]}",
            session,
            operator,
        )
        try:
            yield c
        finally:
            await service.stop()
            store.close()


def ipsec(name: str = "t1", n: int = 0, **kw: Any) -> dict[str, Any]:
    """A valid IPsec tunnel body; ``n`` picks a distinct /31."""
    body = {
        "name": name,
        "cloudflare_endpoint": "203.0.113.1",
        "customer_endpoint": f"198.51.100.{10 + n}",
        "interface_address": f"10.200.{n // 128}.{(n % 128) * 2}/31",
        "description": "test tunnel",
    }
    body.update(kw)
    return body


def gre(name: str = "g1", n: int = 100, **kw: Any) -> dict[str, Any]:
    body = {
        "name": name,
        "cloudflare_gre_endpoint": "203.0.113.2",
        "customer_gre_endpoint": f"198.51.100.{n}",
        "interface_address": f"10.201.0.{(n % 128) * 2}/31",
    }
    body.update(kw)
    return body
