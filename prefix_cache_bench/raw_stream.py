"""The trace replay's sender path: a streamed /v1/completions written as prebuilt bytes on an
idle keep-alive connection (asyncio streams), its chunked SSE answer read back.

Why not aiohttp, as every other request of the tool: aiohttp runs a request's Python (URL,
headers, cookies, the connector) before its first byte leaves, and the conversation trace sends
most of its requests in bursts of about ten with one timestamp, so the burst's later requests
left late. Over 60 s of that trace here (tools/trace_sender_bench.py), a sender that sent through
aiohttp had a send lag p99 of 9.5 and 11.4 ms in two runs; this path, with open_loop's other
measures, 3.3 and 1.8 ms. Here the request line, headers and body are built before the send
time, and sending is one write (docs/traces.md).
"""
import asyncio
import json
import time
import urllib.parse
from collections.abc import AsyncIterator, Mapping
from typing import Any

from .engine_api import StreamedResponse
from .http_client import take_chunks
from .errors import ExperimentError, first_line

IDLE_REUSE_S = 3.0      # an idle connection is reused only this soon (vLLM closes them after 5 s by default)
Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]    # an open connection's two ends


def request_bytes(base_url: str, path: str, body: bytes) -> bytes:
    """The whole HTTP/1.1 POST of a JSON body, ready to write."""
    url = urllib.parse.urlsplit(base_url)
    head = (f"POST {url.path.rstrip('/')}{path} HTTP/1.1\r\nHost: {url.netloc}\r\nContent-Type: application/json\r\n"
            f"Accept: text/event-stream\r\nConnection: keep-alive\r\nContent-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


class ConnectionPool:
    """Kept-alive connections to one server: an idle one if it was used recently enough, else
    a new one. Every connection is closed by close()."""

    def __init__(self, base_url: str):
        url = urllib.parse.urlsplit(base_url)
        self.host, self.port = url.hostname, url.port or 80
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter, float]]
        self.all: set[asyncio.StreamWriter]
        self.idle, self.all = [], set()
        self.opened = 0

    async def open(self) -> Connection:
        reader, writer = await asyncio.open_connection(self.host, self.port)
        self.opened += 1
        self.all.add(writer)
        return reader, writer

    async def warm(self, count: int) -> None:
        """count connections opened now, idle, before any timed request."""
        for reader, writer in await asyncio.gather(*[self.open() for _ in range(count)]):
            self.idle.append((reader, writer, time.perf_counter()))

    def take(self) -> Connection | None:
        """An idle connection used recently enough, at once, or None."""
        now = time.perf_counter()
        while self.idle:
            reader, writer, last = self.idle.pop()
            if now - last < IDLE_REUSE_S and not writer.is_closing() and not reader.at_eof():
                return reader, writer
            self.discard(writer)
        return None

    async def get(self) -> Connection:
        return self.take() or await self.open()

    async def top_up(self, count: int, timeout_s: float) -> None:
        """Open connections until count are idle and fresh, within timeout_s (those still
        connecting then are given up)."""
        now = time.perf_counter()
        fresh = sum(1 for _, writer, last in self.idle if now - last < IDLE_REUSE_S and not writer.is_closing())
        if fresh >= count or timeout_s <= 0:
            return
        opening = [asyncio.ensure_future(self.open()) for _ in range(count - fresh)]
        done, pending = await asyncio.wait(opening, timeout=timeout_s)
        for task in pending:
            task.cancel()
        for task in done:
            if task.exception() is None:
                self.put(*task.result())

    def put(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.idle.append((reader, writer, time.perf_counter()))

    def discard(self, writer: asyncio.StreamWriter) -> None:
        self.all.discard(writer)
        writer.close()

    def close(self) -> None:
        for writer in list(self.all):
            self.discard(writer)
        self.idle = []


async def read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    """(status, {header: value}) of a response."""
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionError("the server closed the connection before answering")
    status = int(status_line.split()[1])
    headers: dict[str, str] = {}
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b"\n", b""):
            return status, headers
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()


async def chunks(reader: asyncio.StreamReader, headers: Mapping[str, str]) -> AsyncIterator[bytes]:
    """The body's pieces as they arrive: chunked transfer encoding, or Content-Length bytes."""
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readline()).split(b";")[0], 16)
            if size == 0:
                await reader.readline()
                return
            data = await reader.readexactly(size + 2)
            yield data[:-2]
    else:
        yield await reader.readexactly(int(headers.get("content-length", 0)))


def error_message(status: int, body: str) -> str:
    try:
        error = json.loads(body)
        message = error.get("error", error).get("message") if isinstance(error, dict) else body
    except (ValueError, AttributeError):
        message = body
    return f"HTTP {status}: {first_line(message or status)}"


def send(connection: Connection, data: bytes) -> float:
    """Write a prebuilt request on a connection; returns the send time (perf_counter s)."""
    sent = time.perf_counter()
    connection[1].write(data)
    return sent


async def stream_raw(pool: ConnectionPool, data: bytes, base_url: str) -> StreamedResponse:
    """One streamed completion of prebuilt request bytes on a pooled (or new) connection: its
    StreamedResponse (see receive)."""
    connection = await pool.get()
    return await receive(pool, connection, send(connection, data), base_url)


async def receive(pool: ConnectionPool, connection: Connection, sent: float, base_url: str) -> StreamedResponse:
    """The answer to a request written at sent: its StreamedResponse (the send time, the
    arrival of each chunk that carries a token, the usage, the end). A connection whose
    exchange broke off (an error, a cancel) is closed, never reused."""
    try:
        return await read_stream(pool, *connection, sent, base_url)
    except BaseException:
        pool.discard(connection[1])
        raise


async def read_stream(pool: ConnectionPool, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, sent: float,
                      base_url: str) -> StreamedResponse:
    status, headers = await read_head(reader)
    token_times: list[float]
    usage: dict[str, Any] | None
    token_times, usage, pending = [], None, b""
    if status >= 400:
        body = b"".join([piece async for piece in chunks(reader, headers)])
        pool.put(reader, writer)
        raise ExperimentError(f"{base_url} answered POST /v1/completions with {error_message(status, body.decode())}")
    async for piece in chunks(reader, headers):
        arrived = time.perf_counter()
        pending += piece
        *lines, pending = pending.split(b"\n")
        usage = take_chunks(lines, arrived, base_url, token_times, usage)
    if headers.get("connection", "").lower() == "close":
        pool.discard(writer)
    else:
        pool.put(reader, writer)
    return StreamedResponse(sent, token_times, usage, time.perf_counter())
