"""The optional HTTP listener: ``/healthz`` and Prometheus ``/metrics``.

Off unless ``daemon.http.listen`` is set; meant for 127.0.0.1 (a local probe,
a Prometheus agent or an SSH tunnel), since it has no authentication. It is
served by the daemon's own event loop, so a blocked loop cannot answer
either.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from typing import Any

import structlog

from .text import describe

log = structlog.get_logger(__name__)

_DRIVER_TAIL = re.compile(r" \(configured timeouts:|, Timeout: |, Topology Description: ")

_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 400: "Bad Request", 503: "Service Unavailable"}


def mongo_problem(exc: BaseException, waited: float) -> str:
    """Why MongoDB did not answer a ping, on one short line: "unreachable: ServerSelectionTimeoutError: host:port: [Errno 111] ..."."""
    if isinstance(exc, TimeoutError) and not str(exc):
        return f"unreachable: no answer within {waited:g}s"
    # The driver appends its timeouts and the whole topology to the part that says what happened.
    text = _DRIVER_TAIL.split(describe(exc), 1)[0]
    unreachable = any(c.__name__ in ("ConnectionFailure", "TimeoutError") for c in type(exc).__mro__)
    return f"{'unreachable' if unreachable else 'error'}: {text}"


class HttpEndpoint:
    """A tiny HTTP/1.1 server for two GET routes (no keep-alive)."""

    def __init__(
        self,
        runner: Any,
        store: Any,
        metrics: Any,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        ping_timeout: float = 2.0,
        lag_limit: float = 5.0,
    ):
        self.runner, self.store, self.metrics = runner, store, metrics
        self.host, self.port = host, port
        self.ping_timeout = ping_timeout
        self.lag_limit = lag_limit
        self.last_tick = time.monotonic()
        self.lag = 0.0
        self._server: asyncio.Server | None = None
        self._ticker: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        self._ticker = asyncio.create_task(self._tick())
        log.info("http_listening", host=self.host, port=self.port)

    async def close(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            await asyncio.gather(self._ticker, return_exceptions=True)
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _tick(self) -> None:
        # How late the loop wakes up: a loop stuck in blocking code shows here.
        while True:
            before = time.monotonic()
            await asyncio.sleep(0.5)
            self.last_tick = time.monotonic()
            self.lag = self.last_tick - before - 0.5

    async def health(self) -> tuple[bool, dict[str, Any]]:
        """Healthy while the loop keeps time, the runner runs and MongoDB answers."""
        stale = time.monotonic() - self.last_tick
        loop_ok = stale < self.lag_limit and self.lag < self.lag_limit
        try:
            # The driver's deadline names the cause; ours is the backstop that keeps /healthz prompt.
            await asyncio.wait_for(self.store.ping(timeout=self.ping_timeout), self.ping_timeout + 0.5)
            mongo = "ok"
        except Exception as exc:
            mongo = mongo_problem(exc, self.ping_timeout)
        running = bool(self.runner.running)
        body = {
            "status": "ok" if loop_ok and running and mongo == "ok" else "unhealthy",
            "loop": "ok" if loop_ok else f"lagging {max(stale, self.lag):.1f}s",
            "runner": "running" if running else "stopped",
            "mongodb": mongo,
            "sources": len(self.runner.status),
        }
        return body["status"] == "ok", body

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            method, (status, ctype, payload) = await asyncio.wait_for(self._respond(reader), timeout=10)
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            method, (status, ctype, payload) = "GET", (400, "text/plain; charset=utf-8", b"bad request\n")
        except Exception:
            log.exception("http_failed")
            method, (status, ctype, payload) = "GET", (503, "text/plain; charset=utf-8", b"error\n")
        head = (
            f"HTTP/1.1 {status} {_REASONS.get(status, '')}\r\n"
            f"Content-Type: {ctype}\r\nContent-Length: {len(payload)}\r\n"
            "Cache-Control: no-store\r\nConnection: close\r\n\r\n"
        )
        try:
            writer.write(head.encode() + (payload if method != "HEAD" else b""))
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def _respond(self, reader: asyncio.StreamReader) -> tuple[str, tuple[int, str, bytes]]:
        request = (await reader.readline()).decode("latin-1").split()
        while await reader.readline() not in (b"\r\n", b"\n", b""):
            pass  # headers: nothing here needs them
        if len(request) != 3:
            raise ValueError("malformed request line")
        method, target, _ = request
        return method, await self._route(method, target.split("?", 1)[0])

    async def _route(self, method: str, path: str) -> tuple[int, str, bytes]:
        if method not in ("GET", "HEAD"):
            return 405, "text/plain; charset=utf-8", b"GET only\n"
        if path == "/healthz":
            ok, body = await self.health()
            return (200 if ok else 503), "application/json", (json.dumps(body) + "\n").encode()
        if path == "/metrics":
            return 200, self.metrics.content_type, self.metrics.render(self.runner)
        return 404, "text/plain; charset=utf-8", b"not found: try /healthz or /metrics\n"
