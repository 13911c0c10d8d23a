"""No PSK, token or SA key in any log line, response, metric or error.

One session exercises everything that handles a secret (PSK on create, on
update, generated; bad PSKs; tokens good and bad; SA records with keys; the
metrics page) with every logger at DEBUG, then greps all log records and all
response bodies for every secret used. The generated PSK must appear in
exactly one place: the psk_generate answer."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import aiohttp
import pytest

from control.ike.events import ChildSaInstalled
from control.secrets import generate_token
from replication.records import Cipher, Direction, Integ, SaRecord, TrafficSelector
from tests.control.api_support import Control, add_token, ipsec, start_control


def _sa(tid: str, spi: int, d: Direction, key: bytes) -> SaRecord:
    ts = (TrafficSelector.from_network("0.0.0.0/0"),)
    return SaRecord(
        "acct-a", tid, spi, d, "203.0.113.1", "198.51.100.10", False, 0, 0,
        Cipher.AES256CBC, Integ.SHA256_128, key, b"", key, 0, ts, ts, 1, 0,
        time.time(), 0, 0,
    )  # fmt: skip


async def test_no_secret_in_logs_responses_or_metrics(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    service, store = await start_control(tmp_path)
    operator = add_token(store, None)
    acct_token = add_token(store, "acct-a")
    given_psk = "given-PSK-v8Qm2Lx5"
    update_psk = "update-PSK-Rk3nW9z"
    bad_psk = "Bd7-psk"  # too short: refused, must not be echoed
    wrong_token = generate_token()
    sa_key = os.urandom(32)
    async with aiohttp.ClientSession() as session:
        c = Control(tmp_path, service, store, f"http://127.0.0.1:{service.bound_ports[0]}",
                    session, operator, {"acct-a": acct_token})  # fmt: skip
        try:
            A = "/accounts/acct-a/magic/ipsec_tunnels"
            _, t = await c.call("POST", A, ipsec(psk=given_psk), account="acct-a")
            tid = t["result"]["id"]
            await c.call("POST", A, ipsec("b", n=1, psk=bad_psk), account="acct-a")
            await c.call("POST", A, {"ipsec_tunnels": [{"psk": given_psk}]}, account="acct-a")
            await c.call("PUT", f"{A}/{tid}", {"psk": update_psk}, account="acct-a")
            await c.call("PUT", f"{A}/{tid}", {"psk": 12345678}, account="acct-a")
            await c.call("POST", f"{A}/{tid}/psk_generate", account="acct-a")
            generated = [
                r for r in c.responses if '"psk": "' in r
            ]  # the one response that carries a PSK
            assert len(generated) == 1
            gen_psk = generated[0].split('"psk": "')[1].split('"')[0]
            await c.call("GET", f"{A}/{tid}", account="acct-a")
            await c.call("GET", A, token=wrong_token)
            await c.call("GET", A, token=operator[:-1])
            service.on_ike_event(
                ChildSaInstalled(
                    tid, "acct-a", _sa(tid, 0x5000, Direction.IN, sa_key),
                    _sa(tid, 0x6000, Direction.OUT, sa_key), None,
                )
            )  # fmt: skip
            await c.call("GET", f"{A}/{tid}/sas", account="acct-a")
            async with session.get(
                c.base + "/metrics", headers={"Authorization": f"Bearer {operator}"}
            ) as resp:
                c.responses.append(await resp.text())
            await c.call("DELETE", f"{A}/{tid}", account="acct-a")
        finally:
            await service.stop()
            store.close()

    logs = "\n".join(f"{r.getMessage()} {r.exc_text or ''}" for r in caplog.records)
    assert f"PSK of tunnel {tid}" in logs  # logging really was captured
    secrets = {
        "given psk": given_psk, "update psk": update_psk, "bad psk": bad_psk,
        "operator token": operator, "account token": acct_token, "wrong token": wrong_token,
        "sa key hex": sa_key.hex(), "generated psk": gen_psk,
    }  # fmt: skip
    for what, secret in secrets.items():
        assert secret not in logs, f"{what} in logs"
        if what == "sa key hex":
            assert all(secret not in r for r in c.responses), what
    for what, secret in secrets.items():
        hits = sum(secret in r for r in c.responses)
        assert hits == (1 if what == "generated psk" else 0), (what, hits)
    assert any("psk: must be 8 to 256" in r for r in c.responses)
    assert repr(_sa("a" * 32, 0x7000, Direction.IN, sa_key)).count(sa_key.hex()) == 0
