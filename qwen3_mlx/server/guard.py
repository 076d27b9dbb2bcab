"""What stands between the network and the routes: ASGI middleware and uvicorn's protocol class.

Outermost first (see `create_app`): the `ErrorReshaper`s (Anthropic's and Ollama's error
shapes on their paths), `HostGuard` (DNS rebinding), `PathNormalizer` (trailing slashes, HEAD),
CORS, `ApiKeyGuard`, `BodyLimit`. `read_timeout_protocol` is the uvicorn HTTP
protocol that closes connections whose client stalls while sending a request.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import logging
import socket
from collections.abc import Iterable

import h11
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("qwen3_mlx.server")

# The method a HEAD request arrived with, kept in the scope after it is served as GET.
ORIGINAL_METHOD = "qwen3_mlx.original_method"


def error_body(message: str, *, type: str = "invalid_request_error", param=None, code=None) -> dict:
    # A lone surrogate (from a client's JSON) in a message would make the UTF-8 encoding of the
    # error itself fail, and the client would get a reset connection instead of an answer.
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(param, str):
        param = param.encode("utf-8", "backslashreplace").decode("utf-8")
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(status: int, message: str, headers=None, **kw) -> JSONResponse:
    return JSONResponse(error_body(message, **kw), status_code=status, headers=headers)


class BodyLimit:
    """Refuse request bodies over `limit` bytes (413), whether or not Content-Length is sent."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        message = f"request body exceeds this server's limit of {self.limit} bytes"
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            too_big = error_response(413, message, code="body_too_large")
            return await too_big(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            event = await receive()
            if event["type"] == "http.request":
                received += len(event.get("body", b""))
                if received > self.limit:  # FastAPI lets HTTPExceptions from body reading through
                    raise StarletteHTTPException(413, message)
            return event

        return await self.app(scope, limited_receive, send)


class ErrorReshaper:
    """Rewrite the JSON error responses (`{"error": {...}}`, status ≥ 400) of another API's paths
    (`matches`) into that API's error shape (`reshape(status, message)`). Added outermost, so
    the guards' refusals are reshaped too; streams (200) and bodies that hold no error object
    (a HEAD's empty one) pass untouched."""

    def __init__(self, app):
        self.app = app

    def matches(self, path: str) -> bool:
        raise NotImplementedError

    def reshape(self, status: int, message: str) -> dict:
        raise NotImplementedError

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self.matches(scope["path"]):
            return await self.app(scope, receive, send)
        held: dict | None = None
        chunks: list[bytes] = []

        async def reshape(message):
            nonlocal held
            if message["type"] == "http.response.start":
                headers = dict(message.get("headers") or [])
                if message["status"] >= 400 and headers.get(b"content-type", b"").startswith(
                    b"application/json"
                ):
                    held = message
                    return
            if held is None or message["type"] != "http.response.body":
                return await send(message)
            chunks.append(message.get("body", b""))
            if message.get("more_body"):
                return
            body = b"".join(chunks)
            reshaped = self._reshaped(held["status"], body)
            headers = held.get("headers") or []
            if reshaped is not None:
                body = reshaped
                headers = [(k, v) for k, v in headers if k != b"content-length"]
                headers.append((b"content-length", str(len(body)).encode()))
            await send({**held, "headers": headers})
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, reshape)

    def _reshaped(self, status: int, body: bytes) -> bytes | None:
        try:
            message = json.loads(body)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            return None
        reshaped = self.reshape(status, message)
        return json.dumps(reshaped, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


# -- Host header (DNS rebinding) -----------------------------------------------------------------


def host_of(header: str) -> str:
    """The host part of a Host header, lowercased, without port, brackets or a final dot."""
    header = header.strip().lower()
    if header.startswith("["):
        host = header[1:].partition("]")[0]
    elif header.count(":") == 1:
        host = header.partition(":")[0]
    else:
        host = header  # a name, an IPv4 address, or a bare (unbracketed) IPv6 address
    return host.rstrip(".")


def _address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


class HostPolicy:
    """Which Host headers are served. A DNS-rebinding page reaches the server under the attacker's
    DNS name, so names must be known ones; an address literal can't come from such a page.

    Always: loopback addresses, `localhost` and `*.localhost` (which never leave the machine), and
    the bound address or name. Bound to a wildcard address (0.0.0.0, ::), also any address
    literal and this machine's host name (and `<name>.local`). Plus `allowed`: names, `*.domain`
    for a domain's subdomains, or `*` for everything.
    """

    def __init__(self, bind_host: str, allowed: Iterable[str] = ()):
        names = {host_of(h) if h.strip() != "*" else "*" for h in allowed if h.strip()}
        self.allow_all = "*" in names
        self.suffixes = tuple(n[1:] for n in names if n.startswith("*."))
        self.names = {n for n in names if not n.startswith("*")}
        bind = host_of(bind_host)
        self.bind_ip = _address(bind)
        self.wildcard = bind == "" or (self.bind_ip is not None and self.bind_ip.is_unspecified)
        if self.wildcard:
            machine = socket.gethostname().lower().rstrip(".")
            if machine:
                self.names |= {machine, machine.split(".")[0] + ".local"}
        elif self.bind_ip is None:
            self.names.add(bind)

    def allows(self, header: str | None) -> bool:
        if not header or self.allow_all:
            return True  # no Host header: HTTP/1.0, never a browser
        host = host_of(header)
        if host in self.names or host == "localhost" or host.endswith(".localhost"):
            return True
        if self.suffixes and host.endswith(self.suffixes):
            return True
        ip = _address(host)
        if ip is None:
            return False
        return ip.is_loopback or ip == self.bind_ip or self.wildcard


class HostGuard:
    """403 for requests whose Host header `policy` refuses."""

    def __init__(self, app, policy: HostPolicy):
        self.app, self.policy = app, policy

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket"):
            host = next((v for k, v in scope.get("headers") or [] if k == b"host"), None)
            text = None if host is None else host.decode("latin-1")
            if not self.policy.allows(text):
                refused = error_response(
                    403,
                    f"Host {text!r} is not allowed: this server answers requests for localhost "
                    "and its bound address (a guard against DNS rebinding); start it with "
                    "--allowed-hosts to serve other names",
                    code="host_not_allowed",
                )
                return await refused(scope, receive, send)
        return await self.app(scope, receive, send)


# -- API key ---------------------------------------------------------------------------------


def _digest(value: bytes) -> bytes:
    # Equal-length digests: compare_digest then leaks neither the key nor its length.
    return hashlib.sha256(value).digest()


def has_api_key(headers: Iterable[tuple[bytes, bytes]], key: str) -> bool:
    """Whether raw ASGI `headers` carry `key` as `Authorization: Bearer` or `x-api-key`."""
    expected = _digest(key.encode("utf-8"))
    found = False
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.strip().partition(b" ")
            if scheme.lower() != b"bearer":
                continue
            value = token
        elif name != b"x-api-key":
            continue
        found |= hmac.compare_digest(_digest(value.strip()), expected)
    return found


class ApiKeyGuard:
    """401 for requests without the API key, except on `open_paths` (/health)."""

    def __init__(self, app, key: str, open_paths: Iterable[str] = ("/health",)):
        self.app, self.key, self.open_paths = app, key, frozenset(open_paths)

    async def __call__(self, scope, receive, send):
        if (
            scope["type"] == "http"
            and scope["path"] not in self.open_paths
            and not has_api_key(scope.get("headers") or [], self.key)
        ):
            refused = error_response(
                401,
                "invalid or missing API key: send 'Authorization: Bearer <key>' "
                "or 'x-api-key: <key>'",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
            return await refused(scope, receive, send)
        return await self.app(scope, receive, send)


# -- paths and methods ---------------------------------------------------------------------------


class PathNormalizer:
    """Serve `/v1/models/` as `/v1/models` (clients that join URLs loosely, without the 307 that
    some of them won't follow for a POST), and HEAD as GET without the body."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        if len(path) > 1 and path.endswith("/"):
            scope = dict(scope, path=path.rstrip("/") or "/")
            if scope.get("raw_path"):
                scope["raw_path"] = scope["raw_path"].rstrip(b"/") or b"/"
        if scope["method"] != "HEAD":
            return await self.app(scope, receive, send)
        scope = dict(scope, method="GET")
        scope[ORIGINAL_METHOD] = "HEAD"

        async def send_headers_only(message):
            if message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        return await self.app(scope, receive, send_headers_only)


# -- slow clients ----------------------------------------------------------------------------


class ReadTimeoutProtocol(H11Protocol):
    """uvicorn's h11 protocol, plus a read timeout: a client must send a request's headers within
    `read_timeout` seconds (from the connection's start, or from the request's first byte on a
    kept-alive connection), and may pause no longer than that within its body; else the
    connection is closed. uvicorn itself only times out idle kept-alive connections, so a client
    stalled mid-request (or one that never sends a byte) held its connection forever.

    From a complete request until its response is sent nothing is timed (generation takes as
    long as it takes); between requests uvicorn's keep-alive timeout applies.
    """

    read_timeout: float = 30.0

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._read_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        state = self.conn.their_state
        if state is h11.SEND_BODY:
            self._arm()  # the body's timeout counts from its latest bytes
        elif state is h11.IDLE:
            if self._read_timer is None:  # the headers' deadline counts from their first byte
                self._arm()
        else:
            self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._read_timer = self.loop.call_later(self.read_timeout, self._timed_out)

    def _disarm(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def _timed_out(self) -> None:
        self._read_timer = None
        if self.transport.is_closing():
            return
        if self.flow is not None and self.flow.read_paused:
            self._arm()  # uvicorn stopped reading (the app is behind), the client didn't stall
            return
        if self.client:
            log.debug("closing %s:%d: no complete request in %gs", *self.client, self.read_timeout)
        self.transport.close()


def read_timeout_protocol(seconds: float) -> type[ReadTimeoutProtocol]:
    """The protocol class to pass as uvicorn's `http=`, closing stalled clients after `seconds`."""
    return type("ReadTimeoutProtocol", (ReadTimeoutProtocol,), {"read_timeout": float(seconds)})
