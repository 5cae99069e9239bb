"""Toxiproxy's HTTP API (2.x) on asyncio streams: HTTP/1.1 parsing, routing, handlers.

Routing and answers follow Toxiproxy 2.8 (``api.go``): a route that exists for another
method answers 405, an unknown path 404 (``404 page not found``), a ``User-Agent``
starting with ``Mozilla/`` 403; errors are ``{"error": ..., "status": N}`` plus a newline
with ``Content-Type: text/plain; charset=utf-8`` (Go's ``http.Error``), except for
``/populate``, whose errors are JSON without the newline and carry the proxies created
so far. Connections are kept alive (HTTP/1.1), with bounded reads and idle time.

As with Toxiproxy's router (gorilla/mux) and Go's ``net/http``: a path that is not clean
(``//proxies``, ``/proxies/../version``) is redirected (301) to its clean form; every
answer of a route (not 404, 405 or 301, which come before the route's middleware) carries
an ``X-Toxiproxy-Request-Id`` (an ``xid``, as zerolog's ``hlog.RequestIDHandler`` makes);
a request that cannot be read (garbage, different ``Content-Length`` headers, cut off by
the client, not complete within the read timeout) is answered 400 and the connection
closed; ``100 Continue`` goes out only when a body is to come.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import hashlib
import http
import itertools
import logging
import os
import socket
import time
import urllib.parse
from typing import Any, Awaitable, Callable, NamedTuple

from .errors import ApiError, bad_request_body, missing_field, proxy_already_exists, proxy_not_found
from .gojson import BadJSON, Field, decode_first, decode_struct, dumps, json_kind
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import Metrics
from .proxy import Proxy, listen_socket

__all__ = ["ApiServer", "VERSION", "REQUEST_ID_HEADER", "new_request_id"]

log = logging.getLogger("pytest_ddpfault.toxiproxy")

#: the Toxiproxy version this server answers to ``GET /version``
VERSION = "2.8.0"
MAX_BODY = 16 << 20  #: larger bodies are refused ("request body too large")
MAX_HEADER_BYTES = 1 << 20  #: Go's http.DefaultMaxHeaderBytes
#: the request line and headers together (Go adds 4096 bytes of "bufio slop"); more is 431
HEAD_LIMIT = MAX_HEADER_BYTES + 4096
#: the longest proxy name, or proxy and toxic names together, URL-escaped: so that a
#: request for any proxy or toxic fits in :data:`HEAD_LIMIT` with up to 1 KiB of method,
#: path and headers (a client's usual dozen)
MAX_NAME_BYTES = HEAD_LIMIT - 1024
MAX_HEADERS = 100
READ_TIMEOUT = 15.0  #: to read one request once it has started (Go: ReadTimeout)
IDLE_TIMEOUT = 60.0  #: between requests on a kept-alive connection (Go: IdleTimeout)
WRITE_TIMEOUT = 30.0
REMOVE_TIMEOUT = 5.0  #: for open connections to take a removed toxic out of their chains

_PROXY_FIELDS = (
    Field("name", "string"),
    Field("listen", "string"),
    Field("upstream", "string"),
    Field("enabled", "bool"),
)
_POPULATE_TYPE = '[]struct { toxiproxy.Proxy; Enabled *bool "json:\\"enabled\\"" }'
_JSON = "application/json"
_TEXT = "text/plain; charset=utf-8"
REQUEST_ID_HEADER = "X-Toxiproxy-Request-Id"
#: characters Go's ``url.URL.String`` leaves unescaped in a path (besides letters, digits, ``-_.~``)
_PATH_SAFE = "/$&+,:;=@"


class Request(NamedTuple):
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    keep_alive: bool
    query: str = ""


class Response(NamedTuple):
    status: int
    body: bytes = b""
    content_type: str | None = None
    close: bool = False
    headers: tuple[tuple[str, str], ...] = ()

    @classmethod
    def json(cls, status: int, obj: Any) -> "Response":
        return cls(status, dumps(obj), _JSON)

    @classmethod
    def error(cls, err: ApiError, close: bool = False) -> "Response":
        """Go's ``apiError``: JSON text through ``http.Error`` (text/plain, newline)."""
        return cls(err.status, dumps(err.as_json()) + b"\n", _TEXT, close)

    @classmethod
    def text(cls, status: int, text: str, close: bool = False) -> "Response":
        return cls(status, text.encode() + b"\n", _TEXT, close)

    def with_header(self, name: str, value: str) -> "Response":
        return self._replace(headers=self.headers + ((name, value),))


class _BadHTTP(Exception):
    """The request cannot be read; answered with ``response`` and the connection closed."""

    @classmethod
    def bad_request(cls) -> "_BadHTTP":
        return cls(400, "Bad Request")

    @classmethod
    def cut_off_body(cls, why: str) -> "_BadHTTP":
        """The body did not all come: Toxiproxy's handler fails to decode it (400)."""
        return cls(400, "Bad Request", Response.error(bad_request_body(why), close=True))

    def __init__(self, status: int, message: str, response: Response | None = None) -> None:
        super().__init__(message)
        self.response = response or Response.text(status, f"{status} {message}", close=True)


def _json_body(body: bytes) -> Any:
    try:
        return decode_first(body)
    except BadJSON as exc:
        raise bad_request_body(exc) from None


Handler = Callable[[dict[str, str], bytes], Awaitable[Response]]


class _RequestIds:
    """``xid`` s (github.com/rs/xid): 4 bytes of Unix time, 3 of machine id, 2 of pid and a
    3-byte counter, in lowercase base32hex: 20 characters, sortable by time."""

    def __init__(self) -> None:
        self._machine = hashlib.md5(socket.gethostname().encode()).digest()[:3]
        self._counter = itertools.count(int.from_bytes(os.urandom(3), "big"))

    def new(self) -> str:
        raw = (int(time.time()).to_bytes(4, "big") + self._machine
               + (os.getpid() & 0xFFFF).to_bytes(2, "big")
               + (next(self._counter) & 0xFFFFFF).to_bytes(3, "big"))
        return base64.b32hexencode(raw).decode("ascii").rstrip("=").lower()


new_request_id = _RequestIds().new


class ApiServer:
    """The proxies of one server and the HTTP API that manages them.

    ``read_timeout`` bounds the reading of one request once its first byte has come (Go's
    ``ReadTimeout``), ``idle_timeout`` the wait for the next request on a kept-alive
    connection; ``metrics`` adds the ``/metrics`` route when it has any metric enabled.
    """

    def __init__(self, read_timeout: float = READ_TIMEOUT, idle_timeout: float = IDLE_TIMEOUT,
                 metrics: Metrics | None = None) -> None:
        self.read_timeout = read_timeout
        self.idle_timeout = idle_timeout
        self.metrics = metrics if metrics is not None else Metrics()
        self.proxies: dict[str, Proxy] = {}
        self._lock = asyncio.Lock()
        self._server: asyncio.base_events.Server | None = None
        self._clients: set[asyncio.StreamWriter] = set()
        self._routes: list[tuple[tuple[str, ...], dict[str, Handler]]] = [
            (("reset",), {"POST": self.reset}),
            (("proxies",), {"GET": self.proxy_index, "POST": self.proxy_create}),
            (("populate",), {"POST": self.populate}),
            (("proxies", "{proxy}"), {"GET": self.proxy_show, "POST": self.proxy_update,
                                      "PATCH": self.proxy_update, "DELETE": self.proxy_delete}),
            (("proxies", "{proxy}", "toxics"), {"GET": self.toxic_index, "POST": self.toxic_create}),
            (("proxies", "{proxy}", "toxics", "{toxic}"),
             {"GET": self.toxic_show, "POST": self.toxic_update, "PATCH": self.toxic_update,
              "DELETE": self.toxic_delete}),
            (("version",), {"GET": self.version}),
        ]
        if self.metrics.enabled:
            self._routes.append((("metrics",), {"*": self.metrics_page}))  # any method, as mux

    # --- lifecycle -------------------------------------------------------------------

    async def start(self, host: str, port: int) -> tuple[str, int]:
        sock = listen_socket(host, port)
        try:
            self._server = await asyncio.start_server(self._serve, sock=sock, limit=HEAD_LIMIT)
        except BaseException:
            sock.close()
            raise
        sockname = self._server.sockets[0].getsockname()
        return sockname[0], sockname[1]

    async def close(self) -> None:
        """Stop listening, drop API clients, stop every proxy (closing its connections)."""
        if self._server is not None:
            self._server.close()
        for writer in list(self._clients):
            writer.transport.abort()
        for proxy in self.proxies.values():
            proxy.stop()

    # --- HTTP ------------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._clients.add(writer)
        try:
            while True:
                try:
                    request = await self._read_request(reader, writer)
                except _BadHTTP as exc:
                    response = exc.response
                    request = None
                else:
                    if request is None:
                        return
                    response = await self.dispatch(request)
                keep_alive = request is not None and request.keep_alive and not response.close
                writer.write(_render(response, keep_alive))
                await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT)
                if not keep_alive:
                    return
        except (ConnectionError, asyncio.TimeoutError, asyncio.IncompleteReadError):
            return
        except Exception:  # a bug costs this connection, never the server
            log.exception("toxiproxy API: connection failed")
        finally:
            self._clients.discard(writer)
            writer.close()

    async def _read_request(self, reader: asyncio.StreamReader,
                            writer: asyncio.StreamWriter) -> Request | None:
        """The next request; None when the client is done (EOF or idle too long).

        Once its first byte has come, the whole request must come within
        ``read_timeout``: a request still incomplete then (say, bytes with no newline),
        or cut off by the client, is a :class:`_BadHTTP` (400).
        """
        try:
            first = await asyncio.wait_for(reader.read(1), self.idle_timeout)
        except asyncio.TimeoutError:
            return None
        if not first:
            return None
        head = _Head()
        try:
            return await asyncio.wait_for(self._read_rest(first, head, reader, writer),
                                          self.read_timeout)
        except asyncio.TimeoutError:
            if head.in_body:
                raise _BadHTTP.cut_off_body(
                    f"read tcp: i/o timeout after {self.read_timeout:g} s") from None
            raise _BadHTTP.bad_request() from None
        except asyncio.IncompleteReadError:
            if head.in_body:
                raise _BadHTTP.cut_off_body("unexpected EOF") from None
            raise _BadHTTP.bad_request() from None

    async def _read_rest(self, first: bytes, head: "_Head", reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> Request | None:
        line = first if first == b"\n" else first + await _readline(reader)
        while line in (b"\r\n", b"\n"):  # tolerate blank lines before a request
            line = await _readline(reader)
            if not line:
                return None
        if not line.endswith(b"\n"):
            raise asyncio.IncompleteReadError(line, None)
        parts = line.decode("latin-1").strip().split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise _BadHTTP.bad_request()
        method, target, version = parts
        if not target.startswith("/") and "://" not in target:
            raise _BadHTTP.bad_request()  # Go: "invalid URI for request"
        headers: dict[str, str] = {}
        size = len(line)
        while True:
            line = await _readline(reader)
            size += len(line)
            if size > HEAD_LIMIT:
                raise _BadHTTP(431, "Request Header Fields Too Large")
            if not line.endswith(b"\n"):
                raise asyncio.IncompleteReadError(line, None)
            if line in (b"\r\n", b"\n"):
                break
            if len(headers) >= MAX_HEADERS:
                raise _BadHTTP(431, "Request Header Fields Too Large")
            name, sep, value = line.decode("latin-1").partition(":")
            name, value = name.strip().lower(), value.strip()
            if not sep or not name:
                raise _BadHTTP.bad_request()
            if name == "content-length" and headers.get(name, value) != value:
                raise _BadHTTP.bad_request()  # Go: "cannot contain multiple Content-Length"
            headers[name] = value
        connection = headers.get("connection", "").lower()
        keep_alive = "close" not in connection and (version != "HTTP/1.0" or "keep-alive" in connection)
        head.in_body = True
        body = await _read_body(reader, writer, headers)
        if "://" in target:
            url = urllib.parse.urlsplit(target)
            path, query = url.path, url.query
        else:  # origin-form: "//x" is a path here (Go's ParseRequestURI), not a host
            path, _, query = target.partition("?")
        return Request(method, urllib.parse.unquote(path), headers, body, keep_alive, query)

    async def dispatch(self, request: Request) -> Response:
        """Route one request and run its handler; never raises."""
        clean = _clean_path(request.path)
        if clean != request.path:  # mux's cleanPath redirect, query kept
            location = urllib.parse.quote(clean, safe=_PATH_SAFE)
            return Response(301).with_header(
                "Location", location + (f"?{request.query}" if request.query else ""))
        segments = tuple(request.path.split("/")[1:])
        for pattern, handlers in self._routes:
            params = _match(pattern, segments)
            if params is not None:
                break
        else:
            return Response.text(404, "404 page not found")
        handler = handlers.get(request.method) or handlers.get("*")
        if handler is None:
            return Response(405)
        # a route matched: from here on, the answer went through Toxiproxy's middleware
        return (await self._run(handler, params, request)).with_header(
            REQUEST_ID_HEADER, new_request_id())

    async def _run(self, handler: Handler, params: dict[str, str], request: Request) -> Response:
        if request.headers.get("user-agent", "").startswith("Mozilla/"):
            return Response.text(403, "User agent not allowed")
        try:
            async with self._lock:
                return await handler(params, request.body)
        except ApiError as exc:
            return Response.error(exc)
        except Exception as exc:  # a bug must cost one 500, never the server
            log.exception("toxiproxy API: %s %s failed", request.method, request.path)
            return Response.error(ApiError(f"internal error: {exc!r}", 500))

    # --- handlers (one per route and method, as in api.go) -------------------------------

    def _proxy(self, params: dict[str, str]) -> Proxy:
        proxy = self.proxies.get(params["proxy"])
        if proxy is None:
            raise proxy_not_found()
        return proxy

    async def proxy_index(self, params: dict[str, str], body: bytes) -> Response:
        return Response.json(200, {name: self.proxies[name].as_json() for name in sorted(self.proxies)})

    async def proxy_create(self, params: dict[str, str], body: bytes) -> Response:
        fields = {"name": "", "listen": "", "upstream": "", "enabled": True}
        _decode_proxy(_json_body(body), fields, "toxiproxy.Proxy")
        for required in ("name", "upstream"):
            if not fields[required]:
                raise missing_field(required)
        _check_addressable(fields["name"])
        if fields["name"] in self.proxies:
            raise proxy_already_exists()
        proxy = Proxy(fields["name"], fields["listen"], fields["upstream"], self.metrics)
        if fields["enabled"]:
            await proxy.start()
        self.proxies[proxy.name] = proxy
        return Response.json(201, proxy.as_json())

    async def populate(self, params: dict[str, str], body: bytes) -> Response:
        done: list[Proxy] = []
        try:
            await self._populate(body, done)
        except ApiError as exc:
            return Response.json(exc.status, {**exc.as_json(), "proxies": _proxies_json(done)})
        return Response.json(201, {"proxies": _proxies_json(done)})

    async def populate_from(self, body: bytes, done: list[Proxy] | None = None) -> list[Proxy]:
        """Create or replace the proxies of a ``/populate`` body (also what ``-config`` reads).

        Raises :class:`ApiError`; ``done`` collects the proxies made before an error.
        """
        done = [] if done is None else done
        async with self._lock:
            await self._populate(body, done)
        return done

    async def _populate(self, body: bytes, done: list[Proxy]) -> None:
        for fields in _populate_entries(body):
            done.append(await self._add_or_replace(fields))

    async def _add_or_replace(self, fields: dict[str, Any]) -> Proxy:
        _check_addressable(fields["name"])
        existing = self.proxies.get(fields["name"])
        if existing is not None:
            if existing.listen == fields["listen"] and existing.upstream == fields["upstream"]:
                return existing
            existing.stop()
        proxy = Proxy(fields["name"], fields["listen"], fields["upstream"], self.metrics)
        if fields["enabled"]:
            await proxy.start()
        self.proxies[proxy.name] = proxy
        return proxy

    async def proxy_show(self, params: dict[str, str], body: bytes) -> Response:
        return Response.json(200, self._proxy(params).as_json())

    async def proxy_update(self, params: dict[str, str], body: bytes) -> Response:
        proxy = self._proxy(params)
        fields = {"listen": proxy.listen, "upstream": proxy.upstream, "enabled": proxy.enabled}
        _decode_proxy(_json_body(body), fields, "toxiproxy.Proxy")
        await proxy.update(fields["listen"], fields["upstream"], fields["enabled"])
        return Response.json(200, proxy.as_json())

    async def proxy_delete(self, params: dict[str, str], body: bytes) -> Response:
        proxy = self._proxy(params)
        proxy.stop()
        del self.proxies[proxy.name]
        return Response(204)

    async def toxic_index(self, params: dict[str, str], body: bytes) -> Response:
        return Response.json(200, [spec.as_json() for spec in self._proxy(params).toxics.all()])

    async def toxic_create(self, params: dict[str, str], body: bytes) -> Response:
        proxy = self._proxy(params)
        spec = proxy.toxics.add(_json_body(body),
                                check=lambda spec: _check_addressable(proxy.name, spec.name))
        return Response.json(200, spec.as_json())

    async def toxic_show(self, params: dict[str, str], body: bytes) -> Response:
        return Response.json(200, self._proxy(params).toxics.get(params["toxic"]).as_json())

    async def toxic_update(self, params: dict[str, str], body: bytes) -> Response:
        toxics = self._proxy(params).toxics
        spec = toxics.get(params["toxic"])
        return Response.json(200, toxics.update(spec, _json_body(body)).as_json())

    async def toxic_delete(self, params: dict[str, str], body: bytes) -> Response:
        await _settle(self._proxy(params).toxics.remove(params["toxic"]))
        return Response(204)

    async def reset(self, params: dict[str, str], body: bytes) -> Response:
        pending: list[asyncio.Task] = []
        for name in sorted(self.proxies):
            proxy = self.proxies[name]
            await proxy.start()
            pending += proxy.toxics.reset()
        await _settle(pending)
        return Response(204)

    async def version(self, params: dict[str, str], body: bytes) -> Response:
        return Response(200, f'{{"version": "{VERSION}"}}\n'.encode(), "application/json;charset=utf-8")

    async def metrics_page(self, params: dict[str, str], body: bytes) -> Response:
        return Response(200, self.metrics.render(), METRICS_CONTENT_TYPE)


# --- helpers -----------------------------------------------------------------------------


class _Head:
    """How far the reading of one request got (for the answer when it stops short)."""

    __slots__ = ("in_body",)

    def __init__(self) -> None:
        self.in_body = False


def _clean_path(path: str) -> str:
    """gorilla/mux's ``cleanPath``: Go's ``path.Clean``, keeping a trailing slash."""
    if not path:
        return "/"
    if not path.startswith("/"):
        path = "/" + path
    parts: list[str] = []
    for segment in path.split("/"):
        if segment == "..":
            if parts:
                parts.pop()
        elif segment not in ("", "."):
            parts.append(segment)
    clean = "/" + "/".join(parts)
    return clean + "/" if path.endswith("/") and clean != "/" else clean


def _match(pattern: tuple[str, ...], segments: tuple[str, ...]) -> dict[str, str] | None:
    if len(pattern) != len(segments):
        return None
    params: dict[str, str] = {}
    for want, got in zip(pattern, segments):
        if want.startswith("{"):
            if not got:
                return None
            params[want[1:-1]] = got
        elif want != got:
            return None
    return params


def _decode_proxy(raw: Any, fields: dict[str, Any], top_type: str | None) -> None:
    try:
        decode_struct(raw, _PROXY_FIELDS, fields, struct_name="Proxy", top_type=top_type)
    except BadJSON as exc:
        raise bad_request_body(exc) from None


def _populate_entries(body: bytes) -> list[dict[str, Any]]:
    """Decode and check a whole ``/populate`` body before anything changes."""
    raw = _json_body(body)
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise bad_request_body(
            f"json: cannot unmarshal {json_kind(raw)} into Go value of type {_POPULATE_TYPE}")
    entries = []
    for index, item in enumerate(raw, start=1):
        fields = {"name": "", "listen": "", "upstream": "", "enabled": True}
        _decode_proxy(item, fields, None)
        for required in ("name", "upstream"):
            if not fields[required]:
                raise missing_field(f"{required} at proxy {index}")
        entries.append(fields)
    return entries


def _check_addressable(*names: str) -> None:
    """Refuse a name no request could address: its URL-escaped path would pass Go's header
    limit (real 2.8 creates it, then answers 431 to every request for it)."""
    if sum(len(name) for name in names) * 12 <= MAX_NAME_BYTES:  # 4 UTF-8 bytes, each %XX
        return
    size = sum(len(urllib.parse.quote(name, safe="", errors="surrogatepass")) for name in names)
    if size > MAX_NAME_BYTES:
        what = "name" if len(names) == 1 else "proxy and toxic names together"
        raise ApiError(f"{what} too long: {size} bytes URL-escaped, at most {MAX_NAME_BYTES} "
                       f"(a request for it must fit the header limit, {HEAD_LIMIT} bytes)", 400)


def _proxies_json(proxies: list[Proxy]) -> list[dict[str, Any]] | None:
    return [proxy.as_json() for proxy in proxies] or None  # Go marshals an empty slice as null


async def _settle(tasks: list[asyncio.Task]) -> None:
    if tasks:
        await asyncio.wait(tasks, timeout=REMOVE_TIMEOUT)


async def _readline(reader: asyncio.StreamReader) -> bytes:
    try:
        return await reader.readline()
    except ValueError:  # longer than the stream's limit
        raise _BadHTTP(431, "Request Header Fields Too Large") from None


async def _read_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     headers: dict[str, str]) -> bytes:
    chunked = "chunked" in headers.get("transfer-encoding", "").lower()
    length_text = headers.get("content-length")
    if not chunked and length_text is None:
        return b""
    too_large = _BadHTTP(413, "Request Entity Too Large", Response.error(
        bad_request_body("http: request body too large"), close=True))
    if not chunked:
        if not (length_text.isascii() and length_text.isdigit()):
            raise _BadHTTP(400, "Bad Request")
        length = int(length_text)
        if length > MAX_BODY:
            raise too_large
    if headers.get("expect", "").lower() == "100-continue" and (chunked or length > 0):
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # Go: only when a body is to come
    if not chunked:
        return await reader.readexactly(length)
    body = bytearray()
    while True:
        size_line = (await _readline(reader)).split(b";", 1)[0].strip()
        try:
            size = int(size_line, 16)
        except ValueError:
            raise _BadHTTP(400, "Bad Request") from None
        if size == 0:
            while (await _readline(reader)) not in (b"\r\n", b"\n", b""):
                pass  # trailers
            return bytes(body)
        if len(body) + size > MAX_BODY:
            raise too_large
        body += await reader.readexactly(size)
        await reader.readexactly(2)


def _render(response: Response, keep_alive: bool) -> bytes:
    status = response.status
    lines = [f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}"]
    if response.content_type is not None:
        lines.append(f"Content-Type: {response.content_type}")
        if response.content_type == _TEXT:
            lines.append("X-Content-Type-Options: nosniff")
    lines.extend(f"{name}: {value}" for name, value in response.headers)
    lines.append(f"Date: {email.utils.formatdate(usegmt=True)}")
    if status != 204:
        lines.append(f"Content-Length: {len(response.body)}")
    if not keep_alive:
        lines.append("Connection: close")
    head = "\r\n".join(lines) + "\r\n\r\n"
    return head.encode("latin-1") + (response.body if status != 204 else b"")
