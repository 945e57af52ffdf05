"""The ASGI guard in front of every route: access token, Host and Origin checks, body limit, clean errors.

MONAI Label 0.8.5 has none of these for lowdose's routes. Every request passes here first: without the
server's bearer token it gets 401 before anything is read or run; a server on loopback answers only
requests addressed to loopback (no DNS rebinding); a web page from another origin gets 403 (no CSRF);
a body over the limit gets 413. Error responses are rewritten so that no path or traceback leaves.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import uuid

from .auth import ServerToken, bearer_token
from .messages import internal_detail, scrub, send_json, too_large_detail

log = logging.getLogger("lowdose.server")

UNAUTHORISED = (
    "missing or wrong access token: send the header 'Authorization: Bearer <token>' (the server's "
    "administrator shows the token with `lowdose serve --show-token`)"
)
# Response headers an error keeps when the guard rewrites its body.
KEPT_ERROR_HEADERS = (
    b"allow",
    b"www-authenticate",
    b"retry-after",
    b"access-control-allow-origin",
    b"access-control-allow-credentials",
    b"vary",
)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address) is this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class _BodyTooLarge(Exception):
    pass


class Guard:
    """ASGI middleware around the app: authentication, Host and Origin checks, body size limit, error scrubbing.

    ``token`` None means authentication is off (``lowdose serve --no-auth``): then only connections to a
    loopback address are answered. A route ``allowed`` does not accept is 404 (after authentication, so
    that a client without the token learns nothing of the routes). ``allowed_origins`` are web origins,
    besides the server's own, whose pages may call it.
    """

    def __init__(
        self, app, token: ServerToken | None, max_body_bytes: int, allowed_origins: tuple[str, ...] = (), allowed=None
    ):
        self.app = app
        self.allowed = allowed  # (method, path) -> bool: the routes the server answers; None = all
        self.token = token
        self.max_body_bytes = max_body_bytes
        self.allowed_origins = {o.strip().rstrip("/").lower() for o in allowed_origins if o.strip()}
        self._refused = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        send = _with_security_headers(send)
        refusal = self._refusal(scope, headers)
        if refusal is not None:
            status, payload, extra = refusal
            return await send_json(send, status, payload, extra)
        await _GuardedRequest(self.app, scope, receive, send, self.max_body_bytes).run()

    def _refusal(self, scope, headers: dict) -> tuple[int, dict, list] | None:
        """Why this request is answered here without reaching the app, or None."""
        server = scope.get("server") or ("", 0)
        on_loopback = bool(server) and is_loopback(str(server[0]))
        if self.token is None and not on_loopback:
            return 403, {"detail": "this server runs without authentication and answers on loopback only"}, []
        if self.token is not None and not self.token.matches(bearer_token(headers.get("authorization"))):
            self._log_refusal(scope)
            return 401, {"detail": UNAUTHORISED}, [(b"www-authenticate", b'Bearer realm="lowdose"')]
        if on_loopback and not _host_allowed(headers.get("host", "")):
            # A web page whose host name was made to point at 127.0.0.1 (DNS rebinding) must not get in.
            return 400, {"detail": "invalid Host header for a server on this machine only"}, []
        origin = headers.get("origin")
        if origin and not self._origin_allowed(origin, headers.get("host", "")):
            # MONAI Label allows every origin; a web page elsewhere must not drive this server (CSRF).
            return 403, {"detail": "cross-origin request refused (allow it with --conf allowed_origins URL[,URL])"}, []
        if self.allowed is not None and not self.allowed(scope.get("method", ""), scope.get("path", "")):
            return 404, {"detail": "not found"}, []
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            return 413, too_large_detail(int(length), self.max_body_bytes), []
        return None

    def _log_refusal(self, scope) -> None:
        self._refused += 1
        if self._refused <= 10 or self._refused % 1000 == 0:  # a flood of attempts must not flood the log
            client = (scope.get("client") or ("?", 0))[0]
            log.warning(
                "refused %s %s from %s: missing or wrong access token (%d refused so far)",
                scope.get("method"),
                scope.get("path"),
                client,
                self._refused,
            )

    def _origin_allowed(self, origin: str, host_header: str) -> bool:
        origin = origin.strip().rstrip("/").lower()
        if origin in (f"http://{host_header.lower()}", f"https://{host_header.lower()}"):
            return True
        return origin in self.allowed_origins


class _GuardedRequest:
    """One request through the Guard: counts the body, holds back and rewrites error responses.

    Every error response (status >= 400) is held back and rewritten before it leaves: a 500 becomes a
    generic message with a reference that finds the details in the server log; a 4xx (or a 503 saying
    what the server lacks) keeps its message with paths removed.
    """

    def __init__(self, app, scope, receive, send, limit: int):
        self.app, self.scope, self._receive, self._send, self.limit = app, scope, receive, send, limit
        self.received = 0
        self.too_large = False
        self.started = False  # a response (ours or the app's) has begun on the wire
        self.held: dict | None = None
        self.reference: str | None = None

    async def run(self):
        try:
            await self.app(self.scope, self.receive, self.send)
        except Exception as exc:  # the app failed; the client gets a clean message, the log the details
            if self.too_large or isinstance(exc, _BodyTooLarge):
                return await self._finish(413, too_large_detail(None, self.limit))
            self.reference = self.reference or uuid.uuid4().hex[:12]
            log.error(
                "request %s %s failed (reference %s)",
                self.scope.get("method"),
                self.scope.get("path"),
                self.reference,
                exc_info=exc,
            )
            return await self._finish(500, internal_detail(self.reference))
        if self.held is not None and not self.started:  # the app never finished its error body
            await self._flush_held()

    async def receive(self):
        message = await self._receive()
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            if self.received > self.limit:
                self.too_large = True
                raise _BodyTooLarge()
        return message

    async def send(self, message):
        if message["type"] == "http.response.start":
            if message["status"] >= 400:
                self.held = {"start": message, "body": b""}
                return
            self.started = True
            return await self._send(message)
        if message["type"] == "http.response.body" and self.held is not None:
            self.held["body"] += message.get("body", b"")
            if not message.get("more_body", False) and not self.started:
                await self._flush_held()
            return
        return await self._send(message)

    async def _finish(self, status: int, payload: dict, headers: list | None = None) -> None:
        if not self.started:
            self.started = True
            await send_json(self._send, status, payload, headers)

    async def _flush_held(self) -> None:
        assert self.held is not None  # called only while a response is held back
        start, body = self.held["start"], self.held["body"]
        status = start["status"]
        if self.too_large:
            return await self._finish(413, too_large_detail(None, self.limit))
        if status == 500 or (status > 500 and not body.lstrip().startswith(b"{")):
            # The exception behind it (if any) reaches run() next and is logged under the same reference.
            self.reference = uuid.uuid4().hex[:12]
            log.warning(
                "request %s %s answered %d (reference %s): %s",
                self.scope.get("method"),
                self.scope.get("path"),
                status,
                self.reference,
                body[:2000].decode("utf-8", "replace"),
            )
            return await self._finish(status, internal_detail(self.reference))
        try:
            payload = json.loads(body) if body else {"detail": ""}
            if not isinstance(payload, dict):
                payload = {"detail": payload}
        except ValueError:
            payload = {"detail": body.decode("utf-8", "replace")}
        payload = json.loads(scrub(json.dumps(payload)))
        await self._finish(
            status, payload, [(k, v) for k, v in start.get("headers", []) if k.lower() in KEPT_ERROR_HEADERS]
        )


# Every response: never cached (it may hold patient data), never content-sniffed, never framed.
SECURITY_HEADERS = [
    (b"cache-control", b"no-store"),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
]


def _with_security_headers(send):
    async def sending(message):
        if message["type"] == "http.response.start":
            names = {k.lower() for k, _ in message.get("headers", [])}
            message = {
                **message,
                "headers": [*message.get("headers", []), *((k, v) for k, v in SECURITY_HEADERS if k not in names)],
            }
        await send(message)

    return sending


def _host_allowed(host_header: str) -> bool:
    host = host_header.strip().lower()
    if host.startswith("["):
        host = host[1:].split("]", 1)[0]
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    return host in ("localhost", "") or is_loopback(host)
