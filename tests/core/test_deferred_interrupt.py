"""deferred_interrupt: SIGINT inside the block is raised when it ends, once, to the handler
the user had; elsewhere (other threads, SIG_IGN) nothing changes."""

import signal
import threading

import pytest

from mixprec.core.interrupts import deferred_interrupt, in_critical_section


def test_sigint_inside_is_raised_at_the_end_and_the_handler_is_restored():
    done = []
    with pytest.raises(KeyboardInterrupt), deferred_interrupt():
        assert in_critical_section()
        signal.raise_signal(signal.SIGINT)
        signal.raise_signal(signal.SIGINT)  # twice: delivered once
        done.append("rest of the block")
    assert done == ["rest of the block"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert not in_critical_section()


def test_nested_blocks_deliver_once_when_the_outermost_ends():
    order = []
    with pytest.raises(KeyboardInterrupt), deferred_interrupt():
        with deferred_interrupt():
            signal.raise_signal(signal.SIGINT)
        order.append("after the inner block")
    assert order == ["after the inner block"]


def test_a_callable_handler_of_the_user_gets_the_signal_after_the_block():
    seen = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: seen.append(signum))
    try:
        with deferred_interrupt():
            signal.raise_signal(signal.SIGINT)
            assert seen == []
        assert seen == [signal.SIGINT]
        ignore = signal.signal(signal.SIGINT, signal.SIG_IGN)
        with deferred_interrupt():  # SIG_IGN is not ours to change
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        signal.signal(signal.SIGINT, ignore)
    finally:
        signal.signal(signal.SIGINT, previous)


def test_other_threads_leave_the_handler_alone():
    seen = []

    def work():
        with deferred_interrupt():
            seen.append(signal.getsignal(signal.SIGINT))

    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert seen == [signal.default_int_handler]
