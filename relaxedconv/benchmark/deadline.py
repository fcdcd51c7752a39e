"""A time limit for one measurement, so a slow row cannot take the rest of a benchmark run with it.

:func:`row_deadline` raises :class:`RowTimeout` in the main thread once ``seconds`` have passed —
between Python operations, so a step already queued on the GPU finishes, a Triton compile in
progress returns first, and nothing is torn down mid-kernel. The caller records the row as
``timeout`` and drains the device before the next row. Off the main thread (where signals cannot
be delivered) or on a platform without ``setitimer`` the limit is not enforced and the caller's
own loop bounds still apply.
"""
from __future__ import annotations

import contextlib
import signal
import threading


class RowTimeout(Exception):
    """The measurement ran past its time limit."""


@contextlib.contextmanager
def row_deadline(seconds: float | None):
    """Raise :class:`RowTimeout` inside the ``with`` block after ``seconds`` (None or <= 0: no limit)."""
    usable = (
        seconds is not None and seconds > 0 and hasattr(signal, "setitimer")
        and threading.current_thread() is threading.main_thread()
    )
    if not usable:
        yield
        return

    def fire(signum, frame):
        raise RowTimeout(f"ran past its {seconds:g} s time limit (--row-time-limit)")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
