"""held_interrupts: Ctrl-C while a search closes its runs, delivered as real signals to this process."""
import os
import signal
import time

import pytest

from search.interrupts import HELD_NOTICE, CloseAbandoned, held_interrupts


@pytest.fixture(autouse=True)
def ctrl_c_interrupts():
    """Ctrl-C raising KeyboardInterrupt, as in a terminal: a runner started in the background (a shell's `&`) ignores
    SIGINT, and this process inherits that."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def _press(signum=signal.SIGINT):
    """Send the signal to this process and give Python the moment it takes to run the handler."""
    os.kill(os.getpid(), signum)
    time.sleep(0.05)


def _handlers():
    return signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)


def test_one_press_while_the_runs_close_is_held_and_the_close_finishes(capfd):
    before, closed = _handlers(), []
    with held_interrupts(pressed=[]):
        _press()
        closed.append("runs")  # what a KeyboardInterrupt would have skipped
    assert closed == ["runs"]
    assert capfd.readouterr().err.strip() == HELD_NOTICE
    assert _handlers() == before


@pytest.mark.parametrize("second", [signal.SIGINT, signal.SIGTERM])
def test_a_second_press_stops_the_waiting_and_the_handlers_come_back(second):
    before, reached = _handlers(), []
    with pytest.raises(CloseAbandoned):
        with held_interrupts(pressed=[]):
            _press()
            _press(second)
            reached.append("after the second press")
    assert reached == []
    assert _handlers() == before
    with pytest.raises(KeyboardInterrupt):  # outside the block, Ctrl-C interrupts as before
        _press()


def test_blocks_that_share_their_presses_count_them_together():
    """The search's close and the CLI's Ray stop share the process's count: a press in each is two presses."""
    presses = []
    with held_interrupts(pressed=presses):
        _press()
    with pytest.raises(CloseAbandoned):
        with held_interrupts(pressed=presses):
            _press()


def test_a_signal_the_process_ignores_stays_ignored():
    """Under nohup, or as a background job of a script, SIGINT is ignored: the block must not turn it on."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with held_interrupts(pressed=[]):
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            _press()
            _press()  # ignored twice, not held and then raised
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
