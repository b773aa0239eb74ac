"""vLLM's output and its death in an offline run: every vLLM process's output relayed through
this one (its first error line kept to name a cause), and the watchdog that ends a run whose
engine died and left the rest hanging.
"""
import os
import sys
import threading
import time
from collections.abc import Callable

from .defaults import OFFLINE_PROG
from .errors import ERROR_LINE, EXIT_SETUP


# A dead engine process normally surfaces in the main thread as an exception within seconds;
# one that leaves the rest hanging (a tensor-parallel peer waiting in NCCL) is ended after this.
ENGINE_DEATH_GRACE_S = 15


_original_fds: dict[int, int] = {}          # fd -> a copy of where it went before relay_output


_relays: list = []


def relay_output() -> list[str]:
    """Route fds 1 and 2, which every vLLM process inherits, through pipes: everything is
    passed on as it comes, and the first error line any vLLM process prints is kept (returned
    list) to name the cause if the engine dies. restore_output() undoes it."""
    start_resource_tracker_silenced()
    first_error: list[str] = []
    for fd in (1, 2):
        _original_fds[fd] = os.dup(fd)
        read_end, write_end = os.pipe()
        os.dup2(write_end, fd)
        os.close(write_end)
        _relays.append(threading.Thread(target=_relay, args=(read_end, _original_fds[fd], first_error), daemon=True))
        _relays[-1].start()
    return first_error


def start_resource_tracker_silenced() -> None:
    """Start multiprocessing's resource tracker now, its fds 1 and 2 on /dev/null. vLLM starts
    it once its engine starts, and it lives until this process exits: started after
    relay_output, it held the pipes' write ends, so no relay reached its pipe's end and
    restore_output waited its whole timeout for each. Its only output, warnings of objects
    vLLM leaked, comes after the run's last line; it never reached the console through the
    pipes either (their reader is gone by then)."""
    from multiprocessing import resource_tracker

    sys.stdout.flush()                      # nothing of ours may go to /dev/null meanwhile
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        for fd in saved:
            os.dup2(devnull, fd)
        resource_tracker.ensure_running()
    finally:
        for fd, copy in saved.items():
            os.dup2(copy, fd)
            os.close(copy)
        os.close(devnull)


def _relay(read_end, original, first_error):
    pending, passing_on = b"", True
    while chunk := os.read(read_end, 65536):
        if passing_on:
            try:
                os.write(original, chunk)
            except OSError:                 # the reader went away (`| head`): keep draining, or vLLM blocks
                passing_on = False
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            if not first_error and ERROR_LINE.search(line):
                first_error.append(line.decode(errors="replace").strip())


def restore_output() -> None:
    """Point fds 1 and 2 back at where they went before relay_output: our last lines must
    not wait in a pipe when the process exits."""
    sys.stdout.flush()
    sys.stderr.flush()
    for fd, original in _original_fds.items():
        os.dup2(original, fd)
    for relay in _relays:                   # drains what is still in the pipe, unless a stray process holds it
        relay.join(timeout=1)


def watch_engine(first_error: list[str]) -> Callable[[], None]:
    """Check every second that vLLM's processes (VLLM::EngineCore, VLLM::Worker...) are alive.
    If one dies and the run has not ended ENGINE_DEATH_GRACE_S later, end it: kill what is
    left of the engine and exit 1 with one line. Returns the function that stops the watch."""
    import psutil

    stop = threading.Event()

    def watch():
        me, seen, death = psutil.Process(), {}, None
        while not stop.wait(1.0):
            alive = {}
            for proc in me.children(recursive=True):
                try:
                    name = " ".join(proc.cmdline())
                    if name.startswith("VLLM::") and proc.status() != psutil.STATUS_ZOMBIE:
                        alive[proc.pid] = name
                except psutil.Error:
                    pass
            gone = sorted(set(seen) - set(alive))
            if gone and death is None:
                death = (time.monotonic(), f"{seen[gone[0]]} (pid {gone[0]}) exited")
            seen.update(alive)
            if death and time.monotonic() - death[0] > ENGINE_DEATH_GRACE_S and not stop.is_set():
                cause = first_error[0] if first_error else death[1]
                os.write(_original_fds[2], f"\n{OFFLINE_PROG}: error: the vLLM engine died ({death[1]}) and the run "
                                           f"did not end by itself: {cause}\n".encode())
                for proc in me.children(recursive=True):
                    proc.kill()
                os._exit(EXIT_SETUP)

    threading.Thread(target=watch, daemon=True).start()
    return stop.set
