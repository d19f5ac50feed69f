"""SIGTERM/SIGINT: note the time, let the loop stop at its next safe point."""

from __future__ import annotations

import signal
import time
from types import FrameType


class StopSignal:
    """Set by SIGTERM or SIGINT; tells how much of the grace period is left."""

    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self.received_at: float | None = None
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> "StopSignal":
        """Handle SIGTERM and SIGINT in this (main) thread."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        """Put the previous handlers back."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received_at is None:
            self.received_at = time.monotonic()
            self.signal_name = signal.Signals(signum).name

    def should_stop(self) -> bool:
        """True once a stop signal arrived."""
        return self.received_at is not None

    def seconds_left(self) -> float:
        """Grace left before the scheduler's kill (inf while no signal came)."""
        if self.received_at is None:
            return float("inf")
        return self.grace_s - (time.monotonic() - self.received_at)
