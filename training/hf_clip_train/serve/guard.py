"""An ASGI middleware in front of every route: path traversal, the API key and the body size, checked before the
request reaches the application."""

import hmac
import json
from collections.abc import Iterable
from urllib.parse import unquote

TRAVERSAL_SEGMENTS = {"..", "."}


def error_body(message: str, error_type: str, code: str | None = None, param: str | None = None) -> dict:
    """The OpenAI error shape, which every error response of the server has."""
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def traversal_in(path: str) -> bool:
    """Whether a URL path, percent-decoded up to three times, has a `..` or `.` segment, a backslash or a NUL."""
    for _ in range(3):
        if "\\" in path or "\x00" in path or any(segment in TRAVERSAL_SEGMENTS for segment in path.split("/")):
            return True
        decoded = unquote(path)
        if decoded == path:
            return False
        path = decoded
    return True


class RequestGuard:
    """Refuses, before the application runs: a path with traversal (400), a request without the right
    `Authorization: Bearer KEY` when the server has a key (401; the key is compared in constant time and never
    logged), and a body over `max_body_bytes` (413; by Content-Length, or counted as a chunked body arrives)."""

    def __init__(self, app, max_body_bytes: int, api_key: str | None, open_paths: Iterable[str] = ()):
        self.app, self.max_body_bytes = app, max_body_bytes
        self._key = None if api_key is None else api_key.encode()
        self.open_paths = set(open_paths)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        raw_path = scope.get("raw_path", b"").decode("latin-1").split("?", 1)[0]
        if traversal_in(raw_path) or traversal_in(scope["path"]):
            return await _respond(send, 400, error_body(
                "The URL path holds a traversal segment ('..' or '.', maybe percent-encoded) or a backslash: "
                "refused. This server serves only its routes and the index's thumbnails.",
                "invalid_request_error", "path_traversal"))
        if self._key is not None and scope["path"] not in self.open_paths and not self._authorized(scope):
            return await _respond(send, 401, error_body(
                "Missing or wrong API key: send the header 'Authorization: Bearer KEY' with the key the server was "
                "started with (--api_key or HF_CLIP_SERVE_API_KEY).", "authentication_error", "invalid_api_key"),
                {"www-authenticate": "Bearer"})
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length")
        limit_mb = self.max_body_bytes / 2**20
        too_large = error_body(f"The request body is over {limit_mb:g} MB, this server's --max_body_mb.",
                               "invalid_request_error", "body_too_large")
        if declared is not None:
            try:
                length = int(declared)
            except ValueError:
                return await _respond(send, 400, error_body(f"Content-Length {declared!r} is not a number.",
                                                            "invalid_request_error"))
            if length > self.max_body_bytes:
                return await _respond(send, 413, too_large)
            return await self.app(scope, receive, send)
        if scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body_bytes:
                return await _respond(send, 413, too_large)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        return await self.app(scope, replay, send)

    def _authorized(self, scope) -> bool:
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self._key)


async def _respond(send, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
    payload = json.dumps(body).encode()
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    raw_headers += [(name.encode(), value.encode()) for name, value in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": payload})
