"""The page's guard: requests from other origins and oversized bodies are refused before
Gradio sees them."""

from __future__ import annotations

from .views import MAX_REQUEST_BYTES


class RequestGuard:
    """ASGI middleware in front of the page: a request whose ``Origin`` is not the page's own
    (a page elsewhere driving this one) is refused with 403, and a request body over
    ``max_body`` bytes with 413, from ``Content-Length`` or while it streams in."""

    def __init__(self, app, max_body: int = MAX_REQUEST_BYTES):
        self.app, self.max_body = app, max_body

    @staticmethod
    def same_origin(origin: str, hosts: list[str]) -> bool:
        from urllib.parse import urlsplit

        netloc = urlsplit(origin).netloc.lower()
        return bool(netloc) and netloc in [h.lower() for h in hosts if h]

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
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
