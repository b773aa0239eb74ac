"""The HTTP client: streamed /v1/completions on kept-alive connections (aiohttp, as vLLM's own
benchmark client), the TTFT clock in the client, and every network failure as one line.
"""
from __future__ import annotations
import asyncio
import json
import time
from collections.abc import Coroutine, Iterable
from typing import TYPE_CHECKING, Any, TypeVar

from .engine_api import StreamedResponse
from .errors import ExperimentError, first_line, raise_if_interrupted

if TYPE_CHECKING:
    import aiohttp

CLOSE_WAIT_S = 5.0              # how long close() waits for the requests it cancelled

T = TypeVar("T")


class HttpClient:
    """Streams requests to one server over one keep-alive connection (aiohttp, as vLLM's own
    benchmark client). Every failure becomes an ExperimentError of one line."""

    def __init__(self, base_url: str, request_timeout_s: float):
        import aiohttp

        self.base_url = base_url.rstrip("/")
        self.loop = asyncio.new_event_loop()
        self.loop.set_exception_handler(quiet_on_interrupt)
        self.connections_opened = 0
        self.load_connections = 0
        self.load_sessions: list[aiohttp.ClientSession] = []     # every load_session(): close() closes what a signal left open
        trace = aiohttp.TraceConfig()
        trace.on_connection_create_end.append(self._count_connection)

        async def session():
            return aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=1, keepalive_timeout=300),
                timeout=aiohttp.ClientTimeout(total=request_timeout_s), trace_configs=[trace])
        self.session = self.loop.run_until_complete(session())
        self.request_timeout_s = request_timeout_s

    async def _count_connection(self, session, context, params):
        self.connections_opened += 1

    async def _count_load_connection(self, session, context, params):
        self.load_connections += 1

    def load_session(self) -> aiohttp.ClientSession:
        """A session of as many connections as a load level opens (counted in load_connections).
        Made inside the loop, as aiohttp wants."""
        import aiohttp

        trace = aiohttp.TraceConfig()
        trace.on_connection_create_end.append(self._count_load_connection)
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=300),
                                        timeout=aiohttp.ClientTimeout(total=self.request_timeout_s), trace_configs=[trace])
        self.load_sessions = [s for s in self.load_sessions if not s.closed] + [session]
        return session

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        """Close the connections and the loop; a request a signal broke off is cancelled first,
        and a session its cancelled task did not get to close is closed here. A signal that
        lands during this (a redelivery among them) is raised once every step has run: a
        session left open would print aiohttp's "Unclosed connector" after the run's last line."""
        interrupted: KeyboardInterrupt | None = None
        for step in (self._cancel_pending, self._close_sessions):
            for _ in range(2):              # the step again after a signal broke it off
                try:
                    step()
                    break
                except KeyboardInterrupt as e:
                    interrupted = interrupted or e
        self.loop.close()
        if interrupted is not None:
            raise interrupted

    def _cancel_pending(self) -> None:
        pending = [task for task in asyncio.all_tasks(self.loop) if not task.done()]
        for task in pending:
            task.cancel()
        if pending:       # bounded: a task that ignores its cancellation must not hold the exit
            self.loop.run_until_complete(asyncio.wait(pending, timeout=CLOSE_WAIT_S))

    def _close_sessions(self) -> None:
        open_sessions = [s for s in [self.session, *self.load_sessions] if not s.closed]

        async def close_all():
            await asyncio.wait_for(asyncio.gather(*[s.close() for s in open_sessions]), CLOSE_WAIT_S)
        if open_sessions:
            self.loop.run_until_complete(close_all())

    def run(self, what: str, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run one request to completion; network failures end the run with one line."""
        import aiohttp
        try:
            return self.loop.run_until_complete(coroutine)
        except asyncio.TimeoutError:
            raise ExperimentError(f"{what} took longer than --request-timeout {self.request_timeout_s:g} s")
        except aiohttp.ClientConnectorError as e:
            raise ExperimentError(f"cannot reach {self.base_url} ({what}): {e.strerror or e}")
        except (aiohttp.ClientError, ConnectionError) as e:
            raise ExperimentError(f"{self.base_url} broke off {what}: {type(e).__name__}: {first_line(e)}")
        except ValueError as e:                 # a body or a chunk that is not the JSON it should be
            raise ExperimentError(f"{self.base_url} answered {what} with something that is not JSON: {first_line(e)}")

    async def _check(self, response, what):
        if response.status >= 400:
            body = await response.text()
            try:
                error = json.loads(body)
                message = error.get("error", error).get("message") if isinstance(error, dict) else body
            except (ValueError, AttributeError):
                message = body
            raise ExperimentError(f"{self.base_url} answered {what} with HTTP {response.status}: "
                                  f"{first_line(message or response.reason)}")

    def ensure_connection(self) -> None:
        """An untimed GET /health on the kept connection; if that fails (the server closed the
        connection meanwhile), once more on a fresh one, whose failure is the run's one line."""
        try:
            self.loop.run_until_complete(self._health())
            return
        except Exception:
            pass
        self.run("GET /health", self._health())

    async def _health(self):
        async with self.session.get(self.base_url + "/health") as response:
            await response.read()

    async def get_async(self, path: str, session: aiohttp.ClientSession | None = None) -> str:
        """GET path's text (a path on this server, or a whole URL), on the kept connection or on session's."""
        async with (session or self.session).get(path if path.startswith("http") else self.base_url + path) as response:
            await self._check(response, f"GET {path}")
            return await response.text()

    def get_url(self, url: str) -> str:
        """The text of a GET to a whole URL (another server's /metrics)."""
        return self.run(f"GET {url}", self.get_async(url))

    def get(self, path: str, as_json: bool = True) -> Any:
        async def get():
            async with self.session.get(self.base_url + path) as response:
                await self._check(response, f"GET {path}")
                return await (response.json() if as_json else response.text())
        return self.run(f"GET {path}", get())

    def post(self, path: str, body: dict[str, Any]) -> Any:
        async def post():
            async with self.session.post(self.base_url + path, json=body) as response:
                await self._check(response, f"POST {path}")
                return await response.json()
        return self.run(f"POST {path}", post())

    def stream(self, body: dict[str, Any]) -> StreamedResponse:
        """POST /v1/completions with stream on: its StreamedResponse (the send time, the arrival
        of each chunk that carries a token, the last chunk's usage, the end; perf_counter s).
        Nothing but the request and reading its chunks is inside the timed region."""
        data = json.dumps(body).encode()        # serialised before the clock starts: the client's cost, not the server's
        return self.run("a completion request", self.stream_on(self.session, data))

    async def stream_on(self, session: aiohttp.ClientSession, data: bytes, base_url: str | None = None) -> StreamedResponse:
        """stream() of a serialised body on session's connections (to base_url, default this
        client's server); raises what stream() turns into one line."""
        raise_if_interrupted()
        token_times: list[float]
        token_times, usage = [], None
        sent = time.perf_counter()
        async with session.post((base_url or self.base_url) + "/v1/completions", data=data,
                                headers={"Content-Type": "application/json"}) as response:
            await self._check(response, "POST /v1/completions")
            async for line in response.content:
                usage = take_chunks([line], time.perf_counter(), self.base_url, token_times, usage)
        return StreamedResponse(sent, token_times, usage, time.perf_counter())


def take_chunks(lines: Iterable[bytes], arrived_s: float, base_url: str, token_times: list[float],
                usage: dict[str, Any] | None) -> dict[str, Any] | None:
    """Fold the lines of a streamed completion that arrived at arrived_s into token_times (one
    entry per chunk that carries a token); returns the last usage seen, else usage."""
    for line in lines:
        chunk = completion_chunk(line, base_url)
        if chunk is None:
            continue
        if chunk.get("choices"):
            token_times.append(arrived_s)
        usage = chunk.get("usage") or usage
    return usage


def completion_chunk(line: bytes, base_url: str) -> dict[str, Any] | None:
    """One line of a streamed completion: its chunk (parsed JSON), or None for a line that
    holds none (not `data:`, or `data: [DONE]`). A chunk that reports an error (vLLM reports a
    failure mid-stream with HTTP 200) raises ExperimentError."""
    if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
        return None
    chunk = json.loads(line[6:])
    if chunk.get("error"):
        error = chunk["error"]
        raise ExperimentError(f"{base_url} failed a completion request mid-stream: "
                              f"{first_line(error.get('message', error) if isinstance(error, dict) else error)}")
    return chunk


def quiet_on_interrupt(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """The loop's exception handler: a task that a signal broke off (Interrupted, a
    KeyboardInterrupt) is reported as the run's one line, not again as a stray traceback when
    the task is collected; anything else as asyncio would."""
    if not isinstance(context.get("exception"), KeyboardInterrupt):
        loop.default_exception_handler(context)


def no_usage(server_url: str) -> ExperimentError:
    """The error of a server whose stream ended without the usage chunk the audit reads."""
    return ExperimentError(f"{server_url} sent no usage in its last chunk: it does not honour "
                           f"stream_options.include_usage")
