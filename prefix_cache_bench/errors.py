"""How a run ends: the exit codes, the one-line error, and Ctrl-C/SIGTERM as an exception that
no `except Exception` inside vLLM can swallow. Imports nothing of the package.
"""
import re
import signal


EXIT_SETUP, EXIT_USAGE, EXIT_AUDIT = 1, 2, 3


class ExperimentError(Exception):
    """Ends the run with one line on stderr and this exit code (1 set-up, 2 usage, 130/143 signal)."""

    def __init__(self, message, exit_code=EXIT_SETUP):
        super().__init__(message)
        self.exit_code = exit_code


class Interrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM. A KeyboardInterrupt, so no `except Exception` inside vLLM can swallow it."""

    def __init__(self, signum):
        super().__init__(f"interrupted ({signal.Signals(signum).name}): no partial results written")
        self.exit_code = 128 + signum


def first_line(error):
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def usage_error(message):
    """argparse prints usage + error; a benchmark user wants the one line that matters."""
    raise ExperimentError(message, EXIT_USAGE)


_received = []                  # the signal stop_on_signal took, if any


def stop_on_signal(signum, frame):
    # once: a second signal (a terminal's Ctrl-C reaches every process of the group, and
    # --processes passes it on too) must not break off the engine's shutdown
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _received.append(signum)
    raise Interrupted(signum)


def interruption():
    """The Interrupted of a signal already taken, or None. Code that cleans up in a `finally` can
    raise an error of its own while our Interrupted passes through (vLLM 0.32's tokenizer pool
    then raises UnboundLocalError), so a failure after a signal is told as the signal."""
    return Interrupted(_received[0]) if _received else None


ERROR_LINE = re.compile(rb"\bERROR\b|^\w*(Error|Exception): ")
