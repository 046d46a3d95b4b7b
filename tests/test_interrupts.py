"""held_interrupts: Ctrl-C while a search closes its runs, delivered as real signals to this process."""
import os
import signal
import time

import pytest

from search.interrupts import HELD_NOTICE, CloseAbandoned, held_interrupts


def _press(signum=signal.SIGINT):
    """Send the signal to this process and give Python the moment it takes to run the handler."""
    os.kill(os.getpid(), signum)
    time.sleep(0.05)


def test_one_press_while_the_runs_close_is_held_and_the_close_finishes(capsys):
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    closed = []
    with held_interrupts():
        _press()
        closed.append("runs")  # what a KeyboardInterrupt would have skipped
    assert closed == ["runs"]
    assert capsys.readouterr().err.strip() == HELD_NOTICE
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


@pytest.mark.parametrize("second", [signal.SIGINT, signal.SIGTERM])
def test_a_second_press_quits_and_the_handlers_come_back(second):
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    reached = []
    with pytest.raises(CloseAbandoned):
        with held_interrupts():
            _press()
            _press(second)
            reached.append("after the second press")
    assert reached == []
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    with pytest.raises(KeyboardInterrupt):  # outside the block, Ctrl-C interrupts as before
        _press()


def test_blocks_that_share_their_presses_count_them_together():
    """run.py holds two blocks (the proposals' metrics, then the runs' close): a press in each is two presses."""
    presses = []
    with held_interrupts(presses):
        _press()
    with pytest.raises(CloseAbandoned):
        with held_interrupts(presses):
            _press()
