"""A stop signal during a wait for data ends the wait even when the handler's exception is lost (raised inside a
finalizer, which drops it), and never raises outside a wait or after the run has restored its handlers."""

from __future__ import annotations

import io
import os
import signal
import time

import pytest

from train.run_context import StopFlag, StopRequested


class SignalledOnClose(io.RawIOBase):
    """A file whose ``close()`` delivers SIGTERM and spins until the handler has run: collected unclosed, the
    handler's ``StopRequested`` is raised inside ``io``'s finalizer, which drops it."""

    def __init__(self, flag: StopFlag) -> None:
        self.flag = flag

    def close(self) -> None:
        if not self.closed:
            os.kill(os.getpid(), signal.SIGTERM)
            deadline = time.monotonic() + 5
            while not self.flag.raised and time.monotonic() < deadline:
                pass
            super().close()


def _spin(seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        pass


@pytest.fixture
def flag():
    stop = StopFlag(retry_s=0.05)
    stop.install()
    yield stop
    stop.restore()


def test_a_raise_lost_in_a_finalizer_is_repeated_until_the_wait_ends(flag):
    start = time.monotonic()
    with pytest.raises(StopRequested), flag.waiting():
        unclosed = SignalledOnClose(flag)
        del unclosed  # collected unclosed: the handler's raise lands in the finalizer, which drops it
        assert flag.raised and flag.signum == signal.SIGTERM
        _spin(10)  # an endless wait for data
    assert time.monotonic() - start < 5
    with pytest.raises(StopRequested), flag.waiting():  # a stopped run waits no more
        pass


def test_the_watchdog_stops_with_its_wait_and_nothing_raises_outside_a_wait(flag):
    with pytest.raises(StopRequested), flag.waiting():
        os.kill(os.getpid(), signal.SIGTERM)
        _spin(10)
    watchdog = flag.watchdog
    assert watchdog is not None
    _spin(0.3)  # six retry periods after the wait: a watchdog that went on would raise here
    watchdog.join(timeout=1)
    assert not watchdog.is_alive()
    os.kill(os.getpid(), signal.SIGTERM)  # outside a wait a signal is only recorded
    _spin(0.2)
    assert flag.raised and flag.signum == signal.SIGTERM
