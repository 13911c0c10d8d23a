"""Mutation fuzzer over live valid exchanges: a few thousand messages in CI.

``python -m bench.ike --fuzz`` runs the same for 100 000+ messages.
"""

from __future__ import annotations

import pytest

from .fuzzing import fuzz_run


@pytest.mark.parametrize("chunk", range(8))
def test_mutated_exchanges_never_raise_and_stay_bounded(chunk: int) -> None:
    total = 0
    for seed in range(chunk * 10, chunk * 10 + 10):
        sent, pair = fuzz_run(seed)
        total += sent
        # the engines end clean: everything deleted or timed out, no timers left
        assert not pair.server.sas and not pair.server.half_open, (seed, pair.server.sas)
        assert not pair.server.spis_in_use
        assert pair.server.get_timer() is None
    assert total >= 300
