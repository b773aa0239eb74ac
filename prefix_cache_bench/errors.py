"""How a run ends: the exit codes, the one-line error, Ctrl-C/SIGTERM as an exception that no
`except Exception` inside vLLM can swallow, and the watchdog that ends a run whose main thread
cannot take the signal. Imports nothing of the package.
"""
from __future__ import annotations

import _thread
import os
import re
import signal
import sys
import threading
import time
from types import FrameType
from typing import Any, NoReturn


EXIT_SETUP, EXIT_USAGE, EXIT_AUDIT = 1, 2, 3


class ExperimentError(Exception):
    """Ends the run with one line on stderr and this exit code (1 set-up, 2 usage, 130/143 signal)."""

    def __init__(self, message: str, exit_code: int = EXIT_SETUP):
        super().__init__(message)
        self.exit_code = exit_code


class Interrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM. A KeyboardInterrupt, so no `except Exception` inside vLLM can swallow it."""

    def __init__(self, signum: int):
        super().__init__(f"interrupted ({signal.Signals(signum).name}): no partial results written")
        self.exit_code = 128 + signum


VALIDATION_HEADER = re.compile(r"^\d+ validation errors? for \w+$")     # pydantic's first line, naming no cause


def first_line(error: object) -> str:
    """The line of an error's text that says what went wrong: its first, or for a pydantic
    validation error (vLLM's configs) the first error's own line."""
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    if VALIDATION_HEADER.match(lines[0]):
        # after the header: a field's name where the error is a field's, then its message, indented
        for line in lines[1:]:
            if line[0].isspace():
                return re.sub(r"\s*\[type=.*$", "", line.strip().removeprefix("Value error, "))
    return lines[0].strip()


def usage_error(message: str) -> NoReturn:
    """argparse prints usage + error; a benchmark user wants the one line that matters."""
    raise ExperimentError(message, EXIT_USAGE)


_received: list[int] = []       # the signal stop_on_signal took, if any
_raised = [0]                   # how many Interrupted the main thread has raised
REDELIVER_AFTER_S = 0.01        # a swallowed signal's second delivery, after the hook has returned


def stop_on_signal(signum: int, frame: FrameType | None) -> NoReturn:
    # once: a second signal (a terminal's Ctrl-C reaches every process of the group, and
    # --processes passes it on too) must not break off the engine's shutdown
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if not _received:
        _received.append(signum)
    raise_interrupted()


def raise_interrupted() -> NoReturn:
    """Raise the Interrupted of the signal taken, counted: a redelivery checks the count."""
    _raised[0] += 1
    raise Interrupted(_received[0])


def stop_on_signals() -> None:
    """SIGINT and SIGTERM end the run as Interrupted (a script's main thread, before its work).
    A signal handler raises where the main thread happens to be; where that is a weakref
    callback or a destructor (an aiohttp request's, the garbage collector's), Python prints
    "Exception ignored" and goes on: the run would not stop. sys.unraisablehook sees that and
    raises it again in the main thread, at the next line of ordinary code, unless the main
    thread has raised one since."""
    signal.signal(signal.SIGINT, stop_on_signal)
    signal.signal(signal.SIGTERM, stop_on_signal)
    sys.unraisablehook = redeliver_interruption
    watch_for_a_stuck_main_thread()


# How long a run may take to end after its signal before it is ended: vLLM's engine start waits
# for its engine in one C call (a poll of up to 600 s) in which the main thread runs no handler.
# PREFIX_CACHE_BENCH_INTERRUPT_GRACE_S sets another (the tests: a few seconds).
INTERRUPT_GRACE_S = float(os.environ.get("PREFIX_CACHE_BENCH_INTERRUPT_GRACE_S", "30"))


def watch_for_a_stuck_main_thread() -> None:
    """A thread that learns of a signal as it arrives (signal.set_wakeup_fd: written by the C-level
    handler, whatever the main thread is doing) and, if the process has not ended
    INTERRUPT_GRACE_S later, ends it as the signal says: its one line, every process it started
    killed, exit 128 + the signal. Nothing was written: results are written at the run's end."""
    import atexit

    import psutil               # imported now: an import in the watchdog could deadlock with the exit's own
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    exiting = threading.Event()
    atexit.register(exiting.set)    # a run that ends by itself is not ended again

    def watch() -> None:
        signum = 0
        while signum not in (signal.SIGINT, signal.SIGTERM):    # the fd hears every signal with a Python handler
            signum = os.read(read_fd, 1)[0]
        time.sleep(INTERRUPT_GRACE_S)
        if not exiting.is_set():
            end_now(signum, psutil)
    threading.Thread(target=watch, name="interrupt-watchdog", daemon=True).start()


def end_now(signum: int, psutil: Any) -> NoReturn:
    """The run's end for a signal whose run did not end by itself: the one line, every process
    this one started killed, exit 128 + signum. Written with os.write, which takes no lock the
    main thread may hold (sys.stderr's)."""
    prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python"
    os.write(2, f"\n{prog}: {Interrupted(signum)} (ended {INTERRUPT_GRACE_S:g} s after the signal)\n".encode())
    for child in psutil.Process().children(recursive=True):
        try:
            child.kill()
        except psutil.Error:
            pass
    os._exit(128 + signum)


def redeliver_interruption(unraisable: sys.UnraisableHookArgs) -> None:
    """sys.unraisablehook: an Interrupted that a callback or destructor swallowed is delivered
    again to the main thread as the same signal, and raised there unless the main thread has
    raised an Interrupted of its own in between; anything else is printed as Python does."""
    if not isinstance(unraisable.exc_value, Interrupted) or not _received:
        sys.__unraisablehook__(unraisable)
        return
    raised_before = _raised[0]

    def redeliver(signum, frame):
        signal.signal(signum, signal.SIG_IGN)
        # the main thread may have raised one of its own since (raise_if_interrupted, at the next
        # request) and be cleaning up: a second one would cut that clean-up short
        if _raised[0] == raised_before:
            raise_interrupted()
    signal.signal(_received[0], redeliver)
    # from another thread, a moment later: raised now, it would land in this hook, and be lost
    threading.Timer(REDELIVER_AFTER_S, _thread.interrupt_main, args=(_received[0],)).start()


def raise_if_interrupted() -> None:
    """Raise the Interrupted of a signal already taken: for loops that start requests, so that
    one a library's `except BaseException` swallowed still ends the run at the next request."""
    if _received:
        raise_interrupted()


def interruption() -> Interrupted | None:
    """The Interrupted of a signal already taken, or None. Code that cleans up in a `finally` can
    raise an error of its own while our Interrupted passes through (vLLM 0.32's tokenizer pool
    then raises UnboundLocalError), so a failure after a signal is told as the signal."""
    return Interrupted(_received[0]) if _received else None


ERROR_LINE = re.compile(rb"\bERROR\b|^\w*(Error|Exception): ")
