"""SIGTERM/SIGINT: note the time, let the loop stop at its next safe point; a second
SIGINT (Ctrl-C again) stops at once.

The safe points are between steps, validation images and cache batches, so a first signal
waits for the work in flight: a first step that compiles the blocks can take minutes. A
person at the terminal can press Ctrl-C again to stop then and there: the job raises
ForcedStop where it is, writes no checkpoint (a step cut short is no state to save; the
last complete checkpoint stays, as after a kill), writes summary.json (preempted, exit 143)
and exits. Only SIGINT forces, and only a second or more after the signal before it: a
launcher that passes a Ctrl-C on to its workers, or a scheduler's repeated SIGTERM, does
not cut a step short. This is for a job of one process: `accelerate launch` and torchrun
start their workers in sessions of their own, where a terminal's Ctrl-C does not reach
them; the launcher passes its first signal on and kills them after its shutdown timeout.
"""

from __future__ import annotations

import os
import signal
import time
from types import FrameType

# A second SIGINT this soon after the first is the same Ctrl-C passed on by a launcher.
FORCE_AFTER_S = 1.0


class ForcedStop(BaseException):
    """A second SIGINT: stop now, mid-step. A BaseException, as KeyboardInterrupt is, so that
    no library's `except Exception` (torch.compile wraps its backends' errors) swallows it."""


class StopSignal:
    """Set by SIGTERM or SIGINT; tells how much of the grace period is left."""

    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self.received_at: float | None = None
        self.signal_name: str | None = None
        self.forced = False
        # Cleared once the run is unwinding or writing its summary: no ForcedStop after that.
        self.can_force = True
        self._last_at: float | None = None
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
        now, last = time.monotonic(), self._last_at
        self._last_at = now
        if self.received_at is None:
            self.received_at = now
            self.signal_name = signal.Signals(signum).name
            again = (" Press Ctrl-C again to stop at once, without a checkpoint."
                     if signum == signal.SIGINT else "")
            _say(f"tunejob: {self.signal_name} received: stopping at the next safe point "
                 f"(after the step, image or cache batch in flight), then a checkpoint if it "
                 f"fits the grace, summary.json and exit 143.{again}")
            return
        # Until the run has caught one (it clears can_force): a ForcedStop raised where
        # Python cannot pass it on (a __del__, a weakref callback) is not the last chance.
        if signum == signal.SIGINT and self.can_force and now - last >= FORCE_AFTER_S:
            self.forced = True
            _say("tunejob: SIGINT again: stopping now, without a checkpoint.")
            raise ForcedStop("stopped at once by a second SIGINT")

    def should_stop(self) -> bool:
        """True once a stop signal arrived."""
        return self.received_at is not None

    def seconds_left(self) -> float:
        """Grace left before the scheduler's kill (inf while no signal came)."""
        if self.received_at is None:
            return float("inf")
        return self.grace_s - (time.monotonic() - self.received_at)


def _say(line: str) -> None:
    """One line on stderr straight through the file descriptor: a signal handler may run
    while the main thread is inside a buffered write to the same stream."""
    try:
        os.write(2, (line + "\n").encode())
    except OSError:
        pass
