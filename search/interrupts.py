"""held_interrupts(): a Ctrl-C pressed while a search closes its runs or its Ray waits for that; the next stops."""
from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager
from typing import Iterator


class CloseAbandoned(KeyboardInterrupt):
    """Ctrl-C pressed again while the runs were closing: some may be left RUNNING."""


HELD_NOTICE = ("effsearch: closing the search's runs in MLflow (a few seconds); press Ctrl-C again to stop waiting "
               "and leave them RUNNING (`effsearch search JOB --resume` continues it)")
RAY_STOP_NOTICE = ("effsearch: stopping the local Ray (a few seconds); press Ctrl-C again to stop waiting and leave "
                   "its processes to Ray's own exit hook")
# The presses held in this process: a search's close and the CLI's Ray stop count them together, so that the press
# after a held one always stops the waiting.
PRESSES: list[int] = []


@contextmanager
def held_interrupts(notice: str = HELD_NOTICE, pressed: list[int] | None = None) -> Iterator[None]:
    """While the block runs, a SIGINT or SIGTERM prints the notice and is otherwise ignored, unless one was held
    before (in `pressed`, the process's PRESSES by default): then it raises CloseAbandoned. A user who presses
    Ctrl-C twice (the first press starts the close) would otherwise cut the close short and leave runs RUNNING.
    A signal the process ignores (SIG_IGN, as under nohup) stays ignored, and the handlers are restored after; in
    a thread other than the main one, where Python cannot set handlers, the block runs unguarded."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pressed = PRESSES if pressed is None else pressed

    def hold(signum, frame):
        if pressed:
            raise CloseAbandoned
        pressed.append(signum)
        os.write(2, f"{notice}\n".encode())  # not print: the signal may land inside a write to sys.stderr

    previous = {}
    try:
        for signum in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(signum) not in (signal.SIG_IGN, None):  # None: a handler not set from Python
                previous[signum] = signal.signal(signum, hold)
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
