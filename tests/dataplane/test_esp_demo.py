"""``python -m deploy.demo`` (the newcomer's first command) succeeds and shows
every transform interoperating with scapy in both directions."""

from __future__ import annotations

import pytest

from deploy import demo


def test_demo_table_all_ok(capsys: pytest.CaptureFixture[str]) -> None:
    assert demo.main([]) == 0
    out = capsys.readouterr().out
    table = [line for line in out.splitlines() if "IPv4 ICMP" in line or "IPv6 UDP" in line]
    assert len(table) == 2 * len(demo.TRANSFORMS)
    assert all(line.split()[-2:] == ["ok", "ok"] for line in table)
    assert "KEEPALIVE" in out and "all transforms interoperate" in out
