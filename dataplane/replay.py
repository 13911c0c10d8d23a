"""ESP anti-replay window, RFC 4303 §3.4.3 and Appendix A2.

https://www.rfc-editor.org/rfc/rfc4303#section-3.4.3

The window is a bitmap anchored at the highest authenticated sequence number
seen (``top``). Bit ``i`` of the bitmap says whether ``top - i`` has been
received. Python ints are arbitrary precision, so a 4096-packet window is one
int shift per advancing packet; no per-packet allocation beyond that.

The caller (``dataplane.esp.InboundSa``) consults the window only after the
ICV verified, with :meth:`ReplayWindow.accept` (= :meth:`~ReplayWindow.check`
then :meth:`~ReplayWindow.update` in one call), so a forged packet can neither
be told apart from a replay nor move the window
(RFC 4303 §3.4.3: "the receive window is updated only if the integrity
verification succeeds"). Extended sequence numbers are not supported (the
seeds forbid ESN; DESIGN §3), so sequence numbers are 32-bit.
"""

from __future__ import annotations

MAX_WINDOW = 4096
"""Largest window accepted; matches ``replication.records.MAX_REPLAY_WINDOW``."""

_MAX_SEQ = 0xFFFFFFFF


class ReplayWindow:
    """Sliding anti-replay window of ``size`` packets (1..4096)."""

    __slots__ = ("_bits", "_mask", "size", "top")

    def __init__(self, size: int) -> None:
        if not isinstance(size, int) or isinstance(size, bool) or not 0 < size <= MAX_WINDOW:
            raise ValueError(f"replay window size must be in 1..{MAX_WINDOW}")
        self.size = size
        """Window width in packets."""
        self.top = 0
        """Highest authenticated sequence number seen; 0 before the first packet.
        What a checkpoint saves; :meth:`restore` resumes from it."""
        self._bits = 0
        self._mask = (1 << size) - 1

    def check(self, seq: int) -> bool:
        """True if ``seq`` is new: right of the window, or inside it and unseen.

        Sequence number 0 is never valid: the first packet an SA sends carries 1
        (RFC 4303 §3.3.3), so 0 can only be a forgery or a counter wrap.
        """
        if seq <= 0 or seq > _MAX_SEQ:
            return False
        top = self.top
        if seq > top:
            return True
        diff = top - seq
        if diff >= self.size:
            return False
        return not (self._bits >> diff) & 1

    def update(self, seq: int) -> None:
        """Record ``seq`` as received; call only after :meth:`check` said True
        and the packet's ICV verified."""
        top = self.top
        if seq > top:
            shift = seq - top
            self._bits = ((self._bits << shift) | 1) & self._mask if shift < self.size else 1
            self.top = seq
        else:
            self._bits |= 1 << (top - seq)

    def accept(self, seq: int) -> bool:
        """:meth:`check` and, if new, :meth:`update` in one call (the hot path);
        call only for a packet whose ICV verified."""
        top = self.top
        if seq > top:
            if seq > _MAX_SEQ:
                return False
            shift = seq - top
            self._bits = ((self._bits << shift) | 1) & self._mask if shift < self.size else 1
            self.top = seq
            return True
        diff = top - seq
        if seq <= 0 or diff >= self.size or (self._bits >> diff) & 1:
            return False
        self._bits |= 1 << diff
        return True

    def restore(self, top: int) -> None:
        """Resume from a checkpointed ``top`` (DESIGN §5: windows are per worker
        and checkpointed): everything at or below it counts as seen, so nothing
        received before the checkpoint can be replayed; packets that were in
        flight below it are lost instead, the safe side."""
        if not 0 <= top <= _MAX_SEQ:
            raise ValueError("sequence number out of range")
        self.top = top
        self._bits = self._mask if top else 0

    def __repr__(self) -> str:
        return f"ReplayWindow(size={self.size}, top={self.top})"
