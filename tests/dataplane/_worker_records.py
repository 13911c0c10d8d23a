"""Record builders shared by the worker-side tests (sad, routes, worker)."""

from __future__ import annotations

import os

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

ACCOUNT_A = "acct-a"
ACCOUNT_B = "acct-b"
ANY4 = TrafficSelector.from_network("0.0.0.0/0")
ANY6 = TrafficSelector.from_network("::/0")


def tid(n: int) -> str:
    return f"{n:032x}"


def tunnel(
    n: int,
    *,
    account: str = ACCOUNT_A,
    kind: TunnelKind = TunnelKind.IPSEC,
    local: str = "192.0.2.1",
    remote: str | None = "198.51.100.2",
    iface: str = "10.100.0.0/31",
    mtu: int = 1400,
    gre_key: int | None = None,
) -> TunnelRecord:
    return TunnelRecord(
        account_id=account,
        tunnel_id=tid(n),
        kind=kind,
        name=f"t{n}",
        local_addr=local,
        remote_addr=remote,
        interface_address=iface,
        mtu=mtu,
        gre_key=gre_key,
    )


def route(
    n: int,
    prefix: str,
    tunnel_n: int,
    *,
    account: str = ACCOUNT_A,
    priority: int = 100,
    weight: int = 100,
) -> RouteRecord:
    return RouteRecord(
        account_id=account,
        route_id=f"{n:032x}",
        prefix=prefix,
        tunnel_id=tid(tunnel_n),
        priority=priority,
        weight=weight,
    )


def sa(
    spi: int,
    direction: Direction,
    *,
    tunnel_n: int = 1,
    account: str = ACCOUNT_A,
    cipher: Cipher = Cipher.AES256GCM16,
    integ: Integ | None = None,
    enc_key: bytes | None = None,
    integ_key: bytes | None = None,
    salt: bytes | None = None,
    udp_encap: bool = False,
    local: str = "192.0.2.1",
    remote: str = "198.51.100.2",
    remote_port: int = 0,
    replay_window: int = 0,
    ts_local: tuple[TrafficSelector, ...] = (ANY4, ANY6),
    ts_remote: tuple[TrafficSelector, ...] = (ANY4, ANY6),
    generation: int = 0,
    child_id: int = 1,
    created: float = 1000.0,
    expire_at: float = 0.0,
) -> SaRecord:
    aead = cipher in (Cipher.AES128GCM16, Cipher.AES256GCM16)
    klen = {
        Cipher.AES128GCM16: 16,
        Cipher.AES256GCM16: 32,
        Cipher.AES128CBC: 16,
        Cipher.AES256CBC: 32,
        Cipher.NULL: 0,
    }[cipher]
    if integ is None:
        integ = Integ.NONE if aead else Integ.SHA256_128
    ilen = {Integ.NONE: 0, Integ.SHA256_128: 32, Integ.SHA1_96: 20}[integ]
    return SaRecord(
        account_id=account,
        tunnel_id=tid(tunnel_n),
        spi=spi,
        direction=direction,
        local_addr=local,
        remote_addr=remote,
        udp_encap=udp_encap,
        local_port=4500 if udp_encap else 0,
        remote_port=remote_port or (4500 if udp_encap else 0),
        cipher=cipher,
        integ=integ,
        enc_key=enc_key if enc_key is not None else os.urandom(klen),
        salt=salt if salt is not None else (os.urandom(4) if aead else b""),
        integ_key=integ_key if integ_key is not None else os.urandom(ilen),
        replay_window=replay_window,
        ts_local=ts_local,
        ts_remote=ts_remote,
        child_id=child_id,
        generation=generation,
        created=created,
        rekey_at=0.0,
        expire_at=expire_at,
    )
