"""Where the embedded server differed from a real Toxiproxy 2.8.0, and what it does better.

Each test here would have caught one of the differences found against the real server:
lone surrogates in names, the request id header, the port-conflict wording, HTTP edge
cases (conflicting Content-Length, incomplete or cut-off requests, unclean paths, ``100
Continue``), Go's 1 MiB header limit. The last tests pin what real 2.8.0 gets wrong and
ours does not: names no request could address, toxics that crash it (exit 2).
"""

from __future__ import annotations

import base64
import re
import select
import socket
import time
import urllib.parse
from types import SimpleNamespace

import pytest

from pytest_ddpfault.toxiproxy import EmbeddedToxiproxy

#: the longest name ours creates: Go's header limit (1 MiB + 4096) less 1 KiB for the rest
LONGEST_NAME = (1 << 20) + 4096 - 1024
#: the read timeout of the ``quick`` server: short, so that timeouts are tested fast
QUICK_READ_TIMEOUT = 0.5
XID = re.compile(r"[0-9a-v]{20}")


@pytest.fixture
def quick():
    srv = EmbeddedToxiproxy(read_timeout=QUICK_READ_TIMEOUT).start()
    try:
        yield srv
    finally:
        srv.stop(timeout=5.0)


def _assert_alive(api) -> None:
    assert api.get("/version").json() == {"version": "2.8.0"}
    assert api.get("/proxies").status_code == 200


def _raw(server, data: bytes, *, shut: bool = False, timeout: float = 5.0) -> bytes:
    """Send ``data`` (then half-close if ``shut``) and read everything until the server closes."""
    with socket.create_connection((server.host, server.port), timeout=timeout) as sock:
        sock.sendall(data)
        if shut:
            sock.shutdown(socket.SHUT_WR)
        answer = b""
        while True:
            more = sock.recv(65536)
            if not more:
                return answer
            answer += more


def _head(answer: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers, body


# --- names: a lone surrogate escape becomes U+FFFD, and breaks nothing ---------------------


def test_lone_surrogate_in_proxy_name_is_replaced_like_go(api, echo_upstream):
    body = ('{"name": "db\\ud800", "upstream": "%s", "listen": "127.0.0.1:0"}'
            % echo_upstream.address).encode()
    answer = api.post("/proxies", data=body)
    assert answer.status_code == 201, answer.text
    assert answer.json()["name"] == "db\ufffd"
    listing = api.get("/proxies")
    assert listing.status_code == 200, "one request must never break the server's state"
    assert list(listing.json()) == ["db\ufffd"]
    assert api.get("/proxies/db%EF%BF%BD").json()["name"] == "db\ufffd"
    _assert_alive(api)


def test_lone_surrogate_in_toxic_name_and_populate(api, echo_proxy):
    answer = api.post("/proxies/echo/toxics", data=b'{"type": "latency", "name": "\\udc00lat"}')
    assert answer.status_code == 200, answer.text
    assert answer.json()["name"] == "\ufffdlat"
    assert [t["name"] for t in api.get("/proxies/echo/toxics").json()] == ["\ufffdlat"]
    answer = api.post("/populate", data=b'[{"name": "\\ud83d", "upstream": "127.0.0.1:1", '
                                         b'"listen": "127.0.0.1:0", "enabled": false}]')
    assert answer.status_code == 201, answer.text
    assert answer.json()["proxies"][0]["name"] == "\ufffd"
    # a valid escaped pair stays one character
    answer = api.post("/proxies/echo/toxics", data=b'{"type": "noop", "name": "\\ud83d\\ude00"}')
    assert answer.json()["name"] == "\U0001F600"
    assert sorted(api.get("/proxies").json()) == ["echo", "\ufffd"]
    _assert_alive(api)


# --- X-Toxiproxy-Request-Id ----------------------------------------------------------------


def test_every_route_answer_carries_a_request_id(api, echo_proxy):
    answers = [
        api.get("/version"),
        api.get("/proxies"),
        api.post("/proxies", data=b"{"),  # 400
        api.get("/proxies/ghost"),  # 404 from the handler: the route matched
        api.post("/proxies/echo/toxics", json={"type": "latency"}),
        api.delete("/proxies/echo/toxics/latency_downstream"),  # 204
        api.post("/reset"),
        api.get("/version", headers={"User-Agent": "Mozilla/5.0"}),  # 403 (a middleware)
    ]
    ids = [answer.headers.get("X-Toxiproxy-Request-Id") for answer in answers]
    assert all(i is not None and XID.fullmatch(i) for i in ids), ids
    assert len(set(ids)) == len(ids), "one id per request"
    # an xid starts with its Unix time (4 bytes, big-endian), in base32hex
    stamp = int.from_bytes(base64.b32hexdecode(ids[0].upper() + "===="), "big") >> 64
    assert abs(stamp - time.time()) < 120


def test_no_request_id_before_a_route_matches(api):
    """gorilla/mux runs middleware (hlog's RequestIDHandler) only on a matched route: real
    2.8 sends no id with 404 page not found, 405 and the clean-path 301."""
    for answer in (api.get("/nope"), api.request("PUT", "/proxies")):
        assert answer.status_code in (404, 405)
        assert "X-Toxiproxy-Request-Id" not in answer.headers


# --- port conflict wording -------------------------------------------------------------------


def test_port_conflict_names_the_resolved_address(api, echo_upstream):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        for listen in (f"localhost:{port}", f"127.0.0.1:{port}"):
            answer = api.post("/proxies", json={"name": "clash", "upstream": echo_upstream.address,
                                                "listen": listen})
            assert answer.status_code == 500
            assert answer.json() == {
                "error": f"listen tcp 127.0.0.1:{port}: bind: address already in use",
                "status": 500}
    assert api.get("/proxies").json() == {}


# --- HTTP edge cases -------------------------------------------------------------------------


def test_different_content_lengths_are_400_at_once(server, api):
    start = time.monotonic()
    answer = _raw(server, b"POST /proxies HTTP/1.1\r\nHost: x\r\n"
                          b"Content-Length: 2\r\nContent-Length: 30\r\n\r\n{}")
    assert _head(answer)[0] == 400
    assert time.monotonic() - start < 3, "answered at once, not after the read timeout"
    # the same length twice is one length (Go accepts it)
    answer = _raw(server, b"GET /version HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n"
                          b"Content-Length: 0\r\nConnection: close\r\n\r\n")
    assert _head(answer)[0] == 200
    _assert_alive(api)


@pytest.mark.parametrize("partial", [
    b"GET /vers",  # no newline at all
    b"GET /version HTTP/1.1\r\nHost: x\r\n",  # the head never ends
], ids=["request-line", "headers"])
def test_incomplete_request_is_400_after_the_read_timeout(quick, partial):
    start = time.monotonic()
    answer = _raw(quick, partial)
    elapsed = time.monotonic() - start
    status, headers, body = _head(answer)
    assert (status, body) == (400, b"400 Bad Request\n")
    assert headers["connection"] == "close"
    assert QUICK_READ_TIMEOUT * 0.8 <= elapsed < QUICK_READ_TIMEOUT + 3, elapsed


def test_body_not_complete_within_the_read_timeout_is_400(quick):
    answer = _raw(quick, b"POST /proxies HTTP/1.1\r\nHost: x\r\nContent-Length: 40\r\n\r\n{\"na")
    status, _, body = _head(answer)
    assert status == 400 and body.startswith(b'{"error":"bad request body: ')


def test_read_timeout_counts_from_the_first_byte(quick):
    """An idle kept-alive connection is not a timed-out request."""
    with socket.create_connection((quick.host, quick.port), timeout=5) as sock:
        readable, _, _ = select.select([sock], [], [], QUICK_READ_TIMEOUT * 3)
        assert not readable, "nothing is owed to a client that has sent nothing"
        sock.sendall(b"GET /version HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = b""
        while more := sock.recv(65536):
            answer += more
    assert _head(answer)[0] == 200


@pytest.mark.parametrize("partial", [
    b"GET /vers",
    b"GET /version HTTP/1.1\r\nHos",
    b"GET /version HTTP/1.1\r\nHost: x\r\n",
], ids=["request-line", "header", "head"])
def test_request_cut_off_in_its_head_is_400(server, partial):
    status, headers, _ = _head(_raw(server, partial, shut=True))
    assert status == 400 and headers["connection"] == "close"


def test_request_cut_off_in_its_body_is_400_and_changes_nothing(server, api, echo_upstream):
    body = b'{"name": "cut", "upstream": "%s"}' % echo_upstream.address.encode()
    request = b"POST /proxies HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (len(body) + 10)
    status, _, answer = _head(_raw(server, request + body, shut=True))
    assert status == 400
    assert answer == b'{"error":"bad request body: unexpected EOF","status":400}\n'
    assert api.get("/proxies").json() == {}, "a request cut off must not take effect"


@pytest.mark.parametrize("target, location", [
    ("//proxies", "/proxies"),
    ("/proxies/../version", "/version"),
    ("/./version", "/version"),
    ("/proxies//echo/", "/proxies/echo/"),
    ("//proxies?a=1&b", "/proxies?a=1&b"),
])
def test_unclean_paths_redirect_to_the_clean_one(server, target, location):
    answer = _raw(server, f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    status, headers, body = _head(answer)
    assert (status, headers["location"], headers["content-length"], body) == (301, location, "0", b"")
    assert "x-toxiproxy-request-id" not in headers


def test_no_100_continue_without_a_body(server):
    answer = _raw(server, b"POST /reset HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                          b"Content-Length: 0\r\nConnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 204 ") and b"100 Continue" not in answer


def test_100_continue_when_a_body_is_to_come(server):
    with socket.create_connection((server.host, server.port), timeout=5) as sock:
        sock.sendall(b"POST /reset HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                     b"Content-Length: 2\r\nConnection: close\r\n\r\n")
        assert sock.recv(1024) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(b"{}")
        answer = b""
        while more := sock.recv(65536):
            answer += more
    assert answer.startswith(b"HTTP/1.1 204 ")


# --- Go's header limit: 1 MiB, plus 4096 bytes of bufio slop ---------------------------------


def test_a_head_within_gos_limit_is_served_and_beyond_it_is_431(either_api):
    address = urllib.parse.urlsplit(either_api.url)
    server = SimpleNamespace(host=address.hostname, port=address.port)

    def get_with_header(size: int) -> int:
        head = b"GET /version HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        filler = b"X-Big: " + b"a" * (size - len(head) - len(b"X-Big: \r\n\r\n")) + b"\r\n\r\n"
        assert len(head + filler) == size
        return _head(_raw(server, head + filler))[0]

    limit = (1 << 20) + 4096
    assert get_with_header(limit) == 200
    assert get_with_header(limit + 1) == 431


@pytest.mark.parametrize("length, toxic", [(1_000_000, "latency_downstream"), (LONGEST_NAME, None)])
def test_a_1_mb_proxy_name_is_served_like_go(either_api, echo_upstream, length, toxic):
    api, name = either_api, "p" * length
    answer = api.post("/proxies", json={"name": name, "upstream": echo_upstream.address,
                                        "listen": "127.0.0.1:0"})
    assert answer.status_code == 201, answer.text[:200]
    assert api.get(f"/proxies/{name}").json()["name"] == name
    if toxic:  # (the longest name leaves no room for a toxic's name in its requests)
        assert api.post(f"/proxies/{name}/toxics", json={"type": "latency"}).status_code == 200
        assert api.get(f"/proxies/{name}/toxics/{toxic}").status_code == 200
    assert api.delete(f"/proxies/{name}").status_code == 204
    assert api.get("/proxies").json() == {}


# --- what ours does better: names no request could address, toxics that crash real 2.8.0 ----


def test_a_name_no_request_could_address_is_refused(api, echo_upstream):
    """Real 2.8 creates a proxy whose name's URL passes the header limit, then answers 431
    to every request for it; ours refuses to create it (400), saying why."""
    fields = {"upstream": echo_upstream.address, "listen": "127.0.0.1:0"}
    answer = api.post("/proxies", json={"name": "p" * (LONGEST_NAME + 1), **fields})
    assert answer.status_code == 400
    assert answer.json()["error"] == (
        "name too long: 1051649 bytes URL-escaped, at most 1051648 "
        "(a request for it must fit the header limit, 1052672 bytes)")
    # URL-escaped: "é" is 6 bytes (%C3%A9), so 200 000 of them are too long
    assert api.post("/proxies", json={"name": "\u00e9" * 200_000, **fields}).status_code == 400
    populate = api.post("/populate", json=[{"name": "q" * (2 << 20), **fields}])
    assert populate.status_code == 400 and populate.json()["proxies"] is None
    assert api.get("/proxies").json() == {}, "nothing was created"

    proxy = "p" * 600_000
    assert api.post("/proxies", json={"name": proxy, **fields}).status_code == 201
    toxic = api.post(f"/proxies/{proxy}/toxics", json={"type": "latency", "name": "t" * 600_000})
    assert toxic.status_code == 400
    assert toxic.json()["error"].startswith("proxy and toxic names together too long: 1200000 bytes")
    assert api.get(f"/proxies/{proxy}/toxics").json() == []
    _assert_alive(api)




def test_latency_with_jitter_2_pow_62_keeps_serving(api, echo_proxy, connect, tp):
    api.add_toxic("echo", "latency", attributes={"latency": 0, "jitter": 2 ** 62})
    sock = connect(echo_proxy)
    sock.sendall(b"hello")
    _assert_alive(api)
    # the chunk is due at arrival ± up to 146 000 years; removing the toxic delivers it now
    assert api.delete("/proxies/echo/toxics/latency_downstream").status_code == 204
    assert tp.recv_exactly(sock, 5) == b"hello"
    _assert_alive(api)


def test_bandwidth_rate_minus_one_stalls_like_zero(api, echo_proxy, connect, tp):
    toxic = api.add_toxic("echo", "bandwidth", attributes={"rate": -1})
    assert toxic["attributes"] == {"rate": -1}
    sock = connect(echo_proxy)
    sock.sendall(b"hello")
    readable, _, _ = select.select([sock], [], [], 0.3)
    assert not readable, "a negative rate stalls the stream, as rate 0 does"
    _assert_alive(api)
    assert api.delete("/proxies/echo/toxics/bandwidth_downstream").status_code == 204
    assert tp.recv_exactly(sock, 5) == b"hello"


def test_slicer_with_all_zero_attributes_still_delivers(api, echo_proxy, connect, tp):
    api.add_toxic("echo", "slicer",
                  attributes={"average_size": 0, "size_variation": 0, "delay": 0})
    sock = connect(echo_proxy)
    payload = bytes(range(256)) * 40
    sock.sendall(payload)
    assert tp.recv_exactly(sock, len(payload)) == payload
    _assert_alive(api)
