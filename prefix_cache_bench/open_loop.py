"""The open-loop sender of a trace replay: every request leaves at its scheduled time, on a task
of its own, whatever earlier requests are doing (no coordinated omission), and its send lag
(actual minus scheduled) is what the sender itself adds.

What keeps the lag small on a 2-core machine (tools/trace_sender_bench.py measures it):
- a request's bytes are built ahead, while the next send is far enough away, never in a burst;
- the connections a burst needs are opened before it, and a burst is written in one go from
  the sender's own loop (prebuilt bytes, one write each: raw_stream);
- the timer sleeps to SPIN_S before the send and spins the rest;
- Python's cyclic garbage collector runs only where the next send is far away: what existed
  before the arm is frozen out of its passes, and its automatic passes are off during the arm.
"""
import asyncio
import gc
import time
from collections.abc import Awaitable, Callable, Sequence

from .engine_api import StreamedResponse
from .errors import first_line, raise_if_interrupted
from .raw_stream import ConnectionPool, receive, send, stream_raw

BUILD_AHEAD = 64                # requests built ahead of their send time, at most
BUILD_MARGIN_S = 0.005          # a build starts only this long plus twice its expected time before the next send
BUILD_COST_SMOOTHING = 0.2      # a build's cost per token: a moving average over builds, this weight on the last
START_LEAD_S = 0.05             # the first send is this long after the arm's clock starts
SPIN_S = 0.002                  # asleep until this long before a send, then spinning (timers wake late)
BURST_S = 0.01                  # requests scheduled this close together count as one burst
MAX_CONNECTIONS_AHEAD = 64      # idle connections opened before a burst, at most (one per request)
TOP_UP_LEAD_S = 0.05            # a burst's connections are checked (and opened where missing) this long before it
FIRST_CONNECT_TIMEOUT_S = 10.0  # the first burst's connections are opened before the clock starts, within this
GC_SLACK_S = 0.1                # a collection runs only where the next send is further away than this
GC_EVERY_S = 1.0                # and at most this often


def burst_sizes(scheduled_s: Sequence[float]) -> list[int]:
    """For each request that starts a burst (the requests after it scheduled within BURST_S of
    it), the burst's size, at most MAX_CONNECTIONS_AHEAD; 0 for the others."""
    sizes, start = [0] * len(scheduled_s), 0
    for k, at in enumerate(scheduled_s):
        if at - scheduled_s[start] > BURST_S:
            start = k
        sizes[start] += 1
    return [min(size, MAX_CONNECTIONS_AHEAD) for size in sizes]


async def until(due: float) -> None:
    """Return at perf_counter() >= due: asleep until SPIN_S before it, then spinning."""
    delay = due - SPIN_S - time.perf_counter()
    if delay > 0:
        await asyncio.sleep(delay)
    while time.perf_counter() < due:
        pass


class OpenLoopSender:
    """Sends request k's bytes (build(k)) at t0 + scheduled_s[k] to base_url's /v1/completions.
    sizes[k]: request k's input tokens (what its build costs grows with). A failed request stops
    further sends; so does reaching max_in_flight (the arm is overloaded)."""

    def __init__(self, base_url: str, scheduled_s: Sequence[float], build: Callable[[int], bytes], sizes: Sequence[int],
                 max_in_flight: int):
        self.base_url, self.scheduled_s, self.build, self.sizes = base_url, scheduled_s, build, sizes
        self.max_in_flight = max_in_flight
        self.records: list[StreamedResponse | None] = [None] * len(scheduled_s)
        self.bodies: dict[int, bytes]
        self.tasks: list[asyncio.Task[None]]
        self.bodies, self.tasks, self.built = {}, [], 0
        self.in_flight = self.most_in_flight = 0
        self.overload: str | None
        self.failed, self.overload = False, None
        self.build_s_per_token = 0.0
        self.last_collect = 0.0
        self.pool = ConnectionPool(base_url)
        self.bursts = burst_sizes(scheduled_s)

    async def run(self, drain_s: float) -> tuple[list[StreamedResponse | None], float, str | None, int]:
        """Every send, then drain_s for the requests still running (then cancelled, recorded
        unfinished). Returns (records, t0 in perf_counter s, the overload or None, the most
        requests in flight)."""
        await self.pool.top_up(self.bursts[0], FIRST_CONNECT_TIMEOUT_S)
        await self.build_ahead(0, float("inf"))
        gc.collect()
        gc.freeze()
        gc.disable()
        try:
            t0 = time.perf_counter() + START_LEAD_S
            for k in range(len(self.scheduled_s)):
                if not await self.send_at(k, t0 + self.scheduled_s[k]):
                    break
            await self.drain(drain_s)
        finally:
            gc.enable()
            gc.unfreeze()
            self.pool.close()
        return self.records, t0, self.overload, self.most_in_flight

    async def send_at(self, k: int, due: float) -> bool:
        """Request k at due (perf_counter s); False where nothing more is to be sent."""
        raise_if_interrupted()
        await self.build_ahead(k, due)
        self.collect_if_idle(due)
        if self.bursts[k]:              # the first of a burst: as many fresh connections as it has, just before it
            await until(due - TOP_UP_LEAD_S)
            await self.pool.top_up(self.bursts[k], due - SPIN_S - time.perf_counter())
        await until(due)
        if self.failed:
            return False
        if self.in_flight >= self.max_in_flight:
            self.overload = (f"{self.in_flight} requests in flight at request {k} of {len(self.scheduled_s)} "
                             f"(--max-in-flight {self.max_in_flight})")
            return False
        # written here, on an idle connection, so that a burst leaves in one go; its answer is a task's
        connection, data = self.pool.take(), self.bodies.pop(k)
        exchange = receive(self.pool, connection, send(connection, data), self.base_url) if connection else \
            stream_raw(self.pool, data, self.base_url)
        self.in_flight += 1             # counted here: a burst is sent before any of its tasks runs
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        self.tasks.append(asyncio.create_task(self.one(k, exchange)))
        return True

    async def build_ahead(self, k: int, due: float) -> None:
        """Request k's bytes now if not built yet; later ones while the next send is further
        away than twice what a build of that size has taken."""
        while self.built < len(self.scheduled_s) and (self.built <= k or (
                self.built - k < BUILD_AHEAD and due - time.perf_counter()
                > BUILD_MARGIN_S + 2 * self.build_s_per_token * self.sizes[self.built])):
            started = time.perf_counter()
            self.bodies[self.built] = self.build(self.built)
            per_token_s = (time.perf_counter() - started) / max(1, self.sizes[self.built])
            self.build_s_per_token = per_token_s if not self.build_s_per_token else \
                BUILD_COST_SMOOTHING * per_token_s + (1 - BUILD_COST_SMOOTHING) * self.build_s_per_token
            self.built += 1
            await asyncio.sleep(0)      # requests in flight read their answers between builds

    def collect_if_idle(self, due: float) -> None:
        now = time.perf_counter()
        if due - now > GC_SLACK_S and now - self.last_collect > GC_EVERY_S:
            gc.collect()
            self.last_collect = time.perf_counter()

    async def one(self, k: int, exchange: Awaitable[StreamedResponse]) -> None:
        started = time.perf_counter()
        try:
            self.records[k] = await exchange
        except asyncio.CancelledError:
            self.records[k] = StreamedResponse(started, [], None, time.perf_counter(),
                                               "unfinished: still running at the end of the arm's drain")
        except Exception as e:          # one request's failure is a fact of the arm; no request is sent after it
            self.records[k] = StreamedResponse(started, [], None, time.perf_counter(),
                                               f"{type(e).__name__}: {first_line(e)}")
            self.failed = True
        finally:
            self.in_flight -= 1

    async def drain(self, drain_s: float) -> None:
        if not self.tasks:
            return
        _, pending = await asyncio.wait(self.tasks, timeout=drain_s)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)
            self.overload = self.overload or f"{len(pending)} requests still running {drain_s:g} s after the last send"
