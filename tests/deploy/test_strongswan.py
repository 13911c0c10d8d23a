"""deploy/strongswan.py: config rendering and the --raw parser (pure), then two
real charons (kernel-libipsec) in namespaces with traffic through the tunnel
(netns prefix ``awt-i-s-``)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from deploy.netns import Topology
from deploy.strongswan import Charon, Child, Connection, ike_sas, swanctl_conf

PSK = b"interop-test-psk-0123456789abcdef"

RAW = (
    "list-sa event {site {uniqueid=3 version=2 state=ESTABLISHED local-host=192.0.2.1 "
    "local-port=4500 remote-port=4500 encr-alg=AES_CBC encr-keysize=256 "
    "integ-alg=HMAC_SHA2_256_128 prf-alg=PRF_HMAC_SHA2_256 dh-group=MODP_2048 "
    "child-sas {net-7 {name=net state=INSTALLED encap=yes spi-in=c1a2b3c4 "
    "local-ts=[10.1.0.0/24 10.9.0.0/16] remote-ts=[10.2.0.0/24]} "
    "net-8 {name=net state=REKEYED local-ts=[] remote-ts=[10.2.0.0/24]}} tasks-active=[]}}\n"
    "list-sas reply {}\n"
)


def test_parse_list_sas_raw() -> None:
    (sa,) = ike_sas(RAW)
    assert sa["name"] == "site" and sa["state"] == "ESTABLISHED"
    assert (sa["encr-alg"], sa["dh-group"], sa["remote-port"]) == ("AES_CBC", "MODP_2048", "4500")
    assert sa["tasks-active"] == []
    c7, c8 = sa["child-sas"]
    assert c7["spi-in"] == "c1a2b3c4" and c7["encap"] == "yes"
    assert c7["local-ts"] == ["10.1.0.0/24", "10.9.0.0/16"]
    assert c8["state"] == "REKEYED" and c8["local-ts"] == []
    assert ike_sas("list-sas reply {}\n") == []


def test_swanctl_conf_holds_secret_but_repr_does_not() -> None:
    conn = Connection(
        "t1",
        "192.0.2.1",
        "203.0.113.1",
        "fqdn:t1.acct.example",
        "203.0.113.1",
        PSK,
        proposals=["aes256-sha256-prfsha256-modp2048"],
        children=[Child("net", ["10.1.0.0/24"], ["0.0.0.0/0"], ["aes128-sha1-modp1536"])],
        local_port=4500,
        remote_port=4500,
    )
    text = swanctl_conf([conn])
    assert "secret = 0x" + PSK.hex() in text
    assert "local_port = 4500" in text and "encap = yes" in text
    assert "esp_proposals = aes128-sha1-modp1536" in text
    assert PSK.hex() not in repr(conn) and "interop-test-psk" not in repr(conn)
    with pytest.raises(ValueError):
        swanctl_conf([Connection("x", "a", "b", "c", "d", 'bad"psk')])


def site_pair(topo: Topology, *, port: int = 500) -> tuple[Charon, Charon]:
    a, b = topo.namespace("a"), topo.namespace("b")
    topo.veth(a, "a0", b, "b0", addr_a="192.0.2.1/24", addr_b="192.0.2.2/24")
    a.addr("lo", "10.1.0.1/32")
    b.addr("lo", "10.2.0.1/32")
    ca, cb = Charon(a, name="site-a"), Charon(b, name="site-b")
    ca.start()
    cb.start()
    ca.load(
        [
            Connection(
                "site",
                "192.0.2.1",
                "192.0.2.2",
                "a.example",
                "b.example",
                PSK,
                local_port=port,
                remote_port=port,
                children=[Child("net", ["10.1.0.0/24"], ["10.2.0.0/24"])],
            )
        ]
    )
    cb.load(
        [
            Connection(
                "site",
                "192.0.2.2",
                "192.0.2.1",
                "b.example",
                "a.example",
                PSK,
                children=[Child("net", ["10.2.0.0/24"], ["10.1.0.0/24"])],
            )
        ]
    )
    return ca, cb


UDP_ECHO = (
    "import socket;s=socket.socket(2,2);s.bind(('10.2.0.1',7));print('ready',flush=True)\n"
    "for _ in range(3):\n d,p=s.recvfrom(100);s.sendto(d,p)"
)
UDP_PING = (
    "import socket;s=socket.socket(2,2);s.settimeout(3);s.bind(('10.1.0.1',0))\n"
    "for i in range(3):\n s.sendto(b'ping%d'%i,('10.2.0.1',7));print(s.recvfrom(100)[0].decode())"
)


@pytest.mark.netns
@pytest.mark.strongswan
def test_two_charons_carry_traffic_through_libipsec(netns_topology) -> None:
    """The strongSwan-to-strongSwan baseline: IKE floats to 4500, ESP is
    UDP-encapsulated, the route to the remote subnet goes through ipsec0 in
    table 220, and datagrams cross the tunnel both ways."""
    topo: Topology = netns_topology("awt-i-s-")
    ca, cb = site_pair(topo)
    try:
        ca.initiate(child="net")
        (sa,) = ca.established("site")
        assert sa["remote-port"] == "4500" and sa["dh-group"] == "ECP_384"
        (child,) = sa["child-sas"]
        assert child["state"] == "INSTALLED" and child["encap"] == "yes"
        a, b = topo.namespaces["a"], topo.namespaces["b"]
        routes = a.run(["ip", "route", "show", "table", "220"]).stdout
        assert "10.2.0.0/24 dev ipsec0" in routes and "src 10.1.0.1" in routes
        echo = b.popen([sys.executable, "-c", UDP_ECHO], stdout=subprocess.PIPE)
        assert echo.stdout is not None and echo.stdout.readline().strip() == b"ready"
        out = a.run([sys.executable, "-c", UDP_PING]).stdout.split()
        assert out == ["ping0", "ping1", "ping2"]
        (child,) = cb.established("site")[0]["child-sas"]
        assert int(child["packets-in"]) == 3 and int(child["packets-out"]) == 3

        # Rekey the Child SA from the responder side: new SPIs, old ones gone.
        old_spi = child["spi-in"]
        cb.rekey(child="net")

        def rekeyed() -> bool:
            kids = cb.established("site")[0]["child-sas"]
            return len(kids) == 1 and kids[0]["spi-in"] != old_spi

        assert cb.wait_for(rekeyed, timeout=10), cb.list_sas()
        ca.terminate(ike="site")
        assert cb.wait_for(lambda: not cb.list_sas(), timeout=10)
        assert ca.log_lines(r"IKE_SA site\[\d+\] established")
    finally:
        ca.stop()
        cb.stop()


@pytest.mark.netns
@pytest.mark.strongswan
def test_start_on_4500_and_stop_by_pid(netns_topology) -> None:
    topo: Topology = netns_topology("awt-i-s-")
    ca, cb = site_pair(topo, port=4500)
    try:
        out = ca.initiate(child="net")
        assert "from 192.0.2.1[4500] to 192.0.2.2[4500]" in out.split("IKE_SA_INIT request")[1]
        assert ca.established("site")
    finally:
        ca.stop()
        cb.stop()
    assert ca.proc is not None and ca.proc.poll() is not None
    assert not ca.dir.exists()


LEVEL4_LOG = """\
02:00:39 08[IKE] <t1|1> Sk_d secret => 20 bytes @ 0x7f1
02:00:39 08[IKE] <t1|1>    0: 00 01 02 03 04 05 06 07 08 09 0A 0B 0C 0D 0E 0F  ................
02:00:39 08[IKE] <t1|1>   16: 10 11 12 13                                      ....
02:00:39 08[IKE] <t1|1> Sk_ei secret => 4 bytes @ 0x7f2
02:00:39 08[IKE] <t1|1>    0: DE AD BE EF                                      ....
02:00:39 08[IKE] <t1|1> secret => 4 bytes @ 0x7f3
02:00:39 08[IKE] <t1|1>    0: 70 73 6B 21                                      psk!
02:00:40 11[IKE] <t1|2> Sk_d secret => 2 bytes @ 0x7f4
02:00:40 11[IKE] <t1|2>    0: AB CD                                            ..
"""


def test_parse_ike_keys_groups_per_sa_and_log_hides_hex_dumps(tmp_path) -> None:
    from deploy.strongswan import parse_ike_keys

    first, second = parse_ike_keys(LEVEL4_LOG)
    assert first["sk_d"] == bytes(range(20)) and first["sk_ei"] == bytes.fromhex("deadbeef")
    assert "secret" not in first  # the PSK dump is not a key of ours to return
    assert second == {"sk_d": b"\xab\xcd"}

    class NoNs:
        name = "none"

    charon = Charon(NoNs(), tmp_path, name="offline")  # type: ignore[arg-type]
    charon.log_path.write_text(LEVEL4_LOG)
    assert "psk!" not in charon.log() and "70 73 6B 21" not in charon.log()
    assert "Sk_ei secret => 4 bytes" in charon.log()
    assert "70 73 6B 21" in charon.log(raw=True)
    assert charon.ike_keys()[0]["sk_ei"] == bytes.fromhex("deadbeef")
