"""Mutation fuzzing of live, valid IKEv2 exchanges (used by test_fuzz.py and bench/ike.py).

Each run drives a real initiator↔responder pair through every exchange (IKE_SA_INIT,
IKE_AUTH, CREATE_CHILD_SA new/rekey/IKE rekey, INFORMATIONAL DPD/DELETE). Every
datagram on the wire is preceded by mutants of itself, delivered to the same
receiver: outer mutations (bit flips, truncation, growth, header and length
fields) and, for encrypted messages, mutations of the INNER payload chain that
are re-encrypted with the sender's real keys, so they pass the ICV and reach
the payload parsers and state machine. Invariants: no exception escapes
(``IkeConfig.strict`` re-raises internal errors), state stays bounded.
"""

from __future__ import annotations

import random

from control.ike import messages as wire
from control.ike.crypto import SkCipher
from control.ike.engine import IkeConfig

from .pair import TUNNEL, Pair, make_pair


def _mutate_bytes(rnd: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    op = rnd.randrange(8)
    if op == 0 and b:
        for _ in range(rnd.randint(1, 4)):
            i = rnd.randrange(len(b))
            b[i] ^= 1 << rnd.randrange(8)
    elif op == 1 and b:
        b[rnd.randrange(len(b))] = rnd.choice([0, 1, 0x7F, 0x80, 0xFF, rnd.randrange(256)])
    elif op == 2 and len(b) > 1:
        del b[rnd.randrange(len(b)) :]
    elif op == 3:
        pos = rnd.randrange(len(b) + 1)
        b[pos:pos] = bytes(rnd.randrange(256) for _ in range(rnd.randint(1, 16)))
    elif op == 4 and len(b) >= 4:
        i = rnd.randrange(len(b) - 1)  # a 16-bit length-like field
        b[i : i + 2] = rnd.choice([0, 1, 3, 4, 0xFFFF, len(b), rnd.randrange(65536)]).to_bytes(
            2, "big"
        )
    elif op == 5 and b:
        i = rnd.randrange(len(b))  # a payload type / next-payload-like byte
        b[i] = rnd.choice([0, 33, 34, 35, 36, 39, 40, 41, 42, 44, 45, 46, 47, 53, 200])
    elif op == 6 and len(b) > 8:
        i, j = sorted(rnd.sample(range(len(b)), 2))
        b[i:j] = b[i:j][::-1]
    else:
        b += b[: rnd.randint(0, min(len(b), 64))]
    return bytes(b)


def _fix_length(data: bytes) -> bytes:
    if len(data) < 28:
        return data
    b = bytearray(data)
    b[24:28] = len(b).to_bytes(4, "big")
    return bytes(b)


def reseal(cipher: SkCipher, data: bytes, plain: bytes, first: int, iv: bytes) -> bytes:
    """Same header, new inner chain, encrypted and ICV'd with the real keys."""
    sk_len = 4 + cipher.overhead(len(plain))
    header = bytearray(data[:28])
    header[24:28] = (28 + sk_len).to_bytes(4, "big")
    sk_header = bytes([first & 0xFF, 0]) + sk_len.to_bytes(2, "big")
    return bytes(header) + sk_header + cipher.seal(bytes(header), sk_header, plain, iv)


def mutants(
    pair: Pair, rnd: random.Random, data: bytes, to_server: bool, n: int, *, outer_only: bool
) -> list[bytes]:
    out: list[bytes] = []
    sender = pair.client if to_server else pair.server
    inner: tuple[SkCipher, bytes, int] | None = None
    try:
        msg = wire.decode(data)
        spi = msg.header.spi_i if msg.header.from_initiator else msg.header.spi_r
        sa = sender.sas.get(spi)
        if msg.sk_offset is not None and sa is not None and sa.sk_out is not None:
            plain = sa.sk_out.open(data, msg.sk_offset)
            inner = (sa.sk_out, plain, msg.sk_first)
    except Exception:  # the seed is always valid; be safe anyway
        inner = None
    for _ in range(n):
        kind = rnd.random()
        if inner is not None and kind < 0.6 and not outer_only:
            cipher, plain, first = inner
            new_first = first if rnd.random() < 0.8 else rnd.choice([0, 33, 41, 42, 44, 200])
            iv = rnd.randbytes(cipher.iv_len)
            out.append(reseal(cipher, data, _mutate_bytes(rnd, plain), new_first, iv))
        elif kind < 0.8:
            out.append(_fix_length(_mutate_bytes(rnd, data)))
        else:
            out.append(_mutate_bytes(rnd, data))
    return out


def fuzz_run(seed: int, per_message: int = 2, burst: int = 40) -> tuple[int, Pair]:
    """One scenario; returns (mutants sent, pair).

    Every real datagram is preceded by ``per_message`` outer mutants (they rarely
    change state), and the ``seed % 20``-th datagram by a ``burst`` of mutants
    that also rewrite the encrypted inner chain — so over many seeds every step
    of the scenario gets its burst and the state machine sees each state."""
    rnd = random.Random(seed)
    target = seed % 20
    index = 0
    cfg = IkeConfig(strict=True, dpd_interval=50, retransmit_timeout=1.0, retransmit_tries=3)
    pair = make_pair(config=cfg, client_config=IkeConfig(strict=True, dpd_interval=50))
    sent = 0

    def deliver(
        data: bytes, to_server: bool, local: tuple[str, int], remote: tuple[str, int]
    ) -> None:
        nonlocal sent, index
        burst_here = index == target
        index += 1
        # Outer mutants go to the responder only; a mutated unauthenticated
        # IKE_SA_INIT response taken by our initiator would end the scenario early.
        n = burst if burst_here else (per_message if to_server else 0)
        receiver = pair.server if to_server else pair.client
        for m in mutants(pair, rnd, data, to_server, n, outer_only=not burst_here):
            receiver.receive_datagram(m, remote, local, pair.now)
            sent += 1
        receiver.receive_datagram(data, remote, local, pair.now)

    def transfer() -> int:
        moved = 0
        for data, local, remote in pair.client.datagrams_to_send():
            deliver(data, True, local, remote)
            moved += 1
        for data, local, remote in pair.server.datagrams_to_send():
            deliver(data, False, local, remote)
            moved += 1
        pair.collect()
        check_bounded(pair)
        return moved

    pair.transfer = transfer  # type: ignore[method-assign]
    pair.connect(ike_suites=None)
    steps = [
        lambda: pair.client.create_child(TUNNEL, pair.now),
        lambda: pair.client.rekey_child(TUNNEL, pair.now),
        lambda: pair.server.rekey_child(TUNNEL, pair.now),
        lambda: pair.client.rekey_ike(TUNNEL, pair.now),
        lambda: pair.server.send_dpd(TUNNEL, pair.now),
        lambda: pair.client.send_dpd(TUNNEL, pair.now),
        lambda: pair.server.rekey_ike(TUNNEL, pair.now),
        lambda: pair.client.delete_tunnel(TUNNEL, pair.now),
    ]
    for step in steps:
        step()
        pair.roundtrip()
        pair.step(rnd.choice([0.1, 1.5, 4.0]))
    pair.step(120)  # let every timer (retransmit, half-open, linger) run out
    check_bounded(pair)
    return sent, pair


def check_bounded(pair: Pair) -> None:
    for eng in (pair.client, pair.server):
        assert len(eng.sas) <= eng.config.max_half_open_per_peer + 8, eng.sas
        assert len(eng.half_open) <= eng.config.max_half_open_per_peer
        children = sum(len(sa.children) for sa in eng.sas.values())
        assert children <= 16
        assert len(eng.spis_in_use) <= 2 * children + 8
        for sa in eng.sas.values():
            assert len(sa.queue) <= 16
