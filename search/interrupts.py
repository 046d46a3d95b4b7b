"""held_interrupts(): a Ctrl-C pressed while a search closes its runs (or its Ray) waits for that; another quits."""
from __future__ import annotations

import signal
import sys
import threading
from contextlib import contextmanager
from typing import Iterator


class CloseAbandoned(KeyboardInterrupt):
    """Ctrl-C pressed again while the runs were closing: some may be left RUNNING."""


HELD_NOTICE = ("effsearch: closing the search's runs in MLflow (a few seconds); press Ctrl-C again to quit now and "
               "leave them RUNNING (`effsearch search JOB --resume` continues it)")
RAY_STOP_NOTICE = ("effsearch: stopping the local Ray (a few seconds); press Ctrl-C again to quit now and leave its "
                   "processes running")


@contextmanager
def held_interrupts(pressed: list[int] | None = None, notice: str = HELD_NOTICE) -> Iterator[None]:
    """While the block runs, the first SIGINT or SIGTERM prints the notice and is otherwise ignored, and the next
    raises CloseAbandoned. A user who presses Ctrl-C twice (the first press starts the close) would otherwise
    cut the close short and leave runs RUNNING. Blocks that share `pressed` count the presses together. The
    handlers are restored after; in a thread other than the main one, where Python cannot set handlers, the block
    runs unguarded."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pressed = [] if pressed is None else pressed

    def hold(signum, frame):
        if pressed:
            raise CloseAbandoned
        pressed.append(signum)
        print(notice, file=sys.stderr, flush=True)

    previous = {signum: signal.signal(signum, hold) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)  # None: not set from Python
