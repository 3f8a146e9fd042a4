"""The page's guard: requests for other host names, from other origins and with oversized
bodies are refused before Gradio sees them."""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from .views import MAX_REQUEST_BYTES

#: The names of this machine the page always answers to (with the port it serves on).
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
_WILDCARDS = ("", "0.0.0.0", "::")


class RequestGuard:
    """ASGI middleware in front of the page: a request whose ``Host`` is not an address the
    page serves is refused with 403 (DNS rebinding: a foreign name made to point at this
    machine, whose page would otherwise be same-origin with the demo), a request whose
    ``Origin`` is not the page's own (a page elsewhere driving this one) with 403, and a
    request body over ``max_body`` bytes with 413, from ``Content-Length`` or while it streams
    in.

    The addresses served are 127.0.0.1, localhost, ::1 and ``host`` (the name or address the
    server is bound to), each with the port the server listens on; bound to every interface
    (0.0.0.0 or ::), any IP address of this machine too, but still no other name."""

    def __init__(self, app, max_body: int = MAX_REQUEST_BYTES, host: str = "127.0.0.1"):
        self.app, self.max_body = app, max_body
        self.host = host.strip().strip("[]").lower()

    def served_names(self) -> list[str]:
        names = list(LOOPBACK_NAMES)
        if self.host not in _WILDCARDS and self.host not in names:
            names.append(self.host)
        return names

    def served(self, host: str, port: int | None) -> bool:
        """Whether a ``Host`` header names this server: one of :meth:`served_names` (or, bound
        to every interface, an IP address) with ``port``; without a port, only port 80."""
        try:
            parts = urlsplit(f"//{host}")
            name, given = (parts.hostname or "").rstrip("."), parts.port
        except ValueError:  # a port that is not a number
            return False
        if not name or "@" in host or (port is not None and (given or 80) != port):
            return False
        if name in self.served_names():
            return True
        if self.host in _WILDCARDS:
            try:
                ipaddress.ip_address(name)
                return True
            except ValueError:
                return False
        return False

    def served_text(self, port: int | None) -> str:
        where = [f"[{n}]" if ":" in n else n for n in self.served_names()]
        return ", ".join(f"{n}:{port}" if port else n for n in where)

    @staticmethod
    def same_origin(origin: str, hosts: list[str]) -> bool:
        from urllib.parse import urlsplit

        netloc = urlsplit(origin).netloc.lower()
        return bool(netloc) and netloc in [h.lower() for h in hosts if h]

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        port = (scope.get("server") or (None, None))[1]
        if not self.served(headers.get("host", ""), port):
            return await self._refuse(scope, send, 403, f"request refused: the Host header is not an address this demo serves ({self.served_text(port)})")  # fmt: skip
        origin = headers.get("origin")
        hosts = [headers.get("host", ""), headers.get("x-forwarded-host", "")]
        if origin is not None and not self.same_origin(origin, hosts):
            return await self._refuse(scope, send, 403, "cross-origin request refused")
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body:
            return await self._refuse(scope, send, 413, f"request larger than {self.max_body:,} bytes")  # fmt: skip
        received, started = 0, False

        async def counted():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body:
                raise _TooLarge
            return message

        async def tracked(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, tracked)
        except _TooLarge:
            if not started:
                await self._refuse(scope, send, 413, f"request larger than {self.max_body:,} bytes")  # fmt: skip

    @staticmethod
    async def _refuse(scope, send, status: int, text: str):
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        body = text.encode()
        headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode())]  # fmt: skip
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass
