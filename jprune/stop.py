"""Stopping a run on SIGINT or SIGTERM at the next block boundary, its journal consistent.

A long run on a shared machine gets signals: Ctrl-C, a scheduler's SIGTERM before a job's time
is up. Dying in the middle of a block loses nothing (the journal only ever names finished
blocks), but says nothing either. While a ``Signals`` context is active, the first SIGINT or
SIGTERM is noted and the run goes on to the end of the block it is in; ``Signals.check``,
called where the run's state is whole (after each block is journaled, between the run's
phases), then raises ``Interrupted``, which the command line turns into one line saying how to
resume and the exit status a shell gives a process killed by that signal (130, 143). A second
signal stops at once, like an unhandled one.

Handlers can only be installed from the main thread; elsewhere (a run started from a worker
thread) the context changes nothing and signals keep their usual effect. A multi-process run
keeps the usual effect too: one process stopping at a block boundary would leave the others
waiting in a collective.
"""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType

HANDLED = (signal.SIGINT, signal.SIGTERM)


class Interrupted(Exception):
    """The run stopped at a block boundary because it was sent ``signum``."""

    def __init__(self, signum: int, where: str):
        self.signum = signum
        self.where = where
        super().__init__(f"stopped by {signal.Signals(signum).name} {where}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class Signals:
    """``with Signals() as stop:`` ... ``stop.check("after block 3 of 30")``."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> Signals:
        if self.enabled:
            for signum in HANDLED:
                self._previous[signum] = signal.signal(signum, self._note)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _note(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None:  # the second one: stop now, as if unhandled
            self.__exit__()
            signal.raise_signal(signum)
            return
        self.received = signum
        name = signal.Signals(signum).name
        print(
            f"jprune: {name} received: stopping at the end of this block (send it again to "
            "stop at once)",
            file=sys.stderr,
            flush=True,
        )

    def check(self, where: str) -> None:
        """Raise ``Interrupted`` if a signal came; ``where`` names the point reached."""
        if self.received is not None:
            raise Interrupted(self.received, where)
